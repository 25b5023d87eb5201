//! The box as a site keeps it: configuration that survives a reboot. Boots the flashable
//! disk under OVMF ([`crate::crash::BootedBox`]), applies configs on its console as an admin
//! would, reboots it, and reads what it shapes with afterwards and what its boot disk holds.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use crate::crash::{read_console, shaping_at, wait_for, BootedBox, SITE_SHAPER_TOML};
use crate::vm::{mtools, tail};

/// What the persistence run saw.
#[derive(Debug)]
pub struct Persistence {
    /// The first line of the config the box shaped with after each reboot.
    pub after_confirmed_reboot: String,
    pub after_unconfirmed_reboot: String,
    /// shaper/shaper.toml on the EFI partition at the end.
    pub on_disk: String,
    /// Files left in shaper/ on the EFI partition (no `.new` leftovers).
    pub site_folder: Vec<String>,
}

/// A config that differs from [`SITE_SHAPER_TOML`] by its first line and its upload rate.
fn variant(tag: &str, up: &str) -> String {
    format!(
        "# persistence test: config {tag}\n{}",
        SITE_SHAPER_TOML.replace("rate = \"850kbit\"", &format!("rate = \"{up}\""))
    )
}

/// Boot 1 (site config A): `apply --confirm-within 600s B` then `confirm`, reboot. Boot 2
/// must shape with B; there `apply --confirm-within 600s C` and reboot before confirming.
/// Boot 3 must shape with B again (C was never confirmed).
pub fn persistence(disk_image: &Path, workdir: &Path) -> Result<Persistence> {
    let b_text = variant("B", "700kbit");
    let c_text = variant("C", "600kbit");
    let (b2, c2) = (b_text.clone(), c_text.clone());
    let mut b = BootedBox::start(disk_image, workdir, 0x03, move |disk| {
        for (name, text) in [
            ("shaper.toml", SITE_SHAPER_TOML.to_string()),
            ("test-b.toml", b2),
            ("test-c.toml", c2),
        ] {
            let f = disk.with_file_name(name);
            std::fs::write(&f, text)?;
            mtools(
                "mcopy",
                disk,
                &["-o", &f.display().to_string(), &format!("::/shaper/{name}")],
            )
            .with_context(|| format!("writing {name} into the EFI partition"))?;
        }
        Ok(())
    })?;
    let boot_timeout = Duration::from_secs(300);
    let mut from = 0;
    let shaping_with = |b: &mut BootedBox, from: &mut usize| -> Result<String> {
        let ((_, end), _) = wait_for(
            &mut b.qemu,
            &b.console,
            "the box to shape",
            boot_timeout,
            *from,
            shaping_at,
        )?;
        *from += end;
        // Markers are split on the command line so the echoed command does not match.
        run(
            b,
            from,
            "head -n 1 /etc/shaper/shaper.toml; shaper status --interval 0 | head -n 1",
            "first",
        )
    };
    let first = shaping_with(&mut b, &mut from)?;
    if first.contains("config B") || first.contains("config C") {
        bail!("the first boot already had a test config: {first}");
    }
    run(
        &mut b,
        &mut from,
        "shaper apply --confirm-within 600s /boot/efi/shaper/test-b.toml && shaper confirm",
        "b-confirmed",
    )?;
    reboot(&mut b, &mut from)?;
    let after_confirmed_reboot = shaping_with(&mut b, &mut from)?;
    run(
        &mut b,
        &mut from,
        "shaper apply --confirm-within 600s /boot/efi/shaper/test-c.toml",
        "c-unconfirmed",
    )?;
    reboot(&mut b, &mut from)?;
    let after_unconfirmed_reboot = shaping_with(&mut b, &mut from)?;
    let disk = b.disk.clone();
    drop(b);
    let on_disk = mtools("mtype", &disk, &["::/shaper/shaper.toml"])?;
    let site_folder = mtools("mdir", &disk, &["-b", "::/shaper"])?
        .lines()
        .map(|l| l.trim().trim_start_matches("::/shaper/").to_string())
        .filter(|l| !l.is_empty())
        .collect();
    Ok(Persistence {
        after_confirmed_reboot,
        after_unconfirmed_reboot,
        on_disk,
        site_folder,
    })
}

/// Types `cmd` on the console and waits for it to finish; its output.
fn run(b: &mut BootedBox, from: &mut usize, cmd: &str, marker: &str) -> Result<String> {
    let (head, tail_) = marker.split_at(marker.len() / 2);
    b.term.type_line("")?;
    b.term
        .type_line(&format!("{cmd}; echo \"rc=$? {head}\"\"{tail_}\""))?;
    let start = *from;
    let done = format!(" {marker}\n");
    let (out, _) = wait_for(
        &mut b.qemu,
        &b.console,
        &format!("`{cmd}` on the console"),
        Duration::from_secs(60),
        start,
        |t| {
            let i = t.find(&done)?;
            Some((t[..i].to_string(), i + done.len()))
        },
    )?;
    *from = start + out.1;
    let text = out.0;
    if !text.trim_end().ends_with("rc=0") {
        bail!("`{cmd}` failed on the box:\n{}", tail(&text, 15));
    }
    Ok(text)
}

fn reboot(b: &mut BootedBox, from: &mut usize) -> Result<()> {
    b.term.type_line("reboot")?;
    // The next boot's console starts after what is there now.
    *from = read_console(&b.console).len();
    Ok(())
}

impl Persistence {
    /// Whether the box came back with what was confirmed, both times.
    pub fn ok(&self, b_first_line: &str) -> bool {
        self.after_confirmed_reboot.contains(b_first_line)
            && self.after_unconfirmed_reboot.contains(b_first_line)
            && self.on_disk.starts_with(b_first_line)
            && !self.site_folder.iter().any(|f| f.ends_with(".new"))
    }
}

/// The first line of config B (what both reboots must come back with).
pub const B_FIRST_LINE: &str = "# persistence test: config B";
