//! The handshakes the host-name engine reads: TLS ClientHellos (a TCP segment's payload)
//! and UDP shaped like QUIC client Initials.

use crate::rng::Rng;

/// A TLS 1.2/1.3-style ClientHello record: `random` (32 bytes), `session_id`, three
/// cipher suites, the server name extension with `sni` (if any), supported_versions
/// (TLS 1.3, 1.2), then a padding extension of `padding` zero bytes.
pub fn client_hello(
    sni: Option<&str>,
    random: &[u8],
    session_id: &[u8],
    padding: usize,
) -> Vec<u8> {
    assert_eq!(random.len(), 32, "a ClientHello's random is 32 bytes");
    assert!(session_id.len() <= 32, "a session id is at most 32 bytes");
    let mut ext = Vec::new();
    if let Some(name) = sni {
        let n = name.as_bytes();
        ext.extend([0, 0]);
        ext.extend(((n.len() + 5) as u16).to_be_bytes());
        ext.extend(((n.len() + 3) as u16).to_be_bytes());
        ext.push(0);
        ext.extend((n.len() as u16).to_be_bytes());
        ext.extend(n);
    }
    ext.extend([0, 0x2b, 0, 5, 4, 3, 4, 3, 3]);
    ext.extend([0, 0x15]);
    ext.extend((padding as u16).to_be_bytes());
    ext.extend(std::iter::repeat_n(0, padding));
    let mut body = vec![3, 3];
    body.extend(random);
    body.push(session_id.len() as u8);
    body.extend(session_id);
    body.extend([0, 6, 0x13, 0x01, 0x13, 0x02, 0xc0, 0x2f, 1, 0]);
    body.extend((ext.len() as u16).to_be_bytes());
    body.extend(ext);
    let mut hs = vec![1];
    hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend(body);
    let mut rec = vec![0x16, 3, 1];
    rec.extend((hs.len() as u16).to_be_bytes());
    rec.extend(hs);
    rec
}

/// A UDP datagram shaped like a QUIC v1 client Initial (long header, Initial type, an
/// 8-byte destination connection id from `seed`, 1,200 bytes): the classifier hands it
/// to user space, which derives the connection's keys and fails to open it. The rest is
/// [`Rng::xorshift64`] bytes from `seed | 1`.
pub fn fake_quic_initial(seed: u64) -> Vec<u8> {
    let mut p = vec![0xc3, 0, 0, 0, 1, 8];
    p.extend(seed.to_be_bytes());
    // No source connection id, no token, a 2-byte length for the rest.
    p.extend([0, 0]);
    let len = 1200 - p.len() - 2;
    p.extend((0x4000 | len as u16).to_be_bytes());
    let mut rng = Rng::xorshift64(seed | 1);
    while p.len() < 1200 {
        p.push(rng.byte());
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use shaper_user::sni::{client_hello_sni, Sni};

    #[test]
    fn hellos_parse_as_the_daemon_reads_them() {
        let h = client_hello(Some("pacs.example.nhs.uk"), &[7; 32], &[1; 32], 100);
        let name = "pacs.example.nhs.uk".to_string();
        assert_eq!(client_hello_sni(&h), Ok(Sni::Found { name, ech: false }));
        let h = client_hello(None, &[7; 32], &[], 0);
        assert_eq!(client_hello_sni(&h), Ok(Sni::Absent { ech: false }));
    }

    #[test]
    fn quic_initials_are_1200_bytes_with_their_seed() {
        let p = fake_quic_initial(42);
        assert_eq!(p.len(), 1200);
        assert_eq!(&p[6..14], &42u64.to_be_bytes());
        // The tail is the xorshift64 sequence from 43, as before it moved here.
        let mut x = 43u64;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        assert_eq!(p[18], x as u8);
    }
}
