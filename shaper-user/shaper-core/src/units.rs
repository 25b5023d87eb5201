//! The values of a config file, parsed and shown: rates ("9500kbit"), byte counts, DSCP
//! names, port ranges, addresses and prefixes, protocol names. A leaf: used by the config,
//! the catalogue, compile and explain alike.

use std::{fmt, net::IpAddr};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Parses "40mbit", "9500kbit", "1.5gbit", "800000bit" (tc's units: k = 1000).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix("/s").unwrap_or(&t);
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: f64 = match unit.trim() {
        "bit" => 1.0,
        "kbit" => 1e3,
        "mbit" => 1e6,
        "gbit" => 1e9,
        "" => {
            return Err(format!(
                "`{s}` has no unit: write e.g. \"40mbit\" or \"9500kbit\""
            ))
        }
        u if u.ends_with("bps") || u.ends_with("b") => {
            return Err(format!(
                "`{s}`: unit `{u}` is ambiguous (bytes or bits?); use bit, kbit, mbit or gbit"
            ))
        }
        u => {
            return Err(format!(
                "`{s}`: unknown unit `{u}`; use bit, kbit, mbit or gbit"
            ))
        }
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a number followed by a unit, e.g. \"40mbit\""))?;
    let bps = (n * mult).round();
    if bps == 0.0 {
        return Err(format!(
            "`{s}` is zero; give a rate above 0, e.g. \"40mbit\" or \"9500kbit\""
        ));
    }
    if !(1.0..=1e12).contains(&bps) {
        return Err(format!("`{s}` is out of range (1bit to 1000gbit)"));
    }
    Ok(bps as u64)
}

/// Formats bits per second the way tc would print them.
pub fn format_rate(bps: u64) -> String {
    if bps >= 1_000_000_000 && bps.is_multiple_of(1_000_000) {
        format!("{}gbit", bps as f64 / 1e9)
    } else if bps >= 1_000_000 && bps.is_multiple_of(1_000) {
        format!("{}mbit", bps as f64 / 1e6)
    } else if bps >= 1_000 {
        format!("{}kbit", bps as f64 / 1e3)
    } else {
        format!("{bps}bit")
    }
}

/// DSCP by number (0-63) or name (EF, CS0-CS7, AF11-AF43, LE, VA, DF/BE).
pub fn parse_dscp_name(s: &str) -> Result<u8, String> {
    let u = s.trim().to_ascii_uppercase();
    let v = match u.as_str() {
        "EF" => 46,
        "VA" | "VOICE-ADMIT" => 44,
        "LE" => 1,
        "DF" | "BE" | "DEFAULT" => 0,
        _ => {
            if let Some(n) = u.strip_prefix("CS") {
                match n.parse::<u8>() {
                    Ok(n) if n <= 7 => n << 3,
                    _ => return Err(format!("`{s}`: class selectors are CS0 to CS7")),
                }
            } else if let Some(n) = u.strip_prefix("AF") {
                let b = n.as_bytes();
                if b.len() == 2 && (b'1'..=b'4').contains(&b[0]) && (b'1'..=b'3').contains(&b[1]) {
                    ((b[0] - b'0') << 3) | ((b[1] - b'0') << 1)
                } else {
                    return Err(format!("`{s}`: assured forwarding is AF11 to AF43"));
                }
            } else {
                return Err(format!(
                    "`{s}` is not a DSCP: use 0-63 or a name (EF, AF41, CS1, LE, DF, ...)"
                ));
            }
        }
    };
    Ok(v)
}

pub fn dscp_value(v: &toml::Value) -> Result<u8, String> {
    match v {
        toml::Value::Integer(n) if (0..=63).contains(n) => Ok(*n as u8),
        toml::Value::Integer(n) => Err(format!("DSCP {n} is out of range 0-63")),
        toml::Value::String(s) => parse_dscp_name(s),
        other => Err(format!(
            "`{other}` is not a DSCP: use 0-63 or a name (EF, AF41, CS1, LE, DF, ...)"
        )),
    }
}

/// The values of a match field that takes one value or a list of them.
/// An empty list is refused: it would match nothing, while leaving the
/// field out matches anything.
pub fn list<'v>(v: &'v toml::Value, what: &str) -> Result<Vec<&'v toml::Value>, String> {
    match v {
        toml::Value::Array(a) if a.is_empty() => Err(format!(
            "an empty list matches nothing; leave the field out to match any {what}"
        )),
        toml::Value::Array(a) => Ok(a.iter().collect()),
        one => Ok(vec![one]),
    }
}

pub fn parse_port_range(v: &toml::Value) -> Result<(u16, u16), String> {
    let one = |s: &str| -> Result<u16, String> {
        s.trim()
            .parse::<u16>()
            .map_err(|_| format!("`{s}` is not a port (0-65535)"))
    };
    match v {
        toml::Value::Integer(n) => u16::try_from(*n)
            .map(|p| (p, p))
            .map_err(|_| format!("port {n} is out of range 0-65535")),
        toml::Value::String(s) => {
            let (lo, hi) = match s.split_once('-') {
                Some((a, b)) => (one(a)?, one(b)?),
                None => {
                    let p = one(s)?;
                    (p, p)
                }
            };
            if lo > hi {
                return Err(format!("port range `{s}` runs backwards"));
            }
            Ok((lo, hi))
        }
        other => Err(format!(
            "`{other}` is not a port: use whole numbers 0-65535 or ranges like \"3478-3481\""
        )),
    }
}

pub fn cidr_value(v: &toml::Value) -> Result<Cidr, String> {
    match v {
        toml::Value::String(s) => parse_cidr(s),
        other => Err(format!(
            "`{other}` is not a CIDR: write it as a string like \"10.0.0.0/8\" or \"2603:1063::/38\""
        )),
    }
}

pub fn protocol_value(v: &toml::Value) -> Result<u8, String> {
    match v {
        toml::Value::Integer(n) => {
            u8::try_from(*n).map_err(|_| format!("protocol number {n} is out of range 0-255"))
        }
        toml::Value::String(s) => parse_protocol(s),
        other => Err(format!(
            "`{other}` is not a protocol: use a name (tcp, udp, ...) or a number 0-255"
        )),
    }
}

/// Parses "10.0.0.0/8", "2603:1063::/38" or a bare address (a host route).
pub fn parse_cidr(s: &str) -> Result<Cidr, String> {
    let (a, l) = match s.trim().split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s.trim(), None),
    };
    let addr: IpAddr = a
        .parse()
        .map_err(|_| format!("`{s}`: `{a}` is not an IPv4 or IPv6 address"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = match l {
        None => max,
        Some(l) => match l.parse::<u8>() {
            Ok(n) if n <= max => n,
            _ => return Err(format!("`{s}`: prefix length must be 0-{max}")),
        },
    };
    // Host bits set is almost always a typo; refuse rather than guess.
    let masked = mask_addr(addr, len);
    if masked != addr {
        return Err(format!(
            "`{s}` has host bits set; did you mean {masked}/{len}?"
        ));
    }
    Ok(Cidr { addr, len })
}

/// The address with all bits past `len` cleared.
pub fn mask_addr(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = if len == 0 {
                0
            } else {
                u32::MAX << (32 - len as u32)
            };
            IpAddr::V4((u32::from(a) & m).into())
        }
        IpAddr::V6(a) => {
            let m = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len as u32)
            };
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
}

/// "udp" for 17 and the like; the number otherwise.
pub fn protocol_name(p: u8) -> String {
    match p {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        47 => "gre".into(),
        50 => "esp".into(),
        51 => "ah".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        136 => "udplite".into(),
        n => n.to_string(),
    }
}

/// Protocol by name or number (the inverse of [`protocol_name`]).
pub fn parse_protocol(s: &str) -> Result<u8, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "tcp" => Ok(6),
        "udp" => Ok(17),
        "icmp" => Ok(1),
        "icmpv6" | "ipv6-icmp" => Ok(58),
        "sctp" => Ok(132),
        "gre" => Ok(47),
        "esp" => Ok(50),
        "ah" => Ok(51),
        "udplite" => Ok(136),
        other => other.parse::<u8>().map_err(|_| {
            format!("`{s}` is not a protocol: use tcp, udp, icmp, icmpv6, sctp, udplite, gre, esp, ah or a number 0-255")
        }),
    }
}

/// Parses "20MB", "500kB", "1.5GB", "65536B" (k = 1000, as rates are).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult = match unit.trim() {
        "B" => 1.0,
        "kB" | "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "" => {
            return Err(format!(
                "`{s}` has no unit: write e.g. \"20MB\" or \"500kB\""
            ))
        }
        u => {
            return Err(format!(
                "`{s}`: unknown unit `{u}`; use B, kB, MB or GB (bytes)"
            ))
        }
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a number followed by a unit, e.g. \"20MB\""))?;
    let b = (n * mult).round();
    if !(1.0..=1e15).contains(&b) {
        return Err(format!("`{s}` is out of range (1B to 1000000GB)"));
    }
    Ok(b as u64)
}

/// A port range as written in a config: `443` or `50000-50019`.
pub fn port_range((lo, hi): (u16, u16)) -> String {
    if lo == hi {
        lo.to_string()
    } else {
        format!("{lo}-{hi}")
    }
}
