//! The ABI shared by the kernel-side classifier (`shaper-ebpf`) and user space
//! (`shaper-user`): map names, sizes, `#[repr(C)]` value layouts and the
//! meaning of every slot. Both sides use these constants; nothing here is
//! computed at run time.
//!
//! # How a packet is classified
//! Every rule is one bit in a rule bitmap (bit `i` = rule with priority rank
//! `i`, lower rank wins). For each packet field the classifier looks up the
//! bitmap of the rules that accept the field's value (a rule without a
//! constraint on the field accepts every value), ANDs the six bitmaps
//! (protocol, DSCP, LAN-side port, WAN-side port, LAN-side address, WAN-side
//! address) and takes the lowest set bit. The number of map lookups is fixed;
//! the AND loop touches only the words in use and stops at the first non-zero
//! word, so typical packets that match a high-priority rule cost the same
//! with 10 or 10,000 rules.
#![no_std]

/// Rules are bits in a bitmap of this many bits.
pub const MAX_RULES: usize = 16384;
/// 64-bit words in one rule bitmap.
pub const BITMAP_WORDS: usize = MAX_RULES / 64;
/// Traffic classes per direction (HTB leaves).
pub const MAX_CLASSES: usize = 64;
/// Port index slot used for packets without ports (ICMP, non-first
/// fragments, protocols without ports).
pub const NO_PORT: u32 = 65536;
/// Entries in a port index map (65,536 ports + [`NO_PORT`]).
pub const PORT_SLOTS: u32 = 65537;
/// Prefix entries per LPM trie.
pub const MAX_PREFIXES: u32 = 65536;
/// Remembered first fragments (so later fragments follow their class).
pub const MAX_FRAGS: u32 = 4096;
/// Flow cache entries: a flow's later packets skip the rule scan.
pub const MAX_FLOWS: u32 = 16384;
/// WAN-side host addresses learned from DNS answers (per family).
pub const MAX_LEARNED: u32 = 32768;
/// Flows whose class was set from user space (TLS server name).
pub const MAX_HOST_FLOWS: u32 = 16384;
/// Bytes of L4 payload copied into one event (a DNS answer, a ClientHello's
/// first segment).
pub const EVENT_DATA: usize = 1500;
/// Size of the event ring buffer (a power of two, a multiple of the page size).
pub const EVENTS_BYTES: u32 = 256 * 1024;
/// Size of the DNS event ring ([`MAP_DNS_EVENTS`]): queries and answers have a
/// ring of their own, so a flood of ClientHellos or QUIC Initials (which anyone
/// on the LAN can send) cannot crowd them out.
pub const DNS_EVENTS_BYTES: u32 = 256 * 1024;
/// Bytes of a DNS query's UDP payload copied into its event: the header and the
/// question (a name is at most 255 bytes on the wire), and the start of what follows.
pub const DNS_QUERY_DATA: usize = 288;
/// DNS queries on their way out that the classifier remembers at once
/// ([`MAP_DNS_QUERIES`], least recently used make room).
pub const MAX_DNS_QUERIES: u32 = 8192;
/// An answer is handed to user space only this long after its query went out
/// (ns, monotonic); user space holds its own copy of the query as long.
pub const DNS_ANSWER_WITHIN_NS: u64 = 5_000_000_000;
/// Flow behaviour is measured over windows of this length.
pub const FLOW_WINDOW_NS: u64 = 1_000_000_000;
/// Rule index meaning "no rule matched": the packet goes to the default class.
pub const NO_RULE: u32 = u32::MAX;
/// `ClassInfo::dscp` value meaning "leave DSCP as it is".
pub const DSCP_KEEP: u8 = 0xff;

/// Direction index: upload = WAN egress, download = LAN egress.
pub const DIR_UP: u32 = 0;
pub const DIR_DOWN: u32 = 1;

/// `Config::flags`: the WAN interface carries an Ethernet header.
pub const CFG_WAN_L2: u32 = 1 << 0;
/// `Config::flags`: the LAN interface carries an Ethernet header.
pub const CFG_LAN_L2: u32 = 1 << 1;
/// `Config::flags`: re-mark DSCP on WAN egress per class.
pub const CFG_REMARK_WAN: u32 = 1 << 2;
/// `Config::flags`: do not use the flow cache (benchmarks of the full scan).
pub const CFG_NO_FLOW_CACHE: u32 = 1 << 3;
/// `Config::flags`: copy DNS answers (UDP from port 53, LAN egress) and TLS
/// ClientHellos (TCP to port 443, WAN egress) to user space.
pub const CFG_HOSTS: u32 = 1 << 4;
/// `Config::flags`: DSCP of upload packets (as the LAN sent them) is not
/// looked at by rules (classified as DSCP 0).
pub const CFG_IGNORE_DSCP_UP: u32 = 1 << 5;
/// `Config::flags`: DSCP of download packets (as the WAN delivered them) is
/// not looked at by rules.
pub const CFG_IGNORE_DSCP_DOWN: u32 = 1 << 6;
/// `Config::flags`: some class demotes flows, or promotion is configured:
/// the flow cache measures each flow.
pub const CFG_FLOW_BEHAVIOUR: u32 = 1 << 7;
/// `Config::flags`: the configuration is complete; until set, every packet
/// passes untouched (so a half-filled map set never classifies).
pub const CFG_READY: u32 = 1 << 31;

/// EtherType of IPv4.
pub const ETH_P_IP: u16 = 0x0800;
/// EtherType of IPv6.
pub const ETH_P_IPV6: u16 = 0x86dd;
/// EtherType (TPID) of an 802.1Q VLAN tag.
pub const ETH_P_8021Q: u16 = 0x8100;
/// EtherType (TPID) of an 802.1ad (QinQ service) VLAN tag.
pub const ETH_P_8021AD: u16 = 0x88a8;
/// EtherType of a PPPoE session frame (RFC 2516 §4; 0x8863 is discovery).
pub const ETH_P_PPP_SES: u16 = 0x8864;
/// PPPoE VER/TYPE byte of every session frame: version 1, type 1.
pub const PPPOE_VER_TYPE: u8 = 0x11;
/// PPPoE CODE of a session frame.
pub const PPPOE_CODE_SESSION: u8 = 0x00;
/// Bytes of a PPPoE session header: 6 of PPPoE (VER/TYPE, CODE, SESSION_ID,
/// LENGTH) and the 2-byte PPP protocol (Linux's `PPPOE_SES_HLEN`). With
/// protocol-field compression (RFC 1661 §6.5) the protocol is 1 byte and
/// the payload starts one byte earlier.
pub const PPPOE_SES_HLEN: usize = 8;
/// PPP protocol number of IPv4.
pub const PPP_IP: u16 = 0x0021;
/// PPP protocol number of IPv6.
pub const PPP_IPV6: u16 = 0x0057;

/// Per-direction global counters (index = dir * GLOBAL_COUNTERS + counter).
pub const G_PACKETS: u32 = 0;
pub const G_NON_IP: u32 = 1;
pub const G_MALFORMED: u32 = 2;
pub const G_FRAG_FOLLOWED: u32 = 3;
pub const G_FRAG_UNKNOWN: u32 = 4;
pub const G_DEFAULT: u32 = 5;
pub const G_REMARKED: u32 = 6;
pub const G_IPV6: u32 = 7;
pub const G_PURE_ACK: u32 = 8;
pub const G_FLOW_CACHE_HIT: u32 = 9;
/// Packets whose class came from a host-name decision (TLS SNI).
pub const G_HOST_FLOW_HIT: u32 = 10;
/// Events (DNS answers, ClientHellos) handed to user space.
pub const G_EVENTS: u32 = 11;
/// Events lost (ring buffer full or the copy failed).
pub const G_EVENTS_LOST: u32 = 12;
/// Flows moved out of their class for turning bulk.
pub const G_DEMOTED: u32 = 13;
/// Default-class flows promoted for looking like media.
pub const G_PROMOTED: u32 = 14;
/// DNS answers (UDP from port 53 on their way to the LAN) not handed to user
/// space: not from the WAN, or answering no query that went out from the LAN
/// (same id, ports and addresses) in the last [`DNS_ANSWER_WITHIN_NS`].
pub const G_DNS_UNMATCHED: u32 = 15;
/// DNS events (queries, answers) lost: their ring was full.
pub const G_DNS_EVENTS_LOST: u32 = 16;
pub const GLOBAL_COUNTERS: u32 = 17;
/// Names of the global counters, in index order (for status output).
pub const GLOBAL_COUNTER_NAMES: [&str; GLOBAL_COUNTERS as usize] = [
    "packets",
    "non_ip",
    "malformed",
    "fragments_followed",
    "fragments_unknown",
    "default_class",
    "dscp_remarked",
    "ipv6",
    "pure_tcp_acks",
    "flow_cache_hits",
    "host_flow_hits",
    "events",
    "events_lost",
    "flows_demoted",
    "flows_promoted",
    "dns_answers_unmatched",
    "dns_events_lost",
];

/// Map names (as in the object file and under the pin directory).
pub const MAP_CONFIG: &str = "CONFIG";
pub const MAP_BITMAPS: &str = "BITMAPS";
/// Indexed by direction * 256 + protocol.
pub const MAP_PROTO_IDX: &str = "PROTO_IDX";
pub const MAP_DSCP_IDX: &str = "DSCP_IDX";
pub const MAP_SPORT_IDX: &str = "SPORT_IDX";
pub const MAP_DPORT_IDX: &str = "DPORT_IDX";
pub const MAP_SRC4: &str = "SRC4";
pub const MAP_DST4: &str = "DST4";
pub const MAP_SRC6: &str = "SRC6";
pub const MAP_DST6: &str = "DST6";
pub const MAP_RULES: &str = "RULES";
pub const MAP_CLASSES: &str = "CLASSES";
pub const MAP_RULE_STATS: &str = "RULE_STATS";
/// Indexed by direction * MAX_CLASSES + class: everything the classifier
/// steered into the class.
pub const MAP_CLASS_STATS: &str = "CLASS_STATS";
/// Indexed by (download) class: the part of the class's download counters
/// that came in from the WAN (`__sk_buff.ingress_ifindex` =
/// [`Config::wan_ifindex`]), i.e. crossed the line: what `[download]
/// account_arrivals` measures. LAN-to-LAN traffic routed or hairpinned back
/// out of the LAN port and the box's own traffic (ingress index 0) are not
/// in it.
pub const MAP_WAN_ARRIVALS: &str = "WAN_ARRIVALS";
/// Indexed by direction * MAX_CLASSES + class: [`ClaimWindow`].
pub const MAP_CLAIMED: &str = "CLAIMED";
pub const MAP_GLOBAL_STATS: &str = "GLOBAL_STATS";
pub const MAP_FRAGS: &str = "FRAGS";
pub const MAP_FLOWS: &str = "FLOWS";
/// Ring buffer of [`Event`]s for user space: ClientHellos and QUIC Initials.
pub const MAP_EVENTS: &str = "EVENTS";
/// Ring buffer of DNS events for user space: queries going out to the WAN
/// ([`QueryEvent`], [`EV_DNS_QUERY`]) and the answers to them ([`Event`], [`EV_DNS`]).
pub const MAP_DNS_EVENTS: &str = "DNS_EVENTS";
/// [`DnsKey`] -> the time (ns, monotonic) a query went out from the LAN to the
/// WAN: an answer on its way to the LAN is handed to user space only if it
/// came in from the WAN and answers one of these (which it then removes).
pub const MAP_DNS_QUERIES: &str = "DNS_QUERIES";
/// [`HostKey`] -> [`HostVal`]: flows classified by server name.
pub const MAP_HOST_FLOWS: &str = "HOST_FLOWS";
/// WAN-side IPv4 / IPv6 address -> bitmap id, for addresses learned from DNS
/// answers: looked up before the WAN-side trie, in constant time however many
/// there are (host entries in the trie deepen it for every lookup near them).
pub const MAP_LEARNED4: &str = "LEARNED4";
pub const MAP_LEARNED6: &str = "LEARNED6";
/// The classifier program's name in the object file.
pub const PROG_CLASSIFY: &str = "shaper_classify";
/// An empty program in the same object, for benchmarks.
pub const PROG_EMPTY: &str = "shaper_empty";
/// Every map the user side fills or reads.
pub const ALL_MAPS: [&str; 25] = [
    MAP_CONFIG,
    MAP_BITMAPS,
    MAP_PROTO_IDX,
    MAP_DSCP_IDX,
    MAP_SPORT_IDX,
    MAP_DPORT_IDX,
    MAP_SRC4,
    MAP_DST4,
    MAP_SRC6,
    MAP_DST6,
    MAP_RULES,
    MAP_CLASSES,
    MAP_RULE_STATS,
    MAP_CLASS_STATS,
    MAP_WAN_ARRIVALS,
    MAP_CLAIMED,
    MAP_GLOBAL_STATS,
    MAP_FRAGS,
    MAP_FLOWS,
    MAP_EVENTS,
    MAP_DNS_EVENTS,
    MAP_DNS_QUERIES,
    MAP_HOST_FLOWS,
    MAP_LEARNED4,
    MAP_LEARNED6,
];

/// One rule bitmap.
pub type Bitmap = [u64; BITMAP_WORDS];

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// The interface the upload hook is on. It is also the ingress interface
    /// (`skb_iif`) of what comes in from the WAN: the WAN device when routed,
    /// the WAN port when bridged (a bridge forwards a frame with the port it
    /// came in on as its `skb_iif`). 0 (unknown): every download packet counts
    /// as a WAN arrival.
    pub wan_ifindex: u32,
    pub lan_ifindex: u32,
    /// Words of each bitmap in use: ceil(rules / 64), at least 1.
    pub nwords: u32,
    /// Class index (into CLASSES) of the default class.
    pub default_class: u32,
    /// Bitmap id used when the LAN-side address hits no prefix.
    pub wild_src: u32,
    /// Bitmap id used when the WAN-side address hits no prefix.
    pub wild_dst: u32,
    pub flags: u32,
    /// Class index for pure TCP ACKs (no payload), or [`NO_CLASS`].
    pub ack_class: u32,
    /// The index maps hold `bitmap id ^ base`, with each map's most common id as
    /// its base: only the entries that differ from it need writing (a port map
    /// has 65,537 slots; most hold the same id).
    pub proto_base: u32,
    pub dscp_base: u32,
    pub sport_base: u32,
    pub dport_base: u32,
    /// Class index default-class UDP flows are promoted to, or [`NO_CLASS`].
    pub promote_class: u32,
    /// Promotion: at least this many packets in a window ...
    pub promote_min_packets: u32,
    /// ... at most this many bytes in the window ...
    pub promote_max_bytes: u32,
    /// ... and packets of at most this size on average.
    pub promote_max_packet: u32,
}

/// `Config::ack_class` value: pure ACKs are classified like any packet.
pub const NO_CLASS: u32 = u32::MAX;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleInfo {
    /// Class index (into CLASSES).
    pub class: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassInfo {
    /// HTB class id (major << 16 | minor) written into `skb->priority`.
    pub classid: u32,
    /// DSCP to write on WAN egress, or [`DSCP_KEEP`].
    pub dscp: u8,
    pub _pad: [u8; 3],
    /// Class index a flow of this class is demoted to, or [`NO_CLASS`].
    pub demote_class: u32,
    pub _pad2: u32,
    /// Demote once the flow has carried more than this many bytes (0: never).
    pub demote_bytes: u64,
    /// Demote when the flow carries more than this many bytes in one window
    /// (0: never).
    pub demote_window_bytes: u64,
    /// Per direction: what the class's claimed flows (decided by a server name, or
    /// promoted into it) may carry together in one window, in bytes (0: no cap). While
    /// the last window carried more, each claimed flow closing a window of its own is
    /// demoted (to `demote_class`, else the default class) until the rest fit.
    pub claimed_window_bytes: [u64; 2],
}

/// Per-rule / per-class classifier counter. A GSO/GRO packet counts as the
/// segments it leaves as, each with its own headers, as the qdiscs count it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// Key of the first-fragment map: addresses as 16 bytes (IPv4 mapped into the
/// first 4), the IP identification and the protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub id: u32,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// Key of the flow cache: everything a rule can look at, from the site's side
/// (src = LAN), per direction. A new policy comes with a new, empty cache.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u32,
    pub dport: u32,
    pub proto: u8,
    /// Zero. (DSCP is not in the key: a sender changing it on every packet must not
    /// split its flow into fresh ones that each escape demotion.)
    pub _pad: u8,
    pub dir: u8,
    pub family: u8,
}

/// Value of the flow cache: the decision and what the flow has carried.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowVal {
    /// Rule index, or [`NO_RULE`].
    pub rule: u32,
    pub class: u32,
    /// Start of the current measuring window (ns, monotonic).
    pub window_start: u64,
    pub window_bytes: u64,
    pub total_bytes: u64,
    pub window_packets: u32,
    /// `FLOW_DEMOTED`, `FLOW_PROMOTED`, `FLOW_BY_NAME`.
    pub flags: u32,
    /// The DSCP the cached decision was made with: a packet of the flow with another
    /// DSCP is matched afresh (rules may name DSCP), still counted in this flow.
    pub dscp: u32,
    pub _pad: u32,
}

pub const FLOW_DEMOTED: u32 = 1;
pub const FLOW_PROMOTED: u32 = 2;
/// The flow's class was decided by a TLS/QUIC server name.
pub const FLOW_BY_NAME: u32 = 4;

/// A class's window of what its claimed flows (decided by a server name, or promoted)
/// carried, per direction ([`MAP_CLAIMED`], shared by the CPUs, updated atomically).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClaimWindow {
    /// Start of the window (ns, monotonic).
    pub start: u64,
    /// Bytes of the claimed flows in this window so far.
    pub bytes: u64,
    /// ... in the last window, less what flows demoted since took of it.
    pub prev: u64,
}

/// Key of the host-flow map: a connection from the site's side (src = LAN),
/// the same in both directions.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HostKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u32,
    pub dport: u32,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// Value of the host-flow map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostVal {
    /// Rule index, or [`NO_RULE`] while undecided.
    pub rule: u32,
    pub class: u32,
    /// `HOST_DECIDED`, `HOST_WANT_MORE`.
    pub flags: u32,
    pub _pad: u32,
}

/// The flow's class is `HostVal::class`.
pub const HOST_DECIDED: u32 = 1;
/// User space needs the flow's next payload (a ClientHello split over segments).
pub const HOST_WANT_MORE: u32 = 2;

/// Event kinds.
/// A DNS answer ([`Event`], in [`MAP_DNS_EVENTS`]) to a query seen going out.
pub const EV_DNS: u32 = 1;
/// A ClientHello's segment or a QUIC Initial ([`Event`], in [`MAP_EVENTS`]).
pub const EV_TLS: u32 = 2;
/// A DNS query from the LAN on its way to the WAN ([`QueryEvent`], in
/// [`MAP_DNS_EVENTS`]).
pub const EV_DNS_QUERY: u32 = 3;

/// One event in a ring buffer: the packet's connection (from the site's side)
/// and the first `len` bytes (at most `N`) of its L4 payload. The fields before
/// `data` are the same for every size, so a reader can tell the kind first.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EventOf<const N: usize> {
    pub kind: u32,
    pub len: u32,
    pub dir: u32,
    /// DSCP as the rules saw it (0 when the side's DSCP is ignored).
    pub dscp: u32,
    pub key: HostKey,
    pub data: [u8; N],
}

/// A DNS answer, a ClientHello's segment or a QUIC Initial.
pub type Event = EventOf<EVENT_DATA>;
/// A DNS query (its header and question).
pub type QueryEvent = EventOf<DNS_QUERY_DATA>;
/// Offset of `data` in every [`EventOf`].
pub const EVENT_HEADER: usize = core::mem::offset_of!(Event, data);

/// Key of the DNS query map: a query from the site's side (`client`, the LAN
/// host, asked `resolver` from `client_port`, to port 53) and its id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DnsKey {
    pub client: [u8; 16],
    pub resolver: [u8; 16],
    pub client_port: u16,
    /// The DNS message id.
    pub id: u16,
    /// 4 or 6.
    pub family: u8,
    pub _pad: [u8; 3],
}

/// Value of the first-fragment map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragVal {
    /// Rule index, or [`NO_RULE`].
    pub rule: u32,
    pub class: u32,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all types are #[repr(C)], plain integers with explicit padding.
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for RuleInfo {}
    unsafe impl aya::Pod for ClassInfo {}
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragVal {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowVal {}
    unsafe impl aya::Pod for ClaimWindow {}
    unsafe impl aya::Pod for HostKey {}
    unsafe impl aya::Pod for HostVal {}
    unsafe impl aya::Pod for DnsKey {}
}
