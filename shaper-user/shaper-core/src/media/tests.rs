use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use shaper_common::media::MediaStream;

use super::rtp::{parse, Media, RtpHeader};
use super::stream::{Flow, MAX_SSRCS};
use super::*;
use crate::explain::pcap::{Capture, Record, LINKTYPE_ETHERNET};
use crate::testkit::{eth, v4};

const MS: u64 = 1_000_000;

fn rtp(pt: u8, seq: u16, ts: u32, ssrc: u32, payload: usize) -> Vec<u8> {
    let mut b = vec![0x80, pt];
    b.extend_from_slice(&seq.to_be_bytes());
    b.extend_from_slice(&ts.to_be_bytes());
    b.extend_from_slice(&ssrc.to_be_bytes());
    b.resize(12 + payload, 0x5a);
    b
}

fn header(b: &[u8]) -> RtpHeader {
    match parse(b) {
        Some(Media::Rtp(h)) => h,
        other => panic!("not RTP: {other:?}"),
    }
}

/// `n` packets of a 50 pps Opus stream (48 kHz, 960 per packet) through a flow in
/// arrival order, `arrive(i)` giving packet i's arrival in ms (None: lost); its stream.
fn run(n: u16, first_seq: u16, arrive: impl Fn(u16) -> Option<f64>) -> MediaStream {
    let mut sent: Vec<(u64, RtpHeader)> = (0..n)
        .filter_map(|i| {
            let h = header(&rtp(
                111,
                first_seq.wrapping_add(i),
                u32::from(i) * 960,
                7,
                100,
            ));
            arrive(i).map(|ms| ((ms * MS as f64) as u64, h))
        })
        .collect();
    sent.sort_by_key(|(t, _)| *t);
    let mut f = Flow::default();
    for (t, h) in sent {
        f.packet(&h, t, 112, 0);
    }
    assert_eq!(f.streams.len(), 1, "{f:?}");
    f.streams[0].1
}

#[test]
fn counts_loss_exactly_and_wraps_the_sequence() {
    // The first packet is probation's; counting starts at the second.
    let s = run(1000, 65_500, |i| Some(f64::from(i) * 20.0));
    assert_eq!((s.expected(), s.received, s.lost()), (999, 999, 0));
    assert_eq!(s.cycles, 1);
    // Every 50th packet lost (after the first two): 19 of 999.
    let s = run(1000, 65_500, |i| {
        (i < 2 || i % 50 != 0).then(|| f64::from(i) * 20.0)
    });
    assert_eq!((s.expected(), s.lost()), (999, 19));
    // The last packets lost do not count until a later one arrives: loss is seen in gaps.
    let s = run(100, 0, |i| (i < 90).then(|| f64::from(i) * 20.0));
    assert_eq!(s.lost(), 0);
}

#[test]
fn tells_reordering_and_duplicates_from_loss() {
    // Pairs swapped in arrival: every odd packet arrives 1 ms before its even one.
    let s = run(200, 10, |i| {
        Some(f64::from(i) * 20.0 - if i % 2 == 1 { 21.0 } else { 0.0 })
    });
    assert_eq!(s.lost(), 0);
    assert!(s.reordered >= 98, "{}", s.reordered);
    let mut f = Flow::default();
    for i in 0..10u16 {
        f.packet(
            &header(&rtp(111, i, 0, 7, 100)),
            u64::from(i) * 20 * MS,
            112,
            0,
        );
    }
    for seq in [9u16, 8, 5] {
        f.packet(&header(&rtp(111, seq, 0, 7, 100)), 300 * MS, 112, 0);
    }
    let s = f.streams[0].1;
    assert_eq!((s.duplicates, s.lost(), s.received), (3, 0, 9));
}

#[test]
fn measures_rfc3550_jitter_and_estimates_the_clock() {
    // Arrivals alternate 0 and 4 ms late: |D| is 4 ms at every step, so J tends to 4 ms.
    let s = run(500, 0, |i| {
        Some(f64::from(i) * 20.0 + if i % 2 == 1 { 4.0 } else { 0.0 })
    });
    assert_eq!(s.clock_hz, 48_000, "estimated from a dynamic payload type");
    let j = s.jitter_us().expect("jitter once the clock is known");
    assert!((3_800..=4_200).contains(&j), "jitter {j} us");
    // Steady arrivals: no jitter.
    let s = run(500, 0, |i| Some(f64::from(i) * 20.0));
    assert!(s.jitter_us().expect("known") < 10);
}

/// A random-payload flood is never a stream or a call, and costs bounded memory.
#[test]
fn random_udp_is_not_a_call() {
    let mut rng = 0x1234_5678_9abc_def0u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let lan = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 168, 1, 20)), 50_000);
    let peer = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(52, 113, 1, 1)), 3478);
    let mut calls = Calls::new(calls::DEFAULT_QUIET_NS, Addresses::Shown);
    let mut flow = Flow::default();
    for i in 0..20_000u64 {
        let mut b: Vec<u8> = (0..160).map(|_| next() as u8).collect();
        b[0] = 0x80 | (b[0] & 0x3f); // version 2 on every packet: the header check passes
        b[1] &= 0x7f;
        calls.packet(i * MS, Dir::Up, lan, peer, &b);
        if let Some(Media::Rtp(h)) = parse(&b) {
            flow.packet(&h, i * MS, b.len(), 0);
        }
        assert!(flow.streams.len() <= MAX_SSRCS);
    }
    assert!(flow.streams.is_empty(), "{:?}", flow.streams);
    assert!(calls.live().is_empty());
    assert!(calls.finish().is_empty());
}

fn frame(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut udp = Vec::new();
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    eth(&[], 0x0800, &v4(src, dst, 17, 46, 0, &udp))
}

/// Two LAN hosts in calls through a pcap: audio both ways for one (through TURN
/// ChannelData downstream, 3 % lost upstream), video for the other; and a quiet gap that
/// splits the first host's media into two calls.
#[test]
fn groups_streams_into_calls_from_a_capture() {
    let (a, b, far) = ([192, 168, 1, 10], [192, 168, 1, 11], [52, 113, 9, 9]);
    let mut recs = Vec::new();
    let mut push = |t_ms: u64, f: Vec<u8>| {
        recs.push(Record {
            ts_sec: (1_700_000_000 + t_ms / 1000) as u32,
            ts_frac: ((t_ms % 1000) * 1000) as u32,
            orig_len: f.len() as u32,
            data: f,
        })
    };
    for i in 0..1500u16 {
        let t = u64::from(i) * 20;
        if i % 100 >= 3 || i < 2 {
            push(
                t,
                frame(
                    a,
                    far,
                    50_000,
                    3478,
                    &rtp(111, i, u32::from(i) * 960, 1, 80),
                ),
            );
        }
        let mut cd = vec![0x40, 0x00];
        let down = rtp(111, i, u32::from(i) * 960, 2, 80);
        cd.extend_from_slice(&(down.len() as u16).to_be_bytes());
        cd.extend_from_slice(&down);
        push(t + 1, frame(far, a, 3478, 50_000, &cd));
        push(
            t + 2,
            frame(
                b,
                far,
                50_002,
                3479,
                &rtp(96, i, u32::from(i) * 1800, 3, 1000),
            ),
        );
    }
    // 20 s later host a calls again (the first call ended after 10 s of quiet).
    for i in 0..100u16 {
        let t = 50_000 + u64::from(i) * 20;
        push(
            t,
            frame(a, far, 50_010, 3478, &rtp(0, i, u32::from(i) * 160, 9, 160)),
        );
    }
    recs.sort_by_key(|r| (r.ts_sec, r.ts_frac));
    let cap = Capture {
        linktype: LINKTYPE_ETHERNET,
        snaplen: 65_535,
        nanos: false,
        records: recs,
    };
    let calls = from_capture(&cap, &[], calls::DEFAULT_QUIET_NS, Addresses::Shown).expect("reads");
    assert_eq!(calls.len(), 3, "{calls:#?}");
    let first = calls
        .iter()
        .find(|c| c.lan_host == "192.168.1.10" && c.start_s < 1_700_000_010.0);
    let first = first.expect("host a's first call");
    assert!(first.turn);
    assert_eq!(first.up.loss_where, "lan");
    // A capture knows nothing of the gateway's queues.
    assert_eq!(
        (first.up.shaper_drops, first.down.shaper_drops),
        (None, None)
    );
    // Sequence numbers 2, then 100-102, 200-202, ... 1400-1402 lost upstream: 43 of the
    // 1,499 counted (the first packet is probation's).
    assert_eq!((first.up.lost, first.up.expected), (43, 1499));
    assert_eq!(first.down.lost, 0);
    assert!(
        first
            .degraded
            .iter()
            .any(|d| d.starts_with("up loss 2.9 % (lan)")),
        "{:?}",
        first.degraded
    );
    assert!(first.up.mos < first.down.mos);
    assert!(
        (first.duration_s - 29.98).abs() < 0.1,
        "{}",
        first.duration_s
    );
    let video = calls
        .iter()
        .find(|c| c.lan_host == "192.168.1.11")
        .expect("host b");
    assert_eq!(video.down.streams, 0);
    assert_eq!(video.up.packets, 1499);
    assert!((video.up.bitrate_kbps - 50.0 * 1012.0 * 8.0 / 1000.0).abs() < 5.0);
    assert!(video.up.jitter_ms.expect("90 kHz estimated") < 0.1);
    let second = calls
        .iter()
        .filter(|c| c.lan_host == "192.168.1.10")
        .count();
    assert_eq!(second, 2);

    // Pseudonyms by default: stable under one key, other under another, no address.
    let named = |key| {
        from_capture(
            &cap,
            &[],
            calls::DEFAULT_QUIET_NS,
            Addresses::Pseudonymous(key),
        )
    };
    let (k1, k2) = (
        named([1; 32]).expect("reads"),
        named([2; 32]).expect("reads"),
    );
    assert!(k1
        .iter()
        .all(|c| c.lan_host.starts_with("h-") && !c.lan_host.contains("192")));
    assert_eq!(k1, named([1; 32]).expect("reads"));
    assert_ne!(k1[0].lan_host, k2[0].lan_host);
    // --lan decides the site's side: with the far end called LAN, nothing crosses.
    let far_lan = [
        crate::units::parse_cidr("52.113.0.0/16").expect("cidr"),
        crate::units::parse_cidr("192.168.0.0/16").expect("cidr"),
    ];
    assert!(
        from_capture(&cap, &far_lan, calls::DEFAULT_QUIET_NS, Addresses::Shown)
            .expect("reads")
            .is_empty()
    );
}

/// A kernel stream's key: LAN host 192.168.1.10 port 50000 with peer 52.113.9.9 port
/// 3478, going `dir`, SSRC `ssrc`.
fn kernel_key(dir: u8, ssrc: u32) -> shaper_common::media::MediaKey {
    host_key([192, 168, 1, 10], dir, ssrc)
}

/// [`kernel_key`] of LAN host `lan`.
fn host_key(lan: [u8; 4], dir: u8, ssrc: u32) -> shaper_common::media::MediaKey {
    let mut k = shaper_common::media::MediaKey {
        lan_port: 50_000,
        peer_port: 3478,
        ssrc,
        dir,
        family: 4,
        ..Default::default()
    };
    k.lan[..4].copy_from_slice(&lan);
    k.peer[..4].copy_from_slice(&[52, 113, 9, 9]);
    k
}

/// The kernel's feed: stream snapshots once a second. Both directions of one LAN host and
/// peer make one call; it ends `quiet` after its last packet, its streams are handed back
/// for deletion, and the ended streams seen again start no call.
#[test]
fn kernel_snapshots_make_calls_and_end_them() {
    use shaper_common::media::rtp_update;
    let key = kernel_key;
    let (ku, kd) = (key(0, 1), key(1, 2));
    let mut su = MediaStream::start(0, 100, 0, 1_000 * MS, 172, 0);
    let mut sd = MediaStream::start(0, 500, 0, 1_000 * MS, 172, 0);
    let mut calls = Calls::new(10_000 * MS, Addresses::Shown);
    calls.wall_offset_ns = 1_700_000_000_000_000_000;
    for i in 1..3000u32 {
        let t = 1_000 * MS + u64::from(i) * 20 * MS;
        if i % 10 != 0 {
            rtp_update(&mut su, 100 + i as u16, i * 160, t, 172);
        }
        rtp_update(&mut sd, 500 + i as u16, i * 160, t, 172);
        if i % 50 == 0 {
            calls.observe(t, &ku, &su);
            calls.observe(t, &kd, &sd);
            assert!(calls.expire(t).is_empty());
            // The line: full upstream every other sample, the measured classes dropping
            // 3 packets then; the download rate held at 80 % for the first half.
            let up = calls::LineSample {
                full: i % 100 == 0,
                rate_pct: 100.0,
                measured_drops: if i % 100 == 0 { 3 } else { 0 },
            };
            let down = calls::LineSample {
                full: false,
                rate_pct: if i <= 1500 { 80.0 } else { 100.0 },
                measured_drops: 0,
            };
            calls.line_tick(t, 1.0, &crate::dir::PerDir::new(up, down));
        }
    }
    let end = 1_000 * MS + 3000 * 20 * MS;
    calls.observe(end, &ku, &su);
    calls.observe(end, &kd, &sd);
    let live = calls.live();
    assert_eq!(live.len(), 1);
    assert_eq!((live[0].up.streams, live[0].down.streams), (1, 1));
    assert!(
        (live[0].start_s - 1_700_000_001.0).abs() < 1e-6,
        "{}",
        live[0].start_s
    );
    // Quiet: the call ends once, with the up direction's 10 % loss.
    assert!(calls.expire(end + 9_000 * MS).is_empty());
    let ended = calls.expire(end + 10_000 * MS);
    assert_eq!(ended.len(), 1);
    assert!(
        (ended[0].up.loss_pct - 10.0).abs() < 0.1,
        "{}",
        ended[0].up.loss_pct
    );
    assert_eq!(ended[0].down.lost, 0);
    // 59 samples: 29 full upstream, 30 with the download held at 80 %.
    let (u, d) = (&ended[0].up, &ended[0].down);
    let pct = |v: Option<f64>| v.map(|x| (x * 59.0 / 100.0).round() as u32);
    assert_eq!(
        (
            pct(u.line_full_pct),
            pct(u.rate_held_pct),
            u.lowest_rate_pct
        ),
        (Some(29), Some(0), None)
    );
    assert_eq!(
        (
            pct(d.line_full_pct),
            pct(d.rate_held_pct),
            d.lowest_rate_pct
        ),
        (Some(0), Some(30), Some(80.0))
    );
    // The gateway's own drops: 3 in each of the 29 full samples upstream, none down.
    assert_eq!((u.shaper_drops, d.shaper_drops), (Some(87), Some(0)));
    let mut gone = calls.take_ended_streams();
    gone.sort();
    assert_eq!(gone, vec![ku, kd]);
    assert!(calls.take_ended_streams().is_empty());
    // Were an ended stream still in the kernel's table (the daemon had not deleted it
    // yet), seen again it starts nothing and is handed back again.
    calls.observe(end + 11_000 * MS, &ku, &su);
    assert!(calls.live().is_empty() && calls.expire(end + 30_000 * MS).is_empty());
    assert_eq!(calls.take_ended_streams(), vec![ku]);
    // A stream active again (a new call), ended by a reload: recorded, handed back.
    let later = end + 40_000 * MS;
    for i in 0..100u32 {
        rtp_update(
            &mut su,
            3200 + i as u16,
            i * 160,
            later + u64::from(i) * 20 * MS,
            172,
        );
    }
    calls.observe(later + 2_000 * MS, &ku, &su);
    assert_eq!(calls.finish().len(), 1);
    assert_eq!(calls.take_ended_streams(), vec![ku]);
    assert!(calls.live().is_empty());
}

/// The daemon held up past one call's end and the next one's start, then looking once at
/// both: the stream that began after a quiet longer than `quiet` makes a call of its own,
/// and the first call ends with its own packets only.
#[test]
fn a_late_look_does_not_join_two_calls() {
    use shaper_common::media::rtp_update;
    let key = |ssrc: u32| kernel_key(0, ssrc);
    let stream = |start_ns: u64, seq: u16| {
        let mut s = MediaStream::start(0, seq, 0, start_ns, 172, 0);
        for i in 1..500u32 {
            let t = start_ns + u64::from(i) * 20 * MS;
            rtp_update(&mut s, seq.wrapping_add(i as u16), i * 160, t, 172);
        }
        s
    };
    // The first call's stream: 1 s to 11 s; the second's from 20 s, same host and peer.
    let (ka, a) = (key(1), stream(1_000 * MS, 100));
    let (kb, b) = (key(2), stream(20_000 * MS, 7));
    let mut calls = Calls::new(3_000 * MS, Addresses::Shown);
    calls.observe(11_000 * MS, &ka, &a);
    assert!(calls.expire(11_000 * MS).is_empty());
    // Nothing looked between 11 s and 31 s.
    calls.observe(31_000 * MS, &ka, &a);
    calls.observe(31_000 * MS, &kb, &b);
    let first = calls.expire(31_000 * MS);
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0].up.packets, a.received);
    assert!(
        (first[0].duration_s - 9.98).abs() < 0.01,
        "{}",
        first[0].duration_s
    );
    assert_eq!(calls.take_ended_streams(), vec![ka]);
    let live = calls.live();
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].up.packets, b.received);
    let second = calls.expire(40_000 * MS);
    assert_eq!(second.len(), 1);
    assert!(
        (second[0].start_s - 20.0).abs() < 1e-6,
        "{}",
        second[0].start_s
    );
}

/// The gateway's own drops of a call: the measured classes' drops of the seconds the call
/// carried media, summed per direction; seconds after it went quiet (beyond two) and
/// before it began count nothing; a call the line was never sampled for has none.
#[test]
fn a_calls_shaper_drops_are_its_seconds_class_drops() {
    use shaper_common::media::{rtp_update, MediaKey};
    let key = |host: u8| {
        let mut k = MediaKey {
            lan_port: 50_000,
            peer_port: 3478,
            ssrc: u32::from(host),
            dir: 0,
            family: 4,
            ..MediaKey::default()
        };
        k.lan[..4].copy_from_slice(&[192, 168, 1, host]);
        k.peer[..4].copy_from_slice(&[52, 113, 9, 9]);
        k
    };
    let sample = |up: u64, down: u64| {
        let s = |measured_drops| calls::LineSample {
            full: measured_drops > 0,
            rate_pct: 100.0,
            measured_drops,
        };
        crate::dir::PerDir::new(s(up), s(down))
    };
    let mut calls = Calls::new(10_000 * MS, Addresses::Shown);
    // Drops before any call: nobody's.
    calls.line_tick(500 * MS, 1.0, &sample(100, 100));
    let (ka, kb) = (key(10), key(11));
    let mut sa = MediaStream::start(0, 100, 0, 1_000 * MS, 172, 0);
    let mut sb = MediaStream::start(0, 100, 0, 1_000 * MS, 172, 0);
    for sec in 1..=20u64 {
        for p in 0..50u64 {
            let n = (sec - 1) * 50 + p + 1;
            let t = 1_000 * MS + n * 20 * MS;
            let (seq, ts) = (100 + n as u16, n as u32 * 160);
            rtp_update(&mut sa, seq, ts, t, 172);
            // Host b's call stops sending after 5 s.
            if sec <= 5 {
                rtp_update(&mut sb, seq, ts, t, 172);
            }
        }
        let now = (sec + 1) * 1_000 * MS;
        calls.observe(now, &ka, &sa);
        calls.observe(now, &kb, &sb);
        // 2 drops up every second, 1 down in seconds 11-15 only.
        calls.line_tick(now, 1.0, &sample(2, u64::from((11..=15).contains(&sec))));
    }
    let ended = calls.finish();
    let of = |host: &str| {
        let c = ended.iter().find(|c| c.lan_host == host).expect(host);
        (c.up.shaper_drops, c.down.shaper_drops)
    };
    // Host a: all 20 seconds. Host b: its 5 seconds of media and the next two (its last
    // packet within two seconds), none of the download's.
    assert_eq!(of("192.168.1.10"), (Some(40), Some(5)));
    assert_eq!(of("192.168.1.11"), (Some(14), Some(0)));
    // `shaper calls` shows it beside where the loss was.
    let table = render(&ended);
    assert!(
        table.contains("  lan; gw drops 40; line full 100 %"),
        "{table}"
    );
    // No sample of the line during the call: not known.
    let mut calls = Calls::new(10_000 * MS, Addresses::Shown);
    calls.observe(21_000 * MS, &ka, &sa);
    let ended = calls.finish();
    assert_eq!(ended.len(), 1);
    assert_eq!(
        (ended[0].up.shaper_drops, ended[0].up.line_full_pct),
        (None, None)
    );
}

/// With the drop tracer attached (`Calls::stream_drops`), a call's drops are its own
/// streams' (`MediaStream::gw_drops`, summed per direction), exact, whatever its classes
/// dropped; without it, the classes' upper bound as before, not marked exact.
#[test]
fn a_calls_shaper_drops_are_its_streams_own_where_the_tracer_counts() {
    use shaper_common::media::rtp_update;
    let key = |ssrc: u32, dir: u8| kernel_key(dir, ssrc);
    let line = crate::dir::PerDir::new(
        calls::LineSample {
            full: true,
            rate_pct: 100.0,
            measured_drops: 9,
        },
        calls::LineSample {
            full: true,
            rate_pct: 100.0,
            measured_drops: 9,
        },
    );
    let run = |exact: bool| {
        let mut calls = Calls::new(10_000 * MS, Addresses::Shown);
        calls.stream_drops = exact;
        // Two download streams (audio, video) and one upload stream.
        let mut streams = [
            (key(1, 1), MediaStream::start(0, 0, 0, 1_000 * MS, 172, 0)),
            (key(2, 1), MediaStream::start(0, 0, 0, 1_000 * MS, 172, 0)),
            (key(3, 0), MediaStream::start(0, 0, 0, 1_000 * MS, 172, 0)),
        ];
        for n in 1..100u64 {
            for (_, s) in &mut streams {
                rtp_update(s, n as u16, n as u32 * 160, 1_000 * MS + n * 20 * MS, 172);
            }
        }
        streams[0].1.gw_drops = 3;
        streams[1].1.gw_drops = 4;
        for (k, s) in &streams {
            calls.observe(3_000 * MS, k, s);
        }
        calls.line_tick(3_000 * MS, 1.0, &line);
        let ended = calls.finish();
        assert_eq!(ended.len(), 1);
        (
            ended[0].up.shaper_drops,
            ended[0].up.shaper_drops_exact,
            ended[0].down.shaper_drops,
            ended[0].down.shaper_drops_exact,
        )
    };
    assert_eq!(run(true), (Some(0), true, Some(7), true));
    assert_eq!(run(false), (Some(9), false, Some(9), false));
}

/// Streams in no call are handed back to be deleted once quiet, so that none keeps its
/// slot in the kernel's table for good: one left from before the daemon started, and one
/// of a call not followed because `MAX_CALLS` were.
#[test]
fn quiet_streams_in_no_call_are_handed_back() {
    use super::calls::MAX_CALLS;
    let key = |host: u16, ssrc: u32| {
        let [a, b] = host.to_be_bytes();
        host_key([10, a, b, 10], 0, ssrc)
    };
    let mut calls = Calls::new(3_000 * MS, Addresses::Shown);
    // Quiet since 1 s, first seen at 10 s.
    let old = MediaStream::start(0, 1, 0, 1_000 * MS, 172, 0);
    calls.observe(10_000 * MS, &key(0, 1), &old);
    assert!(calls.live().is_empty());
    assert_eq!(calls.take_ended_streams(), vec![key(0, 1)]);
    // MAX_CALLS calls followed, and one more host's stream.
    let now = 20_000 * MS;
    let live = MediaStream::start(0, 1, 0, now, 172, 0);
    for h in 0..=MAX_CALLS {
        calls.observe(now, &key(h as u16, 2), &live);
    }
    assert_eq!(calls.untracked, 1, "one call more than MAX_CALLS");
    assert!(calls.take_ended_streams().is_empty(), "all still active");
    // The untracked one goes quiet (the followed ones are seen at their last packet too,
    // then end through expire as before).
    let extra = key(MAX_CALLS as u16, 2);
    calls.observe(now + 5_000 * MS, &extra, &live);
    assert_eq!(calls.take_ended_streams(), vec![extra]);
}
