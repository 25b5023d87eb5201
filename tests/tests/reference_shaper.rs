//! Checks the lab, not the product: a textbook `tc` HTB + u32 shaper implementing the same
//! GP-surgery config must meet the shaping test's criteria here. If this fails, the thresholds
//! in `shaper_tests::verdict` (or the lab) are wrong, whatever the product does.

use std::time::Duration;

use shaper_tests::reference::{self, ReferenceOptions};
use shaper_tests::verdict::shaping_failures;
use shaper_tests::{
    skip_unless_ready, table, Line, Offloads, Scenario, ShaperConfig, Topology, TopologyOptions,
    TRAFFIC_TOOLS,
};

#[test]
fn reference_htb_meets_the_shaping_criteria() {
    skip_unless_ready!(TRAFFIC_TOOLS);
    let line = Line::FTTC_40_10;
    let offloads = Offloads::from_env();
    // ACK priority on by default: with plain FIFO classes the download's ACKs queue behind bulk
    // upload and the download collapses (measured: 5 Mbit/s of 36). SHAPER_REF_ACK_PRIO=0 shows it.
    let opts = ReferenceOptions {
        ack_priority: std::env::var("SHAPER_REF_ACK_PRIO").as_deref() != Ok("0"),
    };
    eprintln!("offloads {offloads:?}, reference {opts:?}");
    let topo = Topology::build_with(TopologyOptions {
        line: Some(line),
        offloads,
    })
    .expect("build topology");
    let config = ShaperConfig::gp_surgery(&line);
    let secs = std::env::var("SHAPER_TEST_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let scenario = Scenario {
        duration: Duration::from_secs(secs),
        ..Default::default()
    };
    let before = topo.gw_qdiscs().expect("qdiscs");

    let unshaped = scenario.run(&topo).expect("no-shaper phase");
    reference::apply_with(&topo.gw, &config, opts).expect("reference shaper");
    let shaped = scenario.run(&topo);
    let classes = topo
        .gw
        .run("tc", &["-s", "class", "show", "dev", "wan0"])
        .unwrap_or_default();
    reference::remove(&topo.gw, &config).expect("remove reference shaper");
    let shaped = shaped.expect("reference-shaper phase");

    eprintln!(
        "\n{}",
        table(&[("no shaper", &unshaped), ("tc reference", &shaped)])
    );
    eprintln!("wan0 classes during the shaped run:\n{classes}");
    assert_eq!(topo.gw_qdiscs().expect("qdiscs"), before);
    let fails = shaping_failures(&line, &config, &unshaped, &shaped);
    assert!(
        fails.is_empty(),
        "reference shaper misses the criteria:\n- {}",
        fails.join("\n- ")
    );
}
