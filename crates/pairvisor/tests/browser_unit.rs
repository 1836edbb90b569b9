//! The browser console against a two-PM unit, end to end: real headless
//! Chromium (Debian's `chromium`, driven by npm `playwright-core`) against a
//! `pairvisor lab` (two PM daemons and a witness in their own network
//! namespaces, QEMU under TCG, the demo VM on pm-a). Needs root for the
//! namespaces; without it the test says so and passes without running.
//!
//! The browser script is `crates/console/e2e/unit.test.mjs`: on the Unit
//! page it sees both PMs running with their heartbeat links, lease and
//! quorum, cancels a unit shutdown at its confirmation, puts pm-b in
//! maintenance and back (Work On, Finalize); it sees the demo volume in sync
//! with its statistics; it migrates the demo VM to pm-b from the console and
//! sees the migration panel reach "done" with the measured downtime; with
//! the guest dirtying memory faster than a capped link it sees "not
//! converging" explained with the numbers and the remedies, cancels, then
//! finishes with "pause and finish"; it sets the VM's preferred PM.
//! Screenshots land in `target/screenshots/` (`unit-*.png`).
//!
//! Needs: `chromium` (scripts/install-deps), `npm ci` in `crates/console`
//! (scripts/test), and the test guest (guest/build.sh).

mod common;

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const PASSWORD: &str = "pairvisor-lab";

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_pairvisor")
}

fn workspace() -> PathBuf {
    let w = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::fs::canonicalize(&w).unwrap_or(w)
}

fn guest_dir() -> PathBuf {
    std::env::var_os("PAIRVISOR_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/guest"))
}

fn chromium() -> String {
    std::env::var("PV_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into())
}

fn lab(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(bin())
        .arg("lab")
        .arg("--dir")
        .arg(dir)
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "lab {args:?} failed: {text}");
    text
}

/// Takes the lab down however the test ends; on failure, prints the
/// members' log tails first.
struct Lab(tempfile::TempDir);

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for m in ["pm-a", "pm-b", "witness"] {
                let log = std::fs::read_to_string(self.0.path().join(format!("{m}.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("---- {m} log (newest last) ----");
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        let _ = Command::new(bin())
            .args(["lab", "--dir"])
            .arg(self.0.path())
            .arg("down")
            .output();
    }
}

/// A member's API URL from the lab's state file.
fn api_url(dir: &Path, name: &str) -> String {
    let st: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("lab.json")).unwrap()).unwrap();
    st["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name)
        .and_then(|m| m["api"].as_str())
        .unwrap()
        .to_string()
}

/// GET `path` on `url` as the lab's administrator (trusting the lab's two
/// API CAs); None when it fails.
fn get(dir: &Path, url: &str, path: &str) -> Option<Value> {
    let c = common::https_client_with_timeout(&dir.join("api-ca.pem"), Duration::from_secs(10));
    let login: Value = c
        .post(format!("{url}/api/v1/auth/login"))
        .json(&json!({"user": "admin", "password": PASSWORD}))
        .send()
        .ok()?
        .json()
        .ok()?;
    let r = c
        .get(format!("{url}/api/v1{path}"))
        .bearer_auth(login["token"].as_str()?)
        .send()
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.json().ok()
}

fn until<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s: {what}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn browser_console_drives_a_two_pm_unit() {
    if !common::is_root() {
        eprintln!("skipped: the unit browser test needs root (network namespaces for the lab)");
        return;
    }
    let console = workspace().join("crates/console");
    let script = console.join("e2e/unit.test.mjs");
    assert!(
        console.join("node_modules/playwright-core").is_dir(),
        "playwright-core is missing: run `npm ci` in {} (scripts/test does)",
        console.display()
    );
    assert!(
        Path::new(&chromium()).is_file(),
        "{} is missing: run scripts/install-deps (apt-get install chromium)",
        chromium()
    );
    let g = guest_dir();
    assert!(
        g.join("vmlinuz").is_file(),
        "the test guest is missing in {}: run guest/build.sh",
        g.display()
    );

    let dir = Lab(tempfile::tempdir().unwrap());
    let path = dir.0.path();
    // Its own network (138-139, next to unit_failover's 140-149) and
    // namespace prefix.
    let net = (138 + std::process::id() % 2).to_string();
    let prefix = format!("pvb{net}");
    let g = g.display().to_string();
    let text = lab(
        path,
        &["up", "--prefix", &prefix, "--net", &net, "--guest-dir", &g],
    );
    assert!(text.contains("own namespaces"), "{text}");
    let url = api_url(path, "pm-a");
    until("demo running on pm-a", 180, || {
        get(path, &url, "/vms/demo").filter(|v| {
            v["state"] == "running" && v["host"] == "pm-a" && v["health"]["instance_ok"] == true
        })
    });
    until("demo-boot in sync", 60, || {
        get(path, &url, "/volumes/demo-boot").filter(|v| v["sync"] == "in_sync")
    });
    until("both PMs running", 60, || {
        get(path, &url, "/pms").filter(|p| {
            p.as_array().is_some_and(|a| {
                a.len() == 2
                    && a.iter()
                        .all(|x| x["state"] == "running" && x["reachable"] == true)
            })
        })
    });

    let shots = workspace().join("target/screenshots");
    let pm_urls = [url.clone(), api_url(path, "pm-b")];
    let addrs: Vec<_> = pm_urls
        .iter()
        .map(|u| common::browser_net::url_addr(u))
        .collect();
    let net = common::browser_net::BrowserNet::new(&addrs, &chromium());
    let out = Command::new("node")
        .arg(&script)
        .current_dir(&console)
        .env("PV_URL", &url)
        .env("PV_URL_B", &pm_urls[1])
        .env("PV_BIN", bin())
        .env("PV_CA_FILE", path.join("api-ca.pem"))
        .env("NODE_EXTRA_CA_CERTS", path.join("api-ca.pem"))
        .env("PV_ADMIN_USER", "admin")
        .env("PV_ADMIN_PASSWORD", PASSWORD)
        .env("PV_LAB_DIR", path)
        .env("PV_VM", "demo")
        .env("PV_SCREENSHOTS", &shots)
        .env("PV_CHROMIUM", &net.chromium)
        .output()
        .expect("run node (is nodejs installed?)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        out.status.success(),
        "the unit browser test failed ({}); screenshots in {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status,
        shots.display()
    );
    assert!(stdout.contains("ALL UNIT BROWSER CHECKS PASSED"));
    for name in [
        "unit-page",
        "unit-volume-detail",
        "unit-migration-done",
        "unit-migration-not-converging",
        "unit-volume-outdated",
        "unit-failover-refused",
        "unit-split-brain",
    ] {
        assert!(
            shots.join(format!("{name}.png")).is_file(),
            "screenshot {name}.png missing"
        );
    }
    lab(path, &["down"]);
}
