//! The decision for a parsed packet: fragments follow their first fragment, a
//! connection a server name decided takes that decision, the flow cache serves
//! a flow's later packets, and the flow's behaviour (bulk demotion, media
//! promotion, the claimed-window cap) can move it to another class.

use aya_ebpf::{helpers::generated::bpf_ktime_get_ns, programs::TcContext};
use shaper_common::*;

use crate::counters::count_global;
use crate::hosts::hosts;
use crate::maps::{CLAIMED, CLASSES, FLOWS, FRAGS, RULES};
use crate::parse::{Pkt, FRAG_FIRST, FRAG_LATER, IPPROTO_UDP};
use crate::rules::match_rule;

/// What a flow has carried: demotes a flow that turns bulk (by the thresholds of `class`,
/// the class this packet was decided into), promotes a default-class UDP flow that looks
/// like media, and demotes a claimed flow (decided by a server name, or promoted) that
/// finds its class's claimed total for the window used up. Returns the clock it read.
#[inline(always)]
fn behave(cfg: &Config, v: &mut FlowVal, pkt: &Pkt, dir: u32, bytes: u64, class: u32) -> u64 {
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let age = now.wrapping_sub(v.window_start);
    // What the flow carried in the window this packet closes (0: none closed).
    let mut closed = 0;
    if age >= FLOW_WINDOW_NS {
        closed = v.window_bytes;
        // A window closed. Promotion looks at a whole window that the flow
        // was active in (not one that ended long ago).
        if v.flags == 0
            && age < 2 * FLOW_WINDOW_NS
            && cfg.promote_class != NO_CLASS
            && v.rule == NO_RULE
            && pkt.proto == IPPROTO_UDP
            && v.window_packets >= cfg.promote_min_packets
            && v.window_bytes <= cfg.promote_max_bytes as u64
            && v.window_bytes <= cfg.promote_max_packet as u64 * v.window_packets as u64
        {
            v.class = cfg.promote_class;
            v.flags |= FLOW_PROMOTED;
            count_global(dir, G_PROMOTED);
        }
        v.window_start = now;
        v.window_bytes = 0;
        v.window_packets = 0;
    }
    v.window_bytes += bytes;
    v.window_packets += 1;
    v.total_bytes += bytes;
    if v.flags & FLOW_DEMOTED != 0 {
        return now;
    }
    // The class the flow is in for this packet: a promoted flow's own, else this packet's.
    let class = if v.flags & FLOW_PROMOTED != 0 {
        v.class
    } else {
        class
    };
    let Some(ci) = CLASSES.get(class) else {
        return now;
    };
    if ci.demote_class != NO_CLASS
        && ((ci.demote_bytes != 0 && v.total_bytes > ci.demote_bytes)
            || (ci.demote_window_bytes != 0 && v.window_bytes > ci.demote_window_bytes))
    {
        v.class = ci.demote_class;
        v.flags |= FLOW_DEMOTED;
        count_global(dir, G_DEMOTED);
        return now;
    }
    let cap = if dir == DIR_UP {
        ci.claimed_window_bytes[0]
    } else {
        ci.claimed_window_bytes[1]
    };
    if cap == 0 || v.flags & (FLOW_BY_NAME | FLOW_PROMOTED) == 0 {
        return now;
    }
    let Some(w) = CLAIMED.get_ptr_mut(dir * MAX_CLASSES as u32 + class) else {
        return now;
    };
    // SAFETY: a value of a shared array map, written by every CPU. The updates are plain
    // (BPF's atomic add has no stable Rust form for this target): two CPUs adding at the
    // same instant may lose one packet's bytes, so the cap can be exceeded by a few
    // packets a window, never by a flow's worth.
    let w = unsafe { &mut *w };
    if now.wrapping_sub(w.start) >= FLOW_WINDOW_NS {
        w.start = now;
        w.prev = w.bytes;
        w.bytes = 0;
    }
    w.bytes += bytes;
    // Each claimed flow looks once a window, when its own window closes: if the class's
    // claimed flows carried more than the cap in the last window, this one leaves the
    // claim and its share is taken off that total, so the flows looking after it see what
    // is left. Flows are demoted one at a time until the rest fit.
    if closed != 0 && w.prev > cap {
        w.prev = w.prev.saturating_sub(closed);
        v.class = if ci.demote_class != NO_CLASS {
            ci.demote_class
        } else {
            cfg.default_class
        };
        v.flags |= FLOW_DEMOTED;
        count_global(dir, G_DEMOTED);
    }
    now
}

/// Rule and class for a parsed packet, following fragments, and the flow's cache entry
/// when it had one before this packet (null otherwise: a new flow, no cache, a later
/// fragment), for `[calls]`' stream hints.
#[inline(always)]
pub(crate) fn decide(
    ctx: &TcContext,
    cfg: &Config,
    pkt: &mut Pkt,
    dir: u32,
    bytes: u64,
) -> (u32, u32, *mut FlowVal) {
    if pkt.frag == FRAG_LATER {
        let key = frag_key(pkt, dir);
        // SAFETY: the value is copied out before any other map operation.
        let hit = unsafe { FRAGS.get(&key) }.copied();
        return match hit {
            Some(v) => {
                count_global(dir, G_FRAG_FOLLOWED);
                (v.rule, v.class, core::ptr::null_mut())
            }
            None => {
                count_global(dir, G_FRAG_UNKNOWN);
                (NO_RULE, cfg.default_class, core::ptr::null_mut())
            }
        };
    }
    // A connection a server name decided (TLS/QUIC) takes that decision, and is measured
    // like any other flow below: a name buys a class, not immunity from demotion.
    let host = if cfg.flags & CFG_HOSTS != 0 {
        hosts(ctx, pkt, dir)
    } else {
        None
    };
    let cache = cfg.flags & CFG_NO_FLOW_CACHE == 0;
    let fkey = FlowKey {
        src: pkt.src,
        dst: pkt.dst,
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        _pad: 0,
        dir: dir as u8,
        family: if pkt.v6 != 0 { 6 } else { 4 },
    };
    let cached = if cache {
        FLOWS.get_ptr_mut(&fkey)
    } else {
        None
    };
    // The decision for this packet: a server name's; else the flow's, if it was made with
    // this DSCP; else the rules', matched afresh (a flow whose DSCP changes is still one
    // flow, measured and demoted as one).
    let (rule, class) = match (cached, host) {
        (_, Some(d)) => d,
        // SAFETY: a value in the flow map; read before any other map operation.
        (Some(v), None) if unsafe { (*v).dscp } == pkt.dscp as u32 => unsafe {
            ((*v).rule, (*v).class)
        },
        _ => {
            let rule = match_rule(cfg, pkt, dir);
            let class = if rule == NO_RULE {
                cfg.default_class
            } else {
                match RULES.get(rule) {
                    Some(r) => r.class,
                    None => cfg.default_class,
                }
            };
            (rule, class)
        }
    };
    let d = match cached {
        Some(v) => {
            // SAFETY: a value in the flow map; concurrent updates from other
            // CPUs only blur the flow's byte counts.
            let v = unsafe { &mut *v };
            count_global(dir, G_FLOW_CACHE_HIT);
            if host.is_some() && v.flags & (FLOW_BY_NAME | FLOW_DEMOTED) == 0 {
                // The name was decided after the connection's first packets: from now on
                // the flow is in the name's class (what it carried so far still counts).
                v.rule = rule;
                v.class = class;
                v.dscp = pkt.dscp as u32;
                v.flags = FLOW_BY_NAME;
            }
            if cfg.flags & CFG_FLOW_BEHAVIOUR != 0 {
                pkt.now = behave(cfg, v, pkt, dir, bytes, class);
            }
            if v.flags & (FLOW_DEMOTED | FLOW_PROMOTED) != 0 {
                FragVal {
                    rule: v.rule,
                    class: v.class,
                }
            } else {
                FragVal { rule, class }
            }
        }
        None => {
            if cache {
                let mut f = FlowVal {
                    rule,
                    class,
                    window_start: 0,
                    window_bytes: bytes,
                    total_bytes: bytes,
                    window_packets: 1,
                    flags: if host.is_some() { FLOW_BY_NAME } else { 0 },
                    dscp: pkt.dscp as u32,
                    _pad: 0,
                    media: Default::default(),
                };
                if cfg.flags & CFG_FLOW_BEHAVIOUR != 0 {
                    // SAFETY: a helper without arguments.
                    f.window_start = unsafe { bpf_ktime_get_ns() };
                    pkt.now = f.window_start;
                }
                let _ = FLOWS.insert(&fkey, &f, 0);
            }
            FragVal { rule, class }
        }
    };
    if pkt.frag == FRAG_FIRST {
        let key = frag_key(pkt, dir);
        let _ = FRAGS.insert(&key, &d, 0);
    }
    (d.rule, d.class, cached.unwrap_or(core::ptr::null_mut()))
}

#[inline(always)]
fn frag_key(pkt: &Pkt, dir: u32) -> FragKey {
    FragKey {
        src: pkt.src,
        dst: pkt.dst,
        id: pkt.frag_id,
        proto: pkt.proto,
        family: if pkt.v6 != 0 { 6 } else { 4 },
        _pad: [dir as u8, 0],
    }
}
