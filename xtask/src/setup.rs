//! `cargo xtask setup`: what building and testing need on a fresh machine of this kind
//! (nightly rust-src, bpf-linker built against nightly's LLVM, cargo-fuzz, the Debian
//! packages the tests and the VM tier use, bpffs). Idempotent: seconds when done before.

use std::{path::Path, process::Command, time::Instant};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::{cargo_home, is_root, output, path_with_cargo_bin, run, step, workspace};

/// Debian packages the tests and demo use, by the binary that proves each is there.
pub(crate) const APT: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("iperf3", "iperf3"),
    ("nsenter", "util-linux"),
    ("ping", "iputils-ping"),
    ("bpftool", "bpftool"),
    // Host names (tests/tests/integration/hosts.rs): a DNS server and client, a TLS server and client.
    ("dnsmasq", "dnsmasq-base"),
    ("dig", "bind9-dnsutils"),
    ("openssl", "openssl"),
    ("gtlsclient", "ngtcp2-client"),
    // The site file's host firewall (tests/tests/integration/site.rs) and SSH to the box (VM tier).
    ("nft", "nftables"),
    ("ssh", "openssh-client"),
    // PPPoE across the bridged gateway in the VM tier (the testers run the host's tools).
    ("pppd", "ppp"),
    ("pppoe-server", "pppoe"),
    // The firmware image (cargo xtask image) and the Debian package (cargo xtask deb).
    ("dpkg-deb", "dpkg"),
    ("dpkg-shlibdeps", "dpkg-dev"),
    ("deb-systemd-helper", "init-system-helpers"),
    ("systemd-analyze", "systemd"),
    ("depmod", "kmod"),
    ("cpio", "cpio"),
    ("xz", "xz-utils"),
    ("objcopy", "binutils"),
    ("mkfs.fat", "dosfstools"),
    ("mcopy", "mtools"),
    ("sfdisk", "fdisk"),
    // The VM tier (cargo xtask vm-test): qemu, UEFI firmware, real traffic tools.
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("/usr/share/ovmf/OVMF.fd", "ovmf"),
    ("ffmpeg", "ffmpeg"),
    ("storescu", "dcmtk"),
    ("irtt", "irtt"),
    ("ethtool", "ethtool"),
];

pub(crate) fn have(bin: &str) -> bool {
    if bin.starts_with('/') {
        return Path::new(bin).exists();
    }
    Command::new("sh")
        .args(["-c", &format!("command -v {bin} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}

pub(crate) fn setup() -> Result<()> {
    let t0 = Instant::now();
    // 1. Nightly with rust-src for -Z build-std=core.
    let vv = output(Command::new("rustup").args(["run", "nightly", "rustc", "-vV"]))
        .context("the nightly toolchain is needed for the eBPF crate (it ships preinstalled on these machines)")?;
    let sysroot =
        output(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))?
            .trim()
            .to_string();
    let rust_src = Path::new(&sysroot).join("lib/rustlib/src/rust/library/core");
    if !rust_src.exists() {
        step("installing rust-src for nightly");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    // 2. bpf-linker, built against nightly's own libLLVM, cached with a stamp.
    let llvm_major = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .ok_or_else(|| anyhow!("cannot read nightly's LLVM version"))?
        .to_string();
    let libdir = Path::new(&sysroot).join("lib");
    let libllvm = std::fs::read_dir(&libdir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| {
            n.starts_with(&format!("libLLVM.so.{llvm_major}"))
                || (n.starts_with("libLLVM-") && n.ends_with(".so"))
        })
        .ok_or_else(|| anyhow!("no libLLVM in {}", libdir.display()))?;
    let commit = vv
        .lines()
        .find_map(|l| l.strip_prefix("commit-hash: "))
        .unwrap_or("unknown");
    let stamp_text = format!("bpf-linker 0.13.0 llvm-{llvm_major} {libllvm} {commit}\n");
    let bin_dir = cargo_home().join("bin");
    let linker = bin_dir.join("bpf-linker");
    let stamp = bin_dir.join(".bpf-linker.stamp");
    let current = std::fs::read_to_string(&stamp).unwrap_or_default();
    if !linker.exists() || current != stamp_text {
        step(&format!(
            "building bpf-linker against nightly's LLVM {llvm_major} (about a minute, once)"
        ));
        let prefix = workspace().join("target/xtask/llvm-prefix");
        let plib = prefix.join("lib");
        std::fs::create_dir_all(&plib)?;
        let real = libdir.join(&libllvm);
        for name in [libllvm.as_str(), "libLLVM.so"] {
            let link = plib.join(name);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&real, &link)?;
        }
        run(Command::new("cargo")
            .args([
                "+nightly",
                "install",
                "bpf-linker",
                "--version",
                "0.13.0",
                "--no-default-features",
                "--force",
            ])
            .args(["--features", &format!("llvm-{llvm_major}")])
            .arg("--root")
            .arg(cargo_home())
            .env("LLVM_PREFIX", &prefix))?;
        std::fs::write(&stamp, stamp_text)?;
    }

    // 3. cargo-fuzz for the parsers' fuzz targets (a short run is part of the suite).
    let fuzz_ok = Command::new("cargo")
        .args(["fuzz", "--version"])
        .env("PATH", path_with_cargo_bin())
        .output()
        .is_ok_and(|o| o.status.success());
    if !fuzz_ok {
        step("installing cargo-fuzz 0.13.2 (about a minute, once)");
        run(Command::new("cargo")
            .args(["install", "cargo-fuzz", "--version", "0.13.2", "--locked"])
            .arg("--root")
            .arg(cargo_home()))?;
    }

    // 4. Debian packages for the namespace tests.
    let missing: Vec<&str> = APT
        .iter()
        .filter(|(bin, _)| !have(bin))
        .map(|(_, pkg)| *pkg)
        .collect();
    if !missing.is_empty() {
        if !is_root() {
            bail!(
                "packages missing ({}) and not root to install them",
                missing.join(" ")
            );
        }
        step(&format!("installing {}", missing.join(" ")));
        run(Command::new("apt-get").arg("update").arg("-q"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }

    // 5. bpffs for pinning.
    if is_root()
        && !output(Command::new("stat").args(["-f", "-c", "%T", "/sys/fs/bpf"]))
            .is_ok_and(|t| t.trim() == "bpf_fs")
    {
        step("mounting bpffs on /sys/fs/bpf");
        std::fs::create_dir_all("/sys/fs/bpf").ok();
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    eprintln!("==> set-up complete ({:.1} s)", t0.elapsed().as_secs_f64());
    Ok(())
}
