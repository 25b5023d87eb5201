//! Writes the product's TOML config for the test topology, and reads the policies kept as
//! files.
//!
//! - [`ShaperConfig`]: rates, classes and rules, what the tests, the benches and the VM tier
//!   share. They also build it and [`Class`] with struct literals, so those two keep their
//!   fields; [`Rule`] has a `Default` and grows.
//! - [`Config`]: a `ShaperConfig` plus the keys it has no field for (per-class demotion and
//!   `claimed_max`, the download window clamp, `[telemetry]`, `[promote]`, `[autorate]`),
//!   built with small methods. The integration tests write their policies with it.
//! - [`fixture`]: a policy under `tests/fixtures/policies/`, by name, where the same policy
//!   serves several tests or is long and static (the classifier's).
//!
//! Rule `src_*`/`dst_*` fields (`src_cidrs`, `dst_ports`, ...) are from the site's point of
//! view (src = LAN side, dst = internet side); the product swaps packet fields for the
//! download direction, so one rule covers both directions of a flow.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::topology::{Line, GW_LAN_IF, GW_WAN_IF};

#[derive(Clone, Debug, PartialEq)]
pub struct Class {
    pub name: String,
    pub priority: u8,
    /// Percent of the direction's shaper rate.
    pub guaranteed_pct: u32,
    pub ceiling_pct: u32,
    pub default: bool,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct Rule {
    pub name: String,
    pub class: String,
    pub protocol: Option<String>,
    /// LAN-side addresses/CIDRs (`src_cidrs`).
    pub src_cidrs: Vec<String>,
    /// Internet-side addresses/CIDRs (`dst_cidrs`).
    pub dst_cidrs: Vec<String>,
    pub src_ports: Vec<String>,
    pub dst_ports: Vec<String>,
    /// Apps of the built-in catalogue (`apps`).
    pub apps: Vec<String>,
    /// Host names: addresses learned from DNS answers, TLS/QUIC server names (`dns_names`).
    pub dns_names: Vec<String>,
}

impl Rule {
    /// Rule `name` putting what it matches in `class`; matches everything until a field is set.
    pub fn new(name: &str, class: &str) -> Rule {
        Rule {
            name: name.into(),
            class: class.into(),
            ..Default::default()
        }
    }

    /// `protocol` ("udp", "tcp", ...).
    pub fn protocol(mut self, protocol: &str) -> Rule {
        self.protocol = Some(protocol.into());
        self
    }

    /// `dst_ports`: internet-side ports or ranges ("104", "50000-50059").
    pub fn dst_ports(mut self, ports: &[&str]) -> Rule {
        self.dst_ports = strings(ports);
        self
    }

    /// `src_ports`: LAN-side ports or ranges.
    pub fn src_ports(mut self, ports: &[&str]) -> Rule {
        self.src_ports = strings(ports);
        self
    }

    /// `apps`: apps of the built-in catalogue ("accurx-video", "dicom").
    pub fn apps(mut self, apps: &[&str]) -> Rule {
        self.apps = strings(apps);
        self
    }

    /// `dns_names`: host names.
    pub fn dns_names(mut self, names: &[&str]) -> Rule {
        self.dns_names = strings(names);
        self
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[derive(Clone, Debug, PartialEq)]
pub struct ShaperConfig {
    pub wan: String,
    pub lan: String,
    pub upload_bps: u64,
    pub download_bps: u64,
    pub classes: Vec<Class>,
    pub rules: Vec<Rule>,
    /// The class pure TCP ACKs go to (`[shaping] ack_class`).
    pub ack_class: Option<String>,
    /// `[download] account_arrivals` (done by `shaper run`); `None` leaves the product's
    /// default (on without `[autorate]`).
    pub account_arrivals: Option<bool>,
    /// `line` preset of both directions (e.g. "adsl2-pppoa"); `None`: no link-layer
    /// accounting.
    pub line: Option<String>,
}

impl ShaperConfig {
    /// The GP-surgery policy for `line`: upload shaped to 95 % and download to 92 % of the
    /// line (9500kbit / 36.8mbit on FTTC 40/10; downstream the shaper sits behind the
    /// bottleneck and needs the larger margin); video first, pure TCP ACKs in their own prio-0
    /// class (measured: without it the downloads starve behind bulk uploads), images
    /// guaranteed 30 %.
    pub fn gp_surgery(line: &Line) -> Self {
        let class = |name: &str, priority, guaranteed_pct, default| Class {
            name: name.into(),
            priority,
            guaranteed_pct,
            ceiling_pct: 100,
            default,
        };
        ShaperConfig {
            wan: GW_WAN_IF.into(),
            lan: GW_LAN_IF.into(),
            upload_bps: line.up_bps / 100 * 95,
            download_bps: line.down_bps / 100 * 92,
            classes: vec![
                class("video", 0, 10, false),
                class("acks", 0, 10, false),
                class("images", 2, 30, false),
                class("default", 4, 20, true),
            ],
            ack_class: Some("acks".into()),
            account_arrivals: None,
            line: None,
            rules: vec![
                Rule {
                    name: "teams-video".into(),
                    class: "video".into(),
                    protocol: Some("udp".into()),
                    dst_ports: vec!["50020-50039".into()],
                    ..Default::default()
                },
                Rule {
                    name: "dicom".into(),
                    class: "images".into(),
                    protocol: Some("tcp".into()),
                    dst_ports: vec!["104".into(), "11112".into()],
                    ..Default::default()
                },
            ],
        }
    }

    /// The guaranteed rate of class `name` in the upload direction, bits/s.
    pub fn upload_guaranteed_bps(&self, name: &str) -> Option<f64> {
        self.classes
            .iter()
            .find(|c| c.name == name)
            .map(|c| self.upload_bps as f64 * c.guaranteed_pct as f64 / 100.0)
    }

    /// The config file's text.
    pub fn to_toml(&self) -> String {
        Config::from(self.clone()).to_toml()
    }

    /// Writes the TOML into `dir/name` and returns the path.
    pub fn write(&self, dir: &Path, name: &str) -> Result<PathBuf> {
        Config::from(self.clone()).write(dir, name)
    }
}

/// Keys of one class that [`Class`] has no field for.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ClassKeys {
    /// `demote_to`: the class a flow of this class moves to once it turns bulk ...
    pub demote_to: Option<String>,
    /// ... `demote_after` carrying this much ("2MB").
    pub demote_after: Option<String>,
    /// `claimed_max`: what the flows claiming the class by name, or promoted into it, may
    /// carry together ("1mbit", "30%").
    pub claimed_max: Option<String>,
}

/// A [`ShaperConfig`] and the keys it has no field for, built by chaining:
/// `Config::new(up, down).class("video", 0, 30).ceiling(80).default_class(...)
/// .demote("video", "bulk", "2MB").rule(Rule::new("rtp", "video").protocol("udp")
/// .dst_ports(&["5004"]))`. [`Config::default_class`] and [`Config::ceiling`] finish the
/// class added last; [`Config::demote`] and [`Config::claimed_max`] name their class.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Interfaces, rates, classes, rules, `ack_class`, `account_arrivals`, `line`.
    pub base: ShaperConfig,
    /// Keys beyond [`Class`], by class name.
    pub class_keys: BTreeMap<String, ClassKeys>,
    /// `[download] window_clamp = true` with this `window_clamp_queue_ms`.
    pub window_clamp_queue_ms: Option<u32>,
    /// `[telemetry] listen`: where `shaper run` serves metrics.
    pub metrics_listen: Option<String>,
    /// `[promote] class`: where media-like default-class UDP flows go.
    pub promote: Option<String>,
    /// `[calls]`: the measured classes and `quiet_s`.
    pub calls: Option<(Vec<String>, u32)>,
    /// `[autorate]`: the reflectors and the class its probes travel in.
    pub autorate: Option<(Vec<String>, String)>,
}

impl From<ShaperConfig> for Config {
    fn from(base: ShaperConfig) -> Config {
        Config {
            base,
            class_keys: BTreeMap::new(),
            window_clamp_queue_ms: None,
            metrics_listen: None,
            promote: None,
            calls: None,
            autorate: None,
        }
    }
}

impl Config {
    /// The lab gateway's interfaces (`wan0`, `lan0`) shaped to these rates (bits/s); no
    /// classes or rules yet.
    pub fn new(upload_bps: u64, download_bps: u64) -> Config {
        Config::from(ShaperConfig {
            wan: GW_WAN_IF.into(),
            lan: GW_LAN_IF.into(),
            upload_bps,
            download_bps,
            classes: Vec::new(),
            rules: Vec::new(),
            ack_class: None,
            account_arrivals: None,
            line: None,
        })
    }

    /// Another LAN interface (`[interfaces] lan`).
    pub fn lan(mut self, lan: &str) -> Config {
        self.base.lan = lan.into();
        self
    }

    /// A class guaranteed `guaranteed_pct` % of each direction, ceiling 100 %.
    pub fn class(mut self, name: &str, priority: u8, guaranteed_pct: u32) -> Config {
        self.base.classes.push(Class {
            name: name.into(),
            priority,
            guaranteed_pct,
            ceiling_pct: 100,
            default: false,
        });
        self
    }

    /// [`Config::class`], the default class.
    pub fn default_class(self, name: &str, priority: u8, guaranteed_pct: u32) -> Config {
        let mut c = self.class(name, priority, guaranteed_pct);
        c.last_class().default = true;
        c
    }

    /// The last class's `ceiling`, percent.
    pub fn ceiling(mut self, pct: u32) -> Config {
        self.last_class().ceiling_pct = pct;
        self
    }

    /// Flows of `class` move to class `to` after carrying `after` ("2MB").
    pub fn demote(mut self, class: &str, to: &str, after: &str) -> Config {
        let keys = self.class_keys.entry(class.into()).or_default();
        keys.demote_to = Some(to.into());
        keys.demote_after = Some(after.into());
        self
    }

    /// `claimed_max` of `class` ("1mbit").
    pub fn claimed_max(mut self, class: &str, max: &str) -> Config {
        self.class_keys.entry(class.into()).or_default().claimed_max = Some(max.into());
        self
    }

    /// A `[[rule]]`, after those added before (rules of equal priority match in file order).
    pub fn rule(mut self, rule: Rule) -> Config {
        self.base.rules.push(rule);
        self
    }

    /// `[download] account_arrivals`.
    pub fn account_arrivals(mut self, on: bool) -> Config {
        self.base.account_arrivals = Some(on);
        self
    }

    /// `[download] window_clamp = true`, `window_clamp_queue_ms = queue_ms`.
    pub fn window_clamp(mut self, queue_ms: u32) -> Config {
        self.window_clamp_queue_ms = Some(queue_ms);
        self
    }

    /// `[telemetry] listen`.
    pub fn metrics(mut self, listen: impl std::fmt::Display) -> Config {
        self.metrics_listen = Some(listen.to_string());
        self
    }

    /// `[calls] classes = classes`, `quiet_s`, addresses shown.
    pub fn calls(mut self, classes: &[&str], quiet_s: u32) -> Config {
        self.calls = Some((classes.iter().map(|c| c.to_string()).collect(), quiet_s));
        self
    }

    /// `[promote] class`.
    pub fn promote(mut self, class: &str) -> Config {
        self.promote = Some(class.into());
        self
    }

    /// `[autorate]` probing `reflectors`, its probes in `class`.
    pub fn autorate(mut self, reflectors: &[&str], class: &str) -> Config {
        self.autorate = Some((strings(reflectors), class.into()));
        self
    }

    fn last_class(&mut self) -> &mut Class {
        self.base
            .classes
            .last_mut()
            .expect("a class method before any class()")
    }

    /// The config file's text; panics if a class's keys name a class the config lacks.
    pub fn to_toml(&self) -> String {
        let b = &self.base;
        for name in self.class_keys.keys() {
            assert!(
                b.classes.iter().any(|c| &c.name == name),
                "keys for class `{name}`, which the config does not have"
            );
        }
        let q = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""));
        let list = |v: &[String]| {
            format!(
                "[{}]",
                v.iter().map(|s| q(s)).collect::<Vec<_>>().join(", ")
            )
        };
        let mut t = String::new();
        let _ = writeln!(t, "[interfaces]\nwan = {}\nlan = {}", q(&b.wan), q(&b.lan));
        let _ = writeln!(t, "[upload]\nrate = {}", q(&format_rate(b.upload_bps)));
        if let Some(l) = &b.line {
            let _ = writeln!(t, "line = {}", q(l));
        }
        let _ = writeln!(t, "[download]\nrate = {}", q(&format_rate(b.download_bps)));
        if let Some(l) = &b.line {
            let _ = writeln!(t, "line = {}", q(l));
        }
        if let Some(a) = b.account_arrivals {
            let _ = writeln!(t, "account_arrivals = {a}");
        }
        if let Some(ms) = self.window_clamp_queue_ms {
            let _ = writeln!(t, "window_clamp = true\nwindow_clamp_queue_ms = {ms}");
        }
        if let Some(a) = &b.ack_class {
            let _ = writeln!(t, "[shaping]\nack_class = {}", q(a));
        }
        if let Some(l) = &self.metrics_listen {
            let _ = writeln!(t, "[telemetry]\nlisten = {}", q(l));
        }
        if let Some((reflectors, class)) = &self.autorate {
            let _ = writeln!(
                t,
                "[autorate]\nreflectors = {}\nclass = {}",
                list(reflectors),
                q(class)
            );
        }
        if let Some((classes, quiet_s)) = &self.calls {
            let _ = writeln!(
                t,
                "[calls]\nclasses = {}\naddresses = \"shown\"\nquiet_s = {quiet_s}",
                list(classes)
            );
        }
        if let Some(c) = &self.promote {
            let _ = writeln!(t, "[promote]\nclass = {}", q(c));
        }
        for c in &b.classes {
            let _ = writeln!(
                t,
                "[[class]]\nname = {}\npriority = {}",
                q(&c.name),
                c.priority
            );
            let _ = writeln!(
                t,
                "guaranteed = \"{}%\"\nceiling = \"{}%\"",
                c.guaranteed_pct, c.ceiling_pct
            );
            if c.default {
                let _ = writeln!(t, "default = true");
            }
            let keys = self.class_keys.get(&c.name).cloned().unwrap_or_default();
            for (key, v) in [
                ("demote_to", &keys.demote_to),
                ("demote_after", &keys.demote_after),
                ("claimed_max", &keys.claimed_max),
            ] {
                if let Some(v) = v {
                    let _ = writeln!(t, "{key} = {}", q(v));
                }
            }
        }
        for r in &b.rules {
            let _ = writeln!(
                t,
                "[[rule]]\nname = {}\nclass = {}",
                q(&r.name),
                q(&r.class)
            );
            if let Some(p) = &r.protocol {
                let _ = writeln!(t, "protocol = {}", q(p));
            }
            for (key, v) in [
                ("src_cidrs", &r.src_cidrs),
                ("dst_cidrs", &r.dst_cidrs),
                ("src_ports", &r.src_ports),
                ("dst_ports", &r.dst_ports),
                ("apps", &r.apps),
                ("dns_names", &r.dns_names),
            ] {
                if !v.is_empty() {
                    let _ = writeln!(t, "{key} = {}", list(v));
                }
            }
        }
        t
    }

    /// Writes the TOML into `dir/name` and returns the path.
    pub fn write(&self, dir: &Path, name: &str) -> Result<PathBuf> {
        let p = dir.join(name);
        std::fs::write(&p, self.to_toml()).with_context(|| format!("writing {}", p.display()))?;
        Ok(p)
    }
}

/// `tests/fixtures/policies/NAME.toml`.
pub fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/policies")
        .join(format!("{name}.toml"))
}

/// The text of the policy `tests/fixtures/policies/NAME.toml`; panics when it cannot be read.
pub fn fixture(name: &str) -> String {
    let p = fixture_path(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("policy fixture {}: {e}", p.display()))
}

/// "36mbit", "9500kbit" or "123bit": the largest unit that divides the rate exactly.
pub fn format_rate(bps: u64) -> String {
    if bps != 0 && bps.is_multiple_of(1_000_000) {
        format!("{}mbit", bps / 1_000_000)
    } else if bps != 0 && bps.is_multiple_of(1_000) {
        format!("{}kbit", bps / 1_000)
    } else {
        format!("{bps}bit")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shaper_user::dir::Dir;

    #[test]
    fn fttc_config_is_valid_for_the_product() {
        let text = ShaperConfig::gp_surgery(&Line::FTTC_40_10).to_toml();
        let p = shaper_user::config::parse(std::path::Path::new("gp.toml"), &text)
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(p.dirs[Dir::Up].rate_bps, 9_500_000);
        assert_eq!(p.dirs[Dir::Down].rate_bps, 36_800_000);
        let names: Vec<_> = p.classes.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["video", "acks", "images", "default"]);
        assert_eq!(p.ack_class, Some(1));
        assert_eq!(p.classes[p.default_class].name, "default");
        assert_eq!(p.rules.len(), 2);
    }

    #[test]
    fn image_guarantee_is_30_percent_of_upload() {
        let c = ShaperConfig::gp_surgery(&Line::FTTC_40_10);
        assert_eq!(c.upload_guaranteed_bps("images"), Some(2_850_000.0));
    }

    #[test]
    fn config_writes_the_keys_shaper_config_lacks() {
        let text = Config::new(20_000_000, 10_000_000)
            .class("video", 0, 30)
            .ceiling(80)
            .class("images", 2, 30)
            .default_class("default", 4, 20)
            .class("bulk", 7, 5)
            .demote("images", "bulk", "2MB")
            .claimed_max("video", "1mbit")
            .account_arrivals(false)
            .window_clamp(7)
            .metrics("10.201.1.1:9464")
            .promote("video")
            .autorate(&["192.0.2.1"], "video")
            .rule(Rule::new("accurx", "video").apps(&["accurx-video"]))
            .rule(Rule::new("pacs", "images").dns_names(&["pacs.example.nhs.uk"]))
            .rule(
                Rule::new("rtp", "video")
                    .protocol("udp")
                    .dst_ports(&["5004"]),
            )
            .to_toml();
        let p = shaper_user::config::parse(std::path::Path::new("c.toml"), &text)
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        let names: Vec<_> = p.classes.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["video", "images", "default", "bulk"], "{text}");
        assert_eq!(p.classes[p.default_class].name, "default");
        assert_eq!(
            p.classes[0].ceiling,
            shaper_user::config::Share::Percent(80.0)
        );
        let demote = p.classes[1].demote.expect("images demoted");
        assert_eq!((demote.to, demote.after_bytes), (3, Some(2_000_000)));
        assert!(p.classes[0].claimed_max.is_some() && p.classes[1].claimed_max.is_none());
        assert!(!p.dirs[Dir::Down].account_arrivals);
        assert_eq!(p.dirs[Dir::Down].window_clamp.map(|w| w.queue_ms), Some(7));
        assert_eq!(p.metrics_listen, Some("10.201.1.1:9464".parse().unwrap()));
        assert_eq!(p.promote.map(|x| x.class), Some(0));
        let autorate = p.autorate.expect("autorate");
        assert_eq!((autorate.reflectors.len(), autorate.class), (1, 0));
        let rule = |name: &str| p.rules.iter().find(|r| r.name.starts_with(name));
        assert!(rule("accurx/").is_some(), "the app expanded: {:?}", p.rules);
        assert_eq!(
            rule("pacs").expect("pacs").dns_names,
            ["pacs.example.nhs.uk"]
        );
        assert_eq!(rule("rtp").expect("rtp").dst_ports, [(5004, 5004)]);
    }

    #[test]
    #[should_panic(expected = "keys for class `nosuch`")]
    fn keys_of_a_missing_class_are_refused() {
        Config::new(1_000_000, 1_000_000)
            .default_class("default", 4, 20)
            .claimed_max("nosuch", "1mbit")
            .to_toml();
    }

    #[test]
    fn policy_fixtures_are_valid() {
        let dir = fixture_path("x").parent().expect("dir").to_path_buf();
        let mut n = 0;
        for e in std::fs::read_dir(&dir).expect("fixtures/policies") {
            let path = e.expect("entry").path();
            if path.extension().is_some_and(|x| x == "toml") {
                shaper_user::config::load(&path)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                n += 1;
            }
        }
        assert!(n >= 2, "{n} policies in {}", dir.display());
    }

    #[test]
    fn rates_use_the_largest_exact_unit() {
        assert_eq!(format_rate(36_000_000), "36mbit");
        assert_eq!(format_rate(9_500_000), "9500kbit");
        assert_eq!(format_rate(950_500), "950500bit");
    }
}
