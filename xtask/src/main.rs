//! Everything that is not `cargo build`: machine set-up, the test suite, the
//! demo and the benchmarks. Deliberately depends on nothing of the product,
//! so `cargo xtask setup` works before the eBPF toolchain exists.

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Instant,
};

mod image;

use anyhow::{anyhow, bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (idempotent; seconds when done before).
    Setup,
    /// Set up, then run the whole test suite (unit + root namespace tests).
    Test {
        /// Extra arguments for the namespace tests' harness (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Build the gateway firmware image (kernel + initramfs for the VM tier, an EFI
    /// executable and a flashable raw disk) into target/images.
    Image {
        /// Rewrite images/packages.lock with today's Debian versions first.
        #[arg(long)]
        relock: bool,
        /// Build even when a locked version is no longer served (warns; hash will differ).
        #[arg(long)]
        allow_drift: bool,
        /// Build twice in separate folders and compare every output byte for byte.
        #[arg(long)]
        check_reproducible: bool,
        /// Build with this kernel from images/kernels.lock (into target/images-NAME).
        #[arg(long)]
        kernel: Option<String>,
        #[command(flatten)]
        upgrade: ImageUpgradeOpts,
    },
    /// Build the image, then run the VM tier: client, gateway (booting the image) and
    /// server/line VMs under qemu, every line profile with the shaper and with a plain FIFO
    /// gateway; prints the comparison tables and writes them with CDF plots to
    /// target/vm-results.
    VmTest(VmOpts),
    /// Set up, then run the demo: a simulated FTTC line with and without the shaper.
    Demo {
        /// Seconds of traffic per phase.
        #[arg(long, default_value_t = 20)]
        seconds: u32,
    },
    /// Set up, then print the benchmark tables (classifier cost, namespace scenario).
    Bench {
        /// Only the classifier micro-benchmark.
        #[arg(long)]
        classifier_only: bool,
        /// The download-direction benchmarks instead: the matrix with a base RTT
        /// (delay line; FTTC 40/10 and ADSL2+ 12/1, 20 and 40 ms, CUBIC and BBR, with and
        /// without churn, the product beside plain HTB at 85 and 95 %, `--runs` runs per
        /// row: about 1 hour at 10 runs), then the zero-delay comparison (FIFO, plain HTB,
        /// the product's modes, an unresponsive UDP flood) on both tiers.
        #[arg(long)]
        download: bool,
        /// Seconds per configuration (the matrix uses at most 12 unless set here).
        #[arg(long)]
        seconds: Option<u32>,
        /// Runs per row of the download matrix.
        #[arg(long, default_value_t = 10)]
        runs: u32,
        /// Matrix rows: lines (fttc,adsl12,adsl8), base RTTs in ms, congestion controls,
        /// churn (off,on), ECN (off,on).
        #[arg(long)]
        lines: Option<String>,
        #[arg(long)]
        rtts: Option<String>,
        #[arg(long)]
        cc: Option<String>,
        #[arg(long)]
        churn: Option<String>,
        #[arg(long)]
        ecn: Option<String>,
        /// Only the matrix (skip the zero-delay comparison and the VM tier).
        #[arg(long)]
        matrix_only: bool,
    },
}

/// The image command's options for A/B upgrades (images/README.md, "Upgrades").
#[derive(clap::Args, Clone, Default)]
struct ImageUpgradeOpts {
    /// Sign the image with this private key (a hex seed file, see --new-key): writes the
    /// upgrade file shaper-gateway-VERSION.upgrade next to gateway.img.
    #[arg(long, value_name = "KEY")]
    sign: Option<PathBuf>,
    /// The public update key the image trusts (default images/update-key.pub).
    #[arg(long, value_name = "PUB")]
    update_key: Option<PathBuf>,
    /// The image's version (IMAGE_VERSION; default the workspace's).
    #[arg(long, value_name = "VERSION")]
    image_version: Option<String>,
    /// Output folder (default target/images).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Make a new update key pair (KEY, private, and KEY.pub) and exit; build nothing.
    #[arg(long, value_name = "KEY")]
    new_key: Option<PathBuf>,
    /// (for the VM tier) Build the upgrade tests' images into DIR and exit.
    #[arg(long, value_name = "DIR", hide = true)]
    upgrade_test: Option<PathBuf>,
}

#[derive(clap::Args, Clone)]
struct VmOpts {
    /// Seconds of measured traffic per run.
    #[arg(long, default_value_t = 20)]
    seconds: u32,
    /// Profiles to run (default: all): adsl, fttc, efm, adsl-syncdrop.
    #[arg(long, value_delimiter = ',')]
    profiles: Vec<String>,
    /// Gateway modes to run (default: fifo and shaper, + autorate on adsl-syncdrop; with
    /// --soak: shaper, fifo, plain-htb-fq_codel): fifo, shaper, autorate, shaper-cake,
    /// plain-htb, plain-htb-fq_codel.
    #[arg(long)]
    modes: Option<String>,
    /// Fail unless the shaper beat the FIFO gateway on video delay and every transfer
    /// completed (what the test suite runs).
    #[arg(long)]
    assert: bool,
    /// Soak: run the profiles' modes this many rounds, interleaved, and count kernel
    /// crashes in every VM (consoles kept in target/vm-soak/soak/). Fails if a gateway
    /// crashed.
    #[arg(long, value_name = "ROUNDS")]
    soak: Option<u32>,
    /// qemu CPU model of the gateway VM (default: qemu's own, qemu64).
    #[arg(long)]
    gateway_cpu: Option<String>,
    /// vCPUs of the gateway VM.
    #[arg(long, default_value_t = 1)]
    gateway_smp: u32,
    /// qemu machine type of the gateway VM (default: pc).
    #[arg(long)]
    gateway_machine: Option<String>,
    /// Appended to the gateway VM's kernel command line.
    #[arg(long, default_value = "")]
    gateway_append: String,
    /// Also run the crash reproducer `shaper-sockchurn --rate N` in the gateway VM
    /// (AF_UNIX datagram sockets made and closed N times a second; 0: unbounded).
    #[arg(long, value_name = "RATE")]
    gateway_churn: Option<u32>,
    /// Boot every VM with this kernel from images/kernels.lock (the image built with it);
    /// results go to a folder named after it (target/vm-results-NAME).
    #[arg(long)]
    kernel: Option<String>,
    /// Profiles also run with the gateway as a transparent bridge (site.toml mode =
    /// "bridge"): FIFO bridge, then the shaper with its daemon killed mid-call.
    #[arg(long, value_delimiter = ',')]
    bridge: Vec<String>,
}

impl VmOpts {
    fn new(seconds: u32, profiles: &[&str]) -> VmOpts {
        VmOpts {
            seconds,
            profiles: profiles.iter().map(|p| p.to_string()).collect(),
            modes: None,
            assert: false,
            soak: None,
            gateway_cpu: None,
            gateway_smp: 1,
            gateway_machine: None,
            gateway_append: String::new(),
            gateway_churn: None,
            kernel: None,
            bridge: Vec::new(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Setup => setup(),
        Cmd::Test { args } => setup().and_then(|()| test(&args)),
        Cmd::Image {
            relock,
            allow_drift,
            check_reproducible,
            kernel,
            upgrade,
        } => match &upgrade.new_key {
            Some(k) => image::new_key(k).map(|p| {
                eprintln!(
                    "==> new update key: {} (private: keep it off the repository) and {}",
                    k.display(),
                    p.display()
                )
            }),
            None => setup().and_then(|()| match &upgrade.upgrade_test {
                Some(dir) => upgrade_images(&build_release_shaper()?, dir),
                None => image_cmd(relock, allow_drift, check_reproducible, kernel, upgrade),
            }),
        },
        Cmd::VmTest(o) => setup().and_then(|()| vm_test(&o)),
        Cmd::Demo { seconds } => setup().and_then(|()| demo(seconds)),
        Cmd::Bench {
            classifier_only,
            download,
            seconds,
            runs,
            lines,
            rtts,
            cc,
            churn,
            ecn,
            matrix_only,
        } => setup().and_then(|()| {
            if download {
                step("download matrix: namespace tier with a base RTT (delay line)");
                let mut margs = vec![
                    "--runs".to_string(),
                    runs.to_string(),
                    "--seconds".into(),
                    seconds.unwrap_or(12).to_string(),
                ];
                for (flag, v) in [
                    ("--lines", &lines),
                    ("--rtts", &rtts),
                    ("--cc", &cc),
                    ("--churn", &churn),
                    ("--ecn", &ecn),
                ] {
                    if let Some(v) = v {
                        margs.extend([flag.to_string(), v.clone()]);
                    }
                }
                run_bin("shaper-download-matrix", &margs)?;
                if matrix_only {
                    return Ok(());
                }
                let seconds = seconds.unwrap_or(20);
                step("download direction without base RTT (FIFO, modes, UDP flood)");
                let ns = workspace().join("target/download-bench-namespaces.json");
                let vm = workspace().join("target/vm-bench/fttc/summary.json");
                for f in [&ns, &vm] {
                    let _ = std::fs::remove_file(f);
                }
                run_bin(
                    "shaper-download-bench",
                    &[
                        "--seconds".into(),
                        seconds.to_string(),
                        "--summary".into(),
                        ns.display().to_string(),
                    ],
                )?;
                // The same comparison on the VM tier (kernel with fq_codel and cake, netem
                // line): FIFO, plain tc HTB, the product with fq_codel and with cake leaves.
                step("download direction on the VM tier (FTTC 40/10)");
                vm_test(&VmOpts {
                    modes: Some("fifo,plain-htb,shaper,shaper-cake".into()),
                    ..VmOpts::new(seconds, &["fttc"])
                })?;
                both_tiers_table(&ns, &vm)
            } else {
                bench(classifier_only, seconds.unwrap_or(20))
            }
        }),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn step(msg: &str) {
    eprintln!("==> {msg}");
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let o = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !o.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Debian packages the tests and demo use, by the binary that proves each is there.
const APT: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("iperf3", "iperf3"),
    ("nsenter", "util-linux"),
    ("ping", "iputils-ping"),
    ("bpftool", "bpftool"),
    // Host names (tests/tests/hosts.rs): a DNS server and client, a TLS server and client.
    ("dnsmasq", "dnsmasq-base"),
    ("dig", "bind9-dnsutils"),
    ("openssl", "openssl"),
    ("gtlsclient", "ngtcp2-client"),
    // The site file's host firewall (tests/tests/site.rs) and SSH to the box (VM tier).
    ("nft", "nftables"),
    ("ssh", "openssh-client"),
    // PPPoE across the bridged gateway in the VM tier (the testers run the host's tools).
    ("pppd", "ppp"),
    ("pppoe-server", "pppoe"),
    // The firmware image (cargo xtask image).
    ("dpkg-deb", "dpkg"),
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

fn have(bin: &str) -> bool {
    if bin.starts_with('/') {
        return Path::new(bin).exists();
    }
    Command::new("sh")
        .args(["-c", &format!("command -v {bin} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}

fn setup() -> Result<()> {
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

fn cargo(args: &[&str]) -> Command {
    let mut c = Command::new("cargo");
    c.current_dir(workspace()).args(args);
    // `cargo run` gave this process CARGO_PKG_*, CARGO_MANIFEST_* and friends; a nested
    // cargo must not see them (they changed which targets it selected).
    for (k, _) in env::vars_os() {
        if let Some(k) = k.to_str() {
            if k.starts_with("CARGO_") && k != "CARGO_HOME" {
                c.env_remove(k);
            }
        }
    }
    // bpf-linker lives in cargo's bin dir; make sure aya-build's cargo finds it.
    c.env("PATH", path_with_cargo_bin());
    c
}

fn path_with_cargo_bin() -> std::ffi::OsString {
    let path = env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![cargo_home().join("bin")];
    paths.extend(env::split_paths(&path));
    env::join_paths(paths).unwrap_or(path)
}

/// A short run of each fuzz target (shaper-user/fuzz: the parsers and the host-name
/// engine), seeded from the captured fixtures; `seconds` each. A crash fails the run and leaves its input in
/// shaper-user/fuzz/artifacts/.
fn fuzz(seconds: u32) -> Result<()> {
    for target in ["dnswire", "sni", "quic", "hosts"] {
        step(&format!("fuzzing {target} for {seconds} s"));
        let mut c = Command::new("bash");
        c.arg(workspace().join("shaper-user/fuzz/run.sh"))
            .arg(target)
            .arg(seconds.to_string())
            .env("PATH", path_with_cargo_bin());
        for (k, _) in env::vars_os() {
            if let Some(k) = k.to_str() {
                if k.starts_with("CARGO_") && k != "CARGO_HOME" {
                    c.env_remove(k);
                }
            }
        }
        run(&mut c)?;
    }
    Ok(())
}

fn shaper_bin(release: bool) -> PathBuf {
    workspace().join(if release {
        "target/release/shaper"
    } else {
        "target/debug/shaper"
    })
}

fn test(args: &[String]) -> Result<()> {
    step("building");
    // Named packages only: the eBPF crate builds for the BPF target (build.rs does it).
    let host = [
        "-p",
        "shaper-user",
        "-p",
        "shaper-common",
        "-p",
        "shaper-tests",
        "-p",
        "xtask",
    ];
    let mut build = cargo(&["build", "--all-targets"]);
    build.args(host);
    run(&mut build)?;
    step("unit tests");
    run(&mut cargo(&[
        "test",
        "-p",
        "shaper-user",
        "-p",
        "shaper-common",
        "-p",
        "xtask",
    ]))?;
    if !is_root() {
        bail!(
            "the namespace tests need root (they create network namespaces and load BPF programs)"
        );
    }
    fuzz(20)?;
    step("kernel and namespace tests (serial)");
    let skips = workspace().join("target/test-skips.txt");
    let _ = std::fs::remove_file(&skips);
    let mut c = cargo(&["test", "-p", "shaper-tests", "--", "--test-threads=1"]);
    c.args(args)
        .env("SHAPER_BIN", shaper_bin(false))
        .env("SHAPER_SKIP_LOG", &skips);
    run(&mut c)?;
    // Skipped tests pass silently in cargo's output: say how many and why.
    let skipped = std::fs::read_to_string(&skips).unwrap_or_default();
    eprintln!(
        "==> {} namespace test(s) skipped{}",
        skipped.lines().count(),
        if skipped.is_empty() {
            String::new()
        } else {
            format!(":\n{skipped}")
        }
    );
    if !args.is_empty() {
        // A test name filter was given: the namespace tests it picked are the run.
        return Ok(());
    }
    step("VM tier: the firmware image under qemu, every line profile, shaper vs FIFO");
    vm_test(&VmOpts {
        assert: true,
        bridge: vec!["fttc".into()],
        ..VmOpts::new(15, &[])
    })?;
    step("VM tier on Debian 12's own kernel (6.1: no TCX, the classifier on clsact): EFM 20/20");
    vm_test(&VmOpts {
        assert: true,
        kernel: Some("debian12".into()),
        ..VmOpts::new(15, &["efm"])
    })
}

/// Builds the product and the harness in release and runs one harness binary.
fn run_bin(bin: &str, args: &[String]) -> Result<()> {
    run(&mut cargo(&[
        "build",
        "--release",
        "-p",
        "shaper-user",
        "-p",
        "shaper-tests",
        "--bins",
    ]))?;
    let mut c = cargo(&[
        "run",
        "--quiet",
        "--release",
        "-p",
        "shaper-tests",
        "--bin",
        bin,
        "--",
    ]);
    c.args(args).env("SHAPER_BIN", shaper_bin(true));
    run(&mut c)
}

fn demo(seconds: u32) -> Result<()> {
    run_bin("shaper-demo", &["--seconds".into(), seconds.to_string()])
}

fn bench(classifier_only: bool, seconds: u32) -> Result<()> {
    let mut args = vec!["--seconds".to_string(), seconds.to_string()];
    if classifier_only {
        args.push("--classifier-only".into());
    }
    run_bin("shaper-bench", &args)
}

fn build_release_shaper() -> Result<PathBuf> {
    step("building shaper (release)");
    run(&mut cargo(&[
        "build",
        "--release",
        "-p",
        "shaper-user",
        "--bin",
        "shaper",
    ]))?;
    Ok(shaper_bin(true))
}

/// The image's output folder: target/images, or target/images-NAME for another kernel.
fn image_dir(kernel: Option<&str>) -> PathBuf {
    workspace().join(match kernel {
        Some(k) => format!("target/images-{k}"),
        None => "target/images".to_string(),
    })
}

fn image_cmd(
    relock: bool,
    allow_drift: bool,
    check_reproducible: bool,
    kernel: Option<String>,
    upgrade: ImageUpgradeOpts,
) -> Result<()> {
    let shaper = build_release_shaper()?;
    let d = image::Options::default();
    let opts = image::Options {
        relock,
        allow_drift,
        out: upgrade
            .out
            .clone()
            .unwrap_or_else(|| image_dir(kernel.as_deref())),
        kernel: kernel.clone(),
        version: upgrade.image_version.clone(),
        update_key: upgrade.update_key.clone().unwrap_or(d.update_key),
        sign: upgrade.sign.clone(),
        ..Default::default()
    };
    let img = image::build(&opts, &shaper)?;
    if check_reproducible {
        let again = image::Options {
            out: match &upgrade.out {
                Some(o) => PathBuf::from(format!("{}-again", o.display())),
                None => workspace().join("target/images-again"),
            },
            allow_drift,
            kernel,
            version: opts.version.clone(),
            update_key: opts.update_key.clone(),
            ..Default::default()
        };
        let img2 = image::build(&again, &shaper)?;
        let mut same = true;
        for (name, h) in &img.sha256 {
            let h2 = img2.sha256.get(name).map(String::as_str).unwrap_or("");
            let ok = h == h2;
            same &= ok;
            eprintln!(
                "{} {name}: {h} / {h2}",
                if ok { "same" } else { "DIFFERENT" }
            );
        }
        if !same {
            bail!("two builds from the same inputs differ");
        }
        eprintln!("==> reproducible: two builds gave identical bytes");
    }
    Ok(())
}

/// The VM tier's A/B upgrade images (tests/src/upgrade.rs) in `dir`: a key pair made there
/// (test-key, test-key.pub: never the committed one), and three images trusting it: old/
/// (the workspace's version V, the disk to start from), good/ (V.1) and bad/ (V.2, whose
/// shaper exits at once), the last two signed. The boot assessment's times are shortened
/// on their command line: marked good after 5 s of shaping, else rebooted at 30 s of uptime
/// (15 s for the bad image, which never shapes: each of its three tries costs that plus a
/// reboot). Built side by side (the packages are in the cache by then: vm-test builds
/// target/images first). `versions` lists the three versions.
fn upgrade_images(shaper: &Path, dir: &Path) -> Result<()> {
    let key = dir.join("test-key");
    if !key.exists() {
        image::new_key(&key)?;
    }
    let public = dir.join("test-key.pub");
    let v = env!("CARGO_PKG_VERSION");
    let versions = [v.to_string(), format!("{v}.1"), format!("{v}.2")];
    step("upgrade test images: old, good, bad");
    std::thread::scope(|s| {
        let jobs: Vec<_> = [
            ("old", &versions[0], false, false, 30),
            ("good", &versions[1], true, false, 30),
            ("bad", &versions[2], true, true, 15),
        ]
        .into_iter()
        .map(|(name, version, sign, broken, bad_after)| {
            let opts = image::Options {
                allow_drift: true,
                out: dir.join(name),
                version: Some(version.clone()),
                update_key: public.clone(),
                sign: sign.then(|| key.clone()),
                extra_cmdline: format!("shaper.good_after=5 shaper.bad_after={bad_after}"),
                break_shaper: broken,
                ..Default::default()
            };
            s.spawn(move || {
                image::build(&opts, shaper)
                    .map(|_| ())
                    .with_context(|| format!("the upgrade test image {name}"))
            })
        })
        .collect();
        jobs.into_iter()
            .try_for_each(|j| j.join().map_err(|_| anyhow!("an image build panicked"))?)
    })?;
    std::fs::write(dir.join("versions"), versions.join(" ") + "\n")?;
    Ok(())
}

/// The download comparison of both tiers in one table, from the rows each bench wrote.
fn both_tiers_table(ns: &Path, vm: &Path) -> Result<()> {
    let read = |p: &Path| -> Result<Vec<serde_json::Value>> {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
    };
    let mut rows = read(ns)?;
    rows.extend(read(vm)?);
    step("download direction, both tiers (FTTC 40/10, 400 ms modem buffer)");
    let cols = [
        ("video_down_p50_ms", "vid dn p50"),
        ("video_down_p99_ms", "vid dn p99"),
        ("video_down_loss_pct", "loss dn %"),
        ("video_up_p50_ms", "vid up p50"),
        ("video_up_p99_ms", "vid up p99"),
        ("video_up_loss_pct", "loss up %"),
        ("goodput_down_pct", "goodput dn"),
        ("goodput_up_pct", "goodput up"),
    ];
    let width = rows
        .iter()
        .filter_map(|r| r["configuration"].as_str())
        .map(str::len)
        .max()
        .unwrap_or(13)
        .max(13);
    let mut head = format!("{:<10} | {:<width$}", "tier", "configuration");
    for (_, h) in cols {
        head.push_str(&format!(" | {h:>10}"));
    }
    println!("{head}\n{}", "-".repeat(head.len()));
    for r in &rows {
        let mut line = format!(
            "{:<10} | {:<width$}",
            r["tier"].as_str().unwrap_or("?"),
            r["configuration"].as_str().unwrap_or("?")
        );
        for (k, _) in cols {
            match r[k].as_f64() {
                Some(v) => line.push_str(&format!(" | {v:>10.1}")),
                None => line.push_str(&format!(" | {:>10}", "-")),
            }
        }
        println!("{line}");
    }
    println!(
        "(video: one-way delay in ms added over the idle line, p50/p99, and loss %; goodput as % \
         of the line: namespaces, everything the receivers got (4+4 bulk TCP, the image upload, \
         video); vm, the 4+4 bulk TCP transfers (the DICOM study and video ride beside them). \
         The VM tier runs under qemu TCG: its CPUs add tens of ms at p99 and do not carry the \
         line's 40 Mbit/s (see README); the namespace tier runs on the host's CPUs.)"
    );
    Ok(())
}

/// The VM tier (`shaper-vm-test`): the comparison tables by default; with `modes`, those
/// gateways only (the download bench), written to target/vm-bench; with `soak`, the crash
/// soak, written to target/vm-soak.
fn vm_test(o: &VmOpts) -> Result<()> {
    let shaper = build_release_shaper()?;
    let images = image_dir(o.kernel.as_deref());
    let opts = image::Options {
        allow_drift: true,
        out: images.clone(),
        kernel: o.kernel.clone(),
        ..Default::default()
    };
    let img = image::build(&opts, &shaper)?;
    let tester = images.join("tester-initramfs.cpio.gz");
    step("tester initramfs for the client and server VMs");
    image::build_tester_initramfs(&img, &tester)?;
    let mut out = if o.soak.is_some() {
        "target/vm-soak"
    } else if o.modes.is_some() {
        "target/vm-bench"
    } else {
        "target/vm-results"
    }
    .to_string();
    if let Some(k) = &o.kernel {
        out = format!("{out}-{k}");
    }
    let mut args = vec![
        "--kernel".to_string(),
        img.kernel.display().to_string(),
        "--gateway-initramfs".into(),
        img.initramfs.display().to_string(),
        "--tester-initramfs".into(),
        tester.display().to_string(),
        "--seconds".into(),
        o.seconds.to_string(),
        "--out".into(),
        workspace().join(out).display().to_string(),
        "--gateway-smp".into(),
        o.gateway_smp.to_string(),
    ];
    if !o.profiles.is_empty() {
        args.push("--profiles".into());
        args.push(o.profiles.join(","));
    }
    if o.modes.is_none() && o.soak.is_none() {
        args.push("--disk".into());
        args.push(images.join("gateway.img").display().to_string());
        // The A/B upgrade tests' images (their own key, versions and folder).
        if o.kernel.is_none() {
            let up = workspace().join("target/images-upgrade");
            upgrade_images(&shaper, &up)?;
            args.push("--upgrade-images".into());
            args.push(up.display().to_string());
        }
    }
    for (flag, v) in [
        ("--modes", &o.modes),
        ("--gateway-cpu", &o.gateway_cpu),
        ("--gateway-machine", &o.gateway_machine),
    ] {
        if let Some(v) = v {
            args.push(flag.into());
            args.push(v.clone());
        }
    }
    for (flag, v) in [("--soak", o.soak), ("--gateway-churn", o.gateway_churn)] {
        if let Some(v) = v {
            args.push(flag.into());
            args.push(v.to_string());
        }
    }
    if !o.gateway_append.is_empty() {
        args.push("--gateway-append".into());
        args.push(o.gateway_append.clone());
    }
    if !o.bridge.is_empty() {
        args.push("--bridge-profiles".into());
        args.push(o.bridge.join(","));
    }
    if o.assert {
        args.push("--assert".into());
    }
    run_bin("shaper-vm-test", &args)
}
