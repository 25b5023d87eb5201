//! `[[app]]` and `[[rule]]`: the config's apps over the built-in catalogue, then each
//! rule's match fields, or its apps expanded into one rule per way the app shows on the
//! wire; names unique after expansion, at most `MAX_RULES`.

use super::*;

/// The rules in file order (sorted by `validate`), what `check` should say about them,
/// and the catalogue they were expanded from.
pub(crate) struct Rules {
    pub(crate) rules: Vec<Rule>,
    pub(crate) notes: Vec<String>,
    pub(crate) catalogue: Catalogue,
    pub(crate) uses_apps: bool,
}

pub(crate) fn rules(
    cx: &Ctx<'_>,
    raw: &RawConfig,
    classes: &[Class],
    names: &HashMap<String, usize>,
) -> Result<Rules, ConfigError> {
    let mut catalogue = Catalogue::builtin();
    let mut app_names: HashMap<String, usize> = HashMap::new();
    for (i, sa) in raw.apps.iter().enumerate() {
        let a = sa.get_ref();
        let origin = format!("{}:{}", cx.file.display(), cx.line_of(sa.span()));
        let app = app(cx, a, &format!("app[{i}]"), origin)?;
        if app_names.insert(app.name.clone(), i).is_some() {
            return Err(cx.at(
                &a.name,
                format!("app[{i}].name"),
                format!("app `{}` is defined twice", app.name),
            ));
        }
        catalogue.upsert(app);
    }

    let mut rules = Vec::new();
    let mut rule_names: HashMap<String, usize> = HashMap::new();
    // Every rule's name after expansion: `<rule>/<app>#<n>` must not meet a
    // rule of that name.
    let mut final_names: std::collections::HashSet<String> = Default::default();
    let mut notes = Vec::new();
    let mut uses_apps = false;
    for (i, sr) in raw.rules.iter().enumerate() {
        let r = sr.get_ref();
        let f = |k: &str| format!("rule[{i}].{k}");
        let name = r.name.get_ref().trim().to_string();
        if name.is_empty() {
            return Err(cx.at(&r.name, f("name"), "a rule needs a name"));
        }
        if rule_names.insert(name.clone(), i).is_some() {
            return Err(cx.at(
                &r.name,
                f("name"),
                format!("rule `{name}` is defined twice"),
            ));
        }
        let Some(&class) = names.get(r.class.get_ref().trim()) else {
            let known: Vec<_> = classes.iter().map(|c| c.name.as_str()).collect();
            return Err(cx.at(
                &r.class,
                f("class"),
                format!(
                    "no class named `{}`; classes are: {}",
                    r.class.get_ref(),
                    known.join(", ")
                ),
            ));
        };
        let priority = match &r.priority {
            None => i as i64,
            Some(p) => *p.get_ref(),
        };
        let direction = match &r.direction {
            None => None,
            Some(d) => match d.get_ref().as_str() {
                "both" => None,
                "upload" => Some(Dir::Up),
                "download" => Some(Dir::Down),
                other => {
                    return Err(cx.at(
                        d,
                        f("direction"),
                        format!("`{other}`: use \"both\", \"upload\" or \"download\""),
                    ))
                }
            },
        };
        let fields = MatchFields {
            protocol: &r.protocol,
            src_ports: &r.src_ports,
            dst_ports: &r.dst_ports,
            src_cidrs: &r.src_cidrs,
            dst_cidrs: &r.dst_cidrs,
            dscp: &r.dscp,
        };
        let dns_names = values(cx, &r.dns_names, f("dns_names"), "name", dns_name_value)?;
        if let Some(d) = &r.dns_names {
            if dns_names.is_empty() {
                return Err(cx.at(d, f("dns_names"), "give at least one host name"));
            }
            if let Some(a) = &r.apps {
                return Err(cx.at(
                    a,
                    f("apps"),
                    "`apps` cannot be combined with `dns_names`: the apps bring their own names; \
                     give the names a rule of their own",
                ));
            }
            if let Some(c) = &r.dst_cidrs {
                return Err(cx.at(
                    c,
                    f("dst_cidrs"),
                    "`dst_cidrs` cannot be combined with `dns_names`: the names stand for the \
                     WAN-side addresses; give the prefixes a rule of their own",
                ));
            }
        }
        let Some(apps) = &r.apps else {
            let m = match_fields(cx, &fields, &f)?;
            if !final_names.insert(name.clone()) {
                return Err(cx.at(
                    &r.name,
                    f("name"),
                    format!("rule `{name}` is defined twice (once by an earlier rule's apps)"),
                ));
            }
            rules.push(Rule {
                name,
                class,
                priority,
                direction,
                protocols: m.protocols,
                src_ports: m.src_ports,
                dst_ports: m.dst_ports,
                src_cidrs: m.src_cidrs,
                dst_cidrs: m.dst_cidrs,
                dscp: m.dscp,
                dns_names,
            });
            continue;
        };
        // `apps` instead of match fields: mixing them would leave it unclear
        // whether the fields narrow each app or add a match of their own.
        if let Some((k, v)) = fields.present().first() {
            return Err(cx.at(
                v,
                f(k),
                format!(
                    "`{k}` cannot be combined with `apps` (line {}): the apps bring their own match; \
                     give `{k}` a rule of its own, or define an [[app]] with it",
                    cx.line_of(apps.span())
                ),
            ));
        }
        uses_apps = true;
        let wanted = values(cx, &Some(apps.clone()), f("apps"), "app", |v| match v {
            toml::Value::String(s) => Ok(s.trim().to_string()),
            other => Err(format!(
                "`{other}` is not an app name: write it as a string like \"dicom\""
            )),
        })?;
        for app_name in wanted {
            let Some(app) = catalogue.get(&app_name) else {
                return Err(cx.at(
                    apps,
                    f("apps"),
                    format!(
                        "no app named `{app_name}`; known apps (catalogue {}{}) are: {}",
                        catalogue.version,
                        if raw.apps.is_empty() {
                            ""
                        } else {
                            " and this file's [[app]] tables"
                        },
                        catalogue.names().join(", ")
                    ),
                ));
            };
            if let Some(n) = app.note(&name) {
                notes.push(n);
            }
            for rule in app.expand(&name, class, priority, direction) {
                if !final_names.insert(rule.name.clone()) {
                    return Err(cx.at(
                        &r.name,
                        f("name"),
                        format!(
                            "rule `{}` (from app `{app_name}`) is defined twice",
                            rule.name
                        ),
                    ));
                }
                rules.push(rule);
            }
        }
        if rules.len() > shaper_common::MAX_RULES {
            return Err(cx.at(
                sr,
                "rule",
                format!("at most {} rules (apps expanded)", shaper_common::MAX_RULES),
            ));
        }
    }
    if rules.len() > shaper_common::MAX_RULES {
        return Err(cx.at(
            &raw.rules[shaper_common::MAX_RULES.min(raw.rules.len() - 1)],
            "rule",
            format!("at most {} rules", shaper_common::MAX_RULES),
        ));
    }
    Ok(Rules {
        rules,
        notes,
        catalogue,
        uses_apps,
    })
}
