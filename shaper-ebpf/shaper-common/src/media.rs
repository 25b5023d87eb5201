//! RTP streams measured in the kernel (issue 17): the maps' key and values, and the one
//! receiver algorithm both the classifier and user space run ([`rtp_update`]): RFC 3550
//! Appendix A.1's sequence validation and loss accounting, duplicates and reordering from
//! a 64-packet window, the RTP clock rate (static payload types, else estimated from the
//! timestamps against the arrivals), and A.8's interarrival jitter in integer arithmetic.
//!
//! A UDP flow's RTP-looking packets first meet [`MediaProbe`]: four SSRC slots per flow
//! and direction. Only an SSRC whose sequence number advances by one between two of its
//! packets becomes a [`MediaStream`] (RFC 3550's MIN_SEQUENTIAL = 2); random payloads
//! match a slot's SSRC one time in 2^32, so a flood never creates streams and never
//! evicts real ones from the LRU map of streams.

/// [`MediaKey`] -> [`MediaStream`] (LRU): RTP streams in the measured classes.
pub const MAP_MEDIA: &str = "MEDIA";
/// [`MediaKey`] with `ssrc` 0 -> [`MediaProbe`] (LRU): each flow's SSRCs on probation.
pub const MAP_MEDIA_PROBE: &str = "MEDIA_PROBE";
/// [`MediaSlot`]s (array, direct-mapped by [`media_slot`]): where a stream lives when its
/// slot was free when it started, so that its packets cost an array index and a key
/// compare instead of a hash of the 44-byte key; streams whose slot was taken are in
/// [`MAP_MEDIA`]. User space reads both and frees a slot when its stream's call ends.
pub const MAP_MEDIA_SLOTS: &str = "MEDIA_SLOTS";
/// Slots in [`MAP_MEDIA_SLOTS`] (a power of two): with 80 streams at once (20 calls,
/// audio and video each way) about 3 of them find their slot taken.
pub const MEDIA_MAX_SLOTS: u32 = 1024;
/// Streams followed at once in [`MAP_MEDIA`].
pub const MEDIA_MAX_STREAMS: u32 = 4096;
/// Flows with SSRCs on probation followed at once.
pub const MEDIA_MAX_PROBES: u32 = 4096;
/// SSRC slots per flow on probation (WebRTC bundles audio, video and more on one flow).
pub const MEDIA_PROBE_SLOTS: usize = 4;

/// `MediaKey::flags` / `MediaStream::flags`: the RTP was inside TURN ChannelData.
pub const MEDIA_TURN: u8 = 1;

/// A jump forward larger than this is a restart, not loss (RFC 3550 A.1).
pub const RTP_MAX_DROPOUT: u16 = 3000;
/// A step back up to this far is reordering (RFC 3550 A.1).
pub const RTP_MAX_MISORDER: u16 = 100;
/// A stream of a dynamic payload type: the shortest window its clock is estimated over
/// (the clock is known once two windows in a row agree: after 2 s at least).
pub const RTP_CLOCK_ESTIMATE_NS: u64 = 1_000_000_000;
/// Clock rates in use (Hz): an estimate snaps to the nearest within 1/8 of it.
pub const RTP_CLOCKS_HZ: [u32; 7] = [8_000, 16_000, 24_000, 32_000, 44_100, 48_000, 90_000];

/// One stream: a direction of a UDP flow, from the site's side, and an SSRC.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MediaKey {
    /// The LAN-side address (IPv4 in the first 4 bytes).
    pub lan: [u8; 16],
    pub peer: [u8; 16],
    pub lan_port: u16,
    pub peer_port: u16,
    pub ssrc: u32,
    /// `Dir` as u8.
    pub dir: u8,
    /// 4 or 6.
    pub family: u8,
    /// [`MEDIA_TURN`].
    pub flags: u8,
    pub _pad: u8,
}

impl MediaKey {
    /// The key as 11 words, as it lies in memory (44 bytes of plain integers, no
    /// padding): `lan` 0-3, `peer` 4-7, the ports 8, `ssrc` 9, the rest 10.
    #[inline(always)]
    fn words(&self) -> [u32; 11] {
        // SAFETY: #[repr(C)], 44 bytes of integers; read unaligned.
        unsafe { core::ptr::read_unaligned(self as *const MediaKey as *const [u32; 11]) }
    }

    /// Whether `other` is the same key: eleven word compares folded into one test (no
    /// `memcmp` in BPF, and no early exit to mispredict).
    #[inline(always)]
    pub fn same(&self, other: &MediaKey) -> bool {
        let (a, b) = (self.words(), other.words());
        let mut d = 0;
        let mut i = 0;
        while i < 11 {
            d |= a[i] ^ b[i];
            i += 1;
        }
        d == 0
    }
}

/// The [`MAP_MEDIA_SLOTS`] index of the stream `k`: a multiplicative hash of its SSRC
/// (random per stream, RFC 3550 §8), ports, direction and family, and the addresses' last
/// words. Not keyed: a host that picks SSRCs to take other streams' slots only moves those
/// streams to [`MAP_MEDIA`], where they are measured the same.
#[inline(always)]
pub fn media_slot(k: &MediaKey) -> u32 {
    let w = k.words();
    let x = w[9] ^ w[8].rotate_left(7) ^ w[3] ^ w[7].rotate_left(13) ^ (w[10] & 0xffff);
    x.wrapping_mul(0x9e37_79b1) >> (32 - MEDIA_MAX_SLOTS.trailing_zeros())
}

/// One [`MAP_MEDIA_SLOTS`] entry: a stream and its key; `key.family` 0 is a free slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MediaSlot {
    pub key: MediaKey,
    /// Moved on ([`media_gen_next`]) each time the slot is taken (by the classifier) or
    /// freed (by user space), so that a [`MediaHint`] made for one tenancy of the slot
    /// never matches a later one.
    pub gen: u32,
    pub stream: MediaStream,
}

/// The generation after `gen` (22 bits, as a [`MediaHint`] keeps it; never 0, which is
/// no hint).
#[inline(always)]
pub fn media_gen_next(gen: u32) -> u32 {
    let n = gen.wrapping_add(1) & MEDIA_GEN_MASK;
    if n == 0 {
        1
    } else {
        n
    }
}

/// The bits of [`MediaSlot::gen`] a [`MediaHint`] keeps beside the slot's index
/// (10 bits for [`MEDIA_MAX_SLOTS`]).
pub const MEDIA_GEN_MASK: u32 = (1 << 22) - 1;
// A hint keeps the slot's index in the 10 bits above the generation.
const _: () = assert!(MEDIA_MAX_SLOTS <= 1 << 10 && MEDIA_MAX_SLOTS.is_power_of_two());

/// Where one of a flow's streams lives, kept in the flow's cache entry (`FlowVal::media`)
/// so that its next packets go to its slot without building the stream's key, hashing
/// it and comparing it: the flow cache's lookup has already matched the addresses, ports,
/// protocol, direction and family, and what is left to check is the SSRC, the framing
/// and that the slot still holds the tenancy the hint was made for (`slot_gen`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MediaHint {
    pub ssrc: u32,
    /// The slot's index << 22 | its generation ([`MEDIA_GEN_MASK`]); 0: no hint.
    pub slot_gen: u32,
}

impl MediaHint {
    #[inline(always)]
    pub fn new(slot: u32, gen: u32, ssrc: u32) -> MediaHint {
        MediaHint {
            ssrc,
            slot_gen: (slot << 22) | (gen & MEDIA_GEN_MASK),
        }
    }

    /// The slot's index (valid when `slot_gen` is not 0).
    #[inline(always)]
    pub fn slot(&self) -> u32 {
        (self.slot_gen >> 22) & (MEDIA_MAX_SLOTS - 1)
    }

    /// Whether this is a hint (not 0) for the stream of `ssrc`: its slot is worth a look.
    #[inline(always)]
    pub fn names(&self, ssrc: u32) -> bool {
        self.slot_gen != 0 && self.ssrc == ssrc
    }

    /// Whether `s`, the slot [`MediaHint::slot`] names, still holds the stream of `ssrc`
    /// framed as `flags` that this hint was made for.
    #[inline(always)]
    pub fn holds(&self, s: &MediaSlot, ssrc: u32, flags: u8) -> bool {
        self.names(ssrc)
            && s.gen & MEDIA_GEN_MASK == self.slot_gen & MEDIA_GEN_MASK
            && s.key.family != 0
            && s.key.ssrc == ssrc
            && s.key.flags == flags
    }
}

/// Hints a flow's cache entry keeps (audio and video of one bundled flow).
pub const MEDIA_HINTS: usize = 2;

/// SSRCs on probation in one flow and direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MediaProbe {
    pub ssrc: [u32; MEDIA_PROBE_SLOTS],
    pub seq: [u16; MEDIA_PROBE_SLOTS],
    /// The slot the next new SSRC takes.
    pub next: u32,
}

impl MediaProbe {
    /// A packet of `ssrc` with `seq`: true when the SSRC's previous packet had `seq - 1`
    /// (the stream is valid from this packet on); otherwise it is remembered.
    #[inline(always)]
    pub fn offer(&mut self, ssrc: u32, seq: u16) -> bool {
        let mut i = 0;
        while i < MEDIA_PROBE_SLOTS {
            if self.ssrc[i] == ssrc && ssrc != 0 {
                let ok = self.seq[i].wrapping_add(1) == seq;
                self.seq[i] = seq;
                return ok;
            }
            i += 1;
        }
        let n = (self.next as usize) % MEDIA_PROBE_SLOTS;
        self.ssrc[n] = ssrc;
        self.seq[n] = seq;
        self.next = ((n + 1) % MEDIA_PROBE_SLOTS) as u32;
        false
    }
}

/// A valid stream, as a receiver at the gateway measures it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MediaStream {
    /// Monotonic ns of the first counted packet and of the last packet.
    pub first_ns: u64,
    pub last_ns: u64,
    /// The arrival the jitter's transits (and the clock's estimation windows) count from,
    /// with `first_ts`: the first counted packet's at first, moved on as the clock is
    /// estimated.
    pub origin_ns: u64,
    /// Distinct packets counted (duplicates not).
    pub received: u64,
    /// UDP payload bytes, duplicates included.
    pub bytes: u64,
    pub duplicates: u64,
    pub reordered: u64,
    /// RFC 3550's jitter J times 16 (A.8's integer form), in RTP clock units.
    pub jitter16: u64,
    /// The previous packet's transit (arrival minus timestamp, RTP clock units);
    /// valid with `have_transit`.
    pub transit: i64,
    /// Sequence number wraps (A.1's cycles / 2^16).
    pub cycles: u32,
    /// The first counted sequence number, the highest so far.
    pub base_seq: u16,
    pub max_seq: u16,
    /// A.1's bad_seq (2^16 + 1: none).
    pub bad_seq: u32,
    /// The timestamp of the packet at `origin_ns`.
    pub first_ts: u32,
    /// RTP clock rate (Hz); 0 until known.
    pub clock_hz: u32,
    /// Bit i: sequence number `max_seq - i` counted.
    pub seen: u64,
    pub payload_type: u8,
    /// [`MEDIA_TURN`].
    pub flags: u8,
    pub have_transit: u8,
    pub _pad: u8,
    /// While the clock is unknown: the rate the last estimation window suggested (0:
    /// none yet, or no clock in use). The clock is known when two windows in a row agree.
    pub clock_try: u32,
    /// `clock_hz` per ns times 2^32 ([`rtp_clock_mult`]): an arrival in clock units is a
    /// multiply and a shift, not a 64-bit division a packet.
    pub clock_mult: u32,
    /// Packets of this stream the gateway itself dropped after counting them: its own
    /// queues (HTB and their leaves) or its egress device, seen by the drop tracer
    /// ([`PROG_MEDIA_DROPS`]) where the kernel has BTF. Not part of [`MediaStream::lost`]
    /// (the classifier counts a packet before the queues): the receiver misses
    /// `lost() + gw_drops` for a download stream.
    pub gw_drops: u64,
}

/// The drop tracer: a BTF tracepoint program on `kfree_skb` in the classifier's object
/// that counts the measured streams' packets the gateway drops (see `shaper-ebpf`'s
/// `drops.rs`).
pub const PROG_MEDIA_DROPS: &str = "shaper_media_drops";
/// The tracepoint it attaches to: every freed-as-dropped skb passes it (qdisc drops
/// included, on 6.1 as on 6.12).
pub const MEDIA_DROPS_TRACEPOINT: &str = "kfree_skb";
/// [`MediaDropCfg`] at index 0: where the drop tracer finds what it reads in the
/// running kernel's structs (not pinned: only the loaded object's program reads it).
pub const MAP_MEDIA_DROP_CFG: &str = "MEDIA_DROP_CFG";

/// Byte offsets in the running kernel's `struct sk_buff` and `struct net_device`, from
/// its BTF (user space reads them; Rust eBPF has no CO-RE), and the HTB major the
/// classifier's class ids carry. `ready` 0: the tracer does nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MediaDropCfg {
    pub skb_dev: u32,
    pub skb_head: u32,
    pub skb_network_header: u32,
    pub skb_priority: u32,
    pub dev_ifindex: u32,
    /// `skb->priority >> 16` of every packet the classifier classed (its HTB root's
    /// major): a packet without it was never classed by us (an arrival, the box's own).
    pub major: u32,
    pub ready: u32,
    pub _pad: u32,
}

/// What [`rtp_update`] did with a packet.
pub const RTP_COUNTED: u32 = 0;
pub const RTP_DUPLICATE: u32 = 1;
pub const RTP_REORDERED: u32 = 2;
pub const RTP_RESTARTED: u32 = 3;
pub const RTP_IGNORED: u32 = 4;

/// The clock rate (Hz) of a static RTP payload type (RFC 3551 §6); 0 for dynamic ones.
#[inline(always)]
pub fn rtp_static_clock(pt: u8) -> u32 {
    match pt {
        0 | 3 | 4 | 5 | 7 | 8 | 9 | 12 | 13 | 15 | 18 => 8_000,
        6 => 16_000,
        10 | 11 => 44_100,
        14 | 25 | 26 | 28 | 31 | 32 | 33 | 34 => 90_000,
        16 => 11_025,
        17 => 22_050,
        _ => 0,
    }
}

/// The clock rate `ts_delta` timestamp units over `ns` nanoseconds suggest, snapped to the
/// nearest of [`RTP_CLOCKS_HZ`]; 0 when that is not within 1/8.
#[inline(always)]
pub fn rtp_estimate_clock(ts_delta: u32, ns: u64) -> u32 {
    if ns == 0 {
        return 0;
    }
    // ts_delta < 2^32 and 1e9 < 2^30: no overflow.
    let rate = ts_delta as u64 * 1_000_000_000 / ns;
    let (mut best, mut best_d) = (0u64, u64::MAX);
    let mut i = 0;
    while i < RTP_CLOCKS_HZ.len() {
        let hz = RTP_CLOCKS_HZ[i] as u64;
        let d = rate.abs_diff(hz);
        if d < best_d {
            best = hz;
            best_d = d;
        }
        i += 1;
    }
    if best_d * 8 <= best {
        best as u32
    } else {
        0
    }
}

impl MediaStream {
    /// A stream valid from this packet on (the second of two in sequence).
    #[inline(always)]
    pub fn start(pt: u8, seq: u16, ts: u32, now_ns: u64, len: u32, flags: u8) -> MediaStream {
        let mut s = MediaStream {
            first_ns: now_ns,
            last_ns: now_ns,
            origin_ns: now_ns,
            received: 1,
            bytes: len as u64,
            base_seq: seq,
            max_seq: seq,
            bad_seq: (1 << 16) + 1,
            first_ts: ts,
            clock_hz: rtp_static_clock(pt),
            clock_mult: rtp_clock_mult(rtp_static_clock(pt)),
            seen: 1,
            payload_type: pt,
            flags,
            ..MediaStream::default()
        };
        s.jitter(ts, now_ns);
        s
    }

    /// Packets the sequence numbers say were sent since the stream became valid.
    pub fn expected(&self) -> u64 {
        ((self.cycles as u64) << 16 | self.max_seq as u64) + 1 - self.base_seq as u64
    }

    /// Packets never seen (duplicates are not counted as received, so never negative).
    pub fn lost(&self) -> u64 {
        self.expected().saturating_sub(self.received)
    }

    /// RFC 3550 jitter in microseconds, once the clock is known.
    pub fn jitter_us(&self) -> Option<u64> {
        if self.clock_hz == 0 {
            return None;
        }
        Some(self.jitter16 * 1_000_000 / 16 / self.clock_hz as u64)
    }

    #[inline(always)]
    fn jitter(&mut self, ts: u32, now_ns: u64) {
        let since = now_ns.saturating_sub(self.origin_ns);
        if self.clock_hz == 0 {
            if since < RTP_CLOCK_ESTIMATE_NS {
                return;
            }
            // One window's estimate is not trusted alone: a sender that stalls (a busy
            // host, a codec starting) and then catches up fits no clock, or the wrong one.
            // The next window starts here; the clock is the rate two windows in a row
            // agree on.
            let hz = rtp_estimate_clock(ts.wrapping_sub(self.first_ts), since);
            self.origin_ns = now_ns;
            self.first_ts = ts;
            if hz == 0 || hz != self.clock_try {
                self.clock_try = hz;
                return;
            }
            self.clock_hz = hz;
            self.clock_mult = rtp_clock_mult(hz);
            // Transit from this origin on: this packet's is 0.
            self.jitter16 = 0;
            self.transit = 0;
            self.have_transit = 1;
            return;
        }
        // Arrival in clock units: `since` below 2^44 ns (4.8 hours) keeps the product
        // below 2^63 (`clock_mult` is below 2^19 for clocks to 122 kHz); longer streams
        // restart the origin.
        if since >= 1 << 44 {
            self.origin_ns = now_ns;
            self.first_ts = ts;
            self.have_transit = 0;
            return;
        }
        let arrival = ((since * self.clock_mult as u64) >> 32) as i64;
        let transit = arrival - (ts.wrapping_sub(self.first_ts) as i32) as i64;
        if self.have_transit != 0 {
            let d = transit - self.transit;
            let d = if d < 0 { -d } else { d } as u64;
            // J += (|D| - J) / 16, with J kept times 16.
            self.jitter16 = self.jitter16 + d - ((self.jitter16 + 8) >> 4);
        }
        self.transit = transit;
        self.have_transit = 1;
    }
}

/// `hz` per ns times 2^32, rounded: the arrival in clock units of `since` ns is
/// `since * mult >> 32`. The rounding makes the clock up to 8 ppm fast or slow (at 8 kHz,
/// the coarsest; less at faster clocks), less than senders' own clocks drift, and the
/// difference between two packets' arrivals (what the jitter sums) is within one unit.
#[inline(always)]
pub fn rtp_clock_mult(hz: u32) -> u32 {
    ((((hz as u64) << 32) + 500_000_000) / 1_000_000_000) as u32
}

/// RFC 3550 A.1's `update_seq` for one packet of a valid stream, with duplicates told
/// apart from reordering and the jitter updated; one of `RTP_*`.
#[inline(always)]
pub fn rtp_update(s: &mut MediaStream, seq: u16, ts: u32, now_ns: u64, len: u32) -> u32 {
    s.bytes += len as u64;
    s.last_ns = now_ns;
    let udelta = seq.wrapping_sub(s.max_seq);
    let out;
    if udelta == 0 {
        s.duplicates += 1;
        return RTP_DUPLICATE;
    } else if udelta < RTP_MAX_DROPOUT {
        if seq < s.max_seq {
            s.cycles += 1;
        }
        s.max_seq = seq;
        s.seen = if udelta >= 64 {
            1
        } else {
            s.seen << udelta | 1
        };
        out = RTP_COUNTED;
    } else if udelta <= u16::MAX - RTP_MAX_MISORDER + 1 {
        if seq as u32 == s.bad_seq {
            // Two packets in sequence after a jump: the sender restarted.
            let keep = (s.bytes, s.duplicates, s.reordered, s.gw_drops);
            *s = MediaStream::start(s.payload_type, seq, ts, now_ns, 0, s.flags);
            (s.bytes, s.duplicates, s.reordered, s.gw_drops) = keep;
            return RTP_RESTARTED;
        }
        s.bad_seq = seq.wrapping_add(1) as u32;
        return RTP_IGNORED;
    } else {
        let back = s.max_seq.wrapping_sub(seq);
        if back < 64 && s.seen & (1u64 << back) != 0 {
            s.duplicates += 1;
            return RTP_DUPLICATE;
        }
        if back < 64 {
            s.seen |= 1u64 << back;
        }
        s.reordered += 1;
        out = RTP_REORDERED;
    }
    s.received += 1;
    s.jitter(ts, now_ns);
    out
}

/// Where an RTP header starts in a UDP payload whose first bytes are `b0`, `b1` (and
/// the ChannelData length `len` in bytes 2-3): 0 for plain RTP, 4 behind TURN
/// ChannelData (channel numbers 0x4000-0x7FFF, RFC 8656 §12.4), None when neither.
#[inline(always)]
pub fn rtp_offset(b0: u8, b1: u8) -> Option<u32> {
    if b0 >> 6 == 2 {
        Some(0)
    } else if (0x40..=0x7f).contains(&b0) {
        let _ = b1;
        Some(4)
    } else {
        None
    }
}

/// Whether the fixed header's first two bytes are RTP (version 2, not an RTCP packet
/// type, RFC 5761 §4), and its payload type.
#[inline(always)]
pub fn rtp_payload_type(b0: u8, b1: u8) -> Option<u8> {
    if b0 >> 6 != 2 || (200..=207).contains(&b1) {
        return None;
    }
    let pt = b1 & 0x7f;
    if (72..=76).contains(&pt) {
        return None;
    }
    Some(pt)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hint holds its slot's index and generation, matches only the tenancy it was
    /// made for, and a slot's generation never comes back to 0 (no hint) or to the one
    /// it had after fewer than 2^22 - 1 moves.
    #[test]
    fn hints_match_only_their_tenancy() {
        let key = MediaKey {
            ssrc: 0xdead_beef,
            family: 4,
            ..MediaKey::default()
        };
        let mut s = MediaSlot {
            key,
            gen: 7,
            ..MediaSlot::default()
        };
        for slot in [0, 1, 513, MEDIA_MAX_SLOTS - 1] {
            let h = MediaHint::new(slot, s.gen, key.ssrc);
            assert_eq!(h.slot(), slot);
            assert!(h.holds(&s, key.ssrc, 0));
            assert!(!h.holds(&s, key.ssrc + 1, 0), "another SSRC");
            assert!(!h.holds(&s, key.ssrc, MEDIA_TURN), "another framing");
        }
        let h = MediaHint::new(3, s.gen, key.ssrc);
        // Freed (user space moves the generation on): no longer held, nor once taken
        // again by a stream with the same key.
        s.gen = media_gen_next(s.gen);
        s.key.family = 0;
        assert!(!h.holds(&s, key.ssrc, 0));
        s.gen = media_gen_next(s.gen);
        s.key.family = 4;
        assert!(!h.holds(&s, key.ssrc, 0));
        assert!(
            !MediaHint::default().holds(&MediaSlot::default(), 0, 0),
            "no hint"
        );
        assert_eq!(media_gen_next(MEDIA_GEN_MASK), 1, "0 is skipped");
        assert_eq!(media_gen_next(u32::MAX), 1);
        let mut g = 1;
        for _ in 0..MEDIA_GEN_MASK - 1 {
            g = media_gen_next(g);
            assert_ne!(g, 1);
        }
        assert_eq!(media_gen_next(g), 1, "the cycle is 2^22 - 1 long");
    }

    /// The multiply-and-shift arrival against the division it replaces: for every clock
    /// in use, over the whole range a stream's origin allows (4.8 hours), within one clock
    /// unit and 2^-16 of the arrival, and differences over a packet interval (what the
    /// jitter sums) within one unit.
    #[test]
    fn clock_mult_agrees_with_dividing() {
        for hz in RTP_CLOCKS_HZ {
            let m = rtp_clock_mult(hz) as u64;
            assert!(m < 1 << 19, "{hz} Hz: multiplier {m}");
            let exact = |ns: u64| (ns as u128 * hz as u128 / 1_000_000_000) as i64;
            let fast = |ns: u64| ((ns * m) >> 32) as i64;
            let mut ns = 1u64;
            while ns < 1 << 44 {
                for t in [ns - 1, ns, ns + 7_919, ns * 3 / 2] {
                    let t = t.min((1 << 44) - 1);
                    let bound = 1 + exact(t) / (1 << 16);
                    assert!((exact(t) - fast(t)).abs() <= bound, "{hz} Hz at {t} ns");
                    let step = t + 20_000_000;
                    if step < 1 << 44 {
                        let d = (fast(step) - fast(t)) - (exact(step) - exact(t));
                        assert!(
                            d.abs() <= 1,
                            "{hz} Hz: a 20 ms step at {t} ns is off by {d}"
                        );
                    }
                }
                ns *= 2;
            }
        }
    }

    /// A 50 pps Opus stream (48 kHz, dynamic type 111) through [`rtp_update`]: loss in
    /// gaps, reordering, duplicates, the clock estimated, jitter of alternating 4 ms.
    #[test]
    fn measures_like_a_receiver() {
        let ms = 1_000_000u64;
        let mut p = MediaProbe::default();
        assert!(!p.offer(7, 65_000));
        assert!(!p.offer(9, 3)); // another SSRC in the same flow
        assert!(p.offer(7, 65_001));
        let mut s = MediaStream::start(111, 65_001, 960, 20 * ms, 100, 0);
        for i in 2..1000u32 {
            let seq = (65_000 + i) as u16;
            if i % 100 == 50 {
                continue; // lost
            }
            let late = if i % 2 == 1 { 4 * ms } else { 0 };
            rtp_update(&mut s, seq, i * 960, i as u64 * 20 * ms + late, 100);
        }
        assert_eq!(s.cycles, 1);
        assert_eq!((s.expected(), s.lost()), (999, 10));
        assert_eq!(s.clock_hz, 48_000);
        let j = s.jitter_us().expect("clock known");
        assert!((3_800..=4_200).contains(&j), "{j} us");
        let last = s.max_seq;
        assert_eq!(rtp_update(&mut s, last, 0, 0, 100), RTP_DUPLICATE);
        assert_eq!(
            rtp_update(&mut s, last.wrapping_sub(1), 0, 0, 100),
            RTP_DUPLICATE
        );
        // The lost packet 50 turning up late: reordered, and no longer lost.
        assert_eq!(
            rtp_update(&mut s, (65_000u32 + 950) as u16, 0, 0, 100),
            RTP_REORDERED
        );
        assert_eq!((s.lost(), s.duplicates, s.reordered), (9, 2, 1));
        // A jump: ignored once, a restart when the next follows it.
        assert_eq!(rtp_update(&mut s, 30_000, 0, 0, 100), RTP_IGNORED);
        assert_eq!(rtp_update(&mut s, 30_001, 0, 0, 100), RTP_RESTARTED);
        assert_eq!((s.expected(), s.lost(), s.duplicates), (1, 0, 2));
    }

    /// A sender frozen for 5 s after its first second, then going on where it stopped
    /// (its timestamps paused too): the first window fits 8 kHz (1 s of 48 kHz media over
    /// 6 s), which alone would have made the jitter six times too large for good. The clock
    /// is the 48 kHz two later windows agree on, and the jitter is then right.
    #[test]
    fn a_frozen_sender_does_not_set_the_wrong_clock() {
        let ms = 1_000_000u64;
        let arrive = |i: u32| {
            let t = if i < 50 {
                i as u64 * 20 * ms
            } else {
                5_000 * ms + i as u64 * 20 * ms
            };
            t + if i % 2 == 1 { 4 * ms } else { 0 }
        };
        assert_eq!(rtp_estimate_clock(50 * 960, 6_000 * ms), 8_000);
        let mut s = MediaStream::start(111, 0, 0, arrive(0), 100, 0);
        for i in 1..1000u32 {
            rtp_update(&mut s, i as u16, i * 960, arrive(i), 100);
            if i == 50 {
                assert_eq!((s.clock_hz, s.clock_try), (0, 8_000), "the first window");
            }
        }
        assert_eq!(s.clock_hz, 48_000);
        assert_eq!(s.first_ns, 0, "the stream's start stays");
        let j = s.jitter_us().expect("clock known");
        assert!((3_800..=4_200).contains(&j), "{j} us");
    }

    #[test]
    fn recognises_headers_and_clocks() {
        assert_eq!(rtp_offset(0x80, 96), Some(0));
        assert_eq!(rtp_offset(0x40, 0x01), Some(4));
        assert_eq!(rtp_offset(0x00, 0x01), None); // STUN
        assert_eq!(rtp_payload_type(0x80, 0x80 | 96), Some(96));
        assert_eq!(rtp_payload_type(0x80, 200), None); // RTCP SR
        assert_eq!(rtp_payload_type(0x40, 96), None);
        assert_eq!(rtp_static_clock(0), 8_000);
        assert_eq!(rtp_static_clock(96), 0);
        assert_eq!(rtp_estimate_clock(90_000, 1_000_000_000), 90_000);
        assert_eq!(rtp_estimate_clock(47_000, 1_000_000_000), 48_000);
        assert_eq!(rtp_estimate_clock(60_000, 1_000_000_000), 0);
        // Random SSRCs never validate: four slots, a match only on the same SSRC.
        let mut p = MediaProbe::default();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            assert!(!p.offer((x >> 16) as u32 | 1, x as u16));
        }
    }
}
