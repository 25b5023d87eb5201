//! The download-latency matrix (`cargo xtask bench --download`): prints tables, asserts
//! nothing.
//!
//! Traffic as the internet has it, on the namespace tier with a delay line between the
//! modem and the server (base RTT 20 or 40 ms): 4 bulk downloads and 4 bulk uploads with
//! autotuned windows, all started together, an image upload, web-like churn (short
//! heavy-tailed downloads coming and going) or none, CUBIC or BBR per socket on both ends,
//! ECN off (or on with `--ecn on`), and a 50 pps video call measured first on the idle line
//! and then through the busy hour.
//!
//! Each run of a row runs, on one topology, one after another: the product (`shaper run`,
//! the GP-surgery config at `--product-pct` of the download line, `line` preset matching
//! the modem on ATM), then hand-built HTB + bfifo (20 ms leaves, pure ACKs first, the size
//! table matching the modem on ATM) at 85 % and at 95 % of the download line. Each row is
//! repeated `--runs` times and the table shows the median and the worst run.
//!
//! Targets (issue 15): the product's download video p99 within 2 ms + one MTU's time at
//! the line rate of the idle line's p99; download goodput at least 90 % of what the
//! framing allows; on ADSL the upload video p99 within one framed MTU + 2 ms of the idle
//! line's.
//!
//! Options: `--runs N` (10), `--seconds N` per case (12), `--lines fttc,adsl12,adsl8`,
//! `--rtts 20,40`, `--cc cubic,bbr`, `--churn off,on`, `--ecn off|on|off,on`,
//! `--jitter-ms N` (0), `--product-pct N` (92), `--product-set KEY=VALUE` (extra
//! `[download]` settings for the product, repeatable), `--json FILE` (every case).

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use shaper_tests::matrix::{run_case, CaseOut, Gw, LineProfile, ADSL12, ADSL8, FTTC};
use shaper_tests::stats;
use shaper_tests::topology::PathDelay;
use shaper_tests::util::arg_value;
use shaper_tests::{
    DelayStats, Offloads, Results, Scenario, Shaper, TempDir, Topology, TopologyOptions,
};

fn list<'a>(args: &'a [String], name: &str, default: &'a str) -> Vec<&'a str> {
    arg_value(args, name)
        .unwrap_or(default)
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

/// The nearest-rank percentile `p` (0..=100, [`stats`]) of the finite values of `v` (a
/// run that received no video reports NaN delays); NaN when none.
fn pct(v: &[f64], p: f64) -> f64 {
    let finite: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    stats::percentile(&finite, p).unwrap_or(f64::NAN)
}

fn worst(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

struct Row {
    profile: LineProfile,
    rtt_ms: u64,
    cc: String,
    churn: bool,
    ecn: bool,
    runs: Vec<Vec<CaseOut>>,
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!(
            "{}",
            include_str!("shaper-download-matrix.rs")
                .lines()
                .take_while(|l| l.starts_with("//!"))
                .map(|l| l.trim_start_matches("//!").trim_start())
                .collect::<Vec<_>>()
                .join("\n")
        );
        return Ok(());
    }
    let num = |name: &str, default: u64| -> Result<u64> {
        match arg_value(&args, name) {
            Some(v) => v.parse().with_context(|| format!("{name} {v}")),
            None => Ok(default),
        }
    };
    let runs = num("--runs", 10)?.max(1);
    let secs = num("--seconds", 12)?;
    let jitter_ms = num("--jitter-ms", 0)?;
    let product_pct = num("--product-pct", 92)?;
    let product_extra: Vec<String> = args
        .windows(2)
        .filter(|w| w[0] == "--product-set")
        .map(|w| w[1].clone())
        .collect();
    let mut profiles = Vec::new();
    for l in list(&args, "--lines", "fttc,adsl12") {
        profiles.push(match l {
            "fttc" => FTTC,
            "adsl12" => ADSL12,
            "adsl8" => ADSL8,
            other => bail!("unknown line {other} (fttc, adsl12, adsl8)"),
        });
    }
    let rtts: Vec<u64> = list(&args, "--rtts", "20,40")
        .iter()
        .map(|s| s.parse().with_context(|| format!("--rtts {s}")))
        .collect::<Result<_>>()?;
    let ccs = list(&args, "--cc", "cubic,bbr");
    let onoff = |name: &str, default: &str| -> Result<Vec<bool>> {
        list(&args, name, default)
            .iter()
            .map(|s| match *s {
                "on" => Ok(true),
                "off" => Ok(false),
                o => bail!("{name}: {o} is not on or off"),
            })
            .collect()
    };
    let churns = onoff("--churn", "off,on")?;
    let ecns = onoff("--ecn", "off")?;
    if let Some(reason) = shaper_tests::util::skip_reason(shaper_tests::TRAFFIC_TOOLS) {
        bail!("cannot run: {reason}");
    }
    let gws = [Gw::Product, Gw::Htb(85), Gw::Htb(95)];
    let started = Instant::now();
    let dir = TempDir::new("download-matrix")?;
    let mut rows: Vec<Row> = Vec::new();
    for profile in &profiles {
        for &rtt_ms in &rtts {
            let topo = Topology::build_with(TopologyOptions {
                line: Some(profile.line),
                offloads: Offloads::from_env(),
                path: Some(PathDelay {
                    rtt: Duration::from_millis(rtt_ms),
                    jitter: Duration::from_millis(jitter_ms),
                }),
            })?;
            let mut shaper = Shaper::new(&topo.gw)?;
            for cc in &ccs {
                for &ecn in &ecns {
                    for ns in [&topo.lan, &topo.srv] {
                        ns.sysctl("net.ipv4.tcp_ecn", if ecn { "1" } else { "0" })?;
                        // Per socket below; the namespace default where the host allows it.
                        let _ = ns.sysctl("net.ipv4.tcp_congestion_control", cc);
                    }
                    for &churn in &churns {
                        let mut scenario = profile.scenario(secs);
                        scenario.congestion = Some(cc.to_string());
                        if !churn {
                            scenario.churn = None;
                        }
                        let mut row = Row {
                            profile: *profile,
                            rtt_ms,
                            cc: cc.to_string(),
                            churn,
                            ecn,
                            runs: Vec::new(),
                        };
                        for run in 0..runs {
                            if let Some(c) = scenario.churn.as_mut() {
                                c.seed = 0x5eed_0000 + run;
                            }
                            let mut outs = Vec::new();
                            // The idle line is measured once per run, in the product's case.
                            let htb_scenario = Scenario {
                                idle: None,
                                ..scenario.clone()
                            };
                            let for_gw = |gw: Gw| match gw {
                                Gw::Product => &scenario,
                                Gw::Htb(_) => &htb_scenario,
                            };
                            for gw in gws {
                                eprintln!(
                                    "[{:>6.0} s] {} rtt {rtt_ms} ms {cc}{}{} run {}/{runs}: {}",
                                    started.elapsed().as_secs_f64(),
                                    profile.name,
                                    if churn { " churn" } else { "" },
                                    if ecn { " ecn" } else { "" },
                                    run + 1,
                                    gw.label()
                                );
                                let mut r = run_case(
                                    &topo,
                                    &mut shaper,
                                    &dir,
                                    profile,
                                    for_gw(gw),
                                    gw,
                                    product_pct,
                                    &product_extra,
                                );
                                if let Err(e) = &r {
                                    eprintln!("  failed: {e:#}; retrying once");
                                    r = run_case(
                                        &topo,
                                        &mut shaper,
                                        &dir,
                                        profile,
                                        for_gw(gw),
                                        gw,
                                        product_pct,
                                        &product_extra,
                                    );
                                }
                                match r {
                                    Ok(results) => outs.push(CaseOut { gw, results }),
                                    Err(e) => eprintln!("  failed: {e:#}"),
                                }
                            }
                            row.runs.push(outs);
                        }
                        rows.push(row);
                    }
                }
            }
        }
    }
    if let Some(path) = arg_value(&args, "--json") {
        std::fs::write(path, to_json(&rows).to_string()).with_context(|| path.to_string())?;
    }
    print_tables(&rows, runs, secs, jitter_ms, product_pct, &product_extra);
    eprintln!("[{:>6.0} s] done", started.elapsed().as_secs_f64());
    Ok(())
}

/// One direction's video cells of a row: the idle line's median p99, the target (idle +
/// one framed MTU + 2 ms), the product's p99s (median / worst), the product's runs that met
/// the target, and plain HTB's at 85 and 95 %. `pick` chooses the direction of a busy run,
/// `idle` the same direction of the run's idle-line call.
fn latency_cells<'a>(
    prod: &[&'a Results],
    of: &dyn Fn(Gw) -> Vec<&'a Results>,
    mtu_ms: f64,
    pick: fn(&Results) -> &DelayStats,
    idle: fn(&(DelayStats, DelayStats)) -> &DelayStats,
) -> Vec<String> {
    let idle_p99: Vec<f64> = prod
        .iter()
        .filter_map(|r| r.video_idle.as_ref().map(|i| idle(i).p99_ms))
        .collect();
    let p99s = |rs: &[&Results]| -> Vec<f64> { rs.iter().map(|r| pick(r).p99_ms).collect() };
    let mw = |v: &[f64]| format!("{:.1} / {:.1}", pct(v, 50.0), worst(v));
    let ok = prod
        .iter()
        .filter(|r| {
            r.video_idle
                .as_ref()
                .is_some_and(|i| pick(r).p99_ms <= idle(i).p99_ms + mtu_ms + 2.0)
        })
        .count();
    vec![
        format!("{:.1}", pct(&idle_p99, 50.0)),
        format!("{:.1}", pct(&idle_p99, 50.0) + mtu_ms + 2.0),
        mw(&p99s(prod)),
        format!("{ok}/{}", prod.len()),
        mw(&p99s(&of(Gw::Htb(85)))),
        mw(&p99s(&of(Gw::Htb(95)))),
    ]
}

/// Goodput of a case as a share of what the framing allows: iperf3 download goodput +
/// video payload + churn bytes, over the line's payload capacity.
fn goodput_pct(profile: &LineProfile, r: &Results, secs: u64) -> f64 {
    let churn_bps = r
        .churn
        .as_ref()
        .map(|c| c.bytes as f64 * 8.0 / secs as f64)
        .unwrap_or(0.0);
    100.0 * (r.total_down_bps + churn_bps)
        / (profile.line.down_bps as f64 * profile.goodput_share())
}

fn print_tables(
    rows: &[Row],
    runs: u64,
    secs: u64,
    jitter_ms: u64,
    product_pct: u64,
    extra: &[String],
) {
    println!(
        "download matrix: {runs} runs per row, {secs} s per case; delay line between modem and server \
         (jitter {jitter_ms} ms); 4+4 bulk TCP with autotuned windows started together, image upload, \
         video 50 pps each way (1000 B payload on FTTC, 300 B on ADSL); churn = web-like downloads, Pareto(1.3) sizes from 10 kB, 5/s; \
         product at {product_pct} % of the download line{}",
        if extra.is_empty() {
            String::new()
        } else {
            format!(" with {}", extra.join(", "))
        }
    );
    println!(
        "video p99 in ms as 'median / worst' of the runs' p99s; idle = the video alone on the idle line \
         (product installed) in the same runs; target = idle p99 + one framed MTU at the line rate + 2 ms; \
         'ok' = runs meeting it; goodput = download goodput (iperf3 + video + churn) as % of what the framing allows\n"
    );
    let header = [
        "line",
        "rtt",
        "cc",
        "churn",
        "idle dn p99",
        "target",
        "product dn p99",
        "ok",
        "HTB 85 % dn p99",
        "HTB 95 % dn p99",
        "goodput prod",
        "ok>=90",
        "goodput HTB85",
        "goodput HTB95",
    ];
    let mut table = Vec::new();
    let mut up_table = Vec::new();
    for row in rows {
        let of = |gw: Gw| -> Vec<&Results> {
            row.runs
                .iter()
                .filter_map(|outs| outs.iter().find(|o| o.gw == gw).map(|o| &o.results))
                .collect()
        };
        let prod = of(Gw::Product);
        let mtu_dn = row.profile.mtu_ms(row.profile.line.down_bps);
        let mtu_up = row.profile.mtu_ms(row.profile.line.up_bps);
        let gp = |rs: &[&Results]| -> Vec<f64> {
            rs.iter()
                .map(|r| goodput_pct(&row.profile, r, secs))
                .collect()
        };
        let gp_prod = gp(&prod);
        let ok_gp = gp_prod.iter().filter(|&&g| g >= 90.0).count();
        let mp = |v: &[f64]| format!("{:.1} %", pct(v, 50.0));
        let churn_fct = |rs: &[&Results]| -> String {
            let v: Vec<f64> = rs
                .iter()
                .filter_map(|r| r.churn.as_ref())
                .flat_map(|c| c.small_fct_ms.iter().copied())
                .collect();
            if v.is_empty() {
                "-".into()
            } else {
                format!("{:.0} / {:.0}", pct(&v, 50.0), pct(&v, 95.0))
            }
        };
        let label = vec![
            row.profile.name.to_string(),
            format!("{} ms", row.rtt_ms),
            format!("{}{}", row.cc, if row.ecn { "+ecn" } else { "" }),
            if row.churn { "yes" } else { "no" }.into(),
        ];
        let mut down = label.clone();
        down.extend(latency_cells(
            &prod,
            &of,
            mtu_dn,
            |r| &r.video_down,
            |i| &i.1,
        ));
        down.extend([
            mp(&gp_prod),
            format!("{ok_gp}/{}", prod.len()),
            mp(&gp(&of(Gw::Htb(85)))),
            mp(&gp(&of(Gw::Htb(95)))),
        ]);
        table.push(down);
        let mut up = label;
        up.extend(latency_cells(&prod, &of, mtu_up, |r| &r.video_up, |i| &i.0));
        up.extend([churn_fct(&prod), churn_fct(&of(Gw::Htb(95)))]);
        up_table.push(up);
    }
    print_table(&header, &table);
    println!(
        "\nupload video p99 (ms, median / worst; target = idle + one framed MTU at the upload rate + 2 ms), \
         and the churn's flow completion times of transfers under 100 kB (ms, median / p95 over all runs)\n"
    );
    print_table(
        &[
            "line",
            "rtt",
            "cc",
            "churn",
            "idle up p99",
            "target",
            "product up p99",
            "ok",
            "HTB 85 % up p99",
            "HTB 95 % up p99",
            "churn fct prod",
            "churn fct HTB95",
        ],
        &up_table,
    );
}

fn print_table(header: &[&str], rows: &[Vec<String>]) {
    print!("{}", shaper_tests::report::text_table(header, rows));
}

fn to_json(rows: &[Row]) -> serde_json::Value {
    use serde_json::json;
    let stats = |d: &shaper_tests::DelayStats| json!({"p50_ms": d.p50_ms, "p99_ms": d.p99_ms, "max_ms": d.max_ms, "loss_pct": d.loss_pct});
    serde_json::Value::Array(
        rows.iter()
            .map(|row| {
                json!({
                    "line": row.profile.name,
                    "rtt_ms": row.rtt_ms,
                    "cc": row.cc,
                    "churn": row.churn,
                    "ecn": row.ecn,
                    "runs": row.runs.iter().map(|outs| outs.iter().map(|o| json!({
                        "gateway": o.gw.label(),
                        "video_down": stats(&o.results.video_down),
                        "video_up": stats(&o.results.video_up),
                        "idle_down": o.results.video_idle.as_ref().map(|(_, d)| stats(d)),
                        "idle_up": o.results.video_idle.as_ref().map(|(u, _)| stats(u)),
                        "total_down_bps": o.results.total_down_bps,
                        "total_up_bps": o.results.total_up_bps,
                        "churn_bytes": o.results.churn.as_ref().map(|c| c.bytes),
                        "churn_completed": o.results.churn.as_ref().map(|c| c.completed),
                        "churn_failed": o.results.churn.as_ref().map(|c| c.failed),
                    })).collect::<Vec<_>>()).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}
