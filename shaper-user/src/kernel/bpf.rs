//! The classifier program and its maps: load (verifier), fill, attach to the
//! egress hooks, pin under bpffs so shaping outlives the process, replace
//! atomically on re-apply, read counters and `[calls]`' media streams back, detach.
//!
//! Attachment: TCX links (kernel >= 6.6), pinned as `<root>/link_wan` and
//! `<root>/link_lan`; a re-apply swaps the program inside the existing link
//! with one `bpf_link_update`, so there is no moment without a classifier.
//! Older kernels: a direct-action cls_bpf filter on clsact egress through
//! netlink at a fixed priority/handle, replaced in place on re-apply.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    include_bytes_aligned,
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, Map, MapData, PerCpuArray},
    programs::{
        links::{FdLink, LinkError, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcAttachType, TcHandle},
        BtfTracePoint, LinkOrder, SchedClassifier,
    },
    util::KernelVersion,
    Ebpf, EbpfLoader,
};
use serde::{Deserialize, Serialize};
use shaper_common::{
    media::{
        media_gen_next, media_slot, MediaDropCfg, MediaKey, MediaSlot, MediaStream, MAP_MEDIA,
        MAP_MEDIA_DROP_CFG, MAP_MEDIA_SLOTS, MEDIA_DROPS_TRACEPOINT, MEDIA_MAX_SLOTS,
        MEDIA_MAX_STREAMS, PROG_MEDIA_DROPS,
    },
    *,
};

use crate::compile::MapPlan;
use crate::dir::PerDir;

/// The classifier object built by build.rs (aya-build).
pub(crate) static OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/shaper-bpf"));

/// Netlink (pre-TCX) filter priority and handle we own on clsact egress.
const NL_PRIORITY: u16 = 0x2f00;
const NL_HANDLE: TcHandle = TcHandle::new(0, 0x5a);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachMode {
    Tcx,
    Netlink,
}

/// How one side is attached (kept in the state file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub side: Dir,
    pub ifname: String,
    pub ifindex: u32,
    pub mode: AttachMode,
    /// We added the clsact qdisc (netlink mode) and must remove it.
    pub created_clsact: bool,
}

/// Paths under bpffs.
#[derive(Debug, Clone)]
pub struct Pins {
    pub root: PathBuf,
}

impl Pins {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Pins { root: root.into() }
    }
    pub fn link(&self, side: Dir) -> PathBuf {
        self.root.join(format!("link_{}", side.egress()))
    }
    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }
    /// The drop tracer's link (`[calls]`; see [`attach_drops`]).
    pub fn drops_link(&self) -> PathBuf {
        self.root.join("link_drops")
    }
    fn drops_link_next(&self) -> PathBuf {
        self.root.join("link_drops_next")
    }
    // bpffs refuses names with a dot in them.
    fn maps_next(&self) -> PathBuf {
        self.root.join("maps_next")
    }
    fn maps_old(&self) -> PathBuf {
        self.root.join("maps_old")
    }
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the struct we pass; the path is NUL-terminated.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// Makes sure the pin root lives on a bpffs (mounting /sys/fs/bpf if a fresh
/// machine has none) and exists.
pub fn ensure_bpffs(pins: &Pins) -> Result<()> {
    let base = Path::new("/sys/fs/bpf");
    if pins.root.starts_with(base) && !is_bpffs(base) {
        fs::create_dir_all(base).ok();
        let src = c"bpf";
        let target = c"/sys/fs/bpf";
        // SAFETY: plain mount(2) with static NUL-terminated strings.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                src.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            bail!(
                "/sys/fs/bpf is not a bpf filesystem and mounting one failed: {}",
                io::Error::last_os_error()
            );
        }
        log::info!("mounted bpffs on /sys/fs/bpf");
    }
    fs::create_dir_all(&pins.root).with_context(|| format!("creating {}", pins.root.display()))?;
    if !is_bpffs(&pins.root) {
        bail!(
            "{} is not on a bpf filesystem; pins would not work there",
            pins.root.display()
        );
    }
    Ok(())
}

/// Loads the classifier (through the verifier) with maps sized and filled for
/// `m`. Nothing is attached yet; `CONFIG` is written last with `CFG_READY`.
pub fn load(m: &MapPlan, wan_ifindex: u32, lan_ifindex: u32, flags: u32) -> Result<Ebpf> {
    let nbitmaps = u32::try_from(m.bitmaps.len()).context("too many bitmaps")? + m.spare_bitmaps;
    let mut bpf = EbpfLoader::new()
        .map_max_entries(MAP_BITMAPS, nbitmaps.max(1))
        .load(OBJECT)
        .context("loading the classifier object")?;
    let prog: &mut SchedClassifier = program(&mut bpf)?;
    let t0 = std::time::Instant::now();
    prog.load()
        .map_err(|e| anyhow!("the kernel refused the classifier program: {e:#}"))?;
    if let Ok(info) = prog.info() {
        log::debug!(
            "classifier verified in {:?}: {:?} instructions processed",
            t0.elapsed(),
            info.verified_instruction_count()
        );
    }
    fill(&mut bpf, m, wan_ifindex, lan_ifindex, flags)?;
    Ok(bpf)
}

fn program(bpf: &mut Ebpf) -> Result<&mut SchedClassifier> {
    bpf.program_mut(PROG_CLASSIFY)
        .ok_or_else(|| anyhow!("classifier program missing from object"))?
        .try_into()
        .context("classifier is not a tc program")
}

fn map_mut<'a>(bpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Map> {
    bpf.map_mut(name)
        .ok_or_else(|| anyhow!("map {name} missing from object"))
}

fn fill(bpf: &mut Ebpf, m: &MapPlan, wan_ifindex: u32, lan_ifindex: u32, flags: u32) -> Result<()> {
    {
        let mut a: Array<_, Bitmap> = Array::try_from(map_mut(bpf, MAP_BITMAPS)?)?;
        for (i, words) in m.bitmaps.iter().enumerate() {
            let mut b: Bitmap = [0; BITMAP_WORDS];
            b[..words.len()].copy_from_slice(words);
            a.set(i as u32, b, 0).context("filling rule bitmaps")?;
        }
    }
    let mut bases = [0u32; 4];
    for (k, (name, idx)) in [
        (MAP_PROTO_IDX, &m.proto_idx),
        (MAP_DSCP_IDX, &m.dscp_idx),
        (MAP_SPORT_IDX, &m.sport_idx),
        (MAP_DPORT_IDX, &m.dport_idx),
    ]
    .into_iter()
    .enumerate()
    {
        // Slots hold `id ^ base`; a fresh map is all zeros, i.e. all `base`.
        let base = most_common(idx);
        bases[k] = base;
        let mut a: Array<_, u32> = Array::try_from(map_mut(bpf, name)?)?;
        for (i, id) in idx.iter().enumerate() {
            if *id != base {
                a.set(i as u32, *id ^ base, 0)
                    .with_context(|| format!("filling {name}"))?;
            }
        }
    }
    fn trie<const N: usize>(
        bpf: &mut Ebpf,
        name: &str,
        entries: &[([u8; N], u8, u32)],
    ) -> Result<()> {
        let mut t: LpmTrie<_, [u8; N], u32> = LpmTrie::try_from(map_mut(bpf, name)?)?;
        for (addr, len, id) in entries {
            t.insert(&Key::new(u32::from(*len), *addr), *id, 0)
                .with_context(|| format!("filling {name}"))?;
        }
        Ok(())
    }
    trie(bpf, MAP_SRC4, &m.src4)?;
    trie(bpf, MAP_DST4, &m.dst4)?;
    trie(bpf, MAP_SRC6, &m.src6)?;
    trie(bpf, MAP_DST6, &m.dst6)?;
    {
        let mut a: Array<_, RuleInfo> = Array::try_from(map_mut(bpf, MAP_RULES)?)?;
        for (i, class) in m.rule_class.iter().enumerate() {
            a.set(i as u32, RuleInfo { class: *class }, 0)
                .context("filling RULES")?;
        }
    }
    {
        let mut a: Array<_, ClassInfo> = Array::try_from(map_mut(bpf, MAP_CLASSES)?)?;
        for (i, c) in m.classes.iter().enumerate() {
            a.set(i as u32, *c, 0).context("filling CLASSES")?;
        }
    }
    let cfg = Config {
        wan_ifindex,
        lan_ifindex,
        nwords: m.nwords,
        default_class: m.default_class,
        wild_src: m.wild_src,
        wild_dst: m.wild_dst,
        flags: flags | m.flags | CFG_READY,
        ack_class: m.ack_class.unwrap_or(NO_CLASS),
        proto_base: bases[0],
        dscp_base: bases[1],
        sport_base: bases[2],
        dport_base: bases[3],
        promote_class: m.promote.map_or(NO_CLASS, |p| p.0),
        promote_min_packets: m.promote.map_or(0, |p| p.1),
        promote_max_bytes: m.promote.map_or(0, |p| p.2),
        promote_max_packet: m.promote.map_or(0, |p| p.3),
        clamp_queue_us: m.clamp_queue_us,
        _pad: 0,
        media_classes: m.media_classes,
    };
    if !m.clamp_share.is_empty() {
        let mut a: Array<_, u64> = Array::try_from(map_mut(bpf, MAP_CLAMP_SHARE)?)?;
        for (i, share) in m.clamp_share.iter().enumerate().take(MAX_CLASSES) {
            a.set(i as u32, *share, 0).context("filling CLAMP_SHARE")?;
        }
    }
    let mut a: Array<_, Config> = Array::try_from(map_mut(bpf, MAP_CONFIG)?)?;
    a.set(0, cfg, 0).context("writing CONFIG")?;
    Ok(())
}

fn most_common(ids: &[u32]) -> u32 {
    let mut counts: std::collections::HashMap<u32, usize> = std::collections::HashMap::new();
    for id in ids {
        *counts.entry(*id).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by_key(|&(id, n)| (n, std::cmp::Reverse(id)))
        .map_or(0, |(id, _)| id)
}

fn not_found(e: &LinkError) -> bool {
    matches!(e, LinkError::SyscallError(s) if s.io_error.kind() == io::ErrorKind::NotFound)
}

/// The attach mode this kernel supports (TCX from 6.6). `SHAPER_ATTACH=netlink`
/// forces the legacy path (to test it on a new kernel).
pub fn attach_mode() -> AttachMode {
    if std::env::var("SHAPER_ATTACH").is_ok_and(|v| v == "netlink") {
        return AttachMode::Netlink;
    }
    if KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0)) {
        AttachMode::Tcx
    } else {
        AttachMode::Netlink
    }
}

/// Attaches (or atomically swaps in) the loaded classifier on `ifname`'s
/// egress. `previous` is the attachment recorded by the last apply, if any.
pub fn attach(
    bpf: &mut Ebpf,
    pins: &Pins,
    side: Dir,
    ifname: &str,
    ifindex: u32,
    previous: Option<&Attachment>,
) -> Result<Attachment> {
    let mode = previous.map_or_else(attach_mode, |p| p.mode);
    let prog = program(bpf)?;
    let same_if = previous.is_some_and(|p| p.ifindex == ifindex && p.ifname == ifname);
    if let Some(p) = previous.filter(|_| !same_if) {
        // Interface changed (or was re-created): drop the old hook first.
        detach(pins, p);
    }
    match mode {
        AttachMode::Tcx => {
            let path = pins.link(side);
            let existing = if same_if {
                match PinnedLink::from_pin(&path) {
                    Ok(l) => Some(l),
                    Err(e) if not_found(&e) => None,
                    Err(e) => return Err(anyhow!("opening pinned link {}: {e}", path.display())),
                }
            } else {
                None
            };
            match existing {
                Some(old) => {
                    let link = SchedClassifierLink::try_from(FdLink::from(old))?;
                    let id = prog
                        .attach_to_link(link)
                        .with_context(|| format!("replacing the classifier on {ifname}"))?;
                    // The pin already names this link; let our fd close.
                    drop(prog.take_link(id)?);
                }
                None => {
                    let _ = fs::remove_file(&path);
                    let id = prog
                        .attach_with_options(
                            ifname,
                            TcAttachType::Egress,
                            TcAttachOptions::TcxOrder(LinkOrder::default()),
                        )
                        .with_context(|| {
                            format!("attaching the classifier to {ifname} egress (TCX)")
                        })?;
                    let link: FdLink = prog.take_link(id)?.try_into()?;
                    link.pin(&path)
                        .with_context(|| format!("pinning link at {}", path.display()))?;
                }
            }
            Ok(Attachment {
                side,
                ifname: ifname.into(),
                ifindex,
                mode,
                created_clsact: false,
            })
        }
        AttachMode::Netlink => {
            let created_clsact = match tc::qdisc_add_clsact(ifname) {
                Ok(()) => true,
                Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {
                    previous.is_some_and(|p| p.created_clsact && same_if)
                }
                Err(e) => return Err(anyhow!("adding clsact to {ifname}: {e}")),
            };
            // Only a filter this shaper put on this very interface is replaced in place.
            // `attached` builds a handle whether or not such a filter exists, and dropping
            // a handle deletes the filter it names: never make one that is not used (on a
            // first apply that deleted the filter just added, leaving nothing attached).
            let existing = if same_if {
                SchedClassifierLink::attached(
                    ifname,
                    TcAttachType::Egress,
                    NL_PRIORITY,
                    NL_HANDLE,
                    None,
                )
                .ok()
            } else {
                None
            };
            let id = match existing {
                Some(link) => prog.attach_to_link(link)?,
                None => prog.attach_with_options(
                    ifname,
                    TcAttachType::Egress,
                    TcAttachOptions::Netlink(NlOptions {
                        priority: NL_PRIORITY,
                        handle: NL_HANDLE,
                        classid: None,
                    }),
                )?,
            };
            // The filter must outlive this process: never let aya detach it.
            std::mem::forget(prog.take_link(id)?);
            Ok(Attachment {
                side,
                ifname: ifname.into(),
                ifindex,
                mode,
                created_clsact,
            })
        }
    }
}

/// Removes one side's hook. Missing pieces are fine (already gone).
pub fn detach(pins: &Pins, a: &Attachment) {
    match a.mode {
        AttachMode::Tcx => {
            // Unpinning drops the last reference: the link detaches.
            let _ = fs::remove_file(pins.link(a.side));
        }
        AttachMode::Netlink => {
            // The caller removes clsact itself when `created_clsact` is set.
            if let Err(e) = tc::qdisc_detach_program(&a.ifname, TcAttachType::Egress, PROG_CLASSIFY)
            {
                log::warn!("removing classifier filter from {}: {e}", a.ifname);
            }
        }
    }
}

/// Pins the maps of a loaded classifier into `maps_next` (step one of two:
/// nothing that reads the current set sees them yet).
pub fn stage_maps(bpf: &Ebpf, pins: &Pins) -> Result<()> {
    let next = pins.maps_next();
    remove_dir(&next).with_context(|| format!("clearing {}", next.display()))?;
    fs::create_dir_all(&next).with_context(|| format!("creating {}", next.display()))?;
    for name in ALL_MAPS {
        let map = bpf.map(name).ok_or_else(|| anyhow!("map {name} missing"))?;
        let data: &MapData = match map {
            Map::Array(d)
            | Map::PerCpuArray(d)
            | Map::LpmTrie(d)
            | Map::LruHashMap(d)
            | Map::HashMap(d)
            | Map::RingBuf(d) => d,
            _ => bail!("unexpected map type for {name}"),
        };
        data.pin(next.join(name))
            .with_context(|| format!("pinning map {name}"))?;
    }
    Ok(())
}

/// Makes the staged maps the current set (step two, after the swap).
pub fn commit_maps(pins: &Pins) -> Result<()> {
    let (cur, next, old) = (pins.maps(), pins.maps_next(), pins.maps_old());
    let _ = remove_dir(&old);
    if cur.exists() {
        fs::rename(&cur, &old).with_context(|| format!("moving {}", cur.display()))?;
    }
    fs::rename(&next, &cur).with_context(|| format!("moving {}", next.display()))?;
    let _ = remove_dir(&old);
    Ok(())
}

/// Drops staged maps after a failed apply.
pub fn discard_staged(pins: &Pins) {
    let _ = remove_dir(&pins.maps_next());
}

fn remove_dir(dir: &Path) -> io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for e in fs::read_dir(dir)? {
        let _ = fs::remove_file(e?.path());
    }
    fs::remove_dir(dir)
}

/// Removes every pin we own (links and maps).
pub fn remove_pins(pins: &Pins) {
    for side in [Dir::Up, Dir::Down] {
        let _ = fs::remove_file(pins.link(side));
    }
    let _ = fs::remove_file(pins.drops_link());
    let _ = fs::remove_file(pins.drops_link_next());
    for d in [pins.maps(), pins.maps_next(), pins.maps_old()] {
        let _ = remove_dir(&d);
    }
    let _ = fs::remove_dir(&pins.root);
}

/// `[calls]`: attaches the loaded object's drop tracer (`kfree_skb`, counting the
/// measured streams' packets the gateway itself drops into their streams) and pins
/// its link as `link_drops`, replacing the previous apply's (whose program counted into
/// the previous maps). Called once the new classifier runs. `major` is the HTB root's
/// major number the classifier's class ids carry. Needs the kernel's BTF: without it
/// (or if the kernel refuses the program) this fails, and the caller goes on without
/// per-stream drops (the calls keep their classes' drops, an upper bound).
pub fn attach_drops(bpf: &mut Ebpf, pins: &Pins, major: u32) -> Result<()> {
    let kbtf = crate::kernel::btf::KernelBtf::from_sys_fs()
        .context("reading the kernel's BTF (/sys/kernel/btf/vmlinux)")?;
    let dc = MediaDropCfg {
        skb_dev: kbtf.offset("sk_buff", "dev")?,
        skb_head: kbtf.offset("sk_buff", "head")?,
        skb_network_header: kbtf.offset("sk_buff", "network_header")?,
        skb_priority: kbtf.offset("sk_buff", "priority")?,
        dev_ifindex: kbtf.offset("net_device", "ifindex")?,
        major,
        ready: 1,
        _pad: 0,
    };
    // The program reads them with these sizes.
    for (s, m, want) in [
        ("sk_buff", "dev", 8),
        ("sk_buff", "head", 8),
        ("sk_buff", "network_header", 2),
        ("sk_buff", "priority", 4),
        ("net_device", "ifindex", 4),
    ] {
        let got = kbtf.member_size(s, m)?;
        if got != want {
            bail!("{s}.{m} is {got} bytes in this kernel, not {want}");
        }
    }
    let mut a: Array<_, MediaDropCfg> = Array::try_from(map_mut(bpf, MAP_MEDIA_DROP_CFG)?)?;
    a.set(0, dc, 0).context("writing MEDIA_DROP_CFG")?;
    let btf = aya::Btf::from_sys_fs().context("reading the kernel's BTF")?;
    let prog: &mut BtfTracePoint = bpf
        .program_mut(PROG_MEDIA_DROPS)
        .ok_or_else(|| anyhow!("drop tracer missing from object"))?
        .try_into()
        .context("the drop tracer is not a BTF tracepoint program")?;
    prog.load(MEDIA_DROPS_TRACEPOINT, &btf)
        .map_err(|e| anyhow!("the kernel refused the drop tracer: {e:#}"))?;
    let id = prog.attach().context("attaching the drop tracer")?;
    let link: FdLink = prog.take_link(id)?.into();
    let next = pins.drops_link_next();
    let _ = fs::remove_file(&next);
    link.pin(&next)
        .with_context(|| format!("pinning the drop tracer at {}", next.display()))?;
    // Renaming over the old pin drops its last reference: the old tracer detaches.
    fs::rename(&next, pins.drops_link()).context("replacing the drop tracer's pin")?;
    log::debug!("drop tracer attached: {dc:?}");
    Ok(())
}

/// Detaches the drop tracer (a policy without `[calls]`).
pub fn detach_drops(pins: &Pins) {
    let _ = fs::remove_file(pins.drops_link());
}

/// Counters read from the pinned maps.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    /// [dir][rule rank]
    pub rules: PerDir<Vec<Counter>>,
    /// [dir][class index]
    pub classes: PerDir<Vec<Counter>>,
    /// [dir][GLOBAL_COUNTER_NAMES index]
    pub global: PerDir<Vec<u64>>,
    /// [class index]: the download counters' part that came in from the WAN
    /// (empty when the running classifier predates the map).
    pub wan_arrivals: Vec<Counter>,
}

/// Opens one of the running classifier's pinned maps.
pub fn open_pinned(pins: &Pins, name: &str) -> Result<Map> {
    let path = pins.maps().join(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening {} (is the shaper applied?)", path.display()))?;
    Ok(Map::from_map_data(data)?)
}

/// A per-CPU counter summed over the CPUs.
pub fn sum_cpus(v: aya::maps::PerCpuValues<Counter>) -> Counter {
    v.iter().fold(Counter::default(), |a, c| Counter {
        packets: a.packets + c.packets,
        bytes: a.bytes + c.bytes,
    })
}

pub fn read_counters(pins: &Pins, nrules: usize, nclasses: usize) -> Result<Counters> {
    let rules_map: PerCpuArray<_, Counter> =
        PerCpuArray::try_from(open_pinned(pins, MAP_RULE_STATS)?)?;
    let class_map: PerCpuArray<_, Counter> =
        PerCpuArray::try_from(open_pinned(pins, MAP_CLASS_STATS)?)?;
    let global_map: PerCpuArray<_, u64> =
        PerCpuArray::try_from(open_pinned(pins, MAP_GLOBAL_STATS)?)?;
    let mut c = Counters::default();
    for d in Dir::ALL {
        let dir = d.index();
        for r in 0..nrules {
            c.rules[d].push(sum_cpus(rules_map.get(&((dir * MAX_RULES + r) as u32), 0)?));
        }
        for k in 0..nclasses {
            c.classes[d].push(sum_cpus(
                class_map.get(&((dir * MAX_CLASSES + k) as u32), 0)?,
            ));
        }
        for g in 0..GLOBAL_COUNTERS as usize {
            let v = global_map.get(&((dir * GLOBAL_COUNTERS as usize + g) as u32), 0)?;
            c.global[d].push(v.iter().sum());
        }
    }
    // Pins left by an older shaper (before its next apply) have no such map.
    if let Ok(m) = open_pinned(pins, MAP_WAN_ARRIVALS) {
        let m: PerCpuArray<_, Counter> = PerCpuArray::try_from(m)?;
        for k in 0..nclasses {
            c.wan_arrivals.push(sum_cpus(m.get(&(k as u32), 0)?));
        }
    }
    Ok(c)
}

/// The RTP streams the running classifier measures (`[calls]`: the pinned `MEDIA_SLOTS`
/// and `MEDIA` maps), each once, in key order. Pins left by a shaper older than the maps
/// (until its next apply) have no streams, or none in slots.
pub fn read_media(pins: &Pins) -> Result<Vec<(MediaKey, MediaStream)>> {
    if pins.maps().is_dir() && !pins.maps().join(MAP_MEDIA).exists() {
        return Ok(Vec::new());
    }
    let media = open_pinned(pins, MAP_MEDIA)?;
    let slots = if pins.maps().join(MAP_MEDIA_SLOTS).exists() {
        Some(open_pinned(pins, MAP_MEDIA_SLOTS)?)
    } else {
        None
    };
    media_streams(&media, slots.as_ref())
}

/// The streams in a classifier's `MEDIA` and `MEDIA_SLOTS` maps, each once, in key order.
/// The classifier adds and evicts streams while `MEDIA` is walked: an entry gone between
/// its key and its value is skipped, and as the kernel restarts a walk whose last key
/// vanished from the first key, the walk stops after twice the map's size. A stream is in
/// one of the two maps; should a slot's and an entry's keys ever agree (a slot freed and
/// taken again while the walk ran), the slot's stream is kept.
pub fn media_streams(media: &Map, slots: Option<&Map>) -> Result<Vec<(MediaKey, MediaStream)>> {
    let map: HashMap<_, MediaKey, MediaStream> = HashMap::try_from(media)?;
    let mut streams = std::collections::BTreeMap::new();
    for entry in map.iter().take(2 * MEDIA_MAX_STREAMS as usize) {
        let (k, s) = entry.with_context(|| format!("reading {MAP_MEDIA}"))?;
        streams.insert(k, s);
    }
    if let Some(slots) = slots {
        for slot in read_slots(slots)? {
            if slot.key.family != 0 {
                streams.insert(slot.key, slot.stream);
            }
        }
    }
    Ok(streams.into_iter().collect())
}

/// Every slot of a `MEDIA_SLOTS` map, copied out of the array's memory, mapped read-only
/// for the copy (the map is `BPF_F_MMAPABLE`): one copy of the 1,024 slots a second, where
/// a lookup each would be 1,024 system calls (slow on the small boxes a gateway runs on,
/// and in the VM tier's emulated CPUs). The classifier changes slots meanwhile, as it does
/// while a lookup copies one: a slot read mid-update is one packet out, read again a
/// second later.
fn read_slots(map: &Map) -> Result<Vec<MediaSlot>> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let Map::Array(data) = map else {
        bail!("{MAP_MEDIA_SLOTS} is not an array");
    };
    // The map must be this build's: pins left by another build (until the next apply)
    // may hold slots of another size, which the mapping would misread.
    let info = data.info()?;
    let n = MEDIA_MAX_SLOTS as usize;
    let size = std::mem::size_of::<MediaSlot>();
    if (info.value_size() as usize, info.max_entries() as usize) != (size, n) {
        bail!(
            "{MAP_MEDIA_SLOTS} holds {} slots of {} bytes, not {n} of {size} (left by another \
             build until the next apply)",
            info.max_entries(),
            info.value_size()
        );
    }
    // An array map's values lie `value_size` rounded up to 8 apart, from the mapping's
    // start (kernel/bpf/arraymap.c).
    let elem = size.next_multiple_of(8);
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let len = (elem * n).next_multiple_of(page);
    let fd = data.fd().as_fd().as_raw_fd();
    // SAFETY: a fresh read-only shared mapping of the map's memory, unmapped below;
    // nothing else refers to it.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("mapping {MAP_MEDIA_SLOTS} (is it BPF_F_MMAPABLE?)"));
    }
    let slots = (0..n)
        .map(|i| {
            // SAFETY: slot i lies inside the mapping (`len` covers n slots), 8-aligned
            // (the mapping is page-aligned, `elem` a multiple of 8); the classifier may
            // write it meanwhile, hence a volatile copy of plain integers.
            unsafe { std::ptr::read_volatile(base.cast::<u8>().add(i * elem).cast::<MediaSlot>()) }
        })
        .collect();
    // SAFETY: the mapping made above, not used after this.
    unsafe { libc::munmap(base, len) };
    Ok(slots)
}

/// Deletes streams from the running classifier's tables (`[calls]`: the streams of ended
/// calls; a stream that resumes later then starts afresh): its slot is freed, or its
/// `MEDIA` entry removed. One that is gone already is no error.
pub fn forget_media(pins: &Pins, keys: &[MediaKey]) -> Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    let mut media: HashMap<_, MediaKey, MediaStream> =
        HashMap::try_from(open_pinned(pins, MAP_MEDIA)?)?;
    let mut slots: Option<Array<_, MediaSlot>> = if pins.maps().join(MAP_MEDIA_SLOTS).exists() {
        Some(Array::try_from(open_pinned(pins, MAP_MEDIA_SLOTS)?)?)
    } else {
        None
    };
    for k in keys {
        if let Some(slots) = slots.as_mut() {
            let i = media_slot(k);
            if let Some(s) = slots.get(&i, 0).ok().filter(|s| s.key == *k) {
                // A new generation: hints the classifier keeps for the stream no longer
                // match the slot.
                let free = MediaSlot {
                    gen: media_gen_next(s.gen),
                    ..MediaSlot::default()
                };
                slots
                    .set(i, free, 0)
                    .with_context(|| format!("freeing slot {i} of {MAP_MEDIA_SLOTS}"))?;
                continue;
            }
        }
        let _ = media.remove(k);
    }
    Ok(())
}

/// What one BPF_PROG_TEST_RUN of the classifier gave back.
#[derive(Debug, Clone)]
pub struct RunResult {
    /// `skb->priority` as the program left it: the HTB class id.
    pub priority: u32,
    /// The program's return code (`u32::MAX` = TC_ACT_UNSPEC, pass on).
    pub ret: u32,
    /// Mean time per run as measured by the kernel.
    pub duration: std::time::Duration,
    /// The packet after the program (DSCP re-marking shows here).
    pub data: Vec<u8>,
}

/// Runs the (loaded, unattached) classifier on one Ethernet frame through
/// BPF_PROG_TEST_RUN, `repeat` times. `ifindex` selects the direction (the
/// configured WAN or LAN index; it must exist in the caller's namespace).
pub fn test_run(bpf: &mut Ebpf, packet: &[u8], ifindex: u32, repeat: u32) -> Result<RunResult> {
    run_prog(program(bpf)?, packet, ifindex, 0, repeat)
}

/// [`test_run`] of a frame that came in on `ingress_ifindex` (the skb's `skb_iif`:
/// the WAN index for an arrival from the WAN, the LAN index for one from the LAN;
/// [`test_run`]'s frames have 0, as the box's own packets do).
pub fn test_run_from(
    bpf: &mut Ebpf,
    packet: &[u8],
    ifindex: u32,
    ingress_ifindex: u32,
    repeat: u32,
) -> Result<RunResult> {
    run_prog(program(bpf)?, packet, ifindex, ingress_ifindex, repeat)
}

/// The same test run on the object's empty program: the floor of a run's cost.
pub fn test_run_empty(packet: &[u8], repeat: u32) -> Result<RunResult> {
    let mut bpf = EbpfLoader::new()
        .load(OBJECT)
        .context("loading the classifier object")?;
    let prog: &mut SchedClassifier = bpf
        .program_mut(PROG_EMPTY)
        .ok_or_else(|| anyhow!("empty program missing from object"))?
        .try_into()?;
    prog.load()?;
    run_prog(prog, packet, 1, 0, repeat)
}

fn run_prog(
    prog: &mut SchedClassifier,
    packet: &[u8],
    ifindex: u32,
    ingress_ifindex: u32,
    repeat: u32,
) -> Result<RunResult> {
    // struct __sk_buff: priority at offset 32, ingress_ifindex at 36, ifindex at 40.
    let mut ctx_in = [0u8; 192];
    ctx_in[36..40].copy_from_slice(&ingress_ifindex.to_ne_bytes());
    ctx_in[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    let mut ctx_out = [0u8; 192];
    let mut data_out = vec![0u8; packet.len() + 64];
    use aya::programs::TestRun as _;
    let r = prog.test_run(aya::programs::TestRunOptions {
        data_in: Some(packet),
        data_out: Some(&mut data_out),
        ctx_in: Some(&ctx_in),
        ctx_out: Some(&mut ctx_out),
        repeat,
        ..Default::default()
    })?;
    data_out.truncate(r.data_size_out as usize);
    Ok(RunResult {
        priority: u32::from_ne_bytes([ctx_out[32], ctx_out[33], ctx_out[34], ctx_out[35]]),
        ret: r.return_value,
        duration: r.duration,
        data: data_out,
    })
}
