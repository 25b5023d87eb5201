//! The server through real sockets on loopback: admission, deadlines, what each request
//! line and head gets back (hyper parses them; these tests pin what it answers).

use super::*;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr};
use tokio::net::TcpSocket;

#[test]
fn one_peer_gets_at_most_its_share_and_the_biggest_holder_makes_room() {
    let a: IpAddr = "10.0.0.2".parse().expect("ip");
    let mapped: IpAddr = "::ffff:10.0.0.2".parse().expect("ip");
    let mut adm = Admission::default();
    let held: Vec<_> = (0..MAX_PER_PEER)
        .map(|_| adm.admit(a).expect("within the share"))
        .collect();
    // The same host again, as itself or IPv4-mapped: refused.
    assert!(adm.admit(a).is_none());
    assert!(adm.admit(mapped).is_none());
    // One IPv6 host, many addresses in its /64: one peer.
    for i in 0..MAX_PER_PEER {
        let v6 = IpAddr::V6(Ipv6Addr::new(0xfd00, 1, 2, 3, 0, 0, 0, i as u16 + 1));
        adm.admit(v6).expect("within the /64's share");
    }
    let other_in_64: IpAddr = "fd00:1:2:3:dead:beef:0:1".parse().expect("ip");
    assert!(adm.admit(other_in_64).is_none(), "same /64");
    // Prometheus elsewhere gets in.
    let prom: IpAddr = "10.0.0.9".parse().expect("ip");
    let (prom_id, _) = adm.admit(prom).expect("another peer");
    // Many single-connection peers fill the rest.
    let mut n = 0u8;
    while adm.conns.len() < MAX_CONNECTIONS {
        adm.admit(IpAddr::V4(Ipv4Addr::new(10, 0, 1, n)))
            .expect("room");
        n += 1;
    }
    // Full: a newcomer displaces the oldest idle connection of a biggest holder
    // (10.0.0.2, first in), never Prometheus'.
    let newcomer: IpAddr = "10.0.9.9".parse().expect("ip");
    adm.admit(newcomer).expect("room made");
    assert!(
        adm.conns.iter().all(|c| c.id != held[0].0),
        "oldest of the biggest"
    );
    assert!(adm.conns.iter().any(|c| c.id == prom_id));
    assert_eq!(adm.conns.len(), MAX_CONNECTIONS);
    // Told to close (the permit waits for the task).
    let woke = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt")
        .block_on(async {
            tokio::time::timeout(Duration::from_millis(100), held[0].1.notified())
                .await
                .is_ok()
        });
    assert!(woke, "the displaced connection is told");
    // Every connection answering: nothing to make room with.
    let ids: Vec<u64> = adm.conns.iter().map(|c| c.id).collect();
    for id in &ids {
        adm.set_phase(*id, Phase::Answering);
    }
    assert!(adm.admit("10.0.8.8".parse().expect("ip")).is_none());
    adm.release(ids[0]);
    assert_eq!(adm.conns.len(), MAX_CONNECTIONS - 1);
    adm.admit("10.0.8.8".parse().expect("ip"))
        .expect("room after a release");
}

fn temp_paths(tag: &str) -> (std::path::PathBuf, Paths) {
    let dir = std::env::temp_dir().join(format!("shaper-metrics-{tag}-{}", std::process::id()));
    let paths = Paths {
        pins: crate::kernel::bpf::Pins::new(dir.join("pins")),
        run: dir.join("run"),
    };
    (dir, paths)
}

/// A server on 127.0.0.1 (port chosen by the kernel) for `paths`.
async fn start(paths: Paths) -> (SocketAddr, tokio::task::JoinHandle<Result<()>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    (addr, tokio::spawn(serve_on(listener, paths)))
}

/// One blocking HTTP exchange with a std client; returns the raw reply. With
/// `half_close` the client shuts its side down once the request is sent.
fn exchange_with(addr: SocketAddr, request: &[u8], half_close: bool) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(request).expect("write");
    if half_close {
        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn exchange(addr: SocketAddr, request: Vec<u8>) -> String {
    exchange_with(addr, &request, false)
}

/// The status code of a raw reply (0 if there is none).
fn code(reply: &str) -> u16 {
    reply
        .lines()
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// A header's value in a raw reply (names as the server writes them).
fn header_value<'a>(reply: &'a str, name: &str) -> Option<&'a str> {
    let head = reply.split_once("\r\n\r\n").map_or(reply, |(h, _)| h);
    head.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
}

/// Connects from `src` (a loopback address of its own, so it does not count against the
/// 127.0.0.1 clients' share), sends `bytes` and keeps its side open: what came back and
/// how long after the connect the server closed the connection.
async fn unanswered(addr: SocketAddr, src: Ipv4Addr, bytes: &'static [u8]) -> (Vec<u8>, Duration) {
    let s = TcpSocket::new_v4().expect("socket");
    s.bind(SocketAddr::new(src.into(), 0)).expect("bind");
    let c = s.connect(addr).await.expect("connect");
    let t0 = std::time::Instant::now();
    let mut c = c.into_std().expect("std");
    tokio::task::spawn_blocking(move || {
        c.set_nonblocking(false).expect("blocking");
        c.set_read_timeout(Some(3 * HEAD_TIMEOUT)).expect("timeout");
        c.write_all(bytes).expect("write");
        let mut out = Vec::new();
        let _ = c.read_to_end(&mut out);
        (out, t0.elapsed())
    })
    .await
    .expect("client")
}

#[tokio::test]
async fn error_bodies_name_no_file() {
    let (dir, paths) = temp_paths("500");
    std::fs::create_dir_all(&paths.run).expect("mkdir");
    std::fs::write(paths.run.join("state.json"), b"{ not json").expect("write");
    let (addr, server) = start(paths).await;
    let r = tokio::task::spawn_blocking(move || {
        exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n".to_vec())
    })
    .await
    .expect("client");
    server.abort();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(r.starts_with("HTTP/1.1 500 "), "{r}");
    let body = r.split_once("\r\n\r\n").expect("body").1;
    assert_eq!(body, INTERNAL_ERROR_BODY);
    assert!(!body.contains('/'), "{body}");
}

#[tokio::test]
async fn idle_connections_neither_keep_a_scrape_out_nor_stay() {
    let (_dir, paths) = temp_paths("idle");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(serve_on(listener, paths));
    // Sixteen idle connections from one host (127.0.0.2)...
    let mut idle = Vec::new();
    for _ in 0..16 {
        let s = TcpSocket::new_v4().expect("socket");
        s.bind("127.0.0.2:0".parse().expect("addr")).expect("bind");
        idle.push(s.connect(addr).await.expect("connect"));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // ...keep no scrape from another (127.0.0.1) out.
    let (reply, took) = tokio::task::spawn_blocking(move || {
        let t0 = std::time::Instant::now();
        let r = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n".to_vec());
        (r, t0.elapsed())
    })
    .await
    .expect("client");
    assert!(reply.starts_with("HTTP/1.1 503 "), "{reply:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    // Those past the host's share were closed at once; the rest once HEAD_TIMEOUT
    // is over.
    let closed = |s: &TcpStream| {
        let mut b = [0u8; 8];
        matches!(s.try_read(&mut b), Ok(0))
            || matches!(s.try_read(&mut b), Err(e) if e.kind() != io::ErrorKind::WouldBlock)
    };
    assert!(closed(&idle[15]), "past the share: closed at once");
    assert!(!closed(&idle[0]), "within the share: open for now");
    tokio::time::sleep(HEAD_TIMEOUT + Duration::from_millis(500)).await;
    assert!(idle.iter().all(closed), "all closed after HEAD_TIMEOUT");
    server.abort();
}

#[tokio::test]
async fn server_answers_404_503_400_405_431_on_loopback() {
    let dir = std::env::temp_dir().join(format!("shaper-metrics-unit-{}", std::process::id()));
    let paths = Paths {
        pins: crate::kernel::bpf::Pins::new(dir.join("pins")),
        run: dir.join("run-nothing-applied"),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(serve_on(listener, paths));
    let replies = tokio::task::spawn_blocking(move || {
        let mut big = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_REQUEST_BYTES + 10));
        vec![
            exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
            exchange(addr, b"GET /other HTTP/1.1\r\n\r\n".to_vec()),
            exchange(addr, b"\x00\x01garbage\r\n\r\n".to_vec()),
            exchange(addr, b"DELETE /metrics HTTP/1.1\r\n\r\n".to_vec()),
            exchange(addr, big),
            exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n".to_vec()),
        ]
    })
    .await
    .expect("client");
    server.abort();
    let status = |r: &str| r.lines().next().unwrap_or("").to_string();
    assert_eq!(
        status(&replies[0]),
        "HTTP/1.1 503 Service Unavailable",
        "{}",
        replies[0]
    );
    assert!(replies[0].ends_with("shaping is not applied; no counters to report\n"));
    assert_eq!(status(&replies[1]), "HTTP/1.1 404 Not Found");
    assert_eq!(status(&replies[2]), "HTTP/1.1 400 Bad Request");
    assert_eq!(status(&replies[3]), "HTTP/1.1 405 Method Not Allowed");
    assert!(replies[3].contains("Allow: GET, HEAD\r\n"));
    assert_eq!(
        status(&replies[4]),
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    assert_eq!(
        status(&replies[5]),
        "HTTP/1.1 503 Service Unavailable",
        "still serving"
    );
    for r in &replies {
        let (head, body) = r.split_once("\r\n\r\n").expect("head and body");
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .expect("length")
            .parse()
            .expect("number");
        assert_eq!(len, body.len(), "{r}");
    }
}

/// What the hand-written request-line parser used to decide, now decided by hyper and
/// [`answer`], checked on the wire: nothing is applied here, so `/metrics` gets 503.
#[tokio::test]
async fn request_lines_and_head_ends_over_a_socket() {
    let (_dir, paths) = temp_paths("lines");
    let (addr, server) = start(paths).await;
    // Heads that never end are only closed at the deadline: in parallel with the rest,
    // each from an address of its own.
    let slow = async {
        tokio::join!(
            // No blank line yet: not a head.
            unanswered(addr, Ipv4Addr::new(127, 0, 0, 2), b"GET / HTTP/1.1\r\n"),
            // Empty lines before a request line are skipped (RFC 9112 2.2), no answer.
            unanswered(addr, Ipv4Addr::new(127, 0, 0, 3), b"\r\n\r\n"),
        )
    };
    let fast = tokio::task::spawn_blocking(move || {
        let get = |r: &[u8]| exchange_with(addr, r, false);
        let mut replies = vec![
            get(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            // The query is not part of the path; LF alone ends lines; HTTP/1.0.
            get(b"GET /metrics?x=1 HTTP/1.0\n\n"),
            get(b"HEAD /metrics HTTP/1.1\r\n\r\n"),
            get(b"GET / HTTP/1.1\r\n\r\n"),
            get(b"POST /metrics HTTP/1.1\r\n\r\n"),
            // The head ends at the blank line: what follows is not part of it.
            get(b"GET /metrics HTTP/1.1\r\nA: b\r\n\r\nrest"),
            get(b"GET / HTTP/1.1\nA: b\n\n"),
            // Empty lines, then a request.
            get(b"\r\n\r\nGET /metrics HTTP/1.1\r\n\r\n"),
            // A client that shuts its side down after the request is answered...
            exchange_with(addr, b"GET /metrics HTTP/1.1\r\n\r\n", true),
            // ...and one that sends nothing and shuts down gets nothing.
            exchange_with(addr, b"", true),
        ];
        let bad: Vec<String> = [
            &b"GET\r\n\r\n"[..],
            b"GET /metrics\r\n\r\n",
            b"GET /metrics HTTP/2\r\n\r\n",
            b"GET  /metrics HTTP/1.1\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"GET http://x/metrics HTTP/1.1\r\n\r\n",
            b"GET * HTTP/1.1\r\n\r\n",
            b"G\xffT /metrics HTTP/1.1\r\n\r\n",
            b"GET /m\xff HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/1.1 extra\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        ]
        .iter()
        .map(|r| get(r))
        .collect();
        replies.extend(bad);
        replies
    });
    let ((no_end, no_end_took), (blank, blank_took)) = slow.await;
    let replies = fast.await.expect("client");
    server.abort();

    let unavailable = "shaping is not applied; no counters to report\n";
    assert_eq!(code(&replies[0]), 503, "{}", replies[0]);
    assert!(replies[0].ends_with(unavailable), "{}", replies[0]);
    assert_eq!(code(&replies[1]), 503, "{}", replies[1]);
    assert!(replies[1].ends_with(unavailable), "{}", replies[1]);
    // HEAD: the GET's head, no body.
    assert_eq!(code(&replies[2]), 503, "{}", replies[2]);
    assert!(replies[2].ends_with("\r\n\r\n"), "{}", replies[2]);
    assert_eq!(
        header_value(&replies[2], "Content-Length"),
        Some(unavailable.len().to_string().as_str()),
        "{}",
        replies[2]
    );
    assert_eq!(code(&replies[3]), 404, "{}", replies[3]);
    assert_eq!(code(&replies[4]), 405, "{}", replies[4]);
    for (i, r) in replies.iter().enumerate().take(9).skip(5) {
        let want = if i == 6 { 404 } else { 503 };
        assert_eq!(code(r), want, "reply {i}: {r}");
    }
    assert_eq!(replies[9], "", "nothing asked, nothing answered");
    for (i, r) in replies[10..].iter().enumerate() {
        assert_eq!(code(r), 400, "bad request {i}: {r:?}");
        assert_eq!(header_value(r, "Connection"), Some("close"), "{r}");
    }
    for (what, got, took) in [
        ("no blank line", no_end, no_end_took),
        ("blank lines", blank, blank_took),
    ] {
        assert!(
            got.is_empty(),
            "{what}: answered {:?}",
            String::from_utf8_lossy(&got)
        );
        assert!(
            took >= HEAD_TIMEOUT - Duration::from_millis(300)
                && took < HEAD_TIMEOUT + Duration::from_secs(1),
            "{what}: closed after {took:?}"
        );
    }
}

/// A head trickled a byte at a time is cut at HEAD_TIMEOUT after the accept, however
/// steadily the bytes come, and gets no answer.
#[tokio::test]
async fn a_trickled_head_does_not_extend_its_deadline() {
    let (_dir, paths) = temp_paths("trickle");
    let (addr, server) = start(paths).await;
    let (got, sent, closed_after) = tokio::task::spawn_blocking(move || {
        let mut c = std::net::TcpStream::connect(addr).expect("connect");
        let t0 = std::time::Instant::now();
        c.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let head =
            b"GET /metrics HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        let mut sent = 0;
        let mut got = Vec::new();
        loop {
            if c.write_all(&head[sent % head.len()..][..1]).is_err() {
                break (got, sent, t0.elapsed());
            }
            sent += 1;
            let mut b = [0u8; 256];
            match c.read(&mut b) {
                Ok(0) => break (got, sent, t0.elapsed()),
                Ok(n) => got.extend_from_slice(&b[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
                Err(_) => break (got, sent, t0.elapsed()),
            }
            if t0.elapsed() > 3 * HEAD_TIMEOUT {
                break (got, sent, t0.elapsed());
            }
        }
    })
    .await
    .expect("client");
    server.abort();
    assert!(
        got.is_empty(),
        "answered {:?}",
        String::from_utf8_lossy(&got)
    );
    assert!(sent >= 10, "the head kept coming: {sent} bytes");
    assert!(
        closed_after >= HEAD_TIMEOUT - Duration::from_millis(300)
            && closed_after < HEAD_TIMEOUT + Duration::from_secs(1),
        "closed after {closed_after:?} and {sent} bytes"
    );
}

/// A head of exactly MAX_REQUEST_BYTES is read; one byte more is 431, at once.
#[tokio::test]
async fn the_head_limit_is_max_request_bytes() {
    let (_dir, paths) = temp_paths("limit");
    let (addr, server) = start(paths).await;
    let head = |len: usize| {
        let mut h = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        let pad = len - h.len() - 4;
        h.extend(std::iter::repeat_n(b'a', pad));
        h.extend_from_slice(b"\r\n\r\n");
        assert_eq!(h.len(), len);
        h
    };
    let (at, over) = tokio::task::spawn_blocking(move || {
        (
            exchange(addr, head(MAX_REQUEST_BYTES)),
            exchange(addr, head(MAX_REQUEST_BYTES + 1)),
        )
    })
    .await
    .expect("client");
    server.abort();
    assert_eq!(code(&at), 503, "{at}");
    assert_eq!(code(&over), 431, "{over}");
}
