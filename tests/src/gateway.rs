//! Small helpers the gateway tests share: writing a config, counting the TCX programs on
//! an interface, waiting for a condition.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aya::programs::{tc::TcAttachType, SchedClassifier};

use crate::Netns;

/// A veth pair `a`/`b`, both ends in `ns` and up.
pub fn add_veth(ns: &Netns, a: &str, b: &str) {
    ns.ip(&["link", "add", a, "type", "veth", "peer", "name", b])
        .expect("veth");
    ns.ip(&["link", "set", a, "up"]).expect("up");
    ns.ip(&["link", "set", b, "up"]).expect("up");
}

/// A veth pair between two namespaces: `an` in `a`, `bn` in `b` (both left down).
pub fn veth_between(a: &Netns, an: &str, b: &Netns, bn: &str) {
    crate::util::run(std::process::Command::new("ip").args([
        "link",
        "add",
        an,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        bn,
        "netns",
        b.name(),
    ]))
    .expect("veth");
}

/// A gateway namespace (`role` names it) with two veth pairs whose gateway ends are wan0
/// and lan0: what `shaper run` with a config for wan0/lan0 needs, no traffic.
pub fn wan_lan_gateway(role: &str) -> Netns {
    let ns = Netns::new(role).expect("netns");
    add_veth(&ns, "wan0", "wanp");
    add_veth(&ns, "lan0", "lanp");
    ns
}

/// Writes `text` to `dir/name` and returns the path.
pub fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write config");
    p
}

/// TCX egress programs attached to `dev` in namespace `ns`.
pub fn tcx_programs(ns: &Netns, dev: &'static str) -> usize {
    ns.within(move || {
        let (_, progs) = SchedClassifier::query_tcx(dev, TcAttachType::Egress)?;
        Ok(progs.len())
    })
    .expect("query tcx")
}

/// How long the daemon may take to put back shaping someone removed (a pin, the root
/// qdisc, a re-created interface): its 250 ms health check and a re-apply, which loads and
/// verifies the classifier again. Measured 1.9-2.1 s with the debug build on the
/// 2026-12-04 CI machine (under 1 s on earlier ones); the bound leaves room for a loaded
/// 2-core machine. The tests print the time each restore took.
pub const RESTORE_BOUND: Duration = Duration::from_secs(6);

/// Polls `f` every 20 ms until it holds; panics after `timeout`. Returns the wait.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    t0.elapsed()
}

/// Gives a receiving socket `bytes` of buffer, past `rmem_max` (SO_RCVBUFFORCE; we are
/// root), so a receiver descheduled on a busy box does not drop what it is counting.
pub fn force_rcvbuf(sock: &std::net::UdpSocket, bytes: libc::c_int) {
    use std::os::fd::AsRawFd as _;
    // SAFETY: setsockopt on an open socket with a valid int option.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// One HTTP/1.1 `GET path` from inside `ns` (connected within 2 s, answered within
/// `timeout`): the status code, the head and the body.
pub fn http_get(
    ns: &Netns,
    addr: std::net::SocketAddr,
    path: &str,
    timeout: Duration,
) -> anyhow::Result<(u16, String, String)> {
    http_get_from(ns, None, addr, path, timeout)
}

/// [`http_get`] from the source address `src` (one of `ns`'s), when given.
pub fn http_get_from(
    ns: &Netns,
    src: Option<std::net::IpAddr>,
    addr: std::net::SocketAddr,
    path: &str,
    timeout: Duration,
) -> anyhow::Result<(u16, String, String)> {
    use std::io::{Read as _, Write as _};
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/plain\r\n\r\n");
    let raw = ns.within(move || {
        let mut s = tcp_connect(src, addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(timeout))?;
        s.write_all(request.as_bytes())?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)?;
        Ok(String::from_utf8(out)?)
    })?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no end of head in {raw:?}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no status in {head:?}"))?;
    Ok((code, head.to_string(), body.to_string()))
}

/// A TCP connection to `dst` from the source address `src` when given (else the one the
/// routing picks), failing after `timeout`.
pub fn tcp_connect(
    src: Option<std::net::IpAddr>,
    dst: std::net::SocketAddr,
    timeout: Duration,
) -> std::io::Result<std::net::TcpStream> {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    let Some(src) = src else {
        return std::net::TcpStream::connect_timeout(&dst, timeout);
    };
    let domain = if dst.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let check = |r: libc::c_int| {
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    let (sa, len) = sockaddr(std::net::SocketAddr::new(src, 0));
    // SAFETY: sa is a valid sockaddr of `len` bytes.
    check(unsafe { libc::bind(fd, (&raw const sa).cast(), len) })?;
    // connect(2) gives up after SO_SNDTIMEO.
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros() as i32),
    };
    // SAFETY: setsockopt with a timeval, as SO_SNDTIMEO takes.
    check(unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&raw const tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    })?;
    let (sa, len) = sockaddr(dst);
    // SAFETY: sa is a valid sockaddr of `len` bytes.
    check(unsafe { libc::connect(fd, (&raw const sa).cast(), len) })?;
    let s = std::net::TcpStream::from(sock);
    s.set_write_timeout(None)?;
    Ok(s)
}

fn sockaddr(a: std::net::SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match a {
        std::net::SocketAddr::V4(v4) => {
            // SAFETY: sockaddr_storage is large and aligned enough for a sockaddr_in.
            let sin = unsafe { &mut *(&raw mut ss).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = v4.port().to_be();
            sin.sin_addr.s_addr = u32::from(*v4.ip()).to_be();
            std::mem::size_of::<libc::sockaddr_in>()
        }
        std::net::SocketAddr::V6(v6) => {
            // SAFETY: sockaddr_storage is large and aligned enough for a sockaddr_in6.
            let sin6 = unsafe { &mut *(&raw mut ss).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = v6.port().to_be();
            sin6.sin6_addr.s6_addr = v6.ip().octets();
            sin6.sin6_scope_id = v6.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}
