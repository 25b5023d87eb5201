//! The download direction with a misbehaving flow: an unresponsive UDP flood srv -> lan at
//! 0.7x the line rate, in a `bulk` class of its own (guaranteed 5 %, ceiling 50 %), while
//! the busy hour runs (4 TCP downloads, video both ways). FTTC 40/10, 400 ms modem buffer,
//! the product at 92 % run as on the box (`shaper run`).
//!
//! Three phases on one topology:
//! 1. no flood (the baseline of this run);
//! 2. the flood with `[download] account_arrivals = false`: the flood's packets crossed the
//!    line before the shaper dropped its excess, so what the shaper lets through for the
//!    rest (its rate minus the flood class's 50 % ceiling) plus the whole flood exceed the
//!    line and the modem's queue fills (the control: p99 at least 10x the baseline's and
//!    20 ms, or the scenario shows nothing);
//! 3. the flood with the product's default (arrivals accounted): the download video's p99
//!    stays within 10 ms of the baseline's, nothing of it is lost beyond 1 %, the TCP
//!    downloads keep at least half of the line minus the flood (what is left of the line),
//!    and the flood's own class is what pays (less than half of it gets through).
//!
//! Also here: only traffic that came in from the WAN counts as arrivals (LAN-to-LAN traffic
//! through the gateway and the gateway's own do not), and GSO downloads are counted per
//! segment.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use shaper_tests::flood::{start_flood, with_bulk_class, FLOOD_PAYLOAD};
use shaper_tests::iperf::{IperfClient, IperfServer};
use shaper_tests::shaper::Daemon;
use shaper_tests::topology::{GW_LAN_IF, GW_LAN_V4, GW_WAN_IF, LAN_HOST_V4, SRV_V4};
use shaper_tests::{
    skip_unless_ready, table, Line, Netns, Offloads, Results, Scenario, Shaper, ShaperConfig,
    TempDir, Topology, TopologyOptions, TOPOLOGY_TOOLS, TRAFFIC_TOOLS,
};

/// One phase: the daemon with `cfg`, the scenario, and a flood at `flood_bps` (or none).
/// Returns the figures, the flood's (sent, received) packets, the daemon's log and the
/// download rate `shaper status --json` reported from the kernel while the video ran.
fn phase(
    topo: &Topology,
    shaper: &Shaper,
    dir: &TempDir,
    name: &str,
    cfg: &ShaperConfig,
    scenario: &Scenario,
    flood_bps: Option<u64>,
) -> (Results, Option<(u64, u64)>, String, Option<u64>) {
    let path = cfg
        .write(dir.path(), &format!("{name}.toml"))
        .expect("config");
    let daemon = Daemon::start(
        shaper,
        &path,
        dir.path().join(format!("{name}.log")),
        "info,shaper_user::ingress=debug",
    )
    .expect("shaper run");
    let stop = Arc::new(AtomicBool::new(false));
    let flood = flood_bps.map(|bps| {
        start_flood(topo, bps, scenario.duration - scenario.tail, stop.clone()).expect("flood")
    });
    let mid = scenario.stagger + scenario.warmup + Duration::from_secs(3);
    let (results, kernel_rate) = std::thread::scope(|s| {
        let status = s.spawn(|| {
            std::thread::sleep(mid);
            let st = shaper.status_json().ok()?;
            st["directions"]
                .as_array()?
                .iter()
                .find(|d| d["direction"] == "download")?["kernel_rate_bps"]
                .as_u64()
        });
        let r = scenario.run(topo);
        (r, status.join().ok().flatten())
    });
    stop.store(true, Ordering::Relaxed);
    let flood = flood.map(|(tx, rx, _)| {
        (
            tx.join().expect("flood sender"),
            rx.join().expect("flood receiver"),
        )
    });
    let (_, log) = daemon.stop().expect("daemon stops on SIGTERM");
    (results.expect(name), flood, log, kernel_rate)
}

#[test]
fn an_unresponsive_download_flood_costs_its_own_class_not_the_modem_queue() {
    skip_unless_ready!(TRAFFIC_TOOLS);
    let line = Line::FTTC_40_10;
    let topo = Topology::build(Some(line)).expect("topology");
    let dir = TempDir::new("download-flood").expect("temp dir");
    let shaper = Shaper::new(&topo.gw).expect("shaper");
    let accounted = with_bulk_class(ShaperConfig {
        download_bps: line.down_bps / 100 * 92,
        ..ShaperConfig::gp_surgery(&line)
    });
    let unaccounted = ShaperConfig {
        account_arrivals: Some(false),
        ..accounted.clone()
    };
    // The flood starts with the bulk traffic; the video is measured from 6 s in (the
    // shaper has had 4 s of warm-up to find its rate) for 7 s.
    let scenario = Scenario {
        duration: Duration::from_secs(14),
        warmup: Duration::from_secs(4),
        ..Default::default()
    };
    let flood_bps = line.down_bps / 10 * 7;
    let flood = Some(flood_bps);
    let (base, _, _, base_rate) = phase(
        &topo, &shaper, &dir, "no-flood", &accounted, &scenario, None,
    );
    let (control, _, _, _) = phase(
        &topo,
        &shaper,
        &dir,
        "flood-unaccounted",
        &unaccounted,
        &scenario,
        flood,
    );
    let (flooded, flood_pkts, log, flooded_rate) = phase(
        &topo,
        &shaper,
        &dir,
        "flood-accounted",
        &accounted,
        &scenario,
        flood,
    );
    eprintln!(
        "{}",
        table(&[
            ("no flood", &base),
            ("flood, not accounted", &control),
            ("flood, accounted", &flooded),
        ])
    );
    let configured = format!(
        "rate {} (",
        shaper_user::config::format_rate(accounted.download_bps)
    );
    let cuts: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("download arrival accounting: rate") && !l.contains(&configured))
        .collect();
    eprintln!(
        "arrival accounting: {} changes below the configured rate; first: {:?}",
        cuts.len(),
        cuts.first()
    );

    let mut problems = Vec::new();
    // The control: without accounting the flood fills the modem (else this test shows
    // nothing).
    if control.video_down.p99_ms < (10.0 * base.video_down.p99_ms).max(20.0) {
        problems.push(format!(
            "control: without arrival accounting the download video p99 was only {:.1} ms (baseline {:.1} ms; the flood should fill the modem's queue)",
            control.video_down.p99_ms, base.video_down.p99_ms
        ));
    }
    let bound = base.video_down.p99_ms + 10.0;
    if flooded.video_down.p99_ms > bound {
        problems.push(format!(
            "with arrivals accounted the download video p99 was {:.1} ms under the flood (baseline {:.1} ms + 10 ms allowed)",
            flooded.video_down.p99_ms, base.video_down.p99_ms
        ));
    }
    if flooded.video_down.loss_pct > 1.0 {
        problems.push(format!(
            "download video lost {:.2} % under the flood",
            flooded.video_down.loss_pct
        ));
    }
    let left = (line.down_bps - flood_bps) as f64;
    if flooded.bulk_down_bps < 0.5 * left {
        problems.push(format!(
            "the TCP downloads got {:.1} Mbit/s under the flood (>= half of the {:.1} Mbit/s the flood leaves expected)",
            flooded.bulk_down_bps / 1e6,
            left / 1e6
        ));
    }
    match flood_pkts {
        Some((sent, recv)) if recv < sent / 2 => {}
        other => problems.push(format!(
            "the flood's class should pay: (sent, received) packets {other:?}"
        )),
    }
    if cuts.is_empty() {
        problems.push("the daemon never lowered the download rate".into());
    }
    // `shaper status` shows the rate in the kernel: the configured one without a flood,
    // lower under it.
    eprintln!(
        "download rate in the kernel mid-run: no flood {base_rate:?}, flood {flooded_rate:?}"
    );
    match (base_rate, flooded_rate) {
        (Some(b), Some(f)) if f < b * 9 / 10 && b * 100 >= accounted.download_bps * 98 => {}
        other => problems.push(format!(
            "`shaper status` kernel_rate_bps (no flood, flood) = {other:?}: expected about {} and lower",
            accounted.download_bps
        )),
    }
    assert!(
        problems.is_empty(),
        "download flood test failed:\n- {}",
        problems.join("\n- ")
    );
}

/// With the hosts' segmentation offloads on (TCP hands 64 KB GSO packets through the veths,
/// as a gateway whose NIC merges packets sees them), the classifier counts a download as the
/// segments and bytes the HTB tree counts for it: what arrival accounting compares with the
/// rate. One TCP stream (1 MB window) through a 1 Gbit/s shaper whose 20 ms queues it cannot
/// fill, so nothing is dropped and everything classified is sent.
#[test]
fn gso_downloads_are_counted_per_segment_as_the_qdiscs_count_them() {
    skip_unless_ready!(TRAFFIC_TOOLS);
    let topo = Topology::build_with(TopologyOptions {
        line: None,
        offloads: Offloads::KernelDefault,
    })
    .expect("topology");
    let dir = TempDir::new("download-gso").expect("temp dir");
    let mut shaper = Shaper::new(&topo.gw).expect("shaper");
    let cfg = format!(
        "[interfaces]\nwan = \"{GW_WAN_IF}\"\nlan = \"{GW_LAN_IF}\"\n[upload]\nrate = \"1gbit\"\n[download]\nrate = \"1gbit\"\n\
         [[class]]\nname = \"video\"\npriority = 0\nguaranteed = \"10%\"\n\
         [[class]]\nname = \"default\"\npriority = 3\nguaranteed = \"90%\"\ndefault = true\n"
    );
    let path = dir.path().join("gso.toml");
    std::fs::write(&path, cfg).expect("config");
    shaper.apply(&path).expect("apply");
    let totals = |st: &serde_json::Value| {
        let mut t = [0u64; 5];
        for d in st["directions"].as_array().expect("directions") {
            if d["direction"] != "download" {
                continue;
            }
            for c in d["classes"].as_array().expect("classes") {
                for (i, k) in [
                    "packets",
                    "bytes",
                    "drops",
                    "classified_packets",
                    "classified_bytes",
                ]
                .iter()
                .enumerate()
                {
                    t[i] += c[*k].as_u64().unwrap_or(0);
                }
            }
        }
        t
    };
    let before = totals(&shaper.status_json().expect("status"));
    let _server = IperfServer::start(&topo.srv, 5202).expect("iperf3 server");
    let client = IperfClient {
        server: SRV_V4.into(),
        port: 5202,
        streams: 1,
        reverse: true,
        seconds: 2,
        omit: 0,
        window: Some("1M".into()),
    };
    let child = client.spawn(&topo.lan).expect("iperf3 client");
    let report = client.finish(child).expect("iperf3 report");
    std::thread::sleep(Duration::from_millis(300));
    let after = totals(&shaper.status_json().expect("status"));
    shaper.remove().expect("remove");
    let d: Vec<u64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
    let (sent_p, sent_b, drops, cls_p, cls_b) = (d[0], d[1], d[2], d[3], d[4]);
    eprintln!(
        "download: HTB sent {sent_p} packets / {sent_b} bytes, {drops} drops; classifier {cls_p} packets / {cls_b} bytes; iperf3 {:.0} Mbit/s",
        report.receiver_bps / 1e6
    );
    assert_eq!(drops, 0, "the shaper dropped: the comparison needs none");
    assert!(
        sent_p > 10_000,
        "too little traffic to compare ({sent_p} packets)"
    );
    let near = |a: u64, b: u64| a.abs_diff(b) * 200 <= b;
    assert!(
        near(cls_p, sent_p),
        "classifier packets {cls_p} vs HTB's {sent_p} (GSO packets must count their segments)"
    );
    assert!(
        near(cls_b, sent_b),
        "classifier bytes {cls_b} vs HTB's {sent_b} (each segment's headers count)"
    );
}

/// Paced UDP (datagrams of [`FLOOD_PAYLOAD`] bytes) from `from` in `ns` to `to` at `bps` (IP
/// bytes) for `len`; the thread returns the datagrams sent (a failed send counts as sent).
fn paced_udp(ns: &Netns, from: IpAddr, to: SocketAddr, bps: u64, len: Duration) -> JoinHandle<u64> {
    let sock = ns
        .within(move || Ok(UdpSocket::bind(SocketAddr::new(from, 0))?))
        .expect("udp socket");
    let interval_ns = (FLOOD_PAYLOAD as u64 + 28) * 8 * 1_000_000_000 / bps;
    std::thread::spawn(move || {
        let pkt = [0xa5u8; FLOOD_PAYLOAD];
        let t0 = Instant::now();
        let mut sent = 0u64;
        while t0.elapsed() < len {
            let due = Duration::from_nanos(sent * interval_ns);
            let now = t0.elapsed();
            if due > now {
                std::thread::sleep(due - now);
            }
            let _ = sock.send_to(&pkt, to);
            sent += 1;
        }
        sent
    })
}

/// The download direction in `shaper status --json --interval 0` (no sampling wait): the
/// rate class 1:1 has in the kernel, and the classifier's `packets` and
/// `wan_arrival_packets` counters.
fn download_now(shaper: &Shaper) -> (Option<u64>, u64, u64) {
    let out = shaper
        .command(&["status", "--json", "--interval", "0"])
        .output()
        .expect("shaper status");
    assert!(out.status.success(), "shaper status failed: {out:?}");
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    let rate = st["directions"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["direction"] == "download"))
        .and_then(|d| d["kernel_rate_bps"].as_u64());
    let counter = |name: &str| {
        st["classifier"]["download"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no classifier.download.{name} in status: {st}"))
    };
    (rate, counter("packets"), counter("wan_arrival_packets"))
}

/// What one burst of traffic did to the download direction.
#[derive(Debug)]
struct Seen {
    /// Datagrams sent.
    sent: u64,
    /// The lowest download rate in the kernel from 1 s into the burst to its end.
    min_rate: Option<u64>,
    /// Packets the classifier saw leave by the LAN port meanwhile ...
    classified: u64,
    /// ... and how many of them it counted as arrivals from the WAN.
    from_wan: u64,
}

/// Starts a burst of traffic with `start` and watches the download direction until its
/// sender ends (arrival accounting reacts within half a second: 100 ms ticks over a 400 ms
/// window).
fn watch(shaper: &Shaper, start: impl FnOnce() -> JoinHandle<u64>) -> Seen {
    let (_, p0, w0) = download_now(shaper);
    let sender = start();
    std::thread::sleep(Duration::from_secs(1));
    let mut min_rate: Option<u64> = None;
    while !sender.is_finished() {
        if let (Some(r), _, _) = download_now(shaper) {
            min_rate = Some(min_rate.map_or(r, |m| m.min(r)));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let sent = sender.join().expect("sender");
    let (_, p1, w1) = download_now(shaper);
    Seen {
        sent,
        min_rate,
        classified: p1 - p0,
        from_wan: w1 - w0,
    }
}

/// Only what came in from the WAN counts against the download rate (issue 14): with
/// `account_arrivals` on and `shaper run` shaping the download to 10 Mbit/s,
/// 1. a LAN host sends UDP at 3x that rate to another LAN subnet the gateway routes back out
///    of its LAN port (LAN-to-LAN traffic through the gateway), then
/// 2. the gateway itself sends UDP at 3x that rate to the LAN host (the box's own traffic):
///    both leave by the LAN port, through the download shaper, but never crossed the line, so
///    the download rate stays as configured and the classifier counts none of it as WAN
///    arrivals;
/// 3. the control: the same flood from the internet side (srv -> lan) is counted and cuts the
///    rate (else the first two show nothing).
#[test]
fn only_traffic_from_the_wan_counts_against_the_download_rate() {
    skip_unless_ready!(TOPOLOGY_TOOLS);
    let topo = Topology::build(None).expect("topology");
    // A LAN subnet reached through the gateway: it routes it back out of lan0 to the lan
    // host (which has no such address and drops the traffic, as a LAN host of another
    // subnet would receive it). No redirects: the lan host should keep sending via the
    // gateway.
    let other_lan = Ipv4Addr::new(10, 201, 9, 2);
    topo.gw
        .ip(&[
            "route",
            "add",
            "10.201.9.0/24",
            "via",
            &LAN_HOST_V4.to_string(),
            "dev",
            GW_LAN_IF,
        ])
        .expect("route back to the LAN");
    for conf in ["all", GW_LAN_IF] {
        topo.gw
            .sysctl(&format!("net.ipv4.conf.{conf}.send_redirects"), "0")
            .expect("sysctl");
    }
    let dir = TempDir::new("download-wan-only").expect("temp dir");
    let shaper = Shaper::new(&topo.gw).expect("shaper");
    let cfg = ShaperConfig {
        upload_bps: 10_000_000,
        download_bps: 10_000_000,
        account_arrivals: Some(true),
        ..ShaperConfig::gp_surgery(&Line::FTTC_40_10)
    };
    let path = cfg.write(dir.path(), "wan-only.toml").expect("config");
    let daemon = Daemon::start(
        &shaper,
        &path,
        dir.path().join("wan-only.log"),
        "info,shaper_user::ingress=debug",
    )
    .expect("shaper run");
    std::thread::sleep(Duration::from_secs(1));

    let bps = 3 * cfg.download_bps;
    let len = Duration::from_secs(4);
    let port = 5301;
    let lan_to_lan = watch(&shaper, || {
        let to = SocketAddr::new(other_lan.into(), port);
        paced_udp(&topo.lan, LAN_HOST_V4.into(), to, bps, len)
    });
    let own = watch(&shaper, || {
        let to = SocketAddr::new(LAN_HOST_V4.into(), port);
        paced_udp(&topo.gw, GW_LAN_V4.into(), to, bps, len)
    });
    let stop = Arc::new(AtomicBool::new(false));
    let mut receiver = None;
    let wan = watch(&shaper, || {
        let (tx, rx, _) = start_flood(&topo, bps, len, stop.clone()).expect("flood");
        receiver = Some(rx);
        tx
    });
    stop.store(true, Ordering::Relaxed);
    if let Some(rx) = receiver {
        rx.join().expect("flood receiver");
    }
    let (_, log) = daemon.stop().expect("daemon stops on SIGTERM");
    let cuts: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("download arrival accounting: rate"))
        .collect();
    eprintln!(
        "LAN to LAN: {lan_to_lan:?}\nthe gateway's own: {own:?}\nfrom the WAN: {wan:?}\n\
         daemon's rate changes: {}, first: {:?}",
        cuts.len(),
        cuts.first()
    );

    let configured = cfg.download_bps;
    let mut problems = Vec::new();
    for (what, s) in [
        ("LAN-to-LAN traffic", &lan_to_lan),
        ("the gateway's own traffic", &own),
    ] {
        // The traffic did leave by the LAN port (else this shows nothing).
        if s.classified < s.sent / 2 {
            problems.push(format!(
                "{what}: the classifier saw {} packets leave by the LAN port of {} sent",
                s.classified, s.sent
            ));
        }
        if s.from_wan * 100 > s.classified {
            problems.push(format!(
                "{what}: {} of its {} packets counted as arrivals from the WAN",
                s.from_wan, s.classified
            ));
        }
        match s.min_rate {
            Some(r) if r * 100 >= configured * 98 => {}
            other => problems.push(format!(
                "{what} at 3x the download rate moved the kernel's download rate to {other:?} (configured {configured})"
            )),
        }
    }
    if wan.from_wan < wan.sent / 2 {
        problems.push(format!(
            "control: of {} packets sent from the WAN side, {} counted as arrivals from the WAN",
            wan.sent, wan.from_wan
        ));
    }
    match wan.min_rate {
        Some(r) if r * 10 < configured * 9 => {}
        other => problems.push(format!(
            "control: a flood from the WAN at 3x the download rate left the kernel's rate at {other:?} (configured {configured}; arrival accounting should cut it)"
        )),
    }
    assert!(
        problems.is_empty(),
        "only-WAN-arrivals test failed:\n- {}",
        problems.join("\n- ")
    );
}
