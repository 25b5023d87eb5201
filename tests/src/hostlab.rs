//! The host-name lab shared by the tests that need DNS answers and media through the
//! gateway: the `shaper run` daemon with its hosts.json, dnsmasq on the server answering
//! [`MEDIA_NAME`], `dig` on the LAN host, UDP echo servers and "media" exchanges, and the
//! status JSON's counters.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::shaper::Daemon;
use crate::topology::{SRV_V4, SRV_V6};
use crate::{Netns, Shaper, Topology};

/// What the DNS test needs on PATH.
pub const DNS_TOOLS: &[&str] = &["ip", "tc", "nsenter", "sysctl", "ss", "dnsmasq", "dig"];

/// The name dnsmasq answers with the server's own addresses.
pub const MEDIA_NAME: &str = "media.sfu.whereby.com";

/// `shaper run` in the gateway namespace, its stderr in a file, once its host task has
/// written hosts.json (the shaping is in place and the event ring is being read).
pub fn start_daemon(shaper: &Shaper, cfg: &Path, log: PathBuf) -> Daemon {
    let mut daemon =
        Daemon::spawn(shaper, cfg, log, "info,shaper_user=debug").expect("start `shaper run`");
    let t0 = Instant::now();
    while hosts_json(shaper).is_none() {
        if let Some(s) = daemon.exited() {
            panic!("`shaper run` exited ({s}); its log:\n{}", daemon.log());
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no hosts.json from `shaper run` after 30 s; its log:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    daemon
}

/// SIGTERM: the daemon must exit cleanly, removing the shaping, its pins and hosts.json.
pub fn stop_daemon(daemon: Daemon, shaper: &Shaper) {
    let (status, log) = daemon.stop().expect("`shaper run` stops on SIGTERM");
    assert!(status.success(), "exit on SIGTERM: {status}\n{log}");
    assert!(hosts_json(shaper).is_none(), "hosts.json removed on exit");
    assert!(
        shaper.leftover_pins().is_empty(),
        "pins left: {:?}",
        shaper.leftover_pins()
    );
}

/// `shaper status --json --interval 0`.
pub fn status(shaper: &Shaper) -> Value {
    let out = shaper
        .command(&["status", "--json", "--interval", "0"])
        .output()
        .expect("run `shaper status`");
    assert!(
        out.status.success(),
        "`shaper status --json` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "`shaper status --json` printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// A rule's counters: [upload packets, upload bytes, download packets, download bytes].
pub fn rule(st: &Value, name: &str) -> [u64; 4] {
    let rules = st["rules"].as_array().expect("rules in status");
    let r = rules.iter().find(|r| r["name"] == name).unwrap_or_else(|| {
        let names: Vec<_> = rules.iter().map(|r| r["name"].to_string()).collect();
        panic!("no rule `{name}` in status; rules: {}", names.join(", "))
    });
    [
        "upload_packets",
        "upload_bytes",
        "download_packets",
        "download_bytes",
    ]
    .map(|k| r[k].as_u64().unwrap_or_else(|| panic!("{name}.{k} in {r}")))
}

/// A class's counters in one direction: (classified packets, classified bytes, HTB sent bytes).
pub fn class_counters(st: &Value, dir: usize, name: &str) -> (u64, u64, u64) {
    let c = st["directions"][dir]["classes"]
        .as_array()
        .expect("classes in status")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no class `{name}` in status direction {dir}"));
    let n = |k: &str| c[k].as_u64().unwrap_or_else(|| panic!("{name}.{k} in {c}"));
    (n("classified_packets"), n("classified_bytes"), n("bytes"))
}

pub fn hosts_json(shaper: &Shaper) -> Option<Value> {
    let text = std::fs::read_to_string(shaper.run_dir().join("hosts.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// UDP echo servers in a namespace, one thread per address, stopped on drop.
pub struct Echo {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Echo {
    pub fn start(ns: &Netns, addrs: &[SocketAddr]) -> Echo {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for &addr in addrs {
            let sock = ns
                .within(move || Ok(UdpSocket::bind(addr)?))
                .unwrap_or_else(|e| panic!("bind udp {addr}: {e:#}"));
            sock.set_read_timeout(Some(Duration::from_millis(50)))
                .expect("timeout");
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                        let _ = sock.send_to(&buf[..n], peer);
                    }
                }
            }));
        }
        Echo { stop, threads }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A UDP socket in `ns` bound to the wildcard address of `dst`'s family and `src_port`.
pub fn udp_client(ns: &Netns, dst: SocketAddr, src_port: u16) -> UdpSocket {
    let any: IpAddr = if dst.is_ipv6() {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    };
    ns.within(move || Ok(UdpSocket::bind((any, src_port))?))
        .unwrap_or_else(|e| panic!("bind udp client port {src_port}: {e:#}"))
}

/// Sends `count` packets of "media" from `src_port` to `dst` (an [`Echo`]), one at a time,
/// waiting for each echo; returns how many came back.
pub fn media_exchange(ns: &Netns, dst: SocketAddr, src_port: u16, count: usize) -> usize {
    let sock = udp_client(ns, dst, src_port);
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let mut echoed = 0;
    let mut buf = [0u8; 2048];
    for i in 0..count {
        let msg = format!("media {i:04}");
        sock.send_to(msg.as_bytes(), dst).expect("send media");
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            if &buf[..n] == msg.as_bytes() {
                echoed += 1;
            }
        }
    }
    echoed
}

/// Waits until UDP over IPv6 crosses the lab both ways. Measured here: for about 2 s after
/// `Topology::build` returns, IPv6 packets do not get through (IPv4 does), and a socket that
/// sent into that window keeps failing; so each try uses a fresh socket (and a port of its
/// own, so no flow of the test proper is cached by the classifier meanwhile).
pub fn wait_v6_path(topo: &Topology) {
    const PORT: u16 = 7_600;
    let dst = SocketAddr::new(SRV_V6.into(), PORT);
    let _echo = Echo::start(&topo.srv, &[dst]);
    let t0 = Instant::now();
    for i in 0.. {
        if media_exchange(&topo.lan, dst, 43_000 + i, 1) == 1 {
            eprintln!("IPv6 through the lab after {:?}", t0.elapsed());
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "no UDP echo over IPv6 through the lab in 15 s"
        );
    }
}

/// dnsmasq in `ns` answering `MEDIA_NAME` with the server's own addresses (TTL 300 s).
pub fn start_dnsmasq(ns: &Netns, log: &Path) -> u32 {
    let mut cmd = ns.cmd(
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
            &format!("--listen-address={SRV_V6}"),
            "--local-ttl=300",
            "--log-facility=-",
            "--log-queries",
            &format!("--address=/{MEDIA_NAME}/{SRV_V4}"),
            &format!("--address=/{MEDIA_NAME}/{SRV_V6}"),
        ],
    );
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("dnsmasq log"));
    let pid = ns.spawn_cmd(cmd).expect("start dnsmasq");
    // Listening on UDP 53 on both addresses.
    let t0 = Instant::now();
    loop {
        let out = ns.run("ss", &["-H", "-l", "-u", "-n"]).expect("ss");
        let v4 = out.contains(&format!("{SRV_V4}:53"));
        let v6 = out.contains(&format!("[{SRV_V6}]:53"));
        if v4 && v6 {
            return pid;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "dnsmasq not listening after 10 s ({out}); its log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `dig @server name TYPE +short` from `ns`: the answered addresses.
pub fn dig(ns: &Netns, server: IpAddr, name: &str, rtype: &str) -> Vec<IpAddr> {
    let out = ns
        .run(
            "dig",
            &[
                &format!("@{server}"),
                name,
                rtype,
                "+short",
                "+time=2",
                "+tries=3",
            ],
        )
        .unwrap_or_else(|e| panic!("dig {name} {rtype}: {e:#}"));
    out.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// A classifier counter (`GLOBAL_COUNTER_NAMES`) in "upload" or "download".
pub fn global(st: &Value, dir: &str, name: &str) -> u64 {
    st["classifier"][dir][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no classifier.{dir}.{name} in status"))
}

pub fn global_both(st: &Value, name: &str) -> u64 {
    global(st, "upload", name) + global(st, "download", name)
}

/// Sends `payload`-byte UDP packets from `sock` to `dst` at `pps` for `secs`; returns the
/// number sent.
pub fn paced(sock: &UdpSocket, dst: SocketAddr, payload: usize, pps: f64, secs: f64) -> u64 {
    let data = vec![0x5au8; payload];
    let t0 = Instant::now();
    let mut sent = 0u64;
    loop {
        let el = t0.elapsed().as_secs_f64();
        if el >= secs {
            return sent;
        }
        let due = (el * pps) as u64 + 1;
        while sent < due {
            sock.send_to(&data, dst).expect("send");
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A self-signed P-256 certificate and key in `dir`: (cert, key).
pub fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=x",
            "-days",
            "1",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl req");
    assert!(
        out.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// `openssl s_server` on TCP 443 in `ns` with a self-signed certificate made in `dir`,
/// `mode` `-www` (a status page) or `-WWW` (the files of `dir`); returns once it listens.
pub fn start_tls_server(ns: &Netns, dir: &Path, mode: &str) {
    let (cert, key) = self_signed(dir);
    let mut server = ns.cmd(
        "openssl",
        &[
            std::ffi::OsStr::new("s_server"),
            std::ffi::OsStr::new("-accept"),
            std::ffi::OsStr::new("443"),
            std::ffi::OsStr::new("-cert"),
            cert.as_os_str(),
            std::ffi::OsStr::new("-key"),
            key.as_os_str(),
            std::ffi::OsStr::new(mode),
            std::ffi::OsStr::new("-quiet"),
        ],
    );
    server
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    ns.spawn_cmd(server).expect("start openssl s_server");
    crate::iperf::wait_listening(ns, 443, Duration::from_secs(10)).expect("s_server listening");
}
