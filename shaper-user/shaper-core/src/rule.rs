//! What a rule matches on: [`Rule`] (a validated rule), [`AppMatch`] (one way an app
//! shows on the wire, the same fields) and the checking of the six match fields shared by
//! a config's `[[rule]]`, its `[[app]]` tables and the catalogue's ([`match_fields`]).

use std::fmt;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::diag::{ConfigError, Ctx};
use crate::units::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Both,
    Upload,
    Download,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    pub name: String,
    pub class: usize,
    pub priority: i64,
    pub direction: Direction,
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
