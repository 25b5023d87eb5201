//! `shaper line probe`: what the line adds to each packet, measured through it.
//!
//! A site rarely knows its line's encapsulation, and getting the per-packet overhead
//! wrong by a few bytes on a slow line gives the modem a queue again (measured: 14 bytes
//! low on an ADSL 1 Mbit/s upload took the video's p99 from 3-5 ms to 260-390 ms). The
//! probe sends trains of ICMP echo requests of one IP size `S` back to back to a
//! reflector beyond the line and times the replies as they come back. Behind the modem
//! the train leaves at the line's pace, one packet per `t(S)` = bytes on the line / line
//! rate, and the replies keep that spacing on the way back (the download is faster), so
//! the slope of reply arrival time over packet index is `t(S)`.
//!
//! - **ATM** (ADSL) carries each packet, plus its encapsulation `o`, in 48-byte cell
//!   payloads of 53-byte cells: `t(S) = k * ceil((S + o) / 48)`, a staircase with a step
//!   every 48 bytes of `S`. Where the steps fall gives `o` modulo 48; the height of the
//!   steps against their level (the fit has no constant term) tells `o` from `o + 48`.
//! - **PTM** (VDSL2, EFM) and Ethernet carry bytes: `t(S) = k * (S + o)`, a straight line
//!   whose intercept over its slope is `o`.
//!
//! The line type is the model that fits markedly better; the ATM overhead is the best
//! staircase (the highest of any that fit as well, so a doubt errs high). A PTM line gets
//! the conservative `vdsl2` overhead (34): its intercept is measured and shown but scatters
//! by tens of bytes here, too far to use. This is the method of the published ATM overhead detectors (sized probes,
//! steps at cell boundaries) with trains instead of single round trips, which needs no
//! idle line for its absolute figures and sees through a modem's token bucket (its burst
//! passes the first packets of a train unspaced; only the train's second half is used).
//!
//! The requests are sent on an `AF_PACKET` socket with `PACKET_QDISC_BYPASS`, so the
//! box's own shaper (HTB on the WAN interface) does not pace them: the probe can run while
//! the site is being shaped. Only Ethernet WAN interfaces and IPv4 reflectors.

use std::ffi::OsString;
use std::fs::File;
use std::io::{IoSliceMut, Read};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::ifaddrs::getifaddrs;
use nix::net::if_::if_nametoindex;
use nix::poll::{poll, PollFd, PollFlags};
use nix::sys::socket::{
    bind, recvmsg, send, setsockopt, socket, sockopt, AddressFamily, ControlMessageOwned, LinkAddr,
    MsgFlags, SetSockOpt, SockFlag, SockProtocol, SockType,
};
use nix::sys::time::TimeSpec;
use nix::{cmsg_space, setsockopt_impl, sockopt_impl};

/// One IP size and the per-packet time the line gave it (median over its trains), s.
pub type Sample = (u32, f64);

/// What the line looks like.
#[derive(Debug, Clone, PartialEq)]
pub struct Fit {
    pub atm: bool,
    /// Bytes added to each IP packet (CAKE's `overhead`).
    pub overhead: i32,
    /// Line rate in bits/s of what the line carries (cells on ATM, bytes + overhead on
    /// PTM: the 64/65 coding of PTM is inside this figure).
    pub rate_bps: f64,
    /// Residual of the staircase fit over that of the straight line (ATM if well below 1).
    pub atm_vs_linear: f64,
    /// Other ATM overheads that fit within 10 % of the best (a doubt; the highest is taken).
    pub ambiguous: Vec<i32>,
    /// The PTM overhead as measured, before the margin (= `overhead` on ATM).
    pub overhead_estimate: f64,
    /// Standard error of the PTM overhead estimate, bytes (0 on ATM).
    pub overhead_stderr: f64,
    pub samples: usize,
}

/// ATM if its staircase leaves at most this share of the straight line's residual.
const ATM_RATIO: f64 = 0.35;
/// The overhead the probe gives a PTM/Ethernet line: the `vdsl2` preset (PPPoE with a
/// VLAN tag), above every PTM encapsulation we name. Timing cannot pin a PTM overhead down:
/// in the lab, modems at 22 and 30 bytes read anywhere from 25 to 69 and 29 to 31 (a byte
/// is 0.8 us at 10 Mbit/s and the modem's release times wobble by microseconds), so the
/// estimate is shown, never used.
const PTM_CONSERVATIVE: i32 = 34;
/// ATM overheads considered (bytes per IP packet).
const ATM_OVERHEADS: std::ops::RangeInclusive<i32> = 0..=127;

fn cells(size: u32, overhead: i32) -> f64 {
    ((size as i64 + overhead as i64 + 47) / 48).max(1) as f64
}

/// Weighted least squares through the origin of `t = k * x`: (k, weighted residual).
fn fit_origin(xs: &[f64], ts: &[f64], ws: &[f64]) -> (f64, f64) {
    let sxx: f64 = xs.iter().zip(ws).map(|(x, w)| w * x * x).sum();
    let sxt: f64 = xs.iter().zip(ts).zip(ws).map(|((x, t), w)| w * x * t).sum();
    let k = if sxx > 0.0 { sxt / sxx } else { 0.0 };
    let sse = xs
        .iter()
        .zip(ts)
        .zip(ws)
        .map(|((x, t), w)| w * (t - k * x).powi(2))
        .sum();
    (k, sse)
}

/// Fits both line models to `samples`. `None` with fewer than 8 sizes.
///
/// Residuals are weighted by 1/t^2 (relative errors): a train's timing error grows with
/// the time it measures, and the small sizes, where the cell steps are large against the
/// level, must count as much as the large ones.
pub fn fit(samples: &[Sample]) -> Option<Fit> {
    if samples.len() < 8 || samples.iter().any(|s| !(s.1 > 0.0 && s.1.is_finite())) {
        return None;
    }
    let ts: Vec<f64> = samples.iter().map(|s| s.1).collect();
    let ws: Vec<f64> = ts.iter().map(|t| 1.0 / (t * t)).collect();
    let xs: Vec<f64> = samples.iter().map(|s| s.0 as f64).collect();
    // Straight line t = a + b S (weighted).
    let Wls {
        a, b, sse: lin_sse, ..
    } = wls(&xs, &ts, &ws)?;
    // Staircases.
    let mut atm: Vec<(i32, f64, f64)> = ATM_OVERHEADS
        .map(|o| {
            let cs: Vec<f64> = samples.iter().map(|s| cells(s.0, o)).collect();
            let (k, sse) = fit_origin(&cs, &ts, &ws);
            (o, k, sse)
        })
        .collect();
    atm.sort_by(|x, y| x.2.total_cmp(&y.2));
    let best = atm[0];
    let ratio = if lin_sse > 0.0 {
        best.2 / lin_sse
    } else {
        f64::INFINITY
    };
    if ratio <= ATM_RATIO && best.1 > 0.0 {
        let near: Vec<i32> = atm
            .iter()
            .filter(|c| c.2 <= best.2 * 1.1 + f64::EPSILON)
            .map(|c| c.0)
            .collect();
        let pick = near.iter().copied().max().unwrap_or(best.0);
        let k = atm.iter().find(|c| c.0 == pick).map_or(best.1, |c| c.1);
        return Some(Fit {
            atm: true,
            overhead: pick,
            rate_bps: 53.0 * 8.0 / k,
            atm_vs_linear: ratio,
            ambiguous: near.into_iter().filter(|&o| o != pick).collect(),
            overhead_estimate: pick as f64,
            overhead_stderr: 0.0,
            samples: samples.len(),
        });
    }
    // A straight line. Trains whose replies were bunched on the way back (the box busy
    // when they arrived) read faster than the line: drop the samples more than 3 robust
    // standard deviations off the first fit, then fit again.
    let rel: Vec<f64> = xs
        .iter()
        .zip(&ts)
        .map(|(x, t)| (t - a - b * x) / t)
        .collect();
    let mut abs: Vec<f64> = rel.iter().map(|r| r.abs()).collect();
    abs.sort_by(|x, y| x.total_cmp(y));
    let cut = (3.0 * 1.4826 * abs[abs.len() / 2]).max(0.002);
    let keep: Vec<usize> = (0..xs.len()).filter(|&i| rel[i].abs() <= cut).collect();
    let pick = |v: &[f64]| -> Vec<f64> { keep.iter().map(|&i| v[i]).collect() };
    let (xs, ts, ws) = (pick(&xs), pick(&ts), pick(&ws));
    let l = wls(&xs, &ts, &ws)?;
    if l.b <= 0.0 {
        return None;
    }
    // o = a / b; its standard error from those of a and b (their covariance included).
    let n = xs.len() as f64;
    let s2 = l.sse / (n - 2.0).max(1.0);
    let var_b = s2 / l.sxx;
    let var_a = s2 * (1.0 / l.sw + l.mx * l.mx / l.sxx);
    let cov_ab = -l.mx * s2 / l.sxx;
    let o = l.a / l.b;
    let var_o = (var_a + o * o * var_b - 2.0 * o * cov_ab) / (l.b * l.b);
    Some(Fit {
        atm: false,
        // The estimate is too unsteady to use (see PTM_CONSERVATIVE).
        overhead: PTM_CONSERVATIVE,
        rate_bps: 8.0 / l.b,
        atm_vs_linear: ratio,
        ambiguous: Vec::new(),
        overhead_estimate: o,
        overhead_stderr: var_o.max(0.0).sqrt(),
        samples: xs.len(),
    })
}

/// A weighted straight-line fit `t = a + b x` and the sums its errors need.
struct Wls {
    a: f64,
    b: f64,
    sse: f64,
    sw: f64,
    mx: f64,
    sxx: f64,
}

fn wls(xs: &[f64], ts: &[f64], ws: &[f64]) -> Option<Wls> {
    let sw: f64 = ws.iter().sum();
    if xs.len() < 3 || sw <= 0.0 {
        return None;
    }
    let mx = xs.iter().zip(ws).map(|(x, w)| w * x).sum::<f64>() / sw;
    let mt = ts.iter().zip(ws).map(|(t, w)| w * t).sum::<f64>() / sw;
    let sxx: f64 = xs.iter().zip(ws).map(|(x, w)| w * (x - mx).powi(2)).sum();
    let sxt: f64 = xs
        .iter()
        .zip(ts)
        .zip(ws)
        .map(|((x, t), w)| w * (x - mx) * (t - mt))
        .sum();
    if sxx <= 0.0 {
        return None;
    }
    let b = sxt / sxx;
    let a = mt - b * mx;
    let sse = xs
        .iter()
        .zip(ts)
        .zip(ws)
        .map(|((x, t), w)| w * (t - a - b * x).powi(2))
        .sum();
    Some(Wls {
        a,
        b,
        sse,
        sw,
        mx,
        sxx,
    })
}

impl Fit {
    /// The lines to put in `[upload]` and `[download]`.
    pub fn config_lines(&self) -> String {
        let preset = match (self.atm, self.overhead) {
            (true, 10) => Some("adsl2-pppoa"),
            (true, 40) => Some("adsl2-pppoe"),
            (false, PTM_CONSERVATIVE) => Some("vdsl2"),
            _ => None,
        };
        match preset {
            Some(p) => format!("line = \"{p}\""),
            None => format!(
                "framing = \"{}\"\noverhead = {}",
                if self.atm { "atm" } else { "ptm" },
                self.overhead.clamp(-64, 256)
            ),
        }
    }

    pub fn describe(&self) -> String {
        let mut s = if self.atm {
            format!(
                "ATM cells (staircase residual {:.0} % of a straight line's), overhead {} bytes per IP packet, line {:.0} kbit/s of cells",
                self.atm_vs_linear * 100.0,
                self.overhead,
                self.rate_bps / 1e3
            )
        } else {
            format!(
                "PTM or Ethernet (no cell steps: staircase residual {:.0} % of a straight line's), overhead {} bytes per IP packet: the conservative `vdsl2` preset, since timing cannot tell PTM overheads apart (measured {:.1} +- {:.1}, for information only; a lower `line` only if the ISP confirms it), line {:.0} kbit/s",
                self.atm_vs_linear * 100.0,
                self.overhead,
                self.overhead_estimate,
                self.overhead_stderr,
                self.rate_bps / 1e3
            )
        };
        if !self.ambiguous.is_empty() {
            s.push_str(&format!(
                "; overheads {:?} fit about as well (the highest is given)",
                self.ambiguous
            ));
        }
        s
    }
}

/// What to send.
#[derive(Debug, Clone)]
pub struct ProbeOpts {
    pub interface: String,
    pub reflector: Ipv4Addr,
    /// Trains per size.
    pub trains: u32,
    /// IP sizes: every byte over two cells (fine steps), then coarser up to the MTU.
    pub sizes: Vec<u32>,
    /// Wait this long for a train's last reply.
    pub timeout: Duration,
    /// Trains this many times the usual length (see [`train_len`]).
    pub length: usize,
}

impl ProbeOpts {
    pub fn new(interface: &str, reflector: Ipv4Addr) -> Self {
        let mut sizes: Vec<u32> = (100..=196).collect();
        sizes.extend((240..=1400).step_by(40));
        ProbeOpts {
            interface: interface.to_string(),
            reflector,
            trains: 3,
            sizes,
            timeout: Duration::from_millis(1500),
            length: 1,
        }
    }
}

/// Packets in a train of IP size `size`: enough that its second half is paced by the
/// line even behind a modem bucket of a few frames.
fn train_len(size: u32) -> usize {
    (8 + 8000 / size as usize).min(100)
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += w as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet frame holding an ICMP echo request of IP size `size`.
pub fn echo_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ident: u16,
    seq: u16,
    size: u32,
) -> Vec<u8> {
    let size = size.clamp(28, 1500) as usize;
    let mut f = Vec::with_capacity(14 + size);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(size as u16).to_be_bytes());
    ip[4..6].copy_from_slice(&seq.to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = 1;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut icmp = vec![0u8; size - 20];
    icmp[0] = 8;
    icmp[4..6].copy_from_slice(&ident.to_be_bytes());
    icmp[6..8].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in icmp[8..].iter_mut().enumerate() {
        *b = i as u8;
    }
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&icmp);
    f
}

fn read_small(path: &str) -> Result<String> {
    let mut s = String::new();
    File::open(path)
        .and_then(|mut f| f.read_to_string(&mut s))
        .with_context(|| format!("reading {path}"))?;
    Ok(s)
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut m = [0u8; 6];
    let mut parts = s.trim().split(':');
    for b in &mut m {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(m)
}

/// The next hop towards `dst` on `iface` from /proc/net/route (longest prefix; the
/// destination itself on a directly connected subnet).
fn next_hop(iface: &str, dst: Ipv4Addr) -> Result<Ipv4Addr> {
    let table = read_small("/proc/net/route")?;
    let d = u32::from(dst);
    let mut best: Option<(u32, Ipv4Addr)> = None;
    for l in table.lines().skip(1) {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 8 || f[0] != iface {
            continue;
        }
        let hex = |s: &str| u32::from_str_radix(s, 16).ok().map(u32::from_be);
        let (Some(net), Some(gw), Some(mask)) = (hex(f[1]), hex(f[2]), hex(f[7])) else {
            continue;
        };
        if d & mask == net & mask && best.is_none_or(|b| mask.count_ones() > b.0) {
            let hop = if gw == 0 { dst } else { Ipv4Addr::from(gw) };
            best = Some((mask.count_ones(), hop));
        }
    }
    best.map(|b| b.1)
        .with_context(|| format!("no route to {dst} on {iface}"))
}

fn neighbour_mac(iface: &str, ip: Ipv4Addr) -> Result<Option<[u8; 6]>> {
    let arp = read_small("/proc/net/arp")?;
    for l in arp.lines().skip(1) {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() >= 6 && f[5] == iface && f[0] == ip.to_string() {
            let flags = u32::from_str_radix(f[2].trim_start_matches("0x"), 16).unwrap_or(0);
            if flags & 0x2 != 0 {
                return Ok(parse_mac(f[3]));
            }
        }
    }
    Ok(None)
}

/// (ARPHRD type, MAC address, link-layer address to bind a packet socket to) of `iface`,
/// from the kernel's link list of this network namespace (getifaddrs, over netlink: /sys
/// may show another namespace's devices).
fn link(iface: &str) -> Result<(u16, [u8; 6], LinkAddr)> {
    let found = getifaddrs()
        .map_err(std::io::Error::from)
        .context("listing interfaces")?
        .filter(|a| a.interface_name == iface)
        .find_map(|a| a.address.and_then(|s| s.as_link_addr().copied()));
    match (found, if_nametoindex(iface)) {
        (Some(l), _) => Ok((l.hatype(), l.addr().unwrap_or_default(), l)),
        // A link with no hardware address (tun, WireGuard) is listed without one.
        (None, Ok(_)) => {
            bail!("{iface} is not an Ethernet interface (no hardware address): {NOT_ETHERNET}")
        }
        (None, Err(e)) => {
            Err(std::io::Error::from(e)).with_context(|| format!("no interface {iface}"))
        }
    }
}

/// Why a non-Ethernet interface is refused.
const NOT_ETHERNET: &str = "the probe sends Ethernet frames past the shaper; run it on the Ethernet port towards the modem";

/// A socket (close-on-exec, as every socket here), its errors as the kernel's errno.
fn sock(domain: AddressFamily, ty: SockType, proto: Option<SockProtocol>) -> Result<OwnedFd> {
    socket(domain, ty, SockFlag::SOCK_CLOEXEC, proto)
        .map_err(std::io::Error::from)
        .context("socket")
}

fn setopt<O: SetSockOpt>(fd: &OwnedFd, opt: O, v: &O::Val, what: &str) -> Result<()> {
    setsockopt(fd, opt, v)
        .map_err(std::io::Error::from)
        .with_context(|| format!("setsockopt {what}"))
}

// PACKET_QDISC_BYPASS, which nix does not name: its documented macro for the options it
// lacks (an int set to 1 for true, as setsockopt(2) takes it).
sockopt_impl!(
    /// `PACKET_QDISC_BYPASS`: a packet socket's frames skip the interface's qdisc.
    PacketQdiscBypass,
    SetOnly,
    libc::SOL_PACKET,
    libc::PACKET_QDISC_BYPASS,
    bool
);

/// Reply arrival time (CLOCK_REALTIME from SO_TIMESTAMPNS, ns) and ICMP seq of each echo
/// reply with our identifier from `from`, until `want` arrived or `deadline`.
fn collect(
    fd: &OwnedFd,
    from: Ipv4Addr,
    ident: u16,
    train: u8,
    want: usize,
    deadline: Instant,
) -> Vec<(u16, i128)> {
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    // Room for the one control message the socket asks for (SO_TIMESTAMPNS).
    let mut cbuf = cmsg_space!(TimeSpec);
    while got.len() < want {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let ms = (deadline - now).as_millis().clamp(1, 1000) as u16;
        let mut pfd = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        if !matches!(poll(&mut pfd, ms), Ok(n) if n > 0) {
            continue;
        }
        loop {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let Ok(msg) = recvmsg::<()>(
                fd.as_raw_fd(),
                &mut iov,
                Some(&mut cbuf),
                MsgFlags::MSG_DONTWAIT,
            ) else {
                break;
            };
            let n = msg.bytes;
            if n == 0 {
                break;
            }
            let ts = msg.cmsgs().ok().and_then(|mut c| {
                c.find_map(|m| match m {
                    ControlMessageOwned::ScmTimestampns(t) => {
                        Some(i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec()))
                    }
                    _ => None,
                })
            });
            let Some(ts) = ts else { continue };
            // IPv4 header + ICMP echo reply.
            if n < 28 || buf[0] >> 4 != 4 {
                continue;
            }
            let ihl = ((buf[0] & 0xf) as usize) * 4;
            if n < ihl + 8 || buf[9] != 1 || buf[12..16] != from.octets() {
                continue;
            }
            let icmp = &buf[ihl..n];
            if icmp[0] != 0 || u16::from_be_bytes([icmp[4], icmp[5]]) != ident {
                continue;
            }
            let seq = u16::from_be_bytes([icmp[6], icmp[7]]);
            if (seq >> 9) as u8 != train & 0x7f {
                continue;
            }
            got.push((seq & 0x1ff, ts));
        }
    }
    got
}

/// Slope of arrival time over packet index of the train's second half, s per packet.
fn train_slope(replies: &[(u16, i128)], len: usize) -> Option<f64> {
    let pts: Vec<(f64, f64)> = replies
        .iter()
        .filter(|(i, _)| (*i as usize) >= len / 2)
        .map(|(i, t)| (*i as f64, *t as f64 * 1e-9))
        .collect();
    if pts.len() < 4 || pts.len() * 4 < (len - len / 2) * 3 {
        return None;
    }
    let n = pts.len() as f64;
    let mx = pts.iter().map(|p| p.0).sum::<f64>() / n;
    let mt = pts.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxt: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - mt)).sum();
    (sxx > 0.0).then(|| sxt / sxx)
}

/// Probes the line: one pass of `opts.trains` trains per size; where that shows no cell
/// steps (PTM or Ethernet, whose overhead sits in the intercept of a straight line and
/// wants more samples), a second pass of four times as many, which on such lines (fast)
/// costs seconds. Returns the per-size medians of every train and the fit.
pub fn probe_line(
    opts: &ProbeOpts,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Vec<Sample>, Fit)> {
    let slopes = probe(opts, progress)?;
    let too_few = || anyhow::anyhow!("too few probe sizes came back to fit a line");
    let first = fit(&medians(&slopes)).ok_or_else(too_few)?;
    if first.atm {
        return Ok((medians(&slopes), first));
    }
    // The straight line's intercept wants long trains over the whole range of sizes
    // (a modem releasing a packet late lets the next one go early: the error sits at a
    // train's ends) rather than every byte of two cells.
    let mut sizes: Vec<u32> = vec![100, 148, 196];
    sizes.extend(opts.sizes.iter().copied().filter(|&s| s > 196));
    let more = ProbeOpts {
        trains: opts.trains * 2,
        length: 4,
        sizes: sizes.clone(),
        ..opts.clone()
    };
    let long = probe(&more, progress)?;
    let samples = medians(&long);
    let f = fit(&samples).ok_or_else(too_few)?;
    Ok((samples, f))
}

fn medians(slopes: &[(u32, Vec<f64>)]) -> Vec<Sample> {
    slopes
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(size, v)| {
            let mut v = v.clone();
            v.sort_by(|a, b| a.total_cmp(b));
            (*size, v[v.len() / 2])
        })
        .collect()
}

/// Sends the trains; the slope of every train that got enough replies, per size.
pub fn probe(
    opts: &ProbeOpts,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<(u32, Vec<f64>)>> {
    let iface = opts.interface.as_str();
    // The link type, MAC address and index from the kernel (see `link`).
    let (kind, src_mac, link) = link(iface)?;
    if kind != libc::ARPHRD_ETHER {
        bail!("{iface} is not an Ethernet interface (ARPHRD {kind}): {NOT_ETHERNET}");
    }
    // The source address the kernel would use towards the reflector from this interface.
    let udp = UdpSocket::bind("0.0.0.0:0")?;
    setsockopt(&udp, sockopt::BindToDevice, &OsString::from(iface))
        .map_err(std::io::Error::from)
        .context("SO_BINDTODEVICE")?;
    udp.connect(SocketAddr::from((opts.reflector, 9)))
        .with_context(|| format!("no route to {} from {iface}", opts.reflector))?;
    let src = match udp.local_addr()?.ip() {
        std::net::IpAddr::V4(a) => a,
        _ => bail!("no IPv4 address on {iface}"),
    };
    let hop = next_hop(iface, opts.reflector)?;
    // Receive side first: the replies, kernel-timestamped on arrival.
    let rx = sock(AddressFamily::Inet, SockType::Raw, Some(SockProtocol::Icmp))?;
    setopt(&rx, sockopt::ReceiveTimestampns, &true, "SO_TIMESTAMPNS")?;
    setopt(&rx, sockopt::RcvBuf, &(4 << 20), "SO_RCVBUF")?;
    let ident = (std::process::id() & 0xffff) as u16;
    // The next hop's MAC: ask the kernel to resolve it with one ordinary echo request.
    let mut dst_mac = neighbour_mac(iface, hop)?;
    for _ in 0..3 {
        if dst_mac.is_some() {
            break;
        }
        let _ = udp.send(b"shaper line probe");
        std::thread::sleep(Duration::from_millis(300));
        dst_mac = neighbour_mac(iface, hop)?;
    }
    let dst_mac = dst_mac
        .with_context(|| format!("the next hop {hop} on {iface} has no resolved MAC address"))?;
    // Protocol 0: a packet socket that only sends.
    let tx = sock(AddressFamily::Packet, SockType::Raw, None)?;
    // The interface's link-layer address as the kernel listed it: family AF_PACKET, its
    // index and protocol 0, all that bind(2) reads of a sockaddr_ll.
    bind(tx.as_raw_fd(), &link)
        .map_err(std::io::Error::from)
        .context("binding the packet socket")?;
    setopt(&tx, PacketQdiscBypass, &true, "PACKET_QDISC_BYPASS")?;

    let total = opts.sizes.len() * opts.trains as usize;
    let mut done = 0;
    let mut train_no: u8 = 0;
    let mut samples = Vec::new();
    for &size in &opts.sizes {
        let len = (train_len(size) * opts.length.max(1)).min(400);
        let mut slopes = Vec::new();
        for _ in 0..opts.trains {
            train_no = train_no.wrapping_add(1);
            let frames: Vec<Vec<u8>> = (0..len)
                .map(|i| {
                    echo_frame(
                        dst_mac,
                        src_mac,
                        src,
                        opts.reflector,
                        ident,
                        ((train_no & 0x7f) as u16) << 9 | i as u16,
                        size,
                    )
                })
                .collect();
            for f in &frames {
                // Unchecked, as ever: a frame the kernel refuses is a reply that never comes.
                let _ = send(tx.as_raw_fd(), f, MsgFlags::empty());
            }
            let replies = collect(
                &rx,
                opts.reflector,
                ident,
                train_no,
                len,
                Instant::now() + opts.timeout,
            );
            if let Some(s) = train_slope(&replies, len) {
                slopes.push(s);
            }
            done += 1;
            progress(done, total);
            // Let the line drain before the next train.
            std::thread::sleep(Duration::from_millis(20));
        }
        if !slopes.is_empty() {
            samples.push((size, slopes));
        }
    }
    if samples.len() < opts.sizes.len() / 2 {
        bail!(
            "only {} of {} sizes got their replies back from {}: does it answer pings (and is the line up)?",
            samples.len(),
            opts.sizes.len(),
            opts.reflector
        );
    }
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Noise-free and noisy synthetic lines of each kind are recognised with their overhead.
    fn synth(atm: bool, overhead: i32, bps: f64, noise: f64, seed: u64) -> Vec<Sample> {
        let opts = ProbeOpts::new("x", Ipv4Addr::LOCALHOST);
        let mut x = seed;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 2001) as f64 / 1000.0 - 1.0
        };
        opts.sizes
            .iter()
            .map(|&s| {
                let bytes = if atm {
                    cells(s, overhead) * 53.0
                } else {
                    (s as i32 + overhead) as f64 * 65.0 / 64.0
                };
                let t = bytes * 8.0 / bps;
                (s, t * (1.0 + noise * rnd()))
            })
            .collect()
    }

    #[test]
    fn atm_overheads_are_found() {
        for o in [10, 32, 40, 44] {
            for (bps, noise) in [(1e6, 0.0), (1e6, 0.03), (12e6, 0.05)] {
                let f = fit(&synth(true, o, bps, noise, 7 + o as u64)).expect("fit");
                assert!(f.atm, "overhead {o}: {f:?}");
                assert_eq!(f.overhead, o, "{bps} {noise}: {f:?}");
                assert!((f.rate_bps / bps - 1.0).abs() < 0.02, "{f:?}");
            }
        }
    }

    #[test]
    fn ptm_lines_are_told_from_atm_and_given_the_conservative_overhead() {
        for o in [22, 30] {
            for (bps, noise) in [(10e6, 0.0), (10e6, 0.01), (2e6, 0.02)] {
                let f = fit(&synth(false, o, bps, noise, 3 + o as u64)).expect("fit");
                assert!(!f.atm, "overhead {o}: {f:?}");
                assert_eq!(f.overhead, PTM_CONSERVATIVE, "{f:?}");
                assert_eq!(f.config_lines(), "line = \"vdsl2\"");
                if noise == 0.0 {
                    assert!((f.overhead_estimate - o as f64).abs() < 1.0, "{f:?}");
                }
            }
        }
    }

    #[test]
    fn presets_are_named() {
        let f = fit(&synth(true, 10, 1e6, 0.0, 1)).expect("fit");
        assert_eq!(f.config_lines(), "line = \"adsl2-pppoa\"");
        let f = fit(&synth(true, 44, 1e6, 0.0, 1)).expect("fit");
        assert_eq!(f.config_lines(), "framing = \"atm\"\noverhead = 44");
    }

    #[test]
    fn frames_carry_valid_checksums() {
        let f = echo_frame(
            [1; 6],
            [2; 6],
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
            7,
            0x0102,
            100,
        );
        assert_eq!(f.len(), 114);
        assert_eq!(checksum(&f[14..34]), 0);
        assert_eq!(checksum(&f[34..]), 0);
        assert_eq!(u16::from_be_bytes([f[16], f[17]]), 100);
    }

    #[test]
    fn train_slope_uses_the_paced_half() {
        // First half unspaced (a modem's bucket), second half 1 ms apart.
        let replies: Vec<(u16, i128)> = (0..20u16)
            .map(|i| {
                (
                    i,
                    if i < 10 {
                        0
                    } else {
                        (i as i128 - 9) * 1_000_000
                    },
                )
            })
            .collect();
        let s = train_slope(&replies, 20).expect("slope");
        assert!((s - 1e-3).abs() < 1e-9, "{s}");
    }
}
