//! `shaper upgrade FILE`: checks a signed upgrade file against the running image, clears
//! EFI/Linux of everything but the running image, writes the new image under a temporary
//! name, reads it back from the disk, and renames it into place with its boot counter.

use anyhow::{anyhow, bail, Context as _, Result};
use sha2::{Digest as _, Sha256};
use std::cmp::Ordering;
use std::fs;
use std::io::{Read as _, Write as _};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::io::AsRawFd as _;
use std::path::Path;

use super::efi::{find_nocase, loader_path, loader_var, read_os_release, running_file, writable};
use super::order::{parse_counter, vercmp};
use super::signed::{read_key, verify};
use super::uki::{os_id, os_version, uki_os_release};
use super::{Device, TMP_NAME, TRIES, UKI_DIR};
use crate::persist::sync_dir;

/// What `install` did.
#[derive(Debug)]
pub struct Installed {
    pub file: String,
    pub version: String,
    pub removed: Vec<String>,
}

/// `shaper upgrade FILE`: everything is checked before anything is written.
pub fn install(b: &Device, file: &Path) -> Result<Installed> {
    let bytes = fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let key = read_key(&b.key)?;
    let (m, image) = verify(&bytes, &key).context("refused")?;
    let os = uki_os_release(image).context("refused")?;
    let running_os = read_os_release(&b.os_release)?;
    let my_id = os_id(&running_os).ok_or_else(|| anyhow!("the running image has no IMAGE_ID"))?;
    let my_version = os_version(&running_os).unwrap_or("");
    if m.image_id != my_id || os_id(&os) != Some(my_id) {
        bail!(
            "refused: an image of `{}` (its .osrel says `{}`), this box runs `{my_id}`",
            m.image_id,
            os_id(&os).unwrap_or("none")
        );
    }
    if os_version(&os) != Some(m.version.as_str()) {
        bail!(
            "refused: the manifest says version {}, the image's .osrel {}",
            m.version,
            os_version(&os).unwrap_or("none")
        );
    }
    if vercmp(&m.version, my_version) != Ordering::Greater {
        bail!(
            "refused: version {} is not newer than the running {my_version}",
            m.version
        );
    }
    let dir = b.esp.join(UKI_DIR);
    if !dir.is_dir() {
        bail!(
            "{} is missing: the boot disk is not mounted there, or this box does not boot through systemd-boot (an image from before A/B upgrades: reflash it)",
            dir.display()
        );
    }
    if let Some(p) = loader_var(&b.efivars, "LoaderBootCountPath") {
        let p = loader_path(&p);
        let good = parse_counter(p.rsplit('/').next().unwrap_or_default())
            .map(|c| c.good_name())
            .unwrap_or_default();
        if find_nocase(&dir, &good).is_none() {
            bail!(
                "the running image ({p}) is on trial and not marked good yet: the image it would fall back to must stay; try again once it is (`shaper version`)"
            );
        }
    }
    let running = running_file(b);
    let Some(running) = running else {
        bail!(
            "cannot tell which image in {} is running (no LoaderEntrySelected): nothing written",
            dir.display()
        );
    };
    let target = format!("{my_id}-{}+{TRIES}.efi", m.version);

    // Space: what is there besides the running image goes first.
    let mut doomed = Vec::new();
    for e in fs::read_dir(&dir)? {
        let n = e?.file_name().to_string_lossy().into_owned();
        if !n.eq_ignore_ascii_case(&running) {
            doomed.push(n);
        }
    }
    doomed.sort();
    let freed: u64 = doomed
        .iter()
        .filter_map(|n| fs::metadata(dir.join(n)).ok())
        .map(|m| m.len())
        .sum();
    let free = free_bytes(&dir)?;
    if free + freed < m.size + (1 << 20) {
        bail!(
            "the EFI partition has {} MiB free (with the other images gone), the image needs {} MiB",
            (free + freed) >> 20,
            (m.size >> 20) + 1
        );
    }

    let _rw = writable(b)?;
    for n in &doomed {
        println!("shaper: upgrade: removing {UKI_DIR}/{n} (not the running image)");
        fs::remove_file(dir.join(n)).with_context(|| format!("removing {n}"))?;
    }
    if !doomed.is_empty() {
        sync_dir(&dir)?;
    }
    let tmp = dir.join(TMP_NAME);
    println!(
        "shaper: upgrade: writing {} bytes to {UKI_DIR}/{TMP_NAME}",
        image.len()
    );
    let _ = std::io::stdout().flush();
    {
        let mut f =
            fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        for chunk in image.chunks(1 << 20) {
            f.write_all(chunk)?;
        }
        f.sync_all().context("syncing the new image")?;
        // Drop it from the page cache so the read-back comes from the disk.
        // SAFETY: a valid, open file descriptor.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
    println!("shaper: upgrade: written and synced; reading it back");
    let mut f = fs::File::open(&tmp)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    let back: [u8; 32] = h.finalize().into();
    if n != m.size || back != m.sha256 {
        let _ = fs::remove_file(&tmp);
        bail!(
            "the image read back from the EFI partition differs from the signed one: not installed"
        );
    }
    fs::rename(&tmp, dir.join(&target)).context("renaming the new image into place")?;
    sync_dir(&dir)?;
    println!("shaper: upgrade: installed {UKI_DIR}/{target} ({TRIES} tries); it boots at the next reboot");
    Ok(Installed {
        file: target,
        version: m.version,
        removed: doomed,
    })
}

fn free_bytes(dir: &Path) -> Result<u64> {
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: zeroed statvfs is a valid out-parameter; c is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error()).context("statvfs");
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}
