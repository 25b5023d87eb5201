//! Policy -> the kernel's view: the HTB class tree for each direction and the
//! classifier's map contents (rule bitmaps and the per-field indexes that
//! point at them). Pure functions; nothing here touches the kernel.

use std::collections::HashMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use shaper_common::{ClassInfo, BITMAP_WORDS, DSCP_KEEP, NO_CLASS, NO_PORT, PORT_SLOTS};

use crate::config::{
    format_rate, mask_addr, Cidr, Framing, LeafChoice, LinkAccounting, Policy, Rule,
};
use crate::dir::{Dir, PerDir};

/// HTB root handle (1:) on both interfaces.
pub const ROOT_HANDLE: u32 = 0x0001_0000;
/// The parent class 1:1 that carries the direction's rate.
pub const PARENT_CLASSID: u32 = 0x0001_0001;
/// The default class always sits at 1:2 so the root's `default` never changes.
pub const DEFAULT_MINOR: u32 = 0x2;
/// Ethernet MTU-sized frame, the unit of HTB quanta and minimum bursts.
const FRAME: u32 = 1514;

/// What the kernel offers for leaf queues (probed before apply).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelCaps {
    pub fq_codel: bool,
    pub cake: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeafPlan {
    FqCodel {
        limit_packets: u32,
        target_us: u32,
        interval_us: u32,
        ecn: bool,
    },
    Cake,
    Bfifo {
        limit_bytes: u32,
    },
}

impl std::fmt::Display for LeafPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LeafPlan::FqCodel {
                target_us,
                interval_us,
                ..
            } => {
                write!(
                    f,
                    "fq_codel target {}ms interval {}ms",
                    *target_us as f64 / 1e3,
                    *interval_us as f64 / 1e3
                )
            }
            LeafPlan::Cake => write!(f, "cake (unlimited, flow isolation)"),
            LeafPlan::Bfifo { limit_bytes } => write!(f, "bfifo {limit_bytes} bytes"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassPlan {
    pub name: String,
    /// Index of the class in the policy (and in the CLASSES map).
    pub index: u32,
    pub classid: u32,
    pub rate_bps: u64,
    pub ceil_bps: u64,
    pub prio: u32,
    pub quantum: u32,
    pub burst_bytes: u32,
    pub cburst_bytes: u32,
    /// Handle of the leaf qdisc (its major number = the class's minor).
    pub leaf_handle: u32,
    pub leaf: LeafPlan,
}

/// Link-layer accounting of one direction as the kernel gets it: a size table
/// on the HTB root (ATM cells or not, overhead, mpu) and, for PTM's 64/65
/// coding (which size tables cannot express), every HTB rate derated by
/// `rate_num / rate_den`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accounting {
    /// The `line` preset named in the config, if any.
    pub line: Option<String>,
    pub framing: Framing,
    /// Bytes the line adds to each IP packet (CAKE's convention).
    pub overhead: i32,
    /// Minimum packet size on the line, overhead included.
    pub mpu: u32,
    /// HTB rates are the configured ones x `rate_num / rate_den` (64/65 for
    /// PTM). Equal (or both 0, in a state file from before) means 1.
    pub rate_num: u32,
    pub rate_den: u32,
}

impl Accounting {
    pub fn of(l: &LinkAccounting) -> Self {
        let (rate_num, rate_den) = match l.framing {
            Framing::Ptm => (64, 65),
            Framing::Atm | Framing::Ethernet => (1, 1),
        };
        Accounting {
            line: l.line.clone(),
            framing: l.framing,
            overhead: l.overhead,
            mpu: l.mpu,
            rate_num,
            rate_den,
        }
    }

    /// No accounting at all: no size table, rates as configured.
    pub fn is_none(&self) -> bool {
        self.framing == Framing::Ethernet && self.overhead == 0 && self.mpu == 0
    }

    /// Whether the size table counts ATM cells.
    pub fn atm(&self) -> bool {
        self.framing == Framing::Atm
    }

    /// `bps` derated for the line's coding.
    pub fn scale(&self, bps: u64) -> u64 {
        if self.rate_num == self.rate_den || self.rate_den == 0 {
            bps
        } else {
            (bps as u128 * self.rate_num as u128 / self.rate_den as u128) as u64
        }
    }

    /// The size table's overhead on an interface whose packets carry
    /// `l2_header` bytes of link-layer header (14 on Ethernet, 0 on ppp/tun):
    /// the configured overhead is relative to the IP packet.
    pub fn stab_overhead(&self, l2_header: u32) -> i32 {
        self.overhead - l2_header as i32
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirPlan {
    pub ifname: String,
    /// The HTB rate of 1:1 (the configured rate, derated for PTM).
    pub rate_bps: u64,
    /// The direction's rate as configured.
    pub line_rate_bps: u64,
    pub default_minor: u32,
    pub parent_burst_bytes: u32,
    pub classes: Vec<ClassPlan>,
    /// Link-layer accounting (size table on the root, PTM derating).
    pub accounting: Accounting,
}

/// Everything the classifier's maps hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapPlan {
    pub nwords: u32,
    /// Distinct bitmaps, `nwords` words each; id 0 is the empty bitmap.
    pub bitmaps: Vec<Vec<u64>>,
    /// direction * 256 + protocol -> bitmap id.
    pub proto_idx: Vec<u32>,
    pub dscp_idx: Vec<u32>,
    /// port (or NO_PORT) -> bitmap id, LAN-side and WAN-side port.
    pub sport_idx: Vec<u32>,
    pub dport_idx: Vec<u32>,
    pub src4: Vec<([u8; 4], u8, u32)>,
    pub dst4: Vec<([u8; 4], u8, u32)>,
    pub src6: Vec<([u8; 16], u8, u32)>,
    pub dst6: Vec<([u8; 16], u8, u32)>,
    pub wild_src: u32,
    pub wild_dst: u32,
    /// Rule rank -> class index.
    pub rule_class: Vec<u32>,
    pub classes: Vec<ClassInfo>,
    pub default_class: u32,
    /// Class index for TCP segments without data (pure ACKs, SYN, FIN, RST).
    pub ack_class: Option<u32>,
    /// `CFG_*` flags the policy sets (host names, DSCP trust, flow behaviour);
    /// the loader adds the interfaces' own.
    pub flags: u32,
    /// Bitmap slots beyond `bitmaps` for DNS-learned addresses.
    pub spare_bitmaps: u32,
    /// Promotion (class, packets, bytes, packet size per window), if configured.
    pub promote: Option<(u32, u32, u32, u32)>,
    /// `[download] window_clamp_queue_ms` in microseconds (0 when the clamp is off).
    pub clamp_queue_us: u32,
    /// Class index -> the window clamp's first per-flow share (bytes/s): the class's
    /// download ceiling, as for one flow; `shaper run` refines it (see `wclamp`).
    /// Empty when the clamp is off.
    pub clamp_share: Vec<u64>,
    /// Bit c: the classifier measures RTP streams in class index c (`[calls]`).
    pub media_classes: u64,
}

/// Bitmap slots kept free for the combinations DNS-learned addresses need
/// (each distinct set of host rules over each covering static prefix).
pub const DNS_SPARE_BITMAPS: u32 = 512;

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub policy: Policy,
    /// Each direction's class tree (upload on the WAN, download on the LAN).
    pub dirs: PerDir<DirPlan>,
}

/// The `CFG_*` flag that has the classifier ignore the DSCP of packets going `d`.
fn ignore_dscp_flag(d: Dir) -> u32 {
    match d {
        Dir::Up => shaper_common::CFG_IGNORE_DSCP_UP,
        Dir::Down => shaper_common::CFG_IGNORE_DSCP_DOWN,
    }
}

/// The class id of a policy class.
pub fn classid_of(policy: &Policy, index: usize) -> u32 {
    let minor = if index == policy.default_class {
        DEFAULT_MINOR
    } else {
        0x10 + index as u32
    };
    ROOT_HANDLE | minor
}

/// HTB burst: two full frames, or 100 us at the rate where that is more (fast
/// lines, so HTB's timer keeps up). Measured on the FTTC 40/10 namespace line:
/// 1 ms bursts let 3-6 ms of queue build in the modem downstream, two frames
/// 1-2 ms. Where one frame takes a millisecond or more (below ~12 Mbit/s: ADSL,
/// every ADSL upload) the burst is one frame: at 1 Mbit/s a frame is 12-14 ms
/// on the copper and two back to back are what a video packet waits behind at
/// the modem. HTB lets a class send while its tokens are not negative, so a
/// burst of one frame still passes full frames.
fn burst_for(rate_bps: u64) -> u32 {
    if (FRAME as u64) * 8 * 1000 >= rate_bps {
        return FRAME;
    }
    let per_100us = (rate_bps / 8 / 10_000) as u32;
    per_100us.max(2 * FRAME)
}

/// Bytes in one flow-measuring window at `bps` (at least 1: 0 means "no limit" in the
/// kernel's tables).
fn window_bytes(bps: u64) -> u64 {
    ((bps as u128 * shaper_common::FLOW_WINDOW_NS as u128 / 8 / 1_000_000_000) as u64).max(1)
}

/// HTB quantum: one frame up to 100 Mbit/s (fair at copper rates), more above.
fn quantum_for(rate_bps: u64) -> u32 {
    let n = rate_bps.div_ceil(100_000_000).max(1) as u32;
    FRAME * n.min(40)
}

fn leaf_for(policy: &Policy, caps: Option<KernelCaps>, ceil_bps: u64) -> LeafPlan {
    let bfifo = || {
        // Saturates: 35 Gbit/s x 1000 ms is more bytes than the kernel's 32-bit limit.
        let bytes = ceil_bps / 8 * u64::from(policy.queue_ms) / 1000;
        LeafPlan::Bfifo {
            limit_bytes: u32::try_from(bytes).unwrap_or(u32::MAX).max(2 * FRAME),
        }
    };
    let fq_codel = || LeafPlan::FqCodel {
        limit_packets: 1000,
        target_us: 5_000,
        interval_us: 100_000,
        ecn: true,
    };
    match (policy.leaf, caps) {
        (LeafChoice::Bfifo, _) => bfifo(),
        (LeafChoice::FqCodel, _) => fq_codel(),
        (LeafChoice::Cake, _) => LeafPlan::Cake,
        (LeafChoice::Auto, Some(c)) if c.fq_codel => fq_codel(),
        (LeafChoice::Auto, Some(_)) => bfifo(),
        // Unknown kernel (check without probing): show what a gateway usually gets.
        (LeafChoice::Auto, None) => fq_codel(),
    }
}

fn dir_plan(
    policy: &Policy,
    caps: Option<KernelCaps>,
    ifname: &str,
    rate_bps: u64,
    link: &LinkAccounting,
) -> DirPlan {
    let accounting = Accounting::of(link);
    let classes = policy
        .classes
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let classid = classid_of(policy, i);
            // Shares of the configured rate (absolute ones too) are line
            // capacity; HTB counts bytes before the PTM coding, so all
            // rates are derated alike.
            let rate = accounting.scale(c.guaranteed.of(rate_bps));
            let ceil = accounting.scale(c.ceiling.of(rate_bps));
            ClassPlan {
                name: c.name.clone(),
                index: i as u32,
                classid,
                rate_bps: rate,
                ceil_bps: ceil,
                prio: c.priority as u32,
                quantum: quantum_for(rate),
                burst_bytes: burst_for(rate),
                cburst_bytes: burst_for(ceil),
                leaf_handle: (classid & 0xffff) << 16,
                leaf: leaf_for(policy, caps, ceil),
            }
        })
        .collect();
    let htb_rate = accounting.scale(rate_bps);
    DirPlan {
        ifname: ifname.to_string(),
        rate_bps: htb_rate,
        line_rate_bps: rate_bps,
        default_minor: DEFAULT_MINOR,
        parent_burst_bytes: burst_for(htb_rate),
        classes,
        accounting,
    }
}

/// The class trees for both directions. `caps` is `None` when the kernel
/// was not probed (plan shown by `check`).
pub fn plan(policy: &Policy, caps: Option<KernelCaps>) -> Plan {
    Plan {
        dirs: PerDir::from_fn(|d| {
            let dp = &policy.dirs[d];
            dir_plan(policy, caps, policy.egress(d), dp.rate_bps, &dp.link)
        }),
        policy: policy.clone(),
    }
}

// ---------------------------------------------------------------------------
// Maps.

struct Bits {
    nwords: usize,
}

impl Bits {
    fn empty(&self) -> Vec<u64> {
        vec![0; self.nwords]
    }
    fn set(v: &mut [u64], rule: usize) {
        v[rule / 64] |= 1 << (rule % 64);
    }
    fn of<'a>(
        &self,
        rules: impl Iterator<Item = (usize, &'a Rule)>,
        pred: impl Fn(&Rule) -> bool,
    ) -> Vec<u64> {
        let mut v = self.empty();
        for (i, r) in rules {
            if pred(r) {
                Self::set(&mut v, i);
            }
        }
        v
    }
}

/// Interns bitmaps so identical ones share an id.
struct Store {
    ids: HashMap<Vec<u64>, u32>,
    list: Vec<Vec<u64>>,
}

impl Store {
    fn new(empty: Vec<u64>) -> Self {
        let mut s = Store {
            ids: HashMap::new(),
            list: Vec::new(),
        };
        s.id(empty);
        s
    }
    fn id(&mut self, v: Vec<u64>) -> u32 {
        if let Some(&id) = self.ids.get(&v) {
            return id;
        }
        let id = self.list.len() as u32;
        self.ids.insert(v.clone(), id);
        self.list.push(v);
        id
    }
}

/// port -> bitmap id for one port field, by sweeping range boundaries.
fn port_index(
    store: &mut Store,
    bits: &Bits,
    rules: &[Rule],
    field: impl Fn(&Rule) -> &[(u16, u16)],
) -> Vec<u32> {
    let wild = bits.of(rules.iter().enumerate(), |r| field(r).is_empty());
    // Boundary events: at `port`, rule `i` gains (+1) or loses (-1) one range.
    let mut events: Vec<(u32, usize, i32)> = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        for &(lo, hi) in field(r) {
            events.push((lo as u32, i, 1));
            events.push((hi as u32 + 1, i, -1));
        }
    }
    events.sort_unstable();
    let mut idx = vec![0u32; PORT_SLOTS as usize];
    let mut depth = vec![0i32; rules.len()];
    let mut cur = wild.clone();
    let mut cur_id = store.id(cur.clone());
    let mut e = 0;
    for port in 0..=65535u32 {
        let mut changed = false;
        while e < events.len() && events[e].0 == port {
            let (_, i, d) = events[e];
            depth[i] += d;
            let on = depth[i] > 0 || wild[i / 64] & (1 << (i % 64)) != 0;
            let was = cur[i / 64] & (1 << (i % 64)) != 0;
            if on != was {
                cur[i / 64] ^= 1 << (i % 64);
                changed = true;
            }
            e += 1;
        }
        if changed {
            cur_id = store.id(cur.clone());
        }
        idx[port as usize] = cur_id;
    }
    idx[NO_PORT as usize] = store.id(wild);
    idx
}

/// Prefix entries for one address field and family: each prefix's bitmap
/// holds the rules of every prefix that covers it (the LPM lookup returns
/// only the longest match) plus the rules without an address constraint.
fn prefix_entries(
    store: &mut Store,
    bits: &Bits,
    rules: &[Rule],
    v6: bool,
    field: impl Fn(&Rule) -> &[Cidr],
    open: impl Fn(&Rule) -> bool,
) -> (Vec<(IpAddr, u8, u32)>, Vec<u64>) {
    // A rule accepts every address of the field only when it constrains it in
    // no way (a rule with host names takes only the addresses learned for them).
    let wild = bits.of(rules.iter().enumerate(), |r| field(r).is_empty() && open(r));
    let mut by_prefix: HashMap<(IpAddr, u8), Vec<usize>> = HashMap::new();
    let mut lens: Vec<u8> = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        for c in field(r) {
            if c.addr.is_ipv6() != v6 {
                continue;
            }
            by_prefix.entry((c.addr, c.len)).or_default().push(i);
            lens.push(c.len);
        }
    }
    lens.sort_unstable();
    lens.dedup();
    let mut keys: Vec<_> = by_prefix.keys().copied().collect();
    keys.sort();
    let mut out = Vec::with_capacity(keys.len());
    for (addr, len) in keys {
        let mut v = wild.clone();
        for &l in lens.iter().take_while(|&&l| l <= len) {
            if let Some(rs) = by_prefix.get(&(mask_addr(addr, l), l)) {
                for &i in rs {
                    Bits::set(&mut v, i);
                }
            }
        }
        out.push((addr, len, store.id(v)));
    }
    (out, wild)
}

/// The classifier's map contents for a plan.
pub fn maps(plan: &Plan) -> MapPlan {
    let policy = &plan.policy;
    let rules = &policy.rules;
    let nwords = rules.len().div_ceil(64).max(1);
    debug_assert!(nwords <= BITMAP_WORDS);
    let bits = Bits { nwords };
    let mut store = Store::new(bits.empty());

    let mut proto_idx = vec![0u32; 512];
    for dir in Dir::ALL {
        for proto in 0..256u32 {
            let v = bits.of(rules.iter().enumerate(), |r| {
                r.goes(dir) && (r.protocols.is_empty() || r.protocols.contains(&(proto as u8)))
            });
            proto_idx[(dir as u32 * 256 + proto) as usize] = store.id(v);
        }
    }
    let dscp_idx = (0..64u8)
        .map(|d| {
            let v = bits.of(rules.iter().enumerate(), |r| {
                r.dscp.is_empty() || r.dscp.contains(&d)
            });
            store.id(v)
        })
        .collect();
    let sport_idx = port_index(&mut store, &bits, rules, |r| &r.src_ports);
    let dport_idx = port_index(&mut store, &bits, rules, |r| &r.dst_ports);

    let any = |_: &Rule| true;
    let no_hosts = |r: &Rule| r.dns_names.is_empty();
    let (s4, wild_src) = prefix_entries(&mut store, &bits, rules, false, |r| &r.src_cidrs, any);
    let (s6, _) = prefix_entries(&mut store, &bits, rules, true, |r| &r.src_cidrs, any);
    let (d4, wild_dst) =
        prefix_entries(&mut store, &bits, rules, false, |r| &r.dst_cidrs, no_hosts);
    let (d6, _) = prefix_entries(&mut store, &bits, rules, true, |r| &r.dst_cidrs, no_hosts);
    let wild_src = store.id(wild_src);
    let wild_dst = store.id(wild_dst);
    let v4 = |v: Vec<(IpAddr, u8, u32)>| {
        v.into_iter()
            .filter_map(|(a, l, id)| match a {
                IpAddr::V4(a) => Some((a.octets(), l, id)),
                IpAddr::V6(_) => None,
            })
            .collect()
    };
    let v6 = |v: Vec<(IpAddr, u8, u32)>| {
        v.into_iter()
            .filter_map(|(a, l, id)| match a {
                IpAddr::V6(a) => Some((a.octets(), l, id)),
                IpAddr::V4(_) => None,
            })
            .collect()
    };

    let classes = policy
        .classes
        .iter()
        .enumerate()
        .map(|(i, c)| ClassInfo {
            classid: classid_of(policy, i),
            dscp: if policy.remark_dscp {
                c.dscp.unwrap_or(DSCP_KEEP)
            } else {
                DSCP_KEEP
            },
            _pad: [0; 3],
            demote_class: c.demote.map_or(NO_CLASS, |d| d.to as u32),
            _pad2: 0,
            demote_bytes: c.demote.and_then(|d| d.after_bytes).unwrap_or(0),
            // Bytes in one measuring window at the rate.
            demote_window_bytes: c.demote.and_then(|d| d.above_bps).map_or(0, window_bytes),
            claimed_window_bytes: policy.dirs.0.each_ref().map(|d| d.rate_bps).map(|rate| {
                policy
                    .claimed_max(i)
                    .map_or(0, |s| window_bytes(s.of(rate)))
            }),
        })
        .collect();
    let mut flags = 0;
    if policy.uses_hosts() {
        flags |= shaper_common::CFG_HOSTS;
    }
    for d in Dir::ALL {
        if !policy.dirs[d].dscp_trust {
            flags |= ignore_dscp_flag(d);
        }
    }
    if policy.measures_flows() {
        flags |= shaper_common::CFG_FLOW_BEHAVIOUR;
    }
    let mut clamp_share = Vec::new();
    if policy.dirs[Dir::Down].window_clamp.is_some() {
        flags |= shaper_common::CFG_WINDOW_CLAMP;
        clamp_share = vec![0; policy.classes.len()];
        for c in &plan.dirs[Dir::Down].classes {
            if let Some(s) = clamp_share.get_mut(c.index as usize) {
                *s = c.ceil_bps / 8;
            }
        }
    }
    // Classes whose RTP streams the classifier measures (`[calls]`); class indexes are
    // below MAX_CLASSES = 64, one bit each.
    let media_classes = policy
        .calls
        .classes
        .iter()
        .filter(|&&c| c < 64)
        .fold(0u64, |m, &c| m | 1 << c);
    if media_classes != 0 {
        flags |= shaper_common::CFG_MEDIA;
    }
    let window_s = shaper_common::FLOW_WINDOW_NS as f64 / 1e9;
    let promote = policy.promote.map(|p| {
        (
            p.class as u32,
            ((p.min_pps as f64 * window_s).ceil() as u32).max(1),
            (p.max_bps as f64 / 8.0 * window_s).min(u32::MAX as f64) as u32,
            p.max_packet,
        )
    });

    MapPlan {
        nwords: nwords as u32,
        bitmaps: store.list,
        proto_idx,
        dscp_idx,
        sport_idx,
        dport_idx,
        src4: v4(s4),
        dst4: v4(d4),
        src6: v6(s6),
        dst6: v6(d6),
        wild_src,
        wild_dst,
        rule_class: rules.iter().map(|r| r.class as u32).collect(),
        classes,
        default_class: policy.default_class as u32,
        ack_class: policy.ack_class.map(|c| c as u32),
        flags,
        spare_bitmaps: if policy.uses_hosts() {
            DNS_SPARE_BITMAPS
        } else {
            0
        },
        promote,
        clamp_queue_us: policy.dirs[Dir::Down]
            .window_clamp
            .map_or(0, |w| w.queue_ms.saturating_mul(1000)),
        clamp_share,
        media_classes,
    }
}

/// A human-readable summary of the plan (printed by `shaper check`).
pub fn describe(plan: &Plan, maps: &MapPlan) -> String {
    use std::fmt::Write as _;
    let p = &plan.policy;
    let mut s = String::new();
    for (label, d) in plan.dirs.iter().map(|(d, p)| (d.name(), p)) {
        let _ = writeln!(
            s,
            "{label}: {} egress, HTB root 1: at {} (default class 1:{:x})",
            d.ifname,
            format_rate(d.rate_bps),
            d.default_minor
        );
        let a = &d.accounting;
        if a.is_none() {
            let _ = writeln!(
                s,
                "  link layer: no accounting (packets counted as Linux sees them)"
            );
        } else {
            let _ = writeln!(
                s,
                "  link layer: {}{} framing, overhead {} bytes per IP packet, mpu {}; size table on the root (linklayer {})",
                a.line.as_ref().map(|l| format!("{l}, ")).unwrap_or_default(),
                a.framing,
                a.overhead,
                a.mpu,
                if a.atm() { "atm" } else { "ethernet" }
            );
            if d.rate_bps != d.line_rate_bps {
                let _ = writeln!(
                    s,
                    "  PTM 64/65 coding: HTB rates x {}/{} ({} configured)",
                    a.rate_num,
                    a.rate_den,
                    format_rate(d.line_rate_bps)
                );
            }
        }
        let _ = writeln!(
            s,
            "  {:<22} {:>6} {:>11} {:>11} {:>4}  leaf",
            "class", "id", "guaranteed", "ceiling", "prio"
        );
        for c in &d.classes {
            let dflt = if c.index as usize == p.default_class {
                " (default)"
            } else {
                ""
            };
            let _ = writeln!(
                s,
                "  {:<22} {:>6} {:>11} {:>11} {:>4}  {}",
                format!("{}{dflt}", c.name),
                format!("1:{:x}", c.classid & 0xffff),
                format_rate(c.rate_bps),
                format_rate(c.ceil_bps),
                c.prio,
                c.leaf
            );
        }
    }
    if let Some(a) = p.ack_class {
        let _ = writeln!(
            s,
            "TCP segments without data (ACKs, SYNs, FINs; both directions): class {}",
            p.classes[a].name
        );
    }
    if let Some(w) = p.dirs[Dir::Down].window_clamp {
        let _ = writeln!(
            s,
            "download window clamp: on; the receive window in LAN hosts' ACKs is clamped to each TCP download's share of its class's rate x (its round trip + {} ms), at least 4 segments, never moving the right edge left",
            w.queue_ms
        );
    }
    let _ = writeln!(
        s,
        "rules: {} (first match by priority wins), {} distinct match bitmaps of {} word(s)",
        p.rules.len(),
        maps.bitmaps.len(),
        maps.nwords
    );
    let _ = writeln!(
        s,
        "prefixes: {} IPv4 + {} IPv6 (LAN side), {} IPv4 + {} IPv6 (WAN side)",
        maps.src4.len(),
        maps.src6.len(),
        maps.dst4.len(),
        maps.dst6.len()
    );
    for c in &p.classes {
        let n = p
            .rules
            .iter()
            .filter(|r| p.classes[r.class].name == c.name)
            .count();
        let _ = writeln!(s, "  class {:<20} {n} rule(s)", c.name);
        if let Some(d) = c.demote {
            let mut when = Vec::new();
            if let Some(b) = d.after_bytes {
                when.push(format!("after {b} bytes"));
            }
            if let Some(r) = d.above_bps {
                when.push(format!("above {} over a second", format_rate(r)));
            }
            let _ = writeln!(
                s,
                "    a flow that turns bulk ({}) is demoted to {}",
                when.join(" or "),
                p.classes[d.to].name
            );
        }
    }
    let hosts: Vec<&Rule> = p.rules.iter().filter(|r| !r.dns_names.is_empty()).collect();
    if !hosts.is_empty() {
        let _ = writeln!(
            s,
            "host names: {} rule(s) match by name; `shaper run` learns addresses from DNS answers \
             (kept {}-{} s, at most {}) and reads TLS server names",
            hosts.len(),
            p.dns.min_ttl_s,
            p.dns.max_ttl_s,
            p.dns.max_entries
        );
        for r in hosts {
            let _ = writeln!(s, "  {:<30} {}", r.name, r.dns_names.join(", "));
        }
    }
    if let Some(pr) = p.promote {
        let _ = writeln!(
            s,
            "promotion: default-class UDP flows of at least {} packets/s, at most {} and {} bytes a packet \
             on average move to {}",
            pr.min_pps,
            format_rate(pr.max_bps),
            pr.max_packet,
            p.classes[pr.class].name
        );
    }
    let trust = p.dirs.as_ref().map(|_, d| d.dscp_trust);
    if !trust[Dir::Up] || !trust[Dir::Down] {
        let _ = writeln!(
            s,
            "DSCP: rules see marks from the LAN: {}, from the WAN: {}",
            if trust[Dir::Up] {
                "yes"
            } else {
                "no (ignored)"
            },
            if trust[Dir::Down] {
                "yes"
            } else {
                "no (ignored)"
            }
        );
    }
    s
}

/// Reference classifier over the policy (the kernel's semantics, for tests
/// and `explain`): the first rule by priority that accepts the packet ([`Rule::accepts`]).
pub use crate::rule::PacketView;

pub fn reference_match(policy: &Policy, p: &PacketView) -> Option<usize> {
    reference_match_hosts(policy, p, |_, _| false)
}

/// [`reference_match`] where `learned(rule, addr)` says whether `addr` was
/// answered (by DNS) for one of the rule's host names.
pub fn reference_match_hosts(
    policy: &Policy,
    p: &PacketView,
    learned: impl Fn(usize, IpAddr) -> bool,
) -> Option<usize> {
    let v = PacketView {
        dscp: if policy.dirs[p.dir].dscp_trust {
            p.dscp
        } else {
            0
        },
        ..*p
    };
    policy
        .rules
        .iter()
        .enumerate()
        .position(|(i, r)| r.accepts(&v, || learned(i, p.dst)))
}

/// The bitmap id the WAN-side (dst) address trie gives `a` from the static
/// prefixes alone (the wildcard id when none covers it).
pub fn static_dst_id(m: &MapPlan, a: IpAddr) -> u32 {
    lpm_id(&m.dst4, &m.dst6, a, m.wild_dst)
}

/// The id an LPM lookup of `a` gives over these entries (`wild` when none
/// covers it), as the kernel's tries do.
fn lpm_id(e4: &[([u8; 4], u8, u32)], e6: &[([u8; 16], u8, u32)], a: IpAddr, wild: u32) -> u32 {
    let covers = |p: IpAddr, l: u8| mask_addr(a, l) == p;
    let best = match a {
        IpAddr::V4(_) => e4
            .iter()
            .filter(|(p, l, _)| covers(IpAddr::V4((*p).into()), *l))
            .max_by_key(|(_, l, _)| *l)
            .map(|e| e.2),
        IpAddr::V6(_) => e6
            .iter()
            .filter(|(p, l, _)| covers(IpAddr::V6((*p).into()), *l))
            .max_by_key(|(_, l, _)| *l)
            .map(|e| e.2),
    };
    best.unwrap_or(wild)
}

/// The same lookup the kernel does, over the compiled maps (used to check the
/// compiler against `reference_match`).
pub fn map_match(m: &MapPlan, p: &PacketView) -> Option<usize> {
    map_match_hosts(m, p, &[])
}

/// [`map_match`] with the WAN-side address learned (from DNS) for the host
/// rules `learned`: what the kernel looks up once user space installed the
/// address (its bitmap is the static one plus those rules' bits).
pub fn map_match_hosts(m: &MapPlan, p: &PacketView, learned: &[usize]) -> Option<usize> {
    let dscp = if m.flags & ignore_dscp_flag(p.dir) != 0 {
        0
    } else {
        p.dscp
    };
    let ids = [
        m.proto_idx[(p.dir as u32 * 256 + p.proto as u32) as usize],
        m.dscp_idx[dscp as usize],
        m.sport_idx[p.sport.map_or(NO_PORT as usize, usize::from)],
        m.dport_idx[p.dport.map_or(NO_PORT as usize, usize::from)],
        lpm_id(&m.src4, &m.src6, p.src, m.wild_src),
        lpm_id(&m.dst4, &m.dst6, p.dst, m.wild_dst),
    ];
    let mut dst_words = m.bitmaps[ids[5] as usize].clone();
    for &r in learned {
        dst_words[r / 64] |= 1 << (r % 64);
    }
    for (w, &dw) in dst_words.iter().enumerate().take(m.nwords as usize) {
        let x = ids[..5]
            .iter()
            .fold(dw, |acc, &id| acc & m.bitmaps[id as usize][w]);
        if x != 0 {
            return Some(w * 64 + x.trailing_zeros() as usize);
        }
    }
    None
}

#[cfg(test)]
mod tests;
