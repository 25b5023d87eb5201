//! `shaper calls --pcap` on real media: ffmpeg sends H.264 over RTP, then over SRTP, from a
//! LAN namespace through a router namespace whose nftables drops 3 % of it at random (with a
//! counter: the ground truth), to a far namespace whose UDP socket records what arrives; a
//! flood of random RTP-shaped datagrams from another port goes alongside. The arrivals
//! become a pcap, and the per-call loss `shaper calls` reports must be the router's drops
//! (all but the drops after the last packet that arrived, which no receiver can see), put
//! on the LAN side, with one stream in the call: the flood is not one.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use shaper_tests::netns::Netns;
use shaper_tests::packet::{pcap, Pkt};
use shaper_tests::shaper::Shaper;
use shaper_tests::util::{self, TempDir};

const LAN: &str = "192.168.77.10";
const FAR: &str = "198.51.100.1";
const PORT: u16 = 5004;

struct Lab {
    lan: Netns,
    gw: Netns,
    far: Netns,
}

/// The lab, or None (the skip noted) without root or the tools.
fn lab_or_skip() -> Option<Lab> {
    if !crate::common::root_or_skip() {
        return None;
    }
    if let Some(why) = util::skip_reason(&["ip", "nft", "ffmpeg", "nsenter"]) {
        util::note_skip(&why);
        return None;
    }
    Some(lab())
}

fn lab() -> Lab {
    let (lan, gw, far) = (
        Netns::new("calls-lan").expect("netns"),
        Netns::new("calls-gw").expect("netns"),
        Netns::new("calls-far").expect("netns"),
    );
    // The router's ports are named as the shaper's lab gateway's: `shaper run` shapes them.
    for (a, an, b, bn) in [(&lan, "v0", &gw, "lan0"), (&gw, "wan0", &far, "v1")] {
        shaper_tests::gateway::veth_between(a, an, b, bn);
        a.ip(&["link", "set", an, "up"]).expect("up");
        b.ip(&["link", "set", bn, "up"]).expect("up");
    }
    lan.ip(&["addr", "add", &format!("{LAN}/24"), "dev", "v0"])
        .expect("addr");
    gw.ip(&["addr", "add", "192.168.77.1/24", "dev", "lan0"])
        .expect("addr");
    gw.ip(&["addr", "add", "198.51.100.2/24", "dev", "wan0"])
        .expect("addr");
    far.ip(&["addr", "add", &format!("{FAR}/24"), "dev", "v1"])
        .expect("addr");
    lan.ip(&["route", "add", "default", "via", "192.168.77.1"])
        .expect("route");
    far.ip(&["route", "add", "192.168.77.0/24", "via", "198.51.100.2"])
        .expect("route");
    gw.sysctl("net.ipv4.ip_forward", "1").expect("forwarding");
    Lab { lan, gw, far }
}

/// ffmpeg sending 6 s of 25 fps H.264 at 800 kbit/s (1,200-byte packets) to `url` as RTP,
/// with `extra` output options (SRTP's).
fn ffmpeg_args<'a>(url: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "-hide_banner",
        "-loglevel",
        "error",
        "-re",
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=640x360:rate=25",
        "-t",
        "6",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-tune",
        "zerolatency",
        "-b:v",
        "800k",
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["-f", "rtp", url]);
    args
}

/// `n` random 172-byte datagrams with RTP's version bits, 2 ms apart, from LAN port 40000 to
/// the far end's media port: random UDP that passes the header check and is never a stream.
fn flood(lan: &Netns, n: usize) -> std::thread::JoinHandle<anyhow::Result<()>> {
    lan.spawn_thread(move || {
        let sock = UdpSocket::bind((LAN, 40_000))?;
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..n {
            let mut p: Vec<u8> = (0..172)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            p[0] = 0x80 | (p[0] & 0x3f);
            p[1] &= 0x7f;
            sock.send_to(&p, (FAR, PORT))?;
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    })
}

/// One ffmpeg run of `secs` seconds to `url` with `extra` output options; the arrivals at
/// the far end as a pcap, and the router's drops of it.
fn send_and_capture(
    l: &Lab,
    url: &str,
    extra: &[&str],
    dir: &TempDir,
    name: &str,
) -> (std::path::PathBuf, u64) {
    l.gw.run("nft", &["flush", "ruleset"]).expect("nft flush");
    let rules = "table inet t {\n chain f {\n  type filter hook forward priority 0;\n  udp dport 5004 udp sport != 40000 numgen random mod 100 < 3 counter drop\n }\n}\n";
    let f = dir.write("drop.nft", rules).expect("rules");
    l.gw.run("nft", &["-f", f.to_str().expect("utf-8")])
        .expect("nft -f");

    let stop = Arc::new(AtomicBool::new(false));
    let stop_rx = stop.clone();
    let rx = l.far.spawn_thread(move || {
        let sock = UdpSocket::bind((FAR, PORT))?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65_536];
        while !stop_rx.load(Ordering::Relaxed) {
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                let t = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64;
                got.push((t, from, buf[..n].to_vec()));
            }
        }
        Ok(got)
    });
    std::thread::sleep(Duration::from_millis(300));
    // The flood: 3,000 random 172-byte datagrams with RTP's version bits, from port 40000
    // (not dropped by the router), alongside the call.
    let flood = flood(&l.lan, 3000);
    let args = ffmpeg_args(url, extra);
    let out = l.lan.cmd("ffmpeg", &args).output().expect("ffmpeg runs");
    assert!(
        out.status.success(),
        "ffmpeg: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    flood.join().expect("flood thread").expect("flood");
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let got = rx.join().expect("receiver thread").expect("receiver");
    let frames: Vec<(u64, Vec<u8>)> = got
        .iter()
        .map(|(t, from, p)| {
            let pkt = Pkt::udp(&from.ip().to_string(), FAR, from.port(), PORT);
            (*t, pkt.with_payload(p))
        })
        .collect();
    let path = dir.path().join(name);
    std::fs::write(&path, pcap(&frames)).expect("pcap");
    (path, dropped_to(&l.gw, PORT))
}

#[test]
fn per_call_loss_from_real_rtp_and_srtp_is_the_routers_drops() {
    let Some(l) = lab_or_skip() else {
        return;
    };
    let dir = TempDir::new("calls").expect("temp dir");
    // A 30-byte SRTP master key and salt, base64 (fixed: the test's own).
    let srtp_params = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNk";
    let runs: [(&str, Vec<&str>, &str); 2] = [
        ("rtp", vec![], "rtp://198.51.100.1:5004?pkt_size=1200"),
        (
            "srtp",
            vec![
                "-srtp_out_suite",
                "AES_CM_128_HMAC_SHA1_80",
                "-srtp_out_params",
                srtp_params,
            ],
            "srtp://198.51.100.1:5004?pkt_size=1200",
        ),
    ];
    let shaper = Shaper::binary_path();
    for (name, extra, url) in runs {
        let (pcap_path, drops) = send_and_capture(&l, url, &extra, &dir, &format!("{name}.pcap"));
        let out = util::run(std::process::Command::new(&shaper).args([
            "calls",
            "--pcap",
            pcap_path.to_str().expect("utf-8"),
            "--show-addresses",
            "--json",
        ]))
        .expect("shaper calls");
        let calls: serde_json::Value = serde_json::from_str(&out).expect("JSON");
        let calls = calls.as_array().expect("a list");
        assert_eq!(calls.len(), 1, "{name}: one call: {out}");
        let c = &calls[0];
        assert_eq!(c["lan_host"], LAN, "{name}");
        let up = &c["up"];
        // The flood sent from its own port never made a stream: one SSRC.
        assert_eq!(up["streams"], 1, "{name}: {up}");
        assert_eq!(c["down"]["streams"], 0, "{name}");
        assert_eq!(up["loss_where"], "lan", "{name}");
        let lost = up["lost"].as_u64().expect("lost");
        let expected = up["expected"].as_u64().expect("expected");
        eprintln!("{name}: router dropped {drops}, shaper calls counts {lost} lost of {expected}");
        assert!(
            drops > 0,
            "{name}: the router dropped nothing in {expected} packets"
        );
        // Drops after the last arrival cannot show as a gap; a few at most.
        assert!(
            lost <= drops && drops - lost <= 3,
            "{name}: {lost} lost vs {drops} dropped"
        );
        let pct = up["loss_pct"].as_f64().expect("pct");
        let truth = drops as f64 * 100.0 / (expected + drops - lost) as f64;
        assert!((pct - truth).abs() <= 0.3, "{name}: {pct} % vs {truth} %");
    }
}

/// The router's drops of UDP to `port` so far (the counter of its rule for that port).
fn dropped_to(gw: &Netns, port: u16) -> u64 {
    let out = gw.run("nft", &["list", "ruleset"]).expect("nft list");
    let line = out
        .lines()
        .find(|l| l.contains(&format!("udp dport {port} ")) && l.contains("counter packets"))
        .unwrap_or_else(|| panic!("no counter for port {port}: {out}"));
    let n = line.split("counter packets ").nth(1).expect("a counter");
    n.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .expect("a count")
}

/// Waits for a spawned tool (stderr piped) and asserts it succeeded, its stderr in the message.
fn wait_ok(c: &mut std::process::Child, what: &str) {
    let st = c.wait().unwrap_or_else(|e| panic!("{what}: {e}"));
    let mut err = String::new();
    if let Some(mut e) = c.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    assert!(st.success(), "{what}: {err}");
}

/// The text of the daemon's calls.jsonl and its records.
fn call_records(shaper: &Shaper) -> (String, Vec<serde_json::Value>) {
    let log = std::fs::read_to_string(shaper.run_dir().join("calls.jsonl")).unwrap_or_default();
    let records = log
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON record"))
        .collect();
    (log, records)
}

/// A UDP sink in `ns` on `addr:port` until `stop` (so senders see no port unreachable):
/// the datagrams that came from port `from` (the receiver's count).
fn sink(
    ns: &Netns,
    addr: &'static str,
    port: u16,
    from: u16,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<anyhow::Result<u64>> {
    ns.spawn_thread(move || {
        let sock = UdpSocket::bind((addr, port))?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let mut buf = vec![0u8; 65_536];
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            if let Ok((_, a)) = sock.recv_from(&mut buf) {
                n += u64::from(a.port() == from);
            }
        }
        Ok(n)
    })
}

fn ffmpeg_to(ns: &Netns, url: &str) -> std::process::Child {
    ns.cmd("ffmpeg", &ffmpeg_args(url, &[]))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("ffmpeg starts")
}

/// The router's nftables dropping `up_pct` % of the UDP to the far end's port 5004 (the
/// flood's port 40000 aside) and `down_pct` % of that to the LAN's port 5006, before the
/// shaper's queues; then `shaper run` on it, UDP to 5004 and from LAN port 5006 in `video`,
/// `[calls] classes = ["video"]`, `quiet_s = 2`.
fn router_shaper(
    l: &Lab,
    dir: &TempDir,
    shaper: &Shaper,
    up_pct: u32,
    down_pct: u32,
) -> shaper_tests::shaper::Daemon {
    router_shaper_at(l, dir, shaper, up_pct, down_pct, 40_000_000)
}

/// [`router_shaper`] with a download line of `down_bps`.
fn router_shaper_at(
    l: &Lab,
    dir: &TempDir,
    shaper: &Shaper,
    up_pct: u32,
    down_pct: u32,
    down_bps: u64,
) -> shaper_tests::shaper::Daemon {
    let rules = format!(
        "table inet t {{\n chain f {{\n  type filter hook forward priority 0;\n  udp dport 5004 udp sport != 40000 numgen random mod 100 < {up_pct} counter drop\n  udp dport 5006 numgen random mod 100 < {down_pct} counter drop\n }}\n}}\n"
    );
    let f = dir.write("drop.nft", &rules).expect("rules");
    l.gw.run("nft", &["-f", f.to_str().expect("utf-8")])
        .expect("nft -f");
    let cfg = shaper_tests::config::Config::new(20_000_000, down_bps)
        .class("video", 0, 40)
        .default_class("default", 1, 60)
        .rule(
            shaper_tests::config::Rule::new("rtp-up", "video")
                .protocol("udp")
                .dst_ports(&["5004"]),
        )
        .rule(
            shaper_tests::config::Rule::new("rtp-down", "video")
                .protocol("udp")
                .src_ports(&["5006"]),
        )
        .calls(&["video"], 2)
        .write(dir.path(), "calls.toml")
        .expect("config");
    shaper_tests::shaper::Daemon::start(shaper, &cfg, dir.path().join("daemon.log"), "info")
        .expect("shaper run")
}

/// Twenty consultations at once: twenty LAN hosts each send Opus audio over RTP (ffmpeg,
/// 50 packets a second) to the far end through `shaper run` on the router, which drops
/// 1 % of them. Every call is found, each with one stream and no other, and their loss
/// together is the router's drops.
#[test]
fn twenty_concurrent_calls_are_all_found() {
    let Some(l) = lab_or_skip() else {
        return;
    };
    let dir = TempDir::new("calls-twenty").expect("temp dir");
    let shaper = Shaper::new(&l.gw).expect("shaper");
    let daemon = router_shaper(&l, &dir, &shaper, 1, 0);
    let hosts: Vec<String> = (0..20).map(|i| format!("192.168.77.{}", 100 + i)).collect();
    for h in &hosts {
        l.lan
            .ip(&["addr", "add", &format!("{h}/24"), "dev", "v0"])
            .expect("addr");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let sink = sink(&l.far, FAR, 5004, 0, stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    let mut senders: Vec<std::process::Child> = hosts
        .iter()
        .map(|h| {
            let url = format!("rtp://{FAR}:5004?localaddr={h}&localport=6000");
            l.lan
                .cmd(
                    "ffmpeg",
                    &[
                        "-hide_banner",
                        "-loglevel",
                        "error",
                        "-re",
                        "-f",
                        "lavfi",
                        "-i",
                        "sine=frequency=440:sample_rate=48000",
                        "-t",
                        "6",
                        "-c:a",
                        "libopus",
                        "-b:a",
                        "32k",
                        "-f",
                        "rtp",
                        &url,
                    ],
                )
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("ffmpeg starts")
        })
        .collect();
    for c in &mut senders {
        wait_ok(c, "ffmpeg");
    }
    std::thread::sleep(Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    sink.join().expect("sink thread").expect("sink");
    let drops = dropped_to(&l.gw, 5004);
    let (log, records) = call_records(&shaper);
    let (_, daemon_log) = daemon.stop().expect("daemon stops");
    let mut found: Vec<String> = records
        .iter()
        .map(|c| c["lan_host"].as_str().unwrap_or("").to_string())
        .collect();
    found.sort();
    assert_eq!(found, hosts, "every call found, once:\n{log}\n{daemon_log}");
    let (mut lost, mut expected) = (0, 0);
    for c in &records {
        assert_eq!(c["up"]["streams"], 1, "{c}");
        assert_eq!(c["down"]["streams"], 0, "{c}");
        lost += c["up"]["lost"].as_u64().expect("lost");
        expected += c["up"]["expected"].as_u64().expect("expected");
    }
    eprintln!("20 calls: router dropped {drops}, the kernel counted {lost} lost of {expected}");
    let truth = drops as f64 * 100.0 / expected as f64;
    let pct = lost as f64 * 100.0 / expected as f64;
    assert!(
        (pct - truth).abs() <= 0.3,
        "{pct} % lost vs {truth} % dropped"
    );
}

/// A call while an upload fills the line: iperf3 (TCP, default windows) from the LAN host
/// to the far end for the whole call, through `shaper run` shaping the upload to 20 Mbit/s.
/// The call's record says the line was full upstream for much of the call and not
/// downstream.
#[test]
fn a_call_records_that_the_line_was_full() {
    let Some(l) = lab_or_skip() else {
        return;
    };
    if let Some(why) = util::skip_reason(&["iperf3"]) {
        util::note_skip(&why);
        return;
    }
    let dir = TempDir::new("calls-full").expect("temp dir");
    let shaper = Shaper::new(&l.gw).expect("shaper");
    let daemon = router_shaper(&l, &dir, &shaper, 0, 0);
    // Listening before the client starts (a loaded machine can take a while).
    let server = shaper_tests::iperf::IperfServer::start(&l.far, 5201).expect("iperf3 server");
    let stop = Arc::new(AtomicBool::new(false));
    let sink = sink(&l.far, FAR, 5004, 5010, stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    let mut bulk = l
        .lan
        .cmd("iperf3", &["-c", FAR, "-p", "5201", "-t", "12", "-B", LAN])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("iperf3 client");
    std::thread::sleep(Duration::from_secs(2));
    let mut up = ffmpeg_to(
        &l.lan,
        "rtp://198.51.100.1:5004?pkt_size=1200&localport=5010",
    );
    wait_ok(&mut up, "ffmpeg");
    wait_ok(&mut bulk, "the upload (iperf3)");
    drop(server);
    std::thread::sleep(Duration::from_secs(4));
    stop.store(true, Ordering::Relaxed);
    sink.join().expect("sink thread").expect("sink");
    let (log, records) = call_records(&shaper);
    let (_, daemon_log) = daemon.stop().expect("daemon stops");
    assert_eq!(records.len(), 1, "{log}\n{daemon_log}");
    let (up, down) = (&records[0]["up"], &records[0]["down"]);
    let full = up["line_full_pct"].as_f64().expect("watched");
    eprintln!(
        "line full upstream {full:.0} % of the call, downstream {}",
        down["line_full_pct"]
    );
    // TCP's sawtooth under the shaper dips below 90 % of the rate in some seconds: 75-100 %
    // full in the runs so far; an idle line's calls record 0 (the test above).
    assert!(full >= 30.0, "the upload filled the line: {up}");
    // The gateway's own drops in the measured class were counted each way.
    for q in [up, down] {
        assert!(q["shaper_drops"].as_u64().is_some(), "gateway drops: {q}");
    }
    assert!(
        down["line_full_pct"].as_f64().expect("watched") < 30.0,
        "{down}"
    );
}

/// `shaper run` on the router measures the call in the kernel: RTP up (lan -> far:5004)
/// and down (far -> lan:5006) in the measured class `video`, the router's nftables
/// dropping 3 % up and 2 % down before the shaper's queues (the upload's loss is then
/// the LAN side's, the download's the line's), a random flood to 5004 beside them. The
/// call shows in `shaper calls` while it runs; when it has been quiet for `quiet_s`, its
/// record in calls.jsonl has each direction's loss equal to the router's drops (minus at
/// most 3 after the last arrival), one stream each way, and `shaper report` counts it.
#[test]
fn the_daemon_measures_calls_in_the_kernel() {
    let Some(l) = lab_or_skip() else {
        return;
    };
    let dir = TempDir::new("calls-daemon").expect("temp dir");
    let shaper = Shaper::new(&l.gw).expect("shaper");
    let daemon = router_shaper(&l, &dir, &shaper, 3, 2);

    let stop = Arc::new(AtomicBool::new(false));
    let sinks = [
        sink(&l.far, FAR, 5004, 5010, stop.clone()),
        sink(&l.lan, LAN, 5006, 5012, stop.clone()),
    ];
    std::thread::sleep(Duration::from_millis(300));
    let mut up = ffmpeg_to(
        &l.lan,
        "rtp://198.51.100.1:5004?pkt_size=1200&localport=5010",
    );
    let mut down = ffmpeg_to(
        &l.far,
        "rtp://192.168.77.10:5006?pkt_size=1200&localport=5012",
    );
    let flood = flood(&l.lan, 2000);
    // Mid-call: the call is listed live (polled: the encoders take a moment to start).
    let mut live = serde_json::Value::Null;
    let mut in_progress = 0;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(250));
        let out = util::run(&mut shaper.command(&["calls", "--json"])).expect("shaper calls");
        live = serde_json::from_str(&out).expect("JSON");
        in_progress = live["calls"].as_array().expect("calls").len();
        if in_progress > 0 {
            break;
        }
    }
    wait_ok(&mut up, "ffmpeg up");
    wait_ok(&mut down, "ffmpeg down");
    flood.join().expect("flood thread").expect("flood");
    // Quiet for quiet_s (2 s) and the 1-s tick: the call has ended.
    std::thread::sleep(Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    let arrived: Vec<u64> = sinks
        .into_iter()
        .map(|s| s.join().expect("sink thread").expect("sink"))
        .collect();
    let (drop_up, drop_down) = (dropped_to(&l.gw, 5004), dropped_to(&l.gw, 5006));
    let (log, records) = call_records(&shaper);
    let report = util::run(&mut shaper.command(&["report", "--json"])).expect("shaper report");
    let status = shaper.status_json().expect("status");
    let (_, daemon_log) = daemon.stop().expect("daemon stops");
    assert_eq!(
        in_progress, 1,
        "one call in progress mid-call: {live}\n{daemon_log}"
    );
    assert_eq!(records.len(), 1, "one ended call: {log}\n{daemon_log}");
    let c = &records[0];
    assert_eq!(c["lan_host"], LAN);
    assert_eq!(c["peer"], FAR);
    for (d, drops, arrived) in [("up", drop_up, arrived[0]), ("down", drop_down, arrived[1])] {
        let q = &c[d];
        eprintln!(
            "{d}: router dropped {drops}, receiver got {arrived}; the kernel counted {} of {} expected, {} lost",
            q["packets"], q["expected"], q["lost"]
        );
    }
    for (d, drops, place, arrived) in [
        ("up", drop_up, "lan", arrived[0]),
        ("down", drop_down, "line or beyond", arrived[1]),
    ] {
        let q = &c[d];
        assert_eq!(q["streams"], 1, "{d}: one stream (the flood is none): {q}");
        assert_eq!(q["loss_where"], place, "{d}");
        assert!(drops > 0, "{d}: the router dropped nothing");
        let (lost, expected, packets) = (
            q["lost"].as_u64().expect("lost"),
            q["expected"].as_u64().expect("expected"),
            q["packets"].as_u64().expect("packets"),
        );
        // The receiver got every packet the kernel counted, and the one before them that
        // put the stream on probation.
        assert!(
            packets < arrived && arrived - packets <= 3,
            "{d}: {packets} counted, {arrived} arrived: {q}"
        );
        // Within 0.3 percentage points of the router's drops (the bound).
        let truth = drops as f64 * 100.0 / expected as f64;
        let pct = q["loss_pct"].as_f64().expect("pct");
        assert!(
            (pct - truth).abs() <= 0.3,
            "{d}: {pct} % lost vs {truth} % dropped: {q}"
        );
        assert!(
            lost.abs_diff(drops) <= 3,
            "{d}: {lost} lost vs {drops} dropped: {q}"
        );
        // The line (20/40 Mbit/s, carrying 0.8 Mbit/s) was watched and never full, its
        // rate never held down.
        assert_eq!(q["line_full_pct"], 0.0, "{d}: {q}");
        assert_eq!(q["rate_held_pct"], 0.0, "{d}: {q}");
        // The drops were nftables', before the shaper: its queues dropped nothing of an
        // under-rate call.
        assert_eq!(q["shaper_drops"], 0, "{d}: the gateway's own drops: {q}");
        assert!(
            q["jitter_ms"].as_f64().is_some(),
            "{d}: jitter measured: {q}"
        );
    }
    let report: serde_json::Value = serde_json::from_str(&report).expect("JSON");
    assert_eq!(report["days"][0]["calls"], 1, "{report}");
    assert_eq!(status["calls"]["ended"], 1, "{}", status["calls"]);
    assert_eq!(status["calls"]["active"], 0, "{}", status["calls"]);
    assert!(daemon_log.contains("call ended:"), "{daemon_log}");
    assert!(daemon_log.contains("gw drops 0"), "{daemon_log}");
    // The line's hours, written when the daemon stopped (the hour so far): watched both
    // ways, never full.
    let lines = std::fs::read_to_string(shaper.run_dir().join("line.jsonl")).unwrap_or_default();
    let hours: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert!(!hours.is_empty(), "line.jsonl: {lines}\n{daemon_log}");
    let watched: f64 = hours
        .iter()
        .map(|h| h["watched_s"][0].as_f64().unwrap_or(0.0))
        .sum();
    let full: f64 = hours
        .iter()
        .map(|h| h["full_s"][1].as_f64().unwrap_or(0.0))
        .sum();
    assert!(watched >= 5.0 && full == 0.0, "{lines}");
}

/// The HTB drops of `dev`'s classes in `ns` (`tc -s class show`: the test's own view of
/// the kernel's counters, beside the product's).
fn class_drops(ns: &Netns, dev: &str) -> u64 {
    let out = ns
        .run("tc", &["-s", "class", "show", "dev", dev])
        .expect("tc -s class show");
    out.split("dropped ")
        .skip(1)
        .filter_map(|t| t.split(',').next()?.trim().parse::<u64>().ok())
        .sum()
}

/// The gateway's own drops of a call, per stream: a 800 kbit/s H.264 download into a
/// 700 kbit/s download line, beside a 300 kbit/s stream of non-RTP datagrams in the same
/// class, so the shaper's queue drops both. The call's record counts the drops of its own
/// stream exactly (the drop tracer): what the receiver missed is what the gateway dropped
/// of it (nothing was lost before the gateway), and fewer than the class dropped in all
/// (the other flow's drops are not the call's).
#[test]
fn the_gateways_own_drops_are_counted_per_stream() {
    let Some(l) = lab_or_skip() else {
        return;
    };
    if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        util::note_skip("the kernel has no BTF (/sys/kernel/btf/vmlinux): no drop tracer");
        return;
    }
    let dir = TempDir::new("calls-drops").expect("temp dir");
    let shaper = Shaper::new(&l.gw).expect("shaper");
    let daemon = router_shaper_at(&l, &dir, &shaper, 0, 0, 700_000);
    let stop = Arc::new(AtomicBool::new(false));
    let rx = sink(&l.lan, LAN, 5006, 5012, stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    // Not RTP (zero bytes: version 0), 300 kbit/s from another port to the same LAN port.
    let other = l.far.spawn_thread(move || {
        let sock = UdpSocket::bind((FAR, 5014))?;
        let buf = [0u8; 1000];
        for _ in 0..240 {
            sock.send_to(&buf, (LAN, 5006))?;
            std::thread::sleep(Duration::from_millis(25));
        }
        anyhow::Ok(())
    });
    let mut down = ffmpeg_to(
        &l.far,
        "rtp://192.168.77.10:5006?pkt_size=1200&localport=5012",
    );
    wait_ok(&mut down, "ffmpeg down");
    other.join().expect("other thread").expect("other flow");
    // Quiet for quiet_s (2 s) and the 1-s tick: the call has ended.
    std::thread::sleep(Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    let arrived = rx.join().expect("sink thread").expect("sink");
    let class_dropped = class_drops(&l.gw, "lan0");
    let (log, records) = call_records(&shaper);
    let (_, daemon_log) = daemon.stop().expect("daemon stops");
    assert_eq!(records.len(), 1, "one ended call: {log}\n{daemon_log}");
    let q = &records[0]["down"];
    let (packets, lost, drops) = (
        q["packets"].as_u64().expect("packets"),
        q["lost"].as_u64().expect("lost"),
        q["shaper_drops"].as_u64().expect("shaper_drops"),
    );
    eprintln!(
        "down: the gateway counted {packets} ({lost} lost before it) and dropped {drops} of \
         them; the receiver got {arrived}; the download classes dropped {class_dropped} in all"
    );
    assert_eq!(
        q["shaper_drops_exact"], true,
        "the drop tracer ran: {q}\n{daemon_log}"
    );
    assert_eq!(lost, 0, "nothing was lost before the gateway: {q}");
    assert!(
        drops > 0,
        "the 700 kbit/s line dropped some of the call: {q}"
    );
    // The receiver got what the gateway counted and did not drop, and the packet before
    // them that put the stream on probation (unless the queue dropped that one).
    let delivered = packets - drops;
    assert!(
        arrived >= delivered && arrived - delivered <= 1,
        "the receiver got {arrived}, the gateway counted {packets} and dropped {drops}: {q}"
    );
    assert!(
        class_dropped > drops,
        "the class's drops ({class_dropped}) include the other flow's: the call's are fewer ({drops})"
    );
}
