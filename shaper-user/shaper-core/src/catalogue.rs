//! The built-in clinical application catalogue: named, versioned definitions of
//! how each clinical (and background) application appears on the wire, which a
//! config's rules refer to by name (`apps = ["teams-media", "dicom"]`).
//!
//! The catalogue is written in the same TOML a config's `[[app]]` tables use
//! and validated by the same code (`app` below, used by [`crate::config`] too), so a built-in entry can
//! be copied into a config and edited there: an `[[app]]` with a built-in name
//! replaces it, a new name adds one.
//!
//! An app has zero or more match entries (each becomes one [`Rule`] when a rule
//! names the app, named `<rule>/<app>#<n>`), DNS names (stored and shown; not
//! matched until DNS-name rules exist), what it `needs` beyond ports and
//! addresses, where its figures come from and notes. An app that cannot be
//! recognised by ports and addresses today has no match entries: it matches
//! nothing rather than something wrong.
//!
//! Figures are as published by the vendors: each app's `source` names the public
//! page (title and address) or says that there is none; check them against the
//! current pages when bumping [`VERSION`].

use std::{path::Path, sync::OnceLock};

use serde::{Deserialize, Serialize};

use toml::Spanned;

use crate::diag::{toml_error, ConfigError, Ctx};
use crate::dir::Dir;
pub use crate::rule::AppMatch;
use crate::rule::{dns_name_value, match_fields, values, MatchFields, Rule};
use crate::units::{port_range, protocol_name};

/// Version of the built-in catalogue; bump it whenever an entry changes.
pub const VERSION: &str = "2026.12.1";

/// What a built-in catalogue error names as its file.
pub const BUILTIN_FILE: &str = "<built-in catalogue>";

/// The built-in catalogue, in the `[[app]]` format of a config. Each app is
/// either flat match fields (one match entry) or `[[app.match]]` tables.
pub const BUILTIN: &str = r#"
version = "2026.12.1"

# --- Video consultations -------------------------------------------------

[[app]]
name = "teams-audio"
protocol = "udp"
src_ports = ["50000-50019"]
dst_ports = ["3478-3481"]
dst_cidrs = ["13.107.64.0/18", "52.112.0.0/14", "52.122.0.0/15", "2603:1063::/38"]
source = "Microsoft 365 URLs and IP address ranges, learn.microsoft.com/microsoft-365/enterprise/urls-and-ip-address-ranges (Teams media: UDP 3478-3481 to 13.107.64.0/18, 52.112.0.0/14, 52.122.0.0/15, 2603:1063::/38); Implement QoS in Microsoft Teams, learn.microsoft.com/microsoftteams/qos-in-teams (client source ports: audio 50000-50019, DSCP EF 46)"
notes = "Matches only when the Teams client media port ranges are configured (Teams admin meeting settings) and media goes through Microsoft's relays; peer-to-peer media and the TCP 443 fallback are not recognised. Clients mark EF only where a QoS policy sets it."

[[app]]
name = "teams-video"
protocol = "udp"
src_ports = ["50020-50039"]
dst_ports = ["3478-3481"]
dst_cidrs = ["13.107.64.0/18", "52.112.0.0/14", "52.122.0.0/15", "2603:1063::/38"]
source = "Microsoft 365 URLs and IP address ranges, learn.microsoft.com/microsoft-365/enterprise/urls-and-ip-address-ranges (Teams media: UDP 3478-3481 to its ranges); Implement QoS in Microsoft Teams, learn.microsoft.com/microsoftteams/qos-in-teams (client source ports: video 50020-50039, DSCP AF41 34)"
notes = "As teams-audio: needs the client media port ranges configured; peer-to-peer and TCP 443 fallback media are not recognised."

[[app]]
name = "teams-screenshare"
protocol = "udp"
src_ports = ["50040-50059"]
dst_ports = ["3478-3481"]
dst_cidrs = ["13.107.64.0/18", "52.112.0.0/14", "52.122.0.0/15", "2603:1063::/38"]
source = "Microsoft 365 URLs and IP address ranges, learn.microsoft.com/microsoft-365/enterprise/urls-and-ip-address-ranges (Teams media: UDP 3478-3481 to its ranges); Implement QoS in Microsoft Teams, learn.microsoft.com/microsoftteams/qos-in-teams (client source ports: screen sharing 50040-50059, DSCP AF21 18)"
notes = "As teams-audio: needs the client media port ranges configured; peer-to-peer and TCP 443 fallback media are not recognised."

[[app]]
name = "teams-media"
protocol = "udp"
dst_ports = ["3478-3481"]
dst_cidrs = ["13.107.64.0/18", "52.112.0.0/14", "52.122.0.0/15", "2603:1063::/38"]
source = "Microsoft 365 URLs and IP address ranges, learn.microsoft.com/microsoft-365/enterprise/urls-and-ip-address-ranges (Teams media: UDP 3478-3481 to 13.107.64.0/18, 52.112.0.0/14, 52.122.0.0/15, 2603:1063::/38)"
notes = "All Teams media (audio, video, screen sharing) through Microsoft's relays, whatever the client's source port. The TCP 443 fallback (UDP blocked) is not recognised."

[[app]]
name = "zoom"
protocol = "udp"
dst_ports = ["8801-8810"]
source = "Zoom network firewall or proxy server settings, support.zoom.com (meeting client media: UDP 8801-8810)"
notes = "Any destination: Zoom's published IP ranges are long and change often, and are not included. Zoom can mark audio DSCP 56 and video 40 when enabled in its settings; not required here."

[[app]]
name = "near-me"
protocol = "udp"
dst_ports = [3478]
needs = ["dns"]
source = "STUN/TURN's registered port (IANA service names stun and turn, www.iana.org/assignments/service-names-port-numbers; RFC 8656): UDP 3478. Attend Anywhere / Near Me run in the browser (WebRTC); we found no public network page of the service itself"
notes = "Only the port part is matched: UDP 3478 (STUN/TURN) to any destination, which other WebRTC services use as well. The TCP 443 TURN fallback is not matched: TCP 443 to anywhere is all web traffic. The service's TURN server names are not listed in our sources: add them as dns_names in a config [[app]] named near-me (matched from DNS answers and TLS server names). Chromium sends no DSCP."

[[app]]
name = "accurx-video"
dns_names = ["*.sfu.whereby.com", "*.turn.whereby.com", "*.sfu.svc.whereby.com", "*.turn.svc.whereby.com"]
source = "Whereby firewall and security (accuRx video runs on Whereby), docs.whereby.com/further-resources/faq-and-troubleshooting/firewall-and-security (media servers *.sfu.whereby.com, *.turn.whereby.com, *.sfu.svc.whereby.com, *.turn.svc.whereby.com; no static IP ranges)"
notes = "accuRx video consultations run on Whereby, which publishes no static ranges: the media servers are recognised by name, from the DNS answers clients receive through the gateway (any protocol to the answered addresses) and from TLS server names (TURN over TCP 443). A client using its own encrypted DNS (DoH) is recognised by TLS server name only."

# --- Image transfers -----------------------------------------------------

[[app]]
name = "dicom"
source = "DICOM PS3.8 network communication, dicom.nema.org/medical/dicom/current/output/html/part08.html; IANA service names, www.iana.org/assignments/service-names-port-numbers (TCP 104 acr-nema, TCP 11112 dicom)"
notes = "C-STORE and other DICOM associations in both directions: the site's modality or PACS connecting out (dst port) and a remote archive or the Image Exchange Portal connecting in (src port, the site's side). DICOM over TLS/VPN (IEP, cloud PACS) needs the tunnel's peer address in a rule of its own."

[[app.match]]
protocol = "tcp"
dst_ports = [104, 11112]

[[app.match]]
protocol = "tcp"
src_ports = [104, 11112]

# --- Clinical systems ----------------------------------------------------

[[app]]
name = "emis-web"
protocol = "tcp"
dst_ports = ["33962-33969"]
dst_cidrs = ["10.207.112.0/22", "10.207.116.0/22"]
source = "No public source: the HSCN ranges 10.207.112.0/22 and 10.207.116.0/22 and TCP 33962-33969 are not on a public page we can cite; confirm them with EMIS or the ICB's network team before relying on this app"
notes = "HSCN private addressing: only meaningful where the gateway carries the site's HSCN traffic."

[[app]]
name = "systmone"
source = "No public source: we found no public page listing SystmOne's HSCN endpoints"
notes = "SystmOne uses TLS on TCP 443 to TPP's HSCN endpoints, whose addresses are not in our sources: TCP 443 alone is all web traffic, so this app matches nothing yet. Add the endpoints in a config [[app]] named systmone (dst_cidrs + dst_ports = [443]) to recognise it."

# --- Background ----------------------------------------------------------

[[app]]
name = "delivery-optimization"
source = "Delivery Optimization FAQ, learn.microsoft.com/windows/deployment/do/waas-delivery-optimization-faq (peers on port 7680)"
notes = "Peer-to-peer Windows/Office update traffic with peers across the internet (the site's PC as client, dst port, or as server, src port). Peers on the same LAN never cross the gateway. The HTTP downloads from Microsoft's CDN are in windows-update (DNS names)."

[[app.match]]
protocol = ["tcp", "udp"]
dst_ports = [7680]

[[app.match]]
protocol = ["tcp", "udp"]
src_ports = [7680]

[[app]]
name = "windows-update"
dns_names = ["*.dl.delivery.mp.microsoft.com", "*.delivery.mp.microsoft.com", "*.windowsupdate.com", "*.update.microsoft.com"]
source = "Delivery Optimization FAQ, learn.microsoft.com/windows/deployment/do/waas-delivery-optimization-faq (peers on port 7680); Delivery Optimization endpoints, learn.microsoft.com/windows/deployment/do/delivery-optimization-endpoints (downloads from *.dl.delivery.mp.microsoft.com, *.windowsupdate.com)"
notes = "The Delivery Optimization peer part (TCP/UDP 7680) by port; the downloads from Microsoft's CDNs (TCP 80/443) by name, from DNS answers through CNAME chains and from TLS server names. A CDN address shared with other sites' content is classed with it while the answer's TTL lasts."

[[app.match]]
protocol = ["tcp", "udp"]
dst_ports = [7680]

[[app.match]]
protocol = ["tcp", "udp"]
src_ports = [7680]

[[app]]
name = "backup-sync"
dns_names = ["*.sharepoint.com"]
source = "Microsoft 365 URLs and IP address ranges, learn.microsoft.com/microsoft-365/enterprise/urls-and-ip-address-ranges (OneDrive and SharePoint: *.sharepoint.com); no port or address identifies backup products in general"
notes = "No ports identify backup or sync traffic: OneDrive/SharePoint and most cloud backup products use HTTPS (TCP 443), recognised here by name (DNS answers and TLS server names). *.sharepoint.com also carries interactive SharePoint and Teams file use. A backup product with its own port, target range or names can be added as a config [[app]]."
"#;

/// A named application.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct App {
    pub name: String,
    /// Each becomes one rule; empty = the app matches nothing today.
    pub matches: Vec<AppMatch>,
    /// Host names (`*.` wildcards) for DNS-name rules: stored and shown only.
    pub dns_names: Vec<String>,
    /// What recognising the app fully needs beyond ports and addresses
    /// ("dns"); always includes "dns" when `dns_names` is not empty.
    pub needs: Vec<String>,
    /// Where the figures come from.
    pub source: String,
    pub notes: String,
    /// "built-in catalogue 2026.11.1" or the config file and line.
    pub origin: String,
}

/// A set of apps: the built-in ones, possibly extended by a config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Catalogue {
    /// The built-in catalogue's version.
    pub version: String,
    /// Built-in apps in catalogue order, then a config's new ones in file order.
    pub apps: Vec<App>,
}

impl Catalogue {
    /// The built-in catalogue. Its text is constant and validated by the unit
    /// tests, so a failure here is a bug in this file.
    pub fn builtin() -> Catalogue {
        static PARSED: OnceLock<Catalogue> = OnceLock::new();
        PARSED
            .get_or_init(|| {
                parse_catalogue(Path::new(BUILTIN_FILE), BUILTIN)
                    .unwrap_or_else(|e| panic!("the built-in catalogue is invalid: {e}"))
            })
            .clone()
    }

    pub fn get(&self, name: &str) -> Option<&App> {
        self.apps.iter().find(|a| a.name == name)
    }

    pub fn names(&self) -> Vec<&str> {
        self.apps.iter().map(|a| a.name.as_str()).collect()
    }

    /// Adds `app`, replacing an app of the same name in place.
    pub fn upsert(&mut self, app: App) {
        match self.apps.iter_mut().find(|a| a.name == app.name) {
            Some(slot) => *slot = app,
            None => self.apps.push(app),
        }
    }

    /// Text listing for `shaper catalogue`.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "clinical application catalogue {} ({} apps)",
            self.version,
            self.apps.len()
        );
        for a in &self.apps {
            let _ = writeln!(s);
            let _ = writeln!(s, "{}  [{}]", a.name, a.origin);
            if a.matches.is_empty() {
                let _ = writeln!(
                    s,
                    "  match:     nothing (no ports or addresses identify it)"
                );
            }
            for (i, m) in a.matches.iter().enumerate() {
                let _ = writeln!(s, "  match #{}:  {m}", i + 1);
            }
            if !a.dns_names.is_empty() {
                let _ = writeln!(
                    s,
                    "  DNS names: {} (DNS answers and TLS server names)",
                    a.dns_names.join(", ")
                );
            }
            if !a.needs.is_empty() {
                let _ = writeln!(s, "  needs:     {}", a.needs.join(", "));
            }
            if !a.source.is_empty() {
                let _ = writeln!(s, "  source:    {}", a.source);
            }
            if !a.notes.is_empty() {
                let _ = writeln!(s, "  notes:     {}", a.notes);
            }
        }
        s
    }

    /// JSON for `shaper catalogue --json`: ports as "lo-hi" strings, CIDRs as
    /// strings, protocols by name where they have one.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        let apps: Vec<_> = self
            .apps
            .iter()
            .map(|a| {
                let matches: Vec<_> = a
                    .matches
                    .iter()
                    .map(|m| {
                        json!({
                            "protocols": m.protocols.iter().map(|&p| protocol_name(p)).collect::<Vec<_>>(),
                            "src_ports": m.src_ports.iter().map(|&r| port_range(r)).collect::<Vec<_>>(),
                            "dst_ports": m.dst_ports.iter().map(|&r| port_range(r)).collect::<Vec<_>>(),
                            "src_cidrs": m.src_cidrs.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
                            "dst_cidrs": m.dst_cidrs.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
                            "dscp": m.dscp,
                        })
                    })
                    .collect();
                json!({
                    "name": a.name,
                    "matches": matches,
                    "dns_names": a.dns_names,
                    "needs": a.needs,
                    "source": a.source,
                    "notes": a.notes,
                    "origin": a.origin,
                })
            })
            .collect();
        json!({ "version": self.version, "apps": apps })
    }
}

impl App {
    /// The rules this app adds under a rule named `rule`: one per match entry,
    /// named `<rule>/<app>#<n>` (n from 1), in order, each with the rule's
    /// class, priority and direction.
    pub fn expand(
        &self,
        rule: &str,
        class: usize,
        priority: i64,
        direction: Option<Dir>,
    ) -> Vec<Rule> {
        let mut rules: Vec<Rule> = self
            .matches
            .iter()
            .enumerate()
            .map(|(i, m)| Rule {
                name: format!("{rule}/{}#{}", self.name, i + 1),
                class,
                priority,
                direction,
                protocols: m.protocols.clone(),
                src_ports: m.src_ports.clone(),
                dst_ports: m.dst_ports.clone(),
                src_cidrs: m.src_cidrs.clone(),
                dst_cidrs: m.dst_cidrs.clone(),
                dscp: m.dscp.clone(),
                dns_names: vec![],
            })
            .collect();
        if !self.dns_names.is_empty() {
            // Any traffic to the addresses answered for the names (or whose
            // TLS server name is one of them).
            rules.push(Rule {
                name: format!("{rule}/{}#dns", self.name),
                class,
                priority,
                direction,
                protocols: vec![],
                src_ports: vec![],
                dst_ports: vec![],
                src_cidrs: vec![],
                dst_cidrs: vec![],
                dscp: vec![],
                dns_names: self.dns_names.clone(),
            });
        }
        rules
    }

    /// Whether recognising the app needs DNS-name matching.
    pub fn needs_dns(&self) -> bool {
        self.needs.iter().any(|n| n == "dns")
    }

    /// What `check` says about this app under `rule`, if anything: apps that
    /// match only partly or not at all today.
    pub fn note(&self, rule: &str) -> Option<String> {
        let names = if self.dns_names.is_empty() {
            String::new()
        } else {
            format!(" ({})", self.dns_names.join(", "))
        };
        if self.needs_dns() && self.dns_names.is_empty() {
            Some(format!(
                "rule `{rule}`: app `{}` needs DNS-name matching but the catalogue lists no names for it; \
                 only its ports/addresses are matched",
                self.name
            ))
        } else if self.matches.is_empty() && self.dns_names.is_empty() {
            Some(format!(
                "rule `{rule}`: app `{}` has nothing to match yet (see `shaper catalogue`); it adds no rule",
                self.name
            ))
        } else if !self.dns_names.is_empty() {
            Some(format!(
                "rule `{rule}`: app `{}` is recognised by host name{names} from DNS answers and TLS server names \
                 seen while `shaper run` runs",
                self.name
            ))
        } else {
            None
        }
    }
}

// ---------------------------------------------------------------------------
// The `[[app]]` format (a config's tables and the built-in catalogue's).

/// The built-in catalogue's file ([`crate::catalogue::BUILTIN`]).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCatalogue {
    pub version: Spanned<String>,
    #[serde(default, rename = "app")]
    pub apps: Vec<Spanned<RawApp>>,
}

/// An `[[app]]` table: one match entry as flat fields, or several as
/// `[[app.match]]` tables.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApp {
    pub name: Spanned<String>,
    #[serde(default)]
    pub protocol: Option<Spanned<toml::Value>>,
    #[serde(default)]
    pub src_ports: Option<Spanned<toml::Value>>,
    #[serde(default)]
    pub dst_ports: Option<Spanned<toml::Value>>,
    #[serde(default)]
    pub src_cidrs: Option<Spanned<toml::Value>>,
    #[serde(default)]
    pub dst_cidrs: Option<Spanned<toml::Value>>,
    #[serde(default)]
    pub dscp: Option<Spanned<toml::Value>>,
    #[serde(default, rename = "match")]
    pub matches: Option<Spanned<Vec<RawMatch>>>,
    #[serde(default)]
    pub dns_names: Option<Spanned<toml::Value>>,
    #[serde(default)]
    pub needs: Option<Spanned<toml::Value>>,
    #[serde(default)]
    pub source: Option<Spanned<String>>,
    #[serde(default)]
    pub notes: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMatch {
    #[serde(default)]
    pub protocol: Option<Spanned<toml::Value>>,
    #[serde(default)]
    pub src_ports: Option<Spanned<toml::Value>>,
    #[serde(default)]
    pub dst_ports: Option<Spanned<toml::Value>>,
    #[serde(default)]
    pub src_cidrs: Option<Spanned<toml::Value>>,
    #[serde(default)]
    pub dst_cidrs: Option<Spanned<toml::Value>>,
    #[serde(default)]
    pub dscp: Option<Spanned<toml::Value>>,
}

/// Validates one `[[app]]` table (of a config, or of the built-in catalogue);
/// `at` names it in errors ("app[2]").
pub fn app(cx: &Ctx<'_>, a: &RawApp, at: &str, origin: String) -> Result<App, ConfigError> {
    let f = |k: &str| format!("{at}.{k}");
    let name = a.name.get_ref().trim().to_string();
    if name.is_empty()
        || !name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
    {
        return Err(cx.at(&a.name, f("name"), "use letters, digits, '-' and '_'"));
    }
    let flat = MatchFields {
        protocol: &a.protocol,
        src_ports: &a.src_ports,
        dst_ports: &a.dst_ports,
        src_cidrs: &a.src_cidrs,
        dst_cidrs: &a.dst_cidrs,
        dscp: &a.dscp,
    };
    let mut matches = Vec::new();
    match &a.matches {
        None => {
            if !flat.present().is_empty() {
                matches.push(match_fields(cx, &flat, &f)?);
            }
        }
        Some(list) => {
            if let Some((k, v)) = flat.present().first() {
                return Err(cx.at(
                    v,
                    f(k),
                    format!(
                        "`{k}` cannot be combined with [[app.match]] tables: put it in each [[app.match]]"
                    ),
                ));
            }
            if list.get_ref().is_empty() {
                return Err(cx.at(
                    list,
                    f("match"),
                    "an empty list matches nothing; leave `match` out if the app has no match",
                ));
            }
            for (j, m) in list.get_ref().iter().enumerate() {
                let fm = |k: &str| format!("{at}.match[{j}].{k}");
                let fields = MatchFields {
                    protocol: &m.protocol,
                    src_ports: &m.src_ports,
                    dst_ports: &m.dst_ports,
                    src_cidrs: &m.src_cidrs,
                    dst_cidrs: &m.dst_cidrs,
                    dscp: &m.dscp,
                };
                if fields.present().is_empty() {
                    return Err(cx.at(
                        list,
                        format!("{at}.match[{j}]"),
                        "a match with no fields would match all traffic; give it protocol, ports, CIDRs or dscp",
                    ));
                }
                matches.push(match_fields(cx, &fields, &fm)?);
            }
        }
    }
    let dns_names = values(cx, &a.dns_names, f("dns_names"), "name", dns_name_value)?;
    let mut needs = values(cx, &a.needs, f("needs"), "need", |v| match v {
        toml::Value::String(s) if s.trim() == "dns" => Ok("dns".to_string()),
        other => Err(format!(
            "`{other}`: the only need known is \"dns\" (DNS-name matching)"
        )),
    })?;
    needs.dedup();
    if !dns_names.is_empty() && !needs.iter().any(|n| n == "dns") {
        needs.push("dns".to_string());
    }
    Ok(App {
        name,
        matches,
        dns_names,
        needs,
        source: a
            .source
            .as_ref()
            .map(|s| s.get_ref().trim().to_string())
            .unwrap_or_default(),
        notes: a
            .notes
            .as_ref()
            .map(|s| s.get_ref().trim().to_string())
            .unwrap_or_default(),
        origin,
    })
}

/// Parses and validates a catalogue file (the built-in one: `version` and
/// `[[app]]` tables).
pub fn parse_catalogue(file: &Path, text: &str) -> Result<Catalogue, ConfigError> {
    let cx = Ctx { file, text };
    let raw: RawCatalogue = toml::from_str(text).map_err(|e| toml_error(&cx, &e))?;
    let version = raw.version.get_ref().trim().to_string();
    let mut catalogue = Catalogue {
        version: version.clone(),
        apps: Vec::new(),
    };
    for (i, sa) in raw.apps.iter().enumerate() {
        let app = app(
            &cx,
            sa.get_ref(),
            &format!("app[{i}]"),
            format!("built-in catalogue {version}"),
        )?;
        if catalogue.get(&app.name).is_some() {
            return Err(cx.at(
                &sa.get_ref().name,
                format!("app[{i}].name"),
                format!("app `{}` is defined twice", app.name),
            ));
        }
        catalogue.apps.push(app);
    }
    Ok(catalogue)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_parses_and_has_the_expected_apps() {
        let c = Catalogue::builtin();
        assert_eq!(c.version, VERSION);
        assert_eq!(
            c.names(),
            [
                "teams-audio",
                "teams-video",
                "teams-screenshare",
                "teams-media",
                "zoom",
                "near-me",
                "accurx-video",
                "dicom",
                "emis-web",
                "systmone",
                "delivery-optimization",
                "windows-update",
                "backup-sync",
            ]
        );
        for a in &c.apps {
            assert!(!a.source.is_empty(), "{}: no source", a.name);
            // A page a site can open, or a plain statement that there is none; never a
            // file of ours the user does not have.
            assert!(
                !a.source.contains(".md")
                    && (a.source.starts_with("No public source")
                        || [".com/", ".org/", ".gov/"]
                            .iter()
                            .any(|d| a.source.contains(d))
                        || a.source.contains("support.zoom.com")),
                "{}: {}",
                a.name,
                a.source
            );
            assert!(!a.notes.is_empty(), "{}: no notes", a.name);
            assert!(a.origin.contains(VERSION), "{}: {}", a.name, a.origin);
            // Never a match entry that matches everything.
            for m in &a.matches {
                assert_ne!(m, &AppMatch::default(), "{}", a.name);
            }
            if !a.dns_names.is_empty() {
                assert!(a.needs_dns(), "{}: DNS names without needs dns", a.name);
            }
        }
    }

    #[test]
    fn figures() {
        let c = Catalogue::builtin();
        let m = |n: &str| c.get(n).unwrap_or_else(|| panic!("{n}")).matches.clone();
        let teams = m("teams-media");
        assert_eq!(teams.len(), 1);
        assert_eq!(teams[0].protocols, [17]);
        assert_eq!(teams[0].dst_ports, [(3478, 3481)]);
        assert_eq!(
            teams[0]
                .dst_cidrs
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>(),
            [
                "13.107.64.0/18",
                "52.112.0.0/14",
                "52.122.0.0/15",
                "2603:1063::/38"
            ]
        );
        assert_eq!(m("teams-audio")[0].src_ports, [(50000, 50019)]);
        assert_eq!(m("teams-video")[0].src_ports, [(50020, 50039)]);
        assert_eq!(m("teams-screenshare")[0].src_ports, [(50040, 50059)]);
        assert_eq!(m("zoom")[0].dst_ports, [(8801, 8810)]);
        let dicom = m("dicom");
        assert_eq!(dicom.len(), 2);
        assert_eq!(dicom[0].dst_ports, [(104, 104), (11112, 11112)]);
        assert!(dicom[0].src_ports.is_empty());
        assert_eq!(dicom[1].src_ports, [(104, 104), (11112, 11112)]);
        assert!(dicom[1].dst_ports.is_empty());
        assert_eq!(m("emis-web")[0].dst_cidrs.len(), 2);
        let near = c.get("near-me").expect("near-me");
        assert_eq!(near.matches.len(), 1, "UDP 3478 only: TCP 443 is all web");
        assert!(near.needs_dns());
        assert!(near.notes.contains("Only the port part is matched"));
        let accurx = c.get("accurx-video").expect("accurx");
        assert!(accurx.matches.is_empty());
        assert_eq!(accurx.needs, ["dns"]);
        assert_eq!(
            accurx.dns_names,
            [
                "*.sfu.whereby.com",
                "*.turn.whereby.com",
                "*.sfu.svc.whereby.com",
                "*.turn.svc.whereby.com"
            ]
        );
        assert!(m("systmone").is_empty());
        let wu = c.get("windows-update").expect("wu");
        assert_eq!(wu.matches, m("delivery-optimization"));
        assert!(wu
            .dns_names
            .contains(&"*.dl.delivery.mp.microsoft.com".to_string()));
        assert!(m("backup-sync").is_empty());
    }

    #[test]
    fn expansion_names_order_and_fields() {
        let c = Catalogue::builtin();
        let rules = c
            .get("dicom")
            .expect("dicom")
            .expand("images", 2, 7, Some(Dir::Up));
        let names: Vec<_> = rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["images/dicom#1", "images/dicom#2"]);
        assert!(rules
            .iter()
            .all(|r| r.class == 2 && r.priority == 7 && r.direction == Some(Dir::Up)));
        assert_eq!(rules[0].dst_ports, [(104, 104), (11112, 11112)]);
        assert_eq!(rules[1].src_ports, [(104, 104), (11112, 11112)]);
        // A DNS-only app expands to one host-name rule, and says how it is recognised.
        let a = c.get("accurx-video").expect("accurx");
        let rules = a.expand("v", 0, 0, None);
        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0].name, "v/accurx-video#dns");
        assert_eq!(rules[0].dns_names, a.dns_names);
        assert!(rules[0].protocols.is_empty() && rules[0].dst_cidrs.is_empty());
        let note = a.note("v").expect("a note");
        assert!(note.contains("recognised by host name"), "{note}");
        assert!(c.get("dicom").expect("dicom").note("x").is_none());
        assert!(c
            .get("systmone")
            .expect("systmone")
            .note("x")
            .expect("note")
            .contains("nothing to match"));
    }

    #[test]
    fn upsert_replaces_in_place_or_appends() {
        let mut c = Catalogue::builtin();
        let n = c.apps.len();
        let mut z = c.get("zoom").expect("zoom").clone();
        z.notes = "changed".into();
        c.upsert(z);
        assert_eq!(c.apps.len(), n);
        assert_eq!(c.get("zoom").expect("zoom").notes, "changed");
        assert_eq!(c.names()[4], "zoom");
        let mut new = c.get("zoom").expect("zoom").clone();
        new.name = "pacs-cloud".into();
        c.upsert(new);
        assert_eq!(c.names().last(), Some(&"pacs-cloud"));
    }

    #[test]
    fn render_and_json_show_every_app() {
        let c = Catalogue::builtin();
        let text = c.render();
        for a in &c.apps {
            assert!(text.contains(&format!("\n{}  [", a.name)), "{}", a.name);
        }
        assert!(text.contains("match #2:  tcp src port 104,11112"), "{text}");
        assert!(text.contains("*.sfu.whereby.com"), "{text}");
        let j = c.to_json();
        assert_eq!(j["version"], VERSION);
        assert_eq!(j["apps"][3]["name"], "teams-media");
        assert_eq!(j["apps"][3]["matches"][0]["dst_ports"][0], "3478-3481");
        assert_eq!(j["apps"][3]["matches"][0]["protocols"][0], "udp");
    }
}
