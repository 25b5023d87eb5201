use super::*;
use crate::testkit::{parse_policy, policy};

const RULES: &str = r#"
[[rule]]
name = "teams-ranges"
class = "video"
protocol = "udp"
dst_ports = ["3478-3481"]
dst_cidrs = ["52.112.0.0/14", "2603:1063::/38"]
[[rule]]
name = "teams-clients"
class = "video"
protocol = "udp"
src_ports = ["50000-50059"]
[[rule]]
name = "dicom"
class = "images"
protocol = "tcp"
dst_ports = [104, 11112]
[[rule]]
name = "hscn-inner"
class = "images"
dst_cidrs = ["10.207.112.0/22"]
priority = 100
[[rule]]
name = "hscn"
class = "video"
dst_cidrs = ["10.0.0.0/8"]
priority = 101
[[rule]]
name = "ef-upload"
class = "video"
dscp = ["EF"]
direction = "upload"
priority = 200
"#;

#[test]
fn bfifo_limits_saturate_instead_of_wrapping() {
    // 100 Gbit/s x 1000 ms = 12.5 GB: past the kernel's 32-bit byte limit.
    let mut pol = policy("");
    pol.leaf = LeafChoice::Bfifo;
    pol.queue_ms = 1000;
    let LeafPlan::Bfifo { limit_bytes } = leaf_for(&pol, None, 100_000_000_000) else {
        panic!("a bfifo");
    };
    assert_eq!(limit_bytes, u32::MAX);
    let LeafPlan::Bfifo { limit_bytes } = leaf_for(&pol, None, 8_000_000) else {
        panic!("a bfifo");
    };
    assert_eq!(limit_bytes, 1_000_000);
}

#[test]
fn class_tree() {
    let pol = policy(RULES);
    let pl = plan(&pol, Some(KernelCaps::default()));
    assert_eq!(
        pl.dirs[Dir::Up].classes[2].classid,
        0x0001_0002,
        "default class at 1:2"
    );
    assert_eq!(pl.dirs[Dir::Up].classes[0].classid, 0x0001_0010);
    assert_eq!(pl.dirs[Dir::Up].classes[0].rate_bps, 2_000_000);
    assert_eq!(pl.dirs[Dir::Down].classes[1].rate_bps, 12_000_000);
    assert_eq!(pl.dirs[Dir::Down].classes[1].ceil_bps, 40_000_000);
    // bfifo sized to 20 ms at the ceiling when the kernel has no fq_codel.
    assert_eq!(
        pl.dirs[Dir::Down].classes[1].leaf,
        LeafPlan::Bfifo {
            limit_bytes: 100_000
        }
    );
    let with_fq = plan(
        &pol,
        Some(KernelCaps {
            fq_codel: true,
            cake: false,
        }),
    );
    assert!(matches!(
        with_fq.dirs[Dir::Up].classes[0].leaf,
        LeafPlan::FqCodel { .. }
    ));
}

#[test]
fn link_accounting_in_the_plan() {
    let base = policy(RULES);
    let pl = plan(&base, None);
    assert!(pl.dirs[Dir::Up].accounting.is_none() && pl.dirs[Dir::Down].accounting.is_none());
    assert_eq!(pl.dirs[Dir::Up].rate_bps, pl.dirs[Dir::Up].line_rate_bps);

    let text = |up: &str, down: &str| {
        let mut t = format!(
            "[interfaces]\nwan = \"wan0\"\nlan = \"lan0\"\n[upload]\nrate = \"10mbit\"\n{up}\n[download]\nrate = \"40mbit\"\n{down}\n"
        );
        t.push_str("[[class]]\nname = \"video\"\npriority = 0\nguaranteed = \"2mbit\"\n");
        t.push_str(
            "[[class]]\nname = \"default\"\npriority = 4\nguaranteed = \"10%\"\ndefault = true\n",
        );
        parse_policy("t.toml", &t)
    };
    let pol = text("line = \"adsl2-pppoa\"", "line = \"vdsl2-pppoe\"");
    let pl = plan(&pol, None);
    // ATM: rates untouched, cells counted by the size table.
    let a = &pl.dirs[Dir::Up].accounting;
    assert!(a.atm() && !a.is_none());
    assert_eq!(
        (a.overhead, a.mpu, a.scale(10_000_000)),
        (10, 0, 10_000_000)
    );
    assert_eq!(a.stab_overhead(14), -4);
    assert_eq!(a.stab_overhead(0), 10);
    assert_eq!(pl.dirs[Dir::Up].rate_bps, 10_000_000);
    // PTM: every HTB rate x 64/65, absolute shares too.
    let d = &pl.dirs[Dir::Down];
    assert!(!d.accounting.atm());
    assert_eq!((d.accounting.rate_num, d.accounting.rate_den), (64, 65));
    assert_eq!(d.line_rate_bps, 40_000_000);
    assert_eq!(d.rate_bps, 39_384_615);
    assert_eq!(d.classes[0].rate_bps, 1_969_230);
    assert_eq!(d.classes[0].ceil_bps, 39_384_615);
    assert_eq!(d.classes[1].rate_bps, 3_938_461);

    let out = describe(&pl, &maps(&pl));
    assert!(
        out.contains(
            "link layer: adsl2-pppoa, atm framing, overhead 10 bytes per IP packet, mpu 0"
        ),
        "{out}"
    );
    assert!(
        out.contains("HTB rates x 64/65 (40mbit configured)"),
        "{out}"
    );
    let out = describe(&plan(&base, None), &maps(&plan(&base, None)));
    assert!(out.contains("link layer: no accounting"), "{out}");
}

fn pv(
    dir: Dir,
    proto: u8,
    sport: Option<u16>,
    dport: Option<u16>,
    src: &str,
    dst: &str,
    dscp: u8,
) -> PacketView {
    PacketView {
        dir,
        proto,
        dscp,
        sport,
        dport,
        src: src.parse().expect("addr"),
        dst: dst.parse().expect("addr"),
    }
}

#[test]
fn compiled_maps_agree_with_reference() {
    let pol = policy(RULES);
    let m = maps(&plan(&pol, None));
    let cases = [
        (
            pv(
                Dir::Up,
                17,
                Some(40000),
                Some(3478),
                "192.168.1.5",
                "52.113.1.1",
                0,
            ),
            Some("teams-ranges"),
        ),
        (
            pv(
                Dir::Down,
                17,
                Some(40000),
                Some(3478),
                "192.168.1.5",
                "52.113.1.1",
                0,
            ),
            Some("teams-ranges"),
        ),
        (
            pv(
                Dir::Up,
                17,
                Some(40000),
                Some(3478),
                "192.168.1.5",
                "8.8.8.8",
                0,
            ),
            None,
        ),
        (
            pv(
                Dir::Up,
                17,
                Some(40000),
                Some(3478),
                "fd00::5",
                "2603:1063::1",
                0,
            ),
            Some("teams-ranges"),
        ),
        (
            pv(
                Dir::Up,
                17,
                Some(50021),
                Some(9999),
                "192.168.1.5",
                "8.8.8.8",
                0,
            ),
            Some("teams-clients"),
        ),
        (
            pv(
                Dir::Up,
                6,
                Some(50021),
                Some(104),
                "192.168.1.5",
                "8.8.8.8",
                0,
            ),
            Some("dicom"),
        ),
        (
            pv(
                Dir::Up,
                6,
                Some(1234),
                Some(443),
                "192.168.1.5",
                "10.207.113.9",
                0,
            ),
            Some("hscn-inner"),
        ),
        (
            pv(
                Dir::Up,
                6,
                Some(1234),
                Some(443),
                "192.168.1.5",
                "10.1.2.3",
                0,
            ),
            Some("hscn"),
        ),
        (
            pv(Dir::Up, 1, None, None, "192.168.1.5", "10.1.2.3", 0),
            Some("hscn"),
        ),
        (
            pv(Dir::Up, 1, None, None, "192.168.1.5", "1.1.1.1", 46),
            Some("ef-upload"),
        ),
        (
            pv(Dir::Down, 1, None, None, "192.168.1.5", "1.1.1.1", 46),
            None,
        ),
        (
            pv(Dir::Up, 1, None, None, "192.168.1.5", "1.1.1.1", 0),
            None,
        ),
    ];
    for (p, want) in cases {
        let r = reference_match(&pol, &p);
        assert_eq!(
            r.map(|i| pol.rules[i].name.as_str()),
            want,
            "reference for {p:?}"
        );
        assert_eq!(
            map_match(&m, &p),
            r,
            "maps disagree with reference for {p:?}"
        );
    }
}

#[test]
fn many_rules_agree_with_reference() {
    // 300 rules over five words, overlapping ranges and prefixes.
    let mut rules = String::new();
    for i in 0..300u32 {
        let lo = (i * 97) % 60000;
        rules.push_str(&format!(
            "[[rule]]\nname = \"r{i}\"\nclass = \"{}\"\nprotocol = \"{}\"\ndst_ports = [\"{lo}-{}\"]\n{}\n",
            ["video", "images", "default"][(i % 3) as usize],
            if i % 2 == 0 { "tcp" } else { "udp" },
            lo + (i % 500),
            if i % 5 == 0 { format!("dst_cidrs = [\"10.{}.0.0/16\"]", i % 256) } else { String::new() }
        ));
    }
    let pol = policy(&rules);
    let m = maps(&plan(&pol, None));
    assert_eq!(m.nwords, 5);
    let mut seed = 0x1234_5678_u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..5000 {
        let x = next();
        let proto = if x & 1 == 0 { 6 } else { 17 };
        let dport = (x >> 8) as u16 % 61000;
        let dst = format!("10.{}.{}.1", (x >> 32) as u8, (x >> 40) as u8);
        let p = pv(
            Dir::from_u32(((x >> 4) & 1) as u32).expect("0 or 1"),
            proto,
            Some(1000),
            Some(dport),
            "192.168.0.2",
            &dst,
            0,
        );
        assert_eq!(map_match(&m, &p), reference_match(&pol, &p), "{p:?}");
    }
}
