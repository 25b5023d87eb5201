//! The TLS server name in a QUIC client's first flight: QUIC v1 (RFC 9000, RFC 9001)
//! and v2 (RFC 9369) Initial packets decrypted, their CRYPTO frames reassembled into
//! the ClientHello, and that handed to the TLS parser ([`crate::sni`]).
//!
//! # What an observer can decrypt
//!
//! Initial packets are protected, but with keys anyone can derive: HKDF-SHA256 over
//! the Destination Connection ID of the client's first Initial with the version's
//! published salt (RFC 9001 §5.2, RFC 9369 §3.3). [`initial_crypto`] derives the
//! client keys from the DCID in the packet's own header, removes header protection
//! (AES-128 over a 16-byte sample of the ciphertext), decrypts the payload
//! (AES-128-GCM) and returns the CRYPTO frames' stream fragments. That is right for
//! everything the client sends before it hears from the server, which is what
//! carries the ClientHello. It is not right for:
//! * the client's later Initials (ACKs, retransmissions after the server answered):
//!   they are sent to the server's chosen connection ID but still use the keys of
//!   the first DCID, so they fail as [`QuicSniError::Decrypt`];
//! * server Initials (server keys): [`QuicSniError::Decrypt`] too;
//! * the Initial after a Retry: its new DCID gives new keys and it decrypts, but it
//!   belongs to a new [`HelloAssembler`] ([`QuicSniError::OtherConnection`]).
//!
//! Only the first packet of a datagram is read: an Initial always comes first when
//! packets are coalesced (RFC 9000 §12.2), and the rest (0-RTT, Handshake) cannot be
//! decrypted by an observer anyway. The packet number is taken as sent (truncated):
//! a client's first Initials are numbered from 0, far below where a 1-byte encoding
//! would wrap.
//!
//! # The ClientHello across packets
//!
//! The CRYPTO stream carries the bare handshake message (type 1, 3-byte length, no
//! TLS record header). A ClientHello that does not fit one 1200-byte datagram is
//! sent in two or more Initials of the same DCID back to back: Chrome's, with its
//! ~1.2 KB post-quantum X25519MLKEM768 key share, always is. Chrome also cuts its
//! CRYPTO data into several frames in random order with PING and PADDING frames
//! between them ("chaos protection"), so fragments are placed by offset, not
//! appended. [`HelloAssembler`] collects the fragments of one connection's Initials
//! (bounded: [`MAX_HELLO_LEN`] bytes) and asks the TLS parser as soon as the bytes
//! from offset 0 are contiguous: the server name may be found before the whole
//! ClientHello is there.
//!
//! Errors are values: nothing here panics on any input.

use aes::{
    cipher::{BlockEncrypt, KeyInit},
    Aes128,
};
use aes_gcm::{aead::AeadInPlace, Aes128Gcm};
use hkdf::Hkdf;
use sha2::Sha256;

use crate::sni::{self, varint, QuicError, QuicInitial, Sni, SniError, QUIC_V1, QUIC_V2};

/// Most ClientHello bytes kept per connection: the longest ClientHello accepted
/// (its 4-byte handshake header included). The TLS record limit (2^14) too, so the
/// message is handed to [`sni::client_hello_sni`] in one record.
pub const MAX_HELLO_LEN: usize = sni::MAX_RECORD_LEN;

/// Initial salt of QUIC v1 (RFC 9001 §5.2).
const SALT_V1: [u8; 20] = [
    0x38, 0x76, 0x2c, 0xf7, 0xf5, 0x59, 0x34, 0xb3, 0x4d, 0x17, 0x9a, 0xe6, 0xa4, 0xc8, 0x0c, 0xad,
    0xcc, 0xbb, 0x7f, 0x0a,
];
/// Initial salt of QUIC v2 (RFC 9369 §3.3.1).
const SALT_V2: [u8; 20] = [
    0x0d, 0xed, 0xe3, 0xde, 0xf7, 0x00, 0xa6, 0xdb, 0x81, 0x93, 0x81, 0xbe, 0x6e, 0x26, 0x9d, 0xcb,
    0xf9, 0xbd, 0x2e, 0xd9,
];
/// AEAD tag and header protection sample length.
const TAG_LEN: usize = 16;
const SAMPLE_LEN: usize = 16;
/// Largest value of a QUIC variable-length integer, the limit of a stream offset.
const MAX_VARINT: u64 = (1 << 62) - 1;

const FRAME_PADDING: u64 = 0x00;
const FRAME_PING: u64 = 0x01;
const FRAME_ACK: u64 = 0x02;
const FRAME_ACK_ECN: u64 = 0x03;
const FRAME_CRYPTO: u64 = 0x06;

/// Why no CRYPTO data (or no server name) came out of a datagram.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuicSniError {
    /// Not a QUIC v1/v2 Initial long header ([`sni::quic_initial`]).
    #[error(transparent)]
    Header(#[from] QuicError),
    /// The payload does not authenticate with the client Initial keys of the
    /// packet's DCID: a server Initial, a client Initial sent after the server
    /// answered (see the module docs), or a corrupted packet.
    #[error("QUIC Initial does not decrypt with the client Initial keys of its DCID")]
    Decrypt,
    /// The packet is too short for header protection, or its decrypted frames are
    /// cut short or inconsistent.
    #[error("malformed QUIC Initial: {0}")]
    Malformed(&'static str),
    /// An Initial with another DCID or version than the connection's first one.
    #[error("QUIC Initial of another connection (DCID or version differs)")]
    OtherConnection,
    /// The ClientHello declares more than [`MAX_HELLO_LEN`] bytes.
    #[error("ClientHello of {0} bytes in QUIC CRYPTO frames, more than the {MAX_HELLO_LEN} kept")]
    HelloTooLarge(usize),
    /// The CRYPTO stream is not a ClientHello the TLS parser accepts.
    #[error("CRYPTO stream: {0}")]
    Tls(#[from] SniError),
}

/// One CRYPTO frame's data and where it sits in the Initial CRYPTO stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CryptoFragment {
    pub offset: u64,
    /// Never empty (CRYPTO frames of length 0 are skipped).
    pub data: Vec<u8>,
}

/// A decrypted client Initial: its header and its CRYPTO stream fragments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitialCrypto {
    /// The clear-text long header.
    pub header: QuicInitial,
    /// The packet number as sent (truncated to its 1..4 encoded bytes).
    pub packet_number: u64,
    /// Bytes of the datagram this packet takes; any after it (coalesced packets, or
    /// zeros padding the datagram to 1200 bytes as aioquic sends) are not read.
    pub packet_len: usize,
    /// The CRYPTO frames in the order they appear in the packet (not necessarily
    /// by offset).
    pub fragments: Vec<CryptoFragment>,
    /// The type of the frame that ended the walk before the end of the payload (a
    /// frame other than PADDING, PING, ACK and CRYPTO, e.g. CONNECTION_CLOSE); the
    /// fragments before it are returned.
    pub stopped_at: Option<u64>,
}

/// Decrypts the QUIC v1/v2 Initial at the start of a UDP payload with the client
/// Initial keys of its DCID and returns its CRYPTO fragments (see the module docs for
/// which Initials this can read).
pub fn initial_crypto(udp_payload: &[u8]) -> Result<InitialCrypto, QuicSniError> {
    let header = sni::quic_initial(udp_payload)?;
    let pn_offset = pn_offset(udp_payload, &header).ok_or(QuicError::Malformed("length"))?;
    let packet_len = pn_offset + header.payload_len;
    let packet = udp_payload
        .get(..packet_len)
        .ok_or(QuicError::Malformed("length"))?;
    let keys = InitialKeys::client(header.version, &header.dcid).ok_or(QuicSniError::Decrypt)?;

    // Header protection (RFC 9001 §5.4): the sample starts 4 bytes after the start
    // of the packet number, whatever its length.
    let sample = packet
        .get(pn_offset + 4..pn_offset + 4 + SAMPLE_LEN)
        .and_then(|s| <[u8; SAMPLE_LEN]>::try_from(s).ok())
        .ok_or(QuicSniError::Malformed(
            "too short for the header protection sample",
        ))?;
    let mask = keys.hp_mask(&sample);
    let first = packet[0] ^ (mask[0] & 0x0f);
    let pn_len = usize::from(first & 0x03) + 1;
    let payload_start = pn_offset + pn_len;
    let mut aad = packet[..payload_start].to_vec();
    aad[0] = first;
    let mut packet_number = 0u64;
    for (b, m) in aad[pn_offset..].iter_mut().zip(&mask[1..]) {
        *b ^= m;
        packet_number = packet_number << 8 | u64::from(*b);
    }

    // (The sample check leaves at least 16 bytes after a 4-byte packet number.)
    let body = &packet[payload_start..];
    let (ciphertext, tag) = body.split_at(body.len().saturating_sub(TAG_LEN));
    let tag = <[u8; TAG_LEN]>::try_from(tag)
        .map_err(|_| QuicSniError::Malformed("shorter than the AEAD tag"))?;
    let mut plain = ciphertext.to_vec();
    Aes128Gcm::new(&keys.key.into())
        .decrypt_in_place_detached(
            &keys.nonce(packet_number).into(),
            &aad,
            &mut plain,
            &tag.into(),
        )
        .map_err(|_| QuicSniError::Decrypt)?;

    let (fragments, stopped_at) = crypto_frames(&plain)?;
    Ok(InitialCrypto {
        header,
        packet_number,
        packet_len,
        fragments,
        stopped_at,
    })
}

/// Where the packet number starts: after the Length field. [`sni::quic_initial`] has
/// checked the header; the varints are read again for their encoded lengths (which
/// need not be minimal).
fn pn_offset(udp_payload: &[u8], h: &QuicInitial) -> Option<usize> {
    // First byte, version, DCID length and DCID, SCID length and SCID.
    let mut pos = 1 + 4 + 1 + h.dcid.len() + 1 + h.scid.len();
    varint(udp_payload, &mut pos)?;
    pos += h.token_len;
    varint(udp_payload, &mut pos)?;
    Some(pos)
}

/// Walks the frames of a decrypted Initial payload: the CRYPTO fragments, and the
/// type of a frame that ended the walk early.
fn crypto_frames(plain: &[u8]) -> Result<(Vec<CryptoFragment>, Option<u64>), QuicSniError> {
    let malformed = QuicSniError::Malformed;
    let mut fragments = Vec::new();
    let mut pos = 0;
    while pos < plain.len() {
        let ty = varint(plain, &mut pos).ok_or(malformed("frame type"))?;
        match ty {
            FRAME_PADDING | FRAME_PING => {}
            FRAME_ACK | FRAME_ACK_ECN => {
                // Largest Acknowledged, ACK Delay, ACK Range Count, First ACK Range.
                let mut fields = [0u64; 4];
                for f in &mut fields {
                    *f = varint(plain, &mut pos).ok_or(malformed("ACK frame"))?;
                }
                // Each range is two varints of at least a byte: the loop ends with
                // the bytes whatever the count says.
                for _ in 0..fields[2] {
                    varint(plain, &mut pos).ok_or(malformed("ACK range"))?;
                    varint(plain, &mut pos).ok_or(malformed("ACK range"))?;
                }
                if ty == FRAME_ACK_ECN {
                    for _ in 0..3 {
                        varint(plain, &mut pos).ok_or(malformed("ACK ECN counts"))?;
                    }
                }
            }
            FRAME_CRYPTO => {
                let offset = varint(plain, &mut pos).ok_or(malformed("CRYPTO offset"))?;
                let len = varint(plain, &mut pos).ok_or(malformed("CRYPTO length"))?;
                let data = usize::try_from(len)
                    .ok()
                    .and_then(|len| plain.get(pos..pos.checked_add(len)?))
                    .ok_or(malformed("CRYPTO data"))?;
                if offset.saturating_add(len) > MAX_VARINT {
                    return Err(malformed("CRYPTO offset"));
                }
                pos += data.len();
                if !data.is_empty() {
                    fragments.push(CryptoFragment {
                        offset,
                        data: data.to_vec(),
                    });
                }
            }
            other => return Ok((fragments, Some(other))),
        }
    }
    Ok((fragments, None))
}

/// The client's Initial packet protection keys (RFC 9001 §5.1, §5.2).
#[derive(Debug, Clone, PartialEq, Eq)]
struct InitialKeys {
    key: [u8; 16],
    iv: [u8; 12],
    hp: [u8; 16],
}

impl InitialKeys {
    /// The client keys for a connection whose client chose `dcid`; `None` for a
    /// version other than v1 and v2.
    fn client(version: u32, dcid: &[u8]) -> Option<Self> {
        Self::from_secret(version, &client_initial_secret(version, dcid)?)
    }

    fn from_secret(version: u32, secret: &[u8; 32]) -> Option<Self> {
        let labels = match version {
            QUIC_V1 => ["quic key", "quic iv", "quic hp"],
            QUIC_V2 => ["quicv2 key", "quicv2 iv", "quicv2 hp"],
            _ => return None,
        };
        let prk = Hkdf::<Sha256>::from_prk(secret).ok()?;
        Some(InitialKeys {
            key: expand_label(&prk, labels[0])?,
            iv: expand_label(&prk, labels[1])?,
            hp: expand_label(&prk, labels[2])?,
        })
    }

    /// The header protection mask: AES-128 (one block, i.e. ECB) of the sample.
    fn hp_mask(&self, sample: &[u8; SAMPLE_LEN]) -> [u8; 16] {
        let mut block = (*sample).into();
        Aes128::new(&self.hp.into()).encrypt_block(&mut block);
        block.into()
    }

    /// The AEAD nonce: the IV XOR the packet number, right-aligned (RFC 9001 §5.3).
    fn nonce(&self, packet_number: u64) -> [u8; 12] {
        let mut nonce = self.iv;
        for (n, p) in nonce[4..].iter_mut().zip(packet_number.to_be_bytes()) {
            *n ^= p;
        }
        nonce
    }
}

/// `client_initial_secret = HKDF-Expand-Label(HKDF-Extract(salt, dcid), "client in",
/// "", 32)`.
fn client_initial_secret(version: u32, dcid: &[u8]) -> Option<[u8; 32]> {
    let salt = match version {
        QUIC_V1 => SALT_V1,
        QUIC_V2 => SALT_V2,
        _ => return None,
    };
    expand_label(&Hkdf::<Sha256>::new(Some(&salt), dcid), "client in")
}

/// TLS 1.3's HKDF-Expand-Label with an empty context (RFC 8446 §7.1). `None` only
/// for an output HKDF-SHA256 cannot give (over 8160 bytes): never for the sizes
/// used here.
fn expand_label<const N: usize>(prk: &Hkdf<Sha256>, label: &str) -> Option<[u8; N]> {
    let full = [b"tls13 ".as_slice(), label.as_bytes()].concat();
    let mut info = Vec::with_capacity(4 + full.len());
    info.extend_from_slice(&u16::try_from(N).ok()?.to_be_bytes());
    info.push(u8::try_from(full.len()).ok()?);
    info.extend_from_slice(&full);
    info.push(0);
    let mut out = [0; N];
    prk.expand(&info, &mut out).ok()?;
    Some(out)
}

/// Builds a protected client Initial the way a client does: `frames` (padded as the
/// caller wants: a real client pads the datagram to 1200 bytes) encrypted with the
/// client Initial keys of `dcid`, a 4-byte packet number, no token, a 2-byte Length.
/// For tests, benchmarks and the fuzzer: the other side of [`initial_crypto`].
pub fn seal_client_initial(
    version: u32,
    dcid: &[u8],
    scid: &[u8],
    packet_number: u32,
    frames: &[u8],
) -> Result<Vec<u8>, QuicSniError> {
    let type_bits = match version {
        QUIC_V1 => 0b00,
        QUIC_V2 => 0b01,
        other => return Err(QuicError::UnsupportedVersion(other).into()),
    };
    let keys = InitialKeys::client(version, dcid).ok_or(QuicSniError::Decrypt)?;
    let dcid_len = u8::try_from(dcid.len())
        .ok()
        .filter(|&l| usize::from(l) <= sni::MAX_CID_LEN)
        .ok_or(QuicError::Malformed("destination connection id"))?;
    let scid_len = u8::try_from(scid.len())
        .ok()
        .filter(|&l| usize::from(l) <= sni::MAX_CID_LEN)
        .ok_or(QuicError::Malformed("source connection id"))?;
    // Packet number, frames, tag: in a 2-byte varint (below 2^14).
    let length = u16::try_from(4 + frames.len() + TAG_LEN)
        .ok()
        .filter(|&l| l < 1 << 14)
        .ok_or(QuicSniError::Malformed(
            "frames too long for a 2-byte Length",
        ))?;

    let mut packet = vec![0xc0 | type_bits << 4 | 0b11];
    packet.extend_from_slice(&version.to_be_bytes());
    packet.push(dcid_len);
    packet.extend_from_slice(dcid);
    packet.push(scid_len);
    packet.extend_from_slice(scid);
    packet.push(0); // token length
    packet.extend_from_slice(&(0x4000 | length).to_be_bytes());
    let pn_offset = packet.len();
    packet.extend_from_slice(&packet_number.to_be_bytes());
    let mut payload = frames.to_vec();
    let tag = Aes128Gcm::new(&keys.key.into())
        .encrypt_in_place_detached(
            &keys.nonce(u64::from(packet_number)).into(),
            &packet,
            &mut payload,
        )
        .map_err(|_| QuicSniError::Malformed("frames too long"))?;
    packet.extend_from_slice(&payload);
    packet.extend_from_slice(&tag);

    let sample = packet
        .get(pn_offset + 4..pn_offset + 4 + SAMPLE_LEN)
        .and_then(|s| <[u8; SAMPLE_LEN]>::try_from(s).ok())
        .ok_or(QuicSniError::Malformed("frames too short"))?;
    let mask = keys.hp_mask(&sample);
    packet[0] ^= mask[0] & 0x0f;
    for (b, m) in packet[pn_offset..pn_offset + 4].iter_mut().zip(&mask[1..]) {
        *b ^= m;
    }
    Ok(packet)
}

/// Reassembles the ClientHello of one QUIC connection from the CRYPTO fragments of
/// its client Initials (one or more, in any order, duplicates and overlaps allowed:
/// the first copy of a byte is kept) and reads its server name as soon as the bytes
/// from offset 0 allow. The connection is the (version, DCID) of the first Initial
/// pushed; keep one assembler per connection (e.g. per UDP flow) and drop it once
/// the answer is final.
///
/// Memory: at most [`MAX_HELLO_LEN`] bytes plus a bitmap of them; stream bytes at
/// and beyond that offset are dropped.
#[derive(Debug, Clone, Default)]
pub struct HelloAssembler {
    conn: Option<(u32, Vec<u8>)>,
    /// CRYPTO stream bytes from offset 0; those not received yet are 0.
    buf: Vec<u8>,
    /// One bit per byte of `buf`: received.
    have: Vec<u64>,
}

impl HelloAssembler {
    pub fn new() -> Self {
        Self::default()
    }

    /// Decrypts one datagram's first Initial ([`initial_crypto`]) and adds its
    /// fragments ([`HelloAssembler::push`]). On an error the assembler is unchanged.
    pub fn push_datagram(&mut self, udp_payload: &[u8]) -> Result<Sni, QuicSniError> {
        self.push(&initial_crypto(udp_payload)?)
    }

    /// Adds a decrypted Initial's CRYPTO fragments and reports what the ClientHello
    /// says so far: [`Sni::Found`] (possibly before the whole hello is there),
    /// [`Sni::Absent`] (the whole hello, no server name), or [`Sni::NeedMore`] with
    /// the number of ClientHello bytes not received yet (at least 1; a lower bound
    /// while the 4-byte handshake header is incomplete): wait for the next Initial.
    /// An Initial of another connection is [`QuicSniError::OtherConnection`] and
    /// changes nothing.
    pub fn push(&mut self, initial: &InitialCrypto) -> Result<Sni, QuicSniError> {
        let conn = (initial.header.version, initial.header.dcid.as_slice());
        match &self.conn {
            Some((v, d)) if (*v, d.as_slice()) != conn => {
                return Err(QuicSniError::OtherConnection)
            }
            Some(_) => {}
            None => self.conn = Some((conn.0, conn.1.to_vec())),
        }
        for f in &initial.fragments {
            self.insert(f.offset, &f.data);
        }
        self.sni()
    }

    /// What the bytes received so far say (as [`HelloAssembler::push`] returns).
    pub fn sni(&self) -> Result<Sni, QuicSniError> {
        let contiguous = self.contiguous_len();
        let hs = &self.buf[..contiguous];
        if let Some(&t) = hs.first() {
            if t != 1 {
                return Err(SniError::NotClientHello(t).into());
            }
        }
        let [_, a, b, c, ..] = *hs else {
            return Ok(Sni::NeedMore(4 - contiguous));
        };
        let total = 4 + (usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c));
        if total > MAX_HELLO_LEN {
            return Err(QuicSniError::HelloTooLarge(total));
        }
        // The handshake message in one synthetic TLS record, as the TLS parser
        // takes it: declared whole, cut where the contiguous bytes end.
        let record_len = u16::try_from(total).map_err(|_| QuicSniError::HelloTooLarge(total))?;
        let mut record = vec![22, 3, 1];
        record.extend_from_slice(&record_len.to_be_bytes());
        record.extend_from_slice(&hs[..contiguous.min(total)]);
        match sni::client_hello_sni(&record)? {
            Sni::NeedMore(_) => Ok(Sni::NeedMore((total - self.received_below(total)).max(1))),
            done => Ok(done),
        }
    }

    /// The DCID of the connection, once an Initial has been pushed.
    pub fn dcid(&self) -> Option<&[u8]> {
        self.conn.as_ref().map(|(_, d)| d.as_slice())
    }

    /// How many CRYPTO stream bytes from offset 0 have arrived without a gap.
    pub fn contiguous_len(&self) -> usize {
        let full_words = self.have.iter().take_while(|&&w| w == u64::MAX).count();
        let partial = self
            .have
            .get(full_words)
            .map_or(0, |w| w.trailing_ones() as usize);
        (full_words * 64 + partial).min(self.buf.len())
    }

    fn insert(&mut self, offset: u64, data: &[u8]) {
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if start >= MAX_HELLO_LEN {
            return;
        }
        let end = start.saturating_add(data.len()).min(MAX_HELLO_LEN);
        if end > self.buf.len() {
            self.buf.resize(end, 0);
            self.have.resize(end.div_ceil(64), 0);
        }
        for (i, &byte) in (start..end).zip(data) {
            let (word, bit) = (i / 64, 1u64 << (i % 64));
            if self.have[word] & bit == 0 {
                self.have[word] |= bit;
                self.buf[i] = byte;
            }
        }
    }

    /// How many of the stream bytes below `end` have arrived.
    fn received_below(&self, end: usize) -> usize {
        (0..end.min(self.buf.len()))
            .filter(|&i| self.have[i / 64] & 1 << (i % 64) != 0)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    const RFC_DCID: [u8; 8] = [0x83, 0x94, 0xc8, 0xf0, 0x3e, 0x51, 0x57, 0x08];

    /// RFC 9001 A.2 / RFC 9369 A.2: the client Initial's frames (a CRYPTO frame with a
    /// ClientHello for example.com, then PADDING to 1162 bytes). Same in both.
    fn rfc_client_frames() -> Vec<u8> {
        let mut f = hex(
            "060040f1010000ed0303ebf8fa56f12939b9584a3896472ec40bb863cfd3e868
             04fe3a47f06a2b69484c00000413011302010000c000000010000e00000b6578
             616d706c652e636f6dff01000100000a00080006001d00170018001000070005
             04616c706e000500050100000000003300260024001d00209370b2c9caa47fba
             baf4559fedba753de171fa71f50f1ce15d43e994ec74d748002b000302030400
             0d0010000e0403050306030203080408050806002d00020101001c0002400100
             3900320408ffffffffffffffff05048000ffff07048000ffff08011001048000
             75300901100f088394c8f03e51570806048000ffff",
        );
        f.resize(1162, 0);
        f
    }

    /// RFC 9001 A.2: the protected client Initial (1200 bytes).
    const RFC9001_A2_PROTECTED: &str =
        "c000000001088394c8f03e5157080000449e7b9aec34d1b1c98dd7689fb8ec11
         d242b123dc9bd8bab936b47d92ec356c0bab7df5976d27cd449f63300099f399
         1c260ec4c60d17b31f8429157bb35a1282a643a8d2262cad67500cadb8e7378c
         8eb7539ec4d4905fed1bee1fc8aafba17c750e2c7ace01e6005f80fcb7df6212
         30c83711b39343fa028cea7f7fb5ff89eac2308249a02252155e2347b63d58c5
         457afd84d05dfffdb20392844ae812154682e9cf012f9021a6f0be17ddd0c208
         4dce25ff9b06cde535d0f920a2db1bf362c23e596d11a4f5a6cf3948838a3aec
         4e15daf8500a6ef69ec4e3feb6b1d98e610ac8b7ec3faf6ad760b7bad1db4ba3
         485e8a94dc250ae3fdb41ed15fb6a8e5eba0fc3dd60bc8e30c5c4287e53805db
         059ae0648db2f64264ed5e39be2e20d82df566da8dd5998ccabdae053060ae6c
         7b4378e846d29f37ed7b4ea9ec5d82e7961b7f25a9323851f681d582363aa5f8
         9937f5a67258bf63ad6f1a0b1d96dbd4faddfcefc5266ba6611722395c906556
         be52afe3f565636ad1b17d508b73d8743eeb524be22b3dcbc2c7468d54119c74
         68449a13d8e3b95811a198f3491de3e7fe942b330407abf82a4ed7c1b311663a
         c69890f4157015853d91e923037c227a33cdd5ec281ca3f79c44546b9d90ca00
         f064c99e3dd97911d39fe9c5d0b23a229a234cb36186c4819e8b9c5927726632
         291d6a418211cc2962e20fe47feb3edf330f2c603a9d48c0fcb5699dbfe58964
         25c5bac4aee82e57a85aaf4e2513e4f05796b07ba2ee47d80506f8d2c25e50fd
         14de71e6c418559302f939b0e1abd576f279c4b2e0feb85c1f28ff18f58891ff
         ef132eef2fa09346aee33c28eb130ff28f5b766953334113211996d20011a198
         e3fc433f9f2541010ae17c1bf202580f6047472fb36857fe843b19f5984009dd
         c324044e847a4f4a0ab34f719595de37252d6235365e9b84392b061085349d73
         203a4a13e96f5432ec0fd4a1ee65accdd5e3904df54c1da510b0ff20dcc0c77f
         cb2c0e0eb605cb0504db87632cf3d8b4dae6e705769d1de354270123cb11450e
         fc60ac47683d7b8d0f811365565fd98c4c8eb936bcab8d069fc33bd801b03ade
         a2e1fbc5aa463d08ca19896d2bf59a071b851e6c239052172f296bfb5e724047
         90a2181014f3b94a4e97d117b438130368cc39dbb2d198065ae3986547926cd2
         162f40a29f0c3c8745c0f50fba3852e566d44575c29d39a03f0cda721984b6f4
         40591f355e12d439ff150aab7613499dbd49adabc8676eef023b15b65bfc5ca0
         6948109f23f350db82123535eb8a7433bdabcb909271a6ecbcb58b936a88cd4e
         8f2e6ff5800175f113253d8fa9ca8885c2f552e657dc603f252e1a8e308f76f0
         be79e2fb8f5d5fbbe2e30ecadd220723c8c0aea8078cdfcb3868263ff8f09400
         54da48781893a7e49ad5aff4af300cd804a6b6279ab3ff3afb64491c85194aab
         760d58a606654f9f4400e8b38591356fbf6425aca26dc85244259ff2b19c41b9
         f96f3ca9ec1dde434da7d2d392b905ddf3d1f9af93d1af5950bd493f5aa731b4
         056df31bd267b6b90a079831aaf579be0a39013137aac6d404f518cfd4684064
         7e78bfe706ca4cf5e9c5453e9f7cfd2b8b4c8d169a44e55c88d4a9a7f9474241
         e221af44860018ab0856972e194cd934";

    /// RFC 9369 A.2: the same Initial in QUIC v2.
    const RFC9369_A2_PROTECTED: &str =
        "d76b3343cf088394c8f03e5157080000449ea0c95e82ffe67b6abcdb4298b485
         dd04de806071bf03dceebfa162e75d6c96058bdbfb127cdfcbf903388e99ad04
         9f9a3dd4425ae4d0992cfff18ecf0fdb5a842d09747052f17ac2053d21f57c5d
         250f2c4f0e0202b70785b7946e992e58a59ac52dea6774d4f03b55545243cf1a
         12834e3f249a78d395e0d18f4d766004f1a2674802a747eaa901c3f10cda5500
         cb9122faa9f1df66c392079a1b40f0de1c6054196a11cbea40afb6ef5253cd68
         18f6625efce3b6def6ba7e4b37a40f7732e093daa7d52190935b8da58976ff33
         12ae50b187c1433c0f028edcc4c2838b6a9bfc226ca4b4530e7a4ccee1bfa2a3
         d396ae5a3fb512384b2fdd851f784a65e03f2c4fbe11a53c7777c023462239dd
         6f7521a3f6c7d5dd3ec9b3f233773d4b46d23cc375eb198c63301c21801f6520
         bcfb7966fc49b393f0061d974a2706df8c4a9449f11d7f3d2dcbb90c6b877045
         636e7c0c0fe4eb0f697545460c806910d2c355f1d253bc9d2452aaa549e27a1f
         ac7cf4ed77f322e8fa894b6a83810a34b361901751a6f5eb65a0326e07de7c12
         16ccce2d0193f958bb3850a833f7ae432b65bc5a53975c155aa4bcb4f7b2c4e5
         4df16efaf6ddea94e2c50b4cd1dfe06017e0e9d02900cffe1935e0491d77ffb4
         fdf85290fdd893d577b1131a610ef6a5c32b2ee0293617a37cbb08b847741c3b
         8017c25ca9052ca1079d8b78aebd47876d330a30f6a8c6d61dd1ab5589329de7
         14d19d61370f8149748c72f132f0fc99f34d766c6938597040d8f9e2bb522ff9
         9c63a344d6a2ae8aa8e51b7b90a4a806105fcbca31506c446151adfeceb51b91
         abfe43960977c87471cf9ad4074d30e10d6a7f03c63bd5d4317f68ff325ba3bd
         80bf4dc8b52a0ba031758022eb025cdd770b44d6d6cf0670f4e990b22347a7db
         848265e3e5eb72dfe8299ad7481a408322cac55786e52f633b2fb6b614eaed18
         d703dd84045a274ae8bfa73379661388d6991fe39b0d93debb41700b41f90a15
         c4d526250235ddcd6776fc77bc97e7a417ebcb31600d01e57f32162a8560cacc
         7e27a096d37a1a86952ec71bd89a3e9a30a2a26162984d7740f81193e8238e61
         f6b5b984d4d3dfa033c1bb7e4f0037febf406d91c0dccf32acf423cfa1e70710
         10d3f270121b493ce85054ef58bada42310138fe081adb04e2bd901f2f13458b
         3d6758158197107c14ebb193230cd1157380aa79cae1374a7c1e5bbcb80ee23e
         06ebfde206bfb0fcbc0edc4ebec309661bdd908d532eb0c6adc38b7ca7331dce
         8dfce39ab71e7c32d318d136b6100671a1ae6a6600e3899f31f0eed19e3417d1
         34b90c9058f8632c798d4490da4987307cba922d61c39805d072b589bd52fdf1
         e86215c2d54e6670e07383a27bbffb5addf47d66aa85a0c6f9f32e59d85a44dd
         5d3b22dc2be80919b490437ae4f36a0ae55edf1d0b5cb4e9a3ecabee93dfc6e3
         8d209d0fa6536d27a5d6fbb17641cde27525d61093f1b28072d111b2b4ae5f89
         d5974ee12e5cf7d5da4d6a31123041f33e61407e76cffcdcfd7e19ba58cf4b53
         6f4c4938ae79324dc402894b44faf8afbab35282ab659d13c93f70412e85cb19
         9a37ddec600545473cfb5a05e08d0b209973b2172b4d21fb69745a262ccde96b
         a18b2faa745b6fe189cf772a9f84cbfc";

    #[test]
    fn rfc9001_a1_client_keys() {
        let secret = client_initial_secret(QUIC_V1, &RFC_DCID).expect("v1");
        assert_eq!(
            secret.to_vec(),
            hex("c00cf151ca5be075ed0ebfb5c80323c42d6b7db67881289af4008f1f6c357aea")
        );
        let keys = InitialKeys::client(QUIC_V1, &RFC_DCID).expect("v1");
        assert_eq!(keys.key.to_vec(), hex("1f369613dd76d5467730efcbe3b1a22d"));
        assert_eq!(keys.iv.to_vec(), hex("fa044b2f42a3fd3b46fb255c"));
        assert_eq!(keys.hp.to_vec(), hex("9f50449e04a0e810283a1e9933adedd2"));
        // The initial secret itself (A.1), through the same HKDF-Extract.
        let (prk, _) = Hkdf::<Sha256>::extract(Some(&SALT_V1), &RFC_DCID);
        assert_eq!(
            prk.to_vec(),
            hex("7db5df06e7a69e432496adedb00851923595221596ae2ae9fb8115c1e9ed0a44")
        );
    }

    #[test]
    fn rfc9369_a1_client_keys() {
        let secret = client_initial_secret(QUIC_V2, &RFC_DCID).expect("v2");
        assert_eq!(
            secret.to_vec(),
            hex("14ec9d6eb9fd7af83bf5a668bc17a7e283766aade7ecd0891f70f9ff7f4bf47b")
        );
        let keys = InitialKeys::client(QUIC_V2, &RFC_DCID).expect("v2");
        assert_eq!(keys.key.to_vec(), hex("8b1a0bc121284290a29e0971b5cd045d"));
        assert_eq!(keys.iv.to_vec(), hex("91f73e2351d8fa91660e909f"));
        assert_eq!(keys.hp.to_vec(), hex("45b95e15235d6f45a6b19cbcb0294ba9"));
        assert_eq!(InitialKeys::client(0x1a2a_3a4a, &RFC_DCID), None);
    }

    /// The RFC's protected packet decrypts to the RFC's frames, the ClientHello in
    /// them names example.com, and sealing the frames gives the RFC's bytes back.
    fn rfc_a2(version: u32, protected: &str) {
        let packet = hex(protected);
        assert_eq!(packet.len(), 1200);
        let ic = initial_crypto(&packet).expect("decrypts");
        assert_eq!(ic.header.version, version);
        assert_eq!(ic.header.dcid, RFC_DCID);
        assert_eq!(ic.packet_number, 2);
        assert_eq!(ic.packet_len, 1200);
        assert_eq!(ic.stopped_at, None);
        let frames = rfc_client_frames();
        assert_eq!(
            ic.fragments,
            [CryptoFragment {
                offset: 0,
                data: frames[4..4 + 241].to_vec()
            }]
        );
        assert_eq!(
            HelloAssembler::new().push(&ic),
            Ok(Sni::Found {
                name: "example.com".into(),
                ech: false
            })
        );
        let sealed = seal_client_initial(version, &RFC_DCID, &[], 2, &frames).expect("seals");
        assert_eq!(sealed, packet);
    }

    #[test]
    fn rfc9001_a2_client_initial() {
        rfc_a2(QUIC_V1, RFC9001_A2_PROTECTED);
    }

    #[test]
    fn rfc9369_a2_client_initial() {
        rfc_a2(QUIC_V2, RFC9369_A2_PROTECTED);
    }

    #[test]
    fn tampering_fails_to_decrypt() {
        let packet = hex(RFC9001_A2_PROTECTED);
        // Any flipped bit in the header or the payload (or the DCID: other keys).
        for i in [0, 6, 17, 18, 30, 600, 1199] {
            let mut p = packet.clone();
            p[i] ^= 0x04;
            assert_eq!(initial_crypto(&p), Err(QuicSniError::Decrypt), "byte {i}");
        }
        // Cut short: the Length no longer fits.
        assert!(matches!(
            initial_crypto(&packet[..1199]),
            Err(QuicSniError::Header(QuicError::Malformed(_)))
        ));
        // Too short to sample: 17..19 bytes after the Length field.
        let short = seal_client_initial(QUIC_V1, &RFC_DCID, &[], 0, &[]).expect("seals");
        for len in 17..20 {
            let mut p = short[..short.len() - 20 + len].to_vec();
            p[16..18].copy_from_slice(&(0x4000u16 | len as u16).to_be_bytes());
            assert!(matches!(
                initial_crypto(&p),
                Err(QuicSniError::Malformed(_))
            ));
        }
        // A server-style packet (other keys) and non-Initials.
        assert_eq!(
            initial_crypto(&[0x40, 1, 2, 3]),
            Err(QuicSniError::Header(QuicError::NotLongHeader))
        );
    }

    use crate::sni::tests::{found, SNI};

    #[test]
    fn gtlsclient_v1_initial() {
        let raw = fixture!("tls/quic-initial-gtlsclient.bin");
        let ic = initial_crypto(raw).expect("decrypts");
        assert_eq!(ic.header.version, QUIC_V1);
        assert!(!ic.fragments.is_empty());
        assert_eq!(HelloAssembler::new().push_datagram(raw), Ok(found(SNI)));
        // The TLS parser's every-prefix property holds through the assembler: a
        // prefix of the CRYPTO stream finds the name or asks for more.
        let frag = &ic.fragments[0];
        assert_eq!(frag.offset, 0);
        for cut in 1..frag.data.len() {
            let mut a = HelloAssembler::new();
            a.insert(0, &frag.data[..cut]);
            match a.sni() {
                Ok(Sni::Found { name, .. }) => assert_eq!(name, SNI),
                Ok(Sni::NeedMore(n)) => assert!(n > 0, "cut {cut}"),
                other => panic!("cut {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn aioquic_v2_initial() {
        let raw = fixture!("quic/quic-v2-aioquic.bin");
        let ic = initial_crypto(raw).expect("decrypts");
        assert_eq!(ic.header.version, QUIC_V2);
        assert_eq!(ic.header.dcid.len(), 8);
        assert_eq!(ic.packet_number, 0);
        // aioquic pads the datagram with zeros after the packet, not with PADDING
        // frames inside it (both are allowed, RFC 9000 §14.1).
        assert!(ic.packet_len < 600 && raw[ic.packet_len..].iter().all(|&b| b == 0));
        assert_eq!(HelloAssembler::new().push_datagram(raw), Ok(found(SNI)));
        // The same bytes labelled v1 do not decrypt: the version picks the salt and
        // labels (and its own Initial type bits, 01 in v2, 00 in v1).
        let mut as_v1 = raw.to_vec();
        as_v1[0] &= !0x30;
        as_v1[1..5].copy_from_slice(&QUIC_V1.to_be_bytes());
        assert_eq!(initial_crypto(&as_v1), Err(QuicSniError::Decrypt));
    }

    /// A ClientHello in two Initials (two datagrams): both decrypt, the fragments
    /// continue each other, and the assembler's answer after the first is `first`.
    fn two_initials(version: u32, p1: &[u8], p2: &[u8], first: fn(usize) -> Sni) {
        let (i1, i2) = (
            initial_crypto(p1).expect("first"),
            initial_crypto(p2).expect("second"),
        );
        for (ic, pn) in [(&i1, 0), (&i2, 1)] {
            assert_eq!(ic.header.version, version);
            assert_eq!(ic.header.dcid, i1.header.dcid);
            assert_eq!(ic.packet_number, pn);
        }
        let first_len = i1.fragments.iter().map(|f| f.data.len()).sum::<usize>();
        let hs_len = first_len + i2.fragments.iter().map(|f| f.data.len()).sum::<usize>();
        assert!(hs_len > 1300 && first_len > 1100, "{first_len} {hs_len}");
        assert_eq!(i2.fragments[0].offset as usize, first_len);

        let mut a = HelloAssembler::new();
        assert_eq!(a.push(&i1), Ok(first(hs_len - first_len)));
        assert_eq!(a.push(&i2), Ok(found(SNI)));
        // Second datagram first (reordered on the way).
        let mut b = HelloAssembler::new();
        assert_eq!(b.push_datagram(p2), Ok(Sni::NeedMore(4)));
        assert_eq!(b.push_datagram(p1), Ok(found(SNI)));
    }

    #[test]
    fn gtlsclient_hello_in_two_initials_name_in_second() {
        // GnuTLS with an FFDHE8192 key share: the name comes after the key share, in
        // the second Initial; the first alone needs exactly the rest.
        let p1 = fixture!("quic/quic-ffdhe8192-gtlsclient-1.bin");
        assert_eq!(
            initial_crypto(p1).map(|ic| ic.header.dcid),
            Ok(vec![0, 1, 2, 3, 4, 5, 6, 7])
        );
        two_initials(
            QUIC_V1,
            p1,
            fixture!("quic/quic-ffdhe8192-gtlsclient-2.bin"),
            Sni::NeedMore,
        );
    }

    #[test]
    fn aioquic_v2_hello_in_two_initials_name_in_first() {
        // aioquic with 40 ALPN names: the name is early, found from the first alone.
        two_initials(
            QUIC_V2,
            fixture!("quic/quic-v2-big-alpn-aioquic-1.bin"),
            fixture!("quic/quic-v2-big-alpn-aioquic-2.bin"),
            |_| found(SNI),
        );
    }

    /// A hand-made ClientHello handshake message (no record header) of about `size`
    /// bytes: a big key share first, then the server name if any (as Chrome orders
    /// them about half the time).
    fn hello(name: Option<&str>, size: usize) -> Vec<u8> {
        let mut sni_ext = Vec::new();
        if let Some(name) = name {
            let n = name.len() as u16;
            sni_ext.extend_from_slice(&[0, 0]);
            sni_ext.extend_from_slice(&(n + 5).to_be_bytes());
            sni_ext.extend_from_slice(&(n + 3).to_be_bytes());
            sni_ext.push(0);
            sni_ext.extend_from_slice(&n.to_be_bytes());
            sni_ext.extend_from_slice(name.as_bytes());
        }
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(0);
        body.extend_from_slice(&[0, 2, 0x13, 0x01, 1, 0]);
        let pad = size.saturating_sub(4 + body.len() + 2 + 4 + sni_ext.len());
        let mut exts = vec![0, 51];
        exts.extend_from_slice(&(pad as u16).to_be_bytes());
        exts.resize(exts.len() + pad, 0xaa);
        exts.extend_from_slice(&sni_ext);
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut hs = vec![1, 0];
        hs.extend_from_slice(&(body.len() as u16).to_be_bytes());
        hs.extend_from_slice(&body);
        hs
    }

    fn crypto_frame(offset: u64, data: &[u8]) -> Vec<u8> {
        let mut f = vec![0x06];
        f.extend_from_slice(&(0x8000_0000 | offset as u32).to_be_bytes());
        f.extend_from_slice(&(0x4000 | data.len() as u16).to_be_bytes());
        f.extend_from_slice(data);
        f
    }

    /// Frames padded to fill a 1200-byte datagram.
    fn padded(mut frames: Vec<u8>) -> Vec<u8> {
        let dcid_scid = 8 + 8;
        let header = 1 + 4 + 1 + 1 + dcid_scid + 1 + 2 + 4;
        frames.resize(frames.len().max(1200 - header - TAG_LEN), 0);
        frames
    }

    #[test]
    fn chrome_like_hello_in_two_initials_with_chaos() {
        let dcid = [9, 8, 7, 6, 5, 4, 3, 2];
        let scid = [1; 8];
        let hs = hello(Some("Media.Example.NET"), 1800);
        assert!(hs.len() > 1700);
        // Packet 0: bytes 0..1100 cut into three frames, out of order, with PINGs
        // and PADDING between them; an ACK frame too.
        let mut f0 = vec![0x01];
        f0.extend(crypto_frame(700, &hs[700..1100]));
        f0.extend([0, 0, 0, 0x01]);
        f0.extend(crypto_frame(0, &hs[..300]));
        f0.extend([0x02, 0, 0, 0, 0]); // ACK 0, delay 0, no ranges, first range 0
        f0.extend(crypto_frame(300, &hs[300..700]));
        let p0 = seal_client_initial(QUIC_V1, &dcid, &scid, 0, &padded(f0)).expect("seal");
        // Packet 1: the rest, with a retransmitted overlap.
        let mut f1 = crypto_frame(1050, &hs[1050..]);
        f1.extend([0x03, 0, 0, 1, 0, 0, 0, 1, 2, 3]); // ACK_ECN with one range
        let p1 = seal_client_initial(QUIC_V1, &dcid, &scid, 1, &padded(f1)).expect("seal");
        assert_eq!((p0.len(), p1.len()), (1200, 1200));

        let mut a = HelloAssembler::new();
        assert_eq!(a.push_datagram(&p0), Ok(Sni::NeedMore(hs.len() - 1100)));
        assert_eq!(a.contiguous_len(), 1100);
        assert_eq!(a.dcid(), Some(dcid.as_slice()));
        assert_eq!(a.push_datagram(&p1), Ok(found("media.example.net")));
        // The other order: the second packet first has no offset 0.
        let mut b = HelloAssembler::new();
        assert_eq!(b.push_datagram(&p1), Ok(Sni::NeedMore(4)));
        assert_eq!(b.push_datagram(&p0), Ok(found("media.example.net")));
        // A packet of another connection, or a server's, changes nothing.
        let other = seal_client_initial(QUIC_V1, &[1; 8], &scid, 0, &padded(vec![])).expect("s");
        assert_eq!(a.push_datagram(&other), Err(QuicSniError::OtherConnection));
        let v2 = seal_client_initial(QUIC_V2, &dcid, &scid, 0, &padded(vec![])).expect("s");
        assert_eq!(a.push_datagram(&v2), Err(QuicSniError::OtherConnection));
        assert_eq!(a.sni(), Ok(found("media.example.net")));
    }

    #[test]
    fn frames_that_end_the_walk() {
        let dcid = [1; 8];
        // CONNECTION_CLOSE after a CRYPTO frame: the fragment, and where it stopped.
        let mut f = crypto_frame(0, b"\x01\x00");
        f.extend([0x1c, 0, 0, 0]);
        let p = seal_client_initial(QUIC_V1, &dcid, &[], 5, &f).expect("seal");
        let ic = initial_crypto(&p).expect("decrypts");
        assert_eq!(ic.packet_number, 5);
        assert_eq!(ic.stopped_at, Some(0x1c));
        assert_eq!(ic.fragments.len(), 1);
        // Truncated frames are errors.
        for bad in [
            vec![0x06, 0x00],                  // CRYPTO without a length
            vec![0x06, 0x00, 0x05, 1, 2],      // CRYPTO data cut short
            vec![0x02, 0x00, 0x00, 0x05, 0x0], // ACK with 5 ranges missing
            vec![
                0x06, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0x00,
            ], // offset+len > 2^62-1
        ] {
            let p = seal_client_initial(QUIC_V1, &dcid, &[], 0, &bad).expect("seal");
            assert!(
                matches!(initial_crypto(&p), Err(QuicSniError::Malformed(_))),
                "{bad:02x?}"
            );
        }
    }

    #[test]
    fn assembler_errors_and_bounds() {
        let dcid = [2; 8];
        let push = |a: &mut HelloAssembler, frames: Vec<u8>| {
            let p = seal_client_initial(QUIC_V1, &dcid, &[], 0, &padded(frames)).expect("seal");
            a.push_datagram(&p)
        };
        // Not a ClientHello (a ServerHello's type).
        assert_eq!(
            push(&mut HelloAssembler::new(), crypto_frame(0, &[2, 0, 0, 4])),
            Err(QuicSniError::Tls(SniError::NotClientHello(2)))
        );
        // A declared length beyond the bound.
        assert_eq!(
            push(
                &mut HelloAssembler::new(),
                crypto_frame(0, &[1, 0, 0x40, 0])
            ),
            Err(QuicSniError::HelloTooLarge(4 + 0x4000))
        );
        // Nothing at offset 0 yet / no CRYPTO at all.
        assert_eq!(
            push(&mut HelloAssembler::new(), crypto_frame(10, &[1; 10])),
            Ok(Sni::NeedMore(4))
        );
        assert_eq!(
            push(&mut HelloAssembler::new(), vec![]),
            Ok(Sni::NeedMore(4))
        );
        // Fragments far beyond the bound are dropped, memory stays bounded.
        let mut a = HelloAssembler::new();
        assert_eq!(
            push(&mut a, crypto_frame(1 << 29, &[1; 100])),
            Ok(Sni::NeedMore(4))
        );
        a.insert(u64::MAX, &[1; 10]);
        a.insert(MAX_HELLO_LEN as u64 - 3, &[1; 10]);
        assert_eq!(a.buf.len(), MAX_HELLO_LEN);
        assert_eq!(a.contiguous_len(), 0);
        // Whole hello without a server name.
        assert_eq!(
            push(
                &mut HelloAssembler::new(),
                crypto_frame(0, &hello(None, 300))
            ),
            Ok(Sni::Absent { ech: false })
        );
    }
}
