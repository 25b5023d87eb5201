//! `cargo xtask bench`: prints tables, asserts nothing.
//!
//! 1. Classifier cost per packet through BPF_PROG_TEST_RUN (the kernel's own timing, mean
//!    of `REPEAT` runs, median of `ROUNDS` rounds): the empty program (the floor) and the
//!    classifier with 10, 1,000 and 10,000 rules, for a packet that matches the first rule,
//!    one that matches the last rule, and one that matches none (the full bitmap scan).
//! 2. Reloads: wall time of 20 `shaper apply` reloads (p50/p99) with 10 and 1,000 rules, in a
//!    gateway namespace with no line emulation.
//! 3. Forwarding: small UDP packets from one unpaced sender lan -> gw -> srv for 5 s, counted at
//!    the receiver, without the shaper and with it at 10gbit (nothing is shaped: the figure is
//!    the classifier + HTB path cost).
//! 4. The namespace busy-hour scenario on FTTC 40/10 with and without the shaper
//!    (`--no-scenario` skips it).

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use shaper_tests::packet::Pkt;
use shaper_tests::phases::{self, Phases};
use shaper_tests::topology::{GW_LAN_IF, GW_WAN_IF, HOST_IF, SRV_V4};
use shaper_tests::{
    Line, Offloads, Scenario, Shaper, ShaperConfig, TempDir, Topology, TopologyOptions,
};
use shaper_user::{compile, config, kernel::bpf};

const REPEAT: u32 = 200_000;
const ROUNDS: usize = 5;

fn policy(n: usize) -> config::Policy {
    let mut t = String::from(
        "[interfaces]\nwan = \"lo\"\nlan = \"bench-lan\"\n[upload]\nrate = \"10mbit\"\n[download]\nrate = \"40mbit\"\n\
         [[class]]\nname = \"video\"\npriority = 0\nguaranteed = \"30%\"\n\
         [[class]]\nname = \"images\"\npriority = 1\nguaranteed = \"30%\"\n\
         [[class]]\nname = \"default\"\npriority = 2\nguaranteed = \"30%\"\ndefault = true\n",
    );
    for i in 0..n {
        t.push_str(&format!(
            "[[rule]]\nname = \"r{i}\"\nclass = \"{}\"\nprotocol = \"udp\"\ndst_ports = [{}]\n",
            if i % 2 == 0 { "video" } else { "images" },
            10_000 + i
        ));
        if i % 10 == 0 {
            t.push_str(&format!(
                "dst_cidrs = [\"10.{}.{}.0/24\", \"2001:db8:{:x}::/48\"]\n",
                (i / 256) % 256,
                i % 256,
                i
            ));
        } else if i % 10 == 1 {
            t.push_str(&format!(
                "src_ports = [\"{}-{}\"]\n",
                20_000 + i,
                20_100 + i
            ));
        }
    }
    config::parse(Path::new("bench.toml"), &t).unwrap_or_else(|e| panic!("bench policy: {e}"))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn classifier_table() -> anyhow::Result<()> {
    let cases = |n: usize| -> Vec<(&'static str, Vec<u8>)> {
        let last = 10_000 + n as u16 - 1;
        vec![
            (
                "first rule",
                Pkt::udp("192.168.1.10", "10.0.0.5", 5000, 10_000).build(),
            ),
            (
                "last rule",
                Pkt::udp("192.168.1.10", "198.51.100.7", 5000, last).build(),
            ),
            (
                "no match (full scan)",
                Pkt::udp("192.168.1.10", "198.51.100.7", 5000, 9_999).build(),
            ),
            (
                "ipv6, no match",
                Pkt::udp("fd00::10", "2001:db8:1::5", 5000, 9_999).build(),
            ),
        ]
    };
    let floor_pkt = Pkt::udp("192.168.1.10", "198.51.100.7", 5000, 9_999).build();
    let floor = median(
        (0..ROUNDS)
            .map(|_| bpf::test_run_empty(&floor_pkt, REPEAT).map(|r| r.duration))
            .collect::<Result<_, _>>()?,
    );
    println!("classifier cost per packet (BPF_PROG_TEST_RUN, mean of {REPEAT} runs, median of {ROUNDS} rounds)");
    println!("`flow` = a flow's later packets (flow cache hit); `first` = a flow's first packet (cache off: the full rule scan)");
    println!(
        "{:<12} {:<22} {:>10} {:>10} {:>13} {:>9} {:>7}",
        "rules", "packet", "flow ns", "first ns", "first-empty", "bitmaps", "words"
    );
    println!(
        "{:<12} {:<22} {:>10} {:>10} {:>13} {:>9} {:>7}",
        "empty prog",
        "udp",
        floor.as_nanos(),
        floor.as_nanos(),
        "-",
        "-",
        "-"
    );
    for n in [10usize, 1_000, 10_000] {
        let pol = policy(n);
        let plan = compile::plan(&pol, None);
        let maps = compile::maps(&plan);
        let flags = shaper_common::CFG_WAN_L2 | shaper_common::CFG_LAN_L2;
        // WAN = lo (ifindex 1): every run classifies as upload.
        let mut cached = bpf::load(&maps, 1, u32::MAX, flags)?;
        let mut uncached = bpf::load(&maps, 1, u32::MAX, flags | shaper_common::CFG_NO_FLOW_CACHE)?;
        for (label, pkt) in cases(n) {
            let time = |obj: &mut aya::Ebpf| -> anyhow::Result<std::time::Duration> {
                Ok(median(
                    (0..ROUNDS)
                        .map(|_| bpf::test_run(obj, &pkt, 1, REPEAT).map(|r| r.duration))
                        .collect::<Result<_, _>>()?,
                ))
            };
            let hit = time(&mut cached)?;
            let miss = time(&mut uncached)?;
            println!(
                "{:<12} {:<22} {:>10} {:>10} {:>13} {:>9} {:>7}",
                n,
                label,
                hit.as_nanos(),
                miss.as_nanos(),
                miss.as_nanos() as i128 - floor.as_nanos() as i128,
                maps.bitmaps.len(),
                maps.nwords
            );
        }
    }
    Ok(())
}

/// A gateway config for the lab's `wan0`/`lan0` at `rate` each way with `n` UDP port rules
/// (and the video rule on UDP 50020); `variant` 1 moves the guarantees and ceilings, so
/// alternating 0 and 1 changes every class in place.
fn gw_config(rate: &str, n: usize, variant: u32) -> String {
    let (v, d, b) = if variant == 0 {
        ((30, 100), (40, 100), (10, 100))
    } else {
        ((50, 90), (20, 80), (5, 50))
    };
    let mut t = format!(
        "[interfaces]\nwan = \"{GW_WAN_IF}\"\nlan = \"{GW_LAN_IF}\"\n[upload]\nrate = \"{rate}\"\n[download]\nrate = \"{rate}\"\n"
    );
    for (name, prio, (g, c), default) in [
        ("video", 0, v, false),
        ("default", 4, d, true),
        ("bulk", 7, b, false),
    ] {
        t.push_str(&format!(
            "[[class]]\nname = \"{name}\"\npriority = {prio}\nguaranteed = \"{g}%\"\nceiling = \"{c}%\"\n"
        ));
        if default {
            t.push_str("default = true\n");
        }
    }
    t.push_str(
        "[[rule]]\nname = \"video\"\nclass = \"video\"\nprotocol = \"udp\"\ndst_ports = [50020]\n",
    );
    for i in 0..n.saturating_sub(1) {
        t.push_str(&format!(
            "[[rule]]\nname = \"r{i}\"\nclass = \"{}\"\nprotocol = \"udp\"\ndst_ports = [{}]\n",
            if i % 2 == 0 { "video" } else { "bulk" },
            10_000 + i
        ));
        if i % 10 == 0 {
            t.push_str(&format!(
                "dst_cidrs = [\"10.{}.{}.0/24\"]\n",
                100 + (i / 256) % 100,
                i % 256
            ));
        }
    }
    t
}

fn lab() -> anyhow::Result<Topology> {
    Topology::build_with(TopologyOptions {
        line: None,
        offloads: Offloads::Off,
    })
}

fn pct(sorted: &[Duration], q: f64) -> Duration {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Wall time of `reloads` `shaper apply` runs alternating two configs with `n` rules.
fn reload_times(n: usize, reloads: usize) -> anyhow::Result<(Duration, Vec<Duration>)> {
    let topo = lab()?;
    let dir = TempDir::new("bench-reload")?;
    let cfgs = [
        dir.write("a.toml", &gw_config("100mbit", n, 0))?,
        dir.write("b.toml", &gw_config("100mbit", n, 1))?,
    ];
    let mut shaper = Shaper::new(&topo.gw)?;
    let t = Instant::now();
    shaper.apply(&cfgs[0])?;
    let first = t.elapsed();
    let mut times = Vec::with_capacity(reloads);
    for i in 0..reloads {
        let cfg = &cfgs[(i + 1) % 2];
        let t = Instant::now();
        let out = shaper
            .command(&[std::ffi::OsStr::new("apply"), cfg.as_os_str()])
            .output()?;
        times.push(t.elapsed());
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = err.trim_end().lines().rev().take(10).collect();
            bail!(
                "reload {} with {n} rules failed ({}):\n{}",
                i + 1,
                out.status,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
    shaper.remove()?;
    times.sort();
    Ok((first, times))
}

fn reload_table() -> anyhow::Result<()> {
    const RELOADS: usize = 20;
    println!("\nreload (`shaper apply` as a process, wall time; {RELOADS} reloads alternating two configs that change every class in place; no line emulation)");
    println!(
        "{:<8} {:>14} {:>10} {:>10} {:>10} {:>10}",
        "rules", "first apply", "p50", "p99", "min", "max"
    );
    for n in [10usize, 1_000] {
        let (first, t) = reload_times(n, RELOADS)?;
        let f = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
        println!(
            "{:<8} {:>14} {:>10} {:>10} {:>10} {:>10}",
            n,
            f(first),
            f(pct(&t, 0.50)),
            f(pct(&t, 0.99)),
            f(t[0]),
            f(t[t.len() - 1])
        );
    }
    Ok(())
}

/// Received-packet counter of `dev` in `ns`.
fn rx_packets(ns: &shaper_tests::Netns, dev: &str) -> anyhow::Result<u64> {
    let out = ns.ip(&["-s", "-j", "link", "show", "dev", dev])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("parsing ip -j output")?;
    v[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .with_context(|| format!("no rx packet counter for {dev}"))
}

struct Forwarded {
    sent_pps: f64,
    /// Delivered to the server's interface (forwarded by gw and modem).
    at_srv_pps: f64,
    /// Read by the receiving socket.
    received_pps: f64,
    send_errors: u64,
}

/// One unpaced sender in lan, 18-byte UDP payloads to srv for `dur`; counted at srv.
fn forward(topo: &Topology, dur: Duration) -> anyhow::Result<Forwarded> {
    let addr = SocketAddr::new(SRV_V4.into(), 50020);
    let rx = topo.srv.within(move || Ok(UdpSocket::bind(addr)?))?;
    shaper_tests::gateway::force_rcvbuf(&rx, 16 << 20);
    rx.set_read_timeout(Some(Duration::from_millis(100)))?;
    let tx = topo.lan.within(move || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.connect(addr)?;
        Ok(s)
    })?;
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    let receiver = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let mut n = 0u64;
        let mut idle = 0;
        loop {
            match rx.recv(&mut buf) {
                Ok(_) => {
                    n += 1;
                    idle = 0;
                }
                Err(_) if d.load(Ordering::Relaxed) => {
                    idle += 1;
                    if idle >= 3 {
                        break;
                    }
                }
                Err(_) => {}
            }
        }
        n
    });
    let srv0 = rx_packets(&topo.srv, HOST_IF)?;
    let pkt = [0x5au8; 18];
    let (mut sent, mut errors) = (0u64, 0u64);
    let t = Instant::now();
    while t.elapsed() < dur {
        for _ in 0..64 {
            match tx.send(&pkt) {
                Ok(_) => sent += 1,
                Err(_) => errors += 1,
            }
        }
    }
    let secs = t.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(200));
    let at_srv = rx_packets(&topo.srv, HOST_IF)? - srv0;
    done.store(true, Ordering::Relaxed);
    let received = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))?;
    Ok(Forwarded {
        sent_pps: sent as f64 / secs,
        at_srv_pps: at_srv as f64 / secs,
        received_pps: received as f64 / secs,
        send_errors: errors,
    })
}

fn forwarding_table(secs: u64) -> anyhow::Result<()> {
    let dur = Duration::from_secs(secs);
    println!("\nforwarding lan -> gw -> modem -> srv (one unpaced sender, 18-byte UDP payloads, {secs} s each; no line emulation)");
    println!(
        "{:<36} {:>12} {:>14} {:>14} {:>8}",
        "gateway", "sent pps", "at srv pps", "received pps", "vs none"
    );
    let topo = lab()?;
    let dir = TempDir::new("bench-forward")?;
    let cfg = dir.write("fast.toml", &gw_config("10gbit", 10, 0))?;
    let none = forward(&topo, dur)?;
    // The qdisc alone: a textbook HTB root at the same rate, everything in its default class.
    for dev in [GW_WAN_IF, GW_LAN_IF] {
        topo.gw.run(
            "tc",
            &[
                "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "2",
            ],
        )?;
        topo.gw.run(
            "tc",
            &[
                "class", "add", "dev", dev, "parent", "1:", "classid", "1:2", "htb", "rate",
                "10gbit",
            ],
        )?;
    }
    let htb_only = forward(&topo, dur)?;
    for dev in [GW_WAN_IF, GW_LAN_IF] {
        topo.gw.run("tc", &["qdisc", "del", "dev", dev, "root"])?;
    }
    let mut shaper = Shaper::new(&topo.gw)?;
    shaper.apply(&cfg)?;
    let with = forward(&topo, dur)?;
    let st = shaper.status_json()?;
    shaper.remove()?;
    let video = &st["directions"][0]["classes"][0];
    for (label, f) in [
        ("no shaper", &none),
        ("tc HTB only, 10gbit, no classifier", &htb_only),
        ("shaper, 10gbit, 10 rules (video)", &with),
    ] {
        println!(
            "{:<36} {:>12.0} {:>14.0} {:>14.0} {:>7.1}%{}",
            label,
            f.sent_pps,
            f.at_srv_pps,
            f.received_pps,
            100.0 * f.at_srv_pps / none.at_srv_pps,
            if f.send_errors > 0 {
                format!("  ({} send errors)", f.send_errors)
            } else {
                String::new()
            }
        );
    }
    println!(
        "  (with the shaper: video class classified {} packets, HTB 1:10 sent {})",
        video["classified_packets"], video["packets"]
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let classifier_only = args.iter().any(|a| a == "--classifier-only");
    let secs = args
        .iter()
        .position(|a| a == "--seconds")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let forward_secs = args
        .iter()
        .position(|a| a == "--forward-seconds")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    classifier_table()?;
    if classifier_only {
        return Ok(());
    }
    reload_table()?;
    forwarding_table(forward_secs)?;
    if args.iter().any(|a| a == "--no-scenario") {
        return Ok(());
    }
    println!("\nnamespace scenario (FTTC 40/10, 400 ms modem buffer; 4+4 bulk TCP, image upload on TCP 104, 50 pps x 1000 B video each way)");
    let line = Line::FTTC_40_10;
    let scenario = Scenario {
        duration: Duration::from_secs(secs),
        ..Default::default()
    };
    let report = phases::run(
        line,
        ShaperConfig::gp_surgery(&line),
        scenario,
        Phases::Compare,
    )?;
    println!("{}", report.table());
    for p in &report.problems {
        println!("problem: {p}");
    }
    Ok(())
}
