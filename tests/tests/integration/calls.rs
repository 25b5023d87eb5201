//! `shaper calls --pcap` on real media: ffmpeg sends H.264 over RTP, then over SRTP, from a
//! LAN namespace through a router namespace whose nftables drops 3 % of it at random (with a
//! counter: the ground truth), to a far namespace whose UDP socket records what arrives; a
//! flood of random RTP-shaped datagrams from another port goes alongside. The arrivals
//! become a pcap, and the per-call loss `shaper calls` reports must be the router's drops
//! (all but the drops after the last packet that arrived, which no receiver can see), put
//! on the LAN side, with one stream in the call: the flood is not one.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use shaper_tests::netns::Netns;
use shaper_tests::packet::{pcap, Pkt};
use shaper_tests::shaper::Shaper;
use shaper_tests::util::{self, TempDir};

const LAN: &str = "192.168.77.10";
const FAR: &str = "198.51.100.1";
const PORT: u16 = 5004;

struct Lab {
    lan: Netns,
    gw: Netns,
    far: Netns,
}

fn lab() -> Lab {
    let (lan, gw, far) = (
        Netns::new("calls-lan").expect("netns"),
        Netns::new("calls-gw").expect("netns"),
        Netns::new("calls-far").expect("netns"),
    );
    for (a, an, b, bn) in [(&lan, "v0", &gw, "g0"), (&gw, "g1", &far, "v1")] {
        shaper_tests::gateway::veth_between(a, an, b, bn);
        a.ip(&["link", "set", an, "up"]).expect("up");
        b.ip(&["link", "set", bn, "up"]).expect("up");
    }
    lan.ip(&["addr", "add", &format!("{LAN}/24"), "dev", "v0"])
        .expect("addr");
    gw.ip(&["addr", "add", "192.168.77.1/24", "dev", "g0"])
        .expect("addr");
    gw.ip(&["addr", "add", "198.51.100.2/24", "dev", "g1"])
        .expect("addr");
    far.ip(&["addr", "add", &format!("{FAR}/24"), "dev", "v1"])
        .expect("addr");
    lan.ip(&["route", "add", "default", "via", "192.168.77.1"])
        .expect("route");
    far.ip(&["route", "add", "192.168.77.0/24", "via", "198.51.100.2"])
        .expect("route");
    gw.sysctl("net.ipv4.ip_forward", "1").expect("forwarding");
    Lab { lan, gw, far }
}

/// The router's drops so far (`counter packets N` of its one rule).
fn dropped(gw: &Netns) -> u64 {
    let out = gw.run("nft", &["list", "ruleset"]).expect("nft list");
    let n = out.split("counter packets ").nth(1).expect("a counter");
    n.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .expect("a count")
}

/// One ffmpeg run of `secs` seconds to `url` with `extra` output options; the arrivals at
/// the far end as a pcap, and the router's drops of it.
fn send_and_capture(
    l: &Lab,
    url: &str,
    extra: &[&str],
    dir: &TempDir,
    name: &str,
) -> (std::path::PathBuf, u64) {
    l.gw.run("nft", &["flush", "ruleset"]).expect("nft flush");
    let rules = "table inet t {\n chain f {\n  type filter hook forward priority 0;\n  udp dport 5004 udp sport != 40000 numgen random mod 100 < 3 counter drop\n }\n}\n";
    let f = dir.write("drop.nft", rules).expect("rules");
    l.gw.run("nft", &["-f", f.to_str().expect("utf-8")])
        .expect("nft -f");

    let stop = Arc::new(AtomicBool::new(false));
    let stop_rx = stop.clone();
    let rx = l.far.spawn_thread(move || {
        let sock = UdpSocket::bind((FAR, PORT))?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65_536];
        while !stop_rx.load(Ordering::Relaxed) {
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                let t = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64;
                got.push((t, from, buf[..n].to_vec()));
            }
        }
        Ok(got)
    });
    std::thread::sleep(Duration::from_millis(300));
    // The flood: 3,000 random 172-byte datagrams with RTP's version bits, from port 40000
    // (not dropped by the router), alongside the call.
    let flood = l.lan.spawn_thread(|| {
        let sock = UdpSocket::bind((LAN, 40_000))?;
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..3000 {
            let mut p: Vec<u8> = (0..172)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            p[0] = 0x80 | (p[0] & 0x3f);
            p[1] &= 0x7f;
            sock.send_to(&p, (FAR, PORT))?;
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    });
    let mut args: Vec<&str> = vec![
        "-hide_banner",
        "-loglevel",
        "error",
        "-re",
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=640x360:rate=25",
        "-t",
        "6",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-tune",
        "zerolatency",
        "-b:v",
        "800k",
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["-f", "rtp", url]);
    let out = l.lan.cmd("ffmpeg", &args).output().expect("ffmpeg runs");
    assert!(
        out.status.success(),
        "ffmpeg: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    flood.join().expect("flood thread").expect("flood");
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let got = rx.join().expect("receiver thread").expect("receiver");
    let frames: Vec<(u64, Vec<u8>)> = got
        .iter()
        .map(|(t, from, p)| {
            let pkt = Pkt::udp(&from.ip().to_string(), FAR, from.port(), PORT);
            (*t, pkt.with_payload(p))
        })
        .collect();
    let path = dir.path().join(name);
    std::fs::write(&path, pcap(&frames)).expect("pcap");
    (path, dropped(&l.gw))
}

#[test]
fn per_call_loss_from_real_rtp_and_srtp_is_the_routers_drops() {
    if !crate::common::root_or_skip() {
        return;
    }
    if let Some(why) = util::skip_reason(&["ip", "nft", "ffmpeg", "nsenter"]) {
        util::note_skip(&why);
        return;
    }
    let l = lab();
    let dir = TempDir::new("calls").expect("temp dir");
    // A 30-byte SRTP master key and salt, base64 (fixed: the test's own).
    let srtp_params = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNk";
    let runs: [(&str, Vec<&str>, &str); 2] = [
        ("rtp", vec![], "rtp://198.51.100.1:5004?pkt_size=1200"),
        (
            "srtp",
            vec![
                "-srtp_out_suite",
                "AES_CM_128_HMAC_SHA1_80",
                "-srtp_out_params",
                srtp_params,
            ],
            "srtp://198.51.100.1:5004?pkt_size=1200",
        ),
    ];
    let shaper = Shaper::binary_path();
    for (name, extra, url) in runs {
        let (pcap_path, drops) = send_and_capture(&l, url, &extra, &dir, &format!("{name}.pcap"));
        let out = util::run(std::process::Command::new(&shaper).args([
            "calls",
            "--pcap",
            pcap_path.to_str().expect("utf-8"),
            "--show-addresses",
            "--json",
        ]))
        .expect("shaper calls");
        let calls: serde_json::Value = serde_json::from_str(&out).expect("JSON");
        let calls = calls.as_array().expect("a list");
        assert_eq!(calls.len(), 1, "{name}: one call: {out}");
        let c = &calls[0];
        assert_eq!(c["lan_host"], LAN, "{name}");
        let up = &c["up"];
        // The flood sent from its own port never made a stream: one SSRC.
        assert_eq!(up["streams"], 1, "{name}: {up}");
        assert_eq!(c["down"]["streams"], 0, "{name}");
        assert_eq!(up["loss_where"], "lan", "{name}");
        let lost = up["lost"].as_u64().expect("lost");
        let expected = up["expected"].as_u64().expect("expected");
        eprintln!("{name}: router dropped {drops}, shaper calls counts {lost} lost of {expected}");
        assert!(
            drops > 0,
            "{name}: the router dropped nothing in {expected} packets"
        );
        // Drops after the last arrival cannot show as a gap; a few at most.
        assert!(
            lost <= drops && drops - lost <= 3,
            "{name}: {lost} lost vs {drops} dropped"
        );
        let pct = up["loss_pct"].as_f64().expect("pct");
        let truth = drops as f64 * 100.0 / (expected + drops - lost) as f64;
        assert!((pct - truth).abs() <= 0.3, "{name}: {pct} % vs {truth} %");
    }
}
