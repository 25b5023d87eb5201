//! Web-like churn: short TCP downloads that come and go beside the long transfers.
//!
//! The server (in the srv namespace) answers each connection with as many bytes as the
//! client asked for in its first 8 bytes, then closes. The client (in the lan namespace)
//! opens transfers as a Poisson process (`per_sec` a second on average) with heavy-tailed
//! sizes: Pareto with shape `alpha` and minimum `min_bytes`, capped at `max_bytes` (web
//! objects and pages: most are small, a few are large). Every transfer runs on its own
//! thread, with at most `max_open` at once (a browser's connection limits); an arrival that
//! finds them all busy is counted as skipped, not queued, so a slow line does not build a
//! backlog of transfers that outlives the run.
//!
//! Both ends set the socket's congestion control (`TCP_CONGESTION`) when `cc` is given, as
//! `iperf3 -C` does for the long transfers; the server is the sender that matters.
//!
//! The figures are flow completion times: what a person browsing feels, and what a sender
//! control that "must not hurt flows that behave" must leave alone.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::netns::Netns;
use crate::rng::Rng;

/// The churn's shape.
#[derive(Clone, Debug)]
pub struct Churn {
    /// TCP port the server listens on (a rule may put it in a class; the example
    /// config's web traffic falls in the default class).
    pub port: u16,
    /// Mean transfers started per second.
    pub per_sec: f64,
    /// Pareto shape of the transfer sizes (1 < alpha: finite mean).
    pub alpha: f64,
    pub min_bytes: u64,
    pub max_bytes: u64,
    /// Most transfers open at once.
    pub max_open: u32,
    /// Congestion control of both ends (`TCP_CONGESTION`), or the namespace default.
    pub cc: Option<String>,
    /// RNG seed, so runs of one row draw the same sizes and gaps.
    pub seed: u64,
}

impl Default for Churn {
    /// Five transfers a second, Pareto(1.3) sizes from 10 kB capped at 4 MB (mean about
    /// 40 kB): about 1.6 Mbit/s on average, arriving in bursts.
    fn default() -> Self {
        Churn {
            port: 8080,
            per_sec: 5.0,
            alpha: 1.3,
            min_bytes: 10_000,
            max_bytes: 4_000_000,
            max_open: 16,
            cc: None,
            seed: 0x5eed_c0de,
        }
    }
}

/// Completed transfers of one run.
#[derive(Clone, Debug, Default)]
pub struct ChurnStats {
    pub started: u32,
    pub completed: u32,
    /// Arrivals dropped because `max_open` transfers were already running.
    pub skipped: u32,
    pub failed: u32,
    pub bytes: u64,
    /// Flow completion times (connect to last byte), ms, of transfers under 100 kB.
    pub small_fct_ms: Vec<f64>,
    /// The same for transfers of 100 kB and more.
    pub large_fct_ms: Vec<f64>,
}

fn set_cc(fd: i32, cc: &str) -> Result<()> {
    // SAFETY: setsockopt with a valid fd and a buffer of the given length.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            cc.as_ptr().cast(),
            cc.len() as libc::socklen_t,
        )
    };
    if rc != 0 {
        anyhow::bail!(
            "setsockopt(TCP_CONGESTION, {cc}): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// A running churn; [`RunningChurn::finish`] stops it and returns the figures.
pub struct RunningChurn {
    stop: Arc<AtomicBool>,
    server: Option<JoinHandle<Result<()>>>,
    client: Option<JoinHandle<Result<()>>>,
    stats: Arc<Mutex<ChurnStats>>,
    open: Arc<AtomicU32>,
}

impl Churn {
    /// Starts the server in `srv` (listening on every address of `port`) and the client
    /// in `lan`, fetching from `server`.
    pub fn start(&self, lan: &Netns, srv: &Netns, server: IpAddr) -> Result<RunningChurn> {
        let stop = Arc::new(AtomicBool::new(false));
        let any: IpAddr = if server.is_ipv6() {
            std::net::Ipv6Addr::UNSPECIFIED.into()
        } else {
            std::net::Ipv4Addr::UNSPECIFIED.into()
        };
        let port = self.port;
        let listener = srv.within(move || Ok(TcpListener::bind(SocketAddr::new(any, port))?))?;
        listener.set_nonblocking(true)?;
        let server_thread = {
            let stop = stop.clone();
            let cc = self.cc.clone();
            std::thread::Builder::new()
                .name("churn-srv".into())
                .spawn(move || serve(listener, cc, &stop))
                .context("spawning the churn server")?
        };
        let stats = Arc::new(Mutex::new(ChurnStats::default()));
        let open = Arc::new(AtomicU32::new(0));
        let client_thread = {
            let me = self.clone();
            let stop = stop.clone();
            let stats = stats.clone();
            let open = open.clone();
            lan.spawn_thread(move || {
                me.client(SocketAddr::new(server, port), &stop, &stats, &open);
                Ok(())
            })
        };
        Ok(RunningChurn {
            stop,
            server: Some(server_thread),
            client: Some(client_thread),
            stats,
            open,
        })
    }

    /// Runs in the lan namespace (transfer threads it spawns inherit it).
    fn client(
        &self,
        to: SocketAddr,
        stop: &AtomicBool,
        stats: &Arc<Mutex<ChurnStats>>,
        open: &Arc<AtomicU32>,
    ) {
        let mut rng = Rng::new(self.seed);
        let mut next = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            next += Duration::from_secs_f64(rng.exp(1.0 / self.per_sec));
            let size = (rng.pareto(self.alpha, self.min_bytes as f64) as u64).min(self.max_bytes);
            while Instant::now() < next {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep((next - Instant::now()).min(Duration::from_millis(50)));
            }
            if open.load(Ordering::Relaxed) >= self.max_open {
                stats.lock().unwrap_or_else(|e| e.into_inner()).skipped += 1;
                continue;
            }
            open.fetch_add(1, Ordering::Relaxed);
            stats.lock().unwrap_or_else(|e| e.into_inner()).started += 1;
            let (stats2, open2, cc) = (stats.clone(), open.clone(), self.cc.clone());
            // A thread spawned here starts in this thread's namespace (setns is per
            // thread, inherited by threads it creates).
            let spawned = std::thread::Builder::new()
                .name("churn-get".into())
                .spawn(move || {
                    let t0 = Instant::now();
                    let r = fetch(to, size, cc.as_deref());
                    let ms = t0.elapsed().as_secs_f64() * 1e3;
                    let mut s = stats2.lock().unwrap_or_else(|e| e.into_inner());
                    match r {
                        Ok(n) if n == size => {
                            s.completed += 1;
                            s.bytes += n;
                            if size < 100_000 {
                                s.small_fct_ms.push(ms);
                            } else {
                                s.large_fct_ms.push(ms);
                            }
                        }
                        _ => s.failed += 1,
                    }
                    drop(s);
                    open2.fetch_sub(1, Ordering::Relaxed);
                });
            if spawned.is_err() {
                open.fetch_sub(1, Ordering::Relaxed);
                stats.lock().unwrap_or_else(|e| e.into_inner()).failed += 1;
            }
        }
    }
}

/// A request the size of an HTTP GET or a TLS ClientHello (the size in its first 8
/// bytes): a tiny request would ride any filter that favours small packets, which real
/// browsers' requests do not.
const REQUEST_BYTES: usize = 400;

/// One transfer: asks for `size` bytes and reads until the server closes.
fn fetch(to: SocketAddr, size: u64, cc: Option<&str>) -> Result<u64> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
    if let Some(cc) = cc {
        set_cc(s.as_raw_fd(), cc)?;
    }
    // A transfer that has not finished within the run's end is cut by its deadline.
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut req = [0x47u8; REQUEST_BYTES];
    req[..8].copy_from_slice(&size.to_be_bytes());
    s.write_all(&req)?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(got);
        }
        got += n as u64;
    }
}

fn serve(listener: TcpListener, cc: Option<String>, stop: &AtomicBool) -> Result<()> {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut s, _)) => {
                let cc = cc.clone();
                let _ = std::thread::Builder::new().name("churn-put".into()).spawn(
                    move || -> Result<()> {
                        s.set_nonblocking(false)?;
                        if let Some(cc) = &cc {
                            set_cc(s.as_raw_fd(), cc)?;
                        }
                        s.set_read_timeout(Some(Duration::from_secs(5)))?;
                        s.set_write_timeout(Some(Duration::from_secs(20)))?;
                        let mut req = [0u8; REQUEST_BYTES];
                        s.read_exact(&mut req)?;
                        let mut len = [0u8; 8];
                        len.copy_from_slice(&req[..8]);
                        let mut left = u64::from_be_bytes(len).min(64 << 20);
                        let chunk = vec![0x5au8; 64 * 1024];
                        while left > 0 {
                            let n = left.min(chunk.len() as u64) as usize;
                            s.write_all(&chunk[..n])?;
                            left -= n as u64;
                        }
                        Ok(())
                    },
                );
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e).context("churn server accept"),
        }
    }
    Ok(())
}

/// A churn dropped without [`RunningChurn::finish`] (its scenario failed) still stops:
/// no transfer is started after this and the server stops accepting.
impl Drop for RunningChurn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl RunningChurn {
    /// Stops starting transfers, gives the open ones up to `drain` to finish, and returns
    /// the figures (transfers still open then are counted as failed).
    pub fn finish(mut self, drain: Duration) -> Result<ChurnStats> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.client.take() {
            let _ = h.join();
        }
        let t0 = Instant::now();
        while self.open.load(Ordering::Relaxed) > 0 && t0.elapsed() < drain {
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(h) = self.server.take() {
            let _ = h.join();
        }
        let mut s = self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
        s.failed += self.open.load(Ordering::Relaxed);
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pareto_sizes_are_heavy_tailed_and_capped() {
        let c = Churn::default();
        let mut r = Rng::new(c.seed);
        let sizes: Vec<u64> = (0..20_000)
            .map(|_| (r.pareto(c.alpha, c.min_bytes as f64) as u64).min(c.max_bytes))
            .collect();
        assert!(sizes
            .iter()
            .all(|&s| (c.min_bytes..=c.max_bytes).contains(&s)));
        let small = sizes.iter().filter(|&&s| s < 30_000).count();
        let big = sizes.iter().filter(|&&s| s >= 1_000_000).count();
        // P(X < 3 xm) = 1 - 3^-1.3 = 0.76; P(X >= 100 xm) = 100^-1.3 = 0.0025.
        assert!((14_000..16_500).contains(&small), "{small}");
        assert!((20..120).contains(&big), "{big}");
    }

    #[test]
    fn exponential_gaps_have_the_mean_asked_for() {
        let mut r = Rng::new(7);
        let n = 50_000;
        let mean: f64 = (0..n).map(|_| r.exp(0.2)).sum::<f64>() / n as f64;
        assert!((mean - 0.2).abs() < 0.01, "{mean}");
    }
}
