//! An unresponsive UDP flood srv -> lan (a misbehaving download that ignores loss), and the
//! class it belongs in.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::topology::LAN_HOST_V4;
use crate::{Class, Rule, ShaperConfig, Topology};

/// UDP port of the flood (both ends); [`with_bulk_class`] puts it in the `bulk` class.
pub const FLOOD_PORT: u16 = 5300;
pub const FLOOD_PAYLOAD: usize = 1472;

/// `cfg` plus a `bulk` class (priority 7, guaranteed 5 %, ceiling 50 %) and a rule putting
/// the flood (UDP to [`FLOOD_PORT`]) in it.
pub fn with_bulk_class(mut cfg: ShaperConfig) -> ShaperConfig {
    cfg.classes.push(Class {
        name: "bulk".into(),
        priority: 7,
        guaranteed_pct: 5,
        ceiling_pct: 50,
        default: false,
    });
    cfg.rules.push(Rule {
        name: "flood".into(),
        class: "bulk".into(),
        protocol: Some("udp".into()),
        dst_ports: vec![FLOOD_PORT.to_string()],
        ..Default::default()
    });
    cfg
}

/// Paced unresponsive UDP from srv:FLOOD_PORT to lan:FLOOD_PORT at `bps` (IP bytes).
pub fn start_flood(
    topo: &Topology,
    bps: u64,
    len: Duration,
    stop: Arc<AtomicBool>,
) -> Result<(
    std::thread::JoinHandle<u64>,
    std::thread::JoinHandle<u64>,
    Instant,
)> {
    let rx = topo.lan.within(|| {
        let s = UdpSocket::bind(SocketAddr::new(LAN_HOST_V4.into(), FLOOD_PORT))?;
        s.set_read_timeout(Some(Duration::from_millis(50)))?;
        Ok(s)
    })?;
    crate::gateway::force_rcvbuf(&rx, 8 << 20);
    let tx = topo.srv.within(|| {
        let s = UdpSocket::bind(("0.0.0.0", FLOOD_PORT))?;
        s.connect(SocketAddr::new(LAN_HOST_V4.into(), FLOOD_PORT))?;
        Ok(s)
    })?;
    let stop_rx = stop.clone();
    let receiver = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let mut n = 0u64;
        loop {
            if stop_rx.load(Ordering::Relaxed) {
                return n;
            }
            if rx.recv(&mut buf).is_ok() {
                n += 1;
            }
        }
    });
    let interval_ns = (FLOOD_PAYLOAD as u64 + 28) * 8 * 1_000_000_000 / bps;
    let t0 = Instant::now();
    let sender = std::thread::spawn(move || {
        let pkt = [0x5au8; FLOOD_PAYLOAD];
        let mut sent = 0u64;
        while !stop.load(Ordering::Relaxed) && t0.elapsed() < len {
            let due = Duration::from_nanos(sent * interval_ns);
            let now = t0.elapsed();
            if due > now {
                std::thread::sleep(due - now);
            }
            // An error (ENOBUFS, ECONNREFUSED after an ICMP error) counts as sent and lost.
            let _ = tx.send(&pkt);
            sent += 1;
        }
        sent
    });
    Ok((sender, receiver, t0))
}
