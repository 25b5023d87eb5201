//! The lab's one packet generator (as Cilium's `pktgen.h` is its BPF tests'), and a raw
//! link to send what it builds:
//! - [`Pkt`]: Ethernet frames for the classifier: IPv4 (options, fragments), IPv6
//!   (extension headers, fragments), TCP/UDP/ICMP, VLAN tags, PPPoE session headers, with
//!   valid IPv4 header checksums; [`Pkt::with_payload`] puts given bytes after the L4
//!   header.
//! - [`dns`]: DNS queries and answers (A/AAAA, through a CNAME).
//! - [`tls`]: TLS ClientHellos and QUIC-shaped client Initials.
//! - [`RawLink`]: an AF_PACKET socket that sends whole frames out of a namespace's link.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub mod dns;
pub mod tls;

/// The source and destination MAC addresses of [`Pkt::build`]'s frames.
pub const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
pub const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

/// An untagged Ethernet header from [`SRC_MAC`] to [`DST_MAC`] with `ethertype`: how
/// [`Pkt::build`]'s frames start.
pub fn ethernet(ethertype: u16) -> Vec<u8> {
    let mut f = DST_MAC.to_vec();
    f.extend(SRC_MAC);
    f.extend(ethertype.to_be_bytes());
    f
}

#[derive(Debug, Clone)]
pub struct Pkt {
    pub vlans: Vec<u16>,
    /// PPPoE session id: the IP packet goes in a PPPoE session header (after
    /// any VLAN tags), with the two-byte PPP protocol.
    pub pppoe: Option<u16>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub dscp: u8,
    /// IPv4 option bytes (padded to 4) — ignored for IPv6.
    pub v4_options: Vec<u8>,
    /// IPv6 extension headers to put before L4: (type, total length in bytes, a multiple of 8).
    pub v6_ext: Vec<(u8, usize)>,
    /// Fragment: (id, offset in 8-byte units, more fragments).
    pub frag: Option<(u32, u16, bool)>,
    pub payload: usize,
}

impl Pkt {
    pub fn new(src: &str, dst: &str, proto: u8, sport: u16, dport: u16) -> Pkt {
        Pkt {
            vlans: vec![],
            pppoe: None,
            src: src.parse().expect("src address"),
            dst: dst.parse().expect("dst address"),
            proto,
            sport,
            dport,
            dscp: 0,
            v4_options: vec![],
            v6_ext: vec![],
            frag: None,
            payload: 64,
        }
    }
    pub fn udp(src: &str, dst: &str, sport: u16, dport: u16) -> Pkt {
        Pkt::new(src, dst, 17, sport, dport)
    }
    pub fn tcp(src: &str, dst: &str, sport: u16, dport: u16) -> Pkt {
        Pkt::new(src, dst, 6, sport, dport)
    }

    fn l4(&self) -> Vec<u8> {
        let mut b = Vec::new();
        let later_fragment = self.frag.is_some_and(|(_, off, _)| off != 0);
        if !later_fragment {
            match self.proto {
                6 => {
                    b.extend(self.sport.to_be_bytes());
                    b.extend(self.dport.to_be_bytes());
                    b.extend([0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0]);
                }
                17 => {
                    b.extend(self.sport.to_be_bytes());
                    b.extend(self.dport.to_be_bytes());
                    b.extend(((8 + self.payload) as u16).to_be_bytes());
                    b.extend([0, 0]);
                }
                1 | 58 => b.extend([8, 0, 0, 0, 0, 1, 0, 1]),
                _ => {}
            }
        }
        b.extend(std::iter::repeat_n(0xabu8, self.payload));
        b
    }

    pub fn build(&self) -> Vec<u8> {
        let mut f = DST_MAC.to_vec();
        f.extend(SRC_MAC);
        for (i, v) in self.vlans.iter().enumerate() {
            let tpid: u16 = if i == 0 && self.vlans.len() > 1 {
                0x88a8
            } else {
                0x8100
            };
            f.extend(tpid.to_be_bytes());
            f.extend(v.to_be_bytes());
        }
        // Ethertype and PPP protocol written out here, not taken from
        // shaper_common, so a wrong constant there does not go unnoticed.
        let (ethertype, ppp, ip): (u16, u16, _) = match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => (0x0800, 0x0021, self.v4(s, d)),
            (IpAddr::V6(s), IpAddr::V6(d)) => (0x86dd, 0x0057, self.v6(s, d)),
            _ => panic!("mixed address families"),
        };
        match self.pppoe {
            Some(session) => {
                // RFC 2516 §4: VER 1, TYPE 1, CODE 0 (session data); LENGTH
                // counts the PPP protocol and the packet.
                f.extend(0x8864u16.to_be_bytes());
                f.extend([0x11, 0x00]);
                f.extend(session.to_be_bytes());
                f.extend(((ip.len() + 2) as u16).to_be_bytes());
                f.extend(ppp.to_be_bytes());
            }
            None => f.extend(ethertype.to_be_bytes()),
        }
        f.extend(ip);
        f
    }

    /// `build()` with `payload` as its L4 payload (lengths set to fit; the builder's
    /// payload is the frame's tail).
    pub fn with_payload(&self, payload: &[u8]) -> Vec<u8> {
        let mut p = self.clone();
        p.payload = payload.len();
        let mut f = p.build();
        let at = f.len() - payload.len();
        f[at..].copy_from_slice(payload);
        f
    }

    /// Offset of the IP header in `build()`'s frame.
    pub fn l3_offset(&self) -> usize {
        14 + 4 * self.vlans.len() + if self.pppoe.is_some() { 8 } else { 0 }
    }

    /// `build()` with PPP protocol-field compression (RFC 1661 §6.5): the
    /// protocol's leading zero byte left out, so the IP header starts one
    /// byte earlier. Needs `pppoe`.
    pub fn build_compressed_ppp(&self) -> Vec<u8> {
        assert!(self.pppoe.is_some(), "protocol compression needs pppoe");
        let mut f = self.build();
        let at = self.l3_offset() - 2;
        assert_eq!(f[at], 0, "a protocol below 0x100");
        f.remove(at);
        let len = u16::from_be_bytes([f[at - 2], f[at - 1]]) - 1;
        f[at - 2..at].copy_from_slice(&len.to_be_bytes());
        f
    }

    fn v4(&self, s: Ipv4Addr, d: Ipv4Addr) -> Vec<u8> {
        let mut opts = self.v4_options.clone();
        while !opts.len().is_multiple_of(4) {
            opts.push(0);
        }
        let ihl = 5 + opts.len() / 4;
        let l4 = self.l4();
        let total = ihl * 4 + l4.len();
        let (id, frag_field) = match self.frag {
            Some((id, off, more)) => (id as u16, (off & 0x1fff) | if more { 0x2000 } else { 0 }),
            None => (0x1234, 0x4000),
        };
        let mut h = vec![(4 << 4) | ihl as u8, self.dscp << 2];
        h.extend((total as u16).to_be_bytes());
        h.extend(id.to_be_bytes());
        h.extend(frag_field.to_be_bytes());
        h.extend([64, self.proto, 0, 0]);
        h.extend(s.octets());
        h.extend(d.octets());
        h.extend(opts);
        let c = checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h.extend(l4);
        h
    }

    fn v6(&self, s: Ipv6Addr, d: Ipv6Addr) -> Vec<u8> {
        // Chain: ext headers..., [fragment], L4.
        let mut chain: Vec<(u8, Vec<u8>)> = Vec::new();
        for &(t, len) in &self.v6_ext {
            assert!(len >= 8 && len % 8 == 0);
            let mut e = vec![0u8; len];
            e[1] = if t == 51 {
                (len / 4 - 2) as u8
            } else {
                (len / 8 - 1) as u8
            };
            chain.push((t, e));
        }
        if let Some((id, off, more)) = self.frag {
            let mut e = vec![0u8; 8];
            let fo = (off << 3) | u16::from(more);
            e[2..4].copy_from_slice(&fo.to_be_bytes());
            e[4..8].copy_from_slice(&id.to_be_bytes());
            chain.push((44, e));
        }
        let mut body = Vec::new();
        for i in 0..chain.len() {
            let next = chain.get(i + 1).map_or(self.proto, |c| c.0);
            let mut e = chain[i].1.clone();
            e[0] = next;
            body.extend(e);
        }
        body.extend(self.l4());
        let first = chain.first().map_or(self.proto, |c| c.0);
        let tc = self.dscp << 2;
        let mut h = vec![0x60 | (tc >> 4), (tc & 0x0f) << 4, 0, 0];
        h.extend((body.len() as u16).to_be_bytes());
        h.extend([first, 64]);
        h.extend(s.octets());
        h.extend(d.octets());
        h.extend(body);
        h
    }
}

/// The Internet checksum of a header (with its checksum field zero): the product's own
/// (the classifier updates IPv4 checksums incrementally in its own code, apart from this
/// full computation, so the two check each other).
pub use shaper_user::autorate::checksum;

/// `p` carrying `payload` (its L4 payload, lengths set to fit) in a frame from `src_mac`
/// to `dst_mac`: what a host on the link would send.
pub fn frame_with(p: &Pkt, src_mac: [u8; 6], dst_mac: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = p.with_payload(payload);
    f[..6].copy_from_slice(&dst_mac);
    f[6..12].copy_from_slice(&src_mac);
    f
}

/// The MAC address of `dev` in `ns`.
pub fn mac_of(ns: &crate::Netns, dev: &str) -> anyhow::Result<[u8; 6]> {
    let out = ns.ip(&["-j", "link", "show", "dev", dev])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let s = v[0]["address"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no address for {dev} in {out}"))?;
    let mut mac = [0u8; 6];
    for (i, part) in s.split(':').enumerate().take(6) {
        mac[i] = u8::from_str_radix(part, 16)?;
    }
    Ok(mac)
}

/// A raw (AF_PACKET) socket on one interface of a namespace: frames sent through it
/// leave the interface as they are, addresses forged at will.
pub struct RawLink {
    fd: std::os::fd::OwnedFd,
    ifindex: i32,
    /// The interface's own MAC address.
    pub mac: [u8; 6],
}

impl RawLink {
    pub fn open(ns: &crate::Netns, dev: &str) -> anyhow::Result<RawLink> {
        use std::os::fd::FromRawFd as _;
        let mac = mac_of(ns, dev)?;
        let name = std::ffi::CString::new(dev)?;
        let (fd, ifindex) = ns.within(move || {
            // SAFETY: plain socket(2); the fd is owned below.
            let fd =
                unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            // SAFETY: fd is a fresh socket nobody else owns.
            let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
            // SAFETY: a NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
            anyhow::ensure!(ifindex != 0, "no interface {name:?}");
            Ok((fd, ifindex))
        })?;
        Ok(RawLink { fd, ifindex, mac })
    }

    /// Sends one whole frame (Ethernet header included).
    pub fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        use std::os::fd::AsRawFd as _;
        // SAFETY: sockaddr_ll is plain old data; zeroed is a valid start.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_ifindex = self.ifindex;
        sa.sll_halen = 6;
        sa.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: the buffer and address are valid for the call.
        let r = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sa as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// A classic little-endian pcap (microsecond timestamps, Ethernet) of `(unix_ns, frame)`s.
pub fn pcap(frames: &[(u64, Vec<u8>)]) -> Vec<u8> {
    let mut b = Vec::new();
    for v in [0xa1b2_c3d4u32, 0x0004_0002, 0, 0, 262_144, 1] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    for (ns, f) in frames {
        let (sec, usec) = (
            (ns / 1_000_000_000) as u32,
            (ns % 1_000_000_000 / 1000) as u32,
        );
        for v in [sec, usec, f.len() as u32, f.len() as u32] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(f);
    }
    b
}
