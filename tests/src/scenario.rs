//! `Scenario`: the clinic's busy hour in miniature. Bulk TCP both ways and a DICOM-like image
//! upload start first; once the queues have filled, a video call runs in both directions.

use std::fmt;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::churn::{Churn, ChurnStats};
use crate::iperf::{IperfClient, IperfServer};
use crate::topology::Topology;
use crate::util::fmt_bps;
use crate::video::{DelayStats, VideoCall};

/// What runs, for how long, on which ports.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Total length of the busy period (bulk traffic runs this long).
    pub duration: Duration,
    /// The download transfers start this long before the uploads (Windows updates are
    /// already downloading when a study upload starts). Without it, an unshaped line can
    /// starve the downloads' ACKs behind the upload's bloat from the first second and the
    /// no-shaper baseline swings between runs.
    pub stagger: Duration,
    /// Bulk traffic alone before anything is measured (queues fill), after the stagger.
    pub warmup: Duration,
    /// The video call stops this long before the bulk traffic does, so every measured
    /// video packet crossed a loaded line.
    pub tail: Duration,
    /// Video keeps being received this long after its last packet was sent.
    pub drain: Duration,
    pub bulk_streams: u32,
    /// TCP window of the bulk and image transfers (iperf3 `-w`). The lab has no base
    /// round-trip time (this kernel has no netem), so receive-window autotuning would keep
    /// windows at a few hundred kB and the unshaped download's bloat would come and go from
    /// run to run; hosts on a real 20-40 ms path open their windows to this size and more.
    pub window: Option<String>,
    pub bulk_up_port: u16,
    pub bulk_down_port: u16,
    /// Image upload (one TCP stream to this port, DICOM's 104), or `None` for no image.
    pub image_port: Option<u16>,
    pub video: VideoCall,
    /// Use IPv6 addresses for everything.
    pub v6: bool,
    /// TCP congestion control of the bulk and image transfers (`iperf3 -C`, set per socket
    /// on both ends), e.g. "cubic" or "bbr"; `None` leaves the namespaces' default, which is
    /// inherited from the host (`net.ipv4.tcp_congestion_control`).
    pub congestion: Option<String>,
    /// Web-like short transfers (downloads) beside the long ones, for the whole busy
    /// period; `None`: none.
    pub churn: Option<Churn>,
    /// Measure the video call alone on the idle line for this long first (the reference
    /// the busy figures are compared with, in the same run).
    pub idle: Option<Duration>,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            duration: Duration::from_secs(15),
            stagger: Duration::from_secs(2),
            warmup: Duration::from_secs(2),
            tail: Duration::from_secs(1),
            drain: Duration::from_millis(1500),
            bulk_streams: 4,
            window: Some("1M".into()),
            bulk_up_port: 5201,
            bulk_down_port: 5202,
            image_port: Some(104),
            video: VideoCall::default(),
            v6: false,
            congestion: None,
            churn: None,
            idle: None,
        }
    }
}

/// Figures of one scenario run. Rates are goodput at the receiver in bits/s.
#[derive(Clone, Debug, Default)]
pub struct Results {
    pub video_up: DelayStats,
    pub video_down: DelayStats,
    pub image_up_bps: f64,
    pub bulk_up_bps: f64,
    pub bulk_down_bps: f64,
    /// Bulk + image + video goodput, upload.
    pub total_up_bps: f64,
    /// Bulk + video goodput, download.
    pub total_down_bps: f64,
    /// What the modem put on the line while video was measured (all traffic, Ethernet
    /// frames as the line emulation counts them), bits/s.
    pub line_up_bps: f64,
    pub line_down_bps: f64,
    /// The video alone on the idle line (with [`Scenario::idle`]): (up, down).
    pub video_idle: Option<(DelayStats, DelayStats)>,
    /// The churn's transfers (with [`Scenario::churn`]).
    pub churn: Option<ChurnStats>,
}

impl Scenario {
    /// A scenario of `secs` seconds with everything else at its default.
    pub fn of_secs(secs: u64) -> Self {
        Scenario {
            duration: Duration::from_secs(secs),
            ..Default::default()
        }
    }

    /// Traffic as the internet has it: autotuned TCP windows (no `-w`), every long
    /// transfer starting at once, web-like churn beside them, and the video measured on
    /// the idle line first. Meant for a topology with a base RTT (a delay line).
    pub fn internet(secs: u64) -> Self {
        Scenario {
            duration: Duration::from_secs(secs),
            stagger: Duration::ZERO,
            window: None,
            churn: Some(Churn::default()),
            idle: Some(Duration::from_secs(3)),
            ..Default::default()
        }
    }

    /// Runs everything at once on `topo` and returns the figures. Servers are started for
    /// this run and stopped at its end, so runs are independent.
    pub fn run(&self, topo: &Topology) -> Result<Results> {
        let total = self.duration.as_secs();
        let warm = self.warmup.as_secs();
        anyhow::ensure!(
            self.duration > self.stagger + self.warmup + self.tail + Duration::from_secs(1),
            "scenario duration {:?} too short for stagger {:?} + warmup {:?} + tail {:?}",
            self.duration,
            self.stagger,
            self.warmup,
            self.tail
        );
        let srv_ip = topo.srv_addr(self.v6);
        let mut video = self.video.clone();
        video.v6 = self.v6;
        let video_idle = match self.idle {
            Some(len) => {
                let call = video
                    .start(&topo.lan, &topo.srv, len)
                    .context("starting the idle-line video call")?;
                Some(call.finish(self.drain.min(Duration::from_millis(500)))?)
            }
            None => None,
        };

        let _bulk_up_srv = IperfServer::start(&topo.srv, self.bulk_up_port)?;
        let _bulk_down_srv = IperfServer::start(&topo.srv, self.bulk_down_port)?;
        let _image_srv = match self.image_port {
            Some(p) => Some(IperfServer::start(&topo.srv, p)?),
            None => None,
        };

        // Each client runs its unmeasured seconds (-O) plus the measured rest (-t). The
        // download starts `stagger` earlier and so omits that much more.
        let stagger = self.stagger.as_secs();
        let client = |port: u16, streams: u32, reverse: bool, omit: u64| IperfClient {
            server: srv_ip,
            port,
            streams,
            reverse,
            seconds: total - warm - stagger,
            omit,
            window: self.window.clone(),
        };
        let bulk_up = client(self.bulk_up_port, self.bulk_streams, false, warm);
        let bulk_down = client(self.bulk_down_port, self.bulk_streams, true, warm + stagger);
        let image = self.image_port.map(|p| client(p, 1, false, warm));

        let spawn = |c: &IperfClient| -> Result<std::process::Child> {
            match &self.congestion {
                None => c.spawn(&topo.lan),
                Some(cc) => {
                    let mut args = c.args();
                    args.extend(["-C".to_string(), cc.clone()]);
                    let mut cmd = topo.lan.cmd("iperf3", &args);
                    cmd.stdin(std::process::Stdio::null())
                        .stdout(std::process::Stdio::piped())
                        .stderr(std::process::Stdio::piped());
                    cmd.spawn().context("starting iperf3 client in lan")
                }
            }
        };
        let churn = match &self.churn {
            Some(c) => {
                let c = Churn {
                    cc: c.cc.clone().or_else(|| self.congestion.clone()),
                    ..c.clone()
                };
                Some(c.start(&topo.lan, &topo.srv, srv_ip)?)
            }
            None => None,
        };
        let down_child = spawn(&bulk_down)?;
        std::thread::sleep(self.stagger);
        let up_child = spawn(&bulk_up)?;
        let image_child = match &image {
            Some(c) => Some(spawn(c)?),
            None => None,
        };

        std::thread::sleep(self.warmup);
        let video_len = self.duration - self.stagger - self.warmup - self.tail;
        let line_before = topo.line_bytes()?;
        let t0 = std::time::Instant::now();
        let call = video
            .start(&topo.lan, &topo.srv, video_len)
            .context("starting the video call")?;
        // The line is measured over the call's sending time (bulk still runs then).
        let (calls, line_after, secs) = std::thread::scope(|s| {
            let sampler = s.spawn(|| {
                std::thread::sleep(video_len);
                (topo.line_bytes(), t0.elapsed().as_secs_f64())
            });
            let calls = call.finish(self.drain);
            let (bytes, secs) = sampler
                .join()
                .unwrap_or_else(|_| (Err(anyhow::anyhow!("line sampler panicked")), 1.0));
            (calls, bytes, secs)
        });
        let (video_up, video_down) = calls.context("video call")?;
        let line_after = line_after?;
        let line_up_bps = (line_after.0 - line_before.0) as f64 * 8.0 / secs;
        let line_down_bps = (line_after.1 - line_before.1) as f64 * 8.0 / secs;

        // Collect every client before failing on any of them.
        let churn = churn.map(|c| c.finish(Duration::from_secs(5)));
        let up = bulk_up.finish(up_child);
        let down = bulk_down.finish(down_child);
        let img = match (image, image_child) {
            (Some(c), Some(child)) => Some(c.finish(child)),
            _ => None,
        };
        let bulk_up_bps = up.context("bulk upload")?.receiver_bps;
        let bulk_down_bps = down.context("bulk download")?.receiver_bps;
        let image_up_bps = match img {
            Some(r) => r.context("image upload")?.receiver_bps,
            None => 0.0,
        };

        let video_bps = |s: &DelayStats| {
            s.received as f64 * video.payload as f64 * 8.0 / video_len.as_secs_f64()
        };
        Ok(Results {
            total_up_bps: bulk_up_bps + image_up_bps + video_bps(&video_up),
            total_down_bps: bulk_down_bps + video_bps(&video_down),
            video_up,
            video_down,
            image_up_bps,
            bulk_up_bps,
            bulk_down_bps,
            line_up_bps,
            line_down_bps,
            video_idle,
            churn: churn.transpose().context("churn")?,
        })
    }
}

/// A side-by-side table of several runs (one column per phase).
pub fn table(phases: &[(&str, &Results)]) -> String {
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    let mut row = |label: &str, f: &dyn Fn(&Results) -> String| {
        rows.push((
            label.to_string(),
            phases.iter().map(|(_, r)| f(r)).collect(),
        ));
    };
    for (dir, pick) in [
        (
            "up",
            (|r: &Results| r.video_up.clone()) as fn(&Results) -> DelayStats,
        ),
        ("down", |r: &Results| r.video_down.clone()),
    ] {
        row(&format!("video {dir} p50"), &|r| {
            format!("{:.1} ms", pick(r).p50_ms)
        });
        row(&format!("video {dir} p99"), &|r| {
            format!("{:.1} ms", pick(r).p99_ms)
        });
        row(&format!("video {dir} max"), &|r| {
            format!("{:.1} ms", pick(r).max_ms)
        });
        row(&format!("video {dir} recv/sent"), &|r| {
            format!("{}/{}", pick(r).received, pick(r).sent)
        });
        row(&format!("video {dir} loss"), &|r| {
            format!("{:.2} %", pick(r).loss_pct)
        });
    }
    row("image up", &|r| fmt_bps(r.image_up_bps));
    row("bulk up", &|r| fmt_bps(r.bulk_up_bps));
    row("bulk down", &|r| fmt_bps(r.bulk_down_bps));
    row("total up", &|r| fmt_bps(r.total_up_bps));
    row("total down", &|r| fmt_bps(r.total_down_bps));
    row("line used up", &|r| fmt_bps(r.line_up_bps));
    row("line used down", &|r| fmt_bps(r.line_down_bps));

    let label_w = rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
    let col_w: Vec<usize> = phases
        .iter()
        .enumerate()
        .map(|(i, (name, _))| {
            rows.iter()
                .map(|(_, v)| v[i].len())
                .max()
                .unwrap_or(0)
                .max(name.len())
        })
        .collect();
    let mut out = format!("{:label_w$}", "");
    for (i, (name, _)) in phases.iter().enumerate() {
        out.push_str(&format!(" | {:>w$}", name, w = col_w[i]));
    }
    out.push('\n');
    out.push_str(&"-".repeat(out.len().saturating_sub(1)));
    out.push('\n');
    for (label, vals) in &rows {
        out.push_str(&format!("{label:label_w$}"));
        for (i, v) in vals.iter().enumerate() {
            out.push_str(&format!(" | {:>w$}", v, w = col_w[i]));
        }
        out.push('\n');
    }
    out
}

impl fmt::Display for Results {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&table(&[("result", self)]))
    }
}
