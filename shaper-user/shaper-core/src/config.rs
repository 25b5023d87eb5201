//! The configuration file: raw TOML types (serde, `deny_unknown_fields`) and
//! their validation into a [`Policy`] that the rest of the program uses.
//! Every error names the file, the line and the field, and says what would
//! be accepted. Validation touches nothing outside this process.
//!
//! Built on leaf modules, re-exported here: [`crate::units`] (values), [`crate::diag`]
//! (errors with file, line and field), [`crate::rule`] (rules and their match fields).
//! The `[[app]]` format lives with the catalogue ([`crate::catalogue`]), which depends on
//! those leaves only: this module uses the catalogue, the catalogue never uses this one.
//! Still over 1,200 lines (about 1,700 without its tests): one `validate` walks every
//! section, and splitting it by section is the next step.

use std::{collections::HashMap, fmt, net::IpAddr, path::Path};

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::catalogue::{app, Catalogue, RawApp};
// The leaves this module is built on, re-exported: `config::parse_rate`, `config::Rule`,
// `config::ConfigError` and the rest keep their paths.
pub use crate::diag::*;
pub use crate::rule::*;
pub use crate::units::*;

/// Highest HTB priority value the kernel accepts is 7; 0 is served first.
pub const MAX_PRIORITY: u8 = 7;

// ---------------------------------------------------------------------------
// Raw file types.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    interfaces: RawInterfaces,
    upload: RawDirection,
    download: RawDirection,
    #[serde(default)]
    shaping: Option<RawShaping>,
    #[serde(default)]
    telemetry: Option<RawTelemetry>,
    #[serde(default)]
    autorate: Option<Spanned<RawAutorate>>,
    #[serde(default)]
    dns: Option<Spanned<RawDns>>,
    #[serde(default)]
    dscp: Option<Spanned<RawDscp>>,
    #[serde(default)]
    promote: Option<Spanned<RawPromote>>,
    #[serde(default, rename = "class")]
    classes: Vec<Spanned<RawClass>>,
    #[serde(default, rename = "rule")]
    rules: Vec<Spanned<RawRule>>,
    /// Apps added to (or replacing ones of) the built-in catalogue.
    #[serde(default, rename = "app")]
    apps: Vec<Spanned<RawApp>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInterfaces {
    wan: Spanned<String>,
    lan: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDirection {
    rate: Spanned<String>,
    /// Line type preset for link-layer accounting (see [`line_preset`]).
    #[serde(default)]
    line: Option<Spanned<String>>,
    /// Bytes the line adds to each IP packet; overrides the preset.
    #[serde(default)]
    overhead: Option<Spanned<i64>>,
    /// Minimum size of a packet on the line; overrides the preset.
    #[serde(default)]
    mpu: Option<Spanned<i64>>,
    /// "atm", "ptm" or "ethernet"; overrides the preset.
    #[serde(default)]
    framing: Option<Spanned<String>>,
    /// With `[autorate]`: the lowest rate it may set (default a quarter of `rate`).
    #[serde(default)]
    min_rate: Option<Spanned<String>>,
    /// Download only: what reaches the shaper counts against the rate, dropped or not
    /// (it crossed the line before it was dropped), as CAKE's ingress mode.
    #[serde(default)]
    account_arrivals: Option<Spanned<bool>>,
    /// Download only: clamp the receive window LAN hosts advertise to each TCP
    /// download's share of the rate times its round trip (see [`WindowClamp`]).
    #[serde(default)]
    window_clamp: Option<Spanned<bool>>,
    /// Download only, with `window_clamp`: the queue (ms) each clamped flow may keep
    /// in the modem on top of its round trip.
    #[serde(default)]
    window_clamp_queue_ms: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAutorate {
    /// IPv4 addresses beyond the line that answer ping (the ISP's first hop, ...).
    reflectors: Spanned<toml::Value>,
    /// The class the probes travel in (default: the first class of the lowest priority).
    #[serde(default)]
    class: Option<Spanned<String>>,
    /// One-way delay above the baseline that counts as a queue on the line (default 30 ms,
    /// as cake-autorate).
    #[serde(default)]
    delay_ms: Option<Spanned<u32>>,
    /// Time between probes (to the reflectors in turn).
    #[serde(default)]
    interval_ms: Option<Spanned<u32>>,
}

/// `[dns]`: how addresses learned from DNS answers are kept.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDns {
    /// Shortest time an answered address is kept (seconds; answers with a
    /// smaller TTL are kept this long).
    #[serde(default)]
    min_ttl: Option<Spanned<i64>>,
    /// Longest time (seconds).
    #[serde(default)]
    max_ttl: Option<Spanned<i64>>,
    /// Most addresses kept at once (the client holding the most makes room).
    #[serde(default)]
    max_entries: Option<Spanned<i64>>,
    /// The DNS servers the site's hosts use: answers from any other server
    /// teach nothing (empty or absent: any server a query went to).
    #[serde(default)]
    resolvers: Option<Spanned<toml::Value>>,
}

/// `[dscp]`: whose DSCP marks rules may look at, and which marks from the LAN
/// are honoured as they are.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDscp {
    /// "trust" (default) or "ignore": DSCP on packets from the LAN.
    #[serde(default)]
    lan: Option<Spanned<String>>,
    /// "trust" (default) or "ignore": DSCP on packets from the WAN.
    #[serde(default)]
    wan: Option<Spanned<String>>,
    /// DSCP name or number -> class: upload packets so marked go to the class.
    #[serde(default)]
    honour: Option<Spanned<toml::value::Table>>,
}

/// `[promote]`: default-class UDP flows that look like media move to a class.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPromote {
    class: Spanned<String>,
    /// At least this many packets per second ...
    #[serde(default)]
    min_pps: Option<Spanned<i64>>,
    /// ... at most this rate ...
    #[serde(default)]
    max_rate: Option<Spanned<String>>,
    /// ... and packets of at most this many bytes on average.
    #[serde(default)]
    max_packet: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShaping {
    /// Leaf queue: "auto" (fq_codel, else bfifo), "fq_codel", "cake", "bfifo".
    leaf: Option<Spanned<String>>,
    /// Depth of bfifo leaves in milliseconds at the class's ceiling.
    queue_ms: Option<Spanned<u32>>,
    /// Re-mark DSCP on WAN egress per class (default true).
    remark_dscp: Option<bool>,
    /// Class for TCP segments without data: pure ACKs, SYNs, SYN-ACKs, FINs,
    /// RSTs (default: classified like other packets).
    ack_class: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTelemetry {
    /// Prometheus text endpoint of `shaper run`, e.g. "127.0.0.1:9464".
    listen: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClass {
    name: Spanned<String>,
    priority: Spanned<i64>,
    guaranteed: Spanned<String>,
    #[serde(default)]
    ceiling: Option<Spanned<String>>,
    #[serde(default)]
    default: Option<Spanned<bool>>,
    /// A number 0-63 or a name; checked by [`dscp_value`].
    #[serde(default)]
    dscp: Option<Spanned<toml::Value>>,
    /// Class a flow of this class moves to when it turns bulk.
    #[serde(default)]
    demote_to: Option<Spanned<String>>,
    /// ... once it has carried this many bytes ("20MB").
    #[serde(default)]
    demote_after: Option<Spanned<String>>,
    /// ... or when it carries more than this rate over a second ("4mbit").
    #[serde(default)]
    demote_above: Option<Spanned<String>>,
    /// What the flows that claim this class (by a TLS/QUIC server name, or promoted into
    /// it) may carry together ("30%", "4mbit").
    #[serde(default)]
    claimed_max: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Spanned<String>,
    class: Spanned<String>,
    #[serde(default)]
    priority: Option<Spanned<i64>>,
    #[serde(default)]
    direction: Option<Spanned<String>>,
    // The match fields take one value or a list, and each value may be a
    // number or a string; they are read as TOML values and checked by
    // `list` and the per-item parsers, so a wrong type gets a message
    // naming what is accepted (not serde's "no variant of untagged enum").
    #[serde(default)]
    protocol: Option<Spanned<toml::Value>>,
    #[serde(default)]
    src_ports: Option<Spanned<toml::Value>>,
    #[serde(default)]
    dst_ports: Option<Spanned<toml::Value>>,
    #[serde(default)]
    src_cidrs: Option<Spanned<toml::Value>>,
    #[serde(default)]
    dst_cidrs: Option<Spanned<toml::Value>>,
    #[serde(default)]
    dscp: Option<Spanned<toml::Value>>,
    /// Catalogue app names, instead of the match fields above.
    #[serde(default)]
    apps: Option<Spanned<toml::Value>>,
    /// Host names (`*.` wildcards): the WAN-side address must be one a DNS
    /// answer gave for them, or the connection's TLS server name one of them.
    #[serde(default)]
    dns_names: Option<Spanned<toml::Value>>,
}

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

/// Validates `[download] window_clamp` / `window_clamp_queue_ms` (download only).
fn window_clamp(
    cx: &Ctx<'_>,
    up: &RawDirection,
    down: &RawDirection,
) -> Result<Option<WindowClamp>, ConfigError> {
    if let Some(w) = &up.window_clamp {
        return Err(cx.at(
            w,
            "upload.window_clamp",
            "only the download direction clamps windows: upload senders are on the LAN and the upload shaper already holds them",
        ));
    }
    if let Some(q) = &up.window_clamp_queue_ms {
        return Err(cx.at(
            q,
            "upload.window_clamp_queue_ms",
            "only the download direction clamps windows (see [download] window_clamp)",
        ));
    }
    let on = down.window_clamp.as_ref().is_some_and(|w| *w.get_ref());
    let queue_ms = match &down.window_clamp_queue_ms {
        None => WINDOW_CLAMP_QUEUE_MS,
        Some(q) if !on => {
            return Err(cx.at(
                q,
                "download.window_clamp_queue_ms",
                "has no effect without `window_clamp = true`: add it, or remove this",
            ))
        }
        Some(q) if *q.get_ref() <= WINDOW_CLAMP_QUEUE_MAX_MS => *q.get_ref(),
        Some(q) => {
            return Err(cx.at(
                q,
                "download.window_clamp_queue_ms",
                format!("must be 0 to {WINDOW_CLAMP_QUEUE_MAX_MS} milliseconds"),
            ))
        }
    };
    Ok(on.then_some(WindowClamp { queue_ms }))
}

fn class_index(
    cx: &Ctx<'_>,
    v: &Spanned<String>,
    field: &str,
    names: &HashMap<String, usize>,
) -> Result<usize, ConfigError> {
    names.get(v.get_ref().trim()).copied().ok_or_else(|| {
        let mut known: Vec<_> = names.iter().collect();
        known.sort_by_key(|(_, i)| **i);
        let known: Vec<_> = known.into_iter().map(|(n, _)| n.as_str()).collect();
        cx.at(
            v,
            field,
            format!(
                "no class named `{}`; classes are: {}",
                v.get_ref(),
                known.join(", ")
            ),
        )
    })
}

/// A class's `demote_to` / `demote_after` / `demote_above`.
fn demote(
    cx: &Ctx<'_>,
    c: &RawClass,
    i: usize,
    names: &HashMap<String, usize>,
) -> Result<Option<Demote>, ConfigError> {
    let f = |k: &str| format!("class[{i}].{k}");
    let after_bytes = match &c.demote_after {
        None => None,
        Some(v) => Some(parse_bytes(v.get_ref()).map_err(|m| cx.at(v, f("demote_after"), m))?),
    };
    let above_bps = match &c.demote_above {
        None => None,
        Some(v) => Some(parse_rate(v.get_ref()).map_err(|m| cx.at(v, f("demote_above"), m))?),
    };
    let Some(to) = &c.demote_to else {
        if let Some(v) = c.demote_after.as_ref().or(c.demote_above.as_ref()) {
            return Err(cx.at(
                v,
                f(if c.demote_after.is_some() {
                    "demote_after"
                } else {
                    "demote_above"
                }),
                "name the class flows are demoted to with `demote_to`",
            ));
        }
        return Ok(None);
    };
    let to_i = class_index(cx, to, &f("demote_to"), names)?;
    if to_i == i {
        return Err(cx.at(to, f("demote_to"), "a class cannot demote flows to itself"));
    }
    if after_bytes.is_none() && above_bps.is_none() {
        return Err(cx.at(
            to,
            f("demote_to"),
            "say when a flow turns bulk: `demote_after` (bytes, e.g. \"20MB\") and/or \
             `demote_above` (rate over a second, e.g. \"4mbit\")",
        ));
    }
    Ok(Some(Demote {
        to: to_i,
        after_bytes,
        above_bps,
    }))
}

/// `[promote]`.
fn promote(
    cx: &Ctx<'_>,
    p: Option<&Spanned<RawPromote>>,
    names: &HashMap<String, usize>,
    classes: &[Class],
) -> Result<Option<Promote>, ConfigError> {
    let Some(p) = p else { return Ok(None) };
    let p = p.get_ref();
    let class = class_index(cx, &p.class, "promote.class", names)?;
    let _ = classes;
    let min_pps = match &p.min_pps {
        None => 20,
        Some(v) if (1..=100_000).contains(v.get_ref()) => *v.get_ref() as u32,
        Some(v) => {
            return Err(cx.at(
                v,
                "promote.min_pps",
                "must be 1 to 100000 packets per second",
            ))
        }
    };
    let max_bps = match &p.max_rate {
        None => 4_000_000,
        Some(v) => parse_rate(v.get_ref()).map_err(|m| cx.at(v, "promote.max_rate", m))?,
    };
    if max_bps / 8 > u32::MAX as u64 {
        let v = p.max_rate.as_ref().expect("set: the default is small");
        return Err(cx.at(v, "promote.max_rate", "at most 34gbit"));
    }
    let max_packet = match &p.max_packet {
        None => 1300,
        Some(v) if (64..=65535).contains(v.get_ref()) => *v.get_ref() as u32,
        Some(v) => return Err(cx.at(v, "promote.max_packet", "must be 64 to 65535 bytes")),
    };
    Ok(Some(Promote {
        class,
        min_pps,
        max_bps,
        max_packet,
    }))
}

/// `[dscp]`: (trust LAN, trust WAN); adds a rule per honoured codepoint.
fn dscp_trust(
    cx: &Ctx<'_>,
    d: Option<&Spanned<RawDscp>>,
    names: &HashMap<String, usize>,
    rules: &mut Vec<Rule>,
) -> Result<(bool, bool), ConfigError> {
    let Some(d) = d else { return Ok((true, true)) };
    let d = d.get_ref();
    let side = |v: &Option<Spanned<String>>, field: &str| -> Result<bool, ConfigError> {
        match v {
            None => Ok(true),
            Some(s) => match s.get_ref().trim() {
                "trust" => Ok(true),
                "ignore" => Ok(false),
                other => Err(cx.at(s, field, format!("`{other}`: use \"trust\" or \"ignore\""))),
            },
        }
    };
    let lan = side(&d.lan, "dscp.lan")?;
    let wan = side(&d.wan, "dscp.wan")?;
    if let Some(h) = &d.honour {
        if !lan {
            return Err(cx.at(
                h,
                "dscp.honour",
                "marks from the LAN are honoured only when trusted: set `lan = \"trust\"` or remove `honour`",
            ));
        }
        for (k, v) in h.get_ref() {
            let code = dscp_value(&toml::Value::String(k.clone()))
                .or_else(|_| {
                    k.parse::<u8>()
                        .map_err(|e| e.to_string())
                        .and_then(|n| dscp_value(&toml::Value::Integer(n.into())))
                })
                .map_err(|m| cx.at(h, format!("dscp.honour.{k}"), m))?;
            let toml::Value::String(cname) = v else {
                return Err(cx.at(
                    h,
                    format!("dscp.honour.{k}"),
                    format!("`{v}` is not a class name: write it as a string like \"video\""),
                ));
            };
            let Some(&class) = names.get(cname.trim()) else {
                return Err(cx.at(
                    h,
                    format!("dscp.honour.{k}"),
                    format!("no class named `{cname}`"),
                ));
            };
            rules.push(Rule {
                name: format!("dscp-honour-{}", k.to_ascii_lowercase()),
                class,
                // After the autorate probes, before every rule of the file.
                priority: i64::MIN + 1,
                direction: Direction::Upload,
                protocols: vec![],
                src_ports: vec![],
                dst_ports: vec![],
                src_cidrs: vec![],
                dst_cidrs: vec![],
                dscp: vec![code],
                dns_names: vec![],
            });
        }
    }
    Ok((lan, wan))
}

/// `[dns]`.
fn dns_settings(cx: &Ctx<'_>, d: Option<&Spanned<RawDns>>) -> Result<DnsSettings, ConfigError> {
    let mut out = DnsSettings::default();
    let Some(d) = d else { return Ok(out) };
    let d = d.get_ref();
    if let Some(v) = &d.min_ttl {
        if !(1..=86_400).contains(v.get_ref()) {
            return Err(cx.at(v, "dns.min_ttl", "must be 1 to 86400 seconds"));
        }
        out.min_ttl_s = *v.get_ref() as u32;
    }
    if let Some(v) = &d.max_ttl {
        if !(1..=604_800).contains(v.get_ref()) {
            return Err(cx.at(v, "dns.max_ttl", "must be 1 to 604800 seconds (a week)"));
        }
        out.max_ttl_s = *v.get_ref() as u32;
    }
    if out.min_ttl_s > out.max_ttl_s {
        let v = d
            .min_ttl
            .as_ref()
            .or(d.max_ttl.as_ref())
            .expect("one is set");
        return Err(cx.at(
            v,
            if d.min_ttl.is_some() {
                "dns.min_ttl"
            } else {
                "dns.max_ttl"
            },
            format!(
                "min_ttl ({} s) is above max_ttl ({} s)",
                out.min_ttl_s, out.max_ttl_s
            ),
        ));
    }
    if let Some(v) = &d.max_entries {
        if !(1..=MAX_DNS_ENTRIES as i64).contains(v.get_ref()) {
            return Err(cx.at(
                v,
                "dns.max_entries",
                format!("must be 1 to {MAX_DNS_ENTRIES}"),
            ));
        }
        out.max_entries = *v.get_ref() as u32;
    }
    out.resolvers = values(
        cx,
        &d.resolvers,
        "dns.resolvers".into(),
        "resolver",
        |v| match v {
            toml::Value::String(s) => s.trim().parse::<IpAddr>().map_err(|_| {
                format!("`{s}` is not an IP address (like \"192.0.2.53\" or \"2001:db8::53\")")
            }),
            other => Err(format!(
                "`{other}` is not an address: write it as a string like \"192.0.2.53\""
            )),
        },
    )?;
    Ok(out)
}

/// Validates `[autorate]` and the directions' `min_rate`.
fn autorate(
    cx: &Ctx<'_>,
    [upload, download]: [&RawDirection; 2],
    a: Option<&Spanned<RawAutorate>>,
    classes: &[Class],
    names: &HashMap<String, usize>,
    [upload_bps, download_bps]: [u64; 2],
) -> Result<Option<Autorate>, ConfigError> {
    let Some(a) = a else {
        for (d, f) in [(upload, "upload"), (download, "download")] {
            if let Some(m) = &d.min_rate {
                return Err(cx.at(
                    m,
                    format!("{f}.min_rate"),
                    "`min_rate` is the floor of rate adaptation: add an [autorate] table, or remove it",
                ));
            }
        }
        return Ok(None);
    };
    let a = a.get_ref();
    let reflectors = values(
        cx,
        &Some(a.reflectors.clone()),
        "autorate.reflectors".into(),
        "reflector",
        |v| {
            match v {
            toml::Value::String(s) => s.trim().parse::<std::net::Ipv4Addr>().map_err(|_| {
                format!(
                    "`{s}` is not an IPv4 address (reflectors are pinged over IPv4; IPv6 reflectors are not supported yet)"
                )
            }),
            other => Err(format!(
                "`{other}` is not an address: write it as a string like \"192.0.2.1\""
            )),
        }
        },
    )?;
    if reflectors.is_empty() {
        return Err(cx.at(
            &a.reflectors,
            "autorate.reflectors",
            "give at least one address to ping",
        ));
    }
    let class = match &a.class {
        Some(c) => *names.get(c.get_ref().trim()).ok_or_else(|| {
            let known: Vec<_> = classes.iter().map(|c| c.name.as_str()).collect();
            cx.at(
                c,
                "autorate.class",
                format!(
                    "no class named `{}`; classes are: {}",
                    c.get_ref(),
                    known.join(", ")
                ),
            )
        })?,
        None => (0..classes.len())
            .min_by_key(|&i| classes[i].priority)
            .unwrap_or(0),
    };
    let delay_ms = match &a.delay_ms {
        None => 30,
        Some(d) if (2..=500).contains(d.get_ref()) => *d.get_ref(),
        Some(d) => return Err(cx.at(d, "autorate.delay_ms", "must be 2 to 500 milliseconds")),
    };
    let interval_ms = match &a.interval_ms {
        None => 50,
        Some(d) if (10..=1000).contains(d.get_ref()) => *d.get_ref(),
        Some(d) => return Err(cx.at(d, "autorate.interval_ms", "must be 10 to 1000 milliseconds")),
    };
    let floor = |d: &RawDirection, f: &str, rate: u64| -> Result<u64, ConfigError> {
        let Some(m) = &d.min_rate else {
            return Ok(rate / 4);
        };
        let v = parse_rate(m.get_ref()).map_err(|e| cx.at(m, format!("{f}.min_rate"), e))?;
        if v > rate {
            return Err(cx.at(
                m,
                format!("{f}.min_rate"),
                format!(
                    "{} is above {f}.rate ({}): autorate moves between min_rate and rate",
                    m.get_ref(),
                    raw_rate(d)
                ),
            ));
        }
        Ok(v)
    };
    Ok(Some(Autorate {
        reflectors,
        class,
        delay_ms,
        interval_ms,
        upload_min_bps: floor(upload, "upload", upload_bps)?,
        download_min_bps: floor(download, "download", download_bps)?,
    }))
}

fn raw_rate(d: &RawDirection) -> &str {
    d.rate.get_ref()
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

/// `[upload]`/`[download]` `line`, then `framing`, `overhead` and `mpu` over it.
fn link_accounting(
    cx: &Ctx<'_>,
    raw: &RawDirection,
    dir: &str,
) -> Result<LinkAccounting, ConfigError> {
    let mut acc = match &raw.line {
        None => LinkAccounting::default(),
        Some(l) => line_preset(l.get_ref().trim()).ok_or_else(|| {
            let names: Vec<_> = LINE_PRESETS
                .iter()
                .map(|p| format!("\"{}\"", p.0))
                .collect();
            cx.at(
                l,
                format!("{dir}.line"),
                format!(
                    "`{}` is not a line type; use {}",
                    l.get_ref(),
                    names.join(", ")
                ),
            )
        })?,
    };
    if let Some(f) = &raw.framing {
        acc.framing = match f.get_ref().trim() {
            "atm" => Framing::Atm,
            "ptm" => Framing::Ptm,
            "ethernet" => Framing::Ethernet,
            other => {
                return Err(cx.at(
                    f,
                    format!("{dir}.framing"),
                    format!("`{other}`: use \"atm\" (ADSL), \"ptm\" (VDSL2, EFM) or \"ethernet\""),
                ))
            }
        };
    }
    if let Some(o) = &raw.overhead {
        let v = *o.get_ref();
        if !OVERHEAD_RANGE.contains(&v) {
            return Err(cx.at(
                o,
                format!("{dir}.overhead"),
                format!(
                    "{v} is out of range: bytes added to each IP packet, {} to {}",
                    OVERHEAD_RANGE.start(),
                    OVERHEAD_RANGE.end()
                ),
            ));
        }
        acc.overhead = v as i32;
    }
    if let Some(m) = &raw.mpu {
        let v = *m.get_ref();
        if !MPU_RANGE.contains(&v) {
            return Err(cx.at(
                m,
                format!("{dir}.mpu"),
                format!(
                    "{v} is out of range: minimum bytes per packet on the line, {} to {}",
                    MPU_RANGE.start(),
                    MPU_RANGE.end()
                ),
            ));
        }
        acc.mpu = v as u32;
    }
    Ok(acc)
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

fn classes_name(classes: &[Class], i: usize) -> &str {
    classes.get(i).map(|c| c.name.as_str()).unwrap_or("?")
}

fn interface_name(cx: &Ctx<'_>, v: &Spanned<String>, field: &str) -> Result<String, ConfigError> {
    let s = v.get_ref();
    // IFNAMSIZ is 16 including the NUL.
    if s.is_empty()
        || s.len() > 15
        || s.contains('/')
        || s.contains(':')
        || s.chars().any(|c| c.is_whitespace())
        || s == "."
        || s == ".."
    {
        return Err(cx.at(
            v,
            field,
            format!("`{s}` is not a valid interface name (1-15 characters, no spaces, '/' or ':')"),
        ));
    }
    Ok(s.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[interfaces]
wan = "wan0"
lan = "lan0"
[upload]
rate = "9500kbit"
[download]
rate = "36mbit"
[[class]]
name = "video"
priority = 0
guaranteed = "20%"
dscp = "AF41"
[[class]]
name = "default"
priority = 4
guaranteed = "30%"
default = true
[[rule]]
name = "teams"
class = "video"
protocol = "udp"
dst_ports = ["3478-3481", 50020]
dst_cidrs = ["52.112.0.0/14", "2603:1063::/38"]
"#;

    fn p(text: &str) -> Result<Policy, ConfigError> {
        parse(Path::new("site.toml"), text)
    }

    #[test]
    fn good_config_validates() {
        let pol = p(GOOD).expect("valid");
        assert_eq!(pol.upload_bps, 9_500_000);
        assert_eq!(pol.download_bps, 36_000_000);
        assert_eq!(pol.default_class, 1);
        assert_eq!(pol.classes[0].dscp, Some(34));
        assert_eq!(pol.rules[0].dst_ports, vec![(3478, 3481), (50020, 50020)]);
        assert_eq!(pol.rules[0].protocols, vec![17]);
        assert_eq!(pol.rules[0].dst_cidrs.len(), 2);
    }

    #[test]
    fn arrival_accounting_is_on_by_default_and_with_autorate() {
        assert!(p(GOOD).expect("valid").download_account_arrivals);
        let auto = format!("{GOOD}[autorate]\nreflectors = [\"192.0.2.1\"]\n");
        let pol = p(&auto).expect("autorate alone");
        assert!(pol.autorate.is_some() && pol.download_account_arrivals);
        let both = auto.replace(
            "rate = \"36mbit\"\n",
            "rate = \"36mbit\"\naccount_arrivals = true\n",
        );
        assert!(p(&both).expect("both asked for").download_account_arrivals);
        let off = auto.replace(
            "rate = \"36mbit\"\n",
            "rate = \"36mbit\"\naccount_arrivals = false\n",
        );
        assert!(!p(&off).expect("turned off").download_account_arrivals);
    }

    #[test]
    fn rates_and_units() {
        assert_eq!(parse_rate("40mbit"), Ok(40_000_000));
        assert_eq!(parse_rate("1.5Mbit"), Ok(1_500_000));
        assert_eq!(parse_rate("800kbit/s"), Ok(800_000));
        assert!(parse_rate("40").is_err());
        assert!(parse_rate("40mbps").unwrap_err().contains("ambiguous"));
        assert!(parse_rate("fast").is_err());
        assert_eq!(format_rate(40_000_000), "40mbit");
        assert_eq!(format_rate(9_500_000), "9.5mbit");
    }

    #[test]
    fn dscp_names() {
        assert_eq!(parse_dscp_name("EF"), Ok(46));
        assert_eq!(parse_dscp_name("af41"), Ok(34));
        assert_eq!(parse_dscp_name("CS1"), Ok(8));
        assert_eq!(parse_dscp_name("AF21"), Ok(18));
        assert!(parse_dscp_name("AF51").is_err());
    }

    fn err_of(text: &str) -> ConfigError {
        match p(text) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e,
        }
    }

    #[test]
    fn unknown_field_names_line() {
        let e = err_of(&GOOD.replace("priority = 4", "priority = 4\nspeed = 3"));
        let s = e.to_string();
        assert!(s.starts_with("site.toml:"), "{s}");
        assert!(s.contains("speed"), "{s}");
        assert_eq!(e.line, Some(17), "{s}");
    }

    #[test]
    fn shares_above_100_percent() {
        let e = err_of(&GOOD.replace("guaranteed = \"30%\"", "guaranteed = \"90%\""));
        assert!(e.message.contains("must not exceed 100%"), "{e}");
        // The class that takes the total past 100%, on its `guaranteed` line.
        assert_eq!(e.field, "class[1].guaranteed");
        assert_eq!(e.line, Some(17), "{e}");
        assert!(
            e.message.contains("video 1.9mbit + default 8.55mbit"),
            "{e}"
        );
    }

    #[test]
    fn shares_of_exactly_100_percent_of_an_odd_rate() {
        // Each half rounds up to 4750001bit; the shares still add up to 100%.
        let text = GOOD
            .replace("9500kbit", "9500001bit")
            .replace("\"20%\"", "\"50%\"")
            .replace("\"30%\"", "\"50%\"");
        p(&text).unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn protocols_by_number_and_match_lists() {
        let pol = p(&GOOD.replace("protocol = \"udp\"", "protocol = [17, \"tcp\"]"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(pol.rules[0].protocols, vec![17, 6]);
        let pol = p(&GOOD.replace("protocol = \"udp\"", "protocol = 17")).expect("valid");
        assert_eq!(pol.rules[0].protocols, vec![17]);
        let e = err_of(&GOOD.replace("protocol = \"udp\"", "protocol = 300"));
        assert!(e.message.contains("out of range 0-255"), "{e}");
        for k in [
            "protocol = []",
            "dst_cidrs = []",
            "src_cidrs = []",
            "dscp = []",
        ] {
            // The rule with `k` in place of the same key's line, if it has one.
            let key = k.split(' ').next().unwrap_or_default();
            let (head, rule) = GOOD.split_once("[[rule]]\n").expect("a rule");
            let rule: String = rule
                .lines()
                .filter(|l| !l.starts_with(&format!("{key} =")))
                .map(|l| format!("{l}\n"))
                .collect();
            let e = err_of(&format!("{head}[[rule]]\n{k}\n{rule}"));
            assert!(e.message.contains("empty list matches nothing"), "{k}: {e}");
            assert_eq!(e.line, Some(20), "{k}: {e}");
        }
        let e = err_of(&GOOD.replace("50020]", "500.5]"));
        assert_eq!(e.field, "rule[0].dst_ports");
        assert!(e.message.contains("`500.5` is not a port"), "{e}");
        let e = err_of(&GOOD.replace("dscp = \"AF41\"", "dscp = 46.0"));
        assert_eq!(e.field, "class[0].dscp");
        assert!(e.message.contains("is not a DSCP"), "{e}");
    }

    #[test]
    fn toml_errors_name_the_field() {
        let e = err_of(&GOOD.replace("priority = 4", "priority = \"low\""));
        assert_eq!((e.field.as_str(), e.line), ("class[1].priority", Some(16)));
        let e = err_of(&GOOD.replace("rate = \"36mbit\"", "rate = 36"));
        assert_eq!((e.field.as_str(), e.line), ("download.rate", Some(8)));
        let e = err_of(&GOOD.replace("class = \"video\"", "class = \"video\"\nport = 1"));
        assert_eq!((e.field.as_str(), e.line), ("rule[0].port", Some(22)));
        let e = err_of(&GOOD.replace("wan = \"wan0\"\n", ""));
        assert_eq!((e.field.as_str(), e.line), ("interfaces.wan", Some(2)));
        let e = err_of(&GOOD.replace("[upload]\nrate = \"9500kbit\"\n", ""));
        assert_eq!((e.field.as_str(), e.line), ("upload", None), "{e}");
        // Syntax errors: a line, one line of message, no field.
        let e = err_of(&GOOD.replace("[download]", "[download"));
        assert_eq!((e.field.as_str(), e.line), ("", Some(7)));
        assert!(!e.message.contains('\n'), "{e}");
    }

    #[test]
    fn second_default_points_at_its_default_line() {
        let e = err_of(&GOOD.replace("dscp = \"AF41\"", "dscp = \"AF41\"\ndefault = true"));
        assert_eq!(e.field, "class[1].default");
        assert_eq!(e.line, Some(19), "{e}");
        assert!(e.message.contains("`video` is already the default"), "{e}");
    }

    #[test]
    fn bad_cidr() {
        let e = err_of(&GOOD.replace("52.112.0.0/14", "52.112.0.300/14"));
        assert_eq!(e.field, "rule[0].dst_cidrs");
        assert_eq!(e.line, Some(24));
        let e = err_of(&GOOD.replace("52.112.0.0/14", "52.112.0.1/14"));
        assert!(e.message.contains("host bits"), "{e}");
    }

    #[test]
    fn unknown_class_and_duplicates() {
        let e = err_of(&GOOD.replace("class = \"video\"", "class = \"vidoe\""));
        assert!(e.message.contains("classes are: video, default"), "{e}");
        let e = err_of(&GOOD.replace("name = \"default\"", "name = \"video\""));
        assert!(e.message.contains("defined twice"), "{e}");
        let e = err_of(&GOOD.replace("default = true", ""));
        assert!(e.message.contains("default = true"), "{e}");
    }

    #[test]
    fn ports_and_ranges() {
        let e = err_of(&GOOD.replace("\"3478-3481\"", "\"3481-3478\""));
        assert!(e.message.contains("backwards"), "{e}");
        let e = err_of(&GOOD.replace("50020]", "70000]"));
        assert!(e.message.contains("out of range"), "{e}");
        let e = err_of(&GOOD.replace("protocol = \"udp\"", "protocol = \"icmp\""));
        assert!(e.message.contains("carries ports"), "{e}");
    }

    #[test]
    fn interfaces() {
        let e = err_of(&GOOD.replace("lan = \"lan0\"", "lan = \"wan0\""));
        assert_eq!(e.field, "interfaces.lan");
        let e = err_of(&GOOD.replace("lan = \"lan0\"", "lan = \"a-very-long-interface-name\""));
        assert!(e.message.contains("not a valid interface name"), "{e}");
        // The kernel refuses ':' in a device name ("eth0:1" is an alias label).
        let e = err_of(&GOOD.replace("lan = \"lan0\"", "lan = \"lan0:1\""));
        assert!(e.message.contains("not a valid interface name"), "{e}");
    }

    #[test]
    fn ceiling_below_guaranteed() {
        let e = err_of(&GOOD.replace(
            "guaranteed = \"20%\"",
            "guaranteed = \"20%\"\nceiling = \"10%\"",
        ));
        assert_eq!(e.field, "class[0].ceiling");
    }

    #[test]
    fn line_presets_and_overrides() {
        let pol = p(GOOD).expect("valid");
        assert!(pol.upload_link.is_none() && pol.download_link.is_none());
        let up = |extra: &str| {
            p(&GOOD.replace(
                "rate = \"9500kbit\"\n",
                &format!("rate = \"9500kbit\"\n{extra}\n"),
            ))
        };
        let pol = up("line = \"adsl2-pppoa\"").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            pol.upload_link,
            LinkAccounting {
                line: Some("adsl2-pppoa".into()),
                framing: Framing::Atm,
                overhead: 10,
                mpu: 0
            }
        );
        assert!(
            pol.download_link.is_none(),
            "the other direction is untouched"
        );
        for (name, framing, overhead) in [
            ("adsl2-pppoe", Framing::Atm, 40),
            ("vdsl2-pppoe", Framing::Ptm, 30),
            ("vdsl2-ipoe", Framing::Ptm, 22),
            ("efm", Framing::Ptm, 22),
            ("ethernet", Framing::Ethernet, 0),
        ] {
            let l = up(&format!("line = \"{name}\"")).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                (l.upload_link.framing, l.upload_link.overhead),
                (framing, overhead),
                "{name}"
            );
        }
        assert!(up("line = \"ethernet\"")
            .expect("valid")
            .upload_link
            .is_none());
        // Explicit fields override the preset.
        let pol = up("line = \"vdsl2-pppoe\"\noverhead = 34\nmpu = 68").expect("valid");
        assert_eq!(
            (
                pol.upload_link.framing,
                pol.upload_link.overhead,
                pol.upload_link.mpu
            ),
            (Framing::Ptm, 34, 68)
        );
        let pol =
            up("line = \"adsl2-pppoa\"\nframing = \"ethernet\"\noverhead = -4").expect("valid");
        assert_eq!(
            (pol.upload_link.framing, pol.upload_link.overhead),
            (Framing::Ethernet, -4)
        );
        // Without a preset.
        let pol = p(&GOOD.replace(
            "rate = \"36mbit\"\n",
            "rate = \"36mbit\"\nframing = \"atm\"\noverhead = 44\n",
        ))
        .expect("valid");
        assert_eq!(
            (
                pol.download_link.line.as_deref(),
                pol.download_link.framing,
                pol.download_link.overhead
            ),
            (None, Framing::Atm, 44)
        );
        assert!(pol.upload_link.is_none());
    }

    #[test]
    fn line_errors_name_file_line_and_field() {
        let up = |extra: &str| {
            err_of(&GOOD.replace(
                "rate = \"9500kbit\"\n",
                &format!("rate = \"9500kbit\"\n{extra}\n"),
            ))
        };
        let e = up("line = \"adsl\"");
        assert_eq!((e.field.as_str(), e.line), ("upload.line", Some(7)), "{e}");
        assert!(e.message.contains("\"adsl2-pppoa\""), "{e}");
        assert!(
            e.to_string().starts_with("site.toml:7: `upload.line`"),
            "{e}"
        );
        let e = up("overhead = 300");
        assert_eq!(
            (e.field.as_str(), e.line),
            ("upload.overhead", Some(7)),
            "{e}"
        );
        assert!(e.message.contains("-64 to 256"), "{e}");
        let e = up("overhead = -65");
        assert_eq!(e.field, "upload.overhead", "{e}");
        // The bounds themselves are accepted.
        let pol = p(&GOOD.replace(
            "rate = \"9500kbit\"\n",
            "rate = \"9500kbit\"\noverhead = -64\nmpu = 256\n",
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((pol.upload_link.overhead, pol.upload_link.mpu), (-64, 256));
        let e = up("mpu = -1");
        assert_eq!((e.field.as_str(), e.line), ("upload.mpu", Some(7)), "{e}");
        assert!(e.message.contains("0 to 256"), "{e}");
        let e = up("mpu = 257");
        assert_eq!(e.field, "upload.mpu", "{e}");
        let e = up("framing = \"vdsl\"");
        assert_eq!(
            (e.field.as_str(), e.line),
            ("upload.framing", Some(7)),
            "{e}"
        );
        assert!(e.message.contains("\"ptm\""), "{e}");
        // Wrong TOML types are named like any other field.
        let e = up("overhead = \"10\"");
        assert_eq!(
            (e.field.as_str(), e.line),
            ("upload.overhead", Some(7)),
            "{e}"
        );
        let e = err_of(&GOOD.replace("rate = \"36mbit\"\n", "rate = \"36mbit\"\nline = 3\n"));
        assert_eq!(
            (e.field.as_str(), e.line),
            ("download.line", Some(9)),
            "{e}"
        );
    }

    #[test]
    fn shipped_example_config_validates() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/gp-surgery-fttc-40-10.toml");
        let pol = load(&path).unwrap_or_else(|e| panic!("{e}"));
        let names: Vec<_> = pol.classes.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            ["video", "clinical-interactive", "images", "default", "bulk"]
        );
        assert_eq!(pol.classes[pol.default_class].name, "default");
        // Teams media to its four ranges, and DICOM outbound and inbound, now
        // from the catalogue.
        assert!(pol
            .rules
            .iter()
            .any(|r| r.name == "consultations/teams-media#1" && r.dst_cidrs.len() == 4));
        assert!(
            pol.rules
                .iter()
                .any(|r| r.name == "images/dicom#1"
                    && r.dst_ports == vec![(104, 104), (11112, 11112)])
        );
        assert!(
            pol.rules
                .iter()
                .any(|r| r.name == "images/dicom#2"
                    && r.src_ports == vec![(104, 104), (11112, 11112)])
        );
        assert_eq!(pol.catalogue.as_deref(), Some(crate::catalogue::VERSION));
    }

    // -- Catalogue apps in rules and [[app]] tables ------------------------

    /// GOOD's classes and interfaces with `rules` in place of its rule.
    fn with_rules(rules: &str) -> String {
        let (head, _) = GOOD.split_once("[[rule]]\n").expect("a rule");
        format!("{head}{rules}")
    }

    fn names(pol: &Policy) -> Vec<&str> {
        pol.rules.iter().map(|r| r.name.as_str()).collect()
    }

    #[test]
    fn apps_expand_in_order_with_the_rules_class_priority_and_direction() {
        let pol = p(&with_rules(
            r#"[[rule]]
name = "first"
class = "default"
protocol = "tcp"
[[rule]]
name = "v"
class = "video"
priority = -5
direction = "upload"
apps = ["teams-media", "dicom", "zoom"]
[[rule]]
name = "last"
class = "default"
protocol = "udp"
"#,
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        // Priority -5 puts all four expansions first, in the order named.
        assert_eq!(
            names(&pol),
            [
                "v/teams-media#1",
                "v/dicom#1",
                "v/dicom#2",
                "v/zoom#1",
                "first",
                "last"
            ]
        );
        for r in &pol.rules[..4] {
            assert_eq!(
                (r.class, r.priority, r.direction),
                (0, -5, Direction::Upload)
            );
        }
        assert_eq!(pol.rules[0].dst_cidrs.len(), 4);
        assert_eq!(pol.rules[2].src_ports, [(104, 104), (11112, 11112)]);
        assert_eq!(pol.catalogue.as_deref(), Some(crate::catalogue::VERSION));
        assert!(pol.notes.is_empty(), "{:?}", pol.notes);
        // Without a priority the expansions keep the rule's place in the file.
        let pol = p(&with_rules(
            "[[rule]]\nname = \"a\"\nclass = \"default\"\nprotocol = \"tcp\"\n\
             [[rule]]\nname = \"d\"\nclass = \"video\"\napps = \"dicom\"\n\
             [[rule]]\nname = \"b\"\nclass = \"default\"\nprotocol = \"udp\"\n",
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(names(&pol), ["a", "d/dicom#1", "d/dicom#2", "b"]);
        // A config without apps records no catalogue.
        assert_eq!(p(GOOD).expect("valid").catalogue, None);
    }

    #[test]
    fn unknown_app_is_an_error_listing_the_known_ones() {
        let e = err_of(&with_rules(
            "[[rule]]\nname = \"v\"\nclass = \"video\"\napps = [\"teams-media\", \"skype\"]\n",
        ));
        assert_eq!(
            (e.field.as_str(), e.line),
            ("rule[0].apps", Some(22)),
            "{e}"
        );
        assert!(e.message.contains("no app named `skype`"), "{e}");
        assert!(e.message.contains("teams-media, zoom"), "{e}");
        assert!(e.message.contains("backup-sync"), "{e}");
        let e = err_of(&with_rules(
            "[[rule]]\nname = \"v\"\nclass = \"video\"\napps = []\n",
        ));
        assert!(e.message.contains("empty list matches nothing"), "{e}");
        let e = err_of(&with_rules(
            "[[rule]]\nname = \"v\"\nclass = \"video\"\napps = [3]\n",
        ));
        assert!(e.message.contains("not an app name"), "{e}");
    }

    #[test]
    fn apps_and_match_fields_cannot_be_mixed() {
        let e = err_of(&with_rules(
            "[[rule]]\nname = \"v\"\nclass = \"video\"\napps = [\"zoom\"]\nsrc_cidrs = [\"192.168.1.0/24\"]\n",
        ));
        assert_eq!(
            (e.field.as_str(), e.line),
            ("rule[0].src_cidrs", Some(23)),
            "{e}"
        );
        assert!(
            e.message
                .contains("cannot be combined with `apps` (line 22)"),
            "{e}"
        );
    }

    #[test]
    fn dns_only_app_expands_to_a_host_name_rule_with_a_note() {
        let pol = p(&with_rules(
            "[[rule]]\nname = \"v\"\nclass = \"video\"\napps = [\"accurx-video\", \"zoom\"]\n",
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(names(&pol), ["v/accurx-video#dns", "v/zoom#1"]);
        assert_eq!(
            pol.rules[0].dns_names,
            [
                "*.sfu.whereby.com",
                "*.turn.whereby.com",
                "*.sfu.svc.whereby.com",
                "*.turn.svc.whereby.com"
            ]
        );
        assert!(pol.uses_hosts());
        assert_eq!(pol.notes.len(), 1, "{:?}", pol.notes);
        assert!(
            pol.notes[0].contains("`accurx-video` is recognised by host name"),
            "{:?}",
            pol.notes
        );
    }

    #[test]
    fn host_names_demotion_promotion_and_dscp_trust_validate() {
        let pol = p(&with_rules(
            "[[rule]]\nname = \"w\"\nclass = \"video\"\nprotocol = \"udp\"\ndns_names = [\"*.Example.org\"]\n",
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(pol.rules[0].dns_names, ["*.example.org"]);
        for (extra, field) in [
            (
                "dst_cidrs = [\"10.0.0.0/8\"]\ndns_names = [\"a.example\"]\n",
                "rule[0].dst_cidrs",
            ),
            ("dns_names = []\n", "rule[0].dns_names"),
            ("dns_names = [\"bad name\"]\n", "rule[0].dns_names"),
        ] {
            let e = p(&with_rules(&format!(
                "[[rule]]\nname = \"w\"\nclass = \"video\"\n{extra}"
            )))
            .expect_err(extra);
            assert_eq!(e.field, field, "{e}");
        }
        // Demotion on the video class, promotion into it, DSCP trust.
        let with = |class_extra: &str, tail: &str| {
            let t = with_rules("").replacen(
                "name = \"video\"\n",
                &format!("name = \"video\"\n{class_extra}"),
                1,
            );
            p(&format!("{t}{tail}"))
        };
        let pol = with(
            "demote_to = \"default\"\ndemote_after = \"20MB\"\ndemote_above = \"4mbit\"\n",
            "[promote]\nclass = \"video\"\n[dscp]\nwan = \"ignore\"\n[dscp.honour]\nef = \"video\"\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let v = &pol.classes[0];
        assert_eq!(
            v.demote,
            Some(Demote {
                to: 1,
                after_bytes: Some(20_000_000),
                above_bps: Some(4_000_000)
            })
        );
        assert_eq!(
            pol.promote,
            Some(Promote {
                class: 0,
                min_pps: 20,
                max_bps: 4_000_000,
                max_packet: 1300
            })
        );
        assert!(pol.dscp_trust_lan && !pol.dscp_trust_wan);
        assert_eq!(pol.rules[0].name, "dscp-honour-ef");
        assert_eq!(pol.rules[0].dscp, [46]);
        assert!(pol.measures_flows());
        for (class_extra, tail, field) in [
            ("demote_after = \"20MB\"\n", "", "class[0].demote_after"),
            (
                "demote_to = \"video\"\ndemote_after = \"1MB\"\n",
                "",
                "class[0].demote_to",
            ),
            ("demote_to = \"default\"\n", "", "class[0].demote_to"),
            (
                "demote_to = \"default\"\ndemote_after = \"20mb\"\n",
                "",
                "class[0].demote_after",
            ),
            ("", "[promote]\nclass = \"nope\"\n", "promote.class"),
            (
                "",
                "[dscp]\nlan = \"ignore\"\n[dscp.honour]\nef = \"video\"\n",
                "dscp.honour",
            ),
            ("", "[dscp]\nlan = \"maybe\"\n", "dscp.lan"),
            ("", "[dns]\nmin_ttl = 600\nmax_ttl = 60\n", "dns.min_ttl"),
            (
                "",
                "[dns]\nresolvers = [\"192.0.2.53\", \"dns.example\"]\n",
                "dns.resolvers",
            ),
            ("", "[dns]\nresolvers = [53]\n", "dns.resolvers"),
        ] {
            let e = with(class_extra, tail).expect_err(field);
            assert_eq!(e.field, field, "{e}");
        }
    }

    #[test]
    fn config_apps_override_and_extend_the_catalogue() {
        let text = with_rules(
            r#"[[rule]]
name = "v"
class = "video"
apps = ["zoom", "pacs-cloud", "systmone"]
[[app]]
name = "zoom"
protocol = "udp"
dst_ports = ["8801-8810"]
dst_cidrs = ["3.7.35.0/25"]
notes = "our Zoom ranges"
[[app]]
name = "pacs-cloud"
protocol = "tcp"
dst_ports = [443]
dst_cidrs = ["203.0.113.0/24"]
[[app]]
name = "systmone"
source = "our HSCN provider"
dns_names = ["*.tpp-uk.com"]
[[app.match]]
protocol = "tcp"
dst_ports = [443]
dst_cidrs = ["10.1.0.0/16"]
[[app.match]]
protocol = "tcp"
dst_ports = [443]
dst_cidrs = ["10.2.0.0/16"]
"#,
        );
        let pol = p(&text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            names(&pol),
            [
                "v/zoom#1",
                "v/pacs-cloud#1",
                "v/systmone#1",
                "v/systmone#2",
                "v/systmone#dns"
            ]
        );
        assert_eq!(pol.rules[0].dst_cidrs[0].to_string(), "3.7.35.0/25");
        assert_eq!(pol.rules[3].dst_cidrs[0].to_string(), "10.2.0.0/16");
        let cat_path = std::env::temp_dir().join(format!("shaper-cat-{}.toml", std::process::id()));
        std::fs::write(&cat_path, &text).expect("write");
        let cat = load_catalogue(&cat_path).unwrap_or_else(|e| panic!("{e}"));
        let _ = std::fs::remove_file(&cat_path);
        let zoom = cat.get("zoom").expect("zoom");
        assert_eq!(zoom.notes, "our Zoom ranges");
        assert!(zoom.origin.ends_with(":23"), "{}", zoom.origin);
        assert_eq!(cat.names()[4], "zoom", "replaced in place");
        assert_eq!(cat.names().last(), Some(&"pacs-cloud"));
        assert_eq!(cat.get("systmone").expect("s").needs, ["dns"]);
    }

    #[test]
    fn config_apps_are_validated_like_rules() {
        let app = |body: &str| {
            err_of(&with_rules(&format!(
                "[[rule]]\nname = \"v\"\nclass = \"video\"\napps = [\"x\"]\n[[app]]\nname = \"x\"\n{body}\n"
            )))
        };
        let e = app("protocol = \"icmp\"\ndst_ports = [1]");
        assert_eq!(
            (e.field.as_str(), e.line),
            ("app[0].protocol", Some(25)),
            "{e}"
        );
        assert!(e.message.contains("carries ports"), "{e}");
        let e = app("dst_cidrs = [\"10.0.0.1/8\"]");
        assert_eq!(e.field, "app[0].dst_cidrs", "{e}");
        assert!(e.message.contains("host bits"), "{e}");
        let e = app("dst_ports = []");
        assert!(e.message.contains("empty list matches nothing"), "{e}");
        let e = app("dns_names = [\"bad name.com\"]");
        assert_eq!(e.field, "app[0].dns_names", "{e}");
        let e = app("needs = [\"sni\"]");
        assert_eq!(e.field, "app[0].needs", "{e}");
        let e = app("dst_ports = [1]\n[[app.match]]\nprotocol = \"tcp\"");
        assert_eq!(e.field, "app[0].dst_ports", "{e}");
        assert!(e.message.contains("[[app.match]]"), "{e}");
        let e = app("[[app.match]]\ndns_names = [\"a.b\"]");
        assert!(e.message.contains("unknown field `dns_names`"), "{e}");
        let e = app("[[app.match]]\nprotocol = 300");
        assert_eq!(e.field, "app[0].match[0].protocol", "{e}");
        let e = app("colour = \"red\"");
        assert_eq!(
            (e.field.as_str(), e.line),
            ("app[0].colour", Some(25)),
            "{e}"
        );
        let e = app("protocol = \"udp\"\n[[app]]\nname = \"x\"\nprotocol = \"tcp\"");
        assert_eq!((e.field.as_str(), e.line), ("app[1].name", Some(27)), "{e}");
        assert!(e.message.contains("defined twice"), "{e}");
        let e = app("protocol = \"udp\"\n[[app]]\nname = \"has space\"");
        assert_eq!(e.field, "app[1].name", "{e}");
    }

    #[test]
    fn window_clamp_is_off_by_default_download_only_and_validated() {
        assert_eq!(p(GOOD).expect("valid").download_window_clamp, None);
        let with = |down: &str, up: &str| {
            let t = GOOD
                .replace("rate = \"36mbit\"\n", &format!("rate = \"36mbit\"\n{down}"))
                .replace(
                    "rate = \"9500kbit\"\n",
                    &format!("rate = \"9500kbit\"\n{up}"),
                );
            p(&t)
        };
        let pol = with("window_clamp = true\n", "").expect("valid");
        assert_eq!(
            pol.download_window_clamp,
            Some(WindowClamp {
                queue_ms: WINDOW_CLAMP_QUEUE_MS
            })
        );
        let pol = with("window_clamp = true\nwindow_clamp_queue_ms = 12\n", "").expect("valid");
        assert_eq!(pol.download_window_clamp.map(|w| w.queue_ms), Some(12));
        let pol = with("window_clamp = false\n", "").expect("valid");
        assert_eq!(pol.download_window_clamp, None);
        let e = with("window_clamp = true\nwindow_clamp_queue_ms = 201\n", "").unwrap_err();
        assert_eq!(e.field, "download.window_clamp_queue_ms", "{e}");
        assert!(e.message.contains("0 to 200"), "{e}");
        let e = with("window_clamp_queue_ms = 5\n", "").unwrap_err();
        assert!(e.message.contains("without `window_clamp = true`"), "{e}");
        let e = with("", "window_clamp = true\n").unwrap_err();
        assert_eq!(e.field, "upload.window_clamp", "{e}");
        let e = with("", "window_clamp_queue_ms = 5\n").unwrap_err();
        assert_eq!(e.field, "upload.window_clamp_queue_ms", "{e}");
        let e = with("window_clamp = \"yes\"\n", "").unwrap_err();
        assert!(e.to_string().contains("window_clamp"), "{e}");
        // The plan: the flag, the queue in µs, each class's ceiling as its first share.
        let pol = with("window_clamp = true\n", "").expect("valid");
        let m = crate::compile::maps(&crate::compile::plan(&pol, None));
        assert_ne!(m.flags & shaper_common::CFG_WINDOW_CLAMP, 0);
        assert_eq!(m.clamp_queue_us, 5_000);
        assert_eq!(m.clamp_share, vec![36_000_000 / 8; 2]);
        let good = crate::compile::plan(&p(GOOD).expect("valid"), None);
        let m = crate::compile::maps(&good);
        assert_eq!(m.flags & shaper_common::CFG_WINDOW_CLAMP, 0);
        assert!(m.clamp_share.is_empty());
        // `check` says so.
        let out = crate::compile::describe(&good, &m);
        assert!(!out.contains("window clamp"), "{out}");
        let pl = crate::compile::plan(&pol, None);
        let out = crate::compile::describe(&pl, &crate::compile::maps(&pl));
        assert!(out.contains("download window clamp: on"), "{out}");
    }
}
