//! DNS messages (RFC 1035): queries, and answers with A/AAAA records, directly or
//! through one CNAME. Names go on the wire uncompressed in the question; answer owners
//! are compression pointers.

use std::net::IpAddr;

pub const TYPE_A: u16 = 1;
pub const TYPE_CNAME: u16 = 5;
pub const TYPE_AAAA: u16 = 28;

/// A name in wire form (uncompressed; a trailing dot is ignored).
pub fn encode_name(name: &str) -> Vec<u8> {
    let mut v = Vec::new();
    for l in name.trim_end_matches('.').split('.') {
        v.push(l.len() as u8);
        v.extend_from_slice(l.as_bytes());
    }
    v.push(0);
    v
}

/// A query for `name` (`qtype`, class IN) with message id `id`, recursion desired.
pub fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut m = id.to_be_bytes().to_vec();
    m.extend([0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    m.extend(encode_name(name));
    m.extend(qtype.to_be_bytes());
    m.extend([0, 1]);
    m
}

/// An answer with id `id` to a question for `name` (A, or AAAA if the first address is
/// IPv6): one record per address, owned by the question name (compressed), `ttl` seconds.
pub fn answer(id: u16, name: &str, addrs: &[IpAddr], ttl: u32) -> Vec<u8> {
    answer_through(id, name, None, addrs, ttl)
}

/// [`answer`], through `cname` if given: `name` CNAME `cname` first, then the addresses
/// owned by `cname` (each owner compressed), all with `ttl`.
pub fn answer_through(
    id: u16,
    name: &str,
    cname: Option<&str>,
    addrs: &[IpAddr],
    ttl: u32,
) -> Vec<u8> {
    let qtype = match addrs.first() {
        Some(IpAddr::V6(_)) => TYPE_AAAA,
        _ => TYPE_A,
    };
    let q = query(id, name, qtype);
    answer_to_through(&q, cname, addrs, ttl).expect("a question built here")
}

/// The answer to `query` (its id and question, which must be uncompressed): `addrs`,
/// owned by the question name, `ttl` seconds; `None` if `query` holds no question.
pub fn answer_to(query: &[u8], addrs: &[IpAddr], ttl: u32) -> Option<Vec<u8>> {
    answer_to_through(query, None, addrs, ttl)
}

/// [`answer_to`], through `cname` if given (as [`answer_through`]).
pub fn answer_to_through(
    query: &[u8],
    cname: Option<&str>,
    addrs: &[IpAddr],
    ttl: u32,
) -> Option<Vec<u8>> {
    let mut end = 12;
    loop {
        let len = usize::from(*query.get(end)?);
        if len & 0xc0 != 0 {
            return None;
        }
        end += 1 + len;
        if len == 0 {
            break;
        }
    }
    let question = query.get(12..end + 4)?;
    let records = addrs.len() + usize::from(cname.is_some());
    let mut m = vec![query[0], query[1], 0x81, 0x80, 0, 1];
    m.extend((records as u16).to_be_bytes());
    m.extend([0, 0, 0, 0]);
    m.extend_from_slice(question);
    // The question name, at offset 12.
    let mut owner = [0xc0, 12];
    if let Some(target) = cname {
        m.extend(owner);
        m.extend(TYPE_CNAME.to_be_bytes());
        m.extend([0, 1]);
        m.extend(ttl.to_be_bytes());
        let target = encode_name(target);
        m.extend((target.len() as u16).to_be_bytes());
        owner = [0xc0 | (m.len() >> 8) as u8, m.len() as u8];
        m.extend(target);
    }
    for a in addrs {
        m.extend(owner);
        let (rtype, data) = match a {
            IpAddr::V4(a) => (TYPE_A, a.octets().to_vec()),
            IpAddr::V6(a) => (TYPE_AAAA, a.octets().to_vec()),
        };
        m.extend(rtype.to_be_bytes());
        m.extend([0, 1]);
        m.extend(ttl.to_be_bytes());
        m.extend((data.len() as u16).to_be_bytes());
        m.extend(data);
    }
    Some(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shaper_user::dnswire::{self, RData};
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn answers_parse_as_the_daemon_reads_them() {
        let v4 = Ipv4Addr::new(192, 0, 2, 1);
        let a = dnswire::parse_udp(&answer(7, "media.example.test", &[v4.into()], 60))
            .expect("an answer");
        assert_eq!((a.id, a.is_response, a.answers.len()), (7, true, 1));
        assert_eq!(a.answers[0].name, "media.example.test");
        assert_eq!((a.answers[0].ttl, &a.answers[0].data), (60, &RData::A(v4)));

        let v6 = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
        let m = answer_through(
            9,
            "m.sfu.example.test",
            Some("edge.cdn.example.net"),
            &[v6.into()],
            30,
        );
        let a = dnswire::parse_udp(&m).expect("an answer through a CNAME");
        assert_eq!(a.question.as_ref().map(|q| q.qtype), Some(TYPE_AAAA));
        assert_eq!(
            a.answers[0].data,
            RData::Cname("edge.cdn.example.net".into())
        );
        assert_eq!(a.answers[1].name, "edge.cdn.example.net");
        assert_eq!(a.answers[1].data, RData::Aaaa(v6));
        // The query it answers is the one `query` builds.
        assert_eq!(
            dnswire::query_of(&m),
            Some(query(9, "m.sfu.example.test", TYPE_AAAA))
        );
    }

    #[test]
    fn no_question_no_answer() {
        assert_eq!(answer_to(&[0; 12], &[], 60), None);
        assert_eq!(encode_name("a.bc."), vec![1, b'a', 2, b'b', b'c', 0]);
    }
}
