//! Puts the box into the site's network as the site file says (`shaper site up`): names the
//! ports, builds the bridge or sets up routing, and gives the box its management address,
//! through rtnetlink and /proc/sys. Run once at boot, before the shaper; DHCP leases arrive
//! later through [`dhcp_event`] (udhcpc's hook).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{anyhow, bail, Context as _, Result};
use futures::TryStreamExt as _;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{BridgeStpState, LinkAttribute, LinkMessage};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVlan, RouteMessageBuilder};

use crate::site::{Addressing, Mode, PortId, Site, BRIDGE, V4, V6};

struct Net {
    h: Handle,
}

/// The links the kernel has: index -> (name, MAC).
async fn links(h: &Handle) -> Result<BTreeMap<u32, (String, Vec<u8>)>> {
    let mut out = BTreeMap::new();
    let mut s = h.link().get().execute();
    while let Some(m) = s.try_next().await.context("listing links")? {
        out.insert(m.header.index, name_mac(&m));
    }
    Ok(out)
}

fn name_mac(m: &LinkMessage) -> (String, Vec<u8>) {
    let mut name = String::new();
    let mut mac = Vec::new();
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => name.clone_from(n),
            LinkAttribute::Address(a) => mac.clone_from(a),
            _ => {}
        }
    }
    (name, mac)
}

fn sysctl(path: &str, value: &str) -> Result<()> {
    std::fs::write(format!("/proc/sys/{path}"), value)
        .with_context(|| format!("setting /proc/sys/{path} to {value}"))
}

impl Net {
    async fn index_of(&self, id: &PortId) -> Result<u32> {
        let all = links(&self.h).await?;
        let found: Vec<u32> = all
            .iter()
            .filter(|(_, (name, mac))| match id {
                PortId::Name(n) => name == n,
                PortId::Mac(m) => mac.as_slice() == m,
            })
            .map(|(i, _)| *i)
            .collect();
        match found.as_slice() {
            [i] => Ok(*i),
            [] => {
                let have: Vec<String> = all
                    .values()
                    .filter(|(n, _)| n != "lo")
                    .map(|(n, m)| {
                        let mac: Vec<String> = m.iter().map(|b| format!("{b:02x}")).collect();
                        format!("{n} ({})", mac.join(":"))
                    })
                    .collect();
                bail!("no interface {id}; this box has: {}", have.join(", "))
            }
            _ => bail!("more than one interface is {id}"),
        }
    }

    async fn index_by_name(&self, name: &str) -> Result<Option<u32>> {
        Ok(links(&self.h)
            .await?
            .into_iter()
            .find(|(_, (n, _))| n == name)
            .map(|(i, _)| i))
    }

    async fn set(&self, msg: LinkMessage, what: &str) -> Result<()> {
        self.h
            .link()
            .set(msg)
            .execute()
            .await
            .with_context(|| what.to_string())
    }

    /// Finds the port and gives it `name` (it must be down to be renamed).
    async fn port(&self, id: &PortId, name: &str) -> Result<u32> {
        let ix = self.index_of(id).await?;
        let cur = links(&self.h)
            .await?
            .remove(&ix)
            .map(|(n, _)| n)
            .unwrap_or_default();
        if cur != name {
            self.set(
                LinkUnspec::new_with_index(ix).down().build(),
                &format!("taking {cur} down to rename it"),
            )
            .await?;
            self.set(
                LinkUnspec::new_with_index(ix)
                    .name(name.to_string())
                    .build(),
                &format!("renaming {cur} to {name}"),
            )
            .await?;
            log::info!("port {id}: {cur} -> {name}");
        }
        Ok(ix)
    }

    async fn up(&self, ix: u32, name: &str) -> Result<()> {
        self.set(
            LinkUnspec::new_with_index(ix).up().build(),
            &format!("bringing {name} up"),
        )
        .await
    }

    async fn address(&self, ix: u32, dev: &str, a: IpAddr, prefix: u8) -> Result<()> {
        self.h
            .address()
            .add(ix, a, prefix)
            .replace()
            .execute()
            .await
            .with_context(|| format!("adding {a}/{prefix} to {dev}"))
    }

    async fn default_v4(&self, gw: Ipv4Addr) -> Result<()> {
        let r = RouteMessageBuilder::<Ipv4Addr>::new().gateway(gw).build();
        self.h
            .route()
            .add(r)
            .replace()
            .execute()
            .await
            .with_context(|| format!("default route via {gw}"))
    }

    async fn default_v6(&self, gw: Ipv6Addr, ix: u32) -> Result<()> {
        let r = RouteMessageBuilder::<Ipv6Addr>::new()
            .gateway(gw)
            .output_interface(ix)
            .build();
        self.h
            .route()
            .add(r)
            .replace()
            .execute()
            .await
            .with_context(|| format!("default IPv6 route via {gw}"))
    }

    /// Static addresses and routes, SLAAC switches; DHCP is the hook's job.
    async fn addressing(&self, ix: u32, dev: &str, a: &Addressing, forwarding: bool) -> Result<()> {
        sysctl(&format!("net/ipv6/conf/{dev}/disable_ipv6"), "0")?;
        match a.ipv6 {
            V6::None => sysctl(&format!("net/ipv6/conf/{dev}/accept_ra"), "0")?,
            V6::Slaac => {
                // A forwarding box ignores router advertisements unless told (2).
                sysctl(
                    &format!("net/ipv6/conf/{dev}/accept_ra"),
                    if forwarding { "2" } else { "1" },
                )?;
                sysctl(&format!("net/ipv6/conf/{dev}/autoconf"), "1")?;
            }
            V6::Static { .. } => sysctl(&format!("net/ipv6/conf/{dev}/accept_ra"), "0")?,
        }
        self.up(ix, dev).await?;
        if let V4::Static {
            addr,
            prefix,
            gateway,
        } = a.ipv4
        {
            self.address(ix, dev, addr.into(), prefix).await?;
            if let Some(gw) = gateway {
                self.default_v4(gw).await?;
            }
        }
        if let V6::Static {
            addr,
            prefix,
            gateway,
        } = a.ipv6
        {
            self.address(ix, dev, addr.into(), prefix).await?;
            if let Some(gw) = gateway {
                self.default_v6(gw, ix).await?;
            }
        }
        Ok(())
    }
}

/// Applies the site file. Run once at boot on ports nothing else has configured.
pub async fn up(site: &Site) -> Result<()> {
    let (conn, h, _) = rtnetlink::new_connection().context("opening a netlink socket")?;
    let task = tokio::spawn(conn);
    let r = up_with(&Net { h }, site).await;
    task.abort();
    r
}

async fn up_with(n: &Net, site: &Site) -> Result<()> {
    if let Some(lo) = n.index_by_name("lo").await? {
        n.up(lo, "lo").await?;
    }
    let wan = n.port(&site.wan, &site.wan_name).await?;
    let lan = n.port(&site.lan, &site.lan_name).await?;
    match site.mode {
        Mode::Bridge => {
            // A bridge, not a router: nothing is routed, and the ports themselves have no
            // addresses (no IPv6 link-local either: the box answers on the bridge only).
            sysctl("net/ipv4/ip_forward", "0")?;
            sysctl("net/ipv6/conf/all/forwarding", "0")?;
            for p in [&site.wan_name, &site.lan_name] {
                sysctl(&format!("net/ipv6/conf/{p}/disable_ipv6"), "1")?;
            }
            let br = match n.index_by_name(BRIDGE).await? {
                Some(i) => i,
                None => {
                    // STP off: ports forward at once (forward_delay is then unused, but 0
                    // says so); the box is one cable, not a switch in a loop.
                    let msg = LinkBridge::new(BRIDGE)
                        .stp_state(BridgeStpState::Disabled)
                        .forward_delay(0)
                        .down()
                        .build();
                    n.h.link()
                        .add(msg)
                        .execute()
                        .await
                        .context("creating the bridge")?;
                    n.index_by_name(BRIDGE)
                        .await?
                        .ok_or_else(|| anyhow!("the bridge vanished after it was made"))?
                }
            };
            for (ix, name) in [(wan, &site.wan_name), (lan, &site.lan_name)] {
                n.set(
                    LinkUnspec::new_with_index(ix).controller(br).build(),
                    &format!("adding {name} to {BRIDGE}"),
                )
                .await?;
                n.up(ix, name).await?;
            }
            n.up(br, BRIDGE).await?;
            // Forwarding from here on; the box's own addresses only behind its firewall.
            firewall(site)?;
            let dev = site.management_dev();
            let mix = match site.vlan {
                None => br,
                Some(v) => {
                    if n.index_by_name(&dev).await?.is_none() {
                        n.h.link()
                            .add(LinkVlan::new(&dev, br, v).build())
                            .execute()
                            .await
                            .with_context(|| format!("creating {dev}"))?;
                    }
                    // The bridge itself carries no address then.
                    sysctl(&format!("net/ipv6/conf/{BRIDGE}/disable_ipv6"), "1")?;
                    n.index_by_name(&dev)
                        .await?
                        .ok_or_else(|| anyhow!("{dev} vanished after it was made"))?
                }
            };
            n.addressing(mix, &dev, &site.management, false).await?;
        }
        Mode::Router => {
            sysctl("net/ipv4/ip_forward", "1")?;
            sysctl("net/ipv6/conf/all/forwarding", "1")?;
            let w = site.wan_addr.clone().unwrap_or(Addressing {
                ipv4: V4::Dhcp,
                ipv6: V6::Slaac,
            });
            firewall(site)?;
            n.addressing(wan, &site.wan_name, &w, true).await?;
            n.addressing(lan, &site.lan_name, &site.management, true)
                .await?;
        }
    }
    Ok(())
}

/// Loads the host firewall (crate::site::firewall) with `nft -f -`: one transaction, so a
/// ruleset nft refuses leaves the previous one in place.
fn firewall(site: &Site) -> Result<()> {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let rules = crate::site::firewall(site);
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting nft for the host firewall")?;
    child
        .stdin
        .take()
        .ok_or_else(|| anyhow!("nft's stdin"))?
        .write_all(rules.as_bytes())
        .context("writing the firewall to nft")?;
    let out = child.wait_with_output().context("waiting for nft")?;
    if !out.status.success() {
        bail!(
            "nft refused the host firewall: {}\n{rules}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// What udhcpc hands its hook script in the environment, validated.
#[derive(Debug, PartialEq, Eq)]
pub struct Lease {
    pub interface: String,
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub router: Option<Ipv4Addr>,
}

/// Reads a lease from udhcpc's variables (`interface`, `ip`, `mask` or `subnet`, `router`).
/// Everything comes from a DHCP server on the network: each value is checked.
pub fn lease_from(get: impl Fn(&str) -> Option<String>) -> Result<Lease> {
    let interface = get("interface").ok_or_else(|| anyhow!("no `interface` from udhcpc"))?;
    if !crate::site::valid_ifname(&interface) {
        bail!("udhcpc named an odd interface {interface:?}");
    }
    let ip: Ipv4Addr = get("ip")
        .ok_or_else(|| anyhow!("no `ip` in the lease"))?
        .parse()
        .context("the lease's `ip`")?;
    let prefix = match get("mask") {
        Some(m) => m.parse::<u8>().context("the lease's `mask`")?,
        None => {
            let s: Ipv4Addr = get("subnet")
                .ok_or_else(|| anyhow!("no `mask` or `subnet` in the lease"))?
                .parse()
                .context("the lease's `subnet`")?;
            let m = u32::from(s);
            if m.leading_ones() + m.trailing_zeros() != 32 {
                bail!("the lease's subnet mask {s} is not contiguous");
            }
            m.leading_ones() as u8
        }
    };
    if !(1..=32).contains(&prefix) || ip.is_unspecified() || ip.is_broadcast() {
        bail!("the lease {ip}/{prefix} is not usable");
    }
    let router = match get("router") {
        None => None,
        Some(r) => Some(
            r.split_whitespace()
                .next()
                .unwrap_or_default()
                .parse()
                .context("the lease's `router`")?,
        ),
    };
    Ok(Lease {
        interface,
        ip,
        prefix,
        router,
    })
}

/// udhcpc's hook: `deconfig` clears the interface's IPv4 addresses, `bound`/`renew` put the
/// lease's address and default route in place; other events change nothing.
pub async fn dhcp_event(event: &str, get: impl Fn(&str) -> Option<String>) -> Result<()> {
    let (conn, h, _) = rtnetlink::new_connection().context("opening a netlink socket")?;
    let task = tokio::spawn(conn);
    let n = Net { h };
    let r = async {
        match event {
            "deconfig" => {
                let dev = get("interface").unwrap_or_default();
                if let Some(ix) = n.index_by_name(&dev).await? {
                    flush_v4(&n, ix, None).await?;
                    n.up(ix, &dev).await?;
                }
                Ok(())
            }
            "bound" | "renew" => {
                let l = lease_from(&get)?;
                let ix = n
                    .index_by_name(&l.interface)
                    .await?
                    .ok_or_else(|| anyhow!("no interface {}", l.interface))?;
                flush_v4(&n, ix, Some((l.ip, l.prefix))).await?;
                n.address(ix, &l.interface, l.ip.into(), l.prefix).await?;
                if let Some(gw) = l.router {
                    n.default_v4(gw).await?;
                }
                log::info!(
                    "dhcp {event}: {}/{} on {}{}",
                    l.ip,
                    l.prefix,
                    l.interface,
                    l.router.map(|g| format!(" via {g}")).unwrap_or_default()
                );
                Ok(())
            }
            _ => Ok(()),
        }
    }
    .await;
    task.abort();
    r
}

/// Deletes the IPv4 addresses of `ix` except `keep`.
async fn flush_v4(n: &Net, ix: u32, keep: Option<(Ipv4Addr, u8)>) -> Result<()> {
    let mut s = n.h.address().get().set_link_index_filter(ix).execute();
    let mut del = Vec::new();
    while let Some(m) = s.try_next().await.context("listing addresses")? {
        if m.header.family != AddressFamily::Inet {
            continue;
        }
        let a = m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(IpAddr::V4(a)) => Some(*a),
            _ => None,
        });
        if a.is_some_and(|a| Some((a, m.header.prefix_len)) != keep) {
            del.push(m);
        }
    }
    for m in del {
        n.h.address()
            .del(m)
            .execute()
            .await
            .context("removing an old address")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn a_lease_is_read_and_checked() {
        let l = lease_from(env(&[
            ("interface", "br0"),
            ("ip", "10.10.0.50"),
            ("subnet", "255.255.255.0"),
            ("router", "10.10.0.1 10.10.0.254"),
        ]))
        .unwrap();
        assert_eq!(
            l,
            Lease {
                interface: "br0".into(),
                ip: "10.10.0.50".parse().unwrap(),
                prefix: 24,
                router: Some("10.10.0.1".parse().unwrap()),
            }
        );
        // busybox also passes the prefix length as `mask`.
        let l = lease_from(env(&[
            ("interface", "br0"),
            ("ip", "10.1.2.3"),
            ("mask", "16"),
        ]))
        .unwrap();
        assert_eq!((l.prefix, l.router), (16, None));
        for bad in [
            vec![
                ("interface", "br0; reboot"),
                ("ip", "10.0.0.2"),
                ("mask", "24"),
            ],
            vec![
                ("interface", "br0"),
                ("ip", "10.0.0.2 && x"),
                ("mask", "24"),
            ],
            vec![
                ("interface", "br0"),
                ("ip", "10.0.0.2"),
                ("subnet", "255.0.255.0"),
            ],
            vec![("interface", "br0"), ("ip", "10.0.0.2"), ("mask", "40")],
            vec![("interface", "br0"), ("ip", "0.0.0.0"), ("mask", "24")],
            vec![
                ("interface", "br0"),
                ("ip", "10.0.0.2"),
                ("mask", "24"),
                ("router", "$(x)"),
            ],
            vec![("ip", "10.0.0.2"), ("mask", "24")],
        ] {
            assert!(lease_from(env(&bad)).is_err(), "{bad:?}");
        }
    }
}
