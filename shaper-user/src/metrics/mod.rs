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
//! interval). The exposition is built with tikv's `prometheus` crate (without its protobuf
//! feature; not `prometheus-client`, which writes OpenMetrics text): each scrape fills a
//! registry of its own (`Scrape`) and the crate's `TextEncoder` writes format 0.0.4. The
//! names, label sets, HELP texts, types and values are the ones this module has always
//! written. The call histograms are counted by the calls task as calls end (bucket counts,
//! sum and count, in calls.json) and handed to the registry as they are
//! (`Scrape::histogram`), not observed again at each scrape. What the encoder does its own
//! way, none of it of any matter to a Prometheus server:
//!
//! - families come sorted by name, not in the order [`render`] adds them, and the samples of
//!   a family sorted by their label values;
//! - the labels of a sample are sorted by name (`class`, `classid`, `direction`,
//!   `interface`);
//! - every value is written as an `f64` by Rust's `Display`: integral values without a
//!   fraction, a u64 counter exact up to 2^53, an infinity as `inf` (Prometheus' parser
//!   takes it as it takes `+Inf`; no value here can be one).
//!
//! Label values and HELP texts are escaped as the format says (`\`, `\n`, and in label
//! values `\"`), as they were before.

use std::collections::{BTreeMap, HashMap};

use prometheus::{
    core::{Collector, Desc},
    proto, Encoder as _, GaugeVec, IntCounterVec, Opts, Registry,
};

use crate::{calls_task::Histogram, dir::Dir, status};

mod listen;
mod server;
#[cfg(test)]
mod tests;

pub use listen::{bind, check_listen, interface_addresses, Bound};
pub use server::{
    serve_on, spawn, ANSWER_TIMEOUT, HEAD_TIMEOUT, INTERNAL_ERROR_BODY, MAX_CONNECTIONS,
    MAX_PER_PEER, MAX_REQUEST_BYTES,
};

/// The exposition format's content type: the encoder's ([`prometheus::TEXT_FORMAT`],
/// `text/plain; version=0.0.4`) with its charset said (label values are UTF-8).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

// ---------------------------------------------------------------------------
// Rendering.

/// The metric families of one scrape, in a registry of their own: one counter or gauge
/// vector per family name, registered at its first sample with that sample's label names;
/// histogram families (counted elsewhere, [`Scrape::histogram`]) registered at
/// [`Scrape::encode`].
#[derive(Default)]
struct Scrape {
    registry: Registry,
    counters: HashMap<String, IntCounterVec>,
    gauges: HashMap<String, GaugeVec>,
    histograms: BTreeMap<String, proto::MetricFamily>,
}

/// A histogram family whose buckets, sum and count were kept by whoever observed the
/// values (the calls task keeps them across scrapes): handed to the registry as it is.
struct Counted {
    desc: Desc,
    family: proto::MetricFamily,
}

impl Counted {
    /// The family, once its samples are known to have one set of label names.
    fn new(family: proto::MetricFamily) -> prometheus::Result<Counted> {
        let names = |m: &proto::Metric| -> Vec<String> {
            m.get_label().iter().map(|l| l.name().to_string()).collect()
        };
        let first = family.get_metric().first().map(names).unwrap_or_default();
        if let Some(m) = family.get_metric().iter().find(|m| names(m) != first) {
            return Err(prometheus::Error::Msg(format!(
                "label names {:?} after {first:?}",
                names(m)
            )));
        }
        let desc = Desc::new(
            family.name().to_string(),
            family.help().to_string(),
            first,
            HashMap::new(),
        )?;
        Ok(Counted { desc, family })
    }
}

impl Collector for Counted {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        vec![self.family.clone()]
    }
}

impl Scrape {
    /// The counter `name{labels}` set to `v`, a u64 read from the kernel: a fresh counter
    /// incremented by `v` from 0. The text format writes it as an f64 (exact up to 2^53).
    fn counter(&mut self, name: &str, help: &str, labels: &[(&str, &str)], v: u64) {
        debug_assert!(name.ends_with("_total"), "counter {name}");
        let r = family(&self.registry, &mut self.counters, name, || {
            IntCounterVec::new(Opts::new(name, help), &label_names(labels))
        })
        .and_then(|c| c.get_metric_with(&label_map(labels)))
        .map(|c| {
            // A second sample of one series would add to the first: render adds each once.
            debug_assert_eq!(c.get(), 0, "second sample of {name}{labels:?}");
            c.inc_by(v)
        });
        left_out(name, r);
    }

    /// The gauge `name{labels}` set to `v`.
    fn gauge(&mut self, name: &str, help: &str, labels: &[(&str, &str)], v: f64) {
        let r = family(&self.registry, &mut self.gauges, name, || {
            GaugeVec::new(Opts::new(name, help), &label_names(labels))
        })
        .and_then(|g| g.get_metric_with(&label_map(labels)))
        .map(|g| g.set(v));
        left_out(name, r);
    }

    /// The histogram `name{labels}` as `h` holds it: its buckets' upper bounds and
    /// cumulative counts (the encoder adds `+Inf`, the count), sum and count.
    fn histogram(&mut self, name: &str, help: &str, labels: &[(&str, &str)], h: &Histogram) {
        let mut sorted = labels.to_vec();
        sorted.sort_unstable();
        let mut m = proto::Metric::from_label(
            sorted
                .into_iter()
                .map(|(k, v)| {
                    let mut l = proto::LabelPair::default();
                    l.set_name(k.to_string());
                    l.set_value(v.to_string());
                    l
                })
                .collect(),
        );
        let mut p = proto::Histogram::default();
        p.set_bucket(
            h.le.iter()
                .zip(&h.counts)
                .map(|(le, n)| {
                    let mut b = proto::Bucket::default();
                    b.set_upper_bound(*le);
                    b.set_cumulative_count(*n);
                    b
                })
                .collect(),
        );
        p.set_sample_sum(h.sum);
        p.set_sample_count(h.count);
        m.set_histogram(p);
        self.histograms
            .entry(name.to_string())
            .or_insert_with(|| {
                let mut f = proto::MetricFamily::default();
                f.set_name(name.to_string());
                f.set_help(help.to_string());
                f.set_field_type(proto::MetricType::HISTOGRAM);
                f
            })
            .mut_metric()
            .push(m);
    }

    /// The text exposition of every family that has a sample.
    fn encode(self) -> String {
        for (name, family) in self.histograms {
            let r = Counted::new(family).and_then(|c| self.registry.register(Box::new(c)));
            left_out(&name, r);
        }
        let encoder = prometheus::TextEncoder::new();
        debug_assert_eq!(encoder.format_type(), prometheus::TEXT_FORMAT);
        let r = encoder.encode_to_string(&self.registry.gather());
        debug_assert!(r.is_ok(), "encoding the exposition: {r:?}");
        r.unwrap_or_else(|e| {
            log::error!("metrics: encoding the exposition: {e}");
            String::new()
        })
    }
}

/// The vector of the family `name`, made by `new` and registered at its first use.
fn family<V: Collector + Clone + 'static>(
    registry: &Registry,
    families: &mut HashMap<String, V>,
    name: &str,
    new: impl FnOnce() -> prometheus::Result<V>,
) -> prometheus::Result<V> {
    if let Some(v) = families.get(name) {
        return Ok(v.clone());
    }
    let v = new()?;
    registry.register(Box::new(v.clone()))?;
    families.insert(name.to_string(), v.clone());
    Ok(v)
}

fn label_names<'a>(labels: &[(&'a str, &str)]) -> Vec<&'a str> {
    labels.iter().map(|(k, _)| *k).collect()
}

fn label_map<'a>(labels: &[(&'a str, &'a str)]) -> HashMap<&'a str, &'a str> {
    labels.iter().copied().collect()
}

/// A sample the crate refused (a bad name, label names that differ from the family's first
/// sample's): a bug here, so it fails the tests; a running daemon logs it and serves the rest.
fn left_out(name: &str, r: prometheus::Result<()>) {
    debug_assert!(r.is_ok(), "metric {name}: {r:?}");
    if let Err(e) = r {
        log::error!("metrics: {name} left out: {e}");
    }
}

/// A rate in bit/s as bytes per second (Prometheus' base unit).
fn bytes_per_second(bps: u64) -> f64 {
    bps as f64 / 8.0
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

/// The report in Prometheus text exposition format 0.0.4. Gauges that hold a u64 (the
/// applied-at time, the backlog, qlen) are set as f64, exact up to 2^53 as the counters are.
pub fn render(r: &status::Report) -> String {
    let mut s = Scrape::default();
    s.gauge(
        "shaper_up",
        "1 when shaping is applied and its counters could be read.",
        &[],
        1.0,
    );
    s.gauge(
        "shaper_config_info",
        "The config file the running shaping was applied from (always 1).",
        &[("config", &r.config)],
        1.0,
    );
    s.gauge(
        "shaper_config_applied_timestamp_seconds",
        "Unix time at which the running config was applied.",
        &[],
        r.applied_at as f64,
    );

    let mut interface_of = BTreeMap::new();
    for d in &r.directions {
        interface_of.insert(d.direction.as_str(), d.interface.as_str());
        let dl = [
            ("direction", d.direction.as_str()),
            ("interface", d.interface.as_str()),
        ];
        s.gauge(
            "shaper_rate_bytes_per_second",
            "Shaped rate of the direction (the HTB root), in bytes per second.",
            &dl,
            bytes_per_second(d.rate_bps),
        );
        if let Some(k) = d.kernel_rate_bps {
            s.gauge(
                "shaper_rate_now_bytes_per_second",
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
                s.counter(name, help, &l, v);
            }
            s.gauge(
                "shaper_class_backlog_bytes",
                "Bytes queued in the class now.",
                &l,
                c.backlog_bytes as f64,
            );
            s.gauge(
                "shaper_class_queue_packets",
                "Packets queued in the class now (qlen).",
                &l,
                c.qlen as f64,
            );
            s.gauge(
                "shaper_class_guaranteed_rate_bytes_per_second",
                "Rate guaranteed to the class, in bytes per second.",
                &l,
                bytes_per_second(c.guaranteed_bps),
            );
            s.gauge(
                "shaper_class_ceiling_rate_bytes_per_second",
                "Rate the class may borrow up to, in bytes per second.",
                &l,
                bytes_per_second(c.ceiling_bps),
            );
            if let Some(r) = c.rate_bps {
                s.gauge(
                    "shaper_class_current_rate_bytes_per_second",
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
            s.counter(
                "shaper_rule_packets_total",
                "Packets matched by the rule; restarts at every apply.",
                &l,
                packets,
            );
            s.counter(
                "shaper_rule_bytes_total",
                "Bytes matched by the rule; restarts at every apply.",
                &l,
                bytes,
            );
        }
    }

    for (dir, counters) in &r.classifier {
        let iface = interface_of.get(dir.as_str()).copied().unwrap_or("");
        let l = [("direction", dir.as_str()), ("interface", iface)];
        for (name, v) in counters {
            s.counter(&classifier_metric(name), &classifier_help(name), &l, *v);
        }
    }
    if let Some(c) = &r.calls {
        s.gauge(
            "shaper_calls_active",
            "Calls in progress (RTP streams in the [calls] classes, by LAN host and peer).",
            &[],
            c.active as f64,
        );
        s.counter(
            "shaper_calls_ended_total",
            "Calls ended since `shaper run` started.",
            &[],
            c.ended,
        );
        s.counter(
            "shaper_calls_degraded_total",
            "Ended calls with loss over 1 % or jitter over 30 ms in a direction.",
            &[],
            c.degraded,
        );
        let h = &c.histograms;
        for d in Dir::ALL {
            let l = [("direction", d.name())];
            s.histogram(
                "shaper_call_loss_percent",
                "Packet loss (%) of the calls ended since `shaper run` started, per direction that carried media.",
                &l,
                &h.loss_percent[d],
            );
            s.histogram(
                "shaper_call_jitter_seconds",
                "RFC 3550 jitter (the largest of the direction's streams) of the calls ended since `shaper run` started, per direction that carried media with a known clock rate.",
                &l,
                &h.jitter_seconds[d],
            );
            s.histogram(
                "shaper_call_mos",
                "E-model MOS of the calls ended since `shaper run` started, per direction that carried media.",
                &l,
                &h.mos[d],
            );
        }
        s.histogram(
            "shaper_call_duration_seconds",
            "Duration of the calls ended since `shaper run` started.",
            &[],
            &h.duration_seconds,
        );
    }
    s.encode()
}
