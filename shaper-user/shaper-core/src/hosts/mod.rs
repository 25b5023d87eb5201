//! Host names: rules with `dns_names` (directly, or through a catalogue app)
//! classify by the names of the servers a site talks to, which have no fixed
//! addresses (Whereby/accuRx media, Windows Update CDNs, cloud PACS).
//!
//! Fed by the classifier through two ring buffers (`DNS_EVENTS` for DNS,
//! `EVENTS` for hellos, so a flood of one cannot crowd out the other):
//! - **DNS answers to the LAN's queries.** A query (UDP to port 53) that came
//!   in from the LAN and leaves to the WAN is remembered by the classifier
//!   (`DNS_QUERIES`) and its question handed here; an answer on its way to the
//!   LAN is handed here only if it came in from the WAN and carries the id,
//!   ports and addresses of such a query (from the address the query went to)
//!   within 5 s, and is learned from only if its question is the query's too
//!   (and, with `[dns] resolvers`, the query went to one of those). Forged
//!   answers hairpinned from the LAN, answers nobody asked for (IPv4 or IPv6)
//!   and answers from anyone but the asked server teach nothing. The answer is
//!   parsed ([`crate::dnswire`]), its CNAME chain followed, and every address
//!   at its end (at most [`MAX_ANSWER_ADDRS`]) whose chain names a rule's host
//!   name is put into the learned-address maps (`LEARNED4`/`LEARNED6`, exact
//!   addresses the classifier looks up before the WAN-side trie, so the cost
//!   does not grow with their number) with a bitmap that is the static
//!   prefixes' bitmap for that address plus the host rules' bits. Entries live
//!   for the record's TTL, clamped to `[dns] min_ttl..max_ttl`; at most
//!   `max_entries` addresses are kept. A full table makes room fairly: the LAN
//!   client holding the most addresses gives up the one it was answered least
//!   recently, so one host's flood of answers (however long their TTLs) evicts
//!   its own entries, not the other hosts'. Expired entries are removed (the
//!   address falls back to the trie). Every table operation is O(log n).
//! - **TLS server names**: the first segment of a TCP connection to port 443
//!   that carries a ClientHello (and, when the hello is split, the next ones
//!   on request). If the server name makes a host rule win over whatever rule
//!   the connection matches otherwise, the connection's class is written to
//!   `HOST_FLOWS`, which the classifier follows in both directions. Unfinished
//!   split hellos are bounded per client and in total; a new one makes room by
//!   giving up the oldest, so a flood of them cannot block real ones.
//! - **QUIC server names**: a QUIC v1/v2 client Initial to UDP 443 is
//!   decrypted with the keys its destination connection id gives away
//!   ([`crate::quic`]) and its CRYPTO frames put together (a post-quantum
//!   ClientHello spans two Initials, the second sent on request), then as TLS.
//!
//! The engine here does the work; `shaper_user::hosts_task` runs it in the daemon
//! on a thread of its own with time budgets, shedding learning work first.
//!
//! What is not seen: DNS over TCP, TLS or HTTPS (DoT/DoH: a browser using its
//! own encrypted resolver; the TLS server name then still works), TLS or QUIC
//! with Encrypted Client Hello (only the outer name is seen), and answers from
//! a resolver on the box itself (they did not come in from the WAN).
//!
//! Connections already cached by the classifier keep their class when an
//! address is learned or expires: new connections see the change.
//!
//! About 1,400 lines without its tests (tests.rs): one engine whose bookkeeping (the
//! table and its expiry, per-client and holder indexes, pending queries and hellos) is
//! checked as a whole by `Engine::check`; split, those invariants would cross files.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    hash::Hash,
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Result;
use serde::{Deserialize, Serialize};
use shaper_common::{
    EventOf, HostKey, HostVal, DIR_DOWN, DIR_UP, DNS_ANSWER_WITHIN_NS, DNS_QUERY_DATA, EVENT_DATA,
    EVENT_HEADER, EV_DNS, EV_DNS_QUERY, EV_TLS, HOST_DECIDED, HOST_WANT_MORE, NO_RULE,
};

use crate::dir::Dir;
use crate::rundir::{read_versioned, write_json, RunDir, HOSTS_VERSION};
use crate::{
    compile::{self, MapPlan, PacketView, Plan},
    config::{DnsSettings, Policy},
    dnswire, sni,
};

/// The host rules of a policy: (rule rank, lowercase patterns).
#[derive(Debug, Clone, Default)]
pub struct HostRules {
    rules: Vec<(usize, Vec<String>)>,
}

impl HostRules {
    pub fn new(policy: &Policy) -> Self {
        HostRules {
            rules: policy
                .rules
                .iter()
                .enumerate()
                .filter(|(_, r)| !r.dns_names.is_empty())
                .map(|(i, r)| (i, r.dns_names.clone()))
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Ranks of the rules with a pattern matching `name`, ascending.
    pub fn matching(&self, name: &str) -> Vec<usize> {
        self.rules
            .iter()
            .filter(|(_, pats)| crate::rule::names_accept(pats, name))
            .map(|(i, _)| *i)
            .collect()
    }
}

/// Why an address is in the table for one rule.
#[derive(Debug, Clone)]
struct Learn {
    expires: Instant,
    /// The name on the answer's CNAME chain the rule matched.
    name: String,
}

/// One learned address.
#[derive(Debug, Clone)]
struct Entry {
    rules: BTreeMap<usize, Learn>,
    /// The LAN client whose answer taught (or last refreshed) it.
    client: IpAddr,
    /// When that was, in the table's order of learning.
    seq: u64,
}

/// Addresses learned from DNS answers, per host rule, with the indexes that
/// keep every operation O(log n): by expiry, and per client by recency.
#[derive(Debug, Default)]
pub struct Table {
    settings: DnsSettings,
    entries: HashMap<IpAddr, Entry>,
    /// (expiry, address, rule rank) of every rule of every entry.
    by_expiry: BTreeSet<(Instant, IpAddr, usize)>,
    /// Per client: its addresses by `seq` (least recently answered first).
    by_client: HashMap<IpAddr, BTreeMap<u64, IpAddr>>,
    /// (addresses held, client) of every client holding one.
    holders: BTreeSet<(usize, IpAddr)>,
    seq: u64,
    /// Addresses evicted to make room.
    pub evicted: u64,
}

impl Table {
    pub fn new(settings: DnsSettings) -> Self {
        Table {
            settings,
            ..Default::default()
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Records that `addr` was answered to `client` for `name`, which rule
    /// `rank` names, with `ttl` seconds. Returns the addresses whose rule set
    /// changed (this one when new, and any evicted to make room).
    pub fn learn(
        &mut self,
        now: Instant,
        client: IpAddr,
        addr: IpAddr,
        rank: usize,
        name: &str,
        ttl: u32,
    ) -> Vec<IpAddr> {
        let ttl = ttl.clamp(self.settings.min_ttl_s, self.settings.max_ttl_s);
        let expires = now + Duration::from_secs(ttl.into());
        let mut changed = Vec::new();
        if !self.entries.contains_key(&addr)
            && self.entries.len() >= self.settings.max_entries as usize
        {
            // Full: the client holding the most gives up its least recently
            // answered address (a flooding client evicts its own).
            if let Some(v) = self.victim() {
                self.remove(v);
                self.evicted += 1;
                changed.push(v);
            }
        }
        self.seq += 1;
        let seq = self.seq;
        let old = self.entries.get(&addr).map(|e| (e.client, e.seq));
        if let Some((c, s)) = old {
            self.detach(c, s);
        }
        self.attach(client, seq, addr);
        let e = self.entries.entry(addr).or_insert_with(|| Entry {
            rules: BTreeMap::new(),
            client,
            seq,
        });
        e.client = client;
        e.seq = seq;
        match e.rules.get_mut(&rank) {
            // A later answer extends (never shortens) the entry's life.
            Some(l) => {
                if expires > l.expires {
                    self.by_expiry.remove(&(l.expires, addr, rank));
                    self.by_expiry.insert((expires, addr, rank));
                    l.expires = expires;
                    l.name = name.to_string();
                }
            }
            None => {
                e.rules.insert(
                    rank,
                    Learn {
                        expires,
                        name: name.to_string(),
                    },
                );
                self.by_expiry.insert((expires, addr, rank));
                changed.push(addr);
            }
        }
        changed
    }

    /// The address a full table gives up.
    fn victim(&self) -> Option<IpAddr> {
        let (_, client) = self.holders.last()?;
        self.by_client
            .get(client)?
            .first_key_value()
            .map(|(_, a)| *a)
    }

    fn attach(&mut self, client: IpAddr, seq: u64, addr: IpAddr) {
        let list = self.by_client.entry(client).or_default();
        let n = list.len();
        list.insert(seq, addr);
        if n > 0 {
            self.holders.remove(&(n, client));
        }
        self.holders.insert((n + 1, client));
    }

    fn detach(&mut self, client: IpAddr, seq: u64) {
        let Some(list) = self.by_client.get_mut(&client) else {
            return;
        };
        let n = list.len();
        if list.remove(&seq).is_none() {
            return;
        }
        self.holders.remove(&(n, client));
        if n > 1 {
            self.holders.insert((n - 1, client));
        } else {
            self.by_client.remove(&client);
        }
    }

    /// Drops `addr` with all its rules.
    fn remove(&mut self, addr: IpAddr) {
        if let Some(e) = self.entries.remove(&addr) {
            for (rank, l) in &e.rules {
                self.by_expiry.remove(&(l.expires, addr, *rank));
            }
            self.detach(e.client, e.seq);
        }
    }

    /// Drops what has expired; returns the addresses whose rule set changed.
    pub fn expire(&mut self, now: Instant) -> Vec<IpAddr> {
        let mut changed = Vec::new();
        while let Some(&(t, addr, rank)) = self.by_expiry.first() {
            if t > now {
                break;
            }
            self.by_expiry.pop_first();
            let gone = match self.entries.get_mut(&addr) {
                Some(e) => {
                    e.rules.remove(&rank);
                    e.rules.is_empty()
                }
                None => false,
            };
            if gone {
                self.remove(addr);
            }
            if changed.last() != Some(&addr) {
                changed.push(addr);
            }
        }
        changed.sort_unstable();
        changed.dedup();
        changed
    }

    /// The host rules `addr` is learned for, ascending.
    pub fn rules_of(&self, addr: IpAddr) -> Vec<usize> {
        self.entries
            .get(&addr)
            .map(|e| e.rules.keys().copied().collect())
            .unwrap_or_default()
    }

    pub fn has(&self, addr: IpAddr, rank: usize) -> bool {
        self.entries
            .get(&addr)
            .is_some_and(|e| e.rules.contains_key(&rank))
    }

    /// How many addresses `client`'s answers hold.
    pub fn held_by(&self, client: IpAddr) -> usize {
        self.by_client.get(&client).map_or(0, BTreeMap::len)
    }

    /// (address, name, expiry, client) of every entry, for carrying over a reload.
    fn names(&self) -> Vec<(IpAddr, String, Instant, IpAddr)> {
        let mut v: Vec<_> = self
            .entries
            .iter()
            .flat_map(|(a, e)| {
                e.rules
                    .values()
                    .map(move |l| (e.seq, *a, l.name.clone(), l.expires, e.client))
            })
            .collect();
        // In the order they were learned, so recency carries over too.
        v.sort_by_key(|x| x.0);
        v.into_iter().map(|(_, a, n, t, c)| (a, n, t, c)).collect()
    }

    /// Checks that the indexes agree with the entries (tests, fuzzing).
    pub fn check(&self) {
        assert!(self.entries.len() <= self.settings.max_entries.max(1) as usize);
        let rules: usize = self.entries.values().map(|e| e.rules.len()).sum();
        assert_eq!(rules, self.by_expiry.len());
        for (t, a, r) in &self.by_expiry {
            assert_eq!(self.entries[a].rules[r].expires, *t);
        }
        let listed: usize = self.by_client.values().map(BTreeMap::len).sum();
        assert_eq!(listed, self.entries.len());
        assert_eq!(self.holders.len(), self.by_client.len());
        for (n, c) in &self.holders {
            assert_eq!(self.by_client[c].len(), *n);
        }
        for (a, e) in &self.entries {
            assert!(!e.rules.is_empty());
            assert_eq!(self.by_client[&e.client].get(&e.seq), Some(a));
        }
    }
}

/// Items held for LAN clients in the order they came, bounded in total and per
/// client: a client at its bound gives up its oldest, and when the total is
/// reached the oldest of all goes. One client's flood pushes out its own.
/// Every operation is O(log n).
#[derive(Debug)]
struct FairMap<K, V> {
    items: HashMap<K, (u64, IpAddr, Instant, V)>,
    order: BTreeMap<u64, K>,
    per_client: HashMap<IpAddr, BTreeMap<u64, K>>,
    seq: u64,
    max: usize,
    per_client_max: usize,
}

impl<K: Copy + Eq + Hash, V> FairMap<K, V> {
    fn new(max: usize, per_client_max: usize) -> Self {
        FairMap {
            items: HashMap::new(),
            order: BTreeMap::new(),
            per_client: HashMap::new(),
            seq: 0,
            max: max.max(1),
            per_client_max: per_client_max.max(1),
        }
    }

    /// Holds `v` under `k` for `client` (replacing what `k` held); returns the
    /// keys given up to make room.
    fn insert(&mut self, now: Instant, client: IpAddr, k: K, v: V) -> Vec<K> {
        self.remove(&k);
        let mut gone = Vec::new();
        let full_client = self
            .per_client
            .get(&client)
            .is_some_and(|l| l.len() >= self.per_client_max);
        if full_client {
            if let Some((_, &old)) = self.per_client[&client].first_key_value() {
                self.remove(&old);
                gone.push(old);
            }
        }
        while self.items.len() >= self.max {
            let Some((_, &old)) = self.order.first_key_value() else {
                break;
            };
            self.remove(&old);
            gone.push(old);
        }
        self.seq += 1;
        self.order.insert(self.seq, k);
        self.per_client
            .entry(client)
            .or_default()
            .insert(self.seq, k);
        self.items.insert(k, (self.seq, client, now, v));
        gone
    }

    /// Takes what `k` holds, with when it came.
    fn remove(&mut self, k: &K) -> Option<(Instant, V)> {
        let (seq, client, at, v) = self.items.remove(k)?;
        self.order.remove(&seq);
        if let Some(l) = self.per_client.get_mut(&client) {
            l.remove(&seq);
            if l.is_empty() {
                self.per_client.remove(&client);
            }
        }
        Some((at, v))
    }

    /// Gives up what came more than `after` ago (in the order they came).
    fn expire(&mut self, now: Instant, after: Duration) -> Vec<K> {
        let mut gone = Vec::new();
        while let Some((_, &k)) = self.order.first_key_value() {
            let at = self.items[&k].2;
            if now.saturating_duration_since(at) <= after {
                break;
            }
            self.remove(&k);
            gone.push(k);
        }
        gone
    }

    fn check(&self) {
        assert!(self.items.len() <= self.max);
        assert_eq!(self.items.len(), self.order.len());
        let n: usize = self.per_client.values().map(BTreeMap::len).sum();
        assert_eq!(n, self.items.len());
        for l in self.per_client.values() {
            assert!(!l.is_empty() && l.len() <= self.per_client_max);
        }
        for (seq, k) in &self.order {
            assert_eq!(self.items[k].0, *seq);
        }
    }
}

/// A DNS query that went out from the LAN: what an answer must carry to count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QueryKey {
    /// The LAN host that asked.
    pub client: IpAddr,
    /// The server it asked (the answer must come from it).
    pub resolver: IpAddr,
    /// The client's port (the resolver's is 53).
    pub port: u16,
    /// The message id.
    pub id: u16,
}

/// Events waiting for their turn, queued per LAN client and taken one client
/// at a time in turn, so a client that floods waits behind its own events while
/// another's few are taken at once. Bounded per client and in total: a client at
/// its bound sheds its newest, and when the total is reached the longest queue
/// sheds its oldest. Every operation is O(log n) (n clients).
#[derive(Debug)]
pub struct FairQueue {
    queues: HashMap<IpAddr, std::collections::VecDeque<Vec<u8>>>,
    /// Clients with events, in the order they get their next turn.
    turn: std::collections::VecDeque<IpAddr>,
    /// (queued events, client) of every client with events.
    lens: BTreeSet<(usize, IpAddr)>,
    total: usize,
    max_total: usize,
    max_per_client: usize,
}

impl FairQueue {
    pub fn new(max_total: usize, max_per_client: usize) -> Self {
        FairQueue {
            queues: HashMap::new(),
            turn: Default::default(),
            lens: BTreeSet::new(),
            total: 0,
            max_total: max_total.max(1),
            max_per_client: max_per_client.max(1),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    pub fn len(&self) -> usize {
        self.total
    }

    /// Queues `ev` (one event's bytes) for its client (the connection's LAN
    /// side); returns what was shed to bound the queues (possibly `ev` itself).
    pub fn push(&mut self, ev: Vec<u8>) -> Option<Vec<u8>> {
        let Some(client) = read_event(&ev).map(|(e, _)| key_addrs(&e.key).0) else {
            return Some(ev);
        };
        let n = self.queues.get(&client).map_or(0, |q| q.len());
        if n >= self.max_per_client {
            return Some(ev);
        }
        let shed = if self.total >= self.max_total {
            // The longest queue gives up its oldest, if it is longer than this
            // client's would become (and keeps a turn: at least one stays).
            let &(len, longest) = self.lens.last()?;
            if len <= n + 1 {
                return Some(ev);
            }
            self.take_front(longest)
        } else {
            None
        };
        let n = self.queues.get(&client).map_or(0, |q| q.len());
        if n == 0 {
            self.turn.push_back(client);
        } else {
            self.lens.remove(&(n, client));
        }
        self.lens.insert((n + 1, client));
        self.queues.entry(client).or_default().push_back(ev);
        self.total += 1;
        shed
    }

    /// The next event: the front of the queue of the client whose turn it is.
    pub fn pop(&mut self) -> Option<Vec<u8>> {
        let client = self.turn.pop_front()?;
        let ev = self.take_front(client);
        if self.queues.contains_key(&client) {
            self.turn.push_back(client);
        }
        ev
    }

    /// Takes `client`'s oldest event. A client left with none must not be in
    /// `turn` (`pop` took it out; `push` sheds only from queues of two or more).
    fn take_front(&mut self, client: IpAddr) -> Option<Vec<u8>> {
        let q = self.queues.get_mut(&client)?;
        let n = q.len();
        let ev = q.pop_front();
        self.lens.remove(&(n, client));
        if n > 1 {
            self.lens.insert((n - 1, client));
        } else {
            self.queues.remove(&client);
        }
        self.total -= 1;
        ev
    }

    /// Checks the queue's bookkeeping (tests, fuzzing).
    pub fn check(&self) {
        let n: usize = self.queues.values().map(|q| q.len()).sum();
        assert_eq!(n, self.total);
        assert!(self.total <= self.max_total);
        assert_eq!(self.lens.len(), self.queues.len());
        assert_eq!(self.turn.len(), self.queues.len());
        for (len, c) in &self.lens {
            assert_eq!(self.queues[c].len(), *len);
            assert!(*len > 0 && *len <= self.max_per_client);
        }
    }
}

/// A time budget per second for one kind of work: once a second's worth is
/// used, that kind of work waits for the next second (its events are shed).
#[derive(Debug, Clone)]
pub struct Budget {
    limit: Duration,
    start: Option<Instant>,
    used: Duration,
}

impl Budget {
    pub fn new(limit: Duration) -> Self {
        Budget {
            limit,
            start: None,
            used: Duration::ZERO,
        }
    }

    /// Whether work may be done now.
    pub fn allows(&mut self, now: Instant) -> bool {
        match self.start {
            Some(s) if now.saturating_duration_since(s) < Duration::from_secs(1) => {}
            _ => {
                self.start = Some(now);
                self.used = Duration::ZERO;
            }
        }
        self.used < self.limit
    }

    /// Counts work done.
    pub fn charge(&mut self, d: Duration) {
        self.used += d;
    }

    /// When the current second ends (work is allowed again then).
    pub fn reopens(&self) -> Option<Instant> {
        self.start.map(|s| s + Duration::from_secs(1))
    }
}

/// What the kernel side must offer (a fake in the unit tests).
pub trait Kernel {
    fn write_bitmap(&mut self, slot: u32, words: &[u64]) -> Result<()>;
    /// Sets the WAN-side trie's host entry (/32 or /128) for `addr`.
    fn set_addr(&mut self, addr: IpAddr, id: u32) -> Result<()>;
    fn del_addr(&mut self, addr: IpAddr) -> Result<()>;
    fn set_host_flow(&mut self, key: &HostKey, val: HostVal) -> Result<()>;
    fn del_host_flow(&mut self, key: &HostKey) -> Result<()>;
}

/// Bitmap slots beyond the compiled ones, one per (static id, rule set).
#[derive(Debug, Default)]
struct Slots {
    next: u32,
    end: u32,
    free: Vec<u32>,
    used: HashMap<(u32, Vec<usize>), (u32, u32)>,
}

impl Slots {
    fn acquire(
        &mut self,
        key: (u32, Vec<usize>),
        maps: &MapPlan,
        kernel: &mut dyn Kernel,
    ) -> Result<Option<u32>> {
        if let Some((slot, refs)) = self.used.get_mut(&key) {
            *refs += 1;
            return Ok(Some(*slot));
        }
        let slot = match self.free.pop() {
            Some(s) => s,
            None if self.next < self.end => {
                self.next += 1;
                self.next - 1
            }
            None => return Ok(None),
        };
        let mut words = maps.bitmaps[key.0 as usize].clone();
        for &r in &key.1 {
            words[r / 64] |= 1 << (r % 64);
        }
        kernel.write_bitmap(slot, &words)?;
        self.used.insert(key, (slot, 1));
        Ok(Some(slot))
    }

    fn release(&mut self, key: &(u32, Vec<usize>)) {
        if let Some((slot, refs)) = self.used.get_mut(key) {
            *refs -= 1;
            if *refs == 0 {
                self.free.push(*slot);
                self.used.remove(key);
            }
        }
    }
}

/// An event's bytes as the classifier writes them to its rings: the connection
/// `key` (from the site's side) and the start of `payload`, as much as the
/// kind's event holds (`DNS_QUERY_DATA` bytes of a query, `EVENT_DATA` of the
/// others), for tests, benchmarks, fuzzing and the soak.
pub fn event_bytes(kind: u32, dir: u32, key: HostKey, payload: &[u8]) -> Vec<u8> {
    fn bytes<const N: usize>(kind: u32, dir: u32, key: HostKey, payload: &[u8]) -> Vec<u8> {
        let n = payload.len().min(N);
        let mut ev = EventOf::<N> {
            kind,
            len: n as u32,
            dir,
            dscp: 0,
            key,
            data: [0; N],
        };
        ev.data[..n].copy_from_slice(&payload[..n]);
        // SAFETY: EventOf is #[repr(C)] plain old data; the slice covers exactly one.
        unsafe {
            std::slice::from_raw_parts(
                &ev as *const EventOf<N> as *const u8,
                std::mem::size_of::<EventOf<N>>(),
            )
        }
        .to_vec()
    }
    if kind == EV_DNS_QUERY {
        bytes::<DNS_QUERY_DATA>(kind, dir, key, payload)
    } else {
        bytes::<EVENT_DATA>(kind, dir, key, payload)
    }
}

/// An event's fixed part and its payload, from a ring's record (`None` if too short).
fn read_event(bytes: &[u8]) -> Option<(EventOf<0>, &[u8])> {
    if bytes.len() < EVENT_HEADER {
        return None;
    }
    // SAFETY: EventOf<0> is the plain-old-data fixed part of every event (its size
    // is EVENT_HEADER), and `bytes` holds at least that much.
    let ev: EventOf<0> = unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const EventOf<0>) };
    let data = &bytes[EVENT_HEADER..];
    let n = (ev.len as usize).min(data.len());
    Some((ev, &data[..n]))
}

/// Counters of what the host-name path did (shown by `shaper status` through
/// hosts.json).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HostStats {
    /// DNS queries from the LAN read (their answers may teach addresses).
    #[serde(default)]
    pub dns_queries: u64,
    /// Queries given up to make room before an answer came (too many at once).
    #[serde(default)]
    pub dns_queries_dropped: u64,
    pub dns_answers: u64,
    pub dns_unparsed: u64,
    /// Answers that matched no query held here (its event was shed or lost, it
    /// expired, or the question differs): nothing learned from them.
    #[serde(default)]
    pub dns_unmatched: u64,
    /// Answers to queries sent to a server not in `[dns] resolvers`.
    #[serde(default)]
    pub dns_other_resolver: u64,
    pub dns_addresses_learned: u64,
    /// Addresses of an answer beyond the first `MAX_ANSWER_ADDRS`, not learned.
    #[serde(default)]
    pub dns_addresses_ignored: u64,
    /// Learned addresses evicted to make room (the table was full).
    #[serde(default)]
    pub dns_evicted: u64,
    pub tls_hellos: u64,
    pub tls_segments_joined: u64,
    /// QUIC client Initials read (first of a connection), and later ones joined.
    #[serde(default)]
    pub quic_initials: u64,
    #[serde(default)]
    pub quic_initials_joined: u64,
    /// Unfinished split hellos given up to make room for newer ones.
    #[serde(default)]
    pub hellos_given_up: u64,
    pub sni_found: u64,
    pub sni_absent: u64,
    pub sni_unparsed: u64,
    pub sni_decided: u64,
    /// Addresses not installed: no bitmap slot left.
    pub no_room: u64,
    pub kernel_errors: u64,
    /// Events read but not worked on: over the second's time budget for DNS work
    /// or for hellos (learning gives way; see `hosts_task`).
    #[serde(default)]
    pub shed_dns: u64,
    #[serde(default)]
    pub shed_hellos: u64,
}

/// One learned address, as written to hosts.json.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LearnedEntry {
    pub addr: IpAddr,
    pub rule: String,
    pub name: String,
    pub expires_in_s: u64,
}

/// One connection classified by its TLS server name.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SniEntry {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub name: String,
    pub rule: String,
}

/// What `shaper run` writes to `<run>/hosts.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Snapshot {
    /// [`HOSTS_VERSION`].
    pub version: u32,
    pub stats: HostStats,
    pub learned: Vec<LearnedEntry>,
    pub sni: Vec<SniEntry>,
}

/// Most connections whose ClientHello is being put together at once ...
const MAX_PENDING: usize = 256;
/// ... and per LAN client.
const MAX_PENDING_PER_CLIENT: usize = 32;
/// Most bytes of one ClientHello kept.
const MAX_HELLO: usize = 16 * 1024;
/// A split ClientHello not completed in this time is given up.
const PENDING_FOR: Duration = Duration::from_secs(5);
/// SNI decisions listed in hosts.json (the most recent).
const MAX_SNI_LISTED: usize = 1024;
/// Most DNS queries waiting for their answer at once ...
const MAX_QUERIES: usize = 4096;
/// ... and per LAN client.
const MAX_QUERIES_PER_CLIENT: usize = 512;
/// A query's answer counts this long after the query (as in the classifier).
const QUERY_FOR: Duration = Duration::from_nanos(DNS_ANSWER_WITHIN_NS);
/// Most addresses one answer teaches (the rest are counted and left): real
/// answers carry a handful; this bounds the work one packet can cause.
pub const MAX_ANSWER_ADDRS: usize = 32;

/// The host rule a connection's server name makes win, if any: what user
/// space writes to HOST_FLOWS (and what `explain` says). `learned(rank)`:
/// the connection's WAN-side address is learned from DNS for that rule. The
/// decision is taken on the upload view, for TCP or UDP to port 443 only,
/// and only for a rule the name matched (not one the address already gave).
pub fn sni_winner(
    policy: &Policy,
    view: &PacketView,
    name: &str,
    learned: impl Fn(usize) -> bool,
) -> Option<usize> {
    if view.dport != Some(443) || !matches!(view.proto, 6 | 17) {
        return None;
    }
    let by_name: Vec<usize> = policy
        .rules
        .iter()
        .enumerate()
        .filter(|(_, r)| r.accepts_name(name))
        .map(|(i, _)| i)
        .collect();
    if by_name.is_empty() {
        return None;
    }
    let up = PacketView {
        dir: Dir::Up,
        ..*view
    };
    let r = compile::reference_match_hosts(policy, &up, |rank, a| {
        by_name.contains(&rank) || (a == view.dst && learned(rank))
    })?;
    (by_name.contains(&r) && !learned(r)).then_some(r)
}

/// The host-name engine over one applied policy.
pub struct Engine<K: Kernel> {
    policy: Policy,
    maps: MapPlan,
    rules: HostRules,
    pub table: Table,
    slots: Slots,
    /// What the kernel holds per address: (static id, rule set).
    installed: HashMap<IpAddr, (u32, Vec<usize>)>,
    /// DNS queries from the LAN waiting for their answer.
    queries: FairMap<QueryKey, dnswire::Question>,
    /// TCP connections whose ClientHello spans several segments.
    pending: FairMap<HostKey, Vec<u8>>,
    /// QUIC connections whose ClientHello spans several Initials.
    quic_pending: FairMap<HostKey, crate::quic::HelloAssembler>,
    sni: Vec<SniEntry>,
    pub stats: HostStats,
    kernel: K,
}

impl QueryKey {
    /// The query a DNS message with id `id` on connection `key` (from the site's side:
    /// client, resolver, client port) belongs to: the same for the query and its answer.
    fn of(key: &HostKey, id: u16) -> QueryKey {
        let (client, resolver) = key_addrs(key);
        QueryKey {
            client,
            resolver,
            port: key.sport as u16,
            id,
        }
    }
}

fn key_addrs(k: &HostKey) -> (IpAddr, IpAddr) {
    let a = |b: &[u8; 16]| -> IpAddr {
        if k.family == 6 {
            IpAddr::from(*b)
        } else {
            IpAddr::from([b[0], b[1], b[2], b[3]])
        }
    };
    (a(&k.src), a(&k.dst))
}

impl<K: Kernel> Engine<K> {
    pub fn new(plan: &Plan, kernel: K) -> Self {
        Self::with_maps(plan, compile::maps(plan), kernel)
    }

    /// [`Engine::new`] with the plan's maps already compiled (`compile::maps(plan)`).
    pub fn with_maps(plan: &Plan, maps: MapPlan, kernel: K) -> Self {
        let first = maps.bitmaps.len() as u32;
        Engine {
            policy: plan.policy.clone(),
            rules: HostRules::new(&plan.policy),
            table: Table::new(plan.policy.dns.clone()),
            slots: Slots {
                next: first,
                end: first + maps.spare_bitmaps,
                ..Default::default()
            },
            maps,
            installed: HashMap::new(),
            queries: FairMap::new(MAX_QUERIES, MAX_QUERIES_PER_CLIENT),
            pending: FairMap::new(MAX_PENDING, MAX_PENDING_PER_CLIENT),
            quic_pending: FairMap::new(MAX_PENDING, MAX_PENDING_PER_CLIENT),
            sni: Vec::new(),
            stats: HostStats::default(),
            kernel,
        }
    }

    /// How many rules name hosts.
    pub fn host_rules(&self) -> usize {
        self.rules.rules.len()
    }

    /// Re-learns what an engine over the previous policy knew (names are
    /// matched against this policy's rules).
    pub fn carry_over(&mut self, now: Instant, old: &Table) {
        for (addr, name, expires, client) in old.names() {
            let left = expires.saturating_duration_since(now).as_secs() as u32;
            if left == 0 {
                continue;
            }
            for rank in self.rules.matching(&name) {
                self.table.learn(now, client, addr, rank, &name, left);
            }
            self.sync(addr);
        }
    }

    /// One event from a ring buffer.
    pub fn on_event(&mut self, now: Instant, bytes: &[u8]) {
        let Some((ev, data)) = read_event(bytes) else {
            return;
        };
        match ev.kind {
            EV_DNS_QUERY if ev.dir == DIR_UP => self.on_query(now, ev.key, data),
            EV_DNS if ev.dir == DIR_DOWN => self.on_dns(now, ev.key, data),
            EV_TLS if ev.dir == DIR_UP && ev.key.proto == 17 => {
                self.on_quic(now, ev.key, ev.dscp as u8, data)
            }
            EV_TLS if ev.dir == DIR_UP => self.on_tls(now, ev.key, ev.dscp as u8, data),
            _ => {}
        }
    }

    /// Counts an event read but not worked on (over its time budget).
    pub fn shed(&mut self, bytes: &[u8]) {
        match read_event(bytes).map(|(ev, _)| ev.kind) {
            Some(EV_DNS | EV_DNS_QUERY) => self.stats.shed_dns += 1,
            Some(EV_TLS) => self.stats.shed_hellos += 1,
            _ => {}
        }
    }

    /// A query from the LAN on its way to the WAN: held until its answer.
    fn on_query(&mut self, now: Instant, key: HostKey, payload: &[u8]) {
        let msg = match dnswire::parse_udp(payload) {
            Ok(m) => m,
            Err(e) => {
                self.stats.dns_unparsed += 1;
                log::debug!("DNS query not understood: {e}");
                return;
            }
        };
        let Some(q) = msg.question else { return };
        if msg.is_response || msg.opcode != 0 {
            return;
        }
        self.stats.dns_queries += 1;
        let k = QueryKey::of(&key, msg.id);
        let gone = self.queries.insert(now, k.client, k, q);
        self.stats.dns_queries_dropped += gone.len() as u64;
    }

    /// An answer on its way to the LAN, from the WAN (the classifier checked
    /// that, and that it answers a query it saw): learned from if it answers a
    /// query held here, with the same question.
    fn on_dns(&mut self, now: Instant, key: HostKey, payload: &[u8]) {
        let msg = match dnswire::parse_udp(payload) {
            Ok(m) => m,
            Err(e) => {
                self.stats.dns_unparsed += 1;
                log::debug!("DNS answer not understood: {e}");
                return;
            }
        };
        self.stats.dns_answers += 1;
        let k = QueryKey::of(&key, msg.id);
        let (client, resolver) = (k.client, k.resolver);
        let asked = match self.queries.remove(&k) {
            Some((sent, q)) if now.saturating_duration_since(sent) <= QUERY_FOR => Some(q),
            _ => None,
        };
        if asked.is_none() || asked != msg.question {
            self.stats.dns_unmatched += 1;
            log::debug!("DNS answer from {resolver} to {client} answers no query held");
            return;
        }
        if !self.policy.dns.resolvers.is_empty() && !self.policy.dns.resolvers.contains(&resolver) {
            self.stats.dns_other_resolver += 1;
            log::debug!("DNS answer from {resolver}, not one of [dns] resolvers: not learned");
            return;
        }
        // Each rule with the first name on the chain it matches (the queried
        // name, or a CNAME target a rule names): that name is kept, so a reload
        // can match it against the new rules.
        let mut by_rank: BTreeMap<usize, String> = BTreeMap::new();
        for n in dnswire::chain_names(&msg) {
            for rank in self.rules.matching(&n) {
                by_rank.entry(rank).or_insert_with(|| n.clone());
            }
        }
        if by_rank.is_empty() {
            return;
        }
        let chain = dnswire::resolve_chain(&msg);
        let over = chain.len().saturating_sub(MAX_ANSWER_ADDRS);
        self.stats.dns_addresses_ignored += over as u64;
        let mut changed = Vec::new();
        for (_, addr, ttl) in chain.into_iter().take(MAX_ANSWER_ADDRS) {
            for (&rank, name) in &by_rank {
                changed.extend(self.table.learn(now, client, addr, rank, name, ttl));
            }
            self.stats.dns_addresses_learned += 1;
        }
        self.stats.dns_evicted = self.table.evicted;
        changed.sort_unstable();
        changed.dedup();
        for a in changed {
            self.sync(a);
        }
    }

    /// Stops asking the kernel for more of connections whose hellos were given up.
    fn give_up(&mut self, keys: Vec<HostKey>) {
        for k in keys {
            self.stats.hellos_given_up += 1;
            let _ = self.kernel.del_host_flow(&k);
        }
    }

    fn on_tls(&mut self, now: Instant, key: HostKey, dscp: u8, data: &[u8]) {
        let joined;
        let bytes: &[u8] = match self.pending.remove(&key) {
            Some((_, mut buf)) => {
                self.stats.tls_segments_joined += 1;
                buf.extend_from_slice(data);
                joined = buf;
                &joined
            }
            None => {
                self.stats.tls_hellos += 1;
                data
            }
        };
        match sni::client_hello_sni(bytes) {
            Ok(sni::Sni::Found { name, .. }) => {
                self.stats.sni_found += 1;
                // Writes the decision, or removes any request for more.
                self.decide(key, dscp, &name);
                return;
            }
            Ok(sni::Sni::NeedMore(_)) if bytes.len() < MAX_HELLO => {
                let want = HostVal {
                    rule: NO_RULE,
                    class: 0,
                    flags: HOST_WANT_MORE,
                    _pad: 0,
                };
                if self.kernel.set_host_flow(&key, want).is_ok() {
                    let (src, _) = key_addrs(&key);
                    let gone = self.pending.insert(now, src, key, bytes.to_vec());
                    self.give_up(gone);
                } else {
                    self.stats.kernel_errors += 1;
                }
                return;
            }
            Ok(sni::Sni::NeedMore(_)) | Ok(sni::Sni::Absent { .. }) => {
                self.stats.sni_absent += 1;
            }
            Err(e) => {
                self.stats.sni_unparsed += 1;
                log::debug!("ClientHello not understood: {e}");
            }
        }
        // Joined segments had asked the kernel for more (it sends a connection's
        // segments only while it holds no decision for it): stop asking.
        if !std::ptr::eq(bytes, data) {
            let _ = self.kernel.del_host_flow(&key);
        }
    }

    /// A QUIC client Initial (UDP to 443): its ClientHello, decrypted with the
    /// keys every Initial's connection id gives away, may span several.
    fn on_quic(&mut self, now: Instant, key: HostKey, dscp: u8, datagram: &[u8]) {
        let (mut asm, joined) = match self.quic_pending.remove(&key) {
            Some((_, a)) => {
                self.stats.quic_initials_joined += 1;
                (a, true)
            }
            None => {
                self.stats.quic_initials += 1;
                (crate::quic::HelloAssembler::new(), false)
            }
        };
        let mut r = asm.push_datagram(datagram);
        if joined && matches!(r, Err(crate::quic::QuicSniError::OtherConnection)) {
            // A new connection id on the same 5-tuple (after a Retry): start again.
            asm = crate::quic::HelloAssembler::new();
            r = asm.push_datagram(datagram);
        }
        match r {
            Ok(sni::Sni::Found { name, .. }) => {
                self.stats.sni_found += 1;
                self.decide(key, dscp, &name);
                return;
            }
            Ok(sni::Sni::NeedMore(_)) => {
                let want = HostVal {
                    rule: NO_RULE,
                    class: 0,
                    flags: HOST_WANT_MORE,
                    _pad: 0,
                };
                if self.kernel.set_host_flow(&key, want).is_ok() {
                    let (src, _) = key_addrs(&key);
                    let gone = self.quic_pending.insert(now, src, key, asm);
                    self.give_up(gone);
                } else {
                    self.stats.kernel_errors += 1;
                }
                return;
            }
            Ok(_) => self.stats.sni_absent += 1,
            Err(e) => {
                self.stats.sni_unparsed += 1;
                log::debug!("QUIC Initial not understood: {e}");
            }
        }
        if joined {
            let _ = self.kernel.del_host_flow(&key);
        }
    }

    /// what decides it.
    pub fn sni_rule(&self, view: &PacketView, name: &str) -> Option<usize> {
        sni_winner(&self.policy, view, name, |rank| {
            self.table.has(view.dst, rank)
        })
    }

    fn decide(&mut self, key: HostKey, dscp: u8, name: &str) {
        let (src, dst) = key_addrs(&key);
        log::debug!(
            "server name {name} on {src}:{} -> {dst}:{} ({})",
            key.sport,
            key.dport,
            crate::config::protocol_name(key.proto)
        );
        let view = PacketView {
            dir: Dir::Up,
            proto: key.proto,
            dscp,
            sport: Some(key.sport as u16),
            dport: Some(key.dport as u16),
            src,
            dst,
        };
        let Some(rank) = self.sni_rule(&view, name) else {
            let _ = self.kernel.del_host_flow(&key);
            return;
        };
        let val = HostVal {
            rule: rank as u32,
            class: self.policy.rules[rank].class as u32,
            flags: HOST_DECIDED,
            _pad: 0,
        };
        if let Err(e) = self.kernel.set_host_flow(&key, val) {
            self.stats.kernel_errors += 1;
            log::warn!("recording the connection to {name}: {e:#}");
            return;
        }
        self.stats.sni_decided += 1;
        log::debug!(
            "{src}:{} -> {dst}:{} is {name}: rule {}",
            key.sport,
            key.dport,
            self.policy.rules[rank].name
        );
        if self.sni.len() == MAX_SNI_LISTED {
            self.sni.remove(0);
        }
        self.sni.push(SniEntry {
            src,
            dst,
            sport: key.sport as u16,
            dport: key.dport as u16,
            name: name.to_string(),
            rule: self.policy.rules[rank].name.clone(),
        });
    }

    /// Expires addresses and queries, and gives up split ClientHellos that did
    /// not complete.
    pub fn tick(&mut self, now: Instant) {
        for a in self.table.expire(now) {
            self.sync(a);
        }
        self.queries.expire(now, QUERY_FOR);
        let mut stale = self.pending.expire(now, PENDING_FOR);
        stale.extend(self.quic_pending.expire(now, PENDING_FOR));
        for k in stale {
            let _ = self.kernel.del_host_flow(&k);
        }
    }

    /// Checks the engine's own bookkeeping (tests, fuzzing): the table's
    /// indexes, the bounds of what is held, and that the kernel holds exactly
    /// the learned addresses that had a slot.
    pub fn check(&self) {
        self.table.check();
        self.queries.check();
        self.pending.check();
        self.quic_pending.check();
        for a in self.installed.keys() {
            assert!(
                !self.table.rules_of(*a).is_empty(),
                "{a} installed, not learned"
            );
        }
        // What could not be installed (no slot, a kernel error) keeps the old entry.
        if self.stats.no_room == 0 && self.stats.kernel_errors == 0 {
            for (a, (_, rules)) in &self.installed {
                assert_eq!(&self.table.rules_of(*a), rules);
            }
        }
        assert!(self.sni.len() <= MAX_SNI_LISTED);
    }

    /// Puts the table's state for `addr` into the kernel.
    fn sync(&mut self, addr: IpAddr) {
        let want = self.table.rules_of(addr);
        let old = self.installed.remove(&addr);
        if want.is_empty() {
            if let Some(old) = old {
                self.slots.release(&old);
                if let Err(e) = self.kernel.del_addr(addr) {
                    self.stats.kernel_errors += 1;
                    log::warn!("removing {addr}: {e:#}");
                }
            }
            return;
        }
        let sid = compile::static_dst_id(&self.maps, addr);
        let key = (sid, want);
        if old.as_ref() == Some(&key) {
            self.installed.insert(addr, key);
            return;
        }
        let slot = match self
            .slots
            .acquire(key.clone(), &self.maps, &mut self.kernel)
        {
            Ok(Some(s)) => s,
            Ok(None) => {
                self.stats.no_room += 1;
                log::warn!(
                    "no room for another combination of host rules; {addr} is not installed"
                );
                if let Some(o) = old {
                    self.installed.insert(addr, o);
                }
                return;
            }
            Err(e) => {
                self.stats.kernel_errors += 1;
                log::warn!("installing {addr}: {e:#}");
                if let Some(o) = old {
                    self.installed.insert(addr, o);
                }
                return;
            }
        };
        if let Err(e) = self.kernel.set_addr(addr, slot) {
            self.stats.kernel_errors += 1;
            log::warn!("installing {addr}: {e:#}");
            self.slots.release(&key);
            if let Some(o) = old {
                self.installed.insert(addr, o);
            }
            return;
        }
        if let Some(o) = old {
            self.slots.release(&o);
        }
        self.installed.insert(addr, key);
    }

    pub fn snapshot(&self, now: Instant) -> Snapshot {
        let mut learned: Vec<LearnedEntry> = self
            .table
            .entries
            .iter()
            .flat_map(|(a, e)| {
                e.rules.iter().map(move |(rank, l)| LearnedEntry {
                    addr: *a,
                    rule: self.policy.rules[*rank].name.clone(),
                    name: l.name.clone(),
                    expires_in_s: l.expires.saturating_duration_since(now).as_secs(),
                })
            })
            .collect();
        learned.sort_by(|a, b| (a.addr, &a.rule).cmp(&(b.addr, &b.rule)));
        Snapshot {
            version: HOSTS_VERSION,
            stats: self.stats.clone(),
            learned,
            sni: self.sni.clone(),
        }
    }
}

/// A kernel shared with other users of the same maps (the soak looks them up).
impl<K: Kernel> Kernel for std::rc::Rc<std::cell::RefCell<K>> {
    fn write_bitmap(&mut self, slot: u32, words: &[u64]) -> Result<()> {
        self.borrow_mut().write_bitmap(slot, words)
    }
    fn set_addr(&mut self, addr: IpAddr, id: u32) -> Result<()> {
        self.borrow_mut().set_addr(addr, id)
    }
    fn del_addr(&mut self, addr: IpAddr) -> Result<()> {
        self.borrow_mut().del_addr(addr)
    }
    fn set_host_flow(&mut self, key: &HostKey, val: HostVal) -> Result<()> {
        self.borrow_mut().set_host_flow(key, val)
    }
    fn del_host_flow(&mut self, key: &HostKey) -> Result<()> {
        self.borrow_mut().del_host_flow(key)
    }
}

/// Where `shaper run` writes the learned names (for `shaper status` and
/// `shaper explain`).
pub fn snapshot_path(run: &Path) -> PathBuf {
    RunDir(run).hosts()
}

/// Reads what a running `shaper run` wrote; `None` when it wrote nothing
/// (no host rules, or not running).
pub fn read_snapshot(run: &Path) -> Option<Snapshot> {
    read_versioned(&snapshot_path(run), HOSTS_VERSION).unwrap_or_else(|e| {
        log::warn!("{e:#}");
        None
    })
}

/// Writes `s` to `path` atomically (a rename).
pub fn write_snapshot(path: &Path, s: &Snapshot) {
    if let Err(e) = write_json(path, s) {
        log::debug!("writing {}: {e:#}", path.display());
    }
}

#[cfg(test)]
mod tests;
