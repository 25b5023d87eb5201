//! The classifier: a tc program on the WAN egress (upload) and the LAN egress
//! (download). It parses the packet, finds the highest-priority rule that
//! accepts it (see `shaper_common` for the bitmap scheme), writes the rule's
//! HTB class id into `skb->priority`, optionally re-marks DSCP on the WAN
//! side, and counts. It never drops: anything it cannot parse goes to the
//! default class, and it always returns TC_ACT_UNSPEC (TCX_NEXT) so other
//! programs on the hook still run.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    helpers::generated::{bpf_ktime_get_ns, bpf_loop, bpf_skb_load_bytes},
    macros::{classifier, map},
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, HashMap, LruHashMap, PerCpuArray, RingBuf,
    },
    programs::TcContext,
};
use shaper_common::*;

#[map(name = "CONFIG")]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
/// Bitmap store; its size is set by the loader to the number of distinct
/// bitmaps the compiled policy needs.
#[map(name = "BITMAPS")]
static BITMAPS: Array<Bitmap> = Array::with_max_entries(1, 0);
/// Indexed by direction * 256 + IP protocol (rules may apply to one direction).
#[map(name = "PROTO_IDX")]
static PROTO_IDX: Array<u32> = Array::with_max_entries(512, 0);
#[map(name = "DSCP_IDX")]
static DSCP_IDX: Array<u32> = Array::with_max_entries(64, 0);
#[map(name = "SPORT_IDX")]
static SPORT_IDX: Array<u32> = Array::with_max_entries(PORT_SLOTS, 0);
#[map(name = "DPORT_IDX")]
static DPORT_IDX: Array<u32> = Array::with_max_entries(PORT_SLOTS, 0);
#[map(name = "SRC4")]
static SRC4: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(MAX_PREFIXES, 0);
#[map(name = "DST4")]
static DST4: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(MAX_PREFIXES, 0);
#[map(name = "SRC6")]
static SRC6: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(MAX_PREFIXES, 0);
#[map(name = "DST6")]
static DST6: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(MAX_PREFIXES, 0);
#[map(name = "RULES")]
static RULES: Array<RuleInfo> = Array::with_max_entries(MAX_RULES as u32, 0);
#[map(name = "CLASSES")]
static CLASSES: Array<ClassInfo> = Array::with_max_entries(MAX_CLASSES as u32, 0);
#[map(name = "RULE_STATS")]
static RULE_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(2 * MAX_RULES as u32, 0);
#[map(name = "CLASS_STATS")]
static CLASS_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(2 * MAX_CLASSES as u32, 0);
/// Download class counters of what came in from the WAN (see shaper_common).
#[map(name = "WAN_ARRIVALS")]
static WAN_ARRIVALS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(MAX_CLASSES as u32, 0);
#[map(name = "GLOBAL_STATS")]
static GLOBAL_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(2 * GLOBAL_COUNTERS, 0);
#[map(name = "FRAGS")]
static FRAGS: LruHashMap<FragKey, FragVal> = LruHashMap::with_max_entries(MAX_FRAGS, 0);
/// Flow cache: the decision for a flow's first packet serves its later ones, so
/// the cost per packet does not grow with the number of rules.
#[map(name = "FLOWS")]
static FLOWS: LruHashMap<FlowKey, FlowVal> = LruHashMap::with_max_entries(MAX_FLOWS, 0);
/// What each class's claimed flows carried in the current window, per direction.
#[map(name = "CLAIMED")]
static CLAIMED: Array<ClaimWindow> = Array::with_max_entries(2 * MAX_CLASSES as u32, 0);
/// Connections whose class user space set from the TLS server name.
#[map(name = "HOST_FLOWS")]
static HOST_FLOWS: LruHashMap<HostKey, HostVal> = LruHashMap::with_max_entries(MAX_HOST_FLOWS, 0);
/// WAN-side addresses learned from DNS answers -> bitmap id (see shaper_common).
#[map(name = "LEARNED4")]
static LEARNED4: HashMap<[u8; 4], u32> = HashMap::with_max_entries(MAX_LEARNED, 0);
#[map(name = "LEARNED6")]
static LEARNED6: HashMap<[u8; 16], u32> = HashMap::with_max_entries(MAX_LEARNED, 0);
/// ClientHellos and QUIC Initials for user space.
#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);
/// DNS queries and answers for user space: a ring of their own, so a flood of
/// hellos cannot crowd them out.
#[map(name = "DNS_EVENTS")]
static DNS_EVENTS: RingBuf = RingBuf::with_byte_size(DNS_EVENTS_BYTES, 0);
/// DNS queries that went out from the LAN to the WAN, and when: only an answer
/// to one of them is handed to user space (see shaper_common).
#[map(name = "DNS_QUERIES")]
static DNS_QUERIES: LruHashMap<DnsKey, u64> = LruHashMap::with_max_entries(MAX_DNS_QUERIES, 0);
/// `[download] window_clamp`: TCP connections whose handshake was seen (see
/// [`clamp_packet`]).
#[map(name = "CLAMP_FLOWS")]
static CLAMP_FLOWS: LruHashMap<ClampKey, ClampVal> =
    LruHashMap::with_max_entries(MAX_CLAMP_FLOWS, 0);
/// Per download class: each clamped flow's share of the class's rate (bytes/s).
#[map(name = "CLAMP_SHARE")]
static CLAMP_SHARE: Array<u64> = Array::with_max_entries(MAX_CLASSES as u32, 0);
/// Per download class: clamped flows that carried CLAMP_ACTIVE_BYTES, per epoch.
#[map(name = "CLAMP_ACTIVE")]
static CLAMP_ACTIVE: Array<ActiveWindow> = Array::with_max_entries(MAX_CLASSES as u32, 0);

/// The window clamp's key and new flow state, off the stack.
#[repr(C)]
struct ClampScratch {
    key: ClampKey,
    val: ClampVal,
}

#[map(name = "CLAMP_SCRATCH")]
static CLAMP_SCRATCH: PerCpuArray<ClampScratch> = PerCpuArray::with_max_entries(1, 0);

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
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
struct Pkt {
    src: [u8; 16],
    dst: [u8; 16],
    /// `NO_PORT` when the packet carries no ports.
    sport: u32,
    dport: u32,
    /// IPv4 identification / IPv6 fragment id, for fragment tracking.
    frag_id: u32,
    /// Offset of the IP header, after any VLAN tags and PPPoE header (for
    /// DSCP re-marking).
    l3: u32,
    v6: u8,
    proto: u8,
    dscp: u8,
    /// FRAG_NONE, FRAG_FIRST or FRAG_LATER.
    frag: u8,
    /// A TCP segment that carries no data: BARE_ACK (ACK set, no SYN/FIN/RST),
    /// BARE_CONTROL (a SYN, SYN-ACK, FIN or RST) or BARE_NONE.
    bare: u8,
    _pad: [u8; 3],
    /// Bytes of L4 header + payload the IP header announces.
    l4_len: u32,
    /// Offset and length (as announced) of the L4 payload (TCP, UDP).
    payload_off: u32,
    payload_len: u32,
    /// Offset of the L4 header (when it has ports).
    l4: u32,
    _pad2: u32,
}

const FRAG_NONE: u8 = 0;
const FRAG_FIRST: u8 = 1;
const FRAG_LATER: u8 = 2;

const BARE_NONE: u8 = 0;
const BARE_ACK: u8 = 1;
const BARE_CONTROL: u8 = 2;

/// Parse outcomes.
const PARSED_IP: u32 = 0;
const PARSED_NON_IP: u32 = 1;
const PARSED_MALFORMED: u32 = 2;

#[map(name = "SCRATCH")]
static SCRATCH: PerCpuArray<Pkt> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn count_global(dir: u32, counter: u32) {
    if let Some(p) = GLOBAL_STATS.get_ptr_mut(dir * GLOBAL_COUNTERS + counter) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn count(map: &PerCpuArray<Counter>, index: u32, packets: u64, bytes: u64) {
    if let Some(p) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe {
            (*p).packets += packets;
            (*p).bytes += bytes;
        }
    }
}

#[classifier]
pub fn shaper_classify(ctx: TcContext) -> i32 {
    classify(&ctx);
    TC_ACT_UNSPEC
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
            let (rule, mut class) = decide(ctx, cfg, pkt, dir, bytes);
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
}

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
fn window_clamp(ctx: &TcContext, cfg: &Config, dir: u32, class: u32) {
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

/// Did this download packet come in from the WAN (and so cross the line)?
/// `ingress_ifindex` is the skb's `skb_iif`, set where the packet entered the
/// stack: the WAN device for routed packets, the WAN port for frames a bridge
/// forwards (it keeps the port's index); the LAN port for LAN-to-LAN traffic
/// routed or hairpinned back out of it; 0 for the box's own packets. None of
/// the latter crossed the line. An unknown WAN (`wan_ifindex` 0) counts every
/// packet, as this counter's readers did before it existed (all of
/// CLASS_STATS).
#[inline(always)]
fn from_wan(ctx: &TcContext, cfg: &Config) -> bool {
    // SAFETY: the context pointer is valid for the program's run.
    let iif = unsafe { (*ctx.skb.skb).ingress_ifindex };
    cfg.wan_ifindex == 0 || iif == cfg.wan_ifindex
}

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
fn hosts(ctx: &TcContext, pkt: &Pkt, dir: u32) -> Option<(u32, u32)> {
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

/// What a flow has carried: demotes a flow that turns bulk (by the thresholds of `class`,
/// the class this packet was decided into), promotes a default-class UDP flow that looks
/// like media, and demotes a claimed flow (decided by a server name, or promoted) that
/// finds its class's claimed total for the window used up.
#[inline(always)]
fn behave(cfg: &Config, v: &mut FlowVal, pkt: &Pkt, dir: u32, bytes: u64, class: u32) {
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
        return;
    }
    // The class the flow is in for this packet: a promoted flow's own, else this packet's.
    let class = if v.flags & FLOW_PROMOTED != 0 {
        v.class
    } else {
        class
    };
    let Some(ci) = CLASSES.get(class) else {
        return;
    };
    if ci.demote_class != NO_CLASS
        && ((ci.demote_bytes != 0 && v.total_bytes > ci.demote_bytes)
            || (ci.demote_window_bytes != 0 && v.window_bytes > ci.demote_window_bytes))
    {
        v.class = ci.demote_class;
        v.flags |= FLOW_DEMOTED;
        count_global(dir, G_DEMOTED);
        return;
    }
    let cap = if dir == DIR_UP {
        ci.claimed_window_bytes[0]
    } else {
        ci.claimed_window_bytes[1]
    };
    if cap == 0 || v.flags & (FLOW_BY_NAME | FLOW_PROMOTED) == 0 {
        return;
    }
    let Some(w) = CLAIMED.get_ptr_mut(dir * MAX_CLASSES as u32 + class) else {
        return;
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
}

/// Rule and class for a parsed packet, following fragments.
#[inline(always)]
fn decide(ctx: &TcContext, cfg: &Config, pkt: &Pkt, dir: u32, bytes: u64) -> (u32, u32) {
    if pkt.frag == FRAG_LATER {
        let key = frag_key(pkt, dir);
        // SAFETY: the value is copied out before any other map operation.
        let hit = unsafe { FRAGS.get(&key) }.copied();
        return match hit {
            Some(v) => {
                count_global(dir, G_FRAG_FOLLOWED);
                (v.rule, v.class)
            }
            None => {
                count_global(dir, G_FRAG_UNKNOWN);
                (NO_RULE, cfg.default_class)
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
                behave(cfg, v, pkt, dir, bytes, class);
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
                };
                if cfg.flags & CFG_FLOW_BEHAVIOUR != 0 {
                    // SAFETY: a helper without arguments.
                    f.window_start = unsafe { bpf_ktime_get_ns() };
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
    (d.rule, d.class)
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

#[inline(always)]
fn bitmap_id(map: &Array<u32>, index: u32, base: u32) -> u32 {
    match map.get(index) {
        Some(id) => *id ^ base,
        None => 0,
    }
}

#[inline(always)]
fn addr_id(
    v6: bool,
    addr: &[u8; 16],
    t4: &LpmTrie<[u8; 4], u32>,
    t6: &LpmTrie<[u8; 16], u32>,
    wild: u32,
) -> u32 {
    let hit = if v6 {
        t6.get(Key::new(128, *addr))
    } else {
        t4.get(Key::new(32, [addr[0], addr[1], addr[2], addr[3]]))
    };
    match hit {
        Some(id) => *id,
        None => wild,
    }
}

/// The WAN-side address's bitmap id: a learned host address first, then the
/// static prefixes.
#[inline(always)]
fn dst_id(cfg: &Config, pkt: &Pkt) -> u32 {
    if cfg.flags & CFG_HOSTS != 0 {
        // SAFETY: the value is copied out at once.
        let hit = unsafe {
            if pkt.v6 != 0 {
                LEARNED6.get(&pkt.dst).copied()
            } else {
                LEARNED4
                    .get(&[pkt.dst[0], pkt.dst[1], pkt.dst[2], pkt.dst[3]])
                    .copied()
            }
        };
        if let Some(id) = hit {
            return id;
        }
    }
    addr_id(pkt.v6 != 0, &pkt.dst, &DST4, &DST6, cfg.wild_dst)
}

/// Index of the lowest set bit of a non-zero word, branch-free: the population
/// count of the bits below it. (BPF has no ctz instruction, and a branchy
/// version multiplies the states the verifier must walk after the scan.)
#[inline(always)]
fn lowest_bit(w: u64) -> u32 {
    let mut x = (w & w.wrapping_neg()).wrapping_sub(1);
    x = x - ((x >> 1) & 0x5555_5555_5555_5555);
    x = (x & 0x3333_3333_3333_3333) + ((x >> 2) & 0x3333_3333_3333_3333);
    x = (x + (x >> 4)) & 0x0f0f_0f0f_0f0f_0f0f;
    (x.wrapping_mul(0x0101_0101_0101_0101) >> 56) as u32
}

/// State of the bitmap scan handed to the `bpf_loop` callback.
#[repr(C)]
struct Scan {
    ids: [u32; 6],
    rule: u32,
    _pad: u32,
}

/// One word of the AND of the six bitmaps; stops the loop at the first
/// non-zero word. Run through `bpf_loop` so the verifier checks it once,
/// whatever the number of words.
extern "C" fn scan_word(index: u64, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: ctx is the `Scan` on match_rule's stack, passed to bpf_loop.
    let s = unsafe { &mut *(ctx as *mut Scan) };
    let i = index as usize;
    let mut w = u64::MAX;
    let mut k = 0;
    while k < 6 {
        let Some(b) = BITMAPS.get(s.ids[k]) else {
            return 1;
        };
        let Some(x) = b.get(i) else { return 1 };
        w &= *x;
        k += 1;
    }
    if w != 0 {
        s.rule = (i as u32) * 64 + lowest_bit(w);
        return 1;
    }
    0
}

#[inline(always)]
fn match_rule(cfg: &Config, pkt: &Pkt, dir: u32) -> u32 {
    let mut scan = Scan {
        ids: [
            bitmap_id(&PROTO_IDX, dir * 256 + pkt.proto as u32, cfg.proto_base),
            bitmap_id(&DSCP_IDX, pkt.dscp as u32, cfg.dscp_base),
            bitmap_id(&SPORT_IDX, pkt.sport, cfg.sport_base),
            bitmap_id(&DPORT_IDX, pkt.dport, cfg.dport_base),
            addr_id(pkt.v6 != 0, &pkt.src, &SRC4, &SRC6, cfg.wild_src),
            dst_id(cfg, pkt),
        ],
        rule: NO_RULE,
        _pad: 0,
    };
    let nwords = if (cfg.nwords as usize) < BITMAP_WORDS {
        cfg.nwords
    } else {
        BITMAP_WORDS as u32
    };
    // SAFETY: bpf_loop calls scan_word with our stack struct as its context.
    unsafe {
        bpf_loop(
            nwords,
            scan_word as *mut core::ffi::c_void,
            &mut scan as *mut Scan as *mut core::ffi::c_void,
            0,
        );
    }
    scan.rule
}

#[inline(always)]
fn load<T>(ctx: &TcContext, off: usize) -> Option<T> {
    ctx.load::<T>(off).ok()
}

#[inline(always)]
fn parse(ctx: &TcContext, l2: bool, pkt: &mut Pkt) -> u32 {
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
const MAX_HDR_OFF: usize = 1024;

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
