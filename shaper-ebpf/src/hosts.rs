//! Host names: DNS queries and the answers to them (on their own ring), TLS
//! ClientHellos and QUIC Initials handed to user space as events, and the
//! connections whose class user space decided from a server name.

use aya_ebpf::{
    helpers::generated::{bpf_ktime_get_ns, bpf_skb_load_bytes},
    maps::RingBuf,
    programs::TcContext,
};
use shaper_common::*;

use crate::counters::{count_global, from_wan};
use crate::maps::{CONFIG, DNS_EVENTS, DNS_QUERIES, EVENTS, HOST_FLOWS};
use crate::parse::{load, Pkt, IPPROTO_TCP, IPPROTO_UDP};

#[inline(always)]
fn host_key(pkt: &Pkt) -> HostKey {
    HostKey {
        src: pkt.src,
        dst: pkt.dst,
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        family: if pkt.v6 != 0 { 6 } else { 4 },
        _pad: [0; 2],
    }
}

/// Copies the packet's connection and the start of its L4 payload into the
/// hello ring for user space.
#[inline(always)]
fn emit(ctx: &TcContext, kind: u32, dir: u32, pkt: &Pkt) {
    emit_to::<EVENT_DATA>(&EVENTS, G_EVENTS_LOST, ctx, kind, dir, pkt);
}

/// Copies the packet's connection and up to `N` bytes of its L4 payload into
/// `ring`; a full ring counts `lost`.
#[inline(always)]
fn emit_to<const N: usize>(
    ring: &RingBuf,
    lost: u32,
    ctx: &TcContext,
    kind: u32,
    dir: u32,
    pkt: &Pkt,
) {
    let off = pkt.payload_off;
    // The verifier must see the length's bounds (1 to N) on the very
    // register passed to the helper (its size argument may not be 0). Signed
    // 64-bit arithmetic on purpose: `n` may be negative (`off` past the end),
    // so the compiler keeps `n < 1` as a signed compare instead of turning it
    // into `n == 0`, and a signed compare is what raises the lower bound to 1
    // on older verifiers (6.1 learns nothing from the false branch of
    // `n == 0`). Same outcome as min(payload_len, len.saturating_sub(off)).
    // Clamped before the ring is reserved: the reserve call spills `n`, and a
    // value spilled after its clamp keeps its bounds on 6.1, while one spilled
    // before it (and clamped in another register) did not (R4 unbounded).
    let avail = ctx.len() as i64 - off as i64;
    let mut n = pkt.payload_len as i64;
    if n > avail {
        n = avail;
    }
    if n < 1 {
        return;
    }
    // As `m + 1` with `m` in 0..N: the verifier sees the lower bound 1 from the
    // addition itself (the compiler moved the clamp after the reserve call, where
    // 6.1 had lost the `n >= 1` it learnt before).
    let m = (n - 1) as u64;
    let m = if m > (N - 1) as u64 {
        (N - 1) as u64
    } else {
        m
    };
    let Some(mut e) = ring.reserve::<EventOf<N>>(0) else {
        count_global(dir, lost);
        return;
    };
    let ev = e.as_mut_ptr();
    // SAFETY: `ev` points at a reserved entry of size_of::<EventOf<N>>() bytes
    // and at most N bytes are copied into its `data`.
    let r = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const core::ffi::c_void,
            off,
            (*ev).data.as_mut_ptr() as *mut core::ffi::c_void,
            (m + 1) as u32,
        )
    };
    if r != 0 {
        e.discard(0);
        count_global(dir, lost);
        return;
    }
    // SAFETY: as above; plain stores into the reserved entry.
    unsafe {
        (*ev).kind = kind;
        (*ev).len = (m + 1) as u32;
        (*ev).dir = dir;
        (*ev).dscp = pkt.dscp as u32;
        (*ev).key = host_key(pkt);
    }
    e.submit(0);
    count_global(dir, G_EVENTS);
}

/// The DNS query map's key for a query or answer (from the site's side, so
/// both give the same key) with message id `id`.
#[inline(always)]
fn dns_key(pkt: &Pkt, id: u16) -> DnsKey {
    DnsKey {
        client: pkt.src,
        resolver: pkt.dst,
        client_port: pkt.sport as u16,
        id,
        family: if pkt.v6 != 0 { 6 } else { 4 },
        _pad: [0; 3],
    }
}

/// A DNS query on its way out (UDP to port 53, upload): one that came in from
/// the LAN is remembered, so its answer will be handed on, and handed to user
/// space (its question). The box's own queries are not: their answers are for
/// the box, never on their way to the LAN.
#[inline(always)]
fn dns_query(ctx: &TcContext, pkt: &Pkt, dir: u32) {
    let Some(cfg) = CONFIG.get(0) else { return };
    // SAFETY: the context pointer is valid for the program's run.
    let iif = unsafe { (*ctx.skb.skb).ingress_ifindex };
    if cfg.lan_ifindex != 0 && iif != cfg.lan_ifindex {
        return;
    }
    // Id, then QR (clear in a query) and the opcode (0: QUERY).
    let Some(h) = load::<[u8; 3]>(ctx, pkt.payload_off as usize) else {
        return;
    };
    if h[2] & 0xf8 != 0 {
        return;
    }
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let _ = DNS_QUERIES.insert(&dns_key(pkt, u16::from_be_bytes([h[0], h[1]])), &now, 0);
    emit_to::<DNS_QUERY_DATA>(&DNS_EVENTS, G_DNS_EVENTS_LOST, ctx, EV_DNS_QUERY, dir, pkt);
}

/// A DNS answer on its way to the LAN (UDP from port 53, download): handed to
/// user space only if it came in from the WAN and answers a query remembered
/// by [`dns_query`] in the last DNS_ANSWER_WITHIN_NS (which it uses up).
/// Forged answers hairpinned from the LAN, and answers nobody asked for, never
/// reach the ring.
#[inline(always)]
fn dns_answer(ctx: &TcContext, pkt: &Pkt, dir: u32) {
    let Some(cfg) = CONFIG.get(0) else { return };
    let h = load::<[u8; 3]>(ctx, pkt.payload_off as usize);
    let asked = match h {
        // QR set: a response.
        Some(h) if h[2] & 0x80 != 0 && from_wan(ctx, cfg) => {
            let key = dns_key(pkt, u16::from_be_bytes([h[0], h[1]]));
            // SAFETY: the value is copied out before any other map operation.
            let sent = unsafe { DNS_QUERIES.get(&key) }.copied();
            // SAFETY: a helper without arguments.
            let now = unsafe { bpf_ktime_get_ns() };
            match sent {
                Some(t) if now.wrapping_sub(t) <= DNS_ANSWER_WITHIN_NS => {
                    let _ = DNS_QUERIES.remove(&key);
                    true
                }
                _ => false,
            }
        }
        _ => false,
    };
    if asked {
        emit_to::<EVENT_DATA>(&DNS_EVENTS, G_DNS_EVENTS_LOST, ctx, EV_DNS, dir, pkt);
    } else {
        count_global(dir, G_DNS_UNMATCHED);
    }
}

/// Host names: DNS queries going out to the WAN and the answers to them, and
/// a TCP 443 connection's ClientHello or a UDP 443 (QUIC) client Initial (or
/// the connection's next packet when user space asks for it), go to user
/// space; a connection user space has decided follows its decision in both
/// directions.
#[inline(always)]
pub(crate) fn hosts(ctx: &TcContext, pkt: &Pkt, dir: u32) -> Option<(u32, u32)> {
    if pkt.proto == IPPROTO_UDP && pkt.dport == 53 {
        if dir == DIR_UP {
            dns_query(ctx, pkt, dir);
        } else {
            dns_answer(ctx, pkt, dir);
        }
        return None;
    }
    if pkt.dport != 443 || (pkt.proto != IPPROTO_TCP && pkt.proto != IPPROTO_UDP) {
        return None;
    }
    let key = host_key(pkt);
    // SAFETY: the value is copied out before any other map operation.
    match unsafe { HOST_FLOWS.get(&key) }.copied() {
        Some(h) if h.flags & HOST_DECIDED != 0 => {
            count_global(dir, G_HOST_FLOW_HIT);
            return Some((h.rule, h.class));
        }
        Some(h) if h.flags & HOST_WANT_MORE != 0 => {
            if dir == DIR_UP && pkt.payload_len > 0 {
                emit(ctx, EV_TLS, dir, pkt);
            }
        }
        Some(_) => {}
        None => {
            if dir == DIR_UP && pkt.payload_len >= 6 {
                if let Some(h) = load::<[u8; 6]>(ctx, pkt.payload_off as usize) {
                    let hello = if pkt.proto == IPPROTO_TCP {
                        // A handshake record carrying a ClientHello.
                        h[0] == 0x16 && h[5] == 0x01
                    } else {
                        // A QUIC long-header Initial (v1, or v2 whose Initial
                        // has type bits 01); its CRYPTO frames carry the hello.
                        let version = u32::from_be_bytes([h[1], h[2], h[3], h[4]]);
                        h[0] & 0xc0 == 0xc0
                            && ((version == 1 && h[0] & 0x30 == 0)
                                || (version == 0x6b33_43cf && h[0] & 0x30 == 0x10))
                    };
                    if hello {
                        emit(ctx, EV_TLS, dir, pkt);
                    }
                }
            }
        }
    }
    None
}
