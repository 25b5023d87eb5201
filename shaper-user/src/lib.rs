//! The user side of the shaper: configuration, compilation of policy into
//! kernel state, the kernel interfaces (netlink tc, BPF), apply/remove and
//! status. The `shaper` binary (main.rs) is a thin CLI over this.

/// A captured packet under `tests/fixtures/` (for unit tests), as a byte slice.
#[cfg(test)]
macro_rules! fixture {
    ($f:literal) => {
        include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/",
            $f
        ))
        .as_slice()
    };
}

pub mod apply;
pub mod autorate;
pub mod caps;
pub mod catalogue;
pub mod compile;
pub mod config;
pub mod confirm;
pub mod daemon;
pub mod dnswire;
pub mod explain;
pub mod hosts;
pub mod hosts_task;
pub mod ingress;
pub mod kernel;
pub mod lineprobe;
pub mod metrics;
pub mod persist;
pub mod quic;
pub mod rates;
pub mod site;
pub mod sni;
pub mod status;
pub mod upgrade;
pub mod wclamp;
