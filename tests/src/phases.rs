//! The busy-hour scenario in phases on one topology: no shaper, the product applied,
//! the product removed. Shared by the acceptance test, the demo and the benchmark.

use std::path::PathBuf;

use crate::{table, Line, Results, Scenario, Shaper, ShaperConfig, TempDir, Topology};

/// Which phases to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phases {
    /// No shaper, then shaper on.
    Compare,
    /// No shaper, shaper on, shaper removed.
    CompareAndRemove,
}

/// Everything a phased run produced; `problems` lists what went wrong (empty when fine).
pub struct PhaseReport {
    pub line: Line,
    pub config: ShaperConfig,
    pub config_path: PathBuf,
    pub scenario: Scenario,
    pub phases: Vec<(&'static str, Results)>,
    pub problems: Vec<String>,
    /// `shaper status` (table) right after the shaped phase.
    pub status_after_shaped: Option<String>,
    pub qdiscs_before: String,
    pub qdiscs_after_remove: Option<String>,
}

impl PhaseReport {
    pub fn get(&self, name: &str) -> Option<&Results> {
        self.phases.iter().find(|(n, _)| *n == name).map(|(_, r)| r)
    }

    /// The side-by-side table with a heading naming the line and shaper rates.
    pub fn table(&self) -> String {
        let cols: Vec<(&str, &Results)> = self.phases.iter().map(|(n, r)| (*n, r)).collect();
        format!(
            "line: {}/{} Mbit/s down/up, {} ms modem buffer; shaper {} up / {} down; {:?} per phase\n{}",
            self.line.down_bps as f64 / 1e6,
            self.line.up_bps as f64 / 1e6,
            self.line.buffer_ms,
            crate::config::format_rate(self.config.upload_bps),
            crate::config::format_rate(self.config.download_bps),
            self.scenario.duration,
            table(&cols)
        )
    }
}

/// Builds the topology for `line` and runs `scenario` in the requested phases with the
/// product applied from `config`. Never panics on a failed phase: see `problems`.
pub fn run(
    line: Line,
    config: ShaperConfig,
    scenario: Scenario,
    which: Phases,
) -> anyhow::Result<PhaseReport> {
    run_with_path(line, None, config, scenario, which)
}

/// [`run`] with a base RTT between the modem and the server (the delay line).
pub fn run_with_path(
    line: Line,
    path: Option<crate::topology::PathDelay>,
    config: ShaperConfig,
    scenario: Scenario,
    which: Phases,
) -> anyhow::Result<PhaseReport> {
    let topo = Topology::build_with(crate::TopologyOptions {
        line: Some(line),
        offloads: crate::Offloads::from_env(),
        path,
    })?;
    let dir = TempDir::new("phases")?;
    let config_path = config.write(dir.path(), "shaper.toml")?;
    let mut shaper = Shaper::new(&topo.gw)?;
    let qdiscs_before = topo.gw_qdiscs()?;
    let mut report = PhaseReport {
        line,
        config,
        config_path: config_path.clone(),
        scenario: scenario.clone(),
        phases: Vec::new(),
        problems: Vec::new(),
        status_after_shaped: None,
        qdiscs_before: qdiscs_before.clone(),
        qdiscs_after_remove: None,
    };

    match scenario.run(&topo) {
        Ok(r) => report.phases.push(("no shaper", r)),
        Err(e) => report.problems.push(format!("no-shaper phase: {e:#}")),
    }
    match shaper.apply(&config_path) {
        Ok(_) => {
            match scenario.run(&topo) {
                Ok(r) => report.phases.push(("shaper on", r)),
                Err(e) => report.problems.push(format!("shaper phase: {e:#}")),
            }
            match shaper.command(&["status", "--interval", "0"]).output() {
                Ok(o) => {
                    report.status_after_shaped =
                        Some(String::from_utf8_lossy(&o.stdout).into_owned())
                }
                Err(e) => report.problems.push(format!("status: {e}")),
            }
            if let Err(e) = shaper.status_json() {
                report.problems.push(format!("status --json: {e:#}"));
            }
        }
        Err(e) => report.problems.push(format!("apply: {e:#}")),
    }
    match shaper.remove() {
        Ok(_) => {}
        Err(e) => report.problems.push(format!("remove: {e:#}")),
    }
    let after = topo.gw_qdiscs()?;
    if after != qdiscs_before {
        report.problems.push(format!(
            "gw qdiscs after remove differ from before apply:\n--- before\n{qdiscs_before}--- after\n{after}"
        ));
    }
    report.qdiscs_after_remove = Some(after);
    let leftover = shaper.leftover_pins();
    if !leftover.is_empty() {
        report
            .problems
            .push(format!("pins left after remove: {leftover:?}"));
    }
    if which == Phases::CompareAndRemove {
        match scenario.run(&topo) {
            Ok(r) => report.phases.push(("removed", r)),
            Err(e) => report.problems.push(format!("removed phase: {e:#}")),
        }
    }
    Ok(report)
}
