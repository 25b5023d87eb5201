//! Frames, parsed as shaper-ebpf's `parse` does: Ethernet with up to two VLAN tags and
//! a PPPoE session header, IPv4 with options and fragments, IPv6 with up to eight
//! extension-header steps, the ports of TCP/UDP/SCTP/UDP-Lite.

use super::*;

// ---------------------------------------------------------------------------
// Frames, parsed as shaper-ebpf's `parse` does.

pub(crate) fn get<const N: usize>(b: &[u8], off: usize) -> Option<[u8; N]> {
    b.get(off..off.checked_add(N)?)?.try_into().ok()
}

/// Parses one frame leaving the interface of direction `dir`. `l2`: the
/// frame starts with an Ethernet header (else it is a bare IP packet, as on
/// PPP/tun devices, and the version nibble names the protocol).
pub fn parse_frame(b: &[u8], l2: bool, dir: Dir) -> Parsed {
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
pub(crate) fn l4_ports(
    b: &[u8],
    l4: usize,
    l4_len: u32,
    p: &mut Packet,
) -> Result<(), &'static str> {
    p.bare = Some(Bare::No);
    p.l4 = Some((l4, (l4 + l4_len as usize).min(b.len()).max(l4)));
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
            if p.dir == Dir::Up && p.dport == Some(443) && doff >= 20 && start < end {
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
    if p.proto == 17 && p.dir == Dir::Up && p.dport == Some(443) && start < end {
        if let Ok(crate::sni::Sni::Found { name, .. }) =
            crate::quic::HelloAssembler::new().push_datagram(&b[start..end])
        {
            p.sni = Some(name);
            p.sni_in_payload = true;
        }
    }
    Ok(())
}

pub(crate) fn parse_v4(b: &[u8], off: usize, dir: Dir) -> Result<Packet, &'static str> {
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
        l4: None,
    };
    if frag != Frag::Later {
        l4_ports(b, off + ihl, l4_len, &mut p)?;
    }
    Ok(p)
}

pub(crate) fn parse_v6(b: &[u8], off: usize, dir: Dir) -> Result<Packet, &'static str> {
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
        l4: None,
    };
    if frag != Frag::Later {
        l4_ports(b, l4, l4_len, &mut p)?;
    }
    Ok(p)
}
