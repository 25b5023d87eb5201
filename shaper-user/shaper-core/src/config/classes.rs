//! `[[class]]`: names, priorities, guaranteed and ceiling shares checked against both
//! directions' rates, DSCP marks, `claimed_max`, the one default class, demotion targets,
//! and the guarantees' sum per direction.

use super::*;

/// The classes in file order, their indices by name, and the default class's index.
pub(crate) struct Classes {
    pub(crate) classes: Vec<Class>,
    pub(crate) names: HashMap<String, usize>,
    pub(crate) default_class: usize,
}

pub(crate) fn classes(
    cx: &Ctx<'_>,
    raw: &RawConfig,
    rates: PerDir<u64>,
) -> Result<Classes, ConfigError> {
    if raw.classes.is_empty() {
        return Err(cx.err(
            None,
            "class",
            "at least one [[class]] is needed, one of them with `default = true`",
        ));
    }
    if raw.classes.len() > shaper_common::MAX_CLASSES {
        return Err(cx.at(
            &raw.classes[shaper_common::MAX_CLASSES],
            "class",
            format!("at most {} classes", shaper_common::MAX_CLASSES),
        ));
    }
    let mut classes = Vec::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut default_class = None;
    for (i, sc) in raw.classes.iter().enumerate() {
        let c = sc.get_ref();
        let f = |k: &str| format!("class[{i}].{k}");
        let name = c.name.get_ref().trim().to_string();
        if name.is_empty()
            || !name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
        {
            return Err(cx.at(&c.name, f("name"), "use letters, digits, '-' and '_'"));
        }
        if names.insert(name.clone(), i).is_some() {
            return Err(cx.at(
                &c.name,
                f("name"),
                format!("class `{name}` is defined twice"),
            ));
        }
        let prio = *c.priority.get_ref();
        if !(0..=MAX_PRIORITY as i64).contains(&prio) {
            return Err(cx.at(
                &c.priority,
                f("priority"),
                format!("must be 0 (served first) to {MAX_PRIORITY}"),
            ));
        }
        let guaranteed = parse_share(c.guaranteed.get_ref())
            .map_err(|m| cx.at(&c.guaranteed, f("guaranteed"), m))?;
        let ceiling = match &c.ceiling {
            None => Share::Percent(100.0),
            Some(s) => parse_share(s.get_ref()).map_err(|m| cx.at(s, f("ceiling"), m))?,
        };
        for (dir, rate) in Dir::ALL.map(|d| (d.name(), rates[d])) {
            let g = guaranteed.of(rate);
            let ce = ceiling.of(rate);
            if g > rate {
                return Err(cx.at(
                    &c.guaranteed,
                    f("guaranteed"),
                    format!(
                        "{guaranteed} is more than the {dir} rate {}",
                        format_rate(rate)
                    ),
                ));
            }
            if ce > rate {
                let span = c.ceiling.as_ref().map(|s| s.span());
                return Err(cx.err(
                    span,
                    f("ceiling"),
                    format!(
                        "{ceiling} is more than the {dir} rate {}",
                        format_rate(rate)
                    ),
                ));
            }
            if ce < g {
                let span = c
                    .ceiling
                    .as_ref()
                    .map(|s| s.span())
                    .or(Some(c.guaranteed.span()));
                return Err(cx.err(
                    span,
                    f("ceiling"),
                    format!("ceiling {ceiling} is below the guaranteed {guaranteed} ({dir})"),
                ));
            }
            if g < 8_000 {
                let msg = match guaranteed {
                    Share::Bps(_) => {
                        format!("{guaranteed} is below 8kbit, the least a class can be guaranteed")
                    }
                    Share::Percent(_) => format!(
                        "{guaranteed} of the {dir} rate {} is {}; at least 8kbit is needed",
                        format_rate(rate),
                        format_rate(g)
                    ),
                };
                return Err(cx.at(&c.guaranteed, f("guaranteed"), msg));
            }
        }
        let dscp = match &c.dscp {
            None => None,
            Some(d) => Some(dscp_value(d.get_ref()).map_err(|m| cx.at(d, f("dscp"), m))?),
        };
        let claimed_max = match &c.claimed_max {
            None => None,
            Some(v) => {
                let share = parse_share(v.get_ref()).map_err(|m| cx.at(v, f("claimed_max"), m))?;
                if share.of(rates[Dir::Up].min(rates[Dir::Down])) < 8_000 {
                    return Err(cx.at(v, f("claimed_max"), format!("{share} is below 8kbit")));
                }
                Some(share)
            }
        };
        if let Some(d) = c.default.as_ref().filter(|d| *d.get_ref()) {
            if let Some(prev) = default_class {
                return Err(cx.at(
                    d,
                    f("default"),
                    format!(
                        "class `{}` is already the default; only one class can be",
                        classes_name(&classes, prev)
                    ),
                ));
            }
            default_class = Some(i);
        }
        classes.push(Class {
            name,
            priority: prio as u8,
            guaranteed,
            ceiling,
            dscp,
            demote: None,
            claimed_max,
        });
    }
    let Some(default_class) = default_class else {
        return Err(cx.err(
            Some(raw.classes[0].span()),
            "class",
            "no class has `default = true`; unmatched traffic needs one",
        ));
    };
    for (i, sc) in raw.classes.iter().enumerate() {
        classes[i].demote = demote(cx, sc.get_ref(), i, &names)?;
    }
    for (dir, rate) in Dir::ALL.map(|d| (d.name(), rates[d])) {
        // Exact shares, not the rounded bit rates: 50% + 50% of an odd rate
        // is 100%, though each half rounds up.
        let share = |c: &Class| match c.guaranteed {
            Share::Percent(p) => rate as f64 * p / 100.0,
            Share::Bps(b) => b as f64,
        };
        let limit = rate as f64 * (1.0 + 1e-9);
        let mut running = 0.0;
        // The class whose guarantee takes the total past the rate.
        let over = classes.iter().position(|c| {
            running += share(c);
            running > limit
        });
        if let Some(i) = over {
            let total: f64 = classes.iter().map(share).sum();
            let parts: Vec<String> = classes
                .iter()
                .map(|c| format!("{} {}", c.name, format_rate(share(c).round() as u64)))
                .collect();
            return Err(cx.at(
                &raw.classes[i].get_ref().guaranteed,
                format!("class[{i}].guaranteed"),
                format!(
                    "guaranteed shares add up to {}, {:.1}% of the {dir} rate {} ({}); they must not exceed 100%",
                    format_rate(total.round() as u64),
                    total * 100.0 / rate as f64,
                    format_rate(rate),
                    parts.join(" + ")
                ),
            ));
        }
    }
    Ok(Classes {
        classes,
        names,
        default_class,
    })
}
