//! `shaper-delayline-check`: how much error the lab's user-space delay line adds.
//!
//! Builds the namespace lab with no line emulation and a path delay (a fifth "wire"
//! namespace whose [`DelayLine`](shaper_tests::DelayLine) holds each frame for half the
//! round trip), then sends paced UDP (1400-byte datagrams, each carrying its CLOCK_MONOTONIC
//! send time) srv -> lan and lan -> srv at the same time. Sender and receiver are threads of
//! this process in their namespaces, so they share the clock: the receiver's one-way delay
//! minus the base delay is the error the delay line adds (plus the lab's own forwarding and
//! the receiver's wake-up, which the first run, without a delay line, shows on its own).
//!
//! Runs: no delay line (the floor); rtt 20 ms at `--rate-mbit` (40); rtt 20 ms at 10 Mbit/s;
//! rtt 20 ms with 2 ms jitter at `--rate-mbit` (there the whole one-way delay distribution
//! is the point); and with `--spin-us N` a further run busy-waiting the last N µs before each
//! release. Prints plain-text tables; asserts nothing (exit 0 unless the lab cannot be built).

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use shaper_tests::delayline::monotonic_ns;
use shaper_tests::stats;
use shaper_tests::topology::{LAN_HOST_V4, SRV_V4};
use shaper_tests::util::arg_value;
use shaper_tests::{probe, DirectionStats, Netns, Offloads, PathDelay, Topology, TopologyOptions};

const PAYLOAD: usize = 1400;
const USAGE: &str = "\
usage: shaper-delayline-check [--seconds N] [--rate-mbit N] [--spin-us N]

Measures the error the namespace lab's user-space delay line adds: paced UDP both ways
through a 20 ms base round trip, one-way delay at the receiver minus 10 ms. Needs root.

  --seconds N    seconds per run (default 5)
  --rate-mbit N  rate each way of the main runs (default 40); one run is always at 10
  --spin-us N    also a run busy-waiting the last N us before each release (default: none)
";

#[derive(Clone, Copy)]
struct Run {
    name: &'static str,
    path: Option<PathDelay>,
    rate_mbit: f64,
    spin: Duration,
    /// Print the whole delay distribution (jitter runs).
    distribution: bool,
}

struct Flow {
    name: &'static str,
    sent: u64,
    /// One-way delays in ns, as received.
    delays: Vec<i64>,
}

struct Outcome {
    run: Run,
    seconds: f64,
    /// Share of the CPUs' time the hypervisor took (/proc/stat steal) during the run, %.
    steal_pct: f64,
    flows: Vec<Flow>,
    /// Delay line stats per flow (same order as `flows`), when there is one.
    line: Option<Vec<DirectionStats>>,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        print!("{USAGE}");
        return;
    }
    let num = |name: &str, default: f64| -> f64 {
        match arg_value(&args, name) {
            None => default,
            Some(v) => v.parse().unwrap_or_else(|_| {
                eprintln!("{name}: not a number: {v}\n\n{USAGE}");
                std::process::exit(2)
            }),
        }
    };
    let seconds = num("--seconds", 5.0);
    let rate = num("--rate-mbit", 40.0);
    let spin_us = num("--spin-us", 0.0);
    if let Err(e) = run_all(seconds, rate, spin_us) {
        eprintln!("shaper-delayline-check: {e:#}");
        std::process::exit(1);
    }
}

fn run_all(seconds: f64, rate: f64, spin_us: f64) -> Result<()> {
    if let Some(reason) = shaper_tests::util::skip_reason(shaper_tests::TOPOLOGY_TOOLS) {
        anyhow::bail!("{reason}");
    }
    let p20 = PathDelay::rtt_ms(20);
    let mut runs = vec![
        Run {
            name: "no delay line (floor)",
            path: None,
            rate_mbit: rate,
            spin: Duration::ZERO,
            distribution: false,
        },
        Run {
            name: "rtt 20ms",
            path: Some(p20),
            rate_mbit: rate,
            spin: Duration::ZERO,
            distribution: false,
        },
        Run {
            name: "rtt 20ms",
            path: Some(p20),
            rate_mbit: 10.0,
            spin: Duration::ZERO,
            distribution: false,
        },
    ];
    if spin_us > 0.0 {
        runs.push(Run {
            name: "rtt 20ms spin",
            path: Some(p20),
            rate_mbit: rate,
            spin: Duration::from_nanos((spin_us * 1000.0) as u64),
            distribution: false,
        });
    }
    runs.push(Run {
        name: "rtt 20ms jitter 2ms",
        path: Some(PathDelay::new(
            Duration::from_millis(20),
            Duration::from_millis(2),
        )),
        rate_mbit: rate,
        spin: Duration::ZERO,
        distribution: true,
    });

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "delay line check: {PAYLOAD}-byte UDP datagrams both ways at once, {seconds} s per run; \
         {} CPUs, load average {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "error = one-way delay - rtt/2 (for the floor run: the one-way delay itself); \
         delay line lateness = its send time - scheduled release"
    );
    print_noise("before");
    let mut outcomes = Vec::new();
    for run in runs {
        eprintln!("running: {} at {} Mbit/s", run.name, run.rate_mbit);
        outcomes.push(measure(run, seconds)?);
        // Let the kernel finish tearing the namespaces down before the next run.
        std::thread::sleep(Duration::from_secs(2));
    }
    print_noise("after");
    print_tables(&outcomes);
    Ok(())
}

fn measure(run: Run, seconds: f64) -> Result<Outcome> {
    let topo = Topology::build_with(TopologyOptions {
        line: None,
        offloads: Offloads::Off,
        path: run.path,
    })?;
    if let Some(l) = topo.delay_line() {
        l.set_spin(run.spin);
    }
    // Resolve the neighbours first (ARP through the delay line takes a round trip).
    probe::udp_echo(&topo.srv, &topo.lan, SRV_V4.into(), 9100).context("warm-up lan->srv")?;
    probe::udp_echo(&topo.lan, &topo.srv, LAN_HOST_V4.into(), 9101).context("warm-up srv->lan")?;
    let before = topo.delay_stats();
    let cpu_before = process_cpu();
    let stat_before = cpu_jiffies();
    let wall = monotonic_ns();

    let down = flow(&topo.srv, &topo.lan, LAN_HOST_V4.into(), 9200, run, seconds)?;
    let up = flow(&topo.lan, &topo.srv, SRV_V4.into(), 9201, run, seconds)?;
    let down = down.finish("srv->lan")?;
    let up = up.finish("lan->srv")?;

    let wall_s = (monotonic_ns() - wall) as f64 / 1e9;
    let steal_pct = steal_between(stat_before, cpu_jiffies());
    let cpu_all = process_cpu() - cpu_before;
    let line = match (before, topo.delay_stats()) {
        // [w0 -> w1 = towards srv, w1 -> w0 = towards lan]
        (Some(b), Some(a)) => Some(vec![delta(&b[1], &a[1]), delta(&b[0], &a[0])]),
        _ => None,
    };
    eprintln!(
        "  process CPU {:.2} s over {wall_s:.1} s ({:.0} % of one core), senders and receivers included",
        cpu_all,
        100.0 * cpu_all / wall_s
    );
    Ok(Outcome {
        run,
        seconds: wall_s,
        steal_pct,
        flows: vec![down, up],
        line,
    })
}

/// Stats accumulated between two snapshots (the histogram is the later one's: warm-up
/// frames are a handful against tens of thousands).
fn delta(b: &DirectionStats, a: &DirectionStats) -> DirectionStats {
    let mut d = a.clone();
    d.received -= b.received;
    d.frames -= b.frames;
    d.bytes -= b.bytes;
    d.drops -= b.drops;
    d.send_errors -= b.send_errors;
    d.kernel_drops -= b.kernel_drops;
    d.cpu = a.cpu.saturating_sub(b.cpu);
    d.cpu_user = a.cpu_user.saturating_sub(b.cpu_user);
    d.pickup = a.pickup.clone();
    d
}

/// (all jiffies, steal jiffies) summed over the CPUs, from /proc/stat.
fn cpu_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().next() else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest counted in user already)
    (v.iter().take(8).sum(), v.get(7).copied().unwrap_or(0))
}

fn steal_between(a: (u64, u64), b: (u64, u64)) -> f64 {
    let all = b.0.saturating_sub(a.0);
    if all == 0 {
        return 0.0;
    }
    100.0 * b.1.saturating_sub(a.1) as f64 / all as f64
}

/// The machine's own timer noise: a SCHED_FIFO thread (timer slack 1 ns) sleeping to
/// absolute deadlines 300 µs apart for `secs`; returns the sorted overshoots in ns.
fn timer_noise(secs: f64) -> Vec<i64> {
    std::thread::spawn(move || {
        tune(10);
        let n = (secs * 1e9 / 300_000.0) as u64;
        let start = monotonic_ns() + 300_000;
        let mut over = Vec::with_capacity(n as usize);
        for i in 0..n {
            let due = start + i * 300_000;
            sleep_until(due);
            over.push(monotonic_ns() as i64 - due as i64);
        }
        over.sort_unstable();
        over
    })
    .join()
    .unwrap_or_default()
}

fn print_noise(when: &str) {
    let stat = cpu_jiffies();
    let o = timer_noise(1.0);
    println!(
        "machine timer noise {when}: SCHED_FIFO 300 us absolute sleeps for 1 s, overshoot p50 {} p99 {} p99.9 {} max {} ms; steal {:.1} %",
        ms(pct(&o, 50.0)),
        ms(pct(&o, 99.0)),
        ms(pct(&o, 99.9)),
        ms(o.last().copied().unwrap_or(0)),
        steal_between(stat, cpu_jiffies())
    );
}

fn process_cpu() -> f64 {
    // SAFETY: rusage is plain old data; getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: ru is a valid out-pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

struct Running {
    sender: std::thread::JoinHandle<Result<u64>>,
    receiver: std::thread::JoinHandle<Result<Vec<i64>>>,
}

impl Running {
    fn finish(self, name: &'static str) -> Result<Flow> {
        let sent = self
            .sender
            .join()
            .map_err(|_| anyhow::anyhow!("sender panicked"))??;
        let delays = self
            .receiver
            .join()
            .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
        Ok(Flow { name, sent, delays })
    }
}

/// Starts a paced sender in `from` and its receiver in `to`.
fn flow(
    from: &Netns,
    to: &Netns,
    dst: IpAddr,
    port: u16,
    run: Run,
    seconds: f64,
) -> Result<Running> {
    let addr = SocketAddr::new(dst, port);
    let rx = to.within(move || UdpSocket::bind(addr).with_context(|| format!("bind {addr}")))?;
    rx.set_read_timeout(Some(Duration::from_millis(100)))?;
    let done = Arc::new(AtomicBool::new(false));
    let done_rx = done.clone();
    let receiver = std::thread::spawn(move || -> Result<Vec<i64>> {
        // Measurement apparatus: real-time priority below the delay line's, so its wake-up
        // adds as little as it can to the figures (falls back silently).
        tune(5);
        let mut buf = [0u8; 2048];
        let mut delays = Vec::new();
        let mut quiet_since = None;
        loop {
            match rx.recv(&mut buf) {
                Ok(n) if n >= 16 => {
                    let now = monotonic_ns();
                    let sent = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
                    delays.push(now as i64 - sent as i64);
                    quiet_since = None;
                }
                Ok(_) => {}
                Err(_) => {
                    if done_rx.load(Ordering::Relaxed) {
                        // The sender is done: wait out the delay line's queue.
                        let t = *quiet_since.get_or_insert_with(monotonic_ns);
                        if monotonic_ns() - t > 300_000_000 {
                            break;
                        }
                    }
                }
            }
        }
        Ok(delays)
    });
    let interval_ns = (PAYLOAD as f64 * 8.0 / (run.rate_mbit * 1e6) * 1e9) as u64;
    let total = (seconds * 1e9 / interval_ns as f64) as u64;
    let sender = from.spawn_thread(move || -> Result<u64> {
        // Paced at absolute deadlines; plain CFS (slack 1 ns): when it falls behind it sends
        // what is due at once, and the receiver's figures still hold (each datagram carries
        // the time it was actually sent).
        tune(0);
        let any: IpAddr = std::net::Ipv4Addr::UNSPECIFIED.into();
        let sock = UdpSocket::bind((any, 0)).context("bind sender")?;
        sock.connect(addr)?;
        let mut buf = [0u8; PAYLOAD];
        let start = monotonic_ns() + 1_000_000;
        let mut sent = 0;
        for seq in 0..total {
            let due = start + seq * interval_ns;
            sleep_until(due);
            buf[..8].copy_from_slice(&seq.to_le_bytes());
            buf[8..16].copy_from_slice(&monotonic_ns().to_le_bytes());
            if sock.send(&buf).is_ok() {
                sent += 1;
            }
        }
        Ok(sent)
    });
    // The receiver learns the sender is done from this watcher.
    let sender = std::thread::spawn(move || -> Result<u64> {
        let r = sender
            .join()
            .map_err(|_| anyhow::anyhow!("sender panicked"));
        done.store(true, Ordering::Relaxed);
        r?
    });
    Ok(Running { sender, receiver })
}

/// Timer slack 1 ns; SCHED_FIFO at `prio` when `prio > 0` (silently not, when refused).
fn tune(prio: i32) {
    // SAFETY: prctl/sched_setscheduler on the calling thread with valid arguments.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
        if prio > 0 {
            let p = libc::sched_param {
                sched_priority: prio,
            };
            libc::sched_setscheduler(0, libc::SCHED_FIFO, &p);
        }
    }
}

fn sleep_until(ns: u64) {
    let ts = libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: ts is valid; absolute CLOCK_MONOTONIC sleep.
    while unsafe {
        libc::clock_nanosleep(
            libc::CLOCK_MONOTONIC,
            libc::TIMER_ABSTIME,
            &ts,
            std::ptr::null_mut(),
        )
    } == libc::EINTR
    {}
}

/// The nearest-rank percentile `p` (0..=100, [`stats`]) of ascending `sorted`; 0 when empty.
fn pct(sorted: &[i64], p: f64) -> i64 {
    stats::nearest_rank(sorted, p).unwrap_or(0)
}

fn ms(ns: i64) -> String {
    format!("{:.3}", ns as f64 / 1e6)
}

fn dms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

fn print_tables(outcomes: &[Outcome]) {
    println!();
    println!("Added error (ms): one-way delay minus the base delay, at the receiver");
    println!(
        "{:<22} {:>6} {:<9} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>6}",
        "run", "Mbit/s", "flow", "sent", "loss%", "min", "p50", "p99", "p99.9", "max", "steal%"
    );
    for o in outcomes {
        let base = o.run.path.map_or(0, |p| p.one_way().as_nanos() as i64);
        for f in &o.flows {
            let mut e: Vec<i64> = f.delays.iter().map(|d| d - base).collect();
            e.sort_unstable();
            let loss = if f.sent == 0 {
                0.0
            } else {
                100.0 * (f.sent as f64 - e.len() as f64) / f.sent as f64
            };
            println!(
                "{:<22} {:>6} {:<9} {:>7} {:>7.2} {:>7} {:>7} {:>7} {:>7} {:>7} {:>6.1}",
                o.run.name,
                o.run.rate_mbit,
                f.name,
                f.sent,
                loss,
                ms(e.first().copied().unwrap_or(0)),
                ms(pct(&e, 50.0)),
                ms(pct(&e, 99.0)),
                ms(pct(&e, 99.9)),
                ms(e.last().copied().unwrap_or(0)),
                o.steal_pct,
            );
        }
    }

    println!();
    println!(
        "The delay line's own figures (ms): lateness l.* = its send time - scheduled release; \
         pickup pk.* = its read time - the kernel's receive stamp (not an error: releases count \
         from the stamp); cpu% of one core for its thread, \
         user% of which in user space"
    );
    println!(
        "{:<22} {:>6} {:<9} {:>7} {:>6} {:>6} {:>6} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>6} {:>5} {:>4}",
        "run",
        "Mbit/s",
        "flow",
        "frames",
        "drops",
        "kdrop",
        "senderr",
        "l.p50",
        "l.p99",
        "l.p99.9",
        "l.max",
        "pk.p50",
        "pk.p99",
        "cpu%",
        "user%",
        "fifo"
    );
    for o in outcomes {
        let Some(line) = &o.line else { continue };
        for (f, d) in o.flows.iter().zip(line) {
            println!(
                "{:<22} {:>6} {:<9} {:>7} {:>6} {:>6} {:>6} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>6.1} {:>5.1} {:>4}",
                o.run.name,
                o.run.rate_mbit,
                f.name,
                d.frames,
                d.drops,
                d.kernel_drops,
                d.send_errors,
                dms(d.lateness.quantile(0.5)),
                dms(d.lateness.quantile(0.99)),
                dms(d.lateness.quantile(0.999)),
                dms(d.lateness.max()),
                dms(d.pickup.quantile(0.5)),
                dms(d.pickup.quantile(0.99)),
                100.0 * d.cpu.as_secs_f64() / o.seconds,
                100.0 * d.cpu_user.as_secs_f64() / o.seconds,
                if d.realtime { "yes" } else { "no" },
            );
        }
    }

    for o in outcomes.iter().filter(|o| o.run.distribution) {
        let Some(p) = o.run.path else { continue };
        println!();
        println!(
            "One-way delay distribution, {} at {} Mbit/s (ms; base {} + uniform [0, {}] jitter, never reordered)",
            o.run.name,
            o.run.rate_mbit,
            dms(p.one_way()),
            dms(p.jitter)
        );
        println!(
            "{:<9} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7}",
            "flow", "min", "p10", "p25", "p50", "p75", "p90", "p99", "max"
        );
        for f in &o.flows {
            let mut e = f.delays.clone();
            e.sort_unstable();
            println!(
                "{:<9} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7}",
                f.name,
                ms(e.first().copied().unwrap_or(0)),
                ms(pct(&e, 10.0)),
                ms(pct(&e, 25.0)),
                ms(pct(&e, 50.0)),
                ms(pct(&e, 75.0)),
                ms(pct(&e, 90.0)),
                ms(pct(&e, 99.0)),
                ms(e.last().copied().unwrap_or(0)),
            );
        }
    }
}
