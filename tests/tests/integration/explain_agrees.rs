//! `shaper explain --pcap` against the kernel: random frames (both directions,
//! IPv4/IPv6, TCP/UDP/ICMP, VLAN tags, PPPoE session headers (some with a
//! compressed PPP protocol, some carrying LCP or with a bad version), IPv6
//! extension headers, pure ACKs, fragments) are written to a pcap per direction, explained by the real
//! binary, and run through the real classifier with BPF_PROG_TEST_RUN; the
//! class `explain` names must be the one the kernel writes into
//! `skb->priority`, for every packet.

use std::path::Path;
use std::process::Command;

use shaper_tests::config::{fixture, fixture_path};
use shaper_tests::packet::Pkt;
use shaper_tests::{Shaper, TempDir};
use shaper_user::{explain::pcap, kernel::bpf};

use crate::common::root_or_skip;

use shaper_tests::rng::Rng;

/// Random frames for one direction, in send order.
fn frames(rng: &mut Rng, up: bool, n: usize) -> Vec<(Pkt, Vec<u8>)> {
    let lans4 = ["192.168.7.20", "192.168.8.3"];
    let lans6 = ["fd00::20", "fd00:1::9"];
    let wans4 = [
        "52.112.3.4",
        "52.115.255.1",
        "10.9.8.7",
        "203.0.113.9",
        "8.8.8.8",
    ];
    let wans6 = [
        "2603:1063::1",
        "2603:1063:ffff::1",
        "2001:db8:1::1",
        "2001:db8::1",
    ];
    let mut out = Vec::new();
    while out.len() < n {
        let v6 = rng.chance(40);
        let proto = *rng.pick(&[6u8, 6, 17, 17, 17, if v6 { 58 } else { 1 }]);
        let (lan, wan) = if v6 {
            (*rng.pick(&lans6), *rng.pick(&wans6))
        } else {
            (*rng.pick(&lans4), *rng.pick(&wans4))
        };
        let any = rng.next_u64() as u16;
        let lport = *rng.pick(&[50005u16, 50019, 50020, 40000, any]);
        let any = rng.next_u64() as u16;
        let rport = *rng.pick(&[3478u16, 3481, 3482, 104, 11112, 443, any]);
        let mut p = if up {
            Pkt::new(lan, wan, proto, lport, rport)
        } else {
            Pkt::new(wan, lan, proto, rport, lport)
        };
        p.dscp = *rng.pick(&[0u8, 0, 46, 34, 10]);
        p.payload = *rng.pick(&[0usize, 0, 1, 64, 300]);
        if rng.chance(25) {
            p.vlans = vec![(rng.next_u64() % 4094 + 1) as u16];
            if rng.chance(40) {
                p.vlans.push((rng.next_u64() % 4094 + 1) as u16);
            }
        }
        // PPPoE (after any VLAN tags), a fifth of it with protocol-field
        // compression.
        let mut compressed = false;
        if rng.chance(15) {
            p.pppoe = Some(rng.next_u64() as u16);
            compressed = rng.chance(20);
        }
        let build = |p: &Pkt| {
            if compressed {
                p.build_compressed_ppp()
            } else {
                p.build()
            }
        };
        if v6 && rng.chance(20) {
            p.v6_ext = (0..rng.next_u64() % 4)
                .map(|_| {
                    (
                        *rng.pick(&[0u8, 43, 60]),
                        8 * (1 + (rng.next_u64() % 3) as usize),
                    )
                })
                .collect();
        }
        if proto != 6 && rng.chance(12) {
            // A fragmented datagram: the first fragment, then a later one
            // (sometimes with another id: the kernel has not seen its first).
            let id = rng.next_u64() as u32 & if v6 { u32::MAX } else { 0xffff };
            p.frag = Some((id, 0, true));
            p.payload = 200;
            let mut later = p.clone();
            let later_id = if rng.chance(25) { id ^ 0x55 } else { id };
            later.frag = Some((later_id, 26, false));
            later.payload = 40;
            out.push((p.clone(), build(&p)));
            out.push((later.clone(), build(&later)));
            continue;
        }
        let mut f = build(&p);
        if p.pppoe.is_some() && !compressed && rng.chance(15) {
            // Not IP inside (LCP, IPCP), or not a session header (a bad
            // VER/TYPE or CODE): the default class on both sides.
            let at = p.l3_offset() - 8;
            match rng.next_u64() % 4 {
                0 => f[at + 6..at + 8].copy_from_slice(&0xc021u16.to_be_bytes()),
                1 => f[at + 6..at + 8].copy_from_slice(&0x8021u16.to_be_bytes()),
                2 => f[at] = 0x12,
                _ => f[at + 1] = 0x09,
            }
        }
        out.push((p.clone(), f));
    }
    out
}

fn explain_json(bin: &Path, config: &Path, pcap_path: &Path, dir: &str) -> serde_json::Value {
    let out = Command::new(bin)
        .arg("explain")
        .arg(config)
        .arg("--pcap")
        .arg(pcap_path)
        .args(["--direction", dir, "--json"])
        .output()
        .expect("run shaper explain");
    assert!(
        out.status.success(),
        "shaper explain --direction {dir}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("explain --json output is JSON")
}

#[test]
fn explain_names_the_class_the_kernel_picks() {
    if !root_or_skip() {
        return;
    }
    let bin = Shaper::binary_path();
    assert!(
        bin.is_file(),
        "shaper binary not found at {} (build it with `cargo build -p shaper-user`, or set SHAPER_BIN)",
        bin.display()
    );
    // The same policy file for the kernel's classifier and for `shaper explain`.
    let config = fixture_path("explain");
    let mut r = shaper_tests::rig::load(&fixture("explain"));
    let dir = TempDir::new("explain").expect("temp dir");
    let mut rng = Rng::xorshift64(0x2545_f491_4f6c_dd1d);

    let mut checked = 0;
    let mut outcomes = std::collections::BTreeMap::<String, usize>::new();
    let mut acks = 0;
    let mut pppoe = 0;
    let mut failures = Vec::new();
    for (up, label) in [(true, "up"), (false, "down")] {
        let pkts = frames(&mut rng, up, 110);
        let raw: Vec<Vec<u8>> = pkts.iter().map(|(_, f)| f.clone()).collect();
        let path = dir.path().join(format!("{label}.pcap"));
        std::fs::write(&path, pcap::write(pcap::LINKTYPE_ETHERNET, &raw)).expect("pcap");
        let v = explain_json(&bin, &config, &path, label);
        assert_eq!(v["disagreements"], 0, "maps and reference disagree: {v:#}");
        let list = v["packets"].as_array().expect("packets");
        assert_eq!(list.len(), pkts.len(), "one explanation per packet");
        for ((pkt, frame), e) in pkts.iter().zip(list) {
            let ifindex = if up { r.wan } else { r.lan };
            let run = bpf::test_run(&mut r.obj, frame, ifindex, 1).expect("test run");
            assert_eq!(run.ret, u32::MAX, "classifier passes every packet");
            let said = e["classid"].as_u64().expect("classid") as u32;
            if said != run.priority {
                failures.push(format!(
                    "{label} #{}: explain says {} ({}), the kernel 1:{:x}\n  frame {pkt:?}\n  explain {e}",
                    e["packet"],
                    e["handle"],
                    e["class"],
                    run.priority & 0xffff
                ));
            }
            *outcomes
                .entry(e["outcome"].as_str().unwrap_or("?").to_string())
                .or_default() += 1;
            if e["ack_class_applied"] == true {
                acks += 1;
            }
            if pkt.pppoe.is_some() {
                pppoe += 1;
            }
            checked += 1;
        }
    }
    eprintln!(
        "checked {checked} packets ({pppoe} in PPPoE); outcomes {outcomes:?}; pure ACKs to ack_class {acks}"
    );
    assert!(
        failures.is_empty(),
        "{} of {checked} packets differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The mix exercised what it is meant to.
    assert!(checked >= 200);
    for o in ["rule", "no_rule", "fragment_followed", "fragment_unknown"] {
        assert!(
            outcomes.get(o).copied().unwrap_or(0) > 0,
            "no `{o}` packet in {outcomes:?}"
        );
    }
    assert!(acks > 0, "no pure ACK went to ack_class");
    assert!(pppoe > 0, "no PPPoE frame");
    let _ = &r.policy;
}
