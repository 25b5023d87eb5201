//! The user side of the shaper: configuration, compilation of policy into
//! kernel state, the kernel interfaces (netlink tc, BPF), apply/remove and
//! status. The `shaper` binary (main.rs) is a thin CLI over this.
pub mod apply;
pub mod autorate;
pub mod catalogue;
pub mod compile;
pub mod config;
pub mod confirm;
pub mod daemon;
pub mod dnswire;
pub mod explain;
pub mod hosts;
pub mod ingress;
pub mod kernel;
pub mod metrics;
pub mod quic;
pub mod sni;
pub mod status;
