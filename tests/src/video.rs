//! A video-call-like UDP flow in each direction between the lan host and the server: fixed
//! size packets at a fixed rate, each carrying a sequence number and a CLOCK_MONOTONIC send
//! time (one clock for all namespaces on the host), so the receiver measures one-way delay
//! and loss.
//!
//! Like a real call, both directions use the same 5-tuple: the lan socket is bound to
//! `lan_port` and connected to `srv:srv_port`, and vice versa. Sockets are created by a thread
//! that entered the namespace; the sockets then stay in that namespace whatever thread uses
//! them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::netns::Netns;
use crate::stats;
use crate::topology::{LAN_HOST_V4, LAN_HOST_V6, SRV_V4, SRV_V6};
use crate::util::monotonic_ns;

const MAGIC: u32 = 0x5348_5056; // "SHPV"
const HEADER: usize = 4 + 8 + 8;

/// One-way delay and loss of one direction of a flow.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DelayStats {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub sent: u64,
    pub received: u64,
    pub loss_pct: f64,
}

impl DelayStats {
    /// Nearest-rank percentiles over the delays of the packets that arrived (duplicates
    /// already removed by the caller).
    pub fn from_delays(sent: u64, mut delays_ms: Vec<f64>) -> Self {
        stats::sort(&mut delays_ms);
        let pct = |p: f64| stats::nearest_rank(&delays_ms, p).unwrap_or(f64::NAN);
        let received = delays_ms.len() as u64;
        DelayStats {
            p50_ms: pct(50.0),
            p99_ms: pct(99.0),
            max_ms: delays_ms.last().copied().unwrap_or(f64::NAN),
            sent,
            received,
            loss_pct: if sent == 0 {
                0.0
            } else {
                100.0 * sent.saturating_sub(received) as f64 / sent as f64
            },
        }
    }
}

/// The flow's shape and ports.
#[derive(Clone, Debug)]
pub struct VideoCall {
    /// UDP port on the lan host (source of the upload direction).
    pub lan_port: u16,
    /// UDP port on the server (destination of the upload direction); a shaper rule's
    /// `dst_ports` (internet side) must cover this one.
    pub srv_port: u16,
    pub pps: u32,
    /// UDP payload bytes per packet (>= 20).
    pub payload: usize,
    pub v6: bool,
}

impl Default for VideoCall {
    /// Teams-like video: 1000-byte packets at 50 pps, UDP 50020 <-> 50020.
    fn default() -> Self {
        VideoCall {
            lan_port: 50020,
            srv_port: 50020,
            pps: 50,
            payload: 1000,
            v6: false,
        }
    }
}

type Arrivals = Vec<(u64, f64)>;

/// A call in progress; see [`RunningCall::finish`].
pub struct RunningCall {
    stop: Arc<AtomicBool>,
    up_tx: JoinHandle<Result<u64>>,
    down_tx: JoinHandle<Result<u64>>,
    up_rx: JoinHandle<Result<Arrivals>>,
    down_rx: JoinHandle<Result<Arrivals>>,
    pub duration: Duration,
}

impl VideoCall {
    /// Payload bits/s of one direction.
    pub fn bits_per_second(&self) -> f64 {
        self.payload as f64 * 8.0 * self.pps as f64
    }

    /// Opens both sockets and starts sending in both directions for `duration`.
    pub fn start(&self, lan: &Netns, srv: &Netns, duration: Duration) -> Result<RunningCall> {
        if self.payload < HEADER {
            bail!("video payload must be at least {HEADER} bytes");
        }
        let (lan_ip, srv_ip, any): (IpAddr, IpAddr, IpAddr) = if self.v6 {
            (
                LAN_HOST_V6.into(),
                SRV_V6.into(),
                Ipv6Addr::UNSPECIFIED.into(),
            )
        } else {
            (
                LAN_HOST_V4.into(),
                SRV_V4.into(),
                Ipv4Addr::UNSPECIFIED.into(),
            )
        };
        let bind = |ns: &Netns, port: u16| -> Result<UdpSocket> {
            let addr = SocketAddr::new(any, port);
            ns.within(move || UdpSocket::bind(addr).with_context(|| format!("binding udp {addr}")))
        };
        let lan_sock = bind(lan, self.lan_port)?;
        let srv_sock = bind(srv, self.srv_port)?;
        lan_sock.connect(SocketAddr::new(srv_ip, self.srv_port))?;
        srv_sock.connect(SocketAddr::new(lan_ip, self.lan_port))?;
        for s in [&lan_sock, &srv_sock] {
            s.set_read_timeout(Some(Duration::from_millis(50)))?;
        }

        let stop = Arc::new(AtomicBool::new(false));
        let count = (duration.as_secs_f64() * self.pps as f64).round() as u64;
        let interval_ns = 1_000_000_000 / self.pps.max(1) as u64;
        let start_ns = monotonic_ns() + 20_000_000;

        let up_rx = spawn_receiver("video-up-rx", srv_sock.try_clone()?, stop.clone());
        let down_rx = spawn_receiver("video-down-rx", lan_sock.try_clone()?, stop.clone());
        let up_tx = spawn_sender(
            "video-up-tx",
            lan_sock,
            count,
            start_ns,
            interval_ns,
            self.payload,
        );
        let down_tx = spawn_sender(
            "video-down-tx",
            srv_sock,
            count,
            start_ns,
            interval_ns,
            self.payload,
        );
        Ok(RunningCall {
            stop,
            up_tx,
            down_tx,
            up_rx,
            down_rx,
            duration,
        })
    }
}

impl RunningCall {
    /// Waits for the senders, keeps receiving for `drain` (longer than the worst queue),
    /// then returns (upload, download) statistics.
    pub fn finish(self, drain: Duration) -> Result<(DelayStats, DelayStats)> {
        let join = |h: JoinHandle<Result<u64>>| -> Result<u64> {
            h.join()
                .map_err(|_| anyhow::anyhow!("video sender panicked"))?
        };
        let sent_up = join(self.up_tx);
        let sent_down = join(self.down_tx);
        std::thread::sleep(drain);
        self.stop.store(true, Ordering::SeqCst);
        let join_rx = |h: JoinHandle<Result<Arrivals>>| -> Result<Arrivals> {
            h.join()
                .map_err(|_| anyhow::anyhow!("video receiver panicked"))?
        };
        let up = join_rx(self.up_rx)?;
        let down = join_rx(self.down_rx)?;
        Ok((stats(sent_up?, up), stats(sent_down?, down)))
    }
}

fn stats(sent: u64, arrivals: Arrivals) -> DelayStats {
    let mut seen = vec![false; sent as usize];
    let mut delays = Vec::with_capacity(arrivals.len());
    for (seq, d) in arrivals {
        if let Some(s) = seen.get_mut(seq as usize) {
            if !*s {
                *s = true;
                delays.push(d);
            }
        }
    }
    DelayStats::from_delays(sent, delays)
}

fn spawn_sender(
    name: &str,
    sock: UdpSocket,
    count: u64,
    start_ns: u64,
    interval_ns: u64,
    payload: usize,
) -> JoinHandle<Result<u64>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let mut buf = vec![0u8; payload];
            buf[..4].copy_from_slice(&MAGIC.to_be_bytes());
            for seq in 0..count {
                let due = start_ns + seq * interval_ns;
                let now = monotonic_ns();
                if due > now {
                    std::thread::sleep(Duration::from_nanos(due - now));
                }
                buf[4..12].copy_from_slice(&seq.to_be_bytes());
                buf[12..20].copy_from_slice(&monotonic_ns().to_be_bytes());
                // A send error (e.g. ECONNREFUSED after an ICMP error) is a lost packet.
                let _ = sock.send(&buf);
            }
            Ok(count)
        })
        .expect("spawning video sender")
}

fn spawn_receiver(
    name: &str,
    sock: UdpSocket,
    stop: Arc<AtomicBool>,
) -> JoinHandle<Result<Arrivals>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let mut buf = vec![0u8; 65536];
            let mut arrivals = Vec::new();
            loop {
                match sock.recv(&mut buf) {
                    Ok(n) if n >= HEADER => {
                        let now = monotonic_ns();
                        let word = |r: std::ops::Range<usize>| {
                            let mut b = [0u8; 8];
                            b.copy_from_slice(&buf[r]);
                            u64::from_be_bytes(b)
                        };
                        if u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) != MAGIC {
                            continue;
                        }
                        let seq = word(4..12);
                        let sent = word(12..20);
                        arrivals.push((seq, now.saturating_sub(sent) as f64 / 1e6));
                    }
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock
                                | std::io::ErrorKind::TimedOut
                                | std::io::ErrorKind::ConnectionRefused
                                // A signal to the process (a child exiting) is no error.
                                | std::io::ErrorKind::Interrupted
                        ) =>
                    {
                        if stop.load(Ordering::SeqCst) {
                            return Ok(arrivals);
                        }
                    }
                    Err(e) => return Err(e).context("video receiver"),
                }
            }
        })
        .expect("spawning video receiver")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_loss() {
        let delays: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = DelayStats::from_delays(200, delays);
        assert_eq!(s.p50_ms, 50.0);
        assert_eq!(s.p99_ms, 99.0);
        assert_eq!(s.max_ms, 100.0);
        assert_eq!(s.received, 100);
        assert_eq!(s.loss_pct, 50.0);
    }

    #[test]
    fn duplicates_count_once() {
        let s = stats(3, vec![(0, 1.0), (0, 5.0), (2, 2.0), (7, 9.0)]);
        assert_eq!(s.received, 2);
        assert_eq!(s.max_ms, 2.0);
    }
}
