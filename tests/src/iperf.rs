//! iperf3 servers and clients run in namespaces, with `--json` output parsed.

use std::net::IpAddr;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::netns::Netns;

/// An iperf3 server (`iperf3 -s -p PORT`) in a namespace; stopped on drop.
pub struct IperfServer<'a> {
    ns: &'a Netns,
    pid: u32,
    pub port: u16,
}

impl<'a> IperfServer<'a> {
    /// Starts the server and waits until it listens.
    pub fn start(ns: &'a Netns, port: u16) -> Result<Self> {
        let pid = ns.spawn("iperf3", &["-s", "-p", &port.to_string()])?;
        let server = IperfServer { ns, pid, port };
        wait_listening(ns, port, Duration::from_secs(5))?;
        Ok(server)
    }
}

impl Drop for IperfServer<'_> {
    fn drop(&mut self) {
        self.ns.kill(self.pid);
    }
}

/// Polls `ss` in the namespace until something listens on TCP `port`.
pub fn wait_listening(ns: &Netns, port: u16, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        let out = ns.run("ss", &["-H", "-l", "-t", "-n"])?;
        let suffix = format!(":{port}");
        if out
            .lines()
            .filter_map(|l| l.split_whitespace().nth(3))
            .any(|local| local.ends_with(&suffix))
        {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!(
                "nothing listens on tcp port {port} in {} after {timeout:?}",
                ns.name()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One iperf3 client run.
#[derive(Clone, Debug)]
pub struct IperfClient {
    pub server: IpAddr,
    pub port: u16,
    pub streams: u32,
    /// `-R`: the server sends (download from the lan's point of view).
    pub reverse: bool,
    /// Measured seconds (`-t`).
    pub seconds: u64,
    /// Seconds at the start left out of the figures (`-O`), run in addition to `seconds`.
    pub omit: u64,
    /// Socket buffer / TCP window (`-w`), e.g. "1M"; `None` leaves autotuning on.
    pub window: Option<String>,
}

impl IperfClient {
    pub fn args(&self) -> Vec<String> {
        let mut a = vec![
            "-c".to_string(),
            self.server.to_string(),
            "-p".into(),
            self.port.to_string(),
            "-P".into(),
            self.streams.to_string(),
            "-t".into(),
            self.seconds.to_string(),
            "-O".into(),
            self.omit.to_string(),
            "--connect-timeout".into(),
            "3000".into(),
            "--json".into(),
        ];
        if self.reverse {
            a.push("-R".into());
        }
        if let Some(w) = &self.window {
            a.push("-w".into());
            a.push(w.clone());
        }
        a
    }

    /// Starts the client in `ns` with stdout captured; finish with [`IperfClient::finish`].
    pub fn spawn(&self, ns: &Netns) -> Result<Child> {
        let mut cmd = ns.cmd("iperf3", &self.args());
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.spawn()
            .with_context(|| format!("starting iperf3 client in {}", ns.name()))
    }

    /// Waits for a spawned client and parses its report.
    pub fn finish(&self, child: Child) -> Result<IperfReport> {
        let out = child.wait_with_output().context("waiting for iperf3")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let report = IperfReport::parse(&stdout).with_context(|| {
            format!(
                "iperf3 -p {} ({}) exited {}; stderr: {}",
                self.port,
                if self.reverse { "download" } else { "upload" },
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })?;
        Ok(report)
    }
}

/// What the harness takes from an iperf3 `--json` report.
#[derive(Clone, Debug)]
pub struct IperfReport {
    /// Goodput at the receiving end, bits/s (`end.sum_received.bits_per_second`).
    pub receiver_bps: f64,
    /// `end.sum_sent.bits_per_second`.
    pub sender_bps: f64,
    /// TCP retransmissions of the sender, when iperf3 knows them.
    pub retransmits: Option<u64>,
    pub json: Value,
}

impl IperfReport {
    pub fn parse(text: &str) -> Result<Self> {
        let json: Value = serde_json::from_str(text).context("iperf3 output is not JSON")?;
        if let Some(err) = json.get("error").and_then(Value::as_str) {
            bail!("iperf3 reported: {err}");
        }
        let end = &json["end"];
        let receiver_bps = end["sum_received"]["bits_per_second"]
            .as_f64()
            .context("iperf3 JSON has no end.sum_received.bits_per_second")?;
        let sender_bps = end["sum_sent"]["bits_per_second"].as_f64().unwrap_or(0.0);
        let retransmits = end["sum_sent"]["retransmits"].as_u64();
        Ok(IperfReport {
            receiver_bps,
            sender_bps,
            retransmits,
            json,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_receiver_goodput() {
        let text = r#"{"start":{},"intervals":[],"end":{
            "sum_sent":{"bits_per_second":9.5e6,"retransmits":12},
            "sum_received":{"bits_per_second":9.1e6}}}"#;
        let r = IperfReport::parse(text).expect("parses");
        assert_eq!(r.receiver_bps, 9.1e6);
        assert_eq!(r.retransmits, Some(12));
    }

    #[test]
    fn reports_iperf_errors() {
        let text = r#"{"start":{},"intervals":[],"end":{},"error":"unable to connect to server: Connection refused"}"#;
        let e = IperfReport::parse(text).expect_err("error");
        assert!(format!("{e:#}").contains("Connection refused"));
    }
}
