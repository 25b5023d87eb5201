//! The config file as TOML gives it: serde types with `deny_unknown_fields` and spans,
//! before validation (mod.rs and sections.rs).

use super::*;

// ---------------------------------------------------------------------------
// Raw file types.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    pub(crate) interfaces: RawInterfaces,
    pub(crate) upload: RawDirection,
    pub(crate) download: RawDirection,
    #[serde(default)]
    pub(crate) shaping: Option<RawShaping>,
    #[serde(default)]
    pub(crate) telemetry: Option<RawTelemetry>,
    #[serde(default)]
    pub(crate) autorate: Option<Spanned<RawAutorate>>,
    #[serde(default)]
    pub(crate) dns: Option<Spanned<RawDns>>,
    #[serde(default)]
    pub(crate) dscp: Option<Spanned<RawDscp>>,
    #[serde(default)]
    pub(crate) promote: Option<Spanned<RawPromote>>,
    #[serde(default)]
    pub(crate) calls: Option<Spanned<RawCalls>>,
    #[serde(default, rename = "class")]
    pub(crate) classes: Vec<Spanned<RawClass>>,
    #[serde(default, rename = "rule")]
    pub(crate) rules: Vec<Spanned<RawRule>>,
    /// Apps added to (or replacing ones of) the built-in catalogue.
    #[serde(default, rename = "app")]
    pub(crate) apps: Vec<Spanned<RawApp>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawInterfaces {
    pub(crate) wan: Spanned<String>,
    pub(crate) lan: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDirection {
    pub(crate) rate: Spanned<String>,
    /// Line type preset for link-layer accounting (see [`line_preset`]).
    #[serde(default)]
    pub(crate) line: Option<Spanned<String>>,
    /// Bytes the line adds to each IP packet; overrides the preset.
    #[serde(default)]
    pub(crate) overhead: Option<Spanned<i64>>,
    /// Minimum size of a packet on the line; overrides the preset.
    #[serde(default)]
    pub(crate) mpu: Option<Spanned<i64>>,
    /// "atm", "ptm" or "ethernet"; overrides the preset.
    #[serde(default)]
    pub(crate) framing: Option<Spanned<String>>,
    /// With `[autorate]`: the lowest rate it may set (default a quarter of `rate`).
    #[serde(default)]
    pub(crate) min_rate: Option<Spanned<String>>,
    /// Download only: what reaches the shaper counts against the rate, dropped or not
    /// (it crossed the line before it was dropped), as CAKE's ingress mode.
    #[serde(default)]
    pub(crate) account_arrivals: Option<Spanned<bool>>,
    /// Download only: clamp the receive window LAN hosts advertise to each TCP
    /// download's share of the rate times its round trip (see [`WindowClamp`]).
    #[serde(default)]
    pub(crate) window_clamp: Option<Spanned<bool>>,
    /// Download only, with `window_clamp`: the queue (ms) each clamped flow may keep
    /// in the modem on top of its round trip.
    #[serde(default)]
    pub(crate) window_clamp_queue_ms: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAutorate {
    /// IPv4 addresses beyond the line that answer ping (the ISP's first hop, ...).
    pub(crate) reflectors: Spanned<toml::Value>,
    /// The class the probes travel in (default: the first class of the lowest priority).
    #[serde(default)]
    pub(crate) class: Option<Spanned<String>>,
    /// One-way delay above the baseline that counts as a queue on the line (default 30 ms,
    /// as cake-autorate).
    #[serde(default)]
    pub(crate) delay_ms: Option<Spanned<u32>>,
    /// Time between probes (to the reflectors in turn).
    #[serde(default)]
    pub(crate) interval_ms: Option<Spanned<u32>>,
}

/// `[dns]`: how addresses learned from DNS answers are kept.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDns {
    /// Shortest time an answered address is kept (seconds; answers with a
    /// smaller TTL are kept this long).
    #[serde(default)]
    pub(crate) min_ttl: Option<Spanned<i64>>,
    /// Longest time (seconds).
    #[serde(default)]
    pub(crate) max_ttl: Option<Spanned<i64>>,
    /// Most addresses kept at once (the client holding the most makes room).
    #[serde(default)]
    pub(crate) max_entries: Option<Spanned<i64>>,
    /// The DNS servers the site's hosts use: answers from any other server
    /// teach nothing (empty or absent: any server a query went to).
    #[serde(default)]
    pub(crate) resolvers: Option<Spanned<toml::Value>>,
}

/// `[dscp]`: whose DSCP marks rules may look at, and which marks from the LAN
/// are honoured as they are.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDscp {
    /// "trust" (default) or "ignore": DSCP on packets from the LAN.
    #[serde(default)]
    pub(crate) lan: Option<Spanned<String>>,
    /// "trust" (default) or "ignore": DSCP on packets from the WAN.
    #[serde(default)]
    pub(crate) wan: Option<Spanned<String>>,
    /// DSCP name or number -> class: upload packets so marked go to the class.
    #[serde(default)]
    pub(crate) honour: Option<Spanned<toml::value::Table>>,
}

/// `[calls]`: which classes' RTP streams are measured and how calls are recorded.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCalls {
    #[serde(default)]
    pub(crate) classes: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub(crate) addresses: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) quiet_s: Option<Spanned<i64>>,
}

/// `[promote]`: default-class UDP flows that look like media move to a class.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPromote {
    pub(crate) class: Spanned<String>,
    /// At least this many packets per second ...
    #[serde(default)]
    pub(crate) min_pps: Option<Spanned<i64>>,
    /// ... at most this rate ...
    #[serde(default)]
    pub(crate) max_rate: Option<Spanned<String>>,
    /// ... and packets of at most this many bytes on average.
    #[serde(default)]
    pub(crate) max_packet: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawShaping {
    /// Leaf queue: "auto" (fq_codel, else bfifo), "fq_codel", "cake", "bfifo".
    pub(crate) leaf: Option<Spanned<String>>,
    /// Depth of bfifo leaves in milliseconds at the class's ceiling.
    pub(crate) queue_ms: Option<Spanned<u32>>,
    /// Re-mark DSCP on WAN egress per class (default true).
    pub(crate) remark_dscp: Option<bool>,
    /// Class for TCP segments without data: pure ACKs, SYNs, SYN-ACKs, FINs,
    /// RSTs (default: classified like other packets).
    pub(crate) ack_class: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTelemetry {
    /// Prometheus text endpoint of `shaper run`, e.g. "127.0.0.1:9464".
    pub(crate) listen: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawClass {
    pub(crate) name: Spanned<String>,
    pub(crate) priority: Spanned<i64>,
    pub(crate) guaranteed: Spanned<String>,
    #[serde(default)]
    pub(crate) ceiling: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) default: Option<Spanned<bool>>,
    /// A number 0-63 or a name; checked by [`dscp_value`].
    #[serde(default)]
    pub(crate) dscp: Option<Spanned<toml::Value>>,
    /// Class a flow of this class moves to when it turns bulk.
    #[serde(default)]
    pub(crate) demote_to: Option<Spanned<String>>,
    /// ... once it has carried this many bytes ("20MB").
    #[serde(default)]
    pub(crate) demote_after: Option<Spanned<String>>,
    /// ... or when it carries more than this rate over a second ("4mbit").
    #[serde(default)]
    pub(crate) demote_above: Option<Spanned<String>>,
    /// What the flows that claim this class (by a TLS/QUIC server name, or promoted into
    /// it) may carry together ("30%", "4mbit").
    #[serde(default)]
    pub(crate) claimed_max: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRule {
    pub(crate) name: Spanned<String>,
    pub(crate) class: Spanned<String>,
    #[serde(default)]
    pub(crate) priority: Option<Spanned<i64>>,
    #[serde(default)]
    pub(crate) direction: Option<Spanned<String>>,
    // The match fields take one value or a list, and each value may be a
    // number or a string; they are read as TOML values and checked by
    // `list` and the per-item parsers, so a wrong type gets a message
    // naming what is accepted (not serde's "no variant of untagged enum").
    #[serde(default)]
    pub(crate) protocol: Option<Spanned<toml::Value>>,
    #[serde(default)]
    pub(crate) src_ports: Option<Spanned<toml::Value>>,
    #[serde(default)]
    pub(crate) dst_ports: Option<Spanned<toml::Value>>,
    #[serde(default)]
    pub(crate) src_cidrs: Option<Spanned<toml::Value>>,
    #[serde(default)]
    pub(crate) dst_cidrs: Option<Spanned<toml::Value>>,
    #[serde(default)]
    pub(crate) dscp: Option<Spanned<toml::Value>>,
    /// Catalogue app names, instead of the match fields above.
    #[serde(default)]
    pub(crate) apps: Option<Spanned<toml::Value>>,
    /// Host names (`*.` wildcards): the WAN-side address must be one a DNS
    /// answer gave for them, or the connection's TLS server name one of them.
    #[serde(default)]
    pub(crate) dns_names: Option<Spanned<toml::Value>>,
}
