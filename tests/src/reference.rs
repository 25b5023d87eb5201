//! A reference shaper made of plain `tc` (HTB + u32 filters) that implements a
//! [`ShaperConfig`] the way the product is meant to. It exists only to check the lab: that the
//! shaping test's thresholds can be met on this host with a textbook HTB set-up, before and
//! independently of the product. (The product itself must use netlink, not `tc`.)

use anyhow::{bail, Context, Result};

use crate::config::ShaperConfig;
use crate::netns::Netns;

/// Splits an inclusive port range into (value, mask) blocks that u32 can match.
pub fn port_blocks(lo: u16, hi: u16) -> Vec<(u16, u16)> {
    let mut out = Vec::new();
    let mut start = lo as u32;
    let end = hi as u32;
    while start <= end {
        let mut size = 1u32;
        while start.is_multiple_of(size * 2) && start + size * 2 - 1 <= end && size < 0x10000 {
            size *= 2;
        }
        out.push((start as u16, (0x10000 - size) as u16));
        start += size;
    }
    out
}

fn parse_ports(spec: &str) -> Result<(u16, u16)> {
    match spec.split_once('-') {
        Some((a, b)) => Ok((a.trim().parse()?, b.trim().parse()?)),
        None => {
            let p = spec.trim().parse()?;
            Ok((p, p))
        }
    }
}

/// Options of the reference shaper beyond the config.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReferenceOptions {
    /// Also steer small TCP packets (pure ACKs, IPv4 total length < 64) into the first
    /// (highest-priority) class, as cake's ACK handling effectively does.
    pub ack_priority: bool,
    /// Depth of each class's bfifo leaf in milliseconds at the class ceiling (at least 10
    /// frames). `None`: 100 ms. `Some(20)` matches the product's default `queue_ms`.
    pub leaf_queue_ms: Option<u32>,
    /// fq_codel leaves instead of bfifo (kernels that have it: the VM tier's gateway).
    pub fq_codel_leaves: bool,
    /// ATM line: a size table on each root counting the IP packet plus this many bytes in
    /// 53-byte cells (`stab linklayer atm overhead N-14`: the frames the qdisc sees carry
    /// a 14-byte Ethernet header the copper does not).
    pub atm_overhead: Option<u16>,
}

/// Installs HTB with one class per config class on `wan` (upload, matching destination
/// ports) and `lan` (download, matching source ports) in `gw`.
pub fn apply(gw: &Netns, config: &ShaperConfig) -> Result<()> {
    apply_with(gw, config, ReferenceOptions::default())
}

/// [`apply`] with options.
pub fn apply_with(gw: &Netns, config: &ShaperConfig, opts: ReferenceOptions) -> Result<()> {
    for args in commands(config, opts)? {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        gw.run("tc", &args)?;
    }
    Ok(())
}

/// The `tc` argument lists [`apply_with`] runs, in order (also what the VM tier's plain-HTB
/// gateway runs as a shell script).
pub fn commands(config: &ShaperConfig, opts: ReferenceOptions) -> Result<Vec<Vec<String>>> {
    let mut out: Vec<Vec<String>> = Vec::new();
    let default_minor = config
        .classes
        .iter()
        .position(|c| c.default)
        .context("config has no default class")?
        + 1;
    for (dev, rate, upload) in [
        (&config.wan, config.upload_bps, true),
        (&config.lan, config.download_bps, false),
    ] {
        let mut tc = |args: &[&str]| -> Result<()> {
            out.push(args.iter().map(|a| a.to_string()).collect());
            Ok(())
        };
        let default = format!("{:x}", 0x10 * default_minor);
        let mut root = vec!["qdisc", "replace", "dev", dev, "root", "handle", "1:"];
        let overhead = opts.atm_overhead.map(|n| (i32::from(n) - 14).to_string());
        if let Some(o) = &overhead {
            root.extend(["stab", "linklayer", "atm", "overhead", o]);
        }
        root.extend(["htb", "default", &default]);
        tc(&root)?;
        tc(&[
            "class",
            "add",
            "dev",
            dev,
            "parent",
            "1:",
            "classid",
            "1:1",
            "htb",
            "rate",
            &format!("{rate}bit"),
            "quantum",
            "3028",
        ])?;
        for (i, c) in config.classes.iter().enumerate() {
            let minor = format!("{:x}", 0x10 * (i + 1));
            let guaranteed = rate * c.guaranteed_pct as u64 / 100;
            let ceil = rate * c.ceiling_pct as u64 / 100;
            tc(&[
                "class",
                "add",
                "dev",
                dev,
                "parent",
                "1:1",
                "classid",
                &format!("1:{minor}"),
                "htb",
                "rate",
                &format!("{guaranteed}bit"),
                "ceil",
                &format!("{ceil}bit"),
                "prio",
                &c.priority.min(7).to_string(),
                "quantum",
                "3028",
            ])?;
            let parent = format!("1:{minor}");
            let mut leaf = vec!["qdisc", "add", "dev", dev, "parent", &parent];
            let limit;
            if opts.fq_codel_leaves {
                leaf.push("fq_codel");
            } else {
                // A bounded leaf queue (~100 ms at the ceiling unless set, at least 10 frames).
                let queue_ms = u64::from(opts.leaf_queue_ms.unwrap_or(100));
                limit = (ceil / 8 * queue_ms / 1000).max(15_140).to_string();
                leaf.extend(["bfifo", "limit", &limit]);
            }
            tc(&leaf)?;
        }
        if opts.ack_priority {
            tc(&[
                "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1", "u32",
                "match", "ip", "protocol", "6", "0xff", "match", "u16", "0x0000", "0xffc0", "at",
                "2", "flowid", "1:10",
            ])?;
        }
        for rule in &config.rules {
            let class_idx = config
                .classes
                .iter()
                .position(|c| c.name == rule.class)
                .with_context(|| {
                    format!("rule {} names unknown class {}", rule.name, rule.class)
                })?;
            let flowid = format!("1:{:x}", 0x10 * (class_idx + 1));
            let proto = match rule.protocol.as_deref() {
                Some("udp") => "17",
                Some("tcp") => "6",
                other => bail!("reference shaper: protocol {other:?} not supported"),
            };
            if !rule.src_cidrs.is_empty()
                || !rule.dst_cidrs.is_empty()
                || !rule.src_ports.is_empty()
            {
                bail!("reference shaper: only protocol + dst_ports rules are supported");
            }
            // Internet-side port: destination going up, source coming down.
            let (v4_field, v6_field) = if upload {
                ("dport", "dport")
            } else {
                ("sport", "sport")
            };
            for spec in &rule.dst_ports {
                let (lo, hi) = parse_ports(spec)?;
                for (value, mask) in port_blocks(lo, hi) {
                    let (value, mask) = (value.to_string(), format!("0x{mask:04x}"));
                    tc(&[
                        "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1",
                        "u32", "match", "ip", "protocol", proto, "0xff", "match", "ip", v4_field,
                        &value, &mask, "flowid", &flowid,
                    ])?;
                    tc(&[
                        "filter", "add", "dev", dev, "parent", "1:", "protocol", "ipv6", "prio",
                        "2", "u32", "match", "ip6", "protocol", proto, "0xff", "match", "ip6",
                        v6_field, &value, &mask, "flowid", &flowid,
                    ])?;
                }
            }
        }
    }
    Ok(out)
}

/// Removes what [`apply`] installed (the devices fall back to their default qdisc).
pub fn remove(gw: &Netns, config: &ShaperConfig) -> Result<()> {
    for dev in [&config.wan, &config.lan] {
        gw.run("tc", &["qdisc", "del", "dev", dev, "root"])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn teams_range_splits_into_aligned_blocks() {
        let blocks = port_blocks(50020, 50039);
        assert_eq!(
            blocks,
            vec![(50020, 0xfffc), (50024, 0xfff8), (50032, 0xfff8)]
        );
        assert_eq!(port_blocks(104, 104), vec![(104, 0xffff)]);
        // Covers exactly the range.
        let covered: u32 = blocks.iter().map(|(_, m)| 0x10000 - *m as u32).sum();
        assert_eq!(covered, 20);
    }
}
