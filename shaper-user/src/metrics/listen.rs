//! Where the metrics endpoint may listen, and binding it there: never on the unspecified
//! address or one of the WAN interface's, and only for connections that arrive on the
//! interface that holds the address (SO_BINDTODEVICE).

use std::{
    ffi::CStr,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use anyhow::{bail, Context as _, Result};
use tokio::net::TcpSocket;

use crate::config::Policy;

/// Fails if `addr` is the unspecified address (which includes the WAN's) or
/// one of the addresses the WAN interface `wan_ifname` has now (aliases such
/// as `wan0:1` included). IPv4-mapped IPv6 addresses count as their IPv4.
pub fn check_listen(addr: SocketAddr, wan_ifname: &str) -> Result<()> {
    let ip = canonical(addr.ip());
    if ip.is_unspecified() {
        bail!(
            "telemetry.listen = \"{addr}\": refusing to serve metrics on every address, \
             which includes the WAN interface {wan_ifname}; give a LAN or loopback address"
        );
    }
    let wan = interface_addresses(wan_ifname)
        .with_context(|| format!("listing the addresses of {wan_ifname}"))?;
    if wan.contains(&ip) {
        bail!(
            "telemetry.listen = \"{addr}\": {ip} is an address of the WAN interface \
             {wan_ifname}; refusing to serve metrics there (give a LAN or loopback address)"
        );
    }
    Ok(())
}

/// An IPv4-mapped IPv6 address as its IPv4 address; any other as it is.
pub(super) fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// The IPv4 and IPv6 addresses of `ifname` (and its `ifname:label` aliases)
/// in the current network namespace, by getifaddrs(3).
pub fn interface_addresses(ifname: &str) -> Result<Vec<IpAddr>> {
    Ok(all_addresses()?
        .into_iter()
        .filter(|(name, _)| {
            name == ifname
                || name
                    .strip_prefix(ifname)
                    .is_some_and(|rest| rest.starts_with(':'))
        })
        .map(|(_, ip)| ip)
        .collect())
}

/// Every IPv4 and IPv6 address in the current network namespace with the name it is
/// listed under (an alias as `lan0:1`), by getifaddrs(3).
pub(super) fn all_addresses() -> Result<Vec<(String, IpAddr)>> {
    struct List(*mut libc::ifaddrs);
    impl Drop for List {
        fn drop(&mut self) {
            if !self.0.is_null() {
                // SAFETY: the list came from a successful getifaddrs and is freed once.
                unsafe { libc::freeifaddrs(self.0) };
            }
        }
    }
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head into `head` on success.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error()).context("getifaddrs");
    }
    let list = List(head);
    let mut out = Vec::new();
    let mut p = list.0;
    while !p.is_null() {
        // SAFETY: p is a node of the list, valid until freeifaddrs.
        let ifa = unsafe { &*p };
        p = ifa.ifa_next;
        if ifa.ifa_name.is_null() || ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: ifa_addr points to a sockaddr whose family says its real type.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        match family {
            libc::AF_INET => {
                // SAFETY: family AF_INET: the sockaddr is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                out.push((name, IpAddr::V4(ip)));
            }
            libc::AF_INET6 => {
                // SAFETY: family AF_INET6: the sockaddr is a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                out.push((name, IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))));
            }
            _ => {}
        }
    }
    Ok(out)
}

/// A listening metrics socket, bound to its address and its interface, not served yet.
pub struct Bound {
    pub(super) listener: std::net::TcpListener,
    pub(super) addr: SocketAddr,
    pub(super) device: String,
}

/// The first half of the `shaper run` hook, called once the first apply has succeeded
/// (and before the daemon drops capabilities: a port below 1024 needs
/// CAP_NET_BIND_SERVICE): checks `policy.metrics_listen` against the WAN interface
/// (again: it may have come up since the daemon started), and binds it on the interface
/// that holds the address. Never fails the daemon: a refused or unbindable address is
/// logged and the shaping goes on without metrics. Must be called inside a tokio runtime.
pub fn bind(policy: &Policy) -> Option<Bound> {
    let addr = policy.metrics_listen?;
    match bind_on_device(addr, &policy.wan) {
        Ok(b) => Some(b),
        Err(e) => {
            log::error!("metrics endpoint not started, shaping goes on: {e:#}");
            None
        }
    }
}

/// Binds `addr` with SO_BINDTODEVICE to the interface that holds it: Linux accepts a
/// connection to any of its addresses on any interface (the weak host model), so an
/// unbound socket on the LAN address would answer a host on the WAN side that routes
/// the LAN address through the WAN port.
pub(super) fn bind_on_device(addr: SocketAddr, wan_ifname: &str) -> Result<Bound> {
    check_listen(addr, wan_ifname)?;
    let device = device_holding(addr)?;
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .context("creating the metrics socket")?;
    socket.set_reuseaddr(true)?;
    socket
        .bind_device(Some(device.as_bytes()))
        .with_context(|| format!("binding the metrics socket to the interface {device}"))?;
    socket
        .bind(addr)
        .with_context(|| format!("binding the metrics endpoint to {addr}"))?;
    let listener = socket
        .listen(64)
        .with_context(|| format!("listening on {addr}"))?
        .into_std()?;
    Ok(Bound {
        listener,
        addr,
        device,
    })
}

/// The interface a listen address belongs to: the scope of a scoped IPv6 address, else
/// the interface that has the address now (an alias `lan0:1` is its device `lan0`).
fn device_holding(addr: SocketAddr) -> Result<String> {
    if let SocketAddr::V6(a) = addr {
        if a.scope_id() != 0 {
            let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
            // SAFETY: if_indextoname writes at most IF_NAMESIZE bytes, NUL included.
            let p = unsafe { libc::if_indextoname(a.scope_id(), name.as_mut_ptr()) };
            if p.is_null() {
                bail!(
                    "telemetry.listen = \"{addr}\": no interface has index {}",
                    a.scope_id()
                );
            }
            // SAFETY: on success `name` holds a NUL-terminated name.
            let name = unsafe { CStr::from_ptr(name.as_ptr()) };
            return Ok(name.to_string_lossy().into_owned());
        }
    }
    let ip = canonical(addr.ip());
    let all = all_addresses().context("listing the interfaces' addresses")?;
    let (name, _) = all.into_iter().find(|(_, a)| *a == ip).with_context(|| {
        format!(
            "telemetry.listen = \"{addr}\": no interface has the address {ip}; give an address of a LAN interface or of lo"
        )
    })?;
    Ok(match name.split_once(':') {
        Some((dev, _)) => dev.to_string(),
        None => name,
    })
}
