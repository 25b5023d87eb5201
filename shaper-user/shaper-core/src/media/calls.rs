//! Calls: the media streams between one LAN host and one peer (a far end, or the TURN
//! relay the call goes through), in both directions, overlapping in time. A call ends
//! after [`Calls::quiet_ns`] without a media packet and becomes one [`CallRecord`].
//!
//! A call is reported only once one of its streams has passed probation and carried
//! [`MIN_CALL_PACKETS`] packets: a flood of random UDP, or a game's traffic, never builds
//! a stream (random SSRCs and sequence numbers never pass probation) and so is never a
//! call. State is bounded: [`MAX_CALLS`] calls (a new host/peer pair beyond that is not
//! tracked until one ends) and [`MAX_FLOWS_PER_CALL`] UDP flows per call.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use shaper_common::media::{MediaKey, MediaStream, MEDIA_TURN};

use super::emodel;
use super::rtp::{self, Media};
use super::stream::Flow;
use crate::dir::{Dir, PerDir};

/// Packets one stream must carry before its call is reported.
pub const MIN_CALL_PACKETS: u64 = 50;
/// Calls followed at once.
pub const MAX_CALLS: usize = 1024;
/// UDP flows (each direction counted apart) followed per call.
pub const MAX_FLOWS_PER_CALL: usize = 16;
/// A call with no media packet for this long has ended.
pub const DEFAULT_QUIET_NS: u64 = 10_000_000_000;
/// Loss above this (per cent) in a direction makes a call degraded.
pub const DEGRADED_LOSS_PCT: f64 = 1.0;
/// RFC 3550 jitter above this (ms) in a direction makes a call degraded.
pub const DEGRADED_JITTER_MS: f64 = 30.0;

/// How addresses appear in records: pseudonyms under a key (the default; a keyed
/// SHA-256, stable for one key, not reversible without it), or as they are.
#[derive(Debug, Clone)]
pub enum Addresses {
    Pseudonymous([u8; 32]),
    Shown,
}

impl Addresses {
    pub fn name(&self, a: IpAddr) -> String {
        match self {
            Addresses::Shown => a.to_string(),
            Addresses::Pseudonymous(key) => {
                let mut h = Sha256::new();
                h.update(key);
                match a {
                    IpAddr::V4(v) => h.update(v.octets()),
                    IpAddr::V6(v) => h.update(v.octets()),
                }
                let d = h.finalize();
                format!(
                    "h-{}",
                    d[..5]
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<String>()
                )
            }
        }
    }
}

/// One direction of a call, as the gateway measured it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DirQuality {
    /// Streams (SSRCs) that passed probation.
    pub streams: u32,
    pub packets: u64,
    pub expected: u64,
    pub lost: u64,
    pub loss_pct: f64,
    pub reordered: u64,
    pub duplicates: u64,
    /// The largest RFC 3550 jitter of the direction's streams, where a clock rate is known.
    pub jitter_ms: Option<f64>,
    pub bitrate_kbps: f64,
    /// Where this direction's sequence gaps happened: an upload stream's gaps arriving at
    /// the gateway are loss on the LAN side (Wi-Fi, switch); a download stream's are loss
    /// on the line or beyond.
    pub loss_where: String,
    /// G.107 R and MOS from the loss and jitter ([`emodel`]).
    pub r: f64,
    pub mos: f64,
    /// Of the call's time the gateway watched the line (`shaper run`), the share (%) the
    /// shaped line was full this way, and the share its rate was held below the configured
    /// one (autorate following a slower line, or arrival accounting holding a flood); the
    /// lowest rate then, % of the configured. None from a capture.
    #[serde(default)]
    pub line_full_pct: Option<f64>,
    #[serde(default)]
    pub rate_held_pct: Option<f64>,
    #[serde(default)]
    pub lowest_rate_pct: Option<f64>,
    /// Packets the shaper's own queues dropped this way while the call was on: the drops
    /// of the measured classes (`[calls] classes`) in this direction, summed over the
    /// seconds the gateway watched the line during the call (the HTB classes' drop
    /// counters, sampled once a second by `shaper run`). An upper bound on what the
    /// gateway itself dropped of this call: a class's drops are of any flow in the class,
    /// this call's or another's; 0 means the gateway dropped none of it. Not part of
    /// `lost` (the classifier counts a packet before the shaper's queues). None from a
    /// capture, and in records from before this field.
    ///
    /// Where the gateway runs the drop tracer (a kernel with BTF: `shaper_drops_exact`),
    /// it is instead the exact count: the packets of this direction's streams that the
    /// gateway's queues or egress device dropped after the classifier counted them
    /// (`MediaStream::gw_drops`), not part of `lost`; a download stream's receiver misses
    /// `lost + shaper_drops` of them.
    #[serde(default)]
    pub shaper_drops: Option<u64>,
    /// `shaper_drops` is the streams' own count (the drop tracer ran), not their classes'
    /// upper bound.
    #[serde(default)]
    pub shaper_drops_exact: bool,
}

/// One second (or so) of one direction of the shaped line, as `shaper run` samples it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LineSample {
    /// The shaper sent at (nearly) its rate, or a class dropped: the line was the limit.
    pub full: bool,
    /// The rate in the kernel, % of the configured rate.
    pub rate_pct: f64,
    /// Packets the queues of the measured classes (`[calls] classes`) dropped this way
    /// during the sample.
    pub measured_drops: u64,
}

/// A rate below this share of the configured one counts as held down.
pub const HELD_BELOW_PCT: f64 = 99.0;

#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct LineShare {
    watched_s: f64,
    full_s: f64,
    held_s: f64,
    lowest_pct: Option<f64>,
    /// The measured classes' drops over the samples.
    drops: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallRecord {
    /// The LAN host and the peer, pseudonymised unless the caller asked otherwise.
    pub lan_host: String,
    pub peer: String,
    /// Seconds (since the Unix epoch for a capture or the box's clock).
    pub start_s: f64,
    pub duration_s: f64,
    /// Media came through TURN ChannelData.
    pub turn: bool,
    /// RTCP packets seen.
    pub rtcp_packets: u64,
    pub up: DirQuality,
    pub down: DirQuality,
    /// Why the call counts as degraded (empty: it does not).
    pub degraded: Vec<String>,
}

#[derive(Debug, Default)]
struct Call {
    start_ns: u64,
    last_ns: u64,
    turn: bool,
    rtcp: u64,
    /// Fed from packets (a capture): by direction, LAN port, peer port.
    flows: BTreeMap<(Dir, u16, u16), Flow>,
    /// Fed from the kernel's streams, by their keys.
    kernel: BTreeMap<MediaKey, MediaStream>,
    /// What the line did while the call was on, per direction (`shaper run` only).
    line: PerDir<LineShare>,
}

impl Call {
    /// Every valid stream of the call going `d`.
    fn streams(&self, d: Dir) -> impl Iterator<Item = &MediaStream> {
        let from_packets = self
            .flows
            .iter()
            .filter(move |((fd, _, _), _)| *fd == d)
            .flat_map(|(_, f)| f.streams.iter().map(|(_, s)| s));
        let from_kernel = self
            .kernel
            .iter()
            .filter(move |(k, _)| u32::from(k.dir) == d as u32)
            .map(|(_, s)| s);
        from_packets.chain(from_kernel)
    }
}

/// The addresses of a kernel stream key.
pub fn key_addresses(k: &MediaKey) -> (SocketAddr, SocketAddr) {
    let ip = |b: &[u8; 16]| -> IpAddr {
        if k.family == 6 {
            IpAddr::from(*b)
        } else {
            IpAddr::from([b[0], b[1], b[2], b[3]])
        }
    };
    (
        SocketAddr::new(ip(&k.lan), k.lan_port),
        SocketAddr::new(ip(&k.peer), k.peer_port),
    )
}

/// The calls through the gateway, fed one UDP payload at a time.
#[derive(Debug)]
pub struct Calls {
    pub quiet_ns: u64,
    /// Added to stream times to make them Unix time in records (the kernel's streams are
    /// on the monotonic clock; a capture's are Unix time already: 0).
    pub wall_offset_ns: i64,
    addresses: Addresses,
    calls: BTreeMap<(IpAddr, IpAddr), Call>,
    /// Calls not followed because [`MAX_CALLS`] were.
    pub untracked: u64,
    ended_streams: Vec<MediaKey>,
    /// Calls [`Calls::observe`] found over (a new stream after a quiet longer than
    /// `quiet_ns`), returned by the next [`Calls::expire`].
    ended: Vec<CallRecord>,
    /// The kernel counts each stream's packets the gateway itself drops (the drop tracer
    /// is attached): calls report those ([`DirQuality::shaper_drops_exact`]).
    pub stream_drops: bool,
}

impl Calls {
    pub fn new(quiet_ns: u64, addresses: Addresses) -> Calls {
        Calls {
            quiet_ns,
            wall_offset_ns: 0,
            addresses,
            calls: BTreeMap::new(),
            untracked: 0,
            ended_streams: Vec::new(),
            ended: Vec::new(),
            stream_drops: false,
        }
    }

    /// One UDP payload going `dir` between `lan` (the site's end) and `peer`, at `now_ns`.
    pub fn packet(&mut self, now_ns: u64, dir: Dir, lan: SocketAddr, peer: SocketAddr, udp: &[u8]) {
        let Some(media) = rtp::parse(udp) else {
            return;
        };
        let key = (lan.ip(), peer.ip());
        if !self.calls.contains_key(&key) && self.calls.len() >= MAX_CALLS {
            self.untracked += 1;
            return;
        }
        let call = self.calls.entry(key).or_insert_with(|| Call {
            start_ns: now_ns,
            ..Call::default()
        });
        match media {
            Media::Rtcp { turn, .. } => {
                call.rtcp += 1;
                call.turn |= turn;
            }
            Media::Rtp(h) => {
                let fk = (dir, lan.port(), peer.port());
                if !call.flows.contains_key(&fk) && call.flows.len() >= MAX_FLOWS_PER_CALL {
                    return;
                }
                call.turn |= h.turn;
                call.last_ns = call.last_ns.max(now_ns);
                let flags = if h.turn { MEDIA_TURN } else { 0 };
                call.flows
                    .entry(fk)
                    .or_default()
                    .packet(&h, now_ns, udp.len(), flags);
            }
        }
    }

    /// The kernel's current view of one stream at `now_ns` (`shaper run` reads them all
    /// once a second). A stream with no new packet leaves its call's `last_ns` where it
    /// was; one quiet for `quiet_ns` starts no call and, in no call, goes to
    /// [`Calls::take_ended_streams`] (a stream `shaper run` never grouped: seen while
    /// [`MAX_CALLS`] were followed, or left from before the daemon started), so that it
    /// frees its slot in the kernel's table.
    pub fn observe(&mut self, now_ns: u64, k: &MediaKey, s: &MediaStream) {
        let (lan, peer) = key_addresses(k);
        let key = (lan.ip(), peer.ip());
        // A stream that began after its call had been quiet for `quiet_ns` belongs to a
        // new call, however late this look comes (a daemon held up for seconds must not
        // join two calls into one): the old one ends here.
        if let Some(c) = self.calls.get(&key) {
            if !c.kernel.contains_key(k) && s.first_ns.saturating_sub(c.last_ns) >= self.quiet_ns {
                if let Some(c) = self.calls.remove(&key) {
                    self.ended.extend(self.record(key, &c));
                    self.ended_streams.extend(c.kernel.into_keys());
                }
            }
        }
        if !self.calls.contains_key(&key) && now_ns.saturating_sub(s.last_ns) >= self.quiet_ns {
            self.ended_streams.push(*k);
            return;
        }
        if !self.calls.contains_key(&key) && self.calls.len() >= MAX_CALLS {
            self.untracked += 1;
            return;
        }
        let call = self.calls.entry(key).or_insert_with(|| Call {
            start_ns: s.first_ns,
            ..Call::default()
        });
        if !call.kernel.contains_key(k) && call.kernel.len() >= MAX_FLOWS_PER_CALL {
            return;
        }
        call.start_ns = call.start_ns.min(s.first_ns);
        call.last_ns = call.last_ns.max(s.last_ns);
        call.turn |= s.flags & MEDIA_TURN != 0;
        call.kernel.insert(*k, *s);
    }

    /// One sample of the line covering `secs` up to `now_ns`: counted in every call that
    /// carried media within the last two seconds (its drops too, as the call's
    /// [`DirQuality::shaper_drops`]).
    pub fn line_tick(&mut self, now_ns: u64, secs: f64, line: &PerDir<LineSample>) {
        for c in self.calls.values_mut() {
            if now_ns.saturating_sub(c.last_ns) > 2_000_000_000 {
                continue;
            }
            for (d, l) in line.iter() {
                let share = &mut c.line[d];
                share.watched_s += secs;
                share.drops = share.drops.saturating_add(l.measured_drops);
                if l.full {
                    share.full_s += secs;
                }
                if l.rate_pct < HELD_BELOW_PCT {
                    share.held_s += secs;
                    share.lowest_pct =
                        Some(share.lowest_pct.map_or(l.rate_pct, |m| m.min(l.rate_pct)));
                }
            }
        }
    }

    /// Ends the calls quiet since `now_ns - quiet_ns`: their records (calls that never
    /// carried a stream are dropped without one).
    pub fn expire(&mut self, now_ns: u64) -> Vec<CallRecord> {
        let quiet = self.quiet_ns;
        let ended: Vec<_> = self
            .calls
            .iter()
            .filter(|(_, c)| now_ns.saturating_sub(c.last_ns.max(c.start_ns)) >= quiet)
            .map(|(k, _)| *k)
            .collect();
        let mut out = std::mem::take(&mut self.ended);
        for k in ended {
            if let Some(c) = self.calls.remove(&k) {
                out.extend(self.record(k, &c));
                self.ended_streams.extend(c.kernel.into_keys());
            }
        }
        out
    }

    /// The kernel streams of the calls ended since the last call: `shaper run` deletes
    /// them from the classifier's table, so a stream that resumes later starts a new call
    /// from zero rather than carrying the old one's counts.
    pub fn take_ended_streams(&mut self) -> Vec<MediaKey> {
        std::mem::take(&mut self.ended_streams)
    }

    /// Ends every call (the end of a capture, a new policy); their kernel streams go to
    /// [`Calls::take_ended_streams`].
    pub fn finish(&mut self) -> Vec<CallRecord> {
        let calls = std::mem::take(&mut self.calls);
        let mut out = std::mem::take(&mut self.ended);
        for (k, c) in calls {
            out.extend(self.record(k, &c));
            self.ended_streams.extend(c.kernel.into_keys());
        }
        out
    }

    /// The calls in progress, as records so far.
    pub fn live(&self) -> Vec<CallRecord> {
        self.calls
            .iter()
            .filter_map(|(k, c)| self.record(*k, c))
            .collect()
    }

    fn record(&self, (lan, peer): (IpAddr, IpAddr), c: &Call) -> Option<CallRecord> {
        let established = Dir::ALL
            .into_iter()
            .any(|d| c.streams(d).any(|s| s.received >= MIN_CALL_PACKETS));
        if !established {
            return None;
        }
        let q = PerDir::from_fn(|d| quality(c, d, self.stream_drops));
        let mut degraded = Vec::new();
        for (d, q) in q.iter() {
            if q.loss_pct > DEGRADED_LOSS_PCT {
                degraded.push(format!(
                    "{} loss {:.1} % ({})",
                    crate::explain::dir_name(d),
                    q.loss_pct,
                    q.loss_where
                ));
            }
            if let Some(j) = q.jitter_ms.filter(|j| *j > DEGRADED_JITTER_MS) {
                degraded.push(format!("{} jitter {j:.0} ms", crate::explain::dir_name(d)));
            }
        }
        let [up, down] = q.0;
        Some(CallRecord {
            lan_host: self.addresses.name(lan),
            peer: self.addresses.name(peer),
            start_s: (c.start_ns as i64).saturating_add(self.wall_offset_ns) as f64 / 1e9,
            duration_s: c.last_ns.saturating_sub(c.start_ns) as f64 / 1e9,
            turn: c.turn,
            rtcp_packets: c.rtcp,
            up,
            down,
            degraded,
        })
    }
}

fn quality(c: &Call, d: Dir, stream_drops: bool) -> DirQuality {
    let mut q = DirQuality {
        loss_where: match d {
            Dir::Up => "lan",
            Dir::Down => "line or beyond",
        }
        .to_string(),
        ..DirQuality::default()
    };
    let (mut first, mut last, mut bytes, mut gw_drops) = (u64::MAX, 0, 0, 0u64);
    for s in c.streams(d) {
        gw_drops = gw_drops.saturating_add(s.gw_drops);
        q.streams += 1;
        q.packets += s.received;
        q.expected += s.expected();
        q.lost += s.lost();
        q.reordered += s.reordered;
        q.duplicates += s.duplicates;
        if let Some(us) = s.jitter_us() {
            let j = us as f64 / 1000.0;
            q.jitter_ms = Some(q.jitter_ms.map_or(j, |m: f64| m.max(j)));
        }
        first = first.min(s.first_ns);
        last = last.max(s.last_ns);
        bytes += s.bytes;
    }
    if q.expected > 0 {
        q.loss_pct = q.lost as f64 * 100.0 / q.expected as f64;
    }
    if last > first {
        q.bitrate_kbps = bytes as f64 * 8.0 / ((last - first) as f64 / 1e9) / 1000.0;
    }
    let line = &c.line[d];
    if line.watched_s > 0.0 {
        q.line_full_pct = Some(line.full_s * 100.0 / line.watched_s);
        q.rate_held_pct = Some(line.held_s * 100.0 / line.watched_s);
        q.lowest_rate_pct = line.lowest_pct;
        q.shaper_drops = Some(line.drops);
    }
    if stream_drops {
        q.shaper_drops = Some(gw_drops);
        q.shaper_drops_exact = true;
    }
    q.r = emodel::r_factor(
        q.loss_pct,
        emodel::delay_from_jitter_ms(q.jitter_ms.unwrap_or(0.0)),
    );
    q.mos = emodel::mos(q.r);
    q
}
