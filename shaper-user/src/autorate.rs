//! Rate adaptation for lines whose usable rate varies (`[autorate]`).
//!
//! The anchor is cake-autorate's published logic: probe reflectors beyond the line with
//! ICMP timestamp requests (as its `tsping` pinger does), so each probe gives a one-way
//! delay per direction (offset by the clocks' difference, which the baseline absorbs; our
//! side runs on the monotonic clock, and a one-way shift the round trip does not show is
//! the reflector's clock stepping, not a queue: the baselines are re-seeded);
//! keep a per-reflector baseline for each direction (fast to fall, slow to rise, never
//! lifted by a delayed sample); call a sample "bloated" when it exceeds the baseline by
//! `delay_ms` plus two full frames at the direction's rate (the HTB burst a probe can find
//! ahead of it in our own class: 24 ms at 1 Mbit/s); declare bufferbloat in a direction
//! when 3 of its last 6 samples are bloated, and then cut that direction to 90 % of what it
//! carried (not of what it was allowed: a line that retrained low is found in one cut), with
//! a 300 ms refractory period between cuts. Without bloat and with the direction busy
//! (carrying >= 75 % of its rate) the rate climbs back by 1 % of the configured rate per
//! 100 ms tick, after a 1 s pause following a cut. Idle directions keep their rate (no
//! information). The rates stay between `min_rate` and the configured `rate`.
//!
//! The rates change in place in the HTB trees (`apply::retune`, written by `rates`, which
//! runs this controller beside arrival accounting), never the classifier or the leaves. The probes leave through the shaper: the policy puts them first, into the
//! autorate class (rule `autorate-probes`), so they measure the line, not the site's bulk
//! queue. Reflectors must answer ICMP timestamp requests (Linux does; some routers filter
//! them): IPv4 only.

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::Result;
use nix::sys::socket::{
    recv, sendto, socket, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn,
};
use tokio::io::unix::AsyncFd;

use crate::config::{Autorate, Policy};
use crate::dir::{Dir, PerDir};

const WINDOW: usize = 6;
const BLOAT_OF_WINDOW: usize = 3;
const REFRACTORY_CUT: Duration = Duration::from_millis(300);
const PAUSE_AFTER_CUT: Duration = Duration::from_secs(1);
const CUT_FACTOR: f64 = 0.9;
const STEP_UP_OF_MAX: f64 = 0.01;
const BUSY_FOR_STEP_UP: f64 = 0.75;
/// Baseline moves towards a lower sample with this weight, towards a higher one with the
/// other (cake-autorate's alpha_baseline_decrease / alpha_baseline_increase).
const BASELINE_DOWN: f64 = 0.9;
const BASELINE_UP: f64 = 0.001;

/// One direction's state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DirState {
    pub max_bps: u64,
    pub min_bps: u64,
    pub rate_bps: u64,
}

/// What the controller did to one direction on a tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Cut,
    Raise,
}

/// What the controller decided on a tick, per direction.
pub type Change = PerDir<Option<Step>>;

/// Delay samples of one direction.
#[derive(Debug, Default)]
struct Delays {
    baselines: Vec<Option<f64>>,
    window: VecDeque<bool>,
    last_delta_ms: f64,
    last_cut: Option<Instant>,
}

impl Delays {
    fn push(&mut self, i: usize, owd_ms: f64, threshold_ms: f64) {
        let Some(slot) = self.baselines.get_mut(i) else {
            return;
        };
        let base = *slot.get_or_insert(owd_ms);
        let delta = owd_ms - base;
        if delta < 0.0 {
            *slot = Some(BASELINE_DOWN * owd_ms + (1.0 - BASELINE_DOWN) * base);
        } else if delta < threshold_ms {
            // Only quiet samples may lift the baseline: a standing queue must not become it.
            *slot = Some(BASELINE_UP * owd_ms + (1.0 - BASELINE_UP) * base);
        }
        self.last_delta_ms = delta.max(0.0);
        if self.window.len() == WINDOW {
            self.window.pop_front();
        }
        self.window.push_back(delta > threshold_ms);
    }

    /// How far a sample sits above reflector `i`'s baseline (none before the first).
    fn delta(&self, i: usize, owd_ms: f64) -> Option<f64> {
        Some(owd_ms - (*self.baselines.get(i)?)?)
    }

    /// Forgets reflector `i`'s baseline: the next sample seeds it.
    fn reseed(&mut self, i: usize) {
        if let Some(b) = self.baselines.get_mut(i) {
            *b = None;
        }
    }

    fn bloated(&self) -> bool {
        self.window.iter().filter(|&&b| b).count() >= BLOAT_OF_WINDOW
    }
}

/// The decision logic, without sockets or netlink (unit-tested below).
#[derive(Debug)]
pub struct Controller {
    pub dirs: PerDir<DirState>,
    delay_ms: f64,
    /// One-way delays, per direction.
    delays: PerDir<Delays>,
    /// Round trips, timed on our monotonic clock alone: no clock offset in them, so they
    /// tell a queue (it lengthens the round trip) from a clock step (it does not).
    rtts: Delays,
    /// Counters for the log and tests.
    pub cuts: u64,
    pub raises: u64,
    pub clock_steps: u64,
}

/// Time one full-size frame takes at `bps`, in ms.
fn frame_ms(bps: u64) -> f64 {
    1514.0 * 8.0 * 1e3 / bps.max(1) as f64
}

impl Controller {
    pub fn new(a: &Autorate, policy: &Policy) -> Self {
        let d = |max: u64, min: u64| DirState {
            max_bps: max,
            min_bps: min.min(max),
            rate_bps: max,
        };
        let delays = || Delays {
            baselines: vec![None; a.reflectors.len()],
            ..Delays::default()
        };
        Controller {
            dirs: PerDir::from_fn(|dir| d(policy.dirs[dir].rate_bps, a.min_bps[dir])),
            delay_ms: f64::from(a.delay_ms),
            delays: PerDir::from_fn(|_| delays()),
            rtts: delays(),
            cuts: 0,
            raises: 0,
            clock_steps: 0,
        }
    }

    /// What counts as a queue on the line in a direction: `delay_ms` on top of the two
    /// full frames a probe can find ahead of it in our own HTB class (its burst) at the
    /// direction's current rate. At 1 Mbit/s that is 24 ms: without it a slow upstream
    /// reads as permanently bloated.
    fn threshold(&self, d: &DirState) -> f64 {
        self.delay_ms + 2.0 * frame_ms(d.rate_bps)
    }

    /// One probe's one-way delays (`owd`: to the reflector, upload; from it, download) of
    /// reflector `i`, in ms (each with an unknown
    /// clock offset: only their changes matter), and its round trip on our own clock.
    ///
    /// The offset is constant only while neither clock is stepped. Ours cannot be: the
    /// probes carry our monotonic time. The reflector's can (NTP, a reboot, a hostile
    /// reflector): a step of X reads as +X in one direction and -X in the other, and the
    /// baselines (fast to fall, slow to rise) would call the raised side bloated for good,
    /// cutting it to its floor. A queue lengthens the round trip by what it adds one way,
    /// so a one-way rise past the threshold that the round trip does not show is a clock
    /// step: both one-way baselines are re-seeded from this probe.
    pub fn on_owd(&mut self, i: usize, owd: PerDir<f64>, rtt_ms: f64) {
        let t = self.dirs.as_ref().map(|_, d| self.threshold(d));
        let least = t[Dir::Up].min(t[Dir::Down]);
        let rtt_raised = self.rtts.delta(i, rtt_ms).is_some_and(|d| d >= least);
        self.rtts.push(i, rtt_ms, least);
        let raised = Dir::ALL
            .into_iter()
            .any(|d| self.delays[d].delta(i, owd[d]).is_some_and(|x| x > t[d]));
        if !rtt_raised && raised {
            for q in self.delays.0.iter_mut() {
                q.reseed(i);
            }
            self.clock_steps += 1;
        }
        for (d, q) in self.delays.iter_mut() {
            q.push(i, owd[d], t[d]);
        }
    }

    pub fn bloated(&self) -> PerDir<bool> {
        self.delays.as_ref().map(|_, q| q.bloated())
    }

    pub fn last_deltas_ms(&self) -> PerDir<f64> {
        self.delays.as_ref().map(|_, q| q.last_delta_ms)
    }

    /// Each direction's rate now.
    pub fn rates(&self) -> PerDir<u64> {
        self.dirs.map(|_, d| d.rate_bps)
    }

    /// Decides with the rates each direction achieved over the last tick.
    pub fn tick(&mut self, now: Instant, achieved: PerDir<f64>) -> Option<Change> {
        let change = PerDir::from_fn(|d| {
            Self::decide(now, &mut self.dirs[d], &mut self.delays[d], achieved[d])
        });
        for s in change.values().flatten() {
            match s {
                Step::Cut => self.cuts += 1,
                Step::Raise => self.raises += 1,
            }
        }
        let moved = change.values().any(Option::is_some);
        moved.then_some(change)
    }

    fn decide(now: Instant, d: &mut DirState, q: &mut Delays, achieved: f64) -> Option<Step> {
        let since_cut = q.last_cut.map(|t| now.duration_since(t));
        if q.bloated() {
            if since_cut.is_some_and(|s| s < REFRACTORY_CUT) {
                return None;
            }
            // From what the line carried, not from what the shaper allowed: a line that
            // retrained low is found in one cut.
            let from = (d.rate_bps as f64).min(achieved.max(d.min_bps as f64));
            d.rate_bps = ((from * CUT_FACTOR) as u64).clamp(d.min_bps, d.max_bps);
            q.last_cut = Some(now);
            q.window.clear();
            return Some(Step::Cut);
        }
        let quiet = !q.window.iter().any(|&b| b);
        let busy = achieved / d.rate_bps.max(1) as f64 >= BUSY_FOR_STEP_UP;
        if !quiet
            || !busy
            || d.rate_bps >= d.max_bps
            || since_cut.is_some_and(|s| s < PAUSE_AFTER_CUT)
        {
            return None;
        }
        let step = (d.max_bps as f64 * STEP_UP_OF_MAX) as u64;
        d.rate_bps = (d.rate_bps + step.max(1)).min(d.max_bps);
        Some(Step::Raise)
    }
}

/// ICMP echo over a raw IPv4 socket (the socket is kept beside it, for `select!`).
pub(crate) struct Pinger {
    ident: u16,
    seq: u16,
    clock: ProbeClock,
    /// Probes in flight by sequence number: when sent, to which reflector (index, address).
    sent: HashMap<u16, (Instant, usize, Ipv4Addr)>,
}

/// The Internet checksum (RFC 1071) of `b`, with its checksum field zero.
pub fn checksum(b: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in b.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from(c[0]) << 8
        };
        sum += u32::from(w);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

impl Pinger {
    pub(crate) fn new() -> Result<(Self, AsyncFd<OwnedFd>)> {
        let owned = socket(
            AddressFamily::Inet,
            SockType::Raw,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            SockProtocol::Icmp,
        )
        .map_err(|e| {
            anyhow::anyhow!(
                "opening a raw ICMP socket for autorate (needs CAP_NET_RAW): {}",
                std::io::Error::from(e)
            )
        })?;
        // SAFETY: `owned` is a valid open socket and moves into the AsyncFd, which keeps it
        // open until it is dropped (the I/O-safety condition of `register`).
        let fd = unsafe { AsyncFd::register(owned) }
            .map_err(|e| anyhow::anyhow!("registering the ICMP socket: {e}"))?;
        Ok((
            Pinger {
                ident: (std::process::id() & 0xffff) as u16,
                seq: 0,
                clock: ProbeClock::new(),
                sent: HashMap::new(),
            },
            fd,
        ))
    }

    pub(crate) fn send(&mut self, fd: &AsyncFd<OwnedFd>, to: Ipv4Addr, reflector: usize) {
        self.seq = self.seq.wrapping_add(1);
        let p = timestamp_request(self.ident, self.seq, self.clock.now_ms());
        let addr = SockaddrIn::from(SocketAddrV4::new(to, 0));
        let sent = sendto(fd.get_ref().as_raw_fd(), &p, &addr, MsgFlags::empty());
        if sent.is_ok() {
            self.sent.insert(self.seq, (Instant::now(), reflector, to));
        }
        // Forget probes that never came back (lost ones are not delay samples).
        let now = Instant::now();
        self.sent
            .retain(|_, (t, _, _)| now.duration_since(*t) < Duration::from_secs(2));
    }

    /// Replies available now.
    pub(crate) fn drain(&mut self, fd: &AsyncFd<OwnedFd>, out: &mut Vec<Sample>) {
        let mut buf = [0u8; 1500];
        loop {
            let n = match recv(fd.get_ref().as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
                Ok(n) if n > 0 => n,
                _ => return,
            };
            let now = self.clock.now_ms();
            if let Some(r) = parse_timestamp_reply(&buf[..n]) {
                out.extend(self.answer(&r, now, Instant::now()));
            }
        }
    }

    /// The delays a reply gives, if it answers a probe in flight: our identifier, a
    /// sequence number still waiting, and from the reflector that probe went to (anyone
    /// else who guesses an identifier and a sequence number would otherwise steer the rates).
    fn answer(&mut self, r: &TimestampReply, now_ms: u32, now: Instant) -> Option<Sample> {
        if r.ident != self.ident {
            return None;
        }
        let &(sent, i, to) = self.sent.get(&r.seq)?;
        if to != r.source {
            return None;
        }
        self.sent.remove(&r.seq);
        Some(Sample {
            reflector: i,
            up_ms: ms_diff(r.receive, r.originate),
            down_ms: ms_diff(now_ms, r.transmit),
            rtt_ms: now.duration_since(sent).as_secs_f64() * 1e3,
        })
    }
}

/// What one answered probe tells.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Sample {
    pub(crate) reflector: usize,
    /// Upstream and downstream one-way delays in ms, each offset by the clocks' difference.
    pub(crate) up_ms: f64,
    pub(crate) down_ms: f64,
    /// The round trip on our monotonic clock.
    pub(crate) rtt_ms: f64,
}

const DAY_MS: i64 = 86_400_000;

/// Our side of the timestamps: RFC 792 milliseconds since midnight UT, read once from the
/// wall clock when autorate starts and advanced by the monotonic clock after that, so a
/// step of the box's own clock (NTP after boot, an admin's `date`) never moves a delay.
#[derive(Debug)]
struct ProbeClock {
    wall_ms: u32,
    start: Instant,
}

impl ProbeClock {
    fn new() -> Self {
        ProbeClock {
            wall_ms: ms_since_midnight_utc(),
            start: Instant::now(),
        }
    }

    fn now_ms(&self) -> u32 {
        let elapsed = self.start.elapsed().as_millis() as i64;
        ((i64::from(self.wall_ms) + elapsed).rem_euclid(DAY_MS)) as u32
    }
}

/// RFC 792 time: milliseconds since midnight UT.
fn ms_since_midnight_utc() -> u32 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_millis() % DAY_MS as u128) as u32
}

/// `a - b` in ms across midnight (and across a clock offset of up to half a day).
fn ms_diff(a: u32, b: u32) -> f64 {
    let d = (i64::from(a) - i64::from(b)).rem_euclid(DAY_MS);
    (if d > DAY_MS / 2 { d - DAY_MS } else { d }) as f64
}

/// ICMP timestamp request (type 13).
fn timestamp_request(ident: u16, seq: u16, originate: u32) -> Vec<u8> {
    let mut p = vec![13u8, 0, 0, 0];
    p.extend_from_slice(&ident.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&originate.to_be_bytes());
    p.extend_from_slice(&[0; 8]);
    let c = checksum(&p);
    p[2..4].copy_from_slice(&c.to_be_bytes());
    p
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TimestampReply {
    source: Ipv4Addr,
    ident: u16,
    seq: u16,
    originate: u32,
    receive: u32,
    transmit: u32,
}

/// An ICMP timestamp reply (type 14) in an IPv4 packet as a raw socket returns it.
fn parse_timestamp_reply(b: &[u8]) -> Option<TimestampReply> {
    let ihl = usize::from(*b.first()? & 0x0f) * 4;
    let src = b.get(12..16)?;
    let m = b.get(ihl..ihl + 20)?;
    if m[0] != 14 || m[1] != 0 {
        return None;
    }
    let u32_at = |o: usize| u32::from_be_bytes([m[o], m[o + 1], m[o + 2], m[o + 3]]);
    Some(TimestampReply {
        source: Ipv4Addr::new(src[0], src[1], src[2], src[3]),
        ident: u16::from_be_bytes([m[4], m[5]]),
        seq: u16::from_be_bytes([m[6], m[7]]),
        originate: u32_at(8),
        receive: u32_at(12),
        transmit: u32_at(16),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rates::TICK;

    /// A probe whose one-way delays sit `du` and `dd` ms above the quiet line's (clocks 5 s
    /// apart: 5012 up, -4988 down; a 24 ms round trip), its round trip longer by both.
    fn probe(c: &mut Controller, du: f64, dd: f64) {
        c.on_owd(0, PerDir::new(5012.0 + du, -4988.0 + dd), 24.0 + du + dd);
    }

    fn controller() -> Controller {
        let a = Autorate {
            reflectors: vec![Ipv4Addr::new(192, 0, 2, 1)],
            class: 0,
            delay_ms: 15,
            interval_ms: 50,
            min_bps: PerDir::new(250_000, 3_000_000),
        };
        let mut c = Controller {
            dirs: PerDir::new(
                DirState {
                    max_bps: 1_000_000,
                    min_bps: a.min_bps[Dir::Up],
                    rate_bps: 1_000_000,
                },
                DirState {
                    max_bps: 12_000_000,
                    min_bps: a.min_bps[Dir::Down],
                    rate_bps: 12_000_000,
                },
            ),
            delay_ms: 15.0,
            delays: PerDir::from_fn(|_| Delays {
                baselines: vec![None],
                ..Delays::default()
            }),
            rtts: Delays {
                baselines: vec![None],
                ..Delays::default()
            },
            cuts: 0,
            raises: 0,
            clock_steps: 0,
        };
        // Clocks 5 s apart: one-way delays read as 5012 up and -4988 down.
        for _ in 0..10 {
            probe(&mut c, 0.0, 0.0);
        }
        c
    }

    #[test]
    fn quiet_line_keeps_rates() {
        let mut c = controller();
        let t = Instant::now();
        assert_eq!(c.tick(t, PerDir::new(900_000.0, 11_500_000.0)), None);
        assert_eq!(c.dirs[Dir::Down].rate_bps, 12_000_000);
    }

    #[test]
    fn a_queue_downstream_cuts_the_download_only() {
        let mut c = controller();
        let t = Instant::now();
        for d in [30.0, 60.0, 70.0, 80.0] {
            probe(&mut c, 0.0, d);
        }
        assert_eq!(c.bloated(), PerDir::new(false, true));
        // The line retrained to 8 Mbit/s: that is what the download carries.
        let ch = c.tick(t, PerDir::new(1_000_000.0, 8_000_000.0));
        assert_eq!(ch, Some(PerDir::new(None, Some(Step::Cut))));
        assert_eq!(c.dirs[Dir::Down].rate_bps, 7_200_000);
        assert_eq!(c.dirs[Dir::Up].rate_bps, 1_000_000);
        // Within the refractory period nothing more happens, even with bloat.
        for d in [60.0, 70.0, 80.0] {
            probe(&mut c, 0.0, d);
        }
        assert_eq!(
            c.tick(t + Duration::from_millis(100), PerDir::new(0.0, 7e6)),
            None
        );
        // After it, a second cut.
        assert!(c
            .tick(t + Duration::from_millis(400), PerDir::new(0.0, 7e6))
            .is_some());
        assert_eq!(c.dirs[Dir::Down].rate_bps, 6_300_000);
    }

    #[test]
    fn a_slow_upstream_is_not_bloat_by_itself() {
        // Two full frames at 1 Mbit/s are 24 ms: a probe behind them is not a queue.
        let mut c = controller();
        for _ in 0..6 {
            probe(&mut c, 30.0, 0.0);
        }
        assert_eq!(c.bloated(), PerDir::new(false, false));
        for _ in 0..6 {
            probe(&mut c, 45.0, 0.0);
        }
        assert_eq!(c.bloated(), PerDir::new(true, false));
    }

    #[test]
    fn never_below_the_floor_nor_above_the_configured_rate() {
        let mut c = controller();
        let mut t = Instant::now();
        for _ in 0..50 {
            for _ in 0..3 {
                probe(&mut c, 500.0, 500.0);
            }
            c.tick(t, PerDir::new(1e6, 12e6));
            t += Duration::from_millis(400);
        }
        assert_eq!(c.dirs[Dir::Down].rate_bps, 3_000_000);
        assert_eq!(c.dirs[Dir::Up].rate_bps, 250_000);
        // Quiet and busy: climbs back by 1 % of the configured rate per tick, to it.
        for _ in 0..200 {
            probe(&mut c, 0.0, 0.0);
            c.tick(
                t,
                PerDir::new(
                    c.dirs[Dir::Up].rate_bps as f64,
                    c.dirs[Dir::Down].rate_bps as f64,
                ),
            );
            t += TICK;
        }
        assert_eq!(c.dirs[Dir::Down].rate_bps, 12_000_000);
        assert_eq!(c.dirs[Dir::Up].rate_bps, 1_000_000);
    }

    #[test]
    fn a_standing_queue_does_not_become_the_baseline() {
        let mut c = controller();
        for _ in 0..10_000 {
            probe(&mut c, 0.0, 300.0);
        }
        assert!(c.delays[Dir::Down].baselines[0].is_some_and(|b| b < -4987.0));
        assert_eq!(c.bloated(), PerDir::new(false, true));
    }

    #[test]
    fn a_reflector_clock_step_is_not_a_queue() {
        // The reflector's clock jumps back 2 s (up reads -2000, down +2000) and later
        // forward 5 s; the round trip stays 24 ms: never bloat, never a cut.
        let mut c = controller();
        let mut t = Instant::now() + Duration::from_secs(5);
        for (su, sd) in [(-2000.0, 2000.0), (3000.0, -3000.0)] {
            for _ in 0..20 {
                c.on_owd(0, PerDir::new(5012.0 + su, -4988.0 + sd), 24.0);
                assert_eq!(c.bloated(), PerDir::new(false, false));
                assert_eq!(
                    c.tick(t, PerDir::new(1e6, 12e6)).map(|ch| ch[Dir::Down]),
                    None
                );
                t += TICK;
            }
        }
        assert!(c.clock_steps >= 2, "{}", c.clock_steps);
        assert_eq!(
            (c.dirs[Dir::Up].rate_bps, c.dirs[Dir::Down].rate_bps),
            (1_000_000, 12_000_000)
        );
        // After the step a real queue downstream is still found.
        for _ in 0..6 {
            c.on_owd(0, PerDir::new(8012.0, -7988.0 + 80.0), 24.0 + 80.0);
        }
        assert_eq!(c.bloated(), PerDir::new(false, true));
    }

    #[test]
    fn our_probe_clock_is_monotonic_and_within_a_day() {
        let c = ProbeClock {
            wall_ms: (DAY_MS - 10) as u32,
            start: Instant::now() - Duration::from_millis(25),
        };
        let n = c.now_ms();
        assert!((15..1000).contains(&n), "{n}: wrapped past midnight");
    }

    #[test]
    fn idle_directions_are_not_raised() {
        let mut c = controller();
        c.dirs[Dir::Down].rate_bps = 6_000_000;
        let t = Instant::now() + Duration::from_secs(5);
        assert_eq!(c.tick(t, PerDir::new(0.0, 1_000_000.0)), None);
        assert_eq!(c.dirs[Dir::Down].rate_bps, 6_000_000);
    }

    #[test]
    fn icmp_timestamps() {
        // Echo request, id 1 seq 1, no payload: checksum 0xf7fd.
        assert_eq!(checksum(&[8u8, 0, 0, 0, 0, 1, 0, 1]), 0xf7fd);
        let req = timestamp_request(0x1234, 7, 1000);
        assert_eq!(req.len(), 20);
        assert_eq!(checksum(&req), 0, "a packet with its checksum sums to zero");
        // A reply as the raw socket returns it: 20-byte IPv4 header, then ICMP type 14.
        let mut pkt = vec![0x45u8];
        pkt.resize(20, 0);
        pkt[12..16].copy_from_slice(&[192, 0, 2, 1]);
        pkt.extend_from_slice(&[14, 0, 0, 0, 0x12, 0x34, 0, 7]);
        for v in [1000u32, 1040, 1041] {
            pkt.extend_from_slice(&v.to_be_bytes());
        }
        assert_eq!(
            parse_timestamp_reply(&pkt),
            Some(TimestampReply {
                source: Ipv4Addr::new(192, 0, 2, 1),
                ident: 0x1234,
                seq: 7,
                originate: 1000,
                receive: 1040,
                transmit: 1041
            })
        );
        // Only the reflector the probe went to, once, with our identifier.
        let reply = parse_timestamp_reply(&pkt).unwrap();
        let sent = Instant::now();
        let mut p = Pinger {
            ident: 0x1234,
            seq: 7,
            clock: ProbeClock::new(),
            sent: HashMap::from([(7, (sent, 0, Ipv4Addr::new(192, 0, 2, 1)))]),
        };
        let at = sent + Duration::from_millis(30);
        let forged = TimestampReply {
            source: Ipv4Addr::new(203, 0, 113, 9),
            ..reply
        };
        assert_eq!(
            p.answer(&forged, 1100, at),
            None,
            "a reply from elsewhere is ignored"
        );
        let other = TimestampReply {
            ident: 0x4321,
            ..reply
        };
        assert_eq!(p.answer(&other, 1100, at), None);
        assert_eq!(
            p.answer(&reply, 1100, at),
            Some(Sample {
                reflector: 0,
                up_ms: 40.0,
                down_ms: 59.0,
                rtt_ms: 30.0
            })
        );
        assert_eq!(
            p.answer(&reply, 1100, at),
            None,
            "each probe is answered once"
        );
        assert_eq!(parse_timestamp_reply(&pkt[..30]), None);
        pkt[20] = 0;
        assert_eq!(parse_timestamp_reply(&pkt), None);
        // Across midnight.
        assert_eq!(ms_diff(5, 86_399_990), 15.0);
        assert_eq!(ms_diff(86_399_990, 5), -15.0);
    }
}
