//! The main acceptance test: the busy-hour scenario on FTTC 40/10 (400 ms modem buffer) in
//! three phases on one topology: no shaper, the product applied with the GP-surgery config,
//! and the product removed again.
//!
//! With the shaper, video p99 one-way delay must fall at least 10x in each direction with
//! < 1 % loss, the image upload must get >= 80 % of its class's guaranteed rate, and total
//! goodput must stay >= 85 % of the line each way. After `remove`, the gateway's qdiscs must
//! be exactly what they were before `apply`. The per-phase table is printed in every case.

use std::time::Duration;

use shaper_tests::verdict::shaping_failures;
use shaper_tests::{
    skip_unless_ready, table, Line, Results, Scenario, Shaper, ShaperConfig, TempDir, Topology,
    TRAFFIC_TOOLS,
};

fn scenario() -> Scenario {
    let secs = std::env::var("SHAPER_TEST_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    Scenario {
        duration: Duration::from_secs(secs),
        ..Default::default()
    }
}

#[test]
fn shaper_cuts_video_delay_and_keeps_throughput() {
    skip_unless_ready!(TRAFFIC_TOOLS);
    let line = Line::FTTC_40_10;
    let topo = Topology::build(Some(line)).expect("build topology");
    let dir = TempDir::new("shaping").expect("temp dir");
    let config = ShaperConfig::gp_surgery(&line);
    let config_path = config
        .write(dir.path(), "shaper.toml")
        .expect("write config");
    eprintln!("config {}:\n{}", config_path.display(), config.to_toml());

    let mut shaper = Shaper::new(&topo.gw).expect("shaper binary");
    let scenario = scenario();
    let qdiscs_before = topo.gw_qdiscs().expect("qdiscs before");

    let mut phases: Vec<(&str, Results)> = Vec::new();
    let mut problems: Vec<String> = Vec::new();

    // Phase 1: no shaper.
    match scenario.run(&topo) {
        Ok(r) => phases.push(("no shaper", r)),
        Err(e) => problems.push(format!("no-shaper phase: {e:#}")),
    }

    // Phase 2: shaper applied.
    let applied = match shaper.apply(&config_path) {
        Ok(out) => {
            eprintln!("apply: {out}");
            match shaper.status_json() {
                Ok(v) => eprintln!("status --json: {v}"),
                Err(e) => problems.push(format!("status --json after apply: {e:#}")),
            }
            eprintln!(
                "gw qdiscs with the shaper:\n{}",
                topo.gw_qdiscs().unwrap_or_else(|e| format!("{e:#}"))
            );
            true
        }
        Err(e) => {
            problems.push(format!("apply: {e:#}"));
            false
        }
    };
    if applied {
        match scenario.run(&topo) {
            Ok(r) => phases.push(("shaper on", r)),
            Err(e) => problems.push(format!("shaper phase: {e:#}")),
        }
        if let Ok(v) = shaper.status_json() {
            eprintln!("status --json after the shaped run: {v}");
        }
    }

    // Phase 3: shaper removed.
    match shaper.remove() {
        Ok(out) => eprintln!("remove: {out}"),
        Err(e) => problems.push(format!("remove: {e:#}")),
    }
    let qdiscs_after = topo.gw_qdiscs().expect("qdiscs after");
    if qdiscs_after != qdiscs_before {
        problems.push(format!(
            "gw qdiscs after remove differ from before apply:\n--- before\n{qdiscs_before}--- after\n{qdiscs_after}"
        ));
    }
    let leftover = shaper.leftover_pins();
    if !leftover.is_empty() {
        problems.push(format!("pins left after remove: {leftover:?}"));
    }
    match scenario.run(&topo) {
        Ok(r) => phases.push(("removed", r)),
        Err(e) => problems.push(format!("removed phase: {e:#}")),
    }

    let cols: Vec<(&str, &Results)> = phases.iter().map(|(n, r)| (*n, r)).collect();
    eprintln!(
        "\nFTTC {}/{} Mbit/s, {} ms buffer, {:?} per phase; shaper {} up / {} down\n{}",
        line.down_bps / 1_000_000,
        line.up_bps / 1_000_000,
        line.buffer_ms,
        scenario.duration,
        shaper_tests::config::format_rate(config.upload_bps),
        shaper_tests::config::format_rate(config.download_bps),
        table(&cols)
    );

    let find = |name: &str| phases.iter().find(|(n, _)| *n == name).map(|(_, r)| r);
    match (find("no shaper"), find("shaper on")) {
        (Some(unshaped), Some(shaped)) => {
            problems.extend(shaping_failures(&line, &config, unshaped, shaped))
        }
        _ => problems.push("no shaped/unshaped pair of results to compare".into()),
    }
    assert!(
        problems.is_empty(),
        "shaping test failed:\n- {}",
        problems.join("\n- ")
    );
}
