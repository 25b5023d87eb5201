//! Per-call media quality (issue 17): RTP/SRTP streams found by their headers (plain or
//! in TURN ChannelData), measured as a receiver measures them (RFC 3550 loss, reordering,
//! duplicates, interarrival jitter), grouped into calls, and scored with G.107's E-model.
//!
//! The per-stream algorithm is `shaper_common::media` (the classifier runs the same code);
//! this module is what sits around it in user space:
//! - [`rtp`]: the headers (no payload is read).
//! - [`stream`]: a UDP flow's streams fed from captured packets.
//! - [`calls`]: streams (from packets, or the kernel's snapshots) grouped into calls and
//!   the record of each.
//! - [`emodel`]: R and MOS; [`report`]: ended calls by day and hour.
//!
//! [`from_capture`] runs a pcap through them (`shaper calls --pcap`); `shaper run` feeds
//! the kernel's streams once a second (`calls_task`).

pub mod calls;
pub mod emodel;
pub mod report;
pub mod rtp;
pub mod stream;
#[cfg(test)]
mod tests;

use std::net::{IpAddr, SocketAddr};

pub use calls::{Addresses, CallRecord, Calls, DirQuality};

use crate::dir::Dir;
use crate::explain::{frame::parse_frame, pcap, Parsed};
use crate::rule::cidrs_accept;
use crate::units::Cidr;

/// Whether `a` is on the site's side: in one of `lan`, or (with `lan` empty) a private,
/// unique-local or link-local address.
pub fn on_lan(a: IpAddr, lan: &[Cidr]) -> bool {
    if !lan.is_empty() {
        return cidrs_accept(lan, a);
    }
    match a {
        IpAddr::V4(v) => v.is_private() || v.is_link_local(),
        IpAddr::V6(v) => {
            (v.segments()[0] & 0xfe00) == 0xfc00 || (v.segments()[0] & 0xffc0) == 0xfe80
        }
    }
}

/// The calls in a classic pcap taken anywhere between the site's hosts and the line:
/// each UDP packet with one end on the LAN ([`on_lan`]) and one off it goes up (from
/// the LAN end) or down. Calls are ended as `quiet_ns` passes in the capture's time, and
/// the rest at its end.
pub fn from_capture(
    cap: &pcap::Capture,
    lan: &[Cidr],
    quiet_ns: u64,
    addresses: Addresses,
) -> Result<Vec<CallRecord>, String> {
    let l2 = match cap.linktype {
        pcap::LINKTYPE_ETHERNET => true,
        pcap::LINKTYPE_RAW | pcap::LINKTYPE_IPV4 | pcap::LINKTYPE_IPV6 => false,
        other => return Err(format!("link type {other} (Ethernet or raw IP only)")),
    };
    let mut calls = Calls::new(quiet_ns, addresses);
    let mut out = Vec::new();
    let mut last_expiry = 0;
    for r in &cap.records {
        let frac_ns = if cap.nanos {
            r.ts_frac
        } else {
            r.ts_frac.saturating_mul(1000)
        };
        let now = u64::from(r.ts_sec) * 1_000_000_000 + u64::from(frac_ns);
        // The direction given to the parser does not matter here; the addresses decide.
        let Parsed::Ip(p) = parse_frame(&r.data, l2, Dir::Up) else {
            continue;
        };
        let (Some(sport), Some(dport), Some((start, end))) = (p.sport, p.dport, p.l4) else {
            continue;
        };
        if p.proto != 17 || start + 8 > end {
            continue;
        }
        // Calls quiet for long enough end before this packet can join them.
        if now >= last_expiry + 1_000_000_000 {
            out.extend(calls.expire(now));
            last_expiry = now;
        }
        let udp = &r.data[start + 8..end];
        let (src, dst) = (SocketAddr::new(p.src, sport), SocketAddr::new(p.dst, dport));
        match (on_lan(p.src, lan), on_lan(p.dst, lan)) {
            (true, false) => calls.packet(now, Dir::Up, src, dst, udp),
            (false, true) => calls.packet(now, Dir::Down, dst, src, udp),
            _ => continue,
        }
    }
    out.extend(calls.finish());
    Ok(out)
}

/// Calls as a table, one line per call and direction.
pub fn render(calls: &[CallRecord]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if calls.is_empty() {
        out.push_str("no calls (no RTP stream passed validation with at least 50 packets)\n");
        return out;
    }
    let _ = writeln!(
        out,
        "{:<12} {:>8}  {:<16} {:<16} {:<4} {:>7} {:>8} {:>9} {:>9} {:>4}  where",
        "start (UTC)",
        "seconds",
        "LAN host",
        "peer",
        "dir",
        "packets",
        "loss %",
        "jitter ms",
        "kbit/s",
        "MOS"
    );
    for c in calls {
        let t = c.start_s as u64 % 86_400;
        let start = format!("{:02}:{:02}:{:02}", t / 3600, t / 60 % 60, t % 60);
        for (d, q) in [("up", &c.up), ("down", &c.down)] {
            if q.streams == 0 {
                continue;
            }
            let jitter = q.jitter_ms.map_or("-".to_string(), |j| format!("{j:.1}"));
            let line = match (q.line_full_pct, q.rate_held_pct) {
                (Some(f), Some(h)) if h > 0.0 => format!(
                    "; line full {f:.0} %, rate held {h:.0} % (to {:.0} %)",
                    q.lowest_rate_pct.unwrap_or(100.0)
                ),
                (Some(f), _) => format!("; line full {f:.0} %"),
                _ => String::new(),
            };
            let gw = q
                .shaper_drops
                .map_or(String::new(), |n| format!("; gw drops {n}"));
            let _ = writeln!(
                out,
                "{:<12} {:>8.1}  {:<16} {:<16} {:<4} {:>7} {:>8.2} {:>9} {:>9.0} {:>4.2}  {}{}{}",
                start,
                c.duration_s,
                c.lan_host,
                c.peer,
                d,
                q.packets,
                q.loss_pct,
                jitter,
                q.bitrate_kbps,
                q.mos,
                q.loss_where,
                gw,
                line
            );
        }
        if !c.degraded.is_empty() {
            let _ = writeln!(out, "{:<12} degraded: {}", "", c.degraded.join("; "));
        }
    }
    out
}
