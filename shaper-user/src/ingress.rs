//! `[download] account_arrivals`: everything that reaches the download shaper
//! from the WAN counts against the download rate, dropped or not (CAKE's ingress
//! mode, done over the HTB tree).
//!
//! The download shaper sits behind the bottleneck: every packet it sees has
//! already crossed the copper, so dropping it gives the line nothing back unless
//! its sender slows down. An unresponsive flow (UDP that ignores loss) keeps
//! arriving at its rate whatever the shaper drops of it; if the shaper still
//! hands the responsive flows its whole rate, the two together exceed the line
//! and the modem's queue fills, for every class.
//!
//! So every 100 ms (in `rates`, which runs it beside autorate) the controller
//! measures what arrived at the shaper from the WAN over the last 400 ms (the
//! classifier's per-class byte and packet counters of WAN arrivals,
//! `WAN_ARRIVALS`, before any queue, each packet sized as the HTB
//! root's size table sizes it) and steers the download rate so that arrivals
//! stay within `rate` (+2 %, the responsive flows' own drops): while more
//! arrives, the rate comes down by half the excess per tick;
//! while less arrives, it climbs back by a tenth of the room per tick, up to the
//! configured rate. The whole tree is retuned (`apply::retune`), every class
//! scaled with it, so classes with guarantees cannot keep what the line no
//! longer has.
//!
//! Two properties make it work:
//! - A modem with a queue sends at its line rate, so while a queue stands in it
//!   the arrivals are the line rate, above `rate` + 2 % (the configured rate is
//!   below the line's): the rate keeps coming down until the modem's queue is
//!   gone, however it got there.
//! - With the modem empty, arrivals = the unresponsive flows + what the shaper
//!   lets the responsive ones have: the rate settles where the responsive flows
//!   get the line minus the unresponsive ones, and the unresponsive flow's class
//!   keeps only what its own share of the smaller rate gives it. The flood
//!   costs throughput (which it has taken on the line anyway), not latency.
//!
//! Only WAN arrivals count: a download packet is one when its ingress interface
//! (`skb_iif`) is the WAN interface, the routed WAN device or, in bridge mode, the
//! WAN port (bridged frames keep the port they came in on). LAN-to-LAN traffic
//! routed or hairpinned back out of the LAN port, and the box's own traffic to the
//! LAN, leave through the shaper too (and are shaped with the rest) but never
//! crossed the line: counted, they would let a LAN host push the download rate to
//! its floor without touching the line.
//!
//! A GSO/GRO packet is counted by the classifier as the segments it leaves as,
//! each with its own headers (as the qdiscs count it), and each segment is sized
//! here with the line's overhead (the HTB root's size table adds the overhead
//! once per GSO packet: it errs the other way).
//!
//! Known limits:
//! - A flood above the line rate cannot be helped from behind the modem: the rate
//!   then stays at its floor (a tenth).
//! - What reaches the LAN from the WAN through a device stacked on the WAN
//!   interface has that device as its ingress interface and is not counted: a VLAN
//!   sub-interface of the WAN port when `[interfaces] wan` names the port (name the
//!   VLAN device instead), a tunnel ending on the box (WireGuard, IPsec), or a
//!   proxy or resolver on the box relaying WAN answers (the box's own traffic).
//!
//! With `[autorate]` too, arrivals are held to the line rate autorate has found when
//! that is below the configured one, and the lower of the two rates is written
//! (`rates`).

use std::collections::VecDeque;
use std::time::Instant;

use anyhow::Result;
use aya::maps::{MapData, PerCpuArray};
use shaper_common::{Counter, MAP_WAN_ARRIVALS};

use crate::dir::Dir;
use crate::{
    apply::Applied,
    compile::{self, Accounting},
    kernel::bpf::{self, Pins},
    kernel::tc::Tc,
};

/// Arrivals are measured over this many ticks: TCP's bursts make 100 ms readings swing
/// by a fifth either way (seen on the VM tier's ADSL line), a queue standing in the modem
/// shows in every reading.
const WINDOW: usize = 4;
/// Arrivals may exceed the rate by this share before it is cut: the shaper's own
/// drops of responsive flows (TCP finding its rate), which do come back off.
pub const MARGIN: f64 = 0.02;
/// Share of the excess taken off the rate per tick.
const GAIN_DOWN: f64 = 0.5;
/// Share of the room given back per tick.
const GAIN_UP: f64 = 0.1;
/// The rate never goes below this share of the configured one.
pub const FLOOR: f64 = 0.1;
/// Changes smaller than this share of the configured rate are not applied.
const STEP: f64 = 0.005;

/// The controller: arrivals in, rate out; rates in the HTB root's units.
#[derive(Debug, Clone)]
pub struct Governor {
    base: f64,
    rate: f64,
    /// The rate last applied.
    applied: f64,
}

impl Governor {
    pub fn new(base_bps: u64) -> Self {
        let base = base_bps as f64;
        Governor {
            base,
            rate: base,
            // The first update applies: the tree holds the configured rates after an apply,
            // unless a retune raced with it.
            applied: f64::NAN,
        }
    }

    pub fn rate_bps(&self) -> u64 {
        self.rate as u64
    }

    /// The rate as a share of the base (1 while arrivals are within it).
    pub fn factor(&self) -> f64 {
        if self.base > 0.0 {
            (self.rate / self.base).clamp(0.0, 1.0)
        } else {
            1.0
        }
    }

    /// The line's rate moved (autorate found it lower, or higher again): arrivals are
    /// held to the new base, the rate keeps its share of it (and counts as applied: the
    /// caller writes the tree at the new base).
    pub fn set_base(&mut self, base_bps: u64) {
        let k = self.factor();
        self.base = base_bps as f64;
        self.rate = k * self.base;
        self.applied = self.rate;
    }

    /// One tick's arrivals (bits per second, as the root counts them). Returns the
    /// rate to apply when it should change.
    pub fn update(&mut self, arrived_bps: f64) -> Option<u64> {
        let limit = self.base * (1.0 + MARGIN);
        let err = arrived_bps - limit;
        self.rate = if err > 0.0 {
            self.rate - GAIN_DOWN * err
        } else {
            self.rate - GAIN_UP * err
        }
        .clamp(self.base * FLOOR, self.base);
        // NaN (nothing applied yet) compares false: that is a move too.
        let moved = (self.rate - self.applied)
            .abs()
            .partial_cmp(&(STEP * self.base))
            .is_none_or(|o| o != std::cmp::Ordering::Less);
        let home = self.rate >= self.base && self.applied < self.base;
        if moved || home {
            self.applied = self.rate;
            return Some(self.rate as u64);
        }
        None
    }
}

/// Bytes of an IP packet of `len` bytes (as the interface holds it: with its
/// link-layer header when it has one) as the HTB root's size table counts it.
pub fn root_len(a: &Accounting, len: u64, l2_header: bool) -> f64 {
    if a.is_none() {
        return len as f64;
    }
    let l = (len as i64 + i64::from(a.stab_overhead(if l2_header { 14 } else { 0 }))).max(0) as u64;
    let l = if a.atm() { l.div_ceil(48) * 53 } else { l };
    l.max(u64::from(a.mpu)) as f64
}

/// Per-class counters of download packets that came in from the WAN.
pub(crate) struct Arrivals {
    map: PerCpuArray<MapData, Counter>,
    /// Class indices of the download tree.
    classes: Vec<u32>,
    /// The last readings, oldest first (at most WINDOW + 1).
    seen: VecDeque<(Instant, Vec<Counter>)>,
}

impl Arrivals {
    fn read(&self) -> Vec<Counter> {
        self.classes
            .iter()
            .map(|&k| self.map.get(&k, 0).map(bpf::sum_cpus).unwrap_or_default())
            .collect()
    }

    /// Bits per second (root units) over the last WINDOW ticks.
    pub(crate) fn rate(&mut self, acc: &Accounting, l2: bool) -> f64 {
        self.seen.push_back((Instant::now(), self.read()));
        while self.seen.len() > WINDOW + 1 {
            self.seen.pop_front();
        }
        let (Some((t0, old)), Some((t1, now))) = (self.seen.front(), self.seen.back()) else {
            return 0.0;
        };
        let secs = t1.duration_since(*t0).as_secs_f64().max(1e-3);
        let mut bits = 0.0;
        for (n, o) in now.iter().zip(old) {
            let (p, b) = (
                n.packets.saturating_sub(o.packets),
                n.bytes.saturating_sub(o.bytes),
            );
            if p > 0 {
                bits += p as f64 * root_len(acc, b / p, l2) * 8.0;
            }
        }
        bits / secs
    }
}

/// Opens the per-class arrival counters of the download tree; also whether the LAN
/// interface's packets carry a link-layer header (how they are sized).
pub(crate) async fn open(
    a: &Applied,
    tc: &Tc,
    pins: &Pins,
    down: &compile::DirPlan,
) -> Result<(Arrivals, bool)> {
    let l2 = tc.link_info(a.ifindex[Dir::Down]).await?.has_l2_header;
    let map: PerCpuArray<MapData, Counter> =
        PerCpuArray::try_from(bpf::open_pinned(pins, MAP_WAN_ARRIVALS)?)?;
    let mut arr = Arrivals {
        map,
        classes: down.classes.iter().map(|c| c.index).collect(),
        seen: VecDeque::new(),
    };
    arr.seen.push_back((Instant::now(), arr.read()));
    Ok((arr, l2))
}

/// The applied tree with every rate and ceiling times `k` (<= 1): classes given an
/// absolute rate shrink with the rest, so no guarantee keeps what the line no longer
/// has. Bursts stay (two frames).
pub fn scaled(d: &compile::DirPlan, k: f64) -> compile::DirPlan {
    let k = k.clamp(0.0, 1.0);
    // HTB's smallest useful rate; the config refuses guarantees below it.
    let at = |bps: u64| ((bps as f64 * k).round() as u64).max(8_000);
    let mut out = d.clone();
    out.rate_bps = at(d.rate_bps);
    for c in &mut out.classes {
        c.rate_bps = at(c.rate_bps);
        c.ceil_bps = at(c.ceil_bps).min(out.rate_bps).max(c.rate_bps);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Framing;

    fn acc(framing: Framing, overhead: i32, mpu: u32) -> Accounting {
        Accounting {
            line: None,
            framing,
            overhead,
            mpu,
            rate_num: 1,
            rate_den: 1,
        }
    }

    #[test]
    fn packets_are_sized_as_the_size_table_sizes_them() {
        assert_eq!(root_len(&acc(Framing::Ethernet, 0, 0), 1514, true), 1514.0);
        // PTM, 30 bytes on the IP packet: 1500 + 30 (the 14-byte header replaced).
        assert_eq!(root_len(&acc(Framing::Ptm, 30, 0), 1514, true), 1530.0);
        assert_eq!(root_len(&acc(Framing::Ptm, 30, 0), 1500, false), 1530.0);
        // ATM, 10 bytes: 1510 -> 32 cells of 53.
        assert_eq!(root_len(&acc(Framing::Atm, 10, 0), 1514, true), 32.0 * 53.0);
        // A small packet is counted at least mpu.
        assert_eq!(root_len(&acc(Framing::Ptm, 30, 68), 54, true), 70.0);
        assert_eq!(root_len(&acc(Framing::Ptm, 30, 96), 54, true), 96.0);
    }

    #[test]
    fn a_lowered_tree_scales_every_class_absolute_rates_too() {
        let text = "[interfaces]\nwan = \"wan0\"\nlan = \"lan0\"\n[upload]\nrate = \"10mbit\"\n[download]\nrate = \"40mbit\"\n\
            [[class]]\nname = \"video\"\npriority = 0\nguaranteed = \"4mbit\"\nceiling = \"100%\"\n\
            [[class]]\nname = \"default\"\npriority = 3\nguaranteed = \"50%\"\nceiling = \"50%\"\ndefault = true\n";
        let policy = crate::config::parse(std::path::Path::new("t.toml"), text).expect("config");
        let plan = compile::plan(&policy, None);
        let half = scaled(&plan.dirs[Dir::Down], 0.5);
        assert_eq!(half.rate_bps, 20_000_000);
        let class = |n: &str| half.classes.iter().find(|c| c.name == n).expect("class");
        let (video, default) = (class("video"), class("default"));
        assert_eq!((video.rate_bps, video.ceil_bps), (2_000_000, 20_000_000));
        assert_eq!(
            (default.rate_bps, default.ceil_bps),
            (10_000_000, 10_000_000)
        );
        assert_eq!(half.classes.len(), plan.dirs[Dir::Down].classes.len());
        // Nothing is ever raised, nor set below HTB's floor.
        let tiny = scaled(&plan.dirs[Dir::Down], 0.0);
        assert!(tiny
            .classes
            .iter()
            .all(|c| c.rate_bps == 8_000 && c.ceil_bps >= c.rate_bps));
        assert_eq!(scaled(&plan.dirs[Dir::Down], 2.0), plan.dirs[Dir::Down]);
    }

    #[test]
    fn arrivals_within_the_rate_leave_it_alone() {
        let mut g = Governor::new(36_000_000);
        assert_eq!(g.update(36_000_000.0 * 1.01), Some(36_000_000));
        for _ in 0..100 {
            assert_eq!(g.update(36_000_000.0 * 1.01), None);
        }
        assert_eq!(g.rate_bps(), 36_000_000);
    }

    #[test]
    fn a_new_line_rate_keeps_the_share_and_the_limit_follows_it() {
        // A flood held the rate at half; autorate then finds the line at 24 of 36.
        let mut g = Governor::new(36_000_000);
        g.update(0.0);
        for _ in 0..200 {
            if g.factor() <= 0.5 {
                break;
            }
            g.update(40_000_000.0);
        }
        let k = g.factor();
        assert!(k < 0.6, "{k}");
        g.set_base(24_000_000);
        assert!((g.factor() - k).abs() < 1e-9);
        assert_eq!(g.rate_bps(), (k * 24e6) as u64);
        // Arrivals are now held to the new line rate: 26 Mbit/s is above it, and cut.
        let before = g.rate_bps();
        assert!(g.update(26_000_000.0).expect("cut") < before);
        // Quiet again: back to the whole of the new base, never above it.
        for _ in 0..300 {
            g.update(1_000_000.0);
        }
        assert_eq!(g.rate_bps(), 24_000_000);
        assert_eq!(g.factor(), 1.0);
        // The line comes back: a governor at its whole share follows at once.
        g.set_base(36_000_000);
        assert_eq!((g.rate_bps(), g.factor()), (36_000_000, 1.0));
    }

    #[test]
    fn a_standing_modem_queue_keeps_cutting_until_arrivals_fall() {
        // The modem's queue sends at the line (40 Mbit/s) whatever the shaper does.
        let mut g = Governor::new(36_000_000);
        g.update(0.0);
        let mut last = 36_000_000;
        for _ in 0..5 {
            let r = g.update(40_000_000.0).expect("a cut every tick");
            assert!(r < last, "{r} < {last}");
            last = r;
        }
        // Down to the floor if it never ends (a flood above the line).
        for _ in 0..200 {
            g.update(40_000_000.0);
        }
        assert_eq!(g.rate_bps(), 3_600_000);
    }

    #[test]
    fn an_unresponsive_flow_settles_the_rate_where_arrivals_meet_it() {
        // 20 Mbit/s unresponsive + responsive flows that take what the shaper gives
        // them (the rate minus the flood's own share, 5 % of the rate).
        let mut g = Governor::new(36_000_000);
        let mut rate = 36_000_000.0;
        for _ in 0..300 {
            let arrived = 20e6 + 0.95 * rate;
            if let Some(r) = g.update(arrived) {
                rate = r as f64;
            }
        }
        let fixed = (36e6 * (1.0 + MARGIN) - 20e6) / 0.95;
        assert!((rate - fixed).abs() < 0.02 * 36e6, "{rate} vs {fixed}");
        // The flood stops: back to the configured rate.
        for _ in 0..100 {
            if let Some(r) = g.update(0.9 * rate) {
                rate = r as f64;
            }
        }
        assert_eq!(g.rate_bps(), 36_000_000);
    }
}
