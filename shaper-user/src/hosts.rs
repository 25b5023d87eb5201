//! Host names: rules with `dns_names` (directly, or through a catalogue app)
//! classify by the names of the servers a site talks to, which have no fixed
//! addresses (Whereby/accuRx media, Windows Update CDNs, cloud PACS).
//!
//! Two ways in, both fed by the classifier through the `EVENTS` ring buffer:
//! - **DNS answers** on their way to the LAN (UDP from port 53, on LAN
//!   egress). The answer is parsed ([`crate::dnswire`]), its CNAME chain
//!   followed, and every address at its end whose chain names a rule's host
//!   name is put into the learned-address maps (`LEARNED4`/`LEARNED6`, exact
//!   addresses the classifier looks up before the WAN-side trie, so the cost
//!   does not grow with their number) with a bitmap that is the static
//!   prefixes' bitmap for that address plus the host rules' bits. Entries
//!   live for the record's TTL, clamped to `[dns] min_ttl..max_ttl`; at most
//!   `max_entries` addresses are kept (the soonest to expire make room).
//!   Expired entries are removed (the address falls back to the trie).
//! - **TLS server names**: the first segment of a TCP connection to port 443
//!   that carries a ClientHello (and, when the hello is split, the next ones
//!   on request). If the server name makes a host rule win over whatever rule
//!   the connection matches otherwise, the connection's class is written to
//!   `HOST_FLOWS`, which the classifier follows in both directions.
//! - **QUIC server names**: a QUIC v1/v2 client Initial to UDP 443 is
//!   decrypted with the keys its destination connection id gives away
//!   ([`crate::quic`]) and its CRYPTO frames put together (a post-quantum
//!   ClientHello spans two Initials, the second sent on request), then as TLS.
//!
//! What is not seen: DNS over TCP, TLS or HTTPS (DoT/DoH: a browser using its
//! own encrypted resolver; the TLS server name then still works), and TLS or
//! QUIC with Encrypted Client Hello (only the outer name is seen).
//!
//! Connections already cached by the classifier keep their class when an
//! address is learned or expires: new connections see the change.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::maps::{Array, HashMap as BpfHashMap, MapData, RingBuf};
use serde::{Deserialize, Serialize};
use shaper_common::{
    Bitmap, Event, HostKey, HostVal, BITMAP_WORDS, DIR_UP, EV_DNS, EV_TLS, HOST_DECIDED,
    HOST_WANT_MORE, MAP_BITMAPS, MAP_EVENTS, MAP_HOST_FLOWS, MAP_LEARNED4, MAP_LEARNED6, NO_RULE,
};
use tokio::{io::unix::AsyncFd, sync::watch};

use crate::{
    compile::{self, MapPlan, PacketView, Plan},
    config::{DnsSettings, Policy},
    dnswire,
    kernel::bpf::{self, Pins},
    sni,
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
            .filter(|(_, pats)| pats.iter().any(|p| dnswire::name_matches(p, name)))
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

/// Addresses learned from DNS answers, per host rule.
#[derive(Debug, Default)]
pub struct Table {
    settings: DnsSettings,
    entries: HashMap<IpAddr, BTreeMap<usize, Learn>>,
}

impl Table {
    pub fn new(settings: DnsSettings) -> Self {
        Table {
            settings,
            entries: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Records that `addr` was answered for `name`, which rule `rank`
    /// names, with `ttl` seconds. Returns the addresses whose rule set
    /// changed (this one when new, and any evicted to make room).
    pub fn learn(
        &mut self,
        now: Instant,
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
            // Full: the address that would expire first makes room.
            let victim = self
                .entries
                .iter()
                .min_by_key(|(_, rules)| rules.values().map(|l| l.expires).max())
                .map(|(a, _)| *a);
            if let Some(v) = victim {
                self.entries.remove(&v);
                changed.push(v);
            }
        }
        let rules = self.entries.entry(addr).or_default();
        let new = !rules.contains_key(&rank);
        let l = rules.entry(rank).or_insert_with(|| Learn {
            expires,
            name: name.to_string(),
        });
        // A later answer extends (never shortens) the entry's life.
        if expires > l.expires {
            l.expires = expires;
            l.name = name.to_string();
        }
        if new {
            changed.push(addr);
        }
        changed
    }

    /// Drops what has expired; returns the addresses whose rule set changed.
    pub fn expire(&mut self, now: Instant) -> Vec<IpAddr> {
        let mut changed = Vec::new();
        self.entries.retain(|a, rules| {
            let before = rules.len();
            rules.retain(|_, l| l.expires > now);
            if rules.len() != before {
                changed.push(*a);
            }
            !rules.is_empty()
        });
        changed
    }

    /// The host rules `addr` is learned for, ascending.
    pub fn rules_of(&self, addr: IpAddr) -> Vec<usize> {
        self.entries
            .get(&addr)
            .map(|r| r.keys().copied().collect())
            .unwrap_or_default()
    }

    pub fn has(&self, addr: IpAddr, rank: usize) -> bool {
        self.entries
            .get(&addr)
            .is_some_and(|r| r.contains_key(&rank))
    }

    /// (address, name, expiry) of every entry, for carrying over a reload.
    fn names(&self) -> Vec<(IpAddr, String, Instant)> {
        self.entries
            .iter()
            .flat_map(|(a, rules)| rules.values().map(|l| (*a, l.name.clone(), l.expires)))
            .collect()
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

/// An event's bytes as the classifier writes them to the ring buffer: the
/// connection `key` (from the site's side) and up to `EVENT_DATA` bytes of
/// `payload` (for tests, benchmarks and the soak).
pub fn event_bytes(kind: u32, dir: u32, key: HostKey, payload: &[u8]) -> Vec<u8> {
    let n = payload.len().min(shaper_common::EVENT_DATA);
    let mut ev = Event {
        kind,
        len: n as u32,
        dir,
        dscp: 0,
        key,
        data: [0; shaper_common::EVENT_DATA],
    };
    ev.data[..n].copy_from_slice(&payload[..n]);
    // SAFETY: Event is #[repr(C)] plain old data; the slice covers exactly one.
    unsafe {
        std::slice::from_raw_parts(
            &ev as *const Event as *const u8,
            std::mem::size_of::<Event>(),
        )
    }
    .to_vec()
}

/// Counters of what the host-name path did (shown by `shaper status` through
/// hosts.json).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HostStats {
    pub dns_answers: u64,
    pub dns_unparsed: u64,
    pub dns_addresses_learned: u64,
    pub tls_hellos: u64,
    pub tls_segments_joined: u64,
    /// QUIC client Initials read (first of a connection), and later ones joined.
    #[serde(default)]
    pub quic_initials: u64,
    #[serde(default)]
    pub quic_initials_joined: u64,
    pub sni_found: u64,
    pub sni_absent: u64,
    pub sni_unparsed: u64,
    pub sni_decided: u64,
    /// Addresses not installed: no bitmap slot left.
    pub no_room: u64,
    pub kernel_errors: u64,
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
    pub stats: HostStats,
    pub learned: Vec<LearnedEntry>,
    pub sni: Vec<SniEntry>,
}

/// Most connections whose ClientHello is being put together at once.
const MAX_PENDING: usize = 256;
/// Most bytes of one ClientHello kept.
const MAX_HELLO: usize = 16 * 1024;
/// A split ClientHello not completed in this time is given up.
const PENDING_FOR: Duration = Duration::from_secs(5);
/// SNI decisions listed in hosts.json (the most recent).
const MAX_SNI_LISTED: usize = 1024;

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
        .filter(|(_, r)| r.dns_names.iter().any(|p| dnswire::name_matches(p, name)))
        .map(|(i, _)| i)
        .collect();
    if by_name.is_empty() {
        return None;
    }
    let up = PacketView {
        dir: DIR_UP,
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
    pending: HashMap<HostKey, (Instant, Vec<u8>)>,
    /// QUIC connections whose ClientHello spans several Initials.
    quic_pending: HashMap<HostKey, (Instant, crate::quic::HelloAssembler)>,
    sni: Vec<SniEntry>,
    pub stats: HostStats,
    kernel: K,
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
        let maps = compile::maps(plan);
        let first = maps.bitmaps.len() as u32;
        Engine {
            policy: plan.policy.clone(),
            rules: HostRules::new(&plan.policy),
            table: Table::new(plan.policy.dns),
            slots: Slots {
                next: first,
                end: first + maps.spare_bitmaps,
                ..Default::default()
            },
            maps,
            installed: HashMap::new(),
            pending: HashMap::new(),
            quic_pending: HashMap::new(),
            sni: Vec::new(),
            stats: HostStats::default(),
            kernel,
        }
    }

    /// Re-learns what an engine over the previous policy knew (names are
    /// matched against this policy's rules).
    pub fn carry_over(&mut self, now: Instant, old: &Table) {
        for (addr, name, expires) in old.names() {
            let left = expires.saturating_duration_since(now).as_secs() as u32;
            if left == 0 {
                continue;
            }
            for rank in self.rules.matching(&name) {
                self.table.learn(now, addr, rank, &name, left);
            }
            self.sync(addr);
        }
    }

    /// One event from the ring buffer.
    pub fn on_event(&mut self, now: Instant, bytes: &[u8]) {
        if bytes.len() < std::mem::size_of::<Event>() {
            return;
        }
        // SAFETY: Event is plain old data and `bytes` holds at least one.
        let ev: Event = unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const Event) };
        let len = (ev.len as usize).min(ev.data.len());
        match ev.kind {
            EV_DNS => self.on_dns(now, &ev.data[..len]),
            EV_TLS if ev.dir == DIR_UP && ev.key.proto == 17 => {
                self.on_quic(now, ev.key, ev.dscp as u8, &ev.data[..len])
            }
            EV_TLS if ev.dir == DIR_UP => self.on_tls(now, ev.key, ev.dscp as u8, &ev.data[..len]),
            _ => {}
        }
    }

    fn on_dns(&mut self, now: Instant, payload: &[u8]) {
        let msg = match dnswire::parse_udp(payload) {
            Ok(m) => m,
            Err(e) => {
                self.stats.dns_unparsed += 1;
                log::debug!("DNS answer not understood: {e}");
                return;
            }
        };
        self.stats.dns_answers += 1;
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
        let mut changed = Vec::new();
        for (_, addr, ttl) in dnswire::resolve_chain(&msg) {
            for (&rank, name) in &by_rank {
                changed.extend(self.table.learn(now, addr, rank, name, ttl));
            }
            self.stats.dns_addresses_learned += 1;
        }
        changed.sort_unstable();
        changed.dedup();
        for a in changed {
            self.sync(a);
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
            Ok(sni::Sni::NeedMore(_))
                if bytes.len() < MAX_HELLO && self.pending.len() < MAX_PENDING =>
            {
                let want = HostVal {
                    rule: NO_RULE,
                    class: 0,
                    flags: HOST_WANT_MORE,
                    _pad: 0,
                };
                if self.kernel.set_host_flow(&key, want).is_ok() {
                    self.pending.insert(key, (now, bytes.to_vec()));
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
            Ok(sni::Sni::NeedMore(_)) if self.quic_pending.len() < MAX_PENDING => {
                let want = HostVal {
                    rule: NO_RULE,
                    class: 0,
                    flags: HOST_WANT_MORE,
                    _pad: 0,
                };
                if self.kernel.set_host_flow(&key, want).is_ok() {
                    self.quic_pending.insert(key, (now, asm));
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

    /// The rule a connection with this server name falls to, if the name is
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
            dir: DIR_UP,
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

    /// Expires addresses and gives up split ClientHellos that did not complete.
    pub fn tick(&mut self, now: Instant) {
        for a in self.table.expire(now) {
            self.sync(a);
        }
        let stale: Vec<HostKey> = self
            .pending
            .iter()
            .filter(|(_, (t, _))| now.duration_since(*t) > PENDING_FOR)
            .map(|(k, _)| *k)
            .collect();
        let stale_quic: Vec<HostKey> = self
            .quic_pending
            .iter()
            .filter(|(_, (t, _))| now.duration_since(*t) > PENDING_FOR)
            .map(|(k, _)| *k)
            .collect();
        for k in stale.into_iter().chain(stale_quic) {
            self.pending.remove(&k);
            self.quic_pending.remove(&k);
            let _ = self.kernel.del_host_flow(&k);
        }
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
            .flat_map(|(a, rules)| {
                rules.iter().map(move |(rank, l)| LearnedEntry {
                    addr: *a,
                    rule: self.policy.rules[*rank].name.clone(),
                    name: l.name.clone(),
                    expires_in_s: l.expires.saturating_duration_since(now).as_secs(),
                })
            })
            .collect();
        learned.sort_by(|a, b| (a.addr, &a.rule).cmp(&(b.addr, &b.rule)));
        Snapshot {
            stats: self.stats.clone(),
            learned,
            sni: self.sni.clone(),
        }
    }
}

/// The classifier's maps the engine writes: the running one's (pinned), or a
/// loaded object's (benchmarks, the soak).
pub struct MapKernel {
    pub bitmaps: Array<MapData, Bitmap>,
    pub learned4: BpfHashMap<MapData, [u8; 4], u32>,
    pub learned6: BpfHashMap<MapData, [u8; 16], u32>,
    pub host_flows: BpfHashMap<MapData, HostKey, HostVal>,
}

impl MapKernel {
    fn from(mut get: impl FnMut(&str) -> Result<aya::maps::Map>) -> Result<Self> {
        Ok(MapKernel {
            bitmaps: Array::try_from(get(MAP_BITMAPS)?)?,
            learned4: BpfHashMap::try_from(get(MAP_LEARNED4)?)?,
            learned6: BpfHashMap::try_from(get(MAP_LEARNED6)?)?,
            host_flows: BpfHashMap::try_from(get(MAP_HOST_FLOWS)?)?,
        })
    }

    /// The running classifier's maps, from their pins.
    pub fn open(pins: &Pins) -> Result<Self> {
        Self::from(|name| bpf::open_pinned(pins, name))
    }

    /// Empties the learned-address maps. A daemon started over shaping that is already in
    /// place (a restart keeps the maps) does not know the names and expiries behind what
    /// the last one learned, so could never expire or evict them: they go, as with a fresh
    /// apply, and the clients' next lookups refill them. Decided flows (`HOST_FLOWS`, an
    /// LRU map) stay.
    pub fn clear_learned(&mut self) -> Result<usize> {
        let v4: Vec<[u8; 4]> = self.learned4.keys().collect::<Result<_, _>>()?;
        let v6: Vec<[u8; 16]> = self.learned6.keys().collect::<Result<_, _>>()?;
        for k in &v4 {
            let _ = self.learned4.remove(k);
        }
        for k in &v6 {
            let _ = self.learned6.remove(k);
        }
        Ok(v4.len() + v6.len())
    }

    /// Takes the maps out of a loaded object (its program keeps its own
    /// references to them).
    pub fn take(obj: &mut aya::Ebpf) -> Result<Self> {
        Self::from(|name| {
            obj.take_map(name)
                .with_context(|| format!("map {name} missing from the object"))
        })
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

impl Kernel for MapKernel {
    fn write_bitmap(&mut self, slot: u32, words: &[u64]) -> Result<()> {
        let mut b: Bitmap = [0; BITMAP_WORDS];
        b[..words.len()].copy_from_slice(words);
        self.bitmaps
            .set(slot, b, 0)
            .context("writing a rule bitmap")
    }
    fn set_addr(&mut self, addr: IpAddr, id: u32) -> Result<()> {
        match addr {
            IpAddr::V4(a) => self.learned4.insert(a.octets(), id, 0),
            IpAddr::V6(a) => self.learned6.insert(a.octets(), id, 0),
        }
        .context("writing the learned addresses")
    }
    fn del_addr(&mut self, addr: IpAddr) -> Result<()> {
        match addr {
            IpAddr::V4(a) => self.learned4.remove(&a.octets()),
            IpAddr::V6(a) => self.learned6.remove(&a.octets()),
        }
        .context("removing from the learned addresses")
    }
    fn set_host_flow(&mut self, key: &HostKey, val: HostVal) -> Result<()> {
        self.host_flows
            .insert(key, val, 0)
            .context("writing the host-flow map")
    }
    fn del_host_flow(&mut self, key: &HostKey) -> Result<()> {
        self.host_flows
            .remove(key)
            .context("removing from the host-flow map")
    }
}

/// What the host task needs of an apply.
#[derive(Debug, Clone)]
pub struct HostsApplied {
    pub plan: Plan,
    pub pins: Pins,
}

/// Where `shaper run` writes the learned names (for `shaper status` and
/// `shaper explain`).
pub fn snapshot_path(run: &Path) -> PathBuf {
    run.join("hosts.json")
}

/// The daemon's host-name task: reads events while the applied policy has
/// host rules; every apply sends the new plan (the maps are new: the
/// learned addresses are installed again).
pub async fn run(mut applied: watch::Receiver<Option<HostsApplied>>, run_dir: PathBuf) {
    let mut carried: Option<Table> = None;
    loop {
        let current = applied.borrow_and_update().clone();
        let Some(a) = current.filter(|a| a.plan.policy.uses_hosts()) else {
            let _ = std::fs::remove_file(snapshot_path(&run_dir));
            if applied.changed().await.is_err() {
                return;
            }
            continue;
        };
        let opened = MapKernel::open(&a.pins).and_then(|k| {
            let ring = RingBuf::try_from(bpf::open_pinned(&a.pins, MAP_EVENTS)?)?;
            // SAFETY: the ring buffer's fd stays open as long as the AsyncFd owns it.
            let fd = unsafe { AsyncFd::register(ring) }.context("registering the event ring")?;
            Ok((k, fd))
        });
        let (mut kernel, mut ring) = match opened {
            Ok(x) => x,
            Err(e) => {
                log::error!("host names off until the next apply: {e:#}");
                if applied.changed().await.is_err() {
                    return;
                }
                continue;
            }
        };
        if carried.is_none() {
            match kernel.clear_learned() {
                Ok(0) => {}
                Ok(n) => log::info!(
                    "{n} learned address(es) left by an earlier daemon dropped (their names and expiries are not known here)"
                ),
                Err(e) => log::warn!("clearing the learned addresses: {e:#}"),
            }
        }
        let mut engine = Engine::new(&a.plan, kernel);
        if let Some(old) = carried.take() {
            engine.carry_over(Instant::now(), &old);
        }
        log::info!(
            "host names on: {} rule(s) watch DNS answers and TLS server names",
            engine.rules.rules.len()
        );
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let path = snapshot_path(&run_dir);
        let stop = loop {
            tokio::select! {
                r = ring.readable_mut() => {
                    let Ok(mut guard) = r else { break false };
                    let now = Instant::now();
                    let rb = guard.get_inner_mut();
                    while let Some(item) = rb.next() {
                        engine.on_event(now, &item);
                    }
                    guard.clear_ready();
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    engine.tick(now);
                    write_snapshot(&path, &engine.snapshot(now));
                }
                c = applied.changed() => break c.is_err(),
            }
        };
        carried = Some(std::mem::take(&mut engine.table));
        if stop {
            let _ = std::fs::remove_file(&path);
            return;
        }
    }
}

/// Reads what a running `shaper run` wrote; `None` when it wrote nothing
/// (no host rules, or not running).
pub fn read_snapshot(run: &Path) -> Option<Snapshot> {
    let b = std::fs::read(snapshot_path(run)).ok()?;
    serde_json::from_slice(&b).ok()
}

fn write_snapshot(path: &Path, s: &Snapshot) {
    let tmp = path.with_extension("json.next");
    let r = serde_json::to_vec_pretty(s)
        .map_err(anyhow::Error::from)
        .and_then(|b| std::fs::write(&tmp, b).map_err(Into::into))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(Into::into));
    if let Err(e) = r {
        log::debug!("writing {}: {e:#}", path.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;
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

    const BASE: &str = r#"
[interfaces]
wan = "wan0"
lan = "lan0"
[upload]
rate = "10mbit"
[download]
rate = "40mbit"
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
"#;

    fn plan(rules: &str) -> Plan {
        let p = config::parse(Path::new("t.toml"), &format!("{BASE}{rules}")).expect("valid");
        compile::plan(&p, None)
    }

    /// A DNS answer: `name` CNAME `target`, `target` A `addr`, TTLs given.
    fn answer(name: &str, target: &str, addr: [u8; 4], ttl: u32) -> Vec<u8> {
        let mut m = vec![0x12, 0x34, 0x81, 0x80, 0, 1, 0, 2, 0, 0, 0, 0];
        let enc = |n: &str| {
            let mut v = Vec::new();
            for l in n.split('.') {
                v.push(l.len() as u8);
                v.extend_from_slice(l.as_bytes());
            }
            v.push(0);
            v
        };
        m.extend(enc(name));
        m.extend([0, 1, 0, 1]);
        m.extend(enc(name));
        m.extend([0, 5, 0, 1]);
        m.extend(ttl.to_be_bytes());
        let t = enc(target);
        m.extend((t.len() as u16).to_be_bytes());
        m.extend(&t);
        m.extend(t);
        m.extend([0, 1, 0, 1]);
        m.extend(ttl.to_be_bytes());
        m.extend([0, 4]);
        m.extend(addr);
        m
    }

    fn event(kind: u32, data: &[u8]) -> Vec<u8> {
        event_bytes(
            kind,
            if kind == EV_DNS { 1 } else { 0 },
            HostKey::default(),
            data,
        )
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
        let ev = event(
            EV_DNS,
            &answer(
                "media.sfu.whereby.com",
                "edge.example.net",
                [192, 0, 2, 7],
                30,
            ),
        );
        e.on_event(t0, &ev);
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
        e.on_event(t0, &ev);
        e.tick(t0 + Duration::from_secs(59));
        assert!(e.table.has(addr, 0));
        e.tick(t0 + Duration::from_secs(61));
        assert!(!e.table.has(addr, 0));
        drop(e);
        assert!(!fake.addrs.contains_key(&addr), "removed from the trie");
    }

    #[test]
    fn a_rule_naming_a_cname_target_learns_and_keeps_it_across_a_reload() {
        let p = plan(
            "[[rule]]\nname = \"cdn\"\nclass = \"bulk\"\ndns_names = [\"edge.example.net\"]\n",
        );
        let mut fake = Fake::default();
        let mut e = Engine::new(&p, &mut fake);
        let t0 = Instant::now();
        let ev = event(
            EV_DNS,
            &answer(
                "media.sfu.whereby.com",
                "edge.example.net",
                [192, 0, 2, 9],
                600,
            ),
        );
        e.on_event(t0, &ev);
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
        let p = plan(
            "[[rule]]\nname = \"wb\"\nclass = \"video\"\ndns_names = [\"*.sfu.whereby.com\"]\n",
        );
        let mut fake = Fake::default();
        let mut e = Engine::new(&p, &mut fake);
        e.on_event(
            Instant::now(),
            &event(
                EV_DNS,
                &answer("www.example.com", "x.example.net", [198, 51, 100, 1], 300),
            ),
        );
        assert!(e.table.is_empty());
        drop(e);
        assert!(fake.addrs.is_empty());
    }

    #[test]
    fn the_table_is_bounded_and_the_soonest_to_expire_makes_room() {
        let mut t = Table::new(DnsSettings {
            min_ttl_s: 1,
            max_ttl_s: 1000,
            max_entries: 2,
        });
        let now = Instant::now();
        let a = |n| IpAddr::V4(Ipv4Addr::new(10, 0, 0, n));
        t.learn(now, a(1), 0, "a", 100);
        t.learn(now, a(2), 0, "b", 10);
        let changed = t.learn(now, a(3), 0, "c", 50);
        assert_eq!(t.len(), 2);
        assert!(
            changed.contains(&a(2)) && changed.contains(&a(3)),
            "{changed:?}"
        );
        assert!(t.has(a(1), 0) && t.has(a(3), 0) && !t.has(a(2), 0));
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
            dir: DIR_UP,
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
}
