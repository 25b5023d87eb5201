//! The other commands: `shaper upgrade --mark-good` (the running trial image becomes good),
//! `shaper upgrade --healthy` (the check boot-assess waits for) and `shaper version` (the
//! running image and the images on the boot disk, in boot order).

use anyhow::{anyhow, bail, Context as _, Result};
use std::fs;

use super::efi::{find_nocase, loader_path, loader_var, read_os_release, running_file, writable};
use super::order::{entries, parse_counter};
use super::uki::{os_id, os_version};
use super::{Device, UKI_DIR};
use crate::persist::sync_dir;

/// `shaper upgrade --mark-good`: the running trial image becomes good (bless-boot's rename).
/// Returns what was done, in words.
pub fn mark_good(b: &Device) -> Result<String> {
    let Some(var) = loader_var(&b.efivars, "LoaderBootCountPath") else {
        return Ok("not a counted boot: nothing to mark".into());
    };
    let rel = loader_path(&var);
    let (folder, name) = rel.rsplit_once('/').unwrap_or(("", rel.as_str()));
    let c = parse_counter(name)
        .ok_or_else(|| anyhow!("LoaderBootCountPath {var} has no boot counter"))?;
    let dir = b.esp.join(folder);
    let good = c.good_name();
    if find_nocase(&dir, &good).is_some() {
        return Ok(format!("{folder}/{good} is marked good already"));
    }
    let Some(now) = find_nocase(&dir, name) else {
        bail!("{rel} is not on {}", b.esp.display());
    };
    let _rw = writable(b)?;
    fs::rename(dir.join(&now), dir.join(&good))
        .with_context(|| format!("renaming {folder}/{now} to {good}"))?;
    sync_dir(&dir)?;
    Ok(format!("marked good: {folder}/{now} -> {good}"))
}

/// `shaper upgrade --healthy`: the daemon runs and shapes with the site's config (the
/// boot disk's shaper/shaper.toml when there is one).
pub fn healthy(b: &Device, paths: &crate::apply::Paths) -> Result<()> {
    let daemon = fs::read_dir("/proc")?
        .filter_map(|e| e.ok())
        .filter_map(|e| fs::read(e.path().join("cmdline")).ok())
        .any(|c| {
            let args: Vec<&[u8]> = c.split(|&x| x == 0).collect();
            args.len() >= 2 && args[0].ends_with(b"shaper") && args[1] == b"run".as_slice()
        });
    if !daemon {
        bail!("the shaper daemon is not running");
    }
    let state = crate::apply::State::load(paths)?.ok_or_else(|| anyhow!("nothing is applied"))?;
    let site = b.esp.join("shaper/shaper.toml");
    if let Ok(text) = fs::read_to_string(&site) {
        if text != state.config_text {
            bail!("the applied config is not the site's {}", site.display());
        }
    }
    Ok(())
}

/// `shaper version`.
pub fn version_report(b: &Device) -> String {
    let mut out = String::new();
    let os = read_os_release(&b.os_release).unwrap_or_default();
    let running = running_file(b);
    out.push_str(&format!(
        "running: {} {} (shaper {}){}\n",
        os_id(&os).unwrap_or("?"),
        os_version(&os).unwrap_or("?"),
        env!("CARGO_PKG_VERSION"),
        running
            .as_deref()
            .map_or_else(String::new, |r| format!(", from {UKI_DIR}/{r}"))
    ));
    if let Some(p) = loader_var(&b.efivars, "LoaderBootCountPath") {
        let p = loader_path(&p);
        let good = parse_counter(p.rsplit('/').next().unwrap_or_default()).map(|c| c.good_name());
        let marked = good.is_some_and(|g| find_nocase(&b.esp.join(UKI_DIR), &g).is_some());
        out.push_str(&if marked {
            "  a trial boot, marked good since\n".to_string()
        } else {
            format!("  on trial ({p}): marked good once shaping has held, else the box reboots and the boot loader counts a failed try\n")
        });
    }
    match entries(&b.esp) {
        Ok(list) => {
            out.push_str(&format!(
                "installed ({} on the boot disk, in boot order):\n",
                b.esp.join(UKI_DIR).display()
            ));
            for e in &list {
                let state = match e.counter {
                    None => "good".to_string(),
                    Some((0, d)) => format!("failed: no tries left after {d} boots"),
                    Some((l, 0)) => format!("new: {l} tries left"),
                    Some((l, d)) => format!("on trial: {l} tries left, {d} done"),
                };
                let mark = if running
                    .as_deref()
                    .is_some_and(|r| r.eq_ignore_ascii_case(&e.file))
                {
                    " (running)"
                } else {
                    ""
                };
                out.push_str(&format!(
                    "  {:<36} {:<12} {state}{mark}\n",
                    e.file,
                    e.version.as_deref().unwrap_or("?")
                ));
            }
            match list.first() {
                Some(e) => out.push_str(&format!(
                    "boots next: {} {}\n",
                    e.file,
                    e.version.as_deref().unwrap_or("?")
                )),
                None => out.push_str("boots next: nothing in EFI/Linux\n"),
            }
            if loader_var(&b.efivars, "LoaderEntryOneShot").is_some()
                || loader_var(&b.efivars, "LoaderEntryDefault").is_some()
            {
                out.push_str("  (an EFI variable LoaderEntryOneShot/LoaderEntryDefault may choose another)\n");
            }
        }
        Err(e) => out.push_str(&format!(
            "installed: unknown ({e:#}; the boot disk is not mounted at {})\n",
            b.esp.display()
        )),
    }
    out
}
