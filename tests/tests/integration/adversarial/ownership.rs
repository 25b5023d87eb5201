//! One owner of the kernel state, and autorate that cannot be steered from outside.
//!
//! - A second `shaper run` is refused; an `apply` beside the running daemon is followed by
//!   it (a DNS answer afterwards is learned into the live maps); removed pins (the
//!   classifier's link, a map) are restored; a truncated or old-version state file is
//!   recovered from; a SIGHUP with the file unchanged, or a daemon killed and started
//!   again, resets no flow and no counter.
//! - ICMP timestamp replies forged by another host on the WAN side (every sequence number,
//!   a huge "queue") do not cut the rates.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::Value;
use shaper_tests::gateway::{tcx_programs, wait_for, write_config};
use shaper_tests::hostlab::{
    class_counters, dig, media_exchange, start_daemon, start_dnsmasq, status, stop_daemon, Echo,
    DNS_TOOLS, MEDIA_NAME,
};
use shaper_tests::shaper::Daemon;
use shaper_tests::topology::{GW_LAN_IF, GW_WAN_V4, SRV_V4};
use shaper_tests::{skip_unless_ready, Shaper, TempDir, Topology, TOPOLOGY_TOOLS};

use super::accurx_video;
use crate::common::{ACCURX_RULE, DOWNLOAD, MEDIA_PORT, UPLOAD};

fn media(topo: &Topology, src_port: u16, n: usize) {
    let dst = SocketAddr::new(SRV_V4.into(), MEDIA_PORT);
    let echoed = media_exchange(&topo.lan, dst, src_port, n);
    assert!(echoed >= n / 2, "only {echoed}/{n} echoed");
}

fn default_packets(st: &Value) -> u64 {
    class_counters(st, UPLOAD, "default").0 + class_counters(st, DOWNLOAD, "default").0
}

#[test]
fn a_second_daemon_is_refused() {
    skip_unless_ready!(TOPOLOGY_TOOLS);
    let topo = Topology::build(None).expect("topology");
    let dir = TempDir::new("adv-two").expect("dir");
    let cfg = write_config(dir.path(), "site.toml", &accurx_video(30).to_toml());
    let shaper = Shaper::new(&topo.gw).expect("shaper");
    let first = start_daemon(&shaper, &cfg, dir.path().join("first.log"));
    let mut second =
        Daemon::spawn(&shaper, &cfg, dir.path().join("second.log"), "info").expect("spawn");
    let t0 = Instant::now();
    let status_of_second = loop {
        if let Some(s) = second.exited() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "a second `shaper run` kept running beside the first; its log:\n{}",
            second.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status_of_second.success());
    let log = second.log();
    assert!(
        log.contains("already owns the shaping") && log.contains(&first.pid().to_string()),
        "the refusal names the running daemon: {log}"
    );
    assert!(
        status(&shaper)["directions"].is_array(),
        "the first still shapes"
    );
    stop_daemon(first, &shaper);
}

#[test]
fn an_apply_beside_the_daemon_is_followed_and_names_are_learned_into_the_live_maps() {
    skip_unless_ready!(DNS_TOOLS);
    let topo = Topology::build(None).expect("topology");
    let dir = TempDir::new("adv-apply").expect("dir");
    let a = write_config(dir.path(), "a.toml", &accurx_video(30).to_toml());
    let b = write_config(dir.path(), "b.toml", &accurx_video(40).to_toml());
    let mut shaper = Shaper::new(&topo.gw).expect("shaper");
    let daemon = start_daemon(&shaper, &a, dir.path().join("daemon.log"));
    start_dnsmasq(&topo.srv, &dir.path().join("dnsmasq.log"));
    let _echo = Echo::start(&topo.srv, &[SocketAddr::new(SRV_V4.into(), MEDIA_PORT)]);

    // The CLI replaces the classifier and its maps under the running daemon.
    shaper.apply(&b).expect("apply b beside the daemon");
    wait_for(
        "the daemon to follow the CLI's apply",
        Duration::from_secs(5),
        || daemon.log().contains("was applied by another command"),
    );
    // A name answered now must land in the maps the classifier reads.
    let answer = dig(&topo.lan, SRV_V4.into(), MEDIA_NAME, "A");
    assert_eq!(answer, [IpAddr::from(SRV_V4)]);
    let t0 = Instant::now();
    loop {
        let before = status(&shaper);
        media(&topo, 41_000, 10);
        let after = status(&shaper);
        let video =
            class_counters(&after, UPLOAD, "video").0 - class_counters(&before, UPLOAD, "video").0;
        if video >= 5 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "media to the answered address is not in video after the CLI apply ({video} \
             packets): the daemon learned into maps the classifier no longer reads\n{}",
            daemon.log()
        );
    }
    let st = status(&shaper);
    let r = st["rules"]
        .as_array()
        .and_then(|v| v.iter().find(|r| r["name"] == ACCURX_RULE).cloned())
        .expect("the accuRx rule in status");
    assert!(r["upload_packets"].as_u64().unwrap_or(0) >= 5, "{r}");
    stop_daemon(daemon, &shaper);
}

/// Someone unpins the classifier's link and a map: the daemon puts both back (within
/// `RESTORE_BOUND`; the times are printed).
#[test]
fn removed_pins_are_restored() {
    skip_unless_ready!(TOPOLOGY_TOOLS);
    let topo = Topology::build(None).expect("topology");
    let dir = TempDir::new("adv-pins").expect("dir");
    let cfg = write_config(dir.path(), "site.toml", &accurx_video(30).to_toml());
    let shaper = Shaper::new(&topo.gw).expect("shaper");
    let daemon = start_daemon(&shaper, &cfg, dir.path().join("daemon.log"));
    // A restore is over when the daemon says so: its re-apply puts the pins back before it
    // finishes (the drop tracer is attached after them), so a pin's return alone does not
    // end it. The next removal waits for that, so that each pin is put back by a restore
    // of its own, not by the tail of the one before (a CI run removed the map pin while
    // the link's restore was still in flight, and saw it "restored" 20 ms later).
    let restores = |n: usize, what: &str| {
        let t = wait_for(what, shaper_tests::gateway::RESTORE_BOUND, || {
            daemon.log().matches("shaping restored").count() >= n
        });
        eprintln!("{what} after {t:?} more");
    };
    let link = shaper.bpffs_dir().join("link_lan");
    let mut expected = 0;
    if link.exists() {
        // TCX: the pin is the link's only holder; unpinning detaches the classifier.
        assert_eq!(tcx_programs(&topo.gw, GW_LAN_IF), 1);
        std::fs::remove_file(&link).expect("unpin the link");
        let t = wait_for(
            "the classifier back on lan0",
            shaper_tests::gateway::RESTORE_BOUND,
            || link.exists() && tcx_programs(&topo.gw, GW_LAN_IF) == 1,
        );
        eprintln!("unpinned classifier link restored after {t:?}");
        expected += 1;
        restores(expected, "the daemon logged the link's restore");
    } else {
        eprintln!("note: no TCX link pin (netlink attach on this kernel); the map pins only");
    }
    let map = shaper.bpffs_dir().join("maps").join("LEARNED4");
    std::fs::remove_file(&map).expect("unpin a map");
    let t = wait_for(
        "the map pin back",
        shaper_tests::gateway::RESTORE_BOUND,
        || map.exists(),
    );
    eprintln!("removed map pin restored after {t:?}");
    expected += 1;
    restores(expected, "the daemon logged the map's restore");
    assert_eq!(
        daemon.log().matches("shaping restored").count(),
        expected,
        "one restore per removal:\n{}",
        daemon.log()
    );
    stop_daemon(daemon, &shaper);
}

#[test]
fn a_truncated_or_foreign_state_file_is_recovered_from() {
    skip_unless_ready!(TOPOLOGY_TOOLS);
    let topo = Topology::build(None).expect("topology");
    let dir = TempDir::new("adv-state").expect("dir");
    let cfg = write_config(dir.path(), "site.toml", &accurx_video(30).to_toml());
    let mut shaper = Shaper::new(&topo.gw).expect("shaper");
    shaper.apply(&cfg).expect("apply");
    let state = shaper.run_dir().join("state.json");
    let bad = shaper.run_dir().join("state.json.bad");
    let text = std::fs::read(&state).expect("state.json");
    // The same state with a format version no shaper wrote.
    let mut json: serde_json::Value = serde_json::from_slice(&text).expect("state.json is JSON");
    json["version"] = 0.into();
    let old_version = serde_json::to_string_pretty(&json).expect("json");
    for (what, content) in [
        ("truncated", text[..text.len() / 2].to_vec()),
        ("another version's", old_version.into_bytes()),
    ] {
        std::fs::write(&state, &content).expect("spoil state.json");
        let out = shaper
            .apply(&cfg)
            .unwrap_or_else(|e| panic!("apply over a {what} state file: {e:#}"));
        assert!(
            out.stderr.contains("state.json.bad"),
            "{what}: {}",
            out.stderr
        );
        assert_eq!(std::fs::read(&bad).expect("kept aside"), content, "{what}");
        assert!(status(&shaper)["directions"].is_array(), "{what}");
    }
    shaper.remove().expect("remove");
    assert!(shaper.leftover_pins().is_empty());
}

#[test]
fn an_unchanged_reload_or_a_restart_keeps_flows_and_counters() {
    skip_unless_ready!(TOPOLOGY_TOOLS);
    let topo = Topology::build(None).expect("topology");
    let dir = TempDir::new("adv-hup").expect("dir");
    let cfg = write_config(dir.path(), "site.toml", &accurx_video(30).to_toml());
    let shaper = Shaper::new(&topo.gw).expect("shaper");
    let _echo = Echo::start(&topo.srv, &[SocketAddr::new(SRV_V4.into(), MEDIA_PORT)]);
    let daemon = start_daemon(&shaper, &cfg, dir.path().join("daemon.log"));
    media(&topo, 42_000, 20);
    let before = default_packets(&status(&shaper));
    assert!(before >= 20, "{before}");

    // SIGHUP with the file as applied.
    // SAFETY: signalling the daemon we started.
    unsafe { libc::kill(daemon.pid() as i32, libc::SIGHUP) };
    wait_for("the reload to be handled", Duration::from_secs(5), || {
        daemon.log().contains("unchanged; nothing to reload")
    });
    let after = default_packets(&status(&shaper));
    assert!(
        after >= before,
        "counters reset by a reload that changed nothing: {before} -> {after}\n{}",
        daemon.log()
    );

    // kill -9 and start again (as init does): the shaping in place is kept as it is.
    // SAFETY: as above.
    unsafe { libc::kill(daemon.pid() as i32, libc::SIGKILL) };
    let mut daemon = daemon;
    wait_for("the killed daemon gone", Duration::from_secs(5), || {
        daemon.exited().is_some()
    });
    drop(daemon);
    // (hosts.json is the killed daemon's still: wait for the new one's word instead.)
    let daemon = Daemon::spawn(
        &shaper,
        &cfg,
        dir.path().join("daemon2.log"),
        "info,shaper_user=debug",
    )
    .expect("start again");
    wait_for("the restarted daemon", Duration::from_secs(20), || {
        daemon.log().contains("SIGHUP reloads")
    });
    assert!(
        daemon.log().contains("is in place; kept"),
        "{}",
        daemon.log()
    );
    let restarted = default_packets(&status(&shaper));
    assert!(
        restarted >= after,
        "counters reset by a restart: {after} -> {restarted}"
    );
    stop_daemon(daemon, &shaper);
}

/// ICMP timestamp replies (type 14) for every sequence number in `seqs`, identifier
/// `ident`, sent from `ns`'s own address to the gateway, claiming `queue_ms` of queue
/// downstream (0: a quiet line, to seed the baselines).
fn forge_timestamp_replies(
    ns: &shaper_tests::Netns,
    ident: u16,
    seqs: std::ops::Range<u16>,
    queue_ms: u32,
) {
    ns.within(move || {
        // SAFETY: plain socket(2); closed below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
        anyhow::ensure!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let to = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(GW_WAN_V4.octets()),
            },
            sin_zero: [0; 8],
        };
        let now_ms = (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis()
            % 86_400_000) as u32;
        for seq in seqs {
            let mut p = vec![14u8, 0, 0, 0];
            p.extend_from_slice(&ident.to_be_bytes());
            p.extend_from_slice(&seq.to_be_bytes());
            p.extend_from_slice(&now_ms.wrapping_sub(10).to_be_bytes());
            p.extend_from_slice(&now_ms.wrapping_sub(5).to_be_bytes());
            p.extend_from_slice(&now_ms.wrapping_sub(queue_ms).to_be_bytes());
            let c = shaper_tests::packet::checksum(&p);
            p[2..4].copy_from_slice(&c.to_be_bytes());
            // SAFETY: sendto with a buffer and address we own.
            unsafe {
                libc::sendto(
                    fd,
                    p.as_ptr().cast(),
                    p.len(),
                    0,
                    std::ptr::addr_of!(to).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
        }
        // SAFETY: our fd.
        unsafe { libc::close(fd) };
        Ok(())
    })
    .expect("forging replies");
}

#[test]
fn forged_timestamp_replies_do_not_steer_autorate() {
    skip_unless_ready!(&["ip", "tc", "nsenter", "sysctl", "nft"]);
    let topo = Topology::build(None).expect("topology");
    let dir = TempDir::new("adv-autorate").expect("dir");
    // The reflector's own answers are held back (in a lab without delay they would always
    // arrive first): every probe waits, up to the 2 s the pinger keeps it, for whoever
    // answers it.
    for args in [
        &["add", "table", "inet", "adv"][..],
        &[
            "add",
            "chain",
            "inet",
            "adv",
            "out",
            "{ type filter hook output priority 0; }",
        ],
        &[
            "add",
            "rule",
            "inet",
            "adv",
            "out",
            "icmp",
            "type",
            "timestamp-reply",
            "drop",
        ],
    ] {
        topo.srv
            .run("nft", args)
            .expect("nft in the server namespace");
    }
    let cfg = write_config(
        dir.path(),
        "site.toml",
        &accurx_video(30)
            .autorate(&[&SRV_V4.to_string()], "video")
            .to_toml(),
    );
    let shaper = Shaper::new(&topo.gw).expect("shaper");
    let daemon = Daemon::start(&shaper, &cfg, dir.path().join("daemon.log"), "info")
        .expect("start `shaper run`");
    wait_for("autorate on", Duration::from_secs(5), || {
        daemon.log().contains("autorate on")
    });
    let ident = (daemon.pid() & 0xffff) as u16;
    // From the modem's address on the WAN link (on the path, not the reflector): a quiet
    // second to seed the baselines, then a 3 s "queue" downstream.
    let forger = &topo.modem;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(7) {
        let queue = if t0.elapsed() < Duration::from_secs(1) {
            0
        } else {
            3000
        };
        forge_timestamp_replies(forger, ident, 1..400, queue);
        std::thread::sleep(Duration::from_millis(30));
    }
    let log = daemon.log();
    assert!(
        !log.contains("queue on the line"),
        "forged replies cut the rates:\n{log}"
    );
    let classes = topo
        .gw
        .run("tc", &["class", "show", "dev", GW_LAN_IF])
        .expect("tc");
    assert!(
        classes.contains("class htb 1:1 root rate 20Mbit"),
        "download rate moved: {classes}"
    );
    let (status, _) = daemon.stop().expect("stop");
    assert!(status.success());
}
