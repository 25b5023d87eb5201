//! `shaper status`: what the kernel says the shaping is doing — HTB class
//! counters by netlink and the classifier's per-rule / per-class counters
//! from the pinned maps.

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use anyhow::Result;
use serde::Serialize;
use shaper_common::GLOBAL_COUNTER_NAMES;

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
    let dirs = [("upload", &plan.up), ("download", &plan.down)];
    let ifindex = |name: &str| {
        state
            .attachments
            .iter()
            .find(|a| a.ifname == name)
            .map(|a| a.ifindex)
    };

    let ifaces: Vec<Option<u32>> = dirs.iter().map(|(_, d)| ifindex(&d.ifname)).collect();
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
    for (di, (label, d)) in dirs.iter().enumerate() {
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
            let cc = counters.classes[di]
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
            direction: label.to_string(),
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
            let up = counters.rules[0].get(i).copied().unwrap_or_default();
            let down = counters.rules[1].get(i).copied().unwrap_or_default();
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
    for (di, label) in ["upload", "download"].iter().enumerate() {
        let m = GLOBAL_COUNTER_NAMES
            .iter()
            .zip(&counters.global[di])
            .map(|(n, v)| (n.to_string(), *v))
            .collect();
        classifier.insert(label.to_string(), m);
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
