//! The shipped systemd unit is valid: `systemd-analyze verify` on it, with the binary
//! paths pointed at the binary under test. Skips where systemd-analyze is missing.

use std::process::Command;

#[test]
fn systemd_unit_verifies() {
    let Some(analyze) = shaper_tests::util::which("systemd-analyze") else {
        shaper_tests::util::note_skip("systemd-analyze is not installed");
        return;
    };
    let unit = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shaper-user/systemd/shaper.service");
    let text = std::fs::read_to_string(&unit).expect("read the unit");
    for key in [
        "Type=notify",
        "WatchdogSec=",
        "ExecReload=",
        "CapabilityBoundingSet=",
        "ProtectSystem=strict",
    ] {
        assert!(text.contains(key), "unit lacks {key}");
    }
    let bin = shaper_tests::Shaper::binary_path();
    assert!(
        bin.exists(),
        "build the shaper binary first: {}",
        bin.display()
    );
    let dir = shaper_tests::TempDir::new("unit").expect("temp dir");
    let copy = dir.path().join("shaper.service");
    std::fs::write(
        &copy,
        text.replace("/usr/sbin/shaper", &bin.display().to_string()),
    )
    .expect("write");
    let out = Command::new(analyze)
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("run systemd-analyze");
    let err = String::from_utf8_lossy(&out.stderr);
    // systemd-analyze also reads the machine's other units and warns about them (e.g.
    // Debian's irtt.service runs as `nobody`): not ours to judge.
    let (others, ours): (Vec<&str>, Vec<&str>) =
        err.lines().filter(|l| !l.trim().is_empty()).partition(|l| {
            ["/lib/systemd/", "/usr/lib/systemd/", "/etc/systemd/"]
                .iter()
                .any(|d| l.starts_with(d))
        });
    for l in &others {
        eprintln!("note (another package's unit): {l}");
    }
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify: {}",
        ours.join("\n")
    );
}

/// The unit's sandbox keeps `systemd-analyze security` exposure low (5.9 "MEDIUM" before
/// the hardening of issue 14, 2.6 after). Offline: systemd need not be PID 1 here. Skips
/// where systemd-analyze is missing or too old for `--offline` (systemd < 250).
#[test]
fn systemd_unit_exposure_is_low() {
    let Some(analyze) = shaper_tests::util::which("systemd-analyze") else {
        shaper_tests::util::note_skip("systemd-analyze is not installed");
        return;
    };
    let unit = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shaper-user/systemd/shaper.service");
    // The file name must end in .service: a copy in a directory of its own.
    let dir = shaper_tests::TempDir::new("unit-sec").expect("temp dir");
    let copy = dir.path().join("shaper.service");
    std::fs::copy(&unit, &copy).expect("copy the unit");
    let out = Command::new(analyze)
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&copy)
        .output()
        .expect("run systemd-analyze");
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("--offline") {
        shaper_tests::util::note_skip("systemd-analyze has no --offline (systemd < 250)");
        return;
    }
    let score: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for shaper.service: ")
                .nth(1)
        })
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}\n{err}"));
    println!("systemd-analyze security --offline=yes: exposure {score}");
    assert!(score <= 3.0, "exposure {score}:\n{text}");
}
