//! The browser console end to end: real headless Chromium (Debian's
//! `chromium`, driven by npm `playwright-core`) against the real daemon
//! booting the test guest under QEMU (TCG). The browser script is
//! `crates/console/e2e/console.test.mjs`; it logs in, creates a VM in the
//! wizard (admission rules shown, an invalid entry refused with the server's
//! message), starts it and sees it reach running through live updates, opens
//! its graphical console (VNC canvas showing the guest's kernel output) and
//! its serial log in follow mode, shuts it down, uploads a VCD with progress,
//! and checks that an operator cannot remove a VM (button disabled, server
//! refuses). Screenshots land in `target/screenshots/`.
//!
//! Needs: `chromium` (scripts/install-deps), `npm ci` in `crates/console`
//! (scripts/test), and the test guest (guest/build.sh).

mod common;

use common::{guest, guest_dir, Daemon, ADMIN_PASSWORD};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;

const OPERATOR_PASSWORD: &str = "operator password";

fn workspace() -> PathBuf {
    let w = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::fs::canonicalize(&w).unwrap_or(w)
}

fn chromium() -> String {
    std::env::var("PV_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into())
}

#[test]
fn browser_console_end_to_end() {
    let console = workspace().join("crates/console");
    let script = console.join("e2e/console.test.mjs");
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
    let (kernel, initrd) = guest();
    let canonical = |p: String| {
        std::fs::canonicalize(&p)
            .map(|c| c.display().to_string())
            .unwrap_or(p)
    };
    let (kernel, initrd) = (canonical(kernel), canonical(initrd));
    let d = Daemon::start();
    d.ok(
        "POST",
        "/users",
        Some(json!({"name": "op", "role": "operator", "password": OPERATOR_PASSWORD})),
    );
    let shots = workspace().join("target/screenshots");
    let net =
        common::browser_net::BrowserNet::new(&[common::browser_net::url_addr(&d.url)], &chromium());
    let mut cmd = Command::new("node");
    cmd.arg(&script)
        .current_dir(&console)
        .env("PV_URL", &d.url)
        .env("PV_CA_FILE", d.ca_file())
        .env("NODE_EXTRA_CA_CERTS", d.ca_file())
        .env("PV_ADMIN_USER", "admin")
        .env("PV_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .env("PV_OPERATOR_USER", "op")
        .env("PV_OPERATOR_PASSWORD", OPERATOR_PASSWORD)
        .env("PV_KERNEL", kernel)
        .env("PV_INITRD", initrd)
        .env("PV_SCREENSHOTS", &shots)
        .env("PV_CHROMIUM", &net.chromium);
    let iso = guest_dir().join("guest.iso");
    if iso.is_file() {
        cmd.env("PV_ISO", iso);
    }
    let out = cmd.output().expect("run node (is nodejs installed?)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        out.status.success(),
        "the browser test failed ({}); screenshots in {}\nstdout:\n{stdout}\nstderr:\n{stderr}\ndaemon log:\n{}",
        out.status,
        shots.display(),
        d.log()
    );
    assert!(stdout.contains("ALL BROWSER CHECKS PASSED"));
    for name in ["dashboard", "vm-list", "wizard", "console"] {
        assert!(
            shots.join(format!("{name}.png")).is_file(),
            "screenshot {name}.png missing"
        );
    }
}
