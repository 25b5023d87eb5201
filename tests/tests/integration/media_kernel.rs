//! RTP streams measured by the classifier itself (`[calls]`, issue 17): RTP in a measured
//! class run through the real classifier (loaded through the verifier) with
//! BPF_PROG_TEST_RUN, its maps pinned on bpffs and the streams read back with
//! `bpf::read_media`, as `shaper run` reads them. Loss, duplicates and reordering come out
//! exactly as sent, plain and inside TURN ChannelData; random RTP-shaped payloads and RTP in
//! a class that is not measured make no stream; both directions of a flow give one LAN
//! side and peer. The packet always passes unchanged. (Jitter needs arrival times the test
//! run does not control; `shaper_common::media`'s unit tests cover it.)

use shaper_common::media::{MediaKey, MediaStream, MAP_MEDIA, MEDIA_TURN};
use shaper_common::{DIR_DOWN, DIR_UP};
use shaper_tests::config::{Config, Rule};
use shaper_tests::packet::Pkt;
use shaper_tests::rig::Rig;
use shaper_user::kernel::bpf::{self, Pins};

use crate::common::root_or_skip;

const LAN: &str = "192.168.7.20";
const PEER: &str = "198.51.100.9";
const LAN6: &str = "fd00::20";
const PEER6: &str = "2001:db8::9";
/// The WAN-side port of the `video` rule (measured) and of the `bulk` rule (not).
const VIDEO_PORT: u16 = 5004;
const BULK_PORT: u16 = 6004;
/// RTP payload bytes after the fixed header.
const MEDIA_BYTES: usize = 160;

/// Classes video (measured), bulk and default; UDP to WAN port 5004 is video, to 6004
/// bulk; `[calls] classes = ["video"]`.
fn policy() -> String {
    let c = Config::new(10_000_000, 40_000_000)
        .class("video", 0, 30)
        .class("bulk", 6, 10)
        .default_class("default", 4, 30)
        .rule(
            Rule::new("video", "video")
                .protocol("udp")
                .dst_ports(&[&VIDEO_PORT.to_string()]),
        )
        .rule(
            Rule::new("bulk", "bulk")
                .protocol("udp")
                .dst_ports(&[&BULK_PORT.to_string()]),
        );
    format!("{}[calls]\nclasses = [\"video\"]\n", c.to_toml())
}

/// The rig's maps pinned under a bpffs directory of this test's own (what `read_media`
/// reads), removed on drop.
struct Pinned(Pins);

impl Pinned {
    fn new(r: &Rig, tag: &str) -> Pinned {
        let pins = Pins::new(format!(
            "/sys/fs/bpf/shaper-test-{tag}-{}",
            std::process::id()
        ));
        bpf::remove_pins(&pins);
        bpf::ensure_bpffs(&pins).expect("bpffs");
        bpf::stage_maps(&r.obj, &pins).expect("pin the maps");
        bpf::commit_maps(&pins).expect("commit the pins");
        Pinned(pins)
    }

    fn streams(&self) -> Vec<(MediaKey, MediaStream)> {
        bpf::read_media(&self.0).expect("read MEDIA")
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        bpf::remove_pins(&self.0);
    }
}

/// An RTP packet: version 2, payload type `pt`, `MEDIA_BYTES` of payload.
fn rtp(pt: u8, seq: u16, ts: u32, ssrc: u32) -> Vec<u8> {
    let mut b = vec![0x80, pt];
    b.extend(seq.to_be_bytes());
    b.extend(ts.to_be_bytes());
    b.extend(ssrc.to_be_bytes());
    b.extend([0x5a; MEDIA_BYTES]);
    b
}

/// `data` in a TURN ChannelData message on channel 0x4001 (RFC 8656 §12.4), padded to 4.
fn channel_data(data: &[u8]) -> Vec<u8> {
    let mut b = 0x4001u16.to_be_bytes().to_vec();
    b.extend((data.len() as u16).to_be_bytes());
    b.extend(data);
    b.resize(b.len().next_multiple_of(4), 0);
    b
}

/// Runs `frame` through the classifier on `ifindex`: it must pass (TC_ACT_UNSPEC),
/// unchanged, in `class`.
fn send(r: &mut Rig, frame: &[u8], ifindex: u32, class: u32) {
    let res = bpf::test_run(&mut r.obj, frame, ifindex, 1).expect("test run");
    assert_eq!(res.ret, u32::MAX, "TC_ACT_UNSPEC: the packet passes");
    assert_eq!(res.priority, class, "the packet's class");
    assert_eq!(res.data, frame, "the packet is not changed");
}

/// Packets `seqs` of the stream `ssrc` of `flow` in order (payload type 96 at 90 kHz,
/// 3,000 units apart), each through the classifier and checked as [`send`] does.
fn send_run(
    r: &mut Rig,
    flow: &Pkt,
    seqs: std::ops::Range<u16>,
    ssrc: u32,
    ifindex: u32,
    class: u32,
) {
    for seq in seqs {
        send(
            r,
            &flow.with_payload(&rtp(96, seq, u32::from(seq) * 3000, ssrc)),
            ifindex,
            class,
        );
    }
}

/// The streams of the flow `lan_port` <-> `peer_port`.
fn of_flow(
    streams: &[(MediaKey, MediaStream)],
    lan_port: u16,
    peer_port: u16,
) -> Vec<(MediaKey, MediaStream)> {
    streams
        .iter()
        .filter(|(k, _)| k.lan_port == lan_port && k.peer_port == peer_port)
        .copied()
        .collect()
}

/// The key of the upload stream `ssrc` from `LAN` port `lan_port` to `PEER`'s
/// `VIDEO_PORT`, plain RTP.
fn up_key(lan_port: u16, ssrc: u32) -> MediaKey {
    MediaKey {
        lan: v4(LAN),
        peer: v4(PEER),
        lan_port,
        peer_port: VIDEO_PORT,
        ssrc,
        dir: DIR_UP as u8,
        family: 4,
        flags: 0,
        _pad: 0,
    }
}

fn v4(a: &str) -> [u8; 16] {
    let a: std::net::Ipv4Addr = a.parse().expect("IPv4 address");
    let mut b = [0; 16];
    b[..4].copy_from_slice(&a.octets());
    b
}

fn v6(a: &str) -> [u8; 16] {
    a.parse::<std::net::Ipv6Addr>()
        .expect("IPv6 address")
        .octets()
}

/// The sequence numbers of 300 packets from `first` (wrapping past 65535), as they arrive:
/// 3 lost (indexes 50, 120, 250), index 80 again after 82, indexes 200 and 201 swapped.
fn impaired(first: u16) -> Vec<u16> {
    let mut order: Vec<usize> = Vec::new();
    for i in 0..300usize {
        match i {
            50 | 120 | 250 => {}
            82 => order.extend([82, 80]),
            200 => order.push(201),
            201 => order.push(200),
            _ => order.push(i),
        }
    }
    order
        .into_iter()
        .map(|i| first.wrapping_add(i as u16))
        .collect()
}

/// What a receiver makes of [`impaired`]: the first packet only puts the SSRC on
/// probation, the second starts the stream; of the 299 packets from there 3 are lost, one
/// came twice, one late. Every packet from the second on counts its bytes.
fn assert_impaired(s: &MediaStream, first: u16, udp_len: u64, what: &str) {
    assert_eq!(s.base_seq, first.wrapping_add(1), "{what}: base");
    assert_eq!(s.max_seq, first.wrapping_add(299), "{what}: highest");
    assert_eq!(s.cycles, 1, "{what}: the sequence wrapped once");
    assert_eq!(
        (
            s.expected(),
            s.received,
            s.lost(),
            s.duplicates,
            s.reordered
        ),
        (299, 296, 3, 1, 1),
        "{what}: expected, received, lost, duplicates, reordered"
    );
    assert_eq!(s.bytes, 297 * udp_len, "{what}: UDP payload bytes");
    assert_eq!(s.payload_type, 96, "{what}: payload type");
    assert!(s.last_ns >= s.first_ns && s.first_ns > 0, "{what}: times");
}

#[test]
fn streams_are_measured_with_their_loss_duplicates_and_reordering() {
    if !root_or_skip() {
        return;
    }
    let mut r = shaper_tests::rig::load(&policy());
    let pins = Pinned::new(&r, "media");
    let video = r.class_of("video");
    let wan = r.wan;
    assert!(pins.streams().is_empty(), "no stream before any packet");

    // (a) Plain RTP, upload.
    let first = 65_400u16;
    let ssrc = 0x1234_5678;
    let flow = Pkt::udp(LAN, PEER, 50_020, VIDEO_PORT);
    for seq in impaired(first) {
        let ts = u32::from(seq.wrapping_sub(first)) * 3000;
        send(
            &mut r,
            &flow.with_payload(&rtp(96, seq, ts, ssrc)),
            wan,
            video,
        );
    }
    // (b) The same inside TURN ChannelData (170 bytes of RTP, 2 of padding).
    let turn_ssrc = 0x0bad_cafe;
    let turn = Pkt::udp(LAN, PEER, 50_022, VIDEO_PORT);
    for seq in impaired(first) {
        let ts = u32::from(seq.wrapping_sub(first)) * 3000;
        let mut inner = rtp(96, seq, ts, turn_ssrc);
        inner.truncate(170);
        send(
            &mut r,
            &turn.with_payload(&channel_data(&inner)),
            wan,
            video,
        );
    }

    let streams = pins.streams();
    let plain = of_flow(&streams, 50_020, VIDEO_PORT);
    assert_eq!(plain.len(), 1, "one stream in the plain flow: {plain:?}");
    let (k, s) = plain[0];
    let want = up_key(50_020, ssrc);
    assert_eq!(k, want, "the plain stream's key");
    assert_impaired(&s, first, (12 + MEDIA_BYTES) as u64, "plain RTP");
    assert_eq!(s.flags, 0, "plain RTP: no TURN flag");

    let relayed = of_flow(&streams, 50_022, VIDEO_PORT);
    assert_eq!(relayed.len(), 1, "one stream in the TURN flow: {relayed:?}");
    let (k, s) = relayed[0];
    assert_eq!(
        k,
        MediaKey {
            lan_port: 50_022,
            ssrc: turn_ssrc,
            flags: MEDIA_TURN,
            ..want
        },
        "the TURN stream's key"
    );
    assert_impaired(&s, first, 4 + 172, "RTP in ChannelData");
    assert_eq!(s.flags, MEDIA_TURN, "RTP in ChannelData: the TURN flag");

    // (c) Header-only RTP (12 bytes of UDP payload; encoders send such packets, e.g.
    // ffmpeg's H.264 parameter sets come in 15-byte ones): each counts, plain and relayed.
    for (lan_port, wrap) in [(50_024u16, false), (50_026, true)] {
        let flow = Pkt::udp(LAN, PEER, lan_port, VIDEO_PORT);
        for seq in 0..20u16 {
            let mut p = rtp(96, seq, u32::from(seq) * 3000, 0x5151);
            p.truncate(12);
            let p = if wrap { channel_data(&p) } else { p };
            send(&mut r, &flow.with_payload(&p), wan, video);
        }
        let s = of_flow(&pins.streams(), lan_port, VIDEO_PORT);
        assert_eq!(
            s.len(),
            1,
            "header-only RTP (TURN: {wrap}): one stream: {s:?}"
        );
        assert_eq!(
            (s[0].1.expected(), s[0].1.received, s[0].1.lost()),
            (19, 19, 0),
            "header-only RTP (TURN: {wrap}): every packet after probation counted"
        );
    }
}

#[test]
fn random_payloads_and_unmeasured_classes_make_no_stream() {
    if !root_or_skip() {
        return;
    }
    let mut r = shaper_tests::rig::load(&policy());
    let pins = Pinned::new(&r, "media-noise");
    let (video, bulk) = (r.class_of("video"), r.class_of("bulk"));
    let wan = r.wan;

    // (c) 5,000 random payloads whose first byte says RTP version 2, in the video class.
    let mut rng = shaper_tests::rng::Rng::xorshift64(0x5eed_0017_0000_0001);
    let noise = Pkt::udp(LAN, PEER, 50_030, VIDEO_PORT);
    let mut rtp_shaped = 0;
    for _ in 0..5_000 {
        let n = 16 + rng.below(300) as usize;
        let mut b = rng.bytes(n);
        b[0] = 0x80 | (b[0] & 0x3f);
        if !(200..=207).contains(&b[1]) && !(72..=76).contains(&(b[1] & 0x7f)) {
            rtp_shaped += 1;
        }
        send(&mut r, &noise.with_payload(&b), wan, video);
    }
    assert!(
        rtp_shaped > 4_000,
        "most of the noise passes the header check"
    );

    // (d) A well-formed stream in the bulk class, not measured.
    let unmeasured = Pkt::udp(LAN, PEER, 50_032, BULK_PORT);
    for i in 0..100u16 {
        let p = rtp(0, 7_000 + i, u32::from(i) * 160, 0x7777_0001);
        send(&mut r, &unmeasured.with_payload(&p), wan, bulk);
    }
    // A control: the same stream in the video class is measured.
    let control = Pkt::udp(LAN, PEER, 50_034, VIDEO_PORT);
    for i in 0..100u16 {
        let p = rtp(0, 7_000 + i, u32::from(i) * 160, 0x7777_0001);
        send(&mut r, &control.with_payload(&p), wan, video);
    }

    let streams = pins.streams();
    assert!(
        of_flow(&streams, 50_030, VIDEO_PORT).is_empty(),
        "no stream from random payloads: {streams:?}"
    );
    assert!(
        of_flow(&streams, 50_032, BULK_PORT).is_empty(),
        "no stream in a class that is not measured: {streams:?}"
    );
    let c = of_flow(&streams, 50_034, VIDEO_PORT);
    assert_eq!(c.len(), 1, "the control stream: {streams:?}");
    assert_eq!(
        (c[0].1.received, c[0].1.lost(), c[0].1.clock_hz),
        (99, 0, 8_000),
        "the control stream: PCMU's 8 kHz"
    );
    assert_eq!(streams.len(), 1, "nothing else: {streams:?}");
}

#[test]
fn both_directions_of_a_flow_have_the_same_lan_side_and_peer() {
    if !root_or_skip() {
        return;
    }
    let mut r = shaper_tests::rig::load(&policy());
    let pins = Pinned::new(&r, "media-dirs");
    let video = r.class_of("video");
    let (wan, lan) = (r.wan, r.lan);

    // (e) LAN -> WAN on the WAN side's egress, WAN -> LAN on the LAN side's; IPv4 and IPv6.
    for (family, lan_addr, peer_addr, lan_port) in
        [(4u8, LAN, PEER, 50_040u16), (6, LAN6, PEER6, 50_042)]
    {
        let up = Pkt::udp(lan_addr, peer_addr, lan_port, VIDEO_PORT);
        let down = Pkt::udp(peer_addr, lan_addr, VIDEO_PORT, lan_port);
        for i in 0..20u16 {
            let ts = u32::from(i) * 960;
            send(
                &mut r,
                &up.with_payload(&rtp(111, i, ts, 0xaaaa_0001)),
                wan,
                video,
            );
            send(
                &mut r,
                &down.with_payload(&rtp(111, i, ts, 0xbbbb_0002)),
                lan,
                video,
            );
        }
        let streams = pins.streams();
        let flow = of_flow(&streams, lan_port, VIDEO_PORT);
        assert_eq!(flow.len(), 2, "IPv{family}: a stream each way: {streams:?}");
        let addr = |a: &str| if family == 4 { v4(a) } else { v6(a) };
        for (dir, ssrc) in [(DIR_UP, 0xaaaa_0001u32), (DIR_DOWN, 0xbbbb_0002)] {
            let Some((k, s)) = flow.iter().find(|(k, _)| u32::from(k.dir) == dir) else {
                panic!("IPv{family}: no stream in direction {dir}: {flow:?}");
            };
            assert_eq!(
                (k.lan, k.peer, k.family, k.ssrc, k.flags),
                (addr(lan_addr), addr(peer_addr), family, ssrc, 0),
                "IPv{family}, direction {dir}: the site's side, the peer"
            );
            assert_eq!(
                (s.received, s.lost(), s.duplicates, s.reordered),
                (19, 0, 0, 0),
                "IPv{family}, direction {dir}"
            );
        }
    }
}

/// Two streams of one flow whose keys share a `MEDIA_SLOTS` slot: the first takes the
/// slot, the second is kept in `MEDIA` (the hash map), and both are measured exactly as
/// [`impaired`] sent them, interleaved packet by packet, and the drop tracer finds each
/// in its map (every test packet is freed as dropped). `bpf::forget_media` (what the
/// call task does when a call ends) frees the slot and removes the entry; a stream that
/// comes back afterwards starts afresh, and takes the freed slot.
#[test]
fn streams_sharing_a_slot_are_both_measured_and_forgotten() {
    use shaper_common::media::{media_slot, MediaSlot, MAP_MEDIA_SLOTS};
    if !root_or_skip() {
        return;
    }
    let mut r = shaper_tests::rig::load(&policy());
    let pins = Pinned::new(&r, "media-slot");
    let video = r.class_of("video");
    let wan = r.wan;
    let key = |ssrc| up_key(50_030, ssrc);
    let first_ssrc = 0x00c0_ffee;
    let slot = media_slot(&key(first_ssrc));
    let second_ssrc = (1..)
        .find(|&s| s != first_ssrc && media_slot(&key(s)) == slot)
        .expect("an SSRC that shares the slot");
    // The drop tracer, attached to this object: BPF_PROG_TEST_RUN frees each test packet
    // with kfree_skb, carrying the class mark the classifier gave it, on the rig's WAN
    // (loopback), so every packet of a stream counts as one the gateway dropped, in
    // whichever map the stream is.
    let tracer = std::path::Path::new("/sys/kernel/btf/vmlinux").exists();
    if tracer {
        bpf::attach_drops(&mut r.obj, &pins.0, video >> 16).expect("attach the drop tracer");
    } else {
        shaper_tests::util::note_skip("the kernel has no BTF: the drop tracer's part is not run");
    }
    let flow = Pkt::udp(LAN, PEER, 50_030, VIDEO_PORT);
    let first = 65_400u16;
    for seq in impaired(first) {
        let ts = u32::from(seq.wrapping_sub(first)) * 3000;
        for ssrc in [first_ssrc, second_ssrc] {
            send(
                &mut r,
                &flow.with_payload(&rtp(96, seq, ts, ssrc)),
                wan,
                video,
            );
        }
    }
    // Where each stream is, read from the maps themselves.
    let slots: aya::maps::Array<_, MediaSlot> =
        aya::maps::Array::try_from(bpf::open_pinned(&pins.0, MAP_MEDIA_SLOTS).expect("slots"))
            .expect("MEDIA_SLOTS is an array");
    let held = slots.get(&slot, 0).expect("the slot");
    assert_eq!(held.key, key(first_ssrc), "the first stream holds the slot");
    assert_eq!(
        in_media_keys(&pins.0),
        vec![key(second_ssrc)],
        "the second stream, whose slot was taken, is in MEDIA"
    );
    let streams = of_flow(&pins.streams(), 50_030, VIDEO_PORT);
    assert_eq!(streams.len(), 2, "both streams are read: {streams:?}");
    for (k, s) in &streams {
        assert_impaired(
            s,
            first,
            (12 + MEDIA_BYTES) as u64,
            &format!("SSRC {:#x}", k.ssrc),
        );
        if tracer {
            // 298 packets sent, the first on probation before its stream existed.
            assert_eq!(
                s.gw_drops, 297,
                "SSRC {:#x}: each packet of the stream freed as dropped is counted",
                k.ssrc
            );
        }
    }

    // The call ended: both forgotten (one in a slot, one in MEDIA), a second time no error.
    let keys = [key(first_ssrc), key(second_ssrc)];
    bpf::forget_media(&pins.0, &keys).expect("forget");
    assert!(pins.streams().is_empty(), "nothing left after forgetting");
    assert_eq!(
        slots.get(&slot, 0).expect("the slot").key.family,
        0,
        "the slot is free"
    );
    bpf::forget_media(&pins.0, &keys).expect("forgetting again is no error");

    // The second stream comes back: probation again, then the free slot.
    send_run(&mut r, &flow, 1_000..1_010, second_ssrc, wan, video);
    let streams = of_flow(&pins.streams(), 50_030, VIDEO_PORT);
    assert_eq!(streams.len(), 1, "one stream again: {streams:?}");
    let (k, s) = streams[0];
    assert_eq!(k, key(second_ssrc));
    assert_eq!(
        (s.base_seq, s.expected(), s.received),
        (1_001, 9, 9),
        "it started afresh (the first packet on probation)"
    );
    assert_eq!(
        slots.get(&slot, 0).expect("the slot").key,
        key(second_ssrc),
        "in the slot the first stream freed"
    );

    // The flow's cache entry still names the slot for the first SSRC (the hint its
    // packets followed). Another flow's stream with that same SSRC, whose key also falls
    // in the slot, takes it once it is free: the first flow's packets of that SSRC must
    // not count in it (the slot's generation moved on twice: freed, taken), and start a
    // stream of their own, in MEDIA.
    bpf::forget_media(&pins.0, &[key(second_ssrc)]).expect("forget");
    let other_port = (1024..u16::MAX)
        .find(|&p| p != 50_030 && media_slot(&up_key(p, first_ssrc)) == slot)
        .expect("a port whose stream of the first SSRC shares the slot");
    let other = Pkt::udp(LAN, PEER, other_port, VIDEO_PORT);
    send_run(&mut r, &other, 2_000..2_005, first_ssrc, wan, video);
    assert_eq!(
        slots.get(&slot, 0).expect("the slot").key,
        up_key(other_port, first_ssrc),
        "the other flow's stream took the slot"
    );
    send_run(&mut r, &flow, 3_000..3_007, first_ssrc, wan, video);
    let theirs = of_flow(&pins.streams(), other_port, VIDEO_PORT);
    assert_eq!(theirs.len(), 1, "{theirs:?}");
    assert_eq!(
        (theirs[0].1.base_seq, theirs[0].1.received),
        (2_001, 4),
        "the slot's stream counts only its own flow's packets"
    );
    let ours = of_flow(&pins.streams(), 50_030, VIDEO_PORT);
    assert_eq!(ours.len(), 1, "{ours:?}");
    assert_eq!(ours[0].0, key(first_ssrc));
    assert_eq!(
        (ours[0].1.base_seq, ours[0].1.received),
        (3_001, 6),
        "the first flow's packets started a stream of their own (after probation)"
    );
    assert_eq!(
        in_media_keys(&pins.0),
        vec![key(first_ssrc)],
        "in MEDIA: the slot is taken"
    );
}

/// The keys of the streams in `MEDIA` (not in slots).
fn in_media_keys(pins: &Pins) -> Vec<MediaKey> {
    let hashed: aya::maps::HashMap<_, MediaKey, MediaStream> =
        aya::maps::HashMap::try_from(bpf::open_pinned(pins, MAP_MEDIA).expect("MEDIA"))
            .expect("MEDIA is a hash map");
    hashed.keys().map(|k| k.expect("a key")).collect()
}
