//! The site file (`shaper site`): the box goes into a network as a bridge or a router, by
//! the site's own file, through netlink. Three namespaces: the site's router (`rtr`), the
//! box (`gw`, two NICs named eth0/eth1 as a fresh box has them) and a LAN host (`host`).
//! Bridge mode: the router and the host share one subnet and keep their addresses; the box
//! forwards between them, answers on its management address, and shapes bridged frames.
//!
//! The site files are written inline: their text is what these tests are about.

use serde_json::Value;
use shaper_tests::config::{Config, Rule};
use shaper_tests::{probe, skip_unless_ready, Netns, Shaper, TempDir};

/// What these tests run besides the shaper.
const TOOLS: &[&str] = &["ip", "nsenter", "sysctl", "ping", "nft"];

const RTR: &str = "10.10.0.1";
const HOST: &str = "10.10.0.2";
const MGMT: &str = "10.10.0.3";
const WAN_MAC: &str = "02:5a:00:00:00:01";

struct Site {
    rtr: Netns,
    gw: Netns,
    host: Netns,
}

/// rtr.eth0 -- gw.eth0 (the WAN port, MAC `WAN_MAC`), gw.eth1 -- host.eth0.
fn site() -> Site {
    let s = Site {
        rtr: Netns::new("site-rtr").expect("netns"),
        gw: Netns::new("site-gw").expect("netns"),
        host: Netns::new("site-host").expect("netns"),
    };
    let link = shaper_tests::gateway::veth_between;
    link(&s.rtr, "eth0", &s.gw, "eth0");
    link(&s.gw, "eth1", &s.host, "eth0");
    s.gw.ip(&["link", "set", "eth0", "address", WAN_MAC])
        .unwrap();
    for (ns, a) in [(&s.rtr, RTR), (&s.host, HOST)] {
        ns.ip(&["addr", "add", &format!("{a}/24"), "dev", "eth0"])
            .unwrap();
        ns.ip(&["link", "set", "eth0", "up"]).unwrap();
    }
    s
}

fn links(ns: &Netns) -> Vec<Value> {
    let out = ns.ip(&["-d", "-j", "link", "show"]).expect("ip link");
    serde_json::from_str(&out).expect("ip -j")
}

fn link<'a>(all: &'a [Value], name: &str) -> Option<&'a Value> {
    all.iter().find(|l| l["ifname"] == name)
}

fn addrs(ns: &Netns, dev: &str) -> String {
    ns.ip(&["-o", "addr", "show", "dev", dev])
        .unwrap_or_default()
}

fn shaper_site(ns: &Netns, args: &[&str]) -> std::process::Output {
    ns.cmd(Shaper::binary_path(), args)
        .output()
        .expect("running shaper site")
}

#[test]
fn bridge_mode_goes_in_the_cable_without_renumbering() {
    skip_unless_ready!(TOOLS);
    let s = site();
    let dir = TempDir::new("site").expect("temp dir");
    // Before: the router and the host cannot reach each other (the box is not forwarding).
    assert!(probe::udp_echo(&s.host, &s.rtr, HOST.parse().unwrap(), 7001).is_err());

    // A file that fails validation is refused and changes nothing.
    let bad = dir
        .write(
            "bad.toml",
            &format!("[ports]\nwan = \"{WAN_MAC}\"\nlan = \"eth1\"\n[management]\nipv4 = \"{MGMT}/24\"\ngateway = \"10.99.0.1\"\n"),
        )
        .unwrap();
    let before = links(&s.gw);
    let out = shaper_site(&s.gw, &["site", "up", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("bad.toml:6: `management.gateway`"), "{err}");
    let after = links(&s.gw);
    let names = |v: &[Value]| v.iter().map(|l| l["ifname"].clone()).collect::<Vec<_>>();
    assert_eq!(
        names(&before),
        names(&after),
        "a refused file changed the links"
    );

    // The WAN port by its MAC, the LAN port by name; a static management address.
    let good = dir
        .write(
            "site.toml",
            &format!("mode = \"bridge\"\n[ports]\nwan = \"{WAN_MAC}\"\nlan = \"eth1\"\n[management]\nipv4 = \"{MGMT}/24\"\ngateway = \"{RTR}\"\nipv6 = \"none\"\n"),
        )
        .unwrap();
    let out = shaper_site(&s.gw, &["site", "check", good.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let out = shaper_site(&s.gw, &["site", "up", good.to_str().unwrap()]);
    assert!(out.status.success(), "site up: {out:?}");
    let all = links(&s.gw);
    let br = link(&all, "br0").expect("br0 made");
    assert_eq!(br["linkinfo"]["info_kind"], "bridge");
    assert_eq!(br["linkinfo"]["info_data"]["stp_state"], 0, "STP off: {br}");
    assert_eq!(br["linkinfo"]["info_data"]["forward_delay"], 0, "{br}");
    for (port, mac) in [("wan0", Some(WAN_MAC)), ("lan0", None)] {
        let l = link(&all, port).unwrap_or_else(|| panic!("{port} named: {all:?}"));
        assert_eq!(l["master"], "br0", "{port} in the bridge");
        if let Some(m) = mac {
            assert_eq!(l["address"], m, "the port found by its MAC is wan0");
        }
        // The ports carry no address at all, not even an IPv6 link-local one.
        assert_eq!(addrs(&s.gw, port).trim(), "", "{port} has addresses");
    }
    assert!(link(&all, "eth0").is_none() && link(&all, "eth1").is_none());
    assert!(addrs(&s.gw, "br0").contains(&format!("inet {MGMT}/24")));
    let routes = s.gw.ip(&["route", "show", "default"]).unwrap();
    assert!(routes.contains(&format!("via {RTR} dev br0")), "{routes}");
    assert_eq!(
        s.gw.run("sysctl", &["-n", "net.ipv4.ip_forward"])
            .unwrap()
            .trim(),
        "0",
        "a bridge routes nothing"
    );

    // The router and the host reach each other across the box, as before it went in.
    probe::udp_echo(&s.host, &s.rtr, HOST.parse().unwrap(), 7002).expect("rtr -> host");
    probe::udp_echo(&s.rtr, &s.host, RTR.parse().unwrap(), 7003).expect("host -> rtr");
    // ... and the box answers on its management address from both sides.
    s.rtr
        .run("ping", &["-c1", "-W2", MGMT])
        .expect("router pings the box");
    s.host
        .run("ping", &["-c1", "-W2", MGMT])
        .expect("host pings the box");

    // The shaper on the bridge's ports: the host's video upload, bridged out of wan0, is
    // classified and sent by HTB's video class.
    let cfg = Config::new(10_000_000, 40_000_000)
        .class("video", 0, 30)
        .default_class("default", 4, 70)
        .rule(
            Rule::new("media", "video")
                .protocol("udp")
                .dst_ports(&["3478-3481"]),
        )
        .write(dir.path(), "shaper.toml")
        .expect("write config");
    let mut shaper = Shaper::new(&s.gw).expect("shaper");
    shaper.apply(&cfg).expect("apply on the bridge ports");
    for _ in 0..5 {
        probe::udp_echo(&s.rtr, &s.host, RTR.parse().unwrap(), 3478).expect("video echo");
    }
    let st = shaper.status_json().expect("status");
    for (d, dir_name) in [(0, "upload"), (1, "download")] {
        let video = &st["directions"][d]["classes"][0];
        assert_eq!(video["name"], "video");
        assert!(
            video["classified_packets"].as_u64().unwrap_or(0) >= 5
                && video["packets"].as_u64().unwrap_or(0) >= 5,
            "bridged {dir_name} video classified and sent by its class: {video}"
        );
    }
    shaper.remove().expect("remove");
    // Shaping gone, the bridge still forwards.
    probe::udp_echo(&s.host, &s.rtr, HOST.parse().unwrap(), 7004).expect("after remove");
}

#[test]
fn dhcp_leases_are_checked_before_they_touch_the_box() {
    skip_unless_ready!(TOOLS);
    let s = site();
    let dir = TempDir::new("site-dhcp").expect("temp dir");
    let f = dir
        .write("site.toml", "[ports]\nwan = \"eth0\"\nlan = \"eth1\"\n")
        .unwrap();
    let out = shaper_site(&s.gw, &["site", "up", f.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let event = |ev: &str, env: &[(&str, &str)]| {
        let mut c = s.gw.cmd(Shaper::binary_path(), &["site", "dhcp-event", ev]);
        c.env_clear().envs(env.iter().copied());
        c.output().expect("dhcp-event")
    };
    let lease = [
        ("interface", "br0"),
        ("ip", "10.10.0.50"),
        ("subnet", "255.255.255.0"),
        ("router", RTR),
    ];
    assert!(event("bound", &lease).status.success());
    assert!(addrs(&s.gw, "br0").contains("inet 10.10.0.50/24"));
    assert!(s
        .gw
        .ip(&["route", "show", "default"])
        .unwrap()
        .contains(&format!("via {RTR}")));
    // A hostile lease (shell in a value) is refused and the address stays as it was.
    let out = event(
        "renew",
        &[
            ("interface", "br0"),
            ("ip", "10.10.0.51;reboot"),
            ("subnet", "255.255.255.0"),
        ],
    );
    assert!(!out.status.success());
    assert!(addrs(&s.gw, "br0").contains("inet 10.10.0.50/24"));
    // A new lease replaces the old address; deconfig clears it.
    let mut renewed = lease;
    renewed[1] = ("ip", "10.10.0.60");
    assert!(event("renew", &renewed).status.success());
    let a = addrs(&s.gw, "br0");
    assert!(
        a.contains("inet 10.10.0.60/24") && !a.contains("10.10.0.50"),
        "{a}"
    );
    assert!(event("deconfig", &[("interface", "br0")]).status.success());
    assert!(!addrs(&s.gw, "br0").contains("inet "), "deconfig");
}

#[test]
fn router_mode_routes_between_two_subnets() {
    skip_unless_ready!(TOOLS);
    let s = site();
    // The router side becomes the WAN subnet; the host keeps 10.10.0.2 behind the box.
    s.rtr.ip(&["addr", "flush", "dev", "eth0"]).unwrap();
    s.rtr
        .ip(&["addr", "add", "192.0.2.1/24", "dev", "eth0"])
        .unwrap();
    s.rtr
        .ip(&["route", "add", "10.10.0.0/24", "via", "192.0.2.2"])
        .unwrap();
    s.host.ip(&["route", "add", "default", "via", RTR]).unwrap();
    let dir = TempDir::new("site-router").expect("temp dir");
    let f = dir
        .write(
            "site.toml",
            &format!("mode = \"router\"\n[ports]\nwan = \"eth0\"\nlan = \"eth1\"\n[management]\nipv4 = \"{RTR}/24\"\nipv6 = \"fd00:10::1/64\"\n[wan]\nipv4 = \"192.0.2.2/24\"\ngateway = \"192.0.2.1\"\nipv6 = \"none\"\n"),
        )
        .unwrap();
    let out = shaper_site(&s.gw, &["site", "up", f.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    assert!(addrs(&s.gw, "wan0").contains("inet 192.0.2.2/24"));
    assert!(addrs(&s.gw, "lan0").contains(&format!("inet {RTR}/24")));
    assert!(addrs(&s.gw, "lan0").contains("fd00:10::1/64"));
    assert_eq!(
        s.gw.run("sysctl", &["-n", "net.ipv4.ip_forward"])
            .unwrap()
            .trim(),
        "1"
    );
    assert!(
        link(&links(&s.gw), "br0").is_none(),
        "router mode: no bridge"
    );
    probe::udp_echo(&s.rtr, &s.host, "192.0.2.1".parse().unwrap(), 7005).expect("routed");

    // The host firewall: SSH (22) and metrics (9464) from the LAN side only; nothing on
    // the box answers from the WAN side, on any address of the box, TCP or UDP.
    let listeners: Vec<std::net::TcpListener> = [22u16, 9464, 8080]
        .iter()
        .map(|&p| {
            s.gw.within(move || Ok(std::net::TcpListener::bind(("0.0.0.0", p))?))
                .expect("listen in gw")
        })
        .collect();
    let udp =
        s.gw.within(|| Ok(std::net::UdpSocket::bind(("0.0.0.0", 5353))?))
            .unwrap();
    udp.set_read_timeout(Some(std::time::Duration::from_millis(500)))
        .unwrap();
    let tcp = |from: &Netns, to: &str, port: u16| -> bool {
        let addr: std::net::SocketAddr = format!("{to}:{port}").parse().unwrap();
        from.within(move || {
            Ok(
                std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(700))
                    .is_ok(),
            )
        })
        .unwrap()
    };
    assert!(tcp(&s.host, RTR, 22), "SSH from the LAN");
    assert!(tcp(&s.host, RTR, 9464), "metrics from the LAN");
    assert!(!tcp(&s.host, RTR, 8080), "a port the site did not open");
    for to in ["192.0.2.2", RTR] {
        for port in [22, 9464, 8080] {
            assert!(
                !tcp(&s.rtr, to, port),
                "{to}:{port} answers from the WAN side"
            );
        }
    }
    let sent = |from: &Netns, to: &str| {
        let to: std::net::SocketAddr = format!("{to}:5353").parse().unwrap();
        from.within(move || {
            let c = std::net::UdpSocket::bind(("0.0.0.0", 0))?;
            c.send_to(b"probe", to)?;
            Ok(())
        })
        .unwrap();
        let mut buf = [0u8; 16];
        udp.recv_from(&mut buf).is_ok()
    };
    assert!(
        !sent(&s.rtr, "192.0.2.2"),
        "UDP from the WAN reached the box"
    );
    assert!(!sent(&s.host, RTR), "UDP 5353 is not among the open ports");
    drop(listeners);
    // Forwarding is untouched by it: still routed both ways.
    probe::udp_echo(&s.host, &s.rtr, HOST.parse().unwrap(), 7006).expect("routed after");
    let rules =
        s.gw.run("nft", &["list", "table", "inet", "shaper_host"])
            .unwrap();
    assert!(!rules.contains("forward"), "no forward chain: {rules}");
}

#[test]
fn the_management_address_can_live_on_a_vlan_of_the_bridge() {
    skip_unless_ready!(TOOLS);
    let s = site();
    // The site's router reaches the box on VLAN 20; untagged traffic stays the LAN's.
    if let Err(e) = s.rtr.ip(&[
        "link", "add", "link", "eth0", "name", "eth0.20", "type", "vlan", "id", "20",
    ]) {
        // The product's image carries 8021q; a host kernel without it cannot run this.
        shaper_tests::util::note_skip(&format!(
            "this kernel cannot make VLAN devices (no 8021q): {}",
            format!("{e:#}").lines().last().unwrap_or_default()
        ));
        return;
    }
    s.rtr
        .ip(&["addr", "add", "10.20.0.1/24", "dev", "eth0.20"])
        .unwrap();
    s.rtr.ip(&["link", "set", "eth0.20", "up"]).unwrap();
    let dir = TempDir::new("site-vlan").expect("temp dir");
    let f = dir
        .write(
            "site.toml",
            "[ports]\nwan = \"eth0\"\nlan = \"eth1\"\n[management]\nipv4 = \"10.20.0.3/24\"\nipv6 = \"none\"\nvlan = 20\n",
        )
        .unwrap();
    let out = shaper_site(&s.gw, &["site", "up", f.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let all = links(&s.gw);
    let v = link(&all, "br0.20").expect("br0.20");
    assert_eq!(v["linkinfo"]["info_data"]["id"], 20, "{v}");
    assert!(addrs(&s.gw, "br0.20").contains("inet 10.20.0.3/24"));
    assert!(
        !addrs(&s.gw, "br0").contains("inet "),
        "the bridge itself has no address"
    );
    s.rtr
        .run("ping", &["-c1", "-W2", "10.20.0.3"])
        .expect("the router reaches the box on VLAN 20");
    // The LAN still bridges untagged between router and host.
    probe::udp_echo(&s.host, &s.rtr, HOST.parse().unwrap(), 7007).expect("untagged LAN");
}
