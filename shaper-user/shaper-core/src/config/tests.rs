use super::*;

const GOOD: &str = r#"
[interfaces]
wan = "wan0"
lan = "lan0"
[upload]
rate = "9500kbit"
[download]
rate = "36mbit"
[[class]]
name = "video"
priority = 0
guaranteed = "20%"
dscp = "AF41"
[[class]]
name = "default"
priority = 4
guaranteed = "30%"
default = true
[[rule]]
name = "teams"
class = "video"
protocol = "udp"
dst_ports = ["3478-3481", 50020]
dst_cidrs = ["52.112.0.0/14", "2603:1063::/38"]
"#;

fn p(text: &str) -> Result<Policy, ConfigError> {
    parse(Path::new("site.toml"), text)
}

#[test]
fn good_config_validates() {
    let pol = p(GOOD).expect("valid");
    assert_eq!(pol.dirs[Dir::Up].rate_bps, 9_500_000);
    assert_eq!(pol.dirs[Dir::Down].rate_bps, 36_000_000);
    assert_eq!(pol.default_class, 1);
    assert_eq!(pol.classes[0].dscp, Some(34));
    assert_eq!(pol.rules[0].dst_ports, vec![(3478, 3481), (50020, 50020)]);
    assert_eq!(pol.rules[0].protocols, vec![17]);
    assert_eq!(pol.rules[0].dst_cidrs.len(), 2);
}

#[test]
fn arrival_accounting_is_on_by_default_and_with_autorate() {
    assert!(p(GOOD).expect("valid").dirs[Dir::Down].account_arrivals);
    let auto = format!("{GOOD}[autorate]\nreflectors = [\"192.0.2.1\"]\n");
    let pol = p(&auto).expect("autorate alone");
    assert!(pol.autorate.is_some() && pol.dirs[Dir::Down].account_arrivals);
    let both = auto.replace(
        "rate = \"36mbit\"\n",
        "rate = \"36mbit\"\naccount_arrivals = true\n",
    );
    assert!(p(&both).expect("both asked for").dirs[Dir::Down].account_arrivals);
    let off = auto.replace(
        "rate = \"36mbit\"\n",
        "rate = \"36mbit\"\naccount_arrivals = false\n",
    );
    assert!(!p(&off).expect("turned off").dirs[Dir::Down].account_arrivals);
}

#[test]
fn rates_and_units() {
    assert_eq!(parse_rate("40mbit"), Ok(40_000_000));
    assert_eq!(parse_rate("1.5Mbit"), Ok(1_500_000));
    assert_eq!(parse_rate("800kbit/s"), Ok(800_000));
    assert!(parse_rate("40").is_err());
    assert!(parse_rate("40mbps").unwrap_err().contains("ambiguous"));
    assert!(parse_rate("fast").is_err());
    assert_eq!(format_rate(40_000_000), "40mbit");
    assert_eq!(format_rate(9_500_000), "9.5mbit");
}

#[test]
fn dscp_names() {
    assert_eq!(parse_dscp_name("EF"), Ok(46));
    assert_eq!(parse_dscp_name("af41"), Ok(34));
    assert_eq!(parse_dscp_name("CS1"), Ok(8));
    assert_eq!(parse_dscp_name("AF21"), Ok(18));
    assert!(parse_dscp_name("AF51").is_err());
}

fn err_of(text: &str) -> ConfigError {
    match p(text) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

#[test]
fn unknown_field_names_line() {
    let e = err_of(&GOOD.replace("priority = 4", "priority = 4\nspeed = 3"));
    let s = e.to_string();
    assert!(s.starts_with("site.toml:"), "{s}");
    assert!(s.contains("speed"), "{s}");
    assert_eq!(e.line, Some(17), "{s}");
}

#[test]
fn shares_above_100_percent() {
    let e = err_of(&GOOD.replace("guaranteed = \"30%\"", "guaranteed = \"90%\""));
    assert!(e.message.contains("must not exceed 100%"), "{e}");
    // The class that takes the total past 100%, on its `guaranteed` line.
    assert_eq!(e.field, "class[1].guaranteed");
    assert_eq!(e.line, Some(17), "{e}");
    assert!(
        e.message.contains("video 1.9mbit + default 8.55mbit"),
        "{e}"
    );
}

#[test]
fn shares_of_exactly_100_percent_of_an_odd_rate() {
    // Each half rounds up to 4750001bit; the shares still add up to 100%.
    let text = GOOD
        .replace("9500kbit", "9500001bit")
        .replace("\"20%\"", "\"50%\"")
        .replace("\"30%\"", "\"50%\"");
    p(&text).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn protocols_by_number_and_match_lists() {
    let pol = p(&GOOD.replace("protocol = \"udp\"", "protocol = [17, \"tcp\"]"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(pol.rules[0].protocols, vec![17, 6]);
    let pol = p(&GOOD.replace("protocol = \"udp\"", "protocol = 17")).expect("valid");
    assert_eq!(pol.rules[0].protocols, vec![17]);
    let e = err_of(&GOOD.replace("protocol = \"udp\"", "protocol = 300"));
    assert!(e.message.contains("out of range 0-255"), "{e}");
    for k in [
        "protocol = []",
        "dst_cidrs = []",
        "src_cidrs = []",
        "dscp = []",
    ] {
        // The rule with `k` in place of the same key's line, if it has one.
        let key = k.split(' ').next().unwrap_or_default();
        let (head, rule) = GOOD.split_once("[[rule]]\n").expect("a rule");
        let rule: String = rule
            .lines()
            .filter(|l| !l.starts_with(&format!("{key} =")))
            .map(|l| format!("{l}\n"))
            .collect();
        let e = err_of(&format!("{head}[[rule]]\n{k}\n{rule}"));
        assert!(e.message.contains("empty list matches nothing"), "{k}: {e}");
        assert_eq!(e.line, Some(20), "{k}: {e}");
    }
    let e = err_of(&GOOD.replace("50020]", "500.5]"));
    assert_eq!(e.field, "rule[0].dst_ports");
    assert!(e.message.contains("`500.5` is not a port"), "{e}");
    let e = err_of(&GOOD.replace("dscp = \"AF41\"", "dscp = 46.0"));
    assert_eq!(e.field, "class[0].dscp");
    assert!(e.message.contains("is not a DSCP"), "{e}");
}

#[test]
fn toml_errors_name_the_field() {
    let e = err_of(&GOOD.replace("priority = 4", "priority = \"low\""));
    assert_eq!((e.field.as_str(), e.line), ("class[1].priority", Some(16)));
    let e = err_of(&GOOD.replace("rate = \"36mbit\"", "rate = 36"));
    assert_eq!((e.field.as_str(), e.line), ("download.rate", Some(8)));
    let e = err_of(&GOOD.replace("class = \"video\"", "class = \"video\"\nport = 1"));
    assert_eq!((e.field.as_str(), e.line), ("rule[0].port", Some(22)));
    let e = err_of(&GOOD.replace("wan = \"wan0\"\n", ""));
    assert_eq!((e.field.as_str(), e.line), ("interfaces.wan", Some(2)));
    let e = err_of(&GOOD.replace("[upload]\nrate = \"9500kbit\"\n", ""));
    assert_eq!((e.field.as_str(), e.line), ("upload", None), "{e}");
    // Syntax errors: a line, one line of message, no field.
    let e = err_of(&GOOD.replace("[download]", "[download"));
    assert_eq!((e.field.as_str(), e.line), ("", Some(7)));
    assert!(!e.message.contains('\n'), "{e}");
}

#[test]
fn second_default_points_at_its_default_line() {
    let e = err_of(&GOOD.replace("dscp = \"AF41\"", "dscp = \"AF41\"\ndefault = true"));
    assert_eq!(e.field, "class[1].default");
    assert_eq!(e.line, Some(19), "{e}");
    assert!(e.message.contains("`video` is already the default"), "{e}");
}

#[test]
fn bad_cidr() {
    let e = err_of(&GOOD.replace("52.112.0.0/14", "52.112.0.300/14"));
    assert_eq!(e.field, "rule[0].dst_cidrs");
    assert_eq!(e.line, Some(24));
    let e = err_of(&GOOD.replace("52.112.0.0/14", "52.112.0.1/14"));
    assert!(e.message.contains("host bits"), "{e}");
}

#[test]
fn unknown_class_and_duplicates() {
    let e = err_of(&GOOD.replace("class = \"video\"", "class = \"vidoe\""));
    assert!(e.message.contains("classes are: video, default"), "{e}");
    let e = err_of(&GOOD.replace("name = \"default\"", "name = \"video\""));
    assert!(e.message.contains("defined twice"), "{e}");
    let e = err_of(&GOOD.replace("default = true", ""));
    assert!(e.message.contains("default = true"), "{e}");
}

#[test]
fn ports_and_ranges() {
    let e = err_of(&GOOD.replace("\"3478-3481\"", "\"3481-3478\""));
    assert!(e.message.contains("backwards"), "{e}");
    let e = err_of(&GOOD.replace("50020]", "70000]"));
    assert!(e.message.contains("out of range"), "{e}");
    let e = err_of(&GOOD.replace("protocol = \"udp\"", "protocol = \"icmp\""));
    assert!(e.message.contains("carries ports"), "{e}");
}

#[test]
fn interfaces() {
    let e = err_of(&GOOD.replace("lan = \"lan0\"", "lan = \"wan0\""));
    assert_eq!(e.field, "interfaces.lan");
    let e = err_of(&GOOD.replace("lan = \"lan0\"", "lan = \"a-very-long-interface-name\""));
    assert!(e.message.contains("not a valid interface name"), "{e}");
    // The kernel refuses ':' in a device name ("eth0:1" is an alias label).
    let e = err_of(&GOOD.replace("lan = \"lan0\"", "lan = \"lan0:1\""));
    assert!(e.message.contains("not a valid interface name"), "{e}");
}

#[test]
fn ceiling_below_guaranteed() {
    let e = err_of(&GOOD.replace(
        "guaranteed = \"20%\"",
        "guaranteed = \"20%\"\nceiling = \"10%\"",
    ));
    assert_eq!(e.field, "class[0].ceiling");
}

#[test]
fn line_presets_and_overrides() {
    let pol = p(GOOD).expect("valid");
    assert!(pol.dirs[Dir::Up].link.is_none() && pol.dirs[Dir::Down].link.is_none());
    let up = |extra: &str| {
        p(&GOOD.replace(
            "rate = \"9500kbit\"\n",
            &format!("rate = \"9500kbit\"\n{extra}\n"),
        ))
    };
    let pol = up("line = \"adsl2-pppoa\"").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        pol.dirs[Dir::Up].link,
        LinkAccounting {
            line: Some("adsl2-pppoa".into()),
            framing: Framing::Atm,
            overhead: 10,
            mpu: 0
        }
    );
    assert!(
        pol.dirs[Dir::Down].link.is_none(),
        "the other direction is untouched"
    );
    for (name, framing, overhead) in [
        ("adsl2-pppoe", Framing::Atm, 40),
        ("vdsl2-pppoe", Framing::Ptm, 30),
        ("vdsl2-ipoe", Framing::Ptm, 22),
        ("efm", Framing::Ptm, 22),
        ("ethernet", Framing::Ethernet, 0),
    ] {
        let l = up(&format!("line = \"{name}\"")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (l.dirs[Dir::Up].link.framing, l.dirs[Dir::Up].link.overhead),
            (framing, overhead),
            "{name}"
        );
    }
    assert!(up("line = \"ethernet\"").expect("valid").dirs[Dir::Up]
        .link
        .is_none());
    // Explicit fields override the preset.
    let pol = up("line = \"vdsl2-pppoe\"\noverhead = 34\nmpu = 68").expect("valid");
    assert_eq!(
        (
            pol.dirs[Dir::Up].link.framing,
            pol.dirs[Dir::Up].link.overhead,
            pol.dirs[Dir::Up].link.mpu
        ),
        (Framing::Ptm, 34, 68)
    );
    let pol = up("line = \"adsl2-pppoa\"\nframing = \"ethernet\"\noverhead = -4").expect("valid");
    assert_eq!(
        (
            pol.dirs[Dir::Up].link.framing,
            pol.dirs[Dir::Up].link.overhead
        ),
        (Framing::Ethernet, -4)
    );
    // Without a preset.
    let pol = p(&GOOD.replace(
        "rate = \"36mbit\"\n",
        "rate = \"36mbit\"\nframing = \"atm\"\noverhead = 44\n",
    ))
    .expect("valid");
    assert_eq!(
        (
            pol.dirs[Dir::Down].link.line.as_deref(),
            pol.dirs[Dir::Down].link.framing,
            pol.dirs[Dir::Down].link.overhead
        ),
        (None, Framing::Atm, 44)
    );
    assert!(pol.dirs[Dir::Up].link.is_none());
}

#[test]
fn line_errors_name_file_line_and_field() {
    let up = |extra: &str| {
        err_of(&GOOD.replace(
            "rate = \"9500kbit\"\n",
            &format!("rate = \"9500kbit\"\n{extra}\n"),
        ))
    };
    let e = up("line = \"adsl\"");
    assert_eq!((e.field.as_str(), e.line), ("upload.line", Some(7)), "{e}");
    assert!(e.message.contains("\"adsl2-pppoa\""), "{e}");
    assert!(
        e.to_string().starts_with("site.toml:7: `upload.line`"),
        "{e}"
    );
    let e = up("overhead = 300");
    assert_eq!(
        (e.field.as_str(), e.line),
        ("upload.overhead", Some(7)),
        "{e}"
    );
    assert!(e.message.contains("-64 to 256"), "{e}");
    let e = up("overhead = -65");
    assert_eq!(e.field, "upload.overhead", "{e}");
    // The bounds themselves are accepted.
    let pol = p(&GOOD.replace(
        "rate = \"9500kbit\"\n",
        "rate = \"9500kbit\"\noverhead = -64\nmpu = 256\n",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        (pol.dirs[Dir::Up].link.overhead, pol.dirs[Dir::Up].link.mpu),
        (-64, 256)
    );
    let e = up("mpu = -1");
    assert_eq!((e.field.as_str(), e.line), ("upload.mpu", Some(7)), "{e}");
    assert!(e.message.contains("0 to 256"), "{e}");
    let e = up("mpu = 257");
    assert_eq!(e.field, "upload.mpu", "{e}");
    let e = up("framing = \"vdsl\"");
    assert_eq!(
        (e.field.as_str(), e.line),
        ("upload.framing", Some(7)),
        "{e}"
    );
    assert!(e.message.contains("\"ptm\""), "{e}");
    // Wrong TOML types are named like any other field.
    let e = up("overhead = \"10\"");
    assert_eq!(
        (e.field.as_str(), e.line),
        ("upload.overhead", Some(7)),
        "{e}"
    );
    let e = err_of(&GOOD.replace("rate = \"36mbit\"\n", "rate = \"36mbit\"\nline = 3\n"));
    assert_eq!(
        (e.field.as_str(), e.line),
        ("download.line", Some(9)),
        "{e}"
    );
}

#[test]
fn shipped_example_config_validates() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/gp-surgery-fttc-40-10.toml");
    let pol = load(&path).unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<_> = pol.classes.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        ["video", "clinical-interactive", "images", "default", "bulk"]
    );
    assert_eq!(pol.classes[pol.default_class].name, "default");
    // Teams media to its four ranges, and DICOM outbound and inbound, now
    // from the catalogue.
    assert!(pol
        .rules
        .iter()
        .any(|r| r.name == "consultations/teams-media#1" && r.dst_cidrs.len() == 4));
    assert!(pol
        .rules
        .iter()
        .any(|r| r.name == "images/dicom#1" && r.dst_ports == vec![(104, 104), (11112, 11112)]));
    assert!(pol
        .rules
        .iter()
        .any(|r| r.name == "images/dicom#2" && r.src_ports == vec![(104, 104), (11112, 11112)]));
    assert_eq!(pol.catalogue.as_deref(), Some(crate::catalogue::VERSION));
}

// -- Catalogue apps in rules and [[app]] tables ------------------------

/// GOOD's classes and interfaces with `rules` in place of its rule.
fn with_rules(rules: &str) -> String {
    let (head, _) = GOOD.split_once("[[rule]]\n").expect("a rule");
    format!("{head}{rules}")
}

fn names(pol: &Policy) -> Vec<&str> {
    pol.rules.iter().map(|r| r.name.as_str()).collect()
}

#[test]
fn apps_expand_in_order_with_the_rules_class_priority_and_direction() {
    let pol = p(&with_rules(
        r#"[[rule]]
name = "first"
class = "default"
protocol = "tcp"
[[rule]]
name = "v"
class = "video"
priority = -5
direction = "upload"
apps = ["teams-media", "dicom", "zoom"]
[[rule]]
name = "last"
class = "default"
protocol = "udp"
"#,
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    // Priority -5 puts all four expansions first, in the order named.
    assert_eq!(
        names(&pol),
        [
            "v/teams-media#1",
            "v/dicom#1",
            "v/dicom#2",
            "v/zoom#1",
            "first",
            "last"
        ]
    );
    for r in &pol.rules[..4] {
        assert_eq!((r.class, r.priority, r.direction), (0, -5, Some(Dir::Up)));
    }
    assert_eq!(pol.rules[0].dst_cidrs.len(), 4);
    assert_eq!(pol.rules[2].src_ports, [(104, 104), (11112, 11112)]);
    assert_eq!(pol.catalogue.as_deref(), Some(crate::catalogue::VERSION));
    assert!(pol.notes.is_empty(), "{:?}", pol.notes);
    // Without a priority the expansions keep the rule's place in the file.
    let pol = p(&with_rules(
        "[[rule]]\nname = \"a\"\nclass = \"default\"\nprotocol = \"tcp\"\n\
         [[rule]]\nname = \"d\"\nclass = \"video\"\napps = \"dicom\"\n\
         [[rule]]\nname = \"b\"\nclass = \"default\"\nprotocol = \"udp\"\n",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(names(&pol), ["a", "d/dicom#1", "d/dicom#2", "b"]);
    // A config without apps records no catalogue.
    assert_eq!(p(GOOD).expect("valid").catalogue, None);
}

#[test]
fn unknown_app_is_an_error_listing_the_known_ones() {
    let e = err_of(&with_rules(
        "[[rule]]\nname = \"v\"\nclass = \"video\"\napps = [\"teams-media\", \"skype\"]\n",
    ));
    assert_eq!(
        (e.field.as_str(), e.line),
        ("rule[0].apps", Some(22)),
        "{e}"
    );
    assert!(e.message.contains("no app named `skype`"), "{e}");
    assert!(e.message.contains("teams-media, zoom"), "{e}");
    assert!(e.message.contains("backup-sync"), "{e}");
    let e = err_of(&with_rules(
        "[[rule]]\nname = \"v\"\nclass = \"video\"\napps = []\n",
    ));
    assert!(e.message.contains("empty list matches nothing"), "{e}");
    let e = err_of(&with_rules(
        "[[rule]]\nname = \"v\"\nclass = \"video\"\napps = [3]\n",
    ));
    assert!(e.message.contains("not an app name"), "{e}");
}

#[test]
fn apps_and_match_fields_cannot_be_mixed() {
    let e = err_of(&with_rules(
        "[[rule]]\nname = \"v\"\nclass = \"video\"\napps = [\"zoom\"]\nsrc_cidrs = [\"192.168.1.0/24\"]\n",
    ));
    assert_eq!(
        (e.field.as_str(), e.line),
        ("rule[0].src_cidrs", Some(23)),
        "{e}"
    );
    assert!(
        e.message
            .contains("cannot be combined with `apps` (line 22)"),
        "{e}"
    );
}

#[test]
fn dns_only_app_expands_to_a_host_name_rule_with_a_note() {
    let pol = p(&with_rules(
        "[[rule]]\nname = \"v\"\nclass = \"video\"\napps = [\"accurx-video\", \"zoom\"]\n",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(names(&pol), ["v/accurx-video#dns", "v/zoom#1"]);
    assert_eq!(
        pol.rules[0].dns_names,
        [
            "*.sfu.whereby.com",
            "*.turn.whereby.com",
            "*.sfu.svc.whereby.com",
            "*.turn.svc.whereby.com"
        ]
    );
    assert!(pol.uses_hosts());
    assert_eq!(pol.notes.len(), 1, "{:?}", pol.notes);
    assert!(
        pol.notes[0].contains("`accurx-video` is recognised by host name"),
        "{:?}",
        pol.notes
    );
}

#[test]
fn host_names_demotion_promotion_and_dscp_trust_validate() {
    let pol = p(&with_rules(
        "[[rule]]\nname = \"w\"\nclass = \"video\"\nprotocol = \"udp\"\ndns_names = [\"*.Example.org\"]\n",
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(pol.rules[0].dns_names, ["*.example.org"]);
    for (extra, field) in [
        (
            "dst_cidrs = [\"10.0.0.0/8\"]\ndns_names = [\"a.example\"]\n",
            "rule[0].dst_cidrs",
        ),
        ("dns_names = []\n", "rule[0].dns_names"),
        ("dns_names = [\"bad name\"]\n", "rule[0].dns_names"),
    ] {
        let e = p(&with_rules(&format!(
            "[[rule]]\nname = \"w\"\nclass = \"video\"\n{extra}"
        )))
        .expect_err(extra);
        assert_eq!(e.field, field, "{e}");
    }
    // Demotion on the video class, promotion into it, DSCP trust.
    let with = |class_extra: &str, tail: &str| {
        let t = with_rules("").replacen(
            "name = \"video\"\n",
            &format!("name = \"video\"\n{class_extra}"),
            1,
        );
        p(&format!("{t}{tail}"))
    };
    let pol = with(
        "demote_to = \"default\"\ndemote_after = \"20MB\"\ndemote_above = \"4mbit\"\n",
        "[promote]\nclass = \"video\"\n[dscp]\nwan = \"ignore\"\n[dscp.honour]\nef = \"video\"\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let v = &pol.classes[0];
    assert_eq!(
        v.demote,
        Some(Demote {
            to: 1,
            after_bytes: Some(20_000_000),
            above_bps: Some(4_000_000)
        })
    );
    assert_eq!(
        pol.promote,
        Some(Promote {
            class: 0,
            min_pps: 20,
            max_bps: 4_000_000,
            max_packet: 1300
        })
    );
    assert!(pol.dirs[Dir::Up].dscp_trust && !pol.dirs[Dir::Down].dscp_trust);
    assert_eq!(pol.rules[0].name, "dscp-honour-ef");
    assert_eq!(pol.rules[0].dscp, [46]);
    assert!(pol.measures_flows());
    for (class_extra, tail, field) in [
        ("demote_after = \"20MB\"\n", "", "class[0].demote_after"),
        (
            "demote_to = \"video\"\ndemote_after = \"1MB\"\n",
            "",
            "class[0].demote_to",
        ),
        ("demote_to = \"default\"\n", "", "class[0].demote_to"),
        (
            "demote_to = \"default\"\ndemote_after = \"20mb\"\n",
            "",
            "class[0].demote_after",
        ),
        ("", "[promote]\nclass = \"nope\"\n", "promote.class"),
        (
            "",
            "[dscp]\nlan = \"ignore\"\n[dscp.honour]\nef = \"video\"\n",
            "dscp.honour",
        ),
        ("", "[dscp]\nlan = \"maybe\"\n", "dscp.lan"),
        ("", "[dns]\nmin_ttl = 600\nmax_ttl = 60\n", "dns.min_ttl"),
        (
            "",
            "[dns]\nresolvers = [\"192.0.2.53\", \"dns.example\"]\n",
            "dns.resolvers",
        ),
        ("", "[dns]\nresolvers = [53]\n", "dns.resolvers"),
    ] {
        let e = with(class_extra, tail).expect_err(field);
        assert_eq!(e.field, field, "{e}");
    }
}

#[test]
fn config_apps_override_and_extend_the_catalogue() {
    let text = with_rules(
        r#"[[rule]]
name = "v"
class = "video"
apps = ["zoom", "pacs-cloud", "systmone"]
[[app]]
name = "zoom"
protocol = "udp"
dst_ports = ["8801-8810"]
dst_cidrs = ["3.7.35.0/25"]
notes = "our Zoom ranges"
[[app]]
name = "pacs-cloud"
protocol = "tcp"
dst_ports = [443]
dst_cidrs = ["203.0.113.0/24"]
[[app]]
name = "systmone"
source = "our HSCN provider"
dns_names = ["*.tpp-uk.com"]
[[app.match]]
protocol = "tcp"
dst_ports = [443]
dst_cidrs = ["10.1.0.0/16"]
[[app.match]]
protocol = "tcp"
dst_ports = [443]
dst_cidrs = ["10.2.0.0/16"]
"#,
    );
    let pol = p(&text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        names(&pol),
        [
            "v/zoom#1",
            "v/pacs-cloud#1",
            "v/systmone#1",
            "v/systmone#2",
            "v/systmone#dns"
        ]
    );
    assert_eq!(pol.rules[0].dst_cidrs[0].to_string(), "3.7.35.0/25");
    assert_eq!(pol.rules[3].dst_cidrs[0].to_string(), "10.2.0.0/16");
    let cat_path = std::env::temp_dir().join(format!("shaper-cat-{}.toml", std::process::id()));
    std::fs::write(&cat_path, &text).expect("write");
    let cat = load_catalogue(&cat_path).unwrap_or_else(|e| panic!("{e}"));
    let _ = std::fs::remove_file(&cat_path);
    let zoom = cat.get("zoom").expect("zoom");
    assert_eq!(zoom.notes, "our Zoom ranges");
    assert!(zoom.origin.ends_with(":23"), "{}", zoom.origin);
    assert_eq!(cat.names()[4], "zoom", "replaced in place");
    assert_eq!(cat.names().last(), Some(&"pacs-cloud"));
    assert_eq!(cat.get("systmone").expect("s").needs, ["dns"]);
}

#[test]
fn config_apps_are_validated_like_rules() {
    let app = |body: &str| {
        err_of(&with_rules(&format!(
            "[[rule]]\nname = \"v\"\nclass = \"video\"\napps = [\"x\"]\n[[app]]\nname = \"x\"\n{body}\n"
        )))
    };
    let e = app("protocol = \"icmp\"\ndst_ports = [1]");
    assert_eq!(
        (e.field.as_str(), e.line),
        ("app[0].protocol", Some(25)),
        "{e}"
    );
    assert!(e.message.contains("carries ports"), "{e}");
    let e = app("dst_cidrs = [\"10.0.0.1/8\"]");
    assert_eq!(e.field, "app[0].dst_cidrs", "{e}");
    assert!(e.message.contains("host bits"), "{e}");
    let e = app("dst_ports = []");
    assert!(e.message.contains("empty list matches nothing"), "{e}");
    let e = app("dns_names = [\"bad name.com\"]");
    assert_eq!(e.field, "app[0].dns_names", "{e}");
    let e = app("needs = [\"sni\"]");
    assert_eq!(e.field, "app[0].needs", "{e}");
    let e = app("dst_ports = [1]\n[[app.match]]\nprotocol = \"tcp\"");
    assert_eq!(e.field, "app[0].dst_ports", "{e}");
    assert!(e.message.contains("[[app.match]]"), "{e}");
    let e = app("[[app.match]]\ndns_names = [\"a.b\"]");
    assert!(e.message.contains("unknown field `dns_names`"), "{e}");
    let e = app("[[app.match]]\nprotocol = 300");
    assert_eq!(e.field, "app[0].match[0].protocol", "{e}");
    let e = app("colour = \"red\"");
    assert_eq!(
        (e.field.as_str(), e.line),
        ("app[0].colour", Some(25)),
        "{e}"
    );
    let e = app("protocol = \"udp\"\n[[app]]\nname = \"x\"\nprotocol = \"tcp\"");
    assert_eq!((e.field.as_str(), e.line), ("app[1].name", Some(27)), "{e}");
    assert!(e.message.contains("defined twice"), "{e}");
    let e = app("protocol = \"udp\"\n[[app]]\nname = \"has space\"");
    assert_eq!(e.field, "app[1].name", "{e}");
}

#[test]
fn window_clamp_is_off_by_default_download_only_and_validated() {
    assert_eq!(p(GOOD).expect("valid").dirs[Dir::Down].window_clamp, None);
    let with = |down: &str, up: &str| {
        let t = GOOD
            .replace("rate = \"36mbit\"\n", &format!("rate = \"36mbit\"\n{down}"))
            .replace(
                "rate = \"9500kbit\"\n",
                &format!("rate = \"9500kbit\"\n{up}"),
            );
        p(&t)
    };
    let pol = with("window_clamp = true\n", "").expect("valid");
    assert_eq!(
        pol.dirs[Dir::Down].window_clamp,
        Some(WindowClamp {
            queue_ms: WINDOW_CLAMP_QUEUE_MS
        })
    );
    let pol = with("window_clamp = true\nwindow_clamp_queue_ms = 12\n", "").expect("valid");
    assert_eq!(
        pol.dirs[Dir::Down].window_clamp.map(|w| w.queue_ms),
        Some(12)
    );
    let pol = with("window_clamp = false\n", "").expect("valid");
    assert_eq!(pol.dirs[Dir::Down].window_clamp, None);
    let e = with("window_clamp = true\nwindow_clamp_queue_ms = 201\n", "").unwrap_err();
    assert_eq!(e.field, "download.window_clamp_queue_ms", "{e}");
    assert!(e.message.contains("0 to 200"), "{e}");
    let e = with("window_clamp_queue_ms = 5\n", "").unwrap_err();
    assert!(e.message.contains("without `window_clamp = true`"), "{e}");
    let e = with("", "window_clamp = true\n").unwrap_err();
    assert_eq!(e.field, "upload.window_clamp", "{e}");
    let e = with("", "window_clamp_queue_ms = 5\n").unwrap_err();
    assert_eq!(e.field, "upload.window_clamp_queue_ms", "{e}");
    let e = with("window_clamp = \"yes\"\n", "").unwrap_err();
    assert!(e.to_string().contains("window_clamp"), "{e}");
    // The plan: the flag, the queue in µs, each class's ceiling as its first share.
    let pol = with("window_clamp = true\n", "").expect("valid");
    let m = crate::compile::maps(&crate::compile::plan(&pol, None));
    assert_ne!(m.flags & shaper_common::CFG_WINDOW_CLAMP, 0);
    assert_eq!(m.clamp_queue_us, 5_000);
    assert_eq!(m.clamp_share, vec![36_000_000 / 8; 2]);
    let good = crate::compile::plan(&p(GOOD).expect("valid"), None);
    let m = crate::compile::maps(&good);
    assert_eq!(m.flags & shaper_common::CFG_WINDOW_CLAMP, 0);
    assert!(m.clamp_share.is_empty());
    // `check` says so.
    let out = crate::compile::describe(&good, &m);
    assert!(!out.contains("window clamp"), "{out}");
    let pl = crate::compile::plan(&pol, None);
    let out = crate::compile::describe(&pl, &crate::compile::maps(&pl));
    assert!(out.contains("download window clamp: on"), "{out}");
}

#[test]
fn calls_measure_the_video_class_by_default_and_as_configured() {
    let pol = p(GOOD).expect("valid");
    assert_eq!(
        pol.calls,
        CallsSettings {
            classes: vec![0],
            show_addresses: false,
            quiet_s: 10,
        }
    );
    let maps = crate::compile::maps(&crate::compile::plan(&pol, None));
    assert_eq!(maps.media_classes, 1);
    assert_ne!(maps.flags & shaper_common::CFG_MEDIA, 0);
    let set = format!(
        "{GOOD}[calls]\nclasses = [\"default\", \"video\", \"default\"]\naddresses = \"shown\"\nquiet_s = 30\n"
    );
    let pol = p(&set).expect("valid");
    assert_eq!(pol.calls.classes, vec![1, 0]);
    assert!(pol.calls.show_addresses);
    assert_eq!(pol.calls.quiet_s, 30);
    // None: nothing measured, and the classifier is told so.
    let none = p(&format!("{GOOD}[calls]\nclasses = []\n")).expect("valid");
    let maps = crate::compile::maps(&crate::compile::plan(&none, None));
    assert_eq!(
        (maps.media_classes, maps.flags & shaper_common::CFG_MEDIA),
        (0, 0)
    );
    for (bad, field) in [
        ("classes = [\"vidoe\"]", "calls.classes"),
        ("addresses = \"hashed\"", "calls.addresses"),
        ("quiet_s = 1", "calls.quiet_s"),
        ("keep = true", "keep"),
    ] {
        let e = p(&format!("{GOOD}[calls]\n{bad}\n")).expect_err(bad);
        assert!(e.to_string().contains(field), "{bad}: {e}");
    }
}
