//! Report helpers for the measurement tiers: the E-model (voice/video call quality from
//! delay and loss), empirical-CDF plots as self-contained SVG, aligned text tables, and the
//! summary of an `irtt client -o` JSON file.

use std::fmt::Write as _;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::stats::nearest_rank;

/// ITU-T G.107 E-model transmission rating R, in the simplified form of Cole & Rosenbluth
/// (2001) with all other impairments at their defaults:
/// `R = 93.2 - Id - Ie_eff`, `Id = 0.024 d + 0.11 (d - 177.3) H(d - 177.3)`,
/// `Ie_eff = Ie + (95 - Ie) * Ppl / (Ppl + Bpl)` (random loss, BurstR = 1).
///
/// `one_way_delay_ms`: mouth-to-ear delay d; `loss_pct`: packet loss Ppl in percent; `ie`:
/// the codec's equipment impairment factor (G.113 App. I; 0 for G.711); `bpl`: the codec's
/// packet-loss robustness factor (G.711 with PLC: 25.1, without: 4.3).
pub fn emodel_r(one_way_delay_ms: f64, loss_pct: f64, ie: f64, bpl: f64) -> f64 {
    let d = one_way_delay_ms.max(0.0);
    let id = 0.024 * d + if d > 177.3 { 0.11 * (d - 177.3) } else { 0.0 };
    let ppl = loss_pct.max(0.0);
    let ie_eff = if ppl + bpl > 0.0 {
        ie + (95.0 - ie) * ppl / (ppl + bpl)
    } else {
        ie
    };
    93.2 - id - ie_eff
}

/// G.107 Annex B: the MOS (conversational quality, CQE) for a rating R.
pub fn mos(r: f64) -> f64 {
    if r < 0.0 {
        1.0
    } else if r > 100.0 {
        4.5
    } else {
        1.0 + 0.035 * r + 7e-6 * r * (r - 60.0) * (100.0 - r)
    }
}

fn xml_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            c if (c as u32) < 0x20 && c != '\t' && c != '\n' => o.push(' '),
            c => o.push(c),
        }
    }
    o
}

/// A "nice" tick step (1, 2 or 5 times a power of ten) giving at most about `max_ticks`
/// intervals over `span`.
fn nice_step(span: f64, max_ticks: usize) -> f64 {
    let raw = span / max_ticks as f64;
    let mag = 10f64.powf(raw.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if m * mag >= raw {
            return m * mag;
        }
    }
    10.0 * mag
}

/// Formats a number compactly: integers without decimals, otherwise up to 3 significant
/// decimals as needed by `step`.
fn fmt_num(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10().floor()) as usize
    };
    format!("{v:.decimals$}")
}

const PALETTE: [&str; 10] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

/// An 800x500 self-contained SVG of the empirical CDFs of `series` (name, values): one
/// coloured step polyline each, x axis from 0 to the largest of the series' 99.9th
/// percentiles (rounded up to a tick; values beyond are clipped and the title says "x
/// clipped at ..."), y axis 0..1, grid, ticks, axis labels and a legend with each series'
/// n, p50 and p99. Non-finite values are dropped; an empty series is listed in the legend
/// as "(no data)".
pub fn cdf_svg(title: &str, x_label: &str, series: &[(&str, &[f64])]) -> String {
    const W: f64 = 800.0;
    const H: f64 = 500.0;
    const L: f64 = 70.0; // plot area left
    const R: f64 = 575.0; // plot area right
    const T: f64 = 45.0; // plot area top
    const B: f64 = 440.0; // plot area bottom

    let sorted: Vec<Vec<f64>> = series
        .iter()
        .map(|(_, v)| {
            let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
            v.sort_by(f64::total_cmp);
            v
        })
        .collect();
    let p999 = sorted
        .iter()
        .filter_map(|v| nearest_rank(v, 99.9))
        .fold(0.0f64, f64::max);
    let (x_max, step) = if p999 > 0.0 {
        let step = nice_step(p999, 8);
        let x_max = (p999 / step - 1e-9).ceil().max(1.0) * step;
        (x_max, step)
    } else {
        (1.0, 0.1)
    };
    let clipped = sorted
        .iter()
        .any(|v| v.last().is_some_and(|&m| m > x_max) || v.first().is_some_and(|&m| m < 0.0));
    let px = |x: f64| L + (x.clamp(0.0, x_max) / x_max) * (R - L);
    let py = |y: f64| B - y * (B - T);

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="Helvetica, Arial, sans-serif" font-size="12">
<rect x="0" y="0" width="{W}" height="{H}" fill="white"/>"#
    );
    let full_title = if clipped {
        format!("{title} (x clipped at {})", fmt_num(x_max, step))
    } else {
        title.to_string()
    };
    let _ = writeln!(
        s,
        r#"<text x="{}" y="25" text-anchor="middle" font-size="16" font-weight="bold">{}</text>"#,
        (L + R) / 2.0,
        xml_escape(&full_title)
    );

    // Grid and ticks.
    let _ = writeln!(s, r##"<g stroke="#e0e0e0" stroke-width="1">"##);
    let n_x = (x_max / step).round() as usize;
    for i in 0..=n_x {
        let x = px(i as f64 * step);
        let _ = writeln!(s, r#"<line x1="{x:.1}" y1="{T}" x2="{x:.1}" y2="{B}"/>"#);
    }
    for i in 0..=10 {
        let y = py(i as f64 / 10.0);
        let _ = writeln!(s, r#"<line x1="{L}" y1="{y:.1}" x2="{R}" y2="{y:.1}"/>"#);
    }
    let _ = writeln!(s, "</g>");
    let _ = writeln!(
        s,
        r##"<rect x="{L}" y="{T}" width="{}" height="{}" fill="none" stroke="#333" stroke-width="1"/>"##,
        R - L,
        B - T
    );
    let _ = writeln!(s, r##"<g stroke="#333" stroke-width="1">"##);
    for i in 0..=n_x {
        let x = px(i as f64 * step);
        let _ = writeln!(
            s,
            r#"<line x1="{x:.1}" y1="{B}" x2="{x:.1}" y2="{}"/>"#,
            B + 5.0
        );
    }
    for i in 0..=10 {
        let y = py(i as f64 / 10.0);
        let _ = writeln!(
            s,
            r#"<line x1="{}" y1="{y:.1}" x2="{L}" y2="{y:.1}"/>"#,
            L - 5.0
        );
    }
    let _ = writeln!(s, "</g>");
    let _ = writeln!(s, r#"<g text-anchor="middle">"#);
    for i in 0..=n_x {
        let v = i as f64 * step;
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{}">{}</text>"#,
            px(v),
            B + 19.0,
            fmt_num(v, step)
        );
    }
    let _ = writeln!(s, "</g>");
    let _ = writeln!(s, r#"<g text-anchor="end">"#);
    for i in 0..=10 {
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{:.1}">{:.1}</text>"#,
            L - 8.0,
            py(i as f64 / 10.0) + 4.0,
            i as f64 / 10.0
        );
    }
    let _ = writeln!(s, "</g>");
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle" font-size="13">{}</text>"#,
        (L + R) / 2.0,
        B + 42.0,
        xml_escape(x_label)
    );
    let _ = writeln!(
        s,
        r#"<text x="20" y="{}" text-anchor="middle" font-size="13" transform="rotate(-90 20 {})">fraction of samples &#8804; x</text>"#,
        (T + B) / 2.0,
        (T + B) / 2.0
    );

    // Curves.
    for (i, v) in sorted.iter().enumerate() {
        if v.is_empty() {
            continue;
        }
        let colour = PALETTE[i % PALETTE.len()];
        let n = v.len() as f64;
        // Step corners: at each distinct value the CDF jumps to (count <= value) / n.
        let mut pts: Vec<(f64, f64)> = vec![(px(v[0]), py(0.0))];
        let mut j = 0;
        while j < v.len() {
            let x = v[j];
            let mut k = j;
            while k < v.len() && v[k] == x {
                k += 1;
            }
            if x > x_max {
                break;
            }
            let xp = px(x);
            pts.push((xp, py(j as f64 / n)));
            pts.push((xp, py(k as f64 / n)));
            j = k;
        }
        // Carry the last level to the right edge (the clip point when values go beyond).
        let last_y = pts.last().map(|p| p.1).unwrap_or(py(0.0));
        pts.push((R, last_y));
        // Thin to visible changes (half a pixel), keeping the staircase shape.
        let mut kept: Vec<(f64, f64)> = Vec::with_capacity(pts.len().min(4096));
        for (idx, &p) in pts.iter().enumerate() {
            let keep = match kept.last() {
                None => true,
                Some(&(lx, ly)) => {
                    idx == pts.len() - 1 || (p.0 - lx).abs() >= 0.5 || (p.1 - ly).abs() >= 0.5
                }
            };
            if keep {
                kept.push(p);
            }
        }
        let mut points = String::new();
        for (x, y) in kept {
            let _ = write!(points, "{x:.1},{y:.1} ");
        }
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" stroke-linejoin="round" points="{}"/>"#,
            points.trim_end()
        );
    }

    // Legend, right of the plot.
    let lx = R + 15.0;
    let mut ly = T + 10.0;
    for (i, ((name, _), v)) in series.iter().zip(&sorted).enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let short: String = if name.chars().count() > 26 {
            name.chars().take(25).chain(std::iter::once('…')).collect()
        } else {
            name.to_string()
        };
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{colour}" stroke-width="3"/>"#,
            lx + 22.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}">{}</text>"#,
            lx + 28.0,
            ly + 4.0,
            xml_escape(&short)
        );
        let detail = match (nearest_rank(v, 50.0), nearest_rank(v, 99.0)) {
            (Some(p50), Some(p99)) => format!(
                "n={} p50={} p99={}",
                v.len(),
                fmt_num(p50, step / 10.0),
                fmt_num(p99, step / 10.0)
            ),
            _ => "(no data)".to_string(),
        };
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{}" font-size="10" fill="#555">{}</text>"##,
            lx + 28.0,
            ly + 17.0,
            xml_escape(&detail)
        );
        ly += 34.0;
    }
    s.push_str("</svg>\n");
    s
}

/// An aligned plain-text table: header line, a rule of dashes, one line per row; columns
/// separated by " | ", the first left-aligned, the others right-aligned. Rows shorter than
/// the header are padded with empty cells.
pub fn text_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let ncols = headers
        .len()
        .max(rows.iter().map(|r| r.len()).max().unwrap_or(0));
    let cell = |r: &[String], i: usize| r.get(i).cloned().unwrap_or_default();
    let header: Vec<String> = (0..ncols)
        .map(|i| headers.get(i).map(|h| h.to_string()).unwrap_or_default())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, w) in widths.iter_mut().enumerate() {
            *w = (*w).max(cell(r, i).chars().count());
        }
    }
    let line = |cells: &[String]| -> String {
        let parts: Vec<String> = (0..ncols)
            .map(|i| {
                let c = cell(cells, i);
                let pad = widths[i] - c.chars().count();
                if i == 0 {
                    format!("{c}{}", " ".repeat(pad))
                } else {
                    format!("{}{c}", " ".repeat(pad))
                }
            })
            .collect();
        parts.join(" | ").trim_end().to_string()
    };
    let mut out = line(&header);
    out.push('\n');
    let total: usize = widths.iter().sum::<usize>() + 3 * ncols.saturating_sub(1);
    out.push_str(&"-".repeat(total));
    out.push('\n');
    for r in rows {
        out.push_str(&line(r));
        out.push('\n');
    }
    out
}

/// The round-trip summary of one `irtt client -o FILE` run (irtt 0.9, JSON format version
/// 1; times in the file are integer nanoseconds).
#[derive(Debug, Clone, PartialEq)]
pub struct IrttSummary {
    pub rtt_min_ms: f64,
    pub rtt_mean_ms: f64,
    pub rtt_p50_ms: f64,
    pub rtt_p90_ms: f64,
    pub rtt_p99_ms: f64,
    pub rtt_max_ms: f64,
    /// Mean round-trip IPDV (|difference of consecutive RTTs|), ms.
    pub ipdv_mean_ms: f64,
    pub packets_sent: u64,
    pub packets_received: u64,
    /// Round-trip loss, `(sent - received) / sent` in percent (irtt's packet_loss_percent).
    pub loss_pct: f64,
    /// Loss on the way to the server, percent (irtt's upstream_loss_percent).
    pub upstream_loss_pct: f64,
    /// Loss on the way back, percent of what reached the server (downstream_loss_percent).
    pub downstream_loss_pct: f64,
    pub duplicates: u64,
    pub late_packets: u64,
    /// The round-trip times (ms) of the packets that came back, in sequence order (for CDFs).
    pub rtts_ms: Vec<f64>,
}

/// Parses `irtt client -o file.json` output. irtt writes plain JSON only to a name ending in
/// `.json` (or to stdout with `-o -`); a name without an extension gets `.json.gz` added and
/// is gzipped. Percentiles are nearest-rank over `round_trips[].delay.rtt` (ns) of the round
/// trips whose `lost` is `"false"` (the others say `"true"`, `"true_up"` or `"true_down"`;
/// irtt's `stats.rtt` block has only min/mean/median/max); counts and loss come from the
/// `stats` block.
///
/// Verified with irtt 0.9.0 (Debian 12) on loopback:
///
/// ```text
/// irtt server -b 127.0.0.1:2112
/// irtt client -q -i 10ms -d 3s -o /tmp/x.json 127.0.0.1:2112
/// ```
///
/// The fixture `tests/fixtures/irtt/loss-proxy-20.json` is a real run (`-i 100ms -d 2s`)
/// through a UDP proxy that dropped two requests and two replies.
pub fn irtt_summary(json: &str) -> Result<IrttSummary> {
    let v: Value = serde_json::from_str(json).context("irtt output is not JSON")?;
    let stats = v.get("stats").context("irtt output has no \"stats\"")?;
    let u = |k: &str| -> Result<u64> {
        stats
            .get(k)
            .and_then(Value::as_u64)
            .with_context(|| format!("irtt stats.{k} missing or not an integer"))
    };
    let f = |k: &str| -> f64 { stats.get(k).and_then(Value::as_f64).unwrap_or(0.0) };
    let trips = v
        .get("round_trips")
        .and_then(Value::as_array)
        .context("irtt output has no \"round_trips\" array")?;
    let mut rtts_ms = Vec::with_capacity(trips.len());
    for t in trips {
        let lost = match t.get("lost") {
            Some(Value::String(s)) => s != "false",
            Some(Value::Bool(b)) => *b,
            _ => bail!("irtt round trip without \"lost\": {t}"),
        };
        if lost {
            continue;
        }
        let rtt = t
            .get("delay")
            .and_then(|d| d.get("rtt"))
            .and_then(Value::as_i64)
            .with_context(|| format!("irtt round trip without delay.rtt: {t}"))?;
        rtts_ms.push(rtt as f64 / 1e6);
    }
    let mut sorted = rtts_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let pct = |p: f64| nearest_rank(&sorted, p).unwrap_or(0.0);
    let ipdv_mean_ms = stats
        .get("ipdv_round_trip")
        .and_then(|s| s.get("mean"))
        .and_then(Value::as_f64)
        .unwrap_or(0.0)
        / 1e6;
    let rtt_mean_ms = if sorted.is_empty() {
        0.0
    } else {
        sorted.iter().sum::<f64>() / sorted.len() as f64
    };
    Ok(IrttSummary {
        rtt_min_ms: sorted.first().copied().unwrap_or(0.0),
        rtt_mean_ms,
        rtt_p50_ms: pct(50.0),
        rtt_p90_ms: pct(90.0),
        rtt_p99_ms: pct(99.0),
        rtt_max_ms: sorted.last().copied().unwrap_or(0.0),
        ipdv_mean_ms,
        packets_sent: u("packets_sent")?,
        packets_received: u("packets_received")?,
        loss_pct: f("packet_loss_percent"),
        upstream_loss_pct: f("upstream_loss_percent"),
        downstream_loss_pct: f("downstream_loss_percent"),
        duplicates: u("duplicates").unwrap_or(0),
        late_packets: u("late_packets").unwrap_or(0),
        rtts_ms,
    })
}

/// One row of `cargo xtask bench --download`'s table of both tiers (xtask reads these
/// JSON keys).
pub struct TierRow<'a> {
    pub tier: &'a str,
    pub configuration: &'a str,
    /// Download video: p50 ms, p99 ms, loss %.
    pub video_down: (f64, f64, f64),
    /// Upload video: p50 ms, p99 ms, loss %.
    pub video_up: (f64, f64, f64),
    pub goodput_down_pct: f64,
    pub goodput_up_pct: f64,
}

impl TierRow<'_> {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "tier": self.tier,
            "configuration": self.configuration,
            "video_down_p50_ms": self.video_down.0,
            "video_down_p99_ms": self.video_down.1,
            "video_down_loss_pct": self.video_down.2,
            "video_up_p50_ms": self.video_up.0,
            "video_up_p99_ms": self.video_up.1,
            "video_up_loss_pct": self.video_up.2,
            "goodput_down_pct": self.goodput_down_pct,
            "goodput_up_pct": self.goodput_up_pct,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, eps: f64) -> bool {
        (a - b).abs() < eps
    }

    #[test]
    fn emodel_known_values() {
        // No delay, no loss, no codec impairment: the default R of G.107.
        let r = emodel_r(0.0, 0.0, 0.0, 25.1);
        assert!(close(r, 93.2, 1e-12));
        // 1 + 0.035 * 93.2 + 7e-6 * 93.2 * 33.2 * 6.8 = 4.409286...
        assert!(close(mos(r), 4.409_285_824, 1e-9), "{}", mos(r));
        // d = 100 ms: Id = 2.4.
        assert!(close(emodel_r(100.0, 0.0, 0.0, 25.1), 90.8, 1e-12));
        // d = 200 ms: Id = 4.8 + 0.11 * 22.7 = 7.297.
        assert!(close(emodel_r(200.0, 0.0, 0.0, 25.1), 85.903, 1e-9));
        // 1 % random loss, G.711 with PLC (Ie 0, Bpl 25.1): Ie_eff = 95 / 26.1.
        assert!(close(
            emodel_r(0.0, 1.0, 0.0, 25.1),
            93.2 - 95.0 / 26.1,
            1e-12
        ));
        // G.729a (Ie 11, Bpl 19), 2 % loss, 150 ms: Id 3.6, Ie_eff = 11 + 84 * 2 / 21 = 19.
        assert!(close(
            emodel_r(150.0, 2.0, 11.0, 19.0),
            93.2 - 3.6 - 19.0,
            1e-9
        ));
    }

    #[test]
    fn mos_mapping() {
        assert_eq!(mos(-5.0), 1.0);
        assert_eq!(mos(101.0), 4.5);
        assert!(close(mos(0.0), 1.0, 1e-12));
        // R = 50: 1 + 1.75 + 7e-6 * 50 * -10 * 50 = 2.575.
        assert!(close(mos(50.0), 2.575, 1e-12));
        // R = 100: 1 + 3.5 = 4.5.
        assert!(close(mos(100.0), 4.5, 1e-12));
        // R = 80: 1 + 2.8 + 7e-6 * 80 * 20 * 20 = 4.024.
        assert!(close(mos(80.0), 4.024, 1e-12));
    }

    #[test]
    fn table_alignment() {
        let t = text_table(
            &["metric", "a", "bb"],
            &[
                vec!["p50".into(), "1.0 ms".into(), "12.5 ms".into()],
                vec!["loss".into(), "0.00 %".into()],
            ],
        );
        let expected = "\
metric |      a |      bb
-------------------------
p50    | 1.0 ms | 12.5 ms
loss   | 0.00 % |
";
        assert_eq!(t, expected);
    }

    #[test]
    fn svg_basic_structure() {
        let a: Vec<f64> = (0..1000).map(|i| i as f64 / 10.0).collect();
        // One outlier beyond the 99.9th percentile: clipped.
        let b: Vec<f64> = (0..2000)
            .map(|i| if i == 1999 { 1e6 } else { i as f64 / 10.0 })
            .collect();
        let svg = cdf_svg(
            "added delay <up>",
            "ms",
            &[("shaper on", &a), ("no shaper & co", &b), ("empty", &[])],
        );
        assert!(svg.starts_with("<?xml"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("added delay &lt;up&gt; (x clipped at"));
        assert!(svg.contains("no shaper &amp; co"));
        assert!(svg.contains("(no data)"));
        // Every coordinate stays on the canvas.
        for pl in svg.split("points=\"").skip(1) {
            let pts = pl.split('"').next().unwrap();
            for p in pts.split(' ') {
                let (x, y) = p.split_once(',').unwrap();
                let (x, y): (f64, f64) = (x.parse().unwrap(), y.parse().unwrap());
                assert!(
                    (70.0..=575.0).contains(&x) && (45.0..=440.0).contains(&y),
                    "{p}"
                );
            }
        }
    }

    #[test]
    fn svg_without_data() {
        let svg = cdf_svg("nothing", "ms", &[]);
        assert!(svg.contains("</svg>"));
        assert!(!svg.contains("<polyline"));
        let zeros = [0.0; 10];
        let svg = cdf_svg("zeros", "ms", &[("z", &zeros)]);
        assert_eq!(svg.matches("<polyline").count(), 1);
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
    }

    #[test]
    fn nice_steps() {
        assert_eq!(nice_step(100.0, 8), 20.0);
        assert_eq!(nice_step(7.0, 8), 1.0);
        assert!(close(nice_step(0.33, 8), 0.05, 1e-12));
    }

    const FIXTURE: &str = include_str!("../fixtures/irtt/loss-proxy-20.json");

    #[test]
    fn irtt_fixture() {
        // 20 probes at 100 ms through a UDP proxy dropping 2 requests and 2 replies.
        let s = irtt_summary(FIXTURE).unwrap();
        assert_eq!(s.packets_sent, 20);
        assert_eq!(s.packets_received, 16);
        assert_eq!(s.rtts_ms.len(), 16);
        assert!(close(s.loss_pct, 20.0, 1e-9));
        assert!(close(s.upstream_loss_pct, 10.0, 1e-9));
        assert!(close(s.downstream_loss_pct, 100.0 / 9.0, 1e-9));
        // Agrees with irtt's own stats block.
        assert!(close(s.rtt_min_ms, 0.177_128, 1e-9));
        assert!(close(s.rtt_max_ms, 1.491_785, 1e-9));
        // irtt's median of an even count averages the middle two; nearest rank takes the 8th.
        assert!(close(s.rtt_p50_ms, 0.750_609, 1e-9), "{}", s.rtt_p50_ms);
        assert!(close(s.rtt_mean_ms, 14_170_018.0 / 16.0 / 1e6, 1e-9));
        // 16 samples: p99 is the maximum; p90 is the 15th (1.422367 ms).
        assert!(close(s.rtt_p99_ms, 1.491_785, 1e-9));
        assert!(close(s.rtt_p90_ms, 1.422_367, 1e-9));
        assert_eq!(s.duplicates, 0);
    }

    #[test]
    fn irtt_rejects_garbage() {
        assert!(irtt_summary("not json").is_err());
        assert!(irtt_summary("{}").is_err());
    }
}
