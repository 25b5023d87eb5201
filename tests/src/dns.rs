//! DNS traffic for the host-name tests: a DNS server that answers every query with as
//! many addresses as fit (what a LAN host's own server on the internet could send), a
//! paced flood of queries to it, and the scattered addresses such answers name. The
//! messages themselves (and QUIC-shaped Initials) are built by [`crate::packet`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::Netns;

// The builders live in the packet generator; their old paths here stay (the integration
// tests use `dns::query`, `dns::answer`, `dns::TYPE_A`, `dns::fake_quic_initial`).
pub use crate::packet::dns::{answer, query, TYPE_A, TYPE_AAAA};
pub use crate::packet::tls::fake_quic_initial;

use crate::packet::dns::answer_to;

/// The `i`th of 131,072 addresses scattered over 198.18.0.0/15 (benchmarking space: not
/// the lab's, as addresses from DNS are scattered, not one block).
pub fn scattered_v4(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(
        u32::from(Ipv4Addr::new(198, 18, 0, 0)) | (i.wrapping_mul(0x9e37_79b1) & 0x1_ffff),
    )
}

/// The `i`th address of 2001:db8:ff::/64 (documentation space), scattered.
pub fn scattered_v6(i: u32) -> Ipv6Addr {
    let mut o = [0u8; 16];
    o[..6].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0xff]);
    o[12..].copy_from_slice(&i.wrapping_mul(0x9e37_79b1).to_be_bytes());
    Ipv6Addr::from(o)
}

/// The most A records an answer to a short name carries in one 1,500-byte packet.
pub const A_PER_PACKET: usize = 88;

/// A DNS server in a namespace that answers every query with `per_answer` fresh
/// addresses (A or AAAA as asked) and `ttl`; stopped on drop.
pub struct Forger {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Answers sent so far.
    pub sent: Arc<AtomicU64>,
}

impl Forger {
    pub fn start(ns: &Netns, addr: SocketAddr, per_answer: usize, ttl: u32) -> Forger {
        let sock = ns
            .within(move || Ok(UdpSocket::bind(addr)?))
            .unwrap_or_else(|e| panic!("bind the forging server at {addr}: {e:#}"));
        crate::gateway::force_rcvbuf(&sock, 4 << 20);
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (s, n) = (stop.clone(), sent.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            let mut next = 0u32;
            while !s.load(Ordering::Relaxed) {
                let Ok((len, peer)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let q = &buf[..len];
                let v6 = q.len() > 4 && q[q.len() - 4..q.len() - 2] == TYPE_AAAA.to_be_bytes();
                let per = if v6 {
                    per_answer.min(A_PER_PACKET * 16 / 28)
                } else {
                    per_answer
                };
                let addrs: Vec<IpAddr> = (0..per as u32)
                    .map(|i| {
                        if v6 {
                            scattered_v6(next + i).into()
                        } else {
                            scattered_v4(next + i).into()
                        }
                    })
                    .collect();
                next = next.wrapping_add(per as u32);
                if let Some(a) = answer_to(q, &addrs, ttl) {
                    if sock.send_to(&a, peer).is_ok() {
                        n.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        Forger {
            stop,
            thread: Some(thread),
            sent,
        }
    }
}

impl Drop for Forger {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends `count` queries, `rate` a second, from `from` (an address of `ns`) to
/// `server`, each for a fresh name `q<n>.<suffix>` with a fresh id (A records), until
/// done or `stop`; answers are read and dropped. Returns the queries sent.
pub fn query_flood(
    ns: &Netns,
    from: IpAddr,
    server: SocketAddr,
    suffix: &str,
    rate: u32,
    count: u64,
    stop: Arc<AtomicBool>,
) -> JoinHandle<u64> {
    let sock = ns
        .within(move || Ok(UdpSocket::bind(SocketAddr::new(from, 0))?))
        .unwrap_or_else(|e| panic!("bind the query flood at {from}: {e:#}"));
    sock.set_nonblocking(true).expect("nonblocking");
    let suffix = suffix.to_string();
    std::thread::spawn(move || {
        let t0 = Instant::now();
        let gap = Duration::from_secs(1) / rate.max(1);
        let mut buf = [0u8; 1500];
        let mut sent = 0u64;
        while sent < count && !stop.load(Ordering::Relaxed) {
            let due = gap * sent as u32;
            let now = t0.elapsed();
            if due > now {
                std::thread::sleep(due - now);
            }
            let id = (sent as u16).wrapping_mul(40_503) ^ 0x5a5a;
            let q = query(id, &format!("q{sent}.{suffix}"), TYPE_A);
            let _ = sock.send_to(&q, server);
            sent += 1;
            while sock.recv_from(&mut buf).is_ok() {}
        }
        sent
    })
}
