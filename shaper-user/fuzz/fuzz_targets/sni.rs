//! Fuzzes the TLS SNI and QUIC Initial parsers (shaper-core's `sni`) and checks the
//! invariants callers rely on.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shaper_core::sni;

use sni::Sni;

fuzz_target!(|data: &[u8]| {
    let r = sni::client_hello_sni(data);
    match &r {
        Ok(Sni::Found { name, .. }) => {
            assert!(
                !name.is_empty() && name.len() <= 253,
                "length {}",
                name.len()
            );
            assert!(
                !name.bytes().any(|b| b.is_ascii_uppercase()),
                "uppercase in {name:?}"
            );
            assert!(name.bytes().all(|b| (0x21..=0x7e).contains(&b)));
            assert!(!name.ends_with('.') && !name.starts_with('.') && !name.contains(".."));
        }
        Ok(Sni::NeedMore(n)) => assert!(*n > 0),
        Ok(Sni::Absent { .. }) | Err(_) => {}
    }
    // Prefixes of a hello whose SNI was found never contradict it: they find the same
    // name or ask for more bytes.
    if let Ok(Sni::Found { name, .. }) = &r {
        for cut in [data.len() / 2, data.len().saturating_sub(1)] {
            match sni::client_hello_sni(&data[..cut]) {
                Ok(Sni::NeedMore(_)) => {}
                Ok(Sni::Found { name: n, .. }) => assert_eq!(&n, name),
                other => panic!("prefix {cut} of a Found hello gave {other:?}"),
            }
        }
    }
    if let Ok(q) = sni::quic_initial(data) {
        assert!(q.dcid.len() <= sni::MAX_CID_LEN && q.scid.len() <= sni::MAX_CID_LEN);
        assert!(q.payload_len <= q.datagram_len && q.token_len <= q.datagram_len);
        assert_eq!(q.datagram_len, data.len());
    }
});
