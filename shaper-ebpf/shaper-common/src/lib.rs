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

pub mod media;

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

/// A direction of traffic through the gateway: the one type for it on both sides of the
/// ABI. Upload is shaped on WAN egress, download on LAN egress. Its value (`as u32`) is
/// the direction index of every per-direction map slot and of `Event::dir`.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Dir {
    /// LAN to internet: shaped on WAN egress.
    Up = 0,
    /// Internet to LAN: shaped on LAN egress.
    Down = 1,
}

impl Dir {
    /// Both directions, in index order.
    pub const ALL: [Dir; 2] = [Dir::Up, Dir::Down];

    /// The direction index (0 or 1) for arrays and map slots.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The direction of an ABI value (`Event::dir`, a map slot's direction).
    pub const fn from_u32(v: u32) -> Option<Dir> {
        match v {
            0 => Some(Dir::Up),
            1 => Some(Dir::Down),
            _ => None,
        }
    }

    /// How configs, logs and reports name it: `upload` / `download`.
    pub const fn name(self) -> &'static str {
        match self {
            Dir::Up => "upload",
            Dir::Down => "download",
        }
    }

    /// The interface role whose egress shapes it: `wan` / `lan`.
    pub const fn egress(self) -> &'static str {
        match self {
            Dir::Up => "wan",
            Dir::Down => "lan",
        }
    }

    /// The other direction.
    pub const fn reverse(self) -> Dir {
        match self {
            Dir::Up => Dir::Down,
            Dir::Down => Dir::Up,
        }
    }
}

/// Direction index of [`Dir::Up`] (upload = WAN egress), for the kernel's map slots.
pub const DIR_UP: u32 = Dir::Up as u32;
/// Direction index of [`Dir::Down`] (download = LAN egress).
pub const DIR_DOWN: u32 = Dir::Down as u32;

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
/// `Config::flags`: `[download] window_clamp`: the receive window in the ACKs LAN
/// hosts send to the WAN is clamped to each download flow's share of its class's
/// rate times (round trip + `Config::clamp_queue_us`) (see [`clamp_window`]).
pub const CFG_WINDOW_CLAMP: u32 = 1 << 8;
/// `Config::flags`: RTP streams in the classes of `Config::media_classes` are measured
/// ([`media`]).
pub const CFG_MEDIA: u32 = 1 << 9;
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
/// `[download] window_clamp` (counted in the download slots, whichever hook saw the
/// packet): ACKs from the LAN whose receive window was lowered.
pub const G_ACKS_CLAMPED: u32 = 17;
/// TCP connections whose handshake (both SYNs, and a WAN round-trip sample) was
/// seen, so their windows are clamped.
pub const G_FLOWS_TRACKED: u32 = 18;
/// Window rewrites given up (the store or checksum helper failed, or the TCP header
/// sits at an odd offset the checksum helper refuses): the ACK left as it was.
pub const G_CLAMP_FAILED: u32 = 19;
pub const GLOBAL_COUNTERS: u32 = 20;
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
    "acks_clamped",
    "flows_tracked",
    "clamp_failed",
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
/// [`ClampKey`] -> [`ClampVal`]: TCP connections followed for `[download]
/// window_clamp` (least recently used make room).
pub const MAP_CLAMP_FLOWS: &str = "CLAMP_FLOWS";
/// Indexed by download class: the window clamp's per-flow share of the class's
/// rate, in bytes per second (u64; 0: leave the class's flows alone). Written by
/// user space: at load, the class's ceiling (one flow); then by `shaper run`
/// every [`CLAMP_TICK_MS`] from the class's rate in the kernel and its active flows.
pub const MAP_CLAMP_SHARE: &str = "CLAMP_SHARE";
/// Indexed by download class: [`ActiveWindow`], the clamped flows that carried
/// [`CLAMP_ACTIVE_BYTES`] of download data in the current and the last epoch (2^30 ns).
pub const MAP_CLAMP_ACTIVE: &str = "CLAMP_ACTIVE";
/// The classifier program's name in the object file.
pub const PROG_CLASSIFY: &str = "shaper_classify";
/// An empty program in the same object, for benchmarks.
pub const PROG_EMPTY: &str = "shaper_empty";
/// Every map the user side fills or reads.
pub const ALL_MAPS: [&str; 31] = [
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
    MAP_CLAMP_FLOWS,
    MAP_CLAMP_SHARE,
    MAP_CLAMP_ACTIVE,
    media::MAP_MEDIA,
    media::MAP_MEDIA_PROBE,
    media::MAP_MEDIA_SLOTS,
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
    /// `[download] window_clamp_queue_ms` in microseconds: the queue each clamped
    /// flow may keep in the modem, on top of its round trip.
    pub clamp_queue_us: u32,
    pub _pad: u32,
    /// Bit c: RTP streams in class index c are measured (with [`CFG_MEDIA`]).
    pub media_classes: u64,
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
    /// `[calls]`: where the flow's measured streams live, when in a slot (see
    /// `media::MediaHint`); zeroes otherwise.
    pub media: [media::MediaHint; media::MEDIA_HINTS],
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

// ---------------------------------------------------------------------------
// `[download] window_clamp`: receive-window clamping ("TCP rate control").

/// TCP connections the window clamp follows at once.
pub const MAX_CLAMP_FLOWS: u32 = 16384;
/// Active flows are counted per epoch of 2^CLAMP_EPOCH_SHIFT ns (about 1.07 s).
pub const CLAMP_EPOCH_SHIFT: u32 = 30;
/// How often `shaper run` refreshes [`MAP_CLAMP_SHARE`] (ms).
pub const CLAMP_TICK_MS: u64 = 200;
/// The segment size assumed when neither SYN carried an MSS option.
pub const CLAMP_DEFAULT_MSS: u16 = 1460;
/// The smallest window the clamp leaves, in segments: fast retransmit needs three
/// duplicate ACKs, and receivers ACK every second segment.
pub const CLAMP_MIN_SEGMENTS: u64 = 4;
/// Largest window-scale shift (RFC 7323 §2.3: larger values are used as 14).
pub const TCP_MAX_WSCALE: u8 = 14;

/// Key of [`MAP_CLAMP_FLOWS`]: the WAN peer's address and port, the LAN-side
/// port and the family. Not the LAN-side address: on a masquerading gateway the
/// WAN egress hook sees the public (post-NAT) source and the LAN egress hook the
/// private destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClampKey {
    pub peer: [u8; 16],
    pub peer_port: u16,
    pub lan_port: u16,
    /// 4 or 6.
    pub family: u8,
    pub _pad: [u8; 3],
}

/// Value of [`MAP_CLAMP_FLOWS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClampVal {
    /// When the LAN host's SYN (or SYN-ACK) left for the WAN (ns, monotonic).
    pub syn_ns: u64,
    /// The WAN round trip measured on the handshake (ns); 0 until measured.
    pub rtt_ns: u32,
    /// The highest right edge (ACK + window) advertised to the peer so far, valid
    /// with [`CL_EDGE`].
    pub right_edge: u32,
    /// The connection's download class (from the peer's SYN or data), or [`NO_CLASS`].
    pub class: u32,
    /// The last epoch the flow was counted active in [`MAP_CLAMP_ACTIVE`].
    pub epoch: u32,
    /// Segment size: the smaller of the two SYNs' MSS options (0: none seen).
    pub mss: u16,
    /// The window of the LAN host's SYN (unscaled, as SYN windows are).
    pub lan_win: u16,
    /// The LAN host's window-scale shift (0..=14).
    pub shift: u8,
    /// `CL_*`.
    pub flags: u8,
    pub _pad: [u8; 2],
    /// Download payload bytes the flow carried in `epoch`.
    pub epoch_bytes: u32,
    pub _pad2: u32,
}

/// The LAN host sent the SYN (it initiated).
pub const CL_LAN_SYN: u8 = 1;
/// The peer sent the SYN (it initiated).
pub const CL_PEER_SYN: u8 = 2;
/// The LAN host's SYN or SYN-ACK carried the window-scale option.
pub const CL_LAN_WS: u8 = 4;
/// The peer's SYN or SYN-ACK carried the window-scale option.
pub const CL_PEER_WS: u8 = 8;
/// `right_edge` is valid.
pub const CL_EDGE: u8 = 16;
/// The LAN host's SYN-ACK was seen (peer-initiated connections).
pub const CL_LAN_SYNACK: u8 = 32;
/// Both SYNs and a round-trip sample were seen: the flow's ACKs are clamped.
pub const CL_READY: u8 = 64;

/// A flow counts as active in [`MAP_CLAMP_ACTIVE`] once it carried this many download
/// payload bytes in an epoch (about 11 full segments, ~120 kbit/s): bulk flows share
/// the class's rate; a flow that only trickles (a keep-alive, a control connection)
/// does not halve their windows.
pub const CLAMP_ACTIVE_BYTES: u32 = 16 * 1024;

/// Per download class ([`MAP_CLAMP_ACTIVE`]): how many clamped flows carried
/// [`CLAMP_ACTIVE_BYTES`] or more in an epoch. Shared by the CPUs, updated without atomics (an estimate).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ActiveWindow {
    /// The epoch `count` is for (monotonic ns >> [`CLAMP_EPOCH_SHIFT`]).
    pub epoch: u64,
    /// Flows active in `epoch` so far.
    pub count: u64,
    /// Flows active in the epoch before (0 if that epoch saw none).
    pub prev: u64,
}

impl ActiveWindow {
    /// Active flows as of epoch `now`: the busier of the current and the last epoch.
    pub fn active(&self, now: u64) -> u64 {
        if self.epoch == now {
            if self.count > self.prev {
                self.count
            } else {
                self.prev
            }
        } else if self.epoch.wrapping_add(1) == now {
            self.count
        } else {
            0
        }
    }
}

/// The target window in bytes: `share_bps` (bytes per second) times
/// `rtt_ns + queue_ns`, at least [`CLAMP_MIN_SEGMENTS`] segments of `mss`.
#[inline(always)]
pub fn clamp_target(share_bps: u64, rtt_ns: u64, queue_ns: u64, mss: u16) -> u64 {
    let share = if share_bps > u32::MAX as u64 {
        u32::MAX as u64
    } else {
        share_bps
    };
    let mut t = rtt_ns.saturating_add(queue_ns);
    if t > u32::MAX as u64 {
        t = u32::MAX as u64;
    }
    // Both factors below 2^32: no overflow.
    let w = share * t / 1_000_000_000;
    let mss = if mss == 0 { CLAMP_DEFAULT_MSS } else { mss } as u64;
    let floor = CLAMP_MIN_SEGMENTS * mss;
    if w < floor {
        floor
    } else {
        w
    }
}

/// The window field to send instead of `win` (scaled by `shift`) in an ACK of
/// `ack`, for a target of `target` bytes, and the flow's right edge after it.
///
/// `win' = min(win, max(min(win, ceil(target / 2^shift)), ceil((R - ack) / 2^shift)))`,
/// where `R` (`edge`, if `have_edge`) is the highest right edge advertised before:
/// the clamp never moves the right edge left (RFC 9293 SHLD-14), since the window
/// it cuts takes effect only as ACKs advance. It never offers more than the host
/// did (`win`): a host that shrinks its own window is passed on as it is. The
/// target is rounded up to the scale's unit and is at least one unit. `target =
/// u64::MAX` only tracks the edge.
#[inline(always)]
pub fn clamp_window(
    win: u16,
    shift: u8,
    ack: u32,
    edge: u32,
    have_edge: bool,
    target: u64,
) -> (u16, u32) {
    let shift = if shift > TCP_MAX_WSCALE {
        TCP_MAX_WSCALE
    } else {
        shift
    } as u32;
    let unit = 1u64 << shift;
    let orig = win as u64;
    let mut w = orig;
    if target != u64::MAX {
        let mut t = (target + (unit - 1)) >> shift;
        if t == 0 {
            t = 1;
        }
        if t < w {
            w = t;
        }
        if have_edge {
            let d = edge.wrapping_sub(ack) as i32;
            if d > 0 {
                let need = ((d as u64) + (unit - 1)) >> shift;
                if need > w {
                    w = need;
                }
            }
        }
        if w > orig {
            w = orig;
        }
    }
    let new_edge = ack.wrapping_add((w as u32) << shift);
    let edge = if !have_edge || (new_edge.wrapping_sub(edge) as i32) > 0 {
        new_edge
    } else {
        edge
    };
    (w as u16, edge)
}

/// What a SYN's options said ([`tcp_opt_step`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpOpts {
    /// Offset of the next option within the options.
    pub pos: u32,
    /// Bytes of options (TCP header length - 20, at most 40).
    pub len: u32,
    /// MSS option value (0: none).
    pub mss: u32,
    /// Window-scale shift (valid with `has_ws`), capped at 14.
    pub ws: u32,
    pub has_ws: u32,
    /// 1 once parsing stopped (end of options, EOL, or a malformed option).
    pub done: u32,
}

/// Maximum bytes of TCP options.
pub const TCP_MAX_OPTS: u32 = 40;

/// One option of a TCP header's options (`st.pos` moves past it): call at most
/// [`TCP_MAX_OPTS`] times, until it returns false. `byte(i)` reads the options'
/// byte `i` (None past the packet). EOL ends the options; NOP is one byte; every
/// other option has a length byte of at least 2 that must fit in the options;
/// MSS (kind 2) has length 4, window scale (kind 3) length 3 (RFC 9293 §3.1,
/// RFC 7323 §2.2; other lengths: the option is skipped). Anything malformed
/// stops the parse with what was found before it.
#[inline(always)]
pub fn tcp_opt_step<F: Fn(u32) -> Option<u8>>(st: &mut TcpOpts, byte: F) -> bool {
    let pos = st.pos;
    let len = if st.len > TCP_MAX_OPTS {
        TCP_MAX_OPTS
    } else {
        st.len
    };
    if st.done != 0 || pos >= len {
        st.done = 1;
        return false;
    }
    let Some(kind) = byte(pos) else {
        st.done = 1;
        return false;
    };
    match kind {
        0 => {
            st.done = 1;
            return false;
        }
        1 => {
            st.pos = pos + 1;
            return true;
        }
        _ => {}
    }
    if pos + 1 >= len {
        st.done = 1;
        return false;
    }
    let Some(olen) = byte(pos + 1) else {
        st.done = 1;
        return false;
    };
    let olen = olen as u32;
    if olen < 2 || pos + olen > len {
        st.done = 1;
        return false;
    }
    if kind == 2 && olen == 4 {
        if let (Some(a), Some(b)) = (byte(pos + 2), byte(pos + 3)) {
            st.mss = u16::from_be_bytes([a, b]) as u32;
        }
    } else if kind == 3 && olen == 3 {
        if let Some(s) = byte(pos + 2) {
            st.ws = if s > TCP_MAX_WSCALE {
                TCP_MAX_WSCALE as u32
            } else {
                s as u32
            };
            st.has_ws = 1;
        }
    }
    st.pos = pos + olen;
    true
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
    unsafe impl aya::Pod for ClampKey {}
    unsafe impl aya::Pod for ClampVal {}
    unsafe impl aya::Pod for ActiveWindow {}
    unsafe impl aya::Pod for media::MediaKey {}
    unsafe impl aya::Pod for media::MediaProbe {}
    unsafe impl aya::Pod for media::MediaStream {}
    unsafe impl aya::Pod for media::MediaSlot {}
    unsafe impl aya::Pod for media::MediaDropCfg {}
}
