//! The daemon's host-name task: the [`crate::hosts`] engine over the running
//! classifier's maps, fed from its two event rings, on a thread of its own.
//!
//! Why a thread: everything else `shaper run` does (the systemd watchdog, the health
//! checks, signals, arrival accounting, autorate, `/metrics`) runs on one
//! current-thread runtime, and what the engine is given to do is decided by whoever
//! sends DNS answers, ClientHellos and QUIC Initials through the box. On its own thread
//! (with its own current-thread runtime) a busy engine delays none of that: the two
//! cores are shared by the scheduler, not by cooperative yields that one slow parse or
//! one large snapshot could hold up. The engine is bounded as well:
//! - per event: an answer teaches at most [`crate::hosts::MAX_ANSWER_ADDRS`] addresses,
//!   every table operation is O(log n), a hello is at most 16 KiB;
//! - per batch: at most [`BATCH`] events from a ring before the clock, the applied
//!   policy and the other ring are looked at again;
//! - per second: DNS work and hello work (TLS parsing, QUIC key derivation and
//!   decryption) each get a time budget ([`DNS_BUDGET`], [`HELLO_BUDGET`]); beyond it
//!   their events are still read off the ring (so the newest keep coming) but dropped
//!   unprocessed and counted (`shed_dns`, `shed_hellos` in hosts.json). Learning is what
//!   gives way; the expiry of learned addresses and the snapshot run every second
//!   whatever arrives.
//!
//! DNS events have their own ring in the classifier (`DNS_EVENTS`), read before the
//! hello ring (`EVENTS`) and budgeted apart from it: a flood of hellos neither fills
//! the DNS ring nor spends the DNS budget.

use std::{
    net::IpAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::maps::{Array, HashMap as BpfHashMap, MapData, RingBuf};
use shaper_common::{
    Bitmap, HostKey, HostVal, BITMAP_WORDS, MAP_BITMAPS, MAP_DNS_EVENTS, MAP_EVENTS,
    MAP_HOST_FLOWS, MAP_LEARNED4, MAP_LEARNED6,
};
use tokio::{io::unix::AsyncFd, sync::watch};

use crate::{
    apply::Applied,
    hosts::{self, Budget, Engine, FairQueue, Kernel, Table},
    kernel::bpf::{self, Pins},
};

/// Most events taken from one ring before the loop looks at the clock, the applied
/// policy and the other ring again.
pub const BATCH: usize = 256;
/// Time per second the DNS work (queries, answers, learning) may take.
pub const DNS_BUDGET: Duration = Duration::from_millis(300);
/// Time per second the TLS and QUIC work may take.
pub const HELLO_BUDGET: Duration = Duration::from_millis(200);
/// Events read from a ring and waiting for their turn, at most (a DNS answer or a
/// hello is at most 1.5 KiB: 3 MiB per ring) ...
pub const MAX_QUEUED: usize = 2048;
/// ... and per LAN client.
pub const MAX_QUEUED_PER_CLIENT: usize = 256;
/// How often learned addresses expire and hosts.json is written.
const TICK: Duration = Duration::from_secs(1);

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

/// The daemon's host-name task: runs the engine on a thread of its own (see the
/// module's text) until `applied`'s sender is dropped; returns when that thread has
/// finished (hosts.json removed).
pub async fn run(applied: watch::Receiver<Option<Applied>>, run_dir: PathBuf) {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("shaper-hosts".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(engine_loop(applied, run_dir)),
                Err(e) => log::error!("host names off: starting their runtime: {e}"),
            }
            let _ = done_tx.send(());
        });
    if let Err(e) = spawned {
        log::error!("host names off: starting their thread: {e}");
        return;
    }
    if done_rx.await.is_err() {
        log::error!("the host-name thread stopped unexpectedly; host names are off");
    }
}

/// The two rings, registered with the runtime.
struct Rings {
    dns: AsyncFd<RingBuf<MapData>>,
    hello: AsyncFd<RingBuf<MapData>>,
}

fn open(a: &Applied) -> Result<(MapKernel, Rings)> {
    let k = MapKernel::open(&a.pins)?;
    let ring = |name: &str| -> Result<AsyncFd<RingBuf<MapData>>> {
        let r = RingBuf::try_from(bpf::open_pinned(&a.pins, name)?)?;
        // SAFETY: the ring buffer's fd stays open as long as the AsyncFd owns it.
        unsafe { AsyncFd::register(r) }.with_context(|| format!("registering the {name} ring"))
    };
    Ok((
        k,
        Rings {
            dns: ring(MAP_DNS_EVENTS)?,
            hello: ring(MAP_EVENTS)?,
        },
    ))
}

/// Moves at most [`BATCH`] events from `ring` into `queue` (what the queue sheds is
/// counted); true if the ring may hold more.
fn fill<K: Kernel>(
    engine: &mut Engine<K>,
    ring: &mut RingBuf<MapData>,
    queue: &mut FairQueue,
) -> bool {
    for _ in 0..BATCH {
        let Some(item) = ring.next() else {
            return false;
        };
        let ev = item.to_vec();
        drop(item);
        if let Some(shed) = queue.push(ev) {
            engine.shed(&shed);
        }
    }
    true
}

/// Hands at most [`BATCH`] queued events to the engine, client by client in turn,
/// while `budget` allows; true if the budget would allow more and some wait.
fn work<K: Kernel>(engine: &mut Engine<K>, queue: &mut FairQueue, budget: &mut Budget) -> bool {
    for _ in 0..BATCH {
        let now = Instant::now();
        if queue.is_empty() || !budget.allows(now) {
            return false;
        }
        if let Some(ev) = queue.pop() {
            engine.on_event(now, &ev);
            budget.charge(now.elapsed());
        }
    }
    true
}

/// Reads events while the applied policy has host rules; every apply sends the new
/// plan (the maps are new: the learned addresses are installed again).
async fn engine_loop(mut applied: watch::Receiver<Option<Applied>>, run_dir: PathBuf) {
    let mut carried: Option<Table> = None;
    let path = hosts::snapshot_path(&run_dir);
    loop {
        let current = applied.borrow_and_update().clone();
        let Some(a) = current.filter(|a| a.plan.policy.uses_hosts()) else {
            let _ = std::fs::remove_file(&path);
            if applied.changed().await.is_err() {
                return;
            }
            continue;
        };
        let (mut kernel, mut rings) = match open(&a) {
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
            "host names on: {} rule(s) watch DNS answers to queries from the LAN and TLS/QUIC server names",
            engine.host_rules()
        );
        let mut dns_budget = Budget::new(DNS_BUDGET);
        let mut hello_budget = Budget::new(HELLO_BUDGET);
        let mut dns_queue = FairQueue::new(MAX_QUEUED, MAX_QUEUED_PER_CLIENT);
        let mut hello_queue = FairQueue::new(MAX_QUEUED, MAX_QUEUED_PER_CLIENT);
        let mut next_tick = Instant::now();
        let stop = loop {
            // Whatever the rings hold goes into the queues (a batch each), then a
            // batch of work from each within its budget (DNS first), then the clock.
            let mut busy = fill(&mut engine, rings.dns.get_mut(), &mut dns_queue);
            busy |= fill(&mut engine, rings.hello.get_mut(), &mut hello_queue);
            busy |= work(&mut engine, &mut dns_queue, &mut dns_budget);
            busy |= work(&mut engine, &mut hello_queue, &mut hello_budget);
            let now = Instant::now();
            if now >= next_tick {
                engine.tick(now);
                hosts::write_snapshot(&path, &engine.snapshot(now));
                next_tick = now + TICK;
            }
            match applied.has_changed() {
                Ok(false) => {}
                Ok(true) => break false,
                Err(_) => break true,
            }
            if busy {
                tokio::task::yield_now().await;
                continue;
            }
            // Both rings were read empty: the kernel wakes a reader that has caught up
            // (readiness is cleared before the next reads, so nothing is missed). What
            // waits in a queue waits for its budget's next second.
            let mut wake = next_tick;
            for (q, b) in [(&dns_queue, &dns_budget), (&hello_queue, &hello_budget)] {
                if let Some(t) = b.reopens().filter(|_| !q.is_empty()) {
                    wake = wake.min(t);
                }
            }
            tokio::select! {
                biased;
                c = applied.changed() => break c.is_err(),
                _ = tokio::time::sleep_until(wake.into()) => {}
                g = rings.dns.readable_mut() => {
                    if let Ok(mut g) = g {
                        g.clear_ready();
                    }
                }
                g = rings.hello.readable_mut() => {
                    if let Ok(mut g) = g {
                        g.clear_ready();
                    }
                }
            }
        };
        carried = Some(std::mem::take(&mut engine.table));
        if stop {
            let _ = std::fs::remove_file(&path);
            return;
        }
    }
}
