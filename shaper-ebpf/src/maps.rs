//! The classifier's maps: its configuration and policy (written by the loader),
//! its counters, the flow, fragment, host-name, DNS, window-clamp and media state
//! it keeps, the event rings it fills for user space, and the per-CPU scratch slots
//! it works in. The map names are the ABI user space opens them by (see
//! `shaper_common`).

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{lpm_trie::LpmTrie, Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use shaper_common::{
    media::{
        MediaDropCfg, MediaKey, MediaProbe, MediaSlot, MediaStream, MEDIA_MAX_PROBES,
        MEDIA_MAX_SLOTS, MEDIA_MAX_STREAMS,
    },
    *,
};

use crate::parse::Pkt;

#[map(name = "CONFIG")]
pub(crate) static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
/// Bitmap store; its size is set by the loader to the number of distinct
/// bitmaps the compiled policy needs.
#[map(name = "BITMAPS")]
pub(crate) static BITMAPS: Array<Bitmap> = Array::with_max_entries(1, 0);
/// Indexed by direction * 256 + IP protocol (rules may apply to one direction).
#[map(name = "PROTO_IDX")]
pub(crate) static PROTO_IDX: Array<u32> = Array::with_max_entries(512, 0);
#[map(name = "DSCP_IDX")]
pub(crate) static DSCP_IDX: Array<u32> = Array::with_max_entries(64, 0);
#[map(name = "SPORT_IDX")]
pub(crate) static SPORT_IDX: Array<u32> = Array::with_max_entries(PORT_SLOTS, 0);
#[map(name = "DPORT_IDX")]
pub(crate) static DPORT_IDX: Array<u32> = Array::with_max_entries(PORT_SLOTS, 0);
#[map(name = "SRC4")]
pub(crate) static SRC4: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(MAX_PREFIXES, 0);
#[map(name = "DST4")]
pub(crate) static DST4: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(MAX_PREFIXES, 0);
#[map(name = "SRC6")]
pub(crate) static SRC6: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(MAX_PREFIXES, 0);
#[map(name = "DST6")]
pub(crate) static DST6: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(MAX_PREFIXES, 0);
#[map(name = "RULES")]
pub(crate) static RULES: Array<RuleInfo> = Array::with_max_entries(MAX_RULES as u32, 0);
#[map(name = "CLASSES")]
pub(crate) static CLASSES: Array<ClassInfo> = Array::with_max_entries(MAX_CLASSES as u32, 0);
#[map(name = "RULE_STATS")]
pub(crate) static RULE_STATS: PerCpuArray<Counter> =
    PerCpuArray::with_max_entries(2 * MAX_RULES as u32, 0);
#[map(name = "CLASS_STATS")]
pub(crate) static CLASS_STATS: PerCpuArray<Counter> =
    PerCpuArray::with_max_entries(2 * MAX_CLASSES as u32, 0);
/// Download class counters of what came in from the WAN (see shaper_common).
#[map(name = "WAN_ARRIVALS")]
pub(crate) static WAN_ARRIVALS: PerCpuArray<Counter> =
    PerCpuArray::with_max_entries(MAX_CLASSES as u32, 0);
#[map(name = "GLOBAL_STATS")]
pub(crate) static GLOBAL_STATS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(2 * GLOBAL_COUNTERS, 0);
#[map(name = "FRAGS")]
pub(crate) static FRAGS: LruHashMap<FragKey, FragVal> = LruHashMap::with_max_entries(MAX_FRAGS, 0);
/// Flow cache: the decision for a flow's first packet serves its later ones, so
/// the cost per packet does not grow with the number of rules.
#[map(name = "FLOWS")]
pub(crate) static FLOWS: LruHashMap<FlowKey, FlowVal> = LruHashMap::with_max_entries(MAX_FLOWS, 0);
/// What each class's claimed flows carried in the current window, per direction.
#[map(name = "CLAIMED")]
pub(crate) static CLAIMED: Array<ClaimWindow> = Array::with_max_entries(2 * MAX_CLASSES as u32, 0);
/// Connections whose class user space set from the TLS server name.
#[map(name = "HOST_FLOWS")]
pub(crate) static HOST_FLOWS: LruHashMap<HostKey, HostVal> =
    LruHashMap::with_max_entries(MAX_HOST_FLOWS, 0);
/// WAN-side addresses learned from DNS answers -> bitmap id (see shaper_common).
#[map(name = "LEARNED4")]
pub(crate) static LEARNED4: HashMap<[u8; 4], u32> = HashMap::with_max_entries(MAX_LEARNED, 0);
#[map(name = "LEARNED6")]
pub(crate) static LEARNED6: HashMap<[u8; 16], u32> = HashMap::with_max_entries(MAX_LEARNED, 0);
/// ClientHellos and QUIC Initials for user space.
#[map(name = "EVENTS")]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);
/// DNS queries and answers for user space: a ring of their own, so a flood of
/// hellos cannot crowd them out.
#[map(name = "DNS_EVENTS")]
pub(crate) static DNS_EVENTS: RingBuf = RingBuf::with_byte_size(DNS_EVENTS_BYTES, 0);
/// DNS queries that went out from the LAN to the WAN, and when: only an answer
/// to one of them is handed to user space (see shaper_common).
#[map(name = "DNS_QUERIES")]
pub(crate) static DNS_QUERIES: LruHashMap<DnsKey, u64> =
    LruHashMap::with_max_entries(MAX_DNS_QUERIES, 0);
/// `[download] window_clamp`: TCP connections whose handshake was seen (see
/// [`crate::clamp::clamp_packet`]).
#[map(name = "CLAMP_FLOWS")]
pub(crate) static CLAMP_FLOWS: LruHashMap<ClampKey, ClampVal> =
    LruHashMap::with_max_entries(MAX_CLAMP_FLOWS, 0);
/// Per download class: each clamped flow's share of the class's rate (bytes/s).
#[map(name = "CLAMP_SHARE")]
pub(crate) static CLAMP_SHARE: Array<u64> = Array::with_max_entries(MAX_CLASSES as u32, 0);
/// Per download class: clamped flows that carried CLAMP_ACTIVE_BYTES, per epoch.
#[map(name = "CLAMP_ACTIVE")]
pub(crate) static CLAMP_ACTIVE: Array<ActiveWindow> =
    Array::with_max_entries(MAX_CLASSES as u32, 0);

/// `[calls]`: RTP streams in the measured classes (see [`crate::media`]).
#[map(name = "MEDIA")]
pub(crate) static MEDIA: LruHashMap<MediaKey, MediaStream> =
    LruHashMap::with_max_entries(MEDIA_MAX_STREAMS, 0);
/// `[calls]`: the streams that found their slot free (see [`crate::media`]). Mmapable:
/// user space copies the slots out of its memory once a second.
#[map(name = "MEDIA_SLOTS")]
pub(crate) static MEDIA_SLOTS: Array<MediaSlot> =
    Array::with_max_entries(MEDIA_MAX_SLOTS, BPF_F_MMAPABLE);
/// `[calls]`: each flow's SSRCs on probation, under its key with SSRC 0.
#[map(name = "MEDIA_PROBE")]
pub(crate) static MEDIA_PROBE: LruHashMap<MediaKey, MediaProbe> =
    LruHashMap::with_max_entries(MEDIA_MAX_PROBES, 0);

/// `[calls]`: where the drop tracer (`crate::drops`) finds the kernel structs' fields.
#[map(name = "MEDIA_DROP_CFG")]
pub(crate) static MEDIA_DROP_CFG: Array<MediaDropCfg> = Array::with_max_entries(1, 0);

/// The media measurement's new stream (104 bytes), off the stack (the classifier's own
/// frame leaves the measurement's subprogram less than 200 bytes; its key, 44 bytes, is
/// on it).
#[repr(C)]
pub(crate) struct MediaScratch {
    pub(crate) stream: MediaStream,
}

#[map(name = "MEDIA_SCRATCH")]
pub(crate) static MEDIA_SCRATCH: PerCpuArray<MediaScratch> = PerCpuArray::with_max_entries(1, 0);

/// The window clamp's key and new flow state, off the stack.
#[repr(C)]
pub(crate) struct ClampScratch {
    pub(crate) key: ClampKey,
    pub(crate) val: ClampVal,
}

#[map(name = "CLAMP_SCRATCH")]
pub(crate) static CLAMP_SCRATCH: PerCpuArray<ClampScratch> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "SCRATCH")]
pub(crate) static SCRATCH: PerCpuArray<Pkt> = PerCpuArray::with_max_entries(1, 0);
