//! Concurrent CLI calls are serialised by the lock on `<run>/lock`: six `shaper apply` started
//! at once on two configs with different class sets all succeed, and what is left is exactly
//! one of the two, whole: the class trees of the config `status` says was applied last, one
//! classifier per interface, and no staged or stale pins.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use shaper_tests::gateway::{tcx_programs, write_config};
use shaper_tests::topology::{GW_LAN_IF, GW_WAN_IF};
use shaper_tests::{skip_unless_ready, Shaper, TempDir, Topology, TOPOLOGY_TOOLS};

use crate::common::{policy_a, policy_b};

/// Concurrent `apply` processes per round.
const APPLIES: usize = 6;
/// Round 1 starts with nothing applied (every process races a first apply), round 2 on top.
const ROUNDS: usize = 2;

/// `tc class show dev DEV` in the gateway, one class per line, sorted.
fn tree(topo: &Topology, dev: &str) -> Vec<String> {
    let out = topo
        .gw
        .run("tc", &["class", "show", "dev", dev])
        .expect("tc class show");
    let mut v: Vec<String> = out
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

fn trees(topo: &Topology) -> [Vec<String>; 2] {
    [tree(topo, GW_WAN_IF), tree(topo, GW_LAN_IF)]
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

struct Expected {
    path: PathBuf,
    trees: [Vec<String>; 2],
    classes: [&'static str; 3],
}

#[test]
fn concurrent_applies_are_serialised() {
    skip_unless_ready!(TOPOLOGY_TOOLS);
    let topo = Topology::build(None).expect("topology");
    let dir = TempDir::new("lock").expect("temp dir");
    let a = write_config(dir.path(), "a.toml", &policy_a().to_toml());
    let b = write_config(dir.path(), "b.toml", &policy_b(9_500_000).to_toml());
    let mut shaper = Shaper::new(&topo.gw).expect("shaper");
    let before = topo.gw_qdiscs().expect("qdiscs");

    // The tree each config gives when applied alone.
    shaper.apply(&a).expect("apply A alone");
    let trees_a = trees(&topo);
    shaper.apply(&b).expect("apply B alone");
    let trees_b = trees(&topo);
    assert_ne!(trees_a, trees_b, "A and B must leave different trees");
    shaper.remove().expect("remove");
    assert_eq!(topo.gw_qdiscs().expect("qdiscs"), before);
    let expected = [
        Expected {
            path: a.clone(),
            trees: trees_a,
            classes: ["video", "images", "default"],
        },
        Expected {
            path: b.clone(),
            trees: trees_b,
            classes: ["video", "default", "bulk"],
        },
    ];

    let mut problems = Vec::new();
    for round in 1..=ROUNDS {
        // All started before any is waited for; each apply takes far longer than a spawn.
        let children: Vec<(PathBuf, Child)> = (0..APPLIES)
            .map(|i| {
                let cfg = if i % 2 == 0 { &a } else { &b };
                let child = shaper
                    .command(&[OsStr::new("apply"), cfg.as_os_str()])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("start shaper apply");
                (cfg.clone(), child)
            })
            .collect();
        for (i, (cfg, child)) in children.into_iter().enumerate() {
            let out = child.wait_with_output().expect("wait for shaper apply");
            if !out.status.success() {
                problems.push(format!(
                    "round {round}: apply #{i} of {} exited {}: {}",
                    cfg.display(),
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim_end()
                ));
            }
        }

        let status = match shaper.status_json() {
            Ok(s) => s,
            Err(e) => {
                problems.push(format!("round {round}: {e:#}"));
                break;
            }
        };
        let config = status["config"].as_str().unwrap_or_default().to_string();
        let Some(want) = expected.iter().find(|e| Path::new(&config) == e.path) else {
            problems.push(format!(
                "round {round}: status names config {config:?}, neither A nor B"
            ));
            break;
        };
        let name = want.path.file_name().unwrap_or_default().to_string_lossy();
        let got = trees(&topo);
        for (k, dev) in [GW_WAN_IF, GW_LAN_IF].into_iter().enumerate() {
            if got[k] != want.trees[k] {
                problems.push(format!(
                    "round {round}: status says {name} was applied last, but the tree on {dev} is not {name}'s:\n--- {name} alone\n{}\n--- after the concurrent applies\n{}",
                    want.trees[k].join("\n"),
                    got[k].join("\n")
                ));
            }
            let n = tcx_programs(&topo.gw, dev);
            if n != 1 {
                problems.push(format!(
                    "round {round}: {n} TCX programs on {dev}, expected exactly 1"
                ));
            }
        }
        let classes: Vec<&str> = status["directions"][0]["classes"]
            .as_array()
            .map(|v| v.iter().filter_map(|c| c["name"].as_str()).collect())
            .unwrap_or_default();
        if classes != want.classes {
            problems.push(format!(
                "round {round}: status classes {classes:?}, expected {name}'s {:?}",
                want.classes
            ));
        }
        // The `[calls]` drop tracer's link is there where the kernel has BTF; nothing
        // staged (`*_next`, `maps_old`) may be.
        let pins: Vec<String> = entries(shaper.bpffs_dir())
            .into_iter()
            .filter(|p| p != "link_drops")
            .collect();
        if pins != ["link_lan", "link_wan", "maps"] {
            problems.push(format!(
                "round {round}: pin directory holds {pins:?}, expected link_lan, link_wan, maps"
            ));
        }
        let run = entries(shaper.run_dir());
        if run.iter().any(|e| e != "lock" && e != "state.json") {
            problems.push(format!(
                "round {round}: run directory holds {run:?} (a staged state left behind?)"
            ));
        }
    }

    // Cleans up whichever apply won (the driver only tracks its own `apply` calls).
    let removed = shaper
        .command(&["remove"])
        .output()
        .expect("run shaper remove");
    if !removed.status.success() {
        problems.push(format!(
            "remove after the concurrent applies failed: {}",
            String::from_utf8_lossy(&removed.stderr)
        ));
    }
    let after = topo.gw_qdiscs().expect("qdiscs");
    if after != before {
        problems.push(format!(
            "qdiscs after remove:\n--- before\n{before}--- after\n{after}"
        ));
    }
    assert!(
        problems.is_empty(),
        "concurrent `shaper apply`:\n- {}",
        problems.join("\n- ")
    );
}
