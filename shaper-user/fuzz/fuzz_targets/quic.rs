//! Fuzzes the QUIC Initial decryption and ClientHello reassembly (shaper-core's
//! `quic`, with `sni` under it) and checks the invariants callers rely on.
//!
//! The input is used twice. First as a UDP datagram (which gets past the AEAD only
//! for the seed captures). Then, to reach what lies behind the AEAD, as plaintext
//! sealed into two client Initials with `seal_client_initial`:
//! * an input that starts like a TLS handshake record (22) is taken as TLS records
//!   (the `sni` target's input, seeded with tests/fixtures/tls): their handshake bytes
//!   go into CRYPTO frames split over two Initials, and the assembler's answer must
//!   be the TLS parser's answer for the records;
//! * any other input is a control byte (version, split point) and the frames of the
//!   two Initials, for the frame walker and the assembler.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shaper_core::{quic, sni};

use quic::{HelloAssembler, InitialCrypto, QuicSniError};
use sni::Sni;

/// An answer the assembler may give, and what callers may assume of it.
fn check_answer(r: &Result<Sni, QuicSniError>) {
    match r {
        Ok(Sni::Found { name, .. }) => {
            assert!(
                !name.is_empty() && name.len() <= 253,
                "length {}",
                name.len()
            );
            assert!(!name.bytes().any(|b| b.is_ascii_uppercase()), "{name:?}");
            assert!(name.bytes().all(|b| (0x21..=0x7e).contains(&b)));
            assert!(!name.ends_with('.') && !name.starts_with('.') && !name.contains(".."));
        }
        Ok(Sni::NeedMore(n)) => assert!(*n > 0 && *n <= quic::MAX_HELLO_LEN),
        Ok(Sni::Absent { .. }) => {}
        Err(e) => assert!(!matches!(
            e,
            QuicSniError::Header(_) | QuicSniError::Decrypt
        )),
    }
}

fn check_initial(ic: &InitialCrypto, datagram: &[u8]) {
    assert!(ic.packet_len <= datagram.len());
    assert_eq!(ic.header.datagram_len, datagram.len());
    assert!(ic.header.dcid.len() <= sni::MAX_CID_LEN);
    assert!(ic.packet_number < 1 << 32);
    for f in &ic.fragments {
        assert!(!f.data.is_empty());
        assert!(f.offset + (f.data.len() as u64) < 1 << 62);
    }
}

/// A CRYPTO frame with 4-byte varints for offset and length.
fn crypto_frame(offset: usize, data: &[u8]) -> Vec<u8> {
    let mut f = vec![0x06];
    f.extend_from_slice(&(0x8000_0000 | offset as u32).to_be_bytes());
    f.extend_from_slice(&(0x8000_0000 | data.len() as u32).to_be_bytes());
    f.extend_from_slice(data);
    f
}

/// The handshake bytes of well-formed TLS handshake records (complete, as many as
/// there are); `None` if any record is not.
fn handshake_bytes(mut records: &[u8]) -> Option<Vec<u8>> {
    let mut hs = Vec::new();
    while !records.is_empty() {
        let [22, 3, minor, hi, lo, ..] = *records else {
            return None;
        };
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        if minor > 4 || len == 0 || len > sni::MAX_RECORD_LEN {
            return None;
        }
        hs.extend_from_slice(records.get(5..5 + len)?);
        records = &records[5 + len..];
    }
    Some(hs)
}

/// The same ClientHello in TLS records and in QUIC Initials gives the same answer.
fn same_as_tls(records: &[u8]) {
    let Some(hs) = handshake_bytes(records) else {
        return;
    };
    let tls = sni::client_hello_sni(records);
    let dcid = [1, 2, 3, 4, 5, 6, 7, 8];
    let split = hs.len() / 2;
    let mut a = HelloAssembler::new();
    let mut quic = Ok(Sni::NeedMore(1));
    // The second half first: nothing from offset 0 until the first arrives.
    for (pn, offset, part) in [(1, split, &hs[split..]), (0, 0, &hs[..split])] {
        let p =
            quic::seal_client_initial(sni::QUIC_V1, &dcid, &[], pn, &crypto_frame(offset, part))
                .expect("a ClientHello of at most 16 KiB fits an Initial");
        quic = a.push_datagram(&p);
        check_answer(&quic);
    }
    let total = hs
        .get(1..4)
        .map(|l| 4 + (usize::from(l[0]) << 16 | usize::from(l[1]) << 8 | usize::from(l[2])));
    match (&tls, &quic) {
        // Beyond the assembler's bound the TLS parser may still read the name.
        (_, Err(QuicSniError::HelloTooLarge(n))) => assert!(*n > quic::MAX_HELLO_LEN),
        (Ok(Sni::NeedMore(_)), Ok(Sni::NeedMore(_))) => {}
        (Err(e), Err(QuicSniError::Tls(q))) => assert_eq!(e, q),
        _ => assert_eq!(
            tls.clone().map_err(QuicSniError::Tls),
            quic,
            "total {total:?}"
        ),
    }
}

fuzz_target!(|data: &[u8]| {
    // 1. The input as a datagram.
    if let Ok(ic) = quic::initial_crypto(data) {
        check_initial(&ic, data);
        check_answer(&HelloAssembler::new().push(&ic));
    }

    // 2. TLS records, through QUIC.
    if data.first() == Some(&22) {
        same_as_tls(data);
        return;
    }

    // 3. The input as the frames of two Initials of one connection.
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let version = if ctl & 1 == 0 {
        sni::QUIC_V1
    } else {
        sni::QUIC_V2
    };
    let split = usize::from(ctl >> 1) * rest.len() / 128;
    let (f1, f2) = rest.split_at(split);
    let dcid = [0x83, 0x94, 0xc8, 0xf0, 0x3e, 0x51, 0x57, 0x08];
    let mut packets = Vec::new();
    for (pn, frames) in [(0, f1), (1, f2)] {
        let Ok(p) = quic::seal_client_initial(version, &dcid, &[7; 4], pn, frames) else {
            // Only frames too long for a 2-byte Length are refused.
            assert!(frames.len() + 20 >= 1 << 14);
            return;
        };
        // What was sealed always decrypts; the frames may be malformed.
        match quic::initial_crypto(&p) {
            Ok(ic) => {
                check_initial(&ic, &p);
                assert_eq!(ic.packet_number, u64::from(pn));
                assert_eq!(ic.packet_len, p.len());
                packets.push(ic);
            }
            Err(QuicSniError::Malformed(_)) => {}
            Err(e) => panic!("sealed Initial gave {e:?}"),
        }
    }
    let mut forward = HelloAssembler::new();
    let mut answers = Vec::new();
    for ic in &packets {
        let r = forward.push(ic);
        check_answer(&r);
        answers.push(r);
        assert_eq!(forward.dcid(), Some(dcid.as_slice()));
    }
    // Bytes once received never change: a name found stays the name (or the
    // bytes after it turn out malformed).
    if let [Ok(Sni::Found { name: a, .. }), later] = answers.as_slice() {
        if let Ok(Sni::Found { name: b, .. }) = later {
            assert_eq!(a, b);
        }
    }
    // Which bytes arrived does not depend on the order.
    let mut backward = HelloAssembler::new();
    for ic in packets.iter().rev() {
        check_answer(&backward.push(ic));
    }
    assert_eq!(forward.contiguous_len(), backward.contiguous_len());
    assert!(forward.contiguous_len() <= quic::MAX_HELLO_LEN);
});
