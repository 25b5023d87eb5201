//! What a rule matches on: [`Rule`] (a validated rule), [`AppMatch`] (one way an app
//! shows on the wire, the same fields) and the checking of the six match fields shared by
//! a config's `[[rule]]`, its `[[app]]` tables and the catalogue's ([`match_fields`]).

use std::{fmt, net::IpAddr};

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::diag::{ConfigError, Ctx};
use crate::dir::Dir;
use crate::units::*;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    pub name: String,
    pub class: usize,
    pub priority: i64,
    /// `direction`: None for "both".
    pub direction: Option<Dir>,
    /// Empty = any protocol.
    pub protocols: Vec<u8>,
    /// Inclusive ranges; empty = any (including packets without ports).
    pub src_ports: Vec<(u16, u16)>,
    pub dst_ports: Vec<(u16, u16)>,
    pub src_cidrs: Vec<Cidr>,
    pub dst_cidrs: Vec<Cidr>,
    pub dscp: Vec<u8>,
    /// Host names (lowercase, `*.` wildcards): the WAN-side address must have
    /// been answered for one of them, or the TLS server name be one of them.
    #[serde(default)]
    pub dns_names: Vec<String>,
}

/// A packet as rules see it. Addresses and ports are from the site's side (src = LAN,
/// dst = WAN) in both directions; `dscp` as the classifier reads it (0 where the
/// direction's marks are not trusted).
#[derive(Debug, Clone, Copy)]
pub struct PacketView {
    pub dir: Dir,
    pub proto: u8,
    pub dscp: u8,
    pub sport: Option<u16>,
    pub dport: Option<u16>,
    pub src: IpAddr,
    pub dst: IpAddr,
}

/// The one statement of what a rule accepts, field by field and as a whole: the
/// reference matcher (`compile::reference_match_hosts`, against which the kernel's maps
/// are checked), `explain`'s field-by-field checks, the host-name engine and the
/// server-name decision all ask these.
impl Rule {
    /// Whether the rule looks at packets going `d` (its `direction`).
    pub fn goes(&self, d: Dir) -> bool {
        self.direction.is_none_or(|r| r == d)
    }

    pub fn accepts_protocol(&self, proto: u8) -> bool {
        self.protocols.is_empty() || self.protocols.contains(&proto)
    }

    pub fn accepts_dscp(&self, dscp: u8) -> bool {
        self.dscp.is_empty() || self.dscp.contains(&dscp)
    }

    /// Whether one of the rule's host patterns matches `name` (a DNS name on an
    /// answer's chain, a TLS or QUIC server name).
    pub fn accepts_name(&self, name: &str) -> bool {
        names_accept(&self.dns_names, name)
    }

    /// Whether the rule accepts `v`. `host()`: whether the packet's WAN-side host is
    /// one of the rule's names (asked only of a rule with names, after every other field
    /// matched).
    pub fn accepts(&self, v: &PacketView, host: impl FnOnce() -> bool) -> bool {
        self.goes(v.dir)
            && self.accepts_protocol(v.proto)
            && self.accepts_dscp(v.dscp)
            && ports_accept(&self.src_ports, v.sport)
            && ports_accept(&self.dst_ports, v.dport)
            && cidrs_accept(&self.src_cidrs, v.src)
            && cidrs_accept(&self.dst_cidrs, v.dst)
            && (self.dns_names.is_empty() || host())
    }
}

/// A port field: no ranges accepts every packet (with ports or without); ranges accept
/// only a port inside one.
pub fn ports_accept(ranges: &[(u16, u16)], port: Option<u16>) -> bool {
    ranges.is_empty() || port.is_some_and(|p| ranges.iter().any(|&(lo, hi)| lo <= p && p <= hi))
}

/// An address field: no prefixes accepts every address.
pub fn cidrs_accept(cidrs: &[Cidr], a: IpAddr) -> bool {
    cidrs.is_empty()
        || cidrs
            .iter()
            .any(|c| c.addr.is_ipv6() == a.is_ipv6() && mask_addr(a, c.len) == c.addr)
}

/// Whether one of `patterns` (`*.` wildcards) matches `name`.
pub fn names_accept(patterns: &[String], name: &str) -> bool {
    patterns
        .iter()
        .any(|p| crate::dnswire::name_matches(p, name))
}

/// The six match fields of a rule, an app or an app's `[[app.match]]`.
pub struct MatchFields<'a> {
    pub protocol: &'a Option<Spanned<toml::Value>>,
    pub src_ports: &'a Option<Spanned<toml::Value>>,
    pub dst_ports: &'a Option<Spanned<toml::Value>>,
    pub src_cidrs: &'a Option<Spanned<toml::Value>>,
    pub dst_cidrs: &'a Option<Spanned<toml::Value>>,
    pub dscp: &'a Option<Spanned<toml::Value>>,
}

impl MatchFields<'_> {
    /// The fields present, by key, in file order of the struct.
    pub fn present(&self) -> Vec<(&'static str, &Spanned<toml::Value>)> {
        [
            ("protocol", self.protocol),
            ("src_ports", self.src_ports),
            ("dst_ports", self.dst_ports),
            ("src_cidrs", self.src_cidrs),
            ("dst_cidrs", self.dst_cidrs),
            ("dscp", self.dscp),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)))
        .collect()
    }
}

/// One value or a non-empty list, each item parsed by `item`.
pub fn values<T>(
    cx: &Ctx<'_>,
    v: &Option<Spanned<toml::Value>>,
    field: String,
    what: &str,
    item: impl Fn(&toml::Value) -> Result<T, String>,
) -> Result<Vec<T>, ConfigError> {
    let Some(v) = v else { return Ok(vec![]) };
    list(v.get_ref(), what)
        .and_then(|l| l.into_iter().map(item).collect())
        .map_err(|m| cx.at(v, field, m))
}

/// The match fields of a rule or app, checked; `f` names a field.
pub fn match_fields(
    cx: &Ctx<'_>,
    m: &MatchFields<'_>,
    f: &dyn Fn(&str) -> String,
) -> Result<AppMatch, ConfigError> {
    let protocols = values(cx, m.protocol, f("protocol"), "protocol", protocol_value)?;
    let src_ports = values(cx, m.src_ports, f("src_ports"), "port", parse_port_range)?;
    let dst_ports = values(cx, m.dst_ports, f("dst_ports"), "port", parse_port_range)?;
    if (!src_ports.is_empty() || !dst_ports.is_empty())
        && !protocols.is_empty()
        && protocols.iter().all(|p| ![6u8, 17, 132, 136].contains(p))
    {
        let span = m.protocol.as_ref().map(|p| p.span());
        return Err(cx.err(
            span,
            f("protocol"),
            "ports are given but none of the protocols carries ports (tcp, udp, sctp, udplite)",
        ));
    }
    Ok(AppMatch {
        protocols,
        src_ports,
        dst_ports,
        src_cidrs: values(cx, m.src_cidrs, f("src_cidrs"), "address", cidr_value)?,
        dst_cidrs: values(cx, m.dst_cidrs, f("dst_cidrs"), "address", cidr_value)?,
        dscp: values(cx, m.dscp, f("dscp"), "DSCP", dscp_value)?,
    })
}

/// A DNS name for later DNS-name rules: letters, digits, '-' and dots, with an
/// optional leading `*.` wildcard; stored lower-case.
pub fn dns_name_value(v: &toml::Value) -> Result<String, String> {
    let toml::Value::String(s) = v else {
        return Err(format!(
            "`{v}` is not a DNS name: write it as a string like \"*.sfu.whereby.com\""
        ));
    };
    let name = s.trim().to_ascii_lowercase();
    let rest = name.strip_prefix("*.").unwrap_or(&name);
    let ok = rest.contains('.')
        && rest.len() <= 253
        && rest.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !ok {
        return Err(format!(
            "`{s}` is not a DNS name: use labels of letters, digits and '-' separated by dots, \
             optionally starting with `*.` (e.g. \"*.dl.delivery.mp.microsoft.com\")"
        ));
    }
    Ok(name)
}

/// One way an app shows on the wire; all present fields must match (as in a
/// rule). Becomes one [`Rule`] when expanded.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AppMatch {
    /// Empty = any protocol.
    pub protocols: Vec<u8>,
    /// Inclusive ranges; empty = any. `src` is the site's (LAN) side.
    pub src_ports: Vec<(u16, u16)>,
    pub dst_ports: Vec<(u16, u16)>,
    pub src_cidrs: Vec<Cidr>,
    pub dst_cidrs: Vec<Cidr>,
    pub dscp: Vec<u8>,
}

impl fmt::Display for AppMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let join = |v: Vec<String>| v.join(",");
        let mut parts = Vec::new();
        parts.push(if self.protocols.is_empty() {
            "any protocol".to_string()
        } else {
            join(self.protocols.iter().map(|&p| protocol_name(p)).collect())
        });
        if !self.src_ports.is_empty() {
            parts.push(format!(
                "src port {}",
                join(self.src_ports.iter().map(|&r| port_range(r)).collect())
            ));
        }
        if !self.dst_ports.is_empty() {
            parts.push(format!(
                "dst port {}",
                join(self.dst_ports.iter().map(|&r| port_range(r)).collect())
            ));
        }
        if !self.src_cidrs.is_empty() {
            parts.push(format!(
                "src {}",
                join(self.src_cidrs.iter().map(|c| c.to_string()).collect())
            ));
        }
        if !self.dst_cidrs.is_empty() {
            parts.push(format!(
                "dst {}",
                join(self.dst_cidrs.iter().map(|c| c.to_string()).collect())
            ));
        }
        if !self.dscp.is_empty() {
            parts.push(format!(
                "dscp {}",
                join(self.dscp.iter().map(|d| d.to_string()).collect())
            ));
        }
        f.write_str(&parts.join(" "))
    }
}
