//! Fuzzes the daemon's host-name engine (shaper-core's `hosts`, with the policy,
//! compile, DNS, TLS and QUIC modules it uses) over sequences of events: DNS
//! queries going out and answers coming back (built from the input, or the input's
//! bytes as the payload), whole events of any kind, ClientHello segments and QUIC
//! Initials, the clock moving on and ticks, events shed over budget, and events of a
//! few clients through the daemon's fair queue (`FairQueue`).
//!
//! Besides "no panic", after every step: the engine's own bookkeeping agrees
//! (`Engine::check`: the table's expiry, per-client and holder indexes, the bounded
//! pending queries and hellos, what is installed), the table never holds more than
//! `max_entries`, the kernel (a fake) holds only learned addresses, and an answer
//! teaches nothing unless it answers a query that went out (same client, port, server
//! and id, the same question, within 5 s, not answered yet) to a server of
//! `[dns] resolvers`: a model of the outstanding queries, kept here apart from the
//! engine, says which answers may teach. The fair queue stays within its bounds and
//! gives each client's events back in the order they came.
#![no_main]

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use shaper_core::{compile, config, dnswire, hosts};
use shaper_common::{
    HostKey, HostVal, DIR_DOWN, DIR_UP, EVENT_HEADER, EV_DNS, EV_DNS_QUERY, EV_TLS,
};

/// Offset of the key's `src` (the client) in an event: after kind, len, dir, dscp.
const EVENT_HEADER_SRC: usize = 16;

use hosts::{event_bytes, Engine, Kernel};

/// A small table (evictions happen), two resolvers allowed and a third not, rules
/// by name, by CNAME target and by address.
const POLICY: &str = r#"
[interfaces]
wan = "wan0"
lan = "lan0"
[upload]
rate = "10mbit"
[download]
rate = "40mbit"
[dns]
min_ttl = 1
max_ttl = 600
max_entries = 16
resolvers = ["192.0.2.53", "2001:db8::53", "198.51.100.53"]
[[class]]
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
[[rule]]
name = "wb"
class = "video"
dns_names = ["*.sfu.whereby.com"]
[[rule]]
name = "pacs"
class = "video"
protocol = "tcp"
dst_ports = [443]
dns_names = ["pacs.example.nhs.uk"]
[[rule]]
name = "cdn"
class = "bulk"
dns_names = ["edge.example.net"]
[[rule]]
name = "net"
class = "bulk"
dst_cidrs = ["198.18.0.0/15"]
"#;

const MAX_ENTRIES: usize = 16;

/// The plan and its compiled maps (compiled once: most of an engine's set-up).
fn plan() -> &'static (compile::Plan, compile::MapPlan) {
    static PLAN: OnceLock<(compile::Plan, compile::MapPlan)> = OnceLock::new();
    PLAN.get_or_init(|| {
        let p = config::parse(std::path::Path::new("fuzz.toml"), POLICY).expect("valid policy");
        let plan = compile::plan(&p, None);
        let maps = compile::maps(&plan);
        (plan, maps)
    })
}

#[derive(Default)]
struct Fake {
    addrs: HashMap<IpAddr, u32>,
    flows: HashMap<HostKey, HostVal>,
}

impl Kernel for &mut Fake {
    fn write_bitmap(&mut self, _slot: u32, _words: &[u64]) -> anyhow::Result<()> {
        Ok(())
    }
    fn set_addr(&mut self, addr: IpAddr, id: u32) -> anyhow::Result<()> {
        self.addrs.insert(addr, id);
        Ok(())
    }
    fn del_addr(&mut self, addr: IpAddr) -> anyhow::Result<()> {
        assert!(
            self.addrs.remove(&addr).is_some(),
            "{addr} removed, never set"
        );
        Ok(())
    }
    fn set_host_flow(&mut self, key: &HostKey, val: HostVal) -> anyhow::Result<()> {
        self.flows.insert(*key, val);
        Ok(())
    }
    fn del_host_flow(&mut self, key: &HostKey) -> anyhow::Result<()> {
        self.flows.remove(key);
        Ok(())
    }
}

/// LAN clients and DNS servers by family; the last v4 server is not in `resolvers`.
const CLIENTS4: [[u8; 4]; 2] = [[192, 168, 1, 10], [192, 168, 1, 66]];
const CLIENTS6: [[u8; 16]; 2] = [
    [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10],
    [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x66],
];
const SERVERS4: [[u8; 4]; 3] = [[192, 0, 2, 53], [198, 51, 100, 53], [203, 0, 113, 53]];
const SERVER6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x53,
];
const NAMES: [&str; 6] = [
    "media.sfu.whereby.com",
    "x.sfu.whereby.com",
    "pacs.example.nhs.uk",
    "other.example",
    "cdn.example.com",
    "sfu.whereby.com",
];

/// The input, read a byte at a time (zeros once it runs out).
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.byte(), self.byte()])
    }
    fn bytes(&mut self, max: usize) -> &[u8] {
        let n = (usize::from(self.byte()) * 8).min(max).min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A DNS connection key (as the classifier gives both the query and its answer):
/// family, client, server and the client's port from one byte.
fn dns_key(sel: u8) -> HostKey {
    let mut k = HostKey {
        sport: 40_000 + u32::from(sel >> 6),
        dport: 53,
        proto: 17,
        ..Default::default()
    };
    if sel & 1 == 0 {
        k.family = 4;
        k.src[..4].copy_from_slice(&CLIENTS4[usize::from(sel >> 1) & 1]);
        k.dst[..4].copy_from_slice(&SERVERS4[usize::from(sel >> 2) % 3]);
    } else {
        k.family = 6;
        k.src = CLIENTS6[usize::from(sel >> 1) & 1];
        k.dst = SERVER6;
    }
    k
}

fn addr(k: &HostKey, dst: bool) -> IpAddr {
    let b = if dst { k.dst } else { k.src };
    if k.family == 6 {
        IpAddr::from(b)
    } else {
        IpAddr::from([b[0], b[1], b[2], b[3]])
    }
}

fn name_bytes(n: &str) -> Vec<u8> {
    let mut v = Vec::new();
    for l in n.split('.') {
        v.push(l.len() as u8);
        v.extend_from_slice(l.as_bytes());
    }
    v.push(0);
    v
}

/// An answer to `q`, optionally through `edge.example.net`, with `n` addresses.
fn answer(input: &mut Input, id: u16, q: &str) -> Vec<u8> {
    let flags = input.byte();
    let cname = flags & 1 != 0;
    let n = usize::from(input.byte() % 100);
    let ttl = u32::from(input.u16());
    let seed = input.byte();
    let mut m = id.to_be_bytes().to_vec();
    // QR, RD, RA; an odd flags byte sometimes sets RCODE or clears QR.
    let (b2, b3) = if flags & 0x80 != 0 {
        (flags & 0x7f, flags >> 4)
    } else {
        (0x81, 0x80)
    };
    m.extend([b2, b3, 0, 1]);
    m.extend(((n + usize::from(cname)) as u16).to_be_bytes());
    m.extend([0, 0, 0, 0]);
    m.extend(name_bytes(q));
    m.extend([0, 1, 0, 1]);
    let owner: Vec<u8> = if cname {
        let t = name_bytes("edge.example.net");
        m.extend([0xc0, 12, 0, 5, 0, 1]);
        m.extend(ttl.to_be_bytes());
        m.extend((t.len() as u16).to_be_bytes());
        let at = m.len() as u16;
        m.extend(t);
        vec![0xc0 | (at >> 8) as u8, at as u8]
    } else {
        vec![0xc0, 12]
    };
    for i in 0..n {
        m.extend(&owner);
        if (seed as usize + i) % 5 == 0 {
            m.extend([0, 28, 0, 1]);
            m.extend(ttl.to_be_bytes());
            m.extend([0, 16, 0x20, 0x01, 0x0d, 0xb8]);
            m.extend([0; 8]);
            m.extend([seed, i as u8]);
        } else {
            m.extend([0, 1, 0, 1]);
            m.extend(ttl.to_be_bytes());
            // Some inside the static rule's 198.18.0.0/15.
            m.extend([0, 4, 198, 18 + (seed & 1), seed, i as u8]);
        }
    }
    m
}

/// What a query of these bytes asks: (id, question), if the engine would hold it.
fn query_of(payload: &[u8]) -> Option<(u16, dnswire::Question)> {
    let m = dnswire::parse_udp(payload).ok()?;
    if m.is_response || m.opcode != 0 {
        return None;
    }
    Some((m.id, m.question?))
}

/// The model: queries that went out and were not answered, by (key, id).
type Outstanding = HashMap<(HostKey, u16), (Instant, dnswire::Question)>;

fuzz_target!(|data: &[u8]| {
    let (plan, maps) = plan();
    let mut fake = Fake::default();
    let mut e = Engine::with_maps(plan, maps.clone(), &mut fake);
    let mut input = Input(data);
    let mut now = Instant::now();
    let mut outstanding: Outstanding = HashMap::new();
    let allowed = &plan.policy.dns.resolvers;
    let mut steps = 0;
    let mut queue = hosts::FairQueue::new(64, 24);
    let mut seq = 0u64;
    let mut popped: HashMap<Vec<u8>, u64> = HashMap::new();
    while !input.is_empty() && steps < 512 {
        steps += 1;
        let op = input.byte();
        let learned_before = e.stats.dns_addresses_learned;
        // What the model says a DNS answer fed in this step may do.
        let mut may_learn = true;
        match op % 10 {
            // A query for one of the names.
            0 | 1 => {
                let key = dns_key(input.byte());
                let id = u16::from(input.byte() % 4);
                let name = NAMES[usize::from(input.byte()) % NAMES.len()];
                let mut q = id.to_be_bytes().to_vec();
                q.extend([0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
                q.extend(name_bytes(name));
                q.extend([0, if op & 0x10 != 0 { 28 } else { 1 }, 0, 1]);
                if let Some((id, question)) = query_of(&q) {
                    outstanding.insert((key, id), (now, question));
                }
                e.on_event(now, &event_bytes(EV_DNS_QUERY, DIR_UP, key, &q));
            }
            // An answer built from the input, or the input as an answer / a query.
            2 | 3 | 4 => {
                let key = dns_key(input.byte());
                let id = u16::from(input.byte() % 4);
                let payload = match op % 10 {
                    2 | 3 => {
                        let name = NAMES[usize::from(input.byte()) % NAMES.len()];
                        answer(&mut input, id, name)
                    }
                    _ => input.bytes(1500).to_vec(),
                };
                if op & 0x40 != 0 {
                    // The same bytes as a query.
                    if let Some((id, question)) = query_of(&payload) {
                        outstanding.insert((key, id), (now, question));
                    }
                    e.on_event(now, &event_bytes(EV_DNS_QUERY, DIR_UP, key, &payload));
                } else {
                    let asked = dnswire::parse_udp(&payload)
                        .ok()
                        .map(|m| (outstanding.remove(&(key, m.id)), m));
                    may_learn = match asked {
                        Some((Some((sent, question)), m)) => {
                            now.saturating_duration_since(sent) <= Duration::from_secs(5)
                                && m.question.as_ref() == Some(&question)
                                && allowed.contains(&addr(&key, true))
                        }
                        _ => false,
                    };
                    e.on_event(now, &event_bytes(EV_DNS, DIR_DOWN, key, &payload));
                }
            }
            // A whole event of any kind but DNS (whose model is above).
            5 => {
                let raw = input.bytes(2048).to_vec();
                let mut raw = raw;
                if raw.len() >= 4 && matches!(raw[0], 1 | 3) && raw[1..4] == [0, 0, 0] {
                    raw[0] = 2;
                }
                e.on_event(now, &raw);
            }
            // A ClientHello segment or a QUIC Initial from one of a few connections.
            6 => {
                let sel = input.byte();
                let mut k = dns_key(sel);
                k.dport = 443;
                k.sport = 50_000 + u32::from(sel >> 4);
                k.proto = if sel & 0x08 != 0 { 17 } else { 6 };
                let mut payload = input.bytes(1500).to_vec();
                if k.proto == 6 && payload.len() >= 6 && sel & 0x04 != 0 {
                    // Make it start like a ClientHello record.
                    payload[0] = 22;
                    payload[5] = 1;
                }
                e.on_event(now, &event_bytes(EV_TLS, DIR_UP, k, &payload));
            }
            // Time passes; the daemon's tick.
            7 => {
                now += Duration::from_millis(u64::from(input.byte()) * 100);
                e.tick(now);
            }
            // An event shed over budget.
            8 => {
                let key = dns_key(input.byte());
                e.shed(&event_bytes(EV_DNS, DIR_DOWN, key, &[]));
            }
            // The daemon's fair queue: events of a few clients in, some out.
            _ => {
                for _ in 0..input.byte() % 16 {
                    let sel = input.byte();
                    seq += 1;
                    let ev = event_bytes(EV_DNS_QUERY, DIR_UP, dns_key(sel), &seq.to_be_bytes());
                    if let Some(shed) = queue.push(ev) {
                        e.shed(&shed);
                    }
                }
                for _ in 0..input.byte() % 16 {
                    let Some(ev) = queue.pop() else { break };
                    // A client's events come out in the order they went in.
                    let client = ev[EVENT_HEADER_SRC..EVENT_HEADER_SRC + 16].to_vec();
                    let at = EVENT_HEADER;
                    let s = u64::from_be_bytes(ev[at..at + 8].try_into().expect("8 bytes"));
                    let last = popped.entry(client).or_insert(0);
                    assert!(s > *last, "a client's events out of order");
                    *last = s;
                }
                queue.check();
            }
        }
        if !may_learn {
            assert_eq!(
                e.stats.dns_addresses_learned, learned_before,
                "an answer to no query taught addresses"
            );
        }
        e.check();
        assert!(e.table.len() <= MAX_ENTRIES);
    }
    drop(e);
    // Nothing in the kernel is left that the engine did not install (it removes
    // what expires or is evicted; dropped here, it keeps what it held).
    assert!(fake.addrs.len() <= MAX_ENTRIES);
});
