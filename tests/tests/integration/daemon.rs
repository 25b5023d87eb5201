//! Unattended operation: commit-confirmed rollback, and the `run` daemon waiting for
//! interfaces that do not exist yet and restoring shaping on a re-created interface.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use shaper_tests::config::Config;
use shaper_tests::gateway::{add_veth, wait_for, wan_lan_gateway, write_config};
use shaper_tests::{skip_unless_ready, Netns, Shaper, TempDir, TOPOLOGY_TOOLS};

/// 10/40 Mbit/s on wan0/lan0, the classes (name, guaranteed %) at priorities 0, 1, ... in
/// that order; the one named `default` is the default class. No rules.
fn config(classes: &[(&str, u32)]) -> Config {
    let mut c = Config::new(10_000_000, 40_000_000);
    for (i, &(name, pct)) in classes.iter().enumerate() {
        let priority = i as u8;
        c = if name == "default" {
            c.default_class(name, priority, pct)
        } else {
            c.class(name, priority, pct)
        };
    }
    c
}

fn gateway() -> Netns {
    wan_lan_gateway("gwd")
}

fn shaped(ns: &Netns, dev: &str) -> bool {
    ns.run("tc", &["qdisc", "show", "dev", dev])
        .is_ok_and(|o| o.contains("htb 1: root"))
}

fn class_names(shaper: &Shaper) -> Option<Vec<String>> {
    let v = shaper.status_json().ok()?;
    Some(
        v["directions"][0]["classes"]
            .as_array()?
            .iter()
            .filter_map(|c| c["name"].as_str().map(str::to_string))
            .collect(),
    )
}

fn apply_confirm(shaper: &Shaper, cfg: &Path, within: &str) {
    let out = shaper
        .command(&[
            OsStr::new("apply"),
            OsStr::new("--confirm-within"),
            OsStr::new(within),
            cfg.as_os_str(),
        ])
        .output()
        .expect("apply");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn commit_confirmed_rolls_back_unless_confirmed() {
    skip_unless_ready!(TOPOLOGY_TOOLS);
    let ns = gateway();
    let dir = TempDir::new("confirm").expect("dir");
    let a = write_config(
        dir.path(),
        "a.toml",
        &config(&[("video", 20), ("default", 20)]).to_toml(),
    );
    let b = write_config(
        dir.path(),
        "b.toml",
        &config(&[("video", 30), ("images", 30), ("default", 20)]).to_toml(),
    );
    let mut shaper = Shaper::new(&ns).expect("shaper");
    let before = ns.run("tc", &["qdisc", "show"]).expect("tc");

    shaper.apply(&a).expect("apply A");
    // Unconfirmed B goes back to A.
    apply_confirm(&shaper, &b, "2s");
    assert_eq!(
        class_names(&shaper).expect("status"),
        ["video", "images", "default"]
    );
    wait_for("the rollback to A", Duration::from_secs(10), || {
        class_names(&shaper).is_some_and(|c| c == ["video", "default"])
    });
    // Edit a.toml afterwards: the rollback used the text as applied, not the file.
    std::fs::write(&a, "garbage").expect("overwrite");

    // Confirmed B stays.
    apply_confirm(&shaper, &b, "2s");
    let out = shaper.command(&["confirm"]).output().expect("confirm");
    assert!(out.status.success());
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        class_names(&shaper).expect("status"),
        ["video", "images", "default"]
    );

    // With nothing confirmed before, an unconfirmed apply rolls back to no shaping.
    shaper.remove().expect("remove");
    apply_confirm(&shaper, &b, "2s");
    assert!(shaped(&ns, "wan0"));
    wait_for(
        "the rollback to no shaping",
        Duration::from_secs(10),
        || !shaped(&ns, "wan0"),
    );
    wait_for("state cleared", Duration::from_secs(5), || {
        class_names(&shaper).is_none()
    });
    assert_eq!(ns.run("tc", &["qdisc", "show"]).expect("tc"), before);
    assert!(shaper.leftover_pins().is_empty());
}

struct Daemon(Child);
impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(shaper: &Shaper, cfg: &Path) -> Daemon {
    Daemon(
        shaper
            .command(&[OsStr::new("run"), cfg.as_os_str()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start daemon"),
    )
}

#[test]
fn daemon_waits_for_interfaces_and_restores_a_recreated_one() {
    skip_unless_ready!(TOPOLOGY_TOOLS);
    let ns = Netns::new("gwd").expect("netns");
    add_veth(&ns, "wan0", "wanp");
    let dir = TempDir::new("daemon-if").expect("dir");
    let cfg = write_config(
        dir.path(),
        "site.toml",
        &config(&[("video", 20), ("default", 20)]).to_toml(),
    );
    let shaper = Shaper::new(&ns).expect("shaper");
    let mut d = start(&shaper, &cfg);

    // lan0 does not exist yet: the daemon waits instead of exiting.
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        d.0.try_wait().expect("wait").is_none(),
        "daemon must wait for lan0"
    );
    assert!(!shaped(&ns, "wan0"));
    add_veth(&ns, "lan0", "lanp");
    let t = wait_for("shaping once lan0 exists", Duration::from_secs(5), || {
        shaped(&ns, "wan0") && shaped(&ns, "lan0")
    });
    eprintln!("shaping {t:?} after lan0 appeared");

    // Link down/up keeps the shaping.
    ns.ip(&["link", "set", "lan0", "down"]).expect("down");
    ns.ip(&["link", "set", "lan0", "up"]).expect("up");
    std::thread::sleep(Duration::from_millis(500));
    assert!(shaped(&ns, "lan0"));

    // The interface is deleted and created again (a modem re-plugged): restored (within
    // RESTORE_BOUND; the time is printed).
    for round in 0..3 {
        ns.ip(&["link", "del", "wan0"]).expect("del");
        std::thread::sleep(Duration::from_millis(300));
        add_veth(&ns, "wan0", "wanp");
        let t = wait_for(
            "shaping on the re-created wan0",
            shaper_tests::gateway::RESTORE_BOUND,
            || shaped(&ns, "wan0"),
        );
        eprintln!("round {round}: re-created wan0 shaped again after {t:?}");
    }
    // Someone deletes our root qdisc: put back too.
    ns.run("tc", &["qdisc", "del", "dev", "lan0", "root"])
        .expect("tc del");
    let t = wait_for(
        "the root qdisc put back",
        shaper_tests::gateway::RESTORE_BOUND,
        || shaped(&ns, "lan0"),
    );
    eprintln!("deleted root qdisc restored after {t:?}");
    assert_eq!(class_names(&shaper).expect("status"), ["video", "default"]);
    assert!(
        d.0.try_wait().expect("wait").is_none(),
        "daemon still running"
    );

    // SIGTERM: clean exit, shaping removed.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(d.0.id() as i32, libc::SIGTERM) };
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = d.0.try_wait().expect("wait") {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "no exit on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success());
    assert!(!shaped(&ns, "wan0") && !shaped(&ns, "lan0"));
    assert!(shaper.leftover_pins().is_empty());
}

#[test]
fn daemon_speaks_the_systemd_notify_protocol() {
    skip_unless_ready!(TOPOLOGY_TOOLS);
    let ns = gateway();
    let dir = TempDir::new("notify").expect("dir");
    let cfg = write_config(
        dir.path(),
        "site.toml",
        &config(&[("video", 20), ("default", 20)]).to_toml(),
    );
    let sock_path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).expect("bind notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let shaper = Shaper::new(&ns).expect("shaper");
    let child = shaper
        .command(&[OsStr::new("run"), cfg.as_os_str()])
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "200000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start daemon");
    let d = Daemon(child);
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    let t0 = Instant::now();
    while !(got.iter().any(|m: &String| m == "READY=1")
        && got.iter().filter(|m| *m == "WATCHDOG=1").count() >= 2)
    {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "messages so far: {got:?}"
        );
        let n = sock.recv(&mut buf).expect("notify message");
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(
        shaped(&ns, "wan0"),
        "READY=1 comes after the shaping is in place"
    );
    drop(d); // SIGTERM
    let mut rest = Vec::new();
    while let Ok(n) = sock.recv(&mut buf) {
        rest.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        if rest.iter().any(|m| m == "STOPPING=1") {
            break;
        }
    }
    assert!(
        rest.iter().any(|m| m == "STOPPING=1"),
        "after SIGTERM: {rest:?}"
    );
}

#[test]
fn top_refreshes_and_logs_carry_journald_priorities() {
    skip_unless_ready!(TOPOLOGY_TOOLS);
    let ns = gateway();
    let dir = TempDir::new("top").expect("dir");
    let cfg = write_config(
        dir.path(),
        "site.toml",
        &config(&[("video", 20), ("default", 20)]).to_toml(),
    );
    let mut shaper = Shaper::new(&ns).expect("shaper");
    // Under systemd the log lines carry their syslog priority.
    let out = shaper
        .command(&[OsStr::new("apply"), cfg.as_os_str()])
        .env("JOURNAL_STREAM", "8:12345")
        .output()
        .expect("apply");
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.lines().any(|l| l.starts_with("<6>applied")), "{err}");
    shaper.apply(&cfg).expect("apply through the driver too");

    let out = shaper
        .command(&["top", "--count", "2", "--interval", "0.3"])
        .output()
        .expect("top");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("----").count(), 2, "two frames: {text}");
    assert_eq!(text.matches("upload on wan0").count(), 2, "{text}");
    assert!(text.contains("video"), "{text}");
    shaper.remove().expect("remove");
}

/// One capability set of a task, from /proc/<pid>/task/<tid>/status (`CapEff` etc.).
fn cap_set(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or_else(|| panic!("no {key} in {status}"))
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_NET_RAW: u32 = 13;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// CapEff, CapPrm, CapBnd and CapAmb of every thread of `pid`, by thread id.
fn thread_caps(pid: u32) -> Vec<(String, [u64; 4])> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks") {
        let t = t.expect("task").path();
        let Ok(status) = std::fs::read_to_string(t.join("status")) else {
            continue; // the thread has just ended
        };
        let sets = ["CapEff", "CapPrm", "CapBnd", "CapAmb"].map(|k| cap_set(&status, k));
        out.push((t.display().to_string(), sets));
    }
    out
}

/// Once it shapes, `shaper run` holds only what it still needs: CAP_NET_RAW goes without
/// [autorate] (from every set of every thread) and stays with it; a reload and a repair
/// still work without it (CAP_SYS_ADMIN stays for the qdisc probe every apply makes).
#[test]
fn daemon_drops_the_capabilities_it_no_longer_needs() {
    skip_unless_ready!(TOPOLOGY_TOOLS);
    let ns = gateway();
    let dir = TempDir::new("caps").expect("dir");
    let cfg = write_config(
        dir.path(),
        "site.toml",
        &config(&[("video", 20), ("default", 20)]).to_toml(),
    );
    let shaper = Shaper::new(&ns).expect("shaper");
    let d = shaper_tests::shaper::Daemon::start(
        &shaper,
        &cfg,
        dir.path().join("run.log"),
        "info,shaper_user::kernel::tc=debug",
    )
    .expect("start `shaper run`");
    let has = |set: u64, cap: u32| set & (1 << cap) != 0;
    // The drop follows the first apply at once; `status` may answer a moment before.
    let t0 = Instant::now();
    let last = loop {
        let caps = thread_caps(d.pid());
        if caps
            .iter()
            .all(|(_, s)| s.iter().all(|&set| !has(set, CAP_NET_RAW)))
        {
            break caps;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "CAP_NET_RAW still held without [autorate] (CapEff, CapPrm, CapBnd, CapAmb per thread): {caps:x?}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    for (task, [eff, ..]) in &last {
        for cap in [CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF] {
            assert!(has(*eff, cap), "{task} lost capability {cap}: {eff:x}");
        }
    }
    assert!(
        d.log().contains("dropped") && d.log().contains("CAP_NET_RAW"),
        "{}",
        d.log()
    );

    // A reload still applies, and its qdisc probe (in a private network namespace: needs
    // CAP_SYS_ADMIN) still runs: the same leaves as before.
    let leaves = || {
        let out = ns.run("tc", &["qdisc", "show", "dev", "wan0"]).expect("tc");
        let mut kinds: Vec<String> = out
            .lines()
            .filter(|l| l.contains(" parent "))
            .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
            .collect();
        kinds.sort();
        kinds
    };
    let before = leaves();
    write_config(
        dir.path(),
        "site.toml",
        &config(&[("video", 30), ("default", 20)]).to_toml(),
    );
    // SAFETY: signalling our own child.
    unsafe { libc::kill(d.pid() as i32, libc::SIGHUP) };
    wait_for("the reload", Duration::from_secs(5), || {
        d.log().contains("reloaded")
    });
    let log = d.log();
    assert_eq!(
        log.matches("tc probe: qdisc kind fq_codel").count(),
        2,
        "a probe at start and one at the reload:\n{log}"
    );
    assert!(!log.contains("ERROR"), "{log}");
    assert_eq!(leaves(), before, "{log}");
    // A deleted root is still put back.
    ns.run("tc", &["qdisc", "del", "dev", "lan0", "root"])
        .expect("tc del");
    wait_for(
        "the root qdisc put back",
        shaper_tests::gateway::RESTORE_BOUND,
        || shaped(&ns, "lan0"),
    );
    let (status, log) = d.stop().expect("stop");
    assert!(status.success(), "{log}");
    assert!(!log.contains("ERROR"), "{log}");

    // With [autorate] CAP_NET_RAW stays (its raw ICMP socket).
    let cfg = write_config(
        dir.path(),
        "autorate.toml",
        &config(&[("video", 20), ("default", 20)])
            .autorate(&["192.0.2.1"], "video")
            .to_toml(),
    );
    let d = shaper_tests::shaper::Daemon::start(&shaper, &cfg, dir.path().join("ar.log"), "info")
        .expect("start `shaper run` with autorate");
    wait_for("autorate on", Duration::from_secs(5), || {
        d.log().contains("autorate on")
    });
    let (_, [eff, ..]) = thread_caps(d.pid()).swap_remove(0);
    assert!(has(eff, CAP_NET_RAW), "{eff:x}\n{}", d.log());
    let (status, log) = d.stop().expect("stop");
    assert!(status.success(), "{log}");
}
