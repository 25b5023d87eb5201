//! Writes the product's TOML config for the test topology.
//!
//! Rule `src_*`/`dst_*` fields (`src_cidrs`, `dst_ports`, ...) are from the site's point of
//! view (src = LAN side, dst = internet side); the product swaps packet fields for the
//! download direction, so one rule covers both directions of a flow.

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

    pub fn to_toml(&self) -> String {
        let q = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""));
        let list = |v: &[String]| {
            format!(
                "[{}]",
                v.iter().map(|s| q(s)).collect::<Vec<_>>().join(", ")
            )
        };
        let mut t = String::new();
        let _ = writeln!(
            t,
            "[interfaces]\nwan = {}\nlan = {}",
            q(&self.wan),
            q(&self.lan)
        );
        let _ = writeln!(t, "[upload]\nrate = {}", q(&format_rate(self.upload_bps)));
        if let Some(l) = &self.line {
            let _ = writeln!(t, "line = {}", q(l));
        }
        let _ = writeln!(
            t,
            "[download]\nrate = {}",
            q(&format_rate(self.download_bps))
        );
        if let Some(l) = &self.line {
            let _ = writeln!(t, "line = {}", q(l));
        }
        if let Some(a) = self.account_arrivals {
            let _ = writeln!(t, "account_arrivals = {a}");
        }
        if let Some(a) = &self.ack_class {
            let _ = writeln!(t, "[shaping]\nack_class = {}", q(a));
        }
        for c in &self.classes {
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
        }
        for r in &self.rules {
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

    #[test]
    fn fttc_config_is_valid_for_the_product() {
        let text = ShaperConfig::gp_surgery(&Line::FTTC_40_10).to_toml();
        let p = shaper_user::config::parse(std::path::Path::new("gp.toml"), &text)
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(p.upload_bps, 9_500_000);
        assert_eq!(p.download_bps, 36_800_000);
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
    fn rates_use_the_largest_exact_unit() {
        assert_eq!(format_rate(36_000_000), "36mbit");
        assert_eq!(format_rate(9_500_000), "9500kbit");
        assert_eq!(format_rate(950_500), "950500bit");
    }
}
