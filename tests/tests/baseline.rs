//! The bufferbloat baseline: the busy-hour scenario on an FTTC 40/10 line with a 400 ms modem
//! buffer and no shaper. Asserts only that the harness works; the table shows the problem.

use std::time::Duration;

use shaper_tests::{
    skip_unless_ready, table, Line, Offloads, Scenario, Topology, TopologyOptions, TRAFFIC_TOOLS,
};

#[test]
fn baseline_without_shaper_fttc_40_10() {
    skip_unless_ready!(TRAFFIC_TOOLS);
    let line = Line::FTTC_40_10;
    let offloads = Offloads::from_env();
    let topo = Topology::build_with(TopologyOptions {
        line: Some(line),
        offloads,
    })
    .expect("build topology");
    let scenario = Scenario {
        duration: Duration::from_secs(12),
        ..Default::default()
    };
    eprintln!(
        "line: {} / {} Mbit/s, {} ms buffer; offloads {offloads:?}; {:?} busy period, video from +{:?}",
        line.down_bps / 1_000_000,
        line.up_bps / 1_000_000,
        line.buffer_ms,
        scenario.duration,
        scenario.warmup
    );
    let r = scenario.run(&topo).expect("scenario");
    eprintln!("\n{}", table(&[("no shaper", &r)]));

    assert!(r.bulk_up_bps > 0.0, "no bulk upload goodput");
    assert!(r.bulk_down_bps > 0.0, "no bulk download goodput");
    assert!(r.video_up.received > 0, "no upload video packet arrived");
    assert!(
        r.video_down.received > 0,
        "no download video packet arrived"
    );
}
