//! `shaper explain`: which rule decides a packet, why, and which class (and
//! HTB class id) it lands in. Packets come from short descriptions
//! (`up udp 192.168.1.5:50020 -> 52.113.1.1:3478 dscp=EF`) or from a classic
//! pcap file, parsed here the way the classifier (`shaper-ebpf`) parses them:
//! Ethernet with up to two VLAN tags and a PPPoE session header, IPv4 with
//! options and fragments, IPv6 with up to eight extension-header steps,
//! TCP/UDP/SCTP/UDP-Lite ports, pure TCP ACKs. Every decision is taken
//! twice, over the compiled maps (`compile::map_match`, what the kernel looks
//! up) and over the policy (`compile::reference_match`); a disagreement is
//! reported loudly.
//! Nothing here touches the kernel.
//!
//! Here: packet descriptions and the decisions (one flow from a packet to its rule,
//! class and notes, about 1,300 lines with the descriptions' parser: kept whole so the
//! order of the checks reads as the classifier takes them); frame.rs parses frames,
//! pcap.rs reads captures, tests.rs holds the unit tests.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::Serialize;
use shaper_common::{
    ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, ETH_P_PPP_SES, PPPOE_CODE_SESSION,
    PPPOE_SES_HLEN, PPPOE_VER_TYPE, PPP_IP, PPP_IPV6,
};

use crate::compile::{self, classid_of, MapPlan, PacketView};
use crate::config::{self, Dir, Policy, Rule};

pub mod frame;
pub mod pcap;
pub use frame::*;

/// IPv6 extension-header steps the classifier takes (`MAX_V6_EXT` there).
const MAX_V6_EXT: usize = 8;
/// Headers ending beyond this offset are not followed (`MAX_HDR_OFF` there).
const MAX_HDR_OFF: usize = 1024;
/// Message for a later fragment whose first fragment we have not seen.
pub const LATER_FRAGMENT_NOTE: &str = "later fragment: follows its first fragment in the kernel";

// ---------------------------------------------------------------------------
// Packets.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Frag {
    None,
    First,
    Later,
}

/// What a TCP segment without data is to the classifier (`ack_class` takes
/// both kinds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bare {
    /// Not TCP, or a segment that carries data.
    No,
    /// ACK set, SYN/FIN/RST clear, no data.
    Ack,
    /// A SYN, SYN-ACK, FIN or RST without data.
    Control,
}

impl Bare {
    /// From the TCP flags and whether the header is all the segment holds.
    pub fn of(flags: u8, header_only: bool) -> Bare {
        if !header_only {
            Bare::No
        } else if flags & 0x10 != 0 && flags & 0x07 == 0 {
            Bare::Ack
        } else if flags & 0x07 != 0 {
            Bare::Control
        } else {
            Bare::No
        }
    }
}

/// An IP packet as the classifier sees it. Addresses and ports are in wire
/// order (source, destination); `view()` turns them to the site's side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub dir: Dir,
    pub proto: u8,
    pub dscp: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// `None` for protocols without ports and for later fragments.
    pub sport: Option<u16>,
    pub dport: Option<u16>,
    pub frag: Frag,
    /// IPv4 identification or IPv6 fragment id.
    pub frag_id: u32,
    /// Whether this is a TCP segment without data, as the classifier tells
    /// them apart. `None`: not known (a TCP description without `flags=`).
    pub bare: Option<Bare>,
    /// VLAN ids of the tags the classifier skipped.
    pub vlans: Vec<u16>,
    /// Session id of the PPPoE header the classifier skipped.
    pub pppoe: Option<u16>,
    /// IPv6 extension headers walked (next-header values).
    pub v6_ext: Vec<u8>,
    /// The TLS server name the packet carries (a ClientHello in a capture) or
    /// its connection was opened with (`sni=` in a description).
    pub sni: Option<String>,
    /// `sni` was read from this packet's own ClientHello: the kernel classifies
    /// this packet by the rules, and the connection's later packets by the name.
    pub sni_in_payload: bool,
    /// Where the transport segment (header and payload, as far as the IP header announces
    /// and the frame holds) lies in a captured frame; None for descriptions and later
    /// fragments.
    pub l4: Option<(usize, usize)>,
}

impl Packet {
    /// The packet from the site's side (src = LAN, dst = WAN), as rules see it.
    pub fn view(&self) -> PacketView {
        let (src, dst, sport, dport) = if self.dir == Dir::Down {
            (self.dst, self.src, self.dport, self.sport)
        } else {
            (self.src, self.dst, self.sport, self.dport)
        };
        PacketView {
            dir: self.dir,
            proto: self.proto,
            dscp: self.dscp,
            sport,
            dport,
            src,
            dst,
        }
    }

    /// A one-line description in the syntax `parse_description` reads.
    pub fn describe(&self) -> String {
        let ep = |a: IpAddr, p: Option<u16>| match (a, p) {
            (IpAddr::V6(a), Some(p)) => format!("[{a}]:{p}"),
            (a, Some(p)) => format!("{a}:{p}"),
            (a, None) => a.to_string(),
        };
        let mut s = format!(
            "{} {} {} -> {} dscp={}",
            dir_name(self.dir),
            crate::config::protocol_name(self.proto),
            ep(self.src, self.sport),
            ep(self.dst, self.dport),
            dscp_name(self.dscp)
        );
        match self.frag {
            Frag::None => {}
            Frag::First => {
                let _ = write!(s, " frag=first id={}", self.frag_id);
            }
            Frag::Later => {
                let _ = write!(s, " frag=later id={}", self.frag_id);
            }
        }
        match self.bare {
            Some(Bare::Ack) => s.push_str(" (pure ACK)"),
            Some(Bare::Control) => s.push_str(" (no data)"),
            _ => {}
        }
        if !self.vlans.is_empty() {
            let v: Vec<String> = self.vlans.iter().map(u16::to_string).collect();
            let _ = write!(s, " vlan={}", v.join(","));
        }
        if let Some(id) = self.pppoe {
            let _ = write!(s, " pppoe=0x{id:04x}");
        }
        if !self.v6_ext.is_empty() {
            let v: Vec<&str> = self.v6_ext.iter().map(|&t| ext_name(t)).collect();
            let _ = write!(s, " ext={}", v.join(","));
        }
        s
    }
}

/// What the classifier's parser makes of a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    Ip(Packet),
    /// Not IPv4/IPv6 (ARP, a third VLAN tag, a PPPoE frame carrying LCP,
    /// ...): default class.
    NonIp {
        dir: Dir,
        ethertype: u16,
        /// The PPP protocol of a PPPoE session frame (`ethertype` is then
        /// 0x8864).
        ppp: Option<u16>,
    },
    /// Cut short or inconsistent: default class (counted as malformed).
    Malformed {
        dir: Dir,
        reason: String,
    },
}

impl Parsed {
    pub fn dir(&self) -> Dir {
        match self {
            Parsed::Ip(p) => p.dir,
            Parsed::NonIp { dir, .. } | Parsed::Malformed { dir, .. } => *dir,
        }
    }
}

/// How explain names a direction: `up` / `down`.
pub fn dir_name(dir: Dir) -> &'static str {
    match dir {
        Dir::Up => "up",
        Dir::Down => "down",
    }
}

/// `up`/`upload` or `down`/`download`.
pub fn parse_direction(s: &str) -> Result<Dir, String> {
    match s.to_ascii_lowercase().as_str() {
        "up" | "upload" => Ok(Dir::Up),
        "down" | "download" => Ok(Dir::Down),
        _ => Err(format!(
            "`{s}` is not a direction: use up (upload, WAN egress) or down (download, LAN egress)"
        )),
    }
}

/// Protocols whose first four L4 bytes are ports (for the classifier).
pub fn has_ports(proto: u8) -> bool {
    matches!(proto, 6 | 17 | 132 | 136)
}

pub fn dscp_name(d: u8) -> String {
    let name = match d {
        0 => Some("DF".to_string()),
        1 => Some("LE".to_string()),
        44 => Some("VA".to_string()),
        46 => Some("EF".to_string()),
        d if d & 7 == 0 => Some(format!("CS{}", d >> 3)),
        d if d & 1 == 0 && (1..=4).contains(&(d >> 3)) && (1..=3).contains(&((d >> 1) & 3)) => {
            Some(format!("AF{}{}", d >> 3, (d >> 1) & 3))
        }
        _ => None,
    };
    match name {
        Some(n) => format!("{n}({d})"),
        None => d.to_string(),
    }
}

/// Names of the PPP protocols a PPPoE session commonly carries besides IP.
fn ppp_name(p: u16) -> Option<&'static str> {
    Some(match p {
        0x8021 => "IPCP",
        0x8057 => "IPV6CP",
        0xc021 => "LCP",
        0xc023 => "PAP",
        0xc223 => "CHAP",
        _ => return None,
    })
}

fn ext_name(t: u8) -> &'static str {
    match t {
        0 => "hbh",
        43 => "routing",
        44 => "frag",
        51 => "ah",
        60 => "dstopts",
        _ => "?",
    }
}

// ---------------------------------------------------------------------------
// Descriptions.

/// Splits the PACKET arguments into descriptions: each starts at a direction
/// word, so quoted (`'up udp ...' 'down tcp ...'`) and unquoted arguments both
/// work.
pub fn split_descriptions(args: &[String]) -> Result<Vec<String>, String> {
    let mut out: Vec<Vec<String>> = Vec::new();
    for arg in args {
        for tok in arg.replace("->", " -> ").split_whitespace() {
            if parse_direction(tok).is_ok() {
                out.push(vec![tok.to_string()]);
            } else if let Some(cur) = out.last_mut() {
                cur.push(tok.to_string());
            } else {
                return Err(format!(
                    "a packet description starts with its direction (up or down), not `{tok}`"
                ));
            }
        }
    }
    Ok(out.into_iter().map(|v| v.join(" ")).collect())
}

fn parse_endpoint(s: &str) -> Result<(IpAddr, Option<u16>), String> {
    let port = |p: &str| {
        p.parse::<u16>()
            .map_err(|_| format!("`{p}` in `{s}` is not a port (0-65535)"))
    };
    if let Some(rest) = s.strip_prefix('[') {
        let (a, tail) = rest
            .split_once(']')
            .ok_or_else(|| format!("`{s}`: missing `]` after the IPv6 address"))?;
        let a: Ipv6Addr = a
            .parse()
            .map_err(|_| format!("`{a}` in `{s}` is not an IPv6 address"))?;
        let p = match tail {
            "" => None,
            t => Some(port(
                t.strip_prefix(':')
                    .ok_or_else(|| format!("`{s}`: write [address]:port"))?,
            )?),
        };
        return Ok((IpAddr::V6(a), p));
    }
    if s.matches(':').count() > 1 {
        let a: Ipv6Addr = s.parse().map_err(|_| {
            format!("`{s}` is not an address (IPv6 with a port is written [address]:port)")
        })?;
        return Ok((IpAddr::V6(a), None));
    }
    let (a, p) = match s.split_once(':') {
        Some((a, p)) => (a, Some(port(p)?)),
        None => (s, None),
    };
    let a: Ipv4Addr = a
        .parse()
        .map_err(|_| format!("`{a}` is not an IPv4 or IPv6 address"))?;
    Ok((IpAddr::V4(a), p))
}

/// Parses `DIR PROTO SRC[:PORT] -> DST[:PORT] [dscp=X] [flags=SAFRPU] [payload=N]
/// [frag=none|first|later] [id=N]` (also `ack` for a pure ACK). Addresses are
/// the packet's own (source, destination) as it leaves the interface.
pub fn parse_description(s: &str) -> Result<Packet, String> {
    let spaced = s.replace("->", " -> ");
    let toks: Vec<&str> = spaced.split_whitespace().collect();
    let ctx = |m: String| format!("packet `{s}`: {m}");
    if toks.len() < 5 {
        return Err(ctx(
            "expected `up|down PROTOCOL SRC -> DST [dscp=..]`, e.g. `up udp 192.168.1.5:50020 -> 52.113.1.1:3478 dscp=EF`".into(),
        ));
    }
    let dir = parse_direction(toks[0]).map_err(ctx)?;
    let proto = crate::config::parse_protocol(toks[1]).map_err(ctx)?;
    let (src, sport) = parse_endpoint(toks[2]).map_err(ctx)?;
    if !matches!(toks[3], "->" | ">" | "to") {
        return Err(ctx(format!(
            "expected `->` between the addresses, found `{}`",
            toks[3]
        )));
    }
    let (dst, dport) = parse_endpoint(toks[4]).map_err(ctx)?;
    if src.is_ipv4() != dst.is_ipv4() {
        return Err(ctx(
            "source and destination are of different families".into()
        ));
    }
    if has_ports(proto) {
        if sport.is_none() || dport.is_none() {
            return Err(ctx(format!(
                "{} carries ports: give both, as ADDRESS:PORT (IPv6: [ADDRESS]:PORT)",
                crate::config::protocol_name(proto)
            )));
        }
    } else if sport.is_some() || dport.is_some() {
        return Err(ctx(format!(
            "{} has no ports (the classifier sees none)",
            crate::config::protocol_name(proto)
        )));
    }
    let mut p = Packet {
        dir,
        proto,
        dscp: 0,
        src,
        dst,
        sport,
        dport,
        frag: Frag::None,
        frag_id: 0,
        bare: if proto == 6 { None } else { Some(Bare::No) },
        vlans: vec![],
        pppoe: None,
        v6_ext: vec![],
        sni: None,
        sni_in_payload: false,
        l4: None,
    };
    let mut flags: Option<u8> = None;
    let mut payload = 0usize;
    for t in &toks[5..] {
        let (k, v) = t.split_once('=').unwrap_or((t, ""));
        match k.to_ascii_lowercase().as_str() {
            "dscp" => {
                p.dscp = match v.parse::<u8>() {
                    Ok(n) if n <= 63 => n,
                    Ok(_) => return Err(ctx(format!("dscp={v}: DSCP is 0-63"))),
                    Err(_) => config::parse_dscp_name(v).map_err(ctx)?,
                }
            }
            "flags" => {
                let mut f = 0u8;
                for c in v.chars() {
                    f |= match c.to_ascii_uppercase() {
                        'F' => 0x01,
                        'S' => 0x02,
                        'R' => 0x04,
                        'P' => 0x08,
                        'A' => 0x10,
                        'U' => 0x20,
                        'E' => 0x40,
                        'C' => 0x80,
                        _ => return Err(ctx(format!("`{c}` is not a TCP flag (F S R P A U E C)"))),
                    };
                }
                flags = Some(f);
            }
            "ack" | "pure-ack" if v.is_empty() => flags = Some(0x10),
            "payload" | "len" => {
                payload = v
                    .parse()
                    .map_err(|_| ctx(format!("`{v}` is not a payload length in bytes")))?
            }
            "frag" => {
                p.frag = match v {
                    "none" | "no" => Frag::None,
                    "first" => Frag::First,
                    "later" => Frag::Later,
                    _ => return Err(ctx(format!("frag=`{v}`: use none, first or later"))),
                }
            }
            "id" => {
                p.frag_id = v
                    .parse()
                    .map_err(|_| ctx(format!("`{v}` is not a fragment id")))?
            }
            "sni" => {
                if v.is_empty() || v.contains(|c: char| c.is_whitespace()) {
                    return Err(ctx(format!("sni=`{v}`: give a host name")));
                }
                p.sni = Some(v.trim_end_matches('.').to_ascii_lowercase());
            }
            _ => {
                return Err(ctx(format!(
                    "unknown `{t}`: accepted are dscp=, flags=, payload=, frag=, id=, sni= and ack"
                )))
            }
        }
    }
    if let Some(f) = flags {
        if proto != 6 {
            return Err(ctx("TCP flags on a packet that is not TCP".into()));
        }
        p.bare = Some(Bare::of(f, payload == 0));
    }
    if p.frag == Frag::Later {
        // The classifier sees no ports on a later fragment.
        p.sport = None;
        p.dport = None;
        p.bare = Some(Bare::No);
    }
    Ok(p)
}

// ---------------------------------------------------------------------------
// Decisions.

/// How the packet was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// A rule matched.
    Rule,
    /// No rule matched: default class.
    NoRule,
    /// A later fragment whose first fragment came earlier: its decision.
    FragmentFollowed,
    /// A later fragment whose first fragment was not seen: default class here.
    FragmentUnknown,
    /// Not IP: default class.
    NonIp,
    /// Malformed: default class.
    Malformed,
}

/// The decision alone (no text): what `explain` adds words to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub outcome: Outcome,
    /// Rule rank (index into `policy.rules`) that decided, if any.
    pub rule: Option<usize>,
    /// Class index before the pure-ACK override.
    pub rule_class: usize,
    /// Final class index.
    pub class: usize,
    /// The ACK class replaced `rule_class`.
    pub ack_override: bool,
    /// Rule rank the reference matcher picks, when it disagrees with the maps.
    pub reference_disagrees: Option<Option<usize>>,
    /// For `FragmentFollowed`: the 1-based number of the first fragment.
    pub first_fragment: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FragKey {
    dir: Dir,
    src: IpAddr,
    dst: IpAddr,
    id: u32,
    proto: u8,
}

/// A connection from the site's side: LAN address, WAN address, ports, protocol.
type Conn = (IpAddr, IpAddr, Option<u16>, Option<u16>, u8);

/// Classifies packets over one policy, remembering first fragments as the
/// kernel's FRAGS map does (by direction, site-side addresses, id, protocol).
pub struct Explainer<'a> {
    pub policy: &'a Policy,
    pub maps: MapPlan,
    /// What the running shaper learned of host names (its hosts.json).
    pub hosts: crate::hosts::Snapshot,
    /// The last decided packet's host facts and the server name that decided it.
    facts: HostFacts,
    sni_decided: Option<String>,
    /// Server names read from ClientHellos earlier in the input, by connection
    /// (site-side addresses and ports, protocol).
    sni_conns: HashMap<Conn, String>,
    frags: HashMap<FragKey, (usize, Option<usize>, usize)>,
    seen: usize,
}

/// One explained packet (`--json` prints a list of these).
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    /// 1-based, in input order.
    pub packet: usize,
    pub direction: &'static str,
    pub interface: String,
    /// The packet as parsed (description syntax), or what was wrong with it.
    pub parsed: String,
    pub outcome: Outcome,
    pub rule: Option<RuleHit>,
    pub class: String,
    /// HTB class id as `skb->priority` carries it (major << 16 | minor).
    pub classid: u32,
    /// The same as `1:10`.
    pub handle: String,
    /// A pure TCP ACK. `None`: not known (a TCP description without flags).
    pub pure_ack: Option<bool>,
    /// A TCP segment without data (a pure ACK, SYN, SYN-ACK, FIN or RST):
    /// what `ack_class` takes. `None`: not known.
    pub no_data: Option<bool>,
    pub ack_class_applied: bool,
    /// Rule picked over the compiled maps (what the kernel looks up).
    pub map_rule: Option<String>,
    /// Rule picked by the reference matcher over the policy.
    pub reference_rule: Option<String>,
    pub agree: bool,
    pub notes: Vec<String>,
    /// Rules that missed by one field (when no rule matched).
    pub near_misses: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RuleHit {
    pub name: String,
    /// The rule's configured priority.
    pub priority: i64,
    /// Position in the evaluation order (0 = first).
    pub rank: usize,
    /// Each constrained field and the value that satisfied it.
    pub matched: Vec<String>,
    /// Fields the rule does not constrain.
    pub any: Vec<&'static str>,
}

/// One rule field against one packet: `None` when the rule does not
/// constrain it.
struct Check {
    field: &'static str,
    ok: Option<bool>,
    detail: String,
}

fn list<T>(v: &[T], f: impl Fn(&T) -> String) -> String {
    let items: Vec<String> = v.iter().map(f).collect();
    format!("[{}]", items.join(", "))
}

fn port_text(p: Option<u16>) -> String {
    p.map_or("none".into(), |p| p.to_string())
}

fn ranges_text(r: &[(u16, u16)]) -> String {
    list(r, |&(lo, hi)| {
        if lo == hi {
            lo.to_string()
        } else {
            format!("{lo}-{hi}")
        }
    })
}

/// What is known of the packet's host names: the host rules its WAN-side
/// address was learned for (rank, name) and its TLS server name.
#[derive(Debug, Clone, Default)]
struct HostFacts {
    learned: Vec<(usize, String)>,
    sni: Option<String>,
}

fn checks(rule: &Rule, rank: usize, v: &PacketView, h: &HostFacts) -> Vec<Check> {
    let mut out = Vec::new();
    if !rule.dns_names.is_empty() {
        let learned = h.learned.iter().find(|(r, _)| *r == rank);
        let by_sni = h.sni.as_ref().filter(|n| rule.accepts_name(n));
        let (ok, detail) = match (learned, by_sni) {
            (Some((_, name)), _) => (
                true,
                format!("WAN address {} was answered for {name} (DNS)", v.dst),
            ),
            (None, Some(n)) => (
                true,
                format!(
                    "TLS server name {n} is in {}",
                    list(&rule.dns_names, |n| n.clone())
                ),
            ),
            (None, None) => (
                false,
                format!(
                    "WAN address {} was not answered for {}{}",
                    v.dst,
                    list(&rule.dns_names, |n| n.clone()),
                    match &h.sni {
                        Some(n) => format!(" and server name {n} is not one"),
                        None => String::new(),
                    }
                ),
            ),
        };
        out.push(Check {
            field: "host",
            ok: Some(ok),
            detail,
        });
    }
    let dir_ok = rule.direction.map(|d| v.dir == d);
    out.push(Check {
        field: "direction",
        ok: dir_ok,
        detail: format!(
            "direction {} {} {}",
            dir_name(v.dir),
            if dir_ok == Some(false) {
                "is not"
            } else {
                "is"
            },
            rule.direction.map_or("both", Dir::name)
        ),
    });
    let field = |name: &'static str, constrained: bool, ok: bool, detail: String| Check {
        field: name,
        ok: constrained.then_some(ok),
        detail,
    };
    let inn = |ok: bool| if ok { "in" } else { "not in" };
    let ok = rule.accepts_protocol(v.proto);
    out.push(field(
        "protocol",
        !rule.protocols.is_empty(),
        ok,
        format!(
            "protocol {} {} {}",
            crate::config::protocol_name(v.proto),
            inn(ok),
            list(&rule.protocols, |p| crate::config::protocol_name(*p))
        ),
    ));
    let ok = rule.accepts_dscp(v.dscp);
    out.push(field(
        "dscp",
        !rule.dscp.is_empty(),
        ok,
        format!(
            "DSCP {} {} {}",
            dscp_name(v.dscp),
            inn(ok),
            list(&rule.dscp, |d| dscp_name(*d))
        ),
    ));
    for (name, label, r, p) in [
        ("lan_port", "LAN port", &rule.src_ports, v.sport),
        ("wan_port", "WAN port", &rule.dst_ports, v.dport),
    ] {
        let ok = crate::rule::ports_accept(r, p);
        out.push(field(
            name,
            !r.is_empty(),
            ok,
            format!("{label} {} {} {}", port_text(p), inn(ok), ranges_text(r)),
        ));
    }
    for (name, label, c, a) in [
        ("lan_address", "LAN address", &rule.src_cidrs, v.src),
        ("wan_address", "WAN address", &rule.dst_cidrs, v.dst),
    ] {
        let ok = crate::rule::cidrs_accept(c, a);
        out.push(field(
            name,
            !c.is_empty(),
            ok,
            format!("{label} {a} {} {}", inn(ok), list(c, |c| c.to_string())),
        ));
    }
    // The checks are the rule's own predicate, field by field.
    debug_assert_eq!(
        out.iter().all(|c| c.ok != Some(false)),
        rule.accepts(v, || out
            .iter()
            .any(|c| c.field == "host" && c.ok == Some(true))),
        "explain's checks and Rule::accepts disagree on {v:?}"
    );
    out
}

impl<'a> Explainer<'a> {
    pub fn new(policy: &'a Policy) -> Self {
        let plan = compile::plan(policy, None);
        Explainer {
            maps: compile::maps(&plan),
            policy,
            hosts: Default::default(),
            facts: HostFacts::default(),
            sni_decided: None,
            sni_conns: HashMap::new(),
            frags: HashMap::new(),
            seen: 0,
        }
    }

    /// The host rule a connection's server name makes win ([`crate::hosts::sni_winner`]);
    /// `learned` are the host rules the WAN address is learned for.
    fn sni_winner(&self, view: &PacketView, name: &str, learned: &[usize]) -> Option<usize> {
        crate::hosts::sni_winner(self.policy, view, name, |r| learned.contains(&r))
    }

    /// With what a running shaper learned of host names.
    pub fn with_hosts(policy: &'a Policy, hosts: crate::hosts::Snapshot) -> Self {
        let mut e = Self::new(policy);
        e.hosts = hosts;
        e
    }

    fn host_facts(&self, p: &Packet, view: &PacketView) -> HostFacts {
        let rank = |name: &str| self.policy.rules.iter().position(|r| r.name == name);
        let learned = self
            .hosts
            .learned
            .iter()
            .filter(|l| l.addr == view.dst)
            .filter_map(|l| rank(&l.rule).map(|r| (r, l.name.clone())))
            .collect();
        let conn = (view.src, view.dst, view.sport, view.dport, view.proto);
        // A ClientHello's own name applies from the connection's next packet on.
        let own = p.sni.clone().filter(|_| !p.sni_in_payload);
        let sni = own
            .or_else(|| self.sni_conns.get(&conn).cloned())
            .or_else(|| {
                self.hosts
                    .sni
                    .iter()
                    .find(|e| {
                        e.src == view.src
                            && e.dst == view.dst
                            && Some(e.sport) == view.sport
                            && Some(e.dport) == view.dport
                    })
                    .map(|e| e.name.clone())
            });
        HostFacts { learned, sni }
    }

    fn class_of_rule(&self, rule: Option<usize>) -> usize {
        rule.map_or(self.policy.default_class, |r| {
            self.maps.rule_class[r] as usize
        })
    }

    /// Decides one packet, as the kernel would (including fragment state).
    pub fn decide(&mut self, input: &Parsed) -> Decision {
        self.seen += 1;
        let dflt = self.policy.default_class;
        let plain = |outcome| Decision {
            outcome,
            rule: None,
            rule_class: dflt,
            class: dflt,
            ack_override: false,
            reference_disagrees: None,
            first_fragment: None,
        };
        let p = match input {
            Parsed::Ip(p) => p,
            Parsed::NonIp { .. } => return plain(Outcome::NonIp),
            Parsed::Malformed { .. } => return plain(Outcome::Malformed),
        };
        let view = p.view();
        let key = || FragKey {
            dir: p.dir,
            src: view.src,
            dst: view.dst,
            id: p.frag_id,
            proto: p.proto,
        };
        let mut d = if p.frag == Frag::Later {
            match self.frags.get(&key()) {
                Some(&(first, rule, class)) => Decision {
                    outcome: Outcome::FragmentFollowed,
                    rule,
                    rule_class: class,
                    class,
                    ack_override: false,
                    reference_disagrees: None,
                    first_fragment: Some(first),
                },
                None => plain(Outcome::FragmentUnknown),
            }
        } else {
            let facts = self.host_facts(p, &view);
            let ranks: Vec<usize> = facts.learned.iter().map(|l| l.0).collect();
            let mut rule = compile::map_match_hosts(&self.maps, &view, &ranks);
            let mut reference = compile::reference_match_hosts(self.policy, &view, |r, a| {
                a == view.dst && ranks.contains(&r)
            });
            // A connection to port 443 whose server name makes a host rule win is
            // decided by it in both directions (the kernel's HOST_FLOWS).
            self.sni_decided = None;
            if let Some(name) = &facts.sni {
                if let Some(r) = self.sni_winner(&view, name, &ranks) {
                    rule = Some(r);
                    reference = Some(r);
                    self.sni_decided = Some(name.clone());
                }
            }
            self.facts = facts;
            if let (true, Some(n)) = (p.sni_in_payload, &p.sni) {
                // As the kernel: a connection decided by a name keeps it (it sends no
                // later ClientHello up); one the name did not decide may be by a later one.
                let conn = (view.src, view.dst, view.sport, view.dport, view.proto);
                let decided = self
                    .sni_conns
                    .get(&conn)
                    .is_some_and(|old| self.sni_winner(&view, old, &ranks).is_some());
                if !decided {
                    self.sni_conns.insert(conn, n.clone());
                }
            }
            let class = self.class_of_rule(rule);
            if p.frag == Frag::First {
                self.frags.insert(key(), (self.seen, rule, class));
            }
            Decision {
                outcome: if rule.is_some() {
                    Outcome::Rule
                } else {
                    Outcome::NoRule
                },
                rule,
                rule_class: class,
                class,
                ack_override: false,
                reference_disagrees: (reference != rule).then_some(reference),
                first_fragment: None,
            }
        };
        if matches!(p.bare, Some(Bare::Ack | Bare::Control)) {
            if let Some(a) = self.policy.ack_class {
                d.ack_override = true;
                d.class = a;
            }
        }
        d
    }

    /// The HTB class id a decision puts into `skb->priority`.
    pub fn classid(&self, d: &Decision) -> u32 {
        classid_of(self.policy, d.class)
    }

    /// Decides one packet and says why.
    pub fn explain(&mut self, input: &Parsed) -> Explanation {
        let d = self.decide(input);
        let pol = self.policy;
        let dir = input.dir();
        let rule_name = |r: Option<usize>| r.map(|i| pol.rules[i].name.clone());
        let classid = classid_of(pol, d.class);
        let mut notes = Vec::new();
        let mut near_misses = Vec::new();
        let mut hit = None;
        let (parsed, bare) = match input {
            Parsed::Ip(p) => (p.describe(), p.bare),
            Parsed::NonIp {
                ethertype,
                ppp: Some(ppp),
                ..
            } => {
                notes.push(format!(
                    "not IP (a PPPoE session frame, ethertype 0x{ethertype:04x}, carrying PPP protocol 0x{ppp:04x}{}): the classifier sends it to the default class",
                    ppp_name(*ppp).map_or(String::new(), |n| format!(", {n}"))
                ));
                (
                    format!(
                        "{} non-IP PPPoE session frame, PPP protocol 0x{ppp:04x}",
                        dir_name(dir)
                    ),
                    Some(Bare::No),
                )
            }
            Parsed::NonIp { ethertype, .. } => {
                notes.push(format!(
                    "not IP (ethertype 0x{ethertype:04x}{}): the classifier sends it to the default class",
                    if *ethertype == ETH_P_8021Q || *ethertype == ETH_P_8021AD {
                        ", a third VLAN tag: two are followed"
                    } else {
                        ""
                    }
                ));
                (
                    format!("{} non-IP ethertype 0x{ethertype:04x}", dir_name(dir)),
                    Some(Bare::No),
                )
            }
            Parsed::Malformed { reason, .. } => {
                notes.push(format!(
                    "malformed ({reason}): the classifier sends it to the default class and counts it"
                ));
                (
                    format!("{} malformed: {reason}", dir_name(dir)),
                    Some(Bare::No),
                )
            }
        };
        if let Parsed::Ip(p) = input {
            let view = p.view();
            match d.outcome {
                Outcome::Rule | Outcome::FragmentFollowed => {
                    if let Some(r) = d.rule {
                        let rule = &pol.rules[r];
                        let cs = checks(rule, r, &view, &self.facts);
                        hit = Some(RuleHit {
                            name: rule.name.clone(),
                            priority: rule.priority,
                            rank: r,
                            matched: cs
                                .iter()
                                .filter(|c| c.ok.is_some())
                                .map(|c| c.detail.clone())
                                .collect(),
                            any: cs
                                .iter()
                                .filter(|c| c.ok.is_none())
                                .map(|c| c.field)
                                .collect(),
                        });
                    }
                    if let Some(first) = d.first_fragment {
                        notes.push(format!(
                            "later fragment: follows its first fragment (packet {first}), as the kernel does"
                        ));
                        hit = hit.map(|mut h| {
                            h.matched = vec![format!("first fragment (packet {first}) matched")];
                            h.any.clear();
                            h
                        });
                    }
                }
                Outcome::NoRule => {
                    for (i, rule) in pol.rules.iter().enumerate() {
                        let cs = checks(rule, i, &view, &self.facts);
                        let failed: Vec<&Check> =
                            cs.iter().filter(|c| c.ok == Some(false)).collect();
                        if failed.len() == 1 && near_misses.len() < 3 {
                            near_misses
                                .push(format!("{} (rank {i}): {}", rule.name, failed[0].detail));
                        }
                    }
                }
                // The rule line says it (LATER_FRAGMENT_NOTE).
                Outcome::FragmentUnknown => {}
                Outcome::NonIp | Outcome::Malformed => {}
            }
            if let (true, Some(name)) = (p.sni_in_payload, &p.sni) {
                notes.push(format!(
                    "a ClientHello naming {name}: this packet goes by the rules; if the name makes a host \
                     rule win, the connection's later packets follow it"
                ));
            }
            if let Some(name) = &self.sni_decided {
                notes.push(format!(
                    "decided by the TLS server name {name}: the connection follows it in both directions \
                     once `shaper run` has read its ClientHello (the ClientHello itself, and anything before it, \
                     goes by the address rules)"
                ));
            } else if let Some((_, name)) =
                self.facts.learned.iter().find(|(r, _)| Some(*r) == d.rule)
            {
                notes.push(format!(
                    "the WAN address {} was learned from a DNS answer for {name}",
                    view.dst
                ));
            }
            if p.bare.is_none() {
                notes.push(
                    "TCP flags not given: not treated as a segment without data (add flags=A, flags=S, ..., or `ack`)"
                        .to_string(),
                );
            }
        }
        let class_name = |c: usize| pol.classes[c].name.clone();
        if d.ack_override {
            notes.push(format!(
                "TCP segment without data ({}): goes to ack_class `{}` instead of `{}`",
                if bare == Some(Bare::Ack) {
                    "pure ACK"
                } else {
                    "SYN, SYN-ACK, FIN or RST"
                },
                class_name(d.class),
                class_name(d.rule_class)
            ));
        } else if matches!(bare, Some(Bare::Ack | Bare::Control)) {
            notes.push("TCP segment without data, but no ack_class is configured".to_string());
        }
        if let (Some(w), Parsed::Ip(p)) = (pol.dirs[Dir::Down].window_clamp, input) {
            if p.proto == 6 && p.frag != Frag::Later {
                notes.push(if dir == Dir::Up {
                    format!(
                        "download window clamp: if this segment carries an ACK of a connection whose handshake the classifier saw, its receive window is lowered to the connection's share of its download class's rate x (its round trip + {} ms), never moving the right edge left; the class above is not affected",
                        w.queue_ms
                    )
                } else {
                    "download window clamp: this connection's download is held by the receive window in the ACKs the LAN host sends back (when the classifier saw its handshake); the class above is not affected".to_string()
                });
            }
        }
        let (map_rule, reference_rule, agree) = match d.reference_disagrees {
            Some(reference) => (rule_name(d.rule), rule_name(reference), false),
            None => (rule_name(d.rule), rule_name(d.rule), true),
        };
        Explanation {
            packet: self.seen,
            direction: dir_name(dir),
            interface: pol.egress(dir).to_string(),
            parsed,
            outcome: d.outcome,
            rule: hit,
            class: class_name(d.class),
            classid,
            handle: format!("{:x}:{:x}", classid >> 16, classid & 0xffff),
            pure_ack: bare.map(|b| b == Bare::Ack),
            no_data: bare.map(|b| b != Bare::No),
            ack_class_applied: d.ack_override,
            map_rule,
            reference_rule,
            agree,
            notes,
            near_misses,
        }
    }
}

/// Text for one explanation.
pub fn render(e: &Explanation) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "#{} {}", e.packet, e.parsed);
    if !e.agree {
        let _ = writeln!(
            s,
            "  !!! DISAGREEMENT: the compiled maps (what the kernel looks up) pick {}, the reference matcher picks {}. This is a bug in the compiler; the class below is the maps' (the kernel's).",
            e.map_rule.as_deref().unwrap_or("no rule"),
            e.reference_rule.as_deref().unwrap_or("no rule")
        );
    }
    match (&e.rule, e.outcome) {
        (Some(r), _) => {
            let _ = writeln!(
                s,
                "  rule:  {} (priority {}, {} in evaluation order)",
                r.name,
                r.priority,
                ordinal(r.rank + 1)
            );
            let _ = writeln!(s, "  why:   {}", r.matched.join("; "));
            if !r.any.is_empty() {
                let any: Vec<&str> = r.any.iter().map(|f| field_label(f)).collect();
                let _ = writeln!(s, "         unconstrained: {}", any.join(", "));
            }
        }
        (None, Outcome::FragmentUnknown) => {
            let _ = writeln!(s, "  rule:  default ({LATER_FRAGMENT_NOTE})");
        }
        (None, Outcome::FragmentFollowed) => {
            let _ = writeln!(
                s,
                "  rule:  none: its first fragment matched no rule -> default class"
            );
        }
        (None, Outcome::NonIp) | (None, Outcome::Malformed) => {
            let _ = writeln!(s, "  rule:  none (not classified) -> default class");
        }
        (None, _) => {
            let _ = writeln!(s, "  rule:  no rule matched -> default class");
        }
    }
    for m in &e.near_misses {
        let _ = writeln!(s, "         near miss: {m}");
    }
    let _ = writeln!(
        s,
        "  class: {} -> HTB {} on {} ({} egress)",
        e.class,
        e.handle,
        e.interface,
        if e.direction == "up" {
            "upload, WAN"
        } else {
            "download, LAN"
        }
    );
    let _ = writeln!(
        s,
        "  TCP without data: {}",
        match (e.pure_ack, e.no_data, e.ack_class_applied) {
            (Some(true), _, true) => "pure ACK -> ack_class",
            (_, Some(true), true) => "SYN/FIN/RST -> ack_class",
            (_, Some(true), false) => "yes (no ack_class configured)",
            (_, Some(false), _) => "no",
            _ => "unknown (no flags given)",
        }
    );
    for n in &e.notes {
        let _ = writeln!(s, "  note:  {n}");
    }
    s
}

fn field_label(f: &str) -> &str {
    match f {
        "dscp" => "DSCP",
        "lan_port" => "LAN port",
        "wan_port" => "WAN port",
        "lan_address" => "LAN address",
        "wan_address" => "WAN address",
        other => other,
    }
}

fn ordinal(n: usize) -> String {
    let suffix = match (n % 10, n % 100) {
        (1, 11) | (2, 12) | (3, 13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

/// What `shaper explain` prints, and how many packets the maps and the
/// reference decided differently.
pub struct Report {
    pub text: String,
    pub explanations: Vec<Explanation>,
    pub disagreements: usize,
}

/// `shaper explain`: descriptions, or a pcap with its direction.
pub fn run(
    policy: &Policy,
    descriptions: &[String],
    pcap_file: Option<&std::path::Path>,
    direction: Option<&str>,
    json: bool,
    hosts: Option<crate::hosts::Snapshot>,
) -> Result<Report, String> {
    let mut inputs: Vec<Parsed> = Vec::new();
    let mut preamble = Vec::new();
    match (pcap_file, descriptions.is_empty()) {
        (Some(_), false) => {
            return Err("give packet descriptions or --pcap, not both".into());
        }
        (None, true) => {
            return Err(
                "nothing to explain: give packet descriptions (e.g. `up udp 192.168.1.5:50020 -> 52.113.1.1:3478 dscp=EF`) or --pcap FILE --direction up|down"
                    .into(),
            );
        }
        (Some(path), true) => {
            let dir = parse_direction(direction.ok_or(
                "--pcap needs --direction up|down (which egress the capture was taken on)",
            )?)?;
            let bytes =
                std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
            let cap = pcap::read(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
            let l2 = match cap.linktype {
                pcap::LINKTYPE_ETHERNET => true,
                pcap::LINKTYPE_RAW | pcap::LINKTYPE_IPV4 | pcap::LINKTYPE_IPV6 => false,
                t => {
                    return Err(format!(
                        "{}: link type {t} is not supported (Ethernet, 1, or raw IP, 101)",
                        path.display()
                    ))
                }
            };
            let mut truncated = 0;
            for r in &cap.records {
                if (r.data.len() as u32) < r.orig_len {
                    truncated += 1;
                }
                inputs.push(parse_frame(&r.data, l2, dir));
            }
            if truncated > 0 {
                preamble.push(format!(
                    "note: {truncated} packet(s) were captured short of their length (snaplen {}); they are explained as captured, the kernel saw them whole",
                    cap.snaplen
                ));
            }
        }
        (None, false) => {
            if direction.is_some() {
                return Err(
                    "--direction goes with --pcap; a description starts with its own direction"
                        .into(),
                );
            }
            for d in split_descriptions(descriptions)? {
                inputs.push(Parsed::Ip(parse_description(&d)?));
            }
        }
    }
    if let Some(h) = &hosts {
        if policy.uses_hosts() {
            preamble.push(format!(
                "host names learned by the running shaper: {} address(es) from DNS answers, {} connection(s) by TLS server name",
                h.learned.len(),
                h.sni.len()
            ));
        }
    }
    let mut ex = Explainer::with_hosts(policy, hosts.unwrap_or_default());
    let explanations: Vec<Explanation> = inputs.iter().map(|i| ex.explain(i)).collect();
    let disagreements = explanations.iter().filter(|e| !e.agree).count();
    let text = if json {
        let v = serde_json::json!({
            "packets": explanations,
            "disagreements": disagreements,
        });
        let mut t = serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?;
        t.push('\n');
        t
    } else {
        let mut t = String::new();
        for p in &preamble {
            let _ = writeln!(t, "{p}");
        }
        for e in &explanations {
            t.push_str(&render(e));
        }
        if disagreements > 0 {
            let _ = writeln!(
                t,
                "!!! {disagreements} packet(s) where the compiled maps and the reference matcher DISAGREE (see above)"
            );
        }
        t
    };
    Ok(Report {
        text,
        explanations,
        disagreements,
    })
}

#[cfg(test)]
mod tests;
