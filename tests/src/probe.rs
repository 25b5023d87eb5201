//! Reachability probes between namespaces: a TCP and a UDP echo, both ends in this process.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::netns::Netns;

const PAYLOAD: &[u8] = b"shaper-tests echo probe";

/// Listens on `server_addr:port` in `server_ns`, connects from `client_ns`, and checks that
/// the bytes come back. Returns the round-trip time of the exchange.
pub fn tcp_echo(
    server_ns: &Netns,
    client_ns: &Netns,
    server_addr: IpAddr,
    port: u16,
) -> Result<Duration> {
    let addr = SocketAddr::new(server_addr, port);
    let listener = server_ns
        .within(move || TcpListener::bind(addr).with_context(|| format!("bind tcp {addr}")))?;
    let server = std::thread::spawn(move || -> Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut buf = vec![0u8; PAYLOAD.len()];
        s.read_exact(&mut buf)?;
        s.write_all(&buf)?;
        Ok(())
    });
    let mut stream = client_ns.within(move || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("tcp connect to {addr}"))
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let start = Instant::now();
    stream.write_all(PAYLOAD)?;
    let mut buf = vec![0u8; PAYLOAD.len()];
    stream
        .read_exact(&mut buf)
        .context("reading the tcp echo")?;
    let rtt = start.elapsed();
    server
        .join()
        .map_err(|_| anyhow::anyhow!("echo server panicked"))??;
    if buf != PAYLOAD {
        bail!("tcp echo returned different bytes");
    }
    Ok(rtt)
}

/// A UDP echo from `client_ns` to `server_addr:port` in `server_ns` (three tries).
pub fn udp_echo(
    server_ns: &Netns,
    client_ns: &Netns,
    server_addr: IpAddr,
    port: u16,
) -> Result<Duration> {
    let addr = SocketAddr::new(server_addr, port);
    let server_sock = server_ns
        .within(move || UdpSocket::bind(addr).with_context(|| format!("bind udp {addr}")))?;
    server_sock.set_read_timeout(Some(Duration::from_secs(3)))?;
    let server = std::thread::spawn(move || -> Result<()> {
        let mut buf = [0u8; 256];
        let (n, peer) = server_sock.recv_from(&mut buf)?;
        server_sock.send_to(&buf[..n], peer)?;
        Ok(())
    });
    let any: IpAddr = if server_addr.is_ipv6() {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    };
    let client = client_ns.within(move || UdpSocket::bind((any, 0)).context("bind udp client"))?;
    client.set_read_timeout(Some(Duration::from_secs(1)))?;
    let start = Instant::now();
    let mut buf = [0u8; 256];
    let mut reply = None;
    for _ in 0..3 {
        client.send_to(PAYLOAD, addr)?;
        if let Ok((n, _)) = client.recv_from(&mut buf) {
            reply = Some(n);
            break;
        }
    }
    let rtt = start.elapsed();
    let n = reply.with_context(|| format!("no udp echo from {addr}"))?;
    server
        .join()
        .map_err(|_| anyhow::anyhow!("echo server panicked"))??;
    if &buf[..n] != PAYLOAD {
        bail!("udp echo returned different bytes");
    }
    Ok(rtt)
}
