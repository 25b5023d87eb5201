//! Reloads under traffic: 100 `shaper apply` reloads (in-place HTB rate/ceiling changes and a
//! rule added and removed) while a 12,000 pps UDP stream crosses the gateway lose no packet;
//! and a `shaper run` daemon killed with SIGKILL leaves the shaping (HTB tree, TCX classifier)
//! working, a restarted daemon adopts it without a gap in classification or a lost packet,
//! and SIGTERM then removes everything.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use shaper_tests::config::{Config, Rule};
use shaper_tests::gateway::{tcx_programs, write_config};
use shaper_tests::stats::nearest_rank;
use shaper_tests::topology::{GW_LAN_IF, GW_WAN_IF, SRV_V4};
use shaper_tests::util::monotonic_ns;
use shaper_tests::{skip_unless_ready, Shaper, TempDir, Topology, TOPOLOGY_TOOLS};

/// The UDP port the video rule matches.
const VIDEO_PORT: u16 = 50020;
const MAGIC: u32 = 0x5348_5052; // "SHPR"
/// Payload bytes per packet: magic, sequence number, padding.
const PAYLOAD: usize = 32;

// ---------------------------------------------------------------------------------------------
// Configs

/// One class: name, priority, guaranteed %, ceiling %, default.
type ClassSpec = (&'static str, u8, u32, u32, bool);
/// One rule: name, class, protocol, dst port.
type RuleSpec = (&'static str, &'static str, &'static str, u16);

const RATE_MBIT: u64 = 100;

/// Config A: 100/100 mbit, video/default/bulk, UDP 50020 -> video.
const CLASSES_A: &[ClassSpec] = &[
    ("video", 0, 30, 100, false),
    ("default", 4, 40, 100, true),
    ("bulk", 7, 10, 100, false),
];
const RULES_A: &[RuleSpec] = &[("video", "video", "udp", VIDEO_PORT)];

/// Config B: the same classes at other rates and ceilings (an in-place HTB change, and a
/// bfifo leaf limit change since the leaf is sized from the ceiling), plus one more rule.
const CLASSES_B: &[ClassSpec] = &[
    ("video", 0, 50, 90, false),
    ("default", 4, 20, 80, true),
    ("bulk", 7, 5, 50, false),
];
const RULES_B: &[RuleSpec] = &[
    ("bulk-sync", "bulk", "tcp", 873),
    ("video", "video", "udp", VIDEO_PORT),
];

fn config(classes: &[ClassSpec], rules: &[RuleSpec]) -> String {
    let rate = RATE_MBIT * 1_000_000;
    let mut c = Config::new(rate, rate);
    for &(name, prio, g, ceiling, default) in classes {
        c = if default {
            c.default_class(name, prio, g)
        } else {
            c.class(name, prio, g)
        }
        .ceiling(ceiling);
    }
    for &(name, class, proto, port) in rules {
        c = c.rule(
            Rule::new(name, class)
                .protocol(proto)
                .dst_ports(&[&port.to_string()]),
        );
    }
    c.to_toml()
}

/// The HTB classes a config must leave on each interface: classid -> (rate, ceil, prio) in
/// bit/s. The default class is 1:2, the others 1:10 + index; the parent 1:1 is at the rate.
fn expected_classes(classes: &[ClassSpec]) -> BTreeMap<String, (u64, u64, u32)> {
    let rate = RATE_MBIT * 1_000_000;
    let mut m = BTreeMap::new();
    m.insert("1:1".to_string(), (rate, rate, 0));
    for (i, (_, prio, g, c, default)) in classes.iter().enumerate() {
        let id = if *default {
            "1:2".to_string()
        } else {
            format!("1:{:x}", 0x10 + i)
        };
        m.insert(
            id,
            (
                rate / 100 * u64::from(*g),
                rate / 100 * u64::from(*c),
                u32::from(*prio),
            ),
        );
    }
    m
}

/// "30Mbit", "1500Kbit", "12bit" (tc's `sprint_rate`) -> bit/s.
fn parse_tc_rate(s: &str) -> Option<u64> {
    let (num, mult) = if let Some(n) = s.strip_suffix("Gbit") {
        (n, 1_000_000_000.0)
    } else if let Some(n) = s.strip_suffix("Mbit") {
        (n, 1_000_000.0)
    } else if let Some(n) = s.strip_suffix("Kbit") {
        (n, 1_000.0)
    } else if let Some(n) = s.strip_suffix("bit") {
        (n, 1.0)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|v| (v * mult).round() as u64)
}

/// The HTB classes on `dev` in the gateway as the kernel reports them (`tc class show`).
fn kernel_classes(topo: &Topology, dev: &str) -> BTreeMap<String, (u64, u64, u32)> {
    let out = topo
        .gw
        .run("tc", &["class", "show", "dev", dev])
        .expect("tc class show");
    let mut m = BTreeMap::new();
    for line in out.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        if w.len() < 3 || w[1] != "htb" {
            continue;
        }
        let after = |key: &str| w.iter().position(|x| *x == key).and_then(|i| w.get(i + 1));
        let rate = after("rate").and_then(|s| parse_tc_rate(s)).unwrap_or(0);
        let ceil = after("ceil").and_then(|s| parse_tc_rate(s)).unwrap_or(0);
        let prio = after("prio").and_then(|s| s.parse().ok()).unwrap_or(0);
        m.insert(w[2].to_string(), (rate, ceil, prio));
    }
    m
}

/// `shaper status --json --interval 0` (no rate sampling: returns at once).
fn status_now(shaper: &Shaper) -> Result<serde_json::Value, String> {
    let out = shaper
        .command(&["status", "--json", "--interval", "0"])
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

/// The upload direction's video class's `classified_packets` (the classifier's counter).
fn video_classified(st: &serde_json::Value) -> Option<u64> {
    st["directions"][0]["classes"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == "video")?["classified_packets"]
        .as_u64()
}

/// Sent-packet counter of HTB class `classid` on `dev` (`tc -s class show`).
fn htb_class_packets(topo: &Topology, dev: &str, classid: &str) -> u64 {
    let out = topo
        .gw
        .run("tc", &["-s", "class", "show", "dev", dev])
        .expect("tc -s class show");
    let mut found = false;
    for line in out.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        if w.first() == Some(&"class") {
            found = w.get(2) == Some(&classid);
        } else if found && w.first() == Some(&"Sent") {
            return w.get(3).and_then(|s| s.parse().ok()).unwrap_or(0);
        }
    }
    0
}

/// Everything that counts drops on the path, for a report when packets are missing.
fn loss_evidence(topo: &Topology, shaper: &Shaper) -> String {
    let mut s = String::new();
    let mut add = |title: &str, r: anyhow::Result<String>| {
        s.push_str(&format!("--- {title}\n"));
        match r {
            Ok(o) => s.push_str(&o),
            Err(e) => s.push_str(&format!("({e:#})\n")),
        }
    };
    for dev in [GW_WAN_IF, GW_LAN_IF] {
        add(
            &format!("gw: tc -s class show dev {dev}"),
            topo.gw.run("tc", &["-s", "class", "show", "dev", dev]),
        );
        add(
            &format!("gw: tc -s qdisc show dev {dev}"),
            topo.gw.run("tc", &["-s", "qdisc", "show", "dev", dev]),
        );
    }
    for (name, ns) in [
        ("lan", &topo.lan),
        ("gw", &topo.gw),
        ("modem", &topo.modem),
        ("srv", &topo.srv),
    ] {
        add(
            &format!("{name}: ip -s link"),
            ns.run("ip", &["-s", "link"]),
        );
    }
    add(
        "srv: /proc/net/snmp (Udp)",
        topo.srv.run("cat", &["/proc/net/snmp"]).map(|o| {
            o.lines()
                .filter(|l| l.starts_with("Udp:"))
                .collect::<Vec<_>>()
                .join("\n")
                + "\n"
        }),
    );
    add(
        "lan: /proc/net/snmp (Udp)",
        topo.lan.run("cat", &["/proc/net/snmp"]).map(|o| {
            o.lines()
                .filter(|l| l.starts_with("Udp:"))
                .collect::<Vec<_>>()
                .join("\n")
                + "\n"
        }),
    );
    add(
        "shaper status --json: classifier",
        status_now(shaper)
            .map(|v| format!("{}\n", v["classifier"]))
            .map_err(|e| anyhow::anyhow!(e)),
    );
    s
}

// ---------------------------------------------------------------------------------------------
// A paced UDP stream lan -> srv with sequence numbers

struct SendLog {
    sent: u64,
    send_errors: u64,
    last_error: Option<String>,
    /// (packets sent so far, CLOCK_MONOTONIC ns) after every burst: when a sequence number
    /// left the sender.
    marks: Vec<(u64, u64)>,
    elapsed: Duration,
}

struct Stream {
    stop: Arc<AtomicBool>,
    drain: Arc<AtomicBool>,
    sender: JoinHandle<SendLog>,
    receiver: JoinHandle<Vec<u64>>,
}

struct StreamResult {
    log: SendLog,
    received: u64,
    duplicates: u64,
    /// Missing sequence numbers as ranges [first, last].
    missing: Vec<(u64, u64)>,
}

impl Stream {
    /// Starts a receiver on srv:`port` and a sender in lan at `pps` packets per second.
    fn start(topo: &Topology, port: u16, pps: u64) -> Stream {
        let addr = SocketAddr::new(SRV_V4.into(), port);
        let rx = topo
            .srv
            .within(move || Ok(UdpSocket::bind(addr)?))
            .expect("bind receiver");
        // 16 MB of receive buffer (past rmem_max: we are root), so a receiver descheduled
        // on a busy box does not drop.
        shaper_tests::gateway::force_rcvbuf(&rx, 16 << 20);
        rx.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let tx = topo
            .lan
            .within(move || {
                let s = UdpSocket::bind("0.0.0.0:0")?;
                s.connect(addr)?;
                Ok(s)
            })
            .expect("bind sender");
        let stop = Arc::new(AtomicBool::new(false));
        let drain = Arc::new(AtomicBool::new(false));
        let d = drain.clone();
        let receiver = std::thread::spawn(move || {
            let mut seqs = Vec::with_capacity(1 << 20);
            let mut buf = [0u8; 2048];
            let mut idle_since: Option<Instant> = None;
            loop {
                match rx.recv(&mut buf) {
                    Ok(n) if n >= 12 && buf[..4] == MAGIC.to_le_bytes() => {
                        seqs.push(u64::from_le_bytes(buf[4..12].try_into().unwrap()));
                        idle_since = None;
                    }
                    Ok(_) => {}
                    Err(_) => {
                        // Timeout: once the sender has stopped, 1 s of silence ends it.
                        if d.load(Ordering::Relaxed) {
                            let t = *idle_since.get_or_insert_with(Instant::now);
                            if t.elapsed() > Duration::from_secs(1) {
                                break;
                            }
                        }
                    }
                }
            }
            seqs
        });
        let s = stop.clone();
        let sender = std::thread::spawn(move || {
            let mut log = SendLog {
                sent: 0,
                send_errors: 0,
                last_error: None,
                marks: Vec::new(),
                elapsed: Duration::ZERO,
            };
            let mut pkt = [0u8; PAYLOAD];
            pkt[..4].copy_from_slice(&MAGIC.to_le_bytes());
            let t0 = Instant::now();
            while !s.load(Ordering::Relaxed) {
                let due = (t0.elapsed().as_nanos() * u128::from(pps) / 1_000_000_000) as u64;
                // Catch up after a descheduling, but in bursts of at most 64.
                let mut burst = 0;
                while log.sent < due && burst < 64 {
                    pkt[4..12].copy_from_slice(&log.sent.to_le_bytes());
                    match tx.send(&pkt) {
                        Ok(_) => log.sent += 1,
                        Err(e) => {
                            // Not sent: the same sequence number goes again.
                            log.send_errors += 1;
                            log.last_error = Some(e.to_string());
                            break;
                        }
                    }
                    burst += 1;
                }
                log.marks.push((log.sent, monotonic_ns()));
                std::thread::sleep(Duration::from_micros(500));
            }
            log.elapsed = t0.elapsed();
            log
        });
        Stream {
            stop,
            drain,
            sender,
            receiver,
        }
    }

    /// Stops the sender, waits for the receiver to drain, and accounts for every packet.
    fn finish(self) -> StreamResult {
        self.stop.store(true, Ordering::Relaxed);
        let log = self.sender.join().expect("sender thread");
        self.drain.store(true, Ordering::Relaxed);
        let mut seqs = self.receiver.join().expect("receiver thread");
        let received_total = seqs.len() as u64;
        seqs.sort_unstable();
        let before = seqs.len();
        seqs.dedup();
        let duplicates = (before - seqs.len()) as u64;
        let mut missing = Vec::new();
        let mut next = 0u64;
        for &s in &seqs {
            if s > next {
                missing.push((next, s - 1));
            }
            next = next.max(s + 1);
        }
        if next < log.sent {
            missing.push((next, log.sent - 1));
        }
        StreamResult {
            received: received_total - duplicates,
            log,
            duplicates,
            missing,
        }
    }
}

impl StreamResult {
    /// When sequence number `seq` was sent (CLOCK_MONOTONIC ns), from the burst marks.
    fn sent_at(&self, seq: u64) -> Option<u64> {
        let i = self.log.marks.partition_point(|(n, _)| *n <= seq);
        self.log.marks.get(i).map(|(_, t)| *t)
    }

    /// The missing ranges with their send times, and which reload (if any) was running.
    fn describe_missing(&self, t0_ns: u64, windows: &[(&str, u64, u64)]) -> String {
        let mut s = String::new();
        for (a, b) in self.missing.iter().take(40) {
            let ta = self.sent_at(*a).unwrap_or(0);
            let tb = self.sent_at(*b).unwrap_or(0);
            let during: Vec<&str> = windows
                .iter()
                .filter(|(_, w0, w1)| ta <= *w1 && tb >= *w0)
                .map(|(n, _, _)| *n)
                .collect();
            s.push_str(&format!(
                "  seq {a}..={b} ({} packets) sent at +{:.3}..+{:.3} s, during: {}\n",
                b - a + 1,
                ta.saturating_sub(t0_ns) as f64 / 1e9,
                tb.saturating_sub(t0_ns) as f64 / 1e9,
                if during.is_empty() {
                    "no reload".to_string()
                } else {
                    during.join(", ")
                }
            ));
        }
        if self.missing.len() > 40 {
            s.push_str(&format!("  ... {} ranges in all\n", self.missing.len()));
        }
        s
    }
}

/// The last `n` lines of `s` (a verifier log can be thousands).
fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.trim_end().lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

// ---------------------------------------------------------------------------------------------

#[test]
fn hitless_reload_loses_no_packet() {
    skip_unless_ready!(TOPOLOGY_TOOLS);
    const RELOADS: usize = 100;
    const PPS: u64 = 12_000;
    let topo = Topology::build(None).expect("topology");
    let dir = TempDir::new("reload").expect("temp dir");
    let a = write_config(dir.path(), "a.toml", &config(CLASSES_A, RULES_A));
    let b = write_config(dir.path(), "b.toml", &config(CLASSES_B, RULES_B));
    let mut shaper = Shaper::new(&topo.gw).expect("shaper");
    shaper.apply(&a).expect("apply A");
    for dev in [GW_WAN_IF, GW_LAN_IF] {
        assert_eq!(kernel_classes(&topo, dev), expected_classes(CLASSES_A));
    }
    let video_htb0 = htb_class_packets(&topo, GW_WAN_IF, "1:10");
    let default_htb0 = htb_class_packets(&topo, GW_WAN_IF, "1:2");

    let t0 = monotonic_ns();
    let stream = Stream::start(&topo, VIDEO_PORT, PPS);
    std::thread::sleep(Duration::from_millis(500));
    let mut times = Vec::with_capacity(RELOADS);
    let mut windows: Vec<(String, u64, u64)> = Vec::new();
    let mut failures = Vec::new();
    for i in 0..RELOADS {
        let (cfg, name) = if i % 2 == 0 { (&b, "B") } else { (&a, "A") };
        let w0 = monotonic_ns();
        let start = Instant::now();
        let out = shaper
            .command(&[std::ffi::OsStr::new("apply"), cfg.as_os_str()])
            .output()
            .expect("run shaper apply");
        let took = start.elapsed();
        windows.push((format!("reload {} ({name})", i + 1), w0, monotonic_ns()));
        times.push(took);
        if !out.status.success() {
            failures.push(format!(
                "reload {} ({name}): {}: {}",
                i + 1,
                out.status,
                tail(&String::from_utf8_lossy(&out.stderr), 15)
            ));
            // A failing apply is the product's fault; 100 of them would only take long.
            break;
        }
        // A little traffic-only time between reloads, so both the reload and the steady
        // state are covered.
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    let r = stream.finish();
    let last = if RELOADS.is_multiple_of(2) {
        CLASSES_A
    } else {
        CLASSES_B
    };

    times.sort();
    let rate = r.log.sent as f64 / r.log.elapsed.as_secs_f64();
    println!(
        "hitless reload: sent {} received {} duplicates {} lost {} ({:.0} pps over {:.1} s; {} send errors{}); reloads {} ({} failed)",
        r.log.sent,
        r.received,
        r.duplicates,
        r.log.sent.saturating_sub(r.received),
        rate,
        r.log.elapsed.as_secs_f64(),
        r.log.send_errors,
        r.log.last_error.as_ref().map(|e| format!(", last: {e}")).unwrap_or_default(),
        times.len(),
        failures.len()
    );
    println!(
        "reload time (`shaper apply`, wall): p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms  min {:.1} ms",
        ms(nearest_rank(&times, 50.0).unwrap_or_default()),
        ms(nearest_rank(&times, 99.0).unwrap_or_default()),
        ms(*times.last().unwrap()),
        ms(times[0]),
    );
    let video_htb = htb_class_packets(&topo, GW_WAN_IF, "1:10") - video_htb0;
    let default_htb = htb_class_packets(&topo, GW_WAN_IF, "1:2") - default_htb0;
    println!("HTB on wan0 during the run: video 1:10 sent {video_htb} packets, default 1:2 sent {default_htb}");

    let windows_ref: Vec<(&str, u64, u64)> = windows
        .iter()
        .map(|(n, a, b)| (n.as_str(), *a, *b))
        .collect();
    if !r.missing.is_empty() || r.duplicates > 0 {
        eprintln!("missing packets:\n{}", r.describe_missing(t0, &windows_ref));
        eprintln!("{}", loss_evidence(&topo, &shaper));
    }
    assert!(
        failures.is_empty(),
        "failed reloads:\n{}",
        failures.join("\n")
    );
    assert!(
        rate >= 10_000.0,
        "the sender managed only {rate:.0} pps (wanted >= 10,000)"
    );
    assert_eq!(r.duplicates, 0, "duplicated packets");
    assert_eq!(
        r.received,
        r.log.sent,
        "packets lost across {RELOADS} reloads:\n{}",
        r.describe_missing(t0, &windows_ref)
    );
    assert!(
        video_htb >= r.log.sent,
        "every stream packet went through the video class 1:10 ({video_htb} < {})",
        r.log.sent
    );

    for dev in [GW_WAN_IF, GW_LAN_IF] {
        assert_eq!(
            tcx_programs(&topo.gw, dev),
            1,
            "exactly one classifier on {dev}"
        );
        assert_eq!(
            kernel_classes(&topo, dev),
            expected_classes(last),
            "the last applied config's classes on {dev}, exactly"
        );
    }
    shaper.remove().expect("remove");
}

// ---------------------------------------------------------------------------------------------

/// A `shaper run` daemon with its stderr collected; `up` fires when it logs that it shapes.
struct Daemon {
    child: Child,
    up: mpsc::Receiver<()>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    fn start(shaper: &Shaper, cfg: &Path) -> Daemon {
        let mut child = shaper
            .command(&[std::ffi::OsStr::new("run"), cfg.as_os_str()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start daemon");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, up) = mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // "shaping ... ; SIGHUP reloads ...": the first apply is done.
                if line.contains("SIGHUP reloads") {
                    let _ = tx.send(());
                }
                l.lock().unwrap().push(line);
            }
        });
        Daemon { child, up, log }
    }

    fn wait_up(&self, timeout: Duration) -> Duration {
        let t = Instant::now();
        if self.up.recv_timeout(timeout).is_err() {
            panic!(
                "the daemon did not come up within {timeout:?}; its log:\n{}",
                self.log.lock().unwrap().join("\n")
            );
        }
        t.elapsed()
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: signalling our own child (nsenter execs shaper: same pid).
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            assert!(
                t0.elapsed() < timeout,
                "daemon did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One `status` sample: the video class's classified counter, read at some moment between
/// `start_ns` and `end_ns` (ns since the stream started: the CLI ran in between).
#[derive(Clone, Copy)]
struct Sample {
    start_ns: u64,
    end_ns: u64,
    value: Option<u64>,
}

#[test]
fn kill_9_leaves_shaping_and_restart_adopts() {
    skip_unless_ready!(TOPOLOGY_TOOLS);
    const PPS: u64 = 2_000;
    let topo = Topology::build(None).expect("topology");
    let dir = TempDir::new("kill9").expect("temp dir");
    let cfg = write_config(dir.path(), "site.toml", &config(CLASSES_A, RULES_A));
    let shaper = Shaper::new(&topo.gw).expect("shaper");
    let before = topo.gw_qdiscs().expect("qdiscs");

    let mut d1 = Daemon::start(&shaper, &cfg);
    let up1 = d1.wait_up(Duration::from_secs(30));
    for dev in [GW_WAN_IF, GW_LAN_IF] {
        assert_eq!(kernel_classes(&topo, dev), expected_classes(CLASSES_A));
        assert_eq!(tcx_programs(&topo.gw, dev), 1);
    }
    let video_htb0 = htb_class_packets(&topo, GW_WAN_IF, "1:10");
    let default_htb0 = htb_class_packets(&topo, GW_WAN_IF, "1:2");

    let stream = Stream::start(&topo, VIDEO_PORT, PPS);
    // Sample the classifier counter every 100 ms through the CLI, for the whole run.
    let t0 = monotonic_ns();
    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop_sampler = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (samples, errors, stop) = (samples.clone(), errors.clone(), stop_sampler.clone());
        // The driver only holds paths and a &Netns; a second one for the thread.
        let bin = Shaper::binary_path();
        let (bpffs, run) = (shaper.bpffs_dir().to_owned(), shaper.run_dir().to_owned());
        let gw_path = topo.gw.path().to_owned();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let start_ns = monotonic_ns() - t0;
                let out = std::process::Command::new("nsenter")
                    .arg(format!("--net={}", gw_path.display()))
                    .arg(&bin)
                    .args(["status", "--json", "--interval", "0"])
                    .env("SHAPER_BPFFS", &bpffs)
                    .env("SHAPER_RUN", &run)
                    .output();
                let end_ns = monotonic_ns() - t0;
                let value = match out {
                    Ok(o) if o.status.success() => serde_json::from_slice(&o.stdout)
                        .ok()
                        .and_then(|v: serde_json::Value| video_classified(&v)),
                    Ok(o) => {
                        errors.lock().unwrap().push(format!(
                            "+{:.3} s: {}: {}",
                            end_ns as f64 / 1e9,
                            o.status,
                            String::from_utf8_lossy(&o.stderr).trim()
                        ));
                        None
                    }
                    Err(e) => {
                        errors.lock().unwrap().push(e.to_string());
                        None
                    }
                };
                samples.lock().unwrap().push(Sample {
                    start_ns,
                    end_ns,
                    value,
                });
                if let Some(rest) = Duration::from_millis(100).checked_sub(t.elapsed()) {
                    std::thread::sleep(rest);
                }
            }
        })
    };
    std::thread::sleep(Duration::from_secs(1));

    // kill -9: nothing of the daemon runs any more; the pinned shaping must.
    let t_kill = monotonic_ns() - t0;
    d1.child.kill().expect("SIGKILL");
    let st = d1.child.wait().expect("wait");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&st),
        Some(libc::SIGKILL)
    );
    let v_after_kill = status_now(&shaper)
        .ok()
        .and_then(|v| video_classified(&v))
        .expect("status after kill -9");
    std::thread::sleep(Duration::from_millis(1500));
    for dev in [GW_WAN_IF, GW_LAN_IF] {
        assert_eq!(
            kernel_classes(&topo, dev),
            expected_classes(CLASSES_A),
            "HTB tree on {dev} survives kill -9"
        );
        assert_eq!(
            tcx_programs(&topo.gw, dev),
            1,
            "classifier on {dev} survives kill -9"
        );
    }
    let v_dead = status_now(&shaper)
        .ok()
        .and_then(|v| video_classified(&v))
        .expect("status with the daemon dead");
    assert!(
        v_dead > v_after_kill,
        "classification goes on with the daemon dead ({v_after_kill} -> {v_dead})"
    );

    // Restart: adopts the pinned shaping (same config: an in-place re-apply).
    let t_restart = monotonic_ns() - t0;
    let mut d2 = Daemon::start(&shaper, &cfg);
    let up2 = d2.wait_up(Duration::from_secs(30));
    let t_up = monotonic_ns() - t0;
    std::thread::sleep(Duration::from_millis(1500));
    stop_sampler.store(true, Ordering::Relaxed);
    sampler.join().expect("sampler");
    let r = stream.finish();
    let video_htb = htb_class_packets(&topo, GW_WAN_IF, "1:10") - video_htb0;
    let default_htb = htb_class_packets(&topo, GW_WAN_IF, "1:2") - default_htb0;

    let samples = samples.lock().unwrap().clone();
    let errors = errors.lock().unwrap().clone();
    // A stall: two successful samples with the same value (failed samples are skipped).
    // Nothing was classified between the end of the first and the start of the second
    // sample, so that span is a lower bound on the stall; a slow sampler does not lengthen
    // it. It only counts if the sender did send in it (a starved sender is not a stall).
    let good: Vec<Sample> = samples
        .iter()
        .copied()
        .filter(|s| s.value.is_some())
        .collect();
    let sent_between = |a_ns: u64, b_ns: u64| -> u64 {
        let count_at = |t: u64| {
            let i = r.log.marks.partition_point(|(_, m)| *m <= t0 + t);
            i.checked_sub(1).map_or(0, |i| r.log.marks[i].0)
        };
        count_at(b_ns).saturating_sub(count_at(a_ns))
    };
    // (length, from, to, packets sent in it)
    let mut longest = (0u64, 0u64, 0u64, 0u64);
    let mut run_start = 0usize;
    for i in 1..good.len() {
        if good[i].value != good[run_start].value {
            run_start = i;
            continue;
        }
        let (a, b) = (good[run_start].end_ns, good[i].start_ns);
        // Packets leave the sender and are classified within microseconds; 5 ms of margin.
        let sent = sent_between(a, b.saturating_sub(5_000_000));
        let len = b.saturating_sub(a);
        if sent > 0 && len > longest.0 {
            longest = (len, a, b, sent);
        }
    }
    let mut max_gap = 0u64;
    for w in good.windows(2) {
        max_gap = max_gap.max(w[1].end_ns - w[0].end_ns);
    }
    let before_restart = good
        .iter()
        .rev()
        .find(|s| s.end_ns < t_restart)
        .and_then(|s| s.value);
    let after_up = good
        .iter()
        .find(|s| s.start_ns > t_up)
        .and_then(|s| s.value);
    let last = good.last().and_then(|s| s.value);
    let reset = matches!((before_restart, after_up), (Some(b), Some(a)) if a < b);

    println!(
        "kill -9 / restart: daemon up in {:.0} ms (first) and {:.0} ms (restart); killed at +{:.2} s, restarted at +{:.2} s, up at +{:.2} s",
        ms(up1),
        ms(up2),
        t_kill as f64 / 1e9,
        t_restart as f64 / 1e9,
        t_up as f64 / 1e9
    );
    println!(
        "stream: sent {} received {} duplicates {} lost {}; HTB video 1:10 sent {video_htb}, default 1:2 sent {default_htb}",
        r.log.sent,
        r.received,
        r.duplicates,
        r.log.sent.saturating_sub(r.received)
    );
    println!(
        "classified_packets (video, upload): {} samples ({} failed), longest span without a change while packets were sent {:.0} ms (+{:.2}..+{:.2} s, {} packets sent in it), longest gap between good samples {:.0} ms; before restart {:?}, first after up {:?}, last {:?}: counters {}",
        samples.len(),
        samples.len() - good.len(),
        longest.0 as f64 / 1e6,
        longest.1 as f64 / 1e9,
        longest.2 as f64 / 1e9,
        longest.3,
        max_gap as f64 / 1e6,
        before_restart,
        after_up,
        last,
        if reset { "RESET to zero by the restart's re-apply" } else { "kept" }
    );
    for e in &errors {
        println!("status sample failed: {e}");
    }
    if r.received != r.log.sent || r.duplicates > 0 {
        eprintln!(
            "missing packets:\n{}",
            r.describe_missing(
                t0,
                &[
                    ("kill -9 .. restart", t0 + t_kill, t0 + t_restart),
                    ("restart .. up", t0 + t_restart, t0 + t_up),
                ]
            )
        );
        eprintln!("{}", loss_evidence(&topo, &shaper));
    }
    assert_eq!(r.duplicates, 0, "duplicated packets");
    assert_eq!(
        r.received, r.log.sent,
        "packets lost across kill -9 and restart"
    );
    assert!(
        video_htb >= r.log.sent,
        "every stream packet went through the video class ({video_htb} < {})",
        r.log.sent
    );
    assert!(
        good.len() >= samples.len() * 9 / 10 && good.len() >= 20,
        "too few status samples succeeded ({} of {}): {errors:?}",
        good.len(),
        samples.len()
    );
    assert!(
        longest.0 <= 300_000_000,
        "classification stopped for {:.0} ms (+{:.2}..+{:.2} s) while {} packets were sent",
        longest.0 as f64 / 1e6,
        longest.1 as f64 / 1e9,
        longest.2 as f64 / 1e9,
        longest.3
    );
    for dev in [GW_WAN_IF, GW_LAN_IF] {
        assert_eq!(kernel_classes(&topo, dev), expected_classes(CLASSES_A));
        assert_eq!(
            tcx_programs(&topo.gw, dev),
            1,
            "one classifier on {dev} after the restart"
        );
    }

    // SIGTERM: everything goes, interfaces as found.
    d2.signal(libc::SIGTERM);
    let st = d2.wait_exit(Duration::from_secs(20));
    assert!(st.success(), "clean exit on SIGTERM: {st}");
    assert_eq!(topo.gw_qdiscs().expect("qdiscs"), before, "qdiscs as found");
    for dev in [GW_WAN_IF, GW_LAN_IF] {
        assert_eq!(
            tcx_programs(&topo.gw, dev),
            0,
            "no classifier left on {dev}"
        );
    }
    assert!(
        shaper.leftover_pins().is_empty(),
        "pins left: {:?}",
        shaper.leftover_pins()
    );
}
