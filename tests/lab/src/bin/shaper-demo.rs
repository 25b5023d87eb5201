//! `cargo xtask demo`: a GP surgery's FTTC 40/10 line in network namespaces, the busy
//! hour on it (Windows-update-like downloads, a backup uploading, a study going to PACS on
//! TCP 104, and a video consultation), first without the shaper, then with it, then with it
//! removed again. Prints what it does and the before/after table.

use std::time::Duration;

use shaper_tests::phases::{self, Phases};
use shaper_tests::topology::PathDelay;
use shaper_tests::{Line, Scenario, ShaperConfig};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let secs = shaper_tests::util::arg_value(&args, "--seconds")
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let line = Line::FTTC_40_10;
    let config = ShaperConfig::gp_surgery(&line);
    println!("Simulated line: FTTC {}/{} Mbit/s with a {} ms modem buffer and 20 ms to the internet server and back",
        line.down_bps / 1_000_000, line.up_bps / 1_000_000, line.buffer_ms);
    println!("(namespaces lan <-> gateway <-> modem <-> delay line <-> internet).");
    println!("Traffic in each phase ({secs} s, all starting together, TCP as the kernel tunes it): 4 bulk downloads,");
    println!(
        "4 bulk uploads, one image upload to TCP 104, web browsing (short downloads, 5 a second),"
    );
    println!("and a video call (1000-byte UDP packets, 50 per second each way, ports 50020) measured for one-way delay");
    println!("(the 10 ms each way of the path included).\n");
    println!(
        "Shaper config applied on the gateway:\n{}",
        config.to_toml()
    );
    let scenario = Scenario {
        idle: None,
        ..Scenario::internet(secs)
    };
    let path = PathDelay::new(Duration::from_millis(20), Duration::ZERO);
    let report =
        phases::run_with_path(line, Some(path), config, scenario, Phases::CompareAndRemove)?;
    if let Some(s) = &report.status_after_shaped {
        println!("`shaper status` after the shaped phase:\n{s}");
    }
    println!("{}", report.table());
    for p in &report.problems {
        println!("problem: {p}");
    }
    if !report.problems.is_empty() {
        anyhow::bail!("the demo hit {} problem(s)", report.problems.len());
    }
    Ok(())
}
