//! The streams of one direction of one UDP flow, fed from captured packets, with the
//! kernel's own receiver algorithm (`shaper_common::media`: RFC 3550 A.1 validation and
//! loss, duplicates and reordering, the clock rate, A.8 jitter): a capture and the
//! classifier measuring the same packets give the same figures.
//!
//! A new SSRC waits in a [`MediaProbe`] (four slots) until two of its packets arrive in
//! sequence; a flow keeps at most [`MAX_SSRCS`] streams, so a flood of random SSRCs
//! costs a fixed amount of memory and never displaces a stream.

use shaper_common::media::{rtp_update, MediaProbe, MediaStream};

use super::rtp::RtpHeader;

/// Streams kept per flow.
pub const MAX_SSRCS: usize = 8;

/// The streams of one direction of one UDP flow.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Flow {
    probe: MediaProbe,
    /// Valid streams by SSRC.
    pub streams: Vec<(u32, MediaStream)>,
    /// Packets that looked like RTP but counted in no stream (on probation, or no room).
    pub unmatched: u64,
}

impl Flow {
    /// Feeds one RTP packet of `len` bytes of UDP payload, arriving at `now_ns`.
    pub fn packet(&mut self, h: &RtpHeader, now_ns: u64, len: usize, flags: u8) {
        let len = len.min(u32::MAX as usize) as u32;
        if let Some((_, s)) = self.streams.iter_mut().find(|(ssrc, _)| *ssrc == h.ssrc) {
            rtp_update(s, h.seq, h.timestamp, now_ns, len);
            return;
        }
        if self.probe.offer(h.ssrc, h.seq) && self.streams.len() < MAX_SSRCS {
            let s = MediaStream::start(h.payload_type, h.seq, h.timestamp, now_ns, len, flags);
            self.streams.push((h.ssrc, s));
        } else {
            self.unmatched += 1;
        }
    }
}
