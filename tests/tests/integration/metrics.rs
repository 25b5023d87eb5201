//! The Prometheus endpoint of `shaper run`: served on the gateway's LAN address, scraped
//! from the LAN host, parsed by a Prometheus text parser; classified packets rise with
//! traffic; an address on the WAN (or every address) is refused before anything is applied.

use std::ffi::OsStr;
use std::io::Read;
use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use prometheus_parse::{Sample, Scrape, Value};
use shaper_tests::gateway::write_config;
use shaper_tests::topology::{GW_LAN_V4, GW_WAN_IF, GW_WAN_V4, SRV_V4};
use shaper_tests::{probe, skip_unless_ready, Shaper, TempDir, Topology, TOPOLOGY_TOOLS};

use crate::common::video_rule_policy;

const PORT: u16 = 9464;

/// Video (25 %) and default at 10/40 Mbit/s, UDP 50000-50059 in video, metrics on `listen`.
fn config(listen: &str) -> String {
    video_rule_policy(
        10_000_000,
        &[("video", 0, 25, false), ("default", 4, 20, true)],
    )
    .metrics(listen)
    .to_toml()
}

/// One HTTP exchange from inside the LAN host's namespace: (status code, head, body).
fn http_get(
    topo: &Topology,
    addr: SocketAddr,
    path: &str,
) -> anyhow::Result<(u16, String, String)> {
    shaper_tests::gateway::http_get(&topo.lan, addr, path, Duration::from_secs(10))
}

fn parse(body: &str) -> Scrape {
    let scrape = Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("parse");
    // The parser skips lines it cannot read: every sample line must have become a sample,
    // or a bucket of a histogram's sample (its `_sum` and `_count` are samples of their own).
    let lines = body
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count();
    let read: usize = scrape
        .samples
        .iter()
        .map(|x| match &x.value {
            Value::Histogram(buckets) => buckets.len(),
            _ => 1,
        })
        .sum();
    assert_eq!(read, lines, "every sample line parses:\n{body}");
    scrape
}

fn find<'a>(s: &'a Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<&'a Sample> {
    s.samples
        .iter()
        .find(|x| x.metric == metric && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
}

fn counter(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    match find(s, metric, labels).map(|x| &x.value) {
        Some(Value::Counter(v)) => *v,
        other => panic!("{metric}{labels:?}: expected a counter, found {other:?}"),
    }
}

fn gauge(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    match find(s, metric, labels).map(|x| &x.value) {
        Some(Value::Gauge(v)) => *v,
        other => panic!("{metric}{labels:?}: expected a gauge, found {other:?}"),
    }
}

/// Waits for `child` to exit; kills it after `timeout`.
fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s;
        }
        if t0.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("daemon did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn run_serves_prometheus_metrics_on_the_lan_address() {
    skip_unless_ready!(TOPOLOGY_TOOLS);
    let topo = Topology::build(None).expect("topology");
    let dir = TempDir::new("metrics").expect("temp dir");
    let addr = SocketAddr::new(GW_LAN_V4.into(), PORT);
    let cfg = write_config(dir.path(), "site.toml", &config(&addr.to_string()));
    let log_path = dir.path().join("daemon.log");
    let shaper = Shaper::new(&topo.gw).expect("shaper");
    let before = topo.gw_qdiscs().expect("qdiscs");
    let mut child = shaper
        .command(&[OsStr::new("run"), cfg.as_os_str()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).expect("log file"))
        .spawn()
        .expect("start daemon");
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    // Up once the first apply is done.
    let t0 = Instant::now();
    let (head, body) = loop {
        match http_get(&topo, addr, "/metrics") {
            Ok((200, head, body)) => break (head, body),
            other => {
                assert!(
                    t0.elapsed() < Duration::from_secs(20),
                    "no 200 from {addr}/metrics: {other:?}\ndaemon log:\n{}",
                    log()
                );
                assert!(
                    child.try_wait().expect("wait").is_none(),
                    "daemon exited:\n{}",
                    log()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    assert!(
        head.to_ascii_lowercase()
            .contains("\r\ncontent-type: text/plain; version=0.0.4"),
        "{head}"
    );
    assert!(
        log().contains(&format!(
            "serving Prometheus metrics on http://{addr}/metrics"
        )),
        "{}",
        log()
    );
    println!(
        "first lines of /metrics:\n{}",
        body.lines().take(30).collect::<Vec<_>>().join("\n")
    );

    let s = parse(&body);
    assert_eq!(gauge(&s, "shaper_up", &[]), 1.0);
    assert!(gauge(&s, "shaper_config_applied_timestamp_seconds", &[]) > 1.6e9);
    assert_eq!(
        gauge(
            &s,
            "shaper_rate_bytes_per_second",
            &[("direction", "upload"), ("interface", "wan0")]
        ),
        10e6 / 8.0
    );
    for (dir, ifname) in [("upload", "wan0"), ("download", "lan0")] {
        for (class, classid) in [("video", "1:10"), ("default", "1:2")] {
            let l = [
                ("direction", dir),
                ("interface", ifname),
                ("class", class),
                ("classid", classid),
            ];
            for m in [
                "shaper_class_packets_total",
                "shaper_class_bytes_total",
                "shaper_class_drops_total",
                "shaper_class_overlimits_total",
                "shaper_class_classified_packets_total",
                "shaper_class_classified_bytes_total",
            ] {
                counter(&s, m, &l);
            }
            for m in [
                "shaper_class_backlog_bytes",
                "shaper_class_queue_packets",
                "shaper_class_guaranteed_rate_bytes_per_second",
                "shaper_class_ceiling_rate_bytes_per_second",
            ] {
                gauge(&s, m, &l);
            }
        }
        let r = [
            ("direction", dir),
            ("interface", ifname),
            ("rule", "video"),
            ("class", "video"),
        ];
        counter(&s, "shaper_rule_packets_total", &r);
        counter(&s, "shaper_rule_bytes_total", &r);
        for m in [
            "shaper_classifier_packets_total",
            "shaper_classifier_non_ip_total",
            "shaper_classifier_malformed_total",
            "shaper_classifier_pure_tcp_acks_total",
        ] {
            counter(&s, m, &[("direction", dir)]);
        }
    }
    assert!(
        s.docs.contains_key("shaper_class_classified_packets_total"),
        "HELP lines"
    );

    // UDP to the video ports through the gateway: the video class's counters rise.
    let video = |s: &Scrape, dir: &str| {
        counter(
            s,
            "shaper_class_classified_packets_total",
            &[("direction", dir), ("class", "video")],
        )
    };
    let (up0, down0) = (video(&s, "upload"), video(&s, "download"));
    let rule0 = counter(
        &s,
        "shaper_rule_packets_total",
        &[("direction", "upload"), ("rule", "video")],
    );
    for _ in 0..5 {
        probe::udp_echo(&topo.srv, &topo.lan, SRV_V4.into(), 50020)
            .expect("udp echo through the gateway");
    }
    let (code, _, body) = http_get(&topo, addr, "/metrics").expect("second scrape");
    assert_eq!(code, 200);
    let s = parse(&body);
    assert!(
        video(&s, "upload") >= up0 + 5.0,
        "upload video classified: {up0} -> {}",
        video(&s, "upload")
    );
    assert!(
        video(&s, "download") >= down0 + 5.0,
        "download video classified: {down0} -> {}",
        video(&s, "download")
    );
    assert!(
        counter(
            &s,
            "shaper_rule_packets_total",
            &[("direction", "upload"), ("rule", "video")]
        ) >= rule0 + 5.0
    );
    assert!(
        counter(
            &s,
            "shaper_class_packets_total",
            &[("direction", "upload"), ("class", "video")]
        ) >= 5.0,
        "HTB 1:10 sent them"
    );

    // `[calls]` measures the video class (the default): once the calls task has written
    // its first calls.json (within a second or two), the ended calls' histograms are
    // there, read as histograms, empty.
    let t0 = Instant::now();
    let s = loop {
        let (code, _, body) = http_get(&topo, addr, "/metrics").expect("scrape");
        assert_eq!(code, 200);
        let s = parse(&body);
        if find(&s, "shaper_calls_active", &[]).is_some() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no calls metrics:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    for dir in ["upload", "download"] {
        for (name, buckets) in [
            ("shaper_call_loss_percent", 7),
            ("shaper_call_jitter_seconds", 8),
            ("shaper_call_mos", 8),
        ] {
            match find(&s, name, &[("direction", dir)]).map(|x| &x.value) {
                Some(Value::Histogram(b)) => {
                    assert_eq!(b.len(), buckets, "{name} {dir}: {b:?}");
                    assert!(b.iter().all(|x| x.count == 0.0), "{name} {dir}: {b:?}");
                }
                other => panic!("{name} {dir}: {other:?}"),
            }
        }
    }
    assert!(matches!(
        find(&s, "shaper_call_duration_seconds", &[]).map(|x| &x.value),
        Some(Value::Histogram(b)) if b.len() == 7
    ));

    let (code, _, _) = http_get(&topo, addr, "/nothing").expect("404 scrape");
    assert_eq!(code, 404);

    // SIGTERM: shaping removed, clean exit.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait_exit(&mut child, Duration::from_secs(20));
    assert!(status.success(), "clean exit: {status}\n{}", log());
    assert_eq!(
        topo.gw_qdiscs().expect("qdiscs"),
        before,
        "shaping removed on exit"
    );
    assert!(shaper.leftover_pins().is_empty());
}

#[test]
fn run_refuses_metrics_on_the_wan_or_every_address() {
    skip_unless_ready!(TOPOLOGY_TOOLS);
    let topo = Topology::build(None).expect("topology");
    let dir = TempDir::new("metrics-wan").expect("temp dir");
    let shaper = Shaper::new(&topo.gw).expect("shaper");
    let before = topo.gw_qdiscs().expect("qdiscs");
    let wan = SocketAddr::new(GW_WAN_V4.into(), PORT).to_string();
    for (listen, want) in [
        (
            wan.as_str(),
            format!("is an address of the WAN interface {GW_WAN_IF}"),
        ),
        ("0.0.0.0:9464", "every address".to_string()),
        ("[::]:9464", "every address".to_string()),
    ] {
        let cfg = write_config(dir.path(), "site.toml", &config(listen));
        let mut child = shaper
            .command(&[OsStr::new("run"), cfg.as_os_str()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start daemon");
        let status = wait_exit(&mut child, Duration::from_secs(20));
        let mut err = String::new();
        child
            .stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut err)
            .expect("read stderr");
        assert!(
            !status.success(),
            "listen = {listen} must be refused; stderr:\n{err}"
        );
        assert!(
            err.contains(&want) && err.contains("telemetry.listen"),
            "{listen}: {err}"
        );
        assert_eq!(
            topo.gw_qdiscs().expect("qdiscs"),
            before,
            "{listen}: nothing applied"
        );
        assert!(shaper.leftover_pins().is_empty(), "{listen}: no pins");
    }
}
