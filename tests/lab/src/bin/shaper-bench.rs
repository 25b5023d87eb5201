//! `cargo xtask bench`: prints tables, asserts nothing.
//!
//! 1. Classifier cost per packet through BPF_PROG_TEST_RUN (the kernel's own timing, mean
//!    of `REPEAT` runs, median of `ROUNDS` rounds): the empty program (the floor) and the
//!    classifier with 10, 1,000 and 10,000 rules, for a packet that matches the first rule,
//!    one that matches the last rule, and one that matches none (the full bitmap scan).
//!    Then, over the 1,000-rule policy: a DNS answer and a ClientHello copied to the event
//!    ring (read in batches, read at every event so each wakes the reader, never read),
//!    a connection decided by its server name (a `HOST_FLOWS` hit), flow-cache hits with
//!    flow behaviour (demotion, promotion) off and on, and the scan with 0, 1,000 and
//!    10,000 addresses learned from DNS answers through `hosts::Engine`. Last, `[calls]`: an
//!    RTP packet of a stream the classifier measures (repeated: a duplicate after the
//!    first; and in order, one run a call) and RTP-looking noise, against the same packets
//!    with the measurement off. (The other rows' policy measures no class: `[calls]
//!    classes = []`.)
//! 2. Reloads: wall time of 20 `shaper apply` reloads (p50/p99) with 10 and 1,000 rules, in a
//!    gateway namespace with no line emulation.
//! 3. Forwarding: small UDP packets from one unpaced sender lan -> gw -> srv for 5 s, counted at
//!    the receiver, without the shaper and with it at 10gbit (nothing is shaped: the figure is
//!    the classifier + HTB path cost).
//! 4. The namespace busy-hour scenario on FTTC 40/10 with and without the shaper
//!    (`--no-scenario` skips it).

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};
use shaper_common::{
    HostKey, HostVal, GLOBAL_COUNTERS, HOST_DECIDED, MAP_EVENTS, MAP_GLOBAL_STATS, MAP_HOST_FLOWS,
};
use shaper_tests::dns::scattered_v4;
use shaper_tests::packet::{dns, Pkt};
use shaper_tests::phases::{self, Phases};
use shaper_tests::stats;
use shaper_tests::topology::{GW_LAN_IF, GW_WAN_IF, HOST_IF, SRV_V4};
use shaper_tests::{
    Line, Offloads, Scenario, Shaper, ShaperConfig, TempDir, Topology, TopologyOptions,
};
use shaper_user::hosts::{event_bytes, Engine};
use shaper_user::hosts_task::MapKernel;
use shaper_user::{compile, config, kernel::bpf};

const REPEAT: u32 = 200_000;
const ROUNDS: usize = 5;

/// `[calls]` of [`policy_text`]: no class's RTP is measured (without the table the class
/// named `video` would be, and the rows' UDP filler payloads look like RTP), so the rows
/// time what they always did; [`media_rows`] turns it on.
const NO_CALLS: &str = "[calls]\nclasses = []\n";

fn policy_text(n: usize) -> String {
    let mut t = String::from(
        "[interfaces]\nwan = \"lo\"\nlan = \"bench-lan\"\n[upload]\nrate = \"10mbit\"\n[download]\nrate = \"40mbit\"\n\
         [calls]\nclasses = []\n\
         [[class]]\nname = \"video\"\npriority = 0\nguaranteed = \"30%\"\n\
         [[class]]\nname = \"images\"\npriority = 1\nguaranteed = \"30%\"\n\
         [[class]]\nname = \"default\"\npriority = 2\nguaranteed = \"30%\"\ndefault = true\n",
    );
    for i in 0..n {
        t.push_str(&format!(
            "[[rule]]\nname = \"r{i}\"\nclass = \"{}\"\nprotocol = \"udp\"\ndst_ports = [{}]\n",
            if i % 2 == 0 { "video" } else { "images" },
            10_000 + i
        ));
        if i % 10 == 0 {
            t.push_str(&format!(
                "dst_cidrs = [\"10.{}.{}.0/24\", \"2001:db8:{:x}::/48\"]\n",
                (i / 256) % 256,
                i % 256,
                i
            ));
        } else if i % 10 == 1 {
            t.push_str(&format!(
                "src_ports = [\"{}-{}\"]\n",
                20_000 + i,
                20_100 + i
            ));
        }
    }
    t
}

fn parse_policy(text: &str) -> config::Policy {
    config::parse(Path::new("bench.toml"), text).unwrap_or_else(|e| panic!("bench policy: {e}"))
}

fn policy(n: usize) -> config::Policy {
    parse_policy(&policy_text(n))
}

/// The nearest-rank median of `ROUNDS` (odd: the middle) timings.
fn median(v: Vec<Duration>) -> Duration {
    stats::median(&v).unwrap_or_default()
}

/// The empty program's cost (BPF_PROG_TEST_RUN's own): the floor the tables subtract.
fn empty_floor() -> anyhow::Result<Duration> {
    let floor_pkt = Pkt::udp("192.168.1.10", "198.51.100.7", 5000, 9_999).build();
    Ok(median(
        (0..ROUNDS)
            .map(|_| bpf::test_run_empty(&floor_pkt, REPEAT).map(|r| r.duration))
            .collect::<Result<_, _>>()?,
    ))
}

fn classifier_table() -> anyhow::Result<()> {
    let cases = |n: usize| -> Vec<(&'static str, Vec<u8>)> {
        let last = 10_000 + n as u16 - 1;
        vec![
            (
                "first rule",
                Pkt::udp("192.168.1.10", "10.0.0.5", 5000, 10_000).build(),
            ),
            (
                "last rule",
                Pkt::udp("192.168.1.10", "198.51.100.7", 5000, last).build(),
            ),
            (
                "no match (full scan)",
                Pkt::udp("192.168.1.10", "198.51.100.7", 5000, 9_999).build(),
            ),
            (
                "ipv6, no match",
                Pkt::udp("fd00::10", "2001:db8:1::5", 5000, 9_999).build(),
            ),
        ]
    };
    let floor = empty_floor()?;
    println!("classifier cost per packet (BPF_PROG_TEST_RUN, mean of {REPEAT} runs, median of {ROUNDS} rounds)");
    println!("`flow` = a flow's later packets (flow cache hit); `first` = a flow's first packet (cache off: the full rule scan)");
    println!(
        "{:<12} {:<22} {:>10} {:>10} {:>13} {:>9} {:>7}",
        "rules", "packet", "flow ns", "first ns", "first-empty", "bitmaps", "words"
    );
    println!(
        "{:<12} {:<22} {:>10} {:>10} {:>13} {:>9} {:>7}",
        "empty prog",
        "udp",
        floor.as_nanos(),
        floor.as_nanos(),
        "-",
        "-",
        "-"
    );
    for n in [10usize, 1_000, 10_000] {
        let pol = policy(n);
        let plan = compile::plan(&pol, None);
        let maps = compile::maps(&plan);
        let flags = shaper_common::CFG_WAN_L2 | shaper_common::CFG_LAN_L2;
        // WAN = lo (ifindex 1): every run classifies as upload.
        let mut cached = bpf::load(&maps, 1, u32::MAX, flags)?;
        let mut uncached = bpf::load(&maps, 1, u32::MAX, flags | shaper_common::CFG_NO_FLOW_CACHE)?;
        for (label, pkt) in cases(n) {
            let time = |obj: &mut aya::Ebpf| -> anyhow::Result<std::time::Duration> {
                Ok(median(
                    (0..ROUNDS)
                        .map(|_| bpf::test_run(obj, &pkt, 1, REPEAT).map(|r| r.duration))
                        .collect::<Result<_, _>>()?,
                ))
            };
            let hit = time(&mut cached)?;
            let miss = time(&mut uncached)?;
            println!(
                "{:<12} {:<22} {:>10} {:>10} {:>13} {:>9} {:>7}",
                n,
                label,
                hit.as_nanos(),
                miss.as_nanos(),
                miss.as_nanos() as i128 - floor.as_nanos() as i128,
                maps.bitmaps.len(),
                maps.nwords
            );
        }
    }
    host_rows(floor)?;
    media_rows(floor)
}

/// A real DNS answer (dnsmasq: CNAME, CNAME, A, EDNS; 137 bytes) and a real ClientHello
/// (curl with ALPN and padding, SNI `pacs.example.nhs.uk`; 517 bytes).
const DNS_ANSWER: &[u8] = include_bytes!("../../../fixtures/dns/media-a.bin");
const CLIENT_HELLO: &[u8] = include_bytes!("../../../fixtures/tls/curl-sni.bin");
/// Runs per BPF_PROG_TEST_RUN call when the event ring is read between calls: fewer
/// events than the 256 KiB ring holds (167 of 1,568 bytes), so every run's reserve
/// succeeds.
const EVENT_REPEAT: u32 = 128;
/// `drained`: `REPEAT` runs a round in calls of `EVENT_REPEAT`, each call primed (the
/// reader one event behind: no wake-ups, as in a burst of events).
const BATCHED: (u32, u32, bool) = (EVENT_REPEAT, REPEAT / EVENT_REPEAT, true);
/// `woken`: single runs, each finding the ring read empty: the kernel wakes the reader
/// (irq_work) at every event, as it does for a daemon that keeps up with sparse events.
const SINGLE: (u32, u32, bool) = (1, 20_000, false);
/// The host-name rule's patterns (the fixtures' names and the synthetic answers').
const HOST_NAMES: &str = "[\"*.example.test\", \"*.sfu.whereby.com\", \"pacs.example.nhs.uk\"]";

/// `policy_text(n)` plus one host-name rule, last (class video), keeping up to 32,768
/// learned addresses for a day.
fn hosts_text(n: usize) -> String {
    format!(
        "{}[[rule]]\nname = \"hosts\"\nclass = \"video\"\ndns_names = {HOST_NAMES}\n\
         [dns]\nmin_ttl = 86400\nmax_entries = 32768\n",
        policy_text(n)
    )
}

/// `policy_text(n)` with flow behaviour: video flows demoted after 1000 GB (counted,
/// never demoted here), images flows after 1 byte (demoted at their second packet),
/// default-class UDP flows promoted to video.
fn behaviour_text(n: usize) -> String {
    format!(
        "{}[promote]\nclass = \"video\"\n",
        policy_text(n)
            .replacen(
                "name = \"video\"\n",
                "name = \"video\"\ndemote_to = \"default\"\ndemote_after = \"1000GB\"\n",
                1,
            )
            .replacen(
                "name = \"images\"\n",
                "name = \"images\"\ndemote_to = \"default\"\ndemote_after = \"1B\"\n",
                1,
            )
    )
}

/// A per-direction global counter of a loaded classifier (summed over CPUs).
fn global(obj: &aya::Ebpf, dir: u32, counter: u32) -> anyhow::Result<u64> {
    let m: PerCpuArray<_, u64> =
        PerCpuArray::try_from(obj.map(MAP_GLOBAL_STATS).context("GLOBAL_STATS missing")?)?;
    Ok(m.get(&(dir * GLOBAL_COUNTERS + counter), 0)?.iter().sum())
}

/// Median over `ROUNDS` of the kernel's mean of `REPEAT` runs.
fn time_runs(obj: &mut aya::Ebpf, pkt: &[u8], ifindex: u32) -> anyhow::Result<Duration> {
    Ok(median(
        (0..ROUNDS)
            .map(|_| bpf::test_run(obj, pkt, ifindex, REPEAT).map(|r| r.duration))
            .collect::<Result<_, _>>()?,
    ))
}

/// Like [`time_runs`], in `calls` calls of `per_call` runs a round, with the event ring
/// (if given) read empty after each call; returns the time and the events read. With
/// `prime`, an untimed run before each call leaves one event unread, so the timed runs
/// find the reader behind and do not wake it.
fn time_drained(
    obj: &mut aya::Ebpf,
    mut ring: Option<&mut RingBuf<MapData>>,
    pkt: &[u8],
    ifindex: u32,
    (per_call, calls, prime): (u32, u32, bool),
) -> anyhow::Result<(Duration, u64)> {
    let mut drain = || {
        let mut n = 0u64;
        if let Some(r) = ring.as_deref_mut() {
            while r.next().is_some() {
                n += 1;
            }
        }
        n
    };
    drain();
    let mut events = 0;
    let mut rounds = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let mut sum = Duration::ZERO;
        for _ in 0..calls {
            if prime {
                bpf::test_run(obj, pkt, ifindex, 1)?;
            }
            sum += bpf::test_run(obj, pkt, ifindex, per_call)?.duration;
            events += drain();
        }
        rounds.push(sum / calls);
    }
    Ok((median(rounds), events))
}

/// A classifier with the flow cache and one without, `lo` (ifindex 1) on the given side.
fn load_pair(maps: &compile::MapPlan, lo_is_lan: bool) -> anyhow::Result<[aya::Ebpf; 2]> {
    let (wan, lan) = if lo_is_lan {
        (u32::MAX, 1)
    } else {
        (1, u32::MAX)
    };
    let flags = shaper_common::CFG_WAN_L2 | shaper_common::CFG_LAN_L2;
    Ok([
        bpf::load(maps, wan, lan, flags)?,
        bpf::load(maps, wan, lan, flags | shaper_common::CFG_NO_FLOW_CACHE)?,
    ])
}

fn take_ring(obj: &mut aya::Ebpf) -> anyhow::Result<RingBuf<MapData>> {
    let m = obj.take_map(MAP_EVENTS).context("EVENTS missing")?;
    Ok(RingBuf::try_from(m)?)
}

/// One row of the classifier table; `None` prints `-`.
fn row(
    rules: &str,
    label: &str,
    flow: Option<Duration>,
    first: Option<Duration>,
    floor: Duration,
    maps: &compile::MapPlan,
) {
    let ns = |d: Option<Duration>| d.map_or("-".to_string(), |d| d.as_nanos().to_string());
    println!(
        "{:<12} {:<22} {:>10} {:>10} {:>13} {:>9} {:>7}",
        rules,
        label,
        ns(flow),
        ns(first),
        first.map_or("-".to_string(), |d| (d.as_nanos() as i128
            - floor.as_nanos() as i128)
            .to_string()),
        maps.bitmaps.len(),
        maps.nwords
    );
}

/// Rows for a packet that is copied to the event ring: under the plain policy (no copy),
/// then with host names with the ring drained in batches, drained at every run, and full.
/// Returns the `+hosts` pair (its ring full) for more rows.
fn event_rows(
    what: &str,
    pkt: &[u8],
    (plain, hosts): (&compile::MapPlan, &compile::MapPlan),
    floor: Duration,
    notes: &mut Vec<String>,
    down: bool,
) -> anyhow::Result<[aya::Ebpf; 2]> {
    use shaper_common::{G_EVENTS, G_EVENTS_LOST};
    let dir = if down {
        shaper_common::DIR_DOWN
    } else {
        shaper_common::DIR_UP
    };
    {
        let [mut hit, mut miss] = load_pair(plain, down)?;
        let (h, m) = (time_runs(&mut hit, pkt, 1)?, time_runs(&mut miss, pkt, 1)?);
        row("1000", what, Some(h), Some(m), floor, plain);
        // Controls: the same packet timed the ways `drained` and `woken` are.
        let (bh, _) = time_drained(&mut hit, None, pkt, 1, BATCHED)?;
        let (bm, _) = time_drained(&mut miss, None, pkt, 1, BATCHED)?;
        let (sh, _) = time_drained(&mut hit, None, pkt, 1, SINGLE)?;
        let (sm, _) = time_drained(&mut miss, None, pkt, 1, SINGLE)?;
        notes.push(format!(
            "control, `1000 {what}` (nothing copied) timed as `drained` is: {} / {} ns, as `woken` is: {} / {} ns",
            bh.as_nanos(),
            bm.as_nanos(),
            sh.as_nanos(),
            sm.as_nanos()
        ));
    }
    let [mut hit, mut miss] = load_pair(hosts, down)?;
    let (mut ring_hit, mut ring_miss) = (take_ring(&mut hit)?, take_ring(&mut miss)?);
    for (how, calls) in [("drained", BATCHED), ("woken", SINGLE)] {
        let (ev0, lost0) = (
            global(&hit, dir, G_EVENTS)?,
            global(&hit, dir, G_EVENTS_LOST)?,
        );
        let (h, read_h) = time_drained(&mut hit, Some(&mut ring_hit), pkt, 1, calls)?;
        let (m, read_m) = time_drained(&mut miss, Some(&mut ring_miss), pkt, 1, calls)?;
        let (ev1, lost1) = (
            global(&hit, dir, G_EVENTS)?,
            global(&hit, dir, G_EVENTS_LOST)?,
        );
        row(
            "1000+hosts",
            &format!("{what}, {how}"),
            Some(h),
            Some(m),
            floor,
            hosts,
        );
        let primed = if calls.2 {
            format!(" and {} untimed priming runs", calls.1 * ROUNDS as u32)
        } else {
            String::new()
        };
        notes.push(format!(
            "{what}, {how}: {} timed runs per column in calls of {}{primed}; flow column: {} events, {} lost, {read_h} read; first column: {read_m} read",
            calls.0 * calls.1 * ROUNDS as u32,
            calls.0,
            ev1 - ev0,
            lost1 - lost0,
        ));
    }
    let (ev0, lost0) = (
        global(&hit, dir, G_EVENTS)?,
        global(&hit, dir, G_EVENTS_LOST)?,
    );
    let (h, m) = (time_runs(&mut hit, pkt, 1)?, time_runs(&mut miss, pkt, 1)?);
    let (ev1, lost1) = (
        global(&hit, dir, G_EVENTS)?,
        global(&hit, dir, G_EVENTS_LOST)?,
    );
    row(
        "1000+hosts",
        &format!("{what}, ring full"),
        Some(h),
        Some(m),
        floor,
        hosts,
    );
    notes.push(format!(
        "{what}, ring full: {} runs per column; flow column: {} events (until the ring filled), {} lost",
        REPEAT * ROUNDS as u32,
        ev1 - ev0,
        lost1 - lost0
    ));
    Ok([hit, miss])
}

/// The host-name and flow-behaviour rows: DNS answers and ClientHellos copied to the
/// event ring, a connection decided by its server name, flow-cache hits that count the
/// flow's bytes, and the rule scan with 0, 1,000 and 10,000 learned addresses in the trie.
fn host_rows(floor: Duration) -> anyhow::Result<()> {
    const N: usize = 1_000;
    use shaper_common::{DIR_DOWN, DIR_UP, G_HOST_FLOW_HIT};
    let plain = policy(N);
    let plain_maps = compile::maps(&compile::plan(&plain, None));
    let hosts = parse_policy(&hosts_text(N));
    let hosts_plan = compile::plan(&hosts, None);
    let hosts_maps = compile::maps(&hosts_plan);
    let host_rule = hosts
        .rules
        .iter()
        .position(|r| !r.dns_names.is_empty())
        .context("no host-name rule")?;
    let video = hosts.rules[host_rule].class;
    let mut notes: Vec<String> = Vec::new();

    println!(
        "\nhost names and flow behaviour (the {N}-rule policy above; `+hosts`: one host-name rule after them, \
         `dns_names = {HOST_NAMES}`; `+behav`: video flows measured for demotion, images flows demoted, [promote])"
    );
    println!(
        "`drained`: the event ring is read after every call of {EVENT_REPEAT} runs, so every run copies its event, and one event is \
         left unread before each call, so none wakes the reader (a burst); `woken`: single runs, the ring read empty after each, so \
         every event also wakes the reader (a daemon keeping up with sparse events); `ring full`: nothing reads it, every run fails \
         to reserve and counts events_lost"
    );
    println!(
        "{:<12} {:<22} {:>10} {:>10} {:>13} {:>9} {:>7}",
        "rules", "packet", "flow ns", "first ns", "first-empty", "bitmaps", "words"
    );

    // DNS answers: UDP from a resolver's port 53 to a LAN client, on LAN egress (lo = LAN).
    let dns = Pkt::udp("192.0.2.53", "192.168.1.10", 53, 40001).with_payload(DNS_ANSWER);
    event_rows(
        "dns answer",
        &dns,
        (&plain_maps, &hosts_maps),
        floor,
        &mut notes,
        true,
    )?;
    // ClientHellos: the first data segment of a TCP connection to 443, on WAN egress.
    let hello = Pkt::tcp("192.168.1.10", "203.0.113.5", 40000, 443).with_payload(CLIENT_HELLO);
    let [mut hit, mut miss] = event_rows(
        "tls hello",
        &hello,
        (&plain_maps, &hosts_maps),
        floor,
        &mut notes,
        false,
    )?;

    // A later segment of the same connection: undecided (HOST_FLOWS miss, then the flow
    // cache or the scan), then decided by its server name (HOST_FLOWS hit).
    let segment = {
        let mut p = Pkt::tcp("192.168.1.10", "203.0.113.5", 40000, 443);
        p.payload = 1200;
        p.build()
    };
    let (h, m) = (
        time_runs(&mut hit, &segment, 1)?,
        time_runs(&mut miss, &segment, 1)?,
    );
    row(
        "1000+hosts",
        "tcp 443, undecided",
        Some(h),
        Some(m),
        floor,
        &hosts_maps,
    );
    let mut key = HostKey {
        sport: 40000,
        dport: 443,
        proto: 6,
        family: 4,
        ..Default::default()
    };
    key.src[..4].copy_from_slice(&[192, 168, 1, 10]);
    key.dst[..4].copy_from_slice(&[203, 0, 113, 5]);
    let val = HostVal {
        rule: host_rule as u32,
        class: video as u32,
        flags: HOST_DECIDED,
        _pad: 0,
    };
    for obj in [&mut hit, &mut miss] {
        let mut m: BpfHashMap<_, HostKey, HostVal> =
            BpfHashMap::try_from(obj.map_mut(MAP_HOST_FLOWS).context("HOST_FLOWS missing")?)?;
        m.insert(key, val, 0)?;
    }
    let hits0 = global(&hit, DIR_UP, G_HOST_FLOW_HIT)?;
    let (h, m) = (
        time_runs(&mut hit, &segment, 1)?,
        time_runs(&mut miss, &segment, 1)?,
    );
    let hits1 = global(&hit, DIR_UP, G_HOST_FLOW_HIT)?;
    let got = bpf::test_run(&mut hit, &segment, 1, 1)?.priority;
    row(
        "1000+hosts",
        "tcp 443, host flow hit",
        Some(h),
        Some(m),
        floor,
        &hosts_maps,
    );
    notes.push(format!(
        "tcp 443, host flow hit: {} host_flow_hits counted of {} runs; class {} ({})",
        hits1 - hits0,
        REPEAT * ROUNDS as u32,
        hosts.classes[video].name,
        if got == compile::classid_of(&hosts, video) {
            "as decided".to_string()
        } else {
            format!("WRONG: priority {got:#x}")
        }
    ));
    drop((hit, miss));

    // Flow-cache hits with flow behaviour off and on (the `first` column does not apply:
    // without the cache nothing is measured).
    let behaviour = parse_policy(&behaviour_text(N));
    let behaviour_maps = compile::maps(&compile::plan(&behaviour, None));
    let video_flow = Pkt::udp("192.168.1.10", "10.0.0.5", 5000, 10_000).build();
    let images_flow = Pkt::udp("192.168.1.10", "198.51.100.7", 5000, 10_003).build();
    let default_flow = Pkt::udp("192.168.1.10", "198.51.100.7", 5000, 9_999).build();
    {
        let [mut hit, _] = load_pair(&plain_maps, false)?;
        for (label, pkt) in [
            ("video flow", &video_flow),
            ("images flow", &images_flow),
            ("no match (default)", &default_flow),
        ] {
            let h = time_runs(&mut hit, pkt, 1)?;
            row(&N.to_string(), label, Some(h), None, floor, &plain_maps);
        }
    }
    {
        let [mut hit, _] = load_pair(&behaviour_maps, false)?;
        use shaper_common::{G_DEMOTED, G_PROMOTED};
        for (label, pkt) in [
            ("video flow, measured", &video_flow),
            ("images flow, demoted", &images_flow),
            ("no match, promotable", &default_flow),
        ] {
            let h = time_runs(&mut hit, pkt, 1)?;
            row("1000+behav", label, Some(h), None, floor, &behaviour_maps);
        }
        notes.push(format!(
            "behaviour: {} flow(s) demoted, {} promoted",
            global(&hit, DIR_UP, G_DEMOTED)?,
            global(&hit, DIR_UP, G_PROMOTED)?
        ));
    }

    // Learned addresses: a host-name engine over the loaded maps learns `k` addresses
    // from as many DNS answers for distinct names, scattered over 198.18.0.0/15 (as
    // addresses from DNS are scattered, not one block); then a packet to a learned
    // address (it matches the host-name rule, the last), one to an address of the same
    // /15 that is never learned and one to an address far from them (both match
    // nothing), all to UDP 9999 (no other rule's port).
    let learned = scattered_v4(500);
    let unlearned = scattered_v4(10_001);
    let elsewhere = Ipv4Addr::new(198, 51, 100, 7);
    let [mut hit, mut miss] = load_pair(&hosts_maps, false)?;
    // The maps the engine writes, taken out of each object once (each stage's engine
    // adds to what the earlier stages left).
    let kernels = [
        std::rc::Rc::new(std::cell::RefCell::new(MapKernel::take(&mut hit)?)),
        std::rc::Rc::new(std::cell::RefCell::new(MapKernel::take(&mut miss)?)),
    ];
    for (stage, k) in [0usize, 1_000, 10_000].into_iter().enumerate() {
        let events: Vec<Vec<u8>> = (0..k)
            .flat_map(|i| {
                let answer = dns::answer(
                    i as u16,
                    &format!("h{i}.example.test"),
                    &[scattered_v4(i as u32).into()],
                    3600,
                );
                // The query it answers goes out first: only answers to queries count.
                let query = shaper_user::dnswire::query_of(&answer).expect("a question");
                [
                    event_bytes(
                        shaper_common::EV_DNS_QUERY,
                        DIR_UP,
                        HostKey::default(),
                        &query,
                    ),
                    event_bytes(shaper_common::EV_DNS, DIR_DOWN, HostKey::default(), &answer),
                ]
            })
            .collect();
        let now = Instant::now();
        for kernel in &kernels {
            let mut engine = Engine::new(&hosts_plan, kernel.clone());
            for e in &events {
                engine.on_event(now, e);
            }
            if engine.table.len() != k || engine.stats.no_room + engine.stats.kernel_errors > 0 {
                notes.push(format!(
                    "WARNING: {k} answers gave {} learned addresses ({} without room, {} kernel errors)",
                    engine.table.len(),
                    engine.stats.no_room,
                    engine.stats.kernel_errors
                ));
            }
        }
        let fed = now.elapsed();
        // A new source port each stage: the cached decisions of earlier stages do not serve.
        let sport = 5000 + stage as u16;
        let to = |a: Ipv4Addr| Pkt::udp("192.168.1.10", &a.to_string(), sport, 9_999).build();
        let label = |what: &str| {
            if k == 0 {
                format!("{what}, 0 dns")
            } else {
                format!("{what}, {}k dns", k / 1000)
            }
        };
        let mut classes = Vec::new();
        for (what, addr) in [
            ("learned", learned),
            ("unlearned", unlearned),
            ("elsewhere", elsewhere),
        ] {
            let pkt = to(addr);
            let (h, m) = (
                time_runs(&mut hit, &pkt, 1)?,
                time_runs(&mut miss, &pkt, 1)?,
            );
            row(
                "1000+hosts",
                &label(what),
                Some(h),
                Some(m),
                floor,
                &hosts_maps,
            );
            let got = bpf::test_run(&mut miss, &pkt, 1, 1)?.priority;
            let name = (0..hosts.classes.len())
                .find(|&i| compile::classid_of(&hosts, i) == got)
                .map_or(format!("{got:#x}"), |i| hosts.classes[i].name.clone());
            classes.push(format!("{what} -> {name}"));
        }
        notes.push(format!(
            "{k} learned addresses (fed through hosts::Engine into both objects in {:.0} ms): {}",
            fed.as_secs_f64() * 1e3,
            classes.join(", ")
        ));
    }
    println!(
        "  (`N dns`: N addresses learned from DNS answers, scattered over 198.18.0.0/15; `learned`: to one of them \
         (the host-name rule, the last: a full scan), `unlearned`: to one of that /15 never learned, `elsewhere`: \
         to 198.51.100.7 (both match nothing); at `0 dns` `learned` is not learned yet)"
    );
    for n in &notes {
        println!("  {n}");
    }
    Ok(())
}

/// Rounds of [`media_rows`]: each times every row with the measurement on and off.
const MEDIA_ROUNDS: usize = 21;
/// Runs a call in [`media_rows`]' repeated rows.
const MEDIA_REPEAT: u32 = 50_000;
/// Calls (BPF_PROG_TEST_RUN) a round of [`media_rows`]' in-sequence row.
const SEQ_CALLS: u16 = 5_000;
/// The SSRC of [`rtp_frame`]'s stream.
const BENCH_SSRC: u32 = 0x5eed_0017;

/// An RTP packet (G.711 µ-law: static type 0, 8 kHz, 20 ms) of `ssrc` in the flow that
/// matches the first rule (video), 160 bytes of payload. A static type's clock is known
/// from the stream's start, so every counted packet runs the whole update, the jitter
/// included (a dynamic type's clock is estimated over seconds of arrivals, which the
/// test runs, microseconds apart, never give).
fn rtp_frame(ssrc: u32, seq: u16) -> Vec<u8> {
    let mut b = vec![0x80, 0];
    b.extend(seq.to_be_bytes());
    b.extend((u32::from(seq) * 160).to_be_bytes());
    b.extend(ssrc.to_be_bytes());
    b.extend([0x5a; 160]);
    Pkt::udp("192.168.1.10", "10.0.0.5", 5000, 10_000).with_payload(&b)
}

/// An SSRC other than [`BENCH_SSRC`] whose stream in [`rtp_frame`]'s flow has the same
/// `MEDIA_SLOTS` slot: the classifier keeps it in `MEDIA` (the hash map).
fn colliding_ssrc() -> u32 {
    use shaper_common::media::{media_slot, MediaKey};
    let key = |ssrc| MediaKey {
        lan: v4_bytes("192.168.1.10"),
        peer: v4_bytes("10.0.0.5"),
        lan_port: 5000,
        peer_port: 10_000,
        ssrc,
        dir: shaper_common::DIR_UP as u8,
        family: 4,
        flags: 0,
        _pad: 0,
    };
    let slot = media_slot(&key(BENCH_SSRC));
    (1..)
        .find(|&s| s != BENCH_SSRC && media_slot(&key(s)) == slot)
        .expect("some SSRC shares the slot")
}

fn v4_bytes(a: &str) -> [u8; 16] {
    let mut b = [0; 16];
    b[..4].copy_from_slice(&a.parse::<Ipv4Addr>().expect("IPv4 address").octets());
    b
}

/// Turns the measurement on or off in a loaded object's `CONFIG` (`CFG_MEDIA`; its
/// classes stay as they are).
fn set_media(obj: &mut aya::Ebpf, on: bool) -> anyhow::Result<()> {
    let mut a: aya::maps::Array<_, shaper_common::Config> = aya::maps::Array::try_from(
        obj.map_mut(shaper_common::MAP_CONFIG)
            .context("CONFIG missing")?,
    )?;
    let mut c = a.get(&0, 0)?;
    if on {
        c.flags |= shaper_common::CFG_MEDIA;
    } else {
        c.flags &= !shaper_common::CFG_MEDIA;
    }
    a.set(0, c, 0)?;
    Ok(())
}

/// `[calls]`: the cost of measuring an RTP packet, over the 1,000-rule policy with flow
/// behaviour (as the shipped example measures it) and `[calls] classes = ["video"]`: one
/// object per column (`flow`: the flow cache; `first`: none, every packet matched
/// afresh), each timed with the measurement on (`CFG_MEDIA`) and off in its `CONFIG`, so
/// that both sides run the same program over the same maps. `rtp dup`: a packet of a
/// followed stream (in its slot; in the `flow` column found by the hint in the flow's
/// cache entry, in `first`, which has no cache, by its key's hash and compare)
/// `MEDIA_REPEAT` times a call (after the first, each a duplicate: the lookup and the
/// shortest update); `rtp in order`: one run a call, each
/// the stream's next packet (the full update, the jitter included), the mean of the
/// kernel's single-run timings over `SEQ_CALLS` calls (a single run's timing carries more
/// of the test run's overhead than the floor: compare these rows with each other); `rtp
/// dup, in MEDIA`: as `rtp dup` for a stream of the same flow whose slot the first took
/// (the hash map's path); `rtp-like noise`: the tables' UDP filler (its first byte says
/// RTP version 2) in another video flow: the probation path, a stream never. Each of
/// `MEDIA_ROUNDS` rounds times every row both ways, on first in even rounds and off first
/// in odd ones, and a cost is the median of the rounds' differences, so that load from
/// elsewhere on the machine falls on both sides alike.
fn media_rows(floor: Duration) -> anyhow::Result<()> {
    use shaper_common::media::{MediaStream, MAP_MEDIA, MAP_MEDIA_SLOTS};
    const N: usize = 1_000;
    // With flow behaviour measured (the shipped example's video class is: `demote_above`),
    // whose clock read the measurement reuses; a policy without it pays one more read.
    let text = behaviour_text(N).replacen(NO_CALLS, "[calls]\nclasses = [\"video\"]\n", 1);
    anyhow::ensure!(
        text.contains("[\"video\"]"),
        "the bench policy has no [calls]"
    );
    // One plan: `off` is the same object with CFG_MEDIA cleared in its CONFIG (`set_media`).
    let plan = compile::maps(&compile::plan(&parse_policy(&text), None));
    let other = colliding_ssrc();
    println!(
        "\n[calls]: RTP in the video class (the {N}-rule policy with flow behaviour (`+behav` above), first rule), measured (`on`: \
         `[calls] classes = [\"video\"]`) or not (`off`: CFG_MEDIA cleared in the same object); `rtp dup`: a packet of a followed \
         stream (in its slot: flow, by the flow entry's hint; first, by its key) {MEDIA_REPEAT} times a call (duplicates), `rtp in order`: one run a call, the stream's next packet \
         each ({SEQ_CALLS} calls a round), `rtp dup, in MEDIA`: as `rtp dup` for SSRC {other:#x} of the same flow, whose slot \
         SSRC {BENCH_SSRC:#x} holds (the hash map), `rtp-like noise`: the filler payload above (version 2, never a stream) \
         {MEDIA_REPEAT} times a call; medians of {MEDIA_ROUNDS} rounds"
    );
    println!(
        "{:<12} {:<22} {:>10} {:>10} {:>13} {:>9} {:>7}",
        "rules", "packet", "flow ns", "first ns", "first-empty", "bitmaps", "words"
    );
    let mut objs = load_pair(&plan, false)?;
    // Two packets in sequence validate a stream (the first goes on probation): the
    // bench's stream takes its slot, the other's is taken.
    for obj in &mut objs {
        for ssrc in [BENCH_SSRC, other] {
            for seq in 0..2 {
                bpf::test_run(obj, &rtp_frame(ssrc, seq), 1, 1)?;
            }
        }
    }
    let dup_hashed = rtp_frame(other, 2);
    let noise = Pkt::udp("192.168.1.10", "10.0.0.5", 5001, 10_000).build();
    let mut frame = rtp_frame(BENCH_SSRC, 3);
    let at = frame.len() - 172;
    let mut next = [3u16; 2];
    const KINDS: [&str; 4] = [
        "rtp dup",
        "rtp in order",
        "rtp dup, in MEDIA",
        "rtp-like noise",
    ];
    // [round][kind][object][off, on].
    let mut t = vec![[[[Duration::ZERO; 2]; 2]; 4]; MEDIA_ROUNDS];
    for (r, rt) in t.iter_mut().enumerate() {
        for (i, obj) in objs.iter_mut().enumerate() {
            let order = if r % 2 == 0 { [1, 0] } else { [0, 1] };
            for m in order {
                set_media(obj, m == 1)?;
                // The stream's highest packet so far: a duplicate each time.
                let dup = rtp_frame(BENCH_SSRC, next[i].wrapping_sub(1));
                rt[0][i][m] = bpf::test_run(obj, &dup, 1, MEDIA_REPEAT)?.duration;
                let mut sum = Duration::ZERO;
                for _ in 0..SEQ_CALLS {
                    // Off, the packets are not measured: the stream's next one is the same.
                    let seq = next[i];
                    frame[at + 2..at + 4].copy_from_slice(&seq.to_be_bytes());
                    frame[at + 4..at + 8].copy_from_slice(&(u32::from(seq) * 160).to_be_bytes());
                    sum += bpf::test_run(obj, &frame, 1, 1)?.duration;
                    if m == 1 {
                        next[i] = seq.wrapping_add(1);
                    }
                }
                rt[1][i][m] = sum / u32::from(SEQ_CALLS);
                rt[2][i][m] = bpf::test_run(obj, &dup_hashed, 1, MEDIA_REPEAT)?.duration;
                rt[3][i][m] = bpf::test_run(obj, &noise, 1, MEDIA_REPEAT)?.duration;
            }
        }
    }
    let med = |k: usize, i: usize, m: usize| median(t.iter().map(|rt| rt[k][i][m]).collect());
    for (k, how) in KINDS.into_iter().enumerate() {
        for (label, m) in [("off", 0), ("on", 1)] {
            row(
                "1000+calls",
                &format!("{how}, {label}"),
                Some(med(k, 0, m)),
                Some(med(k, 1, m)),
                floor,
                &plan,
            );
        }
    }
    let cost = |k: usize, i: usize| {
        let mut d: Vec<i128> = t
            .iter()
            .map(|rt| rt[k][i][1].as_nanos() as i128 - rt[k][i][0].as_nanos() as i128)
            .collect();
        d.sort();
        d[MEDIA_ROUNDS / 2]
    };
    let costs: Vec<String> = KINDS
        .iter()
        .enumerate()
        .map(|(k, how)| format!("{how} {} / {} ns", cost(k, 0), cost(k, 1)))
        .collect();
    println!(
        "  the measurement's cost (flow / first; the median over the rounds of on minus off): {}",
        costs.join(", ")
    );
    for (name, obj) in ["flow", "first"].iter().zip(&objs) {
        let streams: Vec<MediaStream> = bpf::media_streams(
            obj.map(MAP_MEDIA).context("MEDIA missing")?,
            obj.map(MAP_MEDIA_SLOTS),
        )?
        .into_iter()
        .map(|(_, s)| s)
        .collect();
        let each: Vec<String> = streams
            .iter()
            .map(|s| {
                format!(
                    "{} received, {} lost, {} duplicates, {} reordered",
                    s.received,
                    s.lost(),
                    s.duplicates,
                    s.reordered
                )
            })
            .collect();
        println!(
            "  {name}: {}",
            match each.len() {
                2 => format!("two streams: {}", each.join("; ")),
                n => format!("WARNING: {n} streams (two expected): {}", each.join("; ")),
            }
        );
    }
    Ok(())
}

/// A gateway config for the lab's `wan0`/`lan0` at `rate` each way with `n` UDP port rules
/// (and the video rule on UDP 50020); `variant` 1 moves the guarantees and ceilings, so
/// alternating 0 and 1 changes every class in place.
fn gw_config(rate: &str, n: usize, variant: u32) -> String {
    let (v, d, b) = if variant == 0 {
        ((30, 100), (40, 100), (10, 100))
    } else {
        ((50, 90), (20, 80), (5, 50))
    };
    let mut t = format!(
        "[interfaces]\nwan = \"{GW_WAN_IF}\"\nlan = \"{GW_LAN_IF}\"\n[upload]\nrate = \"{rate}\"\n[download]\nrate = \"{rate}\"\n"
    );
    for (name, prio, (g, c), default) in [
        ("video", 0, v, false),
        ("default", 4, d, true),
        ("bulk", 7, b, false),
    ] {
        t.push_str(&format!(
            "[[class]]\nname = \"{name}\"\npriority = {prio}\nguaranteed = \"{g}%\"\nceiling = \"{c}%\"\n"
        ));
        if default {
            t.push_str("default = true\n");
        }
    }
    t.push_str(
        "[[rule]]\nname = \"video\"\nclass = \"video\"\nprotocol = \"udp\"\ndst_ports = [50020]\n",
    );
    for i in 0..n.saturating_sub(1) {
        t.push_str(&format!(
            "[[rule]]\nname = \"r{i}\"\nclass = \"{}\"\nprotocol = \"udp\"\ndst_ports = [{}]\n",
            if i % 2 == 0 { "video" } else { "bulk" },
            10_000 + i
        ));
        if i % 10 == 0 {
            t.push_str(&format!(
                "dst_cidrs = [\"10.{}.{}.0/24\"]\n",
                100 + (i / 256) % 100,
                i % 256
            ));
        }
    }
    t
}

fn lab() -> anyhow::Result<Topology> {
    Topology::build_with(TopologyOptions {
        line: None,
        offloads: Offloads::Off,
        ..Default::default()
    })
}

/// Wall time of `reloads` `shaper apply` runs alternating two configs with `n` rules.
fn reload_times(n: usize, reloads: usize) -> anyhow::Result<(Duration, Vec<Duration>)> {
    let topo = lab()?;
    let dir = TempDir::new("bench-reload")?;
    let cfgs = [
        dir.write("a.toml", &gw_config("100mbit", n, 0))?,
        dir.write("b.toml", &gw_config("100mbit", n, 1))?,
    ];
    let mut shaper = Shaper::new(&topo.gw)?;
    let t = Instant::now();
    shaper.apply(&cfgs[0])?;
    let first = t.elapsed();
    let mut times = Vec::with_capacity(reloads);
    for i in 0..reloads {
        let cfg = &cfgs[(i + 1) % 2];
        let t = Instant::now();
        let out = shaper
            .command(&[std::ffi::OsStr::new("apply"), cfg.as_os_str()])
            .output()?;
        times.push(t.elapsed());
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = err.trim_end().lines().rev().take(10).collect();
            bail!(
                "reload {} with {n} rules failed ({}):\n{}",
                i + 1,
                out.status,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
    shaper.remove()?;
    times.sort();
    Ok((first, times))
}

fn reload_table() -> anyhow::Result<()> {
    const RELOADS: usize = 20;
    println!("\nreload (`shaper apply` as a process, wall time; {RELOADS} reloads alternating two configs that change every class in place; no line emulation)");
    println!(
        "{:<8} {:>14} {:>10} {:>10} {:>10} {:>10}",
        "rules", "first apply", "p50", "p99", "min", "max"
    );
    for n in [10usize, 1_000] {
        let (first, t) = reload_times(n, RELOADS)?;
        let f = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
        println!(
            "{:<8} {:>14} {:>10} {:>10} {:>10} {:>10}",
            n,
            f(first),
            f(stats::nearest_rank(&t, 50.0).unwrap_or_default()),
            f(stats::nearest_rank(&t, 99.0).unwrap_or_default()),
            f(t[0]),
            f(t[t.len() - 1])
        );
    }
    Ok(())
}

/// Received-packet counter of `dev` in `ns`.
fn rx_packets(ns: &shaper_tests::Netns, dev: &str) -> anyhow::Result<u64> {
    let out = ns.ip(&["-s", "-j", "link", "show", "dev", dev])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("parsing ip -j output")?;
    v[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .with_context(|| format!("no rx packet counter for {dev}"))
}

struct Forwarded {
    sent_pps: f64,
    /// Delivered to the server's interface (forwarded by gw and modem).
    at_srv_pps: f64,
    /// Read by the receiving socket.
    received_pps: f64,
    send_errors: u64,
}

/// One unpaced sender in lan, 18-byte UDP payloads to srv for `dur`; counted at srv.
fn forward(topo: &Topology, dur: Duration) -> anyhow::Result<Forwarded> {
    let addr = SocketAddr::new(SRV_V4.into(), 50020);
    let rx = topo.srv.within(move || Ok(UdpSocket::bind(addr)?))?;
    shaper_tests::gateway::force_rcvbuf(&rx, 16 << 20);
    rx.set_read_timeout(Some(Duration::from_millis(100)))?;
    let tx = topo.lan.within(move || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.connect(addr)?;
        Ok(s)
    })?;
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    let receiver = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let mut n = 0u64;
        let mut idle = 0;
        loop {
            match rx.recv(&mut buf) {
                Ok(_) => {
                    n += 1;
                    idle = 0;
                }
                Err(_) if d.load(Ordering::Relaxed) => {
                    idle += 1;
                    if idle >= 3 {
                        break;
                    }
                }
                Err(_) => {}
            }
        }
        n
    });
    let srv0 = rx_packets(&topo.srv, HOST_IF)?;
    let pkt = [0x5au8; 18];
    let (mut sent, mut errors) = (0u64, 0u64);
    let t = Instant::now();
    while t.elapsed() < dur {
        for _ in 0..64 {
            match tx.send(&pkt) {
                Ok(_) => sent += 1,
                Err(_) => errors += 1,
            }
        }
    }
    let secs = t.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(200));
    let at_srv = rx_packets(&topo.srv, HOST_IF)? - srv0;
    done.store(true, Ordering::Relaxed);
    let received = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))?;
    Ok(Forwarded {
        sent_pps: sent as f64 / secs,
        at_srv_pps: at_srv as f64 / secs,
        received_pps: received as f64 / secs,
        send_errors: errors,
    })
}

fn forwarding_table(secs: u64) -> anyhow::Result<()> {
    let dur = Duration::from_secs(secs);
    println!("\nforwarding lan -> gw -> modem -> srv (one unpaced sender, 18-byte UDP payloads, {secs} s each; no line emulation)");
    println!(
        "{:<36} {:>12} {:>14} {:>14} {:>8}",
        "gateway", "sent pps", "at srv pps", "received pps", "vs none"
    );
    let topo = lab()?;
    let dir = TempDir::new("bench-forward")?;
    let cfg = dir.write("fast.toml", &gw_config("10gbit", 10, 0))?;
    let none = forward(&topo, dur)?;
    // The qdisc alone: a textbook HTB root at the same rate, everything in its default class.
    for dev in [GW_WAN_IF, GW_LAN_IF] {
        topo.gw.run(
            "tc",
            &[
                "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "2",
            ],
        )?;
        topo.gw.run(
            "tc",
            &[
                "class", "add", "dev", dev, "parent", "1:", "classid", "1:2", "htb", "rate",
                "10gbit",
            ],
        )?;
    }
    let htb_only = forward(&topo, dur)?;
    for dev in [GW_WAN_IF, GW_LAN_IF] {
        topo.gw.run("tc", &["qdisc", "del", "dev", dev, "root"])?;
    }
    let mut shaper = Shaper::new(&topo.gw)?;
    shaper.apply(&cfg)?;
    let with = forward(&topo, dur)?;
    let st = shaper.status_json()?;
    shaper.remove()?;
    let video = &st["directions"][0]["classes"][0];
    for (label, f) in [
        ("no shaper", &none),
        ("tc HTB only, 10gbit, no classifier", &htb_only),
        ("shaper, 10gbit, 10 rules (video)", &with),
    ] {
        println!(
            "{:<36} {:>12.0} {:>14.0} {:>14.0} {:>7.1}%{}",
            label,
            f.sent_pps,
            f.at_srv_pps,
            f.received_pps,
            100.0 * f.at_srv_pps / none.at_srv_pps,
            if f.send_errors > 0 {
                format!("  ({} send errors)", f.send_errors)
            } else {
                String::new()
            }
        );
    }
    println!(
        "  (with the shaper: video class classified {} packets, HTB 1:10 sent {})",
        video["classified_packets"], video["packets"]
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!(
            "shaper-bench [--classifier-only] [--calls-only] [--seconds N] [--forward-seconds N] [--no-scenario]\n  \
             --classifier-only    only the classifier cost table (BPF_PROG_TEST_RUN; with the host-name rows)\n  \
             --calls-only         only the classifier's [calls] rows (an RTP packet measured or not)\n  \
             --seconds N          namespace scenario length per phase (default 20)\n  \
             --forward-seconds N  forwarding measurement length (default 5)\n  \
             --no-scenario        skip the namespace scenario\n\
             Root only; prints tables, asserts nothing."
        );
        return Ok(());
    }
    let classifier_only = args.iter().any(|a| a == "--classifier-only");
    if args.iter().any(|a| a == "--calls-only") {
        return media_rows(empty_floor()?);
    }
    let secs = shaper_tests::util::arg_value(&args, "--seconds")
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let forward_secs = shaper_tests::util::arg_value(&args, "--forward-seconds")
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    classifier_table()?;
    if classifier_only {
        return Ok(());
    }
    reload_table()?;
    forwarding_table(forward_secs)?;
    if args.iter().any(|a| a == "--no-scenario") {
        return Ok(());
    }
    println!("\nnamespace scenario (FTTC 40/10, 400 ms modem buffer; 4+4 bulk TCP, image upload on TCP 104, 50 pps x 1000 B video each way)");
    let line = Line::FTTC_40_10;
    let scenario = Scenario {
        duration: Duration::from_secs(secs),
        ..Default::default()
    };
    let report = phases::run(
        line,
        ShaperConfig::gp_surgery(&line),
        scenario,
        Phases::Compare,
    )?;
    println!("{}", report.table());
    for p in &report.problems {
        println!("problem: {p}");
    }
    Ok(())
}
