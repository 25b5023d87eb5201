//! Pure encoders and decoders for the traffic-control (tc) structures that
//! netlink-packet-route 0.34 has no types for: HTB qdisc/class options, the
//! size table (TCA_STAB), bfifo/pfifo, fq_codel and cake options.
//!
//! Everything here follows the kernel's uapi `linux/pkt_sched.h` and computes
//! the same numbers as iproute2's `tc` (`tc/tc_core.c`, `tc/tc_stab.c`,
//! `tc/q_htb.c`). No I/O happens in this module; [`super::tc`] sends what is
//! built here. All multi-byte fields are in host byte order, as netlink wants.

use std::fmt;

// ---------------------------------------------------------------------------
// Constants from include/uapi/linux/{rtnetlink,pkt_sched,gen_stats}.h
// ---------------------------------------------------------------------------

/// `TCA_KIND`.
pub const TCA_KIND: u16 = 1;
/// `TCA_OPTIONS`.
pub const TCA_OPTIONS: u16 = 2;
/// `TCA_RATE` (struct tc_estimator).
pub const TCA_RATE: u16 = 5;
/// `TCA_STAB`.
pub const TCA_STAB: u16 = 8;

/// `TCA_STAB_BASE` (struct tc_sizespec).
pub const TCA_STAB_BASE: u16 = 1;
/// `TCA_STAB_DATA` (u16 table).
pub const TCA_STAB_DATA: u16 = 2;

/// `TCA_HTB_PARMS` (struct tc_htb_opt).
pub const TCA_HTB_PARMS: u16 = 1;
/// `TCA_HTB_INIT` (struct tc_htb_glob).
pub const TCA_HTB_INIT: u16 = 2;
/// `TCA_HTB_DIRECT_QLEN` (u32).
pub const TCA_HTB_DIRECT_QLEN: u16 = 5;
/// `TCA_HTB_RATE64` (u64 bytes/s).
pub const TCA_HTB_RATE64: u16 = 6;
/// `TCA_HTB_CEIL64` (u64 bytes/s).
pub const TCA_HTB_CEIL64: u16 = 7;
/// `TC_HTB_PROTOVER`, the only version `htb_init` accepts.
pub const TC_HTB_PROTOVER: u32 = 3;
/// `TC_HTB_NUMPRIO`: HTB priorities are 0..=7.
pub const TC_HTB_NUMPRIO: u32 = 8;

/// fq_codel attributes.
pub const TCA_FQ_CODEL_TARGET: u16 = 1;
/// fq_codel limit (packets).
pub const TCA_FQ_CODEL_LIMIT: u16 = 2;
/// fq_codel interval (µs).
pub const TCA_FQ_CODEL_INTERVAL: u16 = 3;
/// fq_codel ECN flag.
pub const TCA_FQ_CODEL_ECN: u16 = 4;
/// fq_codel quantum (bytes).
pub const TCA_FQ_CODEL_QUANTUM: u16 = 6;

/// cake attributes.
pub const TCA_CAKE_BASE_RATE64: u16 = 2;
/// cake diffserv mode.
pub const TCA_CAKE_DIFFSERV_MODE: u16 = 3;
/// cake flow isolation mode.
pub const TCA_CAKE_FLOW_MODE: u16 = 5;
/// cake NAT lookup flag.
pub const TCA_CAKE_NAT: u16 = 11;
/// cake ACK filter mode.
pub const TCA_CAKE_ACK_FILTER: u16 = 16;
/// `CAKE_DIFFSERV_BESTEFFORT`.
pub const CAKE_DIFFSERV_BESTEFFORT: u32 = 3;
/// `CAKE_ACK_FILTER`.
pub const CAKE_ACK_FILTER: u32 = 1;
/// `CAKE_ACK_NONE`.
pub const CAKE_ACK_NONE: u32 = 0;

/// `TCA_STATS_*` inside `TCA_STATS2`.
pub const TCA_STATS_RATE_EST: u16 = 2;
/// 64-bit rate estimator.
pub const TCA_STATS_RATE_EST64: u16 = 5;
/// 64-bit packet counter.
pub const TCA_STATS_PKT64: u16 = 8;

/// `TC_H_ROOT`: parent of a root qdisc.
pub const TC_H_ROOT: u32 = 0xFFFF_FFFF;
/// `TC_H_INGRESS` / `TC_H_CLSACT`.
pub const TC_H_INGRESS: u32 = 0xFFFF_FFF1;

/// Length of one psched tick in nanoseconds (`PSCHED_SHIFT` = 6 since
/// Linux 3.x; `/proc/net/psched` reads `000003e8 00000040 ...`).
pub const PSCHED_TICK_NS: u64 = 64;

/// iproute2's default HTB burst when none is given: `rate / HZ + mtu` with
/// mtu 1600 and `HZ` = 1e9 on hrtimer kernels (`get_hz()`).
pub const HTB_DEFAULT_BURST_MTU: u64 = 1600;

/// Size of `struct tc_htb_opt`.
pub const TC_HTB_OPT_LEN: usize = 44;
/// Size of `struct tc_htb_glob`.
pub const TC_HTB_GLOB_LEN: usize = 20;
/// Size of `struct tc_sizespec`.
pub const TC_SIZESPEC_LEN: usize = 24;
/// Size of `struct tc_ratespec`.
pub const TC_RATESPEC_LEN: usize = 12;
/// Size of `struct tc_htb_xstats`.
pub const TC_HTB_XSTATS_LEN: usize = 20;

/// Build a tc handle from major and minor (`TC_H_MAKE`).
pub const fn tc_handle(major: u16, minor: u16) -> u32 {
    ((major as u32) << 16) | minor as u32
}

/// Format a handle the way `tc` prints it: hex `major:minor`, `root`,
/// `ingress`, or `major:` for qdisc handles (minor 0).
pub fn fmt_handle(h: u32) -> String {
    match h {
        TC_H_ROOT => "root".to_string(),
        TC_H_INGRESS => "ingress".to_string(),
        0 => "0:".to_string(),
        _ if h & 0xFFFF == 0 => format!("{:x}:", h >> 16),
        _ => format!("{:x}:{:x}", h >> 16, h & 0xFFFF),
    }
}

// ---------------------------------------------------------------------------
// Small netlink attribute helpers (no panics on malformed input)
// ---------------------------------------------------------------------------

const NLA_HDRLEN: usize = 4;
const NLA_TYPE_MASK: u16 = 0x3FFF;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Append one netlink attribute (header + payload + padding) to `out`.
pub fn put_nla(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = NLA_HDRLEN + payload.len();
    // Attribute payloads built here are a few hundred bytes at most; a size
    // table of 4096 entries is 8 KiB: all fit in u16.
    let len16 = u16::try_from(len).unwrap_or(u16::MAX);
    out.extend_from_slice(&len16.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(out.len() + (align4(len) - len), 0);
}

fn put_nla_u32(out: &mut Vec<u8>, kind: u16, v: u32) {
    put_nla(out, kind, &v.to_ne_bytes());
}

fn put_nla_u64(out: &mut Vec<u8>, kind: u16, v: u64) {
    put_nla(out, kind, &v.to_ne_bytes());
}

/// Iterate over the netlink attributes in `buf`, yielding `(type, payload)`
/// with the NESTED/BYTEORDER flags masked off. Stops at the first malformed
/// attribute.
pub fn nlas(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.len() < NLA_HDRLEN {
            return None;
        }
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & NLA_TYPE_MASK;
        if len < NLA_HDRLEN || len > rest.len() {
            return None;
        }
        let payload = &rest[NLA_HDRLEN..len];
        let next = align4(len).min(rest.len());
        rest = &rest[next..];
        Some((kind, payload))
    })
}

fn rd_u16(b: &[u8], off: usize) -> Option<u16> {
    b.get(off..off + 2)
        .map(|s| u16::from_ne_bytes([s[0], s[1]]))
}

fn rd_i16(b: &[u8], off: usize) -> Option<i16> {
    b.get(off..off + 2)
        .map(|s| i16::from_ne_bytes([s[0], s[1]]))
}

fn rd_u32(b: &[u8], off: usize) -> Option<u32> {
    b.get(off..off + 4)
        .map(|s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
}

fn rd_i32(b: &[u8], off: usize) -> Option<i32> {
    rd_u32(b, off).map(|v| v as i32)
}

fn rd_u64(b: &[u8], off: usize) -> Option<u64> {
    b.get(off..off + 8).map(|s| {
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        u64::from_ne_bytes(a)
    })
}

// ---------------------------------------------------------------------------
// Link layer, rate specs, psched time
// ---------------------------------------------------------------------------

/// How a rate or size table accounts for the link's framing
/// (`enum tc_link_layer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum LinkLayer {
    /// No cell framing (`TC_LINKLAYER_ETHERNET` = 1).
    #[default]
    Ethernet,
    /// ATM/AAL5: lengths are rounded up to 48-byte cells sent as 53 bytes
    /// (`TC_LINKLAYER_ATM` = 2), e.g. ADSL.
    Atm,
}

impl LinkLayer {
    /// The uapi value (`TC_LINKLAYER_*`).
    pub fn to_raw(self) -> u8 {
        match self {
            LinkLayer::Ethernet => 1,
            LinkLayer::Atm => 2,
        }
    }

    /// Decode a uapi value; 0 (unaware) and unknown values read as Ethernet.
    pub fn from_raw(v: u32) -> LinkLayer {
        if v & 0x0F == 2 {
            LinkLayer::Atm
        } else {
            LinkLayer::Ethernet
        }
    }
}

impl fmt::Display for LinkLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LinkLayer::Ethernet => "ethernet",
            LinkLayer::Atm => "atm",
        })
    }
}

/// Time to send `size` bytes at `rate_bytes_ps`, in psched ticks (64 ns),
/// rounded up so the kernel never grants less burst than asked for.
/// Saturates at `u32::MAX`. `rate_bytes_ps` must be non-zero (0 gives
/// `u32::MAX`).
pub fn xmit_ticks(rate_bytes_ps: u64, size: u32) -> u32 {
    if rate_bytes_ps == 0 {
        return u32::MAX;
    }
    let num = u128::from(size) * 1_000_000_000u128;
    let den = u128::from(rate_bytes_ps) * u128::from(PSCHED_TICK_NS);
    let ticks = num.div_ceil(den);
    u32::try_from(ticks).unwrap_or(u32::MAX)
}

/// Bytes that can be sent at `rate_bytes_ps` in `ticks` psched ticks (the
/// inverse of [`xmit_ticks`], rounded down; what `tc` shows as `burst`).
pub fn ticks_to_bytes(rate_bytes_ps: u64, ticks: u32) -> u64 {
    let v = u128::from(ticks) * u128::from(PSCHED_TICK_NS) * u128::from(rate_bytes_ps)
        / 1_000_000_000u128;
    u64::try_from(v).unwrap_or(u64::MAX)
}

/// `struct tc_ratespec`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateSpec {
    /// Cell log of the (legacy) rate table.
    pub cell_log: u8,
    /// `TC_LINKLAYER_*`.
    pub linklayer: u8,
    /// Per-packet overhead added before the rate computation.
    pub overhead: u16,
    /// Cell alignment of the legacy rate table.
    pub cell_align: i16,
    /// Minimum packet unit.
    pub mpu: u16,
    /// Rate in bytes per second (saturated at u32::MAX; see the 64-bit attrs).
    pub rate: u32,
}

impl RateSpec {
    /// Append the 12 bytes of `struct tc_ratespec`.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.push(self.cell_log);
        out.push(self.linklayer);
        out.extend_from_slice(&self.overhead.to_ne_bytes());
        out.extend_from_slice(&self.cell_align.to_ne_bytes());
        out.extend_from_slice(&self.mpu.to_ne_bytes());
        out.extend_from_slice(&self.rate.to_ne_bytes());
    }

    /// Parse 12 bytes of `struct tc_ratespec` at `off`.
    pub fn read(b: &[u8], off: usize) -> Option<RateSpec> {
        Some(RateSpec {
            cell_log: *b.get(off)?,
            linklayer: *b.get(off + 1)?,
            overhead: rd_u16(b, off + 2)?,
            cell_align: rd_i16(b, off + 4)?,
            mpu: rd_u16(b, off + 6)?,
            rate: rd_u32(b, off + 8)?,
        })
    }
}

// ---------------------------------------------------------------------------
// HTB
// ---------------------------------------------------------------------------

/// Parameters of one HTB class (what `tc class add ... htb` takes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HtbClassParams {
    /// Guaranteed rate in bits per second (must be >= 8).
    pub rate_bps: u64,
    /// Maximum rate in bits per second when borrowing; 0 means "= rate".
    pub ceil_bps: u64,
    /// Priority 0 (highest) ..= 7 for borrowing and excess scheduling.
    pub prio: u32,
    /// DRR quantum in bytes; 0 lets the kernel derive it from rate / r2q
    /// (clamped to 1000..=200000 with a warning in the kernel log).
    pub quantum: u32,
    /// Bytes that may be sent at line speed above `rate`; 0 = tc's default
    /// (1600 bytes + rate/HZ).
    pub burst_bytes: u32,
    /// Bytes that may be sent at line speed above `ceil`; 0 = tc's default.
    pub cburst_bytes: u32,
    /// Per-packet overhead in bytes added for rate accounting (both rate and
    /// ceil), e.g. 4 for Ethernet FCS, or PPPoE/ATM encapsulation.
    pub overhead: u16,
    /// Minimum packet size for rate accounting.
    pub mpu: u16,
    /// Link-layer framing for rate accounting (ATM cell tax).
    pub linklayer: LinkLayer,
    /// Attach a kernel rate estimator (TCA_RATE, 1 s interval, 4 s
    /// averaging) so [`super::tc::Tc::classes`] can report a measured rate.
    /// `false` on a change leaves an existing estimator in place.
    pub rate_estimator: bool,
}

impl Default for HtbClassParams {
    fn default() -> Self {
        HtbClassParams {
            rate_bps: 0,
            ceil_bps: 0,
            prio: 0,
            quantum: 0,
            burst_bytes: 0,
            cburst_bytes: 0,
            overhead: 0,
            mpu: 0,
            linklayer: LinkLayer::Ethernet,
            rate_estimator: false,
        }
    }
}

impl HtbClassParams {
    /// The effective ceil in bits/s (0 means same as rate).
    pub fn effective_ceil_bps(&self) -> u64 {
        if self.ceil_bps == 0 {
            self.rate_bps
        } else {
            self.ceil_bps
        }
    }

    /// Check what the kernel would reject (mostly with a bare EINVAL) or
    /// silently change, and explain it.
    pub fn validate(&self) -> Result<(), String> {
        if self.rate_bps < 8 {
            return Err(format!(
                "rate {} bit/s is below the minimum of 8 bit/s (1 byte/s)",
                self.rate_bps
            ));
        }
        let ceil = self.effective_ceil_bps();
        if ceil < self.rate_bps {
            return Err(format!(
                "ceil {} bit/s is lower than rate {} bit/s",
                ceil, self.rate_bps
            ));
        }
        if self.prio >= TC_HTB_NUMPRIO {
            return Err(format!(
                "prio {} is out of range (HTB has priorities 0..=7)",
                self.prio
            ));
        }
        if self.quantum > i32::MAX as u32 {
            return Err(format!("quantum {} bytes is too large", self.quantum));
        }
        Ok(())
    }
}

/// Default burst in bytes as iproute2 computes it (`rate/HZ + 1600`).
pub fn default_burst_bytes(rate_bytes_ps: u64) -> u32 {
    let b = rate_bytes_ps / 1_000_000_000 + HTB_DEFAULT_BURST_MTU;
    u32::try_from(b).unwrap_or(u32::MAX)
}

/// Encoded HTB class options: the payload of `TCA_OPTIONS` for
/// RTM_NEWTCLASS (TCA_HTB_PARMS, plus TCA_HTB_RATE64/CEIL64 when a rate
/// does not fit 32 bits of bytes/s). No legacy rate tables: the kernel skips
/// them when the rate spec's link layer is set.
pub fn encode_htb_class(p: &HtbClassParams) -> Vec<u8> {
    let rate = p.rate_bps / 8;
    let ceil = p.effective_ceil_bps() / 8;
    let burst = if p.burst_bytes == 0 {
        default_burst_bytes(rate)
    } else {
        p.burst_bytes
    };
    let cburst = if p.cburst_bytes == 0 {
        default_burst_bytes(ceil)
    } else {
        p.cburst_bytes
    };
    let spec = |r: u64| RateSpec {
        // iproute2's tc_calc_rtable() with mtu 1600 yields cell_log 3 and
        // cell_align -1; the kernel ignores both when linklayer is set.
        cell_log: 3,
        linklayer: p.linklayer.to_raw(),
        overhead: p.overhead,
        cell_align: -1,
        mpu: p.mpu,
        rate: u32::try_from(r).unwrap_or(u32::MAX),
    };
    let mut opt = Vec::with_capacity(TC_HTB_OPT_LEN);
    spec(rate).write(&mut opt);
    spec(ceil).write(&mut opt);
    opt.extend_from_slice(&xmit_ticks(rate, burst).to_ne_bytes());
    opt.extend_from_slice(&xmit_ticks(ceil, cburst).to_ne_bytes());
    opt.extend_from_slice(&p.quantum.to_ne_bytes());
    opt.extend_from_slice(&0u32.to_ne_bytes()); // level: output only
    opt.extend_from_slice(&p.prio.to_ne_bytes());

    let mut out = Vec::with_capacity(64);
    // iproute2 puts the 64-bit rates before PARMS; order does not matter.
    if rate > u64::from(u32::MAX) {
        put_nla_u64(&mut out, TCA_HTB_RATE64, rate);
    }
    if ceil > u64::from(u32::MAX) {
        put_nla_u64(&mut out, TCA_HTB_CEIL64, ceil);
    }
    put_nla(&mut out, TCA_HTB_PARMS, &opt);
    out
}

/// Payload of `TCA_OPTIONS` for an HTB qdisc: TCA_HTB_INIT carrying
/// `struct tc_htb_glob {version 3, rate2quantum, defcls, debug 0,
/// direct_pkts 0}`.
pub fn encode_htb_qdisc(default_minor: u32, r2q: u32) -> Vec<u8> {
    let mut glob = Vec::with_capacity(TC_HTB_GLOB_LEN);
    glob.extend_from_slice(&TC_HTB_PROTOVER.to_ne_bytes());
    glob.extend_from_slice(&r2q.to_ne_bytes());
    glob.extend_from_slice(&default_minor.to_ne_bytes());
    glob.extend_from_slice(&0u32.to_ne_bytes());
    glob.extend_from_slice(&0u32.to_ne_bytes());
    let mut out = Vec::with_capacity(24);
    put_nla(&mut out, TCA_HTB_INIT, &glob);
    out
}

/// Decoded `struct tc_htb_glob` (+ TCA_HTB_DIRECT_QLEN) of an HTB qdisc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HtbGlob {
    /// Version as the kernel reports it: HTB_VER 0x30011 ("ver 3.17") in
    /// dumps, although `htb_init` only accepts 3 on create.
    pub version: u32,
    /// rate-to-quantum divisor.
    pub rate2quantum: u32,
    /// Minor of the default class (unclassified traffic), 0 = direct.
    pub defcls: u32,
    /// Packets sent directly (unshaped) because no class matched.
    pub direct_pkts: u32,
    /// Length of the direct queue, if reported.
    pub direct_qlen: Option<u32>,
}

impl HtbGlob {
    /// Decode from the raw `TCA_OPTIONS` payload of an HTB qdisc.
    pub fn parse(options_raw: &[u8]) -> Option<HtbGlob> {
        let mut glob = None;
        let mut direct_qlen = None;
        for (kind, payload) in nlas(options_raw) {
            match kind {
                TCA_HTB_INIT => {
                    glob = Some((
                        rd_u32(payload, 0)?,
                        rd_u32(payload, 4)?,
                        rd_u32(payload, 8)?,
                        rd_u32(payload, 16)?,
                    ))
                }
                TCA_HTB_DIRECT_QLEN => direct_qlen = rd_u32(payload, 0),
                _ => {}
            }
        }
        let (version, rate2quantum, defcls, direct_pkts) = glob?;
        Some(HtbGlob {
            version,
            rate2quantum,
            defcls,
            direct_pkts,
            direct_qlen,
        })
    }
}

/// An HTB class as the kernel reports it (decoded TCA_HTB_PARMS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HtbClassState {
    /// Rate in bits per second.
    pub rate_bps: u64,
    /// Ceil in bits per second.
    pub ceil_bps: u64,
    /// Burst in bytes (from the kernel's buffer ticks at `rate`).
    pub burst_bytes: u64,
    /// Ceil burst in bytes (from cbuffer ticks at `ceil`).
    pub cburst_bytes: u64,
    /// Raw buffer in psched ticks (64 ns).
    pub buffer_ticks: u32,
    /// Raw cbuffer in psched ticks (64 ns).
    pub cbuffer_ticks: u32,
    /// DRR quantum in bytes as in effect (kernel-chosen if 0 was given).
    pub quantum: u32,
    /// HTB level: 0 for leaf classes; inner classes report a higher level
    /// (the top-level class of a tree shows 7).
    pub level: u32,
    /// Priority.
    pub prio: u32,
    /// Per-packet overhead of the rate spec.
    pub overhead: u16,
    /// Minimum packet unit of the rate spec.
    pub mpu: u16,
    /// Link layer of the rate spec.
    pub linklayer: LinkLayer,
}

impl HtbClassState {
    /// Decode from the raw `TCA_OPTIONS` payload of an HTB class.
    pub fn parse(options_raw: &[u8]) -> Option<HtbClassState> {
        let mut parms: Option<&[u8]> = None;
        let mut rate64 = None;
        let mut ceil64 = None;
        for (kind, payload) in nlas(options_raw) {
            match kind {
                TCA_HTB_PARMS => parms = Some(payload),
                TCA_HTB_RATE64 => rate64 = rd_u64(payload, 0),
                TCA_HTB_CEIL64 => ceil64 = rd_u64(payload, 0),
                _ => {}
            }
        }
        let b = parms?;
        let rate = RateSpec::read(b, 0)?;
        let ceil = RateSpec::read(b, TC_RATESPEC_LEN)?;
        let buffer = rd_u32(b, 24)?;
        let cbuffer = rd_u32(b, 28)?;
        let quantum = rd_u32(b, 32)?;
        let level = rd_u32(b, 36)?;
        let prio = rd_u32(b, 40)?;
        let rate_b = rate64.unwrap_or(0).max(u64::from(rate.rate));
        let ceil_b = ceil64.unwrap_or(0).max(u64::from(ceil.rate));
        Some(HtbClassState {
            rate_bps: rate_b.saturating_mul(8),
            ceil_bps: ceil_b.saturating_mul(8),
            burst_bytes: ticks_to_bytes(rate_b, buffer),
            cburst_bytes: ticks_to_bytes(ceil_b, cbuffer),
            buffer_ticks: buffer,
            cbuffer_ticks: cbuffer,
            quantum,
            level,
            prio,
            overhead: rate.overhead,
            mpu: rate.mpu,
            linklayer: LinkLayer::from_raw(u32::from(rate.linklayer)),
        })
    }
}

/// `struct tc_htb_xstats` (TCA_STATS_APP of an HTB class).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HtbXstats {
    /// Times this class lent its spare rate to others.
    pub lends: u32,
    /// Times this class borrowed from its parent.
    pub borrows: u32,
    /// Oversized packets (unused since TSO support).
    pub giants: u32,
    /// Rate tokens left, in psched ticks (64 ns); negative = in debt.
    pub tokens: i32,
    /// Ceil tokens left, in psched ticks (64 ns).
    pub ctokens: i32,
}

impl HtbXstats {
    /// Decode 20 bytes of `struct tc_htb_xstats`.
    pub fn parse(b: &[u8]) -> Option<HtbXstats> {
        if b.len() < TC_HTB_XSTATS_LEN {
            return None;
        }
        Some(HtbXstats {
            lends: rd_u32(b, 0)?,
            borrows: rd_u32(b, 4)?,
            giants: rd_u32(b, 8)?,
            tokens: rd_i32(b, 12)?,
            ctokens: rd_i32(b, 16)?,
        })
    }
}

/// `struct tc_estimator` for TCA_RATE: `interval` is log2 seconds (-2 =
/// 250 ms .. 3 = 8 s), the averaging constant is 2^ewma_log intervals.
pub fn encode_estimator(interval_log2_s: i8, ewma_log: u8) -> Vec<u8> {
    vec![interval_log2_s.to_ne_bytes()[0], ewma_log]
}

// ---------------------------------------------------------------------------
// Size table (TCA_STAB)
// ---------------------------------------------------------------------------

/// A size table ("stab") attached to a qdisc: every packet's length is
/// replaced, before any scheduling, by its on-the-wire size (overhead,
/// minimum size, ATM cells). Mirrors `tc qdisc add ... stab linklayer atm
/// overhead 40 mpu 0 mtu 2047 tsize 512`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stab {
    /// Framing of the link.
    pub linklayer: LinkLayer,
    /// Bytes added to each packet (may be negative).
    pub overhead: i32,
    /// Minimum packet unit in bytes.
    pub mpu: u32,
    /// Largest packet the table covers (2047 default); larger packets are
    /// extrapolated by the kernel.
    pub mtu: u32,
    /// Number of table entries (512 default).
    pub tsize: u32,
}

impl Default for Stab {
    fn default() -> Self {
        Stab {
            linklayer: LinkLayer::Ethernet,
            overhead: 0,
            mpu: 0,
            mtu: 2047,
            tsize: 512,
        }
    }
}

/// `struct tc_sizespec`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SizeSpec {
    /// log2 of the bytes each table cell covers.
    pub cell_log: u8,
    /// log2 of the unit of the table values.
    pub size_log: u8,
    /// Added to the length before the lookup (-1 as iproute2 sets it).
    pub cell_align: i16,
    /// Per-packet overhead added before the lookup.
    pub overhead: i32,
    /// `TC_LINKLAYER_*`.
    pub linklayer: u32,
    /// Minimum packet unit.
    pub mpu: u32,
    /// MTU the table was built for.
    pub mtu: u32,
    /// Number of u16 entries in TCA_STAB_DATA (0: overhead only).
    pub tsize: u32,
}

impl SizeSpec {
    /// Append the 24 bytes of `struct tc_sizespec`.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.push(self.cell_log);
        out.push(self.size_log);
        out.extend_from_slice(&self.cell_align.to_ne_bytes());
        out.extend_from_slice(&self.overhead.to_ne_bytes());
        out.extend_from_slice(&self.linklayer.to_ne_bytes());
        out.extend_from_slice(&self.mpu.to_ne_bytes());
        out.extend_from_slice(&self.mtu.to_ne_bytes());
        out.extend_from_slice(&self.tsize.to_ne_bytes());
    }

    /// Parse `struct tc_sizespec`.
    pub fn read(b: &[u8]) -> Option<SizeSpec> {
        Some(SizeSpec {
            cell_log: *b.first()?,
            size_log: *b.get(1)?,
            cell_align: rd_i16(b, 2)?,
            overhead: rd_i32(b, 4)?,
            linklayer: rd_u32(b, 8)?,
            mpu: rd_u32(b, 12)?,
            mtu: rd_u32(b, 16)?,
            tsize: rd_u32(b, 20)?,
        })
    }

    /// Parse the TCA_STAB_BASE out of a raw TCA_STAB payload (as dumped:
    /// the kernel reports only the base, never the table).
    pub fn from_stab_attr(stab_raw: &[u8]) -> Option<SizeSpec> {
        nlas(stab_raw)
            .find(|(k, _)| *k == TCA_STAB_BASE)
            .and_then(|(_, p)| SizeSpec::read(p))
    }
}

/// Largest `tsize` accepted here (iproute2 limits the table to what fits
/// one netlink message comfortably).
pub const STAB_MAX_TSIZE: u32 = 4096;

/// iproute2 `tc_adjust_size()`.
fn adjust_size(sz: u32, mpu: u32, ll: LinkLayer) -> u32 {
    let sz = sz.max(mpu);
    match ll {
        LinkLayer::Atm => sz.div_ceil(48).saturating_mul(53),
        LinkLayer::Ethernet => sz,
    }
}

impl Stab {
    /// Rebuild a `Stab` from the size spec the kernel reports.
    pub fn from_sizespec(s: &SizeSpec) -> Stab {
        Stab {
            linklayer: LinkLayer::from_raw(s.linklayer),
            overhead: s.overhead,
            mpu: s.mpu,
            mtu: s.mtu,
            tsize: s.tsize,
        }
    }

    /// Check limits before computing the table.
    pub fn validate(&self) -> Result<(), String> {
        if self.needs_table() {
            if self.tsize == 0 && self.mtu == 0 {
                return Ok(()); // defaults 512 / 2047 apply
            }
            if self.tsize > STAB_MAX_TSIZE {
                return Err(format!(
                    "size table tsize {} exceeds {}",
                    self.tsize, STAB_MAX_TSIZE
                ));
            }
        }
        Ok(())
    }

    fn needs_table(&self) -> bool {
        // iproute2: "if (linklayer <= LINKLAYER_ETHERNET && s->mpu == 0)
        // return 0; /* no table needed */"
        !(self.linklayer == LinkLayer::Ethernet && self.mpu == 0)
    }

    /// Compute `struct tc_sizespec` and the u16 table exactly as iproute2's
    /// `tc_calc_size_table()` does. For Ethernet without mpu no table is
    /// needed: tsize/mtu are sent as 0 and only the overhead applies.
    pub fn compute(&self) -> (SizeSpec, Vec<u16>) {
        let mut s = SizeSpec {
            cell_log: 0,
            size_log: 0,
            cell_align: 0,
            overhead: self.overhead,
            linklayer: u32::from(self.linklayer.to_raw()),
            mpu: self.mpu,
            mtu: 0,
            tsize: 0,
        };
        if !self.needs_table() {
            return (s, Vec::new());
        }
        s.mtu = if self.mtu == 0 { 2047 } else { self.mtu };
        s.tsize = if self.tsize == 0 {
            512
        } else {
            self.tsize.min(STAB_MAX_TSIZE)
        };
        let mut cell_log: u32 = 0;
        while cell_log < 31 && (s.mtu >> cell_log) > s.tsize - 1 {
            cell_log += 1;
        }
        let mut size_log: u32 = 0;
        let n = s.tsize as usize;
        let mut table = vec![0u16; n];
        'again: loop {
            for i in (0..n).rev() {
                let cell = ((i as u64 + 1) << cell_log).min(u64::from(u32::MAX)) as u32;
                let sz = adjust_size(cell, s.mpu, self.linklayer);
                let v = sz >> size_log;
                if v > u32::from(u16::MAX) {
                    size_log += 1;
                    if size_log >= 32 {
                        break 'again;
                    }
                    continue 'again;
                }
                table[i] = v as u16;
            }
            break;
        }
        s.cell_log = cell_log as u8;
        s.size_log = size_log as u8;
        s.cell_align = -1;
        (s, table)
    }

    /// The payload of the TCA_STAB attribute: nested TCA_STAB_BASE and,
    /// when a table is needed, TCA_STAB_DATA.
    pub fn encode(&self) -> Vec<u8> {
        let (spec, table) = self.compute();
        let mut base = Vec::with_capacity(TC_SIZESPEC_LEN);
        spec.write(&mut base);
        let mut out = Vec::with_capacity(32 + table.len() * 2);
        put_nla(&mut out, TCA_STAB_BASE, &base);
        if !table.is_empty() {
            let mut data = Vec::with_capacity(table.len() * 2);
            for v in &table {
                data.extend_from_slice(&v.to_ne_bytes());
            }
            put_nla(&mut out, TCA_STAB_DATA, &data);
        }
        out
    }

    /// Size the kernel will account for a packet of `len` bytes (skb->len)
    /// with this table (`__qdisc_calculate_pkt_len`), for tests/diagnostics.
    pub fn packet_len(&self, len: u32) -> u64 {
        let (s, table) = self.compute();
        let pkt_len = i64::from(len) + i64::from(s.overhead);
        if s.tsize == 0 || table.is_empty() {
            return pkt_len.max(1) as u64;
        }
        let slot = (pkt_len + i64::from(s.cell_align)).max(0) >> s.cell_log;
        let tsize = i64::from(s.tsize);
        let v = if slot < tsize {
            i64::from(table[slot as usize])
        } else {
            i64::from(table[(tsize - 1) as usize]) * (slot / tsize)
                + i64::from(table[(slot % tsize) as usize])
        };
        ((v << s.size_log).max(1)) as u64
    }
}

// ---------------------------------------------------------------------------
// Leaf qdiscs
// ---------------------------------------------------------------------------

/// Cake flow isolation mode (`CAKE_FLOW_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CakeFlowMode {
    /// `flowblind`.
    None,
    /// `srchost`.
    SrcHost,
    /// `dsthost`.
    DstHost,
    /// `hosts`.
    Hosts,
    /// `flows`.
    Flows,
    /// `dual-srchost`.
    DualSrcHost,
    /// `dual-dsthost`.
    DualDstHost,
    /// `triple-isolate` (cake's default).
    #[default]
    TripleIsolate,
}

impl CakeFlowMode {
    /// The uapi value.
    pub fn to_raw(self) -> u32 {
        match self {
            CakeFlowMode::None => 0,
            CakeFlowMode::SrcHost => 1,
            CakeFlowMode::DstHost => 2,
            CakeFlowMode::Hosts => 3,
            CakeFlowMode::Flows => 4,
            CakeFlowMode::DualSrcHost => 5,
            CakeFlowMode::DualDstHost => 6,
            CakeFlowMode::TripleIsolate => 7,
        }
    }
}

/// The queue inside an HTB leaf class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leaf {
    /// Byte-limited FIFO (`bfifo limit N`).
    Bfifo {
        /// Queue limit in bytes.
        limit_bytes: u32,
    },
    /// Packet-limited FIFO (`pfifo limit N`).
    Pfifo {
        /// Queue limit in packets.
        limit_packets: u32,
    },
    /// fq_codel (`fq_codel limit L target T interval I [no]ecn [quantum Q]`).
    FqCodel {
        /// Hard queue limit in packets.
        limit_packets: u32,
        /// CoDel target delay in µs.
        target_us: u32,
        /// CoDel interval in µs.
        interval_us: u32,
        /// Mark ECN-capable packets instead of dropping.
        ecn: bool,
        /// DRR quantum in bytes (kernel default: device MTU + 14).
        quantum: Option<u32>,
    },
    /// cake with unlimited bandwidth (the HTB class does the shaping),
    /// besteffort (one tin).
    Cake {
        /// Flow isolation.
        flow_mode: CakeFlowMode,
        /// Look up conntrack for the pre-NAT addresses (needs conntrack in
        /// the kernel; only sent when true).
        nat: bool,
        /// Drop redundant pure TCP ACKs (`ack-filter`).
        ack_filter: bool,
    },
}

impl Leaf {
    /// The qdisc kind string.
    pub fn kind(&self) -> &'static str {
        match self {
            Leaf::Bfifo { .. } => "bfifo",
            Leaf::Pfifo { .. } => "pfifo",
            Leaf::FqCodel { .. } => "fq_codel",
            Leaf::Cake { .. } => "cake",
        }
    }

    /// Validate before sending.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Leaf::Bfifo { limit_bytes } if *limit_bytes == 0 => {
                Err("bfifo limit of 0 bytes would drop every packet".into())
            }
            Leaf::Pfifo { limit_packets } if *limit_packets == 0 => {
                Err("pfifo limit of 0 packets would drop every packet".into())
            }
            Leaf::FqCodel {
                limit_packets,
                interval_us,
                ..
            } => {
                if *limit_packets == 0 {
                    Err("fq_codel limit must be at least 1 packet".into())
                } else if *interval_us == 0 {
                    Err("fq_codel interval must be > 0".into())
                } else {
                    Ok(())
                }
            }
            _ => Ok(()),
        }
    }

    /// Payload of `TCA_OPTIONS`: a plain `struct tc_fifo_qopt` for the
    /// fifos, nested attributes for fq_codel and cake.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Leaf::Bfifo { limit_bytes } => limit_bytes.to_ne_bytes().to_vec(),
            Leaf::Pfifo { limit_packets } => limit_packets.to_ne_bytes().to_vec(),
            Leaf::FqCodel {
                limit_packets,
                target_us,
                interval_us,
                ecn,
                quantum,
            } => {
                let mut out = Vec::with_capacity(48);
                put_nla_u32(&mut out, TCA_FQ_CODEL_LIMIT, *limit_packets);
                put_nla_u32(&mut out, TCA_FQ_CODEL_TARGET, *target_us);
                put_nla_u32(&mut out, TCA_FQ_CODEL_INTERVAL, *interval_us);
                put_nla_u32(&mut out, TCA_FQ_CODEL_ECN, u32::from(*ecn));
                if let Some(q) = quantum {
                    put_nla_u32(&mut out, TCA_FQ_CODEL_QUANTUM, *q);
                }
                out
            }
            Leaf::Cake {
                flow_mode,
                nat,
                ack_filter,
            } => {
                let mut out = Vec::with_capacity(48);
                // 0 = unlimited (iproute2 sends it for `unlimited`).
                put_nla_u64(&mut out, TCA_CAKE_BASE_RATE64, 0);
                put_nla_u32(&mut out, TCA_CAKE_DIFFSERV_MODE, CAKE_DIFFSERV_BESTEFFORT);
                put_nla_u32(&mut out, TCA_CAKE_FLOW_MODE, flow_mode.to_raw());
                if *nat {
                    put_nla_u32(&mut out, TCA_CAKE_NAT, 1);
                }
                put_nla_u32(
                    &mut out,
                    TCA_CAKE_ACK_FILTER,
                    if *ack_filter {
                        CAKE_ACK_FILTER
                    } else {
                        CAKE_ACK_NONE
                    },
                );
                out
            }
        }
    }
}

/// Minimal valid options for creating a qdisc of `kind` as a root with no
/// other parameters (used by the kind probe): `None` = send no TCA_OPTIONS.
pub fn probe_options(kind: &str) -> Option<Vec<u8>> {
    match kind {
        "htb" => Some(encode_htb_qdisc(0, 10)),
        "tbf" => {
            // struct tc_tbf_qopt {rate, peakrate, limit, buffer, mtu} at
            // 1 Mbit/s, 10 kB limit, 2 kB burst.
            let rate = 125_000u64;
            let spec = RateSpec {
                cell_log: 3,
                linklayer: 1,
                overhead: 0,
                cell_align: -1,
                mpu: 0,
                rate: rate as u32,
            };
            let mut q = Vec::with_capacity(36);
            spec.write(&mut q);
            RateSpec::default().write(&mut q);
            q.extend_from_slice(&10_000u32.to_ne_bytes());
            q.extend_from_slice(&xmit_ticks(rate, 2_000).to_ne_bytes());
            q.extend_from_slice(&0u32.to_ne_bytes());
            let mut out = Vec::new();
            put_nla(&mut out, 1 /* TCA_TBF_PARMS */, &q);
            put_nla(
                &mut out,
                6, /* TCA_TBF_BURST */
                &2_000u32.to_ne_bytes(),
            );
            Some(out)
        }
        "bfifo" => Some(
            Leaf::Bfifo {
                limit_bytes: 10_000,
            }
            .encode(),
        ),
        "pfifo" => Some(Leaf::Pfifo { limit_packets: 100 }.encode()),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
