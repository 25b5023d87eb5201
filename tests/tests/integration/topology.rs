//! The lab itself: lan reaches srv through gw and modem (v4 and v6), and every namespace is
//! gone after the guard drops, also when the test panics.

use std::path::Path;
use std::process::Command;

use shaper_tests::topology::{Topology, GW_WAN_IF, SRV_V4, SRV_V6};
use shaper_tests::{probe, skip_unless_ready, Line, TOPOLOGY_TOOLS};

fn listed_namespaces() -> String {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn root_links() -> String {
    let out = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .expect("ip link show");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_gone(names: &[String], veths: &[String]) {
    let listed = listed_namespaces();
    let links = root_links();
    for n in names {
        assert!(
            !Path::new("/run/netns").join(n).exists(),
            "/run/netns/{n} still exists"
        );
        assert!(
            !listed
                .lines()
                .any(|l| l.split_whitespace().next() == Some(n)),
            "{n} still listed:\n{listed}"
        );
    }
    for v in veths {
        assert!(
            !links.contains(&format!(" {v}:")) && !links.contains(&format!(" {v}@")),
            "veth {v} leaked"
        );
    }
}

#[test]
fn lan_reaches_srv_through_gw_and_modem() {
    skip_unless_ready!(TOPOLOGY_TOOLS);
    let (names, veths);
    {
        let topo = Topology::build(Some(Line::FTTC_40_10)).expect("build topology");
        names = topo.namespace_names();
        veths = topo.veth_names().to_vec();
        eprintln!("namespaces: {names:?}");
        for n in &names {
            assert!(
                n.starts_with("shp-") && n.contains(&format!("-{}-", std::process::id())),
                "{n}"
            );
        }
        assert!(veths.iter().all(|v| v.len() <= 15), "{veths:?}");

        // The gateway's interfaces carry the names a shaper config uses.
        let gw_links = topo.gw.ip(&["-o", "link", "show"]).expect("gw links");
        assert!(
            gw_links.contains(" lan0:") || gw_links.contains(" lan0@"),
            "{gw_links}"
        );
        assert!(
            gw_links.contains(" wan0:") || gw_links.contains(" wan0@"),
            "{gw_links}"
        );

        let before = Topology::tx_packets(&topo.gw, GW_WAN_IF).expect("counter");
        let rtt =
            probe::tcp_echo(&topo.srv, &topo.lan, SRV_V4.into(), 7001).expect("tcp v4 lan->srv");
        eprintln!("tcp echo v4 lan->srv: {rtt:?}");
        let rtt =
            probe::tcp_echo(&topo.srv, &topo.lan, SRV_V6.into(), 7002).expect("tcp v6 lan->srv");
        eprintln!("tcp echo v6 lan->srv: {rtt:?}");
        let rtt =
            probe::udp_echo(&topo.srv, &topo.lan, SRV_V4.into(), 7003).expect("udp v4 lan->srv");
        eprintln!("udp echo v4 lan->srv: {rtt:?}");
        let rtt =
            probe::udp_echo(&topo.srv, &topo.lan, SRV_V6.into(), 7004).expect("udp v6 lan->srv");
        eprintln!("udp echo v6 lan->srv: {rtt:?}");
        let after = Topology::tx_packets(&topo.gw, GW_WAN_IF).expect("counter");
        // The probes crossed the gateway's wan0 (not some other path).
        assert!(
            after >= before + 4,
            "gw wan0 sent {before} -> {after} packets"
        );

        // The line is in place on the modem.
        let q = topo
            .modem
            .run("tc", &["qdisc", "show", "dev", "out0"])
            .expect("tc");
        assert!(
            q.contains("tbf") && q.contains("rate 10Mbit"),
            "modem out0: {q}"
        );
        let q = topo
            .modem
            .run("tc", &["qdisc", "show", "dev", "in0"])
            .expect("tc");
        assert!(
            q.contains("tbf") && q.contains("rate 40Mbit"),
            "modem in0: {q}"
        );
    }
    assert_gone(&names, &veths);
}

#[test]
fn namespaces_are_removed_when_a_test_panics() {
    skip_unless_ready!(TOPOLOGY_TOOLS);
    let names = std::sync::Mutex::new(Vec::new());
    let veths = std::sync::Mutex::new(Vec::new());
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let topo = Topology::build(None).expect("build topology");
        // A background process the guard must kill.
        topo.srv.spawn("sleep", &["30"]).expect("spawn sleep");
        *names.lock().expect("lock") = topo.namespace_names();
        *veths.lock().expect("lock") = topo.veth_names().to_vec();
        panic!("deliberate panic with the topology alive");
    }));
    assert!(result.is_err());
    let names = names.into_inner().expect("lock");
    assert_eq!(names.len(), 4);
    assert_gone(&names, &veths.into_inner().expect("lock"));
}

// ---------------------------------------------------------------------------------------
// The internet path's base delay: a user-space delay line in a fifth ("wire") namespace.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use shaper_tests::topology::{PathDelay, TopologyOptions, WIRE_MODEM_IF, WIRE_SRV_IF};
use shaper_tests::Offloads;

fn with_path(rtt_ms: u64, offloads: Offloads) -> Topology {
    Topology::build_with(TopologyOptions {
        line: None,
        offloads,
        path: Some(PathDelay::rtt_ms(rtt_ms)),
    })
    .expect("build topology with a path delay")
}

/// Round trips in ms of `ping -c 20 -i 0.05` from the lan host to `addr`.
fn ping_rtts(topo: &Topology, addr: IpAddr) -> Vec<f64> {
    let fam = if addr.is_ipv6() { "-6" } else { "-4" };
    let out = topo
        .lan
        .run(
            "ping",
            &[
                fam,
                "-n",
                "-c",
                "20",
                "-i",
                "0.05",
                "-W",
                "2",
                &addr.to_string(),
            ],
        )
        .expect("ping lan -> srv");
    let mut rtts: Vec<f64> = out
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse().ok())
        .collect();
    rtts.sort_by(f64::total_cmp);
    assert!(rtts.len() >= 18, "too few replies:\n{out}");
    rtts
}

#[test]
fn path_delay_adds_the_base_round_trip() {
    skip_unless_ready!(&["ip", "tc", "nsenter", "sysctl", "ping"]);
    let topo = with_path(20, Offloads::from_env());
    assert_eq!(topo.path(), Some(PathDelay::rtt_ms(20)));
    for addr in [IpAddr::from(SRV_V4), IpAddr::from(SRV_V6)] {
        let rtts = ping_rtts(&topo, addr);
        let (min, median) = (rtts[0], rtts[rtts.len() / 2]);
        eprintln!("ping {addr} through a 20 ms path: min {min} ms, median {median} ms");
        assert!(min >= 20.0, "min rtt {min} ms < 20 ms: {rtts:?}");
        // Generous: a loaded 2-core machine adds scheduling delays, not a second path.
        assert!(median < 35.0, "median rtt {median} ms: {rtts:?}");
    }
    let stats = topo.delay_stats().expect("delay line stats");
    for d in &stats {
        eprintln!(
            "{} -> {}: {} frames, lateness p50 {:?} p99 {:?} max {:?}, realtime {}",
            d.from,
            d.to,
            d.frames,
            d.lateness.quantile(0.5),
            d.lateness.quantile(0.99),
            d.lateness.max(),
            d.realtime
        );
        assert!(d.frames >= 40, "{d:?}");
        assert_eq!(d.send_errors, 0, "{d:?}");
        assert_eq!(d.ended, None);
    }
    assert_eq!(stats[0].from, WIRE_MODEM_IF);
    assert_eq!(stats[0].to, WIRE_SRV_IF);

    // The wire itself has no addresses and no IPv6: it never answers anything.
    let wire = topo.wire.as_ref().expect("wire namespace");
    let addrs = wire.ip(&["-o", "addr", "show"]).expect("ip addr");
    for l in addrs.lines() {
        assert!(l.contains(" lo "), "wire has an address: {l}");
    }
    assert!(
        !addrs.contains("inet6"),
        "wire has IPv6 addresses:\n{addrs}"
    );
}

fn pattern(i: usize) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 13) as u8
}

/// srv sends `len` bytes of a known pattern to lan over TCP; lan checks every byte.
fn tcp_download(topo: &Topology, addr: IpAddr, port: u16, len: usize) -> Duration {
    let sa = SocketAddr::new(addr, port);
    let listener = topo
        .srv
        .within(move || Ok(TcpListener::bind(sa)?))
        .expect("bind");
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        // First the client's request, then the download.
        let mut req = [0u8; 4];
        s.read_exact(&mut req)?;
        assert_eq!(&req, b"GET!");
        let data: Vec<u8> = (0..len).map(pattern).collect();
        s.write_all(&data)?;
        Ok(())
    });
    let mut c = topo
        .lan
        .within(move || Ok(TcpStream::connect_timeout(&sa, Duration::from_secs(5))?))
        .expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let start = std::time::Instant::now();
    c.write_all(b"GET!").expect("request");
    let mut got = Vec::with_capacity(len);
    c.read_to_end(&mut got).expect("download");
    let took = start.elapsed();
    server.join().expect("server thread").expect("server");
    assert_eq!(got.len(), len, "short download");
    let bad = got.iter().enumerate().position(|(i, &b)| b != pattern(i));
    assert_eq!(bad, None, "corrupted byte in the download");
    took
}

#[test]
fn tcp_crosses_the_path_delay_intact() {
    skip_unless_ready!(TOPOLOGY_TOOLS);
    // Offloads off (MTU frames, checksum-partial) and kernel defaults (64 KB GSO packets
    // through the packet sockets' vnet headers).
    for (k, offloads) in [Offloads::Off, Offloads::KernelDefault]
        .into_iter()
        .enumerate()
    {
        let topo = with_path(20, offloads);
        for (j, addr) in [IpAddr::from(SRV_V4), IpAddr::from(SRV_V6)]
            .into_iter()
            .enumerate()
        {
            let port = 7101 + (k * 2 + j) as u16;
            let took = tcp_download(&topo, addr, port, 4 << 20);
            eprintln!("{offloads:?} {addr}: 4 MB in {took:?}");
            // At least the handshake and the request took a base round trip each.
            assert!(took >= Duration::from_millis(20), "{took:?}");
        }
        let stats = topo.delay_stats().expect("stats");
        for d in &stats {
            eprintln!(
                "{offloads:?} {} -> {}: {} frames {} bytes, {} send errors, lateness {:?}, \
                 kernel-stamped {}",
                d.from,
                d.to,
                d.frames,
                d.bytes,
                d.send_errors,
                d.lateness,
                d.pickup.count()
            );
        }
        // The download crossed the delay line (towards the site: w1 -> w0).
        assert!(stats[1].bytes >= 8 << 20, "{:?}", stats[1]);
        assert!(topo.delay_line().expect("line").running());
    }
}

#[test]
fn all_five_namespaces_are_removed_with_a_path() {
    skip_unless_ready!(TOPOLOGY_TOOLS);
    let (names, veths);
    {
        let topo = with_path(20, Offloads::Off);
        names = topo.namespace_names();
        veths = topo.veth_names().to_vec();
        assert_eq!(names.len(), 5, "{names:?}");
        assert!(
            names.iter().any(|n| n.starts_with("shp-wire-")),
            "{names:?}"
        );
        assert_eq!(veths.len(), 8, "{veths:?}");
        probe::udp_echo(&topo.srv, &topo.lan, SRV_V4.into(), 7201).expect("udp v4 lan->srv");
    }
    assert_gone(&names, &veths);

    // Without a path: the four namespaces of old.
    let topo = Topology::build(None).expect("build topology");
    assert_eq!(topo.namespace_names().len(), 4);
    assert!(topo.wire.is_none() && topo.path().is_none() && topo.delay_stats().is_none());
}

#[test]
fn delay_line_ends_when_an_interface_disappears() {
    skip_unless_ready!(TOPOLOGY_TOOLS);
    let topo = with_path(20, Offloads::Off);
    let line = topo.delay_line().expect("delay line");
    assert!(line.running());
    // Deleting the modem's end of the pair removes the wire's w0 with it.
    topo.modem
        .ip(&["link", "del", "dev", "out0"])
        .expect("ip link del");
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while line.running() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!line.running(), "the delay line still runs without w0");
    let stats = topo.delay_stats().expect("stats");
    eprintln!("ended: {:?} / {:?}", stats[0].ended, stats[1].ended);
    assert!(
        stats
            .iter()
            .any(|d| d.ended.as_deref().is_some_and(|e| e.contains("w0"))),
        "{stats:?}"
    );
    // Dropping the topology afterwards still works (joins the ended threads).
    let names = topo.namespace_names();
    let veths = topo.veth_names().to_vec();
    drop(topo);
    assert_gone(&names, &veths);
}
