//! `shaper report`: ended calls (`calls.jsonl`) by hour and by day (UTC): how many, how
//! many degraded and why, call minutes, and the mean MOS each way. The evidence a site
//! sends when it asks for a better line.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::CallRecord;

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Period {
    /// `YYYY-MM-DD` or `YYYY-MM-DD HH:00` (UTC).
    pub period: String,
    pub calls: u64,
    pub degraded: u64,
    /// Degraded calls by reason: `up loss`, `down loss`, `up jitter`, `down jitter`.
    pub reasons: BTreeMap<String, u64>,
    pub minutes: f64,
    /// Mean MOS of the calls' directions that carried media.
    pub mos_up: Option<f64>,
    pub mos_down: Option<f64>,
    /// Of the call time `shaper run` watched the line, the share (%) it was full each
    /// way, and the share its rate was held below the configured one.
    pub line_full_pct_up: Option<f64>,
    pub line_full_pct_down: Option<f64>,
    pub rate_held_pct_up: Option<f64>,
    pub rate_held_pct_down: Option<f64>,
    /// Packets the shaper's queues dropped in the measured classes while the calls were
    /// on ([`super::DirQuality::shaper_drops`], summed over the calls that have it): an
    /// upper bound on what the gateway itself dropped of them.
    pub shaper_drops_up: Option<u64>,
    pub shaper_drops_down: Option<u64>,
    /// The line over the whole period, calls or not (from `line.jsonl`).
    pub line: Option<LineMinutes>,
}

/// One hour (UTC) of the shaped line as `shaper run` watched it (`line.jsonl`), calls or
/// not; per direction, upload first.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LineHour {
    /// Unix time of the hour's start.
    pub hour_s: u64,
    /// Seconds watched, seconds the line was full, seconds its rate was held down.
    pub watched_s: [f64; 2],
    pub full_s: [f64; 2],
    pub held_s: [f64; 2],
    /// The lowest rate while held, % of the configured.
    pub lowest_pct: [Option<f64>; 2],
}

impl LineHour {
    pub fn new(hour_s: u64) -> LineHour {
        LineHour {
            hour_s,
            ..LineHour::default()
        }
    }

    /// Counts `secs` of direction `i` (0: up, 1: down).
    pub fn add(&mut self, i: usize, secs: f64, full: bool, rate_pct: f64) {
        self.watched_s[i] += secs;
        if full {
            self.full_s[i] += secs;
        }
        if rate_pct < super::calls::HELD_BELOW_PCT {
            self.held_s[i] += secs;
            self.lowest_pct[i] = Some(self.lowest_pct[i].map_or(rate_pct, |m| m.min(rate_pct)));
        }
    }
}

/// The line over a period, in minutes, per direction (upload first).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LineMinutes {
    pub watched: [f64; 2],
    pub full: [f64; 2],
    pub held: [f64; 2],
    pub lowest_pct: [Option<f64>; 2],
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    pub days: Vec<Period>,
    pub hours: Vec<Period>,
}

/// Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn day_of(t: f64) -> String {
    let (y, m, d) = civil((t / 86_400.0).floor() as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

fn hour_of(t: f64) -> String {
    let h = ((t.rem_euclid(86_400.0)) / 3600.0).floor() as u32;
    format!("{} {h:02}:00", day_of(t))
}

#[derive(Default)]
struct Acc {
    p: Period,
    mos: [(f64, u32); 2],
    /// Per direction: (full seconds, held seconds, watched seconds).
    line: [(f64, f64, f64); 2],
    /// Per direction: the calls' shaper drops, where known.
    drops: [Option<u64>; 2],
}

impl Acc {
    fn add(&mut self, c: &CallRecord) {
        self.p.calls += 1;
        if !c.degraded.is_empty() {
            self.p.degraded += 1;
            for r in &c.degraded {
                let why: String = r.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
                *self.p.reasons.entry(why).or_default() += 1;
            }
        }
        self.p.minutes += c.duration_s / 60.0;
        for (i, q) in [&c.up, &c.down].into_iter().enumerate() {
            if q.streams > 0 {
                self.mos[i].0 += q.mos;
                self.mos[i].1 += 1;
            }
            if let (Some(f), Some(h)) = (q.line_full_pct, q.rate_held_pct) {
                self.line[i].0 += f / 100.0 * c.duration_s;
                self.line[i].1 += h / 100.0 * c.duration_s;
                self.line[i].2 += c.duration_s;
            }
            if let Some(n) = q.shaper_drops {
                self.drops[i] = Some(self.drops[i].unwrap_or(0).saturating_add(n));
            }
        }
    }

    fn done(mut self, period: String) -> Period {
        self.p.period = period;
        let mean = |(s, n): (f64, u32)| (n > 0).then(|| s / f64::from(n));
        self.p.mos_up = mean(self.mos[0]);
        self.p.mos_down = mean(self.mos[1]);
        let share = |part: f64, whole: f64| (whole > 0.0).then(|| part * 100.0 / whole);
        let [up, down] = self.line;
        self.p.line_full_pct_up = share(up.0, up.2);
        self.p.line_full_pct_down = share(down.0, down.2);
        self.p.rate_held_pct_up = share(up.1, up.2);
        self.p.rate_held_pct_down = share(down.1, down.2);
        [self.p.shaper_drops_up, self.p.shaper_drops_down] = self.drops;
        self.p
    }
}

/// Calls by day and by hour of their start, with the line's hours.
pub fn report(calls: &[CallRecord], lines: &[LineHour]) -> Report {
    let mut days: BTreeMap<String, Acc> = BTreeMap::new();
    let mut hours: BTreeMap<String, Acc> = BTreeMap::new();
    for c in calls {
        days.entry(day_of(c.start_s)).or_default().add(c);
        hours.entry(hour_of(c.start_s)).or_default().add(c);
    }
    for l in lines {
        let t = l.hour_s as f64;
        for acc in [
            days.entry(day_of(t)).or_default(),
            hours.entry(hour_of(t)).or_default(),
        ] {
            let m = acc.p.line.get_or_insert_with(LineMinutes::default);
            for i in 0..2 {
                m.watched[i] += l.watched_s[i] / 60.0;
                m.full[i] += l.full_s[i] / 60.0;
                m.held[i] += l.held_s[i] / 60.0;
                if let Some(p) = l.lowest_pct[i] {
                    m.lowest_pct[i] = Some(m.lowest_pct[i].map_or(p, |x: f64| x.min(p)));
                }
            }
        }
    }
    Report {
        days: days.into_iter().map(|(k, a)| a.done(k)).collect(),
        hours: hours.into_iter().map(|(k, a)| a.done(k)).collect(),
    }
}

/// The report as two tables.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    if r.days.is_empty() {
        out.push_str("no ended calls recorded\n");
        return out;
    }
    for (title, rows) in [("by day (UTC)", &r.days), ("by hour (UTC)", &r.hours)] {
        let _ = writeln!(out, "{title}");
        let _ = writeln!(
            out,
            "  {:<16} {:>6} {:>9} {:>8} {:>7} {:>9} {:>13} {:>13} {:>17} {:>13}  degraded because",
            "period",
            "calls",
            "degraded",
            "minutes",
            "MOS up",
            "MOS down",
            "full up/down",
            "held up/down",
            "line full min u/d",
            "gw drops u/d"
        );
        for p in rows.iter() {
            let mos = |m: Option<f64>| m.map_or("-".to_string(), |v| format!("{v:.2}"));
            let why: Vec<String> = p.reasons.iter().map(|(k, n)| format!("{k} x{n}")).collect();
            let pair = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (None, None) => "-".to_string(),
                (a, b) => format!(
                    "{}/{} %",
                    a.map_or("-".into(), |v| format!("{v:.0}")),
                    b.map_or("-".into(), |v| format!("{v:.0}"))
                ),
            };
            let _ = writeln!(
                out,
                "  {:<16} {:>6} {:>9} {:>8.1} {:>7} {:>9} {:>13} {:>13} {:>17} {:>13}  {}",
                p.period,
                p.calls,
                p.degraded,
                p.minutes,
                mos(p.mos_up),
                mos(p.mos_down),
                pair(p.line_full_pct_up, p.line_full_pct_down),
                pair(p.rate_held_pct_up, p.rate_held_pct_down),
                p.line.as_ref().map_or("-".to_string(), |l| format!(
                    "{:.1}/{:.1} of {:.1}",
                    l.full[0],
                    l.full[1],
                    l.watched[0].max(l.watched[1])
                )),
                match (p.shaper_drops_up, p.shaper_drops_down) {
                    (None, None) => "-".to_string(),
                    (u, d) => format!(
                        "{}/{}",
                        u.map_or("-".into(), |n| n.to_string()),
                        d.map_or("-".into(), |n| n.to_string())
                    ),
                },
                why.join(", ")
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::DirQuality;

    fn call(start_s: f64, degraded: &[&str], mos: f64) -> CallRecord {
        let q = DirQuality {
            streams: 1,
            mos,
            ..DirQuality::default()
        };
        CallRecord {
            lan_host: "h-1".into(),
            peer: "h-2".into(),
            start_s,
            duration_s: 600.0,
            turn: false,
            rtcp_packets: 0,
            up: q.clone(),
            down: q,
            degraded: degraded.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn groups_by_day_and_hour() {
        // 2026-12-03 09:10 and 09:50 UTC, 2026-12-04 14:00 UTC.
        let d0 = 1_796_256_000.0; // 2026-12-03 00:00 UTC
        assert_eq!(day_of(d0), "2026-12-03");
        assert_eq!(day_of(951_782_400.0), "2000-02-29");
        let calls = [
            call(d0 + 9.0 * 3600.0 + 600.0, &[], 4.4),
            call(
                d0 + 9.0 * 3600.0 + 3000.0,
                &["down loss 3.1 % (line or beyond)"],
                3.6,
            ),
            call(
                d0 + 86_400.0 + 14.0 * 3600.0,
                &["up jitter 40 ms", "up loss 2.0 % (lan)"],
                4.0,
            ),
        ];
        let mut calls = calls;
        // The first call's line: full upstream half its time, the rate held a tenth.
        calls[0].up.line_full_pct = Some(50.0);
        calls[0].up.rate_held_pct = Some(10.0);
        // The gateway's own drops: known for the day's two calls upstream, one downstream.
        calls[0].up.shaper_drops = Some(4);
        calls[1].up.shaper_drops = Some(0);
        calls[1].down.shaper_drops = Some(2);
        // The line, calls or not: 09:00 full up 30 min, 10:00 held down 15 min at 70 %.
        let mut h9 = LineHour::new((d0 + 9.0 * 3600.0) as u64);
        h9.add(0, 1800.0, true, 100.0);
        h9.add(0, 1800.0, false, 100.0);
        h9.add(1, 3600.0, false, 100.0);
        let mut h10 = LineHour::new((d0 + 10.0 * 3600.0) as u64);
        h10.add(1, 900.0, false, 70.0);
        h10.add(1, 2700.0, false, 100.0);
        let r = report(&calls, &[h9, h10]);
        let day = r.days[0].line.as_ref().expect("line");
        assert_eq!(
            (day.full, day.held, day.lowest_pct),
            ([30.0, 0.0], [0.0, 15.0], [None, Some(70.0)])
        );
        assert_eq!(r.hours[1].period, "2026-12-03 10:00");
        assert_eq!(r.hours[1].calls, 0, "an hour of line without calls");
        assert_eq!(r.days[0].line_full_pct_up, Some(50.0));
        assert_eq!(r.days[0].rate_held_pct_up, Some(10.0));
        assert_eq!(r.days[0].line_full_pct_down, None);
        assert_eq!(
            (r.days[0].shaper_drops_up, r.days[0].shaper_drops_down),
            (Some(4), Some(2))
        );
        assert_eq!(
            (r.days[1].shaper_drops_up, r.days[1].shaper_drops_down),
            (None, None)
        );
        assert_eq!(r.days.len(), 2);
        assert_eq!((r.days[0].calls, r.days[0].degraded), (2, 1));
        assert_eq!(r.days[0].reasons.get("down loss"), Some(&1));
        assert!((r.days[0].mos_up.expect("mos") - 4.0).abs() < 1e-9);
        assert_eq!(r.hours[0].period, "2026-12-03 09:00");
        assert_eq!(r.hours[2].period, "2026-12-04 14:00");
        assert_eq!(r.hours[2].reasons.len(), 2);
        assert!((r.days[1].minutes - 10.0).abs() < 1e-9);
        let text = render(&r);
        assert!(text.contains("down loss x1"), "{text}");
        assert!(text.contains("50/- %"), "{text}");
        assert!(text.contains("30.0/0.0 of 60.0"), "{text}");
        assert!(text.contains("line full min u/d"), "{text}");
        assert!(text.contains("gw drops u/d"), "{text}");
        assert!(text.contains(" 4/2  down loss x1"), "{text}");
    }
}
