//! `[calls]`: RTP streams in the measured classes (`Config::media_classes`), measured as
//! a receiver at the gateway would (issue 17). A UDP packet of such a class whose payload
//! starts with an RTP header (plain, or behind a TURN ChannelData header) is looked up by
//! its stream (the flow from the site's side, its direction and its SSRC) and counted by
//! `shaper_common::media::rtp_update`: loss, duplicates, reordering, jitter. An SSRC not
//! followed yet goes on probation in its flow's `MEDIA_PROBE` entry and becomes a stream
//! only when two of its packets arrive in sequence, so random payloads never create
//! streams (see `shaper_common::media`). User space reads the streams once a second.
//!
//! Where a stream lives: in its `MEDIA_SLOTS` slot (an array, direct-mapped by
//! `shaper_common::media::media_slot`) when the slot was free when the stream started,
//! else in `MEDIA` (an LRU hash). User space reads both, and frees a slot or removes an
//! entry when the stream's call ends.
//!
//! The cost per packet: a packet of a known stream takes the RTP header in place from
//! the packet's linear data (three word loads; `bpf_skb_load_bytes` only for paged
//! data). When the flow's cache entry (which the classifier has just looked up) holds a
//! hint for the SSRC (`shaper_common::media::MediaHint`: the slot's index and
//! generation), the packet goes straight to that slot, checked by its generation, SSRC
//! and framing, in the classifier's own code (no call): the flow cache's own lookup has
//! matched the rest of the stream's key. Otherwise, in a subprogram of its own
//! (`media_sub`), it reads the header again, builds its key on that subprogram's stack,
//! finds its slot (a multiplicative hash and an array index, no helper call), compares
//! the slot's key word by word, and leaves a hint in the flow's entry. Either way it
//! takes the clock the flow cache read for the packet (`Pkt::now`; read here only when
//! the policy measures no flow behaviour), and updates the stream in place (its jitter
//! with a multiply and a shift, no division). Only a stream whose slot is taken pays the
//! `MEDIA` lookup (a hash of the 44-byte key), and only an SSRC in neither map a
//! `MEDIA_PROBE` lookup too. A slot's generation moves on when it is taken and when user
//! space frees it, so a hint never leads a packet into a stream of another tenancy
//! (another flow's stream with the same SSRC, say); a flow's entry keeps hints for its
//! two most recent streams (audio and video of one bundle). (The key is built once, on
//! the stack, rather than kept in registers for the slot: that spilled enough registers
//! to take the frame past what 6.1's verifier allows beside the classifier's, whose
//! frames it rounds up to 32 bytes.)
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
    media_gen_next, media_slot, rtp_offset, rtp_payload_type, rtp_update, MediaHint, MediaKey,
    MediaProbe, MediaStream, MEDIA_HINTS, MEDIA_TURN,
};
use shaper_common::FlowVal;

use crate::maps::{MEDIA, MEDIA_PROBE, MEDIA_SCRATCH, MEDIA_SLOTS};
use crate::parse::{load, Pkt};

/// Measures the packet parsed into `pkt` (SCRATCH: UDP, not a later fragment, in a
/// measured class; addresses and ports from the site's side) going `dir`; `flow` is the
/// flow's cache entry (null when it had none), whose stream hints it follows and keeps.
///
/// The common case runs here, inline in the classifier: a packet of a stream the flow's
/// entry has a hint for, read from the packet's linear data. Everything else (no hint or
/// a stale one, paged data, a stream to find or start) runs in [`media_sub`], which reads
/// the header again. Inline, the packet saves the BPF-to-BPF call (with the return
/// thunk that this host's speculation mitigations put on every return) without growing
/// the classifier's frame: the path keeps no key on the stack.
#[inline(always)]
pub(crate) fn measure(ctx: &TcContext, pkt: &Pkt, dir: u32, flow: *mut FlowVal) {
    if !flow.is_null() {
        match rtp(pkt, |off| linear(ctx, off)) {
            Header::Rtp(r) => {
                if hinted(pkt, flow, &r) {
                    return;
                }
            }
            Header::NotRtp => return,
            Header::Unread => {}
        }
    }
    media_sub(ctx.skb.skb, pkt, dir, flow);
}

/// [`measure`]'s other paths as a subprogram of its own (a BPF-to-BPF call): its locals
/// (the stream's 44-byte key) live in its own frame, not in the classifier's (which the
/// window clamp's callbacks leave no room to grow), and a call costs less than a
/// `bpf_loop` of one iteration (some 10 ns less a packet in the classifier benchmark).
/// The parsed packet comes in as the caller's pointer into SCRATCH, not looked up again.
#[inline(never)]
extern "C" fn media_sub(
    skb: *mut aya_ebpf::bindings::__sk_buff,
    pkt: *const Pkt,
    dir: u32,
    flow: *mut FlowVal,
) {
    let ctx = TcContext::new(skb);
    // SAFETY: the caller's per-CPU scratch slot, filled by this program run's parse.
    let pkt = unsafe { &*pkt };
    measure_packet(&ctx, pkt, dir, flow);
}

/// An RTP header as the measurement reads it.
struct Rtp {
    /// [`MEDIA_TURN`] behind a ChannelData header, else 0.
    flags: u8,
    pt: u8,
    seq: u16,
    ts: u32,
    ssrc: u32,
}

/// What [`rtp`] found in the payload.
enum Header {
    Rtp(Rtp),
    /// Not RTP (or cut short): nothing to measure.
    NotRtp,
    /// The reader could not reach the bytes (a linear-only reader, paged data).
    Unread,
}

/// The RTP header (plain or behind TURN ChannelData) of the UDP payload `pkt` describes,
/// its 12-byte words read by `read` at a payload offset.
#[inline(always)]
fn rtp(pkt: &Pkt, read: impl Fn(u32) -> Option<[u32; 3]>) -> Header {
    // UDP payload bytes, as the IP header announces them (what user space counts).
    let len = pkt.payload_len;
    let off = pkt.payload_off;
    // The fixed header (12 bytes: the smallest RTP packet, a header alone, is counted).
    let Some(h) = read(off) else {
        return Header::Unread;
    };
    let (flags, rtp_len, b) = match rtp_offset(byte(h[0], 0), byte(h[0], 1)) {
        Some(0) => (0, len, h),
        Some(_) => {
            // ChannelData (RFC 8656 §12.4): its length must fit in the datagram
            // (padding may follow), as user space's parser wants it.
            let data = u32::from_be(h[0]) & 0xffff;
            if data + 4 > len {
                return Header::NotRtp;
            }
            let Some(b) = read(off + 4) else {
                return Header::Unread;
            };
            (MEDIA_TURN, data, b)
        }
        None => return Header::NotRtp,
    };
    let (b0, b1) = (byte(b[0], 0), byte(b[0], 1));
    let Some(pt) = rtp_payload_type(b0, b1) else {
        return Header::NotRtp;
    };
    // The CSRC list must fit.
    if RTP_HEADER + 4 * (b0 & 0x0f) as u32 > rtp_len {
        return Header::NotRtp;
    }
    Header::Rtp(Rtp {
        flags,
        pt,
        seq: u32::from_be(b[0]) as u16,
        ts: u32::from_be(b[1]),
        ssrc: u32::from_be(b[2]),
    })
}

/// Counts `r` in the slot a hint in the flow's cache entry names, when the slot still
/// holds the stream (its generation, SSRC and framing; the flow cache's own lookup has
/// matched the rest of the stream's key): no key, no hash, no compare. False when no
/// hint holds.
#[inline(always)]
fn hinted(pkt: &Pkt, flow: *mut FlowVal, r: &Rtp) -> bool {
    // SAFETY: the flow's cache entry (a map value); its hints are copied out.
    let hints = unsafe { (*flow).media };
    let mut i = 0;
    while i < MEDIA_HINTS {
        let h = hints[i];
        if h.names(r.ssrc) {
            if let Some(sl) = MEDIA_SLOTS.get_ptr_mut(h.slot()) {
                // SAFETY: a map value, changed in place (see the module's note).
                let sl = unsafe { &mut *sl };
                if h.holds(sl, r.ssrc, r.flags) {
                    rtp_update(&mut sl.stream, r.seq, r.ts, clock(pkt), pkt.payload_len);
                    return true;
                }
            }
        }
        i += 1;
    }
    false
}

/// Keeps in the flow's cache entry that its stream of `ssrc` lives in slot `slot` in
/// generation `gen`: in the hint that had this SSRC, else in the first, the other moved
/// to second (the two most recent streams of the flow keep theirs).
#[inline(always)]
fn remember(flow: *mut FlowVal, slot: u32, gen: u32, ssrc: u32) {
    if flow.is_null() {
        return;
    }
    // SAFETY: the flow's cache entry, a map value changed in place (like its counts).
    let f = unsafe { &mut *flow };
    let h = MediaHint::new(slot, gen, ssrc);
    if f.media[1].ssrc == ssrc && f.media[0].ssrc != ssrc {
        f.media[1] = h;
    } else {
        if f.media[0].ssrc != ssrc {
            f.media[1] = f.media[0];
        }
        f.media[0] = h;
    }
}

/// The 12 bytes at `off`, as three words in network order: [`linear`], else copied with
/// `bpf_skb_load_bytes` (paged data); None past the end.
#[inline(always)]
fn header(ctx: &TcContext, off: u32) -> Option<[u32; 3]> {
    linear(ctx, off).or_else(|| load::<[u32; 3]>(ctx, off as usize))
}

/// The 12 bytes at `off` read in place, when the linear part of the packet holds them
/// (no helper call, nothing on the stack). Words, not bytes, so the fields come out of
/// them with a shift and a byte swap each.
#[inline(always)]
fn linear(ctx: &TcContext, off: u32) -> Option<[u32; 3]> {
    // Bounded for the verifier (a packet pointer's variable offset must be); the payload
    // of a packet this program parsed starts well inside 64 KiB.
    if off < 0x1000 {
        let start = ctx.data() + off as usize;
        if start + 12 <= ctx.data_end() {
            // Three word loads, where `read_unaligned` would make twelve byte loads and
            // their shifts. The payload is 2-aligned at best (behind 14 bytes of Ethernet),
            // and BPF leaves such a load to the architecture: the verifier allows a
            // misaligned packet load where the kernel has efficient unaligned access
            // (x86-64, arm64: `check_pkt_ptr_alignment` is strict only elsewhere), as the
            // programs that read packet headers through `#[repr(C)]` structs rely on.
            // SAFETY: the bytes lie inside the packet's linear data, just checked; the
            // load is misaligned only in the sense above (the object is always built in
            // release by aya-build, where `ptr::read` carries no alignment check).
            return Some(unsafe { core::ptr::read(start as *const [u32; 3]) });
        }
    }
    None
}

/// Byte `i` (0-3) of a word read from the packet.
#[inline(always)]
fn byte(w: u32, i: u32) -> u8 {
    (u32::from_be(w) >> (24 - 8 * i)) as u8
}

/// The packet's arrival: the clock the flow cache's behaviour read for it, else read now.
#[inline(always)]
fn clock(pkt: &Pkt) -> u64 {
    if pkt.now != 0 {
        return pkt.now;
    }
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// RTP's fixed header, without CSRCs.
const RTP_HEADER: u32 = 12;

#[inline(always)]
fn measure_packet(ctx: &TcContext, pkt: &Pkt, dir: u32, flow: *mut FlowVal) {
    let len = pkt.payload_len;
    let Header::Rtp(r) = rtp(pkt, |off| header(ctx, off)) else {
        return;
    };
    // Paged data, which the classifier's inline path does not read, still has its hints.
    // (Linear data has tried them there already; the second try costs a stale hint or a
    // stream without one a nanosecond or two, and with it this frame stays at 160 bytes,
    // which the classifier's 320 and a `memset` under it leave on 6.1: without it the
    // registers spilled to 168. `kernel::stack_depth` in shaper-user checks the sum.)
    if !flow.is_null() && hinted(pkt, flow, &r) {
        return;
    }
    let Rtp {
        flags,
        pt,
        seq,
        ts,
        ssrc,
    } = r;
    // The key on this subprogram's stack (44 bytes: a per-CPU scratch slot would cost a
    // map lookup a packet).
    let mut key = MediaKey {
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
    // The common case: a packet of a stream followed already, in its slot (an array
    // index and a key compare), else in MEDIA (a hash of the key); MEDIA_PROBE is only
    // looked up for an SSRC in neither. The clock is read once, and only for a packet
    // that counts in a stream.
    let index = media_slot(&key);
    let slot = MEDIA_SLOTS.get_ptr_mut(index);
    if let Some(sl) = slot {
        // SAFETY: a map value, changed in place (see the module's note on atomicity).
        let sl = unsafe { &mut *sl };
        if sl.key.same(&key) {
            rtp_update(&mut sl.stream, seq, ts, clock(pkt), len);
            remember(flow, index, sl.gen, ssrc);
            return;
        }
    }
    if let Some(s) = MEDIA.get_ptr_mut(&key) {
        // SAFETY: a map value, changed in place.
        rtp_update(unsafe { &mut *s }, seq, ts, clock(pkt), len);
        return;
    }
    // Probation: the flow's SSRCs, under the key with SSRC 0.
    key.ssrc = 0;
    match MEDIA_PROBE.get_ptr_mut(&key) {
        Some(p) => {
            // SAFETY: a map value, changed in place.
            if !unsafe { &mut *p }.offer(ssrc, seq) {
                return;
            }
        }
        None => {
            let mut p = MediaProbe::default();
            p.offer(ssrc, seq);
            let _ = MEDIA_PROBE.insert(&key, &p, 0);
            return;
        }
    }
    key.ssrc = ssrc;
    let now = clock(pkt);
    // A new stream takes its slot when the slot is free; the stream first, then the key,
    // so that a key found in a slot has its stream behind it. Two CPUs starting two
    // streams of one slot at the same instant: the later write wins and the other
    // stream's packets start it afresh in MEDIA (its first packets are not counted).
    if let Some(sl) = slot {
        // SAFETY: a map value, changed in place.
        let sl = unsafe { &mut *sl };
        if sl.key.family == 0 {
            sl.gen = media_gen_next(sl.gen);
            sl.stream = MediaStream::start(pt, seq, ts, now, len, flags);
            sl.key = key;
            remember(flow, index, sl.gen, ssrc);
            return;
        }
    }
    let Some(sc) = MEDIA_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU scratch slot, used by this program run only.
    let sc = unsafe { &mut *sc };
    sc.stream = MediaStream::start(pt, seq, ts, now, len, flags);
    if MEDIA.insert(&key, &sc.stream, BPF_NOEXIST as u64).is_ok() {
        return;
    }
    // Another CPU started the stream meanwhile (the packets of a frame burst, run on two
    // CPUs, both found the SSRC validated): this packet counts in that stream.
    if let Some(s) = MEDIA.get_ptr_mut(&key) {
        // SAFETY: a map value, changed in place.
        rtp_update(unsafe { &mut *s }, seq, ts, now, len);
    }
}
