//! `shaper-soak`: feeds at least 1,000,000 random and mutated frames through
//! the real classifier (BPF_PROG_TEST_RUN) loaded with a 1,000-rule policy, and
//! counts what must never happen: drops (a return code other than
//! TC_ACT_UNSPEC) and priorities that are not one of the policy's class ids.
//! Also runs `shaper explain`'s parser and matcher on every frame and counts
//! where it names another class than the kernel picked.
//!
//! Frames: random bytes; valid frames from `packet.rs` (IPv4 options, VLANs,
//! IPv6 extension headers, fragments, TCP/UDP/ICMP/SCTP/UDP-Lite/GRE) left
//! alone, with random byte flips, truncated, with random VLAN stacks, with
//! random IPv6 extension chains, with random fragment fields.
//!
//! `cargo run --release -p shaper-tests --bin shaper-soak [-- --frames N --seed S]`.
//! Needs root (prints SKIP otherwise). Exits 1 on any drop or bad class id.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use shaper_tests::packet::Pkt;
use shaper_user::{
    compile::{self, classid_of},
    config,
    explain::{self, Explainer, Outcome, Parsed},
    kernel::bpf,
};

const RULES: usize = 1000;
/// Frames longer than this are cut (BPF_PROG_TEST_RUN takes at most about a
/// page minus skb overhead).
const MAX_FRAME: usize = 3000;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
    /// Up to `n - 1` random bytes.
    fn bytes_below(&mut self, n: u64) -> Vec<u8> {
        let len = self.below(n) as usize;
        self.bytes(len)
    }
}

/// 1,000 rules over 7 classes: ports, port ranges, v4/v6 prefixes of many
/// lengths on both sides, DSCP lists, directions, protocol lists.
fn policy_text() -> String {
    let mut t = String::from(
        "[interfaces]\nwan = \"wan0\"\nlan = \"lan0\"\n[upload]\nrate = \"10mbit\"\n[download]\nrate = \"40mbit\"\n\
         [shaping]\nack_class = \"acks\"\n",
    );
    let classes = [
        ("video", "AF41"),
        ("interactive", "CS3"),
        ("images", "AF11"),
        ("default", ""),
        ("bulk", "LE"),
        ("acks", ""),
        ("voice", "EF"),
    ];
    for (i, (name, dscp)) in classes.iter().enumerate() {
        t.push_str(&format!(
            "[[class]]\nname = \"{name}\"\npriority = {}\nguaranteed = \"10%\"\n{}{}",
            i,
            if dscp.is_empty() {
                String::new()
            } else {
                format!("dscp = \"{dscp}\"\n")
            },
            if *name == "default" {
                "default = true\n"
            } else {
                ""
            }
        ));
    }
    let mut rng = Rng(0x1357_9bdf_2468_ace0);
    for i in 0..RULES {
        let class = classes[i % classes.len()].0;
        let mut r = format!(
            "[[rule]]\nname = \"r{i}\"\nclass = \"{class}\"\npriority = {}\n",
            rng.below(200)
        );
        match i % 7 {
            0 => {
                let lo = rng.below(60000);
                r.push_str(&format!(
                    "protocol = \"udp\"\ndst_ports = [\"{lo}-{}\"]\ndst_cidrs = [\"10.{}.0.0/16\", \"2001:db8:{:x}::/48\"]\n",
                    lo + rng.below(2000),
                    i % 256,
                    i
                ));
            }
            1 => r.push_str(&format!(
                "protocol = \"tcp\"\ndst_ports = [{}, {}]\n",
                rng.below(65536),
                [104, 443, 11112, 3389][i % 4]
            )),
            2 => r.push_str(&format!(
                "protocol = [\"tcp\", \"udp\", \"sctp\"]\nsrc_cidrs = [\"192.168.{}.{}/{}\", \"fd00:{:x}::/64\"]\n",
                i % 8,
                (i % 4) * 64,
                26,
                i % 16
            )),
            3 => r.push_str(&format!(
                "dscp = [{}, \"EF\"]\ndirection = \"upload\"\ndst_cidrs = [\"{}.{}.0.0/16\"]\n",
                rng.below(64),
                20 + i % 200,
                i % 256
            )),
            4 => {
                let lo = 1024 + rng.below(60000);
                r.push_str(&format!(
                    "protocol = [\"tcp\", \"udp\", \"udplite\"]\nsrc_ports = [\"{lo}-{}\"]\ndirection = \"download\"\n",
                    lo + rng.below(300)
                ));
            }
            5 => {
                let len = 8 + rng.below(25) as u32;
                let a = Ipv4Addr::from(
                    (0x0a00_0000 | (rng.next() as u32 & 0x00ff_ffff)) & (u32::MAX << (32 - len)),
                );
                let len6 = 32 + rng.below(97) as u32;
                let b = Ipv6Addr::from(
                    (0x2001_0db8u128 << 96 | (rng.next() as u128) << 32)
                        & (u128::MAX << (128 - len6)),
                );
                r.push_str(&format!("dst_cidrs = [\"{a}/{len}\", \"{b}/{len6}\"]\n"));
            }
            _ => r.push_str(&format!(
                "protocol = [\"{}\"]\ndst_cidrs = [\"10.{}.{}.0/24\", \"2001:db8:{:x}:{:x}::/64\"]\n",
                ["icmp", "icmpv6", "gre", "esp"][i % 4],
                i % 256,
                i / 256,
                i % 256,
                i / 256
            )),
        }
        t.push_str(&r);
    }
    t
}

/// Addresses that often hit the policy's prefixes, sometimes not.
fn lan_addr(rng: &mut Rng, v6: bool) -> IpAddr {
    if v6 {
        let net = if rng.chance(80) {
            0xfd00_u128 << 112 | (rng.below(20) as u128) << 96
        } else {
            (rng.next() as u128) << 64
        };
        IpAddr::V6(Ipv6Addr::from(net | rng.next() as u128))
    } else if rng.chance(80) {
        IpAddr::V4(Ipv4Addr::new(192, 168, rng.below(10) as u8, rng.byte()))
    } else {
        IpAddr::V4(Ipv4Addr::from(rng.next() as u32))
    }
}

fn wan_addr(rng: &mut Rng, v6: bool) -> IpAddr {
    if v6 {
        let net = if rng.chance(80) {
            0x2001_0db8_u128 << 96 | (rng.below(0x400) as u128) << 80 | (rng.below(4) as u128) << 64
        } else {
            (rng.next() as u128) << 64
        };
        IpAddr::V6(Ipv6Addr::from(net | rng.next() as u128))
    } else {
        match rng.below(10) {
            0..=5 => IpAddr::V4(Ipv4Addr::new(10, rng.byte(), rng.byte(), rng.byte())),
            6 | 7 => IpAddr::V4(Ipv4Addr::new(
                20 + rng.below(200) as u8,
                rng.byte(),
                rng.byte(),
                rng.byte(),
            )),
            _ => IpAddr::V4(Ipv4Addr::from(rng.next() as u32)),
        }
    }
}

/// A valid frame from packet.rs with random fields.
fn valid(rng: &mut Rng, up: bool) -> Pkt {
    let v6 = rng.chance(45);
    let proto = [6u8, 6, 17, 17, 1, 58, 132, 136, 47, 50][rng.below(10) as usize];
    let (lan, wan) = (lan_addr(rng, v6), wan_addr(rng, v6));
    let lport = if rng.chance(50) {
        1024 + rng.below(64000) as u16
    } else {
        rng.next() as u16
    };
    let rport = [104u16, 443, 3478, 11112, 3389, rng.next() as u16][rng.below(6) as usize];
    let mut p = if up {
        Pkt::new(&lan.to_string(), &wan.to_string(), proto, lport, rport)
    } else {
        Pkt::new(&wan.to_string(), &lan.to_string(), proto, rport, lport)
    };
    p.dscp = if rng.chance(50) {
        rng.below(64) as u8
    } else {
        [0u8, 46, 34, 10][rng.below(4) as usize]
    };
    p.payload = [0usize, 0, 1, 20, 64, 200, 1200][rng.below(7) as usize];
    if rng.chance(20) {
        p.vlans = (0..1 + rng.below(2)).map(|_| rng.next() as u16).collect();
    }
    if !v6 && rng.chance(10) {
        p.v4_options = rng.bytes_below(41);
    }
    if v6 && rng.chance(25) {
        p.v6_ext = (0..rng.below(9))
            .map(|_| {
                let t = [0u8, 43, 60, 51][rng.below(4) as usize];
                (t, 8 * (1 + rng.below(4) as usize))
            })
            .collect();
    }
    if rng.chance(10) {
        p.frag = Some((
            rng.below(16) as u32,
            if rng.chance(50) {
                0
            } else {
                rng.below(400) as u16
            },
            rng.chance(60),
        ));
    }
    p
}

fn flip(rng: &mut Rng, f: &mut [u8], n: u64) {
    if f.is_empty() {
        return;
    }
    for _ in 0..n {
        // Mostly in the headers, where the parser looks.
        let span = if rng.chance(75) {
            f.len().min(80)
        } else {
            f.len()
        };
        let i = rng.below(span as u64) as usize;
        if rng.chance(50) {
            f[i] ^= 1 << rng.below(8);
        } else {
            f[i] = rng.byte();
        }
    }
}

/// IPv6 with a random extension chain: random types (the ones the walker
/// knows, and others), random length bytes, random contents.
fn v6_chain(rng: &mut Rng) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x86, 0xdd];
    let n = rng.below(12) as usize;
    let types: Vec<u8> = (0..n)
        .map(|_| [0u8, 43, 60, 44, 51, rng.byte()][rng.below(6) as usize])
        .collect();
    let l4 = [6u8, 17, 58, 132, 136, rng.byte()][rng.below(6) as usize];
    let mut body = Vec::new();
    for (i, &t) in types.iter().enumerate() {
        let next = types.get(i + 1).copied().unwrap_or(l4);
        let len_byte = if rng.chance(80) {
            rng.below(4) as u8
        } else {
            rng.byte()
        };
        let len = match t {
            44 => 8,
            51 => (len_byte as usize + 2) * 4,
            _ => (len_byte as usize + 1) * 8,
        };
        let mut e = rng.bytes(len.min(1200));
        if e.len() >= 2 {
            e[0] = next;
            e[1] = len_byte;
        }
        if t == 44 && rng.chance(50) {
            // Offset 0, sometimes M: a first fragment, or not fragmented.
            e[2] = 0;
            e[3] &= 0x01;
        }
        body.extend(e);
    }
    body.extend(rng.bytes_below(40));
    let plen = if rng.chance(80) {
        body.len() as u16
    } else {
        rng.next() as u16
    };
    let mut h = vec![
        0x60 | (rng.byte() & 0x0f),
        rng.byte(),
        rng.byte(),
        rng.byte(),
    ];
    h.extend(plen.to_be_bytes());
    h.push(types.first().copied().unwrap_or(l4));
    h.push(64);
    for a in [lan_addr(rng, true), wan_addr(rng, true)] {
        if let IpAddr::V6(a) = a {
            h.extend(a.octets());
        }
    }
    f.extend(h);
    f.extend(body);
    f
}

/// Random fragment fields on a valid frame: IPv4 flags/offset/id bits, or an
/// IPv6 fragment header with random offset, M bit and id.
fn frag_fields(rng: &mut Rng, up: bool) -> Vec<u8> {
    let mut p = valid(rng, up);
    p.vlans.clear();
    if p.src.is_ipv6() {
        p.frag = Some((
            rng.below(8) as u32,
            if rng.chance(40) {
                0
            } else {
                rng.next() as u16 & 0x1fff
            },
            rng.chance(50),
        ));
        p.build()
    } else {
        let mut f = p.build();
        let ff = if rng.chance(50) {
            rng.next() as u16
        } else {
            [0x2000u16, 0x0000, 0x4000, 0x0001, 0x2010, 0x1fff][rng.below(6) as usize]
        };
        f[20..22].copy_from_slice(&ff.to_be_bytes());
        f[18..20].copy_from_slice(&(rng.below(8) as u16).to_be_bytes());
        f
    }
}

/// First fragments sent lately: (frame number, direction, packet).
type Firsts = Vec<(u64, bool, Pkt)>;

/// A later fragment of a first fragment sent lately (mostly in the same
/// direction, so the kernel follows it), or a new first fragment.
fn fragment_pair(rng: &mut Rng, up: bool, n: u64, firsts: &mut Firsts) -> Vec<u8> {
    firsts.retain(|(at, _, _)| n - at < 500);
    if !firsts.is_empty() && rng.chance(70) {
        let i = rng.below(firsts.len() as u64) as usize;
        let (_, first_up, first) = &firsts[i];
        let mut p = first.clone();
        if rng.chance(80) != (*first_up == up) {
            // The other direction's key: the kernel has not seen it.
            p.frag = p.frag.map(|(id, _, _)| (id ^ 1, 0, true));
        }
        let (id, _, _) = p.frag.unwrap_or((0, 0, true));
        p.frag = Some((id, 1 + rng.below(400) as u16, rng.chance(50)));
        p.payload = rng.below(300) as usize;
        p.build()
    } else {
        let mut p = valid(rng, up);
        p.frag = Some((rng.next() as u32, 0, true));
        p.payload = 200;
        firsts.push((n, up, p.clone()));
        p.build()
    }
}

fn frame(rng: &mut Rng, up: bool, n: u64, firsts: &mut Firsts) -> (&'static str, Vec<u8>) {
    let (kind, mut f) = match rng.below(100) {
        0..=9 => {
            let mut f = rng.bytes_below(160);
            if f.len() >= 16 && rng.chance(70) {
                let et = [0x0800u16, 0x86dd, 0x8100, 0x88a8][rng.below(4) as usize];
                f[12..14].copy_from_slice(&et.to_be_bytes());
                if rng.chance(60) {
                    f[14] = if et == 0x86dd { 0x60 } else { 0x45 } | (f[14] & 0x0f);
                }
            }
            ("random bytes", f)
        }
        10..=24 => ("valid", valid(rng, up).build()),
        25..=44 => {
            let mut f = valid(rng, up).build();
            let n = 1 + rng.below(8);
            flip(rng, &mut f, n);
            ("byte flips", f)
        }
        45..=59 => {
            let mut f = valid(rng, up).build();
            let cut = rng.below(f.len() as u64 + 1) as usize;
            f.truncate(cut);
            ("truncated", f)
        }
        60..=69 => {
            let mut f = valid(rng, up).build();
            for _ in 0..rng.below(7) {
                let tpid = [0x8100u16, 0x88a8, 0x9100, rng.next() as u16][rng.below(4) as usize];
                let mut tag = tpid.to_be_bytes().to_vec();
                tag.extend((rng.next() as u16).to_be_bytes());
                f.splice(12..12, tag);
            }
            ("VLAN stacks", f)
        }
        70..=84 => ("IPv6 extension chains", v6_chain(rng)),
        85..=92 => ("fragment fields", frag_fields(rng, up)),
        _ => ("fragment pairs", fragment_pair(rng, up, n, firsts)),
    };
    // Some of every kind also get a cut or a flip.
    if rng.chance(10) {
        let n = 1 + rng.below(3);
        flip(rng, &mut f, n);
    }
    if rng.chance(5) {
        let cut = rng.below(f.len() as u64 + 1) as usize;
        f.truncate(cut);
    }
    f.truncate(MAX_FRAME);
    (kind, f)
}

/// BPF_PROG_TEST_RUN refuses frames shorter than Ethernet, and for the IP
/// ethertypes shorter than Ethernet + the IP header.
fn harness_refuses(f: &[u8]) -> bool {
    if f.len() < 14 {
        return true;
    }
    match u16::from_be_bytes([f[12], f[13]]) {
        0x0800 => f.len() < 14 + 20,
        0x86dd => f.len() < 14 + 40,
        _ => false,
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let frames = arg("--frames").unwrap_or(1_000_000);
    let seed = arg("--seed").unwrap_or(0x9e37_79b9_7f4a_7c15) | 1;

    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIP: shaper-soak needs root (BPF program load, a network namespace)");
        return ExitCode::SUCCESS;
    }
    match run(frames, seed) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("shaper-soak: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(frames: u64, seed: u64) -> anyhow::Result<bool> {
    use anyhow::{bail, Context as _};
    // A network namespace of our own (it goes away with the process): `lo` is
    // the WAN side (ifindex 1), a veth the LAN side.
    // SAFETY: unshare on the (still single-threaded) process.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        bail!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
    }
    for args in [
        &["link", "set", "lo", "up"][..],
        &["link", "add", "v0", "type", "veth", "peer", "name", "v1"],
        &["link", "set", "v0", "up"],
        &["link", "set", "v1", "up"],
    ] {
        let st = Command::new("ip")
            .args(args)
            .status()
            .context("running ip")?;
        if !st.success() {
            bail!("ip {args:?} failed");
        }
    }
    let c = std::ffi::CString::new("v0")?;
    // SAFETY: NUL-terminated name.
    let lan = unsafe { libc::if_nametoindex(c.as_ptr()) };
    let wan = 1;

    let text = policy_text();
    let policy = config::parse(Path::new("soak.toml"), &text).context("soak policy")?;
    let maps = compile::maps(&compile::plan(&policy, None));
    let flags =
        shaper_common::CFG_WAN_L2 | shaper_common::CFG_LAN_L2 | shaper_common::CFG_REMARK_WAN;
    let t0 = Instant::now();
    let mut obj = bpf::load(&maps, wan, lan, flags).context("loading the classifier")?;
    println!(
        "classifier loaded with {} rules, {} classes, {} bitmaps of {} words in {:?}; {frames} frames, seed {seed:#x}",
        policy.rules.len(),
        policy.classes.len(),
        maps.bitmaps.len(),
        maps.nwords,
        t0.elapsed()
    );
    let classids: HashSet<u32> = (0..policy.classes.len())
        .map(|i| classid_of(&policy, i))
        .collect();
    let mut ex = Explainer::new(&policy);

    let mut rng = Rng(seed);
    let mut firsts: Firsts = Vec::new();
    let mut decided: Vec<u64> = Vec::new();
    let (mut refused, mut errors, mut drops, mut bad, mut differ, mut not_compared) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let mut kernel_time = Duration::ZERO;
    let mut runs = 0u64;
    let mut kinds: BTreeMap<&str, u64> = BTreeMap::new();
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let mut examples: Vec<String> = Vec::new();
    let started = Instant::now();
    for n in 0..frames {
        let up = rng.chance(50);
        let (kind, f) = frame(&mut rng, up, n, &mut firsts);
        *kinds.entry(kind).or_default() += 1;
        let ifindex = if up { wan } else { lan };
        let res = match bpf::test_run(&mut obj, &f, ifindex, 1) {
            Ok(r) => r,
            Err(e) => {
                if harness_refuses(&f) {
                    refused += 1;
                } else {
                    errors += 1;
                    if examples.len() < 10 {
                        examples.push(format!(
                            "error on frame {n} ({kind}, {} bytes): {e:#}: {:02x?}",
                            f.len(),
                            &f[..f.len().min(64)]
                        ));
                    }
                }
                continue;
            }
        };
        runs += 1;
        kernel_time += res.duration;
        if res.ret != u32::MAX {
            drops += 1;
            if examples.len() < 10 {
                examples.push(format!(
                    "return code {:#x} on frame {n} ({kind}): {:02x?}",
                    res.ret,
                    &f[..f.len().min(64)]
                ));
            }
        }
        if !classids.contains(&res.priority) {
            bad += 1;
            if examples.len() < 10 {
                examples.push(format!(
                    "priority {:#x} on frame {n} ({kind}): {:02x?}",
                    res.priority,
                    &f[..f.len().min(64)]
                ));
            }
        }
        // explain's view of the same frame. The kernel's fragment memory is
        // an LRU of 4,096 entries; ours forgets nothing, so a later fragment
        // whose first came more than 1,000 frames before is not compared.
        let dir = if up {
            shaper_common::DIR_UP
        } else {
            shaper_common::DIR_DOWN
        };
        let parsed = explain::parse_frame(&f, true, dir);
        // explain numbers the packets it decided from 1.
        decided.push(n);
        let d = ex.decide(&parsed);
        let key = match d.outcome {
            Outcome::Rule => "rule",
            Outcome::NoRule => "no rule",
            Outcome::FragmentFollowed => "fragment followed",
            Outcome::FragmentUnknown => "fragment unknown",
            Outcome::NonIp => "non-IP",
            Outcome::Malformed => "malformed",
        };
        *outcomes.entry(key.to_string()).or_default() += 1;
        if d.outcome == Outcome::FragmentFollowed
            && d.first_fragment
                .is_some_and(|first| n - decided[first - 1] > 1000)
        {
            not_compared += 1;
        } else if ex.classid(&d) != res.priority {
            differ += 1;
            if examples.len() < 10 {
                let what = match &parsed {
                    Parsed::Ip(p) => p.describe(),
                    other => format!("{other:?}"),
                };
                examples.push(format!(
                    "explain says 1:{:x}, kernel 1:{:x} on frame {n} ({kind}, {what}): {:02x?}",
                    ex.classid(&d) & 0xffff,
                    res.priority & 0xffff,
                    &f[..f.len().min(96)]
                ));
            }
        }
    }
    let wall = started.elapsed();

    println!("\nframe kinds: {kinds:?}");
    println!("explain outcomes: {outcomes:?}");
    for e in &examples {
        println!("  {e}");
    }
    let row = |k: &str, v: String| println!("{k:<42} {v:>12}");
    println!();
    row("frames", frames.to_string());
    row("refused by the kernel's test harness", refused.to_string());
    row("test-run errors", errors.to_string());
    row("drops (return code != TC_ACT_UNSPEC)", drops.to_string());
    row("bad class ids (priority not a class)", bad.to_string());
    row("explain != kernel", differ.to_string());
    row("  (later fragments not compared)", not_compared.to_string());
    row(
        "ns/packet (kernel, mean of runs)",
        format!("{:.0}", kernel_time.as_nanos() as f64 / runs.max(1) as f64),
    );
    row(
        "ns/packet (wall, incl. generation+explain)",
        format!("{:.0}", wall.as_nanos() as f64 / frames.max(1) as f64),
    );
    row("wall time", format!("{:.1} s", wall.as_secs_f64()));
    let ok = drops == 0 && bad == 0;
    if !ok {
        println!("FAIL: {drops} drop(s), {bad} bad class id(s)");
    } else if errors > 0 || differ > 0 {
        println!("OK (no drops, no bad class ids), but see the errors/differences above");
    } else {
        println!("OK");
    }
    Ok(ok)
}
