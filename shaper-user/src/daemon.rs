//! `shaper run`: the long-running service on a gateway nobody watches.
//!
//! - Waits for interfaces that do not exist yet (a USB modem, a VLAN created later).
//! - Applies, then tells systemd it is ready (`Type=notify`) and pets its watchdog.
//! - SIGHUP re-reads the config and applies it; a config that fails validation or an
//!   apply that fails leaves the running shaping alone.
//! - Every 250 ms checks that each interface is still the one shaped (same ifindex) and
//!   still carries our HTB root; a re-created interface or a root someone deleted is put
//!   right by re-applying the running config (well within a second).
//! - SIGTERM/SIGINT remove the shaping (or keep it with `--keep-on-exit`) and exit 0.
//!
//! Shaping never depends on this process: programs and maps are pinned, so a crash or
//! `kill -9` leaves the site shaped, and a restarted daemon re-applies in place.

use std::{
    ffi::CString,
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context as _, Result};
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    apply::{self, Paths, State},
    autorate::{self, Applied},
    compile::ROOT_HANDLE,
    config::{self, Policy},
    hosts::{self, HostsApplied},
    kernel::bpf::Side,
    kernel::tc::Tc,
};

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
    let c = CString::new(name).ok()?;
    // SAFETY: if_nametoindex reads a NUL-terminated string.
    let ix = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (ix != 0).then_some(ix)
}

fn read_config(path: &Path) -> Result<(Policy, String)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let policy = config::parse(path, &text)?;
    Ok((policy, text))
}

/// What the health check found.
enum Health {
    Fine,
    /// An interface is missing; wait for it.
    Missing(String),
    /// The shaping is not where it should be: re-apply.
    Drifted(String),
}

async fn health(tc: &Tc, state: &State) -> Health {
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

/// What the autorate task needs to know of an apply.
fn applied(state: &State) -> Option<Applied> {
    let ifindex = |side: Side| {
        state
            .attachments
            .iter()
            .find(|a| a.side == side)
            .map(|a| a.ifindex)
    };
    Some(Applied {
        policy: state.plan.policy.clone(),
        caps: state.caps,
        wan_ifindex: ifindex(Side::Wan)?,
        lan_ifindex: ifindex(Side::Lan)?,
    })
}

/// What the host-name task needs to know of an apply.
fn hosts_applied(paths: &Paths, state: &State) -> Option<HostsApplied> {
    Some(HostsApplied {
        plan: state.plan.clone(),
        pins: paths.pins.clone(),
    })
}

/// The daemon's hooks for things that live elsewhere (metrics).
pub type OnApplied = Box<dyn Fn(&Policy) + Send>;

pub async fn run(
    paths: Paths,
    config_path: PathBuf,
    keep_on_exit: bool,
    on_first_apply: Option<OnApplied>,
) -> Result<ExitCode> {
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

    let mut state = apply::apply(&paths, &policy, &config_path, &text).await?;
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
    // Rate adaptation runs beside the loop below; every apply tells it the new policy
    // (and that the configured rates are back in the kernel).
    let (autorate_tx, autorate_rx) = tokio::sync::watch::channel(applied(&state));
    // Arrival accounting on the download rate rides on the same notifications.
    let ingress_task = tokio::spawn(crate::ingress::run(autorate_rx.clone(), paths.pins.clone()));
    let autorate_task = tokio::spawn(autorate::run(autorate_rx));
    // Host names (DNS answers, TLS server names) likewise.
    let (hosts_tx, hosts_rx) = tokio::sync::watch::channel(hosts_applied(&paths, &state));
    let hosts_task = tokio::spawn(hosts::run(hosts_rx, paths.run.clone()));

    let tc = Tc::connect().await?;
    let watchdog = std::env::var("WATCHDOG_USEC")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(|us| Duration::from_micros(us / 2));
    let mut pet = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    let mut tick = tokio::time::interval(HEALTH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut waiting_for: Option<String> = None;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                sd_notify("RELOADING=1");
                match read_config(&config_path) {
                    Ok((p, t)) => match apply::apply(&paths, &p, &config_path, &t).await {
                        Ok(s) => {
                            log::info!("reloaded {}", config_path.display());
                            state = s;
                            policy = p;
                            let _ = autorate_tx.send(applied(&state));
                            let _ = hosts_tx.send(hosts_applied(&paths, &state));
                        }
                        Err(e) => log::error!("reload failed, previous shaping kept: {e:#}"),
                    },
                    Err(e) => log::error!("reload refused, previous shaping kept: {e:#}"),
                }
                sd_notify("READY=1");
            }
            _ = pet.tick(), if watchdog.is_some() => sd_notify("WATCHDOG=1"),
            _ = tick.tick() => {
                match health(&tc, &state).await {
                    Health::Fine => waiting_for = None,
                    Health::Missing(name) => {
                        if waiting_for.as_deref() != Some(&name) {
                            log::warn!("{name} has gone; shaping resumes when it is back");
                            waiting_for = Some(name);
                        }
                    }
                    Health::Drifted(why) => {
                        // Re-apply the running config as it was applied.
                        let (p, t) = (policy.clone(), state.config_text.clone());
                        match apply::apply(&paths, &p, &config_path, &t).await {
                            Ok(s) => {
                                log::warn!("{why}; shaping restored");
                                state = s;
                                waiting_for = None;
                                let _ = autorate_tx.send(applied(&state));
                                let _ = hosts_tx.send(hosts_applied(&paths, &state));
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
    drop(autorate_tx);
    let _ = autorate_task.await;
    let _ = ingress_task.await;
    drop(hosts_tx);
    let _ = hosts_task.await;
    if keep_on_exit {
        log::info!("stopping; shaping left in place");
    } else {
        apply::remove(&paths).await?;
        log::info!("stopped; shaping removed");
    }
    Ok(ExitCode::SUCCESS)
}
