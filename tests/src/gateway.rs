//! Small helpers the gateway tests share: writing a config, counting the TCX programs on
//! an interface, waiting for a condition.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aya::programs::{tc::TcAttachType, SchedClassifier};

use crate::Netns;

/// Writes `text` to `dir/name` and returns the path.
pub fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write config");
    p
}

/// TCX egress programs attached to `dev` in namespace `ns`.
pub fn tcx_programs(ns: &Netns, dev: &'static str) -> usize {
    ns.within(move || {
        let (_, progs) = SchedClassifier::query_tcx(dev, TcAttachType::Egress)?;
        Ok(progs.len())
    })
    .expect("query tcx")
}

/// Polls `f` every 20 ms until it holds; panics after `timeout`. Returns the wait.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    t0.elapsed()
}
