//! `shaper check` refuses bad configs: it exits non-zero, the error names the file and the
//! offending field (or its line), and nothing in the gateway changes.

use std::path::Path;

use shaper_tests::{
    skip_unless_ready, Line, Shaper, ShaperConfig, TempDir, Topology, TOPOLOGY_TOOLS,
};

struct BadConfig {
    file: &'static str,
    what: &'static str,
    text: String,
    /// Words any one of which, or the 1-based line, the error must name.
    fields: &'static [&'static str],
    line: usize,
}

/// Replaces the first line equal to `old` (after the line `after_marker`, if given) with `new`
/// (which may span lines) and returns the new text and the 1-based number of that line.
fn edit(text: &str, after_marker: Option<&str>, old: &str, new: &str) -> (String, usize) {
    let lines: Vec<&str> = text.lines().collect();
    let start = after_marker
        .and_then(|m| lines.iter().position(|l| *l == m))
        .unwrap_or(0);
    let idx = start
        + lines[start..]
            .iter()
            .position(|l| *l == old)
            .unwrap_or_else(|| panic!("no line {old:?} in the reference config"));
    let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    out[idx] = new.to_string();
    (out.join("\n") + "\n", idx + 1)
}

// Inline TOML edits of the builder's text: each case is about the text `check` refuses.
fn bad_configs(good: &str) -> Vec<BadConfig> {
    let mut v = Vec::new();

    // An unknown field inside the first class (line of the new key).
    let (text, l) = edit(
        good,
        Some("name = \"video\""),
        "ceiling = \"100%\"",
        "ceiling = \"100%\"\ncolour = \"blue\"",
    );
    v.push(BadConfig {
        file: "unknown-field.toml",
        what: "unknown field",
        text,
        fields: &["colour"],
        line: l + 1,
    });

    // Guaranteed shares 10 + 80 + 20 = 110 %.
    let (text, l) = edit(
        good,
        Some("name = \"images\""),
        "guaranteed = \"30%\"",
        "guaranteed = \"80%\"",
    );
    v.push(BadConfig {
        file: "over-guaranteed.toml",
        what: "guaranteed shares above 100 %",
        text,
        fields: &["guaranteed"],
        line: l,
    });

    // A CIDR with an impossible prefix length.
    let (text, l) = edit(
        good,
        Some("name = \"teams-video\""),
        "protocol = \"udp\"",
        "protocol = \"udp\"\ndst_cidrs = [\"10.0.0.0/33\"]",
    );
    v.push(BadConfig {
        file: "bad-cidr.toml",
        what: "bad CIDR",
        text,
        fields: &["dst_cidrs", "10.0.0.0/33"],
        line: l + 1,
    });

    // An interface the gateway does not have.
    let (text, l) = edit(good, None, "wan = \"wan0\"", "wan = \"wan9\"");
    v.push(BadConfig {
        file: "unknown-interface.toml",
        what: "unknown interface",
        text,
        fields: &["wan9", "wan"],
        line: l,
    });
    v
}

fn names_file(out: &str, path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    out.contains(&path.display().to_string()) || out.contains(&name)
}

fn names_field_or_line(out: &str, fields: &[&str], line: usize) -> bool {
    fields.iter().any(|f| out.contains(f))
        || out.contains(&format!("line {line}"))
        || out.contains(&format!(":{line}:"))
}

#[test]
fn check_rejects_bad_configs_and_changes_nothing() {
    skip_unless_ready!(TOPOLOGY_TOOLS);
    let topo = Topology::build(Some(Line::FTTC_40_10)).expect("build topology");
    let shaper = Shaper::new(&topo.gw).expect("shaper binary");
    let dir = TempDir::new("check").expect("temp dir");
    let good = ShaperConfig::gp_surgery(&Line::FTTC_40_10).to_toml();
    let qdiscs_before = topo.gw_qdiscs().expect("qdiscs");

    let mut problems = Vec::new();
    for bad in bad_configs(&good) {
        let path = dir.write(bad.file, &bad.text).expect("write config");
        let out = shaper.check(&path).expect("run shaper check");
        let all = format!("{}\n{}", out.stdout, out.stderr);
        eprintln!(
            "== {} ({}), offending line {}:\n{out}\n",
            bad.what,
            path.display(),
            bad.line
        );
        if out.status.success() {
            problems.push(format!("{}: `shaper check` exited 0", bad.what));
            continue;
        }
        if !names_file(&all, &path) {
            problems.push(format!(
                "{}: the error does not name the file {}",
                bad.what,
                path.display()
            ));
        }
        // Refused for the reason under test, not because the case itself is malformed.
        if bad.what != "unknown field" && all.contains("unknown field") {
            problems.push(format!(
                "{}: refused as an unknown field, not for the {}: {all}",
                bad.what, bad.what
            ));
        }
        if !names_field_or_line(&all, bad.fields, bad.line) {
            problems.push(format!(
                "{}: the error names neither the field ({}) nor line {}",
                bad.what,
                bad.fields.join(" / "),
                bad.line
            ));
        }
    }

    let qdiscs_after = topo.gw_qdiscs().expect("qdiscs");
    if qdiscs_after != qdiscs_before {
        problems.push(format!(
            "gw qdiscs changed:\n--- before\n{qdiscs_before}--- after\n{qdiscs_after}"
        ));
    }
    let pins = shaper.leftover_pins();
    if !pins.is_empty() {
        problems.push(format!("check left pins behind: {pins:?}"));
    }
    assert!(
        problems.is_empty(),
        "shaper check:\n- {}",
        problems.join("\n- ")
    );
}

#[test]
fn check_accepts_the_reference_config() {
    skip_unless_ready!(TOPOLOGY_TOOLS);
    let topo = Topology::build(Some(Line::FTTC_40_10)).expect("build topology");
    let shaper = Shaper::new(&topo.gw).expect("shaper binary");
    let dir = TempDir::new("check-ok").expect("temp dir");
    let path = ShaperConfig::gp_surgery(&Line::FTTC_40_10)
        .write(dir.path(), "shaper.toml")
        .expect("write");
    let qdiscs_before = topo.gw_qdiscs().expect("qdiscs");
    let out = shaper.check(&path).expect("run shaper check");
    eprintln!("{out}");
    assert!(
        out.status.success(),
        "`shaper check` refused the reference config: {out}"
    );
    assert_eq!(
        topo.gw_qdiscs().expect("qdiscs"),
        qdiscs_before,
        "check changed the gateway's qdiscs"
    );
}

#[test]
fn edits_land_where_the_test_says() {
    // Pure, no root: the line numbers the assertions accept are the lines that were edited.
    let good = ShaperConfig::gp_surgery(&Line::FTTC_40_10).to_toml();
    for bad in bad_configs(&good) {
        let line = bad.text.lines().nth(bad.line - 1).unwrap_or_default();
        assert!(
            bad.fields
                .iter()
                .any(|f| line.contains(f.split('/').next().unwrap_or(f))),
            "{}: line {} is {line:?}",
            bad.what,
            bad.line
        );
    }
}
