//! The box: systemd's loader-interface EFI variables, which image in EFI/Linux is running,
//! the running image's os-release, and the EFI partition remounted read-write for a write.

use anyhow::{Context as _, Result};
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use super::order::parse_counter;
use super::uki::parse_os_release;
use super::{Device, LOADER_GUID, UKI_DIR};
use crate::persist::Writable;

/// An EFI variable of systemd's loader interface as text (UTF-16LE after 4 attribute
/// bytes), None when it is not set.
pub fn loader_var(efivars: &Path, name: &str) -> Option<String> {
    let b = fs::read(efivars.join(format!("{name}-{LOADER_GUID}"))).ok()?;
    let data = b.get(4..)?;
    let units: Vec<u16> = data
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    let s = String::from_utf16_lossy(&units);
    Some(s.trim_end_matches('\0').to_string())
}

/// `\EFI\Linux\x+2-1.efi` -> `EFI/Linux/x+2-1.efi`.
pub fn loader_path(var: &str) -> String {
    var.replace('\\', "/").trim_start_matches('/').to_string()
}

/// A name in `dir` that equals `name` but for case (FAT ignores case; the loader's entry id
/// is lowercased).
pub(super) fn find_nocase(dir: &Path, name: &str) -> Option<String> {
    fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.eq_ignore_ascii_case(name))
}

/// The running image's file in EFI/Linux (as it is named now), if known.
pub fn running_file(b: &Device) -> Option<String> {
    let dir = b.esp.join(UKI_DIR);
    if let Some(p) = loader_var(&b.efivars, "LoaderBootCountPath") {
        let p = loader_path(&p);
        let name = p.rsplit('/').next().unwrap_or_default();
        if let Some(n) = find_nocase(&dir, name) {
            return Some(n);
        }
        // Marked good since it booted.
        return parse_counter(name).and_then(|c| find_nocase(&dir, &c.good_name()));
    }
    let sel = loader_var(&b.efivars, "LoaderEntrySelected")?;
    find_nocase(&dir, &sel)
}

pub(super) fn read_os_release(path: &Path) -> Result<BTreeMap<String, String>> {
    Ok(parse_os_release(
        &fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
    ))
}

/// The EFI partition remounted read-write until the guard drops (none where the device
/// is a plain folder, as in tests).
pub(super) fn writable(b: &Device) -> Result<Option<Writable>> {
    if b.remount {
        Writable::remount(&b.esp).map(Some)
    } else {
        Ok(None)
    }
}
