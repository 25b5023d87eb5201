//! The download-latency comparison both the matrix bench (`shaper-download-matrix`) and
//! the shaping test run: line profiles with their framing, and one case = one gateway
//! (the product as on the box, or hand-built HTB) through one [`Scenario`].

use anyhow::Result;

use crate::reference::{self, ReferenceOptions};
use crate::shaper::Daemon;
use crate::{Line, Results, Scenario, Shaper, ShaperConfig, TempDir, Topology};

#[derive(Clone, Copy, Debug)]
pub struct LineProfile {
    pub name: &'static str,
    pub line: Line,
    /// The product's `line` preset matching the modem, if any.
    pub preset: Option<&'static str>,
    /// UDP payload of the video call's packets (50 pps each way).
    pub video_payload: usize,
}

pub const FTTC: LineProfile = LineProfile {
    name: "FTTC 40/10",
    line: Line::FTTC_40_10,
    preset: None,
    video_payload: 1000,
};
pub const ADSL12: LineProfile = LineProfile {
    name: "ADSL2+ 12/1 ATM",
    line: Line {
        down_bps: 12_000_000,
        up_bps: 1_000_000,
        buffer_ms: 600,
        atm_overhead: Some(10),
    },
    preset: Some("adsl2-pppoa"),
    // 50 pps x 300 B: a call an ADSL upload carries (160 kbit/s framed); the FTTC
    // call's 1000 B would be 47 % of a 1 Mbit/s ATM upload.
    video_payload: 300,
};
pub const ADSL8: LineProfile = LineProfile {
    name: "ADSL2+ 8/1 ATM",
    line: Line {
        down_bps: 8_000_000,
        up_bps: 1_000_000,
        buffer_ms: 600,
        atm_overhead: Some(10),
    },
    preset: Some("adsl2-pppoa"),
    // 50 pps x 300 B: a call an ADSL upload carries (160 kbit/s framed); the FTTC
    // call's 1000 B would be 47 % of a 1 Mbit/s ATM upload.
    video_payload: 300,
};

impl LineProfile {
    /// The GP-surgery policy for this line. On a 1 Mbit/s upload the classes' guarantees
    /// follow what the busy hour needs there: the ACKs of a 12 Mbit/s download are about
    /// 40 % of it in cells (two cells each, ~500 a second) and the call about 16 %, so
    /// video, acks and images get 25 % each and the default class 20 % (the FTTC policy's
    /// 10 % for video would hold the call below its rate behind the guarantees of the
    /// others, which HTB serves first).
    pub fn config(&self) -> ShaperConfig {
        let mut cfg = ShaperConfig::gp_surgery(&self.line);
        if self.line.up_bps <= 2_000_000 {
            for c in &mut cfg.classes {
                c.guaranteed_pct = match c.name.as_str() {
                    "default" => 20,
                    _ => 25,
                };
            }
        }
        cfg
    }

    /// [`Scenario::internet`] with this line's call.
    pub fn scenario(&self, secs: u64) -> Scenario {
        let mut s = Scenario::internet(secs);
        s.video.payload = self.video_payload;
        s
    }

    /// Bytes a 1500-byte IP packet takes on the line (what the modem counts).
    pub fn framed_mtu(&self) -> f64 {
        match self.line.atm_overhead {
            Some(o) => ((1500.0 + o as f64) / 48.0).ceil() * 53.0,
            // The lab's PTM stand-in counts Ethernet frames as the veth hands them.
            None => 1514.0,
        }
    }
    /// TCP payload per framed MTU (1448 bytes with timestamps) as a share of the line.
    pub fn goodput_share(&self) -> f64 {
        1448.0 / self.framed_mtu()
    }
    /// Time of one framed MTU at `bps`, ms.
    pub fn mtu_ms(&self, bps: u64) -> f64 {
        self.framed_mtu() * 8.0 / bps as f64 * 1e3
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Gw {
    Product,
    Htb(u64),
}

impl Gw {
    pub fn label(&self) -> String {
        match self {
            Gw::Product => "product".into(),
            Gw::Htb(p) => format!("HTB {p} %"),
        }
    }
}

pub struct CaseOut {
    pub gw: Gw,
    pub results: Results,
}

/// Runs `scenario` through `gw` on `topo` and takes the gateway down again. The product
/// gets `product_extra` lines at the top of its `[download]` section.
#[allow(clippy::too_many_arguments)]
pub fn run_case(
    topo: &Topology,
    shaper: &mut Shaper<'_>,
    dir: &TempDir,
    profile: &LineProfile,
    scenario: &Scenario,
    gw: Gw,
    product_pct: u64,
    product_extra: &[String],
) -> Result<Results> {
    let line = profile.line;
    let mut cfg = profile.config();
    match gw {
        Gw::Product => {
            cfg.download_bps = line.down_bps / 100 * product_pct;
            cfg.line = profile.preset.map(str::to_string);
            let mut text = cfg.to_toml();
            if !product_extra.is_empty() {
                let extra: String = product_extra.iter().map(|kv| format!("{kv}\n")).collect();
                text = text.replacen("[download]\n", &format!("[download]\n{extra}"), 1);
            }
            let path = dir.path().join("shaper.toml");
            std::fs::write(&path, text)?;
            let daemon = Daemon::start(
                shaper,
                &path,
                dir.path().join("daemon.log"),
                &std::env::var("SHAPER_LOG").unwrap_or_else(|_| "warn".into()),
            )?;
            let r = scenario.run(topo);
            let _ = daemon.stop();
            r
        }
        Gw::Htb(p) => {
            cfg.download_bps = line.down_bps / 100 * p;
            reference::apply_with(
                &topo.gw,
                &cfg,
                ReferenceOptions {
                    // `SHAPER_REF_ACK_PRIO=0`: without the small-TCP-packet filter.
                    ack_priority: std::env::var("SHAPER_REF_ACK_PRIO").as_deref() != Ok("0"),
                    leaf_queue_ms: Some(20),
                    atm_overhead: line.atm_overhead,
                    ..Default::default()
                },
            )?;
            let r = scenario.run(topo);
            let _ = reference::remove(&topo.gw, &cfg);
            r
        }
    }
}
