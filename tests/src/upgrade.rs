//! A/B upgrades on the flashable disk under OVMF (issue 13, part 4): one VM session with a
//! persistent disk and variable store, the upgrade files on a second virtio disk (FAT):
//!
//! 1. refused: an unsigned image (the bare UKI) and a tampered one (one bit of the image
//!    flipped) are refused, and the boot disk's EFI/Linux is as it was;
//! 2. interrupted: `shaper upgrade` of a good image with qemu killed as soon as it says it
//!    is writing; the next start boots the old image, which shapes;
//! 3. good: the good image installed, the box rebooted: it boots the new version with the
//!    site's config, marks itself good (the counter gone from its file name);
//! 4. fallback: an image whose shaper cannot start installed on top, the box rebooted and
//!    left alone: it reboots itself after each failed try, and after its tries the boot
//!    loader boots the previous (good) image again. The time from `reboot` to shaping again
//!    on the previous image is measured.
//!
//! The images are built by xtask (`upgrade_images`): the same code, version V (the disk),
//! V.1 (good) and V.2 (broken shaper), all trusting a test key made under target/, the two
//! upgrades signed with it, with the boot assessment's times shortened on their command line.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use crate::crash::{
    read_console, shaping_at, wait_for, BootedBox, Console, Qemu, OVMF_CODE, OVMF_VARS,
    SITE_SHAPER_TOML,
};
use crate::vm::{mtools, tail, unconnected_nics};

/// What xtask built for this test (target/images-upgrade/).
#[derive(Debug, Clone)]
pub struct Images {
    /// The disk to start from (version `old`).
    pub disk: PathBuf,
    pub old: String,
    /// A signed upgrade that works.
    pub good: PathBuf,
    pub good_version: String,
    /// A signed upgrade whose shaper cannot start.
    pub bad: PathBuf,
    pub bad_version: String,
}

impl Images {
    /// The layout `cargo xtask` writes: DIR/old/gateway.img, DIR/good/*.upgrade,
    /// DIR/bad/*.upgrade, versions in DIR/versions (`old good bad`).
    pub fn from_dir(dir: &Path) -> Result<Images> {
        let v = fs::read_to_string(dir.join("versions")).context("reading versions")?;
        let v: Vec<&str> = v.split_whitespace().collect();
        let [old, good, bad] = v[..] else {
            bail!("{}/versions: expected three versions", dir.display());
        };
        Ok(Images {
            disk: dir.join("old/gateway.img"),
            old: old.into(),
            good: dir.join(format!("good/shaper-gateway-{good}.upgrade")),
            good_version: good.into(),
            bad: dir.join(format!("bad/shaper-gateway-{bad}.upgrade")),
            bad_version: bad.into(),
        })
    }
}

/// What the session saw.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// (c) `shaper upgrade` refused the unsigned and the tampered file (its words).
    pub refused: Vec<String>,
    /// (c) EFI/Linux was the same before and after the refusals.
    pub refused_wrote_nothing: bool,
    /// (d) the last console line before qemu was killed, and what EFI/Linux held then.
    pub killed_at: String,
    pub after_kill_listing: Vec<String>,
    /// (d) the next start ran the old version and shaped.
    pub after_kill_runs_old: bool,
    /// (a) the good upgrade: installed, booted, shaped with the site's config, marked good.
    pub good_installed: bool,
    pub good_runs_new: bool,
    pub good_site_config: bool,
    pub good_marked: bool,
    /// (b) boots of the bad image seen, then the previous image shaping again.
    pub bad_boots: usize,
    pub fell_back: bool,
    /// (b) from `reboot` typed after installing the bad image to shaping on the previous.
    pub fallback: Duration,
    /// `shaper version` after the fallback.
    pub version_after: String,
    /// EFI/Linux at the end (host side, mtools).
    pub final_listing: Vec<String>,
    pub wall: Duration,
    pub console: PathBuf,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.refused.len() == 2
            && self.refused_wrote_nothing
            && self.after_kill_runs_old
            && self.good_installed
            && self.good_runs_new
            && self.good_site_config
            && self.good_marked
            && self.bad_boots >= 3
            && self.fell_back
    }

    pub fn summary(&self) -> String {
        format!(
            "refused before writing: {} (EFI/Linux unchanged: {}); killed while writing (`{}`; EFI/Linux then: {}): old image boots and shapes: {}; good upgrade installed {}, boots the new version {}, with the site's config {}, marked good {}; bad upgrade: {} failed boots, then the previous image again: {} after {:.0} s unattended (from `reboot` to shaping); EFI/Linux at the end: {} ({:.0} s wall)",
            self.refused.join(" / "),
            self.refused_wrote_nothing,
            self.killed_at,
            self.after_kill_listing.join(", "),
            self.after_kill_runs_old,
            self.good_installed,
            self.good_runs_new,
            self.good_site_config,
            self.good_marked,
            self.bad_boots,
            self.fell_back,
            self.fallback.as_secs_f64(),
            self.final_listing.join(", "),
            self.wall.as_secs_f64(),
        )
    }
}

const BANNER: &str = "shaper-image: shaper gateway ";
const MARKED: &str = "boot-assess: good after";
const FIRMWARE_BOOT: &str = "BdsDxe: starting";

/// Starts qemu on the files already in `dir` (disk, variable store), the upgrade disk as
/// the second virtio disk; the console goes to `console`.
fn launch(dir: &Path, extra: &Path, console: &Path) -> Result<BootedBox> {
    let disk = dir.join("gateway.img");
    let vars = dir.join("OVMF_VARS.fd");
    let mon = dir.join("monitor.sock");
    let ser = dir.join("serial.sock");
    let _ = fs::remove_file(&ser);
    let _ = fs::remove_file(&mon);
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-accel", "tcg", "-smp", "1", "-m", "512", "-nodefaults"])
        .args(["-display", "none"])
        .arg("-drive")
        .arg(format!(
            "if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"
        ))
        .arg("-drive")
        .arg(format!(
            "if=pflash,format=raw,unit=1,file={}",
            vars.display()
        ))
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", disk.display()))
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=virtio,readonly=on",
            extra.display()
        ))
        .arg("-chardev")
        .arg(format!(
            "socket,id=ser0,path={},server=on,wait=on",
            ser.display()
        ))
        .args(["-serial", "chardev:ser0"])
        .arg("-monitor")
        .arg(format!("unix:{},server=on,wait=off", mon.display()))
        .args(["-nic", "none"]);
    unconnected_nics(&mut c, 0x0a)?;
    c.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut qemu = Qemu(c.spawn().context("starting qemu-system-x86_64")?);
    let term = Console::connect(&ser, console, &mut qemu)?;
    Ok(BootedBox {
        term,
        qemu,
        console: console.to_path_buf(),
        monitor: mon,
        disk,
    })
}

/// Types `cmd` on the console and waits for it to finish; returns what it printed and its
/// exit status.
fn run(b: &mut BootedBox, cmd: &str, timeout: Duration) -> Result<(String, i32)> {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    b.term.type_line("")?;
    let before = read_console(&b.console).len();
    b.term
        .type_line(&format!("{cmd}; echo \"@@rc=$? n={n}@@\""))?;
    let end = format!(" n={n}@@");
    let (rc, _) = wait_for(&mut b.qemu, &b.console, cmd, timeout, before, |t| {
        // The output, not the echo of the typed line (which shows `$?`).
        let mut from = 0;
        while let Some(i) = t[from..].find("@@rc=") {
            let s = from + i + 5;
            let digits: String = t[s..].chars().take_while(char::is_ascii_digit).collect();
            if !digits.is_empty() && t[s + digits.len()..].starts_with(&end) {
                return Some((digits.parse::<i32>().ok()?, from + i));
            }
            from = s;
        }
        None
    })?;
    let text = read_console(&b.console);
    let out = text
        .get(before..before + rc.1)
        .unwrap_or_default()
        .to_string();
    Ok((out, rc.0))
}

/// EFI/Linux on the disk copy (host side).
fn listing(disk: &Path) -> Vec<String> {
    let mut v: Vec<String> = mtools("mdir", disk, &["-b", "::/EFI/Linux"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim_end_matches('/').rsplit('/').next())
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

/// The FAT disk with the upgrade files: good, bad, unsigned (the bare UKI), tampered.
fn upgrade_disk(dir: &Path, imgs: &Images) -> Result<PathBuf> {
    let good = fs::read(&imgs.good).with_context(|| format!("reading {}", imgs.good.display()))?;
    let sig = good
        .windows(11)
        .position(|w| w == b"\nsignature ")
        .context("the good upgrade has no signature line")?;
    let body = sig
        + 11
        + good[sig + 11..]
            .iter()
            .position(|&b| b == b'\n')
            .context("signature line")?
        + 1;
    let files = dir.join("files");
    fs::create_dir_all(&files)?;
    fs::write(files.join("unsigned.efi"), &good[body..])?;
    let mut t = good.clone();
    // A bit in the middle of the image (the kernel or initramfs): the signed hash breaks.
    let at = body + (good.len() - body) / 2;
    t[at] ^= 0x01;
    fs::write(files.join("tampered.upgrade"), t)?;
    let img = dir.join("upgrades.img");
    let size_kb = (good.len() as u64 * 2 + fs::metadata(&imgs.bad)?.len() * 2) / 1024 + 8192;
    let o = Command::new("mkfs.fat")
        .args(["-F", "32", "-n", "UPGRADES", "-C"])
        .arg(&img)
        .arg(size_kb.to_string())
        .output()
        .context("mkfs.fat")?;
    if !o.status.success() {
        bail!("mkfs.fat: {}", String::from_utf8_lossy(&o.stderr));
    }
    for (from, to) in [
        (imgs.good.clone(), "good.upgrade"),
        (imgs.bad.clone(), "bad.upgrade"),
        (files.join("unsigned.efi"), "unsigned.efi"),
        (files.join("tampered.upgrade"), "tampered.upgrade"),
    ] {
        let o = Command::new("mcopy")
            .arg("-i")
            .arg(&img)
            .arg(&from)
            .arg(format!("::/{to}"))
            .env("MTOOLS_SKIP_CHECK", "1")
            .output()
            .context("mcopy")?;
        if !o.status.success() {
            bail!("mcopy {to}: {}", String::from_utf8_lossy(&o.stderr));
        }
    }
    let _ = fs::remove_dir_all(&files);
    Ok(img)
}

fn mount_upgrades(b: &mut BootedBox) -> Result<()> {
    let (out, rc) = run(
        b,
        "mkdir -p /mnt/u && mount -t vfat -o ro /dev/vdb /mnt/u && ls /mnt/u",
        Duration::from_secs(60),
    )?;
    if rc != 0 {
        bail!("mounting the upgrade disk in the box failed: {out}");
    }
    Ok(())
}

/// Waits for the next boot (from console byte `from`) to shape; returns the banner's
/// version and the byte offset after `shaping at`.
fn next_shaping(b: &mut BootedBox, from: usize, what: &str) -> Result<(String, usize)> {
    let ((_, end), _) = wait_for(
        &mut b.qemu,
        &b.console,
        what,
        Duration::from_secs(300),
        from,
        shaping_at,
    )?;
    let text = read_console(&b.console);
    let seg = &text[from..from + end];
    let version = seg
        .rfind(BANNER)
        .map(|i| {
            seg[i + BANNER.len()..]
                .split([',', ' ', '\n'])
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .unwrap_or_default();
    Ok((version, from + end))
}

/// The whole session (see the module's doc).
pub fn session(imgs: &Images, workdir: &Path) -> Result<Report> {
    let t_start = Instant::now();
    let mut r = Report::default();
    for f in [OVMF_CODE, OVMF_VARS] {
        if !Path::new(f).exists() {
            bail!("{f} is missing (apt-get install ovmf)");
        }
    }
    if workdir.exists() {
        fs::remove_dir_all(workdir)?;
    }
    fs::create_dir_all(workdir)?;
    let dir = workdir.canonicalize()?;
    // The first start: BootedBox::start copies the disk and the variable store and puts the
    // site's files (and the console password) on the EFI partition; it is dropped at once
    // and the same files started again with the upgrade disk attached.
    {
        let b = BootedBox::start(&imgs.disk, &dir, 0x0a, |disk| {
            let site = disk.with_file_name("shaper.toml");
            fs::write(&site, SITE_SHAPER_TOML)?;
            mtools(
                "mcopy",
                disk,
                &["-o", &site.display().to_string(), "::/shaper/shaper.toml"],
            )?;
            Ok(())
        })?;
        drop(b);
    }
    // After BootedBox::start, which empties the folder.
    let extra = upgrade_disk(&dir, imgs)?;
    let disk = dir.join("gateway.img");
    let before = listing(&disk);
    let console1 = dir.join("console-1.log");
    r.console = console1.clone();
    let mut b = launch(&dir, &extra, &console1)?;
    let (v, _) = next_shaping(&mut b, 0, "the old image to shape")?;
    if v != imgs.old {
        bail!("the disk booted version {v}, not {}", imgs.old);
    }

    // (c) Refused before anything is written.
    mount_upgrades(&mut b)?;
    for f in ["unsigned.efi", "tampered.upgrade"] {
        let (out, rc) = run(
            &mut b,
            &format!("shaper upgrade /mnt/u/{f} 2>&1 | tail -n 2"),
            Duration::from_secs(120),
        )?;
        let said = out
            .lines()
            .rev()
            .find(|l| l.contains("shaper: error"))
            .unwrap_or_default()
            .trim()
            .to_string();
        eprintln!("    {f}: {said}");
        let _ = rc; // the pipe's status is tail's
        if said.contains("refused") {
            r.refused.push(format!(
                "{f}: {}",
                said.trim_start_matches("shaper: error: ")
            ));
        }
    }
    let (ls, _) = run(&mut b, "ls -a /boot/efi/EFI/Linux", Duration::from_secs(30))?;
    let inside: Vec<&str> = ls
        .lines()
        .skip(1)
        .flat_map(|l| l.split_whitespace())
        .filter(|n| n.ends_with(".efi"))
        .collect();
    r.refused_wrote_nothing = inside.len() == 1 && listing(&disk) == before;

    // (d) Killed while writing.
    let from = read_console(&b.console).len();
    b.term.type_line("shaper upgrade /mnt/u/good.upgrade")?;
    let (line, _) = wait_for(
        &mut b.qemu,
        &b.console,
        "`shaper upgrade` to start writing",
        Duration::from_secs(180),
        from,
        |t| {
            t.find("shaper: upgrade: writing")
                .or_else(|| t.find("shaper: error"))
                .map(|i| t[i..].lines().next().unwrap_or_default().to_string())
        },
    )?;
    drop(b);
    r.killed_at = line;
    if r.killed_at.contains("error") {
        bail!("the good upgrade was refused: {}", r.killed_at);
    }
    r.after_kill_listing = listing(&disk);
    let console2 = dir.join("console-2.log");
    r.console = console2.clone();
    let mut b = launch(&dir, &extra, &console2)?;
    let (v, _) = next_shaping(&mut b, 0, "the old image to shape after the kill")?;
    r.after_kill_runs_old = v == imgs.old;

    // (a) The good upgrade.
    mount_upgrades(&mut b)?;
    let (out, rc) = run(
        &mut b,
        "shaper upgrade /mnt/u/good.upgrade",
        Duration::from_secs(300),
    )?;
    eprintln!(
        "    good upgrade: {}",
        tail(&out, 12).replace('\n', "\n      ")
    );
    r.good_installed = rc == 0 && out.contains("installed");
    if !r.good_installed {
        bail!("the good upgrade was not installed: {out}");
    }
    let from = read_console(&b.console).len();
    b.term.type_line("reboot")?;
    wait_for(
        &mut b.qemu,
        &b.console,
        "the firmware after reboot",
        Duration::from_secs(120),
        from,
        |t| t.contains(FIRMWARE_BOOT).then_some(()),
    )?;
    let (v, end) = next_shaping(&mut b, from, "the new image to shape")?;
    r.good_runs_new = v == imgs.good_version;
    let text = read_console(&b.console);
    r.good_site_config = text[from..end].contains("site shaper.toml from");
    wait_for(
        &mut b.qemu,
        &b.console,
        "the new image to mark itself good",
        Duration::from_secs(300),
        from,
        |t| t.contains(MARKED).then_some(()),
    )?;
    let (ver, _) = run(&mut b, "shaper version", Duration::from_secs(60))?;
    eprintln!(
        "    after the good upgrade:\n      {}",
        ver.trim().replace('\n', "\n      ")
    );
    r.good_marked = ver.contains(&format!("shaper-gateway-{}.efi", imgs.good_version))
        && !ver.contains("on trial");

    // (b) The bad upgrade, then hands off.
    mount_upgrades(&mut b)?;
    let (out, rc) = run(
        &mut b,
        "shaper upgrade /mnt/u/bad.upgrade",
        Duration::from_secs(300),
    )?;
    if rc != 0 {
        bail!("the bad upgrade was not installed: {out}");
    }
    let from = read_console(&b.console).len();
    b.term.type_line("reboot")?;
    let t_reboot = Instant::now();
    let bad_banner = format!("{BANNER}{},", imgs.bad_version);
    let good_banner = format!("{BANNER}{},", imgs.good_version);
    // Shaping again on the previous image, after the bad one's boots.
    let ((), t_back) = wait_for(
        &mut b.qemu,
        &b.console,
        "the previous image to boot again after the bad one's tries",
        Duration::from_secs(900),
        from,
        |t| {
            let last_bad = t.rfind(&bad_banner)?;
            let g = t[last_bad..].find(&good_banner)? + last_bad;
            shaping_at(&t[g..]).map(|_| ())
        },
    )?;
    r.fallback = t_back.saturating_duration_since(t_reboot);
    let text = read_console(&b.console);
    r.bad_boots = text[from..].matches(&bad_banner).count();
    r.fell_back = true;
    let (ver, _) = run(&mut b, "shaper version", Duration::from_secs(60))?;
    eprintln!(
        "    after the fallback:\n      {}",
        ver.trim().replace('\n', "\n      ")
    );
    r.version_after = ver.trim().to_string();
    r.fell_back = ver.contains(&format!("running: shaper-gateway {}", imgs.good_version));
    drop(b);
    r.final_listing = listing(&disk);
    r.wall = t_start.elapsed();
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_needs_every_part() {
        let mut r = Report {
            refused: vec!["a".into(), "b".into()],
            refused_wrote_nothing: true,
            after_kill_runs_old: true,
            good_installed: true,
            good_runs_new: true,
            good_site_config: true,
            good_marked: true,
            bad_boots: 3,
            fell_back: true,
            ..Default::default()
        };
        assert!(r.ok());
        r.bad_boots = 2;
        assert!(!r.ok());
        let _ = tail("", 1);
    }
}
