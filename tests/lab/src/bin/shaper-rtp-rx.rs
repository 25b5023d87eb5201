//! `shaper-rtp-rx`: receives an RTP stream on a UDP socket and writes loss, reordering,
//! added one-way delay percentiles and RFC 3550 jitter as JSON (see `shaper_tests::rtp`).
//!
//! ```text
//! shaper-rtp-rx --listen 10.0.0.1:5004 --seconds 30 --out summary.json
//!               [--samples delays.txt] [--clock-rate 90000] [--warmup 1]
//! ```
//!
//! Receives until `--seconds` have passed since the first RTP packet arrived; if no RTP
//! packet arrives within `2 x --seconds` it writes a summary with `"packets": 0` and exits 0.
//! Datagrams that are not RTP (e.g. RTCP when sender and receiver multiplex it) are counted
//! in `non_rtp` and otherwise ignored. Arrival times are the kernel's receive timestamps
//! (SO_TIMESTAMPNS, CLOCK_REALTIME), not the time `recv` returns; the receive buffer is raised to 4 MB (SO_RCVBUFFORCE as root, else SO_RCVBUF,
//! capped by net.core.rmem_max) so a receiver descheduled for a moment drops nothing.
//! `--warmup S` (default 0) leaves the packets arriving in the first S seconds out of the
//! delay and jitter statistics (not out of loss): ffmpeg sends its first frame a frame
//! period late, together with the next, which otherwise sets `max_ms` at 40 ms (25 fps) on
//! every run. Use `--warmup 1` and add the second to `--seconds`. `--idle FROM,UNTIL`
//! (seconds after the first packet, inside the warm-up) adds `idle_p50_ms`/`idle_p99_ms`:
//! the same stream's added delay before any load, the floor of the path.
//!
//! The JSON summary: `packets` (received, duplicates included), `expected`, `lost`,
//! `loss_pct`, `duplicates`, `reordered`, `p50_ms`, `p90_ms`, `p99_ms`, `max_ms` (added
//! delay: transit minus the run's minimum transit, nearest rank), `jitter_ms` (RFC 3550 J at
//! the end), `mean_abs_d_ms`, `bytes`, `bitrate_bps`, `duration_s`, `non_rtp`, `ssrcs` (the
//! same per SSRC, with payload type), `delay_samples` (packets in the delay statistics). All
//! numbers are 0 when nothing arrived. `--timeline` writes `seconds-since-first-packet
//! added-delay-ms` pairs, one per line (the delay over time). `--samples` writes the added delays in ms, one per
//! line, in arrival order (for CDF plots).
//!
//! A sender, verified on loopback with ffmpeg 5.1 (Debian 12). Pre-encode a clip with no
//! B-frames — with B-frames the RTP timestamps (presentation times) are not monotonic in
//! send order and the transit of reordered frames is off by up to a few frame periods:
//!
//! ```text
//! ffmpeg -f lavfi -i testsrc2=size=640x360:rate=25 -t 20 -c:v libx264 -preset ultrafast \
//!        -tune zerolatency -bf 0 -g 50 -b:v 1200k -maxrate 1200k -bufsize 600k \
//!        -pix_fmt yuv420p clip.mp4
//! ```
//!
//! then send it in real time without re-encoding, packets of at most 1200 bytes (ffmpeg's
//! default RTP packet size is 1472 bytes of UDP payload, which fits a 1500 MTU but not a
//! PPPoE/VPN path; `?pkt_size=1200` keeps every datagram well below any MTU on the way):
//!
//! ```text
//! ffmpeg -hide_banner -loglevel error -re -i clip.mp4 -c copy -an \
//!        -f rtp 'rtp://127.0.0.1:5004?pkt_size=1200'
//! ```
//!
//! ffmpeg sends RTCP sender reports to port + 1 (5005); they do not reach this socket. The
//! payload type is 96, clock rate 90 kHz. Each frame leaves as a burst of packets with one
//! timestamp (an I-frame's serialisation on a slow line shows as added delay of its later
//! packets, as it would for a real codec).
//!
//! Sender floor. `-re` is coarse: ffmpeg 5.1 polls its rate emulation and sleeps 10 ms when
//! the next packet is not due yet, so frames leave 0-10 ms after their time. On an idle
//! loopback this sender alone gives an added delay uniform over 0-10 ms (measured with
//! `--seconds 21 --warmup 1`: 3058 packets, 0 lost, p50 5.25, p90 9.17, p99 10.06, max
//! 10.79 ms, jitter 0.07 ms, 1232 kbit/s; without `--warmup` max 40.3 ms from the first
//! frame). Differences smaller than 10 ms are below this sender's resolution. A sender that
//! paces precisely, at the cost of encoding live (about 5 % of one core at 640x360), is the
//! `realtime` filter, which sleeps until each frame's time:
//!
//! ```text
//! ffmpeg -hide_banner -loglevel error -f lavfi -i 'testsrc2=size=640x360:rate=25,realtime' \
//!        -t 20 -c:v libx264 -preset ultrafast -tune zerolatency -bf 0 -g 50 -b:v 1200k \
//!        -maxrate 1200k -bufsize 600k -pix_fmt yuv420p -an \
//!        -f rtp 'rtp://127.0.0.1:5004?pkt_size=1200'
//! ```
//!
//! (loopback, `-t 12`, `--seconds 13 --warmup 1`: 1840 packets, 0 lost, p50 0.48, p90
//! 0.92, p99 1.37, max 5.56 ms, jitter 0.05 ms; without `--warmup` p99 4.0 and max 8.7 ms
//! from the encoder's start).

use std::fs;
use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::json;
use shaper_tests::rtp::{RtpStats, VIDEO_CLOCK_RATE};

const RCVBUF: libc::c_int = 4 * 1024 * 1024;

struct Args {
    listen: SocketAddr,
    seconds: f64,
    out: String,
    samples: Option<String>,
    timeline: Option<String>,
    clock_rate: u32,
    warmup: f64,
    idle: Option<(f64, f64)>,
}

fn usage() -> &'static str {
    "usage: shaper-rtp-rx --listen ADDR:PORT [--seconds 30] --out summary.json \
     [--samples delays.txt] [--timeline t-delays.txt] [--clock-rate 90000] [--warmup 0] \
     [--idle FROM,UNTIL]"
}

fn parse_args() -> Result<Args> {
    let mut listen = None;
    let mut seconds: f64 = 30.0;
    let mut out = None;
    let mut samples = None;
    let mut timeline = None;
    let mut clock_rate = VIDEO_CLOCK_RATE;
    let mut warmup: f64 = 0.0;
    let mut idle = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--listen" => listen = Some(val()?.parse().context("--listen: ADDR:PORT")?),
            "--seconds" => seconds = val()?.parse().context("--seconds: a number")?,
            "--out" => out = Some(val()?),
            "--samples" => samples = Some(val()?),
            "--timeline" => timeline = Some(val()?),
            "--clock-rate" => clock_rate = val()?.parse().context("--clock-rate: an integer")?,
            "--warmup" => warmup = val()?.parse().context("--warmup: seconds")?,
            "--idle" => {
                let v = val()?;
                let (a, b) = v
                    .split_once(',')
                    .context("--idle: FROM,UNTIL in seconds after the first packet")?;
                idle = Some((
                    a.trim().parse().context("--idle: FROM")?,
                    b.trim().parse().context("--idle: UNTIL")?,
                ));
            }
            "-h" | "--help" => {
                println!("{}", usage());
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}\n{}", usage()),
        }
    }
    let (Some(listen), Some(out)) = (listen, out) else {
        bail!("--listen and --out are required\n{}", usage());
    };
    if seconds.is_nan() || seconds <= 0.0 || clock_rate == 0 {
        bail!("--seconds and --clock-rate must be positive");
    }
    if !(0.0..seconds).contains(&warmup) {
        bail!("--warmup must be at least 0 and less than --seconds");
    }
    Ok(Args {
        listen,
        seconds,
        out,
        samples,
        timeline,
        clock_rate,
        warmup,
        idle,
    })
}

/// CLOCK_REALTIME, the clock of the kernel's SO_TIMESTAMPNS receive timestamps.
fn realtime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Asks the kernel to stamp each datagram when it arrives (SO_TIMESTAMPNS), so a receiver
/// that is scheduled late (a busy VM) does not add its own delay to the figures.
fn enable_timestamps(sock: &UdpSocket) -> bool {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt reads an int we own.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            &on as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

/// One datagram and its kernel receive time (the time of return when there is none).
fn recv_stamped(sock: &UdpSocket, buf: &mut [u8]) -> std::io::Result<(usize, u64)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut control = [0u64; 16];
    // SAFETY: msghdr is plain data; the pointers below stay valid for the recvmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: msg points at buffers we own.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut stamp = None;
    // SAFETY: walking the control messages the kernel wrote into `control`.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::timespec);
                stamp = Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64);
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n as usize, stamp.unwrap_or_else(realtime_ns)))
}

/// Raises the receive buffer; returns what the kernel reports (twice the usable size).
fn raise_rcvbuf(sock: &UdpSocket) -> libc::c_int {
    let fd = sock.as_raw_fd();
    let size = RCVBUF;
    let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: setsockopt reads an int we own.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                &size as *const _ as *const libc::c_void,
                len,
            )
        };
        if rc == 0 {
            break;
        }
    }
    let mut got: libc::c_int = 0;
    let mut got_len = len;
    // SAFETY: getsockopt writes an int we own.
    unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &mut got as *mut _ as *mut libc::c_void,
            &mut got_len,
        )
    };
    got
}

fn run(args: &Args) -> Result<()> {
    let sock = UdpSocket::bind(args.listen).with_context(|| format!("binding {}", args.listen))?;
    let rcvbuf = raise_rcvbuf(&sock);
    if !enable_timestamps(&sock) {
        eprintln!("shaper-rtp-rx: no SO_TIMESTAMPNS; using the time recv returns");
    }
    eprintln!(
        "shaper-rtp-rx: listening on {} (SO_RCVBUF {} bytes), {} s from the first packet \
         (warm-up {} s)",
        args.listen, rcvbuf, args.seconds, args.warmup
    );
    let run_ns = (args.seconds * 1e9) as u64;
    let start = realtime_ns();
    let mut stats = RtpStats::new(args.clock_rate).with_warmup_ns((args.warmup * 1e9) as u64);
    if let Some((a, b)) = args.idle {
        stats = stats.with_idle_window_ns((a * 1e9) as u64, (b * 1e9) as u64);
    }
    let mut buf = vec![0u8; 65536];
    loop {
        let now = realtime_ns();
        let deadline = match stats.first_arrival_ns() {
            Some(first) => first + run_ns,
            None => start + 2 * run_ns,
        };
        if now >= deadline {
            break;
        }
        let wait = (deadline - now).clamp(1_000_000, 200_000_000);
        sock.set_read_timeout(Some(Duration::from_nanos(wait)))?;
        match recv_stamped(&sock, &mut buf) {
            Ok((n, arrival)) => {
                stats.push(arrival, &buf[..n]);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("recv"),
        }
    }

    let sum = stats.summary();
    let mut j = sum.to_json();
    j["ssrcs"] = stats
        .per_ssrc()
        .into_iter()
        .map(|(ssrc, pt, s)| {
            let mut o = s.to_json();
            o["ssrc"] = json!(format!("{ssrc:#010x}"));
            o["payload_type"] = json!(pt);
            o
        })
        .collect();
    fs::write(&args.out, serde_json::to_string_pretty(&j)? + "\n")
        .with_context(|| format!("writing {}", args.out))?;
    if let Some(path) = &args.samples {
        let mut text = String::new();
        for d in stats.added_delays_ms() {
            text.push_str(&format!("{d:.3}\n"));
        }
        fs::write(path, text).with_context(|| format!("writing {path}"))?;
    }
    if let Some(path) = &args.timeline {
        let mut text = String::new();
        for (t, d) in stats.timeline() {
            text.push_str(&format!("{t:.4} {d:.3}\n"));
        }
        fs::write(path, text).with_context(|| format!("writing {path}"))?;
    }
    if sum.packets == 0 {
        println!(
            "no RTP packets in {:.0} s ({} non-RTP datagrams)",
            2.0 * args.seconds,
            sum.non_rtp
        );
    } else {
        println!(
            "packets {} expected {} lost {} ({:.2} %) dup {} reordered {} | added delay \
             p50 {:.2} p90 {:.2} p99 {:.2} max {:.2} ms | jitter {:.3} ms mean|D| {:.3} ms | \
             {:.0} kbit/s over {:.1} s | non-RTP {}",
            sum.packets,
            sum.expected,
            sum.lost,
            sum.loss_pct,
            sum.duplicates,
            sum.reordered,
            sum.p50_ms,
            sum.p90_ms,
            sum.p99_ms,
            sum.max_ms,
            sum.jitter_ms,
            sum.mean_abs_d_ms,
            sum.bitrate_bps / 1e3,
            sum.duration_s,
            sum.non_rtp
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("shaper-rtp-rx: {e:#}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shaper-rtp-rx: {e:#}");
            ExitCode::FAILURE
        }
    }
}
