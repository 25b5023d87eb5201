//! `[calls]`: the gateway's own drops of each measured RTP stream (issue 17). The
//! classifier counts a media packet before the shaper's queues, so what a queue drops
//! after that is invisible to it: a download stream's receiver would miss packets the
//! record called received. This program runs on the `kfree_skb` tracepoint (a BTF
//! tracepoint: every skb freed as dropped passes it, the qdiscs' drops included, on 6.1
//! as on 6.12), so it costs nothing while nothing is dropped, and counts a drop in its
//! stream (`MediaStream::gw_drops`, in its `MEDIA_SLOTS` slot or in `MEDIA`) when the
//! packet:
//! - carries the classifier's mark: `skb->priority` with the HTB root's major (the
//!   classifier writes every packet's class id there; an arrival or the box's own packet
//!   has none), and
//! - is on the WAN (upload) or LAN (download) device the classifier is attached to, and
//! - is UDP (not a later fragment) whose payload starts with an RTP header (plain or
//!   behind TURN ChannelData) of a stream the classifier already follows.
//!
//! Rust eBPF has no CO-RE relocations, so the offsets of `sk_buff`'s and `net_device`'s
//! fields come from the running kernel's BTF, read by user space into `MEDIA_DROP_CFG`;
//! every read goes through `bpf_probe_read_kernel`, and any read that fails counts
//! nothing. Nothing is changed but the counter; the packet is already being freed.

use aya_ebpf::{helpers::bpf_probe_read_kernel, programs::BtfTracePointContext};
use shaper_common::{
    media::{media_slot, rtp_offset, rtp_payload_type, MediaKey, MEDIA_TURN},
    CFG_MEDIA, CFG_READY, DIR_DOWN, DIR_UP,
};

use crate::maps::{CONFIG, MEDIA, MEDIA_DROP_CFG, MEDIA_SLOTS};

/// A `T` at `base + off` in kernel memory.
#[inline(always)]
fn read<T>(base: u64, off: u64) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel checks the address; a fault is an error, not a crash.
    unsafe { bpf_probe_read_kernel((base.wrapping_add(off)) as *const T) }.ok()
}

#[inline(always)]
pub(crate) fn count(ctx: &BtfTracePointContext) {
    let Some(dc) = MEDIA_DROP_CFG.get(0) else {
        return;
    };
    let Some(cfg) = CONFIG.get(0) else {
        return;
    };
    if dc.ready == 0 || cfg.flags & (CFG_READY | CFG_MEDIA) != CFG_READY | CFG_MEDIA {
        return;
    }
    // kfree_skb(struct sk_buff *skb, void *location, enum skb_drop_reason reason, ...)
    let skb: u64 = ctx.arg(0);
    let Some(prio) = read::<u32>(skb, dc.skb_priority as u64) else {
        return;
    };
    if prio >> 16 != dc.major {
        return;
    }
    let Some(dev) = read::<u64>(skb, dc.skb_dev as u64) else {
        return;
    };
    if dev == 0 {
        return;
    }
    let Some(ifindex) = read::<u32>(dev, dc.dev_ifindex as u64) else {
        return;
    };
    let dir = if ifindex == cfg.wan_ifindex {
        DIR_UP
    } else if ifindex == cfg.lan_ifindex {
        DIR_DOWN
    } else {
        return;
    };
    let (Some(head), Some(nh)) = (
        read::<u64>(skb, dc.skb_head as u64),
        read::<u16>(skb, dc.skb_network_header as u64),
    ) else {
        return;
    };
    let l3 = head.wrapping_add(nh as u64);
    let Some(ip) = read::<[u8; 40]>(l3, 0) else {
        return;
    };
    let mut key = MediaKey {
        dir: dir as u8,
        ..MediaKey::default()
    };
    let (mut src, mut dst) = ([0u8; 16], [0u8; 16]);
    let l4 = match ip[0] >> 4 {
        4 => {
            let ihl = (ip[0] & 0x0f) as u64 * 4;
            // UDP, and not a later fragment (its first carries the ports).
            if ip[9] != 17 || ihl < 20 || u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0 {
                return;
            }
            src[..4].copy_from_slice(&ip[12..16]);
            dst[..4].copy_from_slice(&ip[16..20]);
            key.family = 4;
            l3 + ihl
        }
        6 => {
            // UDP right after the fixed header (what media is; extension headers are not
            // walked here).
            if ip[6] != 17 {
                return;
            }
            src.copy_from_slice(&ip[8..24]);
            dst.copy_from_slice(&ip[24..40]);
            key.family = 6;
            l3 + 40
        }
        _ => return,
    };
    // UDP header, then up to 4 bytes of ChannelData and RTP's fixed 12.
    let Some(u) = read::<[u8; 24]>(l4, 0) else {
        return;
    };
    let (sport, dport) = (
        u16::from_be_bytes([u[0], u[1]]),
        u16::from_be_bytes([u[2], u[3]]),
    );
    let (flags, b) = match rtp_offset(u[8], u[9]) {
        Some(0) => (0, 8),
        Some(_) => (MEDIA_TURN, 12),
        None => return,
    };
    if rtp_payload_type(u[b], u[b + 1]).is_none() {
        return;
    }
    key.flags = flags;
    key.ssrc = u32::from_be_bytes([u[b + 8], u[b + 9], u[b + 10], u[b + 11]]);
    // Keys speak from the site's side, as the classifier's do.
    if dir == DIR_UP {
        (key.lan, key.peer, key.lan_port, key.peer_port) = (src, dst, sport, dport);
    } else {
        (key.lan, key.peer, key.lan_port, key.peer_port) = (dst, src, dport, sport);
    }
    // The stream's slot, else MEDIA (as the classifier looks).
    if let Some(sl) = MEDIA_SLOTS.get_ptr_mut(media_slot(&key)) {
        // SAFETY: a map value, changed in place (as the classifier's updates are).
        let sl = unsafe { &mut *sl };
        if sl.key.same(&key) {
            sl.stream.gw_drops += 1;
            return;
        }
    }
    if let Some(s) = MEDIA.get_ptr_mut(&key) {
        // SAFETY: a map value, changed in place (as the classifier's updates are).
        unsafe { (*s).gw_drops += 1 };
    }
}
