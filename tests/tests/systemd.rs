//! The shipped systemd unit is valid: `systemd-analyze verify` on it, with the binary
//! paths pointed at the binary under test. Skips where systemd-analyze is missing.

use std::process::Command;

#[test]
fn systemd_unit_verifies() {
    let Some(analyze) = shaper_tests::util::which("systemd-analyze") else {
        eprintln!("SKIP: systemd-analyze is not installed");
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
    assert!(
        out.status.success() && err.trim().is_empty(),
        "systemd-analyze verify: {err}"
    );
}
