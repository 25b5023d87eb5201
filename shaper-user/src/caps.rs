//! The capabilities `shaper run` keeps once it shapes, and dropping the rest.
//!
//! After the first apply the daemon still needs:
//! - `CAP_NET_ADMIN`: qdiscs, classes, rates and TCX links (reloads, health repairs,
//!   autorate and arrival accounting retune the tree);
//! - `CAP_BPF`, `CAP_PERFMON`: loading the classifier on every apply, its maps and ring,
//!   and the `[calls]` drop tracer (a tracing program reading kernel memory);
//! - `CAP_SYS_ADMIN`: every apply (a SIGHUP reload, a health repair, which the daemon
//!   makes on its own) probes the leaf qdisc kinds in a private network namespace
//!   (`unshare(CLONE_NEWNET)`, see `kernel::tc::probe_qdisc_kinds`) and mounts bpffs on
//!   `/sys/fs/bpf` if it has gone. Without it the probe finds no fq_codel, so a reload
//!   would silently fall back to bfifo leaves (or be refused when the config names
//!   fq_codel or cake): kept;
//! - `CAP_NET_RAW` only with `[autorate]` (its raw ICMP socket).
//!
//! Everything else the process holds (all of root's when it is not started by the
//! systemd unit, which bounds it already) is dropped from the ambient, bounding,
//! inheritable, permitted and effective sets. Dropping from the bounding set needs
//! `CAP_SETPCAP`, which the systemd unit does not grant: there the bounding set stays as
//! the unit set it, which changes nothing for this process (it never executes another
//! program, and the unit sets `NoNewPrivileges=yes`); the permitted set is what counts.
//!
//! Capabilities belong to threads: the drop is made on the daemon's main thread before
//! it starts any other (the metrics thread, blocking-pool threads), and threads inherit
//! their creator's sets.

use std::io;

use caps::errors::CapsError;
use caps::{CapSet, Capability, CapsHashSet};

use crate::config::Policy;

const CAP_SETPCAP: u32 = 8;
const CAP_NET_ADMIN: u32 = 12;
const CAP_NET_RAW: u32 = 13;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Names of capabilities 0..=40, as capabilities(7) spells them.
const NAMES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// A set of capabilities, bit N for capability N.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Caps(pub u64);

impl Caps {
    fn of(caps: &[u32]) -> Caps {
        Caps(caps.iter().fold(0, |m, &c| m | 1 << c))
    }

    pub fn has(self, cap: u32) -> bool {
        self.0 & (1 << cap) != 0
    }

    /// `CAP_A CAP_B ...`, or `none`.
    pub fn names(self) -> String {
        let v: Vec<String> = (0..64)
            .filter(|&c| self.has(c))
            .map(|c| match NAMES.get(c as usize) {
                Some(n) => (*n).to_string(),
                None => format!("cap_{c}"),
            })
            .collect();
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join(" ")
        }
    }
}

/// What `shaper run` needs once it shapes with `policy` (see the module docs).
pub fn needed(policy: &Policy) -> Caps {
    let mut caps = vec![CAP_NET_ADMIN, CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN];
    if policy.autorate.is_some() {
        caps.push(CAP_NET_RAW);
    }
    Caps::of(&caps)
}

/// The calling thread's sets.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sets {
    pub effective: Caps,
    pub permitted: Caps,
    pub inheritable: Caps,
    pub bounding: Caps,
    pub ambient: Caps,
}

impl Sets {
    /// Every capability in any set.
    fn any(&self) -> Caps {
        Caps(
            self.effective.0
                | self.permitted.0
                | self.inheritable.0
                | self.bounding.0
                | self.ambient.0,
        )
    }
}

/// The highest capability this kernel knows.
fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(NAMES.len() as u32 - 1)
        .min(63)
}

/// The `caps` crate's error (a message without the errno) as an I/O error.
fn io_err(e: CapsError) -> io::Error {
    io::Error::other(e)
}

/// The capabilities the `caps` crate knows (capabilities(7) up to this kernel's last),
/// lowest first.
fn known() -> Vec<Capability> {
    let last = last_cap();
    let mut all = sorted(Caps(u64::MAX));
    all.retain(|c| u32::from(c.index()) <= last);
    all
}

fn from_set(set: &CapsHashSet) -> Caps {
    Caps(set.iter().fold(0, |m, c| m | c.bitmask()))
}

fn to_set(c: Caps) -> CapsHashSet {
    caps::all()
        .into_iter()
        .filter(|k| c.has(u32::from(k.index())))
        .collect()
}

/// The capabilities in `c`, lowest first.
fn sorted(c: Caps) -> Vec<Capability> {
    let mut v: Vec<Capability> = to_set(c).into_iter().collect();
    v.sort_by_key(Capability::index);
    v
}

/// The calling thread's capability sets.
pub fn current() -> io::Result<Sets> {
    let read = |set| caps::read(None, set).map(|s| from_set(&s)).map_err(io_err);
    let mut sets = Sets {
        effective: read(CapSet::Effective)?,
        permitted: read(CapSet::Permitted)?,
        inheritable: read(CapSet::Inheritable)?,
        ..Sets::default()
    };
    for cap in known() {
        if caps::has_cap(None, CapSet::Bounding, cap).map_err(io_err)? {
            sets.bounding.0 |= cap.bitmask();
        }
        // Kernels without ambient capabilities (< 4.3) answer EINVAL: none.
        if caps::has_cap(None, CapSet::Ambient, cap).unwrap_or(false) {
            sets.ambient.0 |= cap.bitmask();
        }
    }
    Ok(sets)
}

/// Sets the thread's effective, permitted and inheritable sets, each no larger than it
/// was: the effective set first, as it must stay within the permitted set at every step.
fn capset(effective: Caps, permitted: Caps, inheritable: Caps) -> io::Result<()> {
    for (set, c) in [
        (CapSet::Effective, effective),
        (CapSet::Permitted, permitted),
        (CapSet::Inheritable, inheritable),
    ] {
        caps::set(None, set, &to_set(c)).map_err(io_err)?;
    }
    Ok(())
}

/// What [`keep_only`] did.
#[derive(Debug)]
pub struct Dropped {
    /// Capabilities that were in some set and are now in none the thread can use.
    pub dropped: Caps,
    /// Whether the bounding set could be lowered too (needs `CAP_SETPCAP`).
    pub bounding_lowered: bool,
    /// The sets afterwards.
    pub after: Sets,
}

/// Lowers the calling thread's ambient, bounding (when it has `CAP_SETPCAP`),
/// inheritable, permitted and effective sets to `keep`.
pub fn keep_only(keep: Caps) -> io::Result<Dropped> {
    let before = current()?;
    let unwanted = Caps(before.any().0 & !keep.0);
    for cap in sorted(Caps(before.ambient.0 & !keep.0)) {
        caps::drop(None, CapSet::Ambient, cap).map_err(io_err)?;
    }
    // The bounding set first: it needs CAP_SETPCAP, which goes with the rest below.
    let bounding_lowered = before.effective.has(CAP_SETPCAP);
    if bounding_lowered {
        for cap in sorted(Caps(before.bounding.0 & !keep.0)) {
            caps::drop(None, CapSet::Bounding, cap).map_err(io_err)?;
        }
    }
    capset(
        Caps(before.effective.0 & keep.0),
        Caps(before.permitted.0 & keep.0),
        Caps(before.inheritable.0 & keep.0),
    )?;
    let after = current()?;
    Ok(Dropped {
        dropped: Caps(unwanted.0 & !after.permitted.0 & !after.effective.0),
        bounding_lowered,
        after,
    })
}

/// The `shaper run` hook, after the first apply: drops every capability `policy` does
/// not need (see the module docs) and logs what went. Never fails the daemon.
pub fn drop_unneeded(policy: &Policy) {
    let keep = needed(policy);
    match keep_only(keep) {
        Ok(d) if d.dropped == Caps::default() => {
            log::info!(
                "capabilities: nothing to drop (holding {})",
                d.after.permitted.names()
            );
        }
        Ok(d) => {
            log::info!(
                "capabilities: dropped {}; keeping {}{}",
                d.dropped.names(),
                d.after.permitted.names(),
                if d.bounding_lowered {
                    ""
                } else {
                    " (bounding set left as started: no CAP_SETPCAP)"
                }
            );
            if !keep.has(CAP_NET_RAW) && d.dropped.has(CAP_NET_RAW) {
                log::info!(
                    "capabilities: CAP_NET_RAW is gone with [autorate] off; a reload that turns autorate on needs a restart"
                );
            }
        }
        Err(e) => log::error!("capabilities: dropping the unneeded ones failed: {e}"),
    }
}

/// Warns when `policy` (a reload) needs a capability this process dropped at start.
pub fn warn_if_missing(policy: &Policy) {
    let Ok(sets) = current() else {
        return;
    };
    if policy.autorate.is_some() && !sets.effective.has(CAP_NET_RAW) {
        log::warn!(
            "[autorate] needs CAP_NET_RAW, dropped at start (the config then had no [autorate]): restart shaper to start autorate"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_sets() {
        assert_eq!(Caps::default().names(), "none");
        assert_eq!(
            Caps::of(&[CAP_NET_RAW, CAP_BPF]).names(),
            "CAP_NET_RAW CAP_BPF"
        );
        assert_eq!(NAMES[CAP_SETPCAP as usize], "CAP_SETPCAP");
        assert_eq!(NAMES[CAP_NET_ADMIN as usize], "CAP_NET_ADMIN");
        assert_eq!(NAMES[CAP_SYS_ADMIN as usize], "CAP_SYS_ADMIN");
        assert_eq!(NAMES[CAP_PERFMON as usize], "CAP_PERFMON");
        assert_eq!(NAMES[40], "CAP_CHECKPOINT_RESTORE");
    }

    #[test]
    fn cap_net_raw_only_with_autorate() {
        let text = "[interfaces]\nwan = \"wan0\"\nlan = \"lan0\"\n[upload]\nrate = \"10mbit\"\n[download]\nrate = \"40mbit\"\n\
                    [[class]]\nname = \"video\"\npriority = 0\nguaranteed = \"25%\"\n\
                    [[class]]\nname = \"default\"\npriority = 4\nguaranteed = \"20%\"\ndefault = true\n";
        let path = std::path::Path::new("site.toml");
        let without = crate::config::parse(path, text).expect("config");
        let with = crate::config::parse(
            path,
            &format!("{text}[autorate]\nreflectors = [\"192.0.2.1\"]\nclass = \"video\"\n"),
        )
        .expect("config with autorate");
        let base = Caps::of(&[CAP_NET_ADMIN, CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN]);
        assert_eq!(needed(&without), base);
        assert_eq!(needed(&with), Caps(base.0 | 1 << CAP_NET_RAW));
    }

    /// Capabilities are per thread: dropping on a thread of its own leaves the test
    /// process alone.
    #[test]
    fn keep_only_lowers_every_set_of_the_thread() {
        let r = std::thread::spawn(|| {
            let before = current().expect("capget");
            let raw_before = raw_socket_allowed();
            let d = keep_only(Caps::of(&[CAP_NET_ADMIN])).expect("drop");
            (before, raw_before, d, raw_socket_allowed())
        })
        .join()
        .expect("thread");
        let (before, raw_before, d, raw_after) = r;
        let keep = Caps::of(&[CAP_NET_ADMIN]);
        assert_eq!(d.after.effective.0 & !keep.0, 0, "{d:?}");
        assert_eq!(d.after.permitted.0 & !keep.0, 0, "{d:?}");
        assert_eq!(d.after.inheritable.0 & !keep.0, 0, "{d:?}");
        assert_eq!(d.after.ambient.0 & !keep.0, 0, "{d:?}");
        if before.effective.has(CAP_SETPCAP) {
            assert!(d.bounding_lowered);
            assert_eq!(d.after.bounding, Caps(before.bounding.0 & keep.0), "{d:?}");
        }
        if before.effective.has(CAP_NET_RAW) {
            assert!(d.dropped.has(CAP_NET_RAW), "{d:?}");
            assert!(raw_before, "a raw socket with CAP_NET_RAW");
            assert!(!raw_after, "no raw socket without CAP_NET_RAW");
        }
        // This thread kept what it had.
        assert_eq!(current().expect("capget").effective, before.effective);
    }

    fn raw_socket_allowed() -> bool {
        use nix::sys::socket::{socket, AddressFamily, SockFlag, SockProtocol, SockType};
        // Closed at once (the OwnedFd is dropped).
        socket(
            AddressFamily::Inet,
            SockType::Raw,
            SockFlag::empty(),
            SockProtocol::Icmp,
        )
        .is_ok()
    }
}
