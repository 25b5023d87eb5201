//! `[download] window_clamp`: sender control for downloads by clamping the TCP
//! receive window LAN hosts advertise ("TCP rate control", as Packeteer did).
//!
//! The download bottleneck is the modem upstream of the gateway: the download
//! shaper on the LAN egress can delay and drop what already crossed the line, but
//! it cannot stop a sender in slow start or growing its window from filling the
//! modem's buffer. A sender "MUST NOT send" beyond the highest ACK + min(cwnd,
//! rwnd) (RFC 5681 §2), so bounding each download's receive window to about its
//! share of the rate times its round trip bounds what it keeps in flight, and so
//! the modem's queue, whatever its congestion control.
//!
//! The classifier does the per-packet part (shaper-ebpf, `clamp_packet`): it
//! follows TCP connections whose handshake it saw (`CLAMP_FLOWS`, keyed by the
//! WAN peer's address and port, the LAN-side port and the family, so masquerading
//! does not matter), records the LAN host's window scale, MSS and the WAN round
//! trip of the handshake (the LAN host's SYN out to the peer's SYN-ACK in; for
//! connections the peer opened, the LAN host's SYN-ACK out to the peer's next ACK
//! in), and rewrites the window of every ACK the LAN host sends to
//! `W = max(4 MSS, share x (rtt + window_clamp_queue_ms))`, never moving the
//! right edge it advertised before to the left (`shaper_common::clamp_window`),
//! fixing the TCP checksum.
//!
//! This task supplies `share`: every [`CLAMP_TICK_MS`] it reads the download
//! classes' rates as they are in the kernel now (arrival accounting and autorate
//! retune them in place), the number of clamped flows that carried a quarter of
//! their share (at least `CLAMP_ACTIVE_BYTES`, 16 KiB) of download data in each
//! class in the current or the last epoch (~1 s, counted by the classifier in
//! `CLAMP_ACTIVE`: bulk flows, not keep-alives nor a web page's short transfers,
//! which never use a share and, counted, cost the long flows a third of the line
//! in the namespace matrix: goodput 70 % with 16 KiB, 88 % with a quarter share),
//! divides the rate each busy class gets as HTB shares the
//! parent among the busy classes ([`class_rates`]) by its flows, and writes the
//! per-flow share per class into `CLAMP_SHARE`. Without `shaper run` (a one-shot
//! `apply`) the share stays what the apply wrote: the class's ceiling, as for a
//! single flow (many flows then each get a single flow's window).

use std::time::Duration;

use anyhow::Result;
use aya::maps::{Array, MapData};
use shaper_common::{
    ActiveWindow, CLAMP_EPOCH_SHIFT, CLAMP_TICK_MS, MAP_CLAMP_ACTIVE, MAP_CLAMP_SHARE,
};
use tokio::sync::watch;

use crate::dir::Dir;
use crate::{
    apply::Applied,
    compile::{self, PARENT_CLASSID},
    kernel::bpf::{self, Pins},
    kernel::tc::Tc,
};

/// One download class as the share computation sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassNow {
    /// Guaranteed rate and ceiling in the kernel now (bit/s).
    pub rate_bps: u64,
    pub ceil_bps: u64,
    /// HTB priority (lower is served excess first).
    pub prio: u32,
    /// Clamped flows active in it.
    pub flows: u64,
}

/// The rate (bit/s) each class's flows can expect now: a busy class (one with
/// flows) gets its guarantee, and what the parent has beyond the busy classes'
/// guarantees goes to them as HTB lends it: lower `prio` first, classes of one
/// priority in proportion to their guarantees (HTB's quanta follow the rates),
/// each up to its ceiling. An idle class is given what it would get if it were
/// the only one: its ceiling (capped by the parent), so the first flow there is
/// not starved before the next tick counts it.
pub fn class_rates(parent_bps: u64, classes: &[ClassNow]) -> Vec<u64> {
    let mut out: Vec<u64> = classes
        .iter()
        .map(|c| {
            if c.flows > 0 {
                c.rate_bps.min(c.ceil_bps)
            } else {
                c.ceil_bps.min(parent_bps)
            }
        })
        .collect();
    let guaranteed: u64 = classes
        .iter()
        .zip(&out)
        .filter(|(c, _)| c.flows > 0)
        .map(|(_, r)| *r)
        .sum();
    let mut left = parent_bps.saturating_sub(guaranteed) as f64;
    let mut prios: Vec<u32> = classes
        .iter()
        .filter(|c| c.flows > 0)
        .map(|c| c.prio)
        .collect();
    prios.sort_unstable();
    prios.dedup();
    for p in prios {
        // Water-filling within the priority level: a class that reaches its
        // ceiling leaves the rest to the others.
        for _ in 0..classes.len() {
            if left < 1.0 {
                break;
            }
            let open: Vec<usize> = (0..classes.len())
                .filter(|&i| {
                    let c = &classes[i];
                    c.flows > 0 && c.prio == p && out[i] < c.ceil_bps
                })
                .collect();
            if open.is_empty() {
                break;
            }
            let weight: f64 = open
                .iter()
                .map(|&i| classes[i].rate_bps.max(1) as f64)
                .sum();
            let mut given = 0.0;
            for &i in &open {
                let c = &classes[i];
                let want = left * c.rate_bps.max(1) as f64 / weight;
                let room = (c.ceil_bps - out[i]) as f64;
                let g = want.min(room);
                out[i] += g as u64;
                given += g;
            }
            left -= given;
            if given < 1.0 {
                break;
            }
        }
    }
    out
}

/// Per-flow shares in bytes per second, from each class's rate and flows.
pub fn shares(parent_bps: u64, classes: &[ClassNow]) -> Vec<u64> {
    class_rates(parent_bps, classes)
        .iter()
        .zip(classes)
        .map(|(r, c)| r / 8 / c.flows.max(1))
        .collect()
}

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    use nix::time::{clock_gettime, ClockId};
    // CLOCK_MONOTONIC cannot fail on Linux; 0 if it ever did (as before).
    clock_gettime(ClockId::CLOCK_MONOTONIC).map_or(0, |ts| {
        ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
    })
}

/// Active clamped flows per download class (by class index) as the classifier
/// counts them now.
pub fn active_flows(pins: &Pins, nclasses: usize) -> Result<Vec<u64>> {
    let m: Array<MapData, ActiveWindow> =
        Array::try_from(bpf::open_pinned(pins, MAP_CLAMP_ACTIVE)?)?;
    let now = monotonic_ns() >> CLAMP_EPOCH_SHIFT;
    Ok((0..nclasses)
        .map(|i| m.get(&(i as u32), 0).map_or(0, |w| w.active(now)))
        .collect())
}

/// The per-flow shares the classifier uses now (bytes/s, by class index).
pub fn current_shares(pins: &Pins, nclasses: usize) -> Result<Vec<u64>> {
    let m: Array<MapData, u64> = Array::try_from(bpf::open_pinned(pins, MAP_CLAMP_SHARE)?)?;
    Ok((0..nclasses)
        .map(|i| m.get(&(i as u32), 0).unwrap_or(0))
        .collect())
}

struct Maps {
    share: Array<MapData, u64>,
    active: Array<MapData, ActiveWindow>,
}

fn open(pins: &Pins) -> Result<Maps> {
    Ok(Maps {
        share: Array::try_from(bpf::open_pinned(pins, MAP_CLAMP_SHARE)?)?,
        active: Array::try_from(bpf::open_pinned(pins, MAP_CLAMP_ACTIVE)?)?,
    })
}

/// One refresh: the kernel's download classes now, the active flows, the shares.
async fn refresh(
    tc: &Tc,
    maps: &mut Maps,
    lan_ifindex: u32,
    down: &compile::DirPlan,
    last: &mut Vec<u64>,
) -> Result<()> {
    let kernel = tc.classes(lan_ifindex).await?;
    let htb = |classid: u32| {
        kernel
            .iter()
            .find(|k| k.classid == classid)
            .and_then(|k| k.htb)
    };
    let parent_bps = htb(PARENT_CLASSID).map_or(down.rate_bps, |h| h.rate_bps);
    let now = monotonic_ns() >> CLAMP_EPOCH_SHIFT;
    let classes: Vec<ClassNow> = down
        .classes
        .iter()
        .map(|c| {
            let k = htb(c.classid);
            ClassNow {
                rate_bps: k.map_or(c.rate_bps, |h| h.rate_bps),
                ceil_bps: k.map_or(c.ceil_bps, |h| h.ceil_bps),
                prio: c.prio,
                flows: maps.active.get(&c.index, 0).map_or(0, |w| w.active(now)),
            }
        })
        .collect();
    let s = shares(parent_bps, &classes);
    if *last != s {
        for (c, share) in down.classes.iter().zip(&s) {
            maps.share.set(c.index, *share, 0)?;
        }
        log::debug!(
            "window clamp: per-flow shares {:?} B/s, flows {:?}",
            s,
            classes.iter().map(|c| c.flows).collect::<Vec<_>>()
        );
        *last = s;
    }
    Ok(())
}

/// The daemon's task: runs while the applied policy has the window clamp on; every
/// apply (new maps) starts it again.
pub async fn run(mut applied: watch::Receiver<Option<Applied>>, pins: Pins) {
    loop {
        let current = applied.borrow_and_update().clone();
        let Some(a) = current.filter(|a| a.plan.policy.dirs[Dir::Down].window_clamp.is_some())
        else {
            if applied.changed().await.is_err() {
                return;
            }
            continue;
        };
        let plan = &a.plan;
        let opened = async { Ok::<_, anyhow::Error>((Tc::connect().await?, open(&pins)?)) }.await;
        let (tc, mut maps) = match opened {
            Ok(x) => x,
            Err(e) => {
                log::error!("download window clamp: shares fixed until the next apply: {e:#}");
                if applied.changed().await.is_err() {
                    return;
                }
                continue;
            }
        };
        log::info!(
            "download window clamp on: each TCP download's window is its share of its class's rate x (round trip + {} ms)",
            a.plan.policy.dirs[Dir::Down].window_clamp.map_or(0, |w| w.queue_ms)
        );
        let mut tick = tokio::time::interval(Duration::from_millis(CLAMP_TICK_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = Vec::new();
        let mut failing = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                c = applied.changed() => {
                    if c.is_err() {
                        return;
                    }
                    break;
                }
            }
            match refresh(
                &tc,
                &mut maps,
                a.ifindex[Dir::Down],
                &plan.dirs[Dir::Down],
                &mut last,
            )
            .await
            {
                Ok(()) => failing = false,
                Err(e) => {
                    if !failing {
                        log::warn!("download window clamp: refreshing the shares: {e:#}");
                    }
                    failing = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shaper_common::{clamp_target, clamp_window, tcp_opt_step, TcpOpts, TCP_MAX_OPTS};

    fn opts(bytes: &[u8]) -> TcpOpts {
        let mut st = TcpOpts {
            len: bytes.len() as u32,
            ..TcpOpts::default()
        };
        let mut steps = 0;
        while steps < TCP_MAX_OPTS && tcp_opt_step(&mut st, |i| bytes.get(i as usize).copied()) {
            steps += 1;
        }
        st
    }

    #[test]
    fn syn_options_give_mss_and_window_scale() {
        // Linux's SYN: MSS 1460, SACK permitted, timestamps, NOP, wscale 7.
        let linux = [
            2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
        ];
        let o = opts(&linux);
        assert_eq!((o.mss, o.has_ws, o.ws), (1460, 1, 7));
        // Windows: MSS, NOP, wscale 8, NOP, NOP, SACK permitted.
        let o = opts(&[2, 4, 0x05, 0xb4, 1, 3, 3, 8, 1, 1, 4, 2]);
        assert_eq!((o.mss, o.has_ws, o.ws), (1460, 1, 8));
        // No window scale.
        let o = opts(&[2, 4, 0x05, 0x78, 4, 2]);
        assert_eq!((o.mss, o.has_ws), (1400, 0));
        // Shifts above 14 count as 14 (RFC 7323 §2.3).
        assert_eq!(opts(&[3, 3, 15, 0]).ws, 14);
        // EOL ends the options: what follows is not read.
        assert_eq!(opts(&[2, 4, 5, 0xb4, 0, 3, 3, 7]).has_ws, 0);
        // A length below 2, or one running past the options, stops the walk with
        // what came before.
        let o = opts(&[2, 4, 5, 0xb4, 8, 1, 3, 3, 7]);
        assert_eq!((o.mss, o.has_ws), (1460, 0));
        let o = opts(&[2, 4, 5, 0xb4, 8, 0, 3, 3, 7]);
        assert_eq!((o.mss, o.has_ws), (1460, 0));
        assert_eq!(opts(&[1, 1, 3, 3]).has_ws, 0, "wscale cut short");
        assert_eq!(opts(&[1, 1, 3]).has_ws, 0, "length byte missing");
        // Wrong lengths for MSS / wscale: skipped, not misread.
        let o = opts(&[2, 3, 9, 3, 4, 7, 1, 1]);
        assert_eq!((o.mss, o.has_ws), (0, 0));
        // 40 NOPs: the walk stops at the bound.
        let o = opts(&[1; 40]);
        assert_eq!((o.pos, o.has_ws), (40, 0));
        // The byte reader saying "past the packet" stops it too.
        let mut st = TcpOpts {
            len: 20,
            ..TcpOpts::default()
        };
        let short = [1u8, 1, 3];
        while tcp_opt_step(&mut st, |i| short.get(i as usize).copied()) {}
        assert_eq!((st.has_ws, st.done), (0, 1));
        // Any byte string: at most 40 steps, never past the options.
        let mut x = 0x1234_5678u32;
        for _ in 0..20_000 {
            let mut b = [0u8; 40];
            for v in &mut b {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *v = (x % 6) as u8;
            }
            let len = (x % 41) as usize;
            let mut st = TcpOpts {
                len: len as u32,
                ..TcpOpts::default()
            };
            let mut n = 0;
            while tcp_opt_step(&mut st, |i| {
                assert!((i as usize) < len, "read past the options");
                b.get(i as usize).copied()
            }) {
                n += 1;
                assert!(n <= 40);
            }
            assert!(st.ws <= 14);
        }
    }

    #[test]
    fn target_is_share_times_rtt_plus_queue_with_a_floor() {
        // 2.5 MB/s x (20 ms + 5 ms) = 62,500 bytes.
        assert_eq!(clamp_target(2_500_000, 20_000_000, 5_000_000, 1460), 62_500);
        // Floor: 4 segments of the MSS (1460 when none was seen).
        assert_eq!(clamp_target(10_000, 20_000_000, 5_000_000, 1400), 5_600);
        assert_eq!(clamp_target(10_000, 20_000_000, 5_000_000, 0), 5_840);
        // Huge values saturate instead of overflowing.
        let m = u32::MAX as u64;
        assert_eq!(
            clamp_target(u64::MAX, u64::MAX, u64::MAX, 1460),
            m * m / 1_000_000_000
        );
    }

    #[test]
    fn clamped_window_and_the_right_edge() {
        // No edge yet: min(win, target in window units, rounded up).
        let (w, e) = clamp_window(1000, 7, 5000, 0, false, 62_500);
        assert_eq!(w, 489, "ceil(62500 / 128)");
        assert_eq!(e, 5000 + 489 * 128);
        // Never more than the host offered.
        let (w, _) = clamp_window(100, 7, 5000, 0, false, 62_500);
        assert_eq!(w, 100);
        // A target of less than one unit still leaves one unit.
        let (w, _) = clamp_window(1000, 14, 0, 0, false, 1);
        assert_eq!(w, 1);
        // The edge advertised before holds until the ACKs reach it: the cut takes
        // effect as they advance.
        let edge = 10_000 + 65_535;
        let (w, e) = clamp_window(65_535, 0, 10_000, edge, true, 8_000);
        assert_eq!((w, e), (65_535, edge));
        let (w, e) = clamp_window(65_535, 0, 70_000, edge, true, 8_000);
        assert_eq!((w, e), (8_000, 78_000), "70000+8000 is beyond the old edge");
        let (w, e) = clamp_window(65_535, 0, 60_000, edge, true, 8_000);
        assert_eq!((w, e), (15_535, edge));
        // Tracking only (target u64::MAX): the host's window, the edge follows it.
        let (w, e) = clamp_window(300, 2, 100, 50, true, u64::MAX);
        assert_eq!((w, e), (300, 1300));
        // A host shrinking its own window is passed on; the edge stays where it was.
        let (w, e) = clamp_window(10, 0, 1000, 5000, true, 100_000);
        assert_eq!((w, e), (10, 5000));
        // Sequence wrap-around.
        let (w, e) = clamp_window(512, 3, u32::MAX - 100, 200, true, 100);
        assert_eq!(w, 38, "ceil(301 / 8) keeps the edge past the wrap");
        assert_eq!(e, (u32::MAX - 100).wrapping_add(38 * 8));
    }

    /// Random ACK sequences: the right edge the sender sees never moves left, the
    /// window never exceeds the host's, and it is the target whenever the old edge
    /// allows.
    #[test]
    fn right_edge_never_moves_left() {
        let mut x = 0x9e37_79b9u32;
        let mut rnd = move |m: u32| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x % m
        };
        for _ in 0..200 {
            let shift = rnd(15) as u8;
            let mut ack = rnd(u32::MAX);
            let (mut edge, mut have) = (0u32, false);
            let mut seen: Option<u32> = None;
            for _ in 0..500 {
                // ACKs mostly advance, sometimes repeat or arrive reordered.
                match rnd(10) {
                    0 => ack = ack.wrapping_sub(rnd(3000)),
                    1 => {}
                    _ => ack = ack.wrapping_add(rnd(20_000)),
                }
                let win = (40_000 + rnd(25_536)) as u16;
                let target = [1_000u64, 8_000, 60_000, 300_000, u64::MAX][rnd(5) as usize];
                let (w, e) = clamp_window(win, shift, ack, edge, have, target);
                assert!(w <= win);
                let right = ack.wrapping_add((w as u32) << shift);
                if let Some(s) = seen {
                    // The highest edge advertised so far.
                    let host_edge = ack.wrapping_add((win as u32) << shift);
                    if (host_edge.wrapping_sub(s) as i32) >= 0 {
                        assert!(
                            (right.wrapping_sub(s) as i32) >= 0,
                            "edge moved left: {right} < {s} (shift {shift})"
                        );
                    }
                }
                if !have || (right.wrapping_sub(edge) as i32) > 0 {
                    assert_eq!(e, right);
                } else {
                    assert_eq!(e, edge);
                }
                let max = match seen {
                    Some(s) if (s.wrapping_sub(right) as i32) > 0 => s,
                    _ => right,
                };
                seen = Some(max);
                edge = e;
                have = true;
            }
        }
    }

    #[test]
    fn busy_classes_share_the_parent_as_htb_lends_it() {
        let c = |rate, ceil, prio, flows| ClassNow {
            rate_bps: rate,
            ceil_bps: ceil,
            prio,
            flows,
        };
        // Alone, a class gets its ceiling; its flows share it.
        let cls = [
            c(5_000_000, 20_000_000, 3, 4),
            c(5_000_000, 20_000_000, 1, 0),
        ];
        assert_eq!(class_rates(20_000_000, &cls), vec![20_000_000, 20_000_000]);
        assert_eq!(shares(20_000_000, &cls), vec![625_000, 2_500_000]);
        // Two busy classes: guarantees, then the rest to the lower prio first, up to
        // its ceiling.
        let cls = [
            c(5_000_000, 12_000_000, 1, 1),
            c(5_000_000, 20_000_000, 3, 2),
        ];
        assert_eq!(class_rates(20_000_000, &cls), vec![12_000_000, 8_000_000]);
        // Same prio: in proportion to the guarantees.
        let cls = [
            c(2_000_000, 20_000_000, 2, 1),
            c(6_000_000, 20_000_000, 2, 1),
        ];
        assert_eq!(class_rates(20_000_000, &cls), vec![5_000_000, 15_000_000]);
        // A rate lowered by autorate or arrival accounting lowers the shares.
        let cls = [c(5_000_000, 10_000_000, 1, 2)];
        assert_eq!(shares(10_000_000, &cls), vec![625_000]);
    }
}
