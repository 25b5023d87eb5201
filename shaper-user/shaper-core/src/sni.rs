//! TLS ClientHello server-name (SNI) extraction, and QUIC Initial header detection.
//!
//! The classifier hands user space the TCP payload of a flow's first client data
//! segment(s) on port 443; [`client_hello_sni`] finds the `server_name` extension's
//! `host_name` (RFC 6066 §3) in it: TLS record header(s) (content type 22, version
//! 3.x), handshake type 1 (ClientHello), legacy version, random, session id, cipher
//! suites, compression methods, extensions. It never panics on any input; malformed
//! input is an [`SniError`].
//!
//! # Partial ClientHellos: what is and is not seen
//!
//! The ClientHello may be split across TLS records (the parser reassembles consecutive
//! handshake records) and across TCP segments. The BPF side hands over at most ~1500
//! bytes, the first segment only (an MSS is 1448 bytes on a 1500-byte MTU with TCP
//! timestamps, 1452/1440 over PPPoE's 1492). The parser walks as far as the bytes
//! go: if the SNI extension is complete within them the name is returned
//! ([`Sni::Found`]) even though the rest of the ClientHello is missing; if the bytes
//! end first, the result is [`Sni::NeedMore`] with the number of bytes still missing
//! to the end of the ClientHello, as far as the lengths seen so far tell (a lower
//! bound when the next record header has not been seen).
//!
//! Where clients put SNI decides whether a large ClientHello is recognised from its
//! first segment:
//! * OpenSSL (openssl s_client, curl and most non-browser clients on Linux) sends
//!   `server_name` as the first extension, a few dozen bytes after the cipher suites:
//!   always in the first segment (fixture `openssl-big-alpn-seg1.bin`, a 2.3 KB
//!   ClientHello, is recognised from its first 1448 bytes).
//! * GnuTLS sends it near the end, after `key_share` and ALPN (fixture
//!   `gnutls-ffdhe8192-seg1.bin`: a 1.6 KB ClientHello, SNI only in the second
//!   segment, so the first gives `NeedMore`).
//! * Chrome (BoringSSL, since Chrome 110) permutes the extension order randomly per
//!   connection (NSS, Firefox's TLS library, has the same feature; only
//!   `pre_shared_key` stays last). Chrome's ClientHello with the post-quantum
//!   X25519MLKEM768 key share is ~1.8 KB, of which the key share is ~1.2 KB: when
//!   `server_name` is drawn after `key_share` (about half of the connections) it
//!   usually lies beyond the first segment and is **not seen** from the first
//!   segment alone. A flow that stays `NeedMore` keeps its port/CIDR/DNS-derived class
//!   unless the caller hands over the next segment too (the result tells how many
//!   bytes are still missing).
//!
//! # ECH / ESNI
//!
//! With Encrypted Client Hello (extension 0xfe0d, or the old ESNI draft 0xffce) the
//! real server name is encrypted in the inner ClientHello; what is visible, and what
//! this returns, is the outer ClientHello's SNI: the client-facing server's public name
//! (e.g. the CDN's). The `ech` flag of [`Sni::Found`] says whether such an extension
//! was seen (within the bytes parsed).
//!
//! # QUIC
//!
//! [`quic_initial`] recognises a QUIC v1 (RFC 9000) or v2 (RFC 9369) Initial packet's
//! long header and returns its connection IDs. The ClientHello sits in CRYPTO frames
//! of a payload protected with keys derived from the DCID (HKDF-SHA256 with the
//! version's salt, RFC 9001 §5.2), AES-128-GCM, and header protection (AES-ECB mask
//! over the packet number): [`crate::quic`] removes those and hands the hello back to
//! [`client_hello_sni`].

use std::fmt;

/// Longest TLS plaintext record fragment (RFC 8446 §5.1).
pub const MAX_RECORD_LEN: usize = 1 << 14;
/// Longest host name returned (a DNS name's text form, RFC 1035).
pub const MAX_HOST_NAME_LEN: usize = 253;

const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ECH: u16 = 0xfe0d;
const EXT_ESNI_DRAFT: u16 = 0xffce;
const NAME_TYPE_HOST_NAME: u8 = 0;

/// What the first client bytes of a TLS connection say about the server name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sni {
    /// A `host_name` from the `server_name` extension, lowercased, without a trailing
    /// dot. `ech`: an ECH/ESNI extension was seen, so this is the outer (public) name.
    Found { name: String, ech: bool },
    /// The whole ClientHello was parsed and it has no `server_name` (or no
    /// `host_name` entry in it).
    Absent { ech: bool },
    /// The bytes end before the ClientHello's SNI extension; at least this many more
    /// bytes are needed to reach the end of the ClientHello.
    NeedMore(usize),
}

/// Why the bytes are not a ClientHello the parser accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SniError {
    /// The first record is not a handshake record (content type 22).
    NotHandshake(u8),
    /// Record version not 3.0..3.4 (an SSLv2-format hello lands here too).
    BadRecordVersion(u16),
    /// Record length 0 or above 2^14.
    BadRecordLength(usize),
    /// The handshake message is not a ClientHello.
    NotClientHello(u8),
    /// A length field or structure inside the ClientHello is inconsistent.
    Malformed(&'static str),
    /// The host_name is empty, too long, or has bytes a host name cannot have.
    BadName,
}

impl fmt::Display for SniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SniError::NotHandshake(t) => write!(f, "not a TLS handshake record (type {t})"),
            SniError::BadRecordVersion(v) => write!(f, "bad TLS record version {v:#06x}"),
            SniError::BadRecordLength(l) => write!(f, "bad TLS record length {l}"),
            SniError::NotClientHello(t) => write!(f, "handshake type {t} is not ClientHello"),
            SniError::Malformed(what) => write!(f, "malformed ClientHello: {what}"),
            SniError::BadName => write!(f, "server_name is not a valid host name"),
        }
    }
}

impl std::error::Error for SniError {}

/// Reads past the available bytes (`Incomplete`) or past a declared length (`Bad`).
enum Short {
    Incomplete,
    Bad(SniError),
}

impl From<SniError> for Short {
    fn from(e: SniError) -> Self {
        Short::Bad(e)
    }
}

/// A cursor over the bytes we have (`buf`) of a structure whose declared end is `end`
/// (which may lie beyond `buf`).
struct Cur<'a> {
    buf: &'a [u8],
    pos: usize,
    end: usize,
}

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], Short> {
        let new = self
            .pos
            .checked_add(n)
            .ok_or(Short::Bad(SniError::Malformed(what)))?;
        if new > self.end {
            return Err(Short::Bad(SniError::Malformed(what)));
        }
        let s = self.buf.get(self.pos..new).ok_or(Short::Incomplete)?;
        self.pos = new;
        Ok(s)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, Short> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, Short> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    /// A sub-structure of `len` declared bytes; `self` moves past it even if its
    /// bytes are not all available.
    fn sub(&mut self, len: usize, what: &'static str) -> Result<Cur<'a>, Short> {
        let end = self
            .pos
            .checked_add(len)
            .ok_or(Short::Bad(SniError::Malformed(what)))?;
        if end > self.end {
            return Err(Short::Bad(SniError::Malformed(what)));
        }
        let c = Cur {
            buf: self.buf,
            pos: self.pos,
            end,
        };
        self.pos = end;
        Ok(c)
    }
    fn at_end(&self) -> bool {
        self.pos >= self.end
    }
}

/// Finds the SNI in the first client bytes of a TLS connection (see the module docs
/// for partial input and where clients put SNI). Bytes after the ClientHello are
/// ignored.
pub fn client_hello_sni(payload: &[u8]) -> Result<Sni, SniError> {
    // Reassemble the handshake bytes from consecutive handshake records.
    let mut hs: Vec<u8> = Vec::new();
    let mut off = 0;
    // Where the ClientHello would end in `payload`, when the bytes run out first.
    let mut missing: Option<usize> = None;
    loop {
        let hs_total = hs_total_len(&hs);
        if hs_total.is_some_and(|t| hs.len() >= t) {
            break;
        }
        let header = match payload.get(off..off + 5) {
            Some(h) => h,
            None => {
                // Not even the next record header: it, and the rest of the handshake
                // (at least its 4-byte header), are missing.
                let have = payload.len() - off;
                let hs_left = hs_total.unwrap_or(4).saturating_sub(hs.len()).max(1);
                missing = Some(5 - have + hs_left);
                break;
            }
        };
        if header[0] != CONTENT_HANDSHAKE {
            if off == 0 {
                return Err(SniError::NotHandshake(header[0]));
            }
            return Err(SniError::Malformed(
                "non-handshake record inside ClientHello",
            ));
        }
        let version = u16::from_be_bytes([header[1], header[2]]);
        if header[1] != 3 || header[2] > 4 {
            return Err(SniError::BadRecordVersion(version));
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > MAX_RECORD_LEN {
            return Err(SniError::BadRecordLength(len));
        }
        let start = off + 5;
        let record_end = start + len;
        let avail = &payload[start..record_end.min(payload.len())];
        hs.extend_from_slice(avail);
        if record_end > payload.len() {
            let short_in_record = record_end - payload.len();
            // Handshake bytes once this record is complete:
            let hs_after = hs.len() + short_in_record;
            // Without the handshake header, assume the message fits this record.
            let total = hs_total_len(&hs).unwrap_or(hs_after.max(4));
            // (This record may also hold bytes past the ClientHello.)
            missing = Some(if hs_after >= total {
                total.saturating_sub(hs.len())
            } else {
                short_in_record + 5 + (total - hs_after)
            });
            break;
        }
        off = record_end;
    }

    if hs.first().is_some_and(|&t| t != HANDSHAKE_CLIENT_HELLO) {
        return Err(SniError::NotClientHello(hs[0]));
    }
    let Some(total) = hs_total_len(&hs) else {
        return Ok(Sni::NeedMore(missing.unwrap_or(1).max(1)));
    };
    let body = &hs[4..hs.len().min(total)];
    let mut sni = None;
    let mut ech = false;
    match parse_body(body, total - 4, &mut sni, &mut ech) {
        Ok(()) => Ok(match sni {
            Some(name) => Sni::Found { name, ech },
            None => Sni::Absent { ech },
        }),
        Err(Short::Bad(e)) => Err(e),
        Err(Short::Incomplete) => Ok(match sni {
            Some(name) => Sni::Found { name, ech },
            None => Sni::NeedMore(missing.unwrap_or(1).max(1)),
        }),
    }
}

/// 4 + the handshake message length, once the 4-byte handshake header is there.
fn hs_total_len(hs: &[u8]) -> Option<usize> {
    match hs {
        [_, a, b, c, ..] => {
            Some(4 + (usize::from(*a) << 16 | usize::from(*b) << 8 | usize::from(*c)))
        }
        _ => None,
    }
}

fn parse_body(
    body: &[u8],
    declared: usize,
    sni: &mut Option<String>,
    ech: &mut bool,
) -> Result<(), Short> {
    let mut c = Cur {
        buf: body,
        pos: 0,
        end: declared,
    };
    let legacy_version = c.take(2, "legacy_version")?;
    if legacy_version[0] != 3 {
        return Err(SniError::Malformed("legacy_version").into());
    }
    c.take(32, "random")?;
    let sid_len = usize::from(c.u8("session_id")?);
    if sid_len > 32 {
        return Err(SniError::Malformed("session_id longer than 32").into());
    }
    c.take(sid_len, "session_id")?;
    let cs_len = usize::from(c.u16("cipher_suites")?);
    if cs_len < 2 || cs_len % 2 != 0 {
        return Err(SniError::Malformed("cipher_suites length").into());
    }
    c.sub(cs_len, "cipher_suites")?;
    let comp_len = usize::from(c.u8("compression_methods")?);
    if comp_len < 1 {
        return Err(SniError::Malformed("compression_methods empty").into());
    }
    c.sub(comp_len, "compression_methods")?;
    if c.at_end() {
        // A pre-TLS-1.2 style hello without extensions.
        return Ok(());
    }
    let ext_len = usize::from(c.u16("extensions")?);
    if c.pos + ext_len != c.end {
        return Err(SniError::Malformed("extensions length").into());
    }
    let mut exts = c.sub(ext_len, "extensions")?;
    while !exts.at_end() {
        let ty = exts.u16("extension type")?;
        let len = usize::from(exts.u16("extension length")?);
        let mut data = exts.sub(len, "extension data")?;
        match ty {
            EXT_SERVER_NAME if sni.is_none() => *sni = parse_server_name(&mut data)?,
            EXT_ECH | EXT_ESNI_DRAFT => *ech = true,
            _ => {}
        }
    }
    Ok(())
}

/// The `host_name` of a ServerNameList, if any.
fn parse_server_name(data: &mut Cur<'_>) -> Result<Option<String>, Short> {
    if data.at_end() {
        return Ok(None);
    }
    let list_len = usize::from(data.u16("server_name_list")?);
    if data.pos + list_len != data.end {
        return Err(SniError::Malformed("server_name_list length").into());
    }
    let mut list = data.sub(list_len, "server_name_list")?;
    while !list.at_end() {
        let name_type = list.u8("name_type")?;
        let len = usize::from(list.u16("host_name length")?);
        let name = list.take(len, "host_name")?;
        if name_type == NAME_TYPE_HOST_NAME {
            return host_name(name).map(Some).map_err(Short::Bad);
        }
    }
    Ok(None)
}

fn host_name(raw: &[u8]) -> Result<String, SniError> {
    let raw = raw.strip_suffix(b".").unwrap_or(raw);
    if raw.is_empty()
        || raw.len() > MAX_HOST_NAME_LEN
        || raw.split(|&b| b == b'.').any(|label| label.is_empty())
        || raw.iter().any(|b| !(0x21..=0x7e).contains(b))
    {
        return Err(SniError::BadName);
    }
    Ok(raw
        .iter()
        .map(|b| char::from(b.to_ascii_lowercase()))
        .collect())
}

// ---------------------------------------------------------------- QUIC

/// QUIC version 1 (RFC 9000).
pub const QUIC_V1: u32 = 1;
/// QUIC version 2 (RFC 9369).
pub const QUIC_V2: u32 = 0x6b33_43cf;
/// Longest connection ID in QUIC v1/v2.
pub const MAX_CID_LEN: usize = 20;
/// A client must pad datagrams carrying an Initial to at least this (RFC 9000 §14.1).
pub const MIN_CLIENT_INITIAL_DATAGRAM: usize = 1200;

/// The clear-text long header of a QUIC Initial packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuicInitial {
    pub version: u32,
    /// Destination connection ID: for a client's first Initial, the value the
    /// Initial keys are derived from (RFC 9001 §5.2).
    pub dcid: Vec<u8>,
    pub scid: Vec<u8>,
    pub token_len: usize,
    /// The Length field: packet number + protected payload, in bytes.
    pub payload_len: usize,
    /// The size of the whole UDP payload given.
    pub datagram_len: usize,
}

impl QuicInitial {
    /// A client's first Initial: datagram padded to >= 1200 bytes and a DCID of at
    /// least 8 bytes (RFC 9000 §14.1, §7.2). Server Initials need not be either.
    pub fn plausible_client_initial(&self) -> bool {
        self.datagram_len >= MIN_CLIENT_INITIAL_DATAGRAM && self.dcid.len() >= 8
    }
}

/// Why a UDP payload is not a QUIC Initial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuicError {
    /// Short header (or empty): not a long-header packet.
    NotLongHeader,
    /// A long header, but not an Initial (0-RTT, Handshake, Retry, or version
    /// negotiation).
    NotInitial,
    /// A version other than v1 and v2 (including greased 0x?a?a?a?a versions).
    UnsupportedVersion(u32),
    /// The header is cut short or a length in it is inconsistent.
    Malformed(&'static str),
}

impl fmt::Display for QuicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QuicError::NotLongHeader => write!(f, "not a QUIC long header"),
            QuicError::NotInitial => write!(f, "not a QUIC Initial packet"),
            QuicError::UnsupportedVersion(v) => write!(f, "unsupported QUIC version {v:#010x}"),
            QuicError::Malformed(what) => write!(f, "malformed QUIC Initial: {what}"),
        }
    }
}

impl std::error::Error for QuicError {}

/// Parses the long header of a QUIC v1/v2 Initial packet at the start of a UDP
/// payload (the first packet of a possibly coalesced datagram). Does not decrypt
/// anything: see the module docs.
pub fn quic_initial(udp_payload: &[u8]) -> Result<QuicInitial, QuicError> {
    let malformed = QuicError::Malformed;
    let first = *udp_payload.first().ok_or(QuicError::NotLongHeader)?;
    if first & 0x80 == 0 {
        return Err(QuicError::NotLongHeader);
    }
    let v = udp_payload.get(1..5).ok_or(malformed("version"))?;
    let version = u32::from_be_bytes([v[0], v[1], v[2], v[3]]);
    let initial_type = match version {
        0 => return Err(QuicError::NotInitial),
        QUIC_V1 => 0b00,
        QUIC_V2 => 0b01,
        other => return Err(QuicError::UnsupportedVersion(other)),
    };
    if first & 0x40 == 0 {
        return Err(malformed("fixed bit"));
    }
    if (first >> 4) & 0b11 != initial_type {
        return Err(QuicError::NotInitial);
    }
    let mut pos = 5;
    let cid = |pos: &mut usize, what: &'static str| -> Result<Vec<u8>, QuicError> {
        let len = usize::from(*udp_payload.get(*pos).ok_or(malformed(what))?);
        if len > MAX_CID_LEN {
            return Err(malformed(what));
        }
        let id = udp_payload
            .get(*pos + 1..*pos + 1 + len)
            .ok_or(malformed(what))?;
        *pos += 1 + len;
        Ok(id.to_vec())
    };
    let dcid = cid(&mut pos, "destination connection id")?;
    let scid = cid(&mut pos, "source connection id")?;
    let token_len = varint(udp_payload, &mut pos).ok_or(malformed("token length"))?;
    let token_len = usize::try_from(token_len).map_err(|_| malformed("token length"))?;
    if token_len > udp_payload.len() - pos {
        return Err(malformed("token"));
    }
    pos += token_len;
    let payload_len = varint(udp_payload, &mut pos).ok_or(malformed("length"))?;
    let payload_len = usize::try_from(payload_len).map_err(|_| malformed("length"))?;
    // At least a 1-byte packet number and a 16-byte AEAD tag, and no more than is there.
    if payload_len < 1 + 16 || payload_len > udp_payload.len() - pos {
        return Err(malformed("length"));
    }
    Ok(QuicInitial {
        version,
        dcid,
        scid,
        token_len,
        payload_len,
        datagram_len: udp_payload.len(),
    })
}

/// A QUIC variable-length integer (RFC 9000 §16).
pub fn varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let first = *buf.get(*pos)?;
    let len = 1usize << (first >> 6);
    let bytes = buf.get(*pos..*pos + len)?;
    let mut v = u64::from(first & 0x3f);
    for &b in &bytes[1..] {
        v = v << 8 | u64::from(b);
    }
    *pos += len;
    Some(v)
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// The server name in the captured hellos (QUIC's tests use it too).
    pub const SNI: &str = "pacs.example.nhs.uk";

    pub fn found(name: &str) -> Sni {
        Sni::Found {
            name: name.into(),
            ech: false,
        }
    }

    #[test]
    fn openssl_and_curl_hellos() {
        for raw in [
            fixture!("tls/openssl-default-sni.bin"),
            fixture!("tls/openssl-tls12-sni.bin"),
            fixture!("tls/openssl-tls13-sni.bin"),
            fixture!("tls/curl-sni.bin"),
            fixture!("tls/gnutls-sni.bin"),
        ] {
            assert_eq!(client_hello_sni(raw), Ok(found(SNI)));
        }
        assert_eq!(
            client_hello_sni(fixture!("tls/openssl-no-sni.bin")),
            Ok(Sni::Absent { ech: false })
        );
    }

    #[test]
    fn big_hello_sni_in_first_segment() {
        let seg1 = fixture!("tls/openssl-big-alpn-seg1.bin");
        let seg2 = fixture!("tls/openssl-big-alpn-seg2.bin");
        assert_eq!(seg1.len(), 1448);
        // SNI is the first extension: found in the first segment alone.
        assert_eq!(client_hello_sni(seg1), Ok(found(SNI)));
        let whole = [seg1, seg2].concat();
        assert_eq!(client_hello_sni(&whole), Ok(found(SNI)));
        // A cut before the SNI extension: need the rest of the record.
        assert_eq!(
            client_hello_sni(&whole[..60]),
            Ok(Sni::NeedMore(whole.len() - 60))
        );
    }

    #[test]
    fn hello_split_into_512_byte_records() {
        let seg1 = fixture!("tls/openssl-512-records-seg1.bin");
        let seg2 = fixture!("tls/openssl-512-records-seg2.bin");
        // The capture really is several handshake records.
        assert_eq!(&seg1[..5], &[22, 3, 1, 2, 0]);
        assert_eq!(client_hello_sni(seg1), Ok(found(SNI)));
        let whole = [seg1, seg2].concat();
        assert_eq!(client_hello_sni(&whole), Ok(found(SNI)));
        // Every prefix either finds the name or asks for more, never errors.
        for cut in 0..whole.len() {
            match client_hello_sni(&whole[..cut]) {
                Ok(Sni::Found { name, .. }) => assert_eq!(name, SNI),
                Ok(Sni::NeedMore(n)) => assert!(n > 0 && cut + n <= whole.len(), "cut {cut} n {n}"),
                other => panic!("cut {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn sni_after_key_share_is_in_second_segment() {
        let seg1 = fixture!("tls/gnutls-ffdhe8192-seg1.bin");
        let seg2 = fixture!("tls/gnutls-ffdhe8192-seg2.bin");
        let whole = [seg1, seg2].concat();
        let total = 5 + usize::from(u16::from_be_bytes([seg1[3], seg1[4]]));
        assert!(whole.len() >= total);
        assert_eq!(
            client_hello_sni(seg1),
            Ok(Sni::NeedMore(total - seg1.len()))
        );
        assert_eq!(client_hello_sni(&whole), Ok(found(SNI)));
    }

    #[test]
    fn every_prefix_of_every_fixture() {
        for raw in [
            fixture!("tls/openssl-default-sni.bin"),
            fixture!("tls/openssl-tls12-sni.bin"),
            fixture!("tls/openssl-tls13-sni.bin"),
            fixture!("tls/openssl-no-sni.bin"),
            fixture!("tls/curl-sni.bin"),
            fixture!("tls/gnutls-sni.bin"),
        ] {
            let full = client_hello_sni(raw).expect("full");
            for cut in 0..raw.len() {
                match client_hello_sni(&raw[..cut]) {
                    // Before the record header: the header and a handshake header.
                    Ok(Sni::NeedMore(n)) if cut < 5 => assert_eq!(cut + n, 9, "cut {cut}"),
                    // After it: exactly the rest of the (single) record.
                    Ok(Sni::NeedMore(n)) => assert_eq!(cut + n, raw.len(), "cut {cut}"),
                    Ok(r) => assert_eq!(r, full, "cut {cut}"),
                    Err(e) => panic!("cut {cut}: {e}"),
                }
            }
        }
    }

    /// A ClientHello built by hand, with the given extensions (type, data).
    fn hello(exts: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]);
        body.extend_from_slice(&[1, 0]);
        let mut e = Vec::new();
        for (t, d) in exts {
            e.extend_from_slice(&t.to_be_bytes());
            e.extend_from_slice(&(d.len() as u16).to_be_bytes());
            e.extend_from_slice(d);
        }
        body.extend_from_slice(&(e.len() as u16).to_be_bytes());
        body.extend_from_slice(&e);
        let mut hs = vec![1, 0];
        hs.extend_from_slice(&(body.len() as u16).to_be_bytes());
        hs.extend_from_slice(&body);
        let mut rec = vec![22, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }
    fn sni_ext(name: &[u8]) -> (u16, Vec<u8>) {
        let mut d = ((name.len() + 3) as u16).to_be_bytes().to_vec();
        d.push(0);
        d.extend_from_slice(&(name.len() as u16).to_be_bytes());
        d.extend_from_slice(name);
        (0, d)
    }

    #[test]
    fn ech_outer_name() {
        let h = hello(&[sni_ext(b"Public.CDN.example."), (0xfe0d, vec![0; 40])]);
        assert_eq!(
            client_hello_sni(&h),
            Ok(Sni::Found {
                name: "public.cdn.example".into(),
                ech: true
            })
        );
    }

    #[test]
    fn garbage_is_an_error() {
        assert_eq!(
            client_hello_sni(b"GET / HTTP/1.1\r\n"),
            Err(SniError::NotHandshake(b'G'))
        );
        assert_eq!(
            client_hello_sni(&[22, 2, 0, 0, 5]),
            Err(SniError::BadRecordVersion(0x0200))
        );
        assert_eq!(
            client_hello_sni(&[22, 3, 1, 0, 0]),
            Err(SniError::BadRecordLength(0))
        );
        assert_eq!(
            client_hello_sni(&[22, 3, 1, 0x40, 1]),
            Err(SniError::BadRecordLength(0x4001))
        );
        // ServerHello
        assert_eq!(
            client_hello_sni(&[22, 3, 3, 0, 4, 2, 0, 0, 0]),
            Err(SniError::NotClientHello(2))
        );
        // An application-data record after a partial hello record.
        let h = hello(&[sni_ext(b"a.example")]);
        let mut split = h[..5].to_vec();
        split[3..5].copy_from_slice(&10u16.to_be_bytes());
        split.extend_from_slice(&h[5..15]);
        split.extend_from_slice(&[23, 3, 3, 0, 1, 0]);
        assert!(matches!(
            client_hello_sni(&split),
            Err(SniError::Malformed(_))
        ));
        // Names that are not host names.
        // (b"a.b.." was found by the fuzzer: one trailing dot is stripped, the
        // second used to remain.)
        for bad in [
            b"".as_slice(),
            b".",
            b"..",
            b"a..b",
            b".a",
            b"a.b..",
            b"a b",
            b"\xc3\xa9.example",
        ] {
            assert_eq!(
                client_hello_sni(&hello(&[sni_ext(bad)])),
                Err(SniError::BadName),
                "{bad:?}"
            );
        }
        assert_eq!(
            client_hello_sni(&hello(&[sni_ext(&[b'a'; 254])])),
            Err(SniError::BadName)
        );
        assert!(client_hello_sni(&hello(&[sni_ext(&[b'a'; 253])])).is_ok());
        // Extension length past the extensions block.
        let mut h = hello(&[(5, vec![1, 2, 3])]);
        let n = h.len();
        h[n - 4] = 9;
        assert!(matches!(client_hello_sni(&h), Err(SniError::Malformed(_))));
    }

    #[test]
    fn split_records_and_need_more() {
        let h = hello(&[(21, vec![0; 300]), sni_ext(b"late.example")]);
        // The handshake message split into three records at arbitrary points.
        let hs = &h[5..];
        let mut recs = Vec::new();
        for part in [&hs[..2], &hs[2..100], &hs[100..]] {
            recs.extend_from_slice(&[22, 3, 1]);
            recs.extend_from_slice(&(part.len() as u16).to_be_bytes());
            recs.extend_from_slice(part);
        }
        assert_eq!(client_hello_sni(&recs), Ok(found("late.example")));
        for cut in 0..recs.len() {
            match client_hello_sni(&recs[..cut]) {
                Ok(Sni::NeedMore(n)) => assert!(n > 0 && cut + n <= recs.len(), "cut {cut} n {n}"),
                Ok(Sni::Found { name, .. }) => assert_eq!(name, "late.example"),
                other => panic!("cut {cut}: {other:?}"),
            }
        }
        // Trailing bytes after the hello (e.g. early data) are ignored.
        let mut more = h.clone();
        more.extend_from_slice(&[23, 3, 3, 0, 3, 1, 2, 3]);
        assert_eq!(client_hello_sni(&more), Ok(found("late.example")));
        assert_eq!(client_hello_sni(&[]), Ok(Sni::NeedMore(9)));
    }

    #[test]
    fn quic_initial_from_gtlsclient() {
        let raw = fixture!("tls/quic-initial-gtlsclient.bin");
        let q = quic_initial(raw).expect("initial");
        assert_eq!(q.version, QUIC_V1);
        assert_eq!(q.dcid, [0x83, 0x94, 0xc8, 0xf0, 0x3e, 0x51, 0x57, 0x08]);
        assert_eq!(q.scid.len(), 17);
        assert_eq!(q.token_len, 0);
        assert!(q.plausible_client_initial());
        assert_eq!(raw.len(), 1200);
        // The TLS parser does not mistake it for TLS.
        assert!(client_hello_sni(raw).is_err());
    }

    #[test]
    fn quic_rfc9001_sample_header() {
        // RFC 9001 Appendix A.2: the client Initial's header (protected first byte
        // 0xc0, DCID 8394c8f03e515708, no SCID, no token, Length 0x449e = 1182).
        let mut p = vec![
            0xc0, 0, 0, 0, 1, 8, 0x83, 0x94, 0xc8, 0xf0, 0x3e, 0x51, 0x57, 0x08, 0, 0, 0x44, 0x9e,
        ];
        p.resize(p.len() + 1182, 0);
        let q = quic_initial(&p).expect("initial");
        assert_eq!(
            (q.dcid.len(), q.scid.len(), q.payload_len, q.datagram_len),
            (8, 0, 1182, 1200)
        );
        // Short header, handshake type, unknown/greased version, cut headers.
        assert_eq!(quic_initial(&[0x40, 1, 2]), Err(QuicError::NotLongHeader));
        let mut hs = p.clone();
        hs[0] = 0xe0;
        assert_eq!(quic_initial(&hs), Err(QuicError::NotInitial));
        let mut g = p.clone();
        g[1..5].copy_from_slice(&[0x1a, 0x2a, 0x3a, 0x4a]);
        assert_eq!(
            quic_initial(&g),
            Err(QuicError::UnsupportedVersion(0x1a2a3a4a))
        );
        for cut in 0..19 {
            assert!(quic_initial(&p[..cut]).is_err(), "cut {cut}");
        }
        // DCID longer than 20.
        let mut l = p.clone();
        l[5] = 21;
        assert!(quic_initial(&l).is_err());
        // v2 uses type bits 01 for Initial.
        let mut v2 = p.clone();
        v2[0] = 0xd0;
        v2[1..5].copy_from_slice(&QUIC_V2.to_be_bytes());
        assert_eq!(quic_initial(&v2).map(|q| q.version), Ok(QUIC_V2));
    }
}
