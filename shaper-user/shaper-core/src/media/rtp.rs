//! RTP and RTCP headers as they cross the gateway: plain in a UDP payload, or behind a
//! TURN ChannelData header (RFC 8656 §12.4: a 2-byte channel number in 0x4000-0x7FFF and a
//! 2-byte length). SRTP (RFC 3711) encrypts the payload and leaves the 12-byte header in
//! the clear, so SRTP media reads here as RTP does. Nothing beyond the fixed header is
//! read: no payload is ever looked at.

/// What one UDP payload carries, as far as media goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Media {
    Rtp(RtpHeader),
    /// An RTCP packet (compound or not); its sender SSRC.
    Rtcp {
        ssrc: u32,
        turn: bool,
    },
}

/// The fixed RTP header (RFC 3550 §5.1), without CSRCs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtpHeader {
    pub payload_type: u8,
    pub marker: bool,
    pub seq: u16,
    pub timestamp: u32,
    pub ssrc: u32,
    /// Read from behind a TURN ChannelData header.
    pub turn: bool,
}

/// RTP's fixed header.
pub const RTP_HEADER: usize = 12;
/// TURN ChannelData's header.
pub const CHANNEL_DATA_HEADER: usize = 4;

/// The media a UDP payload carries, if its first bytes are an RTP or RTCP header (plain,
/// or in TURN ChannelData). A shape check only: whether a flow of such packets is a
/// stream is `stream::Tracker`'s decision (a random payload passes this check one time in
/// a few dozen, never consistently).
pub fn parse(udp_payload: &[u8]) -> Option<Media> {
    if let Some(inner) = channel_data(udp_payload) {
        return parse_plain(inner, true);
    }
    parse_plain(udp_payload, false)
}

/// The ChannelData message's data, when the payload is one: the channel number in the
/// range RFC 8656 allows and a length the datagram holds (padding to 4 bytes may follow).
fn channel_data(b: &[u8]) -> Option<&[u8]> {
    let h = b.get(..CHANNEL_DATA_HEADER)?;
    let channel = u16::from_be_bytes([h[0], h[1]]);
    let len = usize::from(u16::from_be_bytes([h[2], h[3]]));
    if !(0x4000..=0x7fff).contains(&channel) {
        return None;
    }
    b.get(CHANNEL_DATA_HEADER..CHANNEL_DATA_HEADER + len)
}

fn parse_plain(b: &[u8], turn: bool) -> Option<Media> {
    // RTCP's smallest packet (a receiver report without blocks) is 8 bytes.
    let h = b.get(..8)?;
    if h[0] >> 6 != 2 {
        return None;
    }
    let csrcs = usize::from(h[0] & 0x0f);
    let pt_byte = h[1];
    let ssrc_at = |o: usize| {
        b.get(o..o + 4)
            .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    };
    // RTCP (RFC 5761 §4): packet types 192-223 share the second byte with RTP's marker
    // and payload type; SR, RR, SDES, BYE, APP, RTPFB, PSFB, XR are 200-207.
    if (200..=207).contains(&pt_byte) {
        // Length in 32-bit words minus one; the sender's SSRC follows the 4-byte header.
        let words = usize::from(u16::from_be_bytes([h[2], h[3]])) + 1;
        if words * 4 > b.len() {
            return None;
        }
        return Some(Media::Rtcp {
            ssrc: ssrc_at(4)?,
            turn,
        });
    }
    let h = b.get(..RTP_HEADER)?;
    let payload_type = pt_byte & 0x7f;
    // 72-76 with the marker set would be RTCP's range (RFC 5761): not RTP.
    if (72..=76).contains(&payload_type) {
        return None;
    }
    // The CSRC list must fit, and a padding flag needs a padding count inside.
    let header = RTP_HEADER + 4 * csrcs;
    if b.len() < header {
        return None;
    }
    if h[0] & 0x20 != 0 {
        let pad = usize::from(*b.last()?);
        if pad == 0 || header + pad > b.len() {
            return None;
        }
    }
    Some(Media::Rtp(RtpHeader {
        payload_type,
        marker: pt_byte & 0x80 != 0,
        seq: u16::from_be_bytes([h[2], h[3]]),
        timestamp: u32::from_be_bytes([h[4], h[5], h[6], h[7]]),
        ssrc: ssrc_at(8)?,
        turn,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn rtp(pt: u8, seq: u16, ts: u32, ssrc: u32) -> Vec<u8> {
        let mut b = vec![0x80, pt, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        b[2..4].copy_from_slice(&seq.to_be_bytes());
        b[4..8].copy_from_slice(&ts.to_be_bytes());
        b[8..12].copy_from_slice(&ssrc.to_be_bytes());
        b.extend_from_slice(&[0xab; 160]);
        b
    }

    #[test]
    fn reads_rtp_plain_and_in_channel_data() {
        let p = rtp(0x80 | 111, 7, 960, 0xdead_beef);
        let want = RtpHeader {
            payload_type: 111,
            marker: true,
            seq: 7,
            timestamp: 960,
            ssrc: 0xdead_beef,
            turn: false,
        };
        assert_eq!(parse(&p), Some(Media::Rtp(want)));
        let mut cd = vec![0x40, 0x01];
        cd.extend_from_slice(&(p.len() as u16).to_be_bytes());
        cd.extend_from_slice(&p);
        cd.extend_from_slice(&[0, 0]); // padding to 4 bytes
        assert_eq!(
            parse(&cd),
            Some(Media::Rtp(RtpHeader { turn: true, ..want }))
        );
        // A ChannelData length the datagram does not hold, or a channel outside the range.
        let mut short = cd.clone();
        short[2..4].copy_from_slice(&2000u16.to_be_bytes());
        assert_eq!(parse(&short), None);
        let mut stun = cd;
        stun[0] = 0x00; // a STUN message type, not a channel
        assert_eq!(parse(&stun), None);
    }

    #[test]
    fn reads_rtcp_and_refuses_what_is_neither() {
        // A receiver report with no blocks: 8 bytes, length 1.
        let rr = [0x80, 201, 0, 1, 0, 0, 0, 42];
        assert_eq!(
            parse(&rr),
            Some(Media::Rtcp {
                ssrc: 42,
                turn: false
            })
        );
        // Its length word claims more than there is.
        assert_eq!(parse(&[0x80, 201, 0, 9, 0, 0, 0, 42]), None);
        // Version 1, a short payload, a CSRC list that does not fit, bad padding.
        let mut v1 = rtp(96, 1, 1, 1);
        v1[0] = 0x40;
        assert_eq!(parse(&v1), None);
        assert_eq!(parse(&[0x80, 96, 0, 1]), None);
        let mut cc = rtp(96, 1, 1, 1);
        cc.truncate(12);
        cc[0] = 0x8f;
        assert_eq!(parse(&cc), None);
        let mut pad = rtp(96, 1, 1, 1);
        pad[0] |= 0x20;
        *pad.last_mut().expect("bytes") = 0;
        assert_eq!(parse(&pad), None);
    }
}
