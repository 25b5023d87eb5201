//! Packet parsing: Ethernet with up to two VLAN tags and a PPPoE session
//! header (or an L3 device's bare IP), IPv4, IPv6 and its extension headers
//! (walked in a `bpf_loop`), fragments, and the ports and TCP flags, into the
//! per-CPU `Pkt` the rest of the program works from.

use aya_ebpf::{helpers::generated::bpf_loop, programs::TcContext};
use shaper_common::*;

pub(crate) const IPPROTO_TCP: u8 = 6;
pub(crate) const IPPROTO_UDP: u8 = 17;
const IPPROTO_SCTP: u8 = 132;
const IPPROTO_UDPLITE: u8 = 136;
/// IPv6 extension headers walked before giving up (then: default class).
const MAX_V6_EXT: usize = 8;

/// What the parser extracted. Addresses are 16 bytes; IPv4 uses the first 4.
/// It lives in a per-CPU scratch map, not on the stack: values read back from
/// a map are opaque to the verifier, so the many parse paths (VLANs, IPv6
/// extension headers, fragments) converge into one state for the rest of the
/// program instead of multiplying its verification cost.
#[repr(C)]
pub(crate) struct Pkt {
    pub(crate) src: [u8; 16],
    pub(crate) dst: [u8; 16],
    /// `NO_PORT` when the packet carries no ports.
    pub(crate) sport: u32,
    pub(crate) dport: u32,
    /// IPv4 identification / IPv6 fragment id, for fragment tracking.
    pub(crate) frag_id: u32,
    /// Offset of the IP header, after any VLAN tags and PPPoE header (for
    /// DSCP re-marking).
    pub(crate) l3: u32,
    pub(crate) v6: u8,
    pub(crate) proto: u8,
    pub(crate) dscp: u8,
    /// FRAG_NONE, FRAG_FIRST or FRAG_LATER.
    pub(crate) frag: u8,
    /// A TCP segment that carries no data: BARE_ACK (ACK set, no SYN/FIN/RST),
    /// BARE_CONTROL (a SYN, SYN-ACK, FIN or RST) or BARE_NONE.
    pub(crate) bare: u8,
    _pad: [u8; 3],
    /// Bytes of L4 header + payload the IP header announces.
    pub(crate) l4_len: u32,
    /// Offset and length (as announced) of the L4 payload (TCP, UDP).
    pub(crate) payload_off: u32,
    pub(crate) payload_len: u32,
    /// Offset of the L4 header (when it has ports).
    pub(crate) l4: u32,
    _pad2: u32,
    /// The clock the flow's behaviour read for this packet (0: none read): the media
    /// measurement takes it rather than reading the clock again. Set by `classify`.
    pub(crate) now: u64,
}

pub(crate) const FRAG_NONE: u8 = 0;
pub(crate) const FRAG_FIRST: u8 = 1;
pub(crate) const FRAG_LATER: u8 = 2;

pub(crate) const BARE_NONE: u8 = 0;
pub(crate) const BARE_ACK: u8 = 1;
pub(crate) const BARE_CONTROL: u8 = 2;

/// Parse outcomes.
pub(crate) const PARSED_IP: u32 = 0;
pub(crate) const PARSED_NON_IP: u32 = 1;
pub(crate) const PARSED_MALFORMED: u32 = 2;

#[inline(always)]
pub(crate) fn load<T>(ctx: &TcContext, off: usize) -> Option<T> {
    ctx.load::<T>(off).ok()
}

#[inline(always)]
pub(crate) fn parse(ctx: &TcContext, l2: bool, pkt: &mut Pkt) -> u32 {
    let mut off = 0usize;
    let mut proto: u16;
    if l2 {
        let Some(et) = load::<u16>(ctx, 12) else {
            return PARSED_MALFORMED;
        };
        proto = u16::from_be(et);
        off = 14;
        // Up to two in-packet VLAN tags (802.1Q, QinQ).
        let mut tags = 0;
        while tags < 2 && (proto == ETH_P_8021Q || proto == ETH_P_8021AD) {
            let Some(et) = load::<u16>(ctx, off + 2) else {
                return PARSED_MALFORMED;
            };
            proto = u16::from_be(et);
            off += 4;
            tags += 1;
        }
        // One PPPoE session header (RFC 2516): VER/TYPE, CODE, SESSION_ID,
        // LENGTH, then the PPP protocol. Nothing is followed inside it but IP.
        if proto == ETH_P_PPP_SES {
            let Some(h) = load::<[u8; PPPOE_SES_HLEN]>(ctx, off) else {
                return PARSED_MALFORMED;
            };
            if h[0] != PPPOE_VER_TYPE || h[1] != PPPOE_CODE_SESSION {
                return PARSED_MALFORMED;
            }
            // Protocol-field compression (RFC 1661 §6.5): an odd first byte
            // is the whole (one-byte) protocol, and the payload starts a
            // byte earlier.
            let compressed = (h[6] & 1) as usize;
            let ppp = if compressed != 0 {
                h[6] as u16
            } else {
                u16::from_be_bytes([h[6], h[7]])
            };
            off += PPPOE_SES_HLEN - compressed;
            proto = match ppp {
                PPP_IP => ETH_P_IP,
                PPP_IPV6 => ETH_P_IPV6,
                // LCP, IPCP, IPV6CP, ...: not IP.
                _ => return PARSED_NON_IP,
            };
        }
    } else {
        // L3 devices (PPP, tun): the skb's protocol says what follows.
        proto = u16::from_be(ctx.skb.protocol() as u16);
    }
    match proto {
        ETH_P_IP => parse_v4(ctx, off, pkt),
        ETH_P_IPV6 => parse_v6(ctx, off, pkt),
        _ => PARSED_NON_IP,
    }
}

/// Reads the ports at `off` for protocols that have them; false if cut short.
#[inline(always)]
fn ports(ctx: &TcContext, off: usize, pkt: &mut Pkt) -> bool {
    match pkt.proto {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP | IPPROTO_UDPLITE => {
            let Some(p) = load::<[u8; 4]>(ctx, off) else {
                return false;
            };
            pkt.sport = u16::from_be_bytes([p[0], p[1]]) as u32;
            pkt.dport = u16::from_be_bytes([p[2], p[3]]) as u32;
            pkt.l4 = off as u32;
            pkt.payload_off = off as u32 + 8;
            pkt.payload_len = pkt.l4_len.saturating_sub(8);
            if pkt.proto == IPPROTO_TCP {
                if let Some(t) = load::<[u8; 2]>(ctx, off + 12) {
                    let doff = ((t[0] >> 4) as u32) * 4;
                    let flags = t[1];
                    // The header is all there is: a pure ACK (SYN, FIN,
                    // RST clear) or a SYN, SYN-ACK, FIN or RST.
                    if doff >= 20 && pkt.l4_len == doff {
                        if flags & 0x10 != 0 && flags & 0x07 == 0 {
                            pkt.bare = BARE_ACK;
                        } else if flags & 0x07 != 0 {
                            pkt.bare = BARE_CONTROL;
                        }
                    }
                    pkt.payload_off = off as u32 + doff;
                    pkt.payload_len = pkt.l4_len.saturating_sub(doff);
                }
            }
            true
        }
        _ => {
            pkt.sport = NO_PORT;
            pkt.dport = NO_PORT;
            pkt.payload_off = 0;
            pkt.payload_len = 0;
            true
        }
    }
}

#[inline(always)]
fn parse_v4(ctx: &TcContext, off: usize, pkt: &mut Pkt) -> u32 {
    let Some(h) = load::<[u8; 20]>(ctx, off) else {
        return PARSED_MALFORMED;
    };
    if h[0] >> 4 != 4 {
        return PARSED_MALFORMED;
    }
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    if ihl < 20 {
        return PARSED_MALFORMED;
    }
    let frag_field = u16::from_be_bytes([h[6], h[7]]);
    pkt.frag = if frag_field & 0x1fff != 0 {
        FRAG_LATER
    } else if frag_field & 0x2000 != 0 {
        FRAG_FIRST
    } else {
        FRAG_NONE
    };
    pkt.v6 = 0;
    pkt.bare = BARE_NONE;
    pkt.l4_len = (u16::from_be_bytes([h[2], h[3]]) as u32).wrapping_sub(ihl as u32);
    pkt.proto = h[9];
    pkt.dscp = h[1] >> 2;
    pkt.l3 = off as u32;
    pkt.frag_id = u16::from_be_bytes([h[4], h[5]]) as u32;
    pkt.src = [0; 16];
    pkt.dst = [0; 16];
    pkt.src[..4].copy_from_slice(&h[12..16]);
    pkt.dst[..4].copy_from_slice(&h[16..20]);
    if pkt.frag == FRAG_LATER {
        pkt.sport = NO_PORT;
        pkt.dport = NO_PORT;
    } else if !ports(ctx, off + ihl, pkt) {
        return PARSED_MALFORMED;
    }
    PARSED_IP
}

/// State of the IPv6 extension-header walk handed to the `bpf_loop` callback.
#[repr(C)]
struct V6Walk {
    skb: *mut aya_ebpf::bindings::__sk_buff,
    /// Offset of the header `nh` names.
    l4: u32,
    nh: u32,
    frag: u32,
    frag_id: u32,
    /// 0: walking, 1: reached the upper-layer header, 2: malformed.
    status: u32,
    _pad: u32,
}

const WALK_ON: u32 = 0;
const WALK_DONE: u32 = 1;
const WALK_BAD: u32 = 2;

/// One extension header. Run through `bpf_loop` so the verifier checks it once
/// (walked inline, every header type at every depth multiplied its paths).
extern "C" fn v6_step(_index: u64, c: *mut core::ffi::c_void) -> i64 {
    // SAFETY: c is the `V6Walk` on parse_v6's stack, passed to bpf_loop.
    let w = unsafe { &mut *(c as *mut V6Walk) };
    let ctx = TcContext::new(w.skb);
    let l4 = w.l4 as usize;
    if l4 > MAX_HDR_OFF {
        w.status = WALK_BAD;
        return 1;
    }
    match w.nh as u8 {
        // Hop-by-hop, routing, destination options.
        0 | 43 | 60 => {
            let Some(e) = load::<[u8; 2]>(&ctx, l4) else {
                w.status = WALK_BAD;
                return 1;
            };
            w.nh = e[0] as u32;
            w.l4 = (l4 + (e[1] as usize + 1) * 8) as u32;
            0
        }
        // Fragment header.
        44 => {
            let Some(e) = load::<[u8; 8]>(&ctx, l4) else {
                w.status = WALK_BAD;
                return 1;
            };
            w.nh = e[0] as u32;
            w.l4 = (l4 + 8) as u32;
            w.frag_id = u32::from_be_bytes([e[4], e[5], e[6], e[7]]);
            let fo = u16::from_be_bytes([e[2], e[3]]);
            if fo & 0xfff8 != 0 {
                // A later fragment: no upper-layer header here.
                w.frag = FRAG_LATER as u32;
                w.status = WALK_DONE;
                return 1;
            }
            if fo & 1 != 0 {
                w.frag = FRAG_FIRST as u32;
            }
            0
        }
        // Authentication header.
        51 => {
            let Some(e) = load::<[u8; 2]>(&ctx, l4) else {
                w.status = WALK_BAD;
                return 1;
            };
            w.nh = e[0] as u32;
            w.l4 = (l4 + (e[1] as usize + 2) * 4) as u32;
            0
        }
        _ => {
            w.status = WALK_DONE;
            1
        }
    }
}

/// Headers ending beyond this offset are not followed (default class).
pub(crate) const MAX_HDR_OFF: usize = 1024;

#[inline(always)]
fn parse_v6(ctx: &TcContext, off: usize, pkt: &mut Pkt) -> u32 {
    let Some(h) = load::<[u8; 40]>(ctx, off) else {
        return PARSED_MALFORMED;
    };
    if h[0] >> 4 != 6 {
        return PARSED_MALFORMED;
    }
    let tclass = ((h[0] & 0x0f) << 4) | (h[1] >> 4);
    pkt.v6 = 1;
    pkt.bare = BARE_NONE;
    pkt.dscp = tclass >> 2;
    pkt.l3 = off as u32;
    pkt.src.copy_from_slice(&h[8..24]);
    pkt.dst.copy_from_slice(&h[24..40]);
    let mut w = V6Walk {
        skb: ctx.skb.skb,
        l4: (off + 40) as u32,
        nh: h[6] as u32,
        frag: FRAG_NONE as u32,
        frag_id: 0,
        status: WALK_ON,
        _pad: 0,
    };
    // SAFETY: bpf_loop calls v6_step with our stack struct as its context.
    unsafe {
        bpf_loop(
            MAX_V6_EXT as u32,
            v6_step as *mut core::ffi::c_void,
            &mut w as *mut V6Walk as *mut core::ffi::c_void,
            0,
        );
    }
    if w.status != WALK_DONE {
        // Malformed, or more extension headers than we follow.
        return PARSED_MALFORMED;
    }
    let l4 = w.l4 as usize;
    if l4 > MAX_HDR_OFF {
        return PARSED_MALFORMED;
    }
    pkt.frag = w.frag as u8;
    pkt.frag_id = w.frag_id;
    pkt.proto = w.nh as u8;
    // Payload length minus the extension headers walked.
    pkt.l4_len = (u16::from_be_bytes([h[4], h[5]]) as u32).wrapping_sub((l4 - off - 40) as u32);
    if pkt.frag == FRAG_LATER {
        pkt.sport = NO_PORT;
        pkt.dport = NO_PORT;
    } else if !ports(ctx, l4, pkt) {
        return PARSED_MALFORMED;
    }
    PARSED_IP
}
