//! Prometheus metrics for `shaper run`: the counters of `shaper status` in the
//! text exposition format 0.0.4, served over plain HTTP/1.x on `GET /metrics`.
//!
//! The server is deliberately small (plain tokio, one task per connection, one response
//! per connection, `Connection: close`), and any host on the LAN may be hostile:
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
//! interval).

use std::{
    collections::BTreeMap,
    ffi::CStr,
    fmt::Write as _,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::Notify,
};

use crate::{apply::Paths, config::Policy, status};

/// Largest request head (request line and headers) accepted.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// Time from the accept to the end of the request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// Time for collecting the counters and writing the answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections at once.
pub const MAX_CONNECTIONS: usize = 32;
/// Connections at once from one peer address.
pub const MAX_PER_PEER: usize = 4;

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

/// Whose connection this is, for [`MAX_PER_PEER`]: an IPv4 address (IPv4-mapped ones
/// too), or an IPv6 /64 (one host may take any number of addresses in its /64).
fn peer_key(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & (!0u128 << 64))),
        v4 => v4,
    }
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
    Ok(all_addresses()?
        .into_iter()
        .filter(|(name, _)| {
            name == ifname
                || name
                    .strip_prefix(ifname)
                    .is_some_and(|rest| rest.starts_with(':'))
        })
        .map(|(_, ip)| ip)
        .collect())
}

/// Every IPv4 and IPv6 address in the current network namespace with the name it is
/// listed under (an alias as `lan0:1`), by getifaddrs(3).
fn all_addresses() -> Result<Vec<(String, IpAddr)>> {
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
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: ifa_addr points to a sockaddr whose family says its real type.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        match family {
            libc::AF_INET => {
                // SAFETY: family AF_INET: the sockaddr is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                out.push((name, IpAddr::V4(ip)));
            }
            libc::AF_INET6 => {
                // SAFETY: family AF_INET6: the sockaddr is a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                out.push((name, IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))));
            }
            _ => {}
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Serving.

/// A listening metrics socket, bound to its address and its interface, not served yet.
pub struct Bound {
    listener: std::net::TcpListener,
    addr: SocketAddr,
    device: String,
}

/// The first half of the `shaper run` hook, called once the first apply has succeeded
/// (and before the daemon drops capabilities: a port below 1024 needs
/// CAP_NET_BIND_SERVICE): checks `policy.metrics_listen` against the WAN interface
/// (again: it may have come up since the daemon started), and binds it on the interface
/// that holds the address. Never fails the daemon: a refused or unbindable address is
/// logged and the shaping goes on without metrics. Must be called inside a tokio runtime.
pub fn bind(policy: &Policy) -> Option<Bound> {
    let addr = policy.metrics_listen?;
    match bind_on_device(addr, &policy.wan) {
        Ok(b) => Some(b),
        Err(e) => {
            log::error!("metrics endpoint not started, shaping goes on: {e:#}");
            None
        }
    }
}

/// Binds `addr` with SO_BINDTODEVICE to the interface that holds it: Linux accepts a
/// connection to any of its addresses on any interface (the weak host model), so an
/// unbound socket on the LAN address would answer a host on the WAN side that routes
/// the LAN address through the WAN port.
fn bind_on_device(addr: SocketAddr, wan_ifname: &str) -> Result<Bound> {
    check_listen(addr, wan_ifname)?;
    let device = device_holding(addr)?;
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .context("creating the metrics socket")?;
    socket.set_reuseaddr(true)?;
    socket
        .bind_device(Some(device.as_bytes()))
        .with_context(|| format!("binding the metrics socket to the interface {device}"))?;
    socket
        .bind(addr)
        .with_context(|| format!("binding the metrics endpoint to {addr}"))?;
    let listener = socket
        .listen(64)
        .with_context(|| format!("listening on {addr}"))?
        .into_std()?;
    Ok(Bound {
        listener,
        addr,
        device,
    })
}

/// The interface a listen address belongs to: the scope of a scoped IPv6 address, else
/// the interface that has the address now (an alias `lan0:1` is its device `lan0`).
fn device_holding(addr: SocketAddr) -> Result<String> {
    if let SocketAddr::V6(a) = addr {
        if a.scope_id() != 0 {
            let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
            // SAFETY: if_indextoname writes at most IF_NAMESIZE bytes, NUL included.
            let p = unsafe { libc::if_indextoname(a.scope_id(), name.as_mut_ptr()) };
            if p.is_null() {
                bail!(
                    "telemetry.listen = \"{addr}\": no interface has index {}",
                    a.scope_id()
                );
            }
            // SAFETY: on success `name` holds a NUL-terminated name.
            let name = unsafe { CStr::from_ptr(name.as_ptr()) };
            return Ok(name.to_string_lossy().into_owned());
        }
    }
    let ip = canonical(addr.ip());
    let all = all_addresses().context("listing the interfaces' addresses")?;
    let (name, _) = all.into_iter().find(|(_, a)| *a == ip).with_context(|| {
        format!(
            "telemetry.listen = \"{addr}\": no interface has the address {ip}; give an address of a LAN interface or of lo"
        )
    })?;
    Ok(match name.split_once(':') {
        Some((dev, _)) => dev.to_string(),
        None => name,
    })
}

/// The second half of the `shaper run` hook: serves `GET /metrics` on the bound socket
/// from a thread of its own with its own runtime, so that no scrape ever waits for the
/// daemon's loop and the loop never waits for a scrape. Called after the daemon dropped
/// the capabilities it does not need: the thread inherits what its creator holds.
pub fn spawn(bound: Bound, paths: &Paths) {
    let Bound {
        listener,
        addr,
        device,
    } = bound;
    let paths = paths.clone();
    let started = std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    log::error!("metrics endpoint stopped: starting its runtime: {e}");
                    return;
                }
            };
            rt.block_on(async move {
                let served = match TcpListener::from_std(listener) {
                    Ok(l) => serve_on(l, paths).await,
                    Err(e) => Err(e.into()),
                };
                if let Err(e) = served {
                    log::error!("metrics endpoint stopped: {e:#}");
                }
            });
        });
    match started {
        Ok(_) => log::info!(
            "serving Prometheus metrics on http://{addr}/metrics (only to connections arriving on {device})"
        ),
        Err(e) => log::error!("metrics endpoint not started, shaping goes on: {e}"),
    }
}

/// Where a connection is in its exchange.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    /// Waiting for the request head: may be closed to make room.
    Head,
    /// Collecting the counters and writing the answer.
    Answering,
    /// Answered, waiting for the client to close: may be closed to make room.
    Closing,
}

struct Conn {
    id: u64,
    peer: IpAddr,
    phase: Phase,
    /// Told when the connection is closed to make room.
    evict: Arc<Notify>,
}

/// The connections being served, oldest first: who gets in and who makes room.
#[derive(Default)]
struct Admission {
    next_id: u64,
    conns: Vec<Conn>,
}

impl Admission {
    /// Admits a connection from `peer`, or refuses it (`None`): a peer (an IPv4 address,
    /// an IPv6 /64) holding [`MAX_PER_PEER`] already is refused. At [`MAX_CONNECTIONS`]
    /// in all, the oldest connection that is not answering of the peer holding the most
    /// is closed to make room; if every one is answering, the new one is refused.
    fn admit(&mut self, peer: IpAddr) -> Option<(u64, Arc<Notify>)> {
        let peer = peer_key(peer);
        if self.held_by(peer) >= MAX_PER_PEER {
            return None;
        }
        if self.conns.len() >= MAX_CONNECTIONS && !self.make_room() {
            return None;
        }
        let id = self.next_id;
        self.next_id += 1;
        let evict = Arc::new(Notify::new());
        self.conns.push(Conn {
            id,
            peer,
            phase: Phase::Head,
            evict: evict.clone(),
        });
        Some((id, evict))
    }

    fn held_by(&self, peer: IpAddr) -> usize {
        self.conns.iter().filter(|c| c.peer == peer).count()
    }

    /// Closes the oldest idle connection (waiting for its request, or answered) of the
    /// peer that holds the most: whoever spreads connections over many addresses pays
    /// before a peer with one.
    fn make_room(&mut self) -> bool {
        let mut victim: Option<(usize, usize)> = None;
        for (i, c) in self.conns.iter().enumerate() {
            if c.phase == Phase::Answering {
                continue;
            }
            let held = self.held_by(c.peer);
            // Oldest first: only a bigger holder displaces the one found.
            if victim.is_none_or(|(h, _)| held > h) {
                victim = Some((held, i));
            }
        }
        let Some((_, i)) = victim else {
            return false;
        };
        // notify_one keeps the wake-up for a task that is not waiting yet.
        self.conns.remove(i).evict.notify_one();
        true
    }

    fn set_phase(&mut self, id: u64, phase: Phase) {
        if let Some(c) = self.conns.iter_mut().find(|c| c.id == id) {
            c.phase = phase;
        }
    }

    fn release(&mut self, id: u64) {
        self.conns.retain(|c| c.id != id);
    }
}

/// One admitted connection's place in the [`Admission`]; given back when dropped.
struct Slot {
    admission: Arc<Mutex<Admission>>,
    id: u64,
}

impl Slot {
    fn set_phase(&self, phase: Phase) {
        lock(&self.admission).set_phase(self.id, phase);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        lock(&self.admission).release(self.id);
    }
}

fn lock(a: &Mutex<Admission>) -> std::sync::MutexGuard<'_, Admission> {
    a.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Serves `GET /metrics` on a bound listener until the task is dropped. Does not check
/// or bind the address: see [`bind`].
pub async fn serve_on(listener: TcpListener, paths: Paths) -> Result<()> {
    let paths = Arc::new(paths);
    let admission = Arc::new(Mutex::new(Admission::default()));
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
        let admitted = lock(&admission).admit(peer.ip());
        let Some((id, evict)) = admitted else {
            log::debug!("metrics endpoint: too many connections answering; closing {peer}");
            continue;
        };
        let slot = Slot {
            admission: admission.clone(),
            id,
        };
        let paths = paths.clone();
        tokio::spawn(async move {
            tokio::select! {
                r = handle(&stream, &paths, &slot) => {
                    if let Err(e) = r {
                        log::debug!("metrics endpoint: {peer}: {e}");
                    }
                }
                () = evict.notified() => {
                    log::debug!("metrics endpoint: {peer}: closed to make room for a newer connection");
                }
            }
            drop(slot);
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

async fn handle(stream: &TcpStream, paths: &Paths, slot: &Slot) -> io::Result<()> {
    // One deadline for the whole head: a byte a second does not extend it.
    let head = tokio::time::timeout(HEAD_TIMEOUT, read_head(stream))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no request within {HEAD_TIMEOUT:?}"),
            )
        })??;
    if matches!(head, Head::Closed) {
        return Ok(());
    }
    slot.set_phase(Phase::Answering);
    let answered = tokio::time::timeout(ANSWER_TIMEOUT, async {
        let reply = reply(head, paths).await;
        write_all(stream, &reply).await
    })
    .await;
    match answered {
        Ok(r) => r?,
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("not answered within {ANSWER_TIMEOUT:?}"),
            ))
        }
    }
    slot.set_phase(Phase::Closing);
    // Half-close, then read what the client still sends (briefly, bounded):
    // closing with unread input would reset the connection and could lose
    // the reply on the client's side.
    let fd = std::os::fd::AsRawFd::as_raw_fd(stream);
    // SAFETY: fd is the stream's open socket; shutdown does not invalidate it.
    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
    let _ = tokio::time::timeout(LINGER, drain(stream)).await;
    Ok(())
}

/// The whole response to a request head. Error bodies say what went wrong in general
/// terms only: which file or map failed is for the log, not for whoever asks.
async fn reply(head: Head, paths: &Paths) -> Vec<u8> {
    match head {
        Head::Closed => Vec::new(),
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
                    text("500 Internal Server Error", INTERNAL_ERROR_BODY)
                }
            },
        },
    }
}

/// The body of a 500: no path, no OS error, nothing about the box's layout.
pub const INTERNAL_ERROR_BODY: &str = "reading the counters failed; the daemon's log says why\n";

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

    #[test]
    fn one_peer_gets_at_most_its_share_and_the_biggest_holder_makes_room() {
        let a: IpAddr = "10.0.0.2".parse().expect("ip");
        let mapped: IpAddr = "::ffff:10.0.0.2".parse().expect("ip");
        let mut adm = Admission::default();
        let held: Vec<_> = (0..MAX_PER_PEER)
            .map(|_| adm.admit(a).expect("within the share"))
            .collect();
        // The same host again, as itself or IPv4-mapped: refused.
        assert!(adm.admit(a).is_none());
        assert!(adm.admit(mapped).is_none());
        // One IPv6 host, many addresses in its /64: one peer.
        for i in 0..MAX_PER_PEER {
            let v6 = IpAddr::V6(Ipv6Addr::new(0xfd00, 1, 2, 3, 0, 0, 0, i as u16 + 1));
            adm.admit(v6).expect("within the /64's share");
        }
        let other_in_64: IpAddr = "fd00:1:2:3:dead:beef:0:1".parse().expect("ip");
        assert!(adm.admit(other_in_64).is_none(), "same /64");
        // Prometheus elsewhere gets in.
        let prom: IpAddr = "10.0.0.9".parse().expect("ip");
        let (prom_id, _) = adm.admit(prom).expect("another peer");
        // Many single-connection peers fill the rest.
        let mut n = 0u8;
        while adm.conns.len() < MAX_CONNECTIONS {
            adm.admit(IpAddr::V4(Ipv4Addr::new(10, 0, 1, n)))
                .expect("room");
            n += 1;
        }
        // Full: a newcomer displaces the oldest idle connection of a biggest holder
        // (10.0.0.2, first in), never Prometheus'.
        let newcomer: IpAddr = "10.0.9.9".parse().expect("ip");
        adm.admit(newcomer).expect("room made");
        assert!(
            adm.conns.iter().all(|c| c.id != held[0].0),
            "oldest of the biggest"
        );
        assert!(adm.conns.iter().any(|c| c.id == prom_id));
        assert_eq!(adm.conns.len(), MAX_CONNECTIONS);
        // Told to close (the permit waits for the task).
        let woke = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt")
            .block_on(async {
                tokio::time::timeout(Duration::from_millis(100), held[0].1.notified())
                    .await
                    .is_ok()
            });
        assert!(woke, "the displaced connection is told");
        // Every connection answering: nothing to make room with.
        let ids: Vec<u64> = adm.conns.iter().map(|c| c.id).collect();
        for id in &ids {
            adm.set_phase(*id, Phase::Answering);
        }
        assert!(adm.admit("10.0.8.8".parse().expect("ip")).is_none());
        adm.release(ids[0]);
        assert_eq!(adm.conns.len(), MAX_CONNECTIONS - 1);
        adm.admit("10.0.8.8".parse().expect("ip"))
            .expect("room after a release");
    }

    fn temp_paths(tag: &str) -> (std::path::PathBuf, Paths) {
        let dir = std::env::temp_dir().join(format!("shaper-metrics-{tag}-{}", std::process::id()));
        let paths = Paths {
            pins: crate::kernel::bpf::Pins::new(dir.join("pins")),
            run: dir.join("run"),
        };
        (dir, paths)
    }

    #[tokio::test]
    async fn error_bodies_name_no_file() {
        let (dir, paths) = temp_paths("500");
        std::fs::create_dir_all(&paths.run).expect("mkdir");
        std::fs::write(paths.run.join("state.json"), b"{ not json").expect("write");
        let r = reply(
            Head::Complete(b"GET /metrics HTTP/1.1\r\n\r\n".to_vec()),
            &paths,
        )
        .await;
        let r = String::from_utf8(r).expect("utf-8");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(r.starts_with("HTTP/1.1 500 "), "{r}");
        let body = r.split_once("\r\n\r\n").expect("body").1;
        assert_eq!(body, INTERNAL_ERROR_BODY);
        assert!(!body.contains('/'), "{body}");
    }

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

    #[tokio::test]
    async fn idle_connections_neither_keep_a_scrape_out_nor_stay() {
        let (_dir, paths) = temp_paths("idle");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(serve_on(listener, paths));
        // Sixteen idle connections from one host (127.0.0.2)...
        let mut idle = Vec::new();
        for _ in 0..16 {
            let s = TcpSocket::new_v4().expect("socket");
            s.bind("127.0.0.2:0".parse().expect("addr")).expect("bind");
            idle.push(s.connect(addr).await.expect("connect"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        // ...keep no scrape from another (127.0.0.1) out.
        let (reply, took) = tokio::task::spawn_blocking(move || {
            let t0 = std::time::Instant::now();
            let r = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n".to_vec());
            (r, t0.elapsed())
        })
        .await
        .expect("client");
        assert!(reply.starts_with("HTTP/1.1 503 "), "{reply:?}");
        assert!(took < Duration::from_secs(1), "{took:?}");
        // Those past the host's share were closed at once; the rest once HEAD_TIMEOUT
        // is over.
        let closed = |s: &TcpStream| {
            let mut b = [0u8; 8];
            matches!(s.try_read(&mut b), Ok(0))
                || matches!(s.try_read(&mut b), Err(e) if e.kind() != io::ErrorKind::WouldBlock)
        };
        assert!(closed(&idle[15]), "past the share: closed at once");
        assert!(!closed(&idle[0]), "within the share: open for now");
        tokio::time::sleep(HEAD_TIMEOUT + Duration::from_millis(500)).await;
        assert!(idle.iter().all(closed), "all closed after HEAD_TIMEOUT");
        server.abort();
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
