//! The host-tier integration tests: one test binary, a module per area (as aya's
//! `test/integration-test`), the helpers more than one area uses in `common`. Test names are
//! `module::test` (`classify::packets_land_in_their_classes`); a module's name filters its
//! tests: `cargo test -p shaper-tests --test integration -- --test-threads=1 lifecycle::`.
//!
//! Most need root and tools (see tests/README.md); without them a test prints
//! `SKIP: <reason>`, notes it in `SHAPER_SKIP_LOG` and returns. Policies come from
//! `shaper_tests::config::Config` or from `tests/fixtures/policies/`; TOML is written by
//! hand only where a test is about the text.
//!
//! - No root: `bad_configs`, `systemd` (unit checks).
//! - The classifier under BPF_PROG_TEST_RUN, no topology: `classify`, `explain_agrees`,
//!   `media_kernel`.
//! - A gateway namespace or the four-namespace lab, the product's CLI and daemon:
//!   `check_rejects`, `lifecycle`, `lock`, `reload`, `daemon`, `metrics`, `hosts`, `site`,
//!   `systemd` (the Debian package), `adversarial` (hostile input, a module per area).
//! - Real media (ffmpeg RTP/SRTP) through a router namespace that drops some, measured from a
//!   capture and by `shaper run` on the router: `calls`.
//! - Traffic through the lab, minutes each: `topology`, `shaping`, `download`, `framing`.

mod common;

mod adversarial;
mod bad_configs;
mod calls;
mod check_rejects;
mod classify;
mod daemon;
mod download;
mod explain_agrees;
mod framing;
mod hosts;
mod lifecycle;
mod lock;
mod media_kernel;
mod metrics;
mod reload;
mod shaping;
mod site;
mod systemd;
mod topology;
