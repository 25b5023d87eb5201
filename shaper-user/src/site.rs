//! The site file: how the box sits in the site's network (`site.toml` in the boot disk's
//! `shaper/` folder). Parsed and validated like the shaping config (file:line errors), never
//! run as shell code. `shaper site up` applies it through netlink (kernel::net); this module
//! only reads and checks.
//!
//! ```toml
//! mode = "bridge"          # default: in the cable between the router and the LAN switch
//! [ports]
//! wan = "eth0"             # kernel name or MAC address of the port towards the router/modem
//! lan = "eth1"
//! [management]             # the box's own address: on the bridge (router mode: the LAN port)
//! ipv4 = "dhcp"            # or "10.10.0.3/24" (+ gateway = "10.10.0.1"), or "none"
//! ipv6 = "slaac"           # or "fd00::3/64" (+ gateway6), or "none"
//! vlan = 20                # optional, bridge mode: the management address on this VLAN
//! ```
//!
//! Router mode adds `[wan]` (`ipv4 = "dhcp"` or static with `gateway`, `ipv6`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::config::{toml_error, ConfigError, Ctx};

/// The bridge's name in bridge mode.
pub const BRIDGE: &str = "br0";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Bridge,
    Router,
}

/// Which NIC a port is: by kernel name or by MAC address (names can change with the
/// hardware; a MAC is printed on the box).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PortId {
    Name(String),
    Mac([u8; 6]),
}

impl std::fmt::Display for PortId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PortId::Name(n) => f.write_str(n),
            PortId::Mac(m) => write!(
                f,
                "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                m[0], m[1], m[2], m[3], m[4], m[5]
            ),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum V4 {
    None,
    Dhcp,
    Static {
        addr: Ipv4Addr,
        prefix: u8,
        gateway: Option<Ipv4Addr>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum V6 {
    None,
    Slaac,
    Static {
        addr: Ipv6Addr,
        prefix: u8,
        gateway: Option<Ipv6Addr>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Addressing {
    pub ipv4: V4,
    pub ipv6: V6,
}

/// A validated site file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Site {
    pub mode: Mode,
    pub wan: PortId,
    pub lan: PortId,
    /// What the ports are renamed to (the names the shaping config uses).
    pub wan_name: String,
    pub lan_name: String,
    /// The box's own address: on the bridge, or on the LAN port in router mode.
    pub management: Addressing,
    /// Bridge mode: the management address lives on this VLAN of the bridge.
    pub vlan: Option<u16>,
    /// Router mode: the WAN port's addressing.
    pub wan_addr: Option<Addressing>,
    /// Who may reach the box's own services (SSH, metrics) on the management interface.
    pub allow: Vec<(IpAddr, u8)>,
    /// The box's TCP ports open to `allow` (SSH and the metrics endpoint).
    pub ports: Vec<u16>,
}

/// Sources allowed to the box's services unless the site file says: private and
/// shared address space, IPv6 unique-local and link-local. Not the internet: in bridge mode
/// the management address is on the LAN, and a routed IPv6 prefix would otherwise make it
/// reachable from anywhere.
pub const DEFAULT_ALLOW: &[&str] = &[
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "fc00::/7",
    "fe80::/10",
];

/// SSH and the metrics endpoint's usual port.
pub const DEFAULT_PORTS: &[u16] = &[22, 9464];

impl Site {
    /// The interface that carries the management address.
    pub fn management_dev(&self) -> String {
        match (self.mode, self.vlan) {
            (Mode::Bridge, Some(v)) => format!("{BRIDGE}.{v}"),
            (Mode::Bridge, None) => BRIDGE.to_string(),
            (Mode::Router, _) => self.lan_name.clone(),
        }
    }

    /// Interfaces a DHCPv4 client runs on.
    pub fn dhcp_devs(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.management.ipv4 == V4::Dhcp {
            v.push(self.management_dev());
        }
        if self.wan_addr.as_ref().is_some_and(|a| a.ipv4 == V4::Dhcp) {
            v.push(self.wan_name.clone());
        }
        v
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSite {
    mode: Option<Spanned<String>>,
    ports: Spanned<RawPorts>,
    management: Option<Spanned<RawAddressing>>,
    wan: Option<Spanned<RawAddressing>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPorts {
    wan: Spanned<String>,
    lan: Spanned<String>,
    wan_name: Option<Spanned<String>>,
    lan_name: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAddressing {
    ipv4: Option<Spanned<String>>,
    gateway: Option<Spanned<String>>,
    ipv6: Option<Spanned<String>>,
    gateway6: Option<Spanned<String>>,
    vlan: Option<Spanned<i64>>,
    allow: Option<Spanned<Vec<Spanned<String>>>>,
    ports: Option<Spanned<Vec<Spanned<i64>>>>,
}

/// Reads and validates a site file. Touches nothing but the file.
pub fn load(path: &Path) -> Result<Site, ConfigError> {
    parse(path, &crate::config::read_text(path)?)
}

/// Validates site-file text; `file` names it in errors.
pub fn parse(file: &Path, text: &str) -> Result<Site, ConfigError> {
    let cx = Ctx { file, text };
    let raw: RawSite = toml::from_str(text).map_err(|e| toml_error(&cx, &e))?;
    let mode = match &raw.mode {
        None => Mode::Bridge,
        Some(m) => match m.get_ref().as_str() {
            "bridge" => Mode::Bridge,
            "router" => Mode::Router,
            other => {
                return Err(cx.at(
                    m,
                    "mode",
                    format!("`{other}` is not a mode: \"bridge\" (the default) or \"router\""),
                ))
            }
        },
    };
    let ports = raw.ports.get_ref();
    let wan = port_id(&cx, &ports.wan, "ports.wan")?;
    let lan = port_id(&cx, &ports.lan, "ports.lan")?;
    if wan == lan {
        return Err(cx.at(
            &ports.lan,
            "ports.lan",
            "the LAN port is the WAN port: the box needs two different NICs",
        ));
    }
    let name = |v: &Option<Spanned<String>>, field: &str, default: &str| {
        match v {
        None => Ok(default.to_string()),
        Some(n) if valid_ifname(n.get_ref()) && n.get_ref() != BRIDGE => Ok(n.get_ref().clone()),
        Some(n) => Err(cx.at(
            n,
            field,
            format!(
                "`{}` is not a usable interface name: 1-15 characters of a-z A-Z 0-9 _ - ., not `{BRIDGE}`",
                n.get_ref()
            ),
        )),
    }
    };
    let wan_name = name(&ports.wan_name, "ports.wan_name", "wan0")?;
    let lan_name = name(&ports.lan_name, "ports.lan_name", "lan0")?;
    if wan_name == lan_name {
        return Err(cx.err(
            Some(raw.ports.span()),
            "ports.lan_name",
            "the two ports cannot have the same name",
        ));
    }
    let (management, vlan) = match &raw.management {
        None if mode == Mode::Router => {
            return Err(cx.err(
                None,
                "management",
                "router mode: the LAN port is the site's gateway; give it a static address in [management] (ipv4 = \"10.10.0.1/24\")",
            ))
        }
        None => (
            Addressing {
                ipv4: V4::Dhcp,
                ipv6: V6::Slaac,
            },
            None,
        ),
        Some(m) => {
            let a = addressing(&cx, m.get_ref(), "management", V4::Dhcp, V6::Slaac)?;
            let vlan = match &m.get_ref().vlan {
                None => None,
                Some(_) if mode == Mode::Router => {
                    return Err(cx.at(
                        m.get_ref().vlan.as_ref().expect("checked"),
                        "management.vlan",
                        "a management VLAN is for bridge mode (router mode: the LAN port's own address is the management address)",
                    ))
                }
                Some(v) if (1..=4094).contains(v.get_ref()) => Some(*v.get_ref() as u16),
                Some(v) => {
                    return Err(cx.at(
                        v,
                        "management.vlan",
                        format!("{} is not a VLAN id: 1-4094", v.get_ref()),
                    ))
                }
            };
            if mode == Mode::Router && a.ipv4 == V4::Dhcp {
                return Err(cx.err(
                    Some(m.get_ref().ipv4.as_ref().map_or(m.span(), Spanned::span)),
                    "management.ipv4",
                    "router mode: the LAN port is the site's gateway and needs a static address, not DHCP",
                ));
            }
            (a, vlan)
        }
    };
    let mgmt_raw = raw.management.as_ref().map(Spanned::get_ref);
    let allow = match mgmt_raw.and_then(|m| m.allow.as_ref()) {
        None => DEFAULT_ALLOW
            .iter()
            .map(|p| prefix_of(p).expect("valid default"))
            .collect(),
        Some(list) => list
            .get_ref()
            .iter()
            .map(|v| {
                prefix_of(v.get_ref().trim())
                    .filter(|(a, p)| *p <= if a.is_ipv4() { 32 } else { 128 })
                    .ok_or_else(|| {
                        cx.at(
                            v,
                            "management.allow",
                            format!(
                                "`{}` is not an address prefix (10.0.0.0/8, fd00::/8)",
                                v.get_ref()
                            ),
                        )
                    })
            })
            .collect::<Result<_, _>>()?,
    };
    let ports = match mgmt_raw.and_then(|m| m.ports.as_ref()) {
        None => DEFAULT_PORTS.to_vec(),
        Some(list) => list
            .get_ref()
            .iter()
            .map(|v| {
                u16::try_from(*v.get_ref())
                    .ok()
                    .filter(|&p| p != 0)
                    .ok_or_else(|| {
                        cx.at(
                            v,
                            "management.ports",
                            format!("{} is not a TCP port: 1-65535", v.get_ref()),
                        )
                    })
            })
            .collect::<Result<_, _>>()?,
    };
    if let Some(w) = &raw.wan {
        if let Some(a) = w.get_ref().allow.as_ref() {
            return Err(cx.at(
                a,
                "wan.allow",
                "nothing on the box is open towards the WAN: `allow` goes in [management]",
            ));
        }
        if let Some(a) = w.get_ref().ports.as_ref() {
            return Err(cx.at(
                a,
                "wan.ports",
                "nothing on the box is open towards the WAN: `ports` goes in [management]",
            ));
        }
    }
    let wan_addr = match (&raw.wan, mode) {
        (Some(w), Mode::Bridge) => {
            return Err(cx.at(
                w,
                "wan",
                "bridge mode: the box has no WAN address (nothing on the site changes address); remove [wan] or set mode = \"router\"",
            ))
        }
        (Some(w), Mode::Router) => {
            let g = w.get_ref();
            if let Some(v) = &g.vlan {
                return Err(cx.at(v, "wan.vlan", "not supported on the WAN port"));
            }
            Some(addressing(&cx, g, "wan", V4::Dhcp, V6::Slaac)?)
        }
        (None, Mode::Router) => Some(Addressing {
            ipv4: V4::Dhcp,
            ipv6: V6::Slaac,
        }),
        (None, Mode::Bridge) => None,
    };
    Ok(Site {
        mode,
        wan,
        lan,
        wan_name,
        lan_name,
        management,
        vlan,
        wan_addr,
        allow,
        ports,
    })
}

/// The host firewall for the box's own input, as an nft script (one transaction: the old
/// table, if any, goes in the same step). Stateless, so nothing is tracked: forwarded and
/// bridged traffic never meets it (no conntrack, no forward chain), and a flood through the
/// box cannot fill a table. Open: loopback; ICMP errors, echo replies and neighbour
/// discovery (router advertisements for SLAAC); DHCP replies; and `ports` over TCP plus
/// echo requests from `allow` on the management interface only. Everything else addressed
/// to the box, from either side, IPv4 or IPv6, is dropped.
pub fn firewall(s: &Site) -> String {
    use std::fmt::Write as _;
    let dev = s.management_dev();
    let list = |v6: bool| {
        s.allow
            .iter()
            .filter(|(a, _)| a.is_ipv6() == v6)
            .map(|(a, p)| format!("{a}/{p}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let ports = s
        .ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let mut o = String::from(
        "table inet shaper_host {}\ndelete table inet shaper_host\ntable inet shaper_host {\n",
    );
    let (a4, a6) = (list(false), list(true));
    if !a4.is_empty() {
        let _ = writeln!(
            o,
            "    set allow4 {{ type ipv4_addr; flags interval; elements = {{ {a4} }} }}"
        );
    }
    if !a6.is_empty() {
        let _ = writeln!(
            o,
            "    set allow6 {{ type ipv6_addr; flags interval; elements = {{ {a6} }} }}"
        );
    }
    o.push_str(
        "    chain input {\n        type filter hook input priority filter; policy drop;\n        iif \"lo\" accept\n        icmp type { echo-reply, timestamp-reply, destination-unreachable, time-exceeded, parameter-problem } accept\n        icmpv6 type { echo-reply, destination-unreachable, packet-too-big, time-exceeded, parameter-problem, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert } accept\n        udp sport 67 udp dport 68 accept\n",
    );
    for (set, fam, echo) in [("allow4", "ip", "icmp"), ("allow6", "ip6", "icmpv6")] {
        let present = if fam == "ip" {
            !a4.is_empty()
        } else {
            !a6.is_empty()
        };
        if !present {
            continue;
        }
        let _ = writeln!(
            o,
            "        iifname \"{dev}\" {fam} saddr @{set} {echo} type echo-request accept"
        );
        if !ports.is_empty() {
            let _ = writeln!(
                o,
                "        iifname \"{dev}\" {fam} saddr @{set} tcp dport {{ {ports} }} accept"
            );
        }
    }
    o.push_str("    }\n}\n");
    o
}

fn port_id(cx: &Ctx<'_>, v: &Spanned<String>, field: &str) -> Result<PortId, ConfigError> {
    let s = v.get_ref().trim();
    if let Some(mac) = parse_mac(s) {
        return Ok(PortId::Mac(mac));
    }
    if valid_ifname(s) {
        return Ok(PortId::Name(s.to_string()));
    }
    Err(cx.at(
        v,
        field,
        format!("`{s}` is neither an interface name (eth0) nor a MAC address (52:54:00:12:34:56)"),
    ))
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        return None;
    }
    let mut m = [0u8; 6];
    for (o, p) in m.iter_mut().zip(&parts) {
        if p.len() != 2 {
            return None;
        }
        *o = u8::from_str_radix(p, 16).ok()?;
    }
    Some(m)
}

/// What the kernel accepts as an interface name, minus anything a shell or a path could
/// make something of.
pub fn valid_ifname(s: &str) -> bool {
    (1..=15).contains(&s.len())
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

fn addressing(
    cx: &Ctx<'_>,
    r: &RawAddressing,
    table: &str,
    default4: V4,
    default6: V6,
) -> Result<Addressing, ConfigError> {
    let f = |k: &str| format!("{table}.{k}");
    // A static address with its prefix length, of one family.
    let fixed = |v: &Spanned<String>, key: &str, v6: bool, words: &str, example: &str| {
        let max = if v6 { 128 } else { 32 };
        prefix_of(v.get_ref().trim())
            .filter(|(a, p)| a.is_ipv6() == v6 && (1..=max).contains(p) && !a.is_unspecified())
            .ok_or_else(|| {
                cx.at(
                    v,
                    f(key),
                    format!(
                        "`{}` is not {words} or an IPv{} address with its prefix length ({example})",
                        v.get_ref().trim(),
                        if v6 { 6 } else { 4 }
                    ),
                )
            })
    };
    let gateway = |g: &Spanned<String>, key: &str, v6: bool| {
        g.get_ref()
            .trim()
            .parse::<IpAddr>()
            .ok()
            .filter(|a| a.is_ipv6() == v6)
            .ok_or_else(|| {
                cx.at(
                    g,
                    f(key),
                    format!(
                        "`{}` is not an IPv{} address",
                        g.get_ref(),
                        if v6 { 6 } else { 4 }
                    ),
                )
            })
    };
    let ipv4 = match r.ipv4.as_ref().map(|v| (v, v.get_ref().trim())) {
        None => default4,
        Some((_, "dhcp")) => V4::Dhcp,
        Some((_, "none")) => V4::None,
        Some((v, _)) => match fixed(v, "ipv4", false, "\"dhcp\", \"none\"", "10.10.0.3/24")? {
            (IpAddr::V4(addr), prefix) => V4::Static {
                addr,
                prefix,
                gateway: None,
            },
            _ => unreachable!("the family was checked"),
        },
    };
    let ipv4 = match (&r.gateway, ipv4) {
        (None, a) => a,
        (Some(g), V4::Static { addr, prefix, .. }) => {
            let IpAddr::V4(gw) = gateway(g, "gateway", false)? else {
                unreachable!("the family was checked")
            };
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            if u32::from(gw) & mask != u32::from(addr) & mask || gw == addr {
                return Err(cx.at(
                    g,
                    f("gateway"),
                    format!("{gw} is not another address in {addr}/{prefix}: the gateway must be on the same subnet"),
                ));
            }
            V4::Static {
                addr,
                prefix,
                gateway: Some(gw),
            }
        }
        (Some(g), _) => {
            return Err(cx.at(
                g,
                f("gateway"),
                "a gateway goes with a static ipv4 address (DHCP supplies its own)",
            ))
        }
    };
    let ipv6 = match r.ipv6.as_ref().map(|v| (v, v.get_ref().trim())) {
        None => default6,
        Some((_, "slaac")) => V6::Slaac,
        Some((_, "none")) => V6::None,
        Some((v, _)) => match fixed(v, "ipv6", true, "\"slaac\", \"none\"", "fd00::3/64")? {
            (IpAddr::V6(addr), prefix) => V6::Static {
                addr,
                prefix,
                gateway: None,
            },
            _ => unreachable!("the family was checked"),
        },
    };
    let ipv6 = match (&r.gateway6, ipv6) {
        (None, a) => a,
        (Some(g), V6::Static { addr, prefix, .. }) => {
            let IpAddr::V6(gw) = gateway(g, "gateway6", true)? else {
                unreachable!("the family was checked")
            };
            V6::Static {
                addr,
                prefix,
                gateway: Some(gw),
            }
        }
        (Some(g), _) => {
            return Err(cx.at(
                g,
                f("gateway6"),
                "a gateway6 goes with a static ipv6 address (SLAAC learns the router)",
            ))
        }
    };
    Ok(Addressing { ipv4, ipv6 })
}

fn prefix_of(s: &str) -> Option<(IpAddr, u8)> {
    let (a, p) = s.split_once('/')?;
    Some((a.trim().parse().ok()?, p.trim().parse().ok()?))
}

/// The serial console's root password hash from the site folder's `console-password`:
/// one line holding a SHA-crypt hash (`$6$` SHA-512 or `$5$` SHA-256, optional
/// `rounds=N$`), which busybox's login checks. Written into /etc/shadow, so nothing but the
/// hash alphabet may pass (no `:`, newline or shell).
pub fn password_hash(bytes: &[u8]) -> Result<String, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not text".to_string())?;
    let line = text.trim_end_matches(['\n', '\r']);
    if line.contains('\n') {
        return Err("one line expected (the hash)".into());
    }
    let bad = || {
        "not a SHA-crypt hash: make one with `mkpasswd -m sha-512` (a line starting $6$)"
            .to_string()
    };
    let rest = line
        .strip_prefix("$6$")
        .map(|r| (r, 86))
        .or_else(|| line.strip_prefix("$5$").map(|r| (r, 43)));
    let Some((rest, hash_len)) = rest else {
        return Err(bad());
    };
    let rest = match rest.strip_prefix("rounds=") {
        Some(r) => {
            let (n, r) = r.split_once('$').ok_or_else(bad)?;
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) || n.len() > 9 {
                return Err(bad());
            }
            r
        }
        None => rest,
    };
    let (salt, hash) = rest.split_once('$').ok_or_else(bad)?;
    let alphabet = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'/')
    };
    if !(1..=16).contains(&salt.len())
        || !alphabet(salt)
        || hash.len() != hash_len
        || !alphabet(hash)
    {
        return Err(bad());
    }
    Ok(line.to_string())
}

/// systemd-boot's (and its stub's) vendor GUID for the Loader* EFI variables.
const LOADER_GUID: &str = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";

/// The partition the box booted from, as the boot loader reported it (the EFI variable
/// `LoaderDevicePartUUID`, set by systemd-boot and by its stub): its GPT unique partition
/// GUID, lower case. None when the box was not booted that way (no such variable).
pub fn loader_partuuid(efivars: &Path) -> Result<Option<String>, String> {
    let f = efivars.join(format!("LoaderDevicePartUUID-{LOADER_GUID}"));
    let b = match std::fs::read(&f) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", f.display())),
    };
    // 4 bytes of attributes, then UTF-16LE text with a trailing NUL.
    let units: Vec<u16> = b
        .get(4..)
        .unwrap_or_default()
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    let s = String::from_utf16(&units)
        .map_err(|_| format!("{}: not UTF-16 text", f.display()))?
        .to_ascii_lowercase();
    if guid_bytes(&s).is_none() {
        return Err(format!("{}: `{s}` is not a GUID", f.display()));
    }
    Ok(Some(s))
}

/// A GUID in its text form as the 16 bytes GPT stores (the first three fields little-endian).
fn guid_bytes(s: &str) -> Option<[u8; 16]> {
    let parts: Vec<&str> = s.split('-').collect();
    let lens = [8, 4, 4, 4, 12];
    if parts.len() != 5 || parts.iter().zip(lens).any(|(p, l)| p.len() != l) {
        return None;
    }
    let hex: String = parts.concat();
    let mut raw = [0u8; 16];
    for (i, o) in raw.iter_mut().enumerate() {
        *o = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    let mut g = raw;
    g[0..4].reverse();
    g[4..6].reverse();
    g[6..8].reverse();
    Some(g)
}

/// The number (1-based) of the GPT partition with unique GUID `guid` on `disk` (a whole
/// disk's device file), reading the primary header and its entries.
pub fn gpt_partition_number(disk: &Path, sector: u64, guid: &str) -> std::io::Result<Option<u32>> {
    use std::io::{Read, Seek, SeekFrom};
    let Some(want) = guid_bytes(guid) else {
        return Ok(None);
    };
    let mut f = std::fs::File::open(disk)?;
    let mut h = [0u8; 92];
    f.seek(SeekFrom::Start(sector))?;
    if f.read_exact(&mut h).is_err() || &h[..8] != b"EFI PART" {
        return Ok(None);
    }
    let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().expect("8 bytes"));
    let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().expect("4 bytes"));
    let (entries_lba, count, size) = (u64_at(72), u32_at(80), u32_at(84));
    if !(128..=4096).contains(&size) || count > 1024 {
        return Ok(None);
    }
    let mut table = vec![0u8; count as usize * size as usize];
    f.seek(SeekFrom::Start(entries_lba.saturating_mul(sector)))?;
    if f.read_exact(&mut table).is_err() {
        return Ok(None);
    }
    Ok(table
        .chunks_exact(size as usize)
        .position(|e| e[16..32] == want)
        .map(|i| i as u32 + 1))
}

/// The device file of the partition the box booted from: `LoaderDevicePartUUID` matched
/// against the GPT of every disk in `sys_block` (/sys/block). Only that partition holds
/// the site's folder; another disk's `shaper/` folder (a USB stick) is never read.
pub fn boot_partition(
    efivars: &Path,
    sys_block: &Path,
    dev: &Path,
) -> Result<Option<std::path::PathBuf>, String> {
    let Some(uuid) = loader_partuuid(efivars)? else {
        return Ok(None);
    };
    let disks =
        std::fs::read_dir(sys_block).map_err(|e| format!("{}: {e}", sys_block.display()))?;
    let mut found = Vec::new();
    for d in disks.flatten() {
        let name = d.file_name().to_string_lossy().into_owned();
        let sector = std::fs::read_to_string(d.path().join("queue/logical_block_size"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(512);
        let Ok(Some(n)) = gpt_partition_number(&dev.join(&name), sector, &uuid) else {
            continue;
        };
        // The partition's own device: the child folder whose `partition` file says n.
        let Ok(children) = std::fs::read_dir(d.path()) else {
            continue;
        };
        for c in children.flatten() {
            let num = std::fs::read_to_string(c.path().join("partition")).unwrap_or_default();
            if num.trim() == n.to_string() {
                found.push(dev.join(c.file_name()));
            }
        }
    }
    found.sort();
    match found.as_slice() {
        [p] => Ok(Some(p.clone())),
        [] => Err(format!(
            "the boot loader says the box booted from partition {uuid}, but no disk has it"
        )),
        // A stick written from the same image carries the same identity: which one the
        // box booted from cannot be told, so neither is trusted.
        more => Err(format!(
            "partition {uuid}, which the box booted from, is on more than one disk ({}): remove the other disk",
            more.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        )),
    }
}

/// What the site file sets up, in words (for `shaper site check` and the boot console).
pub fn describe(s: &Site) -> String {
    use std::fmt::Write as _;
    let v4 = |a: &V4| match a {
        V4::None => "no IPv4".to_string(),
        V4::Dhcp => "IPv4 by DHCP".to_string(),
        V4::Static {
            addr,
            prefix,
            gateway,
        } => format!(
            "{addr}/{prefix}{}",
            gateway.map(|g| format!(" via {g}")).unwrap_or_default()
        ),
    };
    let v6 = |a: &V6| match a {
        V6::None => "no IPv6".to_string(),
        V6::Slaac => "IPv6 by SLAAC".to_string(),
        V6::Static {
            addr,
            prefix,
            gateway,
        } => format!(
            "{addr}/{prefix}{}",
            gateway.map(|g| format!(" via {g}")).unwrap_or_default()
        ),
    };
    let mut o = String::new();
    match s.mode {
        Mode::Bridge => {
            let _ = writeln!(
                o,
                "bridge: {} (WAN port, was {}) and {} (LAN port, was {}) in {BRIDGE}; STP off; nothing routed",
                s.wan_name, s.wan, s.lan_name, s.lan
            );
        }
        Mode::Router => {
            let w = s.wan_addr.as_ref().expect("router mode has WAN addressing");
            let _ = writeln!(
                o,
                "router: {} (WAN port, was {}): {}, {}; {} (LAN port, was {}); forwarding on",
                s.wan_name,
                s.wan,
                v4(&w.ipv4),
                v6(&w.ipv6),
                s.lan_name,
                s.lan
            );
        }
    }
    let _ = writeln!(
        o,
        "management on {}: {}, {}",
        s.management_dev(),
        v4(&s.management.ipv4),
        v6(&s.management.ipv6)
    );
    let _ = writeln!(
        o,
        "firewall: TCP {} open on {} to {}; nothing else open on any side",
        s.ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        s.management_dev(),
        s.allow
            .iter()
            .map(|(a, p)| format!("{a}/{p}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(text: &str) -> Result<Site, ConfigError> {
        parse(Path::new("site.toml"), text)
    }

    fn err(text: &str) -> String {
        site(text).expect_err("must be refused").to_string()
    }

    #[test]
    fn the_default_is_a_bridge_managed_by_dhcp_and_slaac() {
        let s = site("[ports]\nwan = \"eth0\"\nlan = \"eth1\"\n").unwrap();
        assert_eq!(s.mode, Mode::Bridge);
        assert_eq!((s.wan_name.as_str(), s.lan_name.as_str()), ("wan0", "lan0"));
        assert_eq!(s.management.ipv4, V4::Dhcp);
        assert_eq!(s.management.ipv6, V6::Slaac);
        assert_eq!(s.management_dev(), "br0");
        assert_eq!(s.dhcp_devs(), vec!["br0".to_string()]);
        assert_eq!(s.wan_addr, None);
    }

    #[test]
    fn bridge_with_a_static_management_address_on_a_vlan() {
        let s = site(
            "mode = \"bridge\"\n[ports]\nwan = \"52:54:00:AA:bb:01\"\nlan = \"eth1\"\n[management]\nipv4 = \"10.10.0.3/24\"\ngateway = \"10.10.0.1\"\nipv6 = \"none\"\nvlan = 20\n",
        )
        .unwrap();
        assert_eq!(s.wan, PortId::Mac([0x52, 0x54, 0, 0xaa, 0xbb, 1]));
        assert_eq!(s.management_dev(), "br0.20");
        assert_eq!(
            s.management.ipv4,
            V4::Static {
                addr: "10.10.0.3".parse().unwrap(),
                prefix: 24,
                gateway: Some("10.10.0.1".parse().unwrap())
            }
        );
        assert!(s.dhcp_devs().is_empty());
        assert!(describe(&s).contains("management on br0.20: 10.10.0.3/24 via 10.10.0.1, no IPv6"));
    }

    #[test]
    fn router_mode_gets_dhcp_on_the_wan_port_by_default() {
        let s = site(
            "mode = \"router\"\n[ports]\nwan = \"eth0\"\nlan = \"eth1\"\n[management]\nipv4 = \"10.10.0.1/24\"\n",
        )
        .unwrap();
        assert_eq!(s.management_dev(), "lan0");
        assert_eq!(s.dhcp_devs(), vec!["wan0".to_string()]);
        let s = site(
            "mode = \"router\"\n[ports]\nwan = \"eth0\"\nlan = \"eth1\"\n[management]\nipv4 = \"10.10.0.1/24\"\n[wan]\nipv4 = \"192.0.2.2/24\"\ngateway = \"192.0.2.1\"\nipv6 = \"2001:db8::2/64\"\ngateway6 = \"2001:db8::1\"\n",
        )
        .unwrap();
        assert!(s.dhcp_devs().is_empty());
    }

    #[test]
    fn the_firewall_opens_the_management_ports_to_the_allowed_sources_only() {
        let s = site("[ports]\nwan = \"eth0\"\nlan = \"eth1\"\n").unwrap();
        assert_eq!(s.ports, vec![22, 9464]);
        let f = firewall(&s);
        assert!(f.contains("policy drop;"), "{f}");
        assert!(
            f.contains("elements = { 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10 }"),
            "{f}"
        );
        assert!(
            f.contains("iifname \"br0\" ip saddr @allow4 tcp dport { 22, 9464 } accept"),
            "{f}"
        );
        assert!(
            f.contains("iifname \"br0\" ip6 saddr @allow6 tcp dport { 22, 9464 } accept"),
            "{f}"
        );
        assert!(!f.contains("ct "), "stateless: nothing tracked");
        let s = site(
            "mode = \"router\"\n[ports]\nwan = \"eth0\"\nlan = \"eth1\"\n[management]\nipv4 = \"10.1.0.1/24\"\nallow = [\"10.1.0.0/24\"]\nports = [22]\n",
        )
        .unwrap();
        let f = firewall(&s);
        assert!(
            f.contains("iifname \"lan0\" ip saddr @allow4 tcp dport { 22 } accept"),
            "{f}"
        );
        assert!(
            !f.contains("allow6"),
            "no IPv6 sources allowed: no IPv6 rule: {f}"
        );
        assert!(!f.contains("wan0"), "nothing towards the WAN: {f}");
    }

    #[test]
    fn console_password_hashes_are_checked() {
        let h6 = "$6$abcdefghijkl$A2FKjg5ZPRNV7QBhysg.d3DNXY39//7c7TzCrvehvOkGWYfSgToMxZY3WD1Ka2XXk46HrGqMYkZKjzpSzxQkL0";
        assert_eq!(password_hash(format!("{h6}\n").as_bytes()).unwrap(), h6);
        let h5 = "$5$abcdefgh$gruCpC7VkOTspMQTTSAR8mtlO9Upms.fwqE5y16JVM.";
        assert_eq!(password_hash(h5.as_bytes()).unwrap(), h5);
        let r = "$6$rounds=5000$abc$A2FKjg5ZPRNV7QBhysg.d3DNXY39//7c7TzCrvehvOkGWYfSgToMxZY3WD1Ka2XXk46HrGqMYkZKjzpSzxQkL0";
        assert!(password_hash(r.as_bytes()).is_ok());
        for bad in [
            "secret".to_string(),
            String::new(),
            format!("{h6}:0:0"),
            format!("{h6}\nroot::0:0"),
            h6.replace("abcdefghijkl", "abc;reboot"),
            "$1$abc$defghijklmnopqrstuvwxyz".into(),
            format!("{h6}x"),
            "$6$$".into(),
        ] {
            assert!(password_hash(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn mistakes_are_refused_with_their_line() {
        let base = "[ports]\nwan = \"eth0\"\nlan = \"eth1\"\n";
        for (text, want) in [
            (
                "mode = \"switch\"\n[ports]\nwan = \"eth0\"\nlan = \"eth1\"\n".to_string(),
                "site.toml:1: `mode`",
            ),
            (
                "[ports]\nwan = \"eth0\"\nlan = \"eth0\"\n".into(),
                "site.toml:3: `ports.lan`",
            ),
            (
                "[ports]\nwan = \"eth0; reboot\"\nlan = \"eth1\"\n".into(),
                "site.toml:2: `ports.wan`",
            ),
            (
                "[ports]\nwan = \"$(reboot)\"\nlan = \"eth1\"\n".into(),
                "`ports.wan`",
            ),
            (
                "[ports]\nwan = \"eth0\"\nlan = \"eth1\"\nwan_name = \"br0\"\n".into(),
                "`ports.wan_name`",
            ),
            (
                format!("{base}[management]\nipv4 = \"10.10.0.3\"\n"),
                "site.toml:5: `management.ipv4`",
            ),
            (
                format!("{base}[management]\nipv4 = \"10.10.0.3/24\"\ngateway = \"10.20.0.1\"\n"),
                "site.toml:6: `management.gateway`",
            ),
            (
                format!("{base}[management]\ngateway = \"10.10.0.1\"\n"),
                "`management.gateway`",
            ),
            (
                format!("{base}[management]\nipv6 = \"fd00::1\"\n"),
                "`management.ipv6`",
            ),
            (
                format!("{base}[management]\nvlan = 4095\n"),
                "`management.vlan`",
            ),
            (
                format!("{base}[wan]\nipv4 = \"dhcp\"\n"),
                "site.toml:4: `wan`: bridge mode",
            ),
            (
                format!("{base}[management]\naddress = \"x\"\n"),
                "unknown field",
            ),
            (
                format!("mode = \"router\"\n{base}"),
                "`management`: router mode",
            ),
            (
                format!("mode = \"router\"\n{base}[management]\nipv4 = \"dhcp\"\n"),
                "`management.ipv4`: router mode",
            ),
            (
                format!(
                    "mode = \"router\"\n{base}[management]\nipv4 = \"10.0.0.1/24\"\nvlan = 3\n"
                ),
                "`management.vlan`",
            ),
            ("mode = \"bridge\"\n".into(), "ports"),
            (format!("{base}[management]\nallow = [\"10.0.0.0/33\"]\n"), "site.toml:5: `management.allow`"),
            (format!("{base}[management]\nallow = [\"any\"]\n"), "`management.allow`"),
            (format!("{base}[management]\nports = [0]\n"), "`management.ports`"),
            (format!("{base}[management]\nports = [70000]\n"), "`management.ports`"),
            (format!("mode = \"router\"\n{base}[management]\nipv4 = \"10.0.0.1/24\"\n[wan]\nports = [22]\n"), "`wan.ports`: nothing on the box is open towards the WAN"),
        ] {
            let e = err(&text);
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn a_file_that_is_not_utf8_is_named_with_its_line() {
        let dir = std::env::temp_dir().join(format!("shaper-site-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("site.toml");
        std::fs::write(&f, b"[ports]\nwan = \"eth\xff\"\n").unwrap();
        let e = load(&f).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            e.contains("site.toml:2: not UTF-8 text (byte offset 18)"),
            "{e}"
        );
    }

    /// A disk with a GPT whose second partition has a known unique GUID, and the
    /// EFI variable naming it: the lookup finds partition 2 of that disk only.
    #[test]
    fn the_boot_partition_is_found_by_its_gpt_identity() {
        let guid = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b";
        let mut disk = vec![0u8; 512 * 40];
        disk[512..520].copy_from_slice(b"EFI PART");
        disk[512 + 72..512 + 80].copy_from_slice(&2u64.to_le_bytes());
        disk[512 + 80..512 + 84].copy_from_slice(&128u32.to_le_bytes());
        disk[512 + 84..512 + 88].copy_from_slice(&128u32.to_le_bytes());
        let e2 = 1024 + 128;
        disk[e2 + 16..e2 + 32].copy_from_slice(&guid_bytes(guid).unwrap());
        // Mixed-endian: the text's first group is stored backwards.
        assert_eq!(disk[e2 + 16..e2 + 20], [0x28, 0x73, 0x2a, 0xc1]);

        let root = std::env::temp_dir().join(format!("shaper-bootpart-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (efi, sys, dev) = (root.join("efivars"), root.join("block"), root.join("dev"));
        for d in [&efi, &sys.join("vda/vda2"), &sys.join("vdb/vdb1"), &dev] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(sys.join("vda/vda2/partition"), "2\n").unwrap();
        std::fs::write(sys.join("vdb/vdb1/partition"), "1\n").unwrap();
        std::fs::write(dev.join("vda"), &disk).unwrap();
        // Another disk (a USB stick) whose GPT has no such partition.
        let mut other = disk.clone();
        other[e2 + 16] ^= 1;
        std::fs::write(dev.join("vdb"), &other).unwrap();
        assert_eq!(
            boot_partition(&efi, &sys, &dev),
            Ok(None),
            "no variable: not booted that way"
        );
        let mut var = vec![6, 0, 0, 0];
        for u in guid.to_ascii_uppercase().encode_utf16().chain([0]) {
            var.extend(u.to_le_bytes());
        }
        std::fs::write(
            efi.join(format!("LoaderDevicePartUUID-{LOADER_GUID}")),
            &var,
        )
        .unwrap();
        let found = boot_partition(&efi, &sys, &dev);
        // A second disk written from the same image: the same identity twice.
        std::fs::write(dev.join("vdb"), &disk).unwrap();
        std::fs::write(sys.join("vdb/vdb1/partition"), "2\n").unwrap();
        let twice = boot_partition(&efi, &sys, &dev);
        std::fs::write(dev.join("vda"), &other).unwrap();
        std::fs::write(dev.join("vdb"), &other).unwrap();
        let missing = boot_partition(&efi, &sys, &dev);
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(found, Ok(Some(dev.join("vda2"))));
        assert!(twice.unwrap_err().contains("on more than one disk"));
        assert!(missing.unwrap_err().contains("no disk has it"));
    }

    #[test]
    fn image_site_config_validates() {
        // The firmware image's default site.toml (a bridge, management by DHCP and SLAAC).
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/rootfs/etc/shaper/site.toml");
        let site = load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(site.mode, Mode::Bridge);
    }
}
