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

use shaper_tests::config::Config;
use shaper_tests::flood::{start_flood, with_bulk_class, FLOOD_PAYLOAD};
use shaper_tests::iperf::{IperfClient, IperfServer};
use shaper_tests::shaper::Daemon;
use shaper_tests::topology::{GW_LAN_IF, GW_LAN_V4, LAN_HOST_V4, SRV_V4};
use shaper_tests::{
    skip_unless_ready, table, Line, Netns, Offloads, Results, Scenario, Shaper, ShaperConfig,
    TempDir, Topology, TopologyOptions, TOPOLOGY_TOOLS, TRAFFIC_TOOLS,
};

use crate::common::root_or_skip;

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
        "info,shaper_user::rates=debug",
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
    // nothing). A full modem queue moves the median, which is steady from run to run;
    // the baseline's p99 is not (with real TCP it rests on a handful of packets: 0.8,
    // 3.1 and 13.1 ms in three runs on 2026-12-04), so 10x of it was a coin toss, not a
    // control.
    if control.video_down.p50_ms < (10.0 * base.video_down.p50_ms).max(20.0) {
        problems.push(format!(
            "control: without arrival accounting the download video p50 was only {:.1} ms (baseline {:.1} ms; the flood should fill the modem's queue)",
            control.video_down.p50_ms, base.video_down.p50_ms
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
        ..Default::default()
    })
    .expect("topology");
    let dir = TempDir::new("download-gso").expect("temp dir");
    let mut shaper = Shaper::new(&topo.gw).expect("shaper");
    let path = video_and_default(1_000_000_000, 1_000_000_000)
        .write(dir.path(), "gso.toml")
        .expect("config");
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
        "info,shaper_user::rates=debug",
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

// ---------------------------------------------------------------------------
// `[download] window_clamp`: the receive window in LAN hosts' ACKs.

/// A video class (priority 0, 10 %) and the default class (priority 3, 90 %) at these rates.
fn video_and_default(upload_bps: u64, download_bps: u64) -> Config {
    Config::new(upload_bps, download_bps)
        .class("video", 0, 10)
        .default_class("default", 3, 90)
}

/// The classifier's policy for the window-clamp test runs: two download classes.
fn clamp_policy() -> String {
    Config::new(10_000_000, 40_000_000)
        .window_clamp(5)
        .class("video", 0, 20)
        .default_class("default", 3, 50)
        .to_toml()
}

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// One's-complement sum of `b` (16-bit big-endian words) added to `sum`.
fn ones_sum(mut sum: u32, b: &[u8]) -> u32 {
    for c in b.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// An Ethernet frame with a TCP segment from `src` to `dst` (both IPv4 or both IPv6),
/// with `opts` (padded to 4 bytes) and a valid checksum.
#[allow(clippy::too_many_arguments)]
fn tcp_frame(
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    win: u16,
    opts: &[u8],
) -> Vec<u8> {
    tcp_data_frame(src, dst, sport, dport, seq, ack, flags, win, opts, 0)
}

/// [`tcp_frame`] with `payload` bytes of data.
#[allow(clippy::too_many_arguments)]
fn tcp_data_frame(
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    win: u16,
    opts: &[u8],
    payload: usize,
) -> Vec<u8> {
    let mut tcp = Vec::new();
    let mut o = opts.to_vec();
    while !o.len().is_multiple_of(4) {
        o.push(0);
    }
    tcp.extend_from_slice(&sport.to_be_bytes());
    tcp.extend_from_slice(&dport.to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&ack.to_be_bytes());
    tcp.push((((20 + o.len()) / 4) as u8) << 4);
    tcp.push(flags);
    tcp.extend_from_slice(&win.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 0]);
    tcp.extend_from_slice(&o);
    tcp.extend((0..payload).map(|i| i as u8));
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
    let (ip, pseudo) = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            f.extend_from_slice(&[0x08, 0x00]);
            let mut h = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 6, 0, 0];
            h[2..4].copy_from_slice(&((20 + tcp.len()) as u16).to_be_bytes());
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
            let c = !fold(ones_sum(0, &h));
            h[10..12].copy_from_slice(&c.to_be_bytes());
            let mut p = Vec::new();
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&[0, 6]);
            p.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
            (h, p)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            f.extend_from_slice(&[0x86, 0xdd]);
            let mut h = vec![0x60, 0, 0, 0];
            h.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
            h.extend_from_slice(&[6, 64]);
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
            let mut p = Vec::new();
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&(tcp.len() as u32).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, 6]);
            (h, p)
        }
        _ => panic!("mixed families"),
    };
    let c = !fold(ones_sum(ones_sum(0, &pseudo), &tcp));
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&tcp);
    f
}

/// The TCP header offset of a frame built by [`tcp_frame`].
fn tcp_off(f: &[u8]) -> usize {
    if f[12] == 0x08 {
        34
    } else {
        54
    }
}

/// The window field of a frame built by [`tcp_frame`].
fn window_of(f: &[u8]) -> u16 {
    let t = tcp_off(f);
    u16::from_be_bytes([f[t + 14], f[t + 15]])
}

/// Whether the TCP checksum of a frame built by [`tcp_frame`] verifies.
fn tcp_checksum_ok(f: &[u8]) -> bool {
    let t = tcp_off(f);
    let tcp = &f[t..];
    let pseudo = if t == 34 {
        let mut p = f[26..34].to_vec();
        p.extend_from_slice(&[0, 6]);
        p.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
        p
    } else {
        let mut p = f[22..54].to_vec();
        p.extend_from_slice(&(tcp.len() as u32).to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, 6]);
        p
    };
    fold(ones_sum(ones_sum(0, &pseudo), tcp)) == 0xffff
}

/// The LAN host's SYN options: MSS 1460, SACK permitted, timestamps, NOP, wscale `ws`.
fn syn_opts(ws: Option<u8>) -> Vec<u8> {
    let mut o = vec![2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0];
    if let Some(ws) = ws {
        o.extend_from_slice(&[1, 3, 3, ws]);
    }
    o
}

/// The peer's SYN-ACK options: MSS 1460, NOP, wscale 9.
const PEER_SYN_ACK_OPTS: [u8; 8] = [2, 4, 0x05, 0xb4, 1, 3, 3, 9];

/// One end of a crafted TCP handshake: its address and port, its initial sequence number,
/// and the window and options of its SYN (or SYN-ACK).
struct End<'a> {
    addr: IpAddr,
    port: u16,
    isn: u32,
    win: u16,
    opts: &'a [u8],
}

/// The three segments ([`tcp_frame`]s) that open a connection from `client` to `server`:
/// the client's SYN, the server's SYN-ACK, and the client's ACK of it (window `ack_win`,
/// no options).
fn handshake(client: &End, server: &End, ack_win: u16) -> [Vec<u8>; 3] {
    masqueraded_handshake(client, client.addr, server, ack_win)
}

/// [`handshake`] through a masquerading gateway: the client's SYN and ACK leave from
/// `client.addr` (the gateway's public address, as the WAN side sees them), the server's
/// SYN-ACK arrives for `private` (as the LAN side sees it).
fn masqueraded_handshake(
    client: &End,
    private: IpAddr,
    server: &End,
    ack_win: u16,
) -> [Vec<u8>; 3] {
    let (c, s) = (client, server);
    [
        tcp_frame(
            c.addr, s.addr, c.port, s.port, c.isn, 0, TCP_SYN, c.win, c.opts,
        ),
        tcp_frame(
            s.addr,
            private,
            s.port,
            c.port,
            s.isn,
            c.isn + 1,
            TCP_SYN | TCP_ACK,
            s.win,
            s.opts,
        ),
        tcp_frame(
            c.addr,
            s.addr,
            c.port,
            s.port,
            c.isn + 1,
            s.isn + 1,
            TCP_ACK,
            ack_win,
            &[],
        ),
    ]
}

/// The window clamp in the real classifier (BPF_PROG_TEST_RUN, crafted segments): a
/// connection whose handshake it saw gets the window of the LAN host's ACKs clamped to
/// share x (round trip + queue) in the LAN host's window-scale units, with a valid TCP
/// checksum and the class unchanged; the right edge it advertised never moves left as the
/// share drops; scaling counts only when both SYNs had the option; a connection whose
/// handshake it did not see, and one the peer opened, are handled as they should be; IPv4
/// and IPv6.
#[test]
fn window_clamp_rewrites_lan_acks_to_the_flow_share_in_the_classifier() {
    use aya::maps::{Array, HashMap as BpfHashMap, PerCpuArray};
    use shaper_common::{
        clamp_target, ActiveWindow, ClampKey, ClampVal, CLAMP_EPOCH_SHIFT, DIR_DOWN,
        GLOBAL_COUNTERS, G_ACKS_CLAMPED, G_CLAMP_FAILED, G_FLOWS_TRACKED, MAP_CLAMP_ACTIVE,
        MAP_CLAMP_FLOWS, MAP_CLAMP_SHARE, MAP_GLOBAL_STATS,
    };
    use shaper_user::kernel::bpf;

    if !root_or_skip() {
        return;
    }
    let mut r = shaper_tests::rig::load(&clamp_policy());
    let default = r.class_of("default");
    let set_share = |r: &mut shaper_tests::rig::Rig, bps: u64| {
        let mut a: Array<_, u64> =
            Array::try_from(r.obj.map_mut(MAP_CLAMP_SHARE).expect("CLAMP_SHARE")).expect("map");
        for i in 0..2 {
            a.set(i, bps, 0).expect("share");
        }
    };
    let counter = |r: &shaper_tests::rig::Rig, c: u32| -> u64 {
        let m: PerCpuArray<_, u64> =
            PerCpuArray::try_from(r.obj.map(MAP_GLOBAL_STATS).expect("stats")).expect("map");
        m.get(&(DIR_DOWN * GLOBAL_COUNTERS + c), 0)
            .expect("counter")
            .iter()
            .sum()
    };
    let flow = |r: &shaper_tests::rig::Rig, peer: IpAddr, peer_port: u16, lan_port: u16| {
        let m: BpfHashMap<_, ClampKey, ClampVal> =
            BpfHashMap::try_from(r.obj.map(MAP_CLAMP_FLOWS).expect("flows")).expect("map");
        let mut key = ClampKey {
            peer_port,
            lan_port,
            family: if peer.is_ipv4() { 4 } else { 6 },
            ..Default::default()
        };
        match peer {
            IpAddr::V4(a) => key.peer[..4].copy_from_slice(&a.octets()),
            IpAddr::V6(a) => key.peer = a.octets(),
        }
        m.get(&key, 0).ok()
    };
    let (wan, lan) = (r.wan, r.lan);
    let run = |r: &mut shaper_tests::rig::Rig, f: &[u8], up: bool| {
        let res = bpf::test_run(&mut r.obj, f, if up { wan } else { lan }, 1).expect("test run");
        assert_eq!(res.data.len(), f.len(), "length kept");
        assert!(
            tcp_checksum_ok(&res.data),
            "TCP checksum valid after the run"
        );
        (res.priority, res.data)
    };
    // A share whose target (10,000 bytes at 5 ms + the round trip) is above the 4-MSS
    // floor and well below the host's window.
    set_share(&mut r, 2_000_000);

    for (host, peer) in [
        (
            IpAddr::from([192, 168, 1, 10]),
            IpAddr::from([203, 0, 113, 7]),
        ),
        (
            "fd00::10".parse().expect("v6"),
            "2001:db8::7".parse().expect("v6"),
        ),
    ] {
        set_share(&mut r, 2_000_000);
        let (lport, pport, lisn, pisn) = (40_000u16, 443u16, 1_000u32, 7_000_000u32);
        let tracked0 = counter(&r, G_FLOWS_TRACKED);
        let clamped0 = counter(&r, G_ACKS_CLAMPED);
        // The handshake: the LAN host's SYN (wscale 7) out, the peer's SYN-ACK (wscale 9) in.
        let peer_end = End {
            addr: peer,
            port: pport,
            isn: pisn,
            win: 65_160,
            opts: &PEER_SYN_ACK_OPTS,
        };
        let host_opts = syn_opts(Some(7));
        let host_end = End {
            addr: host,
            port: lport,
            isn: lisn,
            win: 64_240,
            opts: &host_opts,
        };
        let [syn, synack, a] = handshake(&host_end, &peer_end, 502);
        let (_, out) = run(&mut r, &syn, true);
        assert_eq!(out, syn, "a SYN is left as it is");
        let (_, out) = run(&mut r, &synack, false);
        assert_eq!(out, synack, "the peer's SYN-ACK is left as it is");
        assert_eq!(counter(&r, G_FLOWS_TRACKED), tracked0 + 1, "flow tracked");
        let v = flow(&r, peer, pport, lport).expect("flow state");
        assert_eq!((v.shift, v.mss), (7, 1460));
        assert!(v.rtt_ns > 0, "round trip measured");
        let units = |target: u64| target.div_ceil(128);
        let want = units(clamp_target(2_000_000, v.rtt_ns as u64, 5_000_000, 1460));
        assert!(
            want < 502,
            "the test's target ({want}) must be below the host's window"
        );
        // The handshake's last ACK: 502 x 128 = 64,256 bytes offered, clamped.
        let mut ack = pisn + 1;
        let (prio, out) = run(&mut r, &a, true);
        assert_eq!(prio, default, "the ACK's class is unchanged");
        assert_eq!(
            u64::from(window_of(&out)),
            want,
            "clamped to the share ({host})"
        );
        assert_eq!(
            out[..tcp_off(&out) + 14],
            a[..tcp_off(&a) + 14],
            "only the window changed"
        );
        assert_eq!(counter(&r, G_ACKS_CLAMPED), clamped0 + 1);
        let mut edge = ack.wrapping_add(want as u32 * 128);
        // The peer's data: 12 segments of 1,400 bytes (more than 16 KiB, a quarter of a
        // 64 KiB/s share) make the flow one active flow of its class for the shares; at
        // the 2 MB/s share above it would take 500 kB (short transfers do not count).
        set_share(&mut r, 64 * 1024);
        let active = |r: &shaper_tests::rig::Rig| -> u64 {
            let m: Array<_, ActiveWindow> =
                Array::try_from(r.obj.map(MAP_CLAMP_ACTIVE).expect("active")).expect("map");
            let now = shaper_user::wclamp::monotonic_ns() >> CLAMP_EPOCH_SHIFT;
            m.get(&1, 0).expect("class 1").active(now)
        };
        let active0 = active(&r);
        for i in 0..12u32 {
            let d = tcp_data_frame(
                peer,
                host,
                pport,
                lport,
                pisn + 1 + i * 1_400,
                lisn + 1,
                TCP_ACK,
                500,
                &[],
                1_400,
            );
            let (_, out) = run(&mut r, &d, false);
            assert_eq!(out, d, "the peer's data is left as it is");
        }
        assert_eq!(active(&r), active0 + 1, "one more active flow in the class");
        // The share drops to almost nothing (the floor, 4 x 1460 bytes = 46 units): the
        // window shrinks only as the ACKs advance, the right edge never moves left.
        set_share(&mut r, 100);
        let floor = units(4 * 1460);
        for step in [100u32, 1_000, 2_000, 3_000, 5_000, 9_000, 20_000] {
            ack = ack.wrapping_add(step);
            let a = tcp_frame(host, peer, lport, pport, lisn + 1, ack, TCP_ACK, 502, &[]);
            let (_, out) = run(&mut r, &a, true);
            let w = u64::from(window_of(&out));
            let right = ack.wrapping_add(w as u32 * 128);
            assert!(
                right.wrapping_sub(edge) as i32 >= 0,
                "right edge moved left: {right} < {edge} (ack {ack}, window {w})"
            );
            assert!(w >= floor && w <= 502, "window {w}");
            if (edge.wrapping_sub(ack) as i32) <= (floor * 128) as i32 {
                assert_eq!(w, floor, "past the old edge the new target holds");
            }
            if right.wrapping_sub(edge) as i32 > 0 {
                edge = right;
            }
        }
        // A host offering less than the target is left alone.
        set_share(&mut r, 2_000_000);
        ack = ack.wrapping_add(100_000);
        let a = tcp_frame(host, peer, lport, pport, lisn + 1, ack, TCP_ACK, 20, &[]);
        let (_, out) = run(&mut r, &a, true);
        assert_eq!(out, a, "a window below the target is not touched");
        // A connection whose handshake was not seen is never touched.
        let a = tcp_frame(host, peer, lport + 1, pport, 5, 9, TCP_ACK, 502, &[]);
        let (_, out) = run(&mut r, &a, true);
        assert_eq!(out, a, "an unknown connection's ACK is left as it is");

        // A masquerading gateway: the WAN egress hook sees the public source address,
        // the LAN egress hook the private destination. The flow is the same (the key
        // has no LAN-side address).
        let public: IpAddr = if host.is_ipv4() {
            IpAddr::from([198, 51, 100, 1])
        } else {
            "2001:db8:ffff::1".parse().expect("v6")
        };
        let lport = 40_200;
        let behind_nat = End {
            addr: public,
            port: lport,
            ..host_end
        };
        let [syn, synack, a] = masqueraded_handshake(&behind_nat, host, &peer_end, 502);
        run(&mut r, &syn, true);
        run(&mut r, &synack, false);
        let v = flow(&r, peer, pport, lport).expect("flow state");
        let want = units(clamp_target(2_000_000, v.rtt_ns as u64, 5_000_000, 1460));
        let (_, out) = run(&mut r, &a, true);
        assert_eq!(
            u64::from(window_of(&out)),
            want,
            "clamped behind NAT ({host})"
        );

        // Scaling counts only if both SYNs carry the option: the LAN host's SYN without
        // it (shift 0), the peer's with it.
        let lport = 40_100;
        let unscaled_opts = syn_opts(None);
        let unscaled = End {
            port: lport,
            win: 65_535,
            opts: &unscaled_opts,
            ..host_end
        };
        let [syn, synack, a] = handshake(&unscaled, &peer_end, 65_535);
        run(&mut r, &syn, true);
        run(&mut r, &synack, false);
        let v = flow(&r, peer, pport, lport).expect("flow state");
        let want = clamp_target(2_000_000, v.rtt_ns as u64, 5_000_000, 1460);
        let (_, out) = run(&mut r, &a, true);
        assert_eq!(
            u64::from(window_of(&out)),
            want,
            "unscaled: the target in bytes"
        );

        // A connection the peer opened: its SYN in, the LAN host's SYN-ACK (wscale 7, an
        // unscaled 65,160 bytes from the peer's ISN + 1) out, the peer's ACK in (the round
        // trip). That first window's edge holds until the ACKs pass it.
        let lport = 8_443;
        let pport = 50_000;
        let peer_opts = syn_opts(Some(8));
        let peer_opens = End {
            port: pport,
            win: 64_240,
            opts: &peer_opts,
            ..peer_end
        };
        let host_answers = End {
            port: lport,
            win: 65_160,
            ..host_end
        };
        let [syn, synack, a] = handshake(&peer_opens, &host_answers, 502);
        run(&mut r, &syn, false);
        let (_, out) = run(&mut r, &synack, true);
        assert_eq!(out, synack, "the LAN host's SYN-ACK is left as it is");
        let tracked = counter(&r, G_FLOWS_TRACKED);
        run(&mut r, &a, false);
        assert_eq!(
            counter(&r, G_FLOWS_TRACKED),
            tracked + 1,
            "ready on the peer's ACK"
        );
        let v = flow(&r, peer, pport, lport).expect("flow state");
        let want = units(clamp_target(2_000_000, v.rtt_ns as u64, 5_000_000, 1460));
        let edge = pisn + 1 + 65_160;
        let ack = pisn + 1 + 1_000;
        let a = tcp_frame(host, peer, lport, pport, lisn + 1, ack, TCP_ACK, 600, &[]);
        let (_, out) = run(&mut r, &a, true);
        let w = u64::from(window_of(&out));
        assert_eq!(
            w,
            units(u64::from(edge - ack)).max(want),
            "SYN-ACK's edge kept"
        );
        let ack = pisn + 1 + 70_000;
        let a = tcp_frame(host, peer, lport, pport, lisn + 1, ack, TCP_ACK, 600, &[]);
        let (_, out) = run(&mut r, &a, true);
        assert_eq!(u64::from(window_of(&out)), want, "then the share");
    }
    assert_eq!(counter(&r, G_CLAMP_FAILED), 0, "no rewrite failed");
}

/// The TCP checksum errors a namespace's stack counted (`Tcp: InCsumErrors`).
fn tcp_csum_errors(ns: &Netns) -> u64 {
    let snmp = ns.run("cat", &["/proc/net/snmp"]).expect("snmp");
    let tcp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Tcp:")).collect();
    let (names, values) = (tcp[0], tcp[1]);
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "InCsumErrors")
        .and_then(|(_, v)| v.parse().ok())
        .expect("InCsumErrors")
}

/// The largest `snd_wnd` `ss -tin` shows on the server's connections to `port`.
fn max_snd_wnd(ns: &Netns, port: u16) -> u64 {
    let out = ns
        .run(
            "ss",
            &[
                "-tinH",
                "state",
                "established",
                "sport",
                &format!(":{port}"),
            ],
        )
        .unwrap_or_default();
    out.split_whitespace()
        .filter_map(|w| w.strip_prefix("snd_wnd:"))
        .filter_map(|v| v.parse().ok())
        .max()
        .unwrap_or(0)
}

/// One download through the gateway (`shaper run` with `cfg`): iperf3 -R, one stream, a
/// 1 MB receive buffer on the LAN host. Returns the largest send window the server saw,
/// the receiver's rate, the server's TCP checksum errors meanwhile and the status counters
/// `acks_clamped` / `flows_tracked`.
fn clamp_phase(
    topo: &Topology,
    shaper: &Shaper,
    dir: &TempDir,
    name: &str,
    cfg: &Config,
) -> (u64, f64, u64, u64, u64) {
    let path = cfg
        .write(dir.path(), &format!("{name}.toml"))
        .expect("config");
    let daemon = Daemon::start(
        shaper,
        &path,
        dir.path().join(format!("{name}.log")),
        "info,shaper_user::wclamp=debug",
    )
    .expect("shaper run");
    let csum0 = tcp_csum_errors(&topo.srv);
    let port = 5203;
    let _server = IperfServer::start(&topo.srv, port).expect("iperf3 server");
    let client = IperfClient {
        server: SRV_V4.into(),
        port,
        streams: 1,
        reverse: true,
        seconds: 4,
        omit: 0,
        window: Some("1M".into()),
    };
    let child = client.spawn(&topo.lan).expect("iperf3 client");
    let mut snd_wnd = 0;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(4_500) {
        snd_wnd = snd_wnd.max(max_snd_wnd(&topo.srv, port));
        std::thread::sleep(Duration::from_millis(100));
    }
    let report = client.finish(child).expect("iperf3 report");
    let csum = tcp_csum_errors(&topo.srv) - csum0;
    let st = shaper.status_json().expect("status");
    let counter = |n: &str| st["classifier"]["download"][n].as_u64().unwrap_or(0);
    let (clamped, tracked) = (counter("acks_clamped"), counter("flows_tracked"));
    let (_, log) = daemon.stop().expect("daemon stops on SIGTERM");
    eprintln!(
        "{name}: max snd_wnd {snd_wnd} B, {:.1} Mbit/s, {csum} checksum errors, {clamped} ACKs clamped, {tracked} flows tracked",
        report.receiver_bps / 1e6
    );
    if name.contains("on") {
        eprintln!(
            "{}",
            log.lines()
                .filter(|l| l.contains("window clamp"))
                .take(5)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    (snd_wnd, report.receiver_bps, csum, clamped, tracked)
}

/// `[download] window_clamp` through the gateway: a download (iperf3 -R, the LAN host
/// offering a 1 MB window) completes with no TCP checksum errors at the server, and the send
/// window the server sees (`ss -tin` snd_wnd) is held near the flow's share x (round trip +
/// 5 ms) (20 Mbit/s: ~13 kB), far below what the same transfer shows with the option off.
#[test]
fn window_clamp_holds_the_senders_window_near_its_share() {
    skip_unless_ready!(TRAFFIC_TOOLS);
    let topo = Topology::build(None).expect("topology");
    let dir = TempDir::new("download-wclamp").expect("temp dir");
    let shaper = Shaper::new(&topo.gw).expect("shaper");
    let off = video_and_default(20_000_000, 20_000_000).account_arrivals(false);
    let on = off.clone().window_clamp(5);
    let (wnd_off, bps_off, csum_off, clamped_off, _) =
        clamp_phase(&topo, &shaper, &dir, "clamp-off", &off);
    let (wnd_on, bps_on, csum_on, clamped_on, tracked_on) =
        clamp_phase(&topo, &shaper, &dir, "clamp-on", &on);
    assert_eq!(csum_off + csum_on, 0, "TCP checksum errors at the server");
    assert_eq!(clamped_off, 0, "nothing clamped with the option off");
    assert!(tracked_on >= 1, "the download was tracked");
    assert!(clamped_on > 100, "ACKs clamped: {clamped_on}");
    assert!(
        wnd_off > 0 && wnd_on > 0,
        "ss showed no snd_wnd ({wnd_off}, {wnd_on})"
    );
    // 2.5 MB/s x (round trip + 5 ms), the round trip here well under 5 ms; iperf3's control
    // connection shares the class at times (half the share each).
    assert!(
        wnd_on <= 40_000,
        "the clamped send window ({wnd_on} B) is not near the share (~13 kB)"
    );
    assert!(
        wnd_on * 4 <= wnd_off,
        "the clamped send window ({wnd_on} B) is not well below the unclamped one ({wnd_off} B)"
    );
    assert!(
        bps_on >= 0.5 * 20e6 && bps_off >= 0.5 * 20e6,
        "the downloads completed slowly: {bps_off:.0} / {bps_on:.0} bit/s"
    );
}
