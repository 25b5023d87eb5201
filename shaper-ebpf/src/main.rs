//! The classifier: a tc program on the WAN egress (upload) and the LAN egress
//! (download). It parses the packet, finds the highest-priority rule that
//! accepts it (see `shaper_common` for the bitmap scheme), writes the rule's
//! HTB class id into `skb->priority`, optionally re-marks DSCP on the WAN
//! side, counts, and measures the RTP streams of the classes `[calls]` names
//! (`media`); a tracepoint program beside it counts the gateway's own drops of
//! those streams (`drops`). It never drops: anything it cannot parse goes to the
//! default class, and it always returns TC_ACT_UNSPEC (TCX_NEXT) so other
//! programs on the hook still run.
#![no_std]
#![no_main]

mod clamp;
mod counters;
mod drops;
mod flow;
mod hosts;
mod maps;
mod media;
mod parse;
mod rules;

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    macros::{btf_tracepoint, classifier},
    programs::{BtfTracePointContext, TcContext},
};
use shaper_common::*;

use crate::clamp::window_clamp;
use crate::counters::{count, count_global, from_wan};
use crate::flow::decide;
use crate::maps::{CLASSES, CLASS_STATS, CONFIG, RULE_STATS, SCRATCH, WAN_ARRIVALS};
use crate::parse::{
    load, parse, Pkt, BARE_ACK, BARE_NONE, FRAG_LATER, FRAG_NONE, IPPROTO_TCP, IPPROTO_UDP,
    PARSED_IP, PARSED_NON_IP,
};

#[classifier]
pub fn shaper_classify(ctx: TcContext) -> i32 {
    classify(&ctx);
    TC_ACT_UNSPEC
}

/// `[calls]`: the gateway's own drops of measured RTP streams (see `drops`). Attached by
/// user space only where the kernel has BTF and `[calls]` measures a class.
#[btf_tracepoint(function = "kfree_skb")]
pub fn shaper_media_drops(ctx: BtfTracePointContext) -> i32 {
    drops::count(&ctx);
    0
}

/// Does nothing: the floor that benchmarks subtract (BPF_PROG_TEST_RUN's own
/// cost). Never attached.
#[classifier]
pub fn shaper_empty(_ctx: TcContext) -> i32 {
    TC_ACT_UNSPEC
}

#[inline(always)]
fn classify(ctx: &TcContext) {
    let Some(cfg) = CONFIG.get(0) else { return };
    if cfg.flags & CFG_READY == 0 {
        return;
    }
    // SAFETY: the context pointer is valid for the program's run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let (dir, l2) = if ifindex == cfg.wan_ifindex {
        (DIR_UP, cfg.flags & CFG_WAN_L2 != 0)
    } else if ifindex == cfg.lan_ifindex {
        (DIR_DOWN, cfg.flags & CFG_LAN_L2 != 0)
    } else {
        return;
    };
    count_global(dir, G_PACKETS);
    let bytes = ctx.len() as u64;

    let Some(pkt) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU scratch slot, used by this program run only.
    let pkt = unsafe { &mut *pkt };
    // Bytes of headers each segment of a GSO packet carries (0: not known).
    let mut hdr = 0u64;
    let mut ip = false;
    // The flow's cache entry, if it had one (`[calls]`' stream hints).
    let mut flow = core::ptr::null_mut();
    let (rule, class) = match parse(ctx, l2, pkt) {
        PARSED_IP => {
            ip = true;
            if pkt.frag == FRAG_NONE {
                hdr = pkt.payload_off as u64;
            }
            if pkt.v6 != 0 {
                count_global(dir, G_IPV6);
            }
            if dir == DIR_DOWN {
                // Rules speak from the site's side: src = LAN, dst = WAN.
                core::mem::swap(&mut pkt.src, &mut pkt.dst);
                core::mem::swap(&mut pkt.sport, &mut pkt.dport);
            }
            // DSCP a side is not trusted with is not looked at by rules.
            let dscp = pkt.dscp;
            let ignore = if dir == DIR_UP {
                CFG_IGNORE_DSCP_UP
            } else {
                CFG_IGNORE_DSCP_DOWN
            };
            if cfg.flags & ignore != 0 {
                pkt.dscp = 0;
            }
            pkt.now = 0;
            let (rule, mut class, f) = decide(ctx, cfg, pkt, dir, bytes);
            flow = f;
            pkt.dscp = dscp;
            if pkt.bare == BARE_ACK {
                count_global(dir, G_PURE_ACK);
            }
            if pkt.bare != BARE_NONE {
                // ACKs clock the opposite direction's transfers, and a
                // handshake or close waiting behind bulk data costs a short
                // transfer a queue's delay per round trip: keep segments
                // without data out of the bulk queues.
                if cfg.ack_class != NO_CLASS {
                    class = cfg.ack_class;
                }
            }
            if dir == DIR_UP && cfg.flags & CFG_REMARK_WAN != 0 {
                remark(ctx, pkt, class, dir);
            }
            (rule, class)
        }
        PARSED_NON_IP => {
            count_global(dir, G_NON_IP);
            (NO_RULE, cfg.default_class)
        }
        _ => {
            count_global(dir, G_MALFORMED);
            (NO_RULE, cfg.default_class)
        }
    };

    // A GSO/GRO packet counts as the segments it leaves as, each with its own
    // headers, as the qdiscs count it (qdisc_pkt_len_init): what the HTB counters and
    // `shaper run`'s arrival accounting compare with.
    // SAFETY: the context pointer is valid for the program's run.
    let segs = unsafe { (*ctx.skb.skb).gso_segs } as u64;
    let (packets, bytes) = if segs > 1 {
        let hdr = if hdr < bytes { hdr } else { 0 };
        (segs, bytes + (segs - 1) * hdr)
    } else {
        (1, bytes)
    };
    if rule == NO_RULE {
        count_global(dir, G_DEFAULT);
    } else {
        count(&RULE_STATS, dir * MAX_RULES as u32 + rule, packets, bytes);
    }
    if let Some(info) = CLASSES.get(class) {
        // SAFETY: tc programs may write skb->priority.
        unsafe { (*ctx.skb.skb).priority = info.classid };
        count(
            &CLASS_STATS,
            dir * MAX_CLASSES as u32 + class,
            packets,
            bytes,
        );
        if dir == DIR_DOWN && from_wan(ctx, cfg) {
            count(&WAN_ARRIVALS, class, packets, bytes);
        }
    }
    // Last, after the packet's class is set: the window clamp only ever rewrites
    // the window field of a well-formed TCP header, or leaves the packet alone.
    if cfg.flags & CFG_WINDOW_CLAMP != 0 && ip && pkt.proto == IPPROTO_TCP && pkt.frag == FRAG_NONE
    {
        window_clamp(ctx, cfg, dir, class);
    }
    // `[calls]`: RTP in a measured class is measured; the packet is left as it is.
    if cfg.flags & CFG_MEDIA != 0
        && ip
        && pkt.proto == IPPROTO_UDP
        && pkt.frag != FRAG_LATER
        && class < 64
        && (cfg.media_classes >> class) & 1 == 1
    {
        media::measure(ctx, pkt, dir, flow);
    }
}

/// Re-mark DSCP on WAN egress to the class's codepoint (ECN bits kept).
#[inline(always)]
fn remark(ctx: &TcContext, pkt: &Pkt, class: u32, dir: u32) {
    let Some(info) = CLASSES.get(class) else {
        return;
    };
    if info.dscp == DSCP_KEEP || info.dscp == pkt.dscp {
        return;
    }
    let l3 = pkt.l3 as usize;
    if pkt.v6 != 0 {
        let Some(old) = load::<[u8; 2]>(ctx, l3) else {
            return;
        };
        let w = u16::from_be_bytes(old);
        let new = ((w & !(0x3f << 6)) | ((info.dscp as u16) << 6)).to_be_bytes();
        if ctx.store(l3, &new, 0).is_err() {
            return;
        }
    } else {
        // The TOS byte and the header checksum, updated incrementally (RFC 1624
        // eqn. 3: what the kernel's csum_replace2 computes) and written in one
        // store, so the header is never left with a stale checksum. Not
        // bpf_l3_csum_replace: it refuses an odd offset, and after a
        // compressed PPP protocol (RFC 1661 §6.5) the IP header starts at one.
        let Some(mut h) = load::<[u8; 12]>(ctx, l3) else {
            return;
        };
        let old = u16::from_be_bytes([h[0], h[1]]);
        h[1] = (info.dscp << 2) | (h[1] & 0x03);
        let new = u16::from_be_bytes([h[0], h[1]]);
        let mut sum = (!u16::from_be_bytes([h[10], h[11]])) as u32 + (!old) as u32 + new as u32;
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        h[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        if ctx.store(l3, &h, 0).is_err() {
            return;
        }
    }
    count_global(dir, G_REMARKED);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
