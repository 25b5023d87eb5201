//! The user side of the shaper: configuration, compilation of policy into
//! kernel state, the kernel interfaces (netlink tc, BPF), apply/remove and
//! status. The `shaper` binary (main.rs) is a thin CLI over this.

// The pure policy core (config, catalogue, compile, parsers, host-name engine, explain),
// re-exported so `shaper_user::config` and `crate::config` keep naming it.
pub use shaper_core::{
    catalogue, compile, config, dir, dnswire, explain, hosts, media, quic, rundir, sni, units,
};

pub mod apply;
pub mod autorate;
pub mod calls_task;
pub mod caps;
pub mod confirm;
pub mod daemon;
pub mod hosts_task;
pub mod ingress;
pub mod kernel;
pub mod lineprobe;
pub mod metrics;
pub mod persist;
pub mod rates;
pub mod site;
pub mod status;
pub mod upgrade;
pub mod wclamp;
