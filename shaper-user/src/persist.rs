//! On the box, a confirmed config survives a reboot: it is written to the boot disk's site
//! folder (`shaper/shaper.toml` on the EFI partition, read by the boot script) and to the
//! copy the daemon runs from. Atomically: written beside as `shaper.toml.new`, synced,
//! renamed over the old file and the folder synced, so a power cut at any moment leaves the
//! old file or the new one, never half of one.
//!
//! The box's boot script says where, in `<run>/persist.json`; elsewhere (a lab, a Debian
//! gateway with its own config management) the file is absent and nothing is written.
//! Unconfirmed applies (`--confirm-within`) are not written: a reboot before `shaper
//! confirm` comes back with the last confirmed config, as a rollback would.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use nix::mount::MsFlags;
use serde::Deserialize;

use crate::apply::Paths;
use crate::rundir;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// The site folder on the boot disk (`/boot/efi/shaper`).
    pub dir: PathBuf,
    /// Where the boot disk is mounted read-only: remounted read-write for the write.
    #[serde(default)]
    pub mount: Option<PathBuf>,
    /// The daemon's own copy (`/etc/shaper/shaper.toml`), replaced too, so a restarted
    /// daemon runs what was confirmed.
    #[serde(default)]
    pub copy: Option<PathBuf>,
}

/// The file name in the site folder.
pub const FILE: &str = "shaper.toml";

pub fn target(paths: &Paths) -> Result<Option<Target>> {
    let p = paths.files().persist();
    match fs::read(&p) {
        Ok(b) => Ok(Some(
            serde_json::from_slice(&b).with_context(|| format!("reading {}", p.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

/// Writes `text` as the confirmed config where the box keeps it; the path written, or None
/// where the box does not keep configs.
pub fn save(paths: &Paths, text: &str) -> Result<Option<PathBuf>> {
    let Some(t) = target(paths)? else {
        return Ok(None);
    };
    let dest = t.dir.join(FILE);
    {
        let _rw = match &t.mount {
            Some(m) => Some(Writable::remount(m)?),
            None => None,
        };
        replace(&dest, text.as_bytes())?;
    }
    if let Some(c) = &t.copy {
        replace(c, text.as_bytes())?;
    }
    Ok(Some(dest))
}

/// Replaces `dest` by `bytes` ([`rundir::replace`]: beside, synced, renamed, folder
/// synced), then syncs the folder's file system: the boot disk is FAT, whose metadata a
/// folder fsync alone may leave in the cache.
pub fn replace(dest: &Path, bytes: &[u8]) -> Result<()> {
    rundir::replace(dest, bytes)?;
    match dest.parent() {
        Some(d) if !d.as_os_str().is_empty() => syncfs(d),
        _ => syncfs(Path::new(".")),
    }
}

/// fsync on a folder, then syncfs on its file system.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    rundir::sync_folder(dir)?;
    syncfs(dir)
}

fn syncfs(dir: &Path) -> Result<()> {
    let d = fs::File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
    nix::unistd::syncfs(&d)
        .map_err(std::io::Error::from)
        .context("syncfs")
}

/// The boot disk remounted read-write; read-only again when dropped.
pub(crate) struct Writable {
    mount: PathBuf,
}

/// The flags the boot script mounts the EFI partition with.
const FLAGS: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

fn remount(mount: &Path, flags: MsFlags) -> std::io::Result<()> {
    // No source, type or data: a remount keeps them.
    nix::mount::mount(
        None::<&Path>,
        mount,
        None::<&Path>,
        MsFlags::MS_REMOUNT | flags,
        None::<&Path>,
    )
    .map_err(std::io::Error::from)
}

impl Writable {
    pub(crate) fn remount(mount: &Path) -> Result<Writable> {
        remount(mount, FLAGS)
            .with_context(|| format!("remounting {} read-write", mount.display()))?;
        Ok(Writable {
            mount: mount.to_path_buf(),
        })
    }
}

impl Drop for Writable {
    fn drop(&mut self) {
        if let Err(e) = remount(&self.mount, FLAGS | MsFlags::MS_RDONLY) {
            log::warn!("{} stays read-write: {e}", self.mount.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_confirmed_config_replaces_both_copies_and_leaves_no_temporary() {
        let root = std::env::temp_dir().join(format!("shaper-persist-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let run = root.join("run");
        fs::create_dir_all(&run).unwrap();
        let paths = Paths {
            pins: crate::kernel::bpf::Pins::new(root.join("bpffs")),
            run: run.clone(),
        };
        assert_eq!(save(&paths, "x").unwrap(), None, "not a box: nothing kept");
        fs::write(
            run.join("persist.json"),
            serde_json::json!({
                "dir": root.join("esp/shaper"),
                "copy": root.join("etc/shaper.toml"),
            })
            .to_string(),
        )
        .unwrap();
        fs::create_dir_all(root.join("esp/shaper")).unwrap();
        fs::write(root.join("esp/shaper/shaper.toml"), "old").unwrap();
        let written = save(&paths, "new text").unwrap();
        assert_eq!(written, Some(root.join("esp/shaper/shaper.toml")));
        assert_eq!(
            fs::read_to_string(root.join("esp/shaper/shaper.toml")).unwrap(),
            "new text"
        );
        assert_eq!(
            fs::read_to_string(root.join("etc/shaper.toml")).unwrap(),
            "new text"
        );
        let left: Vec<_> = fs::read_dir(root.join("esp/shaper"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("shaper.toml")]);
        fs::remove_dir_all(&root).unwrap();
    }
}
