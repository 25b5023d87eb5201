//! Everything that is not `cargo build`: machine set-up, the test suite, the
//! demo and the benchmarks. Deliberately depends on nothing of the product,
//! so `cargo xtask setup` works before the eBPF toolchain exists.
//!
//! One module per command: setup.rs, test.rs, bench.rs (demo and bench), vm.rs
//! (vm-test), image_cmd.rs (image; the build itself in image.rs), deb.rs (deb). This
//! file holds the CLI and the helpers they share (running commands, cargo, paths).

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

mod bench;
mod deb;
mod image;
mod image_cmd;
mod setup;
mod test;
mod vm;

use bench::demo;
use image_cmd::{image_cmd, ImageUpgradeOpts};
use setup::setup;
use vm::{upgrade_images, vm_test, VmOpts};

/// The shipped example config: the image's /etc/shaper/shaper.toml and the Debian
/// package's example.
const EXAMPLE_CONFIG: &str = "shaper-user/config/gp-surgery-fttc-40-10.toml";

use anyhow::{bail, Context as _, Result};
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
    /// Build a Debian package of the release binary and its systemd unit (for sites that
    /// run their own Debian gateway) into target/deb.
    Deb,
    /// Set up, then run the demo: a simulated FTTC line with and without the shaper.
    Demo {
        /// Seconds of traffic per phase.
        #[arg(long, default_value_t = 20)]
        seconds: u32,
    },
    /// Set up, then print the benchmark tables (classifier cost, namespace scenario).
    Bench(bench::BenchOpts),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Setup => setup(),
        Cmd::Test { args } => setup().and_then(|()| test::test(&args)),
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
        Cmd::Deb => setup().and_then(|()| {
            let deb = deb::build(&build_release_shaper()?)?;
            eprintln!("==> {}", deb.display());
            Ok(())
        }),
        Cmd::Demo { seconds } => setup().and_then(|()| demo(seconds)),
        Cmd::Bench(o) => setup().and_then(|()| bench::bench_cmd(&o)),
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

fn cargo(args: &[&str]) -> Command {
    let mut c = Command::new("cargo");
    c.current_dir(workspace()).args(args);
    strip_cargo_env(&mut c);
    // bpf-linker lives in cargo's bin dir; make sure aya-build's cargo finds it.
    c.env("PATH", path_with_cargo_bin());
    c
}

/// `cargo run` gave this process CARGO_PKG_*, CARGO_MANIFEST_* and friends; a nested
/// cargo (run by `cmd` or by a script it runs) must not see them (they changed which
/// targets it selected). CARGO_HOME stays.
fn strip_cargo_env(cmd: &mut Command) {
    for (k, _) in env::vars_os() {
        if let Some(k) = k.to_str() {
            if k.starts_with("CARGO_") && k != "CARGO_HOME" {
                cmd.env_remove(k);
            }
        }
    }
}

fn path_with_cargo_bin() -> std::ffi::OsString {
    let path = env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![cargo_home().join("bin")];
    paths.extend(env::split_paths(&path));
    env::join_paths(paths).unwrap_or(path)
}

fn shaper_bin(release: bool) -> PathBuf {
    workspace().join(if release {
        "target/release/shaper"
    } else {
        "target/debug/shaper"
    })
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
