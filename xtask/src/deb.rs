//! `cargo xtask deb`: a Debian package of the release `shaper` binary and its systemd unit,
//! for sites that run their own Debian 12 gateway rather than the firmware image.
//!
//! What it installs: `/usr/sbin/shaper`; `/lib/systemd/system/shaper.service` (the shipped
//! unit, enabled on install the way debhelper's `dh_installsystemd` does it, started only
//! once `/etc/shaper/shaper.toml` exists); the shipped example config and README under
//! `/usr/share/doc/shaper/`; bash, zsh and fish completions and section-8 man pages
//! generated from the binary's own clap definitions ([`install_generated`], which the image
//! uses too). `Depends:` comes from `dpkg-shlibdeps` on the binary. The package ships no
//! file under `/etc` (no conffile): a site writes its own config with its line's rates.
//!
//! Checked by tests/tests/integration/systemd.rs: installed with dpkg, the unit verified and its
//! `ExecStartPre=`/`ExecStart=` run in a lab namespace, purged.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::{
    image::{install, reset_dir, write_text, SOURCE_DATE_EPOCH},
    output, run,
    setup::have,
    workspace, EXAMPLE_CONFIG,
};

/// Completions and man pages made by running the binary (`shaper completions SHELL`,
/// `shaper man DIR`), installed under `root` at the paths Debian's shells and man read.
pub fn install_generated(shaper: &Path, root: &Path) -> Result<()> {
    for (shell, path) in [
        ("bash", "usr/share/bash-completion/completions/shaper"),
        ("zsh", "usr/share/zsh/vendor-completions/_shaper"),
        ("fish", "usr/share/fish/vendor_completions.d/shaper.fish"),
    ] {
        let text = output(Command::new(shaper).args(["completions", shell]))?;
        if text.trim().is_empty() {
            bail!("`shaper completions {shell}` printed nothing");
        }
        write_text(&root.join(path), &text, 0o644)?;
    }
    let man = root.join("usr/share/man/man8");
    fs::create_dir_all(&man)?;
    let tmp = tempdir("man")?;
    output(Command::new(shaper).arg("man").arg(&tmp))?;
    let mut pages: Vec<PathBuf> = fs::read_dir(&tmp)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    pages.sort();
    if !pages.iter().any(|p| p.ends_with("shaper.8")) {
        bail!("`shaper man` wrote no shaper.8");
    }
    for p in &pages {
        let name = p.file_name().expect("a file name").to_string_lossy();
        let dst = man.join(format!("{name}.gz"));
        // -n: no name or time in the header (same input, same bytes).
        let gz = Command::new("gzip")
            .args(["-9", "-n", "-c"])
            .arg(p)
            .output()
            .context("running gzip")?;
        if !gz.status.success() {
            bail!(
                "gzip {}: {}",
                p.display(),
                String::from_utf8_lossy(&gz.stderr)
            );
        }
        fs::write(&dst, gz.stdout)?;
        fs::set_permissions(&dst, fs::Permissions::from_mode(0o644))?;
    }
    fs::remove_dir_all(&tmp)?;
    Ok(())
}

/// A fresh folder under target/ of this call's own: the upgrade tests' three images are
/// built at once, each making its man pages.
fn tempdir(what: &str) -> Result<PathBuf> {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = workspace().join(format!("target/deb-{what}-{}-{n}", std::process::id()));
    reset_dir(&d)?;
    Ok(d)
}

/// `shaper --version` prints `shaper X.Y.Z`: the package's version is the binary's.
fn binary_version(shaper: &Path) -> Result<String> {
    let v = output(Command::new(shaper).arg("--version"))?;
    let v = v
        .split_whitespace()
        .nth(1)
        .context("`shaper --version` printed no version")?
        .to_string();
    if !v.starts_with(|c: char| c.is_ascii_digit()) {
        bail!("`{v}` is not a Debian version");
    }
    Ok(v)
}

/// `Depends:` for the binary, from dpkg-shlibdeps (which needs a debian/control beside it).
fn shlib_depends(shaper: &Path) -> Result<String> {
    let dir = tempdir("shlibdeps")?;
    write_text(
        &dir.join("debian/control"),
        "Source: shaper\n\nPackage: shaper\nArchitecture: any\n",
        0o644,
    )?;
    let out = output(
        Command::new("dpkg-shlibdeps")
            .args(["-O", "-e"])
            .arg(shaper)
            .current_dir(&dir),
    )?;
    fs::remove_dir_all(&dir)?;
    // "shlibs:Depends=libc6 (>= 2.34), libgcc-s1 (>= 4.2)"
    let deps = out
        .lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .context("dpkg-shlibdeps printed no shlibs:Depends")?;
    Ok(deps.trim().to_string())
}

const POSTINST: &str = r#"#!/bin/sh
# As dh_installsystemd writes it: enable on first install, keep the admin's choice on
# upgrade, (re)start only where systemd runs (the unit itself waits for a config).
set -e
if [ "$1" = "configure" ] || [ "$1" = "abort-upgrade" ] || [ "$1" = "abort-deconfigure" ] || [ "$1" = "abort-remove" ]; then
	deb-systemd-helper unmask 'shaper.service' >/dev/null || true
	if deb-systemd-helper --quiet was-enabled 'shaper.service'; then
		deb-systemd-helper enable 'shaper.service' >/dev/null || true
	else
		deb-systemd-helper update-state 'shaper.service' >/dev/null || true
	fi
	mkdir -p /etc/shaper
	if [ -d /run/systemd/system ]; then
		systemctl --system daemon-reload >/dev/null || true
		if [ -n "$2" ]; then action=restart; else action=start; fi
		deb-systemd-invoke $action 'shaper.service' >/dev/null || true
	fi
fi
"#;

const PRERM: &str = r#"#!/bin/sh
# Stopping the service removes the shaping (`shaper run` cleans up on SIGTERM).
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
	deb-systemd-invoke stop 'shaper.service' >/dev/null || true
fi
"#;

const POSTRM: &str = r#"#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
	systemctl --system daemon-reload >/dev/null || true
fi
if [ "$1" = "remove" ] && [ -x /usr/bin/deb-systemd-helper ]; then
	deb-systemd-helper mask 'shaper.service' >/dev/null || true
fi
if [ "$1" = "purge" ]; then
	if [ -x /usr/bin/deb-systemd-helper ]; then
		deb-systemd-helper purge 'shaper.service' >/dev/null || true
		deb-systemd-helper unmask 'shaper.service' >/dev/null || true
	fi
	# The site's own config stays unless it is the only thing left and purge was asked.
	rmdir /etc/shaper 2>/dev/null || true
fi
"#;

/// Builds `target/deb/shaper_VERSION_ARCH.deb` from `shaper` (a release binary) and returns
/// its path.
pub fn build(shaper: &Path) -> Result<PathBuf> {
    for tool in ["dpkg-deb", "dpkg-shlibdeps", "gzip", "md5sum"] {
        if !have(tool) {
            bail!("{tool} is missing: run `cargo xtask setup`");
        }
    }
    let version = binary_version(shaper)?;
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?
        .trim()
        .to_string();
    let out_dir = workspace().join("target/deb");
    let root = out_dir.join("root");
    reset_dir(&root)?;
    let ws = workspace();
    install(shaper, &root.join("usr/sbin/shaper"), 0o755)?;
    install(
        &ws.join("shaper-user/systemd/shaper.service"),
        &root.join("lib/systemd/system/shaper.service"),
        0o644,
    )?;
    let doc = root.join("usr/share/doc/shaper");
    install(&ws.join("README.md"), &doc.join("README.md"), 0o644)?;
    install(
        &ws.join(EXAMPLE_CONFIG),
        &doc.join("examples")
            .join(Path::new(EXAMPLE_CONFIG).file_name().expect("a file name")),
        0o644,
    )?;
    write_text(
        &doc.join("copyright"),
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
         Upstream-Name: shaper\n\n\
         Files: *\n\
         Copyright: the shaper authors\n\
         License: MIT OR Apache-2.0\n \
         The eBPF classifier inside the binary declares the GPL licence to the kernel\n \
         (the helpers it calls are GPL-only).\n",
        0o644,
    )?;
    install_generated(shaper, &root)?;

    let depends = shlib_depends(shaper)?;
    let installed_kb = du_kb(&root)?;
    let debian = root.join("DEBIAN");
    write_text(
        &debian.join("control"),
        &format!(
            "Package: shaper\n\
             Version: {version}\n\
             Architecture: {arch}\n\
             Maintainer: shaper developers <shaper@localhost>\n\
             Installed-Size: {installed_kb}\n\
             Depends: {depends}\n\
             Recommends: init-system-helpers\n\
             Section: net\n\
             Priority: optional\n\
             Description: traffic shaper for clinical sites on copper lines\n \
             eBPF classifier and HTB class trees in both directions on a Linux gateway\n \
             between a clinical site's LAN and its ADSL2+, FTTC or EFM line: video\n \
             consultations, image transfers and clinical systems get priority or a\n \
             guaranteed share over updates, backups and web. Configure\n \
             /etc/shaper/shaper.toml (example in /usr/share/doc/shaper/examples), check it\n \
             with `shaper check`, then `systemctl start shaper`.\n"
        ),
        0o644,
    )?;
    write_text(&debian.join("postinst"), POSTINST, 0o755)?;
    write_text(&debian.join("prerm"), PRERM, 0o755)?;
    write_text(&debian.join("postrm"), POSTRM, 0o755)?;
    // md5sums of every installed file, relative paths, sorted.
    let mut files = Vec::new();
    walk_files(&root, &root, &mut files)?;
    files.retain(|p| !p.starts_with("DEBIAN"));
    files.sort();
    let mut sums = String::new();
    for f in &files {
        let line = output(Command::new("md5sum").arg(f).current_dir(&root))?;
        sums.push_str(&line);
    }
    write_text(&debian.join("md5sums"), &sums, 0o644)?;
    // Same inputs, same bytes: one time on every file (dpkg-deb clamps to SOURCE_DATE_EPOCH
    // only what is newer).
    run(Command::new("find").arg(&root).args([
        "-exec",
        "touch",
        "-h",
        "-d",
        "@1767225600",
        "{}",
        "+",
    ]))?;
    let deb = out_dir.join(format!("shaper_{version}_{arch}.deb"));
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(&root)
        .arg(&deb)
        .env("SOURCE_DATE_EPOCH", SOURCE_DATE_EPOCH.to_string()))?;
    Ok(deb)
}

fn walk_files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            walk_files(root, &e.path(), out)?;
        } else {
            out.push(e.path().strip_prefix(root)?.to_path_buf());
        }
    }
    Ok(())
}

fn du_kb(root: &Path) -> Result<u64> {
    let out = output(Command::new("du").args(["-s", "-k"]).arg(root))?;
    out.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .context("du printed no size")
}
