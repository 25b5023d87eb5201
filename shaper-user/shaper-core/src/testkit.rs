//! Builders shared by the unit tests of [`compile`](crate::compile),
//! [`explain`](crate::explain) and [`hosts`](crate::hosts):
//! - policies: the test links and classes as TOML ([`links_toml!`], [`classes_toml!`],
//!   for `concat!`), [`parse_policy`], and [`policy`] (links, classes, then rules);
//! - frames: [`eth`] (VLAN tags), [`pppoe`], [`v4`], [`v6`] (extension headers),
//!   [`tcp`], [`udp`]: the bare bytes a parser reads (no checksums);
//! - [`dns`]: queries and answers.
//!
//! The lab's packet generator (`tests/src/packet.rs` and `tests/src/packet/dns.rs`) is
//! the model: the frames have its layout and MAC addresses ([`SRC_MAC`], [`DST_MAC`]), and
//! [`dns`] has its names. The core cannot use it: the lab depends on the core.

use std::net::Ipv6Addr;
use std::path::Path;

use crate::config::{self, Policy};

// ---------------------------------------------------------------------------
// Policies

/// The links every test policy shapes, as TOML (starting with a blank line): `wan0` and
/// `lan0`, 10 Mbit/s up, 40 Mbit/s down. A macro so that `concat!` can build constant
/// policies from it.
macro_rules! links_toml {
    () => {
        r#"
[interfaces]
wan = "wan0"
lan = "lan0"
[upload]
rate = "10mbit"
[download]
rate = "40mbit"
"#
    };
}
pub(crate) use links_toml;

/// Three classes as TOML: `video` (priority 0, 20 %), `images` (2, 30 %) and the default
/// class `default` (4, 10 %).
macro_rules! classes_toml {
    () => {
        r#"[[class]]
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
"#
    };
}
pub(crate) use classes_toml;

/// `text` parsed as the config file `file`; it must be valid.
pub fn parse_policy(file: &str, text: &str) -> Policy {
    config::parse(Path::new(file), text).expect("valid policy")
}

/// A policy (`t.toml`) on the test links ([`links_toml!`]) with the three classes of
/// [`classes_toml!`], then `rules` (TOML: `[[rule]]` tables, or any other).
pub fn policy(rules: &str) -> Policy {
    let base = concat!(links_toml!(), classes_toml!());
    parse_policy("t.toml", &format!("{base}{rules}\n"))
}

// ---------------------------------------------------------------------------
// Frames

/// The source and destination MAC addresses of [`eth`]'s frames (the lab's).
pub const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
pub const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

/// An Ethernet frame from [`SRC_MAC`] to [`DST_MAC`]: `vlans` tags (the outer one 802.1ad
/// when there are two or more, the others 802.1Q), `ethertype`, then `l3`.
pub fn eth(vlans: &[u16], ethertype: u16, l3: &[u8]) -> Vec<u8> {
    let mut f = DST_MAC.to_vec();
    f.extend(SRC_MAC);
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
pub fn pppoe(session: u16, ppp: &[u8], l3: &[u8]) -> Vec<u8> {
    let mut b = vec![0x11, 0x00];
    b.extend(session.to_be_bytes());
    b.extend(((ppp.len() + l3.len()) as u16).to_be_bytes());
    b.extend(ppp);
    b.extend(l3);
    b
}

/// A TCP header (sequence number 1, no options, window 0xffff, checksum 0) with `flags`,
/// then `payload` bytes of 0xab.
pub fn tcp(sport: u16, dport: u16, flags: u8, payload: usize) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend(sport.to_be_bytes());
    b.extend(dport.to_be_bytes());
    b.extend([0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    b.extend(std::iter::repeat_n(0xab, payload));
    b
}

/// A UDP header (checksum 0), then `payload` bytes of 0xab.
pub fn udp(sport: u16, dport: u16, payload: usize) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend(sport.to_be_bytes());
    b.extend(dport.to_be_bytes());
    b.extend(((8 + payload) as u16).to_be_bytes());
    b.extend([0, 0]);
    b.extend(std::iter::repeat_n(0xab, payload));
    b
}

/// An IPv4 header (no options, id 0x1234, TTL 64, checksum 0) with `dscp` and the flags
/// and fragment offset field `frag`, then `l4`.
pub fn v4(src: [u8; 4], dst: [u8; 4], proto: u8, dscp: u8, frag: u16, l4: &[u8]) -> Vec<u8> {
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
pub fn v6(src: &str, dst: &str, ext: &[(u8, usize)], proto: u8, l4: &[u8]) -> Vec<u8> {
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

// ---------------------------------------------------------------------------
// DNS

/// DNS messages (RFC 1035), named as the lab's `packet::dns`.
pub mod dns {
    pub const TYPE_A: u16 = 1;
    pub const TYPE_CNAME: u16 = 5;

    /// A name in wire form (uncompressed; a trailing dot is ignored).
    pub fn encode_name(name: &str) -> Vec<u8> {
        let mut v = Vec::new();
        for l in name.trim_end_matches('.').split('.') {
            v.push(l.len() as u8);
            v.extend_from_slice(l.as_bytes());
        }
        v.push(0);
        v
    }

    /// A query for `name` (`qtype`, class IN) with message id `id`, recursion desired.
    pub fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
        let mut m = id.to_be_bytes().to_vec();
        m.extend([0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        m.extend(encode_name(name));
        m.extend(qtype.to_be_bytes());
        m.extend([0, 1]);
        m
    }

    /// An answer with id `id` to the A question for `name`: `name` CNAME `cname`, then
    /// `cname` A `addr`, both with `ttl`. Unlike the lab's `answer_through`, every owner
    /// name is written out in full (no compression pointers).
    pub fn answer_through_uncompressed(
        id: u16,
        name: &str,
        cname: &str,
        addr: [u8; 4],
        ttl: u32,
    ) -> Vec<u8> {
        let mut m = id.to_be_bytes().to_vec();
        m.extend([0x81, 0x80, 0, 1, 0, 2, 0, 0, 0, 0]);
        m.extend(encode_name(name));
        m.extend(TYPE_A.to_be_bytes());
        m.extend([0, 1]);
        m.extend(encode_name(name));
        m.extend(TYPE_CNAME.to_be_bytes());
        m.extend([0, 1]);
        m.extend(ttl.to_be_bytes());
        let target = encode_name(cname);
        m.extend((target.len() as u16).to_be_bytes());
        m.extend(&target);
        m.extend(target);
        m.extend(TYPE_A.to_be_bytes());
        m.extend([0, 1]);
        m.extend(ttl.to_be_bytes());
        m.extend([0, 4]);
        m.extend(addr);
        m
    }
}
