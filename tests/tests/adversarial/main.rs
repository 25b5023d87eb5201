//! Hostile and careless input against the box (issue 14), in real namespaces: one test
//! binary, a module per area. Each case shows what an attacker or a second command does,
//! and that the shaping holds; each failed on the code before its fix.
//!
//! - `ownership`: one owner of the kernel state (a second daemon, a CLI apply beside the
//!   daemon, removed pins, a spoiled state file, unchanged reloads and restarts), and
//!   autorate's probes answered by someone else.

mod ownership;
