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

/// The Debian package (`cargo xtask deb`, which `cargo xtask test` builds and names in
/// `SHAPER_DEB`): installed on this machine with dpkg, the unit as installed verified, the
/// shipped example copied to /etc/shaper/shaper.toml as a site would, the unit's
/// `ExecStartPre=` and `ExecStart=` lines run as written in a lab gateway namespace with
/// systemd's notify socket and watchdog variables (systemd is not PID 1 on the build
/// machine, so it cannot start the unit itself), shaping checked, stopped, purged.
#[test]
fn debian_package_installs_starts_and_purges() {
    use shaper_tests::{skip_unless_ready, TOPOLOGY_TOOLS};
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    skip_unless_ready!(TOPOLOGY_TOOLS);
    let Some(deb) = std::env::var_os("SHAPER_DEB").filter(|v| !v.is_empty()) else {
        shaper_tests::util::note_skip(
            "SHAPER_DEB is not set (`cargo xtask test` builds the package and sets it)",
        );
        return;
    };
    for tool in ["dpkg", "dpkg-deb"] {
        assert!(
            shaper_tests::util::which(tool).is_some(),
            "{tool} is missing: run `cargo xtask setup`"
        );
    }
    let run = |prog: &str, args: &[&std::ffi::OsStr]| -> std::process::Output {
        Command::new(prog)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{prog}: {e}"))
    };
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    let deb = std::path::PathBuf::from(deb);
    assert!(
        !run("dpkg", &["-s".as_ref(), "shaper".as_ref()])
            .status
            .success(),
        "a package named shaper is installed on this machine already: not touching it"
    );

    // What is in it.
    let contents = text(&run("dpkg-deb", &["--contents".as_ref(), deb.as_os_str()]));
    for path in [
        "./usr/sbin/shaper",
        "./lib/systemd/system/shaper.service",
        "./usr/share/doc/shaper/examples/gp-surgery-fttc-40-10.toml",
        "./usr/share/man/man8/shaper.8.gz",
        "./usr/share/man/man8/shaper-check.8.gz",
        "./usr/share/bash-completion/completions/shaper",
        "./usr/share/zsh/vendor-completions/_shaper",
        "./usr/share/fish/vendor_completions.d/shaper.fish",
    ] {
        assert!(
            contents.lines().any(|l| l.ends_with(path)),
            "{path} not in the package:\n{contents}"
        );
    }
    assert!(
        !contents.contains(" ./etc/"),
        "the package ships no file under /etc (a site writes its own config):\n{contents}"
    );
    let depends = text(&run(
        "dpkg-deb",
        &["--field".as_ref(), deb.as_os_str(), "Depends".as_ref()],
    ));
    assert!(depends.contains("libc6"), "Depends: {depends}");

    // Installed for real; purged (and the config removed) however the test ends.
    struct Purge;
    impl Drop for Purge {
        fn drop(&mut self) {
            let _ = std::fs::remove_file("/etc/shaper/shaper.toml");
            let _ = Command::new("dpkg")
                .args(["--purge", "shaper"])
                .stdout(Stdio::null())
                .status();
        }
    }
    let purge = Purge;
    let out = run("dpkg", &["-i".as_ref(), deb.as_os_str()]);
    assert!(out.status.success(), "dpkg -i: {}", text(&out));
    let status = text(&run("dpkg", &["-s".as_ref(), "shaper".as_ref()]));
    assert!(status.contains("Status: install ok installed"), "{status}");
    let version = text(&run("/usr/sbin/shaper", &["--version".as_ref()]));
    assert!(version.starts_with("shaper "), "{version}");
    let wants = std::path::Path::new("/etc/systemd/system/multi-user.target.wants/shaper.service");
    if shaper_tests::util::which("deb-systemd-helper").is_some() {
        assert!(
            wants.exists(),
            "postinst enables the unit (deb-systemd-helper)"
        );
    }
    let unit_path = std::path::Path::new("/lib/systemd/system/shaper.service");
    let unit = std::fs::read_to_string(unit_path).expect("the installed unit");
    if let Some(analyze) = shaper_tests::util::which("systemd-analyze") {
        let out = Command::new(analyze)
            .arg("verify")
            .arg(unit_path)
            .output()
            .expect("systemd-analyze");
        let err = String::from_utf8_lossy(&out.stderr);
        let ours: Vec<&str> = err.lines().filter(|l| l.contains("shaper")).collect();
        assert!(
            out.status.success() && ours.is_empty(),
            "systemd-analyze verify (installed unit): {err}"
        );
    }

    // Configured as a site would (the shipped example), then started as the unit says.
    assert!(
        unit.contains("ConditionPathExists=/etc/shaper/shaper.toml"),
        "an unconfigured install is skipped, not restarted in a loop"
    );
    std::fs::create_dir_all("/etc/shaper").expect("/etc/shaper");
    std::fs::copy(
        "/usr/share/doc/shaper/examples/gp-surgery-fttc-40-10.toml",
        "/etc/shaper/shaper.toml",
    )
    .expect("copy the example");
    let line = |key: &str| -> Vec<String> {
        unit.lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("the unit has no {key}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    let (pre, start) = (line("ExecStartPre="), line("ExecStart="));
    assert_eq!(pre[0], "/usr/sbin/shaper");
    assert_eq!(start[0], "/usr/sbin/shaper");

    let ns = shaper_tests::gateway::wan_lan_gateway("deb");
    let dir = shaper_tests::TempDir::new("deb").expect("dir");
    // The pins and run directory of this test's own (the unit's are /sys/fs/bpf/shaper and
    // /run/shaper, which another shaper on this machine may use).
    let bpffs =
        std::path::Path::new("/sys/fs/bpf").join(format!("shaper-deb-{}", std::process::id()));
    let envs = [
        ("SHAPER_BPFFS", bpffs.clone().into_os_string()),
        ("SHAPER_RUN", dir.path().join("run").into_os_string()),
    ];
    let out = ns
        .cmd(&pre[0], &pre[1..])
        .envs(envs.iter().cloned())
        .output()
        .expect("ExecStartPre");
    assert!(out.status.success(), "ExecStartPre: {}", text(&out));

    let sock_path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).expect("notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut child = ns
        .cmd(&start[0], &start[1..])
        .envs(envs.iter().cloned())
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "30000000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ExecStart");
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    let t0 = Instant::now();
    while !got.iter().any(|m: &String| m == "READY=1") && t0.elapsed() < Duration::from_secs(15) {
        match sock.recv(&mut buf) {
            Ok(n) => got.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(_) => break,
        }
    }
    let qdiscs = ns
        .run("tc", &["qdisc", "show", "dev", "wan0"])
        .unwrap_or_default();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t0 = Instant::now();
    let exited = loop {
        if let Ok(Some(s)) = child.try_wait() {
            break Some(s);
        }
        if t0.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = std::fs::remove_dir(&bpffs);
    assert!(
        got.iter().any(|m| m == "READY=1"),
        "notify messages: {got:?}"
    );
    assert!(
        qdiscs.contains("htb 1: root"),
        "wan0 after READY=1: {qdiscs}"
    );
    assert!(
        exited.is_some_and(|s| s.success()),
        "the daemon stops cleanly on SIGTERM: {exited:?}"
    );

    drop(purge);
    assert!(
        !run("dpkg", &["-s".as_ref(), "shaper".as_ref()])
            .status
            .success(),
        "purged"
    );
    assert!(!std::path::Path::new("/usr/sbin/shaper").exists());
    assert!(!unit_path.exists());
    assert!(!wants.exists(), "purge removes the enable link");
}
