use super::*;
use crate::testkit::dns::{self, TYPE_A};
use crate::testkit::{self, parse_policy};
use std::net::Ipv4Addr;

#[derive(Default)]
struct Fake {
    bitmaps: HashMap<u32, Vec<u64>>,
    addrs: HashMap<IpAddr, u32>,
    flows: HashMap<HostKey, HostVal>,
}

impl Kernel for &mut Fake {
    fn write_bitmap(&mut self, slot: u32, words: &[u64]) -> Result<()> {
        self.bitmaps.insert(slot, words.to_vec());
        Ok(())
    }
    fn set_addr(&mut self, addr: IpAddr, id: u32) -> Result<()> {
        self.addrs.insert(addr, id);
        Ok(())
    }
    fn del_addr(&mut self, addr: IpAddr) -> Result<()> {
        self.addrs.remove(&addr);
        Ok(())
    }
    fn set_host_flow(&mut self, key: &HostKey, val: HostVal) -> Result<()> {
        self.flows.insert(*key, val);
        Ok(())
    }
    fn del_host_flow(&mut self, key: &HostKey) -> Result<()> {
        self.flows.remove(key);
        Ok(())
    }
}

const BASE: &str = concat!(
    testkit::links_toml!(),
    r#"[[class]]
name = "video"
priority = 0
guaranteed = "30%"
[[class]]
name = "bulk"
priority = 2
guaranteed = "10%"
[[class]]
name = "web"
priority = 1
guaranteed = "10%"
default = true
"#
);

fn plan(rules: &str) -> Plan {
    compile::plan(&parse_policy("t.toml", &format!("{BASE}{rules}")), None)
}

/// A DNS answer (id 0x1234): `name` CNAME `target`, `target` A `addr`, TTLs given.
fn answer(name: &str, target: &str, addr: [u8; 4], ttl: u32) -> Vec<u8> {
    dns::answer_through_uncompressed(0x1234, name, target, addr, ttl)
}

fn v4key(src: [u8; 4], dst: [u8; 4], sport: u32, dport: u32, proto: u8) -> HostKey {
    let mut k = HostKey {
        sport,
        dport,
        proto,
        family: 4,
        ..Default::default()
    };
    k.src[..4].copy_from_slice(&src);
    k.dst[..4].copy_from_slice(&dst);
    k
}

/// `client` port 40000 asking 192.0.2.53 port 53 (as the classifier keys both
/// the query and its answer).
fn dns_key(client: [u8; 4]) -> HostKey {
    v4key(client, [192, 0, 2, 53], 40_000, 53, 17)
}

const CLIENT: [u8; 4] = [192, 168, 1, 10];

fn ask(e: &mut Engine<impl Kernel>, now: Instant, key: HostKey, id: u16, name: &str) {
    e.on_event(
        now,
        &event_bytes(EV_DNS_QUERY, DIR_UP, key, &dns::query(id, name, TYPE_A)),
    );
}

fn reply(e: &mut Engine<impl Kernel>, now: Instant, key: HostKey, answer: &[u8]) {
    e.on_event(now, &event_bytes(EV_DNS, DIR_DOWN, key, answer));
}

/// The query for `name` going out from [`CLIENT`], then `answer` coming back.
fn asked_and_answered(e: &mut Engine<impl Kernel>, now: Instant, name: &str, answer: &[u8]) {
    ask(e, now, dns_key(CLIENT), 0x1234, name);
    reply(e, now, dns_key(CLIENT), answer);
}

#[test]
fn a_dns_answer_installs_its_addresses_with_the_host_rules_bits_and_they_expire() {
    let p = plan(
        "[[rule]]\nname = \"wb\"\nclass = \"video\"\ndns_names = [\"*.sfu.whereby.com\"]\n\
         [[rule]]\nname = \"net\"\nclass = \"bulk\"\ndst_cidrs = [\"192.0.2.0/24\"]\n",
    );
    let mut fake = Fake::default();
    let mut e = Engine::new(&p, &mut fake);
    let t0 = Instant::now();
    // media.sfu.whereby.com CNAME edge.example.net A 192.0.2.7, TTL 30 s.
    let ans = answer(
        "media.sfu.whereby.com",
        "edge.example.net",
        [192, 0, 2, 7],
        30,
    );
    asked_and_answered(&mut e, t0, "media.sfu.whereby.com", &ans);
    assert_eq!(e.stats.dns_answers, 1);
    let addr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));
    assert!(e.table.has(addr, 0), "learned for rule 0");
    drop(e);
    let id = fake.addrs[&addr];
    let words = &fake.bitmaps[&id];
    // Both the host rule (0) and the covering /24's rule (1) accept it.
    assert_eq!(words[0] & 0b11, 0b11, "{words:?}");
    // TTL 30 s is raised to min_ttl 60 s; gone after.
    let mut e = Engine::new(&p, &mut fake);
    asked_and_answered(&mut e, t0, "media.sfu.whereby.com", &ans);
    e.tick(t0 + Duration::from_secs(59));
    assert!(e.table.has(addr, 0));
    e.tick(t0 + Duration::from_secs(61));
    assert!(!e.table.has(addr, 0));
    drop(e);
    assert!(!fake.addrs.contains_key(&addr), "removed from the trie");
}

#[test]
fn a_rule_naming_a_cname_target_learns_and_keeps_it_across_a_reload() {
    let p =
        plan("[[rule]]\nname = \"cdn\"\nclass = \"bulk\"\ndns_names = [\"edge.example.net\"]\n");
    let mut fake = Fake::default();
    let mut e = Engine::new(&p, &mut fake);
    let t0 = Instant::now();
    let ans = answer(
        "media.sfu.whereby.com",
        "edge.example.net",
        [192, 0, 2, 9],
        600,
    );
    asked_and_answered(&mut e, t0, "media.sfu.whereby.com", &ans);
    let addr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 9));
    assert!(e.table.has(addr, 0));
    assert_eq!(e.snapshot(t0).learned[0].name, "edge.example.net");
    let old = std::mem::take(&mut e.table);
    drop(e);
    // The reloaded policy has the rule at another rank.
    let p2 = plan(
        "[[rule]]\nname = \"x\"\nclass = \"video\"\nprotocol = \"udp\"\ndst_ports = [1]\n\
         [[rule]]\nname = \"cdn\"\nclass = \"bulk\"\ndns_names = [\"edge.example.net\"]\n",
    );
    let mut e = Engine::new(&p2, &mut fake);
    e.carry_over(t0 + Duration::from_secs(10), &old);
    assert!(e.table.has(addr, 1), "carried over to the rule's new rank");
}

#[test]
fn names_that_no_rule_wants_are_not_installed() {
    let p =
        plan("[[rule]]\nname = \"wb\"\nclass = \"video\"\ndns_names = [\"*.sfu.whereby.com\"]\n");
    let mut fake = Fake::default();
    let mut e = Engine::new(&p, &mut fake);
    asked_and_answered(
        &mut e,
        Instant::now(),
        "www.example.com",
        &answer("www.example.com", "x.example.net", [198, 51, 100, 1], 300),
    );
    assert_eq!(e.stats.dns_answers, 1);
    assert!(e.table.is_empty());
    drop(e);
    assert!(fake.addrs.is_empty());
}

#[test]
fn the_table_is_bounded_and_the_client_holding_most_makes_room() {
    let mut t = Table::new(DnsSettings {
        min_ttl_s: 1,
        max_ttl_s: 100_000,
        max_entries: 4,
        ..Default::default()
    });
    let now = Instant::now();
    let a = |n| IpAddr::V4(Ipv4Addr::new(10, 0, 0, n));
    let (real, flood) = (a(200), a(201));
    // The real client's short-lived entries, then a flood of long-lived ones
    // from another client.
    t.learn(now, real, a(1), 0, "a", 100);
    t.learn(now, real, a(2), 0, "b", 10);
    for n in 10..60 {
        t.learn(now, flood, a(n), 0, "forged", 86_400);
        t.check();
    }
    assert_eq!(t.len(), 4);
    assert!(t.has(a(1), 0) && t.has(a(2), 0), "the real entries held");
    assert_eq!((t.held_by(real), t.held_by(flood)), (2, 2));
    assert!(t.has(a(59), 0) && t.has(a(58), 0) && !t.has(a(57), 0));
    // With one client, the least recently answered makes room (not the
    // soonest to expire), and a new answer refreshes.
    let mut t = Table::new(DnsSettings {
        max_entries: 2,
        min_ttl_s: 1,
        max_ttl_s: 1000,
        ..Default::default()
    });
    t.learn(now, real, a(1), 0, "a", 100);
    t.learn(now, real, a(2), 0, "b", 10);
    t.learn(now, real, a(1), 0, "a", 100);
    let changed = t.learn(now, real, a(3), 0, "c", 50);
    assert!(
        changed.contains(&a(2)) && changed.contains(&a(3)),
        "{changed:?}"
    );
    assert!(t.has(a(1), 0) && t.has(a(3), 0) && !t.has(a(2), 0));
    t.check();
    assert_eq!(t.expire(now + Duration::from_secs(60)), vec![a(3)]);
    assert_eq!(t.expire(now + Duration::from_secs(100)), vec![a(1)]);
    assert!(t.is_empty());
    t.check();
}

#[test]
fn answers_count_only_when_they_answer_a_query_that_went_out() {
    let p =
        plan("[[rule]]\nname = \"wb\"\nclass = \"video\"\ndns_names = [\"*.sfu.whereby.com\"]\n");
    let mut fake = Fake::default();
    let mut e = Engine::new(&p, &mut fake);
    let t0 = Instant::now();
    let name = "media.sfu.whereby.com";
    let ans = |n: u8| answer(name, "edge.example.net", [192, 0, 2, n], 300);
    let has = |e: &Engine<&mut Fake>, n: u8| e.table.has(IpAddr::from([192, 0, 2, n]), 0);
    // Unsolicited.
    reply(&mut e, t0, dns_key(CLIENT), &ans(1));
    assert!(!has(&e, 1));
    // Asked from another port, or of another server, or another question.
    ask(
        &mut e,
        t0,
        v4key(CLIENT, [192, 0, 2, 53], 40_001, 53, 17),
        0x1234,
        name,
    );
    ask(
        &mut e,
        t0,
        v4key(CLIENT, [198, 51, 100, 53], 40_000, 53, 17),
        0x1234,
        name,
    );
    ask(&mut e, t0, dns_key(CLIENT), 0x1234, "other.sfu.whereby.com");
    reply(&mut e, t0, dns_key(CLIENT), &ans(2));
    assert!(!has(&e, 2));
    // Asked, answered: learned; the same answer again teaches nothing more.
    ask(&mut e, t0, dns_key(CLIENT), 0x1234, name);
    reply(&mut e, t0, dns_key(CLIENT), &ans(3));
    reply(&mut e, t0, dns_key(CLIENT), &ans(4));
    assert!(has(&e, 3) && !has(&e, 4));
    // Too late.
    ask(&mut e, t0, dns_key(CLIENT), 0x1234, name);
    reply(
        &mut e,
        t0 + Duration::from_secs(6),
        dns_key(CLIENT),
        &ans(5),
    );
    assert!(!has(&e, 5));
    // Expired by the tick.
    ask(&mut e, t0, dns_key(CLIENT), 0x1234, name);
    e.tick(t0 + Duration::from_secs(6));
    reply(
        &mut e,
        t0 + Duration::from_secs(6),
        dns_key(CLIENT),
        &ans(6),
    );
    assert!(!has(&e, 6));
    assert_eq!(e.stats.dns_answers, 6);
    assert_eq!(e.stats.dns_unmatched, 5);
    e.check();
}

#[test]
fn only_the_listed_resolvers_answers_count() {
    let p = plan(
        "[dns]\nresolvers = [\"192.0.2.53\"]\n\
         [[rule]]\nname = \"wb\"\nclass = \"video\"\ndns_names = [\"*.sfu.whereby.com\"]\n",
    );
    let mut fake = Fake::default();
    let mut e = Engine::new(&p, &mut fake);
    let t0 = Instant::now();
    let name = "media.sfu.whereby.com";
    let other = v4key(CLIENT, [198, 51, 100, 53], 40_000, 53, 17);
    ask(&mut e, t0, other, 0x1234, name);
    reply(
        &mut e,
        t0,
        other,
        &answer(name, "x.example.net", [192, 0, 2, 1], 300),
    );
    assert_eq!(e.stats.dns_other_resolver, 1);
    assert!(e.table.is_empty());
    ask(&mut e, t0, dns_key(CLIENT), 0x1234, name);
    reply(
        &mut e,
        t0,
        dns_key(CLIENT),
        &answer(name, "x.example.net", [192, 0, 2, 1], 300),
    );
    assert_eq!(e.table.len(), 1);
}

#[test]
fn an_answer_teaches_a_bounded_number_of_addresses() {
    let p =
        plan("[[rule]]\nname = \"wb\"\nclass = \"video\"\ndns_names = [\"*.sfu.whereby.com\"]\n");
    let mut fake = Fake::default();
    let mut e = Engine::new(&p, &mut fake);
    let name = "media.sfu.whereby.com";
    // 90 A records for the name, compressed.
    let mut m = dns::query(7, name, TYPE_A);
    m[2] = 0x81;
    m[3] = 0x80;
    m[7] = 90;
    for i in 0..90u8 {
        m.extend([0xc0, 12, 0, 1, 0, 1, 0, 0, 1, 0, 0, 4, 198, 18, 0, i]);
    }
    let now = Instant::now();
    ask(&mut e, now, dns_key(CLIENT), 7, name);
    reply(&mut e, now, dns_key(CLIENT), &m);
    assert_eq!(e.table.len(), MAX_ANSWER_ADDRS);
    assert_eq!(e.stats.dns_addresses_ignored, 90 - MAX_ANSWER_ADDRS as u64);
    e.check();
}

#[test]
fn a_flood_of_unfinished_hellos_does_not_block_a_real_one() {
    let p = plan(
        "[[rule]]\nname = \"pacs\"\nclass = \"video\"\ndns_names = [\"pacs.example.nhs.uk\"]\n",
    );
    // A ClientHello for pacs.example.nhs.uk split in two.
    let hello = fixture!("tls/openssl-default-sni.bin");
    let (first, second) = hello.split_at(40);
    let mut fake = Fake::default();
    let mut e = Engine::new(&p, &mut fake);
    let now = Instant::now();
    // Thousands of first halves from one host, and from many.
    for i in 0..2000u32 {
        let flood = v4key([192, 168, 1, 66], [203, 0, 113, 9], 10_000 + i, 443, 6);
        e.on_event(now, &event_bytes(EV_TLS, DIR_UP, flood, first));
        let many = v4key(
            [10, 9, (i >> 8) as u8, i as u8],
            [203, 0, 113, 9],
            2000,
            443,
            6,
        );
        e.on_event(now, &event_bytes(EV_TLS, DIR_UP, many, first));
    }
    e.check();
    assert!(e.stats.hellos_given_up >= 3500, "{:?}", e.stats);
    let real = v4key(CLIENT, [203, 0, 113, 5], 50_000, 443, 6);
    e.on_event(now, &event_bytes(EV_TLS, DIR_UP, real, first));
    e.on_event(now, &event_bytes(EV_TLS, DIR_UP, real, second));
    assert_eq!(e.stats.sni_decided, 1, "{:?}", e.stats);
    drop(e);
    assert_eq!(fake.flows[&real].flags, HOST_DECIDED);
}

#[test]
fn a_fair_queue_takes_clients_in_turn_and_the_flooder_sheds() {
    let ev =
        |client: u8, n: u8| event_bytes(EV_DNS_QUERY, DIR_UP, dns_key([192, 168, 1, client]), &[n]);
    let mut q = FairQueue::new(8, 6);
    // A flood from .66 fills its share; the rest of it is shed.
    let shed: usize = (0..10).filter_map(|n| q.push(ev(66, n))).count();
    assert_eq!((q.len(), shed), (6, 4));
    // Others still get in (the flooder's oldest make room once it is full).
    assert!(q.push(ev(10, 0)).is_none());
    assert!(q.push(ev(11, 0)).is_none());
    let gone = q.push(ev(12, 0)).expect("full: something is shed");
    assert_eq!(read_event(&gone).map(|(e, _)| e.key.src[3]), Some(66));
    q.check();
    // Taken in turn: the flooder's first, then each other client's, then the flooder's.
    let order: Vec<u8> = std::iter::from_fn(|| q.pop())
        .map(|e| read_event(&e).expect("event").0.key.src[3])
        .collect();
    assert_eq!(order, [66, 10, 11, 12, 66, 66, 66, 66]);
    assert!(q.is_empty());
    q.check();
}

#[test]
fn a_budget_allows_its_time_per_second() {
    let mut b = Budget::new(Duration::from_millis(300));
    let t0 = Instant::now();
    assert!(b.allows(t0));
    b.charge(Duration::from_millis(200));
    assert!(b.allows(t0 + Duration::from_millis(100)));
    b.charge(Duration::from_millis(100));
    assert!(!b.allows(t0 + Duration::from_millis(500)));
    assert!(b.allows(t0 + Duration::from_millis(1000)));
}

#[test]
fn an_event_header_is_the_same_for_every_size() {
    assert_eq!(std::mem::size_of::<EventOf<0>>(), EVENT_HEADER);
    let asked = dns::query(1, "a.b", TYPE_A);
    let q = event_bytes(EV_DNS_QUERY, DIR_UP, dns_key(CLIENT), &asked);
    assert_eq!(q.len(), EVENT_HEADER + shaper_common::DNS_QUERY_DATA);
    let (ev, data) = read_event(&q).expect("event");
    assert_eq!((ev.kind, ev.key), (EV_DNS_QUERY, dns_key(CLIENT)));
    assert_eq!(data, asked);
    assert!(read_event(&q[..EVENT_HEADER - 1]).is_none());
}

#[test]
fn a_quic_hello_over_two_initials_is_put_together_and_decides() {
    let p = plan(
        "[[rule]]\nname = \"pacs\"\nclass = \"video\"\ndns_names = [\"pacs.example.nhs.uk\"]\n",
    );
    let first = fixture!("quic/quic-ffdhe8192-gtlsclient-1.bin");
    let second = fixture!("quic/quic-ffdhe8192-gtlsclient-2.bin");
    let key = HostKey {
        src: [192, 168, 1, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        dst: [203, 0, 113, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        sport: 50_000,
        dport: 443,
        proto: 17,
        family: 4,
        _pad: [0; 2],
    };
    let ev = |data: &[u8]| event_bytes(EV_TLS, 0, key, data);
    let mut fake = Fake::default();
    let mut e = Engine::new(&p, &mut fake);
    let now = Instant::now();
    e.on_event(now, &ev(first));
    assert_eq!(e.stats.quic_initials, 1);
    assert_eq!(e.stats.sni_decided, 0, "the name is in the second Initial");
    e.on_event(now, &ev(second));
    assert_eq!(e.stats.quic_initials_joined, 1);
    assert_eq!(e.stats.sni_decided, 1, "{:?}", e.stats);
    drop(e);
    let v = fake.flows[&key];
    assert_eq!((v.rule, v.class, v.flags), (0, 0, HOST_DECIDED));
}

#[test]
fn a_server_name_decides_a_connection_only_when_its_rule_wins() {
    let p = plan(
        "[[rule]]\nname = \"dicom\"\nclass = \"bulk\"\nprotocol = \"tcp\"\ndst_ports = [104]\n\
         [[rule]]\nname = \"pacs\"\nclass = \"video\"\ndns_names = [\"pacs.example.nhs.uk\"]\n",
    );
    let mut fake = Fake::default();
    let e = Engine::new(&p, &mut fake);
    let view = |dport| PacketView {
        dir: crate::dir::Dir::Up,
        proto: 6,
        dscp: 0,
        sport: Some(40000),
        dport: Some(dport),
        src: IpAddr::V4(Ipv4Addr::new(192, 168, 1, 10)),
        dst: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 5)),
    };
    assert_eq!(e.sni_rule(&view(443), "pacs.example.nhs.uk"), Some(1));
    assert_eq!(e.sni_rule(&view(443), "other.example"), None);
    // The earlier rule matches the connection anyway: the name changes nothing.
    assert_eq!(e.sni_rule(&view(104), "pacs.example.nhs.uk"), None);
}
