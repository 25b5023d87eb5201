//! Applying, replacing and removing the shaping: the one owner of the state
//! file and of the order in which the kernel is changed.
//!
//! Apply is a transaction:
//! 1. everything that can fail without touching the kernel runs first:
//!    validation, interface lookup, qdisc probing (in a throwaway netns),
//!    compiling the maps and loading the classifier through the verifier;
//! 2. the class trees are brought to the new plan (changed in place where
//!    the classes already exist);
//! 3. the classifier is swapped in atomically (`bpf_link_update`);
//! 4. classes the new plan no longer has are deleted, maps pinned, state saved.
//!
//! If 2 or 3 fails, the trees are brought back to the previous plan (or to
//! the interfaces' original root qdiscs on a first apply) and the previous
//! classifier never stopped running.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use shaper_common::{CFG_LAN_L2, CFG_REMARK_WAN, CFG_WAN_L2};

use crate::dir::{Dir, PerDir};
use crate::{
    compile::{self, ClassPlan, DirPlan, KernelCaps, LeafPlan, Plan, PARENT_CLASSID, ROOT_HANDLE},
    config::Policy,
    kernel::{
        bpf::{self, Attachment, Pins},
        tc::{self, HtbClassParams, LinkLayer, QdiscInfo, Stab, Tc},
    },
};

use crate::rundir::{self, RunDir, STATE_VERSION};

/// Where state and pins live; overridable for tests (`SHAPER_BPFFS`, `SHAPER_RUN`).
#[derive(Debug, Clone)]
pub struct Paths {
    pub pins: Pins,
    pub run: PathBuf,
}

impl Paths {
    pub fn from_env() -> Self {
        let bpffs = std::env::var_os("SHAPER_BPFFS")
            .map_or_else(|| PathBuf::from("/sys/fs/bpf/shaper"), PathBuf::from);
        let run = std::env::var_os("SHAPER_RUN")
            .map_or_else(|| PathBuf::from("/run/shaper"), PathBuf::from);
        Paths {
            pins: Pins::new(bpffs),
            run,
        }
    }
    /// The files of the run directory (see [`rundir`]).
    pub fn files(&self) -> RunDir<'_> {
        RunDir(&self.run)
    }
    fn state(&self) -> PathBuf {
        self.files().state()
    }
    fn lock(&self) -> PathBuf {
        self.files().lock()
    }
}

/// An interface's root qdisc as found before the first apply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Original {
    pub ifname: String,
    pub ifindex: u32,
    pub root: Option<QdiscInfo>,
}

/// What is applied now. `<run>/state.json` keeps the config text, not a serialized
/// policy or plan: the policy and plan are compiled from the text again when the state is
/// read (`compile::plan` is a pure function of the text and the kernel's leaf qdiscs), so
/// a new config field never needs a `serde(default)` here.
#[derive(Debug, Clone)]
pub struct State {
    pub config: PathBuf,
    /// The config text as applied (what a commit-confirmed rollback restores).
    pub config_text: String,
    /// The shaper version that applied it.
    pub written_by: String,
    /// The digest of the class trees the writer built ([`trees_digest`]), when recorded.
    pub written_trees: Option<String>,
    pub applied_at: u64,
    pub caps: KernelCaps,
    /// Compiled from `config_text` and `caps`.
    pub plan: Plan,
    pub attachments: Vec<Attachment>,
    pub originals: Vec<Original>,
}

/// `state.json` as written.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    version: u32,
    written_by: String,
    /// [`trees_digest`] of the plan the writer applied. Absent in files written before it
    /// was recorded: such a state is not [`State::ours`] (its trees are rebuilt once).
    #[serde(default)]
    trees: Option<String>,
    config: PathBuf,
    config_text: String,
    applied_at: u64,
    caps: KernelCaps,
    attachments: Vec<Attachment>,
    originals: Vec<Original>,
}

/// This shaper's version, as state files record it.
const WRITER: &str = env!("CARGO_PKG_VERSION");

/// A digest (SHA-256 over their JSON) of the class trees a plan builds: what the kernel
/// holds after an apply. Recorded in the state so that a later shaper, which compiles the
/// recorded text again, changes those trees in place only when it compiles the same
/// trees; the version string alone does not say that (every build of one version has it).
pub fn trees_digest(plan: &Plan) -> String {
    use sha2::{Digest as _, Sha256};
    let mut h = Sha256::new();
    for d in Dir::ALL {
        h.update(serde_json::to_vec(&plan.dirs[d]).expect("a plan serialises"));
        h.update([0]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

impl State {
    pub fn load(paths: &Paths) -> Result<Option<State>> {
        let p = paths.state();
        let Some(r) = rundir::read_versioned::<Record>(&p, STATE_VERSION)? else {
            return Ok(None);
        };
        let policy = crate::config::parse(&r.config, &r.config_text).map_err(|e| {
            anyhow!(
                "{}: the applied config no longer validates (written by shaper {}): {e}",
                p.display(),
                r.written_by
            )
        })?;
        Ok(Some(State {
            plan: compile::plan(&policy, Some(r.caps)),
            config: r.config,
            config_text: r.config_text,
            written_by: r.written_by,
            written_trees: r.trees,
            applied_at: r.applied_at,
            caps: r.caps,
            attachments: r.attachments,
            originals: r.originals,
        }))
    }

    /// Whether the trees this shaper compiles from the recorded text are the ones the
    /// writer built: only then may an apply change them in place (another build may
    /// compile the same text to other classes).
    pub fn ours(&self) -> bool {
        self.written_trees.as_deref() == Some(trees_digest(&self.plan).as_str())
    }

    fn record(&self) -> Record {
        Record {
            version: STATE_VERSION,
            written_by: self.written_by.clone(),
            trees: self.written_trees.clone(),
            config: self.config.clone(),
            config_text: self.config_text.clone(),
            applied_at: self.applied_at,
            caps: self.caps,
            attachments: self.attachments.clone(),
            originals: self.originals.clone(),
        }
    }

    /// As [`State::load`], for the commands that write the state (apply, remove, under the
    /// lock): a state file that cannot be read (truncated by a power cut on a filesystem
    /// without ordered writes, hand-edited, or left by another version of shaper) is moved
    /// aside to `state.json.bad` and treated as absent, with a warning, instead of refusing
    /// every apply until someone deletes it by hand. What it recorded (the interfaces' original
    /// root qdiscs) is lost: trees of ours are then replaced, and `remove` leaves the
    /// kernel's default qdisc.
    pub fn load_recovering(paths: &Paths) -> Result<Option<State>> {
        match State::load(paths) {
            Ok(s) => Ok(s),
            Err(e) if paths.state().exists() => {
                let bad = paths.files().state_bad();
                fs::rename(paths.state(), &bad).with_context(|| {
                    format!("moving the unreadable {} aside", paths.state().display())
                })?;
                log::warn!(
                    "{e:#}; kept as {} and started afresh (the original qdiscs it recorded are forgotten)",
                    bad.display()
                );
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// When the state file last changed (its modification time and size): the daemon's
    /// cheap test for an apply made by another process.
    pub fn stamp(paths: &Paths) -> Option<(SystemTime, u64)> {
        let m = fs::metadata(paths.state()).ok()?;
        Some((m.modified().ok()?, m.len()))
    }

    /// Writes the state beside the current one; [`State::commit`] makes it current.
    fn stage(&self, paths: &Paths) -> Result<()> {
        rundir::stage_json(&paths.files().state_next(), &self.record())
    }

    fn commit(paths: &Paths) -> Result<()> {
        fs::rename(paths.files().state_next(), paths.state())
            .with_context(|| format!("writing {}", paths.state().display()))
    }
}

/// What `shaper run`'s tasks (the rate controller, the window clamp, the host-name
/// engine) know of the applied state: one value, sent to all of them on one watch
/// channel after every apply.
#[derive(Debug, Clone)]
pub struct Applied {
    /// The plan applied (its policy inside), as configured: before any rate change.
    pub plan: Plan,
    pub caps: KernelCaps,
    /// Each direction's shaped interface (upload: the WAN, download: the LAN).
    pub ifindex: PerDir<u32>,
    pub pins: Pins,
}

impl Applied {
    /// None when the state lacks an attachment (a half-written state never is).
    pub fn of(state: &State, pins: &Pins) -> Option<Applied> {
        let ifindex = |d: Dir| {
            state
                .attachments
                .iter()
                .find(|a| a.side == d)
                .map(|a| a.ifindex)
        };
        Some(Applied {
            plan: state.plan.clone(),
            caps: state.caps,
            ifindex: PerDir::new(ifindex(Dir::Up)?, ifindex(Dir::Down)?),
            pins: pins.clone(),
        })
    }

    pub fn policy(&self) -> &Policy {
        &self.plan.policy
    }
}

/// An exclusive lock on the state so concurrent CLI calls serialise.
pub struct Lock {
    _file: fs::File,
}

pub fn lock(paths: &Paths) -> Result<Lock> {
    fs::create_dir_all(&paths.run).with_context(|| format!("creating {}", paths.run.display()))?;
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(paths.lock())?;
    // std's File::lock is flock(2) with LOCK_EX on Linux, as every holder of this lock uses.
    f.lock()
        .with_context(|| format!("locking {}", paths.lock().display()))?;
    Ok(Lock { _file: f })
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn leaf(l: &LeafPlan) -> tc::Leaf {
    match *l {
        LeafPlan::Bfifo { limit_bytes } => tc::Leaf::Bfifo { limit_bytes },
        LeafPlan::FqCodel {
            limit_packets,
            target_us,
            interval_us,
            ecn,
        } => tc::Leaf::FqCodel {
            limit_packets,
            target_us,
            interval_us,
            ecn,
            quantum: None,
        },
        LeafPlan::Cake => tc::Leaf::Cake {
            flow_mode: tc::CakeFlowMode::Flows,
            nat: false,
            ack_filter: false,
        },
    }
}

fn class_params(
    rate_bps: u64,
    ceil_bps: u64,
    prio: u32,
    quantum: u32,
    burst: u32,
    cburst: u32,
) -> HtbClassParams {
    HtbClassParams {
        rate_bps,
        ceil_bps,
        prio,
        quantum,
        burst_bytes: burst,
        cburst_bytes: cburst,
        overhead: 0,
        mpu: 0,
        linklayer: LinkLayer::Ethernet,
        // The kernel's rate estimator gives `status` a measured class rate.
        rate_estimator: true,
    }
}

fn parent_params(d: &DirPlan) -> HtbClassParams {
    class_params(
        d.rate_bps,
        d.rate_bps,
        0,
        0,
        d.parent_burst_bytes,
        d.parent_burst_bytes,
    )
}

fn leaf_params(c: &ClassPlan) -> HtbClassParams {
    class_params(
        c.rate_bps,
        c.ceil_bps,
        c.prio,
        c.quantum,
        c.burst_bytes,
        c.cburst_bytes,
    )
}

/// Is this our HTB root (1:)?
fn is_our_root(q: &QdiscInfo) -> bool {
    q.kind == "htb" && q.handle == ROOT_HANDLE
}

/// The size table for a direction's accounting on an interface, or `None`
/// (no accounting).
///
/// Accounting is a size table on the HTB root, not per-class
/// overhead/linklayer in the rate specs, because:
/// - the overhead must be able to go negative: it is configured per IP
///   packet and the interface's own 14-byte Ethernet header is subtracted
///   (PPPoA's 10 becomes -4 on an Ethernet port); rate specs carry a u16;
/// - the root computes each packet's length once, before classification, so
///   1:1, every class, and the leaves' byte limits all see the same line
///   bytes, with no chance of a class missing the setting;
/// - a changed line type changes only the root's table, in place (see
///   `sync_tree`), with the class tree and its queues kept.
///
/// Known limit, shared with per-class accounting: a GSO packet gets the
/// overhead once, not per segment.
fn root_stab(a: &compile::Accounting, l2_header: bool) -> Option<Stab> {
    if a.is_none() {
        return None;
    }
    Some(Stab {
        linklayer: if a.atm() {
            LinkLayer::Atm
        } else {
            LinkLayer::Ethernet
        },
        overhead: a.stab_overhead(if l2_header { 14 } else { 0 }),
        mpu: a.mpu,
        ..Stab::default()
    })
}

/// Brings one interface's class tree to `want`. `have` is the plan applied
/// before on the same interface (changed in place), or `None` (built anew,
/// replacing whatever root is there). Classes only `have` has are left for
/// [`prune_tree`], after the classifier stops steering into them.
async fn sync_tree(tc: &Tc, ifindex: u32, want: &DirPlan, have: Option<&DirPlan>) -> Result<()> {
    let root = tc.root_qdisc(ifindex).await?;
    let ours = root.as_ref().is_some_and(is_our_root);
    let have = have.filter(|_| ours);
    let l2 = tc.link_info(ifindex).await?.has_l2_header;
    let stab = root_stab(&want.accounting, l2);
    if have.is_none() {
        // Replacing an HTB 1: with an HTB 1: would only "change" it (and HTB
        // cannot), so a stale tree of ours goes first.
        if ours {
            tc.delete_root(ifindex)
                .await
                .with_context(|| format!("clearing the old tree on {}", want.ifname))?;
        }
        tc.add_htb_root(
            ifindex,
            ROOT_HANDLE,
            want.default_minor,
            10,
            stab.as_ref(),
            true,
        )
        .await
        .with_context(|| format!("creating the HTB root on {}", want.ifname))?;
    } else {
        // Our root stays (same default class and r2q); only its size table
        // may differ: compared with what the kernel reports, not with the
        // previous plan, so a table changed behind our back is put right
        // too. The replace sends no HTB options, so the kernel keeps the
        // tree and swaps the table (or drops it, for no accounting).
        let wanted = stab.map(|s| s.compute().0);
        let current = root.as_ref().and_then(QdiscInfo::stab);
        if wanted != current {
            tc.add_htb_root(
                ifindex,
                ROOT_HANDLE,
                want.default_minor,
                10,
                stab.as_ref(),
                true,
            )
            .await
            .with_context(|| format!("changing the size table on {}", want.ifname))?;
        }
    }
    tc.put_htb_class(
        ifindex,
        ROOT_HANDLE,
        PARENT_CLASSID,
        &parent_params(want),
        have.is_none(),
    )
    .await
    .with_context(|| format!("setting class 1:1 on {}", want.ifname))?;
    for c in &want.classes {
        let exists = have.is_some_and(|h| h.classes.iter().any(|o| o.classid == c.classid));
        tc.put_htb_class(ifindex, PARENT_CLASSID, c.classid, &leaf_params(c), !exists)
            .await
            .with_context(|| {
                format!(
                    "setting class {} (1:{:x}) on {}",
                    c.name,
                    c.classid & 0xffff,
                    want.ifname
                )
            })?;
        let same_leaf = have.is_some_and(|h| {
            h.classes.iter().any(|o| {
                o.classid == c.classid && o.leaf == c.leaf && o.leaf_handle == c.leaf_handle
            })
        });
        if !same_leaf {
            tc.put_leaf(ifindex, c.classid, c.leaf_handle, &leaf(&c.leaf))
                .await
                .with_context(|| {
                    format!("setting the leaf queue of {} on {}", c.name, want.ifname)
                })?;
        }
    }
    Ok(())
}

/// Changes the rates of an applied tree in place (1:1 and every class), for
/// rate adaptation: no class is created or deleted, no leaf or size table
/// touched, the classifier untouched. `want` must come from the applied plan's
/// policy with only the rates changed.
pub async fn retune(tc: &Tc, ifindex: u32, want: &DirPlan) -> Result<()> {
    tc.put_htb_class(
        ifindex,
        ROOT_HANDLE,
        PARENT_CLASSID,
        &parent_params(want),
        false,
    )
    .await
    .with_context(|| format!("changing class 1:1 on {}", want.ifname))?;
    for c in &want.classes {
        tc.put_htb_class(ifindex, PARENT_CLASSID, c.classid, &leaf_params(c), false)
            .await
            .with_context(|| format!("changing class {} on {}", c.name, want.ifname))?;
    }
    Ok(())
}

/// Deletes the classes `have` had that `want` does not.
async fn prune_tree(tc: &Tc, ifindex: u32, want: &DirPlan, have: &DirPlan) -> Result<()> {
    for o in &have.classes {
        if !want.classes.iter().any(|c| c.classid == o.classid) {
            tc.delete_class(ifindex, o.classid)
                .await
                .with_context(|| format!("deleting class {} from {}", o.name, want.ifname))?;
        }
    }
    Ok(())
}

struct Iface {
    name: String,
    index: u32,
    l2: bool,
}

async fn iface(tc: &Tc, name: &str, role: &str) -> Result<Iface> {
    let index = tc.ifindex(name).await?.ok_or_else(|| {
        anyhow!("the {role} interface `{name}` does not exist; nothing was changed")
    })?;
    let info = tc.link_info(index).await?;
    Ok(Iface {
        name: name.to_string(),
        index,
        l2: info.has_l2_header,
    })
}

/// Probes which leaf qdiscs this kernel has (without touching any interface).
pub async fn probe_caps() -> KernelCaps {
    let r = tc::probe_qdisc_kinds(&["fq_codel", "cake"]).await;
    let has = |k: &str| r.iter().any(|(n, ok)| n == k && *ok);
    KernelCaps {
        fq_codel: has("fq_codel"),
        cake: has("cake"),
    }
}

/// Applies `policy` (parsed from `config_text`, read from `config`). On error the previous shaping is
/// left in place (see the module docs).
pub async fn apply(
    paths: &Paths,
    policy: &Policy,
    config: &Path,
    config_text: &str,
) -> Result<State> {
    // The state keeps the text and compiles it again when read: it must say what is
    // applied. (Every caller parses `policy` from `config_text`; checked in debug builds,
    // where a second parse of a large config costs nothing that matters.)
    debug_assert!(
        crate::config::parse(config, config_text).ok().as_ref() == Some(policy),
        "the policy to apply is not the one its config text gives"
    );
    let _lock = lock(paths)?;
    let prev = State::load_recovering(paths)?;
    let tc = Tc::connect().await?;
    let wan = iface(&tc, &policy.wan, "WAN").await?;
    let lan = iface(&tc, &policy.lan, "LAN").await?;

    let caps = probe_caps().await;
    let plan = compile::plan(policy, Some(caps));
    check_leaves(&plan, caps)?;
    let maps = compile::maps(&plan);
    let mut flags = 0;
    if wan.l2 {
        flags |= CFG_WAN_L2;
    }
    if lan.l2 {
        flags |= CFG_LAN_L2;
    }
    if policy.remark_dscp {
        flags |= CFG_REMARK_WAN;
    }
    bpf::ensure_bpffs(&paths.pins)?;
    let mut obj = bpf::load(&maps, wan.index, lan.index, flags)?;

    // Original roots: kept from the first apply on the same interface.
    let mut originals = Vec::new();
    for i in [&wan, &lan] {
        let kept = prev.as_ref().and_then(|s| {
            s.originals
                .iter()
                .find(|o| o.ifindex == i.index && o.ifname == i.name)
        });
        let o = match kept {
            Some(o) => o.clone(),
            None => {
                let mut root = tc.root_qdisc(i.index).await?;
                if root.as_ref().is_some_and(looks_like_ours) {
                    // A tree of ours without a state file: a crashed apply.
                    // What it replaced is unknown; the kernel default it is.
                    log::warn!("{} carries a shaper tree but no state was recorded; `remove` will leave the kernel's default qdisc", i.name);
                    root = None;
                }
                Original {
                    ifname: i.name.clone(),
                    ifindex: i.index,
                    root,
                }
            }
        };
        originals.push(o);
    }

    let sides = [
        (Dir::Up, &wan, &plan.dirs[Dir::Up]),
        (Dir::Down, &lan, &plan.dirs[Dir::Down]),
    ];
    // The previous tree, where this shaper applied it (another version may have compiled
    // the same text to other classes: its trees are rebuilt, not changed in place).
    let prev_dir = |side: Dir, i: &Iface| -> Option<DirPlan> {
        let s = prev.as_ref().filter(|s| s.ours())?;
        let d = &s.plan.dirs[side];
        let a = s.attachments.iter().find(|a| a.side == side)?;
        (a.ifindex == i.index && d.ifname == i.name).then(|| d.clone())
    };

    // Everything the swap needs is staged before it: the trees, the maps'
    // pins and the state file. A failure up to and including the swap
    // puts the previous trees back; the previous classifier kept running.
    let staged = async {
        for (side, i, want) in sides {
            sync_tree(&tc, i.index, want, prev_dir(side, i).as_ref()).await?;
        }
        fault("after-trees")?;
        bpf::stage_maps(&obj, &paths.pins)?;
        let mut attachments = Vec::new();
        for (side, i, _) in sides {
            let previous = prev
                .as_ref()
                .and_then(|s| s.attachments.iter().find(|a| a.side == side));
            attachments.push(bpf::attach(
                &mut obj,
                &paths.pins,
                side,
                &i.name,
                i.index,
                previous,
            )?);
        }
        let state = State {
            config: config.to_path_buf(),
            config_text: config_text.to_string(),
            written_by: WRITER.to_string(),
            written_trees: Some(trees_digest(&plan)),
            applied_at: now(),
            caps,
            plan: plan.clone(),
            attachments,
            originals: originals.clone(),
        };
        state.stage(paths)?;
        anyhow::Ok(state)
    }
    .await;
    let state = match staged {
        Ok(s) => s,
        Err(e) => {
            log::error!("apply failed, restoring the previous shaping: {e:#}");
            bpf::discard_staged(&paths.pins);
            if prev.is_none() {
                // Nothing was attached before this apply: drop what it attached.
                bpf::remove_pins(&paths.pins);
            }
            rollback(&tc, prev.as_ref(), &originals, [&wan, &lan]).await;
            return Err(e.context("apply failed; the previous shaping is back in place"));
        }
    };
    // Committed: the new classifier runs. Finish the bookkeeping.
    bpf::commit_maps(&paths.pins)?;
    State::commit(paths)?;
    // `[calls]`: the gateway's own drops of each measured stream, counted where the kernel
    // lets the drop tracer run; without it a call's drops are its classes' (an upper bound).
    if maps.flags & shaper_common::CFG_MEDIA != 0 {
        let major = maps.classes.first().map_or(1, |c| c.classid >> 16);
        if let Err(e) = bpf::attach_drops(&mut obj, &paths.pins, major) {
            log::warn!(
                "calls: the gateway's own drops are not counted per stream ({e:#}); each call \
                 records its classes' drops instead, an upper bound"
            );
            bpf::detach_drops(&paths.pins);
        }
    } else {
        bpf::detach_drops(&paths.pins);
    }
    for (side, i, want) in sides {
        if let Some(have) = prev_dir(side, i) {
            if let Err(e) = prune_tree(&tc, i.index, want, &have).await {
                log::warn!("{e:#}");
            }
        }
    }
    // Interfaces the previous config used and this one does not: restore them.
    if let Some(p) = &prev {
        for o in &p.originals {
            if !originals
                .iter()
                .any(|n| n.ifindex == o.ifindex && n.ifname == o.ifname)
            {
                restore_original(&tc, o).await;
            }
        }
    }
    Ok(state)
}

/// Fault injection for the tests of the rollback path: `SHAPER_FAULT=<point>`
/// makes apply fail there as a kernel error would.
fn fault(point: &str) -> Result<()> {
    if std::env::var("SHAPER_FAULT").is_ok_and(|v| v == point) {
        bail!("injected fault at {point} (SHAPER_FAULT)");
    }
    Ok(())
}

fn looks_like_ours(q: &QdiscInfo) -> bool {
    q.kind == "htb"
        && q.handle == ROOT_HANDLE
        && q.htb().is_some_and(|g| g.defcls == compile::DEFAULT_MINOR)
}

fn check_leaves(plan: &Plan, caps: KernelCaps) -> Result<()> {
    for c in plan.dirs.values().flat_map(|d| &d.classes) {
        match c.leaf {
            LeafPlan::FqCodel { .. } if !caps.fq_codel => {
                bail!("`shaping.leaf = \"fq_codel\"` but this kernel has no fq_codel qdisc; use \"auto\" or \"bfifo\". Nothing was changed")
            }
            LeafPlan::Cake if !caps.cake => {
                bail!("`shaping.leaf = \"cake\"` but this kernel has no cake qdisc; use \"auto\" or \"bfifo\". Nothing was changed")
            }
            _ => {}
        }
    }
    Ok(())
}

async fn rollback(tc: &Tc, prev: Option<&State>, originals: &[Original], ifaces: [&Iface; 2]) {
    for (i, side) in ifaces.iter().zip([Dir::Up, Dir::Down]) {
        let prev_plan = prev.and_then(|s| {
            let a = s.attachments.iter().find(|a| a.side == side)?;
            (a.ifindex == i.index).then_some(&s.plan.dirs[side])
        });
        match prev_plan {
            // Rebuild from scratch: the failed step may have left anything.
            Some(d) => {
                if let Err(e) = rebuild(tc, i.index, d).await {
                    log::error!("restoring the previous class tree on {}: {e:#}", i.name);
                }
            }
            None => {
                if let Some(o) = originals.iter().find(|o| o.ifindex == i.index) {
                    restore_original(tc, o).await;
                }
            }
        }
    }
}

/// Builds `d` anew (whatever the failed step left is deleted with the root).
async fn rebuild(tc: &Tc, ifindex: u32, d: &DirPlan) -> Result<()> {
    sync_tree(tc, ifindex, d, None).await
}

async fn restore_original(tc: &Tc, o: &Original) {
    let r = match &o.root {
        Some(q) => tc.restore_root(o.ifindex, q).await,
        None => tc.delete_root(o.ifindex).await,
    };
    if let Err(e) = r {
        log::error!("restoring the original root qdisc of {}: {e}", o.ifname);
    }
}

/// Removes all shaping and restores the interfaces' original root qdiscs.
/// Returns false when nothing was applied.
pub async fn remove(paths: &Paths) -> Result<bool> {
    let _lock = lock(paths)?;
    let Some(state) = State::load_recovering(paths)? else {
        // Nothing recorded; still clear stray pins from a crashed apply.
        bpf::remove_pins(&paths.pins);
        return Ok(false);
    };
    let tc = Tc::connect().await?;
    for a in &state.attachments {
        bpf::detach(&paths.pins, a);
        if a.created_clsact {
            if let Err(e) = tc.delete_clsact(a.ifindex).await {
                log::warn!("removing clsact from {}: {e}", a.ifname);
            }
        }
    }
    for o in &state.originals {
        // The interface may have been re-created since; only touch the same one.
        match tc.ifindex(&o.ifname).await? {
            Some(ix) if ix == o.ifindex => restore_original(&tc, o).await,
            _ => log::warn!(
                "{} is gone or was re-created; nothing to restore there",
                o.ifname
            ),
        }
    }
    bpf::remove_pins(&paths.pins);
    fs::remove_file(paths.state())
        .with_context(|| format!("removing {}", paths.state().display()))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Framing, LinkAccounting};

    /// The state file keeps the text and the kernel facts; what it reads back is the
    /// policy and plan compiled from them again.
    #[test]
    fn state_keeps_the_text_and_compiles_it_again() {
        let root = std::env::temp_dir().join(format!("shaper-state-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let paths = Paths {
            pins: Pins::new(root.join("bpffs")),
            run: root.join("run"),
        };
        let config = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/gp-surgery-fttc-40-10.toml"
        ));
        let text = fs::read_to_string(config).expect("example config");
        let policy = crate::config::parse(config, &text).expect("valid");
        let caps = KernelCaps {
            fq_codel: true,
            cake: false,
        };
        let state = State {
            config: config.to_path_buf(),
            config_text: text.clone(),
            written_by: WRITER.to_string(),
            written_trees: Some(trees_digest(&compile::plan(&policy, Some(caps)))),
            applied_at: 1,
            caps,
            plan: compile::plan(&policy, Some(caps)),
            attachments: vec![Attachment {
                side: Dir::Up,
                ifname: "wan0".into(),
                ifindex: 7,
                mode: bpf::AttachMode::Tcx,
                created_clsact: false,
            }],
            originals: vec![],
        };
        state.stage(&paths).expect("stage");
        State::commit(&paths).expect("commit");
        let json: serde_json::Value =
            serde_json::from_slice(&fs::read(paths.state()).expect("written")).expect("json");
        assert_eq!(json["version"], STATE_VERSION);
        assert!(json.get("plan").is_none(), "no serialized plan: {json}");
        assert_eq!(json["attachments"][0]["side"], "up");
        let back = State::load(&paths).expect("reads").expect("present");
        assert_eq!(back.plan, state.plan);
        assert_eq!(back.config_text, text);
        assert!(back.ours());
        // Trees the writer built otherwise (another build of this version) or did not
        // record: not ours, so the next apply rebuilds them instead of editing in place.
        for trees in [Some("0".repeat(64)), None] {
            let mut other = json.clone();
            other["trees"] = trees.clone().into();
            if trees.is_none() {
                other.as_object_mut().expect("object").remove("trees");
            }
            fs::write(paths.state(), other.to_string()).expect("write");
            let s = State::load(&paths).expect("reads").expect("present");
            assert_eq!(s.plan, state.plan);
            assert!(!s.ours(), "trees {trees:?} taken as ours");
        }
        fs::write(paths.state(), json.to_string()).expect("write");
        let applied = Applied::of(&back, &paths.pins);
        assert!(
            applied.is_none(),
            "no download attachment: no applied state"
        );

        // A text that no longer validates (or a file of another version) is an error,
        // which the writing commands move aside.
        let mut spoiled = json.clone();
        spoiled["config_text"] = "[interfaces]\nwan = 3\n".into();
        fs::write(paths.state(), spoiled.to_string()).expect("write");
        let e = State::load(&paths).expect_err("does not validate");
        assert!(format!("{e:#}").contains("no longer validates"), "{e:#}");
        let mut old = json;
        old["version"] = 1.into();
        fs::write(paths.state(), old.to_string()).expect("write");
        let e = State::load(&paths).expect_err("another version");
        assert!(format!("{e:#}").contains("format version 1"), "{e:#}");
        assert!(State::load_recovering(&paths).expect("recovers").is_none());
        assert!(paths.files().state_bad().exists());
        fs::remove_dir_all(&root).expect("clean up");
    }

    #[test]
    fn root_stab_per_line() {
        let acc = |framing, overhead, mpu| {
            compile::Accounting::of(&LinkAccounting {
                line: None,
                framing,
                overhead,
                mpu,
            })
        };
        assert_eq!(root_stab(&acc(Framing::Ethernet, 0, 0), true), None);
        let s = root_stab(&acc(Framing::Atm, 10, 0), true).expect("a table");
        assert_eq!((s.linklayer, s.overhead, s.mpu), (LinkLayer::Atm, -4, 0));
        // On an L3 device (ppp0) the packet is the IP packet.
        let s = root_stab(&acc(Framing::Atm, 10, 0), false).expect("a table");
        assert_eq!(s.overhead, 10);
        let s = root_stab(&acc(Framing::Ptm, 30, 68), true).expect("a table");
        assert_eq!(
            (s.linklayer, s.overhead, s.mpu),
            (LinkLayer::Ethernet, 16, 68)
        );
    }
}
