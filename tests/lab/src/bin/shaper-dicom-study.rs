//! `shaper-dicom-study`: writes a synthetic CT study (one DICOM Part 10 file per slice, see
//! `shaper_tests::dicom`), or checks what a storage SCP received against it.
//!
//! ```text
//! shaper-dicom-study --out DIR [--slices 20] [--rows 512 --cols 512] [--study 1]
//! shaper-dicom-study --check RXDIR [--slices 20] [--rows 512 --cols 512] [--study 1]
//! ```
//!
//! The first form writes `DIR/CT0001.dcm ...` (same arguments, same bytes; 20 slices of
//! 512x512 are 20 x 524,288 bytes of pixel data, about 10.5 MB) and prints the study's size
//! and UID. `--study N` gives a different study (UIDs, patient id) of the same shape. The
//! second form (give it the options the study was written with) writes nothing: it
//! regenerates the study in memory, reads every file in
//! RXDIR, matches them by SOP Instance UID and compares the pixel data byte for byte; it
//! prints `N/N slices received, pixel data identical` and exits 0, or says what is missing
//! or different and exits 1.
//!
//! Verified with DCMTK 3.6.7 (Debian 12) on loopback, 20 slices of 512x512 (10.5 MB, under a
//! second). Receiver: it accepts any called AE title by default; `+xa` accepts every
//! transfer syntax it supports and still prefers explicit VR little endian, what these files
//! are in (no conversion on the way); `-dhl` skips reverse DNS of the caller; `--fork` serves
//! each association in a child and keeps listening:
//!
//! ```text
//! mkdir -p /tmp/rx && storescp -dhl +xa --fork -od /tmp/rx 11112
//! ```
//!
//! Sender (`-aet` our AE title, `-aec` the called one, any name works with storescp; `+sd`
//! sends every file in the directory; `-nh` carries on after a failed C-STORE; by default it
//! proposes all uncompressed transfer syntaxes, explicit VR first); exits 0 when every
//! C-STORE succeeded:
//!
//! ```text
//! storescu -aet SHAPER -aec ANY-SCP +sd -nh 127.0.0.1 11112 DIR
//! shaper-dicom-study --slices 20 --check /tmp/rx     # 20/20 slices received, pixel data identical
//! ```
//!
//! Also verified: a single-process receiver (`storescp -dhl -aet ANY-SCP -od /tmp/rx 11112`,
//! one association at a time), and an implicit-VR-only receiver (`+xi`), where storescu
//! converts the dataset to implicit VR and `--check` still finds identical pixel data.
//! storescp names received files `CT.<SOP Instance UID>` and writes its own meta header
//! (implementation UID `1.2.276.0.7230010.3.0.3.6.7`), so compare with `--check`, not `cmp`.
//! Sending the same study again overwrites those files (storescp warns "DICOM file already
//! exists, overwriting"); use a fresh `-od` directory per run, `--study N` for a distinct
//! study, or storescp `+uf` for unique file names. `dcmftest DIR/*.dcm` says `yes:` for
//! every file and `dcmdump` reads them without a warning.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use shaper_tests::dicom::{ct_slice, instance_and_pixels, pixel_data, write_study, StudySpec};

struct Args {
    out: Option<PathBuf>,
    spec: StudySpec,
    check: Option<PathBuf>,
}

fn usage() -> &'static str {
    "usage: shaper-dicom-study --out DIR [--slices 20] [--rows 512] [--cols 512] [--study 1] \
     [--check RXDIR]"
}

fn parse_args() -> Result<Args> {
    let mut out = None;
    let mut check = None;
    let mut spec = StudySpec::default();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--out" => out = Some(PathBuf::from(val()?)),
            "--check" => check = Some(PathBuf::from(val()?)),
            "--slices" => spec.slices = val()?.parse().context("--slices: an integer")?,
            "--rows" => spec.rows = val()?.parse().context("--rows: 1..65535")?,
            "--cols" => spec.cols = val()?.parse().context("--cols: 1..65535")?,
            "--study" => spec.study = val()?.parse().context("--study: an integer")?,
            "-h" | "--help" => {
                println!("{}", usage());
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}\n{}", usage()),
        }
    }
    if out.is_none() && check.is_none() {
        bail!("--out or --check is required\n{}", usage());
    }
    if spec.slices == 0 || spec.rows == 0 || spec.cols == 0 {
        bail!("--slices, --rows and --cols must be positive");
    }
    Ok(Args { out, spec, check })
}

fn write(args: &Args, out: &Path) -> Result<()> {
    let paths = write_study(out, &args.spec)?;
    let bytes: u64 = paths
        .iter()
        .map(|p| fs::metadata(p).map(|m| m.len()))
        .sum::<std::io::Result<u64>>()?;
    println!(
        "wrote {} slices of {}x{} to {} ({} bytes, {:.1} MB); study UID {}",
        paths.len(),
        args.spec.rows,
        args.spec.cols,
        out.display(),
        bytes,
        bytes as f64 / 1e6,
        args.spec.study_uid()
    );
    Ok(())
}

/// Returns whether every slice arrived with identical pixel data.
fn check(args: &Args, rx: &Path) -> Result<bool> {
    let spec = &args.spec;
    let mut received = std::collections::HashMap::new();
    let mut unreadable = 0;
    for entry in fs::read_dir(rx).with_context(|| format!("reading {}", rx.display()))? {
        let path = entry?.path();
        if !path.is_file() {
            continue;
        }
        let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        match instance_and_pixels(&bytes) {
            Ok((uid, px)) => {
                received.insert(uid, (path.clone(), px.to_vec()));
            }
            Err(e) => {
                unreadable += 1;
                eprintln!("{}: {e:#}", path.display());
            }
        }
    }
    let mut ok = 0;
    let mut problems = Vec::new();
    for i in 0..spec.slices {
        let uid = spec.sop_instance_uid(i);
        match received.get(&uid) {
            None => problems.push(format!("{} ({uid}) missing", spec.file_name(i))),
            Some((path, px)) => {
                if *px == pixel_data(spec, i) {
                    ok += 1;
                } else {
                    problems.push(format!(
                        "{}: pixel data differs from {}",
                        path.display(),
                        spec.file_name(i)
                    ));
                }
            }
        }
    }
    for p in &problems {
        eprintln!("{p}");
    }
    let sent_bytes: usize = (0..spec.slices).map(|i| ct_slice(spec, i).len()).sum();
    if problems.is_empty() {
        println!(
            "{ok}/{} slices received, pixel data identical (study {} bytes as files; {} other \
             files in {})",
            spec.slices,
            sent_bytes,
            received.len() as u32 - ok + unreadable,
            rx.display()
        );
    } else {
        println!(
            "{ok}/{} slices received intact; {} problems",
            spec.slices,
            problems.len()
        );
    }
    Ok(problems.is_empty())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("shaper-dicom-study: {e:#}");
            return ExitCode::from(2);
        }
    };
    let result = match &args.check {
        Some(rx) => check(&args, rx),
        None => write(&args, args.out.as_deref().expect("checked")).map(|()| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("shaper-dicom-study: {e:#}");
            ExitCode::FAILURE
        }
    }
}
