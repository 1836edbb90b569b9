//! The `pairvisor` CLI against a real daemon: login, noun-verb commands,
//! `--json` output and stable exit codes.

mod common;

use common::{Daemon, ADMIN_PASSWORD};
use serde_json::{json, Value};
use std::process::{Command, Output};

struct Cli<'a> {
    d: &'a Daemon,
    config: std::path::PathBuf,
}

impl Cli<'_> {
    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_pairvisor"))
            .args(args)
            .env("PAIRVISOR_URL", &self.d.url)
            .env("PAIRVISOR_CA_CERT", self.d.ca_file())
            .env("PAIRVISOR_CONFIG", &self.config)
            .env_remove("PAIRVISOR_TOKEN")
            .output()
            .expect("run pairvisor")
    }

    /// Runs with --json; returns (exit code, parsed stdout).
    fn json(&self, args: &[&str]) -> (i32, Value) {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.run(&a);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (out.status.code().unwrap_or(-1), v)
    }
}

#[test]
fn cli_commands_json_and_exit_codes() {
    let d = Daemon::start();
    let cli = Cli {
        d: &d,
        config: d.data.path().join("cli.json"),
    };
    // Not logged in yet.
    let (code, v) = cli.json(&["vm", "list"]);
    assert_eq!(code, 4, "unauthenticated: {v}");
    assert_eq!(v["code"], "unauthenticated");

    let pw = d.data.path().join("pw");
    std::fs::write(&pw, ADMIN_PASSWORD).unwrap();
    let out = cli.run(&[
        "login",
        "--user",
        "admin",
        "--password-file",
        pw.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let saved = std::fs::read_to_string(&cli.config).unwrap();
    assert!(saved.contains("token"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&cli.config).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // Create, list, show.
    let (code, v) = cli.json(&[
        "vm",
        "create",
        "web",
        "--vcpus",
        "2",
        "--memory",
        "512M",
        "--boot-size",
        "32M",
    ]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["state"], "stopped");
    assert_eq!(v["vcpus"], 2);
    let (code, v) = cli.json(&["vm", "list"]);
    assert_eq!(code, 0);
    assert_eq!(v.as_array().unwrap().len(), 1);
    let out = cli.run(&["vm", "list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("NAME"), "table output:\n{text}");
    assert!(text.contains("web") && text.contains("stopped"));
    let (_, v) = cli.json(&["volume", "list"]);
    assert_eq!(v[0]["name"], "web-boot");
    assert_eq!(v[0]["vm"], "web");

    // Stable exit codes.
    assert_eq!(cli.json(&["vm", "show", "nope"]).0, 6, "not found");
    let (code, v) = cli.json(&["vm", "shutdown", "web"]);
    assert_eq!(code, 7, "wrong state is a conflict: {v}");
    assert!(v["message"].as_str().unwrap().contains("it is stopped"));
    assert_eq!(
        cli.json(&["vm", "create", "bad/name", "--boot-size", "32M"])
            .0,
        8,
        "invalid name"
    );
    assert_eq!(
        cli.json(&["vm", "create", "cpu", "--vcpus", "9", "--boot-size", "32M"])
            .0,
        8,
        "admission"
    );
    let out = cli.run(&[
        "vm",
        "create",
        "x",
        "--memory",
        "lots",
        "--boot-size",
        "32M",
    ]);
    assert_eq!(out.status.code(), Some(2), "usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a size"));
    assert_eq!(
        cli.run(&["vm", "frobnicate"]).status.code(),
        Some(2),
        "clap usage error"
    );

    // Forbidden for a read-only user.
    d.ok(
        "POST",
        "/users",
        Some(json!({"name": "viewer", "role": "read_only", "password": "viewer pw!"})),
    );
    let token = d.login("viewer", "viewer pw!").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pairvisor"))
        .args(["vm", "remove", "web"])
        .env("PAIRVISOR_URL", &d.url)
        .env("PAIRVISOR_CA_CERT", d.ca_file())
        .env("PAIRVISOR_TOKEN", &token)
        .env("PAIRVISOR_CONFIG", &cli.config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5), "forbidden");
    assert!(String::from_utf8_lossy(&out.stderr).contains("role read_only"));

    // Volumes and config through the CLI.
    assert_eq!(
        cli.json(&["volume", "create", "logs", "--size", "16M"]).0,
        0
    );
    let (code, v) = cli.json(&["volume", "attach", "logs", "--vm", "web"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["vm"], "web");
    assert_eq!(cli.json(&["volume", "delete", "logs"]).0, 7, "attached");
    let (code, v) = cli.json(&[
        "vm",
        "config",
        "web",
        "--vcpus",
        "1",
        "--memory",
        "1G",
        "--mac",
        "0=52:54:00:aa:bb:cc",
    ]);
    assert_eq!(code, 8, "web has no NIC 0: {v}");
    let (code, v) = cli.json(&[
        "vm",
        "config",
        "web",
        "--vcpus",
        "1",
        "--memory",
        "1G",
        "--detach-volume",
        "logs",
    ]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(
        (v["vcpus"].as_u64(), v["memory_mib"].as_u64()),
        (Some(1), Some(1024))
    );
    assert_eq!(v["data_volumes"], json!([]));
    assert_eq!(cli.json(&["volume", "delete", "logs"]).0, 0);

    // Settings, audit, pm.
    let (code, v) = cli.json(&["settings", "set", "shutdown_timeout_secs=45"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["shutdown_timeout_secs"], 45);
    assert_eq!(cli.json(&["settings", "set", "accel=xen"]).0, 8);
    let (code, v) = cli.json(&["audit", "list", "--limit", "5"]);
    assert_eq!(code, 0);
    assert!(v.as_array().unwrap().len() <= 5);
    let (code, v) = cli.json(&["pm", "show"]);
    assert_eq!(code, 0);
    assert!(v["memory_mib"].as_u64().unwrap() > 0);

    // Remove and unreachable daemon.
    assert_eq!(cli.json(&["vm", "remove", "web"]).0, 0);
    let out = Command::new(env!("CARGO_BIN_EXE_pairvisor"))
        .args(["--url", "https://127.0.0.1:9", "vm", "list"])
        .env("PAIRVISOR_CONFIG", &cli.config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "unreachable");

    // A daemon whose certificate nobody vouched for is refused, with advice.
    let fresh = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pairvisor"))
        .args(["vm", "list"])
        .env("PAIRVISOR_URL", &d.url)
        .env("PAIRVISOR_CONFIG", fresh.path().join("cli.json"))
        .env("PAIRVISOR_DATA_DIR", fresh.path())
        .env_remove("PAIRVISOR_CA_CERT")
        .env_remove("PAIRVISOR_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "untrusted certificate");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not trust") && err.contains("--ca-cert"),
        "{err}"
    );
    // On the PM itself the CLI finds the daemon's CA in its data directory.
    let out = Command::new(env!("CARGO_BIN_EXE_pairvisor"))
        .args(["vm", "list"])
        .env("PAIRVISOR_URL", &d.url)
        .env("PAIRVISOR_CONFIG", fresh.path().join("cli.json"))
        .env("PAIRVISOR_DATA_DIR", d.data.path())
        .env("PAIRVISOR_TOKEN", &d.token)
        .env_remove("PAIRVISOR_CA_CERT")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
