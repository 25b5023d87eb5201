//! The shaper's pure policy core: what a config says and what it compiles to, and the
//! parsers of untrusted wire data. No aya, tokio or netlink here (nothing touches the
//! kernel): the `shaper-user` crate applies what this compiles, and the fuzz targets
//! (`shaper-user/fuzz`) and the lab link this crate without building the eBPF object.
//!
//! - [`units`], [`diag`], [`dir`], [`rule`]: the leaves: values (rates, DSCP, ports,
//!   prefixes), errors naming file, line and field, direction and per-direction values,
//!   rules and their match fields.
//! - [`catalogue`]: the built-in clinical application catalogue and the `[[app]]`
//!   format; [`config`]: the config file and its validation (uses the catalogue; the
//!   catalogue never uses it).
//! - [`compile`]: policy to class trees, classifier maps and the reference matcher.
//! - [`dnswire`], [`sni`], [`quic`]: DNS messages, TLS ClientHellos, QUIC Initials.
//! - [`hosts`]: the host-name engine (what `shaper run` learns from DNS, TLS and QUIC),
//!   against a kernel seen through a trait.
//! - [`explain`]: why a packet (described, or from a pcap) goes where it goes.
//! - [`media`]: per-call media quality (RTP streams, calls, E-model, the report).
//! - [`rundir`]: the files of the run directory, their names and format versions.

/// A captured packet under `tests/fixtures/` (for unit tests), as a byte slice.
#[cfg(test)]
macro_rules! fixture {
    ($f:literal) => {
        include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/",
            $f
        ))
        .as_slice()
    };
}

pub mod catalogue;
pub mod compile;
pub mod config;
pub mod diag;
pub mod dir;
pub mod dnswire;
pub mod explain;
pub mod hosts;
pub mod media;
pub mod quic;
pub mod rule;
pub mod rundir;
pub mod sni;
pub mod units;

#[cfg(test)]
mod testkit;

#[cfg(test)]
mod tests {
    /// The core stays pure: nothing here may reach the kernel, so the fuzz targets and
    /// the lab can link it without the eBPF toolchain.
    #[test]
    fn depends_on_no_kernel_or_runtime_crate() {
        let manifest = include_str!("../Cargo.toml");
        let deps = manifest
            .split("[dependencies]")
            .nth(1)
            .expect("a [dependencies] table");
        for line in deps.lines().map(str::trim) {
            let name = line.split(['=', '.', ' ']).next().unwrap_or("");
            for banned in ["aya", "tokio", "netlink", "rtnetlink", "futures"] {
                assert!(
                    !name.starts_with(banned),
                    "shaper-core must not depend on {name}"
                );
            }
        }
        // shaper-common's `user` feature brings aya.
        assert!(!deps.contains("\"user\""), "shaper-common without `user`");
    }
}
