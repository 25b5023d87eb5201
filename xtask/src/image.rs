//! `cargo xtask image`: the gateway firmware image.
//!
//! Built from Debian packages pinned in images/packages.lock (kernel, busybox-static, the
//! full iproute2 and the libraries it and `shaper` link against, systemd's EFI stub) and the
//! project's own release `shaper` binary plus images/rootfs (init, default config). Outputs in
//! target/images/:
//!
//! - `vmlinuz` + `initramfs.cpio.gz`: what the VM tier boots (qemu -kernel/-initrd);
//! - `gateway.efi`: the same kernel, initramfs and command line as one EFI executable;
//! - `gateway.img`: a raw GPT disk with one EFI system partition holding systemd-boot as
//!   EFI/BOOT/BOOTX64.EFI, loader/loader.conf, gateway.efi as
//!   EFI/Linux/shaper-gateway-VERSION.efi (A/B upgrades with boot counting: `shaper
//!   upgrade`) and an empty /shaper/ folder for the site's config, to flash;
//! - with `sign`: `shaper-gateway-VERSION.upgrade`, gateway.efi signed (ed25519);
//! - `SHA256SUMS` and `manifest.txt` (inputs with their hashes).
//!
//! Reproducible: every timestamp is SOURCE_DATE_EPOCH (the lock file's commit time is not
//! used: a fixed constant), archives are written in sorted order with uid/gid 0, gzip without
//! names or times, the FAT file system with `--invariant` and fixed serial, the GPT with fixed
//! GUIDs. Same lock + same shaper binary + same images/ => same bytes.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{anyhow, bail, Context as _, Result};

use crate::{output, run, workspace};

/// Every file in the image carries this time (2026-01-01T00:00:00Z).
pub const SOURCE_DATE_EPOCH: u64 = 1_767_225_600;
/// Kernel command line of the EFI image (the VM tier passes its own).
/// The serial console comes last, so it is /dev/console: headless boxes in a comms cupboard
/// are reached over serial; a screen on tty0 still shows the kernel's messages.
/// `oops=panic`: after an oops the kernel runs on with a dead task and maybe a held lock (a
/// half-working shaper); a reboot is shorter and certain. `panic=5`: reboot 5 s after a
/// panic. The crash record (pstore in EFI variables) is written before that wait; the wait
/// is for someone at the screen, the only record of a panic before rcS loads efi_pstore.
/// It adds 5 s to an outage measured at ~20-24 s under emulation (images/README.md).
pub const EFI_CMDLINE: &str = "console=tty0 console=ttyS0,115200 quiet panic=5 oops=panic";
const ESP_MB: u64 = 96;
const DISK_GUID: &str = "5a3f0c1e-8d7b-4c2a-9e61-0b5e5ea7e001";
const ESP_GUID: &str = "5a3f0c1e-8d7b-4c2a-9e61-0b5e5ea7e002";
const FAT_SERIAL: &str = "5A3F0C1E";

/// Modules the image's kernel gets (with their dependencies); /etc/modules loads them.
const MODULES: &[&str] = &[
    // Built in on 6.12, a module on Debian 12's 6.1 (images/kernels.lock).
    "virtio_pci",
    "virtio_net",
    "e1000",
    "e1000e",
    "igb",
    "igc",
    "r8169",
    "ixgbe",
    "sch_htb",
    "sch_cake",
    "sch_fq",
    "sch_ingress",
    "ifb",
    "cls_bpf",
    // Not used by the shaper; there for an engineer's own `tc` on the console.
    "cls_u32",
    "cls_flower",
    "act_mirred",
    "virtio_blk",
    "nvme",
    "ahci",
    "sd_mod",
    "usb_storage",
    "xhci_pci",
    "vfat",
    "nls_cp437",
    "nls_ascii",
    // Crash records kept across the reboot in EFI variables (pstore; rcS, save-crash).
    "efi_pstore",
    // LoaderDevicePartUUID (which partition the box booted from: the site folder's).
    "efivarfs",
    // Bridge mode (site.toml), and a management VLAN on the bridge.
    "bridge",
    "8021q",
    // The host firewall on the box's own input (site.toml [management]; stateless rules,
    // so no conntrack and nothing on the forwarding path).
    "nf_tables",
    // nf_tables needs libcrc32c, whose start asks the crypto API for crc32c: a module
    // here (the kernel's own request for it goes through modprobe by alias).
    "crc32c_generic",
];

pub struct Options {
    /// Use today's candidate when a locked version is not served any more (prints a
    /// warning: the image will not match the documented hash).
    pub allow_drift: bool,
    /// Rewrite images/packages.lock with today's candidates before building.
    pub relock: bool,
    /// Where the outputs go (default target/images).
    pub out: PathBuf,
    /// Where downloads are kept between builds.
    pub cache: PathBuf,
    /// Build with this kernel from images/kernels.lock instead of packages.lock's.
    pub kernel: Option<String>,
    /// The image's version (IMAGE_VERSION in its os-release, which systemd-boot orders by;
    /// default: the workspace's version).
    pub version: Option<String>,
    /// The update key's public half the image trusts (default images/update-key.pub).
    pub update_key: PathBuf,
    /// Sign the image with this private key (hex seed file): writes the upgrade file
    /// `shaper-gateway-VERSION.upgrade` next to gateway.img.
    pub sign: Option<PathBuf>,
    /// Appended to the EFI image's kernel command line (the VM tier's upgrade tests
    /// shorten the boot assessment's times with `shaper.good_after=`/`shaper.bad_after=`).
    pub extra_cmdline: String,
    /// Replace `shaper` with a program that exits at once: the VM tier's image "whose
    /// shaper cannot start", which must be abandoned after its tries.
    pub break_shaper: bool,
}

impl Default for Options {
    fn default() -> Self {
        let t = workspace().join("target/images");
        Options {
            allow_drift: false,
            relock: false,
            cache: workspace().join("target/image-cache"),
            out: t,
            kernel: None,
            version: None,
            update_key: workspace().join("images/update-key.pub"),
            sign: None,
            extra_cmdline: String::new(),
            break_shaper: false,
        }
    }
}

pub struct Image {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub kernel_version: String,
    /// Unpacked packages (the VM tier builds its tester initramfs from the same kernel).
    pub pkgroot: PathBuf,
    pub sha256: BTreeMap<String, String>,
}

struct Progress {
    n: usize,
    total: usize,
    t0: Instant,
}

impl Progress {
    fn step(&mut self, what: &str) {
        self.n += 1;
        eprintln!(
            "==> image [{}/{}] {what} ({:.1} s)",
            self.n,
            self.total,
            self.t0.elapsed().as_secs_f64()
        );
    }
}

pub fn lock_path() -> PathBuf {
    workspace().join("images/packages.lock")
}

pub fn kernels_lock_path() -> PathBuf {
    workspace().join("images/kernels.lock")
}

/// A lock file's rows: (line number from 1, the line trimmed), blank and `#` lines left out.
fn lock_rows(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .map(str::trim)
        .enumerate()
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
        .map(|(i, l)| (i + 1, l))
}

/// images/kernels.lock: (name, package, version) rows.
fn read_kernels_lock() -> Result<Vec<(String, String, String)>> {
    let text = fs::read_to_string(kernels_lock_path()).context("reading images/kernels.lock")?;
    let mut v = Vec::new();
    for (line_no, line) in lock_rows(&text) {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f[..] {
            [n, p, ver] if p.starts_with("linux-image-") => {
                v.push((n.to_string(), p.to_string(), ver.to_string()))
            }
            _ => {
                bail!("images/kernels.lock:{line_no}: expected `name linux-image-package version`")
            }
        }
    }
    Ok(v)
}

/// packages.lock with its kernel swapped for `name`'s from kernels.lock.
fn lock_with_kernel(mut lock: Vec<(String, String)>, name: &str) -> Result<Vec<(String, String)>> {
    let kernels = read_kernels_lock()?;
    let (_, pkg, ver) = kernels.iter().find(|(n, _, _)| n == name).ok_or_else(|| {
        anyhow!(
            "no kernel {name} in images/kernels.lock (there: {})",
            kernels
                .iter()
                .map(|k| k.0.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    let slot = lock
        .iter_mut()
        .find(|(p, _)| p.starts_with("linux-image-"))
        .ok_or_else(|| anyhow!("images/packages.lock has no linux-image package"))?;
    *slot = (pkg.clone(), ver.clone());
    Ok(lock)
}

fn read_lock() -> Result<Vec<(String, String)>> {
    let text = fs::read_to_string(lock_path()).context("reading images/packages.lock")?;
    let mut v = Vec::new();
    for (line_no, line) in lock_rows(&text) {
        let mut it = line.split_whitespace();
        match (it.next(), it.next(), it.next()) {
            (Some(n), Some(ver), None) => v.push((n.to_string(), ver.to_string())),
            _ => bail!("images/packages.lock:{line_no}: expected `package version`"),
        }
    }
    Ok(v)
}

fn candidate(pkg: &str) -> Result<String> {
    let out = output(Command::new("apt-cache").args(["policy", pkg]))?;
    out.lines()
        .find_map(|l| l.trim().strip_prefix("Candidate: "))
        .filter(|v| *v != "(none)")
        .map(str::to_string)
        .ok_or_else(|| anyhow!("apt has no candidate for {pkg} (run apt-get update?)"))
}

fn relock() -> Result<()> {
    // packages.lock rows are `package version`, kernels.lock rows `name package version`:
    // the version is the last field either way.
    for path in [lock_path(), kernels_lock_path()] {
        let text = fs::read_to_string(&path)?;
        let mut out = String::new();
        for line in text.lines() {
            let t = line.trim();
            if t.is_empty() || t.starts_with('#') {
                out.push_str(line);
            } else {
                let mut f: Vec<&str> = t.split_whitespace().collect();
                f.pop();
                let pkg = f.last().copied().unwrap_or_default();
                out.push_str(&format!("{} {}", f.join(" "), candidate(pkg)?));
            }
            out.push('\n');
        }
        fs::write(&path, out)?;
    }
    Ok(())
}

/// apt-get download's file name: name_version_arch.deb with ':' escaped as %3a.
fn deb_name(pkg: &str, ver: &str, arch: &str) -> String {
    format!("{pkg}_{}_{arch}.deb", ver.replace(':', "%3a"))
}

fn download(cache: &Path, pkg: &str, ver: &str) -> Result<PathBuf> {
    for arch in ["amd64", "all"] {
        let p = cache.join(deb_name(pkg, ver, arch));
        if p.exists() {
            return Ok(p);
        }
    }
    let attempt = || {
        Command::new("apt-get")
            .current_dir(cache)
            .args(["download", "-q", &format!("{pkg}={ver}")])
            .output()
    };
    let mut o = attempt()?;
    if !o.status.success() {
        // The package lists may simply be stale on a fresh machine.
        let _ = Command::new("apt-get").args(["update", "-q"]).output();
        o = attempt()?;
    }
    if !o.status.success() {
        bail!(
            "apt-get download {pkg}={ver}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    for arch in ["amd64", "all"] {
        let p = cache.join(deb_name(pkg, ver, arch));
        if p.exists() {
            return Ok(p);
        }
    }
    bail!(
        "apt-get download {pkg}={ver} left no .deb in {}",
        cache.display()
    )
}

fn sha256(path: &Path) -> Result<String> {
    let out = output(Command::new("sha256sum").arg(path))?;
    Ok(out
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

pub(crate) fn reset_dir(p: &Path) -> Result<()> {
    if p.exists() {
        fs::remove_dir_all(p).with_context(|| format!("removing {}", p.display()))?;
    }
    fs::create_dir_all(p)?;
    Ok(())
}

/// Copies a file's content (following symlinks) and sets its mode.
pub(crate) fn install(src: &Path, dst: &Path, mode: u32) -> Result<()> {
    if let Some(d) = dst.parent() {
        fs::create_dir_all(d)?;
    }
    fs::copy(src, dst)
        .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
    fs::set_permissions(dst, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// DT_NEEDED entries of an ELF file.
fn needed(elf: &Path) -> Result<Vec<String>> {
    let out = output(Command::new("readelf").args(["-d", "-W"]).arg(elf))?;
    Ok(out
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| {
            let a = l.find('[')?;
            let b = l.rfind(']')?;
            Some(l[a + 1..b].to_string())
        })
        .collect())
}

/// Copies the shared libraries `bins` need (transitively) from the unpacked packages into
/// rootfs/lib/x86_64-linux-gnu, and the dynamic loader into /lib64.
fn install_libs(pkgroot: &Path, rootfs: &Path, bins: &[PathBuf]) -> Result<()> {
    let dirs = [
        pkgroot.join("lib/x86_64-linux-gnu"),
        pkgroot.join("usr/lib/x86_64-linux-gnu"),
    ];
    let find = |so: &str| dirs.iter().map(|d| d.join(so)).find(|p| p.exists());
    let mut todo: Vec<PathBuf> = bins.to_vec();
    let mut seen = BTreeSet::new();
    while let Some(elf) = todo.pop() {
        for so in needed(&elf)? {
            if !seen.insert(so.clone()) {
                continue;
            }
            if so.starts_with("ld-linux") {
                continue;
            }
            let src = find(&so).ok_or_else(|| {
                anyhow!(
                    "{} needs {so}, which no package in images/packages.lock provides",
                    elf.display()
                )
            })?;
            install(&src, &rootfs.join("lib/x86_64-linux-gnu").join(&so), 0o644)?;
            todo.push(src);
        }
    }
    let ld = find("ld-linux-x86-64.so.2").ok_or_else(|| anyhow!("libc6 has no loader"))?;
    install(&ld, &rootfs.join("lib64/ld-linux-x86-64.so.2"), 0o755)?;
    Ok(())
}

/// Copies `names` and their dependencies (by modules.dep) from the kernel package,
/// decompressed, and indexes them with depmod. Returns how many modules went in.
pub fn install_modules(pkgroot: &Path, rootfs: &Path, kver: &str, names: &[&str]) -> Result<usize> {
    let src = pkgroot.join("lib/modules").join(kver);
    let dep = fs::read_to_string(src.join("modules.dep")).context("modules.dep")?;
    let mut deps: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for line in dep.lines() {
        let Some((m, rest)) = line.split_once(':') else {
            continue;
        };
        let base = Path::new(m)
            .file_name()
            .and_then(|f| f.to_str())
            .unwrap_or_default();
        let name = base
            .split(".ko")
            .next()
            .unwrap_or_default()
            .replace('-', "_");
        deps.insert(
            name,
            (
                m.to_string(),
                rest.split_whitespace().map(str::to_string).collect(),
            ),
        );
    }
    let builtin = fs::read_to_string(src.join("modules.builtin")).unwrap_or_default();
    let mut files = BTreeSet::new();
    for n in names {
        let key = n.replace('-', "_");
        match deps.get(&key) {
            Some((m, d)) => {
                files.insert(m.clone());
                files.extend(d.iter().cloned());
            }
            None if builtin.contains(&format!("/{n}.ko")) => {}
            None => bail!("kernel {kver} has no module {n}"),
        }
    }
    let dst = rootfs.join("lib/modules").join(kver);
    for f in &files {
        let from = src.join(f);
        let to = dst.join(f.trim_end_matches(".xz").trim_end_matches(".zst"));
        if let Some(d) = to.parent() {
            fs::create_dir_all(d)?;
        }
        if f.ends_with(".xz") {
            let o = Command::new("xz").arg("-dc").arg(&from).output()?;
            if !o.status.success() {
                bail!("xz -d {}", from.display());
            }
            fs::write(&to, o.stdout)?;
        } else {
            fs::copy(&from, &to)?;
        }
        fs::set_permissions(&to, fs::Permissions::from_mode(0o644))?;
    }
    for f in [
        "modules.builtin",
        "modules.builtin.modinfo",
        "modules.order",
    ] {
        if src.join(f).exists() {
            install(&src.join(f), &dst.join(f), 0o644)?;
        }
    }
    run(Command::new("depmod").arg("-b").arg(rootfs).arg(kver))?;
    Ok(files.len())
}

/// busybox with a symlink per applet, except those the image ships in full.
pub fn install_busybox(pkgroot: &Path, rootfs: &Path, except: &[&str]) -> Result<()> {
    let bb = pkgroot.join("bin/busybox");
    install(&bb, &rootfs.join("bin/busybox"), 0o755)?;
    let list = output(Command::new(&bb).arg("--list-full"))?;
    for applet in list.lines() {
        let name = applet.rsplit('/').next().unwrap_or(applet);
        if except.contains(&name) || applet == "bin/busybox" {
            continue;
        }
        let link = rootfs.join(applet);
        if link.exists() {
            continue;
        }
        if let Some(d) = link.parent() {
            fs::create_dir_all(d)?;
        }
        std::os::unix::fs::symlink("/bin/busybox", &link)?;
    }
    Ok(())
}

/// Sorted newc cpio, uid/gid 0, every mtime SOURCE_DATE_EPOCH, gzip -n.
pub fn write_initramfs(rootfs: &Path, out: &Path) -> Result<()> {
    run(Command::new("find")
        .arg(rootfs)
        .args(["-exec", "touch", "-h", "-d"])
        .arg(format!("@{SOURCE_DATE_EPOCH}"))
        .args(["{}", "+"]))?;
    let script = format!(
        "cd {} && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc --reproducible -R 0:0 | gzip -9 -n > {}",
        shell_quote(rootfs),
        shell_quote(out)
    );
    run(Command::new("sh").args(["-c", &script]))
}

fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', "'\\''"))
}

fn kernel_version(pkgroot: &Path) -> Result<String> {
    let mods = pkgroot.join("lib/modules");
    let mut v: Vec<String> = fs::read_dir(&mods)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v.pop().ok_or_else(|| anyhow!("no kernel in the packages"))
}

pub(crate) fn write_text(path: &Path, text: &str, mode: u32) -> Result<()> {
    if let Some(d) = path.parent() {
        fs::create_dir_all(d)?;
    }
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Copies images/rootfs into the image: executables 0755, the rest 0644.
fn install_overlay(from: &Path, to: &Path) -> Result<()> {
    for e in fs::read_dir(from)? {
        let e = e?;
        let p = e.path();
        let t = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            fs::create_dir_all(&t)?;
            install_overlay(&p, &t)?;
        } else {
            let exec = e.metadata()?.permissions().mode() & 0o111 != 0;
            install(&p, &t, if exec { 0o755 } else { 0o644 })?;
        }
    }
    Ok(())
}

pub fn build(opts: &Options, shaper: &Path) -> Result<Image> {
    let mut pr = Progress {
        n: 0,
        total: 8,
        t0: Instant::now(),
    };
    if !shaper.exists() {
        bail!(
            "{} is missing (build it in release first)",
            shaper.display()
        );
    }
    for tool in [
        "dpkg-deb", "depmod", "cpio", "xz", "gzip", "objcopy", "mkfs.fat", "mcopy", "sfdisk",
        "readelf",
    ] {
        if !crate::setup::have(tool) {
            bail!("{tool} is missing: run `cargo xtask setup`");
        }
    }
    if opts.relock {
        pr.step("relocking images/packages.lock to today's candidates");
        relock()?;
    } else {
        pr.step("reading images/packages.lock");
    }
    let lock = match &opts.kernel {
        Some(k) => lock_with_kernel(read_lock()?, k)?,
        None => read_lock()?,
    };
    fs::create_dir_all(&opts.cache)?;
    fs::create_dir_all(&opts.out)?;
    let work = opts.out.join("work");
    reset_dir(&work)?;

    pr.step(&format!("downloading {} packages", lock.len()));
    let mut debs = Vec::new();
    let mut used = Vec::new();
    for (pkg, ver) in &lock {
        match download(&opts.cache, pkg, ver) {
            Ok(p) => {
                used.push((pkg.clone(), ver.clone()));
                debs.push(p);
            }
            Err(e) if opts.allow_drift => {
                let now = candidate(pkg)?;
                eprintln!(
                    "warning: {pkg} {ver} is not served any more ({e:#}); using {now}: this image will not match the locked hash (run `cargo xtask image --relock`)"
                );
                debs.push(download(&opts.cache, pkg, &now)?);
                used.push((pkg.clone(), now));
            }
            Err(e) => {
                return Err(e.context(
                    "a locked package is not available; `cargo xtask image --relock` takes today's versions",
                ))
            }
        }
    }

    pr.step("unpacking");
    let pkgroot = work.join("pkgroot");
    fs::create_dir_all(&pkgroot)?;
    for d in &debs {
        run(Command::new("dpkg-deb").arg("-x").arg(d).arg(&pkgroot))?;
    }
    let kver = kernel_version(&pkgroot)?;
    // The package ships no modules.dep (its postinst makes it); make one to read deps from.
    run(Command::new("depmod").arg("-b").arg(&pkgroot).arg(&kver))?;

    pr.step("root file system: busybox, iproute2, shaper, libraries");
    let rootfs = work.join("rootfs");
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "run", "tmp", "root",
        "var",
    ] {
        fs::create_dir_all(rootfs.join(d))?;
    }
    fs::set_permissions(rootfs.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    install_busybox(&pkgroot, &rootfs, &["ip", "tc"])?;
    std::os::unix::fs::symlink("bin/busybox", rootfs.join("init"))?;
    install(&pkgroot.join("bin/ip"), &rootfs.join("sbin/ip"), 0o755)?;
    install(&pkgroot.join("sbin/tc"), &rootfs.join("sbin/tc"), 0o755)?;
    for f in fs::read_dir(pkgroot.join("etc/iproute2"))? {
        let f = f?;
        if f.file_type()?.is_file() {
            install(
                &f.path(),
                &rootfs.join("etc/iproute2").join(f.file_name()),
                0o644,
            )?;
        }
    }
    install(shaper, &rootfs.join("usr/sbin/shaper"), 0o755)?;
    // Remote management (dropbear, key-only) and the host firewall (nft), from Debian.
    for (from, to) in [
        ("usr/sbin/dropbear", "usr/sbin/dropbear"),
        ("usr/bin/dropbearkey", "usr/bin/dropbearkey"),
        ("usr/sbin/nft", "usr/sbin/nft"),
    ] {
        install(&pkgroot.join(from), &rootfs.join(to), 0o755)?;
    }
    install_libs(
        &pkgroot,
        &rootfs,
        &[
            rootfs.join("sbin/ip"),
            rootfs.join("sbin/tc"),
            rootfs.join("usr/sbin/shaper"),
            rootfs.join("usr/sbin/dropbear"),
            rootfs.join("usr/bin/dropbearkey"),
            rootfs.join("usr/sbin/nft"),
        ],
    )?;
    let version = opts.version.as_deref().unwrap_or(env!("CARGO_PKG_VERSION"));
    if version.is_empty()
        || !version
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b".-~^".contains(&c))
    {
        bail!("image version `{version}`: only letters, digits and . - ~ ^");
    }
    write_text(
        &rootfs.join("etc/os-release"),
        &format!(
            "NAME=\"shaper gateway\"\nID=shaper-gateway\nVERSION_ID={version}\nPRETTY_NAME=\"shaper gateway {version}\"\nIMAGE_ID={IMAGE_ID}\nIMAGE_VERSION={version}\n"
        ),
        0o644,
    )?;
    write_text(
        &rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\n",
        0o644,
    )?;
    write_text(&rootfs.join("etc/group"), "root:x:0:\n", 0o644)?;
    // Dropbear lets a user in only with a shell listed here.
    write_text(&rootfs.join("etc/shells"), "/bin/sh\n", 0o644)?;
    // Root's password: locked ("!") unless the site folder gives a hash (rcS rewrites it).
    write_text(
        &rootfs.join("etc/shadow"),
        "root:!:20454:0:99999:7:::\n",
        0o600,
    )?;
    fs::set_permissions(rootfs.join("root"), fs::Permissions::from_mode(0o700))?;
    write_text(&rootfs.join("etc/hostname"), "shaper-gateway\n", 0o644)?;
    install_overlay(&workspace().join("images/rootfs"), &rootfs)?;
    // The image's default config is the shipped example itself (one file, validated by
    // config::tests::shipped_example_config_validates), not a copy that drifts.
    install(
        &workspace().join(crate::EXAMPLE_CONFIG),
        &rootfs.join("etc/shaper/shaper.toml"),
        0o644,
    )?;
    // Completions and man pages generated from the binary's clap definitions (as in the
    // Debian package). busybox's shell completes no arguments and the image has no `man`:
    // they are there for `shaper man`'s readers who copy them off, and cost ~40 KiB.
    crate::deb::install_generated(shaper, &rootfs)?;
    // The public half of the key upgrades must be signed with (`shaper upgrade`).
    read_update_key(&opts.update_key)?;
    install(
        &opts.update_key,
        &rootfs.join("etc/shaper/update-key.pub"),
        0o644,
    )?;
    if opts.break_shaper {
        write_text(
            &rootfs.join("usr/sbin/shaper"),
            "#!/bin/sh\necho \"shaper: this test image's shaper cannot start\" >&2\nexit 1\n",
            0o755,
        )?;
    }

    pr.step(&format!("kernel {kver} and its modules"));
    let nmods = install_modules(&pkgroot, &rootfs, &kver, MODULES)?;
    eprintln!("    {nmods} modules");

    pr.step("initramfs");
    let kernel = opts.out.join("vmlinuz");
    install(
        &pkgroot.join(format!("boot/vmlinuz-{kver}")),
        &kernel,
        0o644,
    )?;
    let initramfs = opts.out.join("initramfs.cpio.gz");
    write_initramfs(&rootfs, &initramfs)?;

    pr.step("EFI executable (systemd-boot stub + kernel + initramfs + command line)");
    let efi = opts.out.join("gateway.efi");
    let cmdline = if opts.extra_cmdline.is_empty() {
        EFI_CMDLINE.to_string()
    } else {
        format!("{EFI_CMDLINE} {}", opts.extra_cmdline)
    };
    build_uki(
        &pkgroot,
        &work,
        &kernel,
        &initramfs,
        &efi,
        &rootfs.join("etc/os-release"),
        &cmdline,
    )?;

    pr.step("raw disk image (GPT, EFI system partition)");
    let disk = opts.out.join("gateway.img");
    build_disk(&pkgroot, &work, &efi, &uki_name(version), &disk)?;

    let mut sums = BTreeMap::new();
    for p in [&kernel, &initramfs, &efi, &disk] {
        let name = p
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        sums.insert(name, sha256(p)?);
    }
    let mut text = String::new();
    for (n, h) in &sums {
        text.push_str(&format!("{h}  {n}\n"));
    }
    fs::write(opts.out.join("SHA256SUMS"), &text)?;
    let mut manifest = format!(
        "shaper gateway {version}\nkernel {kver}\nSOURCE_DATE_EPOCH {SOURCE_DATE_EPOCH}\nshaper {}  {}\n",
        sha256(shaper)?,
        shaper.display()
    );
    for ((pkg, ver), deb) in used.iter().zip(&debs) {
        manifest.push_str(&format!("{} {pkg} {ver}\n", sha256(deb)?));
    }
    fs::write(opts.out.join("manifest.txt"), manifest)?;
    if let Some(key) = &opts.sign {
        let up = opts.out.join(format!("{IMAGE_ID}-{version}.upgrade"));
        let signer = sign_upgrade(&efi, version, key, &up)?;
        eprintln!(
            "==> signed upgrade file {} (key {signer}; this image trusts {})",
            up.display(),
            fs::read_to_string(&opts.update_key)?.trim()
        );
    }
    eprintln!(
        "==> image done in {:.1} s: {}\n{text}",
        pr.t0.elapsed().as_secs_f64(),
        opts.out.display()
    );
    Ok(Image {
        kernel,
        initramfs,
        kernel_version: kver,
        pkgroot,
        sha256: sums,
    })
}

/// A unified kernel image: systemd's EFI stub with the kernel, initramfs, command line and
/// os-release as PE sections (the objcopy recipe systemd 252 documents).
fn build_uki(
    pkgroot: &Path,
    work: &Path,
    kernel: &Path,
    initramfs: &Path,
    out: &Path,
    os_release: &Path,
    cmdline_text: &str,
) -> Result<()> {
    let stub = pkgroot.join("usr/lib/systemd/boot/efi/linuxx64.efi.stub");
    if !stub.exists() {
        bail!("systemd-boot-efi has no linuxx64.efi.stub");
    }
    let cmdline = work.join("cmdline.txt");
    fs::write(&cmdline, format!("{cmdline_text}\0"))?;
    let _ = fs::remove_file(out);
    run(Command::new("objcopy")
        // The PE header's TimeDateStamp (and so its checksum) come from this, else from now.
        .env("SOURCE_DATE_EPOCH", SOURCE_DATE_EPOCH.to_string())
        .arg("--add-section")
        .arg(format!(".osrel={}", os_release.display()))
        .args(["--change-section-vma", ".osrel=0x20000"])
        .arg("--add-section")
        .arg(format!(".cmdline={}", cmdline.display()))
        .args(["--change-section-vma", ".cmdline=0x30000"])
        .arg("--add-section")
        .arg(format!(".linux={}", kernel.display()))
        .args(["--change-section-vma", ".linux=0x2000000"])
        .arg("--add-section")
        .arg(format!(".initrd={}", initramfs.display()))
        .args(["--change-section-vma", ".initrd=0x3000000"])
        .arg(&stub)
        .arg(out))?;
    // objcopy stamps the PE header with the current time (it ignores SOURCE_DATE_EPOCH for
    // PE): put the fixed time there and make the header checksum match again.
    let mut pe = fs::read(out)?;
    pin_pe_timestamp(&mut pe, SOURCE_DATE_EPOCH as u32)?;
    fs::write(out, pe)?;
    Ok(())
}

/// Sets a PE image's COFF TimeDateStamp and recomputes the optional header's CheckSum.
fn pin_pe_timestamp(pe: &mut [u8], stamp: u32) -> Result<()> {
    let lfanew = pe
        .get(0x3c..0x40)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or_else(|| anyhow!("not a PE file"))?;
    if pe.get(lfanew..lfanew + 4) != Some(b"PE\0\0".as_slice()) {
        bail!("no PE signature");
    }
    let ts = lfanew + 8;
    let csum = lfanew + 24 + 64;
    if pe.len() < csum + 4 {
        bail!("PE header cut short");
    }
    pe[ts..ts + 4].copy_from_slice(&stamp.to_le_bytes());
    pe[csum..csum + 4].fill(0);
    let mut sum: u64 = 0;
    for (i, w) in pe.chunks(2).enumerate() {
        if i * 2 == csum || i * 2 == csum + 2 {
            continue;
        }
        let v = u64::from(w[0]) | (u64::from(*w.get(1).unwrap_or(&0)) << 8);
        sum += v;
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum = (sum & 0xffff) + (sum >> 16);
    let total = (sum + pe.len() as u64) as u32;
    pe[csum..csum + 4].copy_from_slice(&total.to_le_bytes());
    Ok(())
}

/// The UKI's file name in EFI/Linux/ (no boot counter: the image a disk is made with is
/// good by definition).
fn uki_name(version: &str) -> String {
    format!("{IMAGE_ID}-{version}.efi")
}

fn build_disk(pkgroot: &Path, work: &Path, efi: &Path, uki: &str, disk: &Path) -> Result<()> {
    let esp = work.join("esp.img");
    let _ = fs::remove_file(&esp);
    run(Command::new("mkfs.fat")
        .args([
            "-F",
            "32",
            "--invariant",
            "-i",
            FAT_SERIAL,
            "-n",
            "SHAPER",
            "-C",
        ])
        .arg(&esp)
        .arg((ESP_MB * 1024).to_string())
        .stdout(std::process::Stdio::null()))?;
    let readme = work.join("README.TXT");
    fs::write(
        &readme,
        "Site configuration for the shaper gateway.\r\n\
         Put shaper.toml (the shaping) and site.toml (bridge or router, ports,\r\n\
         management address) in this folder; they replace the image's defaults\r\n\
         at the next boot. Only this partition (the one the box booted from) is read.\r\n",
    )?;
    // systemd-boot as the removable-media boot loader; it boots the newest UKI in
    // EFI/Linux/ and counts the tries of one installed by `shaper upgrade`.
    let sdboot = pkgroot.join("usr/lib/systemd/boot/efi/systemd-bootx64.efi");
    if !sdboot.exists() {
        bail!("systemd-boot-efi has no systemd-bootx64.efi");
    }
    let bootx64 = work.join("BOOTX64.EFI");
    fs::copy(&sdboot, &bootx64)?;
    // No `default`: the entry id is the file name with its counter, which changes at each
    // boot of a new image (images/README.md, "Upgrades"); the order alone picks.
    let loader_conf = work.join("loader.conf");
    fs::write(
        &loader_conf,
        "timeout 0\neditor no\nauto-entries no\nauto-firmware no\n",
    )?;
    run(Command::new("touch")
        .args(["-d", &format!("@{SOURCE_DATE_EPOCH}")])
        .arg(efi)
        .arg(&readme)
        .arg(&bootx64)
        .arg(&loader_conf))?;
    let mtools = |args: &[&str]| {
        let mut c = Command::new(args[0]);
        c.args(["-i"]).arg(&esp).args(&args[1..]);
        // mtools stamps directories with the current time unless told otherwise.
        c.env("SOURCE_DATE_EPOCH", SOURCE_DATE_EPOCH.to_string());
        c.env("MTOOLS_SKIP_CHECK", "1");
        c
    };
    run(&mut mtools(&[
        "mmd",
        "::/EFI",
        "::/EFI/BOOT",
        "::/EFI/Linux",
        "::/loader",
        "::/shaper",
    ]))?;
    for (from, to) in [
        (bootx64.as_path(), "::/EFI/BOOT/BOOTX64.EFI".to_string()),
        (loader_conf.as_path(), "::/loader/loader.conf".to_string()),
        (efi, format!("::/EFI/Linux/{uki}")),
    ] {
        let mut c = mtools(&["mcopy", "-m"]);
        c.arg(from).arg(to);
        run(&mut c)?;
    }
    let mut c = mtools(&["mcopy", "-m"]);
    c.arg(&readme).arg("::/shaper/README.TXT");
    run(&mut c)?;

    // 1 MiB before the partition, 1 MiB after it for the backup GPT.
    let total = (ESP_MB + 2) * 1024 * 1024;
    let _ = fs::remove_file(disk);
    let f = fs::File::create(disk)?;
    f.set_len(total)?;
    drop(f);
    let script = format!(
        "label: gpt\nlabel-id: {DISK_GUID}\nfirst-lba: 2048\n\nstart=2048, size={}, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, uuid={ESP_GUID}, name=\"EFI system\"\n",
        ESP_MB * 1024 * 2
    );
    let mut child = Command::new("sfdisk")
        .args(["--quiet", "--no-reread", "--no-tell-kernel"])
        .arg(disk)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()?;
    child
        .stdin
        .take()
        .ok_or_else(|| anyhow!("sfdisk stdin"))?
        .write_all(script.as_bytes())?;
    if !child.wait()?.success() {
        bail!("sfdisk failed");
    }
    run(Command::new("dd")
        .arg(format!("if={}", esp.display()))
        .arg(format!("of={}", disk.display()))
        .args(["bs=1M", "seek=1", "conv=notrunc", "status=none"]))?;
    Ok(())
}

/// Modules the VM tier's client and server VMs load (9p for the host's userland, netem and
/// friends to emulate the copper line).
const TESTER_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_net",
    "9pnet_virtio",
    "9p",
    "sch_netem",
    "ifb",
    "sch_ingress",
    "act_mirred",
    "cls_matchall",
    "sch_htb",
    "sch_tbf",
    "sch_cake",
    // PPPoE across the bridged gateway (pppd + pppoe on the client and the "router").
    "pppoe",
    "ppp_generic",
    // pppd's pty mode (pppd pty 'pppoe ...') puts the tty in the PPP line discipline.
    "ppp_async",
];

/// The initramfs of the VM tier's client and server VMs: busybox, the modules above and
/// tests/vm/tester-init. Not part of the product; built from the image's kernel package.
pub fn build_tester_initramfs(img: &Image, out: &Path) -> Result<()> {
    let rootfs = img.pkgroot.with_file_name("tester-rootfs");
    reset_dir(&rootfs)?;
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp",
    ] {
        fs::create_dir_all(rootfs.join(d))?;
    }
    install_busybox(&img.pkgroot, &rootfs, &[])?;
    install(
        &workspace().join("tests/vm/tester-init"),
        &rootfs.join("init"),
        0o755,
    )?;
    install_modules(&img.pkgroot, &rootfs, &img.kernel_version, TESTER_MODULES)?;
    write_initramfs(&rootfs, out)
}

/// IMAGE_ID of the product's images: systemd-boot's sort key, and what `shaper upgrade`
/// requires of a new image.
pub const IMAGE_ID: &str = "shaper-gateway";

fn read_hex32(path: &Path, what: &str) -> Result<[u8; 32]> {
    let text = fs::read_to_string(path)
        .with_context(|| format!("reading the {what} {}", path.display()))?;
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .unwrap_or_default();
    let bytes: Option<Vec<u8>> = (line.len() == 64)
        .then(|| {
            (0..64)
                .step_by(2)
                .map(|i| u8::from_str_radix(line.get(i..i + 2)?, 16).ok())
                .collect()
        })
        .flatten();
    bytes
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| anyhow!("{}: not 64 hex digits", path.display()))
}

fn read_update_key(path: &Path) -> Result<ed25519_dalek::VerifyingKey> {
    let b = read_hex32(path, "update key")?;
    ed25519_dalek::VerifyingKey::from_bytes(&b)
        .map_err(|e| anyhow!("{}: not an ed25519 public key: {e}", path.display()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Writes the upgrade file: a manifest (`shaper-upgrade 1`, image_id, version, size,
/// sha256 lines), `signature HEX` (ed25519 over the manifest), then the UKI's bytes. The
/// format is shaper-user/src/upgrade.rs's, which checks it on the box. Returns the
/// signer's public key (hex).
pub fn sign_upgrade(uki: &Path, version: &str, key: &Path, out: &Path) -> Result<String> {
    use ed25519_dalek::Signer as _;
    use sha2::Digest as _;
    let seed = read_hex32(key, "signing key")?;
    let sk = ed25519_dalek::SigningKey::from_bytes(&seed);
    let image = fs::read(uki)?;
    let manifest = format!(
        "shaper-upgrade 1\nimage_id {IMAGE_ID}\nversion {version}\nsize {}\nsha256 {}\n",
        image.len(),
        hex(&sha2::Sha256::digest(&image))
    );
    let sig = sk.sign(manifest.as_bytes());
    let mut f = fs::File::create(out)?;
    f.write_all(manifest.as_bytes())?;
    f.write_all(format!("signature {}\n", hex(&sig.to_bytes())).as_bytes())?;
    f.write_all(&image)?;
    f.sync_all()?;
    Ok(hex(sk.verifying_key().as_bytes()))
}

/// A new update key pair: `sec` (the private seed, hex, mode 0600: never commit it) and
/// `sec`.pub (the public key, hex, what an image is built to trust with --update-key).
pub fn new_key(sec: &Path) -> Result<PathBuf> {
    let mut seed = [0u8; 32];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed))
        .context("reading /dev/urandom")?;
    let pk = ed25519_dalek::SigningKey::from_bytes(&seed).verifying_key();
    if let Some(d) = sec.parent() {
        fs::create_dir_all(d)?;
    }
    write_text(
        sec,
        &format!(
            "# shaper update signing key (private): keep it secret\n{}\n",
            hex(&seed)
        ),
        0o600,
    )?;
    let public = PathBuf::from(format!("{}.pub", sec.display()));
    write_text(
        &public,
        &format!("# shaper update key (public)\n{}\n", hex(pk.as_bytes())),
        0o644,
    )?;
    Ok(public)
}
