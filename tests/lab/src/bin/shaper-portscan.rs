//! `shaper-portscan ADDR... [--tcp LIST] [--udp LIST]` (the VM tier's server VM, looking at
//! the gateway from the WAN side): tries a TCP connection to every listed port of every
//! address (64 at a time, 400 ms each: a port that drops is as closed as one that resets)
//! and sends a UDP datagram to every listed UDP port, listening for any reply. Prints one
//! line per answer (`open tcp ADDR PORT`, `answer udp ADDR PORT`) and a summary line
//! (`scanned N tcp, M udp; K answered`). Lists: `1-1024,9464`.

use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

fn ports(list: &str) -> Vec<u16> {
    let mut v = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u16, u16) = (a.parse().expect("port"), b.parse().expect("port"));
                v.extend(a..=b);
            }
            None => v.push(part.parse().expect("port")),
        }
    }
    v
}

fn main() {
    let mut addrs: Vec<IpAddr> = Vec::new();
    let (mut tcp, mut udp) = (Vec::new(), Vec::new());
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--tcp" => tcp = ports(&it.next().expect("--tcp LIST")),
            "--udp" => udp = ports(&it.next().expect("--udp LIST")),
            _ => addrs.push(a.parse().expect("an address")),
        }
    }
    let jobs: Vec<SocketAddr> = addrs
        .iter()
        .flat_map(|a| tcp.iter().map(move |p| SocketAddr::new(*a, *p)))
        .collect();
    let next = AtomicUsize::new(0);
    let open = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..64 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(a) = jobs.get(i) else { break };
                if TcpStream::connect_timeout(a, Duration::from_millis(400)).is_ok() {
                    open.lock().expect("lock").push(*a);
                }
            });
        }
    });
    let mut answered = open.into_inner().expect("lock");
    for a in &answered {
        println!("open tcp {} {}", a.ip(), a.port());
    }
    for a in &addrs {
        let bind: SocketAddr = if a.is_ipv6() {
            "[::]:0".parse().expect("any")
        } else {
            "0.0.0.0:0".parse().expect("any")
        };
        for &p in &udp {
            let to = SocketAddr::new(*a, p);
            // Each port on its own connected socket: an ICMP error (or a reply) is seen
            // as a result of recv on it.
            let c = UdpSocket::bind(bind).expect("udp socket");
            c.set_read_timeout(Some(Duration::from_millis(300)))
                .expect("timeout");
            if c.connect(to).is_ok() && c.send(b"shaper-portscan\n").is_ok() {
                let mut buf = [0u8; 512];
                match c.recv(&mut buf) {
                    Ok(_) => {
                        println!("answer udp {} {p}", a);
                        answered.push(to);
                    }
                    // A port unreachable says something listens at the IP layer: the box
                    // answered (a firewall that drops says nothing).
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        println!("answer udp {} {p} (port unreachable)", a);
                        answered.push(to);
                    }
                    Err(_) => {}
                }
            }
        }
    }
    println!(
        "scanned {} tcp, {} udp; {} answered",
        jobs.len(),
        addrs.len() * udp.len(),
        answered.len()
    );
}
