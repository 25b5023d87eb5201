//! The daemon's call task: once a second it reads the classifier's RTP streams (the
//! `MEDIA` map, `[calls] classes`), groups them into calls ([`crate::media::Calls`]) and
//! keeps two files in the run directory:
//! - `calls.json`: the calls in progress (what `shaper calls` shows), replaced each
//!   second;
//! - `line.jsonl`: one JSON line per hour (UTC): how long the line was full each way and
//!   its rate held down, calls or not;
//! - `calls.jsonl`: one JSON record per ended call, appended, and logged as a line; at
//!   [`LOG_LIMIT`] bytes it moves to `calls.jsonl.1` (one older file is kept). `shaper
//!   report` reads both.
//!
//! Each second it also samples the shaped line (the HTB root's bytes and rate, the
//! classes' drops): each call records how much of its time the line was full each way and
//! how much the rate was held below the configured one (`LineMeter`).
//!
//! Addresses are keyed hashes unless `[calls] addresses = "shown"`; the key is made once
//! per boot (`calls.key` in the run directory, mode 0600), so a day's report names each
//! host the same way and nothing outside the box can undo the hashes.
//!
//! The work is bounded: the map holds at most `MEDIA_MAX_STREAMS` streams, the grouping
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
use shaper_common::media::{MediaKey, MediaStream, MAP_MEDIA};
use tokio::sync::watch;

use crate::{
    apply::Applied,
    compile::PARENT_CLASSID,
    dir::{Dir, PerDir},
    kernel::{bpf, tc::Tc},
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
            "{name} loss {:.2} % jitter {} MOS {:.2}",
            q.loss_pct,
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
    let (mut ended, mut degraded) = (0u64, 0u64);
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
                record(&run, &r, &mut ended, &mut degraded);
            }
            forget(&a.pins, &calls.take_ended_streams());
            let live = Live {
                version: CALLS_VERSION,
                updated_at: now_unix(),
                calls: calls.live(),
                ended,
                degraded,
            };
            if let Err(e) = rundir::write_json(&RunDir(&run).calls(), &live) {
                log::warn!("calls: {e:#}");
            }
        };
        // A new policy (or the end): the calls so far end here.
        for r in calls.finish() {
            record(&run, &r, &mut ended, &mut degraded);
        }
        // The hour so far (a reload starts the next one's count afresh).
        if let Some(h) = meter.hour.take() {
            log_err(append_line(&RunDir(&run).line_log(), &h));
        }
        // A reload that keeps the classifier's tables keeps these streams' counts: gone,
        // they start new calls from zero rather than repeating the ended ones.
        forget(&a.pins, &calls.take_ended_streams());
        if stop {
            let _ = fs::remove_file(RunDir(&run).calls());
            return;
        }
    }
}

/// What the shaped line did since the last sample, per direction: whether it was full
/// (the root class sent at 90 % of its rate or more, or a class dropped) and its rate in
/// the kernel against the configured one. Nothing until two samples (and never when
/// netlink fails: the calls are then recorded without it).
#[derive(Default)]
struct LineMeter {
    tc: Option<Tc>,
    prev: Option<(std::time::Instant, PerDir<(u64, u64)>)>,
    /// The hour being counted (for `line.jsonl`, calls or not).
    hour: Option<LineHour>,
}

impl LineMeter {
    async fn sample(&mut self, a: &Applied) -> Option<(f64, PerDir<LineSample>)> {
        if self.tc.is_none() {
            self.tc = Tc::connect().await.ok();
        }
        let tc = self.tc.as_ref()?;
        let at = std::time::Instant::now();
        let mut now = PerDir::new((0, 0), (0, 0));
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
            let drops = classes.iter().map(|c| u64::from(c.stats.drops)).sum();
            now[d] = (root.stats.bytes, drops);
            rate[d] = root.htb.map_or(0, |h| h.rate_bps);
        }
        let prev = self.prev.replace((at, now));
        let (then, before) = prev?;
        let secs = at.duration_since(then).as_secs_f64();
        if secs <= 0.0 {
            return None;
        }
        let line = PerDir::from_fn(|d| {
            let sent_bps = now[d].0.saturating_sub(before[d].0) as f64 * 8.0 / secs;
            let configured = a.plan.dirs[d].rate_bps.max(1) as f64;
            LineSample {
                full: (rate[d] > 0 && sent_bps >= 0.9 * rate[d] as f64) || now[d].1 > before[d].1,
                rate_pct: rate[d] as f64 * 100.0 / configured,
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

/// Deletes the streams of ended calls from the classifier's table (a stream that
/// resumes later then starts afresh); one that is gone already is no error.
fn forget(pins: &bpf::Pins, keys: &[MediaKey]) {
    if keys.is_empty() {
        return;
    }
    let map = bpf::open_pinned(pins, MAP_MEDIA).and_then(|m| {
        aya::maps::HashMap::<_, MediaKey, MediaStream>::try_from(m).map_err(anyhow::Error::from)
    });
    match map {
        Ok(mut m) => {
            for k in keys {
                let _ = m.remove(k);
            }
        }
        Err(e) => log::warn!("calls: {e:#}"),
    }
}

fn log_err(r: Result<()>) {
    if let Err(e) = r {
        log::warn!("calls: {e:#}");
    }
}

fn record(run: &Path, r: &CallRecord, ended: &mut u64, degraded: &mut u64) {
    *ended += 1;
    if !r.degraded.is_empty() {
        *degraded += 1;
    }
    log::info!("{}", summary(r));
    if let Err(e) = append(run, r) {
        log::warn!("calls: {e:#}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
