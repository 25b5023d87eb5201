//! The daemon's call task: once a second it reads the classifier's RTP streams (the
//! `MEDIA_SLOTS` and `MEDIA` maps, `[calls] classes`), groups them into calls ([`crate::media::Calls`]) and
//! keeps two files in the run directory:
//! - `calls.json`: the calls in progress (what `shaper calls` shows), replaced each
//!   second, with the counts and histograms (loss, jitter, MOS, duration) of the calls
//!   ended since the daemon started (what `/metrics` shows);
//! - `line.jsonl`: one JSON line per hour (UTC): how long the line was full each way and
//!   its rate held down, calls or not;
//! - `calls.jsonl`: one JSON record per ended call, appended, and logged as a line; at
//!   [`LOG_LIMIT`] bytes it moves to `calls.jsonl.1` (one older file is kept). `shaper
//!   report` reads both.
//!
//! Each second it also samples the shaped line (the HTB root's bytes and rate, the
//! classes' drops): each call records how much of its time the line was full each way,
//! how much the rate was held below the configured one, and how many packets the measured
//! classes' queues dropped meanwhile (`LineMeter`).
//!
//! Addresses are keyed hashes unless `[calls] addresses = "shown"`; the key is made once
//! per boot (`calls.key` in the run directory, mode 0600), so a day's report names each
//! host the same way and nothing outside the box can undo the hashes.
//!
//! The work is bounded: the maps hold at most `MEDIA_MAX_SLOTS` + `MEDIA_MAX_STREAMS` streams, the grouping
//! at most `MAX_CALLS` calls; what a LAN host sends decides only which of those slots it
//! takes.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{
    apply::Applied,
    compile::PARENT_CLASSID,
    dir::{Dir, PerDir},
    kernel::{
        bpf,
        tc::{ClassInfo, Tc},
    },
    media::{calls::LineSample, report::LineHour, Addresses, CallRecord, Calls},
    rundir::{self, RunDir},
    wclamp::monotonic_ns,
};

/// `calls.json`'s format.
pub const CALLS_VERSION: u32 = 1;
/// `calls.jsonl` moves aside at this size.
pub const LOG_LIMIT: u64 = 4 << 20;
const TICK: Duration = Duration::from_secs(1);

/// `calls.json`: the calls in progress and what ended since the daemon started.
#[derive(Debug, Serialize, Deserialize)]
pub struct Live {
    pub version: u32,
    /// Unix time of the snapshot.
    pub updated_at: u64,
    pub calls: Vec<CallRecord>,
    pub ended: u64,
    pub degraded: u64,
    /// The ended calls' loss, jitter, MOS and duration as histograms (`/metrics`).
    #[serde(default)]
    pub histograms: CallHistograms,
}

/// Upper bounds of the buckets of the per-call histograms (Prometheus' base units: a
/// jitter in seconds).
pub const LOSS_PERCENT_BUCKETS: [f64; 6] = [0.1, 0.5, 1.0, 2.0, 5.0, 10.0];
pub const JITTER_SECONDS_BUCKETS: [f64; 7] = [0.001, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1];
pub const MOS_BUCKETS: [f64; 7] = [1.0, 2.0, 3.0, 3.5, 4.0, 4.3, 4.5];
pub const DURATION_SECONDS_BUCKETS: [f64; 6] = [10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0];

/// One histogram as Prometheus keeps it: the buckets' upper bounds, the observations at
/// or below each (cumulative), their sum and count (the `+Inf` bucket). Fixed in size
/// however many values it has seen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    pub le: Vec<f64>,
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    pub fn new(le: &[f64]) -> Histogram {
        Histogram {
            le: le.to_vec(),
            counts: vec![0; le.len()],
            sum: 0.0,
            count: 0,
        }
    }

    /// Counts `v` (a value that is not a number is not counted).
    pub fn observe(&mut self, v: f64) {
        if !v.is_finite() {
            return;
        }
        for (le, n) in self.le.iter().zip(&mut self.counts) {
            if v <= *le {
                *n += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }
}

/// The calls ended since `shaper run` started, as histograms: per direction (upload
/// first) the loss, jitter and MOS of the directions that carried media (jitter where a
/// clock rate was known), and the calls' durations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallHistograms {
    pub loss_percent: PerDir<Histogram>,
    pub jitter_seconds: PerDir<Histogram>,
    pub mos: PerDir<Histogram>,
    pub duration_seconds: Histogram,
}

impl Default for CallHistograms {
    fn default() -> Self {
        let per_dir = |le: &[f64]| PerDir::from_fn(|_| Histogram::new(le));
        CallHistograms {
            loss_percent: per_dir(&LOSS_PERCENT_BUCKETS),
            jitter_seconds: per_dir(&JITTER_SECONDS_BUCKETS),
            mos: per_dir(&MOS_BUCKETS),
            duration_seconds: Histogram::new(&DURATION_SECONDS_BUCKETS),
        }
    }
}

impl CallHistograms {
    /// Counts one ended call.
    pub fn observe(&mut self, r: &CallRecord) {
        self.duration_seconds.observe(r.duration_s);
        for (d, q) in [(Dir::Up, &r.up), (Dir::Down, &r.down)] {
            if q.streams == 0 {
                continue;
            }
            self.loss_percent[d].observe(q.loss_pct);
            if let Some(j) = q.jitter_ms {
                self.jitter_seconds[d].observe(j / 1000.0);
            }
            self.mos[d].observe(q.mos);
        }
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Unix time minus the monotonic clock, in ns: added to the kernel's stream times.
fn wall_offset_ns() -> i64 {
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64);
    wall - monotonic_ns() as i64
}

/// The per-boot pseudonym key, made on first use.
fn key(run: &Path) -> Result<[u8; 32]> {
    let p = RunDir(run).calls_key();
    if let Ok(b) = fs::read(&p) {
        if let Ok(k) = <[u8; 32]>::try_from(b.as_slice()) {
            return Ok(k);
        }
    }
    let mut k = [0u8; 32];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut k))
        .context("reading a pseudonym key from /dev/urandom")?;
    // Written beside with mode 0600 from the start (never readable by others), then
    // renamed into place.
    let mut tmp = p.clone().into_os_string();
    tmp.push(".new");
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(&k)
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
    }
    fs::rename(&tmp, &p).with_context(|| format!("writing {}", p.display()))?;
    Ok(k)
}

/// Appends one ended call to `calls.jsonl` (moving a full log aside first).
pub fn append(run: &Path, r: &CallRecord) -> Result<()> {
    let files = RunDir(run);
    let p = files.calls_log();
    if fs::metadata(&p).is_ok_and(|m| m.len() >= LOG_LIMIT) {
        fs::rename(&p, files.calls_log_old())
            .with_context(|| format!("rotating {}", p.display()))?;
    }
    append_line(&p, r)
}

/// One line for the log.
pub fn summary(r: &CallRecord) -> String {
    let dir = |name: &str, q: &crate::media::DirQuality| {
        if q.streams == 0 {
            return format!("{name} -");
        }
        format!(
            "{name} loss {:.2} %{} jitter {} MOS {:.2}",
            q.loss_pct,
            q.shaper_drops
                .map_or(String::new(), |n| format!(" gw drops {n}")),
            q.jitter_ms.map_or("-".into(), |j| format!("{j:.1} ms")),
            q.mos
        )
    };
    format!(
        "call ended: {} <-> {}, {:.0} s; {}; {}{}",
        r.lan_host,
        r.peer,
        r.duration_s,
        dir("up", &r.up),
        dir("down", &r.down),
        if r.degraded.is_empty() {
            String::new()
        } else {
            format!("; degraded: {}", r.degraded.join(", "))
        }
    )
}

pub async fn run(mut applied: watch::Receiver<Option<Applied>>, run: PathBuf) {
    let mut ended = Ended::default();
    loop {
        let current = applied.borrow_and_update().clone();
        let Some(a) = current.filter(|a| !a.plan.policy.calls.classes.is_empty()) else {
            let _ = fs::remove_file(RunDir(&run).calls());
            if applied.changed().await.is_err() {
                return;
            }
            continue;
        };
        let settings = a.plan.policy.calls.clone();
        let addresses = if settings.show_addresses {
            Addresses::Shown
        } else {
            match key(&run) {
                Ok(k) => Addresses::Pseudonymous(k),
                Err(e) => {
                    log::error!("calls: not measured until the next apply: {e:#}");
                    if applied.changed().await.is_err() {
                        return;
                    }
                    continue;
                }
            }
        };
        let mut calls = Calls::new(u64::from(settings.quiet_s) * 1_000_000_000, addresses);
        calls.wall_offset_ns = wall_offset_ns();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        let mut meter = LineMeter::default();
        let stop = loop {
            tokio::select! {
                _ = tick.tick() => {}
                c = applied.changed() => break c.is_err(),
            }
            let now = monotonic_ns();
            // The drop tracer, where the apply could attach it, counts each stream's own
            // drops (else a call keeps its classes' drops, an upper bound).
            calls.stream_drops = a.pins.drops_link().exists();
            match bpf::read_media(&a.pins) {
                Ok(streams) => {
                    failing = false;
                    for (k, s) in &streams {
                        calls.observe(now, k, s);
                    }
                }
                Err(e) if !failing => {
                    failing = true;
                    log::warn!("calls: reading the classifier's streams: {e:#}");
                }
                Err(_) => {}
            }
            if let Some((secs, line)) = meter.sample(&a).await {
                calls.line_tick(now, secs, &line);
                if let Some(h) = meter.count(now_unix(), secs, &line) {
                    log_err(append_line(&RunDir(&run).line_log(), &h));
                }
            }
            for r in calls.expire(now) {
                ended.record(&run, &r);
            }
            log_err(bpf::forget_media(&a.pins, &calls.take_ended_streams()));
            let live = Live {
                version: CALLS_VERSION,
                updated_at: now_unix(),
                calls: calls.live(),
                ended: ended.calls,
                degraded: ended.degraded,
                histograms: ended.histograms.clone(),
            };
            if let Err(e) = rundir::write_json(&RunDir(&run).calls(), &live) {
                log::warn!("calls: {e:#}");
            }
        };
        // A new policy (or the end): the calls so far end here.
        for r in calls.finish() {
            ended.record(&run, &r);
        }
        // The hour so far (a reload starts the next one's count afresh).
        if let Some(h) = meter.hour.take() {
            log_err(append_line(&RunDir(&run).line_log(), &h));
        }
        // A reload that keeps the classifier's tables keeps these streams' counts: gone,
        // they start new calls from zero rather than repeating the ended ones.
        log_err(bpf::forget_media(&a.pins, &calls.take_ended_streams()));
        if stop {
            let _ = fs::remove_file(RunDir(&run).calls());
            return;
        }
    }
}

/// What the shaped line did since the last sample, per direction: whether it was full
/// (the root class sent at 90 % of its rate or more, or a class dropped), its rate in
/// the kernel against the configured one, and the drops of the measured classes. Nothing
/// until two samples (and never when netlink fails: the calls are then recorded without
/// it).
#[derive(Default)]
struct LineMeter {
    tc: Option<Tc>,
    prev: Option<(std::time::Instant, PerDir<Counts>)>,
    /// The hour being counted (for `line.jsonl`, calls or not).
    hour: Option<LineHour>,
}

/// One direction's counters at a sample: the root's bytes sent, the drops of every class
/// and of the measured classes.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    bytes: u64,
    drops: u64,
    measured_drops: u64,
}

/// The HTB class ids of the classes whose calls are measured (`[calls] classes`) going `d`.
fn measured_classids(a: &Applied, d: Dir) -> Vec<u32> {
    a.plan.dirs[d]
        .classes
        .iter()
        .filter(|c| a.plan.policy.calls.classes.contains(&(c.index as usize)))
        .map(|c| c.classid)
        .collect()
}

/// How much a counter rose from `before` to `now`; a counter that went back (its class
/// made again) counts from zero.
fn rise(before: u64, now: u64) -> u64 {
    now.checked_sub(before).unwrap_or(now)
}

impl LineMeter {
    async fn sample(&mut self, a: &Applied) -> Option<(f64, PerDir<LineSample>)> {
        if self.tc.is_none() {
            self.tc = Tc::connect().await.ok();
        }
        let tc = self.tc.as_ref()?;
        let at = std::time::Instant::now();
        let mut now = PerDir::<Counts>::default();
        let mut rate = PerDir::new(0u64, 0u64);
        for d in Dir::ALL {
            let classes = match tc.classes(a.ifindex[d]).await {
                Ok(c) => c,
                Err(_) => {
                    self.prev = None;
                    return None;
                }
            };
            let root = classes.iter().find(|c| c.classid == PARENT_CLASSID)?;
            let measured = measured_classids(a, d);
            let drops = |c: &ClassInfo| u64::from(c.stats.drops);
            now[d] = Counts {
                bytes: root.stats.bytes,
                drops: classes.iter().map(drops).sum(),
                measured_drops: classes
                    .iter()
                    .filter(|c| measured.contains(&c.classid))
                    .map(drops)
                    .sum(),
            };
            rate[d] = root.htb.map_or(0, |h| h.rate_bps);
        }
        let prev = self.prev.replace((at, now));
        let (then, before) = prev?;
        let secs = at.duration_since(then).as_secs_f64();
        if secs <= 0.0 {
            return None;
        }
        let line = PerDir::from_fn(|d| {
            let (now, before) = (now[d], before[d]);
            let sent_bps = now.bytes.saturating_sub(before.bytes) as f64 * 8.0 / secs;
            let configured = a.plan.dirs[d].rate_bps.max(1) as f64;
            LineSample {
                full: (rate[d] > 0 && sent_bps >= 0.9 * rate[d] as f64) || now.drops > before.drops,
                rate_pct: rate[d] as f64 * 100.0 / configured,
                measured_drops: rise(before.measured_drops, now.measured_drops),
            }
        });
        Some((secs, line))
    }

    /// Counts a sample into its hour; the hour before, when this one starts a new hour.
    fn count(&mut self, unix: u64, secs: f64, line: &PerDir<LineSample>) -> Option<LineHour> {
        let start = unix / 3600 * 3600;
        let done = match &self.hour {
            Some(h) if h.hour_s != start => self.hour.replace(LineHour::new(start)),
            Some(_) => None,
            None => {
                self.hour = Some(LineHour::new(start));
                None
            }
        };
        if let Some(h) = self.hour.as_mut() {
            for (d, l) in line.iter() {
                h.add(d.index(), secs, l.full, l.rate_pct);
            }
        }
        done
    }
}

/// Appends one line of JSON to `p`.
fn append_line<T: Serialize>(p: &Path, v: &T) -> Result<()> {
    let mut line = serde_json::to_vec(v)?;
    line.push(b'\n');
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
        .and_then(|mut f| f.write_all(&line))
        .with_context(|| format!("appending to {}", p.display()))
}

fn log_err(r: Result<()>) {
    if let Err(e) = r {
        log::warn!("calls: {e:#}");
    }
}

/// The calls ended since the daemon started: how many, how many degraded, and their
/// histograms.
#[derive(Default)]
struct Ended {
    calls: u64,
    degraded: u64,
    histograms: CallHistograms,
}

impl Ended {
    /// Counts, logs and appends one ended call.
    fn record(&mut self, run: &Path, r: &CallRecord) {
        self.calls += 1;
        if !r.degraded.is_empty() {
            self.degraded += 1;
        }
        self.histograms.observe(r);
        log::info!("{}", summary(r));
        if let Err(e) = append(run, r) {
            log::warn!("calls: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The log line has the gateway's own drops beside the loss where they are known; a
    /// class's counter that went back (the class made again) counts from zero.
    #[test]
    fn the_log_line_has_the_gateways_drops() {
        let q = |shaper_drops| crate::media::DirQuality {
            streams: 1,
            loss_pct: 0.5,
            mos: 4.2,
            shaper_drops,
            ..Default::default()
        };
        let r = CallRecord {
            lan_host: "h-1".into(),
            peer: "h-2".into(),
            start_s: 0.0,
            duration_s: 60.0,
            turn: false,
            rtcp_packets: 0,
            up: q(Some(0)),
            down: q(None),
            degraded: Vec::new(),
        };
        let line = summary(&r);
        assert!(
            line.contains("; up loss 0.50 % gw drops 0 jitter - MOS 4.20; down loss 0.50 % jitter"),
            "{line}"
        );
        assert_eq!((rise(5, 9), rise(9, 4)), (4, 4));
    }

    /// The pseudonym key is made once, kept for the boot, readable by root only; a
    /// spoiled key file is replaced.
    #[test]
    fn the_key_is_made_once_and_kept_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let run = std::env::temp_dir().join(format!("shaper-calls-key-{}", std::process::id()));
        let _ = fs::remove_dir_all(&run);
        fs::create_dir_all(&run).expect("run dir");
        let k = key(&run).expect("made");
        assert_eq!(key(&run).expect("kept"), k);
        let p = RunDir(&run).calls_key();
        let mode = fs::metadata(&p).expect("there").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        fs::write(&p, b"short").expect("spoil");
        assert_ne!(key(&run).expect("made again"), k);
        fs::remove_dir_all(&run).expect("clean up");
    }
}
