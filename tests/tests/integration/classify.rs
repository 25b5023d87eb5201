//! Which class does a packet land in? The real classifier, loaded through the
//! verifier, run on crafted frames with BPF_PROG_TEST_RUN; `skb->priority`
//! as the program leaves it is the HTB class. Also checked against the
//! reference model (`compile::reference_match`) on random packets, and that
//! no input makes the program drop.

use aya::maps::PerCpuArray;
use shaper_common::{Dir, DIR_UP, GLOBAL_COUNTERS, G_MALFORMED, G_NON_IP, MAP_GLOBAL_STATS};
use shaper_tests::config::fixture;
use shaper_tests::packet::{checksum, Pkt};
use shaper_tests::rig::Rig;
use shaper_user::{
    compile::{self, classid_of, PacketView},
    kernel::bpf,
};

use crate::common::root_or_skip;

/// The WAN-side run, with the frame as the program left it (DSCP re-marking).
fn run_out(r: &mut Rig, frame: &[u8]) -> (u32, Vec<u8>) {
    let res = bpf::test_run(&mut r.obj, frame, r.wan, 1).expect("test run");
    (res.priority, res.data)
}

/// The rig with the `classify` policy (tests/fixtures/policies/classify.toml).
fn rig() -> Rig {
    shaper_tests::rig::load(&fixture("classify"))
}

/// A per-direction global counter of the loaded classifier (summed over CPUs).
fn global(r: &Rig, dir: u32, counter: u32) -> u64 {
    let m: PerCpuArray<_, u64> =
        PerCpuArray::try_from(r.obj.map(MAP_GLOBAL_STATS).expect("GLOBAL_STATS")).expect("map");
    m.get(&(dir * GLOBAL_COUNTERS + counter), 0)
        .expect("counter")
        .iter()
        .sum()
}

#[test]
fn packets_land_in_their_classes() {
    if !root_or_skip() {
        return;
    }
    let mut r = rig();
    let video = r.class_of("video");
    let images = r.class_of("images");
    let default = r.class_of("default");
    let inter = r.class_of("interactive");
    let lan_host = "192.168.7.20";

    // Upload and download of the same Teams flow.
    assert_eq!(
        r.run(&Pkt::udp(lan_host, "52.113.9.9", 50020, 3478).build(), true),
        video
    );
    assert_eq!(
        r.run(
            &Pkt::udp("52.113.9.9", lan_host, 3478, 50020).build(),
            false
        ),
        video
    );
    // Right port, wrong destination: default.
    assert_eq!(
        r.run(&Pkt::udp(lan_host, "8.8.4.4", 50020, 3478).build(), true),
        default
    );
    // DICOM over IPv4 with options.
    let mut p = Pkt::tcp(lan_host, "203.0.113.5", 40000, 104);
    p.v4_options = vec![0x94, 0x04, 0, 0, 1, 1, 1, 0];
    assert_eq!(r.run(&p.build(), true), images);
    // 802.1Q and QinQ.
    let mut p = Pkt::tcp(lan_host, "203.0.113.5", 40000, 11112);
    p.vlans = vec![100];
    assert_eq!(r.run(&p.build(), true), images);
    p.vlans = vec![100, 200];
    assert_eq!(r.run(&p.build(), true), images);
    // PPPoE session frames (RFC 2516): IP after the 8-byte PPPoE + PPP header.
    // Source ports of their own, so the flow cache does not answer for them.
    let mut p = Pkt::tcp(lan_host, "203.0.113.5", 40100, 104);
    p.pppoe = Some(0x1234);
    assert_eq!(r.run(&p.build(), true), images, "DICOM upload in PPPoE");
    let mut p = Pkt::udp("2603:1063::7", "fd00::20", 3479, 50100);
    p.pppoe = Some(0x1234);
    assert_eq!(r.run(&p.build(), false), video, "IPv6 download in PPPoE");
    // PPPoE inside a VLAN tag (at tc egress an outer tag is metadata, but a
    // QinQ inner tag is in the data), and inside QinQ.
    let mut p = Pkt::tcp(lan_host, "203.0.113.5", 40101, 11112);
    p.vlans = vec![100];
    p.pppoe = Some(7);
    assert_eq!(r.run(&p.build(), true), images, "PPPoE in 802.1Q");
    let mut p = Pkt::udp("fd00::20", "2603:1063::7", 50101, 3480);
    p.vlans = vec![100, 200];
    p.pppoe = Some(7);
    assert_eq!(r.run(&p.build(), true), video, "IPv6 in PPPoE in QinQ");
    // Protocol-field compression: a one-byte PPP protocol, IP a byte earlier.
    let mut p = Pkt::tcp(lan_host, "203.0.113.5", 40102, 104);
    p.pppoe = Some(0x1234);
    assert_eq!(
        r.run(&p.build_compressed_ppp(), true),
        images,
        "compressed PPP protocol 0x21"
    );
    let mut p = Pkt::udp("fd00::20", "2603:1063::7", 50102, 3481);
    p.pppoe = Some(0x1234);
    assert_eq!(
        r.run(&p.build_compressed_ppp(), true),
        video,
        "compressed PPP protocol 0x57"
    );
    // IPv6 with hop-by-hop, destination options and AH before TCP.
    let mut p = Pkt::tcp("fd00::20", "2001:db8::5", 40000, 104);
    p.v6_ext = vec![(0, 8), (60, 16), (51, 16)];
    assert_eq!(r.run(&p.build(), true), images);
    assert_eq!(
        r.run(
            &Pkt::udp("fd00::20", "2603:1063::7", 50000, 3479).build(),
            true
        ),
        video
    );
    // Downloaded IPv6 Teams media.
    assert_eq!(
        r.run(
            &Pkt::udp("2603:1063::7", "fd00::20", 3479, 50000).build(),
            false
        ),
        video
    );
    // ICMP to HSCN: the address-only rule.
    assert_eq!(
        r.run(&Pkt::new(lan_host, "10.1.2.3", 1, 0, 0).build(), true),
        inter
    );
    // DSCP EF only counts on upload.
    let mut p = Pkt::udp(lan_host, "198.51.100.1", 1000, 2000);
    p.dscp = 46;
    assert_eq!(r.run(&p.build(), true), video);
    let mut p = Pkt::udp("198.51.100.1", lan_host, 2000, 1000);
    p.dscp = 46;
    assert_eq!(r.run(&p.build(), false), default);
}

#[test]
fn fragments_follow_their_first_fragment() {
    if !root_or_skip() {
        return;
    }
    let mut r = rig();
    let video = r.class_of("video");
    let default = r.class_of("default");
    let mut first = Pkt::udp("192.168.7.20", "52.112.1.1", 50020, 3478);
    first.frag = Some((0x4242, 0, true));
    first.payload = 1200;
    assert_eq!(r.run(&first.build(), true), video);
    let mut later = first.clone();
    later.frag = Some((0x4242, 151, false));
    later.payload = 300;
    assert_eq!(
        r.run(&later.build(), true),
        video,
        "later fragment follows the first"
    );
    later.frag = Some((0x4343, 151, false));
    assert_eq!(
        r.run(&later.build(), true),
        default,
        "unknown fragment goes to default"
    );
    // IPv6 fragment header.
    let mut first = Pkt::udp("fd00::20", "2603:1063::9", 50020, 3478);
    first.frag = Some((0xdead_beef, 0, true));
    assert_eq!(r.run(&first.build(), true), video);
    let mut later = first.clone();
    later.frag = Some((0xdead_beef, 100, false));
    assert_eq!(r.run(&later.build(), true), video);
    later.frag = Some((0xdead_0000, 100, false));
    assert_eq!(r.run(&later.build(), true), default);
}

#[test]
fn malformed_packets_go_to_default_and_pass() {
    if !root_or_skip() {
        return;
    }
    let mut r = rig();
    let default = r.class_of("default");
    let good = Pkt::tcp("192.168.7.20", "203.0.113.5", 40000, 104).build();
    // Cut inside the TCP ports, bad IHL, bad version, ARP, an IPv6 extension
    // header cut short, too many extension headers. (BPF_PROG_TEST_RUN itself
    // refuses frames shorter than Ethernet + the IP header for the IP
    // ethertypes, so a frame cut inside the IP header cannot be fed here.)
    let mut bad_ihl = good.clone();
    bad_ihl[14] = 0x42;
    let mut bad_ver = good.clone();
    bad_ver[14] = 0x75;
    let mut arp = good.clone();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    let mut v6 = Pkt::tcp("fd00::20", "2001:db8::5", 40000, 104);
    v6.v6_ext = vec![(60, 16)];
    let v6 = v6.build();
    let mut long_ext = Pkt::tcp("fd00::20", "2001:db8::5", 40000, 104);
    long_ext.v6_ext = vec![(0, 8); 9];
    // PPPoE: an LCP frame (not IP), a bad VER/TYPE, a discovery code in a
    // session frame, frames cut inside the PPPoE header (the test run takes
    // those: 0x8864 is not an IP ethertype) and inside the IP ports after it.
    let mut pppoe = Pkt::tcp("192.168.7.20", "203.0.113.5", 40000, 104);
    pppoe.pppoe = Some(0x1234);
    let pppoe = pppoe.build();
    let mut lcp = pppoe[..22].to_vec();
    lcp[20..22].copy_from_slice(&0xc021u16.to_be_bytes());
    lcp[18..20].copy_from_slice(&10u16.to_be_bytes());
    lcp.extend([1, 1, 0, 8, 0, 0, 0, 0]);
    let mut pppoe_ver = pppoe.clone();
    pppoe_ver[14] = 0x21;
    let mut pppoe_code = pppoe.clone();
    pppoe_code[15] = 0x09;
    let cases: Vec<(&str, Vec<u8>, u32)> = vec![
        (
            "ipv4 cut inside ports",
            good[..14 + 20 + 2].to_vec(),
            G_MALFORMED,
        ),
        ("ihl 2", bad_ihl, G_MALFORMED),
        ("version 7", bad_ver, G_MALFORMED),
        ("arp", arp, G_NON_IP),
        (
            "ipv6 cut inside an extension header",
            v6[..14 + 40 + 6].to_vec(),
            G_MALFORMED,
        ),
        (
            "ipv6 cut inside the ports",
            v6[..14 + 40 + 16 + 2].to_vec(),
            G_MALFORMED,
        ),
        ("nine extension headers", long_ext.build(), G_MALFORMED),
        ("pppoe lcp", lcp, G_NON_IP),
        ("pppoe version/type 0x21", pppoe_ver, G_MALFORMED),
        ("pppoe code 0x09", pppoe_code, G_MALFORMED),
        (
            "pppoe cut inside its header",
            pppoe[..14 + 7].to_vec(),
            G_MALFORMED,
        ),
        (
            "ipv4 in pppoe cut inside ports",
            pppoe[..22 + 20 + 2].to_vec(),
            G_MALFORMED,
        ),
    ];
    for (what, frame, counter) in cases {
        let ifindex = r.wan;
        let before = global(&r, DIR_UP, counter);
        let res = bpf::test_run(&mut r.obj, &frame, ifindex, 1)
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        assert_eq!(res.priority, default, "{what}: default class");
        assert_eq!(
            res.ret,
            u32::MAX,
            "{what}: TC_ACT_UNSPEC (pass), never a drop"
        );
        assert_eq!(
            global(&r, DIR_UP, counter),
            before + 1,
            "{what}: counted as {}",
            if counter == G_NON_IP {
                "non-IP"
            } else {
                "malformed"
            }
        );
    }
}

#[test]
fn dscp_is_remarked_on_the_wan_with_a_valid_checksum() {
    if !root_or_skip() {
        return;
    }
    let mut r = rig();
    let (prio, out) = run_out(
        &mut r,
        &Pkt::tcp("192.168.7.20", "203.0.113.5", 40000, 104).build(),
    );
    assert_eq!(prio, r.class_of("images"));
    assert_eq!(out[15] >> 2, 10, "AF11 written");
    assert_eq!(
        checksum(&out[14..34]),
        0,
        "IPv4 header checksum still valid"
    );
    let (_, out) = run_out(
        &mut r,
        &Pkt::tcp("fd00::20", "2001:db8::5", 40000, 104).build(),
    );
    let tclass = ((out[14] & 0x0f) << 4) | (out[15] >> 4);
    assert_eq!(tclass >> 2, 10, "AF11 in the IPv6 traffic class");
    // The same inside PPPoE (and PPPoE in a VLAN tag): the IP header is
    // re-marked where it is, the headers before it are left alone.
    for vlans in [vec![], vec![100]] {
        let mut p = Pkt::tcp("192.168.7.20", "203.0.113.5", 40001, 104);
        p.vlans = vlans.clone();
        p.pppoe = Some(0x1234);
        let l3 = p.l3_offset();
        let frame = p.build();
        let (prio, out) = run_out(&mut r, &frame);
        assert_eq!(prio, r.class_of("images"), "PPPoE, vlans {vlans:?}");
        assert_eq!(out[..l3], frame[..l3], "Ethernet and PPPoE headers kept");
        assert_eq!(out[l3 + 1] >> 2, 10, "AF11 written in PPPoE");
        assert_eq!(
            checksum(&out[l3..l3 + 20]),
            0,
            "IPv4 header checksum in PPPoE still valid"
        );
        assert_eq!(out[l3 + 20..], frame[l3 + 20..], "payload untouched");
        let mut p = Pkt::tcp("fd00::20", "2001:db8::5", 40001, 104);
        p.vlans = vlans.clone();
        p.pppoe = Some(0x1234);
        let (_, out) = run_out(&mut r, &p.build());
        let tclass = ((out[l3] & 0x0f) << 4) | (out[l3 + 1] >> 4);
        assert_eq!(tclass >> 2, 10, "AF11 in the IPv6 traffic class in PPPoE");
    }
    // A compressed PPP protocol puts the IPv4 header at an odd offset (21).
    let mut p = Pkt::tcp("192.168.7.20", "203.0.113.5", 40002, 104);
    p.pppoe = Some(0x1234);
    let l3 = p.l3_offset() - 1;
    let frame = p.build_compressed_ppp();
    let (_, out) = run_out(&mut r, &frame);
    assert_eq!(out[..l3], frame[..l3], "Ethernet and PPPoE headers kept");
    assert_eq!(out[l3 + 1] >> 2, 10, "AF11 written at an odd offset");
    assert_eq!(
        checksum(&out[l3..l3 + 20]),
        0,
        "IPv4 header checksum at an odd offset still valid"
    );
}

#[test]
fn kernel_agrees_with_the_reference_model_on_random_packets() {
    if !root_or_skip() {
        return;
    }
    let mut r = rig();
    let mut rng = shaper_tests::rng::Rng::xorshift64(0x9e37_79b9_7f4a_7c15);
    let mut next = move || rng.next_u64();
    let remotes = [
        "52.112.3.4",
        "52.115.255.1",
        "10.9.8.7",
        "203.0.113.9",
        "8.8.8.8",
    ];
    let remotes6 = ["2603:1063::1", "2603:1063:ffff::1", "2001:db8::1"];
    for _ in 0..3000 {
        let x = next();
        let v6 = x & 1 == 1;
        let up = x & 2 == 2;
        let proto = [6u8, 17, 1, 47][(x >> 2) as usize % 4];
        let lport = (x >> 8) as u16;
        let rport =
            [3478u16, 3481, 3482, 104, 11112, 443, (x >> 24) as u16][(x >> 40) as usize % 7];
        let dscp = [0u8, 46, 34][(x >> 50) as usize % 3];
        let (lan, wan) = if v6 {
            (
                "fd00::20".to_string(),
                remotes6[(x >> 44) as usize % 3].to_string(),
            )
        } else {
            (
                "192.168.7.20".to_string(),
                remotes[(x >> 44) as usize % 5].to_string(),
            )
        };
        let mut p = if up {
            Pkt::new(&lan, &wan, proto, lport, rport)
        } else {
            Pkt::new(&wan, &lan, proto, rport, lport)
        };
        p.dscp = dscp;
        let has_ports = proto == 6 || proto == 17;
        let view = PacketView {
            dir: if up { Dir::Up } else { Dir::Down },
            proto,
            dscp,
            sport: has_ports.then_some(lport),
            dport: has_ports.then_some(rport),
            src: lan.parse().expect("lan"),
            dst: wan.parse().expect("wan"),
        };
        let want = match compile::reference_match(&r.policy, &view) {
            Some(i) => classid_of(&r.policy, r.policy.rules[i].class),
            None => r.class_of("default"),
        };
        let got = r.run(&p.build(), up);
        assert_eq!(got, want, "packet {p:?}");
    }
}

#[test]
fn dscp_from_an_ignored_side_is_not_looked_at_and_honoured_marks_pick_their_class() {
    if !root_or_skip() {
        return;
    }
    let lan_host = "192.168.7.20";
    let marked = |up: bool, dscp: u8| {
        let mut p = if up {
            Pkt::udp(lan_host, "198.51.100.4", 40000, 5004)
        } else {
            Pkt::udp("198.51.100.4", lan_host, 5004, 40000)
        };
        p.dscp = dscp;
        p.build()
    };
    // Trusted (the default): the `ef` rule (upload, DSCP EF) takes an EF packet.
    let mut r = rig();
    assert_eq!(r.run(&marked(true, 46), true), r.class_of("video"));
    drop(r);
    // The `[dscp]` keys this test is about, inline, after the `classify` policy.
    let policy = fixture("classify");
    // The LAN's marks ignored: the same packet is unmarked to the rules.
    let mut r = shaper_tests::rig::load(&format!("{policy}[dscp]\nlan = \"ignore\"\n"));
    assert_eq!(r.run(&marked(true, 46), true), r.class_of("default"));
    drop(r);
    // Honoured marks: AF41 from the LAN to `images`, ahead of every rule of the file;
    // the WAN side's marks ignored (a download AF41 packet is not honoured: upload only).
    let text = format!("{policy}[dscp]\nwan = \"ignore\"\n[dscp.honour]\naf41 = \"images\"\n");
    let mut r = shaper_tests::rig::load(&text);
    assert_eq!(r.run(&marked(true, 34), true), r.class_of("images"));
    assert_eq!(r.run(&marked(false, 34), false), r.class_of("default"));
    assert_eq!(r.run(&marked(true, 46), true), r.class_of("video"));
    // The kernel agrees with the reference matcher on these.
    for (up, dscp) in [(true, 34u8), (false, 34), (true, 46), (false, 46)] {
        let f = marked(up, dscp);
        let view = PacketView {
            dir: if up { Dir::Up } else { Dir::Down },
            proto: 17,
            dscp,
            sport: Some(40000),
            dport: Some(5004),
            src: lan_host.parse().expect("addr"),
            dst: "198.51.100.4".parse().expect("addr"),
        };
        let want = compile::reference_match(&r.policy, &view)
            .map_or(r.policy.default_class, |i| r.policy.rules[i].class);
        assert_eq!(
            r.run(&f, up),
            classid_of(&r.policy, want),
            "up={up} dscp={dscp}"
        );
    }
}
