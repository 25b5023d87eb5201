//! Priority cannot be bought by a name, a mark or by looking like media.
//!
//! - A bulk transfer (8 MB down) in a TLS connection whose server name decides it into a clinical class
//!   is measured and demoted like any other flow of that class.
//! - A flow that changes its DSCP on every packet stays one flow: it is demoted.
//! - Promotion has a per-class total: media-like flows promoted past the class's
//!   `claimed_max` are demoted again.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use shaper_tests::config::{Config, Rule};
use shaper_tests::gateway::write_config;
use shaper_tests::hostlab::{
    class_counters, global, hosts_json, paced, start_daemon, start_tls_server, status, stop_daemon,
    udp_client,
};
use shaper_tests::shaper::Daemon;
use shaper_tests::topology::SRV_V4;
use shaper_tests::{skip_unless_ready, Shaper, TempDir, Topology};

use crate::common::{DOWNLOAD, PACS_NAME, TLS_TOOLS, UPLOAD};

/// Two clinical classes (video, images), default and bulk, at 20 Mbit/s each way.
fn config() -> Config {
    Config::new(20_000_000, 20_000_000)
        .class("video", 0, 30)
        .class("images", 2, 30)
        .default_class("default", 4, 20)
        .class("bulk", 7, 5)
}

fn demoted(st: &Value) -> u64 {
    global(st, "upload", "flows_demoted")
}

fn demoted_down(st: &Value) -> u64 {
    global(st, "download", "flows_demoted")
}

/// Polls `shaper status` until `f` holds (up to `timeout`); returns the last status.
fn wait_status(shaper: &Shaper, timeout: Duration, f: impl Fn(&Value) -> bool) -> Value {
    let t0 = Instant::now();
    loop {
        let st = status(shaper);
        if f(&st) || t0.elapsed() > timeout {
            return st;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_bulk_transfer_under_a_clinical_server_name_is_demoted() {
    skip_unless_ready!(TLS_TOOLS);
    let topo = Topology::build(None).expect("topology");
    let dir = TempDir::new("adv-name-bulk").expect("dir");
    let cfg = write_config(
        dir.path(),
        "site.toml",
        &config()
            .demote("images", "bulk", "2MB")
            .rule(Rule::new("pacs", "images").dns_names(&[PACS_NAME]))
            .to_toml(),
    );
    let shaper = Shaper::new(&topo.gw).expect("shaper");
    let daemon = start_daemon(&shaper, &cfg, dir.path().join("daemon.log"));
    // s_server -WWW serves the files of its working directory.
    let payload = dir.path().join("study.bin");
    std::fs::write(&payload, vec![0x42u8; 8 << 20]).expect("payload");
    start_tls_server(&topo.srv, dir.path(), "-WWW");

    // 8 MB down a connection named PACS_NAME (the images class demotes after 2 MB).
    let st0 = status(&shaper);
    let mut client = topo
        .lan
        .cmd(
            "timeout",
            &[
                "-s",
                "KILL",
                "20",
                "openssl",
                "s_client",
                "-connect",
                &SocketAddr::new(SRV_V4.into(), 443).to_string(),
                "-servername",
                PACS_NAME,
                "-quiet",
            ],
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start openssl s_client");
    {
        use std::io::Write as _;
        let mut stdin = client.stdin.take().expect("stdin");
        stdin
            .write_all(b"GET /study.bin HTTP/1.0\r\n\r\n")
            .expect("request");
        // Kept open until the end: s_client quits when its input ends.
        std::mem::forget(stdin);
    }
    let st = wait_status(&shaper, Duration::from_secs(20), |st| {
        demoted_down(st) > demoted_down(&st0)
            && class_counters(st, DOWNLOAD, "bulk").1 - class_counters(&st0, DOWNLOAD, "bulk").1
                > 1 << 20
    });
    let _ = client.kill();
    let _ = client.wait();
    let h = hosts_json(&shaper).expect("hosts.json");
    assert!(
        h["stats"]["sni_decided"].as_u64().unwrap_or(0) >= 1,
        "the connection was decided by its server name: {h}"
    );
    let images =
        class_counters(&st, DOWNLOAD, "images").1 - class_counters(&st0, DOWNLOAD, "images").1;
    let bulk = class_counters(&st, DOWNLOAD, "bulk").1 - class_counters(&st0, DOWNLOAD, "bulk").1;
    let default =
        class_counters(&st, DOWNLOAD, "default").1 - class_counters(&st0, DOWNLOAD, "default").1;
    eprintln!(
        "named bulk transfer: images {images} bytes, bulk {bulk} bytes, default {default} bytes, demoted {}",
        demoted_down(&st) - demoted_down(&st0)
    );
    assert!(
        demoted_down(&st) > demoted_down(&st0) && bulk > 1 << 20,
        "a name-decided bulk transfer kept its clinical class: images {images} bytes, \
         bulk {bulk} bytes\n{}",
        daemon.log()
    );
    stop_daemon(daemon, &shaper);
}

/// SIGTERM: the daemon exits cleanly.
fn stop(daemon: Daemon) {
    let (status, log) = daemon.stop().expect("`shaper run` stops on SIGTERM");
    assert!(status.success(), "{status}\n{log}");
}

/// Sets the DSCP of what `sock` sends next.
fn set_dscp(sock: &UdpSocket, dscp: u8) {
    let tos = libc::c_int::from(dscp) << 2;
    // SAFETY: setsockopt on our socket with an int.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_TOS,
            std::ptr::addr_of!(tos).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "IP_TOS: {}", std::io::Error::last_os_error());
}

#[test]
fn a_flow_changing_its_dscp_on_every_packet_is_still_demoted() {
    skip_unless_ready!(&["ip", "tc", "nsenter", "sysctl"]);
    let topo = Topology::build(None).expect("topology");
    let dir = TempDir::new("adv-dscp").expect("dir");
    let cfg = write_config(
        dir.path(),
        "site.toml",
        &config()
            .demote("video", "bulk", "1MB")
            .rule(
                Rule::new("rtp", "video")
                    .protocol("udp")
                    .dst_ports(&["5004"]),
            )
            .to_toml(),
    );
    let shaper = Shaper::new(&topo.gw).expect("shaper");
    let daemon = Daemon::start(&shaper, &cfg, dir.path().join("daemon.log"), "info")
        .expect("start `shaper run`");
    let dst = SocketAddr::new(IpAddr::from(SRV_V4), 5004);
    let sock = udp_client(&topo.lan, dst, 45_000);
    let st0 = status(&shaper);
    // 3 MB in 1200-byte packets, each with the next of the 64 codepoints, at ~8 Mbit/s.
    let data = [0x17u8; 1200];
    let t0 = Instant::now();
    for i in 0..2_600u32 {
        set_dscp(&sock, (i % 64) as u8);
        sock.send_to(&data, dst).expect("send");
        let due = Duration::from_micros(u64::from(i) * 1_200);
        if let Some(wait) = due.checked_sub(t0.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    let st = wait_status(&shaper, Duration::from_secs(3), |st| {
        demoted(st) > demoted(&st0)
    });
    let bulk = class_counters(&st, UPLOAD, "bulk").0 - class_counters(&st0, UPLOAD, "bulk").0;
    let video = class_counters(&st, UPLOAD, "video").0 - class_counters(&st0, UPLOAD, "video").0;
    eprintln!("DSCP-cycling flow: video {video} packets, bulk {bulk} packets");
    assert!(
        demoted(&st) > demoted(&st0) && bulk >= 500,
        "a flow cycling its DSCP escaped demotion: video {video} packets, bulk {bulk}"
    );
    stop(daemon);
}

#[test]
fn promoted_flows_are_capped_per_class_in_total() {
    skip_unless_ready!(&["ip", "tc", "nsenter", "sysctl"]);
    let topo = Topology::build(None).expect("topology");
    let dir = TempDir::new("adv-promote-cap").expect("dir");
    let cfg = write_config(
        dir.path(),
        "site.toml",
        &config()
            .claimed_max("video", "1mbit")
            .promote("video")
            .to_toml(),
    );
    let shaper = Shaper::new(&topo.gw).expect("shaper");
    let daemon = Daemon::start(&shaper, &cfg, dir.path().join("daemon.log"), "info")
        .expect("start `shaper run`");
    let st0 = status(&shaper);
    // Four media-like flows of ~400 kbit/s each (50 x 1000 bytes a second): each is
    // promoted on its own, together they are 1.6 Mbit/s against a 1 Mbit/s total.
    let senders: Vec<_> = (0..4u16)
        .map(|i| {
            let dst = SocketAddr::new(IpAddr::from(SRV_V4), 6_000 + i);
            let sock = udp_client(&topo.lan, dst, 46_000 + i);
            std::thread::spawn(move || paced(&sock, dst, 1000, 50.0, 5.0))
        })
        .collect();
    for s in senders {
        s.join().expect("sender");
    }
    let st = status(&shaper);
    let promoted =
        global(&st, "upload", "flows_promoted") - global(&st0, "upload", "flows_promoted");
    let demoted = demoted(&st) - demoted(&st0);
    eprintln!("four media-like flows: promoted {promoted}, demoted again {demoted}");
    assert!(
        promoted >= 2,
        "the flows look like media: promoted {promoted}"
    );
    assert!(
        demoted >= 1,
        "1.6 Mbit/s of promoted flows against a 1 Mbit/s class total: none demoted"
    );
    assert!(
        demoted < promoted,
        "flows within the total stay promoted: promoted {promoted}, demoted {demoted}"
    );
    stop(daemon);
}
