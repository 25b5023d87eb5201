//! `[download] window_clamp`: follows TCP handshakes (MSS, window scale, the WAN
//! round trip), and clamps the receive window the LAN host advertises so that
//! each download flow's share of its class's rate fits in flight; and the
//! per-epoch count of active clamped flows. Run after the packet is classified.

use aya_ebpf::{
    helpers::generated::{bpf_ktime_get_ns, bpf_loop},
    programs::TcContext,
};
use shaper_common::*;

use crate::counters::count_global;
use crate::maps::{CLAMP_ACTIVE, CLAMP_FLOWS, CLAMP_SCRATCH, CLAMP_SHARE, SCRATCH};
use crate::parse::{load, Pkt, MAX_HDR_OFF};

/// State of the window clamp handed to its `bpf_loop` callback.
#[repr(C)]
struct ClampRun {
    skb: *mut aya_ebpf::bindings::__sk_buff,
    dir: u32,
    class: u32,
    queue_us: u32,
    _pad: u32,
}

/// `[download] window_clamp` for one TCP segment (the parsed packet in SCRATCH).
/// Run as a one-iteration `bpf_loop` callback so the verifier checks it once,
/// whatever path the classification took.
#[inline(always)]
pub(crate) fn window_clamp(ctx: &TcContext, cfg: &Config, dir: u32, class: u32) {
    let mut r = ClampRun {
        skb: ctx.skb.skb,
        dir,
        class,
        queue_us: cfg.clamp_queue_us,
        _pad: 0,
    };
    // SAFETY: bpf_loop calls clamp_cb with our stack struct as its context.
    unsafe {
        bpf_loop(
            1,
            clamp_cb as *mut core::ffi::c_void,
            &mut r as *mut ClampRun as *mut core::ffi::c_void,
            0,
        );
    }
}

extern "C" fn clamp_cb(_index: u64, c: *mut core::ffi::c_void) -> i64 {
    // SAFETY: c is the `ClampRun` on window_clamp's stack, passed to bpf_loop.
    let r = unsafe { &*(c as *const ClampRun) };
    let ctx = TcContext::new(r.skb);
    let Some(pkt) = SCRATCH.get_ptr(0) else {
        return 1;
    };
    // SAFETY: per-CPU scratch slot, filled by this program run's parse.
    let pkt = unsafe { &*pkt };
    clamp_packet(&ctx, pkt, r.dir, r.class, r.queue_us);
    1
}

/// State of a SYN's option walk handed to the `bpf_loop` callback.
#[repr(C)]
struct OptWalk {
    skb: *mut aya_ebpf::bindings::__sk_buff,
    /// Offset of the first option byte.
    base: u32,
    _pad: u32,
    opts: TcpOpts,
}

/// One TCP option (see `shaper_common::tcp_opt_step`).
extern "C" fn opt_cb(_index: u64, c: *mut core::ffi::c_void) -> i64 {
    // SAFETY: c is the `OptWalk` on syn_opts's stack, passed to bpf_loop.
    let w = unsafe { &mut *(c as *mut OptWalk) };
    let ctx = TcContext::new(w.skb);
    let base = (w.base & 0xfff) as usize;
    let more = tcp_opt_step(&mut w.opts, |i| load::<u8>(&ctx, base + (i & 63) as usize));
    if more {
        0
    } else {
        1
    }
}

/// The MSS and window-scale options of a SYN whose TCP header (of `doff` bytes) is
/// at `l4`: at most 40 bytes of options, one option a step.
#[inline(always)]
fn syn_opts(ctx: &TcContext, l4: usize, doff: u32) -> TcpOpts {
    let mut w = OptWalk {
        skb: ctx.skb.skb,
        base: (l4 + 20) as u32,
        _pad: 0,
        opts: TcpOpts {
            len: doff - 20,
            ..TcpOpts::default()
        },
    };
    // SAFETY: bpf_loop calls opt_cb with our stack struct as its context.
    unsafe {
        bpf_loop(
            TCP_MAX_OPTS,
            opt_cb as *mut core::ffi::c_void,
            &mut w as *mut OptWalk as *mut core::ffi::c_void,
            0,
        );
    }
    w.opts
}

#[inline(always)]
fn min_mss(a: u16, b: u16) -> u16 {
    if a == 0 {
        b
    } else if b == 0 || a < b {
        a
    } else {
        b
    }
}

/// The window clamp's part for one TCP segment, from the site's side (src = LAN
/// host, dst = WAN peer, in both directions):
/// - WAN egress (from the LAN host): its SYN opens a flow (its window scale, MSS,
///   SYN window and the time); its SYN-ACK completes a flow the peer opened; its
///   ACKs of a ready flow get their window clamped ([`clamp_window`]) and the
///   checksum fixed, and every ACK of a followed flow moves the right edge.
/// - LAN egress (from the peer): its SYN opens a flow; its SYN-ACK to a flow the
///   LAN host opened gives the WAN round trip (the LAN host's SYN out to this) and
///   makes the flow ready; for a flow it opened, its first ACK after the LAN host's
///   SYN-ACK does; its data sets the flow's class and counts it active.
/// A flow whose handshake was not seen is never touched. Nothing here drops or
/// reclassifies: a failure leaves the segment as it was.
#[inline(always)]
fn clamp_packet(ctx: &TcContext, pkt: &Pkt, dir: u32, class: u32, queue_us: u32) {
    let l4 = pkt.l4 as usize;
    if l4 > MAX_HDR_OFF {
        return;
    }
    // Data offset, flags, window; the ACK number. (Small loads: this callback's stack
    // adds to the classifier's, and the verifier allows 512 bytes for the chain.)
    let Some(h) = load::<[u8; 4]>(ctx, l4 + 12) else {
        return;
    };
    let Some(a) = load::<[u8; 4]>(ctx, l4 + 8) else {
        return;
    };
    let flags = h[1];
    // RST: nothing to clamp or learn.
    if flags & 0x04 != 0 {
        return;
    }
    let doff = ((h[0] >> 4) as u32) * 4;
    if doff < 20 {
        return;
    }
    let syn = flags & 0x02 != 0;
    let ackf = flags & 0x10 != 0;
    let ack = u32::from_be_bytes(a);
    let win = u16::from_be_bytes([h[2], h[3]]);
    // Key and new values live in a per-CPU scratch slot, not on the stack.
    let Some(sc) = CLAMP_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU scratch slot, used by this program run only.
    let sc = unsafe { &mut *sc };
    sc.key.peer = pkt.dst;
    sc.key.peer_port = pkt.dport as u16;
    sc.key.lan_port = pkt.sport as u16;
    sc.key.family = if pkt.v6 != 0 { 6 } else { 4 };
    sc.key._pad = [0; 3];
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if dir == DIR_UP {
        if syn && !ackf {
            // The LAN host opens a connection (a retransmitted SYN starts afresh).
            let o = syn_opts(ctx, l4, doff);
            sc.val = ClampVal {
                syn_ns: now,
                rtt_ns: 0,
                right_edge: 0,
                class: NO_CLASS,
                epoch: 0,
                mss: o.mss as u16,
                lan_win: win,
                shift: o.ws as u8,
                flags: CL_LAN_SYN | if o.has_ws != 0 { CL_LAN_WS } else { 0 },
                _pad: [0; 2],
                epoch_bytes: 0,
                _pad2: 0,
            };
            let _ = CLAMP_FLOWS.insert(&sc.key, &sc.val, 0);
            return;
        }
        let Some(v) = CLAMP_FLOWS.get_ptr_mut(&sc.key) else {
            return;
        };
        // SAFETY: a value in the LRU map; other CPUs may update it at the same
        // time (one flow's segments rarely run on two CPUs at once).
        let v = unsafe { &mut *v };
        if syn {
            // The LAN host answers a connection the peer opened: its window scale,
            // and the first right edge it advertised (SYN windows are unscaled).
            if v.flags & CL_PEER_SYN == 0 || v.flags & CL_READY != 0 || !ackf {
                return;
            }
            let o = syn_opts(ctx, l4, doff);
            v.shift = o.ws as u8;
            v.flags |= CL_LAN_SYNACK | CL_EDGE | if o.has_ws != 0 { CL_LAN_WS } else { 0 };
            v.mss = min_mss(v.mss, o.mss as u16);
            v.syn_ns = now;
            v.right_edge = ack.wrapping_add(win as u32);
            return;
        }
        if !ackf || v.flags & (CL_READY | CL_LAN_SYNACK) == 0 {
            return;
        }
        let both = CL_LAN_WS | CL_PEER_WS;
        let shift = if v.flags & both == both { v.shift } else { 0 };
        let mut target = u64::MAX;
        if v.flags & CL_READY != 0 {
            if let Some(share) = CLAMP_SHARE.get(v.class) {
                if *share != 0 {
                    target = clamp_target(*share, v.rtt_ns as u64, queue_us as u64 * 1000, v.mss);
                }
            }
        }
        let have = v.flags & CL_EDGE != 0;
        let (nwin, edge) = clamp_window(win, shift, ack, v.right_edge, have, target);
        if nwin == win {
            v.right_edge = edge;
            v.flags |= CL_EDGE;
            return;
        }
        // bpf_l4_csum_replace refuses odd offsets (an IP header after a compressed
        // PPP protocol field): such segments keep their window.
        if l4 & 1 == 0 && rewrite_window(ctx, l4, win, nwin) {
            v.right_edge = edge;
            v.flags |= CL_EDGE;
            count_global(DIR_DOWN, G_ACKS_CLAMPED);
        } else {
            // What went out is the host's own window.
            let (_, edge) = clamp_window(win, shift, ack, v.right_edge, have, u64::MAX);
            v.right_edge = edge;
            v.flags |= CL_EDGE;
            count_global(DIR_DOWN, G_CLAMP_FAILED);
        }
        return;
    }
    // LAN egress: from the peer.
    if syn && !ackf {
        let o = syn_opts(ctx, l4, doff);
        sc.val = ClampVal {
            syn_ns: 0,
            rtt_ns: 0,
            right_edge: 0,
            class,
            epoch: 0,
            mss: o.mss as u16,
            lan_win: 0,
            shift: 0,
            flags: CL_PEER_SYN | if o.has_ws != 0 { CL_PEER_WS } else { 0 },
            _pad: [0; 2],
            epoch_bytes: 0,
            _pad2: 0,
        };
        let _ = CLAMP_FLOWS.insert(&sc.key, &sc.val, 0);
        return;
    }
    let Some(v) = CLAMP_FLOWS.get_ptr_mut(&sc.key) else {
        return;
    };
    // SAFETY: as above.
    let v = unsafe { &mut *v };
    if syn {
        // The peer answers the LAN host's SYN: the WAN round trip.
        if !ackf || v.flags & CL_LAN_SYN == 0 || v.flags & CL_READY != 0 {
            return;
        }
        let o = syn_opts(ctx, l4, doff);
        v.rtt_ns = rtt_sample(now, v.syn_ns);
        v.mss = min_mss(v.mss, o.mss as u16);
        v.class = class;
        // The right edge starts at the first ACK the LAN host sends: the peer sends
        // nothing against the SYN's window before it (TCP Fast Open aside), so the
        // clamp applies from the handshake's last ACK, which acts as the SYN
        // window's clamp (the first flight is min(IW, clamped window)).
        v.flags |= CL_READY | if o.has_ws != 0 { CL_PEER_WS } else { 0 };
        count_global(DIR_DOWN, G_FLOWS_TRACKED);
        return;
    }
    if v.flags & CL_READY == 0 {
        // The peer's first ACK after the LAN host's SYN-ACK: the round trip.
        if ackf && v.flags & CL_LAN_SYNACK != 0 {
            v.rtt_ns = rtt_sample(now, v.syn_ns);
            v.flags |= CL_READY;
            count_global(DIR_DOWN, G_FLOWS_TRACKED);
        } else {
            return;
        }
    }
    if pkt.payload_len == 0 {
        return;
    }
    // Data: the flow's download class (pure ACKs may go to `ack_class`, data
    // does not), and, once it carried a quarter of its share this epoch (at least
    // CLAMP_ACTIVE_BYTES), one more active flow in it: short transfers (a web
    // page's objects) that never use a share do not shrink the long flows' one.
    v.class = class;
    let quarter = match CLAMP_SHARE.get(class) {
        Some(s) => (*s / 4).min(u32::MAX as u64) as u32,
        None => 0,
    };
    let busy = if quarter > CLAMP_ACTIVE_BYTES {
        quarter
    } else {
        CLAMP_ACTIVE_BYTES
    };
    let epoch = now >> CLAMP_EPOCH_SHIFT;
    if v.epoch != epoch as u32 {
        v.epoch = epoch as u32;
        v.epoch_bytes = 0;
    }
    let before = v.epoch_bytes;
    let after = before.saturating_add(pkt.payload_len);
    v.epoch_bytes = after;
    if before < busy && after >= busy {
        if let Some(w) = CLAMP_ACTIVE.get_ptr_mut(class) {
            // SAFETY: a value of a shared array map; plain updates (an estimate).
            let w = unsafe { &mut *w };
            if w.epoch != epoch {
                w.prev = if w.epoch.wrapping_add(1) == epoch {
                    w.count
                } else {
                    0
                };
                w.count = 0;
                w.epoch = epoch;
            }
            w.count += 1;
        }
    }
}

/// A round-trip sample (ns) from `then` to `now`, in 1..=u32::MAX.
#[inline(always)]
fn rtt_sample(now: u64, then: u64) -> u32 {
    let rtt = now.wrapping_sub(then);
    if rtt > u32::MAX as u64 {
        u32::MAX
    } else if rtt == 0 {
        1
    } else {
        rtt as u32
    }
}

/// Writes `new` over the window field `old` of the TCP header at `l4` and fixes
/// the checksum (a 16-bit field: flags 2; not a pseudo-header field). The window
/// and checksum are written by helpers, which invalidate packet pointers: none
/// are held here (reads go through bpf_skb_load_bytes).
#[inline(always)]
fn rewrite_window(ctx: &TcContext, l4: usize, old: u16, new: u16) -> bool {
    let nb = new.to_be_bytes();
    if ctx.store(l4 + 14, &nb, 0).is_err() {
        return false;
    }
    let from = u16::from_ne_bytes(old.to_be_bytes()) as u64;
    let to = u16::from_ne_bytes(nb) as u64;
    if ctx.l4_csum_replace(l4 + 16, from, to, 2).is_err() {
        // Put the window back: a stale checksum must never go out.
        let _ = ctx.store(l4 + 14, &old.to_be_bytes(), 0);
        return false;
    }
    true
}
