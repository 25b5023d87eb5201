//! The corpus of malformed configs in `tests/fixtures/bad-configs/`: every file must be
//! refused, by the validator in-process (`shaper_user::config::load`) with the line, field
//! and message its header names, and by the real binary (`shaper check --offline FILE`) with a
//! non-zero exit and `FILE:LINE` on stderr. The shipped example config must pass both.
//!
//! Each fixture is `NN-short-name.toml` and starts with comment lines:
//!
//! ```text
//! # expect-line: 43            (1-based; `none` when no line is meaningful)
//! # expect: prefix length must be 0-32      (a substring of the message)
//! # expect-field: rule[0].dst_cidrs         (optional; absent = the error names no field)
//! ```
//!
//! No root needed: `check --offline` reads the file and touches nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

use shaper_tests::{Shaper, TempDir};

const MIN_CASES: usize = 30;

#[derive(Debug)]
struct Fixture {
    path: PathBuf,
    /// `None` for `expect-line: none`.
    line: Option<usize>,
    message: String,
    field: Option<String>,
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/bad-configs")
}

fn good_config() -> PathBuf {
    workspace().join("shaper-user/config/gp-surgery-fttc-40-10.toml")
}

/// Reads one fixture's expectations from its leading comment lines.
fn parse_fixture(path: &Path) -> Result<Fixture, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let (mut line, mut message, mut field) = (None, None, None);
    for l in text.lines().take_while(|l| l.starts_with('#')) {
        let Some((key, value)) = l.trim_start_matches('#').trim().split_once(':') else {
            continue;
        };
        let value = value.trim().to_string();
        match key.trim() {
            "expect-line" => line = Some(value),
            "expect" => message = Some(value),
            "expect-field" => field = Some(value),
            _ => {}
        }
    }
    let name = path.display();
    let line = match line.as_deref() {
        None => return Err(format!("{name}: no `# expect-line:` header")),
        Some("none") => None,
        Some(n) => Some(
            n.parse::<usize>()
                .ok()
                .filter(|&n| n >= 1)
                .ok_or_else(|| format!("{name}: `expect-line: {n}` is not a line number"))?,
        ),
    };
    let message = message
        .filter(|m| !m.is_empty())
        .ok_or_else(|| format!("{name}: no (or an empty) `# expect:` header"))?;
    if let Some(n) = line {
        // The line the error must point at is part of the config, not the header.
        let at = text.lines().nth(n - 1).unwrap_or_default().trim();
        if at.is_empty() || at.starts_with('#') {
            return Err(format!(
                "{name}: expect-line {n} is {at:?}, not a line of the config"
            ));
        }
    }
    Ok(Fixture {
        path: path.to_path_buf(),
        line,
        message,
        field: field.filter(|f| !f.is_empty()),
    })
}

/// Every fixture, sorted by name; panics on a malformed corpus.
fn fixtures() -> Vec<Fixture> {
    let dir = fixtures_dir();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    let mut problems = Vec::new();
    let mut numbers = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for p in &paths {
        let file = p.file_name().unwrap_or_default().to_string_lossy();
        let number = file
            .split_once('-')
            .filter(|(n, rest)| {
                n.len() >= 2 && n.bytes().all(|b| b.is_ascii_digit()) && rest.len() > ".toml".len()
            })
            .map(|(n, _)| n.to_string());
        match number {
            Some(n) if !numbers.insert(n.clone()) => {
                problems.push(format!("{file}: number {n} is used twice"))
            }
            Some(_) => {}
            None => problems.push(format!("{file}: not named NN-short-name.toml")),
        }
        match parse_fixture(p) {
            Ok(f) => out.push(f),
            Err(e) => problems.push(e),
        }
    }
    assert!(
        problems.is_empty(),
        "malformed corpus:\n- {}",
        problems.join("\n- ")
    );
    out
}

#[test]
fn corpus_has_enough_cases() {
    let n = fixtures().len();
    assert!(
        n >= MIN_CASES,
        "{} holds {n} bad configs; at least {MIN_CASES} are expected",
        fixtures_dir().display()
    );
}

#[test]
fn validator_rejects_every_fixture_at_the_expected_line_and_field() {
    let mut problems = Vec::new();
    let all = fixtures();
    for f in &all {
        let name = f.path.file_name().unwrap_or_default().to_string_lossy();
        let e = match shaper_user::config::load(&f.path) {
            Ok(_) => {
                problems.push(format!("{name}: accepted"));
                continue;
            }
            Err(e) => e,
        };
        let shown = e.to_string();
        if e.line != f.line {
            problems.push(format!(
                "{name}: line {:?}, expected {:?}: {shown}",
                e.line, f.line
            ));
        }
        if !e.message.contains(&f.message) {
            problems.push(format!(
                "{name}: the message does not contain {:?}: {shown}",
                f.message
            ));
        }
        let want_field = f.field.as_deref().unwrap_or("");
        if e.field != want_field {
            problems.push(format!(
                "{name}: field {:?}, expected {want_field:?}: {shown}",
                e.field
            ));
        }
        if e.file != f.path {
            problems.push(format!("{name}: names the file {}", e.file.display()));
        }
        if e.message.contains('\n') {
            problems.push(format!(
                "{name}: the message runs over several lines: {shown}"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{} of {} bad configs not refused as expected:\n- {}",
        problems.len(),
        all.len(),
        problems.join("\n- ")
    );
}

/// `shaper check --offline FILE` with the state directories pointed at paths that must stay
/// absent (check touches nothing) and the log level fixed (errors go through the logger).
fn check_offline(file: &Path, state: &Path) -> std::process::Output {
    let bin = Shaper::binary_path();
    assert!(
        bin.is_file(),
        "shaper binary not found at {} (build it with `cargo build -p shaper-user`, or set SHAPER_BIN)",
        bin.display()
    );
    Command::new(&bin)
        .args([
            std::ffi::OsStr::new("check"),
            std::ffi::OsStr::new("--offline"),
            file.as_os_str(),
        ])
        .env("SHAPER_BPFFS", state.join("bpffs"))
        .env("SHAPER_RUN", state.join("run"))
        .env("RUST_LOG", "info")
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()))
}

#[test]
fn binary_check_offline_rejects_every_fixture_naming_file_and_line() {
    let state = TempDir::new("bad-configs").expect("temp dir");
    let mut problems = Vec::new();
    let all = fixtures();
    for f in &all {
        let name = f.path.file_name().unwrap_or_default().to_string_lossy();
        let out = check_offline(&f.path, state.path());
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        if out.status.success() {
            problems.push(format!("{name}: exited 0: {stdout}"));
            continue;
        }
        let file = f.path.display().to_string();
        match f.line {
            Some(n) => {
                if !stderr.contains(&format!("{file}:{n}:")) {
                    problems.push(format!("{name}: stderr does not name {file}:{n}: {stderr}"));
                }
            }
            None => {
                let names_a_line = stderr.match_indices(&format!("{file}:")).any(|(i, m)| {
                    stderr[i + m.len()..]
                        .chars()
                        .next()
                        .is_some_and(|c| c.is_ascii_digit())
                });
                if !stderr.contains(&format!("{file}:")) || names_a_line {
                    problems.push(format!(
                        "{name}: stderr should name {file} without a line: {stderr}"
                    ));
                }
            }
        }
        if !stderr.contains(&f.message) {
            problems.push(format!(
                "{name}: stderr does not contain {:?}: {stderr}",
                f.message
            ));
        }
        if let Some(field) = &f.field {
            if !stderr.contains(&format!("`{field}`")) {
                problems.push(format!("{name}: stderr does not name `{field}`: {stderr}"));
            }
        }
    }
    for d in ["bpffs", "run"] {
        if state.path().join(d).exists() {
            problems.push(format!("check --offline created {d} state"));
        }
    }
    assert!(
        problems.is_empty(),
        "`shaper check --offline` on {} bad configs:\n- {}",
        all.len(),
        problems.join("\n- ")
    );
}

#[test]
fn the_shipped_example_config_passes() {
    let good = good_config();
    shaper_user::config::load(&good).unwrap_or_else(|e| panic!("validator refused it: {e}"));
    let state = TempDir::new("good-config").expect("temp dir");
    let out = check_offline(&good, state.path());
    assert!(
        out.status.success(),
        "`shaper check --offline {}` failed: {}\n{}",
        good.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(": OK"),
        "no OK line: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}
