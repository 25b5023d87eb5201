//! A user-space delay line: the lab's base round trip without netem.
//!
//! The test machines' kernel has no netem (nor fq, fq_codel, cake), so nothing in the kernel
//! can hold a packet for a while. [`DelayLine`] does it in this process instead: it forwards
//! Ethernet frames between two interfaces of one namespace, in both directions, and holds
//! each frame for a base delay plus a bounded jitter sample before sending it on.
//!
//! Transport: one `AF_PACKET`/`SOCK_RAW` socket per interface, protocol `ETH_P_ALL`, bound to
//! the interface's index, with
//! - `PACKET_IGNORE_OUTGOING`, so a socket does not read back the frames we send on its
//!   interface;
//! - `PACKET_VNET_HDR`, so a frame arrives with the 10-byte `struct virtio_net_hdr` in front
//!   and is sent on with it unchanged: checksum-partial packets (local TCP/UDP sockets hand
//!   veth unfinished checksums) and GSO packets pass through intact. Without it the checksum
//!   would never be filled in and the receiver would drop the packet;
//! - `SO_TIMESTAMPNS`: the kernel stamps each frame as it arrives on the interface;
//! - large (forced) socket buffers, and non-blocking I/O.
//!
//! One thread per direction: `loop { send every frame whose release time has come;
//! ppoll(rx socket, timeout = next release - now); drain every readable frame, stamping its
//! CLOCK_MONOTONIC arrival }`. The arrival is the kernel's receive stamp turned into
//! CLOCK_MONOTONIC (so the thread's own wake-up delay on arrival adds nothing), or the time
//! the thread read the frame when there is no plausible stamp (e.g. a TCP packet still
//! carrying its sender's departure time). A frame's release time is
//! `max(previous release in this direction, arrival + delay + jitter sample)`, so frames are
//! never reordered (and a jitter sample larger than the gap to the next frame delays that
//! one too, as on a real path whose queue delay varies).
//!
//! Jitter: each frame draws a sample **uniform in `[0, jitter]`** (integer nanoseconds,
//! splitmix64), added to the base delay: the one-way delay is never below `delay` and,
//! queueing in the line itself aside, never above `delay + jitter`.
//!
//! Timing: the threads set their timer slack to 1 ns (`PR_SET_TIMERSLACK`) and try
//! `SCHED_FIFO` (silently staying `SCHED_OTHER` when refused; [`DirectionStats::realtime`]
//! says which). Release times are absolute CLOCK_MONOTONIC instants; the ppoll timeout is
//! recomputed from them just before each call (nanosecond resolution), so oversleeping
//! never accumulates. Optionally ([`DelayConfig::spin`]) the thread busy-waits the last few
//! microseconds before a release instead of sleeping through them.
//!
//! Queue: at most [`DelayConfig::queue_bytes`] per direction (32 MB by default); frames
//! beyond it are dropped and counted. Each direction counts frames, bytes, drops, send
//! errors, the kernel's own drops on the receiving socket, and the *lateness* of each release
//! (send time minus scheduled release) in a 1 µs histogram.
//!
//! Measured with `shaper-delayline-check` (2-vCPU Firecracker VM, kernel 6.18 with
//! PREEMPT_NONE, shared with other builds, debug build, 2026-12-03): at 40 Mbit/s each way
//! (3.6 kpps per direction, both at once) the release lateness is p50 ~30 µs (the timer
//! wake-up from idle), p99 0.1-0.3 ms when the machine is quiet and 0.5-1.8 ms when it is
//! busy or the hypervisor steals time; a SCHED_FIFO thread merely sleeping 300 µs at a
//! time sees the same tail there (it is the machine's, not the line's). Each direction's
//! thread uses ~22 % of a core at 40 Mbit/s, ~4 % of it in user space: the rest is the
//! receiving namespace's input path, which the kernel runs in the sending thread. With no
//! line and bulk TCP at veth speed the threads become CPU-bound (~20 k frames/s) and
//! lateness grows to tens of ms; with a [`crate::topology::Line`] the rate stays far
//! below that. `spin` (20-50 µs) takes p50 lateness to ~1-15 µs for ~5-10 % more of a
//! core per direction, but did not improve p99 on this machine.
//!
//! Dropping the [`DelayLine`] sets a stop flag (checked at every wake; the threads never
//! sleep longer than 50 ms) and joins the threads. If an interface disappears (its veth peer's
//! namespace deleted) both threads end on their own, without panicking, and
//! [`DirectionStats::ended`] says why.

use std::collections::VecDeque;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::netns::Netns;
use crate::rng::Rng;

/// Size of `struct virtio_net_hdr` (without `num_buffers`), in front of every frame.
pub const VNET_HDR_LEN: usize = 10;

// linux/if_packet.h (stable ABI values; not all are exported by the libc crate on Linux).
const SOL_PACKET: libc::c_int = 263;
const PACKET_STATISTICS: libc::c_int = 6;
const PACKET_VNET_HDR: libc::c_int = 15;
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
const ETH_P_ALL: u16 = 0x0003;
/// asm-generic/socket.h (x86, arm, riscv; alpha/mips/parisc/sparc differ): receive
/// timestamps as struct __kernel_timespec (64-bit seconds and nanoseconds).
const SO_TIMESTAMPNS_NEW: libc::c_int = 64;

/// Longest wait between checks of the stop flag.
const MAX_WAIT_NS: u64 = 50_000_000;
/// Receive buffer: larger than any GSO packet veth hands over (64 KB; BIG TCP off).
const RX_BUF: usize = 256 * 1024;
/// Frames drained per wake before sending what has come due again.
const RX_BATCH: usize = 256;
/// How often the thread's CPU time and the socket's kernel drop counter are read.
const HOUSEKEEPING_NS: u64 = 100_000_000;
/// Forced socket buffer sizes (the thread may be held off the CPU for a while).
const SOCK_BUF: libc::c_int = 8 << 20;

/// How a [`DelayLine`] holds frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DelayConfig {
    /// Base one-way delay, each direction.
    pub delay: Duration,
    /// Upper bound of the uniform jitter sample added per frame (each direction).
    pub jitter: Duration,
    /// Queue cap per direction, in bytes of frames held; beyond it frames are dropped.
    pub queue_bytes: usize,
    /// Busy-wait this long before a release instead of sleeping through it (0 = never).
    /// Trades CPU for timing accuracy; see the shaper-delayline-check benchmark.
    pub spin: Duration,
    /// Try `SCHED_FIFO` for the forwarding threads (falls back silently when refused).
    pub realtime: bool,
}

impl DelayConfig {
    /// `delay` + uniform `[0, jitter]` each way, 32 MB queues, no spinning, SCHED_FIFO tried.
    pub fn new(delay: Duration, jitter: Duration) -> Self {
        DelayConfig {
            delay,
            jitter,
            queue_bytes: 32 << 20,
            spin: Duration::ZERO,
            realtime: true,
        }
    }
}

/// Lateness histogram: 1 µs buckets up to 20 ms, one overflow bucket, exact max.
#[derive(Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    n: u64,
    sum_ns: u128,
    max_ns: u64,
}

const HIST_BUCKETS: usize = 20_000;

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; HIST_BUCKETS + 1],
            n: 0,
            sum_ns: 0,
            max_ns: 0,
        }
    }
}

/// A summary (the 20,000 buckets would drown any `{:?}` of the stats).
impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("n", &self.n)
            .field("p50", &self.quantile(0.5))
            .field("p99", &self.quantile(0.99))
            .field("max", &self.max())
            .finish()
    }
}

impl Histogram {
    pub fn record(&mut self, d: Duration) {
        self.record_ns(d.as_nanos().min(u64::MAX as u128) as u64);
    }

    fn record_ns(&mut self, ns: u64) {
        let i = ((ns / 1000) as usize).min(HIST_BUCKETS);
        self.counts[i] += 1;
        self.n += 1;
        self.sum_ns += ns as u128;
        self.max_ns = self.max_ns.max(ns);
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.n
    }

    pub fn max(&self) -> Duration {
        Duration::from_nanos(self.max_ns)
    }

    pub fn mean(&self) -> Duration {
        if self.n == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos((self.sum_ns / self.n as u128) as u64)
    }

    /// The `q` quantile (0..=1), as the upper edge of its 1 µs bucket (capped at the max).
    pub fn quantile(&self, q: f64) -> Duration {
        if self.n == 0 {
            return Duration::ZERO;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.n as f64).ceil() as u64).clamp(1, self.n);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                if i == HIST_BUCKETS {
                    return self.max();
                }
                return Duration::from_nanos(((i as u64 + 1) * 1000).min(self.max_ns));
            }
        }
        self.max()
    }

    /// Adds another histogram's samples to this one.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.n += other.n;
        self.sum_ns += other.sum_ns;
        self.max_ns = self.max_ns.max(other.max_ns);
    }
}

/// What one direction of a [`DelayLine`] has done so far.
#[derive(Clone, Debug, Default)]
pub struct DirectionStats {
    /// Interface the frames are read from.
    pub from: String,
    /// Interface they are sent on.
    pub to: String,
    /// Frames read from `from`.
    pub received: u64,
    /// Frames sent on `to`, and their bytes (Ethernet frame, without the vnet header).
    pub frames: u64,
    pub bytes: u64,
    /// Frames dropped because the queue held `queue_bytes` already.
    pub drops: u64,
    /// Frames dropped because they did not fit the receive buffer (never expected).
    pub truncated: u64,
    /// Sends that failed (e.g. ENOBUFS: the peer's backlog was full); the frame is lost.
    pub send_errors: u64,
    /// Frames the kernel dropped before this thread read them (socket buffer full;
    /// `PACKET_STATISTICS`, sampled every 100 ms and at the end).
    pub kernel_drops: u64,
    /// Frames and bytes held right now, and the most bytes ever held.
    pub queued_frames: usize,
    pub queued_bytes: usize,
    pub max_queued_bytes: usize,
    /// Send time minus scheduled release time, one sample per frame sent.
    pub lateness: Histogram,
    /// How long frames waited in the socket before this thread read them (read time minus
    /// the kernel's receive stamp; frames with a usable stamp only). The release time
    /// counts from the kernel's stamp, so this is not an error of the line, but it shows
    /// how promptly the thread wakes.
    pub pickup: Histogram,
    /// CPU time the thread has used (sampled every 100 ms and at the end).
    pub cpu: Duration,
    /// Of which in user space (the rest is the kernel: the syscalls, and the receiving
    /// namespace's whole input path, which runs in the sending thread's context).
    pub cpu_user: Duration,
    /// Whether the thread got SCHED_FIFO.
    pub realtime: bool,
    /// Why the thread ended early (an interface disappeared, an I/O error), if it did.
    pub ended: Option<String>,
}

/// Both directions: `[a -> b, b -> a]` for a line started on `(a, b)`.
pub type DelayLineStats = [DirectionStats; 2];

struct Shared {
    stop: AtomicBool,
    delay_ns: AtomicU64,
    jitter_ns: AtomicU64,
    spin_ns: AtomicU64,
    stats: [Mutex<DirectionStats>; 2],
}

/// Forwards frames between two interfaces of one namespace, each held for a delay plus
/// jitter. See the module documentation. Dropping it stops and joins its threads.
pub struct DelayLine {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    ifaces: [String; 2],
}

impl DelayLine {
    /// Starts forwarding between interfaces `a` and `b` of `ns` (both must exist and be up).
    pub fn start(ns: &Netns, a: &str, b: &str, cfg: DelayConfig) -> Result<DelayLine> {
        let (an, bn) = (a.to_string(), b.to_string());
        let socks = ns
            .within(move || Ok([packet_socket(&an)?, packet_socket(&bn)?]))
            .with_context(|| format!("opening packet sockets on {a} and {b} in {}", ns.name()))?;
        let socks = Arc::new(socks);
        let ifindex = [ifindex_of(&socks[0])?, ifindex_of(&socks[1])?];
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            delay_ns: AtomicU64::new(dur_ns(cfg.delay)),
            jitter_ns: AtomicU64::new(dur_ns(cfg.jitter)),
            spin_ns: AtomicU64::new(dur_ns(cfg.spin)),
            stats: [
                Mutex::new(DirectionStats {
                    from: a.to_string(),
                    to: b.to_string(),
                    ..Default::default()
                }),
                Mutex::new(DirectionStats {
                    from: b.to_string(),
                    to: a.to_string(),
                    ..Default::default()
                }),
            ],
        });
        let mut line = DelayLine {
            shared: shared.clone(),
            threads: Vec::new(),
            ifaces: [a.to_string(), b.to_string()],
        };
        for dir in 0..2 {
            let (socks, shared) = (socks.clone(), shared.clone());
            let name = format!("delay-{}", line.ifaces[dir]);
            let t = std::thread::Builder::new()
                .name(name)
                .spawn(move || {
                    let mut fwd = Forwarder {
                        dir,
                        rx: socks[dir].as_raw_fd(),
                        tx: socks[1 - dir].as_raw_fd(),
                        ifindex,
                        shared: &shared,
                        cfg,
                    };
                    let ended = fwd.run();
                    // One direction ending (an interface gone) ends the other too.
                    if ended.is_some() {
                        shared.stop.store(true, Ordering::Relaxed);
                    }
                    lock(&shared.stats[dir]).ended = ended;
                    drop(socks);
                })
                .context("spawning a delay line thread")?;
            line.threads.push(t);
        }
        Ok(line)
    }

    /// Changes the base delay and jitter for frames arriving from now on.
    pub fn set_delay(&self, delay: Duration, jitter: Duration) {
        self.shared.delay_ns.store(dur_ns(delay), Ordering::Relaxed);
        self.shared
            .jitter_ns
            .store(dur_ns(jitter), Ordering::Relaxed);
    }

    /// Changes [`DelayConfig::spin`] (busy-wait before each release) on the fly.
    pub fn set_spin(&self, spin: Duration) {
        self.shared.spin_ns.store(dur_ns(spin), Ordering::Relaxed);
    }

    /// Current base delay and jitter.
    pub fn delay(&self) -> (Duration, Duration) {
        (
            Duration::from_nanos(self.shared.delay_ns.load(Ordering::Relaxed)),
            Duration::from_nanos(self.shared.jitter_ns.load(Ordering::Relaxed)),
        )
    }

    /// The two interfaces, `(a, b)` as started.
    pub fn interfaces(&self) -> (&str, &str) {
        (&self.ifaces[0], &self.ifaces[1])
    }

    /// A snapshot of both directions: `[a -> b, b -> a]`.
    pub fn stats(&self) -> DelayLineStats {
        [
            lock(&self.shared.stats[0]).clone(),
            lock(&self.shared.stats[1]).clone(),
        ]
    }

    /// Whether both forwarding threads are still running.
    pub fn running(&self) -> bool {
        self.threads.iter().all(|t| !t.is_finished())
    }

    /// Stops the threads, waits for them, and returns the final stats.
    pub fn stop(mut self) -> DelayLineStats {
        self.join();
        self.stats()
    }

    fn join(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.join();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn dur_ns(d: Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}

/// CLOCK_MONOTONIC in nanoseconds.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// CLOCK_REALTIME - CLOCK_MONOTONIC in ns, to turn the kernel's receive stamps into
/// monotonic instants: the tightest of a few samples (a preemption between the readings
/// would skew one). It changes only when the wall clock is stepped, so the thread refreshes
/// it every 100 ms.
fn realtime_offset() -> i128 {
    let mut best = (u64::MAX, 0i128);
    for _ in 0..5 {
        let m0 = monotonic_ns();
        let r = clock_ns(libc::CLOCK_REALTIME);
        let m1 = monotonic_ns();
        if m1 - m0 < best.0 {
            best = (m1 - m0, r as i128 - (m0 / 2 + m1 / 2) as i128);
        }
    }
    best.1
}

/// The calling thread's CPU time: (user + system, user).
fn thread_cpu() -> (Duration, Duration) {
    // SAFETY: rusage is plain old data; getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: ru is a valid out-pointer.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    let d = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    (d(ru.ru_utime) + d(ru.ru_stime), d(ru.ru_utime))
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn setsockopt_int(fd: RawFd, level: libc::c_int, opt: libc::c_int, v: libc::c_int) -> Result<()> {
    // SAFETY: v lives for the call; the length matches.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!(
            "setsockopt({level}, {opt}): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// An `AF_PACKET` raw socket bound to `ifname` of the calling thread's namespace.
fn packet_socket(ifname: &str) -> Result<OwnedFd> {
    let c = CString::new(ifname).context("interface name")?;
    // SAFETY: c is a valid C string.
    let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if ifindex == 0 {
        bail!("no interface {ifname}: {}", std::io::Error::last_os_error());
    }
    // Protocol 0 until bound: nothing is received from other interfaces meanwhile.
    // SAFETY: plain socket(2).
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        bail!("socket(AF_PACKET): {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    setsockopt_int(fd, SOL_PACKET, PACKET_IGNORE_OUTGOING, 1).context("PACKET_IGNORE_OUTGOING")?;
    setsockopt_int(fd, SOL_PACKET, PACKET_VNET_HDR, 1).context("PACKET_VNET_HDR")?;
    // Arrival = the kernel's receive time, not the (later) time this thread reads it.
    setsockopt_int(fd, libc::SOL_SOCKET, SO_TIMESTAMPNS_NEW, 1).context("SO_TIMESTAMPNS")?;
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if setsockopt_int(fd, libc::SOL_SOCKET, force, SOCK_BUF).is_err() {
            setsockopt_int(fd, libc::SOL_SOCKET, plain, SOCK_BUF)?;
        }
    }
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETH_P_ALL.to_be();
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: sll is a valid sockaddr_ll and the length matches.
    let rc = unsafe {
        libc::bind(
            fd,
            &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!(
            "bind(AF_PACKET, {ifname}): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(sock)
}

/// The kernel's receive time (SCM_TIMESTAMPNS, CLOCK_REALTIME ns) of a received message.
fn kernel_stamp(msg: &libc::msghdr) -> Option<u64> {
    // SAFETY: msg was filled by recvmsg; the CMSG macros stay within msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == SO_TIMESTAMPNS_NEW {
                let ts = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const [i64; 2]);
                return Some(ts[0] as u64 * 1_000_000_000 + ts[1] as u64);
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    None
}

/// The interface index a packet socket is bound to (-1 once the interface is gone).
fn bound_ifindex(fd: RawFd) -> Option<i32> {
    // SAFETY: sockaddr_ll is plain old data.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: sll/len are valid out-pointers of matching size.
    let rc = unsafe {
        libc::getsockname(
            fd,
            &mut sll as *mut libc::sockaddr_ll as *mut libc::sockaddr,
            &mut len,
        )
    };
    (rc == 0).then_some(sll.sll_ifindex)
}

fn ifindex_of(sock: &OwnedFd) -> Result<i32> {
    bound_ifindex(sock.as_raw_fd()).context("getsockname on a packet socket")
}

/// Frames the kernel dropped on this socket since the last call (the counter resets).
fn kernel_drops(fd: RawFd) -> u64 {
    let mut st = [0u32; 2]; // struct tpacket_stats { tp_packets, tp_drops }
    let mut len = std::mem::size_of_val(&st) as libc::socklen_t;
    // SAFETY: st/len are valid out-pointers of matching size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            SOL_PACKET,
            PACKET_STATISTICS,
            st.as_mut_ptr() as *mut libc::c_void,
            &mut len,
        )
    };
    if rc == 0 {
        st[1] as u64
    } else {
        0
    }
}

/// Timer slack 1 ns, and SCHED_FIFO when allowed. Returns whether SCHED_FIFO took.
fn tune_thread(realtime: bool) -> bool {
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
    if !realtime {
        return false;
    }
    let param = libc::sched_param { sched_priority: 10 };
    // SAFETY: param is valid; 0 = the calling thread.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) == 0 }
}

struct Frame {
    release: u64,
    /// virtio_net_hdr + Ethernet frame, as received.
    data: Vec<u8>,
}

struct Forwarder<'a> {
    dir: usize,
    rx: RawFd,
    tx: RawFd,
    ifindex: [i32; 2],
    shared: &'a Shared,
    cfg: DelayConfig,
}

enum SendOutcome {
    Sent,
    /// Socket buffer full: try again shortly.
    Again,
    /// The frame is lost (counted).
    Lost,
    /// The outgoing interface is gone.
    Gone(String),
}

impl Forwarder<'_> {
    /// Checks whether the interface behind `fd` (index `which`) still exists.
    fn gone(&self, which: usize, fd: RawFd) -> Option<String> {
        match bound_ifindex(fd) {
            Some(i) if i == self.ifindex[which] => None,
            _ => {
                let st = lock(&self.shared.stats[self.dir]);
                let name = if which == self.dir { &st.from } else { &st.to };
                Some(format!("interface {name} disappeared"))
            }
        }
    }

    fn send(&self, f: &Frame) -> SendOutcome {
        // SAFETY: the buffer is valid for its length.
        let n = unsafe {
            libc::send(
                self.tx,
                f.data.as_ptr() as *const libc::c_void,
                f.data.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            return SendOutcome::Sent;
        }
        match errno() {
            libc::EAGAIN | libc::EINTR => SendOutcome::Again,
            libc::ENXIO | libc::ENODEV | libc::ENETDOWN => match self.gone(1 - self.dir, self.tx) {
                Some(why) => SendOutcome::Gone(why),
                None => SendOutcome::Lost,
            },
            _ => SendOutcome::Lost,
        }
    }

    /// The thread's loop; returns why it ended early, or `None` when stopped.
    fn run(&mut self) -> Option<String> {
        let realtime = tune_thread(self.cfg.realtime);
        lock(&self.shared.stats[self.dir]).realtime = realtime;
        let shared = self.shared;
        let mut q: VecDeque<Frame> = VecDeque::new();
        let mut qbytes = 0usize;
        let mut max_qbytes = 0usize;
        let mut last_release = 0u64;
        let mut buf = vec![0u8; RX_BUF];
        let mut cbuf = [0u64; 16];
        let mut pickup: Vec<u64> = Vec::with_capacity(1024);
        let mut rng = Rng::splitmix64(monotonic_ns() ^ ((self.dir as u64 + 1) << 40));
        let mut next_housekeeping = 0u64;
        let mut real_minus_mono = realtime_offset();
        // Local counters, published once per wake.
        let mut late: Vec<u64> = Vec::with_capacity(1024);
        let (mut received, mut frames, mut bytes) = (0u64, 0u64, 0u64);
        let (mut drops, mut truncated, mut send_errors, mut kdrops) = (0u64, 0u64, 0u64, 0u64);
        let mut ended = None;
        let mut backoff;

        'outer: while !shared.stop.load(Ordering::Relaxed) {
            // 1. Send everything due.
            let mut now = monotonic_ns();
            let spin_ns = shared.spin_ns.load(Ordering::Relaxed);
            backoff = false;
            while let Some(f) = q.front() {
                if f.release > now {
                    if spin_ns == 0 || f.release - now > spin_ns {
                        break;
                    }
                    while now < f.release {
                        std::hint::spin_loop();
                        now = monotonic_ns();
                    }
                }
                match self.send(f) {
                    SendOutcome::Sent => {
                        late.push(now - f.release);
                        frames += 1;
                        bytes += (f.data.len() - VNET_HDR_LEN) as u64;
                    }
                    SendOutcome::Again => {
                        backoff = true;
                        break;
                    }
                    SendOutcome::Lost => send_errors += 1,
                    SendOutcome::Gone(why) => {
                        ended = Some(why);
                        break 'outer;
                    }
                }
                qbytes -= f.data.len();
                q.pop_front();
                now = monotonic_ns();
            }

            // 2. Publish.
            if now >= next_housekeeping {
                next_housekeeping = now + HOUSEKEEPING_NS;
                real_minus_mono = realtime_offset();
                kdrops += kernel_drops(self.rx);
                let (cpu, user) = thread_cpu();
                let mut st = lock(&shared.stats[self.dir]);
                (st.cpu, st.cpu_user) = (cpu, user);
            }
            {
                let mut st = lock(&shared.stats[self.dir]);
                st.received += received;
                st.frames += frames;
                st.bytes += bytes;
                st.drops += drops;
                st.truncated += truncated;
                st.send_errors += send_errors;
                st.kernel_drops += kdrops;
                st.queued_frames = q.len();
                st.queued_bytes = qbytes;
                st.max_queued_bytes = max_qbytes;
                for ns in late.drain(..) {
                    st.lateness.record_ns(ns);
                }
                for ns in pickup.drain(..) {
                    st.pickup.record_ns(ns);
                }
            }
            (
                received,
                frames,
                bytes,
                drops,
                truncated,
                send_errors,
                kdrops,
            ) = (0, 0, 0, 0, 0, 0, 0);

            // 3. Sleep until the next release (less the spin), a frame, or 50 ms.
            let mut wait = MAX_WAIT_NS;
            if let Some(f) = q.front() {
                wait = wait.min(f.release.saturating_sub(now).saturating_sub(spin_ns));
            }
            if backoff {
                wait = wait.min(100_000);
            }
            let ts = libc::timespec {
                tv_sec: (wait / 1_000_000_000) as libc::time_t,
                tv_nsec: (wait % 1_000_000_000) as libc::c_long,
            };
            let mut pfd = libc::pollfd {
                fd: self.rx,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: pfd and ts are valid for the call; no signal mask change.
            let rc = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
            if rc <= 0 {
                continue;
            }

            // 4. Drain what arrived.
            let delay = shared.delay_ns.load(Ordering::Relaxed);
            let jitter = shared.jitter_ns.load(Ordering::Relaxed);
            for read in 0..RX_BATCH {
                let mut iov = libc::iovec {
                    iov_base: buf.as_mut_ptr() as *mut libc::c_void,
                    iov_len: buf.len(),
                };
                // SAFETY: msghdr is plain old data; the pointers set below stay valid for
                // the call.
                let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
                msg.msg_iov = &mut iov;
                msg.msg_iovlen = 1;
                msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
                msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
                // SAFETY: msg describes valid buffers.
                let n = unsafe {
                    libc::recvmsg(self.rx, &mut msg, libc::MSG_DONTWAIT | libc::MSG_TRUNC)
                };
                if n < 0 {
                    match errno() {
                        libc::EAGAIN | libc::EINTR => {
                            if read == 0 && pfd.revents & !libc::POLLIN != 0 {
                                // Woken by an error condition with nothing to read: never
                                // loop on it at real-time priority.
                                if let Some(why) = self.gone(self.dir, self.rx) {
                                    ended = Some(why);
                                    break 'outer;
                                }
                                std::thread::sleep(Duration::from_millis(1));
                            }
                            break;
                        }
                        e => {
                            if let Some(why) = self.gone(self.dir, self.rx) {
                                ended = Some(why);
                                break 'outer;
                            }
                            if e != libc::ENETDOWN {
                                // Unexpected: do not spin on it.
                                std::thread::sleep(Duration::from_millis(1));
                            }
                            break;
                        }
                    }
                }
                let now = monotonic_ns();
                // The kernel's receive stamp when there is a plausible one (not after now,
                // not older than a second: a TCP packet may still carry its sender's
                // monotonic departure time instead), else the time we read it.
                let arrival = match kernel_stamp(&msg) {
                    Some(real) => {
                        let mono = real as i128 - real_minus_mono;
                        if mono <= now as i128 && mono > now as i128 - 1_000_000_000 {
                            pickup.push(now - mono as u64);
                            mono as u64
                        } else {
                            now
                        }
                    }
                    None => now,
                };
                let n = n as usize;
                received += 1;
                if n > buf.len() {
                    truncated += 1;
                    continue;
                }
                if n <= VNET_HDR_LEN {
                    continue;
                }
                if qbytes + n > self.cfg.queue_bytes {
                    drops += 1;
                    continue;
                }
                let j = if jitter == 0 {
                    0
                } else {
                    rng.next_u64() % (jitter + 1)
                };
                let release = (arrival + delay + j).max(last_release);
                last_release = release;
                qbytes += n;
                max_qbytes = max_qbytes.max(qbytes);
                q.push_back(Frame {
                    release,
                    data: buf[..n].to_vec(),
                });
            }
        }

        kdrops += kernel_drops(self.rx);
        let mut st = lock(&shared.stats[self.dir]);
        st.received += received;
        st.frames += frames;
        st.bytes += bytes;
        st.drops += drops;
        st.truncated += truncated;
        st.send_errors += send_errors;
        st.kernel_drops += kdrops;
        st.queued_frames = q.len();
        st.queued_bytes = qbytes;
        st.max_queued_bytes = max_qbytes;
        for ns in late.drain(..) {
            st.lateness.record_ns(ns);
        }
        for ns in pickup.drain(..) {
            st.pickup.record_ns(ns);
        }
        (st.cpu, st.cpu_user) = thread_cpu();
        ended
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles() {
        let mut h = Histogram::default();
        for us in 1..=100u64 {
            h.record(Duration::from_micros(us));
        }
        assert_eq!(h.count(), 100);
        assert_eq!(h.quantile(0.5), Duration::from_micros(51));
        assert_eq!(h.quantile(0.99), Duration::from_micros(100));
        assert_eq!(h.max(), Duration::from_micros(100));
        h.record(Duration::from_secs(1));
        assert_eq!(h.quantile(1.0), Duration::from_secs(1));
    }
}
