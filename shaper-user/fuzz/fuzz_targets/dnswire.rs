//! Fuzzes the DNS parser (shaper-core's `dnswire`) and checks the invariants callers
//! rely on.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shaper_core::dnswire;

use dnswire::{DnsAnswer, RData};

fn check_name(name: &str) {
    assert!(name.len() <= 253, "name too long: {}", name.len());
    assert!(
        !name.bytes().any(|b| b.is_ascii_uppercase()),
        "uppercase in {name:?}"
    );
    assert!(
        name.bytes().all(|b| (0x21..=0x7e).contains(&b)),
        "bad byte in {name:?}"
    );
    if !name.is_empty() {
        assert!(!name.ends_with('.') && !name.starts_with('.') && !name.contains(".."));
        assert!(
            name.split('.').all(|l| l.len() <= 63),
            "label too long in {name:?}"
        );
        // The matcher agrees with itself on parsed names.
        assert!(dnswire::name_matches(name, name));
        assert!(dnswire::name_matches(&name.to_ascii_uppercase(), name));
        assert!(dnswire::name_matches(&format!("{name}."), name));
        if let Some((_, parent)) = name.split_once('.') {
            assert!(dnswire::name_matches(&format!("*.{parent}"), name));
            assert!(!dnswire::name_matches(&format!("*.{name}"), name));
        }
    }
}

fn check(m: &DnsAnswer) {
    if let Some(q) = &m.question {
        check_name(&q.name);
    }
    assert!(m.rcode < 16 && m.opcode < 16);
    for r in &m.answers {
        check_name(&r.name);
        assert!(r.ttl <= i32::MAX as u32);
        if let RData::Cname(t) = &r.data {
            check_name(t);
        }
    }
    let addrs = m
        .answers
        .iter()
        .filter(|r| !matches!(r.data, RData::Cname(_)))
        .count();
    let chain = dnswire::resolve_chain(m);
    assert!(
        chain.len() <= addrs,
        "{} entries from {addrs} address records",
        chain.len()
    );
    assert!(chain.len() <= m.answers.len());
    for (name, _, ttl) in &chain {
        assert_eq!(Some(name), m.question.as_ref().map(|q| &q.name));
        assert!(*ttl <= i32::MAX as u32);
    }
    let names = dnswire::chain_names(m);
    assert!(names.len() <= dnswire::MAX_CHAIN_DEPTH + 1);
    for n in &names {
        check_name(n);
    }
}

fuzz_target!(|data: &[u8]| {
    let udp = dnswire::parse_udp(data);
    if let Ok(m) = &udp {
        check(m);
        // A prefix parses to an error or to the same message (only the unparsed
        // authority/additional sections can be cut without notice).
        for cut in [data.len() / 2, data.len().saturating_sub(1)] {
            if let Ok(p) = dnswire::parse_udp(&data[..cut]) {
                assert_eq!(&p, m, "prefix {cut} parsed differently");
            }
        }
    }
    // The TCP form of the same bytes is the same message.
    if data.len() <= usize::from(u16::MAX) {
        let mut framed = (data.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(data);
        let tcp = dnswire::parse_tcp(&framed);
        if !data.is_empty() {
            assert_eq!(tcp, udp);
        }
    }
    // The raw input as a TCP stream chunk.
    if let Ok(m) = dnswire::parse_tcp(data) {
        check(&m);
    }
    // The matcher never panics on arbitrary text.
    let text = String::from_utf8_lossy(data);
    if let Some((pattern, name)) = text.split_once('\n') {
        let _ = dnswire::name_matches(pattern, name);
    }
});
