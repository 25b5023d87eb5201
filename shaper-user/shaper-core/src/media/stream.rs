//! One RTP stream (one SSRC in one direction of one UDP flow), measured as a receiver
//! would: RFC 3550 Appendix A.1's sequence validation (a new SSRC is on probation until
//! [`MIN_SEQUENTIAL`] packets arrive in sequence, so random UDP never becomes a stream),
//! loss as expected minus received, reordering and duplicates from a 128-packet window,
//! and A.8's interarrival jitter. The RTP clock rate comes from a static payload type or
//! is estimated from the timestamps against the arrival times.
//!
//! A [`Flow`] holds the streams of one UDP flow (WebRTC bundles audio and video on one
//! 5-tuple), at most [`MAX_SSRCS`] of them with at most [`MAX_CANDIDATES`] on probation,
//! so a flood of random SSRCs costs a fixed amount of memory.

use super::rtp::{static_clock_hz, RtpHeader, COMMON_CLOCKS_HZ};

/// Packets in sequence before a new SSRC counts as a stream (RFC 3550 A.1).
pub const MIN_SEQUENTIAL: u8 = 2;
/// A jump forward larger than this is a restart, not loss (RFC 3550 A.1).
pub const MAX_DROPOUT: u16 = 3000;
/// A step back up to this far is reordering (RFC 3550 A.1).
pub const MAX_MISORDER: u16 = 100;
/// Streams kept per flow.
pub const MAX_SSRCS: usize = 8;
/// SSRCs on probation kept per flow (the oldest is forgotten first).
pub const MAX_CANDIDATES: usize = 4;
/// How long a stream is watched before its clock rate is estimated.
const CLOCK_ESTIMATE_NS: u64 = 1_000_000_000;

#[derive(Debug, Clone, PartialEq)]
pub struct Stream {
    pub ssrc: u32,
    pub payload_type: u8,
    probation: u8,
    max_seq: u16,
    cycles: u64,
    base_seq: u64,
    bad_seq: u32,
    /// Bit i: sequence number `max_seq - i` has arrived.
    seen: u128,
    /// Distinct packets received since the stream was validated.
    pub received: u64,
    pub duplicates: u64,
    pub reordered: u64,
    /// Bytes of UDP payload, duplicates included.
    pub bytes: u64,
    pub first_ns: u64,
    pub last_ns: u64,
    /// The RTP clock, once known.
    pub clock_hz: Option<u32>,
    first_ts: u32,
    /// The previous packet's transit time, in RTP clock units (A.8).
    transit: Option<i64>,
    /// RFC 3550's J, in RTP clock units (the running value, not divided by 16).
    jitter: f64,
}

/// What one packet did to its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Still on probation (or restarted probation).
    Probation,
    /// Counted.
    Counted,
    Duplicate,
    /// Counted, and arrived after a later sequence number.
    Reordered,
    /// A jump too large to be loss: the stream restarted from this packet.
    Restarted,
    /// Far out of range once: ignored (a second packet in sequence with it restarts).
    Ignored,
}

impl Stream {
    pub fn new(h: &RtpHeader, now_ns: u64, len: usize) -> Stream {
        Stream {
            ssrc: h.ssrc,
            payload_type: h.payload_type,
            probation: MIN_SEQUENTIAL - 1,
            max_seq: h.seq,
            cycles: 0,
            base_seq: u64::from(h.seq),
            bad_seq: 1 << 16 | 1,
            seen: 1,
            received: 0,
            duplicates: 0,
            reordered: 0,
            bytes: len as u64,
            first_ns: now_ns,
            last_ns: now_ns,
            clock_hz: static_clock_hz(h.payload_type),
            first_ts: h.timestamp,
            transit: None,
            jitter: 0.0,
        }
    }

    /// Whether the stream has passed probation.
    pub fn valid(&self) -> bool {
        self.probation == 0
    }

    fn restart(&mut self, seq: u16) {
        self.base_seq = u64::from(seq);
        self.max_seq = seq;
        self.bad_seq = 1 << 16 | 1;
        self.cycles = 0;
        self.seen = 1;
        self.received = 0;
        self.transit = None;
    }

    /// RFC 3550 A.1's `update_seq`, with duplicates told apart from reordering.
    pub fn update(&mut self, h: &RtpHeader, now_ns: u64, len: usize) -> Step {
        self.bytes += len as u64;
        self.last_ns = now_ns;
        let seq = h.seq;
        let udelta = seq.wrapping_sub(self.max_seq);
        let step = if self.probation > 0 {
            if seq == self.max_seq.wrapping_add(1) {
                self.probation -= 1;
                self.max_seq = seq;
                if self.probation > 0 {
                    return Step::Probation;
                }
                // Valid: counting starts here (A.1's init_seq and received++).
                self.restart(seq);
                self.first_ns = now_ns;
                self.first_ts = h.timestamp;
                self.received = 1;
                self.jitter_update(h, now_ns);
                return Step::Counted;
            }
            self.probation = MIN_SEQUENTIAL - 1;
            self.max_seq = seq;
            return Step::Probation;
        } else if udelta == 0 {
            Step::Duplicate
        } else if udelta < MAX_DROPOUT {
            if seq < self.max_seq {
                self.cycles += 1 << 16;
            }
            self.max_seq = seq;
            self.seen = if udelta >= 128 {
                1
            } else {
                self.seen << udelta | 1
            };
            Step::Counted
        } else if udelta <= u16::MAX - MAX_MISORDER + 1 {
            // A very large jump: the sender restarted, or this is a stray packet.
            if u32::from(seq) == self.bad_seq {
                self.restart(seq);
                self.received = 1;
                return Step::Restarted;
            }
            self.bad_seq = u32::from(seq.wrapping_add(1));
            return Step::Ignored;
        } else {
            let back = self.max_seq.wrapping_sub(seq);
            if back < 128 && self.seen & (1u128 << back) != 0 {
                Step::Duplicate
            } else {
                if back < 128 {
                    self.seen |= 1u128 << back;
                }
                Step::Reordered
            }
        };
        match step {
            Step::Duplicate => self.duplicates += 1,
            _ => {
                if step == Step::Reordered {
                    self.reordered += 1;
                }
                self.received += 1;
                self.jitter_update(h, now_ns);
            }
        }
        step
    }

    fn jitter_update(&mut self, h: &RtpHeader, now_ns: u64) {
        if self.clock_hz.is_none() && now_ns - self.first_ns >= CLOCK_ESTIMATE_NS {
            self.clock_hz = estimate_clock(
                h.timestamp.wrapping_sub(self.first_ts),
                now_ns - self.first_ns,
            );
        }
        let Some(hz) = self.clock_hz else {
            return;
        };
        // Arrival in RTP clock units; only differences matter, so the origin is free.
        let arrival = ((now_ns - self.first_ns) as u128 * u128::from(hz) / 1_000_000_000) as i64;
        let transit = arrival - i64::from(h.timestamp.wrapping_sub(self.first_ts) as i32);
        if let Some(prev) = self.transit {
            let d = (transit - prev).abs() as f64;
            self.jitter += (d - self.jitter) / 16.0;
        }
        self.transit = Some(transit);
    }

    /// Packets the sequence numbers say were sent since the stream was validated.
    pub fn expected(&self) -> u64 {
        if !self.valid() {
            return 0;
        }
        (self.cycles + u64::from(self.max_seq) + 1).saturating_sub(self.base_seq)
    }

    /// Packets never seen (never below zero: duplicates are not counted as received).
    pub fn lost(&self) -> u64 {
        self.expected().saturating_sub(self.received)
    }

    /// RFC 3550 interarrival jitter in milliseconds, once the clock rate is known.
    pub fn jitter_ms(&self) -> Option<f64> {
        self.clock_hz.map(|hz| self.jitter / f64::from(hz) * 1000.0)
    }
}

/// The clock rate that `ts_delta` RTP units over `ns` nanoseconds of arrivals suggests,
/// snapped to a rate in use; None when none is within 15 % (a sender whose timestamps do
/// not follow a clock, or too little time).
pub fn estimate_clock(ts_delta: u32, ns: u64) -> Option<u32> {
    if ns == 0 {
        return None;
    }
    let rate = f64::from(ts_delta) * 1e9 / ns as f64;
    COMMON_CLOCKS_HZ
        .iter()
        .copied()
        .min_by(|a, b| {
            let da = (f64::from(*a) - rate).abs();
            let db = (f64::from(*b) - rate).abs();
            da.total_cmp(&db)
        })
        .filter(|hz| (f64::from(*hz) - rate).abs() <= f64::from(*hz) * 0.15)
}

/// The streams of one direction of one UDP flow.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Flow {
    pub streams: Vec<Stream>,
    /// Packets that looked like RTP but belonged to no stream (probation, forgotten).
    pub unmatched: u64,
}

impl Flow {
    /// Feeds one RTP packet; the step it made, or None when its SSRC found no room.
    pub fn packet(&mut self, h: &RtpHeader, now_ns: u64, len: usize) -> Option<Step> {
        if let Some(s) = self.streams.iter_mut().find(|s| s.ssrc == h.ssrc) {
            let step = s.update(h, now_ns, len);
            if !matches!(
                step,
                Step::Counted | Step::Reordered | Step::Duplicate | Step::Restarted
            ) {
                self.unmatched += 1;
            }
            return Some(step);
        }
        self.unmatched += 1;
        let candidates = self.streams.iter().filter(|s| !s.valid()).count();
        if candidates >= MAX_CANDIDATES || self.streams.len() >= MAX_SSRCS {
            // Forget the oldest SSRC still on probation; established streams stay.
            let oldest = self
                .streams
                .iter()
                .enumerate()
                .filter(|(_, s)| !s.valid())
                .min_by_key(|(_, s)| s.last_ns)
                .map(|(i, _)| i)?;
            self.streams.swap_remove(oldest);
        }
        self.streams.push(Stream::new(h, now_ns, len));
        Some(Step::Probation)
    }
}
