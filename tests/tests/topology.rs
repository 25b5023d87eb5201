//! The lab itself: lan reaches srv through gw and modem (v4 and v6), and every namespace is
//! gone after the guard drops, also when the test panics.

use std::path::Path;
use std::process::Command;

use shaper_tests::topology::{Topology, GW_WAN_IF, SRV_V4, SRV_V6};
use shaper_tests::{probe, skip_unless_ready, Line, TOPOLOGY_TOOLS};

fn listed_namespaces() -> String {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn root_links() -> String {
    let out = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .expect("ip link show");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_gone(names: &[String], veths: &[String]) {
    let listed = listed_namespaces();
    let links = root_links();
    for n in names {
        assert!(
            !Path::new("/run/netns").join(n).exists(),
            "/run/netns/{n} still exists"
        );
        assert!(
            !listed
                .lines()
                .any(|l| l.split_whitespace().next() == Some(n)),
            "{n} still listed:\n{listed}"
        );
    }
    for v in veths {
        assert!(
            !links.contains(&format!(" {v}:")) && !links.contains(&format!(" {v}@")),
            "veth {v} leaked"
        );
    }
}

#[test]
fn lan_reaches_srv_through_gw_and_modem() {
    skip_unless_ready!(TOPOLOGY_TOOLS);
    let (names, veths);
    {
        let topo = Topology::build(Some(Line::FTTC_40_10)).expect("build topology");
        names = topo.namespace_names();
        veths = topo.veth_names().to_vec();
        eprintln!("namespaces: {names:?}");
        for n in &names {
            assert!(
                n.starts_with("shp-") && n.contains(&format!("-{}-", std::process::id())),
                "{n}"
            );
        }
        assert!(veths.iter().all(|v| v.len() <= 15), "{veths:?}");

        // The gateway's interfaces carry the names a shaper config uses.
        let gw_links = topo.gw.ip(&["-o", "link", "show"]).expect("gw links");
        assert!(
            gw_links.contains(" lan0:") || gw_links.contains(" lan0@"),
            "{gw_links}"
        );
        assert!(
            gw_links.contains(" wan0:") || gw_links.contains(" wan0@"),
            "{gw_links}"
        );

        let before = Topology::tx_packets(&topo.gw, GW_WAN_IF).expect("counter");
        let rtt =
            probe::tcp_echo(&topo.srv, &topo.lan, SRV_V4.into(), 7001).expect("tcp v4 lan->srv");
        eprintln!("tcp echo v4 lan->srv: {rtt:?}");
        let rtt =
            probe::tcp_echo(&topo.srv, &topo.lan, SRV_V6.into(), 7002).expect("tcp v6 lan->srv");
        eprintln!("tcp echo v6 lan->srv: {rtt:?}");
        let rtt =
            probe::udp_echo(&topo.srv, &topo.lan, SRV_V4.into(), 7003).expect("udp v4 lan->srv");
        eprintln!("udp echo v4 lan->srv: {rtt:?}");
        let rtt =
            probe::udp_echo(&topo.srv, &topo.lan, SRV_V6.into(), 7004).expect("udp v6 lan->srv");
        eprintln!("udp echo v6 lan->srv: {rtt:?}");
        let after = Topology::tx_packets(&topo.gw, GW_WAN_IF).expect("counter");
        // The probes crossed the gateway's wan0 (not some other path).
        assert!(
            after >= before + 4,
            "gw wan0 sent {before} -> {after} packets"
        );

        // The line is in place on the modem.
        let q = topo
            .modem
            .run("tc", &["qdisc", "show", "dev", "out0"])
            .expect("tc");
        assert!(
            q.contains("tbf") && q.contains("rate 10Mbit"),
            "modem out0: {q}"
        );
        let q = topo
            .modem
            .run("tc", &["qdisc", "show", "dev", "in0"])
            .expect("tc");
        assert!(
            q.contains("tbf") && q.contains("rate 40Mbit"),
            "modem in0: {q}"
        );
    }
    assert_gone(&names, &veths);
}

#[test]
fn namespaces_are_removed_when_a_test_panics() {
    skip_unless_ready!(TOPOLOGY_TOOLS);
    let names = std::sync::Mutex::new(Vec::new());
    let veths = std::sync::Mutex::new(Vec::new());
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let topo = Topology::build(None).expect("build topology");
        // A background process the guard must kill.
        topo.srv.spawn("sleep", &["30"]).expect("spawn sleep");
        *names.lock().expect("lock") = topo.namespace_names();
        *veths.lock().expect("lock") = topo.veth_names().to_vec();
        panic!("deliberate panic with the topology alive");
    }));
    assert!(result.is_err());
    let names = names.into_inner().expect("lock");
    assert_eq!(names.len(), 4);
    assert_gone(&names, &veths.into_inner().expect("lock"));
}
