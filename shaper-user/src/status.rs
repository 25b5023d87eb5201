//! `shaper status`: what the kernel says the shaping is doing — HTB class
//! counters by netlink and the classifier's per-rule / per-class counters
//! from the pinned maps — and the last kernel crash, when the gateway image
//! recorded one.

use std::{collections::BTreeMap, fmt::Write as _, path::Path, time::Duration};

use anyhow::Result;
use serde::Serialize;
use shaper_common::{Dir, GLOBAL_COUNTER_NAMES};

use crate::{
    apply::{Paths, State},
    config::format_rate,
    kernel::{
        bpf,
        tc::{ClassInfo, Tc},
    },
};

#[derive(Debug, Serialize)]
pub struct Report {
    pub config: String,
    pub applied_at: u64,
    pub fq_codel: bool,
    pub cake: bool,
    pub directions: Vec<DirReport>,
    pub rules: Vec<RuleReport>,
    /// Classifier counters per direction ("upload", "download").
    pub classifier: BTreeMap<String, BTreeMap<String, u64>>,
    /// What `shaper run` learned of host names (absent without host rules).
    pub hosts: Option<crate::hosts::Snapshot>,
    /// The last kernel crash the gateway image kept (null: none recorded).
    pub last_crash: Option<LastCrash>,
    /// Calls `shaper run` is measuring and has recorded (absent without `[calls]` classes
    /// or a daemon).
    pub calls: Option<CallsSummary>,
}

/// What `shaper run`'s calls.json says, in numbers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CallsSummary {
    /// Calls in progress.
    pub active: u64,
    /// Calls ended since the daemon started, and of those degraded.
    pub ended: u64,
    pub degraded: u64,
    /// The ended calls' loss, jitter, MOS and duration as histograms.
    pub histograms: crate::calls_task::CallHistograms,
}

fn read_calls(run: &Path) -> Option<CallsSummary> {
    let p = crate::rundir::RunDir(run).calls();
    match crate::rundir::read_versioned::<crate::calls_task::Live>(
        &p,
        crate::calls_task::CALLS_VERSION,
    ) {
        Ok(Some(l)) => Some(CallsSummary {
            active: l.calls.len() as u64,
            ended: l.ended,
            degraded: l.degraded,
            histograms: l.histograms,
        }),
        Ok(None) => None,
        Err(e) => {
            log::warn!("{e:#}");
            None
        }
    }
}

/// The last kernel crash, as the image's boot script summarised it from the
/// pstore record the crashed kernel left in EFI variables.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum LastCrash {
    Recorded(CrashRecord),
    /// The file is there but not understood; status still works.
    Unreadable {
        error: String,
    },
}

#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct CrashRecord {
    /// When the crashed kernel wrote the record, by its clock (UTC), if known.
    pub time: Option<String>,
    /// Seconds after the crashed boot started, if the record said.
    pub uptime_s: Option<f64>,
    /// The "Kernel panic - not syncing: ..." line, else the Oops/BUG line.
    pub summary: String,
    /// The first Oops/BUG line when the summary is the panic line.
    pub detail: Option<String>,
    /// Where the full record is on the boot disk's EFI partition (None: not saved).
    pub record: Option<String>,
    /// "previous": the boot just before this one crashed; "earlier": an older
    /// boot (kept from the EFI partition until a newer crash replaces it).
    pub boot: Option<String>,
}

/// Reads `<run>/last-crash`, where the gateway image's boot script
/// (images/rootfs/usr/libexec/shaper/save-crash) summarises the last kernel crash. A missing file is no crash (None); anything that
/// cannot be read or understood is `Unreadable`, never an error of status.
pub fn read_last_crash(run: &Path) -> Option<LastCrash> {
    let path = crate::rundir::RunDir(run).last_crash();
    match std::fs::read(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => Some(LastCrash::Unreadable {
            error: format!("reading {}: {e}", path.display()),
        }),
        Ok(bytes) => Some(match parse_last_crash(&bytes) {
            Ok(r) => LastCrash::Recorded(r),
            Err(error) => LastCrash::Unreadable {
                error: format!("{}: {error}", path.display()),
            },
        }),
    }
}

/// Parses the key=value lines of the last-crash file (unknown keys are ignored,
/// empty values are absent ones); a summary is required.
pub fn parse_last_crash(bytes: &[u8]) -> std::result::Result<CrashRecord, String> {
    const MAX: usize = 64 * 1024;
    if bytes.len() > MAX {
        return Err(format!(
            "{} bytes, more than a summary ever is",
            bytes.len()
        ));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| format!("not text ({e})"))?;
    let mut r = CrashRecord::default();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(format!("line {} is not key=value", i + 1));
        };
        let value = value.trim();
        let opt = || (!value.is_empty()).then(|| value.to_string());
        match key.trim() {
            "time" => r.time = opt(),
            "uptime" => {
                r.uptime_s = match value {
                    "" => None,
                    v => Some(
                        v.parse::<f64>()
                            .ok()
                            .filter(|x| x.is_finite() && *x >= 0.0)
                            .ok_or_else(|| format!("uptime {v:?} is not a number of seconds"))?,
                    ),
                }
            }
            "summary" => r.summary = value.to_string(),
            "detail" => r.detail = opt(),
            "record" => r.record = opt(),
            "boot" => r.boot = opt(),
            _ => {}
        }
    }
    if r.summary.is_empty() {
        return Err("no summary line".to_string());
    }
    Ok(r)
}

/// Control characters (a terminal's escape sequences) shown as '?'.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// `last crash: ...` lines for the terminal.
pub fn render_last_crash(c: &LastCrash) -> String {
    let mut s = String::new();
    match c {
        LastCrash::Unreadable { error } => {
            let _ = writeln!(
                s,
                "last crash: recorded, but the summary is unreadable ({})",
                printable(error)
            );
        }
        LastCrash::Recorded(r) => {
            let record = match &r.record {
                Some(p) => format!("record in {} on the boot disk", printable(p)),
                None => "record not saved on the boot disk".to_string(),
            };
            let _ = writeln!(s, "last crash: {} ({record})", printable(&r.summary));
            let mut when = Vec::new();
            if let Some(t) = &r.time {
                when.push(format!("at {}", printable(t)));
            }
            if let Some(u) = r.uptime_s {
                when.push(format!("{u:.1} s after boot"));
            }
            match r.boot.as_deref() {
                Some("previous") => when.push("in the boot before this one".to_string()),
                Some("earlier") => {
                    when.push("in an earlier boot (the last one did not crash)".to_string())
                }
                _ => {}
            }
            if !when.is_empty() {
                let _ = writeln!(s, "  {}", when.join(", "));
            }
            if let Some(d) = &r.detail {
                let _ = writeln!(s, "  {}", printable(d));
            }
        }
    }
    s
}

#[derive(Debug, Serialize)]
pub struct DirReport {
    pub direction: String,
    pub interface: String,
    pub rate_bps: u64,
    /// The rate class 1:1 has in the kernel now: below `rate_bps` while `shaper run`'s
    /// arrival accounting or autorate holds it lower.
    pub kernel_rate_bps: Option<u64>,
    pub classes: Vec<ClassReport>,
}

#[derive(Debug, Serialize)]
pub struct ClassReport {
    pub name: String,
    pub classid: String,
    pub guaranteed_bps: u64,
    pub ceiling_bps: u64,
    pub priority: u32,
    pub leaf: String,
    /// Sent by the HTB class (kernel counters).
    pub packets: u64,
    pub bytes: u64,
    pub drops: u64,
    pub overlimits: u64,
    pub backlog_bytes: u64,
    pub qlen: u64,
    /// Sent rate over the sampling interval (absent without an interval).
    pub rate_bps: Option<u64>,
    /// Steered into this class by the classifier.
    pub classified_packets: u64,
    pub classified_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct RuleReport {
    pub name: String,
    pub class: String,
    pub upload_packets: u64,
    pub upload_bytes: u64,
    pub download_packets: u64,
    pub download_bytes: u64,
}

/// Reads the counters; `None` when nothing is applied.
pub async fn collect(paths: &Paths, interval_s: f64) -> Result<Option<Report>> {
    let Some(state) = State::load(paths)? else {
        return Ok(None);
    };
    let tc = Tc::connect().await?;
    let plan = &state.plan;
    let ifindex = |name: &str| {
        state
            .attachments
            .iter()
            .find(|a| a.ifname == name)
            .map(|a| a.ifindex)
    };

    // Samples are per direction, upload first (`Dir::index`).
    let ifaces: Vec<Option<u32>> = plan.dirs.values().map(|d| ifindex(&d.ifname)).collect();
    let first = sample(&tc, &ifaces).await?;
    let (second, secs) = if interval_s > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(interval_s)).await;
        (Some(sample(&tc, &ifaces).await?), interval_s)
    } else {
        (None, 0.0)
    };
    let counters = bpf::read_counters(
        &paths.pins,
        plan.policy.rules.len(),
        plan.policy.classes.len(),
    )?;

    let mut directions = Vec::new();
    for (dir, d) in plan.dirs.iter() {
        let di = dir.index();
        let mut classes = Vec::new();
        for c in &d.classes {
            let find = |v: &Vec<ClassInfo>| v.iter().find(|k| k.classid == c.classid).cloned();
            let now = second
                .as_ref()
                .map_or_else(|| find(&first[di]), |s| find(&s[di]));
            let before = find(&first[di]);
            let st = now.as_ref().map(|k| k.stats).unwrap_or_default();
            let rate_bps = match (&second, &before, &now) {
                (Some(_), Some(b), Some(n)) if secs > 0.0 => {
                    Some(((n.stats.bytes.saturating_sub(b.stats.bytes)) as f64 * 8.0 / secs) as u64)
                }
                // No sampling interval: the kernel's rate estimator on the class.
                _ => st.rate_bps,
            };
            let cc = counters.classes[dir]
                .get(c.index as usize)
                .copied()
                .unwrap_or_default();
            classes.push(ClassReport {
                name: c.name.clone(),
                classid: format!("1:{:x}", c.classid & 0xffff),
                guaranteed_bps: c.rate_bps,
                ceiling_bps: c.ceil_bps,
                priority: c.prio,
                leaf: c.leaf.to_string(),
                packets: st.packets,
                bytes: st.bytes,
                drops: u64::from(st.drops),
                overlimits: u64::from(st.overlimits),
                backlog_bytes: u64::from(st.backlog_bytes),
                qlen: u64::from(st.qlen),
                rate_bps,
                classified_packets: cc.packets,
                classified_bytes: cc.bytes,
            });
        }
        let kernel_rate_bps = first[di]
            .iter()
            .find(|k| k.classid == crate::compile::PARENT_CLASSID)
            .and_then(|k| k.htb)
            .map(|h| h.rate_bps);
        directions.push(DirReport {
            direction: dir.name().to_string(),
            interface: d.ifname.clone(),
            rate_bps: d.rate_bps,
            kernel_rate_bps,
            classes,
        });
    }
    let rules = plan
        .policy
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let up = counters.rules[Dir::Up].get(i).copied().unwrap_or_default();
            let down = counters.rules[Dir::Down]
                .get(i)
                .copied()
                .unwrap_or_default();
            RuleReport {
                name: r.name.clone(),
                class: plan.policy.classes[r.class].name.clone(),
                upload_packets: up.packets,
                upload_bytes: up.bytes,
                download_packets: down.packets,
                download_bytes: down.bytes,
            }
        })
        .collect();
    let mut classifier = BTreeMap::new();
    for d in Dir::ALL {
        let mut m: BTreeMap<String, u64> = GLOBAL_COUNTER_NAMES
            .iter()
            .zip(&counters.global[d])
            .map(|(n, v)| (n.to_string(), *v))
            .collect();
        if d == Dir::Down && !counters.wan_arrivals.is_empty() {
            // Of the classified download traffic, what came in from the WAN: what
            // `[download] account_arrivals` measures.
            let (p, b) = counters
                .wan_arrivals
                .iter()
                .fold((0, 0), |(p, b), c| (p + c.packets, b + c.bytes));
            m.insert("wan_arrival_packets".into(), p);
            m.insert("wan_arrival_bytes".into(), b);
        }
        classifier.insert(d.name().to_string(), m);
    }
    Ok(Some(Report {
        config: state.config.display().to_string(),
        applied_at: state.applied_at,
        fq_codel: state.caps.fq_codel,
        cake: state.caps.cake,
        directions,
        rules,
        classifier,
        hosts: if state.plan.policy.uses_hosts() {
            crate::hosts::read_snapshot(&paths.run)
        } else {
            None
        },
        last_crash: read_last_crash(&paths.run),
        calls: if state.plan.policy.calls.classes.is_empty() {
            None
        } else {
            read_calls(&paths.run)
        },
    }))
}

async fn sample(tc: &Tc, ifaces: &[Option<u32>]) -> Result<Vec<Vec<ClassInfo>>> {
    let mut out = Vec::new();
    for ix in ifaces {
        out.push(match ix {
            Some(ix) => tc.classes(*ix).await?,
            None => Vec::new(),
        });
    }
    Ok(out)
}

/// The terminal table.
pub fn render(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "config: {} (applied at unix time {})",
        r.config, r.applied_at
    );
    if let Some(c) = &r.last_crash {
        s.push_str(&render_last_crash(c));
    }
    if let Some(c) = &r.calls {
        let _ = writeln!(
            s,
            "calls: {} in progress, {} ended since `shaper run` started ({} degraded)",
            c.active, c.ended, c.degraded
        );
    }
    let cw = r
        .directions
        .iter()
        .flat_map(|d| &d.classes)
        .map(|c| c.name.len())
        .max()
        .unwrap_or(5)
        .max(5);
    for d in &r.directions {
        // HTB keeps rates in bytes per second: a few bit/s of rounding are no change.
        let lowered = d
            .kernel_rate_bps
            .filter(|&k| k + d.rate_bps / 200 < d.rate_bps)
            .map(|k| {
                format!(
                    " (now {}: lowered by `shaper run`'s arrival accounting or autorate)",
                    format_rate(k)
                )
            })
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "\n{} on {} at {}{lowered}",
            d.direction,
            d.interface,
            format_rate(d.rate_bps)
        );
        let _ = writeln!(
            s,
            "  {:<cw$} {:>5} {:>10} {:>10} {:>10} {:>12} {:>7} {:>9} {:>11}",
            "class", "id", "guarant.", "ceiling", "packets", "bytes", "drops", "backlog", "rate"
        );
        for c in &d.classes {
            let _ = writeln!(
                s,
                "  {:<cw$} {:>5} {:>10} {:>10} {:>10} {:>12} {:>7} {:>9} {:>11}",
                c.name,
                c.classid,
                format_rate(c.guaranteed_bps),
                format_rate(c.ceiling_bps),
                c.packets,
                c.bytes,
                c.drops,
                c.backlog_bytes,
                c.rate_bps.map_or_else(|| "-".to_string(), format_rate)
            );
        }
    }
    let rw = r
        .rules
        .iter()
        .map(|x| x.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let _ = writeln!(
        s,
        "\n  {:<rw$} {:<cw$} {:>10} {:>12} {:>10} {:>12}",
        "rule", "class", "up pkts", "up bytes", "down pkts", "down bytes"
    );
    for rr in &r.rules {
        let _ = writeln!(
            s,
            "  {:<rw$} {:<cw$} {:>10} {:>12} {:>10} {:>12}",
            rr.name,
            rr.class,
            rr.upload_packets,
            rr.upload_bytes,
            rr.download_packets,
            rr.download_bytes
        );
    }
    for (dir, m) in &r.classifier {
        let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(s, "\nclassifier {dir}: {}", parts.join(" "));
    }
    if let Some(h) = &r.hosts {
        let st = &h.stats;
        let _ = writeln!(
            s,
            "\nhost names: {} DNS answers read ({} not understood), {} address(es) held; \
             {} ClientHellos, {} server names, {} connections decided by name",
            st.dns_answers,
            st.dns_unparsed,
            h.learned.len(),
            st.tls_hellos,
            st.sni_found,
            st.sni_decided
        );
        for l in h.learned.iter().take(20) {
            let _ = writeln!(
                s,
                "  {:<40} {:<24} {} ({} s left)",
                l.addr, l.rule, l.name, l.expires_in_s
            );
        }
        if h.learned.len() > 20 {
            let _ = writeln!(
                s,
                "  ... {} more (shaper status --json)",
                h.learned.len() - 20
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "time=2026-12-02T16:32:48Z\nuptime=18.372113\n\
        summary=Kernel panic - not syncing: Fatal exception\n\
        detail=BUG: kernel NULL pointer dereference, address: 0000000000000008\n\
        record=shaper/crash/20261202-163248\nboot=previous\n";

    fn dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("shaper-status-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    }

    #[test]
    fn parses_the_boot_scripts_file() {
        let r = parse_last_crash(FILE.as_bytes()).expect("parses");
        assert_eq!(r.time.as_deref(), Some("2026-12-02T16:32:48Z"));
        assert_eq!(r.uptime_s, Some(18.372113));
        assert_eq!(r.summary, "Kernel panic - not syncing: Fatal exception");
        assert_eq!(
            r.detail.as_deref(),
            Some("BUG: kernel NULL pointer dereference, address: 0000000000000008")
        );
        assert_eq!(r.record.as_deref(), Some("shaper/crash/20261202-163248"));
        assert_eq!(r.boot.as_deref(), Some("previous"));
    }

    #[test]
    fn empty_values_are_absent_and_unknown_keys_ignored() {
        let r = parse_last_crash(
            b"# comment\ntime=\nuptime=\nsummary=Kernel panic - not syncing: NMI: Not continuing\ndetail=\nrecord=\nboot=previous\nfuture=1\n",
        )
        .expect("parses");
        assert_eq!(r.time, None);
        assert_eq!(r.uptime_s, None);
        assert_eq!(r.detail, None);
        assert_eq!(r.record, None);
        let text = render_last_crash(&LastCrash::Recorded(r));
        assert_eq!(
            text,
            "last crash: Kernel panic - not syncing: NMI: Not continuing (record not saved on the boot disk)\n  in the boot before this one\n"
        );
    }

    #[test]
    fn renders_summary_record_time_and_detail() {
        let r = parse_last_crash(FILE.as_bytes()).expect("parses");
        let text = render_last_crash(&LastCrash::Recorded(r));
        assert_eq!(
            text,
            "last crash: Kernel panic - not syncing: Fatal exception (record in shaper/crash/20261202-163248 on the boot disk)\n\
             \x20 at 2026-12-02T16:32:48Z, 18.4 s after boot, in the boot before this one\n\
             \x20 BUG: kernel NULL pointer dereference, address: 0000000000000008\n"
        );
        let earlier = parse_last_crash(FILE.replace("boot=previous", "boot=earlier").as_bytes())
            .expect("parses");
        assert!(render_last_crash(&LastCrash::Recorded(earlier))
            .contains("in an earlier boot (the last one did not crash)"));
    }

    #[test]
    fn garbage_is_unreadable_not_an_error() {
        for bad in [
            &b"\xff\xfe\x00garbage"[..],
            b"just some words\n",
            b"time=2026-01-01T00:00:00Z\n",
            b"summary=x\nuptime=soon\n",
            b"",
        ] {
            assert!(parse_last_crash(bad).is_err(), "{bad:?}");
        }
        assert!(parse_last_crash(&vec![b'a'; 100_000]).is_err());
        let d = dir("garbage");
        std::fs::write(
            crate::rundir::RunDir(&d).last_crash(),
            b"\x00\x01 not a summary",
        )
        .expect("write");
        let c = read_last_crash(&d).expect("a file is there");
        assert!(matches!(c, LastCrash::Unreadable { .. }), "{c:?}");
        let text = render_last_crash(&c);
        assert!(
            text.starts_with("last crash: recorded, but the summary is unreadable ("),
            "{text}"
        );
        let json = serde_json::to_value(&c).expect("json");
        assert_eq!(json["state"], "unreadable");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn missing_file_shows_nothing() {
        let d = dir("missing");
        assert_eq!(read_last_crash(&d), None);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn reads_the_file_and_serialises_it() {
        let d = dir("read");
        std::fs::write(crate::rundir::RunDir(&d).last_crash(), FILE).expect("write");
        let c = read_last_crash(&d).expect("recorded");
        let json = serde_json::to_value(&c).expect("json");
        assert_eq!(json["state"], "recorded");
        assert_eq!(
            json["summary"],
            "Kernel panic - not syncing: Fatal exception"
        );
        assert_eq!(json["record"], "shaper/crash/20261202-163248");
        assert_eq!(json["uptime_s"], 18.372113);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn escape_sequences_are_not_printed() {
        let r = parse_last_crash(b"summary=panic \x1b[2J here\n").expect("parses");
        let text = render_last_crash(&LastCrash::Recorded(r));
        assert!(!text.contains('\x1b'), "{text:?}");
        assert!(text.contains("panic ?[2J here"), "{text:?}");
    }
}
