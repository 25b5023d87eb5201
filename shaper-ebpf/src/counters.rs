//! Counting: the per-direction global counters (`GLOBAL_STATS`), the rule and
//! class packet/byte counters, and whether a download packet came in from the
//! WAN (what the WAN arrival counters count).

use aya_ebpf::{maps::PerCpuArray, programs::TcContext};
use shaper_common::*;

use crate::maps::GLOBAL_STATS;

#[inline(always)]
pub(crate) fn count_global(dir: u32, counter: u32) {
    if let Some(p) = GLOBAL_STATS.get_ptr_mut(dir * GLOBAL_COUNTERS + counter) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
pub(crate) fn count(map: &PerCpuArray<Counter>, index: u32, packets: u64, bytes: u64) {
    if let Some(p) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe {
            (*p).packets += packets;
            (*p).bytes += bytes;
        }
    }
}

/// Did this download packet come in from the WAN (and so cross the line)?
/// `ingress_ifindex` is the skb's `skb_iif`, set where the packet entered the
/// stack: the WAN device for routed packets, the WAN port for frames a bridge
/// forwards (it keeps the port's index); the LAN port for LAN-to-LAN traffic
/// routed or hairpinned back out of it; 0 for the box's own packets. None of
/// the latter crossed the line. An unknown WAN (`wan_ifindex` 0) counts every
/// packet, as this counter's readers did before it existed (all of
/// CLASS_STATS).
#[inline(always)]
pub(crate) fn from_wan(ctx: &TcContext, cfg: &Config) -> bool {
    // SAFETY: the context pointer is valid for the program's run.
    let iif = unsafe { (*ctx.skb.skb).ingress_ifindex };
    cfg.wan_ifindex == 0 || iif == cfg.wan_ifindex
}
