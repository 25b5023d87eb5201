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
pub use crate::dir::{Dir, PerDir};
pub use crate::rule::*;
pub use crate::units::*;

mod classes;
mod raw;
mod rules;
mod sections;
use raw::*;
use rules::Rules;
use sections::*;

/// Highest HTB priority value the kernel accepts is 7; 0 is served first.
pub const MAX_PRIORITY: u8 = 7;

// ---------------------------------------------------------------------------
// Validated policy.

/// A validated configuration. Rates are bits per second.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub wan: String,
    pub lan: String,
    /// Each direction's rate, line and controls (`[upload]`, `[download]`).
    pub dirs: PerDir<DirPolicy>,
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
    /// The built-in catalogue's version, when a rule names apps.
    pub catalogue: Option<String>,
    /// Things `check` should say that are not errors (apps that match only
    /// partly or not at all yet).
    pub notes: Vec<String>,
    /// Rate adaptation to a line whose usable rate varies (`[autorate]`).
    pub autorate: Option<Autorate>,
    /// How DNS-learned addresses are kept (`[dns]`).
    pub dns: DnsSettings,
    /// Media-like default-class UDP flows move to a class (`[promote]`).
    pub promote: Option<Promote>,
    /// Per-call media measurement (`[calls]`).
    pub calls: CallsSettings,
}

/// `[calls]`, validated: RTP streams in `classes` are measured in the kernel and grouped
/// into calls by `shaper run`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallsSettings {
    /// Class indexes, in the order given (empty: nothing is measured).
    pub classes: Vec<usize>,
    /// Call records show addresses as they are (`addresses = "shown"`) rather than as
    /// keyed hashes.
    pub show_addresses: bool,
    /// A call ends after this many seconds without a media packet.
    pub quiet_s: u32,
}

/// What a config says about one direction (`[upload]` or `[download]`, and the `[dscp]`
/// trust of the side its packets come from).
#[derive(Debug, Clone, PartialEq)]
pub struct DirPolicy {
    /// `rate`: the line's rate this way, bits per second.
    pub rate_bps: u64,
    /// How the line counts bytes this way (`line/framing/overhead/mpu`).
    pub link: LinkAccounting,
    /// Rules look at the DSCP of packets going this way: upload packets' marks come from
    /// the LAN (`[dscp] lan = "trust"`), download packets' from the WAN (`wan`).
    pub dscp_trust: bool,
    /// `account_arrivals` (download only): the rate is held so that what reaches the
    /// shaper, dropped or not, stays within it (see `ingress`).
    pub account_arrivals: bool,
    /// `window_clamp` (download only): TCP receive windows are clamped (see
    /// [`WindowClamp`]); None: off (the default).
    pub window_clamp: Option<WindowClamp>,
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

impl Policy {
    /// The interface whose egress shapes direction `d` (upload: the WAN, download: the LAN).
    pub fn egress(&self, d: Dir) -> &str {
        match d {
            Dir::Up => &self.wan,
            Dir::Down => &self.lan,
        }
    }

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
    /// Each direction's `min_rate`: the floor the rate never goes below.
    pub min_bps: PerDir<u64>,
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

fn validate(cx: &Ctx<'_>, mut raw: RawConfig) -> Result<Policy, ConfigError> {
    let wan = interface_name(cx, &raw.interfaces.wan, "interfaces.wan")?;
    let lan = interface_name(cx, &raw.interfaces.lan, "interfaces.lan")?;
    if wan == lan {
        return Err(cx.at(
            &raw.interfaces.lan,
            "interfaces.lan",
            "WAN and LAN must be different interfaces",
        ));
    }
    let raw_dirs = PerDir::new(&raw.upload, &raw.download);
    let rates = raw_dirs
        .map(|d, r| {
            parse_rate(r.rate.get_ref())
                .map_err(|m| cx.at(&r.rate, format!("{}.rate", d.name()), m))
        })
        .transpose()?;
    let links = raw_dirs
        .map(|d, r| link_accounting(cx, r, d.name()))
        .transpose()?;

    let shaping = raw.shaping.take().unwrap_or(RawShaping {
        leaf: None,
        queue_ms: None,
        remark_dscp: None,
        ack_class: None,
    });
    let (leaf, queue_ms) = shaping_settings(cx, &shaping)?;
    let classes::Classes {
        classes,
        names,
        default_class,
    } = classes::classes(cx, &raw, rates)?;
    let Rules {
        mut rules,
        notes,
        catalogue,
        uses_apps,
    } = rules::rules(cx, &raw, &classes, &names)?;
    let autorate = autorate(cx, raw_dirs, raw.autorate.as_ref(), &classes, &names, rates)?;
    if let Some(a) = &autorate {
        // The probes must not wait in the queues they measure: they get their own
        // rule, first, into the autorate class.
        rules.push(Rule {
            name: "autorate-probes".into(),
            class: a.class,
            priority: i64::MIN,
            direction: None,
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
    let dscp_trust = dscp_trust(cx, raw.dscp.as_ref(), &names, &mut rules)?;
    let promote = promote(cx, raw.promote.as_ref(), &names, &classes)?;
    let calls = calls(cx, raw.calls.as_ref(), &names, promote.as_ref())?;
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
    let account_arrivals = raw
        .download
        .account_arrivals
        .as_ref()
        .is_none_or(|a| *a.get_ref());
    let window_clamp = window_clamp(cx, &raw.upload, &raw.download)?;
    let dirs = PerDir::from_fn(|d| DirPolicy {
        rate_bps: rates[d],
        link: links[d].clone(),
        dscp_trust: dscp_trust[d],
        account_arrivals: d == Dir::Down && account_arrivals,
        window_clamp: window_clamp.filter(|_| d == Dir::Down),
    });
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
        dirs,
        leaf,
        queue_ms,
        remark_dscp: shaping.remark_dscp.unwrap_or(true),
        classes,
        default_class,
        rules,
        ack_class,
        metrics_listen,
        catalogue: uses_apps.then(|| catalogue.version.clone()),
        notes,
        autorate,
        dns,
        promote,
        calls,
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
