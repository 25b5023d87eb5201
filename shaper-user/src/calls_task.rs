//! The daemon's call task: once a second it reads the classifier's RTP streams (the
//! `MEDIA` map, `[calls] classes`), groups them into calls ([`crate::media::Calls`]) and
//! keeps two files in the run directory:
//! - `calls.json`: the calls in progress (what `shaper calls` shows), replaced each
//!   second;
//! - `calls.jsonl`: one JSON record per ended call, appended, and logged as a line; at
//!   [`LOG_LIMIT`] bytes it moves to `calls.jsonl.1` (one older file is kept). `shaper
//!   report` reads both.
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
    kernel::bpf,
    media::{Addresses, CallRecord, Calls},
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
    rundir::replace(&p, &k)?;
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", p.display()))?;
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
    let mut line = serde_json::to_vec(r)?;
    line.push(b'\n');
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&p)
        .and_then(|mut f| f.write_all(&line))
        .with_context(|| format!("appending to {}", p.display()))
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
        if stop {
            let _ = fs::remove_file(RunDir(&run).calls());
            return;
        }
    }
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
