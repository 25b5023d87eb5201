//! Prometheus metrics for `shaper run`: the counters of `shaper status` in the
//! text exposition format 0.0.4, served over plain HTTP/1.x on `GET /metrics`.
//!
//! Three rooms: this file renders the exposition ([`render`]); `listen.rs` says where the
//! endpoint may listen and binds it ([`check_listen`], [`bind`]); `server.rs` serves it
//! ([`spawn`], [`serve_on`]). The HTTP/1 protocol is hyper's (one request per connection,
//! `Connection: close`); what this module adds around it is its defence, since any host on
//! the LAN may be hostile:
//!
//! - It runs on a thread of its own with its own current-thread runtime ([`spawn`]): a
//!   scrape, slow or not, never waits for the daemon's loop (watchdog, health checks,
//!   signals) and the loop never waits for a scrape. A scrape reads what `shaper status`
//!   reads (the state file, netlink, the pinned maps) and holds nothing the daemon takes.
//! - The socket is bound to the interface that holds the listen address (SO_BINDTODEVICE,
//!   [`bind`]): Linux accepts a connection to any of its addresses on any interface (the
//!   weak host model), so without it a host on the WAN side could reach the LAN address
//!   through the WAN port. [`check_listen`] refuses the unspecified address and any
//!   address of the WAN interface. (In bridge mode the management address is on the
//!   bridge, whose ports include the WAN one: there the site's firewall keeps the WAN
//!   side out.)
//! - At most [`MAX_PER_PEER`] connections at once from one peer (an IPv4 address, an IPv6
//!   /64), more are closed at once, so one host cannot take the places Prometheus needs.
//!   At most [`MAX_CONNECTIONS`] in all: there the oldest idle connection (not sent its
//!   request yet, or answered) of the peer holding the most is closed for the new one.
//! - The request head (at most [`MAX_REQUEST_BYTES`]) must be in within [`HEAD_TIMEOUT`]
//!   of the accept (a byte a second does not extend it), the answer out within
//!   [`ANSWER_TIMEOUT`].
//! - Error bodies are generic ([`INTERNAL_ERROR_BODY`]): which file or map failed goes
//!   to the log.
//!
//! Counters are read from the kernel at each scrape (`status::collect` without a sampling
//! interval). The exposition is written here rather than with the `prometheus-client`
//! crate: that crate writes OpenMetrics text (a closing `# EOF`, counter families named
//! without `_total` and `_total` appended to their samples), not this format byte for byte.

use std::{collections::BTreeMap, fmt::Write as _};

use crate::status;

mod listen;
mod server;
#[cfg(test)]
mod tests;

pub use listen::{bind, check_listen, interface_addresses, Bound};
pub use server::{
    serve_on, spawn, ANSWER_TIMEOUT, HEAD_TIMEOUT, INTERNAL_ERROR_BODY, MAX_CONNECTIONS,
    MAX_PER_PEER, MAX_REQUEST_BYTES,
};

/// The exposition format's content type.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

// ---------------------------------------------------------------------------
// Rendering.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Counter,
    Gauge,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }
}

struct Family {
    help: String,
    kind: Kind,
    /// Rendered `{labels}` (possibly empty) and value.
    samples: Vec<(String, String)>,
}

/// Metric families in first-use order; samples of one family stay together
/// however they are added.
#[derive(Default)]
struct Families {
    order: Vec<String>,
    by_name: BTreeMap<String, Family>,
}

impl Families {
    fn add(&mut self, name: &str, kind: Kind, help: &str, labels: &[(&str, &str)], value: Val) {
        debug_assert!(valid_metric_name(name), "metric name {name}");
        debug_assert!(kind != Kind::Counter || name.ends_with("_total"));
        let fam = self.by_name.entry(name.to_string()).or_insert_with(|| {
            self.order.push(name.to_string());
            Family {
                help: help.to_string(),
                kind,
                samples: Vec::new(),
            }
        });
        fam.samples.push((render_labels(labels), value.render()));
    }

    fn finish(self) -> String {
        let mut out = String::new();
        for name in &self.order {
            let Some(f) = self.by_name.get(name) else {
                continue;
            };
            let _ = writeln!(out, "# HELP {name} {}", escape_help(&f.help));
            let _ = writeln!(out, "# TYPE {name} {}", f.kind.as_str());
            for (labels, value) in &f.samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        }
        out
    }
}

#[derive(Clone, Copy)]
enum Val {
    U(u64),
    F(f64),
}

impl Val {
    fn render(self) -> String {
        match self {
            Val::U(v) => v.to_string(),
            Val::F(v) if v.is_nan() => "NaN".to_string(),
            Val::F(v) if v.is_infinite() => if v > 0.0 { "+Inf" } else { "-Inf" }.to_string(),
            Val::F(v) => v.to_string(),
        }
    }
}

/// A rate in bit/s as bytes per second (Prometheus' base unit).
fn bytes_per_second(bps: u64) -> Val {
    Val::F(bps as f64 / 8.0)
}

fn valid_metric_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_' || ch == ':')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
}

/// A label value as it goes between the quotes: `\` `"` and newline escaped.
pub fn escape_label_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// HELP text: `\` and newline escaped.
fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

fn render_labels(labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape_label_value(v)))
        .collect();
    format!("{{{}}}", parts.join(","))
}

/// `shaper_classifier_<name>_total`, with anything but `[a-zA-Z0-9_]` in
/// the counter's name made `_`.
fn classifier_metric(counter: &str) -> String {
    let clean: String = counter
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("shaper_classifier_{clean}_total")
}

fn classifier_help(counter: &str) -> String {
    let what = match counter {
        "packets" => "Packets seen by the classifier",
        "non_ip" => "Packets that were neither IPv4 nor IPv6 (sent to the default class)",
        "malformed" => "Packets the classifier could not parse (sent to the default class)",
        "fragments_followed" => "Later IP fragments given the class of their first fragment",
        "fragments_unknown" => {
            "Later IP fragments whose first fragment was not seen (sent to the default class)"
        }
        "default_class" => "Packets no rule matched (sent to the default class)",
        "dscp_remarked" => "Packets whose DSCP was rewritten",
        "ipv6" => "IPv6 packets seen by the classifier",
        "pure_tcp_acks" => "Pure TCP ACKs (no payload) seen by the classifier",
        other => return format!("Classifier counter `{other}`; restarts at every apply."),
    };
    format!("{what}; restarts at every apply.")
}

/// The report in Prometheus text exposition format 0.0.4.
pub fn render(r: &status::Report) -> String {
    let mut f = Families::default();
    f.add(
        "shaper_up",
        Kind::Gauge,
        "1 when shaping is applied and its counters could be read.",
        &[],
        Val::U(1),
    );
    f.add(
        "shaper_config_info",
        Kind::Gauge,
        "The config file the running shaping was applied from (always 1).",
        &[("config", &r.config)],
        Val::U(1),
    );
    f.add(
        "shaper_config_applied_timestamp_seconds",
        Kind::Gauge,
        "Unix time at which the running config was applied.",
        &[],
        Val::U(r.applied_at),
    );

    let mut interface_of = BTreeMap::new();
    for d in &r.directions {
        interface_of.insert(d.direction.as_str(), d.interface.as_str());
        let dl = [
            ("direction", d.direction.as_str()),
            ("interface", d.interface.as_str()),
        ];
        f.add(
            "shaper_rate_bytes_per_second",
            Kind::Gauge,
            "Shaped rate of the direction (the HTB root), in bytes per second.",
            &dl,
            bytes_per_second(d.rate_bps),
        );
        if let Some(k) = d.kernel_rate_bps {
            f.add(
                "shaper_rate_now_bytes_per_second",
                Kind::Gauge,
                "The direction's rate in the kernel now, in bytes per second: below shaper_rate_bytes_per_second while arrival accounting or autorate holds it down.",
                &dl,
                bytes_per_second(k),
            );
        }
    }

    for d in &r.directions {
        for c in &d.classes {
            let l = [
                ("direction", d.direction.as_str()),
                ("interface", d.interface.as_str()),
                ("class", c.name.as_str()),
                ("classid", c.classid.as_str()),
            ];
            let counters: [(&str, &str, u64); 6] = [
                (
                    "shaper_class_packets_total",
                    "Packets sent by the HTB class.",
                    c.packets,
                ),
                (
                    "shaper_class_bytes_total",
                    "Bytes sent by the HTB class.",
                    c.bytes,
                ),
                (
                    "shaper_class_drops_total",
                    "Packets dropped in the HTB class (queue full or AQM).",
                    c.drops,
                ),
                (
                    "shaper_class_overlimits_total",
                    "Times the HTB class was over its rate and had to wait or borrow.",
                    c.overlimits,
                ),
                (
                    "shaper_class_classified_packets_total",
                    "Packets the classifier steered into the class; restarts at every apply.",
                    c.classified_packets,
                ),
                (
                    "shaper_class_classified_bytes_total",
                    "Bytes the classifier steered into the class; restarts at every apply.",
                    c.classified_bytes,
                ),
            ];
            for (name, help, v) in counters {
                f.add(name, Kind::Counter, help, &l, Val::U(v));
            }
            f.add(
                "shaper_class_backlog_bytes",
                Kind::Gauge,
                "Bytes queued in the class now.",
                &l,
                Val::U(c.backlog_bytes),
            );
            f.add(
                "shaper_class_queue_packets",
                Kind::Gauge,
                "Packets queued in the class now (qlen).",
                &l,
                Val::U(c.qlen),
            );
            f.add(
                "shaper_class_guaranteed_rate_bytes_per_second",
                Kind::Gauge,
                "Rate guaranteed to the class, in bytes per second.",
                &l,
                bytes_per_second(c.guaranteed_bps),
            );
            f.add(
                "shaper_class_ceiling_rate_bytes_per_second",
                Kind::Gauge,
                "Rate the class may borrow up to, in bytes per second.",
                &l,
                bytes_per_second(c.ceiling_bps),
            );
            if let Some(r) = c.rate_bps {
                f.add(
                    "shaper_class_current_rate_bytes_per_second",
                    Kind::Gauge,
                    "Rate the class is sending at now (the kernel's rate estimator), in bytes per second.",
                    &l,
                    bytes_per_second(r),
                );
            }
        }
    }

    for (dir, pick) in [
        (
            "upload",
            (|x: &status::RuleReport| (x.upload_packets, x.upload_bytes))
                as fn(&status::RuleReport) -> (u64, u64),
        ),
        ("download", |x| (x.download_packets, x.download_bytes)),
    ] {
        let iface = interface_of.get(dir).copied().unwrap_or("");
        for rr in &r.rules {
            let (packets, bytes) = pick(rr);
            let l = [
                ("direction", dir),
                ("interface", iface),
                ("rule", rr.name.as_str()),
                ("class", rr.class.as_str()),
            ];
            f.add(
                "shaper_rule_packets_total",
                Kind::Counter,
                "Packets matched by the rule; restarts at every apply.",
                &l,
                Val::U(packets),
            );
            f.add(
                "shaper_rule_bytes_total",
                Kind::Counter,
                "Bytes matched by the rule; restarts at every apply.",
                &l,
                Val::U(bytes),
            );
        }
    }

    for (dir, counters) in &r.classifier {
        let iface = interface_of.get(dir.as_str()).copied().unwrap_or("");
        let l = [("direction", dir.as_str()), ("interface", iface)];
        for (name, v) in counters {
            f.add(
                &classifier_metric(name),
                Kind::Counter,
                &classifier_help(name),
                &l,
                Val::U(*v),
            );
        }
    }
    f.finish()
}
