//! `shaper report`: ended calls (`calls.jsonl`) by hour and by day (UTC): how many, how
//! many degraded and why, call minutes, and the mean MOS each way. The evidence a site
//! sends when it asks for a better line.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

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
        }
    }

    fn done(mut self, period: String) -> Period {
        self.p.period = period;
        let mean = |(s, n): (f64, u32)| (n > 0).then(|| s / f64::from(n));
        self.p.mos_up = mean(self.mos[0]);
        self.p.mos_down = mean(self.mos[1]);
        self.p
    }
}

/// Calls by day and by hour of their start.
pub fn report(calls: &[CallRecord]) -> Report {
    let mut days: BTreeMap<String, Acc> = BTreeMap::new();
    let mut hours: BTreeMap<String, Acc> = BTreeMap::new();
    for c in calls {
        days.entry(day_of(c.start_s)).or_default().add(c);
        hours.entry(hour_of(c.start_s)).or_default().add(c);
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
            "  {:<16} {:>6} {:>9} {:>8} {:>7} {:>9}  degraded because",
            "period", "calls", "degraded", "minutes", "MOS up", "MOS down"
        );
        for p in rows.iter() {
            let mos = |m: Option<f64>| m.map_or("-".to_string(), |v| format!("{v:.2}"));
            let why: Vec<String> = p.reasons.iter().map(|(k, n)| format!("{k} x{n}")).collect();
            let _ = writeln!(
                out,
                "  {:<16} {:>6} {:>9} {:>8.1} {:>7} {:>9}  {}",
                p.period,
                p.calls,
                p.degraded,
                p.minutes,
                mos(p.mos_up),
                mos(p.mos_down),
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
        let r = report(&calls);
        assert_eq!(r.days.len(), 2);
        assert_eq!((r.days[0].calls, r.days[0].degraded), (2, 1));
        assert_eq!(r.days[0].reasons.get("down loss"), Some(&1));
        assert!((r.days[0].mos_up.expect("mos") - 4.0).abs() < 1e-9);
        assert_eq!(r.hours[0].period, "2026-12-03 09:00");
        assert_eq!(r.hours[1].period, "2026-12-04 14:00");
        assert_eq!(r.hours[1].reasons.len(), 2);
        assert!((r.days[1].minutes - 10.0).abs() < 1e-9);
        let text = render(&r);
        assert!(text.contains("down loss x1"), "{text}");
    }
}
