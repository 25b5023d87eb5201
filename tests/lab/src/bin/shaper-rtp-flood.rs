//! `shaper-rtp-flood`: random UDP that looks like RTP at a glance, for the VM tier's calls
//! run (the gateway must not take it for a call).
//!
//! ```text
//! shaper-rtp-flood --from 10.10.0.2:40000 --to 192.0.2.1:3479 --count 5000 [--gap-ms 2] [--size 172]
//! ```
//!
//! Sends `--count` datagrams of `--size` random bytes (xorshift, fixed seed) from `--from`
//! to `--to`, `--gap-ms` apart, each with RTP's version bits (2) and a payload type below
//! 128 so it passes the header check; sequence numbers, timestamps and SSRCs are random,
//! so no two packets of one SSRC follow each other. Prints how many it sent.

use std::net::{SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    match run() {
        Ok(n) => {
            println!("sent {n} random RTP-shaped datagrams");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("shaper-rtp-flood: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<u64, String> {
    let (mut from, mut to): (Option<SocketAddr>, Option<SocketAddr>) = (None, None);
    let (mut count, mut gap_ms, mut size) = (1000u64, 2u64, 172usize);
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().ok_or_else(|| format!("{k} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{k} {v}: {e}");
        match k.as_str() {
            "--from" => from = Some(v.parse().map_err(|e| bad(&e))?),
            "--to" => to = Some(v.parse().map_err(|e| bad(&e))?),
            "--count" => count = v.parse().map_err(|e| bad(&e))?,
            "--gap-ms" => gap_ms = v.parse().map_err(|e| bad(&e))?,
            "--size" => size = v.parse().map_err(|e| bad(&e))?,
            _ => return Err(format!("unknown argument {k}")),
        }
    }
    let (Some(from), Some(to)) = (from, to) else {
        return Err("--from and --to are required".into());
    };
    if !(12..=1400).contains(&size) {
        return Err(format!("--size {size}: 12 to 1400 bytes"));
    }
    let sock = UdpSocket::bind(from).map_err(|e| format!("bind {from}: {e}"))?;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut p = vec![0u8; size];
    for _ in 0..count {
        for b in p.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        p[0] = 0x80 | (p[0] & 0x3f);
        p[1] &= 0x7f;
        // A refused datagram (ICMP port unreachable from the far end) fails the next send
        // on some kernels: it is not an error for a flood.
        match sock.send_to(&p, to) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            Err(e) => return Err(format!("send to {to}: {e}")),
        }
        std::thread::sleep(Duration::from_millis(gap_ms));
    }
    Ok(count)
}
