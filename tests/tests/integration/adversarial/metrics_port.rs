//! The metrics port answers only where it should, and holds up against the LAN.
//!
//! - From the WAN side (the modem, and the server behind it) a TCP connect to the metrics
//!   port gets no connection, on the box's WAN address and on its LAN address (which the
//!   modem routes through the WAN port: Linux answers for any of its addresses on any
//!   interface); the LAN host still scrapes.
//! - A scrape (from Prometheus, another LAN address) is answered within 1 s while one LAN
//!   host keeps 16 connections open, half sending nothing, half a byte a second (each
//!   re-opened as soon as the box closes it).
//! - An error answer (the state file spoiled under the running daemon) names no file; the
//!   daemon's log does.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shaper_tests::gateway::{http_get, http_get_from, wait_for, write_config};
use shaper_tests::shaper::Daemon;
use shaper_tests::topology::{GW_LAN_IF, GW_LAN_V4, GW_WAN_V4, HOST_IF};
use shaper_tests::{skip_unless_ready, Netns, Shaper, TempDir, Topology, TOPOLOGY_TOOLS};

use super::video_and_default;

const PORT: u16 = 9464;
/// The LAN host's second address, from which Prometheus scrapes.
const PROMETHEUS: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 201, 1, 3);

fn metrics_addr() -> SocketAddr {
    SocketAddr::new(GW_LAN_V4.into(), PORT)
}

/// `shaper run` with the metrics endpoint, once the LAN host gets a 200 from it.
fn start(shaper: &Shaper, topo: &Topology, dir: &TempDir) -> Daemon {
    let cfg = write_config(
        dir.path(),
        "site.toml",
        &video_and_default(30).metrics(metrics_addr()).to_toml(),
    );
    let daemon = Daemon::start(
        shaper,
        &cfg,
        dir.path().join("daemon.log"),
        "info,shaper_user=debug",
    )
    .expect("start `shaper run`");
    wait_for("a 200 from /metrics", Duration::from_secs(10), || {
        matches!(
            http_get(
                &topo.lan,
                metrics_addr(),
                "/metrics",
                Duration::from_secs(5)
            ),
            Ok((200, _, _))
        )
    });
    daemon
}

/// A TCP connect from `ns` to `addr`: `None` when no connection was made (refused or no
/// answer within 2 s), else what a GET on it got back.
fn connect_from(ns: &Netns, addr: SocketAddr) -> Option<String> {
    ns.within(move || {
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
            return Ok(None);
        };
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let _ = s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        Ok(Some(String::from_utf8_lossy(&out).into_owned()))
    })
    .expect("connect thread")
}

#[test]
fn the_metrics_port_is_closed_from_the_wan_side() {
    skip_unless_ready!(TOPOLOGY_TOOLS);
    let topo = Topology::build(None).expect("topology");
    let dir = TempDir::new("adv-metrics-wan").expect("dir");
    let shaper = Shaper::new(&topo.gw).expect("shaper");
    let daemon = start(&shaper, &topo, &dir);

    for (who, ns) in [("the modem", &topo.modem), ("the server", &topo.srv)] {
        for target in [GW_LAN_V4, GW_WAN_V4] {
            let addr = SocketAddr::new(target.into(), PORT);
            if let Some(reply) = connect_from(ns, addr) {
                panic!(
                    "{who} (WAN side) connected to {addr}; a GET on it got {} bytes: {:?}",
                    reply.len(),
                    reply.lines().next().unwrap_or("")
                );
            }
        }
    }
    let (code, _, _) = http_get(
        &topo.lan,
        metrics_addr(),
        "/metrics",
        Duration::from_secs(5),
    )
    .expect("still scraped from the LAN");
    assert_eq!(code, 200);
    let log = daemon.log();
    assert!(
        log.contains(&format!("only to connections arriving on {GW_LAN_IF}")),
        "{log}"
    );
    let (status, log) = daemon.stop().expect("stop");
    assert!(status.success(), "{log}");
}

/// Holds `n` connections from `ns` to `addr` open until dropped: the even ones send
/// nothing, the odd ones trickle a request head a byte a second; any the server closes
/// is opened again at once.
struct SlowClients {
    stop: Arc<AtomicBool>,
    reopened: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl SlowClients {
    fn start(ns: &Netns, addr: SocketAddr, n: usize) -> SlowClients {
        let stop = Arc::new(AtomicBool::new(false));
        let reopened = Arc::new(AtomicUsize::new(0));
        let (s, r) = (stop.clone(), reopened.clone());
        let thread = ns.spawn_thread(move || {
            let open = || -> Option<TcpStream> {
                let c = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
                c.set_nonblocking(true).ok()?;
                Some(c)
            };
            let mut conns: Vec<Option<TcpStream>> = (0..n).map(|_| open()).collect();
            let mut head = b"GET /metrics HTTP/1.1\r\nX-Slow: ".to_vec();
            head.extend(std::iter::repeat_n(b'a', 4096));
            let mut sent = vec![0usize; n];
            let mut last_byte = Instant::now();
            while !s.load(Ordering::Relaxed) {
                let trickle = last_byte.elapsed() >= Duration::from_secs(1);
                if trickle {
                    last_byte = Instant::now();
                }
                for (i, c) in conns.iter_mut().enumerate() {
                    let mut buf = [0u8; 256];
                    let alive = match c.as_mut() {
                        None => false,
                        Some(sock) => match sock.read(&mut buf) {
                            Ok(0) => false,
                            Ok(_) => true,
                            Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
                        },
                    };
                    if !alive {
                        *c = open();
                        sent[i] = 0;
                        r.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    if trickle && i % 2 == 1 {
                        if let Some(sock) = c.as_mut() {
                            let b = head[sent[i] % head.len()];
                            if sock.write(&[b]).is_ok() {
                                sent[i] += 1;
                            }
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(())
        });
        SlowClients {
            stop,
            reopened,
            thread: Some(thread),
        }
    }
}

impl Drop for SlowClients {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn a_scrape_is_served_beside_16_slow_connections() {
    skip_unless_ready!(TOPOLOGY_TOOLS);
    let topo = Topology::build(None).expect("topology");
    let dir = TempDir::new("adv-metrics-slow").expect("dir");
    let shaper = Shaper::new(&topo.gw).expect("shaper");
    let daemon = start(&shaper, &topo, &dir);

    // Prometheus is another host on the LAN: a second address of the LAN namespace.
    topo.lan
        .ip(&["addr", "add", &format!("{PROMETHEUS}/24"), "dev", HOST_IF])
        .expect("second LAN address");
    let slow = SlowClients::start(&topo.lan, metrics_addr(), 16);
    std::thread::sleep(Duration::from_millis(500));
    // Five scrapes over about 6 s: the slow connections' heads are past their deadline
    // by then and they keep coming back.
    let mut took = Vec::new();
    for i in 0..5 {
        let t0 = Instant::now();
        let got = http_get_from(
            &topo.lan,
            Some(PROMETHEUS.into()),
            metrics_addr(),
            "/metrics",
            Duration::from_secs(5),
        );
        let t = t0.elapsed();
        match got {
            Ok((200, _, body)) => assert!(body.contains("shaper_up 1"), "{body}"),
            other => panic!(
                "scrape {i} beside 16 slow connections: {other:?} after {t:?}; daemon log:\n{}",
                daemon.log()
            ),
        }
        assert!(t < Duration::from_secs(1), "scrape {i} took {t:?}");
        took.push(t);
        std::thread::sleep(Duration::from_millis(1200));
    }
    let reopened = slow.reopened.load(Ordering::Relaxed);
    drop(slow);
    eprintln!("scrapes took {took:?}; the slow clients re-opened {reopened} connections");
    let (status, log) = daemon.stop().expect("stop");
    assert!(status.success(), "{log}");
}

#[test]
fn an_error_answer_names_no_file() {
    skip_unless_ready!(TOPOLOGY_TOOLS);
    let topo = Topology::build(None).expect("topology");
    let dir = TempDir::new("adv-metrics-500").expect("dir");
    let shaper = Shaper::new(&topo.gw).expect("shaper");
    let daemon = start(&shaper, &topo, &dir);

    // The state file spoiled under the running daemon: reading the counters fails.
    let state = shaper.run_dir().join("state.json");
    let good = std::fs::read(&state).expect("state file");
    let mut answer = None;
    for _ in 0..5 {
        std::fs::write(&state, b"{\"version\": 1, \"trunc").expect("spoil the state file");
        match http_get(
            &topo.lan,
            metrics_addr(),
            "/metrics",
            Duration::from_secs(5),
        ) {
            Ok((500, _, body)) => {
                answer = Some(body);
                break;
            }
            other => eprintln!("not a 500 yet: {other:?}"),
        }
    }
    std::fs::write(&state, &good).expect("restore the state file");
    let body = answer.expect("a 500 while the state file is spoiled");
    let run = shaper.run_dir().display().to_string();
    assert!(
        !body.contains('/') && !body.contains("state.json") && !body.contains(&run),
        "the error body names a file: {body:?}"
    );
    // What failed is in the daemon's log instead.
    wait_for(
        "the failure in the daemon's log",
        Duration::from_secs(2),
        || daemon.log().contains(&format!("{run}/state.json")),
    );
    // And with the state back, scrapes work again.
    wait_for("a 200 again", Duration::from_secs(5), || {
        matches!(
            http_get(
                &topo.lan,
                metrics_addr(),
                "/metrics",
                Duration::from_secs(5)
            ),
            Ok((200, _, _))
        )
    });
    let (status, log) = daemon.stop().expect("stop");
    assert!(status.success(), "{log}");
}
