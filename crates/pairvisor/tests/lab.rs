//! `pairvisor lab` end to end (needs root for network namespaces, as CI
//! has): two PM daemons and a witness as separate processes in their own
//! namespaces form a unit over mutual TLS; heartbeats run on both links; a
//! cut private link is seen on both sides while the business link carries
//! on; a killed PM is seen as lost on both links while the survivor keeps a
//! leader with the witness; `lab down` removes everything.

use serde_json::Value;
use std::process::Command;
use std::time::{Duration, Instant};

fn lab(dir: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pairvisor"))
        .arg("lab")
        .arg("--dir")
        .arg(dir)
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn status(dir: &std::path::Path) -> Value {
    let (ok, text) = lab(dir, &["status"]);
    assert!(ok, "{text}");
    serde_json::from_str(&text).unwrap()
}

fn link_up(v: &Value, member: &str, link: &str) -> Option<bool> {
    v[member]["health"]["links"]
        .as_array()?
        .iter()
        .find(|l| l["name"] == link)
        .and_then(|l| l["up"].as_bool())
}

fn until(dir: &std::path::Path, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = status(dir);
        if pred(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: {v:#}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn lab_forms_a_unit_and_injects_faults() {
    let dir = tempfile::tempdir().unwrap();
    let pid = std::process::id();
    let prefix = format!("pvt{}", pid % 1000);
    // 150..190: disjoint from the netns test (100..140) and the default lab (190+ unused).
    let net = (150 + pid % 40).to_string();
    let (ok, text) = lab(dir.path(), &["up", "--prefix", &prefix, "--net", &net]);
    assert!(ok, "lab up failed: {text}");
    assert!(text.contains("own namespaces"), "{text}");

    let v = until(
        dir.path(),
        "a unit with 3 voters, a leader and both links up",
        |v| {
            let voters = v["pm-a"]["metrics"]["members"]
                .as_array()
                .map(|m| m.iter().filter(|x| x["voter"] == true).count())
                .unwrap_or(0);
            voters == 3
                && !v["pm-b"]["metrics"]["leader"].is_null()
                && link_up(v, "pm-a", "private") == Some(true)
                && link_up(v, "pm-b", "business") == Some(true)
        },
    );
    assert_eq!(v["pm-a"]["name"], "lab");
    assert_eq!(v["pm-a"]["pms"].as_array().unwrap().len(), 2);

    // Cut the private link: seen on both sides; the business link carries on.
    assert!(lab(dir.path(), &["cut", "private"]).0);
    until(dir.path(), "private down on both PMs", |v| {
        link_up(v, "pm-a", "private") == Some(false)
            && link_up(v, "pm-b", "private") == Some(false)
            && link_up(v, "pm-a", "business") == Some(true)
    });
    assert!(lab(dir.path(), &["heal"]).0);
    until(dir.path(), "healed", |v| {
        link_up(v, "pm-b", "private") == Some(true)
    });

    // Kill pm-b: pm-a loses it on both links but keeps a leader (with the
    // witness, 2 of 3 voters).
    assert!(lab(dir.path(), &["kill", "pm-b"]).0);
    let v = until(dir.path(), "partner lost at pm-a", |v| {
        v["pm-a"]["health"]["partner_lost"] == true
    });
    assert_eq!(v["pm-b"]["alive"], false);
    let v = until(dir.path(), "a leader among pm-a and the witness", |v| {
        matches!(v["pm-a"]["metrics"]["leader"].as_u64(), Some(1 | 3))
    });
    assert!(v["pm-a"]["metrics"]["leader"].as_u64().is_some());

    assert!(lab(dir.path(), &["down"]).0);
    let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&list.stdout).contains(&prefix),
        "namespaces removed"
    );
    assert!(lab(dir.path(), &["status"]).1.contains("no lab is up"));
}
