//! The acceptance criteria of the shaping test, as a function so the same figures can be
//! checked against the product and against the harness's reference shaper.

use crate::config::ShaperConfig;
use crate::scenario::Results;
use crate::topology::Line;
use crate::util::fmt_bps;

/// Minimum factor by which the shaper must cut video p99 one-way delay, each direction.
pub const MIN_P99_IMPROVEMENT: f64 = 10.0;
/// Maximum video loss with the shaper, percent.
pub const MAX_VIDEO_LOSS_PCT: f64 = 1.0;
/// The image class must get at least this fraction of its guaranteed upload rate.
pub const MIN_IMAGE_FRACTION_OF_GUARANTEE: f64 = 0.80;
/// Download goodput must be at least this fraction of the line rate. The shaper at 92 % of
/// the line leaves at most 92 % x 1448/1514 = 88 % of it as TCP payload, less the video's
/// and the ACKs' share: 85 % had no margin (a CI run on 2026-12-04 measured 34.00 Mbit/s of
/// 40, exactly on it, with the line used to 98.7 % of the shaper's rate).
pub const MIN_TOTAL_FRACTION_OF_LINE: f64 = 0.82;
/// Upload goodput floor. The line carries 1448 bytes of payload per 1514-byte frame
/// (95.6 %) and, with four downloads running, ~1 Mbit/s of their ACKs: 8.2 Mbit/s of
/// goodput on a 10 Mbit/s line was the most measured even with the shaper at 98 %.
pub const MIN_UP_GOODPUT_FRACTION: f64 = 0.72;
/// What the modem puts on the line, as a fraction of its rate, each direction.
pub const MIN_LINE_UTILISATION: f64 = 0.85;

/// `small <= big`, false when either is NaN (a missing figure fails its criterion).
fn holds(small: f64, big: f64) -> bool {
    small.partial_cmp(&big).is_some_and(|o| o.is_le())
}

/// Every criterion that `shaped` fails against `unshaped`; empty when all pass.
pub fn shaping_failures(
    line: &Line,
    config: &ShaperConfig,
    unshaped: &Results,
    shaped: &Results,
) -> Vec<String> {
    let mut fails = Vec::new();
    for (dir, before, after) in [
        ("up", &unshaped.video_up, &shaped.video_up),
        ("down", &unshaped.video_down, &shaped.video_down),
    ] {
        if !holds(after.p99_ms * MIN_P99_IMPROVEMENT, before.p99_ms) {
            fails.push(format!(
                "video {dir} p99 {:.2} ms with the shaper is not {MIN_P99_IMPROVEMENT}x below {:.2} ms without",
                after.p99_ms, before.p99_ms
            ));
        }
        if !(holds(after.loss_pct, MAX_VIDEO_LOSS_PCT) && after.loss_pct != MAX_VIDEO_LOSS_PCT) {
            fails.push(format!(
                "video {dir} loss {:.2} % with the shaper (max {MAX_VIDEO_LOSS_PCT} %)",
                after.loss_pct
            ));
        }
    }
    let guaranteed = config.upload_guaranteed_bps("images").unwrap_or(0.0);
    if !holds(
        MIN_IMAGE_FRACTION_OF_GUARANTEE * guaranteed,
        shaped.image_up_bps,
    ) {
        fails.push(format!(
            "image upload {} is below {:.0} % of the images class guarantee {}",
            fmt_bps(shaped.image_up_bps),
            MIN_IMAGE_FRACTION_OF_GUARANTEE * 100.0,
            fmt_bps(guaranteed)
        ));
    }
    // The copper must stay busy: what the modem put on the line, each direction.
    for (dir, got, rate) in [
        ("up", shaped.line_up_bps, line.up_bps),
        ("down", shaped.line_down_bps, line.down_bps),
    ] {
        if !holds(MIN_LINE_UTILISATION * rate as f64, got) {
            fails.push(format!(
                "line use {dir} {} is below {:.0} % of the {} line",
                fmt_bps(got),
                MIN_LINE_UTILISATION * 100.0,
                fmt_bps(rate as f64)
            ));
        }
    }
    // Application goodput downstream (upstream, 1514-byte frames carrying 1448 bytes
    // and the downloads' ACKs cap goodput below 85 % of the line even unshaped).
    if !holds(
        MIN_TOTAL_FRACTION_OF_LINE * line.down_bps as f64,
        shaped.total_down_bps,
    ) {
        fails.push(format!(
            "total down goodput {} is below {:.0} % of the {} line",
            fmt_bps(shaped.total_down_bps),
            MIN_TOTAL_FRACTION_OF_LINE * 100.0,
            fmt_bps(line.down_bps as f64)
        ));
    }
    if !holds(
        MIN_UP_GOODPUT_FRACTION * line.up_bps as f64,
        shaped.total_up_bps,
    ) {
        fails.push(format!(
            "total up goodput {} is below {:.0} % of the {} line",
            fmt_bps(shaped.total_up_bps),
            MIN_UP_GOODPUT_FRACTION * 100.0,
            fmt_bps(line.up_bps as f64)
        ));
    }
    fails
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::video::DelayStats;

    fn results(p99: f64, loss: f64, image: f64, up: f64, down: f64) -> Results {
        let v = DelayStats {
            p99_ms: p99,
            loss_pct: loss,
            ..Default::default()
        };
        Results {
            video_up: v.clone(),
            video_down: v,
            image_up_bps: image,
            total_up_bps: up,
            total_down_bps: down,
            line_up_bps: 9.5e6,
            line_down_bps: 37e6,
            ..Default::default()
        }
    }

    #[test]
    fn passes_and_fails_on_the_right_figures() {
        let line = Line::FTTC_40_10;
        let cfg = ShaperConfig::gp_surgery(&line);
        let before = results(400.0, 5.0, 1e6, 9.6e6, 30e6);
        let good = results(2.0, 0.0, 6e6, 8.2e6, 34.2e6);
        assert!(shaping_failures(&line, &cfg, &before, &good).is_empty());
        // The copper left idle upstream fails.
        let mut idle = good.clone();
        idle.line_up_bps = 8.0e6;
        let f = shaping_failures(&line, &cfg, &before, &idle);
        assert_eq!(f.len(), 1, "{f:?}");
        // Upload goodput under its floor, download goodput under 82 % (32.8 of 40 Mbit/s):
        // two failures.
        let f = shaping_failures(&line, &cfg, &before, &results(2.0, 0.0, 6e6, 7.0e6, 32.5e6));
        assert_eq!(f.len(), 2, "{f:?}");
        // p99 only 5x better fails.
        let f = shaping_failures(
            &line,
            &cfg,
            &before,
            &results(80.0, 0.0, 6e6, 8.2e6, 34.2e6),
        );
        assert_eq!(f.len(), 2, "{f:?}");
        // A missing figure (NaN: no packet arrived) fails.
        let f = shaping_failures(
            &line,
            &cfg,
            &before,
            &results(f64::NAN, 1.0, 2e6, 8.2e6, 34.2e6),
        );
        assert_eq!(f.len(), 5, "{f:?}"); // 2 x p99, 2 x loss at exactly 1 %, image
    }
}
