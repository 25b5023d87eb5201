//! The one writer of the shaping rates while `shaper run` runs.
//!
//! Two controllers may want the rates below the config's, for different reasons:
//! - `[autorate]` follows the line (an ADSL line that retrained lower, a busy FTTC
//!   cabinet) by the delay its probes find, in both directions (`autorate`);
//! - `[download] account_arrivals` holds what reaches the download shaper from the
//!   WAN within the rate: a flood the shaper drops has still crossed the line, and
//!   the responsive flows must make room for it (`ingress`).
//!
//! A site on a retraining line that may also be flooded needs both. They run here on
//! one tick ([`TICK`]) and one place turns what they want into the trees:
//! - autorate sets each direction's line rate, and the tree is compiled at it (classes
//!   given a share of the line follow it, as after a reload with that rate);
//! - arrival accounting holds the download below that: its limit is the line rate
//!   autorate has found (the configured rate without autorate), so a flood is seen on a
//!   retrained line too, and its rate scales every class of that tree
//!   (`ingress::scaled`), absolute guarantees included.
//!
//! So the lower wins: the download tree is autorate's, scaled by arrival accounting's
//! share of it. With arrival accounting on, autorate judges what the line carried down
//! by the arrivals (a flood's dropped packets crossed the line too), not by what the
//! shaper passed: otherwise the two would talk each other down to their floors. Nothing else changes the rates between applies; every apply puts the
//! configured rates back and starts both controllers again. The window clamp reads the
//! rates from the kernel (`wclamp`), so it follows whatever is written here.

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

use crate::dir::{Dir, PerDir};
use crate::{
    apply::{self, Applied},
    autorate::{Controller, Pinger, Step},
    compile::{self, Plan, PARENT_CLASSID},
    config::format_rate,
    ingress::{self, Arrivals, Governor},
    kernel::bpf::Pins,
    kernel::tc::Tc,
};

/// How often loads are measured and rates decided (both controllers).
pub const TICK: Duration = Duration::from_millis(100);

/// The trees at the line rates autorate asks for (the configured ones without it).
fn plan_at(a: &Applied, rates: PerDir<u64>) -> Plan {
    let mut p = a.plan.policy.clone();
    for (d, dp) in p.dirs.iter_mut() {
        dp.rate_bps = rates[d];
    }
    compile::plan(&p, Some(a.caps))
}

/// Bytes sent by class 1:1 on an interface (the whole direction).
async fn parent_bytes(tc: &Tc, ifindex: u32) -> Option<u64> {
    let classes = tc.classes(ifindex).await.ok()?;
    classes
        .iter()
        .find(|c| c.classid == PARENT_CLASSID)
        .map(|c| c.stats.bytes)
}

/// Arrival accounting's state while it runs.
struct Accounting {
    arrivals: Arrivals,
    gov: Governor,
    acc: compile::Accounting,
    l2: bool,
    /// Configured units per root unit (the plan derates PTM), for the log.
    per_root: f64,
    /// The download rate is held below the line's now (for the log).
    reduced: bool,
}

/// Autorate's state while it runs.
struct Autorate {
    cfg: crate::config::Autorate,
    ctl: Controller,
    next_reflector: usize,
    /// When the parents' byte counters were last read, and what each said.
    last: (Instant, PerDir<Option<u64>>),
}

/// The rate task: runs until the sender side of `applied` is dropped. Each new value (an
/// apply or reload put the configured rates back) starts the controllers again.
pub async fn run(mut applied: watch::Receiver<Option<Applied>>, pins: Pins) {
    // Opened on first use: a policy without either controller needs no netlink socket
    // here, and one without [autorate] no raw socket (nor CAP_NET_RAW).
    let mut tc: Option<Tc> = None;
    let mut probe_io: Option<(Pinger, AsyncFd<OwnedFd>)> = None;
    loop {
        let current = applied.borrow_and_update().clone();
        let wanted = current.filter(|a| {
            a.plan.policy.autorate.is_some() || a.plan.policy.dirs[Dir::Down].account_arrivals
        });
        if let Some(a) = wanted {
            if tc.is_none() {
                match Tc::connect().await {
                    Ok(t) => tc = Some(t),
                    Err(e) => log::error!(
                        "autorate and arrival accounting off until the next apply: netlink: {e:#}"
                    ),
                }
            }
            if let Some(tc) = &tc {
                if control(&a, tc, &pins, &mut probe_io, &mut applied).await {
                    continue;
                }
                return;
            }
        }
        if applied.changed().await.is_err() {
            return;
        }
    }
}

/// Runs the controllers `a` asks for until the next apply (true) or the daemon's end
/// (false).
async fn control(
    a: &Applied,
    tc: &Tc,
    pins: &Pins,
    probe_io: &mut Option<(Pinger, AsyncFd<OwnedFd>)>,
    applied: &mut watch::Receiver<Option<Applied>>,
) -> bool {
    let configured = plan_at(a, a.plan.policy.dirs.as_ref().map(|_, d| d.rate_bps));
    let mut auto = None;
    if let Some(cfg) = a.plan.policy.autorate.clone() {
        if probe_io.is_none() {
            match Pinger::new() {
                Ok(x) => *probe_io = Some(x),
                Err(e) => log::error!("autorate off until the next reload: {e:#}"),
            }
        }
        if probe_io.is_some() {
            let ctl = Controller::new(&cfg, &a.plan.policy);
            log::info!(
                "autorate on: reflectors {}, upload {}-{} kbit/s, download {}-{} kbit/s, bloat at +{} ms",
                cfg.reflectors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                ctl.dirs[Dir::Up].min_bps / 1000,
                ctl.dirs[Dir::Up].max_bps / 1000,
                ctl.dirs[Dir::Down].min_bps / 1000,
                ctl.dirs[Dir::Down].max_bps / 1000,
                cfg.delay_ms
            );
            let last = (
                Instant::now(),
                PerDir::new(
                    parent_bytes(tc, a.ifindex[Dir::Up]).await,
                    parent_bytes(tc, a.ifindex[Dir::Down]).await,
                ),
            );
            auto = Some(Autorate {
                cfg,
                ctl,
                next_reflector: 0,
                last,
            });
        }
    }
    let mut accounting = None;
    if a.plan.policy.dirs[Dir::Down].account_arrivals {
        match ingress::open(a, tc, pins, &configured.dirs[Dir::Down]).await {
            Ok((arrivals, l2)) => {
                log::info!(
                    "download arrival accounting on: what reaches the shaper is held to {} (+{} %){}",
                    format_rate(a.plan.policy.dirs[Dir::Down].rate_bps),
                    ingress::MARGIN * 100.0,
                    if auto.is_some() {
                        ", or to the line rate autorate finds where that is lower"
                    } else {
                        ""
                    }
                );
                accounting = Some(Accounting {
                    arrivals,
                    gov: Governor::new(configured.dirs[Dir::Down].rate_bps),
                    acc: configured.dirs[Dir::Down].accounting.clone(),
                    l2,
                    per_root: a.plan.policy.dirs[Dir::Down].rate_bps as f64
                        / configured.dirs[Dir::Down].rate_bps.max(1) as f64,
                    reduced: false,
                });
            }
            Err(e) => log::error!("download arrival accounting off until the next apply: {e:#}"),
        }
    }
    if auto.is_none() && accounting.is_none() {
        return applied.changed().await.is_ok();
    }
    // The trees at autorate's rates; arrival accounting scales the download one.
    let mut plan = configured;
    let (mut pinger, sock) = match probe_io.as_mut().filter(|_| auto.is_some()) {
        Some((p, s)) => (Some(p), Some(&*s)),
        None => (None, None),
    };
    let probe_every = auto.as_ref().map_or(Duration::from_secs(3600), |x| {
        Duration::from_millis(u64::from(x.cfg.interval_ms))
    });
    let mut probe = tokio::time::interval(probe_every);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut replies = Vec::new();
    loop {
        let readable = async {
            match sock {
                Some(s) => s.readable().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            ch = applied.changed() => return ch.is_ok(),
            _ = probe.tick(), if auto.is_some() => {
                if let (Some(x), Some(p), Some(s)) = (auto.as_mut(), pinger.as_mut(), sock) {
                    let i = x.next_reflector % x.cfg.reflectors.len();
                    p.send(s, x.cfg.reflectors[i], i);
                    x.next_reflector = x.next_reflector.wrapping_add(1);
                }
            }
            r = readable => {
                if let (Ok(mut guard), Some(x), Some(p), Some(s)) = (r, auto.as_mut(), pinger.as_mut(), sock) {
                    replies.clear();
                    p.drain(s, &mut replies);
                    guard.clear_ready();
                    for r in &replies {
                        let steps = x.ctl.clock_steps;
                        x.ctl.on_owd(r.reflector, PerDir::new(r.up_ms, r.down_ms), r.rtt_ms);
                        if x.ctl.clock_steps != steps {
                            log::info!(
                                "autorate: {}'s clock moved (its one-way delays shifted, the round trip did not); delays re-based",
                                x.cfg.reflectors[r.reflector]
                            );
                        }
                    }
                }
            }
            _ = tick.tick() => {
                if let Err(e) = step(a, tc, &mut plan, auto.as_mut(), accounting.as_mut()).await {
                    log::warn!("setting the rates: {e:#}");
                }
            }
        }
    }
}

/// One tick: each controller decides, and the trees that moved are written.
async fn step(
    a: &Applied,
    tc: &Tc,
    plan: &mut Plan,
    auto: Option<&mut Autorate>,
    mut accounting: Option<&mut Accounting>,
) -> Result<()> {
    let mut moved = PerDir::new(false, false);
    let arrived = accounting
        .as_deref_mut()
        .map(|g| g.arrivals.rate(&g.acc, g.l2));
    let mut auto_log = None;
    if let Some(x) = auto {
        let now = Instant::now();
        let sent = PerDir::new(
            parent_bytes(tc, a.ifindex[Dir::Up]).await,
            parent_bytes(tc, a.ifindex[Dir::Down]).await,
        );
        let secs = now.duration_since(x.last.0).as_secs_f64().max(1e-3);
        let rate = |new: Option<u64>, old: Option<u64>| match (new, old) {
            (Some(n), Some(o)) if n >= o => (n - o) as f64 * 8.0 / secs,
            _ => 0.0,
        };
        // What the line carried down: with arrival accounting, all that crossed it (the
        // shaper's drops of a flood included), not only what the shaper let through.
        // Counting only the latter, a flood would read as a line that shrank: each cut
        // from it lowers arrival accounting's limit, whose cut lowers what the shaper
        // lets through, down to both floors (seen in the VM tier), and the direction
        // would never look busy enough to climb back.
        let carried = PerDir::new(
            rate(sent[Dir::Up], x.last.1[Dir::Up]),
            arrived.unwrap_or_else(|| rate(sent[Dir::Down], x.last.1[Dir::Down])),
        );
        let (au, ad) = (carried[Dir::Up], carried[Dir::Down]);
        x.last = (now, sent);
        if let Some(change) = x.ctl.tick(now, carried) {
            *plan = plan_at(a, x.ctl.rates());
            moved = change.map(|_, s| s.is_some());
            let deltas = x.ctl.last_deltas_ms();
            let (du, dd) = (deltas[Dir::Up], deltas[Dir::Down]);
            auto_log = Some(if change.values().any(|s| *s == Some(Step::Cut)) {
                (log::Level::Info, format!(
                    "autorate: queue on the line (one-way delay +{du:.0} ms up, +{dd:.0} ms down); upload {} kbit/s, download {} kbit/s (carried {:.0}/{:.0})",
                    x.ctl.dirs[Dir::Up].rate_bps / 1000,
                    x.ctl.dirs[Dir::Down].rate_bps / 1000,
                    au / 1e3,
                    ad / 1e3
                ))
            } else {
                (
                    log::Level::Debug,
                    format!(
                        "autorate: line busy and quiet; upload {} kbit/s, download {} kbit/s",
                        x.ctl.dirs[Dir::Up].rate_bps / 1000,
                        x.ctl.dirs[Dir::Down].rate_bps / 1000
                    ),
                )
            });
        }
    }
    let mut share = 1.0;
    let mut acc_log = None;
    if let Some(g) = accounting {
        // Arrivals are held to the line autorate found, when it found it lower.
        if moved[Dir::Down] {
            g.gov.set_base(plan.dirs[Dir::Down].rate_bps);
        }
        let arrived = arrived.unwrap_or_default();
        if let Some(rate) = g.gov.update(arrived) {
            moved[Dir::Down] = true;
            let per_root = g.per_root;
            let reduced = g.gov.factor() < 1.0;
            let msg = format!(
                "download arrival accounting: rate {} ({} arrived)",
                format_rate((rate as f64 * per_root) as u64),
                format_rate((arrived * per_root) as u64)
            );
            acc_log = Some((
                if reduced != g.reduced {
                    log::Level::Info
                } else {
                    log::Level::Debug
                },
                msg,
            ));
            g.reduced = reduced;
        }
        share = g.gov.factor();
    }
    if moved[Dir::Up] {
        apply::retune(tc, a.ifindex[Dir::Up], &plan.dirs[Dir::Up]).await?;
    }
    if moved[Dir::Down] {
        apply::retune(
            tc,
            a.ifindex[Dir::Down],
            &ingress::scaled(&plan.dirs[Dir::Down], share),
        )
        .await?;
    }
    // Logged once written: the log says what the kernel has.
    for (level, msg) in [auto_log, acc_log].into_iter().flatten() {
        log::log!(level, "{msg}");
    }
    Ok(())
}
