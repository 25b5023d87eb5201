//! The exposition (rendered, then read back by a strict reader of format 0.0.4) and
//! where the endpoint may listen. The server's tests are in `server/tests.rs`.

use super::listen::{all_addresses, bind_on_device};
use super::*;
use crate::status::{ClassReport, DirReport, Report, RuleReport};
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// A parsed sample: metric name, labels (unescaped), value.
type Parsed = (String, Vec<(String, String)>, f64);

/// One histogram series as read back: its buckets (`le`, count), `_sum` and `_count`.
type Series = (Vec<(String, f64)>, f64, f64);

fn class(name: &str, classid: &str, packets: u64) -> ClassReport {
    ClassReport {
        name: name.to_string(),
        classid: classid.to_string(),
        guaranteed_bps: 2_500_000,
        ceiling_bps: 10_000_001,
        priority: 0,
        leaf: "fq_codel".to_string(),
        packets,
        bytes: packets * 1000,
        drops: 3,
        overlimits: 4,
        backlog_bytes: 1514,
        qlen: 1,
        rate_bps: None,
        classified_packets: packets + 1,
        classified_bytes: (packets + 1) * 1000,
    }
}

fn report() -> Report {
    let dir = |direction: &str, interface: &str, rate| DirReport {
        direction: direction.to_string(),
        interface: interface.to_string(),
        rate_bps: rate,
        kernel_rate_bps: Some(rate),
        classes: vec![class("video", "1:10", 7), class("default", "1:2", 9)],
    };
    let mut classifier = BTreeMap::new();
    for d in ["upload", "download"] {
        let m: BTreeMap<String, u64> = shaper_common::GLOBAL_COUNTER_NAMES
            .iter()
            .enumerate()
            .map(|(i, n)| (n.to_string(), i as u64))
            .collect();
        classifier.insert(d.to_string(), m);
    }
    Report {
        config: "/etc/shaper/we\"ird\\path\nsite.toml".to_string(),
        applied_at: 1_764_000_000,
        fq_codel: true,
        cake: false,
        directions: vec![
            dir("upload", "wan0", 9_500_000),
            dir("download", "lan0", 36_000_000),
        ],
        rules: vec![RuleReport {
            name: "teams-media".to_string(),
            class: "video".to_string(),
            upload_packets: 11,
            upload_bytes: 11_000,
            download_packets: 12,
            download_bytes: 12_000,
        }],
        classifier,
        hosts: None,
        last_crash: None,
        calls: Some(crate::status::CallsSummary {
            active: 2,
            ended: 5,
            degraded: 1,
            histograms: crate::calls_task::CallHistograms::default(),
        }),
    }
}

fn valid_metric_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_' || ch == ':')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
}

/// A strict reader of one sample line: name, labels (unescaped), value.
fn parse_sample(line: &str) -> std::result::Result<Parsed, String> {
    let bytes = line.as_bytes();
    let mut i = 0;
    while i < bytes.len()
        && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_' || bytes[i] == b':')
    {
        i += 1;
    }
    let name = &line[..i];
    if !valid_metric_name(name) {
        return Err(format!("bad metric name in {line:?}"));
    }
    let mut labels = Vec::new();
    if bytes.get(i) == Some(&b'{') {
        i += 1;
        loop {
            if bytes.get(i) == Some(&b'}') {
                i += 1;
                break;
            }
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            let key = &line[start..i];
            if key.is_empty() || key.as_bytes()[0].is_ascii_digit() {
                return Err(format!("bad label name in {line:?}"));
            }
            if bytes.get(i) != Some(&b'=') || bytes.get(i + 1) != Some(&b'"') {
                return Err(format!("expected =\" after {key} in {line:?}"));
            }
            i += 2;
            let mut value = String::new();
            let mut chars = line[i..].char_indices();
            loop {
                let Some((off, c)) = chars.next() else {
                    return Err(format!("unterminated label value in {line:?}"));
                };
                match c {
                    '"' => {
                        i += off + 1;
                        break;
                    }
                    '\\' => match chars.next() {
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        Some((_, 'n')) => value.push('\n'),
                        other => return Err(format!("bad escape {other:?} in {line:?}")),
                    },
                    '\n' => return Err(format!("raw newline in {line:?}")),
                    c => value.push(c),
                }
            }
            labels.push((key.to_string(), value));
            match bytes.get(i) {
                Some(b',') => i += 1,
                Some(b'}') => {}
                _ => return Err(format!("expected , or }} in {line:?}")),
            }
        }
    }
    let rest = line[i..]
        .strip_prefix(' ')
        .ok_or_else(|| format!("no space before the value in {line:?}"))?;
    let mut fields = rest.split(' ');
    let v = fields.next().unwrap_or("");
    let value = match v {
        "NaN" => f64::NAN,
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v
            .parse::<f64>()
            .map_err(|_| format!("bad value {v:?} in {line:?}"))?,
    };
    if let Some(ts) = fields.next() {
        ts.parse::<i64>()
            .map_err(|_| format!("bad timestamp in {line:?}"))?;
    }
    if fields.next().is_some() {
        return Err(format!("trailing fields in {line:?}"));
    }
    Ok((name.to_string(), labels, value))
}

/// The family a sample belongs to: its own name, or for a histogram's `_bucket`, `_sum`
/// and `_count` the histogram's.
fn family_of<'a>(types: &BTreeMap<String, String>, name: &'a str) -> &'a str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .filter_map(|suffix| name.strip_suffix(suffix))
        .find(|base| types.get(*base).is_some_and(|k| k == "histogram"))
        .unwrap_or(name)
}

/// Checks the whole exposition: every line is HELP, TYPE or a sample that
/// parses; one HELP and TYPE per family, before its samples; samples of a
/// family together; counters end in `_total`; no duplicate series; a
/// histogram's buckets cumulative, ending at `+Inf` with its count.
fn check_exposition(text: &str) -> Vec<Parsed> {
    assert!(text.ends_with('\n'), "ends with a newline");
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut helped = BTreeSet::new();
    let mut finished = BTreeSet::new();
    let mut current: Option<String> = None;
    let mut series = BTreeSet::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, _) = rest.split_once(' ').expect("HELP name text");
            assert!(valid_metric_name(name), "{line}");
            assert!(helped.insert(name.to_string()), "second HELP: {line}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(kind != "counter" || name.ends_with("_total"), "{line}");
            assert!(
                types.insert(name.to_string(), kind.to_string()).is_none(),
                "second TYPE: {line}"
            );
            if let Some(c) = current.replace(name.to_string()) {
                finished.insert(c);
            }
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment {line:?}");
        let (name, labels, value) = parse_sample(line).unwrap_or_else(|e| panic!("{e}"));
        let family = family_of(&types, &name);
        assert_eq!(
            current.as_deref(),
            Some(family),
            "sample outside its family: {line}"
        );
        assert!(!finished.contains(family), "family split: {line}");
        assert!(helped.contains(family), "no HELP for {family}");
        let key = format!("{name}{labels:?}");
        assert!(series.insert(key), "duplicate series: {line}");
        samples.push((name, labels, value));
    }
    for (name, _) in types.iter().filter(|(_, k)| *k == "histogram") {
        check_histogram(&samples, name);
    }
    samples
}

/// A histogram's series, per label set (`le` aside): buckets in rising order of `le`
/// with counts that never fall, the last `+Inf` and equal to `_count`, and a `_sum`.
fn check_histogram(samples: &[Parsed], name: &str) {
    let bucket = format!("{name}_bucket");
    // By label set (`le` aside): each bucket's (le, count).
    let mut sets: BTreeMap<_, Vec<(f64, f64)>> = BTreeMap::new();
    for (n, l, v) in samples.iter().filter(|(n, _, _)| *n == bucket) {
        let le = l.iter().find(|(k, _)| k == "le").expect("le").1.as_str();
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or_else(|_| panic!("{n}: le {le:?}"))
        };
        let rest: Vec<_> = l.iter().filter(|(k, _)| k != "le").cloned().collect();
        sets.entry(rest).or_default().push((le, *v));
    }
    assert!(!sets.is_empty(), "{name}: no buckets");
    for (labels, buckets) in sets {
        assert!(
            buckets
                .windows(2)
                .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
            "{name}{labels:?}: {buckets:?}"
        );
        let want: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (&k[..], &v[..])).collect();
        let count = find(samples, &format!("{name}_count"), &want).expect("_count");
        assert_eq!(
            buckets.last().copied(),
            Some((f64::INFINITY, count.2)),
            "{name}{labels:?}"
        );
        assert!(find(samples, &format!("{name}_sum"), &want).is_some());
    }
}

fn find<'a>(samples: &'a [Parsed], name: &str, want: &[(&str, &str)]) -> Option<&'a Parsed> {
    samples.iter().find(|(n, l, _)| {
        n == name
            && want
                .iter()
                .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
    })
}

#[test]
fn render_is_valid_exposition_with_every_series() {
    let text = render(&report());
    let s = check_exposition(&text);
    assert_eq!(find(&s, "shaper_up", &[]).map(|x| x.2), Some(1.0));
    assert_eq!(
        find(&s, "shaper_config_applied_timestamp_seconds", &[]).map(|x| x.2),
        Some(1_764_000_000.0)
    );
    let video_up = [
        ("direction", "upload"),
        ("interface", "wan0"),
        ("class", "video"),
        ("classid", "1:10"),
    ];
    for (name, v) in [
        ("shaper_class_packets_total", 7.0),
        ("shaper_class_bytes_total", 7000.0),
        ("shaper_class_drops_total", 3.0),
        ("shaper_class_overlimits_total", 4.0),
        ("shaper_class_backlog_bytes", 1514.0),
        ("shaper_class_queue_packets", 1.0),
        ("shaper_class_guaranteed_rate_bytes_per_second", 312_500.0),
        ("shaper_class_ceiling_rate_bytes_per_second", 1_250_000.125),
        ("shaper_class_classified_packets_total", 8.0),
        ("shaper_class_classified_bytes_total", 8000.0),
    ] {
        assert_eq!(find(&s, name, &video_up).map(|x| x.2), Some(v), "{name}");
    }
    assert_eq!(
        find(
            &s,
            "shaper_rate_bytes_per_second",
            &[("direction", "download"), ("interface", "lan0")]
        )
        .map(|x| x.2),
        Some(4_500_000.0)
    );
    assert_eq!(
        find(
            &s,
            "shaper_rate_now_bytes_per_second",
            &[("direction", "download"), ("interface", "lan0")]
        )
        .map(|x| x.2),
        Some(4_500_000.0)
    );
    let rule_down = [
        ("direction", "download"),
        ("interface", "lan0"),
        ("rule", "teams-media"),
        ("class", "video"),
    ];
    assert_eq!(
        find(&s, "shaper_rule_packets_total", &rule_down).map(|x| x.2),
        Some(12.0)
    );
    assert_eq!(
        find(&s, "shaper_rule_bytes_total", &rule_down).map(|x| x.2),
        Some(12_000.0)
    );
    for (i, n) in shaper_common::GLOBAL_COUNTER_NAMES.iter().enumerate() {
        let name = classifier_metric(n);
        assert_eq!(
            find(&s, &name, &[("direction", "upload"), ("interface", "wan0")]).map(|x| x.2),
            Some(i as f64),
            "{name}"
        );
    }
    assert!(text.contains(
        "shaper_classifier_pure_tcp_acks_total{direction=\"upload\",interface=\"wan0\"} 8\n"
    ));
    // 2 directions x 2 classes x 10 class series + 2 x 2 rule series + ...
    assert_eq!(
        s.iter()
            .filter(|x| x.0.starts_with("shaper_class_"))
            .count(),
        40
    );
}

#[test]
fn label_values_are_escaped_and_round_trip() {
    // The encoder's escaping of a label value: `\` `"` and newline, nothing else.
    let info_line = |config: &str| {
        let mut r = report();
        r.config = config.to_string();
        render(&r)
            .lines()
            .find(|l| l.starts_with("shaper_config_info{"))
            .map(str::to_string)
    };
    assert_eq!(
        info_line(r#"a"b\c"#).as_deref(),
        Some(r#"shaper_config_info{config="a\"b\\c"} 1"#)
    );
    assert_eq!(
        info_line("x\ny").as_deref(),
        Some(r#"shaper_config_info{config="x\ny"} 1"#)
    );
    assert_eq!(
        info_line("plain-1:10").as_deref(),
        Some(r#"shaper_config_info{config="plain-1:10"} 1"#)
    );
    let text = render(&report());
    assert!(
        text.contains(r#"shaper_config_info{config="/etc/shaper/we\"ird\\path\nsite.toml"} 1"#),
        "{text}"
    );
    let s = check_exposition(&text);
    let info = find(&s, "shaper_config_info", &[]).expect("config info");
    assert_eq!(info.1[0].1, "/etc/shaper/we\"ird\\path\nsite.toml");
    // Every line is one line: nothing unescaped leaked a newline.
    assert!(text
        .lines()
        .all(|l| l.starts_with('#') || l.starts_with("shaper_")));
}

#[test]
fn help_is_escaped_and_odd_counter_names_are_cleaned() {
    // The encoder's escaping of HELP text: `\` and newline.
    let mut help = Scrape::default();
    help.gauge("odd_help", "a\\b\nc", &[], 1.0);
    assert_eq!(
        help.encode(),
        "# HELP odd_help a\\\\b\\nc\n# TYPE odd_help gauge\nodd_help 1\n"
    );
    assert_eq!(
        classifier_metric("new-thing.v2"),
        "shaper_classifier_new_thing_v2_total"
    );
    let mut r = report();
    r.classifier
        .get_mut("upload")
        .expect("upload")
        .insert("new-thing".to_string(), 5);
    let s = check_exposition(&render(&r));
    assert!(find(
        &s,
        "shaper_classifier_new_thing_total",
        &[("direction", "upload")]
    )
    .is_some());
}

#[test]
fn empty_report_still_renders_valid() {
    let mut r = report();
    r.directions.clear();
    r.rules.clear();
    r.classifier.clear();
    r.calls = None;
    let s = check_exposition(&render(&r));
    assert_eq!(s.len(), 3, "up, config info, applied-at");
}

#[test]
fn values_render_as_prometheus_floats() {
    // The encoder writes every value as an f64 with Rust's `Display`: integral values
    // without a fraction, a u64 counter exact up to 2^53 (u64::MAX comes out as 2^64), an
    // infinity as `inf` (which Prometheus' parser and the reader above take as `+Inf`).
    let mut s = Scrape::default();
    s.gauge("v_nan", "NaN.", &[], f64::NAN);
    s.gauge("v_pos_inf", "+Inf.", &[], f64::INFINITY);
    s.gauge("v_neg_inf", "-Inf.", &[], f64::NEG_INFINITY);
    s.gauge("v_rate", "A rate.", &[], 1_187_500.0);
    s.counter("v_max_total", "u64::MAX.", &[], u64::MAX);
    s.counter("v_exact_total", "2^53.", &[], 1 << 53);
    let text = s.encode();
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .map(str::to_string)
    };
    assert_eq!(value("v_nan").as_deref(), Some("NaN"));
    assert_eq!(value("v_pos_inf").as_deref(), Some("inf"));
    assert_eq!(value("v_neg_inf").as_deref(), Some("-inf"));
    assert_eq!(value("v_rate").as_deref(), Some("1187500"));
    assert_eq!(
        value("v_max_total").as_deref(),
        Some("18446744073709552000")
    );
    assert_eq!(value("v_exact_total").as_deref(), Some("9007199254740992"));
    let samples = check_exposition(&text);
    let read = |name: &str| find(&samples, name, &[]).map(|x| x.2);
    assert!(read("v_nan").is_some_and(f64::is_nan));
    assert_eq!(read("v_pos_inf"), Some(f64::INFINITY));
    assert_eq!(read("v_neg_inf"), Some(f64::NEG_INFINITY));
    assert_eq!(read("v_max_total"), Some(u64::MAX as f64));
    assert_eq!(read("v_exact_total"), Some((1u64 << 53) as f64));
}

#[test]
fn families_are_sorted_by_name_and_labels_by_label_name() {
    // The encoder's order (the module doc says so): not the order render adds them in.
    let text = render(&report());
    let names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
        .collect();
    assert!(names.windows(2).all(|w| w[0] < w[1]), "{names:?}");
    let s = check_exposition(&text);
    assert!(
        s.iter()
            .all(|(_, l, _)| l.windows(2).all(|w| w[0].0 < w[1].0)),
        "{text}"
    );
}

#[test]
fn content_type_is_the_encoders() {
    use prometheus::Encoder as _;
    let encoder = prometheus::TextEncoder::new();
    assert_eq!(encoder.format_type(), "text/plain; version=0.0.4");
    assert_eq!(
        CONTENT_TYPE.strip_prefix(encoder.format_type()),
        Some("; charset=utf-8")
    );
}

#[test]
fn unspecified_addresses_are_refused() {
    for a in ["0.0.0.0:9464", "[::]:9464", "[::ffff:0.0.0.0]:9464"] {
        let addr: SocketAddr = a.parse().expect("addr");
        let e = check_listen(addr, "lo").expect_err(a);
        assert!(format!("{e:#}").contains("every address"), "{e:#}");
    }
}

#[test]
fn addresses_of_the_wan_interface_are_refused() {
    // Loopback plays the WAN here: every Linux network namespace has it.
    let lo = interface_addresses("lo").expect("getifaddrs");
    if !lo.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)) {
        eprintln!("SKIP: lo has no 127.0.0.1 here");
        return;
    }
    for a in ["127.0.0.1:9464", "[::ffff:127.0.0.1]:9464"] {
        let e = check_listen(a.parse().expect("addr"), "lo").expect_err(a);
        assert!(
            format!("{e:#}").contains("address of the WAN interface lo"),
            "{e:#}"
        );
    }
    // Another interface's address, or one nobody has, is fine.
    check_listen("127.0.0.1:9464".parse().expect("addr"), "nosuch0").expect("not the WAN's");
    check_listen("127.0.0.2:9464".parse().expect("addr"), "lo").expect("not lo's address");
}

/// One blocking HTTP exchange with a std client; returns the raw reply.

#[tokio::test]
async fn bound_to_the_interface_that_holds_the_address() {
    use std::os::fd::AsRawFd as _;
    if !all_addresses()
        .expect("getifaddrs")
        .iter()
        .any(|(n, a)| n == "lo" && *a == IpAddr::V4(Ipv4Addr::LOCALHOST))
    {
        eprintln!("SKIP: lo has no 127.0.0.1 here");
        return;
    }
    let b = bind_on_device("127.0.0.1:0".parse().expect("addr"), "nosuch0").expect("bind");
    assert_eq!(b.device, "lo");
    let mut name = [0u8; 16];
    let mut len = name.len() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `name`.
    let r = unsafe {
        libc::getsockopt(
            b.listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            name.as_mut_ptr().cast(),
            &mut len,
        )
    };
    assert_eq!(r, 0, "{}", io::Error::last_os_error());
    assert_eq!(&name[..2], b"lo");
    let e = bind_on_device("192.0.2.77:9464".parse().expect("addr"), "nosuch0")
        .err()
        .expect("nobody has 192.0.2.77");
    assert!(
        format!("{e:#}").contains("no interface has the address 192.0.2.77"),
        "{e:#}"
    );
}

#[test]
fn calls_are_counted() {
    let text = render(&report());
    for line in [
        "shaper_calls_active 2",
        "shaper_calls_ended_total 5",
        "shaper_calls_degraded_total 1",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
    }
    let mut r = report();
    r.calls = None;
    let text = render(&r);
    assert!(
        !text.contains("shaper_calls_") && !text.contains("shaper_call_"),
        "no [calls]: no call metrics"
    );
}

/// A call ended with these values: (loss %, jitter ms, MOS) up and down (None: no media
/// that way), and its duration.
fn ended_call(
    up: Option<(f64, Option<f64>, f64)>,
    down: Option<(f64, Option<f64>, f64)>,
    duration_s: f64,
) -> crate::media::CallRecord {
    let q = |v: Option<(f64, Option<f64>, f64)>| match v {
        Some((loss_pct, jitter_ms, mos)) => crate::media::DirQuality {
            streams: 1,
            loss_pct,
            jitter_ms,
            mos,
            ..Default::default()
        },
        None => crate::media::DirQuality::default(),
    };
    crate::media::CallRecord {
        lan_host: "h-1".into(),
        peer: "h-2".into(),
        start_s: 1_764_000_000.0,
        duration_s,
        turn: false,
        rtcp_packets: 0,
        up: q(up),
        down: q(down),
        degraded: Vec::new(),
    }
}

/// Three ended calls counted by the calls task (and through calls.json's JSON, as status
/// reads them) come out as histograms: each bucket's count, `_sum` and `_count`, per
/// direction; a direction without media is not counted, a jitter without a clock is not
/// counted in the jitter histogram; durations once per call.
#[test]
fn ended_calls_are_histograms() {
    let mut h = crate::calls_task::CallHistograms::default();
    for c in [
        ended_call(Some((0.0, Some(2.0), 4.4)), Some((0.3, None, 4.3)), 30.0),
        ended_call(Some((1.5, Some(25.0), 3.9)), None, 600.0),
        ended_call(
            Some((12.0, Some(120.0), 2.5)),
            Some((0.1, Some(1.0), 4.5)),
            5000.0,
        ),
    ] {
        h.observe(&c);
    }
    let json = serde_json::to_string(&h).expect("JSON");
    let h = serde_json::from_str(&json).expect("read back");
    let mut r = report();
    r.calls.as_mut().expect("calls").histograms = h;
    let s = check_exposition(&render(&r));
    let series = |name: &str, dir: Option<&str>| -> Series {
        let mut want = vec![];
        if let Some(d) = dir {
            want.push(("direction", d));
        }
        let buckets = s
            .iter()
            .filter(|(n, l, _)| {
                *n == format!("{name}_bucket")
                    && want
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, l, v)| {
                let le = l.iter().find(|(k, _)| k == "le").expect("le");
                (le.1.clone(), *v)
            })
            .collect();
        let one = |suffix: &str| {
            find(&s, &format!("{name}{suffix}"), &want)
                .unwrap_or_else(|| panic!("{name}{suffix} {dir:?}"))
                .2
        };
        (buckets, one("_sum"), one("_count"))
    };
    let loss: &[&str] = &["0.1", "0.5", "1", "2", "5", "10", "+Inf"];
    let jitter: &[&str] = &[
        "0.001", "0.005", "0.01", "0.02", "0.03", "0.05", "0.1", "+Inf",
    ];
    let mos: &[&str] = &["1", "2", "3", "3.5", "4", "4.3", "4.5", "+Inf"];
    let duration: &[&str] = &["10", "60", "300", "900", "1800", "3600", "+Inf"];
    let (up, down) = (Some("upload"), Some("download"));
    // (family, direction, bucket bounds, cumulative counts, _sum, _count)
    type Want<'a> = (&'a str, Option<&'a str>, &'a [&'a str], &'a [f64], f64, f64);
    #[rustfmt::skip]
    let want: [Want; 7] = [
        ("shaper_call_loss_percent", up, loss, &[1., 1., 1., 2., 2., 2., 3.], 13.5, 3.),
        // A loss of exactly 0.1 % is in the 0.1 bucket (le: at or below).
        ("shaper_call_loss_percent", down, loss, &[1., 2., 2., 2., 2., 2., 2.], 0.4, 2.),
        ("shaper_call_jitter_seconds", up, jitter, &[0., 1., 1., 1., 2., 2., 2., 3.], 0.147, 3.),
        ("shaper_call_jitter_seconds", down, jitter, &[1.; 8], 0.001, 1.),
        ("shaper_call_mos", up, mos, &[0., 0., 1., 1., 2., 2., 3., 3.], 10.8, 3.),
        ("shaper_call_mos", down, mos, &[0., 0., 0., 0., 0., 1., 2., 2.], 8.8, 2.),
        ("shaper_call_duration_seconds", None, duration, &[0., 1., 1., 2., 2., 2., 3.], 5630.0, 3.),
    ];
    for (name, dir, le, counts, sum, count) in want {
        let (got, got_sum, got_count) = series(name, dir);
        let buckets: Vec<(String, f64)> = le
            .iter()
            .map(|x| x.to_string())
            .zip(counts.iter().copied())
            .collect();
        assert_eq!(got, buckets, "{name} {dir:?}");
        assert!(
            (got_sum - sum).abs() < 1e-9,
            "{name} {dir:?}: sum {got_sum} vs {sum}"
        );
        assert_eq!(got_count, count, "{name} {dir:?}");
    }
    let text = render(&r);
    assert!(
        text.contains("# TYPE shaper_call_mos histogram\n"),
        "{text}"
    );
    assert!(
        text.contains("shaper_call_duration_seconds_count 3\n"),
        "{text}"
    );
}

/// The histograms keep one count per bucket however many calls end.
#[test]
fn call_histograms_do_not_grow() {
    use crate::dir::Dir;
    let mut h = crate::calls_task::CallHistograms::default();
    for _ in 0..1000 {
        h.observe(&ended_call(Some((1.0, Some(10.0), 4.0)), None, 60.0));
    }
    let up = [
        &h.loss_percent[Dir::Up],
        &h.jitter_seconds[Dir::Up],
        &h.mos[Dir::Up],
        &h.duration_seconds,
    ];
    for x in up {
        assert_eq!((x.counts.len(), x.count), (x.le.len(), 1000), "{x:?}");
    }
    assert_eq!(h.mos[Dir::Down].count, 0, "no media down");
    // calls.json from before the histograms reads as none counted.
    let live: crate::calls_task::Live =
        serde_json::from_str(r#"{"version":1,"updated_at":0,"calls":[],"ended":4,"degraded":0}"#)
            .expect("an older calls.json");
    assert_eq!(
        live.histograms,
        crate::calls_task::CallHistograms::default()
    );
}
