//! Commit-confirmed, as network engineers know it from router CLIs:
//! `shaper apply --confirm-within 120s CONFIG` applies the new config and, unless
//! `shaper confirm` arrives in time, puts back the last confirmed one (or removes the
//! shaping if there was none). A session that loses the box to a bad policy gets it back.
//!
//! The pending confirmation is a file, `<run>/pending.json`; a detached watcher process
//! (`shaper confirm-watch`, started by apply) sleeps until the deadline and rolls back if
//! the file is still there. The rollback target is kept in `<run>/rollback.toml`: the
//! config text of the last confirmed apply, which a chain of unconfirmed applies keeps.

use std::{
    fs,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::{
    apply::{self, Paths, State},
    config,
    rundir::{self, PENDING_VERSION},
};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pending {
    /// [`PENDING_VERSION`].
    pub version: u32,
    /// Unix time (seconds) after which the rollback happens.
    pub deadline: u64,
    /// The unconfirmed config (for messages).
    pub config: PathBuf,
    /// Whether there is a confirmed config to go back to (else: remove).
    pub has_rollback: bool,
    /// Where the confirmed config was read from (its text is in rollback.toml).
    pub rollback_config: PathBuf,
}

fn pending_path(paths: &Paths) -> PathBuf {
    paths.files().pending()
}

fn rollback_path(paths: &Paths) -> PathBuf {
    paths.files().rollback()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Parses "120s", "2m", "90" (seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, mult) = if let Some(n) = t.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like \"120s\" or \"2m\""))?;
    let secs = v * mult;
    if !(1.0..=86_400.0).contains(&secs) {
        return Err(format!(
            "`{s}`: the confirmation window must be 1 s to 24 h"
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

pub fn pending(paths: &Paths) -> Result<Option<Pending>> {
    rundir::read_versioned(&pending_path(paths), PENDING_VERSION)
}

/// Before an unconfirmed apply: remember what to go back to, unless an earlier
/// unconfirmed apply already did (its target is still the last confirmed config).
pub fn prepare(paths: &Paths) -> Result<Option<PathBuf>> {
    fs::create_dir_all(&paths.run)?;
    if let Some(p) = pending(paths)? {
        return Ok(p.has_rollback.then_some(p.rollback_config));
    }
    match State::load(paths)? {
        Some(s) if !s.config_text.is_empty() => {
            fs::write(rollback_path(paths), &s.config_text)
                .context("saving the rollback config")?;
            Ok(Some(s.config))
        }
        _ => {
            let _ = fs::remove_file(rollback_path(paths));
            Ok(None)
        }
    }
}

/// After the unconfirmed apply succeeded: record the deadline and start the watcher.
pub fn arm(
    paths: &Paths,
    config: &Path,
    within: Duration,
    rollback: Option<PathBuf>,
) -> Result<()> {
    let p = Pending {
        version: PENDING_VERSION,
        deadline: now() + within.as_secs().max(1),
        config: config.to_path_buf(),
        has_rollback: rollback.is_some(),
        rollback_config: rollback.unwrap_or_default(),
    };
    rundir::write_json(&pending_path(paths), &p)?;
    let exe = std::env::current_exe().context("locating the shaper binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("confirm-watch")
        .env("SHAPER_BPFFS", &paths.pins.root)
        .env("SHAPER_RUN", &paths.run)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: pre_exec runs in the forked child before exec; setsid(2) is
    // async-signal-safe and allocates nothing, so the watcher outlives this session. (std's
    // `CommandExt::setsid` is not stable yet; `process_group` would keep the session.)
    unsafe {
        cmd.pre_exec(|| {
            // Ignored as before: a fresh child is never a group leader, so it cannot fail.
            let _ = nix::unistd::setsid();
            Ok(())
        });
    }
    cmd.spawn().context("starting the confirmation watcher")?;
    Ok(())
}

/// `shaper confirm`: keep what is applied.
pub fn confirm(paths: &Paths) -> Result<bool> {
    let _lock = apply::lock(paths)?;
    if pending(paths)?.is_none() {
        return Ok(false);
    }
    // Kept on the boot disk before the rollback is disarmed: a failure to write leaves
    // the confirmation pending (and says why) rather than a box that reboots into the
    // old config after it was confirmed.
    if let Some(s) = State::load(paths)? {
        keep(paths, &s.config_text)?;
    }
    fs::remove_file(pending_path(paths))?;
    let _ = fs::remove_file(rollback_path(paths));
    Ok(true)
}

/// Writes a confirmed config where the box keeps it across reboots (crate::persist).
pub fn keep(paths: &Paths, text: &str) -> Result<()> {
    if let Some(p) = crate::persist::save(paths, text)
        .context("the config is applied but could not be kept on the boot disk")?
    {
        log::info!("kept for the next boot: {}", p.display());
    }
    Ok(())
}

/// The watcher: sleep until the deadline; roll back if still unconfirmed. A newer
/// unconfirmed apply moves the deadline; the watcher follows it.
pub async fn watch(paths: &Paths) -> Result<()> {
    loop {
        let Some(p) = pending(paths)? else {
            return Ok(());
        };
        let t = now();
        if t < p.deadline {
            tokio::time::sleep(Duration::from_secs((p.deadline - t).min(5))).await;
            continue;
        }
        return rollback(paths, &p).await;
    }
}

async fn rollback(paths: &Paths, p: &Pending) -> Result<()> {
    log::warn!(
        "{} was not confirmed in time: rolling back",
        p.config.display()
    );
    if p.has_rollback {
        let path = rollback_path(paths);
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        // Errors name the file the confirmed config came from.
        let policy = config::parse(&p.rollback_config, &text)?;
        apply::apply(paths, &policy, &p.rollback_config, &text).await?;
    } else {
        apply::remove(paths).await?;
    }
    // Only now: a failed rollback leaves the pending file for the next try.
    let _ = fs::remove_file(pending_path(paths));
    let _ = fs::remove_file(rollback_path(paths));
    Ok(())
}

/// For messages: what a pending confirmation looks like.
pub fn describe(p: &Pending) -> String {
    let left = p.deadline.saturating_sub(now());
    let target = if p.has_rollback {
        "the last confirmed config"
    } else {
        "no shaping"
    };
    format!(
        "{} is unconfirmed: {left} s left before rollback to {target} (run `shaper confirm`)",
        p.config.display()
    )
}
