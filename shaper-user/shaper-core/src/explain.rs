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

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::Serialize;
use shaper_common::{
    DIR_DOWN, DIR_UP, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, ETH_P_PPP_SES,
    PPPOE_CODE_SESSION, PPPOE_SES_HLEN, PPPOE_VER_TYPE, PPP_IP, PPP_IPV6,
};

use crate::compile::{self, classid_of, MapPlan, PacketView};
use crate::config::{self, Cidr, Direction, Policy, Rule};

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
    pub dir: u32,
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
}

impl Packet {
    /// The packet from the site's side (src = LAN, dst = WAN), as rules see it.
    pub fn view(&self) -> PacketView {
        let (src, dst, sport, dport) = if self.dir == DIR_DOWN {
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
        dir: u32,
        ethertype: u16,
        /// The PPP protocol of a PPPoE session frame (`ethertype` is then
        /// 0x8864).
        ppp: Option<u16>,
    },
    /// Cut short or inconsistent: default class (counted as malformed).
    Malformed {
        dir: u32,
        reason: String,
    },
}

impl Parsed {
    pub fn dir(&self) -> u32 {
        match self {
            Parsed::Ip(p) => p.dir,
            Parsed::NonIp { dir, .. } | Parsed::Malformed { dir, .. } => *dir,
        }
    }
}

pub fn dir_name(dir: u32) -> &'static str {
    if dir == DIR_UP {
        "up"
    } else {
        "down"
    }
}

/// `up`/`upload` or `down`/`download`.
pub fn parse_direction(s: &str) -> Result<u32, String> {
    match s.to_ascii_lowercase().as_str() {
        "up" | "upload" => Ok(DIR_UP),
        "down" | "download" => Ok(DIR_DOWN),
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
// Frames, parsed as shaper-ebpf's `parse` does.

fn get<const N: usize>(b: &[u8], off: usize) -> Option<[u8; N]> {
    b.get(off..off.checked_add(N)?)?.try_into().ok()
}

/// Parses one frame leaving the interface of direction `dir`. `l2`: the
/// frame starts with an Ethernet header (else it is a bare IP packet, as on
/// PPP/tun devices, and the version nibble names the protocol).
pub fn parse_frame(b: &[u8], l2: bool, dir: u32) -> Parsed {
    let bad = |reason: &str| Parsed::Malformed {
        dir,
        reason: reason.to_string(),
    };
    let mut vlans = Vec::new();
    let mut pppoe = None;
    let (off, et) = if l2 {
        let Some(e) = get::<2>(b, 12) else {
            return bad("shorter than an Ethernet header");
        };
        let mut et = u16::from_be_bytes(e);
        let mut off = 14;
        while vlans.len() < 2 && (et == ETH_P_8021Q || et == ETH_P_8021AD) {
            let Some(t) = get::<4>(b, off) else {
                return bad("cut inside a VLAN tag");
            };
            vlans.push(u16::from_be_bytes([t[0], t[1]]) & 0x0fff);
            et = u16::from_be_bytes([t[2], t[3]]);
            off += 4;
        }
        // One PPPoE session header; nothing but IP is followed inside it.
        if et == ETH_P_PPP_SES {
            // The classifier loads all 8 bytes, even for a compressed protocol.
            let Some(h) = get::<PPPOE_SES_HLEN>(b, off) else {
                return bad("cut inside the PPPoE header");
            };
            if h[0] != PPPOE_VER_TYPE {
                return bad(&format!(
                    "PPPoE header with version/type 0x{:02x} (not 0x{PPPOE_VER_TYPE:02x})",
                    h[0]
                ));
            }
            if h[1] != PPPOE_CODE_SESSION {
                return bad(&format!(
                    "PPPoE session header with code 0x{:02x} (not 0x{PPPOE_CODE_SESSION:02x})",
                    h[1]
                ));
            }
            // Protocol-field compression (RFC 1661 §6.5): an odd first byte is
            // the whole protocol.
            let compressed = usize::from(h[6] & 1);
            let ppp = if compressed != 0 {
                u16::from(h[6])
            } else {
                u16::from_be_bytes([h[6], h[7]])
            };
            off += PPPOE_SES_HLEN - compressed;
            et = match ppp {
                PPP_IP => ETH_P_IP,
                PPP_IPV6 => ETH_P_IPV6,
                _ => {
                    return Parsed::NonIp {
                        dir,
                        ethertype: et,
                        ppp: Some(ppp),
                    }
                }
            };
            pppoe = Some(u16::from_be_bytes([h[2], h[3]]));
        }
        (off, et)
    } else {
        match b.first().map(|v| v >> 4) {
            Some(4) => (0, ETH_P_IP),
            Some(6) => (0, ETH_P_IPV6),
            _ => (0, 0),
        }
    };
    let r = match et {
        ETH_P_IP => parse_v4(b, off, dir),
        ETH_P_IPV6 => parse_v6(b, off, dir),
        _ => {
            return Parsed::NonIp {
                dir,
                ethertype: et,
                ppp: None,
            };
        }
    };
    match r {
        Ok(mut p) => {
            p.vlans = vlans;
            p.pppoe = pppoe;
            Parsed::Ip(p)
        }
        Err(reason) => bad(reason),
    }
}

/// Ports (and the pure-ACK test) at `l4`, as the classifier reads them.
fn l4_ports(b: &[u8], l4: usize, l4_len: u32, p: &mut Packet) -> Result<(), &'static str> {
    p.bare = Some(Bare::No);
    if !has_ports(p.proto) {
        return Ok(());
    }
    let Some(x) = get::<4>(b, l4) else {
        return Err("cut inside the ports");
    };
    p.sport = Some(u16::from_be_bytes([x[0], x[1]]));
    p.dport = Some(u16::from_be_bytes([x[2], x[3]]));
    if p.proto == 6 {
        if let Some(t) = get::<2>(b, l4 + 12) {
            let doff = u32::from(t[0] >> 4) * 4;
            let flags = t[1];
            p.bare = Some(Bare::of(flags, doff >= 20 && l4_len == doff));
            // A ClientHello to port 443 (upload), as the classifier hands it over:
            // the payload the IP header announces, not what trails the frame.
            let start = l4 + doff as usize;
            let end = (l4 + l4_len as usize).min(b.len());
            if p.dir == DIR_UP && p.dport == Some(443) && doff >= 20 && start < end {
                if let Ok(crate::sni::Sni::Found { name, .. }) =
                    crate::sni::client_hello_sni(&b[start..end])
                {
                    p.sni = Some(name);
                    p.sni_in_payload = true;
                }
            }
        }
    }
    // A QUIC client Initial to UDP 443 whose ClientHello fits in it.
    let (start, end) = (l4 + 8, (l4 + l4_len as usize).min(b.len()));
    if p.proto == 17 && p.dir == DIR_UP && p.dport == Some(443) && start < end {
        if let Ok(crate::sni::Sni::Found { name, .. }) =
            crate::quic::HelloAssembler::new().push_datagram(&b[start..end])
        {
            p.sni = Some(name);
            p.sni_in_payload = true;
        }
    }
    Ok(())
}

fn parse_v4(b: &[u8], off: usize, dir: u32) -> Result<Packet, &'static str> {
    let h = get::<20>(b, off).ok_or("cut inside the IPv4 header")?;
    if h[0] >> 4 != 4 {
        return Err("IP version is not 4");
    }
    let ihl = usize::from(h[0] & 0x0f) * 4;
    if ihl < 20 {
        return Err("IPv4 header length below 20");
    }
    let ff = u16::from_be_bytes([h[6], h[7]]);
    let frag = if ff & 0x1fff != 0 {
        Frag::Later
    } else if ff & 0x2000 != 0 {
        Frag::First
    } else {
        Frag::None
    };
    let l4_len = u32::from(u16::from_be_bytes([h[2], h[3]])).wrapping_sub(ihl as u32);
    let mut p = Packet {
        dir,
        proto: h[9],
        dscp: h[1] >> 2,
        src: IpAddr::V4(Ipv4Addr::new(h[12], h[13], h[14], h[15])),
        dst: IpAddr::V4(Ipv4Addr::new(h[16], h[17], h[18], h[19])),
        sport: None,
        dport: None,
        frag,
        frag_id: u32::from(u16::from_be_bytes([h[4], h[5]])),
        bare: Some(Bare::No),
        vlans: vec![],
        pppoe: None,
        v6_ext: vec![],
        sni: None,
        sni_in_payload: false,
    };
    if frag != Frag::Later {
        l4_ports(b, off + ihl, l4_len, &mut p)?;
    }
    Ok(p)
}

fn parse_v6(b: &[u8], off: usize, dir: u32) -> Result<Packet, &'static str> {
    let h = get::<40>(b, off).ok_or("cut inside the IPv6 header")?;
    if h[0] >> 4 != 6 {
        return Err("IP version is not 6");
    }
    let tclass = ((h[0] & 0x0f) << 4) | (h[1] >> 4);
    let mut a = [0u8; 16];
    a.copy_from_slice(&h[8..24]);
    let src = IpAddr::V6(a.into());
    a.copy_from_slice(&h[24..40]);
    let dst = IpAddr::V6(a.into());
    let mut l4 = off + 40;
    let mut nh = h[6];
    let mut frag = Frag::None;
    let mut frag_id = 0u32;
    let mut exts = Vec::new();
    let mut done = false;
    for _ in 0..MAX_V6_EXT {
        if l4 > MAX_HDR_OFF {
            return Err("IPv6 extension headers reach beyond the headers followed");
        }
        match nh {
            0 | 43 | 60 => {
                let e = get::<2>(b, l4).ok_or("cut inside an IPv6 extension header")?;
                exts.push(nh);
                nh = e[0];
                l4 += (usize::from(e[1]) + 1) * 8;
            }
            44 => {
                let e = get::<8>(b, l4).ok_or("cut inside the IPv6 fragment header")?;
                exts.push(nh);
                nh = e[0];
                l4 += 8;
                frag_id = u32::from_be_bytes([e[4], e[5], e[6], e[7]]);
                let fo = u16::from_be_bytes([e[2], e[3]]);
                if fo & 0xfff8 != 0 {
                    frag = Frag::Later;
                    done = true;
                    break;
                }
                if fo & 1 != 0 {
                    frag = Frag::First;
                }
            }
            51 => {
                let e = get::<2>(b, l4).ok_or("cut inside an IPv6 authentication header")?;
                exts.push(nh);
                nh = e[0];
                l4 += (usize::from(e[1]) + 2) * 4;
            }
            _ => {
                done = true;
                break;
            }
        }
    }
    if !done {
        return Err("more IPv6 extension headers than the classifier follows");
    }
    if l4 > MAX_HDR_OFF {
        return Err("IPv6 extension headers reach beyond the headers followed");
    }
    let l4_len = u32::from(u16::from_be_bytes([h[4], h[5]])).wrapping_sub((l4 - off - 40) as u32);
    let mut p = Packet {
        dir,
        proto: nh,
        dscp: tclass >> 2,
        src,
        dst,
        sport: None,
        dport: None,
        frag,
        frag_id,
        bare: Some(Bare::No),
        vlans: vec![],
        pppoe: None,
        v6_ext: exts,
        sni: None,
        sni_in_payload: false,
    };
    if frag != Frag::Later {
        l4_ports(b, l4, l4_len, &mut p)?;
    }
    Ok(p)
}

// ---------------------------------------------------------------------------
// Classic pcap files.

pub mod pcap {
    //! Classic pcap files through the `pcap-file` crate's slice parser. Its raw packets
    //! are used, not its checked ones: the checked reader refuses a packet whose wire
    //! length exceeds the file's snaplen, which every capture taken with `tcpdump -s N`
    //! has (here such packets are explained as captured, with a note).
    use pcap_file::{
        pcap::{PcapHeader, PcapParser, PcapWriter, RawPcapPacket},
        DataLink, PcapError, TsResolution,
    };

    /// LINKTYPE_ETHERNET.
    pub const LINKTYPE_ETHERNET: u32 = 1;
    /// LINKTYPE_RAW: bare IPv4/IPv6 packets.
    pub const LINKTYPE_RAW: u32 = 101;
    pub const LINKTYPE_IPV4: u32 = 228;
    pub const LINKTYPE_IPV6: u32 = 229;

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Record {
        pub ts_sec: u32,
        /// Microseconds, or nanoseconds in a nanosecond file.
        pub ts_frac: u32,
        /// Length of the packet on the wire; `data` may be shorter (snaplen).
        pub orig_len: u32,
        pub data: Vec<u8>,
    }

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Capture {
        pub linktype: u32,
        pub snaplen: u32,
        pub nanos: bool,
        pub records: Vec<Record>,
    }

    /// Reads a classic (libpcap) capture: either byte order, micro- or
    /// nanosecond timestamps. pcapng is recognised and refused.
    pub fn read(b: &[u8]) -> Result<Capture, String> {
        if b.starts_with(&[0x0a, 0x0d, 0x0d, 0x0a]) {
            return Err(
                "this is a pcapng file; write a classic pcap instead (`tcpdump -w`, `editcap -F pcap in.pcapng out.pcap`)"
                    .into(),
            );
        }
        let (mut rest, parser) = PcapParser::new(b).map_err(|e| match e {
            PcapError::IncompleteBuffer => format!(
                "not a pcap file: {} bytes, shorter than the 24-byte file header",
                b.len()
            ),
            _ => format!("not a pcap file (magic {:02x?})", &b[..4]),
        })?;
        let h = parser.header();
        // The top bits of the link-type word may carry FCS information.
        let linktype = u32::from(h.datalink) & 0x0fff_ffff;
        let mut records = Vec::new();
        while !rest.is_empty() {
            let n = records.len() + 1;
            if rest.len() >= 16 {
                // incl_len, in the file's byte order, before the parser trusts it.
                let w = [rest[8], rest[9], rest[10], rest[11]];
                let incl = match h.endianness {
                    pcap_file::Endianness::Big => u32::from_be_bytes(w),
                    pcap_file::Endianness::Little => u32::from_le_bytes(w),
                };
                if incl > 262_144 {
                    return Err(format!(
                        "record {n}: captured length {incl} is not plausible (corrupt file?)"
                    ));
                }
            }
            let (r, p): (&[u8], RawPcapPacket) =
                parser.next_raw_packet(rest).map_err(|e| match e {
                    PcapError::IncompleteBuffer if rest.len() < 16 => {
                        format!("record {n}: the file ends inside its header (truncated capture?)")
                    }
                    PcapError::IncompleteBuffer => {
                        format!("record {n}: the file ends inside its data (truncated capture?)")
                    }
                    e => format!("record {n}: {e}"),
                })?;
            records.push(Record {
                ts_sec: p.ts_sec,
                ts_frac: p.ts_frac,
                orig_len: p.orig_len,
                data: p.data.into_owned(),
            });
            rest = r;
        }
        Ok(Capture {
            linktype,
            snaplen: h.snaplen,
            nanos: h.ts_resolution == TsResolution::NanoSecond,
            records,
        })
    }

    /// Writes a classic little-endian microsecond pcap (timestamps 1 ms apart).
    pub fn write(linktype: u32, frames: &[Vec<u8>]) -> Vec<u8> {
        let header = PcapHeader {
            snaplen: 262_144,
            datalink: DataLink::from(linktype),
            endianness: pcap_file::Endianness::Little,
            ..PcapHeader::default()
        };
        let mut w = PcapWriter::with_header(Vec::new(), header).expect("writing to memory");
        for (i, f) in frames.iter().enumerate() {
            let ms = i as u32;
            let len = f.len() as u32;
            w.write_raw_packet(&RawPcapPacket {
                ts_sec: ms / 1000,
                ts_frac: (ms % 1000) * 1000,
                incl_len: len,
                orig_len: len,
                data: f.as_slice().into(),
            })
            .expect("writing to memory");
        }
        w.into_writer()
    }
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
    dir: u32,
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
        let by_sni = h.sni.as_ref().filter(|n| {
            rule.dns_names
                .iter()
                .any(|p| crate::dnswire::name_matches(p, n))
        });
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
    let dir_ok = match rule.direction {
        Direction::Both => None,
        Direction::Upload => Some(v.dir == DIR_UP),
        Direction::Download => Some(v.dir == DIR_DOWN),
    };
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
            match rule.direction {
                Direction::Both => "both",
                Direction::Upload => "upload",
                Direction::Download => "download",
            }
        ),
    });
    let field = |name: &'static str, constrained: bool, ok: bool, detail: String| Check {
        field: name,
        ok: constrained.then_some(ok),
        detail,
    };
    let inn = |ok: bool| if ok { "in" } else { "not in" };
    let ok = rule.protocols.is_empty() || rule.protocols.contains(&v.proto);
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
    let ok = rule.dscp.is_empty() || rule.dscp.contains(&v.dscp);
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
    let in_ports = |r: &[(u16, u16)], p: Option<u16>| {
        r.is_empty() || p.is_some_and(|p| r.iter().any(|&(lo, hi)| lo <= p && p <= hi))
    };
    for (name, label, r, p) in [
        ("lan_port", "LAN port", &rule.src_ports, v.sport),
        ("wan_port", "WAN port", &rule.dst_ports, v.dport),
    ] {
        let ok = in_ports(r, p);
        out.push(field(
            name,
            !r.is_empty(),
            ok,
            format!("{label} {} {} {}", port_text(p), inn(ok), ranges_text(r)),
        ));
    }
    let in_cidrs = |c: &[Cidr], a: IpAddr| {
        c.is_empty()
            || c.iter()
                .any(|c| c.addr.is_ipv6() == a.is_ipv6() && config::mask_addr(a, c.len) == c.addr)
    };
    for (name, label, c, a) in [
        ("lan_address", "LAN address", &rule.src_cidrs, v.src),
        ("wan_address", "WAN address", &rule.dst_cidrs, v.dst),
    ] {
        let ok = in_cidrs(c, a);
        out.push(field(
            name,
            !c.is_empty(),
            ok,
            format!("{label} {a} {} {}", inn(ok), list(c, |c| c.to_string())),
        ));
    }
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
        if let (Some(w), Parsed::Ip(p)) = (pol.download_window_clamp, input) {
            if p.proto == 6 && p.frag != Frag::Later {
                notes.push(if dir == DIR_UP {
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
            interface: if dir == DIR_UP {
                pol.wan.clone()
            } else {
                pol.lan.clone()
            },
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
mod tests {
    use super::*;
    use std::path::Path;

    const POLICY: &str = r#"
[interfaces]
wan = "wan0"
lan = "lan0"
[upload]
rate = "10mbit"
[download]
rate = "40mbit"
[shaping]
ack_class = "interactive"
[[class]]
name = "video"
priority = 0
guaranteed = "20%"
[[class]]
name = "images"
priority = 2
guaranteed = "30%"
[[class]]
name = "default"
priority = 4
guaranteed = "10%"
default = true
[[class]]
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
"#;

    fn policy() -> Policy {
        config::parse(Path::new("explain.toml"), POLICY).expect("policy")
    }

    #[test]
    fn host_names_learned_by_dns_or_given_by_sni_decide_and_say_so() {
        let text = format!(
            "{POLICY}[[rule]]\nname = \"wb\"\nclass = \"video\"\npriority = 1\nprotocol = \"udp\"\n\
             dns_names = [\"*.sfu.whereby.com\"]\n[[rule]]\nname = \"pacs\"\nclass = \"images\"\n\
             priority = 2\ndns_names = [\"pacs.example.nhs.uk\"]\n"
        );
        let pol = config::parse(Path::new("explain.toml"), &text).expect("policy");
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

    // Minimal frame building (the layout of tests/src/packet.rs).
    fn eth(vlans: &[u16], ethertype: u16, l3: &[u8]) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];
        for (i, v) in vlans.iter().enumerate() {
            let tpid: u16 = if i == 0 && vlans.len() > 1 {
                0x88a8
            } else {
                0x8100
            };
            f.extend(tpid.to_be_bytes());
            f.extend(v.to_be_bytes());
        }
        f.extend(ethertype.to_be_bytes());
        f.extend(l3);
        f
    }

    /// A PPPoE session header (session id, PPP protocol bytes: two, or one
    /// when compressed) before `l3`, for `eth(.., 0x8864, ..)`.
    fn pppoe(session: u16, ppp: &[u8], l3: &[u8]) -> Vec<u8> {
        let mut b = vec![0x11, 0x00];
        b.extend(session.to_be_bytes());
        b.extend(((ppp.len() + l3.len()) as u16).to_be_bytes());
        b.extend(ppp);
        b.extend(l3);
        b
    }

    fn tcp(sport: u16, dport: u16, flags: u8, payload: usize) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(sport.to_be_bytes());
        b.extend(dport.to_be_bytes());
        b.extend([0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
        b.extend(std::iter::repeat_n(0xab, payload));
        b
    }

    fn udp(sport: u16, dport: u16, payload: usize) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(sport.to_be_bytes());
        b.extend(dport.to_be_bytes());
        b.extend(((8 + payload) as u16).to_be_bytes());
        b.extend([0, 0]);
        b.extend(std::iter::repeat_n(0xab, payload));
        b
    }

    fn v4(src: [u8; 4], dst: [u8; 4], proto: u8, dscp: u8, frag: u16, l4: &[u8]) -> Vec<u8> {
        let mut h = vec![0x45, dscp << 2];
        h.extend(((20 + l4.len()) as u16).to_be_bytes());
        h.extend(0x1234u16.to_be_bytes());
        h.extend(frag.to_be_bytes());
        h.extend([64, proto, 0, 0]);
        h.extend(src);
        h.extend(dst);
        h.extend(l4);
        h
    }

    /// IPv6 with extension headers `(type, bytes)` before `proto`.
    fn v6(src: &str, dst: &str, ext: &[(u8, usize)], proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        for (i, &(t, len)) in ext.iter().enumerate() {
            let mut e = vec![0u8; len];
            e[0] = ext.get(i + 1).map_or(proto, |x| x.0);
            e[1] = if t == 51 {
                (len / 4 - 2) as u8
            } else {
                (len / 8 - 1) as u8
            };
            body.extend(e);
        }
        body.extend(l4);
        let s: Ipv6Addr = src.parse().expect("v6");
        let d: Ipv6Addr = dst.parse().expect("v6");
        let mut h = vec![0x60, 0, 0, 0];
        h.extend((body.len() as u16).to_be_bytes());
        h.extend([ext.first().map_or(proto, |x| x.0), 64]);
        h.extend(s.octets());
        h.extend(d.octets());
        h.extend(body);
        h
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
        let pol = config::parse(Path::new("explain.toml"), &text).expect("policy");
        assert!(pol.download_window_clamp.is_some(), "{text}");
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
        let p = parse_description("up udp 192.168.1.5:50020 -> 52.113.1.1:3478 dscp=EF")
            .expect("parses");
        assert_eq!(p.dir, DIR_UP);
        assert_eq!(p.proto, 17);
        assert_eq!(p.dscp, 46);
        assert_eq!(p.src, "192.168.1.5".parse::<IpAddr>().expect("a"));
        assert_eq!((p.sport, p.dport), (Some(50020), Some(3478)));
        assert_eq!(p.bare, Some(Bare::No));

        let p =
            parse_description("down tcp 203.0.113.5:104 -> 192.168.1.20:40000").expect("parses");
        assert_eq!(p.dir, DIR_DOWN);
        assert_eq!(p.bare, None, "TCP without flags: unknown");
        let v = p.view();
        assert_eq!(v.src, "192.168.1.20".parse::<IpAddr>().expect("a"));
        assert_eq!((v.sport, v.dport), (Some(40000), Some(104)));

        let p = parse_description("up 6 [fd00::20]:40000->[2001:db8::5]:104 dscp=34 flags=A")
            .expect("v6 with ports, arrow without spaces");
        assert!(p.src.is_ipv6());
        assert_eq!((p.proto, p.dscp, p.bare), (6, 34, Some(Bare::Ack)));
        let p = parse_description("up tcp 10.0.0.1:1 -> 10.0.0.2:2 flags=A payload=10")
            .expect("parses");
        assert_eq!(p.bare, Some(Bare::No), "payload: carries data");
        let p = parse_description("up tcp 10.0.0.1:1 -> 10.0.0.2:2 flags=SA").expect("parses");
        assert_eq!(p.bare, Some(Bare::Control), "SYN-ACK without data");
        let p = parse_description("up tcp 10.0.0.1:1 -> 10.0.0.2:2 flags=FA payload=3")
            .expect("parses");
        assert_eq!(p.bare, Some(Bare::No), "FIN with data");
        let p = parse_description("upload icmpv6 fd00::1 -> 2001:db8::1 dscp=af41")
            .expect("bare v6 without port");
        assert_eq!((p.proto, p.dscp, p.sport), (58, 34, None));
        let p =
            parse_description("up udp 10.0.0.1:5 -> 10.0.0.2:6 frag=later id=7").expect("parses");
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
        assert!(render(&e)
            .contains("default (later fragment: follows its first fragment in the kernel)"));
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
        let up = DIR_UP;
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
        let up = DIR_UP;
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
        let Parsed::Ip(p) = parse_frame(&f, true, DIR_DOWN) else {
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
        let e = ex.explain(&parse_frame(&f, true, DIR_UP));
        assert_eq!(e.rule.as_ref().map(|r| r.name.as_str()), Some("dicom"));
        assert_eq!(e.class, "images");
        assert!(e.parsed.ends_with(" vlan=10 pppoe=0x1234"), "{}", e.parsed);
        let lcp = eth(
            &[],
            0x8864,
            &pppoe(0x1234, &[0xc0, 0x21], &[9, 1, 0, 8, 0, 0, 0, 1]),
        );
        let e = ex.explain(&parse_frame(&lcp, true, DIR_UP));
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
        let e = ex.explain(&parse_frame(&bad, true, DIR_UP));
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
}
