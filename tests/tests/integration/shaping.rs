//! The main acceptance test: the busy-hour scenario on FTTC 40/10 (400 ms modem buffer) in
//! three phases on one topology: no shaper, the product applied with the GP-surgery config,
//! and the product removed again.
//!
//! With the shaper: video p99 one-way delay at least 10x lower in each direction with < 1 %
//! loss, the image upload >= 80 % of its class's guaranteed rate, the copper kept busy
//! (>= 85 % of the line used each way), download goodput >= 85 % of the line and upload
//! goodput above its floor (see `verdict`). After `remove`, the gateway's qdiscs are exactly
//! what they were before `apply` and no pins are left. The per-phase table is always printed.

use std::time::Duration;

use shaper_tests::phases::{self, Phases};
use shaper_tests::verdict::shaping_failures;
use shaper_tests::{skip_unless_ready, Line, Scenario, ShaperConfig, TRAFFIC_TOOLS};

#[test]
fn shaper_cuts_video_delay_and_keeps_throughput() {
    skip_unless_ready!(TRAFFIC_TOOLS);
    let secs = std::env::var("SHAPER_TEST_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let scenario = Scenario {
        duration: Duration::from_secs(secs),
        ..Default::default()
    };
    let line = Line::FTTC_40_10;
    let config = ShaperConfig::gp_surgery(&line);
    eprintln!("config:\n{}", config.to_toml());
    let mut report =
        phases::run(line, config, scenario, Phases::CompareAndRemove).expect("topology");
    eprintln!("\n{}", report.table());
    if let Some(s) = &report.status_after_shaped {
        eprintln!("shaper status after the shaped phase:\n{s}");
    }
    match (report.get("no shaper"), report.get("shaper on")) {
        (Some(unshaped), Some(shaped)) => {
            let f = shaping_failures(&report.line, &report.config, unshaped, shaped);
            report.problems.extend(f);
        }
        _ => report
            .problems
            .push("no shaped/unshaped pair of results to compare".into()),
    }
    assert!(
        report.problems.is_empty(),
        "shaping test failed:\n- {}",
        report.problems.join("\n- ")
    );
}

/// With a base RTT (the delay line, 20 ms) and traffic as the internet has it (default TCP
/// with autotuned windows, every long transfer starting at once, web-like churn beside
/// them), the product's download video p99 is below that of hand-built HTB + bfifo at 95 %
/// of the line in the same run. Runs of each, interleaved, compared by their medians; the
/// call sends 150 packets a second (800 B) so each run's p99 rests on ~1,200 packets
/// rather than 400. Each case first measures the call on the idle line: a pair counts only
/// if both idle p99s are within 3 ms of the base delay (10 ms one way): on a machine too
/// loaded for that the delay line's own error swamps what is compared (seen: idle 13-17 ms,
/// downloads 15 % slower, both gateways' p99 up by 10-25 ms), so the test repeats, and
/// skips (saying why) when fewer than two of six pairs were clean. Figures for more rows
/// and runs: `cargo xtask bench --download`.
#[test]
fn product_beats_plain_htb_on_download_latency_with_base_rtt_and_churn() {
    use shaper_tests::matrix::{run_case, Gw, FTTC};
    use shaper_tests::topology::PathDelay;
    use shaper_tests::{Offloads, Shaper, TempDir, Topology, TopologyOptions};

    skip_unless_ready!(TRAFFIC_TOOLS);
    const CLEAN_IDLE_P99_MS: f64 = 13.0;
    let topo = Topology::build_with(TopologyOptions {
        line: Some(FTTC.line),
        offloads: Offloads::from_env(),
        path: Some(PathDelay::new(Duration::from_millis(20), Duration::ZERO)),
    })
    .expect("topology");
    let dir = TempDir::new("latency-rtt").expect("temp dir");
    let mut shaper = Shaper::new(&topo.gw).expect("shaper");
    let mut scenario = Scenario {
        congestion: Some("cubic".into()),
        ..FTTC.scenario(12)
    };
    scenario.video.pps = 150;
    scenario.video.payload = 800;
    scenario.idle = Some(Duration::from_secs(2));
    let (mut prod, mut htb, mut noisy) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..6 {
        if prod.len() >= 3 {
            break;
        }
        let mut pair = Vec::new();
        for gw in [Gw::Product, Gw::Htb(95)] {
            let r = run_case(&topo, &mut shaper, &dir, &FTTC, &scenario, gw, 92, &[])
                .unwrap_or_else(|e| panic!("{} run {run}: {e:#}", gw.label()));
            let idle = r.video_idle.as_ref().map_or(f64::NAN, |(_, d)| d.p99_ms);
            eprintln!(
                "run {run} {:>10}: video down p99 {:6.1} ms (idle {idle:.1} ms), up p99 {:6.1} ms, download {:.1} Mbit/s, churn {}",
                gw.label(),
                r.video_down.p99_ms,
                r.video_up.p99_ms,
                r.total_down_bps / 1e6,
                r.churn
                    .as_ref()
                    .map_or("-".to_string(), |c| format!("{}/{} done", c.completed, c.started)),
            );
            pair.push((idle, r.video_down.clone()));
        }
        if pair.iter().all(|(idle, _)| *idle <= CLEAN_IDLE_P99_MS) {
            prod.push(pair[0].1.clone());
            htb.push(pair[1].1.clone());
        } else {
            noisy.push(format!("{:.1}/{:.1}", pair[0].0, pair[1].0));
        }
    }
    if prod.len() < 2 {
        shaper_tests::util::note_skip(&format!(
            "product_beats_plain_htb: the machine was too loaded to compare (idle-line video p99s {} ms, product/HTB, against {CLEAN_IDLE_P99_MS} ms allowed)",
            noisy.join(", ")
        ));
        return;
    }
    let median = |v: &[shaper_tests::DelayStats]| {
        let mut p: Vec<f64> = v.iter().map(|d| d.p99_ms).collect();
        p.sort_by(|a, b| a.total_cmp(b));
        p[p.len() / 2]
    };
    assert!(
        median(&prod) < median(&htb),
        "product's median download video p99 {:.1} ms is not below plain HTB 95 %'s {:.1} ms ({} clean pairs)",
        median(&prod),
        median(&htb),
        prod.len()
    );
    for d in prod.iter().chain(&htb) {
        assert!(d.loss_pct < 1.0, "video lost {:.2} %", d.loss_pct);
    }
}
