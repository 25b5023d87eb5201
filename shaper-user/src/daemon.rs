//! `shaper run`: the long-running service on a gateway nobody watches.
//!
//! - One per box: an exclusive lock on `<run>/daemon.lock` refuses a second one.
//! - Waits for interfaces that do not exist yet (a USB modem, a VLAN created later).
//! - Applies (or, restarted over the same config still in place and whole, keeps it:
//!   flows and counters carry on), then tells systemd it is ready (`Type=notify`) and pets
//!   its watchdog.
//! - SIGHUP re-reads the config (whole, once) and applies it; a config that fails
//!   validation or an apply that fails leaves the running shaping alone; an unchanged one
//!   changes nothing.
//! - Every 250 ms: follows an apply made by another command (the state file changed: the
//!   tasks re-open the new maps and ring), and checks that each interface is still the one
//!   shaped (same ifindex), still carries our HTB root, and that the pins (TCX links,
//!   maps) are there; a re-created interface, a root someone deleted or a removed pin is
//!   put right by re-applying the running config (well within a second), after waiting
//!   out any apply in progress so as never to re-apply over a newer one.
//! - With `[download] window_clamp`, refreshes the clamp's per-flow shares (see `wclamp`).
//! - With classes measured for calls (`[calls]`), groups the classifier's RTP streams into
//!   calls and records each (see `calls_task`).
//! - SIGTERM/SIGINT remove the shaping (or keep it with `--keep-on-exit`) and exit 0.
//!
//! Shaping never depends on this process: programs and maps are pinned, so a crash or
//! `kill -9` leaves the site shaped.

use std::{
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context as _, Result};
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    apply::{self, Applied, Paths, State},
    compile::ROOT_HANDLE,
    config::{self, Policy},
    hosts_task,
    kernel::bpf::AttachMode,
    kernel::tc::Tc,
    rates,
};
use shaper_common::ALL_MAPS;

/// How often the interfaces are checked.
const HEALTH_EVERY: Duration = Duration::from_millis(250);

/// Sends a state line to systemd's notify socket, when run under systemd.
pub fn sd_notify(msg: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let addr = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt as _;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
    } else {
        std::os::unix::net::SocketAddr::from_pathname(Path::new(&path))
    };
    let sent =
        addr.and_then(|a| UnixDatagram::unbound().and_then(|s| s.send_to_addr(msg.as_bytes(), &a)));
    if let Err(e) = sent {
        log::warn!("sd_notify({msg}): {e}");
    }
}

fn ifindex(name: &str) -> Option<u32> {
    // An error for no such interface (index 0) and for a name with a NUL byte.
    nix::net::if_::if_nametoindex(name).ok()
}

/// Reads the config whole (one read of the file; what is parsed is what is kept as the
/// applied text) and validates it.
fn read_config(path: &Path) -> Result<(Policy, String)> {
    let text = config::read_text(path)?;
    let policy = config::parse(path, &text)?;
    Ok((policy, text))
}

/// The one `shaper run` on a box: an exclusive lock on `<run>/daemon.lock`, held for the
/// process's life (the kernel drops it when the process dies, however it dies), with the
/// owner's PID written in it for the error a second daemon gets. Two daemons would each
/// re-apply their own config whenever the other's differed, and each write learned host
/// names into maps the other may have replaced.
struct DaemonLock {
    _file: std::fs::File,
}

fn daemon_lock(paths: &Paths) -> Result<DaemonLock> {
    use std::io::{Read as _, Seek as _, Write as _};
    std::fs::create_dir_all(&paths.run)
        .with_context(|| format!("creating {}", paths.run.display()))?;
    let path = paths.files().daemon_lock();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // std's File::try_lock is flock(2) with LOCK_EX | LOCK_NB on Linux.
    match f.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = f.read_to_string(&mut pid);
            anyhow::bail!(
                "another `shaper run` (pid {}) already owns the shaping on this box; stop it first (systemctl stop shaper)",
                pid.trim()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {}", path.display()));
        }
    }
    f.set_len(0)?;
    f.rewind()?;
    write!(f, "{}", std::process::id())?;
    Ok(DaemonLock { _file: f })
}

/// What the health check found.
enum Health {
    Fine,
    /// An interface is missing; wait for it.
    Missing(String),
    /// The shaping is not where it should be: re-apply.
    Drifted(String),
}

async fn health(tc: &Tc, paths: &Paths, state: &State) -> Health {
    // The pins hold the classifier (TCX links) and its maps: a removed link pin detaches
    // the classifier, removed map pins leave the next reader (status, this daemon after a
    // restart) without them.
    for a in &state.attachments {
        if a.mode == AttachMode::Tcx && !paths.pins.link(a.side).exists() {
            return Health::Drifted(format!(
                "the classifier's pinned link on {} was removed",
                a.ifname
            ));
        }
    }
    if let Some(name) = ALL_MAPS
        .iter()
        .find(|m| !paths.pins.maps().join(m).exists())
    {
        return Health::Drifted(format!("the pinned map {name} was removed"));
    }
    for a in &state.attachments {
        match ifindex(&a.ifname) {
            None => return Health::Missing(a.ifname.clone()),
            Some(ix) if ix != a.ifindex => {
                return Health::Drifted(format!("{} was re-created", a.ifname))
            }
            Some(ix) => match tc.root_qdisc(ix).await {
                Ok(Some(q)) if q.kind == "htb" && q.handle == ROOT_HANDLE => {}
                Ok(_) => {
                    return Health::Drifted(format!(
                        "the shaper's root qdisc is gone from {}",
                        a.ifname
                    ))
                }
                Err(e) => log::debug!("health check of {}: {e}", a.ifname),
            },
        }
    }
    Health::Fine
}

/// The state another command wrote since `stamp` (which is moved on), if any.
fn foreign_apply(paths: &Paths, stamp: &mut Option<(std::time::SystemTime, u64)>) -> Option<State> {
    let now = State::stamp(paths);
    if now.is_none() || now == *stamp {
        return None;
    }
    *stamp = now;
    match State::load(paths) {
        Ok(s) => s,
        Err(e) => {
            log::warn!("reading the state another command wrote: {e:#}");
            None
        }
    }
}

/// Puts each direction's rates back to the state's plan, in place.
async fn reset_rates(tc: &Tc, s: &State) -> Result<()> {
    for a in &s.attachments {
        apply::retune(tc, a.ifindex, &s.plan.dirs[a.side]).await?;
    }
    Ok(())
}

/// The daemon's hooks for things that live elsewhere (metrics).
pub type OnApplied = Box<dyn Fn(&Policy) + Send>;

pub async fn run(
    paths: Paths,
    config_path: PathBuf,
    keep_on_exit: bool,
    on_first_apply: Option<OnApplied>,
) -> Result<ExitCode> {
    let _owner = daemon_lock(&paths)?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (mut policy, mut text) = read_config(&config_path)?;

    // Wait for the interfaces, still answering signals.
    let mut said = false;
    loop {
        let missing: Vec<&str> = [policy.wan.as_str(), policy.lan.as_str()]
            .into_iter()
            .filter(|n| ifindex(n).is_none())
            .collect();
        if missing.is_empty() {
            break;
        }
        if !said {
            log::warn!("waiting for interface(s) {} to appear", missing.join(", "));
            sd_notify(&format!("STATUS=waiting for {}", missing.join(", ")));
            said = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(HEALTH_EVERY) => {}
            _ = hup.recv() => {
                match read_config(&config_path) {
                    Ok((p, t)) => { policy = p; text = t; said = false; }
                    Err(e) => log::error!("reload refused: {e:#}"),
                }
            }
            _ = term.recv() => return Ok(ExitCode::SUCCESS),
            _ = int.recv() => return Ok(ExitCode::SUCCESS),
        }
    }

    let tc = Tc::connect().await?;
    // A restarted daemon (killed, crashed, upgraded) finds its shaping still in place, pinned:
    // when the state records this very config and the health check finds it whole, it is
    // adopted as it is. Re-applying would swap in new maps and reset every flow and
    // counter for nothing (a visible gap in a call).
    // The rates are put back to the configured ones in place (the previous daemon's
    // autorate or arrival accounting may have left them lower, and the new controllers
    // start from the configured rates).
    let kept = match State::load(&paths) {
        Ok(Some(s)) if s.config == config_path && s.config_text == text => {
            matches!(health(&tc, &paths, &s).await, Health::Fine).then_some(s)
        }
        _ => None,
    };
    let kept = match kept {
        Some(s) => match reset_rates(&tc, &s).await {
            Ok(()) => Some(s),
            Err(e) => {
                log::warn!("{e:#}; applying afresh");
                None
            }
        },
        None => None,
    };
    let mut state = match kept {
        Some(s) => {
            log::info!(
                "the shaping from {} is in place; kept (flows and counters too)",
                config_path.display()
            );
            s
        }
        None => apply::apply(&paths, &policy, &config_path, &text).await?,
    };
    log::info!(
        "shaping {} (upload) and {} (download) from {}; SIGHUP reloads",
        policy.wan,
        policy.lan,
        config_path.display()
    );
    if let Some(f) = &on_first_apply {
        f(&policy);
    }
    sd_notify("READY=1");
    sd_notify("STATUS=shaping");
    // The rate controller (autorate, arrival accounting), the window clamp (whose
    // per-flow shares follow the download rates) and the host-name engine run beside the
    // loop below; every apply sends them the one applied state (and tells the rate
    // controller that the configured rates are back in the kernel).
    let applied = |s: &State| Applied::of(s, &paths.pins);
    let (applied_tx, applied_rx) = tokio::sync::watch::channel(applied(&state));
    let rates_task = tokio::spawn(rates::run(applied_rx.clone(), paths.pins.clone()));
    let wclamp_task = tokio::spawn(crate::wclamp::run(applied_rx.clone(), paths.pins.clone()));
    let calls_task = tokio::spawn(crate::calls_task::run(
        applied_rx.clone(),
        paths.run.clone(),
    ));
    let hosts_task = tokio::spawn(hosts_task::run(applied_rx, paths.run.clone()));

    let watchdog = std::env::var("WATCHDOG_USEC")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(|us| Duration::from_micros(us / 2));
    let mut pet = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    let mut tick = tokio::time::interval(HEALTH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut waiting_for: Option<String> = None;
    // The state file as this daemon last wrote or read it: a different one is an apply by
    // another process (the CLI, a commit-confirmed rollback).
    let mut stamp = State::stamp(&paths);
    loop {
        tokio::select! {
            _ = hup.recv() => {
                sd_notify("RELOADING=1");
                match read_config(&config_path) {
                    // The same text as running: re-applying would only reset the flow
                    // table and the counters (new maps).
                    Ok((_, t)) if t == state.config_text && state.config == config_path => {
                        log::info!("{} unchanged; nothing to reload", config_path.display());
                    }
                    Ok((p, t)) => match apply::apply(&paths, &p, &config_path, &t).await {
                        Ok(s) => {
                            log::info!("reloaded {}", config_path.display());
                            crate::caps::warn_if_missing(&p);
                            state = s;
                            policy = p;
                            stamp = State::stamp(&paths);
                            let _ = applied_tx.send(applied(&state));
                        }
                        Err(e) => log::error!("reload failed, previous shaping kept: {e:#}"),
                    },
                    Err(e) => log::error!("reload refused, previous shaping kept: {e:#}"),
                }
                sd_notify("READY=1");
            }
            _ = pet.tick(), if watchdog.is_some() => sd_notify("WATCHDOG=1"),
            _ = tick.tick() => {
                // A drift is looked at twice: another command's apply may be half-way (it
                // swaps the map pins in two renames), so the second look waits until no
                // apply holds the lock, and this daemon never re-applies its config over a
                // newer one.
                let mut h = Health::Fine;
                for look in 0..2 {
                    if look == 1 {
                        if !matches!(h, Health::Drifted(_)) {
                            break;
                        }
                        // Bounded: a command stuck holding the lock must not stop this
                        // loop (the watchdog, signals).
                        let p = paths.clone();
                        let wait = tokio::task::spawn_blocking(move || apply::lock(&p).map(drop));
                        let _ = tokio::time::timeout(Duration::from_secs(2), wait).await;
                    }
                    if let Some(s) = foreign_apply(&paths, &mut stamp) {
                        log::info!(
                            "{} was applied by another command; the daemon follows it (its maps, ring and rates); SIGHUP re-applies {}",
                            s.config.display(),
                            config_path.display()
                        );
                        policy = s.plan.policy.clone();
                        state = s;
                        let _ = applied_tx.send(applied(&state));
                    }
                    h = health(&tc, &paths, &state).await;
                }
                match h {
                    Health::Fine => waiting_for = None,
                    Health::Missing(name) => {
                        if waiting_for.as_deref() != Some(&name) {
                            log::warn!("{name} has gone; shaping resumes when it is back");
                            waiting_for = Some(name);
                        }
                    }
                    Health::Drifted(why) => {
                        // Re-apply the running config as it was applied.
                        let (p, t, c) = (policy.clone(), state.config_text.clone(), state.config.clone());
                        match apply::apply(&paths, &p, &c, &t).await {
                            Ok(s) => {
                                log::warn!("{why}; shaping restored");
                                state = s;
                                stamp = State::stamp(&paths);
                                waiting_for = None;
                                let _ = applied_tx.send(applied(&state));
                            }
                            Err(e) => log::error!("{why}; restoring failed (will retry): {e:#}"),
                        }
                    }
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    sd_notify("STOPPING=1");
    drop(applied_tx);
    let _ = rates_task.await;
    let _ = wclamp_task.await;
    let _ = hosts_task.await;
    let _ = calls_task.await;
    if keep_on_exit {
        log::info!("stopping; shaping left in place");
    } else {
        apply::remove(&paths).await?;
        log::info!("stopped; shaping removed");
    }
    Ok(ExitCode::SUCCESS)
}
