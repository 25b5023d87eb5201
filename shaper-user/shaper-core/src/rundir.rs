//! The run directory (`/run/shaper`, or `SHAPER_RUN`): every file shaper keeps there, by
//! name and format, in one place. The modules that own a file's contents (apply: the
//! state and the lock; confirm: the pending confirmation and the rollback config;
//! persist: where confirmed configs are kept; the daemon: its own lock; the host-name
//! engine: the learned names; status: the last crash) take its path from here, and the
//! JSON files that shaper both writes and reads carry a `version` checked on every read
//! ([`read_versioned`]): a file of another format is an error that names the file and the
//! version it has, never a half-understood value.
//!
//! | file | written by | format |
//! |---|---|---|
//! | `state.json` (`.next` while staged, `.bad` when unreadable) | apply, remove | JSON, [`STATE_VERSION`] |
//! | `lock` | every command that changes the shaping (flock) | empty |
//! | `daemon.lock` | `shaper run` (flock: one daemon) | its pid |
//! | `pending.json` | `apply --confirm-within` | JSON, [`PENDING_VERSION`] |
//! | `rollback.toml` | `apply --confirm-within` | the last confirmed config's text |
//! | `persist.json` | the image's boot script | JSON: where confirmed configs are kept |
//! | `hosts.json` | `shaper run` (host rules only) | JSON, [`HOSTS_VERSION`] |
//! | `last-crash` | the image's boot script | `key=value` lines |
//! | `calls.json` | `shaper run` (`[calls]`) | JSON, the calls in progress (`calls_task::CALLS_VERSION`) |
//! | `calls.jsonl` (`.1`: the one before) | `shaper run` | one JSON call record per line |
//! | `calls.key` | `shaper run` | 32 random bytes: this boot's pseudonym key (0600) |
//! | `line.jsonl` | `shaper run` (`[calls]`) | one JSON line per hour: the line full / held down |

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// `state.json`'s format. 2: the config text instead of a serialized policy and plan
/// (compiled from the text again when read), directions as `up`/`down`.
pub const STATE_VERSION: u32 = 2;
/// `pending.json`'s format.
pub const PENDING_VERSION: u32 = 1;
/// `hosts.json`'s format.
pub const HOSTS_VERSION: u32 = 1;

/// The files of one run directory.
#[derive(Debug, Clone, Copy)]
pub struct RunDir<'a>(pub &'a Path);

impl RunDir<'_> {
    pub fn state(&self) -> PathBuf {
        self.0.join("state.json")
    }
    /// The state written beside the current one before the classifier swap.
    pub fn state_next(&self) -> PathBuf {
        self.0.join("state.json.next")
    }
    /// Where an unreadable state file is moved aside.
    pub fn state_bad(&self) -> PathBuf {
        self.0.join("state.json.bad")
    }
    pub fn lock(&self) -> PathBuf {
        self.0.join("lock")
    }
    pub fn daemon_lock(&self) -> PathBuf {
        self.0.join("daemon.lock")
    }
    pub fn pending(&self) -> PathBuf {
        self.0.join("pending.json")
    }
    pub fn rollback(&self) -> PathBuf {
        self.0.join("rollback.toml")
    }
    pub fn persist(&self) -> PathBuf {
        self.0.join("persist.json")
    }
    pub fn hosts(&self) -> PathBuf {
        self.0.join("hosts.json")
    }
    pub fn last_crash(&self) -> PathBuf {
        self.0.join("last-crash")
    }
    pub fn calls(&self) -> PathBuf {
        self.0.join("calls.json")
    }
    pub fn calls_log(&self) -> PathBuf {
        self.0.join("calls.jsonl")
    }
    pub fn calls_log_old(&self) -> PathBuf {
        self.0.join("calls.jsonl.1")
    }
    pub fn line_log(&self) -> PathBuf {
        self.0.join("line.jsonl")
    }
    pub fn calls_key(&self) -> PathBuf {
        self.0.join("calls.key")
    }
}

/// Reads a JSON file that carries `"version": want`: None when it does not exist; an
/// error naming the file when it cannot be read, is of another version, or does not
/// parse.
pub fn read_versioned<T: DeserializeOwned>(path: &Path, want: u32) -> Result<Option<T>> {
    let b = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(anyhow!("reading {}: {e}", path.display())),
    };
    // The version first, so a file of another format says so rather than failing on a
    // field.
    #[derive(Deserialize)]
    struct Version {
        version: Option<u32>,
    }
    let v: Version =
        serde_json::from_slice(&b).with_context(|| format!("reading {}", path.display()))?;
    match v.version {
        Some(v) if v == want => {}
        Some(v) => bail!(
            "{} was written by another version of shaper (format version {v}, this one reads {want})",
            path.display()
        ),
        None => bail!(
            "{} was written by another version of shaper (no format version; this one reads {want})",
            path.display()
        ),
    }
    serde_json::from_slice(&b)
        .map(Some)
        .with_context(|| format!("reading {}", path.display()))
}

/// Writes `bytes` to `path` (created or truncated, its folder created if missing) and
/// syncs the file; for a file renamed into place later ([`replace`] does both).
pub fn stage(path: &Path, bytes: &[u8]) -> Result<()> {
    let write = || -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let mut f = fs::File::create(path)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    write().with_context(|| format!("writing {}", path.display()))
}

/// Replaces `dest` by `bytes`, the one way shaper replaces a file it keeps: written beside
/// it as `<name>.new` and synced ([`stage`]), renamed over it, and the folder synced, so a
/// reader or a power cut sees the old file or the new one, never half of one. (The boot
/// disk's site folder adds a `syncfs` on top: `persist::replace`.)
pub fn replace(dest: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match dest.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".new");
    let tmp = dir.join(name);
    stage(&tmp, bytes)?;
    fs::rename(&tmp, dest)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
    sync_folder(dir)
}

/// fsync on a folder, so a rename in it is on the disk.
pub fn sync_folder(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

/// Writes `value` as pretty JSON to `path` ([`replace`]).
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    replace(path, &to_json(path, value)?)
}

/// Writes `value` as pretty JSON to `path` and syncs it ([`stage`]); for a file renamed
/// into place later.
pub fn stage_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    stage(path, &to_json(path, value)?)
}

fn to_json<T: Serialize>(path: &Path, value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(value).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct F {
        version: u32,
        x: u8,
    }

    #[test]
    fn versioned_files_round_trip_and_refuse_other_versions() {
        let dir = std::env::temp_dir().join(format!("shaper-rundir-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let run = RunDir(&dir);
        let p = run.pending();
        assert_eq!(read_versioned::<F>(&p, 1).expect("absent"), None);
        write_json(&p, &F { version: 1, x: 7 }).expect("write");
        assert_eq!(
            read_versioned::<F>(&p, 1).expect("reads"),
            Some(F { version: 1, x: 7 })
        );
        assert!(
            !dir.join("pending.json.next").exists(),
            "renamed into place"
        );
        let e = read_versioned::<F>(&p, 2).expect_err("other version");
        assert!(format!("{e:#}").contains("format version 1"), "{e:#}");
        fs::write(&p, br#"{"x": 7}"#).expect("write");
        let e = read_versioned::<F>(&p, 1).expect_err("no version");
        assert!(format!("{e:#}").contains("no format version"), "{e:#}");
        fs::write(&p, b"{ not json").expect("write");
        let e = read_versioned::<F>(&p, 1).expect_err("not JSON");
        assert!(format!("{e:#}").contains("pending.json"), "{e:#}");
        fs::remove_dir_all(&dir).expect("clean up");
    }
}
