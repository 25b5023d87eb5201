//! Runs the panic-recovery check by hand (the VM tier calls `shaper_tests::crash` itself):
//! boots target/images/gateway.img under OVMF (qemu TCG), panics it with an NMI and times
//! the way back to shaping.
//!
//! `shaper-panic-recovery [--disk target/images/gateway.img] [--out target/panic-recovery]
//! [--runs 1] [--clean-reboot]`; `--clean-reboot` also reboots cleanly afterwards and checks
//! that the crash is still shown (from the EFI partition); `--sysrq` panics through
//! /proc/sysrq-trigger typed on the console instead of an NMI. Needs qemu-system-x86_64,
//! ovmf and mtools; build the image first with `cargo xtask image`. Exits 1 if any run missed something (crash line, site config, the
//! record on the EFI partition, `shaper status`).

use std::path::PathBuf;
use std::process::ExitCode;

use shaper_tests::crash::{panic_recovery_with, Options};
use shaper_tests::util::arg_value;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let disk = arg_value(&args, "--disk")
        .map_or_else(|| root.join("target/images/gateway.img"), PathBuf::from);
    let out =
        arg_value(&args, "--out").map_or_else(|| root.join("target/panic-recovery"), PathBuf::from);
    let runs: u32 = match arg_value(&args, "--runs").map(str::parse).transpose() {
        Ok(n) => n.unwrap_or(1),
        Err(e) => {
            eprintln!("--runs: {e}");
            return ExitCode::from(2);
        }
    };
    let opts = Options {
        clean_reboot: args.iter().any(|a| a == "--clean-reboot"),
        sysrq: args.iter().any(|a| a == "--sysrq"),
    };
    let mut all_ok = true;
    let mut times = Vec::new();
    for i in 1..=runs {
        eprintln!("==> panic recovery run {i}/{runs}");
        match panic_recovery_with(&disk, &out.join(format!("run{i}")), &opts) {
            Ok(r) => {
                println!("run {i}: {}", r.report());
                if let Some(s) = &r.esp_summary {
                    println!(
                        "run {i}: summary.txt on the EFI partition:\n{}",
                        s.trim_end()
                    );
                }
                println!("run {i}: console: {}", r.console.display());
                all_ok &= r.ok();
                times.push((
                    r.panic_to_shaping.as_secs_f64(),
                    r.panic_to_firmware.as_secs_f64(),
                    r.shaping_uptime_s,
                ));
            }
            Err(e) => {
                eprintln!("run {i} failed: {e:#}");
                all_ok = false;
            }
        }
    }
    for (i, (total, fw, up)) in times.iter().enumerate() {
        println!(
            "run {}: panic to shaping {total:.1} s (to firmware {fw:.1} s, kernel to shaping {up:.2} s)",
            i + 1
        );
    }
    if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
