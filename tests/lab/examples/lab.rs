//! Builds the lab topology (FTTC 40/10, 400 ms buffer) and keeps it up for manual poking:
//! `cargo run -p shaper-tests --example lab -- [SECONDS] [offloads-on]`. Prints the namespace
//! names; use `nsenter --net=/run/netns/NAME ...` in another shell. The namespaces are removed
//! when SECONDS have passed; a signal kills it without cleanup (then `ip netns del` them).

use std::time::Duration;

use shaper_tests::{Line, Offloads, Topology, TopologyOptions};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let secs: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(300);
    let offloads = if args.iter().any(|a| a == "offloads-on") {
        Offloads::KernelDefault
    } else {
        Offloads::Off
    };
    let topo = Topology::build_with(TopologyOptions {
        line: Some(Line::FTTC_40_10),
        offloads,
        ..Default::default()
    })?;
    for (role, ns) in [
        ("lan", &topo.lan),
        ("gw", &topo.gw),
        ("modem", &topo.modem),
        ("srv", &topo.srv),
    ] {
        println!("{role}={}", ns.name());
    }
    std::thread::sleep(Duration::from_secs(secs));
    Ok(())
}
