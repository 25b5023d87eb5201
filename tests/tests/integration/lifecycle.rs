//! The CLI's lifecycle on a real gateway namespace: apply, re-apply with a changed class
//! set (no stale classes, qdiscs or programs), a failed apply (the previous shaping stays),
//! status, remove (interfaces as found), and the `run` daemon with SIGHUP and SIGTERM.

use std::time::{Duration, Instant};

use shaper_tests::gateway::{tcx_programs, wait_for, write_config};
use shaper_tests::topology::{GW_LAN_IF, GW_WAN_IF, SRV_V4};
use shaper_tests::{probe, skip_unless_ready, Shaper, TempDir, Topology, TOPOLOGY_TOOLS};

use crate::common::{policy_a, policy_b};

/// HTB class ids on `dev` in the gateway, sorted ("1:1", "1:10", ...).
fn classes(topo: &Topology, dev: &str) -> Vec<String> {
    let out = topo
        .gw
        .run("tc", &["class", "show", "dev", dev])
        .expect("tc class show");
    let mut v: Vec<String> = out
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

fn leaf_qdiscs(topo: &Topology, dev: &str) -> usize {
    let out = topo
        .gw
        .run("tc", &["qdisc", "show", "dev", dev])
        .expect("tc qdisc show");
    out.lines().filter(|l| l.contains(" parent 1:")).count()
}

fn status_classes(shaper: &Shaper) -> Vec<String> {
    let v = shaper.status_json().expect("status --json");
    v["directions"][0]["classes"]
        .as_array()
        .expect("classes")
        .iter()
        .filter_map(|c| c["name"].as_str().map(str::to_string))
        .collect()
}

/// Sends UDP to the video ports from the LAN and checks, in `shaper status`, that the
/// classifier put it in the video class and HTB's 1:10 sent it (after `shaper apply`
/// exited: nothing of the shaping may depend on the process).
fn assert_video_classified(topo: &Topology, shaper: &Shaper, round: &str) {
    for _ in 0..5 {
        let _ = probe::udp_echo(&topo.srv, &topo.lan, SRV_V4.into(), 50010);
    }
    let st = shaper.status_json().expect("status");
    let video = &st["directions"][0]["classes"][0];
    assert_eq!(video["name"], "video");
    assert!(
        video["classified_packets"].as_u64().unwrap_or(0) > 0,
        "{round}: video upload classified: {video}"
    );
    assert!(
        video["packets"].as_u64().unwrap_or(0) > 0,
        "{round}: HTB 1:10 sent packets: {video}"
    );
}

#[test]
fn apply_reapply_failed_apply_and_remove() {
    skip_unless_ready!(TOPOLOGY_TOOLS);
    let topo = Topology::build(None).expect("topology");
    let dir = TempDir::new("lifecycle").expect("temp dir");
    let a = write_config(dir.path(), "a.toml", &policy_a().to_toml());
    let b = write_config(dir.path(), "b.toml", &policy_b(10_000_000).to_toml());
    let mut shaper = Shaper::new(&topo.gw).expect("shaper");
    let before = topo.gw_qdiscs().expect("qdiscs");

    shaper.apply(&a).expect("apply A");
    assert_eq!(
        classes(&topo, GW_WAN_IF),
        ["1:1", "1:10", "1:11", "1:2"],
        "A's tree on wan0"
    );
    assert_eq!(
        classes(&topo, GW_LAN_IF),
        ["1:1", "1:10", "1:11", "1:2"],
        "A's tree on lan0"
    );
    assert_eq!(tcx_programs(&topo.gw, GW_WAN_IF), 1);
    assert_eq!(tcx_programs(&topo.gw, GW_LAN_IF), 1);

    // Traffic through the gateway is classified: UDP to the video ports lands in 1:10.
    assert_video_classified(&topo, &shaper, "A");

    // Re-apply with another class set: images gone, bulk added; nothing stale.
    shaper.apply(&b).expect("apply B");
    for dev in [GW_WAN_IF, GW_LAN_IF] {
        assert_eq!(
            classes(&topo, dev),
            ["1:1", "1:10", "1:12", "1:2"],
            "B's tree on {dev}"
        );
        assert_eq!(leaf_qdiscs(&topo, dev), 3, "one leaf per class on {dev}");
        assert_eq!(
            tcx_programs(&topo.gw, dev),
            1,
            "still exactly one classifier on {dev}"
        );
    }
    assert_eq!(status_classes(&shaper), ["video", "default", "bulk"]);
    let pins: Vec<String> = std::fs::read_dir(shaper.bpffs_dir())
        .expect("pin dir")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        // The `[calls]` drop tracer's link, where the kernel has BTF.
        .filter(|p| p != "link_drops")
        .collect();
    let mut pins_sorted = pins.clone();
    pins_sorted.sort();
    assert_eq!(
        pins_sorted,
        ["link_lan", "link_wan", "maps"],
        "no staged or old map sets left"
    );

    // A failed apply (fault injected after the trees were changed) leaves B in place.
    let tree_b = topo
        .gw
        .run("tc", &["class", "show", "dev", GW_WAN_IF])
        .expect("tc");
    let out = shaper
        .command(&[std::ffi::OsStr::new("apply"), a.as_os_str()])
        .env("SHAPER_FAULT", "after-trees")
        .output()
        .expect("run apply");
    assert!(
        !out.status.success(),
        "an injected fault must fail the apply"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("previous shaping is back"), "{err}");
    assert_eq!(
        topo.gw
            .run("tc", &["class", "show", "dev", GW_WAN_IF])
            .expect("tc"),
        tree_b
    );
    assert_eq!(
        status_classes(&shaper),
        ["video", "default", "bulk"],
        "state still B"
    );
    assert_eq!(tcx_programs(&topo.gw, GW_WAN_IF), 1);

    // A config naming a missing interface changes nothing either.
    let bad = write_config(dir.path(), "bad.toml", &policy_a().lan("nosuch0").to_toml());
    let out = shaper
        .command(&[std::ffi::OsStr::new("apply"), bad.as_os_str()])
        .output()
        .expect("run apply");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
    assert_eq!(
        topo.gw
            .run("tc", &["class", "show", "dev", GW_WAN_IF])
            .expect("tc"),
        tree_b
    );

    shaper.remove().expect("remove");
    assert_eq!(
        topo.gw_qdiscs().expect("qdiscs"),
        before,
        "interfaces as found"
    );
    assert_eq!(tcx_programs(&topo.gw, GW_WAN_IF), 0);
    assert_eq!(tcx_programs(&topo.gw, GW_LAN_IF), 0);
    assert!(
        shaper.leftover_pins().is_empty(),
        "pins left: {:?}",
        shaper.leftover_pins()
    );
    let st = shaper.command(&["status"]).output().expect("status");
    assert_eq!(st.status.code(), Some(3), "status says not applied");
}

/// The BPF filters on `dev`'s clsact egress in the gateway (`tc filter show` prints each
/// as a chain line and a line naming the program: the latter).
fn clsact_filters(topo: &Topology, dev: &str) -> Vec<String> {
    topo.gw
        .run("tc", &["filter", "show", "dev", dev, "egress"])
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(" bpf ") && l.contains(" handle "))
        .map(str::to_string)
        .collect()
}

/// The attach path of kernels before 6.6 (Debian 12's 6.1): a direct-action cls_bpf filter
/// on clsact through netlink, forced here on the host's kernel. The filter must outlive
/// `shaper apply`, classify, be replaced in place by a re-apply (still one), and go with
/// `remove`. (aya 0.14 deletes a netlink filter when a handle to it is dropped: a handle
/// made but unused once deleted the filter just added, so nothing classified.)
#[test]
fn legacy_clsact_attach_classifies_after_apply_exits() {
    skip_unless_ready!(TOPOLOGY_TOOLS);
    let topo = Topology::build(None).expect("topology");
    let dir = TempDir::new("clsact").expect("temp dir");
    let a = write_config(dir.path(), "a.toml", &policy_a().to_toml());
    let b = write_config(dir.path(), "b.toml", &policy_b(10_000_000).to_toml());
    let mut shaper = Shaper::new(&topo.gw).expect("shaper");
    shaper.set_env("SHAPER_ATTACH", "netlink");
    let before = topo.gw_qdiscs().expect("qdiscs");
    for (round, cfg) in [("A", &a), ("B, in place", &b)] {
        shaper.apply(cfg).expect("apply");
        for dev in [GW_WAN_IF, GW_LAN_IF] {
            let f = clsact_filters(&topo, dev);
            assert_eq!(f.len(), 1, "{round}: one classifier filter on {dev}: {f:?}");
            assert!(f[0].contains("direct-action"), "{f:?}");
            assert_eq!(tcx_programs(&topo.gw, dev), 0, "no TCX program on {dev}");
        }
        assert_video_classified(&topo, &shaper, round);
    }
    shaper.remove().expect("remove");
    for dev in [GW_WAN_IF, GW_LAN_IF] {
        assert!(
            clsact_filters(&topo, dev).is_empty(),
            "filter left on {dev}"
        );
    }
    assert_eq!(
        topo.gw_qdiscs().expect("qdiscs"),
        before,
        "interfaces as found (clsact removed)"
    );
    assert!(shaper.leftover_pins().is_empty());
}

#[test]
fn run_daemon_reloads_on_sighup_and_cleans_up_on_sigterm() {
    skip_unless_ready!(TOPOLOGY_TOOLS);
    let topo = Topology::build(None).expect("topology");
    let dir = TempDir::new("daemon").expect("temp dir");
    let cfg = write_config(dir.path(), "site.toml", &policy_a().to_toml());
    let shaper = Shaper::new(&topo.gw).expect("shaper");
    let before = topo.gw_qdiscs().expect("qdiscs");
    let mut child = shaper
        .command(&[std::ffi::OsStr::new("run"), cfg.as_os_str()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start daemon");
    let pid = child.id() as i32;
    let kill = |sig| {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid, sig) };
    };
    wait_for("the daemon to apply", Duration::from_secs(20), || {
        classes(&topo, GW_WAN_IF).len() == 4
    });
    wait_for("status", Duration::from_secs(10), || {
        shaper.status_json().is_ok()
    });
    assert_eq!(status_classes(&shaper), ["video", "images", "default"]);

    std::fs::write(&cfg, policy_b(10_000_000).to_toml()).expect("rewrite config");
    kill(libc::SIGHUP);
    // The reload is over when its state is committed too (the tree changes before).
    wait_for("the reload", Duration::from_secs(20), || {
        classes(&topo, GW_WAN_IF).contains(&"1:12".to_string())
            && status_classes(&shaper) == ["video", "default", "bulk"]
    });

    // A broken config on reload is refused; B stays.
    // Inline TOML: the test is about a file that does not parse.
    std::fs::write(&cfg, "[interfaces]\nwan = 3\n").expect("rewrite config");
    kill(libc::SIGHUP);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(status_classes(&shaper), ["video", "default", "bulk"]);
    assert!(
        child.try_wait().expect("wait").is_none(),
        "daemon survives a bad reload"
    );

    kill(libc::SIGTERM);
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "daemon did not exit on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "clean exit: {status}");
    assert_eq!(
        topo.gw_qdiscs().expect("qdiscs"),
        before,
        "shaping removed on exit"
    );
    assert!(shaper.leftover_pins().is_empty());
}
