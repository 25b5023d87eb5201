//! The four-namespace topology: lan host <-> gw (the product runs here) <-> modem (emulates
//! the copper line with TBF) <-> srv (the internet side).
//!
//! ```text
//!  lan: eth0 10.201.1.2   gw: lan0 10.201.1.1  wan0 10.201.2.1
//!                      modem: in0  10.201.2.2  out0 10.201.3.1   srv: eth0 10.201.3.2
//!  IPv6: fd00:201:<subnet>::<host>/64 with the same subnet/host numbers.
//! ```
//!
//! With a [`PathDelay`] ([`TopologyOptions::path`]) a fifth namespace, "wire", sits on
//! the internet side, between the modem's out0 and the server's eth0, and holds every frame
//! for half the base round trip (plus jitter) each way with a user-space
//! [`DelayLine`](crate::delayline::DelayLine) (the test kernels have no netem):
//!
//! ```text
//!  modem: out0 <-> w0  wire (no addresses, no forwarding, no IPv6)  w1 <-> eth0 :srv
//! ```
//!
//! The wire is transparent at L2: out0 and the server's eth0 stay one subnet and every
//! address and route is as without it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::delayline::{DelayConfig, DelayLine, DelayLineStats};
use crate::netns::Netns;

pub const LAN_HOST_V4: Ipv4Addr = Ipv4Addr::new(10, 201, 1, 2);
pub const GW_LAN_V4: Ipv4Addr = Ipv4Addr::new(10, 201, 1, 1);
pub const GW_WAN_V4: Ipv4Addr = Ipv4Addr::new(10, 201, 2, 1);
pub const MODEM_IN_V4: Ipv4Addr = Ipv4Addr::new(10, 201, 2, 2);
pub const MODEM_OUT_V4: Ipv4Addr = Ipv4Addr::new(10, 201, 3, 1);
pub const SRV_V4: Ipv4Addr = Ipv4Addr::new(10, 201, 3, 2);

pub const LAN_HOST_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x201, 1, 0, 0, 0, 0, 2);
pub const GW_LAN_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x201, 1, 0, 0, 0, 0, 1);
pub const GW_WAN_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x201, 2, 0, 0, 0, 0, 1);
pub const MODEM_IN_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x201, 2, 0, 0, 0, 0, 2);
pub const MODEM_OUT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x201, 3, 0, 0, 0, 0, 1);
pub const SRV_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x201, 3, 0, 0, 0, 0, 2);

/// Interface names inside the gateway namespace (what a shaper config names).
pub const GW_LAN_IF: &str = "lan0";
pub const GW_WAN_IF: &str = "wan0";
/// Interface names inside the modem namespace.
pub const MODEM_IN_IF: &str = "in0";
pub const MODEM_OUT_IF: &str = "out0";
/// Interface name of the lan host and of the server.
pub const HOST_IF: &str = "eth0";
/// Interfaces of the wire namespace (with a [`PathDelay`]): w0 faces the modem's out0, w1
/// the server's eth0.
pub const WIRE_MODEM_IF: &str = "w0";
pub const WIRE_SRV_IF: &str = "w1";

static VETH_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A copper access line as the modem presents it: a rate each way and the modem's buffer
/// (how many milliseconds of traffic it queues before dropping, the bufferbloat).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Line {
    pub down_bps: u64,
    pub up_bps: u64,
    pub buffer_ms: u32,
    /// ATM framing (ADSL): the modem counts each packet as the cells it takes on the
    /// copper, with this many bytes of encapsulation added to the IP packet (CAKE's
    /// convention, e.g. 10 for PPPoA VC-mux). `None`: bytes counted as they are.
    pub atm_overhead: Option<u16>,
}

impl Line {
    /// FTTC 40/10 Mbit/s with a 400 ms modem buffer (a typical UK VDSL2 line).
    pub const FTTC_40_10: Line = Line {
        down_bps: 40_000_000,
        up_bps: 10_000_000,
        buffer_ms: 400,
        atm_overhead: None,
    };
    /// ADSL2+ ~ 8/1 Mbit/s with a 600 ms buffer.
    pub const ADSL_8_1: Line = Line {
        down_bps: 8_000_000,
        up_bps: 1_000_000,
        buffer_ms: 600,
        atm_overhead: None,
    };

    /// TBF bucket size in bytes for `rate_bps`: 1 ms of line time but at least two full
    /// frames, so a real modem's packet-at-a-time pacing is approximated without dropping
    /// MTU-sized frames (TBF needs burst >= the largest packet; larger GSO packets are
    /// segmented by TBF itself).
    pub fn burst_bytes(rate_bps: u64) -> u64 {
        (rate_bps / 8 / 1000).max(2 * 1514)
    }

    /// TBF queue limit in bytes: `buffer_ms` of traffic at `rate_bps`.
    pub fn limit_bytes(&self, rate_bps: u64) -> u64 {
        (rate_bps / 8 * self.buffer_ms as u64 / 1000).max(3 * 1514)
    }
}

/// Segmentation offloads on the veths.
///
/// Measured here (tc reference shaper, FTTC 40/10): with kernel defaults the lan host's and
/// the server's TCP hand 64 KB GSO packets through veth unsegmented, HTB on the gateway
/// releases each as one burst and the modem queues it, so shaped video p99 was 13-17 ms; with
/// offloads off it was 1.5 ms. Between separate boxes every frame on the wire is one MTU, so
/// `Off` is the default; `SHAPER_TEST_OFFLOADS=on` selects the kernel defaults (closer to a
/// gateway with GRO on its LAN port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Offloads {
    /// Kernel defaults: the hosts' TCP builds up to 64 KB GSO packets that stay whole until
    /// the modem's TBF segments them.
    KernelDefault,
    /// `gso_max_size 1500 gso_max_segs 1` on every veth, so every packet is one MTU frame.
    #[default]
    Off,
}

impl Offloads {
    /// `SHAPER_TEST_OFFLOADS=on` -> kernel defaults; anything else -> off.
    pub fn from_env() -> Self {
        match std::env::var("SHAPER_TEST_OFFLOADS").as_deref() {
            Ok("on") => Offloads::KernelDefault,
            _ => Offloads::Off,
        }
    }
}

/// The internet path's base delay, emulated by a [`DelayLine`] in the "wire" namespace
/// between the modem and the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PathDelay {
    /// Base round trip: each direction holds frames for half of it.
    pub rtt: Duration,
    /// Jitter bound per direction: each frame gets a further uniform `[0, jitter]` (never
    /// reordered; see [`crate::delayline`]).
    pub jitter: Duration,
}

impl PathDelay {
    pub fn new(rtt: Duration, jitter: Duration) -> Self {
        PathDelay { rtt, jitter }
    }

    /// A round trip of `ms` milliseconds, no jitter.
    pub fn rtt_ms(ms: u64) -> Self {
        PathDelay::new(Duration::from_millis(ms), Duration::ZERO)
    }

    /// The base delay each way (half the round trip).
    pub fn one_way(&self) -> Duration {
        self.rtt / 2
    }
}

/// How to build a [`Topology`].
#[derive(Clone, Copy, Debug, Default)]
pub struct TopologyOptions {
    /// The line the modem emulates; `None` leaves the modem unshaped (veth speed).
    pub line: Option<Line>,
    pub offloads: Offloads,
    /// The internet path's base delay (a fifth namespace with a delay line between the
    /// modem and the server); `None`: the four-namespace lab.
    pub path: Option<PathDelay>,
}

/// The four namespaces (five with a [`PathDelay`]), wired and routed. Dropping it stops the
/// delay line and deletes all of them (and with them the veths and any processes the
/// harness started in them).
pub struct Topology {
    // Field order is drop order: the delay line's threads (and its sockets, which keep the
    // wire namespace alive) first, then the hosts.
    delay: Option<DelayLine>,
    pub lan: Netns,
    pub srv: Netns,
    pub gw: Netns,
    pub modem: Netns,
    /// The namespace between modem and server holding the delay line (with a path only).
    pub wire: Option<Netns>,
    line: Option<Line>,
    path: Option<PathDelay>,
    veth_names: Vec<String>,
}

impl Topology {
    /// lan <-> gw <-> modem(line) <-> srv, offloads per [`Offloads::from_env`].
    pub fn build(line: Option<Line>) -> Result<Topology> {
        Self::build_with(TopologyOptions {
            line,
            offloads: Offloads::from_env(),
            path: None,
        })
    }

    /// lan <-> gw <-> modem(line) [<-> wire(path delay)] <-> srv.
    pub fn build_with(opts: TopologyOptions) -> Result<Topology> {
        let path = opts.path;
        let mut topo = Topology {
            delay: None,
            lan: Netns::new("lan")?,
            srv: Netns::new("srv")?,
            gw: Netns::new("gw")?,
            modem: Netns::new("modem")?,
            wire: None,
            line: None,
            path: None,
            veth_names: Vec::new(),
        };
        if path.is_some() {
            let wire = Netns::new("wire")?;
            // Never an end point nor a router itself: no addresses (none are added), no
            // forwarding, no IPv6 (so no link-local addresses, no ND or MLD). Set before
            // its veths exist, so they inherit the defaults.
            wire.sysctl("net.ipv4.ip_forward", "0")?;
            wire.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
            wire.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
            topo.wire = Some(wire);
        }
        // No duplicate-address detection on the lab's links: with it, IPv6 is not
        // forwarded for ~2 s after the links come up (the routers' link-local
        // addresses are still tentative), and early v6 traffic stalls.
        for ns in [&topo.lan, &topo.srv, &topo.gw, &topo.modem] {
            ns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
            ns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
        }
        topo.wire(opts.offloads).context("wiring the topology")?;
        if let Some(line) = opts.line {
            topo.set_line(line)?;
        }
        if let (Some(path), Some(wire)) = (path, &topo.wire) {
            let line = DelayLine::start(
                wire,
                WIRE_MODEM_IF,
                WIRE_SRV_IF,
                DelayConfig::new(path.one_way(), path.jitter),
            )
            .context("starting the delay line")?;
            topo.delay = Some(line);
            topo.path = Some(path);
        }
        Ok(topo)
    }

    fn wire(&mut self, offloads: Offloads) -> Result<()> {
        let n = VETH_COUNTER.fetch_add(1, Ordering::Relaxed) & 0xfff;
        // Unique per run and per topology: "s<pid hex><n hex><pair><end>", <= 13 chars.
        let prefix = format!("s{:x}{:x}", std::process::id(), n);
        let mut links: Vec<(&Netns, &str, &Netns, &str)> = vec![
            (&self.lan, HOST_IF, &self.gw, GW_LAN_IF),
            (&self.gw, GW_WAN_IF, &self.modem, MODEM_IN_IF),
        ];
        match &self.wire {
            None => links.push((&self.modem, MODEM_OUT_IF, &self.srv, HOST_IF)),
            Some(wire) => {
                links.push((&self.modem, MODEM_OUT_IF, wire, WIRE_MODEM_IF));
                links.push((wire, WIRE_SRV_IF, &self.srv, HOST_IF));
            }
        }
        let mut names = Vec::new();
        for (i, (a_ns, a_if, b_ns, b_if)) in links.into_iter().enumerate() {
            let a_tmp = format!("{prefix}{i}a");
            let b_tmp = format!("{prefix}{i}b");
            debug_assert!(a_tmp.len() <= 15);
            // Created directly inside the namespaces, so nothing is ever left in the root one.
            crate::util::run(std::process::Command::new("ip").args([
                "link",
                "add",
                "name",
                &a_tmp,
                "netns",
                a_ns.name(),
                "type",
                "veth",
                "peer",
                "name",
                &b_tmp,
                "netns",
                b_ns.name(),
            ]))?;
            names.push(a_tmp.clone());
            names.push(b_tmp.clone());
            for (ns, tmp, final_name) in [(a_ns, &a_tmp, a_if), (b_ns, &b_tmp, b_if)] {
                ns.ip(&["link", "set", "dev", tmp, "name", final_name])?;
                if offloads == Offloads::Off {
                    ns.ip(&[
                        "link",
                        "set",
                        "dev",
                        final_name,
                        "gso_max_size",
                        "1500",
                        "gso_max_segs",
                        "1",
                    ])?;
                }
                ns.ip(&["link", "set", "dev", final_name, "up"])?;
            }
        }
        self.veth_names = names;

        let addr = |ns: &Netns, dev: &str, v4: Ipv4Addr, v6: Ipv6Addr| -> Result<()> {
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", dev])?;
            ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                dev,
                "nodad",
            ])?;
            Ok(())
        };
        addr(&self.lan, HOST_IF, LAN_HOST_V4, LAN_HOST_V6)?;
        addr(&self.gw, GW_LAN_IF, GW_LAN_V4, GW_LAN_V6)?;
        addr(&self.gw, GW_WAN_IF, GW_WAN_V4, GW_WAN_V6)?;
        addr(&self.modem, MODEM_IN_IF, MODEM_IN_V4, MODEM_IN_V6)?;
        addr(&self.modem, MODEM_OUT_IF, MODEM_OUT_V4, MODEM_OUT_V6)?;
        addr(&self.srv, HOST_IF, SRV_V4, SRV_V6)?;

        let default = |ns: &Netns, v4: Ipv4Addr, v6: Ipv6Addr| -> Result<()> {
            ns.ip(&["route", "add", "default", "via", &v4.to_string()])?;
            ns.ip(&["-6", "route", "add", "default", "via", &v6.to_string()])?;
            Ok(())
        };
        default(&self.lan, GW_LAN_V4, GW_LAN_V6)?;
        default(&self.gw, MODEM_IN_V4, MODEM_IN_V6)?;
        default(&self.srv, MODEM_OUT_V4, MODEM_OUT_V6)?;
        // The modem knows the site's subnet behind the gateway (no NAT in this lab).
        self.modem.ip(&[
            "route",
            "add",
            "10.201.1.0/24",
            "via",
            &GW_WAN_V4.to_string(),
        ])?;
        self.modem.ip(&[
            "-6",
            "route",
            "add",
            "fd00:201:1::/64",
            "via",
            &GW_WAN_V6.to_string(),
        ])?;

        for ns in [&self.gw, &self.modem] {
            ns.sysctl("net.ipv4.ip_forward", "1")?;
            ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        }
        Ok(())
    }

    /// Applies (or changes) the emulated line: TBF on the modem's out0 egress (upload) and
    /// in0 egress (download). With [`Line::atm_overhead`] the TBFs get a size table
    /// `stab linklayer atm overhead N-14`: the veth hands TBF the 14-byte Ethernet header
    /// with each packet, which the copper does not carry, so the table counts the IP packet
    /// plus N bytes in 53-byte cells, as an ADSL line does.
    pub fn set_line(&mut self, line: Line) -> Result<()> {
        let stab: Vec<String> = match line.atm_overhead {
            None => Vec::new(),
            Some(n) => ["stab", "linklayer", "atm", "overhead"]
                .iter()
                .map(|s| s.to_string())
                .chain([(i32::from(n) - 14).to_string()])
                .collect(),
        };
        for (dev, rate) in [(MODEM_OUT_IF, line.up_bps), (MODEM_IN_IF, line.down_bps)] {
            let rate_s = format!("{rate}bit");
            let burst = Line::burst_bytes(rate).to_string();
            let limit = line.limit_bytes(rate).to_string();
            let mut args: Vec<&str> = vec!["qdisc", "replace", "dev", dev, "root"];
            args.extend(stab.iter().map(String::as_str));
            args.extend(["tbf", "rate", &rate_s, "burst", &burst, "limit", &limit]);
            self.modem.run("tc", &args)?;
        }
        self.line = Some(line);
        Ok(())
    }

    pub fn line(&self) -> Option<Line> {
        self.line
    }

    /// The internet path's delay, when the topology was built with one.
    pub fn path(&self) -> Option<PathDelay> {
        self.path
    }

    /// Changes the path's round trip and jitter on the fly (for frames arriving from now
    /// on). Fails when the topology was built without a path (there is no wire namespace).
    pub fn set_path(&mut self, path: PathDelay) -> Result<()> {
        let line = self
            .delay
            .as_ref()
            .context("the topology was built without a path delay")?;
        line.set_delay(path.one_way(), path.jitter);
        self.path = Some(path);
        Ok(())
    }

    /// The delay line's counters: `[towards srv (w0 -> w1), towards the site (w1 -> w0)]`;
    /// `None` without a path.
    pub fn delay_stats(&self) -> Option<DelayLineStats> {
        self.delay.as_ref().map(DelayLine::stats)
    }

    /// The delay line itself (without a path: `None`).
    pub fn delay_line(&self) -> Option<&DelayLine> {
        self.delay.as_ref()
    }

    /// Names of the four namespaces, and the wire's with a path (for checking cleanup).
    pub fn namespace_names(&self) -> Vec<String> {
        [&self.lan, &self.gw, &self.modem, &self.srv]
            .into_iter()
            .chain(self.wire.as_ref())
            .map(|n| n.name().to_string())
            .collect()
    }

    /// The unique names the veths were created with (renamed inside the namespaces).
    pub fn veth_names(&self) -> &[String] {
        &self.veth_names
    }

    /// `tc qdisc show dev lan0` + `dev wan0` in the gateway, for before/after comparisons.
    pub fn gw_qdiscs(&self) -> Result<String> {
        let mut s = String::new();
        for dev in [GW_LAN_IF, GW_WAN_IF] {
            s.push_str(&format!("# {dev}\n"));
            s.push_str(&self.gw.run("tc", &["qdisc", "show", "dev", dev])?);
        }
        Ok(s)
    }

    /// The server's address as the lan host sees it.
    pub fn srv_addr(&self, v6: bool) -> IpAddr {
        if v6 {
            SRV_V6.into()
        } else {
            SRV_V4.into()
        }
    }

    /// Packets sent by `dev` in namespace `ns` (from `ip -s -j link`).
    /// Bytes the modem has put on the emulated copper so far: (upload, download), from
    /// the TX counters of its out0 (towards the internet) and in0 (towards the site).
    pub fn line_bytes(&self) -> Result<(u64, u64)> {
        let tx = |dev: &str| -> Result<u64> {
            let out = self.modem.ip(&["-s", "-j", "link", "show", "dev", dev])?;
            let v: serde_json::Value =
                serde_json::from_str(&out).context("parsing ip -j output")?;
            v[0]["stats64"]["tx"]["bytes"]
                .as_u64()
                .with_context(|| format!("no tx byte counter for {dev} in {out}"))
        };
        Ok((tx(MODEM_OUT_IF)?, tx(MODEM_IN_IF)?))
    }

    pub fn tx_packets(ns: &Netns, dev: &str) -> Result<u64> {
        let out = ns.ip(&["-s", "-j", "link", "show", "dev", dev])?;
        let v: serde_json::Value = serde_json::from_str(&out).context("parsing ip -j output")?;
        v[0]["stats64"]["tx"]["packets"]
            .as_u64()
            .with_context(|| format!("no tx packet counter for {dev} in {out}"))
    }
}
