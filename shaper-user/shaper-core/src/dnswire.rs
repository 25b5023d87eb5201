//! DNS wire-format parsing (RFC 1035) for DNS-name rules.
//!
//! The classifier hands user space the DNS responses it sees crossing the gateway (the
//! UDP payload as it was on the wire, or a TCP segment with its 2-byte length prefix).
//! [`parse_udp`] / [`parse_tcp`] turn one into a [`DnsAnswer`]: the header fields that
//! matter, the question, and the answer-section records that name rules care about
//! (A, AAAA, CNAME), in wire order. [`resolve_chain`] follows the CNAME chain from the
//! question name and attributes every address at its end to the name the client asked
//! for, with the smallest TTL along the way; [`name_matches`] is the rule matcher
//! (exact names and `*.` wildcards).
//!
//! The parser takes bytes from the network, so it never panics and never allocates
//! more than the input warrants: every read is bounds-checked and malformed input is a
//! [`DnsError`].
//!
//! * Names are returned lowercased, without the trailing dot (the root is `""`). Label
//!   bytes must be printable ASCII other than `.` (`0x21..=0x7e`): anything else (a
//!   space, a control byte, UTF-8, a dot inside a label) makes the message an error,
//!   so a returned name is unambiguous and at most 253 characters long.
//! * Compression pointers must point strictly backwards (to an offset before the
//!   pointer itself), so they cannot loop; in addition a name may take at most
//!   [`MAX_POINTER_JUMPS`] jumps and [`MAX_LABELS`] labels, and its uncompressed wire
//!   form may not exceed 255 bytes. Labels are at most 63 bytes (the `0x40`/`0x80`
//!   extended label types are rejected).
//! * QDCOUNT and ANCOUNT must be backed by data: a section that runs out is an error
//!   (also for a response with the TC bit: servers set ANCOUNT to what they sent).
//!   The authority and additional sections are not parsed, so NSCOUNT/ARCOUNT and
//!   anything after the answer section are not checked.
//! * Answer records of other types (TXT, HTTPS, ...) or classes are skipped by
//!   RDLENGTH; an A/AAAA whose RDLENGTH is not 4/16, or a CNAME whose target does not
//!   end exactly at the end of its RDATA, is an error.
//! * TTLs with the top bit set are treated as 0 (RFC 2181 §8).
//!
//! Not handled: the extended RCODE in an EDNS OPT record (only the header's 4 bits are
//! returned), DNAME records (servers synthesise the CNAME, which is used), DNSSEC
//! validation (an answer is believed as the client will believe it), and messages
//! spread over several TCP segments (the caller reassembles).

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Longest name on the wire, in bytes, including length bytes and the root (RFC 1035).
pub const MAX_NAME_WIRE_LEN: usize = 255;
/// Longest label (RFC 1035).
pub const MAX_LABEL_LEN: usize = 63;
/// Most labels one name may have (a 255-byte name has at most 127 non-root labels).
pub const MAX_LABELS: usize = 127;
/// Most compression pointers followed while reading one name.
pub const MAX_POINTER_JUMPS: usize = 32;
/// Most CNAME hops [`resolve_chain`] follows from the question name.
pub const MAX_CHAIN_DEPTH: usize = 8;

/// Resource record types the parser decodes.
pub const TYPE_A: u16 = 1;
pub const TYPE_CNAME: u16 = 5;
pub const TYPE_AAAA: u16 = 28;
/// The Internet class.
pub const CLASS_IN: u16 = 1;

/// Header RCODE values used by callers.
pub const RCODE_NOERROR: u8 = 0;
pub const RCODE_SERVFAIL: u8 = 2;
pub const RCODE_NXDOMAIN: u8 = 3;

const HEADER_LEN: usize = 12;
/// The smallest question: root name (1) + QTYPE + QCLASS.
const MIN_QUESTION_LEN: usize = 5;
/// The smallest resource record: root name (1) + TYPE, CLASS, TTL, RDLENGTH.
const MIN_RR_LEN: usize = 11;

/// Why a message could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsError {
    /// The data ended inside the named part of the message.
    Truncated(&'static str),
    /// QDCOUNT/ANCOUNT promise more entries than the message can hold.
    CountTooLarge,
    /// A compression pointer that does not point strictly backwards.
    BadPointer,
    /// More than [`MAX_POINTER_JUMPS`] pointers or [`MAX_LABELS`] labels in one name.
    TooManyJumps,
    /// A name longer than 255 bytes on the wire.
    NameTooLong,
    /// A label length byte with the reserved `0x40`/`0x80` type bits.
    BadLabelType,
    /// A label byte outside printable ASCII, or a `.` inside a label.
    BadLabelByte,
    /// A known record type whose RDATA has the wrong size or shape.
    BadRdata(u16),
    /// The TCP length prefix is zero.
    EmptyTcpMessage,
}

impl fmt::Display for DnsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DnsError::Truncated(what) => write!(f, "message truncated in {what}"),
            DnsError::CountTooLarge => write!(f, "section count larger than the message"),
            DnsError::BadPointer => write!(f, "compression pointer does not point backwards"),
            DnsError::TooManyJumps => write!(f, "too many compression pointers or labels"),
            DnsError::NameTooLong => write!(f, "name longer than 255 bytes"),
            DnsError::BadLabelType => write!(f, "reserved label type"),
            DnsError::BadLabelByte => write!(f, "label byte outside printable ASCII"),
            DnsError::BadRdata(t) => write!(f, "malformed RDATA for type {t}"),
            DnsError::EmptyTcpMessage => write!(f, "zero-length TCP DNS message"),
        }
    }
}

impl std::error::Error for DnsError {}

/// The (first) question of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    /// Lowercased, no trailing dot.
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
}

/// The data of an answer record the parser keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RData {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    /// The canonical name (target), lowercased, no trailing dot.
    Cname(String),
}

/// One A, AAAA or CNAME record of the answer section (class IN).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Owner name, lowercased, no trailing dot.
    pub name: String,
    /// Seconds; values with the top bit set are returned as 0.
    pub ttl: u32,
    pub data: RData,
}

/// A parsed DNS message: header fields, first question and kept answer records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsAnswer {
    pub id: u16,
    /// QR bit: true for a response.
    pub is_response: bool,
    pub opcode: u8,
    /// AA bit.
    pub authoritative: bool,
    /// TC bit: the server cut the answer short; the client will retry over TCP.
    pub truncated: bool,
    /// The header's 4-bit RCODE ([`RCODE_NOERROR`], [`RCODE_NXDOMAIN`], ...).
    pub rcode: u8,
    /// The first question (QDCOUNT is almost always 1); `None` if QDCOUNT is 0.
    pub question: Option<Question>,
    /// A, AAAA and CNAME records of class IN from the answer section, in wire order.
    pub answers: Vec<Record>,
    /// Answer-section records of other types or classes, skipped.
    pub skipped: usize,
}

/// Parses a DNS message carried in UDP: `payload` is the whole UDP payload.
pub fn parse_udp(payload: &[u8]) -> Result<DnsAnswer, DnsError> {
    parse_message(payload)
}

/// Parses the first DNS message of a TCP stream chunk: a 2-byte big-endian length
/// followed by the message (RFC 1035 §4.2.2). Bytes after that message (a following
/// message in the same segment) are ignored; a message longer than `data` is
/// [`DnsError::Truncated`].
pub fn parse_tcp(data: &[u8]) -> Result<DnsAnswer, DnsError> {
    let (len, rest) = match data {
        [hi, lo, rest @ ..] => (usize::from(u16::from_be_bytes([*hi, *lo])), rest),
        _ => return Err(DnsError::Truncated("TCP length prefix")),
    };
    if len == 0 {
        return Err(DnsError::EmptyTcpMessage);
    }
    let msg = rest.get(..len).ok_or(DnsError::Truncated("TCP message"))?;
    parse_message(msg)
}

fn parse_message(msg: &[u8]) -> Result<DnsAnswer, DnsError> {
    let header = msg.get(..HEADER_LEN).ok_or(DnsError::Truncated("header"))?;
    let be16 = |i: usize| u16::from_be_bytes([header[i], header[i + 1]]);
    let id = be16(0);
    let flags = be16(2);
    let qdcount = usize::from(be16(4));
    let ancount = usize::from(be16(6));

    // Cheap early rejection of counts the data cannot possibly back.
    let body = msg.len() - HEADER_LEN;
    if qdcount * MIN_QUESTION_LEN + ancount * MIN_RR_LEN > body {
        return Err(DnsError::CountTooLarge);
    }

    let mut pos = HEADER_LEN;
    let mut question = None;
    for i in 0..qdcount {
        let (name, next) = read_name(msg, pos)?;
        let fixed = msg
            .get(next..next + 4)
            .ok_or(DnsError::Truncated("question"))?;
        if i == 0 {
            question = Some(Question {
                name,
                qtype: u16::from_be_bytes([fixed[0], fixed[1]]),
                qclass: u16::from_be_bytes([fixed[2], fixed[3]]),
            });
        }
        pos = next + 4;
    }

    let mut answers = Vec::new();
    let mut skipped = 0;
    for _ in 0..ancount {
        let (name, next) = read_name(msg, pos)?;
        let fixed = msg
            .get(next..next + 10)
            .ok_or(DnsError::Truncated("record header"))?;
        let rtype = u16::from_be_bytes([fixed[0], fixed[1]]);
        let class = u16::from_be_bytes([fixed[2], fixed[3]]);
        let raw_ttl = u32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]);
        let rdlen = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
        let rstart = next + 10;
        let rend = rstart + rdlen;
        let rdata = msg
            .get(rstart..rend)
            .ok_or(DnsError::Truncated("record data"))?;
        pos = rend;
        let ttl = if raw_ttl > i32::MAX as u32 {
            0
        } else {
            raw_ttl
        };
        if class != CLASS_IN {
            skipped += 1;
            continue;
        }
        let data = match rtype {
            TYPE_A => {
                let b: [u8; 4] = rdata.try_into().map_err(|_| DnsError::BadRdata(rtype))?;
                RData::A(Ipv4Addr::from(b))
            }
            TYPE_AAAA => {
                let b: [u8; 16] = rdata.try_into().map_err(|_| DnsError::BadRdata(rtype))?;
                RData::Aaaa(Ipv6Addr::from(b))
            }
            TYPE_CNAME => {
                // The target may be compressed, pointing anywhere before it; only the
                // bytes inside RDATA may be consumed in place.
                let (target, end) = read_name(&msg[..rend], rstart)?;
                if end != rend {
                    return Err(DnsError::BadRdata(rtype));
                }
                RData::Cname(target)
            }
            _ => {
                skipped += 1;
                continue;
            }
        };
        answers.push(Record { name, ttl, data });
    }

    Ok(DnsAnswer {
        id,
        is_response: flags & 0x8000 != 0,
        opcode: ((flags >> 11) & 0xf) as u8,
        authoritative: flags & 0x0400 != 0,
        truncated: flags & 0x0200 != 0,
        rcode: (flags & 0xf) as u8,
        question,
        answers,
        skipped,
    })
}

/// Reads the (possibly compressed) name at `start`. Returns it lowercased without the
/// trailing dot, and the offset just after the name's bytes in place (after the first
/// pointer, if any).
fn read_name(msg: &[u8], start: usize) -> Result<(String, usize), DnsError> {
    let mut name = String::new();
    let mut pos = start;
    // Offset after the name in place; set when the first pointer is followed.
    let mut end_in_place = None;
    let mut wire_len = 1; // the root label
    let mut jumps = 0;
    let mut labels = 0;
    loop {
        let len_byte = *msg.get(pos).ok_or(DnsError::Truncated("name"))?;
        match len_byte & 0xc0 {
            0x00 => {}
            0xc0 => {
                let lo = *msg
                    .get(pos + 1)
                    .ok_or(DnsError::Truncated("name pointer"))?;
                let target = usize::from(u16::from_be_bytes([len_byte & 0x3f, lo]));
                // Strictly backwards: no loops, and each jump makes progress.
                if target >= pos {
                    return Err(DnsError::BadPointer);
                }
                jumps += 1;
                if jumps > MAX_POINTER_JUMPS {
                    return Err(DnsError::TooManyJumps);
                }
                end_in_place.get_or_insert(pos + 2);
                pos = target;
                continue;
            }
            _ => return Err(DnsError::BadLabelType),
        }
        let len = usize::from(len_byte);
        if len == 0 {
            return Ok((name, end_in_place.unwrap_or(pos + 1)));
        }
        labels += 1;
        if labels > MAX_LABELS {
            return Err(DnsError::TooManyJumps);
        }
        wire_len += len + 1;
        if wire_len > MAX_NAME_WIRE_LEN {
            return Err(DnsError::NameTooLong);
        }
        let label = msg
            .get(pos + 1..pos + 1 + len)
            .ok_or(DnsError::Truncated("label"))?;
        if !name.is_empty() {
            name.push('.');
        }
        for &b in label {
            if !(0x21..=0x7e).contains(&b) || b == b'.' {
                return Err(DnsError::BadLabelByte);
            }
            name.push(char::from(b.to_ascii_lowercase()));
        }
        pos += 1 + len;
    }
}

/// Follows the CNAME chain from the question name through the answer section and
/// returns every address at its end, attributed to the queried name, with the
/// smallest TTL along the chain (the CNAMEs' and the address record's).
///
/// Only NOERROR responses with a question produce entries. At most
/// [`MAX_CHAIN_DEPTH`] CNAME hops are followed; a name is visited once (a CNAME loop
/// ends the walk), so each address record is returned at most once and the result is
/// never longer than `msg.answers`. Address records not reachable from the question
/// name are ignored (they answer nothing the client asked). If a name has several
/// CNAMEs (invalid), the first is followed.
pub fn resolve_chain(msg: &DnsAnswer) -> Vec<(String, IpAddr, u32)> {
    let mut out = Vec::new();
    let Some(q) = chain_start(msg) else {
        return out;
    };
    walk_chain(msg, &q.name, |owner_ttl_min, rec| {
        let ip = match rec.data {
            RData::A(a) => IpAddr::V4(a),
            RData::Aaaa(a) => IpAddr::V6(a),
            RData::Cname(_) => return,
        };
        out.push((q.name.clone(), ip, owner_ttl_min.min(rec.ttl)));
    });
    out
}

/// The names along the CNAME chain from the question name, in order, starting with
/// the question name itself (same bounds as [`resolve_chain`]). A rule may name a CDN
/// target rather than the queried name; the caller can match every name here.
pub fn chain_names(msg: &DnsAnswer) -> Vec<String> {
    let Some(q) = chain_start(msg) else {
        return Vec::new();
    };
    let mut names = vec![q.name.clone()];
    walk_chain(msg, &q.name, |_, rec| {
        if let RData::Cname(t) = &rec.data {
            names.push(t.clone());
        }
    });
    names
}

fn chain_start(msg: &DnsAnswer) -> Option<&Question> {
    if !msg.is_response || msg.rcode != RCODE_NOERROR {
        return None;
    }
    msg.question.as_ref()
}

/// Calls `visit(min_ttl_so_far, record)` for every record owned by a name on the chain
/// (address records and the CNAME that is followed).
fn walk_chain<'a>(msg: &'a DnsAnswer, qname: &str, mut visit: impl FnMut(u32, &'a Record)) {
    let mut current: &str = qname;
    let mut ttl_min = u32::MAX;
    let mut visited: HashSet<&str> = HashSet::new();
    let mut hops = 0;
    loop {
        if !visited.insert(current) {
            return;
        }
        let mut next = None;
        for rec in msg.answers.iter().filter(|r| r.name == current) {
            match &rec.data {
                RData::Cname(target) => {
                    if next.is_none() {
                        next = Some((target.as_str(), rec));
                    }
                }
                _ => visit(ttl_min, rec),
            }
        }
        let Some((target, rec)) = next else {
            return;
        };
        if hops == MAX_CHAIN_DEPTH {
            return;
        }
        hops += 1;
        visit(ttl_min, rec);
        ttl_min = ttl_min.min(rec.ttl);
        current = target;
    }
}

/// The query a DNS message answers, as a client sends it: the message's id and
/// first question (read in place: `None` if it is compressed or cut short), flags
/// RD, no other section. For tests, benchmarks and fuzzing that need the query
/// before its answer.
pub fn query_of(msg: &[u8]) -> Option<Vec<u8>> {
    let header = msg.get(..HEADER_LEN)?;
    if u16::from_be_bytes([header[4], header[5]]) == 0 {
        return None;
    }
    let mut pos = HEADER_LEN;
    loop {
        let len = usize::from(*msg.get(pos)?);
        if len & 0xc0 != 0 {
            return None;
        }
        pos += 1 + len;
        if len == 0 {
            break;
        }
    }
    let question = msg.get(HEADER_LEN..pos + 4)?;
    let mut q = vec![header[0], header[1], 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    q.extend_from_slice(question);
    Some(q)
}

/// Whether `name` matches a rule `pattern`: an exact name, or `*.suffix`, which
/// matches any name with at least one label before `.suffix` (`*.sfu.whereby.com`
/// matches `a.sfu.whereby.com` and `a.b.sfu.whereby.com`, not `sfu.whereby.com`).
/// ASCII case-insensitive; one trailing dot on either side is ignored. `*` anywhere
/// else is an ordinary character; an empty pattern matches nothing.
pub fn name_matches(pattern: &str, name: &str) -> bool {
    let pattern = pattern.strip_suffix('.').unwrap_or(pattern);
    let name = name.strip_suffix('.').unwrap_or(name);
    if pattern.is_empty() {
        return false;
    }
    match pattern.strip_prefix("*.") {
        Some(suffix) if !suffix.is_empty() => {
            // name = <at least one char> "." suffix
            name.len() > suffix.len() + 1
                && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
                && name.as_bytes()[name.len() - suffix.len()..]
                    .eq_ignore_ascii_case(suffix.as_bytes())
        }
        _ => pattern.eq_ignore_ascii_case(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> IpAddr {
        IpAddr::V4(s.parse().expect("test address"))
    }
    fn v6(s: &str) -> IpAddr {
        IpAddr::V6(s.parse().expect("test address"))
    }
    fn cname(owner: &str, ttl: u32, target: &str) -> Record {
        Record {
            name: owner.into(),
            ttl,
            data: RData::Cname(target.into()),
        }
    }

    /// Builds a message by hand: header counts + raw body.
    fn msg(flags: u16, qd: u16, an: u16, body: &[u8]) -> Vec<u8> {
        let mut m = vec![0x12, 0x34];
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&qd.to_be_bytes());
        m.extend_from_slice(&an.to_be_bytes());
        m.extend_from_slice(&[0, 0, 0, 0]);
        m.extend_from_slice(body);
        m
    }
    fn wire_name(name: &str) -> Vec<u8> {
        let mut v = Vec::new();
        for l in name.split('.').filter(|l| !l.is_empty()) {
            v.push(l.len() as u8);
            v.extend_from_slice(l.as_bytes());
        }
        v.push(0);
        v
    }

    // ---- captured fixtures (tests/fixtures/dns/make-fixtures.sh) ----

    #[test]
    fn the_query_of_an_answer_has_its_id_and_question() {
        let a = fixture!("dns/media-a.bin");
        let q = query_of(a).expect("a question in place");
        let (qm, am) = (
            parse_udp(&q).expect("parses"),
            parse_udp(a).expect("parses"),
        );
        assert_eq!((qm.id, &qm.question), (am.id, &am.question));
        assert!(!qm.is_response && qm.answers.is_empty());
        assert_eq!(query_of(&a[..20]), None);
        assert_eq!(query_of(&q[..11]), None);
    }

    #[test]
    fn media_a_cname_chain() {
        let m = parse_udp(fixture!("dns/media-a.bin")).expect("parses");
        assert!(m.is_response && m.authoritative && !m.truncated);
        assert_eq!(m.rcode, RCODE_NOERROR);
        let q = m.question.as_ref().expect("question");
        assert_eq!(
            (q.name.as_str(), q.qtype, q.qclass),
            ("media.sfu.whereby.com", 1, 1)
        );
        assert_eq!(
            m.answers,
            vec![
                cname("media.sfu.whereby.com", 120, "media-sfu.edge.example.net"),
                cname("media-sfu.edge.example.net", 60, "x.cdn.example.net"),
                Record {
                    name: "x.cdn.example.net".into(),
                    ttl: 300,
                    data: RData::A(Ipv4Addr::new(192, 0, 2, 10)),
                },
            ]
        );
        assert_eq!(m.skipped, 0);
        assert_eq!(
            resolve_chain(&m),
            vec![("media.sfu.whereby.com".to_string(), v4("192.0.2.10"), 60)]
        );
        assert_eq!(
            chain_names(&m),
            vec![
                "media.sfu.whereby.com",
                "media-sfu.edge.example.net",
                "x.cdn.example.net"
            ]
        );
    }

    #[test]
    fn media_aaaa_cname_chain() {
        let m = parse_udp(fixture!("dns/media-aaaa.bin")).expect("parses");
        assert_eq!(m.question.as_ref().map(|q| q.qtype), Some(TYPE_AAAA));
        assert_eq!(m.answers.len(), 3);
        assert_eq!(
            resolve_chain(&m),
            vec![("media.sfu.whereby.com".to_string(), v6("2001:db8::10"), 60)]
        );
    }

    #[test]
    fn mixed_case_question_is_lowercased() {
        let raw = fixture!("dns/media-mixedcase-a.bin");
        // The capture really carries the client's case (dnsmasq echoes it, and the
        // first answer's owner is a pointer to it).
        assert!(raw.windows(5).any(|w| w == b"MEDIA"));
        let m = parse_udp(raw).expect("parses");
        assert_eq!(
            m.question.as_ref().map(|q| q.name.as_str()),
            Some("media.sfu.whereby.com")
        );
        assert_eq!(m.answers[0].name, "media.sfu.whereby.com");
        assert_eq!(
            resolve_chain(&m),
            vec![("media.sfu.whereby.com".to_string(), v4("192.0.2.10"), 60)]
        );
    }

    #[test]
    fn wildcard_domain_a_and_aaaa() {
        let m = parse_udp(fixture!("dns/turn-a.bin")).expect("parses");
        assert_eq!(
            resolve_chain(&m),
            vec![(
                "eu-west-2.turn.whereby.com".to_string(),
                v4("198.51.100.7"),
                300
            )]
        );
        let m = parse_udp(fixture!("dns/turn-aaaa.bin")).expect("parses");
        assert_eq!(
            resolve_chain(&m),
            vec![(
                "eu-west-2.turn.whereby.com".to_string(),
                v6("2001:db8:0:7::7"),
                300
            )]
        );
        assert!(name_matches(
            "*.turn.whereby.com",
            "eu-west-2.turn.whereby.com"
        ));
    }

    #[test]
    fn nxdomain() {
        let m = parse_udp(fixture!("dns/nxdomain.bin")).expect("parses");
        assert_eq!(m.rcode, RCODE_NXDOMAIN);
        assert_eq!(
            m.question.as_ref().map(|q| q.name.as_str()),
            Some("nosuch.example.nhs.uk")
        );
        assert!(m.answers.is_empty());
        assert!(resolve_chain(&m).is_empty());
    }

    #[test]
    fn truncated_udp_answer_keeps_what_was_sent() {
        let m = parse_udp(fixture!("dns/big-truncated-udp.bin")).expect("parses");
        assert!(m.truncated);
        // dnsmasq sends as many of the 40 records as fit in 512 bytes and sets
        // ANCOUNT to that.
        assert!(
            !m.answers.is_empty() && m.answers.len() < 40,
            "{}",
            m.answers.len()
        );
        let r = resolve_chain(&m);
        assert_eq!(r.len(), m.answers.len());
        for (name, ip, ttl) in &r {
            assert_eq!(name, "big.example.net");
            assert_eq!(*ttl, 300);
            match ip {
                IpAddr::V4(a) => {
                    assert!(a.octets()[..3] == [192, 0, 2] && (101..=140).contains(&a.octets()[3]))
                }
                IpAddr::V6(_) => panic!("no AAAA expected"),
            }
        }
    }

    #[test]
    fn tcp_answer_has_all_records() {
        let raw = fixture!("dns/big-tcp.bin");
        let m = parse_tcp(raw).expect("parses");
        assert!(!m.truncated);
        let r = resolve_chain(&m);
        assert_eq!(r.len(), 40);
        let mut last: Vec<u8> = r
            .iter()
            .map(|(_, ip, _)| match ip {
                IpAddr::V4(a) => a.octets()[3],
                IpAddr::V6(_) => 0,
            })
            .collect();
        last.sort_unstable();
        assert_eq!(last, (101..=140).collect::<Vec<u8>>());
        // The same bytes without the prefix are the UDP form; a prefix that promises
        // more than there is, is an error.
        assert_eq!(parse_udp(&raw[2..]).expect("parses"), m);
        assert_eq!(
            parse_tcp(&raw[..raw.len() - 1]),
            Err(DnsError::Truncated("TCP message"))
        );
    }

    #[test]
    fn other_types_are_skipped_by_rdlength() {
        // ANY: TXT, HTTPS, A, AAAA
        let m = parse_udp(fixture!("dns/any-mixed.bin")).expect("parses");
        assert_eq!(m.skipped, 2);
        let mut r = resolve_chain(&m);
        r.sort();
        assert_eq!(
            r,
            vec![
                ("x.cdn.example.net".to_string(), v4("192.0.2.10"), 300),
                ("x.cdn.example.net".to_string(), v6("2001:db8::10"), 300),
            ]
        );
        let m = parse_udp(fixture!("dns/https-type65.bin")).expect("parses");
        assert_eq!((m.answers.len(), m.skipped), (0, 1));
        // A browser's HTTPS query: the CNAME chain is kept, the HTTPS record skipped.
        let m = parse_udp(fixture!("dns/media-https-type65.bin")).expect("parses");
        assert_eq!((m.answers.len(), m.skipped), (2, 1));
        assert!(resolve_chain(&m).is_empty());
        assert_eq!(chain_names(&m).len(), 3);
    }

    #[test]
    fn query_parses_without_answers() {
        let m = parse_udp(fixture!("dns/media-a-query.bin")).expect("parses");
        assert!(!m.is_response);
        assert_eq!(
            m.question.as_ref().map(|q| q.name.as_str()),
            Some("media.sfu.whereby.com")
        );
        assert!(m.answers.is_empty());
        assert!(resolve_chain(&m).is_empty());
    }

    #[test]
    fn every_prefix_of_every_fixture_is_an_error_not_a_panic() {
        for raw in [
            fixture!("dns/media-a.bin"),
            fixture!("dns/media-aaaa.bin"),
            fixture!("dns/media-mixedcase-a.bin"),
            fixture!("dns/turn-a.bin"),
            fixture!("dns/turn-aaaa.bin"),
            fixture!("dns/nxdomain.bin"),
            fixture!("dns/big-truncated-udp.bin"),
            fixture!("dns/any-mixed.bin"),
            fixture!("dns/https-type65.bin"),
            fixture!("dns/media-https-type65.bin"),
            fixture!("dns/media-a-query.bin"),
        ] {
            let full = parse_udp(raw).expect("full fixture parses");
            for cut in 0..raw.len() {
                match parse_udp(&raw[..cut]) {
                    Err(_) => {}
                    // Cutting inside the additional section (EDNS OPT) is not noticed:
                    // that section is not parsed.
                    Ok(m) => assert_eq!(m, full, "cut at {cut}"),
                }
            }
        }
    }

    // ---- hand-built messages for the edge cases ----

    #[test]
    fn pointer_must_point_backwards() {
        // Question name is a pointer to itself (offset 12).
        let m = msg(0x8180, 1, 0, &[0xc0, 12, 0, 1, 0, 1]);
        assert_eq!(parse_udp(&m), Err(DnsError::BadPointer));
        // Forward pointer.
        let m = msg(
            0x8180,
            1,
            0,
            &[0xc0, 20, 0, 1, 0, 1, 0, 0, 0, 0, 1, b'a', 0],
        );
        assert_eq!(parse_udp(&m), Err(DnsError::BadPointer));
        // Two pointers pointing at each other: the second one points back to the
        // first, the first forward -> rejected on the forward one.
        let m = msg(0x8180, 1, 0, &[0xc0, 14, 0xc0, 12, 0, 1, 0, 1]);
        assert_eq!(parse_udp(&m), Err(DnsError::BadPointer));
    }

    #[test]
    fn pointer_chains_are_bounded() {
        // A chain of 40 pointers each pointing at the previous one, ending at "a".
        let mut body = vec![1, b'a', 0];
        let mut prev = 12usize;
        for _ in 0..40 {
            let here = 12 + body.len();
            body.extend_from_slice(&[0xc0 | (prev >> 8) as u8, prev as u8]);
            prev = here;
        }
        // Question: pointer to the last one.
        let qpos = prev;
        body.extend_from_slice(&[0xc0 | (qpos >> 8) as u8, qpos as u8, 0, 1, 0, 1]);
        // QDCOUNT 1 but the question is at the end: make the header point there by
        // putting the chain in a first question that is a plain name... simpler:
        // parse the name directly.
        let m = msg(0x8180, 0, 0, &body);
        assert_eq!(
            read_name(&m, qpos).map(|x| x.0),
            Err(DnsError::TooManyJumps)
        );
        // 20 jumps are fine.
        assert_eq!(
            read_name(&m, 12 + 3 + 2 * 19).map(|x| x.0),
            Ok("a".to_string())
        );
    }

    #[test]
    fn name_and_label_limits() {
        // 63-byte label ok, 64 is a reserved label type (0x40).
        let l63 = "a".repeat(63);
        let m = msg(0x8180, 1, 0, &[wire_name(&l63), vec![0, 1, 0, 1]].concat());
        assert_eq!(
            parse_udp(&m).expect("63").question.map(|q| q.name),
            Some(l63.clone())
        );
        let mut body = vec![64];
        body.extend_from_slice(&[b'a'; 64]);
        body.extend_from_slice(&[0, 0, 1, 0, 1]);
        assert_eq!(
            parse_udp(&msg(0x8180, 1, 0, &body)),
            Err(DnsError::BadLabelType)
        );
        // 255 bytes on the wire is the limit: 3 x 63 + 1 x 61 labels = 4*1 + 250 + 1.
        let n255 = format!("{l63}.{l63}.{l63}.{}", "b".repeat(61));
        assert_eq!(wire_name(&n255).len(), 255);
        let m = msg(0x8180, 1, 0, &[wire_name(&n255), vec![0, 1, 0, 1]].concat());
        let q = parse_udp(&m).expect("255").question.expect("q");
        assert_eq!(q.name.len(), 253);
        let n256 = format!("{l63}.{l63}.{l63}.{}", "b".repeat(62));
        let m = msg(0x8180, 1, 0, &[wire_name(&n256), vec![0, 1, 0, 1]].concat());
        assert_eq!(parse_udp(&m), Err(DnsError::NameTooLong));
        // Too long only after decompression: a 193-byte name, then a second name of a
        // 63-byte label and a pointer to the first (257 bytes).
        let n193 = format!("{l63}.{l63}.{l63}");
        let mut body = [wire_name(&n193), vec![0, 1, 0, 1]].concat();
        body.push(63);
        body.extend_from_slice(&[b'd'; 63]);
        body.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        assert_eq!(
            parse_udp(&msg(0x8180, 2, 0, &body)),
            Err(DnsError::NameTooLong)
        );
    }

    #[test]
    fn bad_label_bytes() {
        for bad in [b"a b".as_slice(), b"a.b", b"\x00ab", b"\xc3\xa9"] {
            let mut body = vec![bad.len() as u8];
            body.extend_from_slice(bad);
            body.extend_from_slice(&[0, 0, 1, 0, 1]);
            assert_eq!(
                parse_udp(&msg(0x8180, 1, 0, &body)),
                Err(DnsError::BadLabelByte)
            );
        }
        // Underscores and other printable bytes are fine.
        let m = msg(
            0x8180,
            1,
            0,
            &[wire_name("_sip._TCP.x"), vec![0, 33, 0, 1]].concat(),
        );
        assert_eq!(
            parse_udp(&m).expect("ok").question.map(|q| q.name),
            Some("_sip._tcp.x".into())
        );
    }

    #[test]
    fn counts_larger_than_data() {
        let q = [wire_name("a.example"), vec![0, 1, 0, 1]].concat();
        assert_eq!(
            parse_udp(&msg(0x8180, 2, 0, &q)),
            Err(DnsError::Truncated("name"))
        );
        assert_eq!(
            parse_udp(&msg(0x8180, 1, 1, &q)),
            Err(DnsError::CountTooLarge)
        );
        // Enough bytes for the cheap check, but the records do not fit.
        let mut body = q.clone();
        body.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 1, 2, 3, 4]);
        // (11 zero bytes would be a valid record: root owner, type 0, class 0.)
        body.extend_from_slice(&[0; 10]);
        assert_eq!(
            parse_udp(&msg(0x8180, 1, 2, &body)),
            Err(DnsError::Truncated("record header"))
        );
        assert_eq!(
            parse_udp(&msg(0x8180, 1, 4, &body)),
            Err(DnsError::CountTooLarge)
        );
        assert_eq!(
            parse_udp(&msg(0x8180, 0xffff, 0xffff, &[])),
            Err(DnsError::CountTooLarge)
        );
        assert_eq!(parse_udp(&[0; 11]), Err(DnsError::Truncated("header")));
    }

    #[test]
    fn bad_rdata() {
        let q = [wire_name("a.example"), vec![0, 1, 0, 1]].concat();
        // A with RDLENGTH 5
        let body = [
            q.clone(),
            vec![0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 5, 1, 2, 3, 4, 5],
        ]
        .concat();
        assert_eq!(
            parse_udp(&msg(0x8180, 1, 1, &body)),
            Err(DnsError::BadRdata(1))
        );
        // CNAME whose name runs past RDLENGTH
        let body = [
            q.clone(),
            vec![0xc0, 12, 0, 5, 0, 1, 0, 0, 0, 60, 0, 2, 1, b'b', 0],
        ]
        .concat();
        assert!(parse_udp(&msg(0x8180, 1, 1, &body)).is_err());
        // CNAME with trailing garbage inside RDLENGTH
        let body = [
            q.clone(),
            vec![0xc0, 12, 0, 5, 0, 1, 0, 0, 0, 60, 0, 4, 1, b'b', 0, 9],
        ]
        .concat();
        assert_eq!(
            parse_udp(&msg(0x8180, 1, 1, &body)),
            Err(DnsError::BadRdata(5))
        );
        // Unknown type with any RDLENGTH is skipped; class CH A record skipped too.
        let body = [
            q.clone(),
            vec![0xc0, 12, 0, 99, 0, 1, 0, 0, 0, 60, 0, 3, 1, 2, 3],
            vec![0xc0, 12, 0, 1, 0, 3, 0, 0, 0, 60, 0, 4, 1, 2, 3, 4],
            vec![0xc0, 12, 0, 1, 0, 1, 0x80, 0, 0, 0, 0, 4, 1, 2, 3, 4],
        ]
        .concat();
        let m = parse_udp(&msg(0x8180, 1, 3, &body)).expect("parses");
        assert_eq!(m.skipped, 2);
        // TTL with the top bit set is 0.
        assert_eq!(
            resolve_chain(&m),
            vec![("a.example".to_string(), v4("1.2.3.4"), 0)]
        );
    }

    fn answer(q: &str, rcode: u8, answers: Vec<Record>) -> DnsAnswer {
        DnsAnswer {
            id: 1,
            is_response: true,
            opcode: 0,
            authoritative: false,
            truncated: false,
            rcode,
            question: Some(Question {
                name: q.into(),
                qtype: 1,
                qclass: 1,
            }),
            answers,
            skipped: 0,
        }
    }
    fn a(owner: &str, ttl: u32, ip: [u8; 4]) -> Record {
        Record {
            name: owner.into(),
            ttl,
            data: RData::A(Ipv4Addr::from(ip)),
        }
    }

    #[test]
    fn resolve_chain_rules() {
        // Unrelated records are ignored, min TTL includes the address record.
        let m = answer(
            "q.example",
            0,
            vec![
                cname("q.example", 30, "t.example"),
                a("t.example", 10, [1, 1, 1, 1]),
                a("t.example", 100, [1, 1, 1, 2]),
                a("other.example", 100, [9, 9, 9, 9]),
            ],
        );
        assert_eq!(
            resolve_chain(&m),
            vec![
                ("q.example".to_string(), v4("1.1.1.1"), 10),
                ("q.example".to_string(), v4("1.1.1.2"), 30),
            ]
        );
        // CNAME loop terminates, each record at most once.
        let m = answer(
            "x",
            0,
            vec![
                cname("x", 5, "y"),
                cname("y", 5, "x"),
                a("x", 9, [1, 2, 3, 4]),
            ],
        );
        assert_eq!(resolve_chain(&m), vec![("x".to_string(), v4("1.2.3.4"), 9)]);
        // Depth bound: a chain of 9 hops reaches no address, 8 does.
        let mut recs: Vec<Record> = (0..9)
            .map(|i| cname(&format!("n{i}"), 60, &format!("n{}", i + 1)))
            .collect();
        recs.push(a("n9", 60, [5, 5, 5, 5]));
        assert!(resolve_chain(&answer("n0", 0, recs.clone())).is_empty());
        assert_eq!(resolve_chain(&answer("n1", 0, recs)).len(), 1);
        // Not NOERROR, or not a response: nothing.
        assert!(
            resolve_chain(&answer("q", RCODE_SERVFAIL, vec![a("q", 1, [1, 1, 1, 1])])).is_empty()
        );
        let mut m = answer("q", 0, vec![a("q", 1, [1, 1, 1, 1])]);
        m.is_response = false;
        assert!(resolve_chain(&m).is_empty());
    }

    #[test]
    fn name_matching() {
        assert!(name_matches("*.sfu.whereby.com", "a.sfu.whereby.com"));
        assert!(name_matches("*.sfu.whereby.com", "a.b.sfu.whereby.com"));
        assert!(!name_matches("*.sfu.whereby.com", "sfu.whereby.com"));
        assert!(!name_matches("*.sfu.whereby.com", "asfu.whereby.com"));
        assert!(!name_matches("*.sfu.whereby.com", ".sfu.whereby.com"));
        assert!(name_matches("*.SFU.whereby.com.", "A.sfu.Whereby.COM."));
        assert!(name_matches(
            "media.sfu.whereby.com",
            "MEDIA.sfu.whereby.com."
        ));
        assert!(name_matches(
            "media.sfu.whereby.com.",
            "media.sfu.whereby.com"
        ));
        assert!(!name_matches(
            "media.sfu.whereby.com",
            "x.media.sfu.whereby.com"
        ));
        assert!(!name_matches("", ""));
        assert!(!name_matches("*.", "a."));
        assert!(name_matches("*", "*"));
        assert!(!name_matches("*", "a"));
        assert!(!name_matches("a*.example", "ab.example"));
        // Multi-byte input never panics on a char boundary.
        assert!(!name_matches("*.é", "aé"));
        assert!(name_matches("*.é", "a.é"));
    }
}
