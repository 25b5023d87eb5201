//! Prometheus metrics for `shaper run`: the counters of `shaper status` in the
//! text exposition format 0.0.4, served over plain HTTP/1.x on `GET /metrics`.
//!
//! The server is deliberately small: plain tokio, one task per connection, at
//! most [`MAX_CONNECTIONS`] at once, a request head of at most
//! [`MAX_REQUEST_BYTES`], [`CONNECTION_TIMEOUT`] for the whole exchange, one
//! response per connection (`Connection: close`). Counters are read from the
//! kernel at each scrape (`status::collect` without a sampling interval).
//!
//! The endpoint must not be reachable from the internet: [`check_listen`]
//! refuses the unspecified address and any address of the WAN interface.

use std::{
    collections::BTreeMap,
    ffi::CStr,
    fmt::Write as _,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};

use crate::{apply::Paths, config::Policy, status};

/// Largest request head (request line and headers) accepted.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Time allowed for one connection: reading the request, collecting, answering.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more are closed straight away.
pub const MAX_CONNECTIONS: usize = 16;

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

// ---------------------------------------------------------------------------
// Where it may listen.

/// Fails if `addr` is the unspecified address (which includes the WAN's) or
/// one of the addresses the WAN interface `wan_ifname` has now (aliases such
/// as `wan0:1` included). IPv4-mapped IPv6 addresses count as their IPv4.
pub fn check_listen(addr: SocketAddr, wan_ifname: &str) -> Result<()> {
    let ip = canonical(addr.ip());
    if ip.is_unspecified() {
        bail!(
            "telemetry.listen = \"{addr}\": refusing to serve metrics on every address, \
             which includes the WAN interface {wan_ifname}; give a LAN or loopback address"
        );
    }
    let wan = interface_addresses(wan_ifname)
        .with_context(|| format!("listing the addresses of {wan_ifname}"))?;
    if wan.contains(&ip) {
        bail!(
            "telemetry.listen = \"{addr}\": {ip} is an address of the WAN interface \
             {wan_ifname}; refusing to serve metrics there (give a LAN or loopback address)"
        );
    }
    Ok(())
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// The IPv4 and IPv6 addresses of `ifname` (and its `ifname:label` aliases)
/// in the current network namespace, by getifaddrs(3).
pub fn interface_addresses(ifname: &str) -> Result<Vec<IpAddr>> {
    struct List(*mut libc::ifaddrs);
    impl Drop for List {
        fn drop(&mut self) {
            if !self.0.is_null() {
                // SAFETY: the list came from a successful getifaddrs and is freed once.
                unsafe { libc::freeifaddrs(self.0) };
            }
        }
    }
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head into `head` on success.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error()).context("getifaddrs");
    }
    let list = List(head);
    let mut out = Vec::new();
    let mut p = list.0;
    while !p.is_null() {
        // SAFETY: p is a node of the list, valid until freeifaddrs.
        let ifa = unsafe { &*p };
        p = ifa.ifa_next;
        if ifa.ifa_name.is_null() || ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }.to_bytes();
        let ours = name == ifname.as_bytes()
            || (name.starts_with(ifname.as_bytes()) && name.get(ifname.len()) == Some(&b':'));
        if !ours {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr whose family says its real type.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        match family {
            libc::AF_INET => {
                // SAFETY: family AF_INET: the sockaddr is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    sin.sin_addr.s_addr,
                ))));
            }
            libc::AF_INET6 => {
                // SAFETY: family AF_INET6: the sockaddr is a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
            }
            _ => {}
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Serving.

/// The `shaper run` hook, called once the first apply has succeeded: checks
/// `policy.metrics_listen` against the WAN interface (again: it may have come
/// up since the daemon started), binds and serves in the background. Never
/// fails the daemon: a refused or unbindable address is logged and the
/// shaping goes on without metrics. Must be called inside a tokio runtime.
pub fn start(policy: &Policy, paths: &Paths) {
    let Some(addr) = policy.metrics_listen else {
        return;
    };
    let started = check_listen(addr, &policy.wan).and_then(|()| {
        let std_listener = std::net::TcpListener::bind(addr)
            .with_context(|| format!("binding the metrics endpoint to {addr}"))?;
        std_listener.set_nonblocking(true)?;
        let _rt = tokio::runtime::Handle::try_current()
            .context("the metrics endpoint needs a tokio runtime")?;
        Ok(TcpListener::from_std(std_listener)?)
    });
    match started {
        Ok(listener) => {
            log::info!("serving Prometheus metrics on http://{addr}/metrics");
            let paths = paths.clone();
            tokio::spawn(async move {
                if let Err(e) = serve_on(listener, paths).await {
                    log::error!("metrics endpoint stopped: {e:#}");
                }
            });
        }
        Err(e) => log::error!("metrics endpoint not started, shaping goes on: {e:#}"),
    }
}

/// Binds `addr` and serves `GET /metrics` until the task is dropped. Does not
/// check the address: see [`check_listen`].
pub async fn serve(addr: SocketAddr, paths: Paths) -> Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint to {addr}"))?;
    serve_on(listener, paths).await
}

/// Serves `GET /metrics` on a bound listener until the task is dropped.
pub async fn serve_on(listener: TcpListener, paths: Paths) -> Result<()> {
    let paths = Arc::new(paths);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                log::warn!("metrics endpoint: accept: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            log::debug!("metrics endpoint: too many connections; closing {peer}");
            continue;
        };
        let paths = paths.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(CONNECTION_TIMEOUT, handle(&stream, &paths)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => log::debug!("metrics endpoint: {peer}: {e}"),
                Err(_) => log::debug!("metrics endpoint: {peer}: timed out"),
            }
            drop(permit);
        });
    }
}

/// What the request head asked for.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// GET (`head: false`) or HEAD (`head: true`) of a path (query removed).
    Get { path: String, head: bool },
    /// A well-formed request with another method.
    OtherMethod,
    /// Not an HTTP/1.x request line.
    Bad,
}

/// Parses the request line of a request head.
pub fn parse_request(head: &[u8]) -> Request {
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let Ok(line) = std::str::from_utf8(&head[..line_end]) else {
        return Request::Bad;
    };
    let line = line.strip_suffix('\r').unwrap_or(line);
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Request::Bad;
    };
    if method.is_empty()
        || !method.bytes().all(|b| b.is_ascii_alphabetic())
        || !target.starts_with('/')
        || !version.starts_with("HTTP/1.")
    {
        return Request::Bad;
    }
    let path = target.split('?').next().unwrap_or(target).to_string();
    match method {
        "GET" => Request::Get { path, head: false },
        "HEAD" => Request::Get { path, head: true },
        _ => Request::OtherMethod,
    }
}

/// Where the head ends (after the blank line), if it has.
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

enum Head {
    Complete(Vec<u8>),
    TooLarge,
    Closed,
}

async fn read_head(stream: &TcpStream) -> io::Result<Head> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        stream.readable().await?;
        match stream.try_read(&mut chunk) {
            Ok(0) => return Ok(Head::Closed),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if let Some(end) = head_end(&buf) {
                    buf.truncate(end);
                    return Ok(Head::Complete(buf));
                }
                if buf.len() > MAX_REQUEST_BYTES {
                    return Ok(Head::TooLarge);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

async fn write_all(stream: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        stream.writable().await?;
        match stream.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn response(status: &str, content_type: &str, extra: &str, body: &str, head_only: bool) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        r.extend_from_slice(body.as_bytes());
    }
    r
}

fn text(status: &str, body: &str) -> Vec<u8> {
    response(status, "text/plain; charset=utf-8", "", body, false)
}

async fn handle(stream: &TcpStream, paths: &Paths) -> io::Result<()> {
    let reply = match read_head(stream).await? {
        Head::Closed => return Ok(()),
        Head::TooLarge => text(
            "431 Request Header Fields Too Large",
            "request head too large\n",
        ),
        Head::Complete(head) => match parse_request(&head) {
            Request::Bad => text("400 Bad Request", "bad request\n"),
            Request::OtherMethod => response(
                "405 Method Not Allowed",
                "text/plain; charset=utf-8",
                "Allow: GET, HEAD\r\n",
                "only GET and HEAD\n",
                false,
            ),
            Request::Get { path, .. } if path != "/metrics" => {
                text("404 Not Found", "not found; metrics are at /metrics\n")
            }
            Request::Get { head, .. } => match status::collect(paths, 0.0).await {
                Ok(Some(r)) => response("200 OK", CONTENT_TYPE, "", &render(&r), head),
                Ok(None) => text(
                    "503 Service Unavailable",
                    "shaping is not applied; no counters to report\n",
                ),
                Err(e) => {
                    log::warn!("metrics endpoint: reading the counters: {e:#}");
                    text(
                        "500 Internal Server Error",
                        &format!("reading the counters failed: {e:#}\n"),
                    )
                }
            },
        },
    };
    write_all(stream, &reply).await?;
    // Half-close, then read what the client still sends (briefly, bounded):
    // closing with unread input would reset the connection and could lose
    // the reply on the client's side.
    let fd = std::os::fd::AsRawFd::as_raw_fd(stream);
    // SAFETY: fd is the stream's open socket; shutdown does not invalidate it.
    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
    let _ = tokio::time::timeout(LINGER, drain(stream)).await;
    Ok(())
}

/// How long a closing connection waits for the client's end.
const LINGER: Duration = Duration::from_secs(1);

/// Reads and discards up to 64 KiB until the client closes.
async fn drain(stream: &TcpStream) {
    let mut chunk = [0u8; 4096];
    let mut left = 64 * 1024usize;
    while left > 0 {
        if stream.readable().await.is_err() {
            return;
        }
        match stream.try_read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => left = left.saturating_sub(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{ClassReport, DirReport, Report, RuleReport};
    use std::collections::{BTreeMap, BTreeSet};

    /// A parsed sample: metric name, labels (unescaped), value.
    type Parsed = (String, Vec<(String, String)>, f64);

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
        }
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

    /// Checks the whole exposition: every line is HELP, TYPE or a sample that
    /// parses; one HELP and TYPE per family, before its samples; samples of a
    /// family together; counters end in `_total`; no duplicate series.
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
                assert!(["counter", "gauge"].contains(&kind), "{line}");
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
            assert_eq!(
                current.as_deref(),
                Some(name.as_str()),
                "sample outside its family: {line}"
            );
            assert!(!finished.contains(&name), "family split: {line}");
            assert!(helped.contains(&name), "no HELP for {name}");
            let key = format!("{name}{labels:?}");
            assert!(series.insert(key), "duplicate series: {line}");
            samples.push((name, labels, value));
        }
        samples
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
        assert_eq!(escape_label_value(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape_label_value("x\ny"), "x\\ny");
        assert_eq!(escape_label_value("plain-1:10"), "plain-1:10");
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
        assert_eq!(escape_help("a\\b\nc"), "a\\\\b\\nc");
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
        let s = check_exposition(&render(&r));
        assert_eq!(s.len(), 3, "up, config info, applied-at");
    }

    #[test]
    fn values_render_as_prometheus_floats() {
        assert_eq!(Val::F(f64::NAN).render(), "NaN");
        assert_eq!(Val::F(f64::INFINITY).render(), "+Inf");
        assert_eq!(Val::F(f64::NEG_INFINITY).render(), "-Inf");
        assert_eq!(Val::F(1_187_500.0).render(), "1187500");
        assert_eq!(Val::U(u64::MAX).render(), "18446744073709551615");
    }

    #[test]
    fn request_lines() {
        let get = |p: &str| Request::Get {
            path: p.to_string(),
            head: false,
        };
        assert_eq!(
            parse_request(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            get("/metrics")
        );
        assert_eq!(
            parse_request(b"GET /metrics?x=1 HTTP/1.0\n\n"),
            get("/metrics")
        );
        assert_eq!(
            parse_request(b"HEAD /metrics HTTP/1.1\r\n\r\n"),
            Request::Get {
                path: "/metrics".to_string(),
                head: true
            }
        );
        assert_eq!(parse_request(b"GET / HTTP/1.1\r\n\r\n"), get("/"));
        assert_eq!(
            parse_request(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Request::OtherMethod
        );
        for bad in [
            &b""[..],
            b"\r\n\r\n",
            b"GET\r\n\r\n",
            b"GET /metrics\r\n\r\n",
            b"GET /metrics HTTP/2\r\n\r\n",
            b"GET  /metrics HTTP/1.1\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"G\xffT /metrics HTTP/1.1\r\n\r\n",
            b"GET /m\xff HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/1.1 extra\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        ] {
            assert_eq!(parse_request(bad), Request::Bad, "{bad:?}");
        }
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nrest"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\nA: b\n\n"), Some(21));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n"), None);
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
    fn exchange(addr: SocketAddr, request: Vec<u8>) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.write_all(&request).expect("write");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn server_answers_404_503_400_405_431_on_loopback() {
        let dir = std::env::temp_dir().join(format!("shaper-metrics-unit-{}", std::process::id()));
        let paths = Paths {
            pins: crate::kernel::bpf::Pins::new(dir.join("pins")),
            run: dir.join("run-nothing-applied"),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(serve_on(listener, paths));
        let replies = tokio::task::spawn_blocking(move || {
            let mut big = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
            big.extend(std::iter::repeat_n(b'a', MAX_REQUEST_BYTES + 10));
            vec![
                exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
                exchange(addr, b"GET /other HTTP/1.1\r\n\r\n".to_vec()),
                exchange(addr, b"\x00\x01garbage\r\n\r\n".to_vec()),
                exchange(addr, b"DELETE /metrics HTTP/1.1\r\n\r\n".to_vec()),
                exchange(addr, big),
                exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n".to_vec()),
            ]
        })
        .await
        .expect("client");
        server.abort();
        let status = |r: &str| r.lines().next().unwrap_or("").to_string();
        assert_eq!(
            status(&replies[0]),
            "HTTP/1.1 503 Service Unavailable",
            "{}",
            replies[0]
        );
        assert!(replies[0].ends_with("shaping is not applied; no counters to report\n"));
        assert_eq!(status(&replies[1]), "HTTP/1.1 404 Not Found");
        assert_eq!(status(&replies[2]), "HTTP/1.1 400 Bad Request");
        assert_eq!(status(&replies[3]), "HTTP/1.1 405 Method Not Allowed");
        assert!(replies[3].contains("Allow: GET, HEAD\r\n"));
        assert_eq!(
            status(&replies[4]),
            "HTTP/1.1 431 Request Header Fields Too Large"
        );
        assert_eq!(
            status(&replies[5]),
            "HTTP/1.1 503 Service Unavailable",
            "still serving"
        );
        for r in &replies {
            let (head, body) = r.split_once("\r\n\r\n").expect("head and body");
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .expect("length")
                .parse()
                .expect("number");
            assert_eq!(len, body.len(), "{r}");
        }
    }
}
