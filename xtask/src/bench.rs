//! `cargo xtask demo` and `cargo xtask bench`: the harness binaries in release, and the
//! download benchmarks' sequence (matrix, zero-delay comparison, VM tier, both tiers'
//! table).

use std::path::Path;

use anyhow::{Context as _, Result};

use crate::{
    cargo, run, shaper_bin, step,
    vm::{vm_test, VmOpts},
    workspace,
};

/// Builds the product and the lab's programs in release and runs one of them.
pub(crate) fn run_bin(bin: &str, args: &[String]) -> Result<()> {
    run(&mut cargo(&[
        "build",
        "--release",
        "-p",
        "shaper-user",
        "-p",
        "shaper-lab",
        "--bins",
    ]))?;
    let mut c = cargo(&[
        "run",
        "--quiet",
        "--release",
        "-p",
        "shaper-lab",
        "--bin",
        bin,
        "--",
    ]);
    c.args(args).env("SHAPER_BIN", shaper_bin(true));
    run(&mut c)
}

pub(crate) fn demo(seconds: u32) -> Result<()> {
    run_bin("shaper-demo", &["--seconds".into(), seconds.to_string()])
}

pub(crate) fn bench(classifier_only: bool, seconds: u32) -> Result<()> {
    let mut args = vec!["--seconds".to_string(), seconds.to_string()];
    if classifier_only {
        args.push("--classifier-only".into());
    }
    run_bin("shaper-bench", &args)
}

/// The download comparison of both tiers in one table, from the rows each bench wrote.
pub(crate) fn both_tiers_table(ns: &Path, vm: &Path) -> Result<()> {
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

/// `cargo xtask bench`'s options.
#[derive(clap::Args)]
pub(crate) struct BenchOpts {
    /// Only the classifier micro-benchmark.
    #[arg(long)]
    pub(crate) classifier_only: bool,
    /// The download-direction benchmarks instead: the matrix with a base RTT
    /// (delay line; FTTC 40/10 and ADSL2+ 12/1, 20 and 40 ms, CUBIC and BBR, with and
    /// without churn, the product beside plain HTB at 85 and 95 %, `--runs` runs per
    /// row: about 1 hour at 10 runs), then the zero-delay comparison (FIFO, plain HTB,
    /// the product's modes, an unresponsive UDP flood) on both tiers.
    #[arg(long)]
    pub(crate) download: bool,
    /// Seconds per configuration (the matrix uses at most 12 unless set here).
    #[arg(long)]
    pub(crate) seconds: Option<u32>,
    /// Runs per row of the download matrix.
    #[arg(long, default_value_t = 10)]
    pub(crate) runs: u32,
    /// Matrix rows: lines (fttc,adsl12,adsl8), base RTTs in ms, congestion controls,
    /// churn (off,on), ECN (off,on).
    #[arg(long)]
    pub(crate) lines: Option<String>,
    #[arg(long)]
    pub(crate) rtts: Option<String>,
    #[arg(long)]
    pub(crate) cc: Option<String>,
    #[arg(long)]
    pub(crate) churn: Option<String>,
    #[arg(long)]
    pub(crate) ecn: Option<String>,
    /// Only the matrix (skip the zero-delay comparison and the VM tier).
    #[arg(long)]
    pub(crate) matrix_only: bool,
}

/// The benchmarks: the classifier and namespace scenario tables, or with `--download` the
/// download sequence (matrix with a base RTT; unless `--matrix-only`, the zero-delay
/// comparison on both tiers and their joint table).
pub(crate) fn bench_cmd(o: &BenchOpts) -> Result<()> {
    let BenchOpts {
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
    } = o;
    let (classifier_only, download, seconds, runs, matrix_only) =
        (*classifier_only, *download, *seconds, *runs, *matrix_only);
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
}
