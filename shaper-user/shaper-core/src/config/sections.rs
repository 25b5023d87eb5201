//! Validation of the sections `validate` (mod.rs) delegates: `[shaping]`, the window
//! clamp, class references, demotion and promotion, DSCP trust, `[dns]`, `[autorate]`,
//! the line's framing and overhead, interface names. (`[[class]]` is in classes.rs,
//! `[[app]]` and `[[rule]]` in rules.rs.)

use super::*;

/// `[shaping] leaf` and `queue_ms`.
pub(crate) fn shaping_settings(
    cx: &Ctx<'_>,
    shaping: &RawShaping,
) -> Result<(LeafChoice, u32), ConfigError> {
    let leaf = match &shaping.leaf {
        None => LeafChoice::Auto,
        Some(s) => match s.get_ref().as_str() {
            "auto" => LeafChoice::Auto,
            "fq_codel" => LeafChoice::FqCodel,
            "cake" => LeafChoice::Cake,
            "bfifo" => LeafChoice::Bfifo,
            other => {
                return Err(cx.at(
                    s,
                    "shaping.leaf",
                    format!("`{other}`: use \"auto\", \"fq_codel\", \"cake\" or \"bfifo\""),
                ))
            }
        },
    };
    let queue_ms = match &shaping.queue_ms {
        None => 20,
        Some(q) if (1..=1000).contains(q.get_ref()) => *q.get_ref(),
        Some(q) => return Err(cx.at(q, "shaping.queue_ms", "must be 1 to 1000 milliseconds")),
    };
    Ok((leaf, queue_ms))
}

/// Validates `[download] window_clamp` / `window_clamp_queue_ms` (download only).
pub(crate) fn window_clamp(
    cx: &Ctx<'_>,
    up: &RawDirection,
    down: &RawDirection,
) -> Result<Option<WindowClamp>, ConfigError> {
    if let Some(w) = &up.window_clamp {
        return Err(cx.at(
            w,
            "upload.window_clamp",
            "only the download direction clamps windows: upload senders are on the LAN and the upload shaper already holds them",
        ));
    }
    if let Some(q) = &up.window_clamp_queue_ms {
        return Err(cx.at(
            q,
            "upload.window_clamp_queue_ms",
            "only the download direction clamps windows (see [download] window_clamp)",
        ));
    }
    let on = down.window_clamp.as_ref().is_some_and(|w| *w.get_ref());
    let queue_ms = match &down.window_clamp_queue_ms {
        None => WINDOW_CLAMP_QUEUE_MS,
        Some(q) if !on => {
            return Err(cx.at(
                q,
                "download.window_clamp_queue_ms",
                "has no effect without `window_clamp = true`: add it, or remove this",
            ))
        }
        Some(q) if *q.get_ref() <= WINDOW_CLAMP_QUEUE_MAX_MS => *q.get_ref(),
        Some(q) => {
            return Err(cx.at(
                q,
                "download.window_clamp_queue_ms",
                format!("must be 0 to {WINDOW_CLAMP_QUEUE_MAX_MS} milliseconds"),
            ))
        }
    };
    Ok(on.then_some(WindowClamp { queue_ms }))
}

pub(crate) fn class_index(
    cx: &Ctx<'_>,
    v: &Spanned<String>,
    field: &str,
    names: &HashMap<String, usize>,
) -> Result<usize, ConfigError> {
    names.get(v.get_ref().trim()).copied().ok_or_else(|| {
        let mut known: Vec<_> = names.iter().collect();
        known.sort_by_key(|(_, i)| **i);
        let known: Vec<_> = known.into_iter().map(|(n, _)| n.as_str()).collect();
        cx.at(
            v,
            field,
            format!(
                "no class named `{}`; classes are: {}",
                v.get_ref(),
                known.join(", ")
            ),
        )
    })
}

/// A class's `demote_to` / `demote_after` / `demote_above`.
pub(crate) fn demote(
    cx: &Ctx<'_>,
    c: &RawClass,
    i: usize,
    names: &HashMap<String, usize>,
) -> Result<Option<Demote>, ConfigError> {
    let f = |k: &str| format!("class[{i}].{k}");
    let after_bytes = match &c.demote_after {
        None => None,
        Some(v) => Some(parse_bytes(v.get_ref()).map_err(|m| cx.at(v, f("demote_after"), m))?),
    };
    let above_bps = match &c.demote_above {
        None => None,
        Some(v) => Some(parse_rate(v.get_ref()).map_err(|m| cx.at(v, f("demote_above"), m))?),
    };
    let Some(to) = &c.demote_to else {
        if let Some(v) = c.demote_after.as_ref().or(c.demote_above.as_ref()) {
            return Err(cx.at(
                v,
                f(if c.demote_after.is_some() {
                    "demote_after"
                } else {
                    "demote_above"
                }),
                "name the class flows are demoted to with `demote_to`",
            ));
        }
        return Ok(None);
    };
    let to_i = class_index(cx, to, &f("demote_to"), names)?;
    if to_i == i {
        return Err(cx.at(to, f("demote_to"), "a class cannot demote flows to itself"));
    }
    if after_bytes.is_none() && above_bps.is_none() {
        return Err(cx.at(
            to,
            f("demote_to"),
            "say when a flow turns bulk: `demote_after` (bytes, e.g. \"20MB\") and/or \
             `demote_above` (rate over a second, e.g. \"4mbit\")",
        ));
    }
    Ok(Some(Demote {
        to: to_i,
        after_bytes,
        above_bps,
    }))
}

/// `[calls]`; without it, the class named `video` (if any) and the `[promote]` class are
/// measured, addresses pseudonymous, calls ending after 10 s of quiet.
pub(crate) fn calls(
    cx: &Ctx<'_>,
    c: Option<&Spanned<RawCalls>>,
    names: &HashMap<String, usize>,
    promote: Option<&Promote>,
) -> Result<CallsSettings, ConfigError> {
    let raw = c.map(|c| c.get_ref());
    let mut classes = Vec::new();
    match raw.and_then(|r| r.classes.as_ref()) {
        Some(list) => {
            for v in list {
                let i = class_index(cx, v, "calls.classes", names)?;
                if !classes.contains(&i) {
                    classes.push(i);
                }
            }
        }
        None => {
            if let Some(&i) = names.get("video") {
                classes.push(i);
            }
            if let Some(p) = promote {
                if !classes.contains(&p.class) {
                    classes.push(p.class);
                }
            }
        }
    }
    let show_addresses = match raw.and_then(|r| r.addresses.as_ref()) {
        None => false,
        Some(v) => match v.get_ref().as_str() {
            "pseudonymous" => false,
            "shown" => true,
            _ => {
                return Err(cx.at(
                    v,
                    "calls.addresses",
                    "\"pseudonymous\" (the default: addresses as keyed hashes) or \"shown\"",
                ))
            }
        },
    };
    let quiet_s = match raw.and_then(|r| r.quiet_s.as_ref()) {
        None => 10,
        Some(v) if (2..=300).contains(v.get_ref()) => *v.get_ref() as u32,
        Some(v) => return Err(cx.at(v, "calls.quiet_s", "must be 2 to 300 seconds")),
    };
    Ok(CallsSettings {
        classes,
        show_addresses,
        quiet_s,
    })
}

/// `[promote]`.
pub(crate) fn promote(
    cx: &Ctx<'_>,
    p: Option<&Spanned<RawPromote>>,
    names: &HashMap<String, usize>,
    classes: &[Class],
) -> Result<Option<Promote>, ConfigError> {
    let Some(p) = p else { return Ok(None) };
    let p = p.get_ref();
    let class = class_index(cx, &p.class, "promote.class", names)?;
    let _ = classes;
    let min_pps = match &p.min_pps {
        None => 20,
        Some(v) if (1..=100_000).contains(v.get_ref()) => *v.get_ref() as u32,
        Some(v) => {
            return Err(cx.at(
                v,
                "promote.min_pps",
                "must be 1 to 100000 packets per second",
            ))
        }
    };
    let max_bps = match &p.max_rate {
        None => 4_000_000,
        Some(v) => parse_rate(v.get_ref()).map_err(|m| cx.at(v, "promote.max_rate", m))?,
    };
    if max_bps / 8 > u32::MAX as u64 {
        let v = p.max_rate.as_ref().expect("set: the default is small");
        return Err(cx.at(v, "promote.max_rate", "at most 34gbit"));
    }
    let max_packet = match &p.max_packet {
        None => 1300,
        Some(v) if (64..=65535).contains(v.get_ref()) => *v.get_ref() as u32,
        Some(v) => return Err(cx.at(v, "promote.max_packet", "must be 64 to 65535 bytes")),
    };
    Ok(Some(Promote {
        class,
        min_pps,
        max_bps,
        max_packet,
    }))
}

/// `[dscp]`: whether each direction's marks are trusted (upload: the LAN's, download: the
/// WAN's); adds a rule per honoured codepoint.
pub(crate) fn dscp_trust(
    cx: &Ctx<'_>,
    d: Option<&Spanned<RawDscp>>,
    names: &HashMap<String, usize>,
    rules: &mut Vec<Rule>,
) -> Result<PerDir<bool>, ConfigError> {
    let Some(d) = d else {
        return Ok(PerDir::new(true, true));
    };
    let d = d.get_ref();
    let side = |v: &Option<Spanned<String>>, field: &str| -> Result<bool, ConfigError> {
        match v {
            None => Ok(true),
            Some(s) => match s.get_ref().trim() {
                "trust" => Ok(true),
                "ignore" => Ok(false),
                other => Err(cx.at(s, field, format!("`{other}`: use \"trust\" or \"ignore\""))),
            },
        }
    };
    let lan = side(&d.lan, "dscp.lan")?;
    let wan = side(&d.wan, "dscp.wan")?;
    if let Some(h) = &d.honour {
        if !lan {
            return Err(cx.at(
                h,
                "dscp.honour",
                "marks from the LAN are honoured only when trusted: set `lan = \"trust\"` or remove `honour`",
            ));
        }
        for (k, v) in h.get_ref() {
            let code = dscp_value(&toml::Value::String(k.clone()))
                .or_else(|_| {
                    k.parse::<u8>()
                        .map_err(|e| e.to_string())
                        .and_then(|n| dscp_value(&toml::Value::Integer(n.into())))
                })
                .map_err(|m| cx.at(h, format!("dscp.honour.{k}"), m))?;
            let toml::Value::String(cname) = v else {
                return Err(cx.at(
                    h,
                    format!("dscp.honour.{k}"),
                    format!("`{v}` is not a class name: write it as a string like \"video\""),
                ));
            };
            let Some(&class) = names.get(cname.trim()) else {
                return Err(cx.at(
                    h,
                    format!("dscp.honour.{k}"),
                    format!("no class named `{cname}`"),
                ));
            };
            rules.push(Rule {
                name: format!("dscp-honour-{}", k.to_ascii_lowercase()),
                class,
                // After the autorate probes, before every rule of the file.
                priority: i64::MIN + 1,
                direction: Some(Dir::Up),
                protocols: vec![],
                src_ports: vec![],
                dst_ports: vec![],
                src_cidrs: vec![],
                dst_cidrs: vec![],
                dscp: vec![code],
                dns_names: vec![],
            });
        }
    }
    Ok(PerDir::new(lan, wan))
}

/// `[dns]`.
pub(crate) fn dns_settings(
    cx: &Ctx<'_>,
    d: Option<&Spanned<RawDns>>,
) -> Result<DnsSettings, ConfigError> {
    let mut out = DnsSettings::default();
    let Some(d) = d else { return Ok(out) };
    let d = d.get_ref();
    if let Some(v) = &d.min_ttl {
        if !(1..=86_400).contains(v.get_ref()) {
            return Err(cx.at(v, "dns.min_ttl", "must be 1 to 86400 seconds"));
        }
        out.min_ttl_s = *v.get_ref() as u32;
    }
    if let Some(v) = &d.max_ttl {
        if !(1..=604_800).contains(v.get_ref()) {
            return Err(cx.at(v, "dns.max_ttl", "must be 1 to 604800 seconds (a week)"));
        }
        out.max_ttl_s = *v.get_ref() as u32;
    }
    if out.min_ttl_s > out.max_ttl_s {
        let v = d
            .min_ttl
            .as_ref()
            .or(d.max_ttl.as_ref())
            .expect("one is set");
        return Err(cx.at(
            v,
            if d.min_ttl.is_some() {
                "dns.min_ttl"
            } else {
                "dns.max_ttl"
            },
            format!(
                "min_ttl ({} s) is above max_ttl ({} s)",
                out.min_ttl_s, out.max_ttl_s
            ),
        ));
    }
    if let Some(v) = &d.max_entries {
        if !(1..=MAX_DNS_ENTRIES as i64).contains(v.get_ref()) {
            return Err(cx.at(
                v,
                "dns.max_entries",
                format!("must be 1 to {MAX_DNS_ENTRIES}"),
            ));
        }
        out.max_entries = *v.get_ref() as u32;
    }
    out.resolvers = values(
        cx,
        &d.resolvers,
        "dns.resolvers".into(),
        "resolver",
        |v| match v {
            toml::Value::String(s) => s.trim().parse::<IpAddr>().map_err(|_| {
                format!("`{s}` is not an IP address (like \"192.0.2.53\" or \"2001:db8::53\")")
            }),
            other => Err(format!(
                "`{other}` is not an address: write it as a string like \"192.0.2.53\""
            )),
        },
    )?;
    Ok(out)
}

/// Validates `[autorate]` and the directions' `min_rate`.
pub(crate) fn autorate(
    cx: &Ctx<'_>,
    raw_dirs: PerDir<&RawDirection>,
    a: Option<&Spanned<RawAutorate>>,
    classes: &[Class],
    names: &HashMap<String, usize>,
    rates: PerDir<u64>,
) -> Result<Option<Autorate>, ConfigError> {
    let Some(a) = a else {
        for (d, f) in raw_dirs.iter().map(|(d, r)| (*r, d.name())) {
            if let Some(m) = &d.min_rate {
                return Err(cx.at(
                    m,
                    format!("{f}.min_rate"),
                    "`min_rate` is the floor of rate adaptation: add an [autorate] table, or remove it",
                ));
            }
        }
        return Ok(None);
    };
    let a = a.get_ref();
    let reflectors = values(
        cx,
        &Some(a.reflectors.clone()),
        "autorate.reflectors".into(),
        "reflector",
        |v| {
            match v {
            toml::Value::String(s) => s.trim().parse::<std::net::Ipv4Addr>().map_err(|_| {
                format!(
                    "`{s}` is not an IPv4 address (reflectors are pinged over IPv4; IPv6 reflectors are not supported yet)"
                )
            }),
            other => Err(format!(
                "`{other}` is not an address: write it as a string like \"192.0.2.1\""
            )),
        }
        },
    )?;
    if reflectors.is_empty() {
        return Err(cx.at(
            &a.reflectors,
            "autorate.reflectors",
            "give at least one address to ping",
        ));
    }
    let class = match &a.class {
        Some(c) => *names.get(c.get_ref().trim()).ok_or_else(|| {
            let known: Vec<_> = classes.iter().map(|c| c.name.as_str()).collect();
            cx.at(
                c,
                "autorate.class",
                format!(
                    "no class named `{}`; classes are: {}",
                    c.get_ref(),
                    known.join(", ")
                ),
            )
        })?,
        None => (0..classes.len())
            .min_by_key(|&i| classes[i].priority)
            .unwrap_or(0),
    };
    let delay_ms = match &a.delay_ms {
        None => 30,
        Some(d) if (2..=500).contains(d.get_ref()) => *d.get_ref(),
        Some(d) => return Err(cx.at(d, "autorate.delay_ms", "must be 2 to 500 milliseconds")),
    };
    let interval_ms = match &a.interval_ms {
        None => 50,
        Some(d) if (10..=1000).contains(d.get_ref()) => *d.get_ref(),
        Some(d) => return Err(cx.at(d, "autorate.interval_ms", "must be 10 to 1000 milliseconds")),
    };
    let floor = |d: &RawDirection, f: &str, rate: u64| -> Result<u64, ConfigError> {
        let Some(m) = &d.min_rate else {
            return Ok(rate / 4);
        };
        let v = parse_rate(m.get_ref()).map_err(|e| cx.at(m, format!("{f}.min_rate"), e))?;
        if v > rate {
            return Err(cx.at(
                m,
                format!("{f}.min_rate"),
                format!(
                    "{} is above {f}.rate ({}): autorate moves between min_rate and rate",
                    m.get_ref(),
                    raw_rate(d)
                ),
            ));
        }
        Ok(v)
    };
    Ok(Some(Autorate {
        reflectors,
        class,
        delay_ms,
        interval_ms,
        min_bps: raw_dirs
            .map(|d, r| floor(r, d.name(), rates[d]))
            .transpose()?,
    }))
}

pub(crate) fn raw_rate(d: &RawDirection) -> &str {
    d.rate.get_ref()
}

/// `[upload]`/`[download]` `line`, then `framing`, `overhead` and `mpu` over it.
pub(crate) fn link_accounting(
    cx: &Ctx<'_>,
    raw: &RawDirection,
    dir: &str,
) -> Result<LinkAccounting, ConfigError> {
    let mut acc = match &raw.line {
        None => LinkAccounting::default(),
        Some(l) => line_preset(l.get_ref().trim()).ok_or_else(|| {
            let names: Vec<_> = LINE_PRESETS
                .iter()
                .map(|p| format!("\"{}\"", p.0))
                .collect();
            cx.at(
                l,
                format!("{dir}.line"),
                format!(
                    "`{}` is not a line type; use {}",
                    l.get_ref(),
                    names.join(", ")
                ),
            )
        })?,
    };
    if let Some(f) = &raw.framing {
        acc.framing = match f.get_ref().trim() {
            "atm" => Framing::Atm,
            "ptm" => Framing::Ptm,
            "ethernet" => Framing::Ethernet,
            other => {
                return Err(cx.at(
                    f,
                    format!("{dir}.framing"),
                    format!("`{other}`: use \"atm\" (ADSL), \"ptm\" (VDSL2, EFM) or \"ethernet\""),
                ))
            }
        };
    }
    if let Some(o) = &raw.overhead {
        let v = *o.get_ref();
        if !OVERHEAD_RANGE.contains(&v) {
            return Err(cx.at(
                o,
                format!("{dir}.overhead"),
                format!(
                    "{v} is out of range: bytes added to each IP packet, {} to {}",
                    OVERHEAD_RANGE.start(),
                    OVERHEAD_RANGE.end()
                ),
            ));
        }
        acc.overhead = v as i32;
    }
    if let Some(m) = &raw.mpu {
        let v = *m.get_ref();
        if !MPU_RANGE.contains(&v) {
            return Err(cx.at(
                m,
                format!("{dir}.mpu"),
                format!(
                    "{v} is out of range: minimum bytes per packet on the line, {} to {}",
                    MPU_RANGE.start(),
                    MPU_RANGE.end()
                ),
            ));
        }
        acc.mpu = v as u32;
    }
    Ok(acc)
}

pub(crate) fn classes_name(classes: &[Class], i: usize) -> &str {
    classes.get(i).map(|c| c.name.as_str()).unwrap_or("?")
}

pub(crate) fn interface_name(
    cx: &Ctx<'_>,
    v: &Spanned<String>,
    field: &str,
) -> Result<String, ConfigError> {
    let s = v.get_ref();
    // IFNAMSIZ is 16 including the NUL.
    if s.is_empty()
        || s.len() > 15
        || s.contains('/')
        || s.contains(':')
        || s.chars().any(|c| c.is_whitespace())
        || s == "."
        || s == ".."
    {
        return Err(cx.at(
            v,
            field,
            format!("`{s}` is not a valid interface name (1-15 characters, no spaces, '/' or ':')"),
        ));
    }
    Ok(s.clone())
}
