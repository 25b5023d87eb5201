//! Hostile and careless input against the box (issue 14), in real namespaces: one test
//! binary, a module per area. Each case shows what an attacker or a second command does,
//! and that the shaping holds; each failed on the code before its fix.
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

mod flows;
mod metrics_port;
mod names;
mod ownership;
