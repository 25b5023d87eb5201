//! Hostile and careless input against the box (issue 14), in real namespaces: a submodule
//! per area, and the policies they share. Each case shows what an attacker or a second
//! command does, and that the shaping holds; each failed on the code before its fix.
//!
//! - `ownership`: one owner of the kernel state (a second daemon, a CLI apply beside the
//!   daemon, removed pins, a spoiled state file, unchanged reloads and restarts), and
//!   autorate's probes answered by someone else.
//! - `flows`: priority not bought by a server name (a named bulk transfer is demoted), by
//!   changing DSCP on every packet (still one flow, demoted), or by many media-like flows
//!   (promotion capped per class in total).
//! - `names`: the host-name engine under hostile input: a flood of answers leaves the
//!   watchdog, `/metrics` and SIGTERM on time; forged answers (hairpinned from the LAN,
//!   unsolicited from the WAN, IPv6, from the wrong server) are not learned; long-lived
//!   forgeries do not push out a real answer; a flood of QUIC Initials does not hide one.
//! - `metrics_port`: the metrics port closed from the WAN side (on the LAN address too),
//!   a scrape answered beside 16 slow connections from one LAN host, error answers that
//!   name no file.

use shaper_tests::config::{Config, Rule};

mod flows;
mod metrics_port;
mod names;
mod ownership;

/// 20 Mbit/s both ways: video (priority 0, `video_pct` %) and the default class (4, 20 %).
fn video_and_default(video_pct: u32) -> Config {
    Config::new(20_000_000, 20_000_000)
        .class("video", 0, video_pct)
        .default_class("default", 4, 20)
}

/// [`video_and_default`] with video by name: rule `clinical-video`, accuRx from the
/// catalogue (`*.sfu.whereby.com`; it expands to [`crate::common::ACCURX_RULE`]).
fn accurx_video(video_pct: u32) -> Config {
    video_and_default(video_pct).rule(Rule::new("clinical-video", "video").apps(&["accurx-video"]))
}
