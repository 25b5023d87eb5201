//! The host-name engine under hostile input (issue 14, items 1, 2 and 4).
//!
//! - A flood of answers (500 a second for 60 s, 88 addresses each under a watched name,
//!   from a server a LAN host asks: every one answers a query that went out) leaves the
//!   daemon's own work on schedule: systemd's watchdog petted within its interval,
//!   `/metrics` answered within a second, SIGTERM obeyed within two; a real lookup
//!   meanwhile is learned.
//! - Forged answers are not learned: hairpinned through the gateway from the LAN,
//!   unsolicited from the WAN, over IPv4 and IPv6, and answers from a server other than
//!   the one the query went to.
//! - 5,000 answers with day-long TTLs from one LAN host's own server do not push out
//!   another host's real, short-lived answer: it stays learned and classified.
//! - A flood of QUIC client Initials (each a key derivation and a failed decryption in
//!   user space) beside a real lookup: the name is learned.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use shaper_tests::dns::{self, Forger, A_PER_PACKET};
use shaper_tests::gateway::{http_get, write_config};
use shaper_tests::hostlab::{
    class_counters, dig, hosts_json, media_exchange, start_daemon, start_dnsmasq, status,
    stop_daemon, wait_v6_path, Echo, DNS_TOOLS, MEDIA_NAME,
};
use shaper_tests::packet::{frame_with, mac_of, Pkt, RawLink};
use shaper_tests::topology::{
    GW_LAN_IF, GW_WAN_IF, HOST_IF, LAN_HOST_V4, LAN_HOST_V6, MODEM_IN_IF, SRV_V4, SRV_V6,
};
use shaper_tests::{skip_unless_ready, Shaper, TempDir, Topology};

use super::accurx_video;
use crate::common::{MEDIA_PORT, UPLOAD};

/// A second LAN host (an address of the lab's LAN host): the one that floods.
const LAN2_V4: Ipv4Addr = Ipv4Addr::new(10, 201, 1, 3);
/// A second server on the internet side (an address of the lab's server): the LAN
/// host's own DNS server, answering what it likes.
const FORGER_V4: Ipv4Addr = Ipv4Addr::new(10, 201, 3, 3);
const FORGER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x201, 3, 0, 0, 0, 0, 3);
const METRICS: &str = "10.201.1.1:9464";

/// The second LAN address and the second server's addresses.
fn second_addresses(topo: &Topology) {
    topo.lan
        .ip(&["addr", "add", &format!("{LAN2_V4}/24"), "dev", HOST_IF])
        .expect("second LAN address");
    topo.srv
        .ip(&["addr", "add", &format!("{FORGER_V4}/24"), "dev", HOST_IF])
        .expect("second server address");
    topo.srv
        .ip(&[
            "-6",
            "addr",
            "add",
            &format!("{FORGER_V6}/64"),
            "dev",
            HOST_IF,
            "nodad",
        ])
        .expect("second server address (v6)");
}

/// The addresses hosts.json lists as learned.
fn learned(shaper: &Shaper) -> Vec<IpAddr> {
    hosts_json(shaper)
        .and_then(|h| {
            h["learned"].as_array().map(|l| {
                l.iter()
                    .filter_map(|e| e["addr"].as_str()?.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

fn hosts_stat(shaper: &Shaper, name: &str) -> u64 {
    hosts_json(shaper)
        .and_then(|h| h["stats"][name].as_u64())
        .unwrap_or(0)
}

/// A classifier counter, both directions.
fn classifier(st: &Value, name: &str) -> u64 {
    ["upload", "download"]
        .iter()
        .map(|d| st["classifier"][d][name].as_u64().unwrap_or(0))
        .sum()
}

/// Media to `dst` lands in video: (video packets, default packets) it added upload.
fn media_classes(topo: &Topology, shaper: &Shaper, src_port: u16) -> (u64, u64) {
    let before = status(shaper);
    let dst = SocketAddr::new(SRV_V4.into(), MEDIA_PORT);
    let echoed = media_exchange(&topo.lan, dst, src_port, 20);
    assert!(echoed >= 10, "only {echoed}/20 echoed");
    let after = status(shaper);
    let d = |c: &str| class_counters(&after, UPLOAD, c).0 - class_counters(&before, UPLOAD, c).0;
    (d("video"), d("default"))
}

/// Messages on a systemd notify socket, with when they came.
fn notify_listener(
    sock: UnixDatagram,
    stop: Arc<AtomicBool>,
) -> Arc<Mutex<Vec<(Instant, String)>>> {
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while !stop.load(Ordering::Relaxed) {
            if let Ok(n) = sock.recv(&mut buf) {
                let m = String::from_utf8_lossy(&buf[..n]).into_owned();
                g.lock().expect("lock").push((Instant::now(), m));
            }
        }
    });
    got
}

#[test]
fn a_flood_of_answers_leaves_the_watchdog_metrics_and_sigterm_on_time() {
    skip_unless_ready!(DNS_TOOLS);
    let topo = Topology::build(None).expect("topology");
    second_addresses(&topo);
    let dir = TempDir::new("adv-names-flood").expect("dir");
    let cfg = write_config(
        dir.path(),
        "site.toml",
        &accurx_video(30).metrics(METRICS).to_toml(),
    );
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).expect("bind notify socket");
    let listening = Arc::new(AtomicBool::new(false));
    let messages = notify_listener(sock, listening.clone());
    // WATCHDOG_USEC=2 s: the daemon pets every second; systemd would kill it after 2 s
    // without one.
    const WATCHDOG: Duration = Duration::from_secs(2);
    let mut shaper = Shaper::new(&topo.gw).expect("shaper");
    shaper.set_env("NOTIFY_SOCKET", &sock_path.to_string_lossy());
    shaper.set_env("WATCHDOG_USEC", &WATCHDOG.as_micros().to_string());
    let daemon = start_daemon(&shaper, &cfg, dir.path().join("daemon.log"));
    start_dnsmasq(&topo.srv, &dir.path().join("dnsmasq.log"));
    let metrics: SocketAddr = METRICS.parse().expect("address");
    let (code, _, _) = http_get(&topo.lan, metrics, "/metrics", Duration::from_secs(5))
        .expect("/metrics before the flood");
    assert_eq!(code, 200);

    let forger = Forger::start(
        &topo.srv,
        SocketAddr::new(FORGER_V4.into(), 53),
        A_PER_PACKET,
        300,
    );
    let stop = Arc::new(AtomicBool::new(false));
    const FLOOD: Duration = Duration::from_secs(60);
    let flood = dns::query_flood(
        &topo.lan,
        LAN2_V4.into(),
        SocketAddr::new(FORGER_V4.into(), 53),
        "sfu.whereby.com",
        500,
        500 * FLOOD.as_secs(),
        stop.clone(),
    );
    let t0 = Instant::now();
    let mut scrapes: Vec<(Duration, Result<u16, String>)> = Vec::new();
    let mut dug = Vec::new();
    while t0.elapsed() < FLOOD - Duration::from_secs(2) {
        std::thread::sleep(Duration::from_secs(3));
        let t = Instant::now();
        let r = http_get(&topo.lan, metrics, "/metrics", Duration::from_secs(5))
            .map(|(c, _, _)| c)
            .map_err(|e| format!("{e:#}"));
        scrapes.push((t.elapsed(), r));
        if dug.is_empty() && t0.elapsed() > Duration::from_secs(30) {
            // A real lookup in the middle of the flood.
            dug = dig(&topo.lan, SRV_V4.into(), MEDIA_NAME, "A");
        }
    }
    std::thread::sleep(Duration::from_millis(1500));
    let held = learned(&shaper);
    let stats = hosts_json(&shaper).map(|h| h["stats"].clone());
    // SIGTERM while the flood goes on.
    let sigterm = Instant::now();
    let (exit, log) = daemon.stop().expect("`shaper run` stops");
    let stopped_in = sigterm.elapsed();
    stop.store(true, Ordering::Relaxed);
    let queries = flood.join().expect("flood");
    let answers = forger.sent.load(Ordering::Relaxed);
    drop(forger);
    listening.store(true, Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(200));

    // The watchdog's pets from READY to SIGTERM, and the longest wait between them.
    let msgs = messages.lock().expect("lock").clone();
    let ready = msgs
        .iter()
        .find(|(_, m)| m == "READY=1")
        .map(|(t, _)| *t)
        .expect("READY=1");
    let mut pets: Vec<Instant> = msgs
        .iter()
        .filter(|(t, m)| m == "WATCHDOG=1" && *t >= ready && *t <= sigterm)
        .map(|(t, _)| *t)
        .collect();
    pets.insert(0, ready);
    pets.push(sigterm);
    let longest = pets
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    let slowest = scrapes.iter().map(|(d, _)| *d).max().unwrap_or_default();
    eprintln!(
        "flood: {queries} queries, {answers} answers of {A_PER_PACKET} addresses in {FLOOD:?}; \
         {} watchdog pets, longest gap {longest:?}; {} scrapes, slowest {slowest:?}; \
         SIGTERM obeyed in {stopped_in:?}; {} addresses held; stats {}",
        pets.len() - 2,
        scrapes.len(),
        held.len(),
        stats.map(|s| s.to_string()).unwrap_or_default()
    );
    assert!(
        answers >= 500 * 40,
        "the flood was not a flood ({answers} answers)"
    );
    assert!(
        longest < WATCHDOG,
        "the watchdog went {longest:?} without a pet (systemd kills after {WATCHDOG:?})"
    );
    for (d, r) in &scrapes {
        assert!(
            matches!(r, Ok(200)) && *d < Duration::from_secs(1),
            "/metrics under the flood: {r:?} after {d:?}; all: {scrapes:?}"
        );
    }
    assert!(
        stopped_in < Duration::from_secs(2) && exit.success(),
        "SIGTERM took {stopped_in:?} ({exit}); log:\n{}",
        log.lines().rev().take(20).collect::<Vec<_>>().join("\n")
    );
    assert_eq!(dug, [IpAddr::from(SRV_V4)], "dig during the flood");
    assert!(
        held.contains(&SRV_V4.into()),
        "the real answer during the flood was not learned"
    );
    assert!(
        shaper.leftover_pins().is_empty() && hosts_json(&shaper).is_none(),
        "the daemon cleaned up on SIGTERM"
    );
}

#[test]
fn forged_answers_are_not_learned() {
    skip_unless_ready!(DNS_TOOLS);
    let topo = Topology::build(None).expect("topology");
    second_addresses(&topo);
    // A LAN host may claim any source: reverse-path filtering off on the gateway lets
    // a hairpinned forgery through (the classifier must not rely on it).
    for k in ["all", "default", GW_LAN_IF] {
        topo.gw
            .sysctl(&format!("net.ipv4.conf.{k}.rp_filter"), "0")
            .expect("rp_filter");
    }
    let dir = TempDir::new("adv-names-forged").expect("dir");
    let cfg = write_config(dir.path(), "site.toml", &accurx_video(30).to_toml());
    let shaper = Shaper::new(&topo.gw).expect("shaper");
    let daemon = start_daemon(&shaper, &cfg, dir.path().join("daemon.log"));
    start_dnsmasq(&topo.srv, &dir.path().join("dnsmasq.log"));
    wait_v6_path(&topo);

    let lan = RawLink::open(&topo.lan, HOST_IF).expect("raw socket on the LAN host");
    let modem = RawLink::open(&topo.modem, MODEM_IN_IF).expect("raw socket on the modem");
    let gw_lan = mac_of(&topo.gw, GW_LAN_IF).expect("gw lan0 MAC");
    let gw_wan = mac_of(&topo.gw, GW_WAN_IF).expect("gw wan0 MAC");
    // Each forgery names its own address; none may be learned.
    let mut forged: Vec<IpAddr> = Vec::new();
    let mut n = 0u32;
    let mut forge = |v6: bool| -> Vec<u8> {
        n += 1;
        let a: IpAddr = if v6 {
            dns::scattered_v6(n).into()
        } else {
            dns::scattered_v4(n).into()
        };
        forged.push(a);
        dns::answer(n as u16, MEDIA_NAME, &[a], 86_400)
    };
    for round in 0..3u16 {
        for v6 in [false, true] {
            let (srv, host) = if v6 {
                (SRV_V6.to_string(), LAN_HOST_V6.to_string())
            } else {
                (SRV_V4.to_string(), LAN_HOST_V4.to_string())
            };
            let p = Pkt::udp(&srv, &host, 53, 33_000 + round);
            // Hairpinned: sent by a LAN host to the gateway, routed back out of lan0,
            // claiming to come from the real DNS server.
            lan.send(&frame_with(&p, lan.mac, gw_lan, &forge(v6)))
                .expect("send a hairpinned forgery");
            // Unsolicited from the internet side (the real server's address).
            modem
                .send(&frame_with(&p, modem.mac, gw_wan, &forge(v6)))
                .expect("send an unsolicited forgery");
        }
    }
    // A query that went out to one server, answered (right id, right port) by another.
    for (to, from, bind) in [
        (
            IpAddr::from(Ipv4Addr::new(10, 201, 3, 9)),
            IpAddr::from(FORGER_V4),
            IpAddr::from(LAN_HOST_V4),
        ),
        (
            "fd00:201:3::9".parse().expect("v6"),
            IpAddr::from(FORGER_V6),
            IpAddr::from(LAN_HOST_V6),
        ),
    ] {
        let client = topo
            .lan
            .within(move || Ok(UdpSocket::bind(SocketAddr::new(bind, 0))?))
            .expect("client socket");
        let port = client.local_addr().expect("port").port();
        let qtype = if to.is_ipv6() {
            dns::TYPE_AAAA
        } else {
            dns::TYPE_A
        };
        client
            .send_to(&dns::query(0x4242, MEDIA_NAME, qtype), (to, 53))
            .expect("send the query");
        let other = topo
            .srv
            .within(move || Ok(UdpSocket::bind(SocketAddr::new(from, 53))?))
            .expect("the other server's socket");
        let a: IpAddr = if to.is_ipv6() {
            dns::scattered_v6(1000).into()
        } else {
            dns::scattered_v4(1000).into()
        };
        forged.push(a);
        other
            .send_to(
                &dns::answer(0x4242, MEDIA_NAME, &[a], 86_400),
                SocketAddr::new(bind, port),
            )
            .expect("send the other server's answer");
    }
    // The real lookups, both families: learned (so the forgeries had their chance).
    assert_eq!(
        dig(&topo.lan, SRV_V4.into(), MEDIA_NAME, "A"),
        [IpAddr::from(SRV_V4)]
    );
    assert_eq!(
        dig(&topo.lan, SRV_V6.into(), MEDIA_NAME, "AAAA"),
        [IpAddr::from(SRV_V6)]
    );
    std::thread::sleep(Duration::from_millis(1500));
    let held = learned(&shaper);
    let st = status(&shaper);
    eprintln!(
        "learned {held:?}; dns_answers_unmatched (classifier) {}; hosts stats {}",
        classifier(&st, "dns_answers_unmatched"),
        hosts_json(&shaper)
            .map(|h| h["stats"].to_string())
            .unwrap_or_default()
    );
    let taken: Vec<&IpAddr> = forged.iter().filter(|a| held.contains(a)).collect();
    assert!(
        taken.is_empty(),
        "forged answers learned: {taken:?} (of {} forged)",
        forged.len()
    );
    for real in [IpAddr::from(SRV_V4), IpAddr::from(SRV_V6)] {
        assert!(
            held.contains(&real),
            "the real answer for {real} was not learned: {held:?}"
        );
    }
    stop_daemon(daemon, &shaper);
}

#[test]
fn long_lived_forgeries_do_not_push_out_a_real_answer() {
    skip_unless_ready!(DNS_TOOLS);
    let topo = Topology::build(None).expect("topology");
    second_addresses(&topo);
    let dir = TempDir::new("adv-names-ttl").expect("dir");
    let cfg = write_config(dir.path(), "site.toml", &accurx_video(30).to_toml());
    let shaper = Shaper::new(&topo.gw).expect("shaper");
    let daemon = start_daemon(&shaper, &cfg, dir.path().join("daemon.log"));
    start_dnsmasq(&topo.srv, &dir.path().join("dnsmasq.log"));
    let _echo = Echo::start(&topo.srv, &[SocketAddr::new(SRV_V4.into(), MEDIA_PORT)]);
    // One LAN host asks its own server, which answers every name under
    // *.sfu.whereby.com with 4 addresses for a day: 5,000 answers, 20,000 addresses,
    // five times what the table holds (max_entries 4096).
    let forger = Forger::start(&topo.srv, SocketAddr::new(FORGER_V4.into(), 53), 4, 86_400);
    let stop = Arc::new(AtomicBool::new(false));
    let flood = dns::query_flood(
        &topo.lan,
        LAN2_V4.into(),
        SocketAddr::new(FORGER_V4.into(), 53),
        "sfu.whereby.com",
        500,
        5_000,
        stop,
    );
    // Another host's real lookup (TTL 300 s) once the table is full; the forgeries go on.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        dig(&topo.lan, SRV_V4.into(), MEDIA_NAME, "A"),
        [IpAddr::from(SRV_V4)]
    );
    let queries = flood.join().expect("flood");
    let answers = forger.sent.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(1500));
    let held = learned(&shaper);
    eprintln!(
        "{queries} queries, {answers} long-lived answers; {} addresses held, evicted {}",
        held.len(),
        hosts_stat(&shaper, "dns_evicted")
    );
    assert!(answers >= 4_500, "only {answers} forged answers went out");
    assert!(
        held.len() >= 4_000,
        "the table did not fill ({} held)",
        held.len()
    );
    assert!(
        held.contains(&SRV_V4.into()),
        "the real answer was pushed out by the long-lived ones"
    );
    let (video, default) = media_classes(&topo, &shaper, 41_000);
    assert!(
        video >= 10 && default == 0,
        "media to the real address: video {video}, default {default}"
    );
    stop_daemon(daemon, &shaper);
}

#[test]
fn a_flood_of_quic_initials_does_not_hide_a_real_answer() {
    skip_unless_ready!(DNS_TOOLS);
    let topo = Topology::build(None).expect("topology");
    let dir = TempDir::new("adv-names-hellos").expect("dir");
    let cfg = write_config(dir.path(), "site.toml", &accurx_video(30).to_toml());
    let shaper = Shaper::new(&topo.gw).expect("shaper");
    let daemon = start_daemon(&shaper, &cfg, dir.path().join("daemon.log"));
    start_dnsmasq(&topo.srv, &dir.path().join("dnsmasq.log"));
    // Fake Initials from the LAN host to UDP 443, as fast as one thread sends them,
    // from 64 source ports (each one's Initials keep coming: nothing decides them).
    let stop = Arc::new(AtomicBool::new(false));
    let socks: Vec<UdpSocket> = (0..64)
        .map(|_| {
            topo.lan
                .within(|| Ok(UdpSocket::bind("0.0.0.0:0")?))
                .expect("socket")
        })
        .collect();
    let s = stop.clone();
    let sender = std::thread::spawn(move || {
        let dst = SocketAddr::new(SRV_V4.into(), 443);
        let packets: Vec<Vec<u8>> = (0..64).map(dns::fake_quic_initial).collect();
        let mut sent = 0u64;
        while !s.load(Ordering::Relaxed) {
            let i = (sent % 64) as usize;
            let _ = socks[i].send_to(&packets[i], dst);
            sent += 1;
        }
        sent
    });
    std::thread::sleep(Duration::from_secs(2));
    let t0 = Instant::now();
    let answer = dig(&topo.lan, SRV_V4.into(), MEDIA_NAME, "A");
    let dig_took = t0.elapsed();
    std::thread::sleep(Duration::from_millis(1500));
    let held = learned(&shaper);
    let st = status(&shaper);
    stop.store(true, Ordering::Relaxed);
    let sent = sender.join().expect("sender");
    eprintln!(
        "{sent} fake Initials; dig answered in {dig_took:?}; events {} lost {} (hello ring), \
         DNS events lost {}; hosts stats {}",
        classifier(&st, "events"),
        classifier(&st, "events_lost"),
        classifier(&st, "dns_events_lost"),
        hosts_json(&shaper)
            .map(|h| h["stats"].to_string())
            .unwrap_or_default()
    );
    assert_eq!(answer, [IpAddr::from(SRV_V4)], "dig under the flood");
    assert!(
        classifier(&st, "events_lost") > 0,
        "the flood did not fill the hello ring: not a flood"
    );
    assert!(
        held.contains(&SRV_V4.into()),
        "the real answer was lost to the flood of Initials: {held:?}"
    );
    stop_daemon(daemon, &shaper);
}
