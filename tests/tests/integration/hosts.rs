//! The host tier in real namespaces: rules that name hosts learn their addresses from DNS
//! answers (dnsmasq on the server, `dig` on the LAN host) and decide TLS connections by their
//! server name (`openssl s_server` / `s_client`), both through the `shaper run` daemon; and the
//! classifier's flow behaviour: a class's bulk flow is demoted (iperf3), a media-like
//! default-class UDP flow is promoted while a flood is not.
//!
//! Every test first shows the traffic landing where it would without the feature (or the
//! negative case), so each can fail.

use std::ffi::OsStr;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use shaper_tests::config::{Config, Rule};
use shaper_tests::hostlab::{
    class_counters, dig, global, global_both, hosts_json, media_exchange, paced, rule,
    start_daemon, start_dnsmasq, start_tls_server, status, stop_daemon, udp_client, wait_v6_path,
    Echo, DNS_TOOLS, MEDIA_NAME,
};
use shaper_tests::iperf::IperfServer;
use shaper_tests::shaper::Daemon;
use shaper_tests::topology::{SRV_V4, SRV_V6};
use shaper_tests::{skip_unless_ready, Netns, Shaper, TempDir, Topology};

use crate::common::{ACCURX_RULE, DOWNLOAD, MEDIA_PORT, PACS_NAME, TLS_TOOLS, UPLOAD};

/// What the QUIC test needs on PATH (ngtcp2-client).
const QUIC_TOOLS: &[&str] = &[
    "ip",
    "tc",
    "nsenter",
    "sysctl",
    "gtlsclient",
    "timeout",
    "unshare",
    "mount",
];
/// What the demotion test needs on PATH.
const IPERF_TOOLS: &[&str] = &["ip", "tc", "nsenter", "sysctl", "ss", "iperf3", "timeout"];
/// What the promotion test needs on PATH.
const UDP_TOOLS: &[&str] = &["ip", "tc", "nsenter", "sysctl"];

/// Video (priority 0) and images (2), 30 % each, and the default class (4, 20 %), at
/// `bps` both ways.
fn video_images_default(bps: u64) -> Config {
    Config::new(bps, bps)
        .class("video", 0, 30)
        .class("images", 2, 30)
        .default_class("default", 4, 20)
}

// ---------------------------------------------------------------------------------------------
// The daemon, the status JSON and hosts.json

fn hosts_stat(h: &Value, name: &str) -> u64 {
    h["stats"][name].as_u64().unwrap_or(0)
}

/// Polls hosts.json until `f` holds of it; panics (with both files and the daemon's log)
/// after `timeout`. Returns the hosts.json that satisfied `f`.
fn wait_hosts(
    what: &str,
    shaper: &Shaper,
    daemon: &Daemon,
    timeout: Duration,
    f: impl Fn(&Value) -> bool,
) -> Value {
    let t0 = Instant::now();
    loop {
        if let Some(h) = hosts_json(shaper) {
            if f(&h) {
                eprintln!("{what}: after {:?}", t0.elapsed());
                return h;
            }
        }
        if t0.elapsed() > timeout {
            panic!(
                "timed out after {timeout:?} waiting for {what}\nhosts.json: {}\ndaemon log:\n{}",
                hosts_json(shaper).map_or("(none)".into(), |h| h.to_string()),
                daemon.log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------------------------
// UDP traffic written here

// ---------------------------------------------------------------------------------------------
// 1. DNS answers

#[test]
fn dns_answers_put_a_host_rules_addresses_in_its_class() {
    skip_unless_ready!(DNS_TOOLS);
    let topo = Topology::build(None).expect("topology");
    wait_v6_path(&topo);
    let dir = TempDir::new("hosts-dns").expect("temp dir");
    let cfg = video_images_default(50_000_000)
        .rule(Rule::new("clinical-video", "video").apps(&["accurx-video"]))
        .rule(Rule::new("imaging", "images").apps(&["dicom"]))
        .write(dir.path(), "site.toml")
        .expect("write config");
    let shaper = Shaper::new(&topo.gw).expect("shaper");
    let qdiscs_before = topo.gw_qdiscs().expect("qdiscs");
    let daemon = start_daemon(&shaper, &cfg, dir.path().join("daemon.log"));
    let dns_log = dir.path().join("dnsmasq.log");
    start_dnsmasq(&topo.srv, &dns_log);

    let targets = [
        SocketAddr::new(SRV_V4.into(), MEDIA_PORT),
        SocketAddr::new(SRV_V6.into(), MEDIA_PORT),
    ];
    let _echo = Echo::start(&topo.srv, &targets);
    const N: usize = 20;

    // Before any answer: the media lands in the default class, the host rule sees nothing.
    let st0 = status(&shaper);
    for (i, dst) in targets.iter().enumerate() {
        let echoed = media_exchange(&topo.lan, *dst, 41_000 + i as u16, N);
        assert!(echoed >= N / 2, "{dst}: only {echoed}/{N} echoed");
    }
    let st1 = status(&shaper);
    assert_eq!(
        rule(&st1, ACCURX_RULE),
        rule(&st0, ACCURX_RULE),
        "no address is known yet: the host rule must not match"
    );
    for dir in [UPLOAD, DOWNLOAD] {
        let d = class_counters(&st1, dir, "default").0 - class_counters(&st0, dir, "default").0;
        assert!(
            d >= N as u64,
            "direction {dir}: default class got {d} packets, want >= {N} before the answer"
        );
        assert_eq!(
            class_counters(&st1, dir, "video").0,
            class_counters(&st0, dir, "video").0,
            "direction {dir}: nothing in video before the answer"
        );
    }

    // The LAN host resolves the name through the gateway.
    let a = dig(&topo.lan, SRV_V4.into(), MEDIA_NAME, "A");
    assert_eq!(
        a,
        [IpAddr::from(SRV_V4)],
        "dnsmasq's A answer; its log:\n{}",
        std::fs::read_to_string(&dns_log).unwrap_or_default()
    );
    // The AAAA query goes over IPv6 (the answer is a v6 DNS packet on the LAN side).
    let aaaa = dig(&topo.lan, SRV_V6.into(), MEDIA_NAME, "AAAA");
    assert_eq!(aaaa, [IpAddr::from(SRV_V6)], "dnsmasq's AAAA answer");
    // A name no rule wants is not learned.
    let _ = dig(&topo.lan, SRV_V4.into(), "www.example.org", "A");

    let learned = |h: &Value, addr: IpAddr| -> Option<Value> {
        h["learned"].as_array()?.iter().find_map(|e| {
            let a: IpAddr = e["addr"].as_str()?.parse().ok()?;
            (a == addr && e["rule"] == ACCURX_RULE).then(|| e.clone())
        })
    };
    let h = wait_hosts(
        "hosts.json listing both answered addresses",
        &shaper,
        &daemon,
        Duration::from_secs(10),
        |h| learned(h, SRV_V4.into()).is_some() && learned(h, SRV_V6.into()).is_some(),
    );
    eprintln!("hosts.json: {h}");
    for addr in [IpAddr::from(SRV_V4), IpAddr::from(SRV_V6)] {
        let e = learned(&h, addr).expect("listed");
        assert_eq!(e["name"], MEDIA_NAME, "{e}");
        // dnsmasq's TTL (300 s) is kept: above min_ttl (60 s), below max_ttl.
        let left = e["expires_in_s"].as_u64().expect("expires_in_s");
        assert!((200..=300).contains(&left), "expires in {left} s: {e}");
    }
    assert_eq!(
        h["learned"].as_array().map(Vec::len),
        Some(2),
        "only the two answered addresses are learned: {h}"
    );
    assert!(hosts_stat(&h, "dns_answers") >= 2, "{h}");
    assert_eq!(hosts_stat(&h, "kernel_errors"), 0, "{h}");
    assert_eq!(hosts_stat(&h, "no_room"), 0, "{h}");

    // The same media on new connections (new source ports: cached flows keep their class)
    // now follow the host rule into the video class, both ways.
    let st2 = status(&shaper);
    let mut echoed_total = 0u64;
    for (i, dst) in targets.iter().enumerate() {
        let echoed = media_exchange(&topo.lan, *dst, 42_000 + i as u16, N);
        assert!(echoed >= N / 2, "{dst}: only {echoed}/{N} echoed");
        echoed_total += echoed as u64;
    }
    let st3 = status(&shaper);
    let (r2, r3) = (rule(&st2, ACCURX_RULE), rule(&st3, ACCURX_RULE));
    assert!(
        r3[0] - r2[0] >= 2 * N as u64,
        "upload: rule {ACCURX_RULE} counted {} packets, want >= {} (v4 + v6)",
        r3[0] - r2[0],
        2 * N
    );
    assert!(
        r3[2] - r2[2] >= echoed_total,
        "download: rule {ACCURX_RULE} counted {} packets, want >= {echoed_total} echoes",
        r3[2] - r2[2]
    );
    for dir in [UPLOAD, DOWNLOAD] {
        let want = if dir == UPLOAD {
            2 * N as u64
        } else {
            echoed_total
        };
        let d = class_counters(&st3, dir, "video").0 - class_counters(&st2, dir, "video").0;
        assert!(
            d >= want,
            "direction {dir}: video class got {d} packets, want >= {want}"
        );
    }
    // The DICOM rules (the other app) never saw any of it.
    for r in ["imaging/dicom#1", "imaging/dicom#2"] {
        assert_eq!(rule(&st3, r), [0; 4], "{r}");
    }
    // `shaper status --json` shows what the daemon learned.
    let listed: Vec<IpAddr> = st3["hosts"]["learned"]
        .as_array()
        .unwrap_or_else(|| panic!("no hosts.learned in status: {}", st3["hosts"]))
        .iter()
        .filter(|e| e["rule"] == ACCURX_RULE)
        .filter_map(|e| e["addr"].as_str()?.parse().ok())
        .collect();
    assert!(
        listed.contains(&SRV_V4.into()) && listed.contains(&SRV_V6.into()),
        "status lists {listed:?}"
    );
    stop_daemon(daemon, &shaper);
    assert_eq!(
        topo.gw_qdiscs().expect("qdiscs"),
        qdiscs_before,
        "shaping removed on exit"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. TLS server names

/// `openssl s_client` from `ns` to `server`:443 naming `sni`, started; it has sent its
/// ClientHello once the daemon reports it. [`TlsClient::finish`] sends an HTTP request and
/// returns the response.
struct TlsClient {
    child: Child,
}

impl TlsClient {
    fn start(ns: &Netns, server: IpAddr, sni: &str) -> TlsClient {
        let child = ns
            .cmd(
                "timeout",
                &[
                    "-s",
                    "KILL",
                    "20",
                    "openssl",
                    "s_client",
                    "-connect",
                    &SocketAddr::new(server, 443).to_string(),
                    "-servername",
                    sni,
                    "-quiet",
                ],
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start openssl s_client");
        TlsClient { child }
    }

    /// Sends `GET /` (s_server -www answers with a status page and closes); returns stdout.
    fn finish(mut self) -> String {
        let mut stdin = self.child.stdin.take().expect("stdin");
        stdin
            .write_all(b"GET / HTTP/1.0\r\n\r\n")
            .expect("write the request");
        drop(stdin);
        let mut out = String::new();
        let mut err = String::new();
        let _ = self
            .child
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut out);
        let _ = self
            .child
            .stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut err);
        let status = self.child.wait().expect("wait s_client");
        assert!(
            out.contains("200 ok"),
            "s_client ({status}) got no page; stdout:\n{out}\nstderr:\n{err}"
        );
        out
    }
}

impl Drop for TlsClient {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn tls_server_names_decide_connections_in_both_directions() {
    skip_unless_ready!(TLS_TOOLS);
    let topo = Topology::build(None).expect("topology");
    wait_v6_path(&topo);
    let dir = TempDir::new("hosts-tls").expect("temp dir");
    let cfg = video_images_default(50_000_000)
        .rule(Rule::new("pacs", "images").dns_names(&[PACS_NAME]))
        .write(dir.path(), "site.toml")
        .expect("write config");
    let shaper = Shaper::new(&topo.gw).expect("shaper");
    let daemon = start_daemon(&shaper, &cfg, dir.path().join("daemon.log"));
    start_tls_server(&topo.srv, dir.path(), "-www");

    // The named server, over IPv4 and IPv6: decided by the name, both directions follow.
    for srv in [IpAddr::from(SRV_V4), IpAddr::from(SRV_V6)] {
        let st0 = status(&shaper);
        let decided0 = hosts_json(&shaper).map_or(0, |h| hosts_stat(&h, "sni_decided"));
        let client = TlsClient::start(&topo.lan, srv, PACS_NAME);
        let h = wait_hosts(
            &format!("the SNI decision for {srv}"),
            &shaper,
            &daemon,
            Duration::from_secs(10),
            |h| hosts_stat(h, "sni_decided") > decided0,
        );
        let entry = h["sni"]
            .as_array()
            .and_then(|v| {
                v.iter()
                    .rev()
                    .find(|e| e["dst"].as_str().and_then(|s| s.parse::<IpAddr>().ok()) == Some(srv))
            })
            .cloned()
            .unwrap_or_else(|| panic!("no SNI entry for {srv} in {h}"));
        assert_eq!(entry["name"], PACS_NAME, "{entry}");
        assert_eq!(entry["rule"], "pacs", "{entry}");
        assert_eq!(entry["dport"], 443, "{entry}");
        let page = client.finish();
        let st1 = status(&shaper);
        let (r0, r1) = (rule(&st0, "pacs"), rule(&st1, "pacs"));
        let d: Vec<u64> = (0..4).map(|i| r1[i] - r0[i]).collect();
        eprintln!(
            "{srv}: rule pacs grew by {d:?} (up pkts, up bytes, down pkts, down bytes); page {} bytes",
            page.len()
        );
        assert!(
            d[0] >= 2,
            "{srv}: upload packets of the connection in rule pacs: {d:?}"
        );
        assert!(
            d[2] >= 2,
            "{srv}: download packets of the connection in rule pacs: {d:?}"
        );
        assert!(
            d[3] >= page.len() as u64,
            "{srv}: the page ({} bytes) came down in rule pacs: {d:?}",
            page.len()
        );
        for dir in [UPLOAD, DOWNLOAD] {
            let c = class_counters(&st1, dir, "images").0 - class_counters(&st0, dir, "images").0;
            assert!(
                c >= 2,
                "{srv}: direction {dir}: images class got {c} packets"
            );
        }
        let hits = global_both(&st1, "host_flow_hits") - global_both(&st0, "host_flow_hits");
        assert!(hits > 0, "{srv}: host_flow_hits did not grow");
        assert!(
            global(&st1, "download", "host_flow_hits") > global(&st0, "download", "host_flow_hits"),
            "{srv}: the download direction followed the decision"
        );
    }

    // Another name to the same server: seen, not decided, not in the rule.
    let st0 = status(&shaper);
    let h0 = hosts_json(&shaper).expect("hosts.json");
    let found0 = hosts_stat(&h0, "sni_found");
    let client = TlsClient::start(&topo.lan, SRV_V4.into(), "other.example.org");
    let h = wait_hosts(
        "the ClientHello naming other.example.org to be read",
        &shaper,
        &daemon,
        Duration::from_secs(10),
        |h| hosts_stat(h, "sni_found") > found0,
    );
    let page = client.finish();
    let st1 = status(&shaper);
    assert_eq!(
        hosts_stat(&h, "sni_decided"),
        hosts_stat(&h0, "sni_decided"),
        "{h}"
    );
    assert!(
        !h.to_string().contains("other.example.org"),
        "other.example.org decided nothing: {h}"
    );
    assert_eq!(
        rule(&st1, "pacs"),
        rule(&st0, "pacs"),
        "a connection naming other.example.org must not land in rule pacs"
    );
    assert_eq!(
        global_both(&st1, "host_flow_hits"),
        global_both(&st0, "host_flow_hits"),
        "no host-flow entry for other.example.org"
    );
    let d =
        class_counters(&st1, DOWNLOAD, "default").1 - class_counters(&st0, DOWNLOAD, "default").1;
    assert!(
        d >= page.len() as u64,
        "the page ({} bytes) came down in the default class: {d}",
        page.len()
    );
    stop_daemon(daemon, &shaper);
}

// ---------------------------------------------------------------------------------------------
// 3. Demotion

#[test]
fn a_bulk_flow_is_demoted_out_of_its_class() {
    skip_unless_ready!(IPERF_TOOLS);
    const IPERF_PORT: u16 = 5201;
    const SMALL_PORT: u16 = 5202;
    let topo = Topology::build(None).expect("topology");
    let dir = TempDir::new("hosts-demote").expect("temp dir");
    let cfg = Config::new(100_000_000, 100_000_000)
        .class("video", 0, 30)
        .class("bulk", 6, 10)
        .default_class("default", 4, 20)
        .demote("video", "bulk", "2MB")
        .rule(
            Rule::new("tcp-video", "video")
                .protocol("tcp")
                .dst_ports(&[&IPERF_PORT.to_string(), &SMALL_PORT.to_string()]),
        )
        .write(dir.path(), "site.toml")
        .expect("write config");
    let mut shaper = Shaper::new(&topo.gw).expect("shaper");
    shaper.apply(&cfg).expect("apply");

    // A small transfer (500 kB, under demote_after) stays in video.
    let st0 = status(&shaper);
    let addr = SocketAddr::new(SRV_V4.into(), SMALL_PORT);
    let listener = topo
        .srv
        .within(move || Ok(TcpListener::bind(addr)?))
        .expect("listen");
    listener.set_nonblocking(true).expect("nonblocking");
    let sink = std::thread::spawn(move || -> std::io::Result<usize> {
        // Gives up after 10 s, so a failed connect leaves no thread behind.
        let t0 = Instant::now();
        let mut s = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if t0.elapsed() > Duration::from_secs(10) {
                        return Err(e);
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e),
            }
        };
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut v = Vec::new();
        s.read_to_end(&mut v)?;
        Ok(v.len())
    });
    let mut c = topo
        .lan
        .within(move || Ok(TcpStream::connect_timeout(&addr, Duration::from_secs(5))?))
        .expect("connect");
    c.write_all(&vec![7u8; 500_000]).expect("send 500 kB");
    c.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let got = sink.join().expect("sink thread").expect("sink");
    assert_eq!(got, 500_000);
    drop(c);
    let st1 = status(&shaper);
    assert_eq!(
        global(&st1, "upload", "flows_demoted"),
        global(&st0, "upload", "flows_demoted"),
        "a 500 kB flow is not demoted"
    );
    let video = class_counters(&st1, UPLOAD, "video").1 - class_counters(&st0, UPLOAD, "video").1;
    assert!(
        video >= 500_000,
        "the small flow went to video: {video} bytes"
    );
    assert_eq!(
        class_counters(&st1, UPLOAD, "bulk").0,
        class_counters(&st0, UPLOAD, "bulk").0,
        "nothing in bulk yet"
    );

    // iperf3 for 3 s: after 2 MB its data connection moves to bulk.
    let _server = IperfServer::start(&topo.srv, IPERF_PORT).expect("iperf3 server");
    let out = topo
        .lan
        .cmd(
            "timeout",
            &[
                "-s",
                "KILL",
                "15",
                "iperf3",
                "-c",
                &SRV_V4.to_string(),
                "-p",
                &IPERF_PORT.to_string(),
                "-t",
                "3",
            ],
        )
        .output()
        .expect("run iperf3");
    let iperf_out = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let st2 = status(&shaper);
    let demoted = global(&st2, "upload", "flows_demoted") - global(&st1, "upload", "flows_demoted");
    let bulk = class_counters(&st2, UPLOAD, "bulk");
    let bulk0 = class_counters(&st1, UPLOAD, "bulk");
    let video2 = class_counters(&st2, UPLOAD, "video");
    let video1 = class_counters(&st1, UPLOAD, "video");
    let (bulk_b, video_b) = (bulk.1 - bulk0.1, video2.1 - video1.1);
    let rule_b = rule(&st2, "tcp-video")[1] - rule(&st1, "tcp-video")[1];
    eprintln!(
        "iperf3 ({}): demoted {demoted}, upload bytes bulk {bulk_b} video {video_b} rule {rule_b}, \
         bulk HTB sent {} bytes",
        out.status,
        bulk.2 - bulk0.2
    );
    assert!(
        demoted >= 1,
        "flows_demoted did not grow; iperf3 said:\n{iperf_out}"
    );
    assert!(
        bulk_b > 2_000_000 && bulk_b > video_b,
        "bulk must carry most of the upload: bulk {bulk_b} B, video {video_b} B; iperf3:\n{iperf_out}"
    );
    // The demoted flow keeps its rule (the rule counts all of it) ...
    assert!(rule_b >= bulk_b + video_b - video_b / 10, "rule {rule_b} B");
    // ... and HTB's bulk class really sent it.
    assert!(
        bulk.2 - bulk0.2 > 1_000_000,
        "HTB bulk class sent {} bytes",
        bulk.2 - bulk0.2
    );
    shaper.remove().expect("remove");
}

// ---------------------------------------------------------------------------------------------
// 4. Promotion

#[test]
fn media_like_udp_is_promoted_and_a_flood_is_not() {
    skip_unless_ready!(UDP_TOOLS);
    const MEDIA: u16 = 47_000;
    const FLOOD: u16 = 47_001;
    let topo = Topology::build(None).expect("topology");
    let dir = TempDir::new("hosts-promote").expect("temp dir");
    let cfg = Config::new(50_000_000, 50_000_000)
        .class("video", 0, 30)
        .class("bulk", 6, 10)
        .default_class("default", 4, 20)
        .promote("video")
        .write(dir.path(), "site.toml")
        .expect("write config");
    let mut shaper = Shaper::new(&topo.gw).expect("shaper");
    shaper.apply(&cfg).expect("apply");
    // Sinks on the server, so no ICMP port-unreachable comes back.
    let mut sinks = Vec::new();
    for port in [MEDIA, FLOOD] {
        let addr = SocketAddr::new(SRV_V4.into(), port);
        let s = topo
            .srv
            .within(move || Ok(UdpSocket::bind(addr)?))
            .expect("bind sink");
        sinks.push(s);
    }

    // A flood (16 Mbit/s of 1200-byte packets, four times max_rate 4mbit) for 2 s: not
    // promoted. (A sender descheduled for most of a second could make one window look like
    // media: the margin keeps that out of reach.)
    let st0 = status(&shaper);
    let dst = SocketAddr::new(SRV_V4.into(), FLOOD);
    let sock = udp_client(&topo.lan, dst, FLOOD);
    let sent = paced(&sock, dst, 1200, 16e6 / 8.0 / 1200.0, 2.0);
    let st1 = status(&shaper);
    let up_default =
        class_counters(&st1, UPLOAD, "default").0 - class_counters(&st0, UPLOAD, "default").0;
    eprintln!("flood: sent {sent}, default class got {up_default}");
    assert!(
        sent >= 3000,
        "the flood sender managed only {sent} packets in 2 s"
    );
    assert_eq!(
        global(&st1, "upload", "flows_promoted"),
        global(&st0, "upload", "flows_promoted"),
        "a flood above max_rate must not be promoted"
    );
    assert_eq!(
        class_counters(&st1, UPLOAD, "video").0,
        class_counters(&st0, UPLOAD, "video").0,
        "nothing in video during the flood"
    );
    assert!(
        up_default >= sent / 10 * 9,
        "the flood stayed in default: {up_default} of {sent}"
    );

    // 50 packets/s of 200 bytes for 3 s: promoted after the first second.
    let dst = SocketAddr::new(SRV_V4.into(), MEDIA);
    let sock = udp_client(&topo.lan, dst, MEDIA);
    let sent = paced(&sock, dst, 200, 50.0, 3.0);
    let st2 = status(&shaper);
    let promoted =
        global(&st2, "upload", "flows_promoted") - global(&st1, "upload", "flows_promoted");
    let video = class_counters(&st2, UPLOAD, "video");
    let video1 = class_counters(&st1, UPLOAD, "video");
    let default =
        class_counters(&st2, UPLOAD, "default").0 - class_counters(&st1, UPLOAD, "default").0;
    eprintln!(
        "media: sent {sent}, promoted {promoted}, video got {} packets (HTB sent {} B), default {default}",
        video.0 - video1.0,
        video.2 - video1.2
    );
    assert!(promoted >= 1, "flows_promoted did not grow");
    // The first second (~50 packets) is judged in default, the rest (~100) in video.
    assert!(
        video.0 - video1.0 >= 60,
        "video class got {} of {sent} packets",
        video.0 - video1.0
    );
    assert!(
        default >= 30,
        "the first window stays in default: {default}"
    );
    assert!(video.2 > video1.2, "HTB's video class sent them");
    drop(sinks);
    shaper.remove().expect("remove");
}

// ---------------------------------------------------------------------------------------------
// 5. A GP surgery's config of catalogue apps only

/// Addresses the server namespace takes on besides its own (reached through the lab's modem,
/// like any internet address; they exist only inside the lab).
const TEAMS_V4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(52, 112, 0, 10);
const WHEREBY_V4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 18, 0, 20);
const CDN_V4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 18, 0, 30);
/// A Windows Update download name, answered through a CNAME to the CDN edge.
const WU_NAME: &str = "tlu.dl.delivery.mp.microsoft.com";

/// `shaper explain CONFIG DESCRIPTION --json` in the gateway namespace (it reads the running
/// daemon's hosts.json): (rule name or None, class).
fn explain(shaper: &Shaper, cfg: &Path, desc: &str) -> (Option<String>, String) {
    let out = shaper
        .command(&[
            OsStr::new("explain"),
            cfg.as_os_str(),
            OsStr::new(desc),
            OsStr::new("--json"),
        ])
        .output()
        .expect("run `shaper explain`");
    assert!(
        out.status.success(),
        "`shaper explain {desc}` failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("explain JSON");
    let p = &v["packets"][0];
    (
        p["rule"]["name"].as_str().map(str::to_string),
        p["class"].as_str().expect("class").to_string(),
    )
}

/// Sends `bytes` over a TCP connection from the LAN host to `dst` (a listener that reads
/// everything); returns the connection's source port.
fn tcp_send(topo: &Topology, dst: SocketAddr, bytes: usize) -> u16 {
    let listener = topo
        .srv
        .within(move || Ok(TcpListener::bind(dst)?))
        .unwrap_or_else(|e| panic!("listen {dst}: {e:#}"));
    let reader = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
        sink.len()
    });
    let mut s = topo
        .lan
        .within(move || Ok(TcpStream::connect_timeout(&dst, Duration::from_secs(5))?))
        .unwrap_or_else(|e| panic!("connect {dst}: {e:#}"));
    let sport = s.local_addr().expect("local address").port();
    s.write_all(&vec![0x42u8; bytes]).expect("send");
    drop(s);
    let got = reader.join().expect("reader");
    assert_eq!(got, bytes, "{dst}: all bytes arrive");
    sport
}

#[test]
fn a_gp_surgery_config_of_catalogue_apps_classifies_each_app_and_explain_agrees() {
    skip_unless_ready!(DNS_TOOLS);
    let topo = Topology::build(None).expect("topology");
    for a in [TEAMS_V4, WHEREBY_V4, CDN_V4] {
        topo.srv
            .ip(&["addr", "add", &format!("{a}/32"), "dev", "eth0"])
            .expect("server address");
        topo.modem
            .ip(&[
                "route",
                "add",
                &format!("{a}/32"),
                "via",
                &SRV_V4.to_string(),
            ])
            .expect("route to it");
    }
    let dir = TempDir::new("hosts-gp").expect("temp dir");
    // Only catalogue apps name traffic.
    let cfg = Config::new(50_000_000, 50_000_000)
        .class("video", 0, 30)
        .class("images", 2, 30)
        .default_class("default", 3, 20)
        .class("bulk", 5, 10)
        .rule(Rule::new("consult", "video").apps(&["teams-media", "near-me", "accurx-video"]))
        .rule(Rule::new("imaging", "images").apps(&["dicom"]))
        .rule(Rule::new("updates", "bulk").apps(&["windows-update"]))
        .write(dir.path(), "surgery.toml")
        .expect("write config");
    let shaper = Shaper::new(&topo.gw).expect("shaper");
    let daemon = start_daemon(&shaper, &cfg, dir.path().join("daemon.log"));

    // The site's resolver: Whereby media and a Windows Update name (through a CNAME).
    let dns_log = dir.path().join("dnsmasq.log");
    let mut cmd = topo.srv.cmd(
        "dnsmasq",
        &[
            "--no-daemon",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--pid-file=",
            "--user=root",
            "--group=root",
            "--bind-interfaces",
            &format!("--listen-address={SRV_V4}"),
            "--local-ttl=300",
            "--log-facility=-",
            "--log-queries",
            &format!("--address=/{MEDIA_NAME}/{WHEREBY_V4}"),
            &format!("--host-record=edge.cdn.test,{CDN_V4}"),
            &format!("--cname={WU_NAME},edge.cdn.test"),
        ],
    );
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&dns_log).expect("dnsmasq log"));
    topo.srv.spawn_cmd(cmd).expect("start dnsmasq");
    let t0 = Instant::now();
    while !topo
        .srv
        .run("ss", &["-H", "-l", "-u", "-n"])
        .expect("ss")
        .contains(&format!("{SRV_V4}:53"))
    {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "dnsmasq not listening"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        dig(&topo.lan, SRV_V4.into(), MEDIA_NAME, "A"),
        [IpAddr::from(WHEREBY_V4)],
        "dnsmasq log:\n{}",
        std::fs::read_to_string(&dns_log).unwrap_or_default()
    );
    let wu = dig(&topo.lan, SRV_V4.into(), WU_NAME, "A");
    assert!(
        wu.contains(&IpAddr::from(CDN_V4)),
        "CNAME chain to the CDN: {wu:?}"
    );
    wait_hosts(
        "both names' addresses learned",
        &shaper,
        &daemon,
        Duration::from_secs(10),
        |h| {
            let has = |a: std::net::Ipv4Addr| {
                h["learned"]
                    .as_array()
                    .is_some_and(|l| l.iter().any(|e| e["addr"] == a.to_string()))
            };
            has(WHEREBY_V4) && has(CDN_V4)
        },
    );

    let lan = shaper_tests::topology::LAN_HOST_V4;
    // (what, rule, class, traffic)
    // Each sends its traffic and returns the flow (WAN side, LAN-side port).
    type Send = Box<dyn Fn(&Topology) -> (SocketAddr, u16)>;
    let udp = |dst: SocketAddr, sport: u16| -> Send {
        Box::new(move |t: &Topology| {
            let _echo = Echo::start(&t.srv, &[dst]);
            let echoed = media_exchange(&t.lan, dst, sport, 30);
            assert!(echoed >= 15, "{dst}: {echoed}/30 echoed");
            (dst, sport)
        })
    };
    let tcp = |dst: SocketAddr, bytes: usize| -> Send {
        Box::new(move |t: &Topology| (dst, tcp_send(t, dst, bytes)))
    };
    let cases: Vec<(&str, &str, Option<&str>, &str, Send)> = vec![
        (
            "Teams media",
            "udp",
            Some("consult/teams-media#1"),
            "video",
            udp(SocketAddr::new(TEAMS_V4.into(), 3479), 50_020),
        ),
        (
            "Near Me (TURN)",
            "udp",
            Some("consult/near-me#1"),
            "video",
            udp(SocketAddr::new(SRV_V4.into(), 3478), 50_100),
        ),
        (
            "accuRx (Whereby) media",
            "udp",
            Some("consult/accurx-video#dns"),
            "video",
            udp(SocketAddr::new(WHEREBY_V4.into(), 40_000), 50_200),
        ),
        (
            "DICOM C-STORE port",
            "tcp",
            Some("imaging/dicom#1"),
            "images",
            tcp(SocketAddr::new(SRV_V4.into(), 11_112), 200_000),
        ),
        (
            "Windows Update download",
            "tcp",
            Some("updates/windows-update#dns"),
            "bulk",
            tcp(SocketAddr::new(CDN_V4.into(), 80), 1_000_000),
        ),
        (
            "other web",
            "tcp",
            None,
            "default",
            tcp(SocketAddr::new(SRV_V4.into(), 8080), 200_000),
        ),
    ];
    for (what, proto, want_rule, want_class, send) in cases {
        let before = status(&shaper);
        let (dst, sport) = send(&topo);
        let after = status(&shaper);
        // The kernel's counters: the class that got the packets, both ways.
        for d in [UPLOAD, DOWNLOAD] {
            let grew = |c: &str| class_counters(&after, d, c).0 - class_counters(&before, d, c).0;
            let wanted = grew(want_class);
            assert!(
                wanted > 0,
                "{what}: nothing in {want_class} (direction {d})"
            );
            for other in ["video", "images", "default", "bulk"] {
                if other != want_class {
                    assert_eq!(grew(other), 0, "{what}: {other} grew in direction {d}");
                }
            }
        }
        if let Some(r) = want_rule {
            let (b, a) = (rule(&before, r), rule(&after, r));
            assert!(
                a[0] > b[0] && a[2] > b[2],
                "{what}: rule {r} counted {b:?} -> {a:?}"
            );
        }
        // `shaper explain` says the same, for a packet of the flow each way.
        for desc in [
            format!("up {proto} {lan}:{sport} -> {dst}"),
            format!("down {proto} {dst} -> {lan}:{sport}"),
        ] {
            let (r, c) = explain(&shaper, &cfg, &desc);
            assert_eq!(c, want_class, "{what}: explain `{desc}` says class {c}");
            assert_eq!(
                r.as_deref(),
                want_rule,
                "{what}: explain `{desc}` says rule {r:?}"
            );
        }
        eprintln!("{what}: {want_class} ({})", want_rule.unwrap_or("no rule"));
    }
    stop_daemon(daemon, &shaper);
}

// ---------------------------------------------------------------------------------------------
// 6. QUIC server names

/// Runs ngtcp2's `gtlsclient` from the LAN host towards `name` (UDP 443), for at most `secs`
/// seconds: it sends its client Initial and, with no answer, retransmits it. The name is the
/// server name it sends (its `--sni` is not honoured in Debian's 0.12, which sends
/// "localhost" for an address), resolved to `dst` through a hosts file bind-mounted over
/// /etc/hosts in a mount namespace of its own (the machine's /etc/hosts is not touched).
fn quic_client(topo: &Topology, dir: &Path, dst: IpAddr, name: &str, secs: u32) {
    let hosts = dir.join(format!("hosts-{name}"));
    std::fs::write(&hosts, format!("{dst} {name}\n")).expect("hosts file");
    let script = format!(
        "mount --bind {} /etc/hosts && exec timeout -s KILL {} gtlsclient -q --timeout={secs}s \
         --handshake-timeout={secs}s {name} 443",
        hosts.display(),
        secs + 2
    );
    let _ = topo.lan.run("unshare", &["--mount", "sh", "-c", &script]);
}

#[test]
fn quic_server_names_decide_connections() {
    skip_unless_ready!(QUIC_TOOLS);
    let topo = Topology::build(None).expect("topology");
    let dir = TempDir::new("hosts-quic").expect("temp dir");
    let cfg = Config::new(50_000_000, 50_000_000)
        .class("images", 2, 30)
        .default_class("default", 4, 20)
        .rule(Rule::new("pacs", "images").dns_names(&[PACS_NAME]))
        .write(dir.path(), "site.toml")
        .expect("write config");
    let shaper = Shaper::new(&topo.gw).expect("shaper");
    let daemon = start_daemon(&shaper, &cfg, dir.path().join("daemon.log"));
    // A sink on UDP 443: the Initials arrive and get no answer (no ICMP either), so the
    // client retransmits them.
    let sink = topo
        .srv
        .within(|| Ok(UdpSocket::bind(SocketAddr::new(SRV_V4.into(), 443))?))
        .expect("bind udp 443");
    sink.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let stop = Arc::new(AtomicBool::new(false));
    let got = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if sink.recv_from(&mut buf).is_ok() {
                    n += 1;
                }
            }
            n
        })
    };

    // Another name first: read, not decided; nothing lands in the rule.
    let st0 = status(&shaper);
    quic_client(&topo, dir.path(), SRV_V4.into(), "other.example.org", 2);
    wait_hosts(
        "the other name's Initial read",
        &shaper,
        &daemon,
        Duration::from_secs(10),
        |h| hosts_stat(h, "quic_initials") >= 1 && hosts_stat(h, "sni_found") >= 1,
    );
    let st1 = status(&shaper);
    assert_eq!(
        rule(&st1, "pacs"),
        rule(&st0, "pacs"),
        "another name matched the rule"
    );

    // The PACS name: decided by it; the retransmitted Initials land in the rule's class.
    quic_client(&topo, dir.path(), SRV_V4.into(), PACS_NAME, 4);
    let h = wait_hosts(
        "the QUIC connection decided by name",
        &shaper,
        &daemon,
        Duration::from_secs(10),
        |h| {
            h["sni"].as_array().is_some_and(|l| {
                l.iter()
                    .any(|e| e["name"] == PACS_NAME && e["rule"] == "pacs" && e["dport"] == 443)
            })
        },
    );
    eprintln!("hosts.json stats: {}", h["stats"]);
    let st2 = status(&shaper);
    let (b, a) = (rule(&st1, "pacs"), rule(&st2, "pacs"));
    assert!(
        a[0] > b[0],
        "no upload packet of the QUIC connection in rule pacs: {b:?} -> {a:?}\n{}",
        daemon.log()
    );
    assert!(
        global(&st2, "upload", "host_flow_hits") > global(&st1, "upload", "host_flow_hits"),
        "no host-flow hit"
    );
    assert!(
        class_counters(&st2, UPLOAD, "images").0 > class_counters(&st1, UPLOAD, "images").0,
        "images class did not grow"
    );
    stop.store(true, Ordering::Relaxed);
    let n = got.join().expect("sink");
    assert!(n >= 3, "the sink saw {n} Initials");
    stop_daemon(daemon, &shaper);
}
