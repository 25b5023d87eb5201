//! `cargo xtask bench`: prints tables, asserts nothing.
//!
//! 1. Classifier cost per packet through BPF_PROG_TEST_RUN (the kernel's own timing, mean
//!    of `REPEAT` runs, median of `ROUNDS` rounds): the empty program (the floor) and the
//!    classifier with 10, 1,000 and 10,000 rules, for a packet that matches the first rule,
//!    one that matches the last rule, and one that matches none (the full bitmap scan).
//! 2. The namespace busy-hour scenario on FTTC 40/10 with and without the shaper.

use std::path::Path;
use std::time::Duration;

use shaper_tests::packet::Pkt;
use shaper_tests::phases::{self, Phases};
use shaper_tests::{Line, Scenario, ShaperConfig};
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
    println!(
        "{:<12} {:<22} {:>10} {:>14} {:>9} {:>7}",
        "rules", "packet", "ns/packet", "above empty", "bitmaps", "words"
    );
    println!(
        "{:<12} {:<22} {:>10} {:>14} {:>9} {:>7}",
        "empty prog",
        "udp",
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
        let mut obj = bpf::load(&maps, 1, u32::MAX, flags)?;
        for (label, pkt) in cases(n) {
            let d = median(
                (0..ROUNDS)
                    .map(|_| bpf::test_run(&mut obj, &pkt, 1, REPEAT).map(|r| r.duration))
                    .collect::<Result<_, _>>()?,
            );
            println!(
                "{:<12} {:<22} {:>10} {:>14} {:>9} {:>7}",
                n,
                label,
                d.as_nanos(),
                d.as_nanos() as i128 - floor.as_nanos() as i128,
                maps.bitmaps.len(),
                maps.nwords
            );
        }
    }
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
    classifier_table()?;
    if classifier_only {
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
