//! Host-tier integration test harness for the traffic shaper.
//!
//! Builds a four-namespace lab (lan host, gateway, modem emulating a copper line with TBF,
//! internet server; with a base RTT, a fifth namespace holding a delay line between the
//! modem and the server), drives real traffic through it (iperf3 bulk and image transfers,
//! a video-like UDP call and web-like churn written here), and runs the product binary in
//! the gateway namespace.
//! Everything it creates is uniquely named per process and removed by `Drop` guards, also
//! when a test panics.
//!
//! The tests in `tests/` need root and iperf3, nsenter, tc, ip and ss; without them they print
//! `SKIP: <reason>` and return. Run them serially:
//! `cargo test -p shaper-tests -- --test-threads=1`.

pub mod appliance;
pub mod churn;
pub mod config;
pub mod crash;
pub mod delayline;
pub mod dicom;
pub mod dns;
pub mod flood;
pub mod gateway;
pub mod hostlab;
pub mod iperf;
pub mod matrix;
pub mod netns;
pub mod packet;
pub mod phases;
pub mod probe;
pub mod reference;
pub mod report;
pub mod rig;
pub mod rng;
pub mod rtp;
pub mod scenario;
pub mod shaper;
pub mod stats;
pub mod topology;
pub mod upgrade;
pub mod util;
pub mod verdict;
pub mod video;
pub mod vm;

pub use config::{Class, Rule, ShaperConfig};
pub use delayline::{DelayConfig, DelayLine, DelayLineStats, DirectionStats};
pub use netns::Netns;
pub use scenario::{table, Results, Scenario};
pub use shaper::{CmdOutput, Shaper};
pub use topology::{Line, Offloads, PathDelay, Topology, TopologyOptions};
pub use util::TempDir;
pub use video::{DelayStats, VideoCall};

/// Tools every traffic test needs on PATH.
pub const TRAFFIC_TOOLS: &[&str] = &["ip", "tc", "nsenter", "ss", "iperf3", "sysctl"];
/// Tools a test that only builds the topology needs.
pub const TOPOLOGY_TOOLS: &[&str] = &["ip", "tc", "nsenter", "sysctl"];
