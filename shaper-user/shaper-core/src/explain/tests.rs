use super::*;
use crate::testkit::{self, eth, parse_policy, pppoe, tcp, udp, v4, v6};

const POLICY: &str = concat!(
    testkit::links_toml!(),
    "[shaping]\nack_class = \"interactive\"\n",
    testkit::classes_toml!(),
    r#"[[class]]
name = "interactive"
priority = 1
guaranteed = "10%"
[[rule]]
name = "teams"
class = "video"
priority = 10
protocol = "udp"
dst_ports = ["3478-3481"]
dst_cidrs = ["52.112.0.0/14", "2603:1063::/38"]
[[rule]]
name = "dicom"
class = "images"
priority = 20
protocol = "tcp"
dst_ports = [104, 11112]
[[rule]]
name = "ef"
class = "video"
priority = 30
dscp = ["EF"]
direction = "upload"
"#
);

fn policy() -> Policy {
    parse_policy("explain.toml", POLICY)
}

#[test]
fn host_names_learned_by_dns_or_given_by_sni_decide_and_say_so() {
    let text = format!(
        "{POLICY}[[rule]]\nname = \"wb\"\nclass = \"video\"\npriority = 1\nprotocol = \"udp\"\n\
         dns_names = [\"*.sfu.whereby.com\"]\n[[rule]]\nname = \"pacs\"\nclass = \"images\"\n\
         priority = 2\ndns_names = [\"pacs.example.nhs.uk\"]\n"
    );
    let pol = parse_policy("explain.toml", &text);
    let hosts = crate::hosts::Snapshot {
        learned: vec![crate::hosts::LearnedEntry {
            addr: "198.51.100.9".parse().expect("addr"),
            rule: "wb".into(),
            name: "media.sfu.whereby.com".into(),
            expires_in_s: 40,
        }],
        ..Default::default()
    };
    let mut ex = Explainer::with_hosts(&pol, hosts);
    let e = explain_one(&mut ex, "up udp 192.168.1.5:40000 -> 198.51.100.9:3480");
    assert!(e.agree, "{e:?}");
    assert_eq!(e.rule.as_ref().map(|r| r.name.as_str()), Some("wb"));
    assert!(
        e.notes
            .iter()
            .any(|n| n.contains("DNS answer for media.sfu.whereby.com")),
        "{:?}",
        e.notes
    );
    // Download: the same address on the WAN side.
    let e = explain_one(&mut ex, "down udp 198.51.100.9:3480 -> 192.168.1.5:40000");
    assert_eq!(e.rule.as_ref().map(|r| r.name.as_str()), Some("wb"));
    // Not learned: no host rule.
    let e = explain_one(&mut ex, "up udp 192.168.1.5:40000 -> 198.51.100.10:3480");
    assert_eq!(e.class, "default");
    // A server name decides a TCP 443 connection, both ways.
    let e = explain_one(
        &mut ex,
        "up tcp 192.168.1.5:40001 -> 203.0.113.4:443 sni=pacs.example.nhs.uk",
    );
    assert_eq!(e.rule.as_ref().map(|r| r.name.as_str()), Some("pacs"));
    assert!(
        e.notes.iter().any(|n| n.contains("TLS server name")),
        "{:?}",
        e.notes
    );
    let e = explain_one(
        &mut ex,
        "down tcp 203.0.113.4:443 -> 192.168.1.5:40001 sni=pacs.example.nhs.uk",
    );
    assert_eq!(e.class, "images");
    let e = explain_one(
        &mut ex,
        "up tcp 192.168.1.5:40001 -> 203.0.113.4:443 sni=www.example.org",
    );
    assert_eq!(e.class, "default");
}

fn explain_one(ex: &mut Explainer<'_>, desc: &str) -> Explanation {
    ex.explain(&Parsed::Ip(parse_description(desc).expect("description")))
}

#[test]
fn window_clamp_is_noted_on_tcp_only_when_on() {
    let has = |pol: &Policy, desc: &str| {
        let mut ex = Explainer::new(pol);
        explain_one(&mut ex, desc)
            .notes
            .iter()
            .any(|n| n.starts_with("download window clamp"))
    };
    let ack = "up tcp 192.168.1.5:40000 -> 203.0.113.9:443 flags=A";
    assert!(!has(&policy(), ack), "off by default");
    let text = POLICY.replace(
        "[download]\n",
        "[download]\nwindow_clamp = true\nwindow_clamp_queue_ms = 7\n",
    );
    let pol = parse_policy("explain.toml", &text);
    assert!(pol.dirs[Dir::Down].window_clamp.is_some(), "{text}");
    let mut ex = Explainer::new(&pol);
    let e = explain_one(&mut ex, ack);
    let note = e
        .notes
        .iter()
        .find(|n| n.starts_with("download window clamp"));
    assert!(note.is_some_and(|n| n.contains("+ 7 ms")), "{:?}", e.notes);
    assert!(has(&pol, "down tcp 203.0.113.9:443 -> 192.168.1.5:40000"));
    assert!(!has(&pol, "up udp 192.168.1.5:40000 -> 203.0.113.9:443"));
}

#[test]
fn descriptions_parse() {
    let p =
        parse_description("up udp 192.168.1.5:50020 -> 52.113.1.1:3478 dscp=EF").expect("parses");
    assert_eq!(p.dir, Dir::Up);
    assert_eq!(p.proto, 17);
    assert_eq!(p.dscp, 46);
    assert_eq!(p.src, "192.168.1.5".parse::<IpAddr>().expect("a"));
    assert_eq!((p.sport, p.dport), (Some(50020), Some(3478)));
    assert_eq!(p.bare, Some(Bare::No));

    let p = parse_description("down tcp 203.0.113.5:104 -> 192.168.1.20:40000").expect("parses");
    assert_eq!(p.dir, Dir::Down);
    assert_eq!(p.bare, None, "TCP without flags: unknown");
    let v = p.view();
    assert_eq!(v.src, "192.168.1.20".parse::<IpAddr>().expect("a"));
    assert_eq!((v.sport, v.dport), (Some(40000), Some(104)));

    let p = parse_description("up 6 [fd00::20]:40000->[2001:db8::5]:104 dscp=34 flags=A")
        .expect("v6 with ports, arrow without spaces");
    assert!(p.src.is_ipv6());
    assert_eq!((p.proto, p.dscp, p.bare), (6, 34, Some(Bare::Ack)));
    let p =
        parse_description("up tcp 10.0.0.1:1 -> 10.0.0.2:2 flags=A payload=10").expect("parses");
    assert_eq!(p.bare, Some(Bare::No), "payload: carries data");
    let p = parse_description("up tcp 10.0.0.1:1 -> 10.0.0.2:2 flags=SA").expect("parses");
    assert_eq!(p.bare, Some(Bare::Control), "SYN-ACK without data");
    let p =
        parse_description("up tcp 10.0.0.1:1 -> 10.0.0.2:2 flags=FA payload=3").expect("parses");
    assert_eq!(p.bare, Some(Bare::No), "FIN with data");
    let p = parse_description("upload icmpv6 fd00::1 -> 2001:db8::1 dscp=af41")
        .expect("bare v6 without port");
    assert_eq!((p.proto, p.dscp, p.sport), (58, 34, None));
    let p = parse_description("up udp 10.0.0.1:5 -> 10.0.0.2:6 frag=later id=7").expect("parses");
    assert_eq!((p.frag, p.frag_id, p.sport), (Frag::Later, 7, None));

    for (bad, want) in [
        ("up udp 10.0.0.1 -> 10.0.0.2:3478", "carries ports"),
        ("up icmp 10.0.0.1:5 -> 10.0.0.2", "has no ports"),
        ("up udp 10.0.0.1:5 -> fd00::1", "different families"),
        ("sideways udp 10.0.0.1:5 -> 10.0.0.2:6", "not a direction"),
        ("up quic 10.0.0.1:5 -> 10.0.0.2:6", "not a protocol"),
        ("up udp 10.0.0.1:5 10.0.0.2:6 x", "expected `->`"),
        ("up udp 10.0.0.1:99999 -> 10.0.0.2:6", "not a port"),
        ("up udp 10.0.0.1:5 -> 10.0.0.2:6 dscp=XX", "not a DSCP"),
        ("up udp 10.0.0.1:5 -> 10.0.0.2:6 flags=A", "not TCP"),
        ("up udp 10.0.0.1:5 -> 10.0.0.2:6 colour=red", "unknown"),
        ("up udp [fd00::1:5 -> [fd00::2]:6", "missing `]`"),
        ("up udp", "expected"),
    ] {
        let e = parse_description(bad).expect_err(bad);
        assert!(e.contains(want), "{bad}: {e}");
    }
}

#[test]
fn descriptions_split_quoted_or_not() {
    let args: Vec<String> = [
        "up udp 1.1.1.1:1 -> 2.2.2.2:2",
        "down",
        "tcp",
        "2.2.2.2:2",
        "->",
        "1.1.1.1:1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let d = split_descriptions(&args).expect("splits");
    assert_eq!(
        d,
        vec![
            "up udp 1.1.1.1:1 -> 2.2.2.2:2",
            "down tcp 2.2.2.2:2 -> 1.1.1.1:1"
        ]
    );
    assert!(split_descriptions(&["udp".to_string()]).is_err());
}

#[test]
fn explanations_name_rule_fields_and_class() {
    let pol = policy();
    let mut ex = Explainer::new(&pol);
    let e = explain_one(
        &mut ex,
        "up udp 192.168.1.5:50020 -> 52.113.1.1:3478 dscp=EF",
    );
    let r = e.rule.as_ref().expect("teams");
    assert_eq!((r.name.as_str(), r.priority, r.rank), ("teams", 10, 0));
    assert!(
        r.matched.iter().any(|m| m == "protocol udp in [udp]"),
        "{r:?}"
    );
    assert!(
        r.matched
            .iter()
            .any(|m| m == "WAN port 3478 in [3478-3481]"),
        "{r:?}"
    );
    assert!(r
        .matched
        .iter()
        .any(|m| m == "WAN address 52.113.1.1 in [52.112.0.0/14, 2603:1063::/38]"));
    assert_eq!(r.any, vec!["direction", "dscp", "lan_port", "lan_address"]);
    assert_eq!(
        (e.class.as_str(), e.classid, e.handle.as_str()),
        ("video", 0x10010, "1:10")
    );
    assert!(e.agree);

    // Download of the same flow: fields swapped to the site's side.
    let e = explain_one(&mut ex, "down udp 52.113.1.1:3478 -> 192.168.1.5:50020");
    assert_eq!(e.rule.as_ref().map(|r| r.name.as_str()), Some("teams"));
    assert_eq!(e.interface, "lan0");

    // EF counts on upload only; downloads fall to the default class.
    let e = explain_one(&mut ex, "down udp 8.8.8.8:53 -> 192.168.1.5:5353 dscp=EF");
    assert_eq!(e.outcome, Outcome::NoRule);
    assert_eq!((e.class.as_str(), e.handle.as_str()), ("default", "1:2"));
    assert!(
        e.near_misses
            .iter()
            .any(|m| m.contains("ef (rank 2): direction down is not upload")),
        "{:?}",
        e.near_misses
    );
    let text = render(&e);
    assert!(text.contains("no rule matched -> default class"), "{text}");

    // Pure ACK of a DICOM upload, seen downstream: ack_class.
    let e = explain_one(
        &mut ex,
        "down tcp 203.0.113.5:104 -> 192.168.1.20:40000 ack",
    );
    assert_eq!(e.rule.as_ref().map(|r| r.name.as_str()), Some("dicom"));
    assert!(e.ack_class_applied);
    assert_eq!(e.class, "interactive");
    assert!(render(&e).contains("TCP without data: pure ACK -> ack_class"));
    // The SYN that opens one: ack_class too, so a handshake never waits
    // behind bulk data.
    let e = explain_one(
        &mut ex,
        "up tcp 192.168.1.20:40000 -> 203.0.113.5:104 flags=S",
    );
    assert_eq!(e.rule.as_ref().map(|r| r.name.as_str()), Some("dicom"));
    assert!(e.ack_class_applied);
    assert_eq!((e.pure_ack, e.no_data), (Some(false), Some(true)));
    assert_eq!(e.class, "interactive");
    assert!(render(&e).contains("TCP without data: SYN/FIN/RST -> ack_class"));

    // Later fragment without its first: default, with the kernel's rule.
    let e = explain_one(
        &mut ex,
        "up udp 192.168.1.5:1 -> 52.113.1.1:3478 frag=later id=9",
    );
    assert_eq!(e.outcome, Outcome::FragmentUnknown);
    assert_eq!(e.class, "default");
    assert!(
        render(&e).contains("default (later fragment: follows its first fragment in the kernel)")
    );
    // ...and with it: follows.
    explain_one(
        &mut ex,
        "up udp 192.168.1.5:1 -> 52.113.1.1:3478 frag=first id=9",
    );
    let e = explain_one(
        &mut ex,
        "up udp 192.168.1.5:1 -> 52.113.1.1:3478 frag=later id=9",
    );
    assert_eq!(e.outcome, Outcome::FragmentFollowed);
    assert_eq!(e.class, "video");
}

#[test]
fn a_disagreement_is_reported() {
    let pol = policy();
    let mut ex = Explainer::new(&pol);
    // Corrupt the compiled maps: no rule accepts UDP any more.
    for id in ex.maps.proto_idx.iter_mut() {
        *id = 0;
    }
    let e = explain_one(&mut ex, "up udp 192.168.1.5:50020 -> 52.113.1.1:3478");
    assert!(!e.agree);
    assert_eq!(e.reference_rule.as_deref(), Some("teams"));
    assert_eq!(e.map_rule, None);
    assert!(render(&e).contains("!!! DISAGREEMENT"));
}

#[test]
fn frames_parse_as_the_classifier_does() {
    let up = Dir::Up;
    let f = eth(
        &[],
        0x0800,
        &v4(
            [192, 168, 1, 5],
            [52, 113, 1, 1],
            17,
            46,
            0x4000,
            &udp(50020, 3478, 20),
        ),
    );
    let Parsed::Ip(p) = parse_frame(&f, true, up) else {
        panic!("ip")
    };
    assert_eq!(
        (p.proto, p.dscp, p.sport, p.dport),
        (17, 46, Some(50020), Some(3478))
    );
    assert_eq!(p.frag, Frag::None);
    // QinQ, then a third tag (not followed).
    let f = eth(
        &[100, 200],
        0x0800,
        &v4([10, 0, 0, 1], [10, 0, 0, 2], 6, 0, 0, &tcp(1, 104, 0x10, 0)),
    );
    let Parsed::Ip(p) = parse_frame(&f, true, up) else {
        panic!("ip")
    };
    assert_eq!(p.vlans, vec![100, 200]);
    assert_eq!(p.bare, Some(Bare::Ack));
    let f = eth(
        &[1, 2, 3],
        0x0800,
        &v4([10, 0, 0, 1], [10, 0, 0, 2], 6, 0, 0, &tcp(1, 2, 0x10, 0)),
    );
    assert!(matches!(
        parse_frame(&f, true, up),
        Parsed::NonIp {
            ethertype: 0x8100,
            ..
        }
    ));
    // TCP with payload carries data; a SYN-ACK or FIN without is bare.
    for (flags, payload, bare) in [
        (0x10, 1, Bare::No),
        (0x12, 1, Bare::No),
        (0x12, 0, Bare::Control),
        (0x11, 0, Bare::Control),
        (0x00, 0, Bare::No),
    ] {
        let f = eth(
            &[],
            0x0800,
            &v4(
                [10, 0, 0, 1],
                [10, 0, 0, 2],
                6,
                0,
                0,
                &tcp(1, 2, flags, payload),
            ),
        );
        let Parsed::Ip(p) = parse_frame(&f, true, up) else {
            panic!("ip")
        };
        assert_eq!(p.bare, Some(bare), "flags {flags:#x} payload {payload}");
    }
    // Fragments: first (MF), later (offset).
    let f = eth(
        &[],
        0x0800,
        &v4([10, 0, 0, 1], [10, 0, 0, 2], 17, 0, 0x2000, &udp(1, 2, 8)),
    );
    assert!(matches!(
        parse_frame(&f, true, up),
        Parsed::Ip(Packet {
            frag: Frag::First,
            ..
        })
    ));
    let f = eth(
        &[],
        0x0800,
        &v4([10, 0, 0, 1], [10, 0, 0, 2], 17, 0, 0x0010, &[0xab; 16]),
    );
    let Parsed::Ip(p) = parse_frame(&f, true, up) else {
        panic!("ip")
    };
    assert_eq!((p.frag, p.sport), (Frag::Later, None));
    // IPv6 with hop-by-hop, destination options and AH.
    let f = eth(
        &[],
        0x86dd,
        &v6(
            "fd00::20",
            "2001:db8::5",
            &[(0, 8), (60, 16), (51, 16)],
            6,
            &tcp(40000, 104, 0x18, 10),
        ),
    );
    let Parsed::Ip(p) = parse_frame(&f, true, up) else {
        panic!("ip")
    };
    assert_eq!((p.proto, p.sport, p.dport), (6, Some(40000), Some(104)));
    assert_eq!(p.v6_ext, vec![0, 60, 51]);
    // Seven extension headers are followed, eight are too many.
    let f = eth(
        &[],
        0x86dd,
        &v6("fd00::20", "2001:db8::5", &[(0, 8); 7], 17, &udp(1, 2, 0)),
    );
    assert!(matches!(parse_frame(&f, true, up), Parsed::Ip(_)));
    let f = eth(
        &[],
        0x86dd,
        &v6("fd00::20", "2001:db8::5", &[(0, 8); 8], 17, &udp(1, 2, 0)),
    );
    assert!(matches!(
        parse_frame(&f, true, up),
        Parsed::Malformed { .. }
    ));
    // Cut inside the ports; bad IHL; ARP; shorter than Ethernet.
    let good = eth(
        &[],
        0x0800,
        &v4([10, 0, 0, 1], [10, 0, 0, 2], 6, 0, 0, &tcp(1, 2, 0x10, 0)),
    );
    assert!(matches!(
        parse_frame(&good[..36], true, up),
        Parsed::Malformed { .. }
    ));
    let mut bad = good.clone();
    bad[14] = 0x42;
    assert!(matches!(
        parse_frame(&bad, true, up),
        Parsed::Malformed { .. }
    ));
    let mut arp = good.clone();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    assert!(matches!(
        parse_frame(&arp, true, up),
        Parsed::NonIp {
            ethertype: 0x0806,
            ..
        }
    ));
    assert!(matches!(
        parse_frame(&good[..10], true, up),
        Parsed::Malformed { .. }
    ));
    // Raw IP (no Ethernet header).
    assert!(matches!(parse_frame(&good[14..], false, up), Parsed::Ip(_)));
}

#[test]
fn pppoe_frames_parse_as_the_classifier_does() {
    let up = Dir::Up;
    let dicom4 = v4(
        [192, 168, 1, 5],
        [203, 0, 113, 5],
        6,
        0,
        0,
        &tcp(40000, 104, 0x18, 10),
    );
    let teams6 = v6("2603:1063::7", "fd00::20", &[], 17, &udp(3479, 50000, 100));
    // IPv4 in PPPoE: IP at 22.
    let f = eth(&[], 0x8864, &pppoe(0x1234, &[0x00, 0x21], &dicom4));
    let Parsed::Ip(p) = parse_frame(&f, true, up) else {
        panic!("ip")
    };
    assert_eq!((p.proto, p.sport, p.dport), (6, Some(40000), Some(104)));
    assert_eq!((p.pppoe, p.vlans.clone()), (Some(0x1234), vec![]));
    assert!(p.describe().ends_with(" pppoe=0x1234"), "{}", p.describe());
    // IPv6 in PPPoE, downloaded.
    let f = eth(&[], 0x8864, &pppoe(7, &[0x00, 0x57], &teams6));
    let Parsed::Ip(p) = parse_frame(&f, true, Dir::Down) else {
        panic!("ip")
    };
    assert_eq!((p.proto, p.sport, p.dport), (17, Some(3479), Some(50000)));
    assert_eq!(p.src, "2603:1063::7".parse::<IpAddr>().expect("a"));
    assert_eq!(p.pppoe, Some(7));
    // PPPoE inside a VLAN tag, and inside QinQ.
    let f = eth(&[10], 0x8864, &pppoe(0xbeef, &[0x00, 0x21], &dicom4));
    let Parsed::Ip(p) = parse_frame(&f, true, up) else {
        panic!("ip")
    };
    assert_eq!((p.vlans.clone(), p.pppoe), (vec![10], Some(0xbeef)));
    assert_eq!(p.describe().matches(" vlan=10 pppoe=0xbeef").count(), 1);
    let f = eth(&[100, 200], 0x8864, &pppoe(1, &[0x00, 0x57], &teams6));
    let Parsed::Ip(p) = parse_frame(&f, true, up) else {
        panic!("ip")
    };
    assert_eq!((p.vlans, p.pppoe, p.proto), (vec![100, 200], Some(1), 17));
    // Protocol-field compression: a one-byte protocol, IP at 21.
    for (ppp, l3, proto) in [(0x21u8, &dicom4, 6u8), (0x57, &teams6, 17)] {
        let f = eth(&[], 0x8864, &pppoe(2, &[ppp], l3));
        let Parsed::Ip(p) = parse_frame(&f, true, up) else {
            panic!("compressed 0x{ppp:02x}")
        };
        assert_eq!((p.proto, p.pppoe), (proto, Some(2)));
    }
    // LCP (and IPCP, and a compressed protocol that is not IP): not IP.
    for ppp in [&[0xc0u8, 0x21][..], &[0x80, 0x21], &[0x23]] {
        let f = eth(&[], 0x8864, &pppoe(3, ppp, &[1, 1, 0, 4, 0, 0, 0, 0]));
        let Parsed::NonIp {
            ethertype: 0x8864,
            ppp: Some(got),
            ..
        } = parse_frame(&f, true, up)
        else {
            panic!("{ppp:02x?}: non-IP")
        };
        let want = if ppp.len() == 1 {
            u16::from(ppp[0])
        } else {
            u16::from_be_bytes([ppp[0], ppp[1]])
        };
        assert_eq!(got, want);
    }
    // Bad version/type, a discovery code in a session frame: malformed.
    let good = eth(&[], 0x8864, &pppoe(0x1234, &[0x00, 0x21], &dicom4));
    let mut bad = good.clone();
    bad[14] = 0x21;
    let Parsed::Malformed { reason, .. } = parse_frame(&bad, true, up) else {
        panic!("bad version")
    };
    assert_eq!(reason, "PPPoE header with version/type 0x21 (not 0x11)");
    let mut bad = good.clone();
    bad[15] = 0x09;
    let Parsed::Malformed { reason, .. } = parse_frame(&bad, true, up) else {
        panic!("bad code")
    };
    assert!(reason.contains("code 0x09 (not 0x00)"), "{reason}");
    // Cut short: inside the PPPoE header (even a compressed one: the
    // classifier loads 8 bytes), inside the IP header after it.
    for cut in [14, 17, 21] {
        let Parsed::Malformed { reason, .. } = parse_frame(&good[..cut], true, up) else {
            panic!("cut at {cut}")
        };
        assert_eq!(reason, "cut inside the PPPoE header");
    }
    let compressed = eth(&[], 0x8864, &pppoe(2, &[0x21], &dicom4));
    assert!(matches!(
        parse_frame(&compressed[..21], true, up),
        Parsed::Malformed { .. }
    ));
    let Parsed::Malformed { reason, .. } = parse_frame(&good[..22 + 19], true, up) else {
        panic!("cut inside IPv4")
    };
    assert_eq!(reason, "cut inside the IPv4 header");
    // Only one PPPoE header: a second one is not followed.
    let f = eth(
        &[],
        0x8864,
        &pppoe(1, &[0x00, 0x21], &pppoe(2, &[0x00, 0x21], &dicom4)),
    );
    assert!(matches!(
        parse_frame(&f, true, up),
        Parsed::Malformed { .. }
    ));
    // No PPPoE on a bare-IP link.
    assert!(matches!(
        parse_frame(&good[14..], false, up),
        Parsed::NonIp { ppp: None, .. }
    ));
}

#[test]
fn pppoe_frames_are_explained() {
    let pol = policy();
    let mut ex = Explainer::new(&pol);
    let dicom4 = v4(
        [192, 168, 1, 5],
        [203, 0, 113, 5],
        6,
        0,
        0,
        &tcp(40000, 104, 0x18, 10),
    );
    let f = eth(&[10], 0x8864, &pppoe(0x1234, &[0x00, 0x21], &dicom4));
    let e = ex.explain(&parse_frame(&f, true, Dir::Up));
    assert_eq!(e.rule.as_ref().map(|r| r.name.as_str()), Some("dicom"));
    assert_eq!(e.class, "images");
    assert!(e.parsed.ends_with(" vlan=10 pppoe=0x1234"), "{}", e.parsed);
    let lcp = eth(
        &[],
        0x8864,
        &pppoe(0x1234, &[0xc0, 0x21], &[9, 1, 0, 8, 0, 0, 0, 1]),
    );
    let e = ex.explain(&parse_frame(&lcp, true, Dir::Up));
    assert_eq!((e.outcome, e.class.as_str()), (Outcome::NonIp, "default"));
    assert!(
        e.notes.iter().any(|n| n.contains(
            "a PPPoE session frame, ethertype 0x8864, carrying PPP protocol 0xc021, LCP"
        )),
        "{:?}",
        e.notes
    );
    let mut bad = f.clone();
    bad[18] = 0x12;
    let e = ex.explain(&parse_frame(&bad, true, Dir::Up));
    assert_eq!(
        (e.outcome, e.class.as_str()),
        (Outcome::Malformed, "default")
    );
    assert!(
        e.notes[0].contains("PPPoE header with version/type 0x12 (not 0x11)"),
        "{:?}",
        e.notes
    );
}

#[test]
fn pcap_round_trip_and_errors() {
    let frames = vec![
        eth(
            &[],
            0x0800,
            &v4(
                [192, 168, 1, 5],
                [52, 113, 1, 1],
                17,
                0,
                0,
                &udp(50020, 3478, 100),
            ),
        ),
        eth(
            &[7],
            0x86dd,
            &v6("fd00::20", "2001:db8::5", &[], 6, &tcp(40000, 104, 0x10, 0)),
        ),
        vec![1, 2, 3],
    ];
    let bytes = pcap::write(pcap::LINKTYPE_ETHERNET, &frames);
    let cap = pcap::read(&bytes).expect("reads");
    assert_eq!(cap.linktype, 1);
    assert!(!cap.nanos);
    let got: Vec<Vec<u8>> = cap.records.iter().map(|r| r.data.clone()).collect();
    assert_eq!(got, frames);
    assert_eq!(cap.records[1].ts_frac, 1000);

    // Big-endian nanosecond file with one record, snapped short.
    let mut be = Vec::new();
    be.extend(0xa1b2_3c4du32.to_be_bytes());
    be.extend(2u16.to_be_bytes());
    be.extend(4u16.to_be_bytes());
    be.extend([0; 8]);
    be.extend(64u32.to_be_bytes());
    be.extend(1u32.to_be_bytes());
    be.extend(5u32.to_be_bytes());
    be.extend(999u32.to_be_bytes());
    be.extend(14u32.to_be_bytes());
    be.extend(1500u32.to_be_bytes());
    be.extend(&frames[0][..14]);
    let cap = pcap::read(&be).expect("big-endian reads");
    assert!(cap.nanos);
    assert_eq!((cap.snaplen, cap.records.len()), (64, 1));
    assert_eq!(cap.records[0].orig_len, 1500);
    assert_eq!(cap.records[0].ts_frac, 999);

    let cut = &bytes[..bytes.len() - 2];
    assert!(pcap::read(cut).expect_err("truncated").contains("record 3"));
    assert!(pcap::read(&bytes[..30])
        .expect_err("cut header")
        .contains("record 1"));
    assert!(pcap::read(&[
        0x0a, 0x0d, 0x0d, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
    ])
    .expect_err("pcapng")
    .contains("pcapng"));
    assert!(pcap::read(&[0u8; 24])
        .expect_err("magic")
        .contains("not a pcap"));
    assert!(pcap::read(&[0u8; 3]).is_err());
}

#[test]
fn pcap_through_run() {
    let pol = policy();
    let frames = vec![
        // Upload Teams media in a VLAN.
        eth(
            &[10],
            0x0800,
            &v4(
                [192, 168, 1, 5],
                [52, 113, 1, 1],
                17,
                0,
                0x2000,
                &udp(50020, 3478, 100),
            ),
        ),
        // Its later fragment follows it.
        eth(
            &[10],
            0x0800,
            &v4([192, 168, 1, 5], [52, 113, 1, 1], 17, 0, 0x0010, &[0; 40]),
        ),
        // DICOM pure ACK.
        eth(
            &[],
            0x0800,
            &v4(
                [192, 168, 1, 5],
                [203, 0, 113, 5],
                6,
                0,
                0,
                &tcp(40000, 104, 0x10, 0),
            ),
        ),
        // ARP.
        eth(&[], 0x0806, &[0; 28]),
    ];
    let dir = std::env::temp_dir().join(format!("shaper-explain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let path = dir.join("up.pcap");
    std::fs::write(&path, pcap::write(1, &frames)).expect("write");
    let r = run(&pol, &[], Some(&path), Some("up"), false, None).expect("runs");
    let classes: Vec<&str> = r.explanations.iter().map(|e| e.class.as_str()).collect();
    assert_eq!(classes, vec!["video", "video", "interactive", "default"]);
    assert_eq!(r.disagreements, 0);
    assert!(
        r.text.contains("follows its first fragment (packet 1)"),
        "{}",
        r.text
    );
    let j = run(&pol, &[], Some(&path), Some("up"), true, None).expect("json");
    let v: serde_json::Value = serde_json::from_str(&j.text).expect("valid json");
    assert_eq!(v["packets"][0]["classid"], 0x10010);
    assert_eq!(v["packets"][2]["ack_class_applied"], true);
    assert_eq!(v["packets"][3]["outcome"], "non_ip");
    assert!(
        run(&pol, &[], Some(&path), None, false, None).is_err(),
        "--direction needed"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dscp_names() {
    assert_eq!(dscp_name(46), "EF(46)");
    assert_eq!(dscp_name(34), "AF41(34)");
    assert_eq!(dscp_name(8), "CS1(8)");
    assert_eq!(dscp_name(0), "DF(0)");
    assert_eq!(dscp_name(13), "13");
}
