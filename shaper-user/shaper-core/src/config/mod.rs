//! The configuration file: raw TOML types (serde, `deny_unknown_fields`) and
//! their validation into a [`Policy`] that the rest of the program uses.
//! Every error names the file, the line and the field, and says what would
//! be accepted. Validation touches nothing outside this process.
//!
//! Built on leaf modules, re-exported here: [`crate::units`] (values), [`crate::diag`]
//! (errors with file, line and field), [`crate::rule`] (rules and their match fields).
//! The `[[app]]` format lives with the catalogue ([`crate::catalogue`]), which depends on
//! those leaves only: this module uses the catalogue, the catalogue never uses this one.
//! Here: the validated [`Policy`] and its types, `load`/`parse` and `validate` (which
//! walks the sections in file order); raw.rs holds the serde types, sections.rs the
//! sections `validate` delegates, tests.rs the unit tests.

use std::{collections::HashMap, fmt, net::IpAddr, path::Path};

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::catalogue::{app, Catalogue, RawApp};
// The leaves this module is built on, re-exported: `config::parse_rate`, `config::Rule`,
// `config::ConfigError` and the rest keep their paths.
pub use crate::diag::*;
pub use crate::rule::*;
pub use crate::units::*;

mod raw;
mod sections;
use raw::*;
use sections::*;

/// Highest HTB priority value the kernel accepts is 7; 0 is served first.
pub const MAX_PRIORITY: u8 = 7;

// ---------------------------------------------------------------------------
// Validated policy.

/// A validated configuration. Rates are bits per second.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    pub wan: String,
    pub lan: String,
    pub upload_bps: u64,
    pub download_bps: u64,
    pub leaf: LeafChoice,
    pub queue_ms: u32,
    pub remark_dscp: bool,
    /// Classes in file order.
    pub classes: Vec<Class>,
    /// Index into `classes` of the default class.
    pub default_class: usize,
    /// Rules sorted by priority (stable: file order breaks ties).
    pub rules: Vec<Rule>,
    /// Index into `classes` for TCP segments without data, if set.
    pub ack_class: Option<usize>,
    /// Where `shaper run` serves Prometheus metrics, if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// How the line counts bytes upstream (`[upload] line/framing/overhead/mpu`).
    #[serde(default)]
    pub upload_link: LinkAccounting,
    /// How the line counts bytes downstream.
    #[serde(default)]
    pub download_link: LinkAccounting,
    /// The built-in catalogue's version, when a rule names apps.
    #[serde(default)]
    pub catalogue: Option<String>,
    /// Things `check` should say that are not errors (apps that match only
    /// partly or not at all yet).
    #[serde(default)]
    pub notes: Vec<String>,
    /// Rate adaptation to a line whose usable rate varies (`[autorate]`).
    #[serde(default)]
    pub autorate: Option<Autorate>,
    /// How DNS-learned addresses are kept (`[dns]`).
    #[serde(default)]
    pub dns: DnsSettings,
    /// Rules look at DSCP from the LAN (`[dscp] lan = "trust"`).
    #[serde(default = "yes")]
    pub dscp_trust_lan: bool,
    /// Rules look at DSCP from the WAN (`[dscp] wan = "trust"`).
    #[serde(default = "yes")]
    pub dscp_trust_wan: bool,
    /// Media-like default-class UDP flows move to a class (`[promote]`).
    #[serde(default)]
    pub promote: Option<Promote>,
    /// `[download] account_arrivals`: the download rate is held so that what reaches
    /// the shaper, dropped or not, stays within it (see `ingress`).
    #[serde(default)]
    pub download_account_arrivals: bool,
    /// `[download] window_clamp`: TCP downloads' receive windows are clamped (see
    /// [`WindowClamp`]); None: off (the default).
    #[serde(default)]
    pub download_window_clamp: Option<WindowClamp>,
}

/// `[download] window_clamp = true`: sender control for downloads, as Packeteer's
/// "TCP rate control". The classifier rewrites the receive window in the ACKs LAN
/// hosts send to the internet so that each TCP download keeps about its share of
/// its class's rate times (its WAN round trip + `queue_ms`) in flight: the modem
/// upstream of the gateway, which the download shaper cannot drain, holds at most
/// about `queue_ms` of each flow's data, in slow start too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowClamp {
    /// `window_clamp_queue_ms` (default [`WINDOW_CLAMP_QUEUE_MS`]).
    pub queue_ms: u32,
}

/// The default of `[download] window_clamp_queue_ms`.
pub const WINDOW_CLAMP_QUEUE_MS: u32 = 5;
/// The largest `[download] window_clamp_queue_ms` accepted.
pub const WINDOW_CLAMP_QUEUE_MAX_MS: u32 = 200;

fn yes() -> bool {
    true
}

impl Policy {
    /// Whether a rule names hosts (DNS answers and TLS server names are watched).
    pub fn uses_hosts(&self) -> bool {
        self.rules.iter().any(|r| !r.dns_names.is_empty())
    }

    /// Whether the flow cache measures flows (demotion or promotion configured).
    pub fn measures_flows(&self) -> bool {
        self.promote.is_some()
            || self
                .classes
                .iter()
                .any(|c| c.demote.is_some() || c.claimed_max.is_some())
    }

    /// What the flows claiming class `i` (decided into it by a TLS/QUIC server name, or
    /// promoted into it) may carry together: its `claimed_max`; for the `[promote]` class
    /// without one, its guarantee (promotion is capped per class, not only per flow: many
    /// small flows that each look like media cannot take the line). A claimed flow that
    /// finds the class's total for the second used up is demoted.
    pub fn claimed_max(&self, i: usize) -> Option<Share> {
        let c = self.classes.get(i)?;
        c.claimed_max.or_else(|| {
            self.promote
                .as_ref()
                .filter(|p| p.class == i)
                .map(|_| c.guaranteed)
        })
    }
}

/// `[dns]`: bounds on how long, and how many, DNS-learned addresses are kept,
/// and whose answers count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsSettings {
    pub min_ttl_s: u32,
    pub max_ttl_s: u32,
    pub max_entries: u32,
    /// Answers count only from these servers (empty: from any server a query
    /// from the LAN went to).
    #[serde(default)]
    pub resolvers: Vec<IpAddr>,
}

impl Default for DnsSettings {
    fn default() -> Self {
        DnsSettings {
            min_ttl_s: 60,
            max_ttl_s: 86_400,
            max_entries: 4096,
            resolvers: Vec::new(),
        }
    }
}

/// Most DNS-learned addresses a config may ask to keep.
pub const MAX_DNS_ENTRIES: u32 = 32_768;

/// `[promote]`, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Promote {
    pub class: usize,
    pub min_pps: u32,
    pub max_bps: u64,
    pub max_packet: u32,
}

/// A class's `demote_*`, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Demote {
    pub to: usize,
    /// Bytes after which a flow is demoted.
    pub after_bytes: Option<u64>,
    /// Rate (bit/s over one second) above which a flow is demoted.
    pub above_bps: Option<u64>,
}

/// `[autorate]`: the shaper's rates follow the line, between each direction's
/// `min_rate` and `rate`, steered by the round-trip time to the reflectors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Autorate {
    pub reflectors: Vec<std::net::Ipv4Addr>,
    /// Index into `classes` of the class the probes travel in.
    pub class: usize,
    pub delay_ms: u32,
    pub interval_ms: u32,
    pub upload_min_bps: u64,
    pub download_min_bps: u64,
}

/// How a copper line frames each packet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Framing {
    /// No cell or coding tax (also: the default, no accounting).
    #[default]
    Ethernet,
    /// ATM cells (ADSL): 53 bytes on the line per 48 of payload, the last cell padded.
    Atm,
    /// PTM 64/65 coding (VDSL2, EFM): one byte in 65 is framing.
    Ptm,
}

impl fmt::Display for Framing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Framing::Ethernet => "ethernet",
            Framing::Atm => "atm",
            Framing::Ptm => "ptm",
        })
    }
}

/// Link-layer accounting for one direction: what the copper adds to each packet.
///
/// `overhead` follows CAKE's convention: bytes added to the **IP packet** (not to
/// the Ethernet frame Linux hands the qdisc); `apply` subtracts the interface's own
/// link-layer header (14 bytes on Ethernet) when it builds the size table, so the
/// same number is right on an Ethernet port towards a modem and on a `ppp0`. The
/// all-zero Ethernet value means "no accounting": packets are measured as Linux
/// sees them, as before this option existed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkAccounting {
    /// The `line` preset the values started from, if one was named.
    pub line: Option<String>,
    pub framing: Framing,
    /// Bytes added to each IP packet on the line (-64..=256).
    pub overhead: i32,
    /// Minimum size of a packet on the line, overhead included (0..=256).
    pub mpu: u32,
}

impl LinkAccounting {
    /// No accounting: Ethernet framing, no overhead, no minimum.
    pub fn is_none(&self) -> bool {
        self.framing == Framing::Ethernet && self.overhead == 0 && self.mpu == 0
    }
}

impl fmt::Display for LinkAccounting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_none() {
            return f.write_str("none (packets counted as Linux sees them)");
        }
        if let Some(l) = &self.line {
            write!(f, "{l}: ")?;
        }
        write!(
            f,
            "{} framing, overhead {} bytes per IP packet, mpu {}",
            self.framing, self.overhead, self.mpu
        )
    }
}

/// Line types: (name, framing, overhead per IP packet, mpu). The numbers are the
/// ones CAKE's keywords stand for (tc-cake(8), "OVERHEAD COMPENSATION
/// PARAMETERS"), which sqm-scripts uses as well:
/// - `adsl2-pppoa`: CAKE `pppoa-vcmux` = overhead 10 atm (PPP 2 + ATM AAL5 trailer 8,
///   VC-mux: no LLC header). The usual UK ADSL2+ encapsulation.
/// - `adsl2-pppoe`: CAKE `pppoe-llcsnap` = overhead 40 atm (PPPoE + PPP 8 + Ethernet 14,
///   no FCS + RFC 2684 LLC/SNAP 10 + AAL5 trailer 8).
/// - `vdsl2-pppoe`: CAKE `pppoe-ptm` = overhead 30 ptm (PPPoE 8 + Ethernet 14 + FCS 4 +
///   PTM-TC 4). The usual UK FTTC encapsulation.
/// - `vdsl2-ipoe`: CAKE `bridged-ptm` = overhead 22 ptm (Ethernet 14 + FCS 4 + PTM-TC 4).
/// - `efm`: our choice, not a CAKE keyword. EFM copper (2BASE-TL/10PASS-TS, IEEE 802.3
///   clause 61) carries Ethernet frames in the same 64/65-octet encapsulation that
///   CAKE's `ptm` models (tc-cake(8) cites IEEE 802.3 section 61.3), so: ptm with
///   the bridged frame's 22 bytes (Ethernet 14 + FCS 4 + 4 for the frame's start/end
///   codes and, on bonded pairs, the PAF fragment header). Not CAKE's `ethernet` (38,
///   mpu 84): preamble and inter-frame gap are not sent over 64/65 encapsulation.
/// - `adsl2`: ADSL2+ of unknown encapsulation: atm 48, CAKE's `conservative` (above
///   every ADSL encapsulation CAKE names, the largest being 44 for bridged LLC/SNAP with
///   FCS), so a guess errs high: a few per cent of the upload, never a queue in the modem.
/// - `vdsl2`: VDSL2 (FTTC) of unknown encapsulation: ptm 34, PPPoE with an 802.1Q tag
///   (UK FTTC carries VLAN 101), above `vdsl2-pppoe` and `vdsl2-ipoe`.
/// - `ethernet`: no accounting (the default).
///
/// `shaper line probe` measures framing and overhead through the line instead.
///
/// mpu is 0 for all of them, as in CAKE's keywords; set `mpu` to account for the
/// padding of minimum-size Ethernet frames (e.g. 68 on PTM) if wanted.
const LINE_PRESETS: [(&str, Framing, i32, u32); 8] = [
    ("adsl2", Framing::Atm, 48, 0),
    ("vdsl2", Framing::Ptm, 34, 0),
    ("adsl2-pppoa", Framing::Atm, 10, 0),
    ("adsl2-pppoe", Framing::Atm, 40, 0),
    ("vdsl2-pppoe", Framing::Ptm, 30, 0),
    ("vdsl2-ipoe", Framing::Ptm, 22, 0),
    ("efm", Framing::Ptm, 22, 0),
    ("ethernet", Framing::Ethernet, 0, 0),
];

/// The accounting of a `line` preset, by name.
pub fn line_preset(name: &str) -> Option<LinkAccounting> {
    LINE_PRESETS
        .iter()
        .find(|p| p.0 == name)
        .map(|&(n, framing, overhead, mpu)| LinkAccounting {
            line: Some(n.to_string()),
            framing,
            overhead,
            mpu,
        })
}

/// Overhead range CAKE accepts (and the size table carries easily).
pub const OVERHEAD_RANGE: std::ops::RangeInclusive<i64> = -64..=256;
/// mpu range CAKE accepts.
pub const MPU_RANGE: std::ops::RangeInclusive<i64> = 0..=256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeafChoice {
    Auto,
    FqCodel,
    Cake,
    Bfifo,
}

/// A share of a direction's rate: a fraction or an absolute rate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Share {
    Percent(f64),
    Bps(u64),
}

impl Share {
    /// Bits per second of this share of `rate_bps`.
    pub fn of(&self, rate_bps: u64) -> u64 {
        match *self {
            Share::Percent(p) => ((rate_bps as f64) * p / 100.0).round() as u64,
            Share::Bps(b) => b,
        }
    }
}

impl fmt::Display for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Share::Percent(p) => write!(f, "{p}%"),
            Share::Bps(b) => write!(f, "{}", format_rate(*b)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Class {
    pub name: String,
    pub priority: u8,
    pub guaranteed: Share,
    pub ceiling: Share,
    pub dscp: Option<u8>,
    #[serde(default)]
    pub demote: Option<Demote>,
    /// `claimed_max`: what flows claiming the class by a server name, or promoted into
    /// it, may carry together (see [`Policy::claimed_max`]).
    #[serde(default)]
    pub claimed_max: Option<Share>,
}

// ---------------------------------------------------------------------------
// Parsing helpers (public: the CLI and tests use them too).

fn parse_share(s: &str) -> Result<Share, String> {
    let t = s.trim();
    if let Some(p) = t.strip_suffix('%') {
        let v: f64 = p
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not a percentage like \"30%\""))?;
        if !(v > 0.0 && v <= 100.0) {
            return Err(format!("`{s}` must be above 0% and at most 100%"));
        }
        Ok(Share::Percent(v))
    } else {
        parse_rate(t)
            .map(Share::Bps)
            .map_err(|e| format!("{e}; or give a percentage of the line rate like \"30%\""))
    }
}

// ---------------------------------------------------------------------------
// Loading and validation.

/// Reads and validates a configuration file. Touches nothing but the file.
pub fn load(path: &Path) -> Result<Policy, ConfigError> {
    parse(path, &read_text(path)?)
}

/// A config file's text; one that cannot be read or is not UTF-8 is an error naming the
/// file (and the line and byte offset of the first bad byte).
pub fn read_text(path: &Path) -> Result<String, ConfigError> {
    let err = |line, message| ConfigError {
        file: path.to_path_buf(),
        line,
        field: String::new(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| err(None, format!("cannot read: {e}")))?;
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        err(Some(line), format!("not UTF-8 text (byte offset {at})"))
    })
}

/// Validates configuration text; `file` is used in error messages.
pub fn parse(file: &Path, text: &str) -> Result<Policy, ConfigError> {
    let cx = Ctx { file, text };
    let raw: RawConfig = toml::from_str(text).map_err(|e| toml_error(&cx, &e))?;
    validate(&cx, raw)
}

fn validate(cx: &Ctx<'_>, raw: RawConfig) -> Result<Policy, ConfigError> {
    let wan = interface_name(cx, &raw.interfaces.wan, "interfaces.wan")?;
    let lan = interface_name(cx, &raw.interfaces.lan, "interfaces.lan")?;
    if wan == lan {
        return Err(cx.at(
            &raw.interfaces.lan,
            "interfaces.lan",
            "WAN and LAN must be different interfaces",
        ));
    }
    let upload_bps = parse_rate(raw.upload.rate.get_ref())
        .map_err(|m| cx.at(&raw.upload.rate, "upload.rate", m))?;
    let download_bps = parse_rate(raw.download.rate.get_ref())
        .map_err(|m| cx.at(&raw.download.rate, "download.rate", m))?;
    let upload_link = link_accounting(cx, &raw.upload, "upload")?;
    let download_link = link_accounting(cx, &raw.download, "download")?;

    let shaping = raw.shaping.unwrap_or(RawShaping {
        leaf: None,
        queue_ms: None,
        remark_dscp: None,
        ack_class: None,
    });
    let leaf = match &shaping.leaf {
        None => LeafChoice::Auto,
        Some(s) => match s.get_ref().as_str() {
            "auto" => LeafChoice::Auto,
            "fq_codel" => LeafChoice::FqCodel,
            "cake" => LeafChoice::Cake,
            "bfifo" => LeafChoice::Bfifo,
            other => {
                return Err(cx.at(
                    s,
                    "shaping.leaf",
                    format!("`{other}`: use \"auto\", \"fq_codel\", \"cake\" or \"bfifo\""),
                ))
            }
        },
    };
    let queue_ms = match &shaping.queue_ms {
        None => 20,
        Some(q) if (1..=1000).contains(q.get_ref()) => *q.get_ref(),
        Some(q) => return Err(cx.at(q, "shaping.queue_ms", "must be 1 to 1000 milliseconds")),
    };

    if raw.classes.is_empty() {
        return Err(cx.err(
            None,
            "class",
            "at least one [[class]] is needed, one of them with `default = true`",
        ));
    }
    if raw.classes.len() > shaper_common::MAX_CLASSES {
        return Err(cx.at(
            &raw.classes[shaper_common::MAX_CLASSES],
            "class",
            format!("at most {} classes", shaper_common::MAX_CLASSES),
        ));
    }
    let mut classes = Vec::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut default_class = None;
    for (i, sc) in raw.classes.iter().enumerate() {
        let c = sc.get_ref();
        let f = |k: &str| format!("class[{i}].{k}");
        let name = c.name.get_ref().trim().to_string();
        if name.is_empty()
            || !name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
        {
            return Err(cx.at(&c.name, f("name"), "use letters, digits, '-' and '_'"));
        }
        if names.insert(name.clone(), i).is_some() {
            return Err(cx.at(
                &c.name,
                f("name"),
                format!("class `{name}` is defined twice"),
            ));
        }
        let prio = *c.priority.get_ref();
        if !(0..=MAX_PRIORITY as i64).contains(&prio) {
            return Err(cx.at(
                &c.priority,
                f("priority"),
                format!("must be 0 (served first) to {MAX_PRIORITY}"),
            ));
        }
        let guaranteed = parse_share(c.guaranteed.get_ref())
            .map_err(|m| cx.at(&c.guaranteed, f("guaranteed"), m))?;
        let ceiling = match &c.ceiling {
            None => Share::Percent(100.0),
            Some(s) => parse_share(s.get_ref()).map_err(|m| cx.at(s, f("ceiling"), m))?,
        };
        for (dir, rate) in [("upload", upload_bps), ("download", download_bps)] {
            let g = guaranteed.of(rate);
            let ce = ceiling.of(rate);
            if g > rate {
                return Err(cx.at(
                    &c.guaranteed,
                    f("guaranteed"),
                    format!(
                        "{guaranteed} is more than the {dir} rate {}",
                        format_rate(rate)
                    ),
                ));
            }
            if ce > rate {
                let span = c.ceiling.as_ref().map(|s| s.span());
                return Err(cx.err(
                    span,
                    f("ceiling"),
                    format!(
                        "{ceiling} is more than the {dir} rate {}",
                        format_rate(rate)
                    ),
                ));
            }
            if ce < g {
                let span = c
                    .ceiling
                    .as_ref()
                    .map(|s| s.span())
                    .or(Some(c.guaranteed.span()));
                return Err(cx.err(
                    span,
                    f("ceiling"),
                    format!("ceiling {ceiling} is below the guaranteed {guaranteed} ({dir})"),
                ));
            }
            if g < 8_000 {
                let msg = match guaranteed {
                    Share::Bps(_) => {
                        format!("{guaranteed} is below 8kbit, the least a class can be guaranteed")
                    }
                    Share::Percent(_) => format!(
                        "{guaranteed} of the {dir} rate {} is {}; at least 8kbit is needed",
                        format_rate(rate),
                        format_rate(g)
                    ),
                };
                return Err(cx.at(&c.guaranteed, f("guaranteed"), msg));
            }
        }
        let dscp = match &c.dscp {
            None => None,
            Some(d) => Some(dscp_value(d.get_ref()).map_err(|m| cx.at(d, f("dscp"), m))?),
        };
        let claimed_max = match &c.claimed_max {
            None => None,
            Some(v) => {
                let share = parse_share(v.get_ref()).map_err(|m| cx.at(v, f("claimed_max"), m))?;
                if share.of(upload_bps.min(download_bps)) < 8_000 {
                    return Err(cx.at(v, f("claimed_max"), format!("{share} is below 8kbit")));
                }
                Some(share)
            }
        };
        if let Some(d) = c.default.as_ref().filter(|d| *d.get_ref()) {
            if let Some(prev) = default_class {
                return Err(cx.at(
                    d,
                    f("default"),
                    format!(
                        "class `{}` is already the default; only one class can be",
                        classes_name(&classes, prev)
                    ),
                ));
            }
            default_class = Some(i);
        }
        classes.push(Class {
            name,
            priority: prio as u8,
            guaranteed,
            ceiling,
            dscp,
            demote: None,
            claimed_max,
        });
    }
    let Some(default_class) = default_class else {
        return Err(cx.err(
            Some(raw.classes[0].span()),
            "class",
            "no class has `default = true`; unmatched traffic needs one",
        ));
    };
    for (i, sc) in raw.classes.iter().enumerate() {
        classes[i].demote = demote(cx, sc.get_ref(), i, &names)?;
    }
    for (dir, rate) in [("upload", upload_bps), ("download", download_bps)] {
        // Exact shares, not the rounded bit rates: 50% + 50% of an odd rate
        // is 100%, though each half rounds up.
        let share = |c: &Class| match c.guaranteed {
            Share::Percent(p) => rate as f64 * p / 100.0,
            Share::Bps(b) => b as f64,
        };
        let limit = rate as f64 * (1.0 + 1e-9);
        let mut running = 0.0;
        // The class whose guarantee takes the total past the rate.
        let over = classes.iter().position(|c| {
            running += share(c);
            running > limit
        });
        if let Some(i) = over {
            let total: f64 = classes.iter().map(share).sum();
            let parts: Vec<String> = classes
                .iter()
                .map(|c| format!("{} {}", c.name, format_rate(share(c).round() as u64)))
                .collect();
            return Err(cx.at(
                &raw.classes[i].get_ref().guaranteed,
                format!("class[{i}].guaranteed"),
                format!(
                    "guaranteed shares add up to {}, {:.1}% of the {dir} rate {} ({}); they must not exceed 100%",
                    format_rate(total.round() as u64),
                    total * 100.0 / rate as f64,
                    format_rate(rate),
                    parts.join(" + ")
                ),
            ));
        }
    }

    let mut catalogue = Catalogue::builtin();
    let mut app_names: HashMap<String, usize> = HashMap::new();
    for (i, sa) in raw.apps.iter().enumerate() {
        let a = sa.get_ref();
        let origin = format!("{}:{}", cx.file.display(), cx.line_of(sa.span()));
        let app = app(cx, a, &format!("app[{i}]"), origin)?;
        if app_names.insert(app.name.clone(), i).is_some() {
            return Err(cx.at(
                &a.name,
                format!("app[{i}].name"),
                format!("app `{}` is defined twice", app.name),
            ));
        }
        catalogue.upsert(app);
    }

    let mut rules = Vec::new();
    let mut rule_names: HashMap<String, usize> = HashMap::new();
    // Every rule's name after expansion: `<rule>/<app>#<n>` must not meet a
    // rule of that name.
    let mut final_names: std::collections::HashSet<String> = Default::default();
    let mut notes = Vec::new();
    let mut uses_apps = false;
    for (i, sr) in raw.rules.iter().enumerate() {
        let r = sr.get_ref();
        let f = |k: &str| format!("rule[{i}].{k}");
        let name = r.name.get_ref().trim().to_string();
        if name.is_empty() {
            return Err(cx.at(&r.name, f("name"), "a rule needs a name"));
        }
        if rule_names.insert(name.clone(), i).is_some() {
            return Err(cx.at(
                &r.name,
                f("name"),
                format!("rule `{name}` is defined twice"),
            ));
        }
        let Some(&class) = names.get(r.class.get_ref().trim()) else {
            let known: Vec<_> = classes.iter().map(|c| c.name.as_str()).collect();
            return Err(cx.at(
                &r.class,
                f("class"),
                format!(
                    "no class named `{}`; classes are: {}",
                    r.class.get_ref(),
                    known.join(", ")
                ),
            ));
        };
        let priority = match &r.priority {
            None => i as i64,
            Some(p) => *p.get_ref(),
        };
        let direction = match &r.direction {
            None => Direction::Both,
            Some(d) => match d.get_ref().as_str() {
                "both" => Direction::Both,
                "upload" => Direction::Upload,
                "download" => Direction::Download,
                other => {
                    return Err(cx.at(
                        d,
                        f("direction"),
                        format!("`{other}`: use \"both\", \"upload\" or \"download\""),
                    ))
                }
            },
        };
        let fields = MatchFields {
            protocol: &r.protocol,
            src_ports: &r.src_ports,
            dst_ports: &r.dst_ports,
            src_cidrs: &r.src_cidrs,
            dst_cidrs: &r.dst_cidrs,
            dscp: &r.dscp,
        };
        let dns_names = values(cx, &r.dns_names, f("dns_names"), "name", dns_name_value)?;
        if let Some(d) = &r.dns_names {
            if dns_names.is_empty() {
                return Err(cx.at(d, f("dns_names"), "give at least one host name"));
            }
            if let Some(a) = &r.apps {
                return Err(cx.at(
                    a,
                    f("apps"),
                    "`apps` cannot be combined with `dns_names`: the apps bring their own names; \
                     give the names a rule of their own",
                ));
            }
            if let Some(c) = &r.dst_cidrs {
                return Err(cx.at(
                    c,
                    f("dst_cidrs"),
                    "`dst_cidrs` cannot be combined with `dns_names`: the names stand for the \
                     WAN-side addresses; give the prefixes a rule of their own",
                ));
            }
        }
        let Some(apps) = &r.apps else {
            let m = match_fields(cx, &fields, &f)?;
            if !final_names.insert(name.clone()) {
                return Err(cx.at(
                    &r.name,
                    f("name"),
                    format!("rule `{name}` is defined twice (once by an earlier rule's apps)"),
                ));
            }
            rules.push(Rule {
                name,
                class,
                priority,
                direction,
                protocols: m.protocols,
                src_ports: m.src_ports,
                dst_ports: m.dst_ports,
                src_cidrs: m.src_cidrs,
                dst_cidrs: m.dst_cidrs,
                dscp: m.dscp,
                dns_names,
            });
            continue;
        };
        // `apps` instead of match fields: mixing them would leave it unclear
        // whether the fields narrow each app or add a match of their own.
        if let Some((k, v)) = fields.present().first() {
            return Err(cx.at(
                v,
                f(k),
                format!(
                    "`{k}` cannot be combined with `apps` (line {}): the apps bring their own match; \
                     give `{k}` a rule of its own, or define an [[app]] with it",
                    cx.line_of(apps.span())
                ),
            ));
        }
        uses_apps = true;
        let wanted = values(cx, &Some(apps.clone()), f("apps"), "app", |v| match v {
            toml::Value::String(s) => Ok(s.trim().to_string()),
            other => Err(format!(
                "`{other}` is not an app name: write it as a string like \"dicom\""
            )),
        })?;
        for app_name in wanted {
            let Some(app) = catalogue.get(&app_name) else {
                return Err(cx.at(
                    apps,
                    f("apps"),
                    format!(
                        "no app named `{app_name}`; known apps (catalogue {}{}) are: {}",
                        catalogue.version,
                        if raw.apps.is_empty() {
                            ""
                        } else {
                            " and this file's [[app]] tables"
                        },
                        catalogue.names().join(", ")
                    ),
                ));
            };
            if let Some(n) = app.note(&name) {
                notes.push(n);
            }
            for rule in app.expand(&name, class, priority, direction) {
                if !final_names.insert(rule.name.clone()) {
                    return Err(cx.at(
                        &r.name,
                        f("name"),
                        format!(
                            "rule `{}` (from app `{app_name}`) is defined twice",
                            rule.name
                        ),
                    ));
                }
                rules.push(rule);
            }
        }
        if rules.len() > shaper_common::MAX_RULES {
            return Err(cx.at(
                sr,
                "rule",
                format!("at most {} rules (apps expanded)", shaper_common::MAX_RULES),
            ));
        }
    }
    if rules.len() > shaper_common::MAX_RULES {
        return Err(cx.at(
            &raw.rules[shaper_common::MAX_RULES.min(raw.rules.len() - 1)],
            "rule",
            format!("at most {} rules", shaper_common::MAX_RULES),
        ));
    }
    let autorate = autorate(
        cx,
        [&raw.upload, &raw.download],
        raw.autorate.as_ref(),
        &classes,
        &names,
        [upload_bps, download_bps],
    )?;
    if let Some(a) = &autorate {
        // The probes must not wait in the queues they measure: they get their own
        // rule, first, into the autorate class.
        rules.push(Rule {
            name: "autorate-probes".into(),
            class: a.class,
            priority: i64::MIN,
            direction: Direction::Both,
            protocols: vec![1],
            src_ports: vec![],
            dst_ports: vec![],
            src_cidrs: vec![],
            dst_cidrs: a
                .reflectors
                .iter()
                .map(|r| Cidr {
                    addr: IpAddr::V4(*r),
                    len: 32,
                })
                .collect(),
            dscp: vec![],
            dns_names: vec![],
        });
    }
    let (dscp_trust_lan, dscp_trust_wan) = dscp_trust(cx, raw.dscp.as_ref(), &names, &mut rules)?;
    let promote = promote(cx, raw.promote.as_ref(), &names, &classes)?;
    let dns = dns_settings(cx, raw.dns.as_ref())?;
    if let Some(a) = &raw.upload.account_arrivals {
        return Err(cx.at(
            a,
            "upload.account_arrivals",
            "only the download direction accounts arrivals: upload packets are shaped before the line, not after it",
        ));
    }
    // On by default, with [autorate] too: autorate follows the line, arrival accounting
    // keeps a flood from taking it; `rates` writes the lower of the two.
    let download_account_arrivals = raw
        .download
        .account_arrivals
        .as_ref()
        .is_none_or(|a| *a.get_ref());
    let download_window_clamp = window_clamp(cx, &raw.upload, &raw.download)?;
    // Lower priority value first; file order breaks ties (sort is stable).
    rules.sort_by_key(|r| r.priority);
    let ack_class = match &shaping.ack_class {
        None => None,
        Some(a) => match names.get(a.get_ref().trim()) {
            Some(&i) => Some(i),
            None => {
                let known: Vec<_> = classes.iter().map(|c| c.name.as_str()).collect();
                return Err(cx.at(
                    a,
                    "shaping.ack_class",
                    format!(
                        "no class named `{}`; classes are: {}",
                        a.get_ref(),
                        known.join(", ")
                    ),
                ));
            }
        },
    };

    let metrics_listen = match raw.telemetry.as_ref().and_then(|t| t.listen.as_ref()) {
        None => None,
        Some(l) => Some(l.get_ref().parse::<std::net::SocketAddr>().map_err(|_| {
            cx.at(
                l,
                "telemetry.listen",
                format!(
                    "`{}` is not an address:port like \"127.0.0.1:9464\"",
                    l.get_ref()
                ),
            )
        })?),
    };

    Ok(Policy {
        wan,
        lan,
        upload_bps,
        download_bps,
        leaf,
        queue_ms,
        remark_dscp: shaping.remark_dscp.unwrap_or(true),
        classes,
        default_class,
        rules,
        ack_class,
        metrics_listen,
        upload_link,
        download_link,
        catalogue: uses_apps.then(|| catalogue.version.clone()),
        notes,
        autorate,
        dns,
        dscp_trust_lan,
        dscp_trust_wan,
        promote,
        download_account_arrivals,
        download_window_clamp,
    })
}

/// The catalogue a config sees: the built-in one with the config's `[[app]]`
/// tables over it (for `shaper catalogue CONFIG`). Validates the whole config.
pub fn load_catalogue(path: &Path) -> Result<Catalogue, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        line: None,
        field: String::new(),
        message: format!("cannot read: {e}"),
    })?;
    parse(path, &text)?;
    let cx = Ctx {
        file: path,
        text: &text,
    };
    let raw: RawConfig = toml::from_str(&text).map_err(|e| toml_error(&cx, &e))?;
    let mut catalogue = Catalogue::builtin();
    for (i, sa) in raw.apps.iter().enumerate() {
        let origin = format!("{}:{}", path.display(), cx.line_of(sa.span()));
        catalogue.upsert(app(&cx, sa.get_ref(), &format!("app[{i}]"), origin)?);
    }
    Ok(catalogue)
}

/// Checks that the configured interfaces exist on this host (a read-only
/// lookup). The error points at the config line naming the interface.
pub fn check_interfaces_exist(file: &Path, policy: &Policy) -> Result<(), ConfigError> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    for (key, name) in [("wan", &policy.wan), ("lan", &policy.lan)] {
        let Ok(c) = std::ffi::CString::new(name.as_str()) else {
            continue;
        };
        // SAFETY: if_nametoindex reads a NUL-terminated string.
        if unsafe { libc::if_nametoindex(c.as_ptr()) } == 0 {
            let line = text
                .lines()
                .position(|l| l.trim_start().starts_with(key) && l.contains(&format!("\"{name}\"")))
                .map(|i| i + 1);
            return Err(ConfigError {
                file: file.to_path_buf(),
                line,
                field: format!("interfaces.{key}"),
                message: format!("interface `{name}` does not exist on this host (use --offline to skip this check)"),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
