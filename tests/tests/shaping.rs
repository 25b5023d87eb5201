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
