//! `shaper-soak`: feeds at least 1,000,000 random and mutated frames through
//! the real classifier (BPF_PROG_TEST_RUN) loaded with a 1,000-rule policy (plus
//! three host-name rules, demotion on two classes and `[promote]`), and counts
//! what must never happen: drops (a return code other than TC_ACT_UNSPEC) and
//! priorities that are not one of the policy's class ids. Also runs `shaper
//! explain`'s parser and matcher on every frame, with what the host-name engine
//! has learned (as `shaper explain` reads a running daemon's hosts.json), and
//! counts where it names another class than the kernel picked and nothing
//! explains why (explain does not see the kernel's caches: see `accounted_for`).
//!
//! Frames: random bytes; valid frames from `packet.rs` (IPv4 options, VLANs,
//! IPv6 extension headers, fragments, TCP/UDP/ICMP/SCTP/UDP-Lite/GRE) left
//! alone, with random byte flips, truncated, with random VLAN stacks, with
//! random IPv6 extension chains, with random fragment fields; DNS answers (UDP
//! from port 53, LAN side; captured and synthetic, mutated) and ClientHellos
//! (TCP to 443, WAN side; captured, split over two segments, synthetic,
//! mutated), later segments of those connections both ways, flows sent again
//! and again (demotion, promotion) and packets to the addresses the answers name.
//! The event ring is read after every frame and its events go through the
//! daemon's host-name engine (`shaper_user::hosts::Engine`) into the loaded
//! maps, as `shaper run` does. Flow behaviour (1 s windows) and the engine's
//! timeouts follow the clock, so a seed's counts vary a little from run to run.
//!
//! `cargo run --release -p shaper-tests --bin shaper-soak [-- --frames N --seed S]`.
//! Needs root (prints SKIP otherwise). Exits 1 on any drop or bad class id.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::process::{Command, ExitCode};
use std::rc::Rc;
use std::time::{Duration, Instant};

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};
use shaper_common::{
    FlowKey, FlowVal, HostKey, HostVal, FLOW_DEMOTED, FLOW_PROMOTED, GLOBAL_COUNTERS,
    GLOBAL_COUNTER_NAMES, HOST_DECIDED, MAP_EVENTS, MAP_FLOWS, MAP_GLOBAL_STATS, NO_PORT,
};
use shaper_tests::packet::{self, Pkt};
use shaper_tests::rng::Rng;
use shaper_user::{
    compile::{self, classid_of},
    config,
    explain::{self, Bare, Explainer, Frag, Outcome, Parsed},
    hosts::Engine,
    hosts_task::MapKernel,
    kernel::bpf,
};

const RULES: usize = 1000;
/// Frames longer than this are cut (BPF_PROG_TEST_RUN takes at most about a
/// page minus skb overhead).
const MAX_FRAME: usize = 3000;

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
            "[[class]]\nname = \"{name}\"\npriority = {}\nguaranteed = \"10%\"\n{}{}{}",
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
            },
            // Flows turning bulk: by bytes carried, and (video) by rate over a window.
            match *name {
                "video" => {
                    "demote_to = \"bulk\"\ndemote_after = \"30kB\"\ndemote_above = \"400kbit\"\n"
                }
                "images" => "demote_to = \"bulk\"\ndemote_after = \"200kB\"\n",
                _ => "",
            }
        ));
    }
    let mut rng = Rng::xorshift64(0x1357_9bdf_2468_ace0);
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
                    (0x0a00_0000 | (rng.next_u64() as u32 & 0x00ff_ffff)) & (u32::MAX << (32 - len)),
                );
                let len6 = 32 + rng.below(97) as u32;
                let b = Ipv6Addr::from(
                    (0x2001_0db8u128 << 96 | (rng.next_u64() as u128) << 32)
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
    // Host names: two before every rule (the file's priorities are 0-199), one in the
    // middle; media-like default-class UDP flows promoted to voice; learned addresses
    // outlive the run (so a cached decision never outlives its address).
    t.push_str(
        "[[rule]]\nname = \"hosts-video\"\nclass = \"video\"\npriority = -1\n\
         dns_names = [\"*.example.test\", \"*.sfu.whereby.com\", \"*.turn.whereby.com\"]\n\
         [[rule]]\nname = \"hosts-pacs\"\nclass = \"images\"\npriority = -1\nprotocol = \"tcp\"\n\
         dst_ports = [443]\ndns_names = [\"pacs.example.nhs.uk\", \"*.pacs.example.test\"]\n\
         [[rule]]\nname = \"hosts-bulk\"\nclass = \"bulk\"\npriority = 100\nprotocol = \"udp\"\n\
         dns_names = [\"*.bulk.example.test\"]\n\
         [promote]\nclass = \"voice\"\nmin_pps = 5\nmax_rate = \"2mbit\"\n\
         [dns]\nmin_ttl = 3600\nmax_ttl = 7200\n",
    );
    t
}

/// Addresses that often hit the policy's prefixes, sometimes not.
fn lan_addr(rng: &mut Rng, v6: bool) -> IpAddr {
    if v6 {
        let net = if rng.chance(80) {
            0xfd00_u128 << 112 | (rng.below(20) as u128) << 96
        } else {
            (rng.next_u64() as u128) << 64
        };
        IpAddr::V6(Ipv6Addr::from(net | rng.next_u64() as u128))
    } else if rng.chance(80) {
        IpAddr::V4(Ipv4Addr::new(192, 168, rng.below(10) as u8, rng.byte()))
    } else {
        IpAddr::V4(Ipv4Addr::from(rng.next_u64() as u32))
    }
}

fn wan_addr(rng: &mut Rng, v6: bool) -> IpAddr {
    if v6 {
        let net = if rng.chance(80) {
            0x2001_0db8_u128 << 96 | (rng.below(0x400) as u128) << 80 | (rng.below(4) as u128) << 64
        } else {
            (rng.next_u64() as u128) << 64
        };
        IpAddr::V6(Ipv6Addr::from(net | rng.next_u64() as u128))
    } else {
        match rng.below(10) {
            0..=5 => IpAddr::V4(Ipv4Addr::new(10, rng.byte(), rng.byte(), rng.byte())),
            6 | 7 => IpAddr::V4(Ipv4Addr::new(
                20 + rng.below(200) as u8,
                rng.byte(),
                rng.byte(),
                rng.byte(),
            )),
            _ => IpAddr::V4(Ipv4Addr::from(rng.next_u64() as u32)),
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
        rng.next_u64() as u16
    };
    let rport = [104u16, 443, 3478, 11112, 3389, rng.next_u64() as u16][rng.below(6) as usize];
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
        p.vlans = (0..1 + rng.below(2))
            .map(|_| rng.next_u64() as u16)
            .collect();
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
    let mut f = packet::ethernet(0x86dd);
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
        rng.next_u64() as u16
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
                rng.next_u64() as u16 & 0x1fff
            },
            rng.chance(50),
        ));
        p.build()
    } else {
        let mut f = p.build();
        let ff = if rng.chance(50) {
            rng.next_u64() as u16
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
        p.frag = Some((rng.next_u64() as u32, 0, true));
        p.payload = 200;
        firsts.push((n, up, p.clone()));
        p.build()
    }
}

/// Captured DNS answers (tests/fixtures/dns): CNAME chains, AAAA, mixed case,
/// NXDOMAIN, a truncated answer, ANY, HTTPS records, a query.
const DNS_FIXTURES: [&[u8]; 11] = [
    include_bytes!("../../../fixtures/dns/media-a.bin"),
    include_bytes!("../../../fixtures/dns/media-aaaa.bin"),
    include_bytes!("../../../fixtures/dns/media-mixedcase-a.bin"),
    include_bytes!("../../../fixtures/dns/media-https-type65.bin"),
    include_bytes!("../../../fixtures/dns/media-a-query.bin"),
    include_bytes!("../../../fixtures/dns/turn-a.bin"),
    include_bytes!("../../../fixtures/dns/turn-aaaa.bin"),
    include_bytes!("../../../fixtures/dns/nxdomain.bin"),
    include_bytes!("../../../fixtures/dns/big-truncated-udp.bin"),
    include_bytes!("../../../fixtures/dns/any-mixed.bin"),
    include_bytes!("../../../fixtures/dns/https-type65.bin"),
];
/// Captured ClientHellos in one segment (tests/fixtures/tls).
const TLS_WHOLE: [&[u8]; 7] = [
    include_bytes!("../../../fixtures/tls/curl-sni.bin"),
    include_bytes!("../../../fixtures/tls/gnutls-sni.bin"),
    include_bytes!("../../../fixtures/tls/openssl-default-sni.bin"),
    include_bytes!("../../../fixtures/tls/openssl-tls12-sni.bin"),
    include_bytes!("../../../fixtures/tls/openssl-tls13-sni.bin"),
    include_bytes!("../../../fixtures/tls/openssl-no-sni.bin"),
    // Not TLS: a QUIC Initial sent over TCP 443 (its first byte is not 0x16).
    include_bytes!("../../../fixtures/tls/quic-initial-gtlsclient.bin"),
];
/// Captured ClientHellos split over two segments (the SNI in the first, or only in
/// the second).
const TLS_SPLIT: [(&[u8], &[u8]); 3] = [
    (
        include_bytes!("../../../fixtures/tls/openssl-big-alpn-seg1.bin"),
        include_bytes!("../../../fixtures/tls/openssl-big-alpn-seg2.bin"),
    ),
    (
        include_bytes!("../../../fixtures/tls/openssl-512-records-seg1.bin"),
        include_bytes!("../../../fixtures/tls/openssl-512-records-seg2.bin"),
    ),
    (
        include_bytes!("../../../fixtures/tls/gnutls-ffdhe8192-seg1.bin"),
        include_bytes!("../../../fixtures/tls/gnutls-ffdhe8192-seg2.bin"),
    ),
];

/// What the seeds remember between frames.
#[derive(Default)]
struct Seeds {
    firsts: Firsts,
    /// Recent ClientHello connections (as sent: LAN -> WAN:443), for later segments.
    conns: Vec<Pkt>,
    /// Second segments of split ClientHellos, to follow on their connections.
    seconds: Vec<(Pkt, &'static [u8])>,
    /// Flows sent again and again (demotion, promotion): (upload, packet).
    pool: Vec<(bool, Pkt)>,
    /// The query (a frame from the LAN to the WAN) the DNS answer just made answers:
    /// sent first, as only answers to queries that went out are handed on.
    query: Option<Vec<u8>>,
}

/// One of the 256 (per family) WAN addresses the synthetic DNS answers name.
fn named_addr(rng: &mut Rng, v6: bool) -> IpAddr {
    let j = rng.byte();
    if v6 {
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, j.into()))
    } else {
        IpAddr::V4(Ipv4Addr::new(203, 0, 113, j))
    }
}

/// Mostly left alone; else byte flips, a cut, or bytes added.
fn mutate(rng: &mut Rng, payload: &mut Vec<u8>) {
    match rng.below(10) {
        0..=4 => {}
        5..=7 if !payload.is_empty() => {
            for _ in 0..1 + rng.below(6) {
                let i = rng.below(payload.len() as u64) as usize;
                if rng.chance(50) {
                    payload[i] ^= 1 << rng.below(8);
                } else {
                    payload[i] = rng.byte();
                }
            }
        }
        8 => {
            let cut = rng.below(payload.len() as u64 + 1) as usize;
            payload.truncate(cut);
        }
        _ => {
            let extra = rng.bytes_below(64);
            payload.extend(extra);
        }
    }
}

/// A DNS answer on its way to the LAN: captured, or synthetic for names the host
/// rules want (and some they do not), naming [`named_addr`]s; then [`mutate`]d.
fn dns_answer(rng: &mut Rng, st: &mut Seeds) -> Vec<u8> {
    let v6 = rng.chance(30);
    let (lan, resolver) = (lan_addr(rng, v6), wan_addr(rng, v6));
    let port = 1024 + rng.below(64000) as u16;
    let mut p = Pkt::udp(&resolver.to_string(), &lan.to_string(), 53, port);
    if rng.chance(10) {
        p.vlans = vec![rng.next_u64() as u16];
    }
    let mut q = Pkt::udp(&lan.to_string(), &resolver.to_string(), port, 53);
    q.vlans = p.vlans.clone();
    let mut payload = if rng.chance(25) {
        DNS_FIXTURES[rng.below(DNS_FIXTURES.len() as u64) as usize].to_vec()
    } else {
        let j = rng.byte();
        let (qname, cname) = match rng.below(5) {
            0 => (format!("h{j}.example.test"), None),
            1 => (
                format!("m{j}.sfu.whereby.com"),
                Some(format!("edge{j}.cdn.example.net")),
            ),
            2 => (format!("b{j}.bulk.example.test"), None),
            3 => (format!("x{j}.turn.whereby.com"), None),
            // No rule wants it: not learned.
            _ => (format!("w{j}.other.test"), None),
        };
        let addrs: Vec<IpAddr> = (0..1 + rng.below(3)).map(|_| named_addr(rng, v6)).collect();
        let ttl = 30 + rng.below(3600) as u32;
        let id = rng.next_u64() as u16;
        packet::dns::answer_through(id, &qname, cname.as_deref(), &addrs, ttl)
    };
    // Most were asked (before any mutation); some come unasked.
    st.query = shaper_user::dnswire::query_of(&payload)
        .filter(|_| rng.chance(90))
        .map(|query| q.with_payload(&query));
    mutate(rng, &mut payload);
    p.with_payload(&payload)
}

/// A TCP segment to port 443 carrying a ClientHello (captured, the first of a split
/// one, or synthetic with a name the host rules want or not), [`mutate`]d; or the
/// second segment of a split one sent earlier.
fn client_hello_segment(rng: &mut Rng, st: &mut Seeds) -> Vec<u8> {
    if !st.seconds.is_empty() && rng.chance(40) {
        let (p, seg2) = st
            .seconds
            .swap_remove(rng.below(st.seconds.len() as u64) as usize);
        let mut payload = seg2.to_vec();
        mutate(rng, &mut payload);
        return p.with_payload(&payload);
    }
    let v6 = rng.chance(30);
    let lan = lan_addr(rng, v6);
    let wan = if rng.chance(50) {
        named_addr(rng, v6)
    } else {
        wan_addr(rng, v6)
    };
    let p = Pkt::tcp(
        &lan.to_string(),
        &wan.to_string(),
        1024 + rng.below(64000) as u16,
        443,
    );
    let mut payload = match rng.below(10) {
        0..=2 => TLS_WHOLE[rng.below(TLS_WHOLE.len() as u64) as usize].to_vec(),
        3 | 4 => {
            let (seg1, seg2) = TLS_SPLIT[rng.below(TLS_SPLIT.len() as u64) as usize];
            if st.seconds.len() < 64 {
                st.seconds.push((p.clone(), seg2));
            }
            seg1.to_vec()
        }
        _ => {
            let j = rng.byte();
            let name = match rng.below(5) {
                0 => Some("pacs.example.nhs.uk".to_string()),
                1 => Some(format!("s{j}.pacs.example.test")),
                2 => Some(format!("h{j}.example.test")),
                3 => Some(format!("w{j}.other.test")),
                _ => None,
            };
            // Padding, random and session id drawn in this order (as the seeds' runs were).
            let padding = rng.below(300) as usize;
            let random = rng.bytes(32);
            let session_id = rng.bytes(32);
            packet::tls::client_hello(name.as_deref(), &random, &session_id, padding)
        }
    };
    mutate(rng, &mut payload);
    if st.conns.len() >= 256 {
        st.conns.remove(0);
    }
    st.conns.push(p.clone());
    p.with_payload(&payload)
}

/// A later segment (or pure ACK) of a recent ClientHello's connection, either way.
fn later_segment(rng: &mut Rng, st: &Seeds, up: bool) -> Vec<u8> {
    if st.conns.is_empty() {
        return valid(rng, up).build();
    }
    let mut p = st.conns[rng.below(st.conns.len() as u64) as usize].clone();
    p.payload = [0usize, 0, 20, 200, 1200][rng.below(5) as usize];
    if !up {
        std::mem::swap(&mut p.src, &mut p.dst);
        std::mem::swap(&mut p.sport, &mut p.dport);
    }
    p.build()
}

/// 16 flows each of the two demoting classes (video, images) and of default-class
/// UDP (promotable), found by explain among random flows.
fn flow_pool(policy: &config::Policy, seed: u64) -> Vec<(bool, Pkt)> {
    let mut ex = Explainer::new(policy);
    let mut rng = Rng::xorshift64(seed ^ 0x2545_f491_4f6c_dd1d | 1);
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut pool = Vec::new();
    for _ in 0..500_000 {
        let (v6, up) = (rng.chance(30), rng.chance(50));
        let proto = if rng.chance(70) { 17 } else { 6 };
        let (lan, wan) = (lan_addr(&mut rng, v6), wan_addr(&mut rng, v6));
        let lport = 1024 + rng.below(64000) as u16;
        let rport = if rng.chance(50) {
            rng.next_u64() as u16
        } else {
            [104u16, 443, 3478, 11112, 3389][rng.below(5) as usize]
        };
        let mut p = if up {
            Pkt::new(&lan.to_string(), &wan.to_string(), proto, lport, rport)
        } else {
            Pkt::new(&wan.to_string(), &lan.to_string(), proto, rport, lport)
        };
        p.payload = 100;
        let dir = if up {
            shaper_common::Dir::Up
        } else {
            shaper_common::Dir::Down
        };
        let d = ex.decide(&explain::parse_frame(&p.build(), true, dir));
        let which = match policy.classes[d.class].name.as_str() {
            "video" => "video",
            "images" => "images",
            "default" if d.rule.is_none() && proto == 17 => "default udp",
            _ => continue,
        };
        let c = counts.entry(which).or_default();
        if *c < 16 {
            *c += 1;
            pool.push((up, p));
        }
        if pool.len() == 48 {
            break;
        }
    }
    pool
}

fn addr16(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(a) => {
            let mut b = [0; 16];
            b[..4].copy_from_slice(&a.octets());
            b
        }
        IpAddr::V6(a) => a.octets(),
    }
}

/// One frame of a random kind, and its direction (the seeds of DNS answers and
/// ClientHellos, and the repeated flows, have their own).
fn frame(rng: &mut Rng, up: bool, n: u64, st: &mut Seeds) -> (&'static str, Vec<u8>, bool) {
    let (kind, mut f, up) = match rng.below(100) {
        0..=8 => {
            let mut f = rng.bytes_below(160);
            if f.len() >= 16 && rng.chance(70) {
                let et = [0x0800u16, 0x86dd, 0x8100, 0x88a8][rng.below(4) as usize];
                f[12..14].copy_from_slice(&et.to_be_bytes());
                if rng.chance(60) {
                    f[14] = if et == 0x86dd { 0x60 } else { 0x45 } | (f[14] & 0x0f);
                }
            }
            ("random bytes", f, up)
        }
        9..=21 => ("valid", valid(rng, up).build(), up),
        22..=38 => {
            let mut f = valid(rng, up).build();
            let n = 1 + rng.below(8);
            flip(rng, &mut f, n);
            ("byte flips", f, up)
        }
        39..=51 => {
            let mut f = valid(rng, up).build();
            let cut = rng.below(f.len() as u64 + 1) as usize;
            f.truncate(cut);
            ("truncated", f, up)
        }
        52..=59 => {
            let mut f = valid(rng, up).build();
            for _ in 0..rng.below(7) {
                let tpid =
                    [0x8100u16, 0x88a8, 0x9100, rng.next_u64() as u16][rng.below(4) as usize];
                let mut tag = tpid.to_be_bytes().to_vec();
                tag.extend((rng.next_u64() as u16).to_be_bytes());
                f.splice(12..12, tag);
            }
            ("VLAN stacks", f, up)
        }
        60..=72 => ("IPv6 extension chains", v6_chain(rng), up),
        73..=79 => ("fragment fields", frag_fields(rng, up), up),
        80..=84 => (
            "fragment pairs",
            fragment_pair(rng, up, n, &mut st.firsts),
            up,
        ),
        85..=88 => ("DNS answers", dns_answer(rng, st), false),
        89..=92 => ("ClientHellos", client_hello_segment(rng, st), true),
        93 | 94 => ("later segments", later_segment(rng, st, up), up),
        95..=97 if !st.pool.is_empty() => {
            let (up, mut p) = st.pool[rng.below(st.pool.len() as u64) as usize].clone();
            p.payload = [20usize, 100, 300, 800, 1200][rng.below(5) as usize];
            ("repeated flows", p.build(), up)
        }
        _ => {
            let mut p = valid(rng, up);
            let a = named_addr(rng, p.src.is_ipv6());
            if up {
                p.dst = a;
            } else {
                p.src = a;
            }
            ("to named addresses", p.build(), up)
        }
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
    (kind, f, up)
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

/// Why the kernel's class for `p` may rightly differ from explain's, which knows what
/// the host-name engine knows (its snapshot, as `shaper explain` reads hosts.json) but
/// not the kernel's caches: the connection was decided by its server name and the
/// decision has left the snapshot's list of recent ones (`HOST_FLOWS`), its flow was
/// demoted or promoted, or cached before its address was learned (`FLOWS`), or the
/// frame is a ClientHello, which explain decides by its own server name while the
/// kernel hands it to user space and classifies it by the rules. Checked before the
/// frame's own events reach the engine, so the state is what the kernel saw.
fn accounted_for(
    policy: &config::Policy,
    p: &explain::Packet,
    priority: u32,
    host_flows: &BpfHashMap<MapData, HostKey, HostVal>,
    flows: &BpfHashMap<MapData, FlowKey, FlowVal>,
    engine: &Engine<Rc<RefCell<MapKernel>>>,
) -> Option<&'static str> {
    let view = p.view();
    // A TCP segment without data goes to the ACK class whatever decided it.
    let class_id = |class: u32| {
        let class = policy
            .ack_class
            .filter(|_| matches!(p.bare, Some(Bare::Ack | Bare::Control)))
            .unwrap_or(class as usize);
        classid_of(policy, class)
    };
    let family = if view.dst.is_ipv6() { 6 } else { 4 };
    let port = |p: Option<u16>| p.map_or(NO_PORT, u32::from);
    if p.frag == Frag::Later {
        return None;
    }
    if (p.proto == 6 || p.proto == 17) && view.dport == Some(443) {
        let key = HostKey {
            src: addr16(view.src),
            dst: addr16(view.dst),
            sport: port(view.sport),
            dport: port(view.dport),
            proto: p.proto,
            family,
            _pad: [0; 2],
        };
        if let Ok(h) = host_flows.get(&key, 0) {
            if h.flags & HOST_DECIDED != 0 && class_id(h.class) == priority {
                return Some("decided by server name (HOST_FLOWS)");
            }
        }
    }
    let key = FlowKey {
        src: addr16(view.src),
        dst: addr16(view.dst),
        sport: port(view.sport),
        dport: port(view.dport),
        proto: p.proto,
        _pad: 0,
        dir: p.dir as u8,
        family,
    };
    if let Ok(f) = flows.get(&key, 0) {
        if class_id(f.class) == priority {
            if f.flags & FLOW_DEMOTED != 0 {
                return Some("demoted flow (FLOWS)");
            }
            if f.flags & FLOW_PROMOTED != 0 {
                return Some("promoted flow (FLOWS)");
            }
            if !engine.table.rules_of(view.dst).is_empty() {
                return Some("cached before address learned (FLOWS)");
            }
        }
    }
    if p.sni.is_some() && p.dir == shaper_common::Dir::Up && view.dport == Some(443) {
        let rule =
            compile::reference_match_hosts(policy, &view, |rank, a| engine.table.has(a, rank));
        let class = rule.map_or(policy.default_class, |r| policy.rules[r].class);
        if class_id(class as u32) == priority {
            return Some("ClientHello itself (explain: by its SNI)");
        }
    }
    None
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!(
            "shaper-soak [--frames N] [--seed S]\n  \
             feeds N (default 1000000) random and mutated frames through the classifier with a \
             1,000-rule policy (plus host-name rules, demotion, promotion); root only.\n  \
             Exits 1 on a drop or a bad class id, 2 on a setup error."
        );
        return ExitCode::SUCCESS;
    }
    let arg =
        |name: &str| shaper_tests::util::arg_value(&args, name).and_then(|v| v.parse::<u64>().ok());
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
    let plan = compile::plan(&policy, None);
    let maps = compile::maps(&plan);
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
    for (flag, what) in [
        (shaper_common::CFG_HOSTS, "host names"),
        (shaper_common::CFG_FLOW_BEHAVIOUR, "flow behaviour"),
    ] {
        if maps.flags & flag == 0 {
            bail!("the soak policy does not turn on {what}");
        }
    }
    // The maps the host-name engine writes and the soak looks up, taken out of the
    // object (the loaded program keeps its own references to them).
    let mut take = |name: &str| {
        obj.take_map(name)
            .with_context(|| format!("map {name} missing from the object"))
    };
    let mut ring = RingBuf::try_from(take(MAP_EVENTS)?)?;
    let mut dns_ring = RingBuf::try_from(take(shaper_common::MAP_DNS_EVENTS)?)?;
    let flows: BpfHashMap<MapData, FlowKey, FlowVal> = BpfHashMap::try_from(take(MAP_FLOWS)?)?;
    let host_maps = Rc::new(RefCell::new(MapKernel::take(&mut obj)?));
    let mut engine = Engine::new(&plan, host_maps.clone());
    let classids: HashSet<u32> = (0..policy.classes.len())
        .map(|i| classid_of(&policy, i))
        .collect();
    // explain as `shaper explain` runs beside a daemon: with what the engine learned.
    let mut ex = Explainer::new(&policy);
    let mut known = (0, 0);

    let mut rng = Rng::xorshift64(seed);
    let mut st = Seeds {
        pool: flow_pool(&policy, seed),
        ..Default::default()
    };
    let mut decided: Vec<u64> = Vec::new();
    // Frames whose difference from explain is accounted for (their later fragments
    // follow them in the kernel).
    let mut accounted: HashSet<u64> = HashSet::new();
    let mut why: BTreeMap<&str, u64> = BTreeMap::new();
    let mut events = 0u64;
    let mut queries = 0u64;
    let (mut refused, mut errors, mut drops, mut bad, mut differ, mut not_compared) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let mut kernel_time = Duration::ZERO;
    let mut kind_time: BTreeMap<&str, (Duration, u64)> = BTreeMap::new();
    let mut runs = 0u64;
    let mut kinds: BTreeMap<&str, u64> = BTreeMap::new();
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let mut examples: Vec<String> = Vec::new();
    let started = Instant::now();
    for n in 0..frames {
        let up = rng.chance(50);
        let (kind, f, up) = frame(&mut rng, up, n, &mut st);
        if n % 65_536 == 0 {
            engine.tick(Instant::now());
        }
        *kinds.entry(kind).or_default() += 1;
        // A DNS answer's query goes out first, from the LAN; the answer comes in from
        // the WAN (the classifier hands on only answers to queries seen going out).
        let mut from = 0;
        if let Some(q) = st.query.take() {
            if bpf::test_run_from(&mut obj, &q, wan, lan, 1).is_ok() {
                queries += 1;
            }
            from = wan;
        }
        let ifindex = if up { wan } else { lan };
        let res = match bpf::test_run_from(&mut obj, &f, ifindex, from, 1) {
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
        let kt = kind_time.entry(kind).or_default();
        kt.0 += res.duration;
        kt.1 += 1;
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
            shaper_common::Dir::Up
        } else {
            shaper_common::Dir::Down
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
        let first_at = d.first_fragment.map(|first| decided[first - 1]);
        let reason = || match &parsed {
            _ if first_at.is_some_and(|at| accounted.contains(&at)) => {
                Some("later fragments of those")
            }
            Parsed::Ip(p) => accounted_for(
                &policy,
                p,
                res.priority,
                &host_maps.borrow().host_flows,
                &flows,
                &engine,
            ),
            _ => None,
        };
        if d.outcome == Outcome::FragmentFollowed && first_at.is_some_and(|at| n - at > 1000) {
            not_compared += 1;
        } else if ex.classid(&d) != res.priority {
            if let Some(reason) = reason() {
                *why.entry(reason).or_default() += 1;
                accounted.insert(n);
            } else {
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
        // The events this frame made go through the host-name engine into the maps
        // before the next frame (the daemon reads the ring as it fills).
        let now = Instant::now();
        while let Some(item) = dns_ring.next() {
            events += 1;
            engine.on_event(now, &item);
        }
        while let Some(item) = ring.next() {
            events += 1;
            engine.on_event(now, &item);
        }
        let learned = (engine.table.len(), engine.stats.sni_decided);
        if learned != known {
            ex.hosts = engine.snapshot(now);
            known = learned;
        }
    }
    let wall = started.elapsed();

    println!("\nframe kinds: {kinds:?}");
    println!("explain outcomes: {outcomes:?}");
    let by_kind: Vec<String> = kind_time
        .iter()
        .map(|(k, (t, n))| format!("{k}: {:.0}", t.as_nanos() as f64 / (*n).max(1) as f64))
        .collect();
    println!("kernel ns/packet by kind: {}", by_kind.join(", "));
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
    row("explain != kernel, unaccounted for", differ.to_string());
    row(
        "explain != kernel, accounted for:",
        why.values().sum::<u64>().to_string(),
    );
    for (reason, count) in &why {
        row(&format!("  {reason}"), count.to_string());
    }
    row("  (later fragments not compared)", not_compared.to_string());
    let stats: PerCpuArray<_, u64> = PerCpuArray::try_from(
        obj.map(MAP_GLOBAL_STATS)
            .context("map GLOBAL_STATS missing")?,
    )?;
    let global = |name: &str| -> anyhow::Result<u64> {
        let i = GLOBAL_COUNTER_NAMES
            .iter()
            .position(|n| *n == name)
            .with_context(|| format!("no counter {name}"))? as u32;
        let mut sum = 0;
        for dir in 0..2 {
            sum += stats
                .get(&(dir * GLOBAL_COUNTERS + i), 0)?
                .iter()
                .sum::<u64>();
        }
        Ok(sum)
    };
    for name in [
        "events",
        "events_lost",
        "dns_answers_unmatched",
        "dns_events_lost",
        "host_flow_hits",
        "flow_cache_hits",
        "flows_demoted",
        "flows_promoted",
    ] {
        row(&format!("kernel: {name}"), global(name)?.to_string());
    }
    let h = &engine.stats;
    row("DNS queries sent before their answers", queries.to_string());
    row(
        "events read and handed to hosts::Engine",
        events.to_string(),
    );
    for (name, v) in [
        ("dns_queries", h.dns_queries),
        ("dns_answers", h.dns_answers),
        ("dns_unmatched", h.dns_unmatched),
        ("dns_unparsed", h.dns_unparsed),
        ("dns_addresses_learned", h.dns_addresses_learned),
        ("tls_hellos", h.tls_hellos),
        ("tls_segments_joined", h.tls_segments_joined),
        ("sni_found", h.sni_found),
        ("sni_absent", h.sni_absent),
        ("sni_unparsed", h.sni_unparsed),
        ("sni_decided", h.sni_decided),
        ("no_room", h.no_room),
        ("kernel_errors", h.kernel_errors),
    ] {
        row(&format!("engine: {name}"), v.to_string());
    }
    row(
        "engine: addresses in the table",
        engine.table.len().to_string(),
    );
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
