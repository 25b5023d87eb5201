//! `[calls]`: RTP streams in the measured classes (`Config::media_classes`), measured as
//! a receiver at the gateway would (issue 17). A UDP packet of such a class whose payload
//! starts with an RTP header (plain, or behind a TURN ChannelData header) is looked up by
//! its stream (the flow from the site's side, its direction and its SSRC) in `MEDIA` and
//! counted there by `shaper_common::media::rtp_update`: loss, duplicates, reordering,
//! jitter. An SSRC not followed yet goes on probation in its flow's `MEDIA_PROBE` entry
//! and becomes a stream only when two of its packets arrive in sequence, so random
//! payloads never create streams (see `shaper_common::media`). User space reads `MEDIA`
//! once a second.
//!
//! Nothing here changes or drops the packet, and any read that fails leaves it alone.
//! Only the fixed RTP header is read (12 bytes, behind a 4-byte ChannelData header at
//! most): a header-only RTP packet counts, and no payload byte is ever looked at.
//! A UDP GRO super-packet counts as its first datagram.
//!
//! The updates are not atomic: a stream's entry is read, changed and written back in
//! place by whichever CPU runs its packet. A stream's packets are one flow's, which the
//! stack keeps on one CPU nearly always; two CPUs running packets of one stream at once
//! may lose one packet's update, which reads as a lost packet. Accepted: the figures are
//! a call's quality, not accounting.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::generated::bpf_ktime_get_ns, programs::TcContext};
use shaper_common::media::{
    rtp_offset, rtp_payload_type, rtp_update, MediaKey, MediaProbe, MediaStream, MEDIA_TURN,
};

use crate::maps::{MEDIA, MEDIA_PROBE, MEDIA_SCRATCH, SCRATCH};
use crate::parse::{load, Pkt};

/// Measures the packet parsed into SCRATCH (UDP, not a later fragment, in a measured
/// class; addresses and ports from the site's side) going `dir`.
#[inline(always)]
pub(crate) fn measure(ctx: &TcContext, dir: u32) {
    media_sub(ctx.skb.skb, dir);
}

/// [`measure`] as a subprogram of its own (a BPF-to-BPF call): its locals live in its own
/// frame, not in the classifier's (which the window clamp's callbacks leave no room to
/// grow), and a call costs less than a `bpf_loop` of one iteration (some 10 ns less a
/// packet in the classifier benchmark).
#[inline(never)]
extern "C" fn media_sub(skb: *mut aya_ebpf::bindings::__sk_buff, dir: u32) {
    let ctx = TcContext::new(skb);
    let Some(pkt) = SCRATCH.get_ptr(0) else {
        return;
    };
    // SAFETY: per-CPU scratch slot, filled by this program run's parse.
    let pkt = unsafe { &*pkt };
    measure_packet(&ctx, pkt, dir);
}

/// RTP's fixed header, without CSRCs.
const RTP_HEADER: u32 = 12;

#[inline(always)]
fn measure_packet(ctx: &TcContext, pkt: &Pkt, dir: u32) {
    // UDP payload bytes, as the IP header announces them (what user space counts).
    let len = pkt.payload_len;
    let off = pkt.payload_off as usize;
    // The fixed header (12 bytes: the smallest RTP packet, a header alone, is counted).
    let Some(h) = load::<[u8; 12]>(ctx, off) else {
        return;
    };
    let (flags, rtp_len, b) = match rtp_offset(h[0], h[1]) {
        Some(0) => (0, len, h),
        Some(_) => {
            // ChannelData (RFC 8656 §12.4): its length must fit in the datagram
            // (padding may follow), as user space's parser wants it.
            let data = u16::from_be_bytes([h[2], h[3]]) as u32;
            if data + 4 > len {
                return;
            }
            let Some(b) = load::<[u8; 12]>(ctx, off + 4) else {
                return;
            };
            (MEDIA_TURN, data, b)
        }
        None => return,
    };
    let Some(pt) = rtp_payload_type(b[0], b[1]) else {
        return;
    };
    // The CSRC list must fit.
    if RTP_HEADER + 4 * (b[0] & 0x0f) as u32 > rtp_len {
        return;
    }
    let seq = u16::from_be_bytes([b[2], b[3]]);
    let ts = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
    let ssrc = u32::from_be_bytes([b[8], b[9], b[10], b[11]]);
    let Some(sc) = MEDIA_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU scratch slot, used by this program run only.
    let sc = unsafe { &mut *sc };
    sc.key = MediaKey {
        lan: pkt.src,
        peer: pkt.dst,
        lan_port: pkt.sport as u16,
        peer_port: pkt.dport as u16,
        ssrc,
        dir: dir as u8,
        family: if pkt.v6 != 0 { 6 } else { 4 },
        flags,
        _pad: 0,
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // The common case: a packet of a stream followed already.
    if let Some(s) = MEDIA.get_ptr_mut(&sc.key) {
        // SAFETY: a map value, changed in place (see the module's note on atomicity).
        rtp_update(unsafe { &mut *s }, seq, ts, now, len);
        return;
    }
    // Probation: the flow's SSRCs, under the key with SSRC 0.
    sc.key.ssrc = 0;
    match MEDIA_PROBE.get_ptr_mut(&sc.key) {
        Some(p) => {
            // SAFETY: a map value, changed in place.
            if !unsafe { &mut *p }.offer(ssrc, seq) {
                return;
            }
        }
        None => {
            let mut p = MediaProbe::default();
            p.offer(ssrc, seq);
            let _ = MEDIA_PROBE.insert(&sc.key, &p, 0);
            return;
        }
    }
    sc.key.ssrc = ssrc;
    sc.stream = MediaStream::start(pt, seq, ts, now, len, flags);
    if MEDIA
        .insert(&sc.key, &sc.stream, BPF_NOEXIST as u64)
        .is_ok()
    {
        return;
    }
    // Another CPU started the stream meanwhile (the packets of a frame burst, run on two
    // CPUs, both found the SSRC validated): this packet counts in that stream.
    if let Some(s) = MEDIA.get_ptr_mut(&sc.key) {
        // SAFETY: a map value, changed in place.
        rtp_update(unsafe { &mut *s }, seq, ts, now, len);
    }
}
