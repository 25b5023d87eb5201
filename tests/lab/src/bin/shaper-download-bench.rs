//! Download-direction benchmark (the `cargo xtask bench` family): prints tables, asserts
//! nothing.
//!
//! The busy hour on FTTC 40/10 (400 ms modem buffer) in one run, one topology, for:
//! no shaper (FIFO gateway), the plain `tc` HTB reference shaper configured like the product
//! (same rates, classes, priorities, pure ACKs at priority 0, 20 ms bfifo leaves), the
//! product at 92 % and 95 % of the download line with CUBIC senders (95 % also with
//! `account_arrivals = false`), and the product at 92 % with BBR senders
//! (`net.ipv4.tcp_congestion_control` set in the srv and lan namespaces only). The product
//! runs as on the box, `shaper run` (arrival accounting lives in the daemon).
//!
//! Then "UDP flood": the product at 92 % with an extra `bulk` class (guaranteed 5 %,
//! ceiling 50 %) and a rule putting UDP port 5300 in it, without a flood and with one
//! unresponsive UDP flow srv -> lan at 0.5x the download line rate (without arrival
//! accounting, with it, with it and BBR senders) and at 1.5x; where the flood's excess was
//! dropped (the gateway's bulk class, other classes, the modem).
//!
//! While the video runs, the modem's in0 TBF and the gateway's lan0 leaf qdiscs are sampled
//! (`tc -s -j qdisc`) every 100 ms: the third table says where the download queue was.
//!
//! `--seconds N` per configuration (default 15); `--no-flood` skips the second scenario;
//! `--only A,B` runs the configurations whose label contains A or B; `--summary FILE` writes
//! the flood-free rows as JSON (for the table of both tiers). `SHAPER_LOG` sets the
//! daemon's log level (its arrival-accounting lines are echoed to stderr).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;
use shaper_tests::flood::{start_flood, with_bulk_class, FLOOD_PAYLOAD, FLOOD_PORT};
use shaper_tests::reference::{self, ReferenceOptions};
use shaper_tests::report::TierRow;
use shaper_tests::shaper::Daemon;
use shaper_tests::stats;
use shaper_tests::topology::{GW_LAN_IF, MODEM_IN_IF};
use shaper_tests::util::arg_value;
use shaper_tests::{Line, Netns, Results, Scenario, Shaper, ShaperConfig, TempDir, Topology};

const SAMPLE_EVERY: Duration = Duration::from_millis(100);

#[derive(Clone)]
enum Gateway {
    Fifo,
    Reference(ShaperConfig),
    Product(ShaperConfig),
}

#[derive(Clone)]
struct Case {
    label: String,
    gateway: Gateway,
    cc: &'static str,
    /// Unresponsive UDP srv -> lan at this many bits/s (IP packets), or none.
    flood_bps: Option<u64>,
}

/// Queue samples taken while the video ran.
#[derive(Default)]
struct Samples {
    /// Backlog of the modem's in0 TBF (download bottleneck), bytes.
    modem: Vec<u64>,
    /// Backlog per gateway lan0 leaf qdisc (by parent classid), bytes.
    leaves: BTreeMap<String, Vec<u64>>,
    /// Congestion control names seen on the srv's TCP sockets (`ss -tin`, one sample).
    cc_seen: BTreeMap<String, u32>,
}

struct FloodStats {
    sent_pkts: u64,
    recv_pkts: u64,
    secs: f64,
}

struct CaseResult {
    case: Case,
    results: Results,
    samples: Samples,
    /// `sysctl net.ipv4.tcp_congestion_control` was refused in srv or lan.
    sysctl_refused: bool,
    /// Drops of the modem's in0 TBF during the case, packets.
    modem_drops: u64,
    /// Drops per gateway download class during the case: name -> packets (product only).
    class_drops: BTreeMap<String, u64>,
    /// classid -> class name on lan0.
    names: BTreeMap<String, String>,
    flood: Option<FloodStats>,
}

/// `tc -s -j qdisc show dev DEV` in `ns`, parsed.
fn qdiscs(ns: &Netns, dev: &str) -> Result<Vec<Value>> {
    let out = ns.run("tc", &["-s", "-j", "qdisc", "show", "dev", dev])?;
    let v: Value = serde_json::from_str(&out).context("parsing tc -j output")?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

fn modem_root(topo: &Topology) -> Result<(u64, u64)> {
    let q = qdiscs(&topo.modem, MODEM_IN_IF)?;
    let root = q
        .iter()
        .find(|q| q["root"].as_bool() == Some(true))
        .context("no root qdisc on the modem's in0")?;
    Ok((
        root["backlog"].as_u64().unwrap_or(0),
        root["drops"].as_u64().unwrap_or(0),
    ))
}

/// Download class drops per class name from `shaper status --json`.
fn download_class_drops(st: &Value) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    if let Some(dirs) = st["directions"].as_array() {
        for d in dirs.iter().filter(|d| d["direction"] == "download") {
            for c in d["classes"].as_array().into_iter().flatten() {
                if let Some(n) = c["name"].as_str() {
                    m.insert(n.to_string(), c["drops"].as_u64().unwrap_or(0));
                }
            }
        }
    }
    m
}

fn download_class_names(st: &Value) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    if let Some(dirs) = st["directions"].as_array() {
        for d in dirs.iter().filter(|d| d["direction"] == "download") {
            for c in d["classes"].as_array().into_iter().flatten() {
                if let (Some(id), Some(n)) = (c["classid"].as_str(), c["name"].as_str()) {
                    m.insert(id.to_string(), n.to_string());
                }
            }
        }
    }
    m
}

/// Samples the modem's and the gateway's download queues until `stop`, starting after
/// `delay` (when the video starts).
fn sample(topo: &Topology, delay: Duration, len: Duration, stop: &AtomicBool) -> Samples {
    let mut s = Samples::default();
    let t0 = Instant::now();
    while t0.elapsed() < delay {
        if stop.load(Ordering::Relaxed) {
            return s;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let start = Instant::now();
    let mut ss_done = false;
    while start.elapsed() < len && !stop.load(Ordering::Relaxed) {
        let next = Instant::now() + SAMPLE_EVERY;
        if let Ok((backlog, _)) = modem_root(topo) {
            s.modem.push(backlog);
        }
        if let Ok(q) = qdiscs(&topo.gw, GW_LAN_IF) {
            for leaf in q.iter().filter(|q| q["parent"].is_string()) {
                let parent = leaf["parent"].as_str().unwrap_or("?").to_string();
                s.leaves
                    .entry(parent)
                    .or_default()
                    .push(leaf["backlog"].as_u64().unwrap_or(0));
            }
        }
        if !ss_done && start.elapsed() > len / 2 {
            ss_done = true;
            // The download senders: the srv's sockets on the bulk download port (four data
            // streams and iperf3's control connection).
            let args = [
                "-t",
                "-i",
                "-n",
                "state",
                "established",
                "(",
                "sport",
                "=",
                ":5202",
                ")",
            ];
            if let Ok(out) = topo.srv.run("ss", &args) {
                for word in out.split_whitespace() {
                    if matches!(word, "cubic" | "bbr" | "reno") {
                        *s.cc_seen.entry(word.to_string()).or_default() += 1;
                    }
                }
            }
        }
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    }
    s
}

fn run_case(
    topo: &Topology,
    shaper: &mut Shaper<'_>,
    dir: &TempDir,
    scenario: &Scenario,
    case: &Case,
) -> Result<CaseResult> {
    // The namespace default (as the brief asks) where the host allows it -- in a namespace
    // only algorithms in the host's tcp_allowed_congestion_control can be made the default
    // -- and per socket (`iperf3 -C`) always, so the senders use `case.cc` either way.
    let mut sysctl_refused = false;
    for ns in [&topo.srv, &topo.lan] {
        if ns
            .sysctl("net.ipv4.tcp_congestion_control", case.cc)
            .is_err()
        {
            sysctl_refused = true;
        }
    }
    let scenario = &Scenario {
        congestion: Some(case.cc.to_string()),
        ..scenario.clone()
    };
    let mut names = BTreeMap::new();
    let mut status_before = None;
    let mut daemon: Option<Daemon> = None;
    match &case.gateway {
        Gateway::Fifo => {}
        Gateway::Reference(cfg) => {
            reference::apply_with(
                &topo.gw,
                cfg,
                ReferenceOptions {
                    ack_priority: true,
                    leaf_queue_ms: Some(20),
                    ..Default::default()
                },
            )?;
            for (i, c) in cfg.classes.iter().enumerate() {
                names.insert(format!("1:{:x}", 0x10 * (i + 1)), c.name.clone());
            }
        }
        Gateway::Product(cfg) => {
            let path = cfg.write(dir.path(), "shaper.toml")?;
            // As on the box: `shaper run` (arrival accounting lives in the daemon).
            daemon = Some(Daemon::start(
                shaper,
                &path,
                dir.path().join("daemon.log"),
                &std::env::var("SHAPER_LOG").unwrap_or_else(|_| "info".into()),
            )?);
            let st = shaper.status_json()?;
            names = download_class_names(&st);
            status_before = Some(st);
        }
    }
    let (_, modem_drops0) = modem_root(topo)?;
    let video_at = scenario.stagger + scenario.warmup;
    let video_len = scenario.duration - scenario.stagger - scenario.warmup - scenario.tail;
    let stop = Arc::new(AtomicBool::new(false));
    let flood = match case.flood_bps {
        // It stops when the video does: under a flood above the line rate iperf3's control
        // connection loses most packets and its final exchange can stall for minutes.
        Some(bps) => Some(start_flood(topo, bps, video_at + video_len, stop.clone())?),
        None => None,
    };
    let sampler_stop = AtomicBool::new(false);
    let (results, samples) = std::thread::scope(|s| {
        let h = s.spawn(|| sample(topo, video_at, video_len, &sampler_stop));
        let r = scenario.run(topo);
        sampler_stop.store(true, Ordering::Relaxed);
        let samples = h.join().unwrap_or_default();
        (r, samples)
    });
    stop.store(true, Ordering::Relaxed);
    let flood = match flood {
        Some((tx, rx, t0)) => {
            let sent_pkts = tx.join().map_err(|_| anyhow::anyhow!("flood sender"))?;
            let secs = t0
                .elapsed()
                .as_secs_f64()
                .min((video_at + video_len).as_secs_f64());
            let recv_pkts = rx.join().map_err(|_| anyhow::anyhow!("flood receiver"))?;
            Some(FloodStats {
                sent_pkts,
                recv_pkts,
                secs,
            })
        }
        None => None,
    };
    let (_, modem_drops1) = modem_root(topo)?;
    let mut class_drops = BTreeMap::new();
    match &case.gateway {
        Gateway::Fifo => {}
        Gateway::Reference(cfg) => reference::remove(&topo.gw, cfg)?,
        Gateway::Product(_) => {
            let after = download_class_drops(&shaper.status_json()?);
            let before = status_before
                .as_ref()
                .map(download_class_drops)
                .unwrap_or_default();
            for (n, d) in after {
                class_drops.insert(n.clone(), d - before.get(&n).copied().unwrap_or(0));
            }
            if let Some(d) = daemon.take() {
                let (_, log) = d.stop()?;
                for l in log.lines().filter(|l| l.contains("arrival accounting")) {
                    eprintln!("  daemon: {l}");
                }
            }
        }
    }
    Ok(CaseResult {
        case: case.clone(),
        results: results.with_context(|| format!("scenario `{}`", case.label))?,
        samples,
        sysctl_refused,
        modem_drops: modem_drops1 - modem_drops0,
        class_drops,
        names,
        flood,
    })
}

fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = format!("{:<w0$}", cells[0], w0 = w[0]);
        for (i, c) in cells.iter().enumerate().skip(1) {
            s.push_str(&format!(" | {:>wi$}", c, wi = w[i]));
        }
        s
    };
    let h = line(header.iter().map(|s| s.to_string()).collect());
    println!("{h}");
    println!("{}", "-".repeat(h.len()));
    for r in rows {
        println!("{}", line(r.clone()));
    }
}

fn ms(v: f64) -> String {
    format!("{v:.1}")
}

fn pct_of(v: f64, of: f64) -> String {
    format!("{:.1} %", 100.0 * v / of)
}

fn mean(v: &[u64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<u64>() as f64 / v.len() as f64
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let secs: u64 = arg_value(&args, "--seconds")
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let flood_too = !args.iter().any(|a| a == "--no-flood");
    if let Some(reason) = shaper_tests::util::skip_reason(shaper_tests::TRAFFIC_TOOLS) {
        bail!("cannot run: {reason}");
    }
    let line = Line::FTTC_40_10;
    let scenario = Scenario::of_secs(secs);
    let base = ShaperConfig::gp_surgery(&line);
    let at = |pct: u64| ShaperConfig {
        download_bps: line.down_bps / 100 * pct,
        ..base.clone()
    };
    let unaccounted = |c: ShaperConfig| ShaperConfig {
        account_arrivals: Some(false),
        ..c
    };
    let case = |label: &str, gateway, cc, flood_bps| Case {
        label: label.to_string(),
        gateway,
        cc,
        flood_bps,
    };
    let mut cases = vec![
        case("no shaper (FIFO gw), cubic", Gateway::Fifo, "cubic", None),
        case(
            "tc HTB reference 92 %, cubic",
            Gateway::Reference(at(92)),
            "cubic",
            None,
        ),
        case(
            "product 92 %, cubic",
            Gateway::Product(at(92)),
            "cubic",
            None,
        ),
        case(
            "product 95 %, cubic",
            Gateway::Product(at(95)),
            "cubic",
            None,
        ),
        case(
            "product 95 %, cubic, no arrival accounting",
            Gateway::Product(unaccounted(at(95))),
            "cubic",
            None,
        ),
        case("product 92 %, bbr", Gateway::Product(at(92)), "bbr", None),
    ];
    let main_cases = cases.len();
    let bulk_cfg = with_bulk_class(at(92));
    if flood_too {
        cases.push(case(
            "product 92 % + bulk class, no flood",
            Gateway::Product(bulk_cfg.clone()),
            "cubic",
            None,
        ));
        cases.push(case(
            "  + UDP flood 0.5x line, no arrival accounting",
            Gateway::Product(unaccounted(bulk_cfg.clone())),
            "cubic",
            Some(line.down_bps / 2),
        ));
        cases.push(case(
            "  + UDP flood 0.5x line (20 Mbit/s)",
            Gateway::Product(bulk_cfg.clone()),
            "cubic",
            Some(line.down_bps / 2),
        ));
        cases.push(case(
            "  + UDP flood 0.5x line, bbr",
            Gateway::Product(bulk_cfg.clone()),
            "bbr",
            Some(line.down_bps / 2),
        ));
        cases.push(case(
            "  + UDP flood 1.5x line (60 Mbit/s)",
            Gateway::Product(bulk_cfg.clone()),
            "cubic",
            Some(line.down_bps * 3 / 2),
        ));
    }

    // `--only A,B`: the cases whose label contains one of these (a quick look at a few).
    let main_cases = match arg_value(&args, "--only") {
        Some(only) => {
            let keep = |c: &Case| only.split(',').any(|o| c.label.contains(o));
            let main_kept = cases[..main_cases].iter().filter(|c| keep(c)).count();
            cases.retain(keep);
            main_kept
        }
        None => main_cases,
    };
    let topo = Topology::build(Some(line))?;
    let dir = TempDir::new("download-bench")?;
    let mut shaper = Shaper::new(&topo.gw)?;
    let started = Instant::now();
    let mut done = Vec::new();
    for c in &cases {
        eprintln!("[{:>5.1} s] {}", started.elapsed().as_secs_f64(), c.label);
        // One retry: the harness's video receiver treats EINTR as fatal (seen 3 times in
        // one full run of this binary, cause not found).
        let mut result = run_case(&topo, &mut shaper, &dir, &scenario, c);
        if let Err(e) = &result {
            eprintln!("  failed: {e:#}; retrying once");
            result = run_case(&topo, &mut shaper, &dir, &scenario, c);
        }
        match result {
            Ok(r) => done.push(r),
            Err(e) => eprintln!("  failed: {e:#}"),
        }
    }

    let down = line.down_bps as f64;
    let up = line.up_bps as f64;
    // `--summary FILE`: one JSON row per configuration for `cargo xtask bench --download`'s
    // table of both tiers (the flood rows are this tier's only).
    if let Some(path) = arg_value(&args, "--summary") {
        let rows: Vec<Value> = done
            .iter()
            .filter(|r| r.case.flood_bps.is_none())
            .map(|r| {
                let x = &r.results;
                let video = |v: &shaper_tests::DelayStats| (v.p50_ms, v.p99_ms, v.loss_pct);
                TierRow {
                    tier: "namespaces",
                    configuration: &r.case.label,
                    video_down: video(&x.video_down),
                    video_up: video(&x.video_up),
                    goodput_down_pct: 100.0 * x.total_down_bps / down,
                    goodput_up_pct: 100.0 * x.total_up_bps / up,
                }
                .to_json()
            })
            .collect();
        std::fs::write(path, serde_json::to_string_pretty(&rows)?)
            .with_context(|| format!("writing {path}"))?;
    }
    let serial_ms = 1514.0 * 8.0 / down * 1e3;
    println!(
        "download benchmark: FTTC {}/{} Mbit/s, {} ms modem buffer; {} s per configuration; \
         4+4 bulk TCP (1 MB windows), image upload TCP 104, video 50 pps x 1000 B each way",
        line.down_bps / 1_000_000,
        line.up_bps / 1_000_000,
        line.buffer_ms,
        secs
    );
    println!(
        "target: video down p99 <= {:.2} ms (one 1514 B frame at the line rate = {serial_ms:.2} ms, + 2 ms), download goodput >= 90 % of the line",
        serial_ms + 2.0
    );
    println!("delays in ms; goodput = iperf3 receiver goodput + video payload; line used = what the modem put on the copper while video ran\n");
    let header = [
        "configuration",
        "vid dn p50",
        "vid dn p99",
        "vid up p50",
        "vid up p99",
        "loss dn",
        "loss up",
        "goodput dn",
        "goodput up",
        "line dn",
        "line up",
    ];
    let row = |r: &CaseResult| {
        let x = &r.results;
        vec![
            r.case.label.clone(),
            ms(x.video_down.p50_ms),
            ms(x.video_down.p99_ms),
            ms(x.video_up.p50_ms),
            ms(x.video_up.p99_ms),
            format!("{:.2} %", x.video_down.loss_pct),
            format!("{:.2} %", x.video_up.loss_pct),
            pct_of(x.total_down_bps, down),
            pct_of(x.total_up_bps, up),
            pct_of(x.line_down_bps, down),
            pct_of(x.line_up_bps, up),
        ]
    };
    let main_rows: Vec<Vec<String>> = done
        .iter()
        .filter(|r| cases[..main_cases].iter().any(|c| c.label == r.case.label))
        .map(row)
        .collect();
    print_table(&header, &main_rows);

    // Where the download queue was while the video ran.
    println!(
        "\nqueues while the video ran (tc -s qdisc every {} ms): modem in0 TBF backlog in ms at the line rate; \
         gw lan0 leaves in ms at the shaper's download rate; drops over the whole configuration",
        SAMPLE_EVERY.as_millis()
    );
    let qheader = [
        "configuration",
        "modem mean",
        "modem p99",
        "modem max",
        "modem drops",
        "gw video max",
        "gw others mean",
        "gw others max",
        "gw drops dn",
        "dl sender cc",
    ];
    let mut qrows = Vec::new();
    for r in &done {
        let to_ms = |b: f64, rate: f64| b * 8.0 / rate * 1e3;
        let m = &r.samples.modem;
        let shaper_rate = match &r.case.gateway {
            Gateway::Fifo => None,
            Gateway::Reference(c) | Gateway::Product(c) => Some(c.download_bps as f64),
        };
        let (mut video_max, mut others) = (0u64, Vec::<u64>::new());
        let n = r.samples.leaves.values().map(Vec::len).max().unwrap_or(0);
        others.resize(n, 0);
        for (parent, v) in &r.samples.leaves {
            if r.names.get(parent).map(String::as_str) == Some("video") {
                video_max = video_max.max(v.iter().copied().max().unwrap_or(0));
            } else {
                for (i, b) in v.iter().enumerate() {
                    others[i] += b;
                }
            }
        }
        let gw_drops: u64 = r.class_drops.values().sum();
        qrows.push(vec![
            r.case.label.clone(),
            ms(to_ms(mean(m), down)),
            ms(to_ms(stats::percentile(m, 99.0).unwrap_or(0) as f64, down)),
            ms(to_ms(m.iter().copied().max().unwrap_or(0) as f64, down)),
            r.modem_drops.to_string(),
            match shaper_rate {
                Some(_) => format!("{video_max} B"),
                None => "-".into(),
            },
            match shaper_rate {
                Some(rate) => ms(to_ms(mean(&others), rate)),
                None => "-".into(),
            },
            match shaper_rate {
                Some(rate) => ms(to_ms(
                    others.iter().copied().max().unwrap_or(0) as f64,
                    rate,
                )),
                None => "-".into(),
            },
            match &r.case.gateway {
                Gateway::Product(_) => gw_drops.to_string(),
                _ => "-".into(),
            },
            format!(
                "{}{}",
                r.samples
                    .cc_seen
                    .iter()
                    .map(|(k, v)| format!("{k} x{v}"))
                    .collect::<Vec<_>>()
                    .join(" "),
                if r.sysctl_refused { " (-C)" } else { "" }
            ),
        ]);
    }
    print_table(&qheader, &qrows);
    println!(
        "(dl sender cc: congestion control on the srv's sockets of the bulk download port, one `ss -ti` sample: \
         4 data streams + iperf3's control connection, which keeps the namespace default; \
         (-C): the namespace sysctl was refused, the algorithm was set per socket with iperf3 -C)"
    );

    if flood_too {
        println!(
            "\nUDP flood: product at 92 % with a `bulk` class (priority 7, guaranteed 5 %, ceiling 50 %) and a rule \
             udp/{FLOOD_PORT} -> bulk; the flood is unresponsive UDP srv -> lan ({} B IP packets, paced), for the whole busy hour"
        , FLOOD_PAYLOAD + 28);
        let fheader = [
            "configuration",
            "vid dn p99",
            "vid dn loss",
            "tcp bulk dn",
            "flood sent",
            "flood recv",
            "flood lost pkts",
            "gw bulk drops",
            "gw other drops",
            "modem drops",
        ];
        let mut frows = Vec::new();
        for r in done
            .iter()
            .filter(|r| !cases[..main_cases].iter().any(|c| c.label == r.case.label))
        {
            let x = &r.results;
            let bulk = r.class_drops.get("bulk").copied().unwrap_or(0);
            let other: u64 = r
                .class_drops
                .iter()
                .filter(|(n, _)| n.as_str() != "bulk")
                .map(|(_, d)| *d)
                .sum();
            let (sent, recv, lost) = match &r.flood {
                Some(f) => {
                    let rate = |p: u64| {
                        format!(
                            "{:.1} Mbit/s",
                            p as f64 * (FLOOD_PAYLOAD + 28) as f64 * 8.0 / f.secs / 1e6
                        )
                    };
                    (
                        rate(f.sent_pkts),
                        rate(f.recv_pkts),
                        f.sent_pkts.saturating_sub(f.recv_pkts).to_string(),
                    )
                }
                None => ("-".into(), "-".into(), "-".into()),
            };
            frows.push(vec![
                r.case.label.clone(),
                ms(x.video_down.p99_ms),
                format!("{:.2} %", x.video_down.loss_pct),
                pct_of(x.bulk_down_bps, down),
                sent,
                recv,
                lost,
                bulk.to_string(),
                other.to_string(),
                r.modem_drops.to_string(),
            ]);
        }
        print_table(&fheader, &frows);
        println!(
            "(tcp bulk dn = iperf3 download goodput as % of the line; drops are packets over the whole configuration; \
             the modem's drops include TCP's)"
        );
    }
    eprintln!("[{:>5.1} s] done", started.elapsed().as_secs_f64());
    Ok(())
}
