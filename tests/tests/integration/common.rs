//! What more than one area of the integration tests uses: the root check of the tests that
//! load the classifier without a topology, the status JSON's direction indexes, names
//! several areas' policies and traffic share, and the policies `lifecycle`, `lock` and
//! `metrics` share.

use shaper_tests::config::{Config, Rule};

/// Index of the upload direction in `shaper status --json`'s `directions`.
pub const UPLOAD: usize = 0;
/// Index of the download direction.
pub const DOWNLOAD: usize = 1;

/// The UDP port LAN hosts' "media" goes to (no rule names it).
pub const MEDIA_PORT: u16 = 40_000;
/// The TLS server name the PACS rules name.
pub const PACS_NAME: &str = "pacs.example.nhs.uk";
/// What `apps = ["accurx-video"]` under rule `clinical-video` expands to.
pub const ACCURX_RULE: &str = "clinical-video/accurx-video#dns";

/// What the TLS tests need on PATH.
pub const TLS_TOOLS: &[&str] = &["ip", "tc", "nsenter", "sysctl", "ss", "openssl", "timeout"];

/// Whether the tests that load the classifier (BPF_PROG_TEST_RUN in a namespace of their
/// own, no topology or tools) can run: root. If not, notes the skip; the caller returns.
pub fn root_or_skip() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        shaper_tests::util::note_skip("needs root (BPF program load, network namespace)");
        return false;
    }
    true
}

/// wan0/lan0 at `upload_bps` up and 40 Mbit/s down, the classes (name, priority,
/// guaranteed %, default) in this order, and a rule `video` putting UDP to 50000-50059 in
/// class `video`.
pub fn video_rule_policy(upload_bps: u64, classes: &[(&str, u8, u32, bool)]) -> Config {
    let mut c = Config::new(upload_bps, 40_000_000);
    for &(name, priority, pct, default) in classes {
        c = if default {
            c.default_class(name, priority, pct)
        } else {
            c.class(name, priority, pct)
        };
    }
    c.rule(
        Rule::new("video", "video")
            .protocol("udp")
            .dst_ports(&["50000-50059"]),
    )
}

/// Policy A of `lifecycle` and `lock`: 10 Mbit/s up, classes video, images, default (HTB
/// classes 1:10, 1:11, 1:2).
pub fn policy_a() -> Config {
    video_rule_policy(
        10_000_000,
        &[
            ("video", 0, 20, false),
            ("images", 2, 30, false),
            ("default", 4, 20, true),
        ],
    )
}

/// Policy B of `lifecycle` and `lock`: classes video, default, bulk (1:10, 1:2, 1:12: another
/// class set than A's, other guarantees), `upload_bps` up.
pub fn policy_b(upload_bps: u64) -> Config {
    video_rule_policy(
        upload_bps,
        &[
            ("video", 0, 25, false),
            ("default", 4, 20, true),
            ("bulk", 7, 5, false),
        ],
    )
}
