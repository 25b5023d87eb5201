//! RTP receive statistics (RFC 3550) for a video stream crossing the shaped line.
//!
//! [`RtpStats`] is pure: feed it `(arrival_ns, datagram)` pairs in arrival order and ask for
//! a [`Summary`]. The receiver binary `shaper-rtp-rx` does the socket work.
//!
//! Sender and receiver clocks are not synchronised, so the absolute one-way delay is unknown.
//! What is measured is the *added delay*: `transit_i = arrival_i - rtp_ts_i / clock_rate`
//! contains the unknown clock offset plus the one-way delay; `transit_i - min(transit)` over
//! the run cancels the offset and leaves the delay each packet had on top of the least
//! delayed packet of the run (the standard relative one-way delay). Because the sender stamps
//! a whole video frame with one timestamp and sends its packets back to back, the packets of
//! a large frame (an I-frame) also carry their serialisation time on the line: that is real
//! delay the frame's last packet sees, and it is counted.
//!
//! Per SSRC: 16-bit sequence numbers and 32-bit timestamps are extended across wraps
//! (RFC 3550 A.1 style: each new value is placed nearest to the reference), `expected =
//! max - min + 1` over extended sequence numbers, `lost = expected - unique received`, a
//! packet whose sequence number was already seen is a duplicate (ignored for delay and
//! jitter), a new packet whose sequence number is below the highest seen is reordered. The
//! RFC 3550 interarrival jitter `J += (|D| - J) / 16` runs over the non-duplicate packets in
//! arrival order, with `D` the difference of consecutive transits.
//!
//! An optional warm-up ([`RtpStats::with_warmup_ns`]) leaves the packets that arrive within
//! that time of the first packet out of the delay and jitter statistics (they still count
//! for sequence, loss and bytes): senders often push the first frame or two late or in a
//! burst while they start up (ffmpeg sends its first frame a frame period late). Warm-up
//! packets still set the baseline: the added delay is measured from the minimum transit over
//! all packets, warm-up included. The VM tier relies on that: its video starts on an idle line
//! and the bulk transfers only later, so a queue that stands through the whole measured window
//! still shows up as added delay (with the minimum taken over the loaded window alone, a
//! standing queue would be invisible).

use std::collections::{BTreeMap, HashSet};

use serde_json::{json, Value};

use crate::stats::nearest_rank;

/// The RTP clock rate of video (RFC 3551): 90 kHz.
pub const VIDEO_CLOCK_RATE: u32 = 90_000;

/// The fields of an RTP fixed header we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpHeader {
    pub payload_type: u8,
    pub marker: bool,
    pub seq: u16,
    pub timestamp: u32,
    pub ssrc: u32,
}

/// Parses an RTP header (RFC 3550 5.1). `None` for anything that is not a plausible RTP
/// packet: shorter than 12 bytes, version not 2, CSRC list / header extension / padding not
/// fitting in the datagram, or an RTCP packet type (second byte 192..=223, RFC 5761 4).
pub fn parse_header(pkt: &[u8]) -> Option<RtpHeader> {
    if pkt.len() < 12 || pkt[0] >> 6 != 2 {
        return None;
    }
    if (192..=223).contains(&pkt[1]) {
        return None;
    }
    let cc = (pkt[0] & 0x0f) as usize;
    let mut hdr = 12 + 4 * cc;
    if pkt.len() < hdr {
        return None;
    }
    if pkt[0] & 0x10 != 0 {
        if pkt.len() < hdr + 4 {
            return None;
        }
        let words = u16::from_be_bytes([pkt[hdr + 2], pkt[hdr + 3]]) as usize;
        hdr += 4 + 4 * words;
        if pkt.len() < hdr {
            return None;
        }
    }
    if pkt[0] & 0x20 != 0 {
        let pad = *pkt.last()? as usize;
        if pad == 0 || hdr + pad > pkt.len() {
            return None;
        }
    }
    Some(RtpHeader {
        payload_type: pkt[1] & 0x7f,
        marker: pkt[1] & 0x80 != 0,
        seq: u16::from_be_bytes([pkt[2], pkt[3]]),
        timestamp: u32::from_be_bytes([pkt[4], pkt[5], pkt[6], pkt[7]]),
        ssrc: u32::from_be_bytes([pkt[8], pkt[9], pkt[10], pkt[11]]),
    })
}

/// State of one SSRC.
#[derive(Debug, Clone)]
struct Stream {
    payload_type: u8,
    /// Highest extended sequence number seen (the reference for extending the next one).
    max_seq: i64,
    min_seq: i64,
    seen: HashSet<i64>,
    /// Extended timestamp of the last non-duplicate packet (the reference for the next).
    last_ts: i64,
    packets: u64,
    duplicates: u64,
    reordered: u64,
    bytes: u64,
    /// Transit (ns) of each non-duplicate packet, in arrival order.
    transits_ns: Vec<i64>,
    /// Transits of the warm-up packets inside the idle window.
    idle_transits_ns: Vec<i64>,
    /// Arrival time (ns) of each packet in `transits_ns`.
    arrivals_ns: Vec<u64>,
    /// Smallest transit of the warm-up packets (part of the baseline, not of the figures).
    warmup_min_ns: Option<i64>,
    /// RFC 3550 jitter estimate in ns.
    jitter_ns: f64,
    sum_abs_d_ns: f64,
    n_d: u64,
}

/// Places a wrapped counter value nearest to an extended reference.
fn extend(reference: i64, value: u64, bits: u32) -> i64 {
    let modulus = 1i64 << bits;
    let delta = (value as i64 - reference).rem_euclid(modulus);
    if delta >= modulus / 2 {
        reference + delta - modulus
    } else {
        reference + delta
    }
}

/// Statistics over the RTP packets received on one socket. Pure: feed it arrivals.
#[derive(Debug, Clone)]
pub struct RtpStats {
    clock_rate: u32,
    streams: BTreeMap<u32, Stream>,
    non_rtp: u64,
    first_ns: Option<u64>,
    last_ns: u64,
    warmup_ns: u64,
    idle_window_ns: Option<(u64, u64)>,
}

/// Statistics of one SSRC (or the aggregate over all of them).
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Packets received, duplicates included.
    pub packets: u64,
    pub expected: u64,
    pub lost: u64,
    pub loss_pct: f64,
    pub duplicates: u64,
    pub reordered: u64,
    /// Packets in the delay statistics (non-duplicate, after the warm-up).
    pub delay_samples: u64,
    /// Added delay percentiles (nearest rank), ms; 0 without packets.
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Final RFC 3550 interarrival jitter, ms (aggregate: packet-weighted mean over SSRCs).
    pub jitter_ms: f64,
    /// Mean |D| over consecutive packets, ms (aggregate: weighted by the number of pairs).
    pub mean_abs_d_ms: f64,
    /// Bytes of RTP datagrams (UDP payload, RTP header included), duplicates included.
    pub bytes: u64,
    /// `bytes * 8` over the time between the first and the last arrival (all SSRCs).
    pub bitrate_bps: f64,
    /// Seconds between the first and the last arrival.
    pub duration_s: f64,
    /// Datagrams that were not RTP.
    pub non_rtp: u64,
    /// Added delay of the packets in the idle window ([`RtpStats::with_idle_window_ns`]),
    /// against the same minimum transit: the floor of the path with no load. 0 without one.
    pub idle_p50_ms: f64,
    pub idle_p99_ms: f64,
    pub idle_samples: u64,
}

impl Summary {
    /// The JSON summary `shaper-rtp-rx` writes.
    pub fn to_json(&self) -> Value {
        json!({
            "packets": self.packets,
            "expected": self.expected,
            "lost": self.lost,
            "loss_pct": self.loss_pct,
            "duplicates": self.duplicates,
            "reordered": self.reordered,
            "delay_samples": self.delay_samples,
            "p50_ms": self.p50_ms,
            "p90_ms": self.p90_ms,
            "p99_ms": self.p99_ms,
            "max_ms": self.max_ms,
            "jitter_ms": self.jitter_ms,
            "mean_abs_d_ms": self.mean_abs_d_ms,
            "bytes": self.bytes,
            "bitrate_bps": self.bitrate_bps,
            "duration_s": self.duration_s,
            "non_rtp": self.non_rtp,
            "idle_p50_ms": self.idle_p50_ms,
            "idle_p99_ms": self.idle_p99_ms,
            "idle_samples": self.idle_samples,
        })
    }
}

impl RtpStats {
    /// `clock_rate`: RTP timestamp units per second (90000 for video).
    pub fn new(clock_rate: u32) -> Self {
        assert!(clock_rate > 0, "clock rate must be positive");
        RtpStats {
            clock_rate,
            streams: BTreeMap::new(),
            non_rtp: 0,
            first_ns: None,
            last_ns: 0,
            warmup_ns: 0,
            idle_window_ns: None,
        }
    }

    /// Leaves packets arriving within `warmup_ns` of the first packet out of the delay and
    /// jitter statistics.
    /// Warm-up packets arriving between `from_ns` and `until_ns` after the first packet
    /// make the idle figures (`idle_p50_ms`, `idle_p99_ms`): the same stream before any load
    /// starts, measured against the same baseline.
    pub fn with_idle_window_ns(mut self, from_ns: u64, until_ns: u64) -> Self {
        self.idle_window_ns = Some((from_ns, until_ns));
        self
    }

    pub fn with_warmup_ns(mut self, warmup_ns: u64) -> Self {
        self.warmup_ns = warmup_ns;
        self
    }

    /// Arrival time of the first RTP packet.
    pub fn first_arrival_ns(&self) -> Option<u64> {
        self.first_ns
    }

    /// RTP packets received so far (duplicates included).
    pub fn packets(&self) -> u64 {
        self.streams.values().map(|s| s.packets).sum()
    }

    pub fn non_rtp(&self) -> u64 {
        self.non_rtp
    }

    /// SSRCs seen, ascending.
    pub fn ssrcs(&self) -> Vec<u32> {
        self.streams.keys().copied().collect()
    }

    /// Feeds one datagram that arrived at `arrival_ns` (any monotonic clock). Returns whether
    /// it was RTP.
    pub fn push(&mut self, arrival_ns: u64, pkt: &[u8]) -> bool {
        let Some(h) = parse_header(pkt) else {
            self.non_rtp += 1;
            return false;
        };
        self.first_ns.get_or_insert(arrival_ns);
        self.last_ns = self.last_ns.max(arrival_ns);
        let clock_rate = self.clock_rate as i128;
        let stream = self.streams.entry(h.ssrc).or_insert_with(|| Stream {
            payload_type: h.payload_type,
            max_seq: h.seq as i64,
            min_seq: h.seq as i64,
            seen: HashSet::new(),
            last_ts: h.timestamp as i64,
            packets: 0,
            duplicates: 0,
            reordered: 0,
            bytes: 0,
            transits_ns: Vec::new(),
            warmup_min_ns: None,
            idle_transits_ns: Vec::new(),
            arrivals_ns: Vec::new(),
            jitter_ns: 0.0,
            sum_abs_d_ns: 0.0,
            n_d: 0,
        });
        stream.packets += 1;
        stream.bytes += pkt.len() as u64;
        let seq = extend(stream.max_seq, h.seq as u64, 16);
        if !stream.seen.insert(seq) {
            stream.duplicates += 1;
            return true;
        }
        if seq < stream.max_seq {
            stream.reordered += 1;
        }
        stream.max_seq = stream.max_seq.max(seq);
        stream.min_seq = stream.min_seq.min(seq);

        let ts = extend(stream.last_ts, h.timestamp as u64, 32);
        stream.last_ts = ts;
        let transit = arrival_ns as i128 - (ts as i128 * 1_000_000_000).div_euclid(clock_rate);
        let transit = transit as i64;
        if self
            .first_ns
            .is_some_and(|f| arrival_ns < f.saturating_add(self.warmup_ns))
        {
            stream.warmup_min_ns = Some(stream.warmup_min_ns.map_or(transit, |m| m.min(transit)));
            if let (Some(f), Some((from, until))) = (self.first_ns, self.idle_window_ns) {
                if arrival_ns >= f.saturating_add(from) && arrival_ns < f.saturating_add(until) {
                    stream.idle_transits_ns.push(transit);
                }
            }
            return true;
        }
        if let Some(&prev) = stream.transits_ns.last() {
            let d = (transit - prev).unsigned_abs() as f64;
            stream.jitter_ns += (d - stream.jitter_ns) / 16.0;
            stream.sum_abs_d_ns += d;
            stream.n_d += 1;
        }
        stream.transits_ns.push(transit);
        stream.arrivals_ns.push(arrival_ns);
        true
    }

    fn min_transit(s: &Stream) -> i64 {
        s.transits_ns
            .iter()
            .copied()
            .chain(s.warmup_min_ns)
            .min()
            .unwrap_or(0)
    }

    /// Added delays (ms) of the non-duplicate packets of one SSRC, in arrival order.
    fn added_delays_of(s: &Stream) -> impl Iterator<Item = f64> + '_ {
        let min = Self::min_transit(s);
        s.transits_ns.iter().map(move |&t| (t - min) as f64 / 1e6)
    }

    fn idle_delays_of(s: &Stream) -> impl Iterator<Item = f64> + '_ {
        let min = Self::min_transit(s);
        s.idle_transits_ns
            .iter()
            .map(move |&t| (t - min) as f64 / 1e6)
    }

    /// (seconds since the first packet, added delay in ms) of every packet in the delay
    /// statistics, SSRC by SSRC, each in arrival order: the delay over time.
    pub fn timeline(&self) -> Vec<(f64, f64)> {
        let first = self.first_ns.unwrap_or(0);
        self.streams
            .values()
            .flat_map(|s| {
                s.arrivals_ns
                    .iter()
                    .zip(Self::added_delays_of(s))
                    .map(move |(&a, d)| (a.saturating_sub(first) as f64 / 1e9, d))
            })
            .collect()
    }

    /// Added delays (ms) of all non-duplicate packets, SSRC by SSRC, each in arrival order.
    pub fn added_delays_ms(&self) -> Vec<f64> {
        self.streams
            .values()
            .flat_map(Self::added_delays_of)
            .collect()
    }

    fn duration_s(&self) -> f64 {
        match self.first_ns {
            Some(f) => (self.last_ns - f) as f64 / 1e9,
            None => 0.0,
        }
    }

    fn summarise<'a>(&self, streams: impl Iterator<Item = &'a Stream> + Clone) -> Summary {
        let packets: u64 = streams.clone().map(|s| s.packets).sum();
        let expected: u64 = streams
            .clone()
            .map(|s| (s.max_seq - s.min_seq + 1) as u64)
            .sum();
        let unique: u64 = streams.clone().map(|s| s.seen.len() as u64).sum();
        let lost = expected - unique;
        let mut delays: Vec<f64> = streams.clone().flat_map(Self::added_delays_of).collect();
        delays.sort_by(f64::total_cmp);
        let pct = |p: f64| nearest_rank(&delays, p).unwrap_or(0.0);
        let mut idle: Vec<f64> = streams.clone().flat_map(Self::idle_delays_of).collect();
        idle.sort_by(f64::total_cmp);
        let n_transits: u64 = streams.clone().map(|s| s.transits_ns.len() as u64).sum();
        let jitter_ns = if n_transits == 0 {
            0.0
        } else {
            streams
                .clone()
                .map(|s| s.jitter_ns * s.transits_ns.len() as f64)
                .sum::<f64>()
                / n_transits as f64
        };
        let n_d: u64 = streams.clone().map(|s| s.n_d).sum();
        let mean_abs_d_ns = if n_d == 0 {
            0.0
        } else {
            streams.clone().map(|s| s.sum_abs_d_ns).sum::<f64>() / n_d as f64
        };
        let bytes: u64 = streams.clone().map(|s| s.bytes).sum();
        let duration_s = self.duration_s();
        Summary {
            packets,
            expected,
            lost,
            loss_pct: if expected == 0 {
                0.0
            } else {
                100.0 * lost as f64 / expected as f64
            },
            duplicates: streams.clone().map(|s| s.duplicates).sum(),
            reordered: streams.clone().map(|s| s.reordered).sum(),
            delay_samples: delays.len() as u64,
            p50_ms: pct(50.0),
            p90_ms: pct(90.0),
            p99_ms: pct(99.0),
            max_ms: delays.last().copied().unwrap_or(0.0),
            idle_p50_ms: nearest_rank(&idle, 50.0).unwrap_or(0.0),
            idle_p99_ms: nearest_rank(&idle, 99.0).unwrap_or(0.0),
            idle_samples: idle.len() as u64,
            jitter_ms: jitter_ns / 1e6,
            mean_abs_d_ms: mean_abs_d_ns / 1e6,
            bytes,
            bitrate_bps: if duration_s > 0.0 {
                bytes as f64 * 8.0 / duration_s
            } else {
                0.0
            },
            duration_s,
            non_rtp: self.non_rtp,
        }
    }

    /// Aggregate over all SSRCs (usually there is one).
    pub fn summary(&self) -> Summary {
        self.summarise(self.streams.values())
    }

    /// One summary per SSRC, with its payload type (bitrate over the whole run's duration;
    /// `non_rtp` is the socket's count).
    pub fn per_ssrc(&self) -> Vec<(u32, u8, Summary)> {
        self.streams
            .iter()
            .map(|(&ssrc, s)| (ssrc, s.payload_type, self.summarise(std::iter::once(s))))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(seq: u16, ts: u32, ssrc: u32, payload: usize) -> Vec<u8> {
        let mut p = vec![0x80, 96];
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&ts.to_be_bytes());
        p.extend_from_slice(&ssrc.to_be_bytes());
        p.resize(12 + payload, 0xab);
        p
    }

    const MS: u64 = 1_000_000;

    #[test]
    fn header_parsing() {
        let p = pkt(7, 9, 0x1234, 100);
        let h = parse_header(&p).unwrap();
        assert_eq!(
            h,
            RtpHeader {
                payload_type: 96,
                marker: false,
                seq: 7,
                timestamp: 9,
                ssrc: 0x1234
            }
        );
        // Too short, wrong version, RTCP sender report.
        assert!(parse_header(&p[..11]).is_none());
        let mut v1 = p.clone();
        v1[0] = 0x40;
        assert!(parse_header(&v1).is_none());
        let mut sr = p.clone();
        sr[1] = 200;
        assert!(parse_header(&sr).is_none());
        // CSRC count larger than the packet.
        let mut cc = pkt(1, 1, 1, 0);
        cc[0] |= 0x02;
        assert!(parse_header(&cc).is_none());
        // Header extension that fits, and one that does not.
        let mut ext = pkt(1, 1, 1, 0);
        ext[0] |= 0x10;
        ext.extend_from_slice(&[0xbe, 0xde, 0, 1, 1, 2, 3, 4]);
        assert!(parse_header(&ext).is_some());
        ext.truncate(ext.len() - 1);
        assert!(parse_header(&ext).is_none());
        // Marker bit.
        let mut m = pkt(1, 1, 1, 4);
        m[1] |= 0x80;
        assert!(parse_header(&m).unwrap().marker);
    }

    #[test]
    fn extend_handles_wrap_both_ways() {
        assert_eq!(extend(65535, 0, 16), 65536);
        assert_eq!(extend(65536, 65535, 16), 65535);
        assert_eq!(extend(10, 65530, 16), -6);
        assert_eq!(extend(u32::MAX as i64, 5, 32), u32::MAX as i64 + 6);
    }

    #[test]
    fn non_rtp_counted_and_ignored() {
        let mut s = RtpStats::new(VIDEO_CLOCK_RATE);
        assert!(!s.push(0, b"hello"));
        assert!(s.push(MS, &pkt(1, 0, 1, 10)));
        let sum = s.summary();
        assert_eq!(sum.non_rtp, 1);
        assert_eq!(sum.packets, 1);
        assert_eq!(s.first_arrival_ns(), Some(MS));
    }

    #[test]
    fn sequence_wrap_and_loss() {
        let mut s = RtpStats::new(VIDEO_CLOCK_RATE);
        // 65533, 65534, (65535 lost), 0, 1, (2 lost), 3.
        for (i, seq) in [65533u16, 65534, 0, 1, 3].into_iter().enumerate() {
            s.push(i as u64 * MS, &pkt(seq, 0, 1, 100));
        }
        let sum = s.summary();
        assert_eq!(sum.packets, 5);
        assert_eq!(sum.expected, 7);
        assert_eq!(sum.lost, 2);
        assert!((sum.loss_pct - 200.0 / 7.0).abs() < 1e-9);
        assert_eq!(sum.duplicates, 0);
        assert_eq!(sum.reordered, 0);
    }

    #[test]
    fn duplicates_and_reordering() {
        let mut s = RtpStats::new(VIDEO_CLOCK_RATE);
        // 10, 12, 11 (reordered), 12 (duplicate), 13.
        for (i, seq) in [10u16, 12, 11, 12, 13].into_iter().enumerate() {
            s.push(i as u64 * MS, &pkt(seq, 0, 1, 100));
        }
        let sum = s.summary();
        assert_eq!(sum.packets, 5);
        assert_eq!(sum.expected, 4);
        assert_eq!(sum.lost, 0);
        assert_eq!(sum.duplicates, 1);
        assert_eq!(sum.reordered, 1);
        assert_eq!(sum.bytes, 5 * 112);
        // Duplicates add no delay sample.
        assert_eq!(s.added_delays_ms().len(), 4);
    }

    #[test]
    fn reordered_across_wrap() {
        let mut s = RtpStats::new(VIDEO_CLOCK_RATE);
        for (i, seq) in [65534u16, 0, 65535, 1].into_iter().enumerate() {
            s.push(i as u64 * MS, &pkt(seq, 0, 1, 0));
        }
        let sum = s.summary();
        assert_eq!((sum.expected, sum.lost, sum.reordered), (4, 0, 1));
    }

    #[test]
    fn added_delay_and_jitter_hand_computed() {
        // Clock rate 1000 Hz: one timestamp unit is 1 ms. Sender sends every 20 ms; the
        // receiver clock is offset by 5 s. Network delays (ms): 10, 12, 10, 40, 11.
        let mut s = RtpStats::new(1000);
        let delays = [10u64, 12, 10, 40, 11];
        for (i, d) in delays.iter().enumerate() {
            let send_ms = i as u64 * 20;
            let arrival = (5000 + send_ms + d) * MS;
            s.push(arrival, &pkt(i as u16, send_ms as u32, 7, 50));
        }
        // Added delay = delay - min(delay) = 0, 2, 0, 30, 1.
        assert_eq!(s.added_delays_ms(), vec![0.0, 2.0, 0.0, 30.0, 1.0]);
        let sum = s.summary();
        // Sorted 0, 0, 1, 2, 30; nearest rank: p50 = 3rd = 1, p90 = 5th, p99 = 5th.
        assert_eq!(sum.p50_ms, 1.0);
        assert_eq!(sum.p90_ms, 30.0);
        assert_eq!(sum.p99_ms, 30.0);
        assert_eq!(sum.max_ms, 30.0);
        // |D| = 2, 2, 30, 29. J: 2/16 = 0.125; 0.125 + (2 - 0.125)/16 = 0.2421875;
        // + (30 - 0.2421875)/16 = 2.102050781; + (29 - 2.102050781)/16 = 3.783172607.
        assert!((sum.jitter_ms - 3.783_172_607_421_875).abs() < 1e-9);
        assert!((sum.mean_abs_d_ms - 63.0 / 4.0).abs() < 1e-12);
        // 5 * 62 bytes between the first arrival (5010 ms) and the last (the 4th, 5100 ms).
        assert_eq!(sum.bytes, 310);
        assert!((sum.duration_s - 0.090).abs() < 1e-12);
        assert!((sum.bitrate_bps - 310.0 * 8.0 / 0.090).abs() < 1e-6);
    }

    #[test]
    fn timestamp_wrap_keeps_transit_continuous() {
        // 90 kHz, 40 ms frames (3600 units) straddling the 32-bit wrap, constant delay.
        let mut s = RtpStats::new(VIDEO_CLOCK_RATE);
        let start = u32::MAX - 3600 * 2 + 1;
        for i in 0..5u32 {
            let ts = start.wrapping_add(i * 3600);
            s.push(1_000 * MS + i as u64 * 40 * MS, &pkt(i as u16, ts, 1, 0));
        }
        let d = s.added_delays_ms();
        assert!(d.iter().all(|&x| x.abs() < 1e-3), "{d:?}");
        assert!(s.summary().jitter_ms < 1e-3);
    }

    #[test]
    fn frame_packets_share_timestamp() {
        // Three packets of one frame arriving 1 ms apart: added delay 0, 1, 2.
        let mut s = RtpStats::new(VIDEO_CLOCK_RATE);
        for i in 0..3u16 {
            s.push(100 * MS + i as u64 * MS, &pkt(i, 9000, 1, 1200));
        }
        assert_eq!(s.added_delays_ms(), vec![0.0, 1.0, 2.0]);
    }

    #[test]
    fn warmup_excludes_early_delays_only() {
        // 1 kHz clock, 20 ms frames (timestamps 0, 20, ...); the sender starts late and sends
        // frame 0 together with frame 1.
        let mut s = RtpStats::new(1000).with_warmup_ns(10 * MS);
        let arrivals = [20u64, 20, 40, 60, 80, 101];
        for (i, a) in arrivals.iter().enumerate() {
            s.push(a * MS, &pkt(i as u16, i as u32 * 20, 1, 0));
        }
        // Packets 0 and 1 arrive within 10 ms of the first: no delay samples. Transits of the
        // rest: 0, 0, 0, 1 -> added 0, 0, 0, 1.
        assert_eq!(s.added_delays_ms(), vec![0.0, 0.0, 0.0, 1.0]);
        let sum = s.summary();
        assert_eq!((sum.packets, sum.expected, sum.lost), (6, 6, 0));
        assert_eq!(sum.delay_samples, 4);
        assert_eq!(sum.max_ms, 1.0);
        // |D| = 0, 0, 1: J = 0, 0, 1/16.
        assert!((sum.jitter_ms - 1.0 / 16.0).abs() < 1e-12);
        // Without warm-up the late first frame sets the maximum.
        let mut s = RtpStats::new(1000);
        for (i, a) in arrivals.iter().enumerate() {
            s.push(a * MS, &pkt(i as u16, i as u32 * 20, 1, 0));
        }
        assert_eq!(s.summary().max_ms, 20.0);
    }

    #[test]
    fn warmup_sets_the_baseline_so_a_standing_queue_shows() {
        // Idle line during the warm-up (transit 5 ms), then a queue of 300 ms that never
        // drains: every measured packet is 300 ms late, not 0.
        let mut s = RtpStats::new(1000).with_warmup_ns(100 * MS);
        for i in 0..20u16 {
            let ts = i as u64 * 20;
            let queue = if ts >= 100 { 300 } else { 0 };
            s.push((ts + 5 + queue) * MS, &pkt(i, ts as u32, 1, 0));
        }
        let d = s.added_delays_ms();
        assert!(!d.is_empty() && d.iter().all(|&x| x == 300.0), "{d:?}");
    }

    #[test]
    fn idle_window_gives_the_unloaded_floor() {
        // Transit 5 ms, with every fourth packet 2 ms late, during the idle window
        // (20..100 ms); then a 50 ms queue.
        let mut s = RtpStats::new(1000)
            .with_warmup_ns(100 * MS)
            .with_idle_window_ns(20 * MS, 100 * MS);
        for i in 0..20u16 {
            let ts = i as u64 * 10;
            let extra = if ts >= 100 {
                50
            } else if i % 4 == 3 {
                2
            } else {
                0
            };
            s.push((ts + 5 + extra) * MS, &pkt(i, ts as u32, 1, 0));
        }
        let sum = s.summary();
        assert_eq!(sum.idle_samples, 8);
        assert_eq!((sum.idle_p50_ms, sum.idle_p99_ms), (0.0, 2.0));
        assert_eq!(sum.p50_ms, 50.0);
    }

    #[test]
    fn per_ssrc_and_aggregate() {
        let mut s = RtpStats::new(1000);
        for i in 0..4u16 {
            s.push(i as u64 * 10 * MS, &pkt(i, i as u32 * 10, 1, 0));
        }
        for i in [0u16, 2] {
            s.push(i as u64 * 10 * MS, &pkt(i + 100, i as u32 * 10, 2, 0));
        }
        let agg = s.summary();
        assert_eq!((agg.packets, agg.expected, agg.lost), (6, 7, 1));
        let per = s.per_ssrc();
        assert_eq!(per.len(), 2);
        assert_eq!(per[0].0, 1);
        assert_eq!(per[1].2.lost, 1);
        assert_eq!(s.ssrcs(), vec![1, 2]);
    }

    #[test]
    fn empty_summary_is_zero() {
        let s = RtpStats::new(VIDEO_CLOCK_RATE);
        let sum = s.summary();
        assert_eq!(sum.packets, 0);
        assert_eq!(sum.expected, 0);
        assert_eq!(sum.loss_pct, 0.0);
        assert_eq!(sum.p99_ms, 0.0);
        let j = sum.to_json();
        for k in [
            "packets",
            "expected",
            "lost",
            "loss_pct",
            "duplicates",
            "reordered",
            "p50_ms",
            "p90_ms",
            "p99_ms",
            "max_ms",
            "jitter_ms",
            "bitrate_bps",
            "non_rtp",
        ] {
            assert!(j.get(k).is_some(), "{k}");
        }
    }
}
