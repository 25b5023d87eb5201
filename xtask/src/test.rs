//! `cargo xtask test`: the whole suite, as `.ci/run` runs it: build, unit tests, a short
//! fuzz of each target, the Debian package, the kernel and namespace tests (serial), then
//! the VM tier on the image's kernel and on Debian 12's.

use std::process::Command;

use anyhow::{bail, Result};

use crate::{
    build_release_shaper, cargo, deb, is_root, path_with_cargo_bin, run, shaper_bin, step,
    strip_cargo_env,
    vm::{vm_test, VmOpts},
    workspace,
};

/// A short run of each fuzz target (shaper-user/fuzz: the parsers and the host-name
/// engine), seeded from the captured fixtures; `seconds` each. A crash fails the run and leaves its input in
/// shaper-user/fuzz/artifacts/.
pub(crate) fn fuzz(seconds: u32) -> Result<()> {
    for target in ["dnswire", "sni", "quic", "hosts"] {
        step(&format!("fuzzing {target} for {seconds} s"));
        let mut c = Command::new("bash");
        c.arg(workspace().join("shaper-user/fuzz/run.sh"))
            .arg(target)
            .arg(seconds.to_string())
            .env("PATH", path_with_cargo_bin());
        strip_cargo_env(&mut c);
        run(&mut c)?;
    }
    Ok(())
}

pub(crate) fn test(args: &[String]) -> Result<()> {
    step("building");
    // Named packages only: the eBPF crate builds for the BPF target (build.rs does it).
    // The unit tests are these; the build adds shaper-tests (the root tests, run below)
    // and shaper-lab (the lab's programs: a change that breaks them fails here).
    let unit = [
        "-p",
        "shaper-user",
        "-p",
        "shaper-core",
        "-p",
        "shaper-common",
        "-p",
        "xtask",
    ];
    let mut build = cargo(&["build", "--all-targets"]);
    build
        .args(unit)
        .args(["-p", "shaper-tests", "-p", "shaper-lab"]);
    run(&mut build)?;
    step("unit tests");
    let mut unit_tests = cargo(&["test"]);
    unit_tests.args(unit);
    run(&mut unit_tests)?;
    if !is_root() {
        bail!(
            "the namespace tests need root (they create network namespaces and load BPF programs)"
        );
    }
    fuzz(20)?;
    // The Debian package, installed and started by
    // `systemd::debian_package_installs_starts_and_purges` (tests/tests/integration/systemd.rs).
    let deb = deb::build(&build_release_shaper()?)?;
    step("kernel and namespace tests (serial)");
    let skips = workspace().join("target/test-skips.txt");
    let _ = std::fs::remove_file(&skips);
    // shaper-tests' unit tests and its one integration binary (tests/tests/integration/, a
    // module per area); `args` filter by `module::test` (`lifecycle::`, `classify::`).
    let mut c = cargo(&["test", "-p", "shaper-tests", "--", "--test-threads=1"]);
    c.args(args)
        .env("SHAPER_BIN", shaper_bin(false))
        .env("SHAPER_DEB", &deb)
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
        calls: true,
        ..VmOpts::new(15, &[])
    })?;
    step("VM tier on Debian 12's own kernel (6.1: no TCX, the classifier on clsact): EFM 20/20");
    vm_test(&VmOpts {
        assert: true,
        kernel: Some("debian12".into()),
        ..VmOpts::new(15, &["efm"])
    })
}
