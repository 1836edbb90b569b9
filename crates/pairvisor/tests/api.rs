//! REST API against the real daemon: bad input (clear error, nothing
//! changed), role enforcement on every route, audit log, OpenAPI document.
//! These tests start no VM, so they need no guest.

mod common;

use common::Daemon;
use serde_json::{json, Value};
use std::io::Write;
use std::time::{Duration, Instant};

/// Everything an administrator can see, plus the files under the data
/// directory that requests may create.
fn snapshot(d: &Daemon) -> Value {
    let mut files: Vec<String> = Vec::new();
    for sub in ["storage", "vcds", "tmp"] {
        for e in walk(&d.data.path().join(sub)) {
            files.push(e);
        }
    }
    files.sort();
    json!({
        "vms": d.ok("GET", "/vms", None),
        "volumes": d.ok("GET", "/volumes", None),
        "vcds": d.ok("GET", "/vcds", None),
        "users": d.ok("GET", "/users", None),
        "groups": d.ok("GET", "/storage-groups", None),
        "settings": d.ok("GET", "/settings", None),
        "files": files,
    })
}

fn walk(p: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let path = e.path();
            if path.is_dir() {
                out.extend(walk(&path));
            } else {
                out.push(path.display().to_string());
            }
        }
    }
    out
}

/// Asserts that a request fails with `status` and `code`, that the message
/// contains `needle`, and that nothing changed.
fn refused(
    d: &Daemon,
    method: &str,
    path: &str,
    body: Option<Value>,
    status: u16,
    code: &str,
    needle: &str,
) {
    let before = snapshot(d);
    let (s, v) = d.call(method, path, body.clone());
    assert_eq!(s, status, "{method} {path} {body:?} -> {v}");
    assert_eq!(v["code"], code, "{method} {path} -> {v}");
    let msg = v["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(needle),
        "{method} {path}: message {msg:?} lacks {needle:?}"
    );
    assert_eq!(snapshot(d), before, "{method} {path} changed something");
}

fn vm_body(name: &str) -> Value {
    json!({"name": name, "vcpus": 1, "memory_mib": 256, "boot_volume": {"size_bytes": 16 << 20}})
}

#[test]
fn bad_input_is_refused_clearly_and_changes_nothing() {
    let d = Daemon::start();
    d.ok("POST", "/vms", Some(vm_body("web")));
    d.ok(
        "POST",
        "/volumes",
        Some(json!({"name": "data1", "size_bytes": 8 << 20})),
    );
    d.ok("POST", "/volumes/data1/attach", Some(json!({"vm": "web"})));

    // Unknown objects.
    refused(
        &d,
        "GET",
        "/vms/nope",
        None,
        404,
        "not_found",
        "VM 'nope' does not exist",
    );
    refused(
        &d,
        "POST",
        "/vms/nope/start",
        None,
        404,
        "not_found",
        "VM 'nope'",
    );
    refused(
        &d,
        "DELETE",
        "/volumes/nope",
        None,
        404,
        "not_found",
        "volume 'nope'",
    );
    refused(
        &d,
        "POST",
        "/volumes/nope/attach",
        Some(json!({"vm": "web"})),
        404,
        "not_found",
        "volume 'nope'",
    );
    refused(
        &d,
        "DELETE",
        "/vcds/nope",
        None,
        404,
        "not_found",
        "VCD 'nope'",
    );
    refused(
        &d,
        "PUT",
        "/vms/web/cd",
        Some(json!({"vcd": "nope"})),
        404,
        "not_found",
        "VCD 'nope'",
    );

    // Duplicate and invalid names.
    refused(
        &d,
        "POST",
        "/vms",
        Some(vm_body("web")),
        409,
        "already_exists",
        "VM 'web' already exists",
    );
    let long = "x".repeat(65);
    for (name, needle) in [
        ("", "empty"),
        (long.as_str(), "at most 64"),
        ("a/b", "cannot be paths"),
        ("..", "may not start"),
        ("a\u{1}b", "control character"),
    ] {
        refused(
            &d,
            "POST",
            "/vms",
            Some(vm_body(name)),
            400,
            "invalid_name",
            needle,
        );
        refused(
            &d,
            "POST",
            "/volumes",
            Some(json!({"name": name, "size_bytes": 1 << 20})),
            400,
            "invalid_name",
            needle,
        );
        let iso = d.data.path().join("admin-password");
        refused(
            &d,
            "POST",
            "/vcds",
            Some(json!({"name": name, "path": iso})),
            400,
            "invalid_name",
            needle,
        );
    }

    // vCPUs and memory.
    for vcpus in [0, 9] {
        let mut b = vm_body("cpu");
        b["vcpus"] = json!(vcpus);
        refused(
            &d,
            "POST",
            "/vms",
            Some(b),
            422,
            "admission_refused",
            "between 1 and 8",
        );
    }
    let mut b = vm_body("small");
    b["memory_mib"] = json!(255);
    refused(
        &d,
        "POST",
        "/vms",
        Some(b),
        422,
        "admission_refused",
        "minimum is 256 MiB",
    );
    let mut b = vm_body("small64");
    b["memory_mib"] = json!(599);
    b["guest_type"] = json!("linux-64");
    refused(
        &d,
        "POST",
        "/vms",
        Some(b),
        422,
        "admission_refused",
        "minimum is 600 MiB",
    );
    let mut b = vm_body("huge");
    b["memory_mib"] = json!(10_000_000);
    refused(
        &d,
        "POST",
        "/vms",
        Some(b),
        422,
        "admission_refused",
        "more than this unit can give",
    );
    refused(
        &d,
        "POST",
        "/vms/web/config",
        Some(json!({"vcpus": 9})),
        422,
        "admission_refused",
        "between 1 and 8",
    );

    // Volumes: space, attached, boot.
    let sg = d.data.path().join("small-group");
    d.ok(
        "POST",
        "/storage-groups",
        Some(json!({"name": "small", "path": sg, "capacity_bytes": 100 << 20})),
    );
    refused(
        &d,
        "POST",
        "/volumes",
        Some(json!({"name": "big", "size_bytes": 200 << 20, "group": "small"})),
        422,
        "admission_refused",
        "storage group 'small' has 104857600 bytes free",
    );
    refused(
        &d,
        "POST",
        "/volumes",
        Some(json!({"name": "odd", "size_bytes": 1000})),
        422,
        "admission_refused",
        "multiple of 1 MiB",
    );
    refused(
        &d,
        "POST",
        "/volumes",
        Some(json!({"name": "x", "size_bytes": 1 << 20, "group": "nope"})),
        404,
        "not_found",
        "storage group 'nope'",
    );
    refused(
        &d,
        "DELETE",
        "/volumes/data1",
        None,
        409,
        "conflict",
        "attached to VM 'web'",
    );
    refused(
        &d,
        "DELETE",
        "/volumes/web-boot",
        None,
        409,
        "conflict",
        "the boot volume of VM 'web'",
    );
    refused(
        &d,
        "POST",
        "/vms/web/config",
        Some(json!({"detach_volumes": ["web-boot"]})),
        409,
        "conflict",
        "boot volume",
    );
    refused(
        &d,
        "POST",
        "/vms/web/config",
        Some(json!({"delete_volumes": ["web-boot"]})),
        409,
        "conflict",
        "boot volume",
    );
    refused(
        &d,
        "POST",
        "/volumes/web-boot/detach",
        None,
        409,
        "conflict",
        "boot volume",
    );
    refused(
        &d,
        "POST",
        "/storage-groups",
        Some(json!({"name": "rel", "path": "relative/dir", "capacity_bytes": 1 << 20})),
        400,
        "invalid_input",
        "absolute",
    );
    refused(
        &d,
        "POST",
        "/storage-groups",
        Some(json!({"name": "up", "path": "/tmp/../etc", "capacity_bytes": 1 << 20})),
        400,
        "invalid_input",
        "no '..'",
    );

    // Config is all-or-nothing: a valid change next to an invalid one
    // changes nothing (no new volume file either).
    refused(
        &d,
        "POST",
        "/vms/web/config",
        Some(
            json!({"vcpus": 2, "add_volumes": [{"name": "extra", "size_bytes": 1 << 20}], "detach_volumes": ["web-boot"]}),
        ),
        409,
        "conflict",
        "boot volume",
    );
    refused(
        &d,
        "POST",
        "/vms/web/config",
        Some(json!({"memory_mib": 512, "macs": [{"nic": 0, "mac": "52:54:00:00:00:01"}]})),
        400,
        "invalid_input",
        "NIC index 0 does not exist; VM 'web' has 0 NIC(s)",
    );
    refused(
        &d,
        "POST",
        "/vms/web/config",
        Some(json!({"add_nics": [{"network": "user", "mac": "01:00:5e:00:00:01"}]})),
        400,
        "invalid_input",
        "multicast",
    );
    refused(
        &d,
        "POST",
        "/vms/web/config",
        Some(json!({"add_nics": [{"network": "lab"}]})),
        400,
        "invalid_input",
        "network 'lab' does not exist",
    );
    // A valid config applies every part.
    let v = d.ok(
        "POST",
        "/vms/web/config",
        Some(json!({
            "vcpus": 2, "memory_mib": 512, "guest_type": "linux-32",
            "add_volumes": [{"name": "scratch", "size_bytes": 4 << 20}],
            "add_nics": [{"network": "user"}],
        })),
    );
    assert_eq!(
        (v["vcpus"].as_u64(), v["memory_mib"].as_u64()),
        (Some(2), Some(512))
    );
    assert_eq!(v["data_volumes"], json!(["data1", "scratch"]));
    assert!(v["nics"][0]["mac"]
        .as_str()
        .unwrap()
        .starts_with("52:54:00:"));
    let v = d.ok(
        "POST",
        "/vms/web/config",
        Some(json!({
            "macs": [{"nic": 0, "mac": "52:54:00:12:34:56"}], "delete_volumes": ["scratch"],
        })),
    );
    assert_eq!(v["nics"][0]["mac"], "52:54:00:12:34:56");
    assert_eq!(v["data_volumes"], json!(["data1"]));
    assert!(d.call("GET", "/volumes/scratch", None).0 == 404);
    // S6: unattached volumes show "none"; S5: a small group warns.
    d.ok(
        "POST",
        "/volumes",
        Some(json!({"name": "spare", "size_bytes": 1 << 20})),
    );
    let spare = d.ok("GET", "/volumes/spare", None);
    assert_eq!(
        (spare["vm"].as_str(), spare["boot"].as_bool()),
        (Some("none"), Some(false))
    );
    let groups = d.ok("GET", "/storage-groups", None);
    let small = groups
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == "small")
        .unwrap();
    assert!(
        small["warnings"][0]
            .as_str()
            .unwrap()
            .contains("less than 5 GiB"),
        "{small}"
    );
    assert!(d.ok("GET", "/pm", None)["warnings"]
        .to_string()
        .contains("'small'"));

    // Operations in the wrong state (V4).
    refused(
        &d,
        "POST",
        "/vms/web/shutdown",
        None,
        409,
        "operation_not_allowed",
        "cannot shutdown VM 'web': it is stopped; allowed while stopped: start, config",
    );
    refused(
        &d,
        "POST",
        "/vms/web/dump",
        None,
        409,
        "operation_not_allowed",
        "it is stopped",
    );
    refused(
        &d,
        "POST",
        "/vms/web/reset-device",
        None,
        409,
        "operation_not_allowed",
        "it is stopped",
    );
    let (_, v) = d.call("POST", "/vms/web/poweroff", None);
    assert_eq!(v["details"]["state"], "stopped");
    assert!(v["details"]["allowed_operations"]
        .as_array()
        .unwrap()
        .contains(&json!("start")));

    // Malformed JSON, wrong types, unknown fields.
    let before = snapshot(&d);
    for body in [
        &b"{not json"[..],
        b"{\"name\": 5}",
        b"{\"name\":\"a\",\"vcpus\":1,\"memory_mib\":256,\"boot_volume\":{},\"bogus\":1}",
    ] {
        let (s, v) = d.call_raw("POST", "/vms", body.to_vec(), "application/json");
        assert_eq!(s, 400, "{v}");
        assert_eq!(v["code"], "malformed_json", "{v}");
        assert!(v["message"]
            .as_str()
            .unwrap()
            .starts_with("request body is not valid"));
    }
    let (s, v) = d.call_raw("POST", "/vms", b"{}".to_vec(), "text/plain");
    assert_eq!(
        (s, v["code"].as_str()),
        (400, Some("malformed_json")),
        "{v}"
    );
    assert_eq!(snapshot(&d), before);

    // VCD paths.
    refused(
        &d,
        "POST",
        "/vcds",
        Some(json!({"name": "cd", "path": "/nonexistent/x.iso"})),
        400,
        "invalid_input",
        "does not exist",
    );
    refused(
        &d,
        "POST",
        "/vcds",
        Some(json!({"name": "cd", "path": "/tmp"})),
        400,
        "invalid_input",
        "outside the import directories",
    );
    let import_dir = d.data.path().join("import").display().to_string();
    refused(
        &d,
        "POST",
        "/vcds",
        Some(json!({"name": "cd", "path": import_dir})),
        400,
        "invalid_input",
        "not a regular file",
    );
    refused(
        &d,
        "POST",
        "/vcds",
        Some(json!({"name": "cd", "path": "x.iso"})),
        400,
        "invalid_input",
        "not absolute",
    );

    // Settings.
    refused(
        &d,
        "PATCH",
        "/settings",
        Some(json!({"accel": "xen"})),
        400,
        "invalid_input",
        "allowed: kvm, tcg",
    );
    refused(
        &d,
        "PATCH",
        "/settings",
        Some(json!({"memory_reserve_mib": 1, "accel": "kvm"})),
        400,
        "invalid_input",
        "allowed: 256 to 65536",
    );
    refused(
        &d,
        "PATCH",
        "/settings",
        Some(json!({"timezone": "../../etc/passwd"})),
        400,
        "invalid_input",
        "IANA",
    );
    refused(
        &d,
        "PATCH",
        "/settings",
        Some(json!({"resync_rate_mbps": 200_000})),
        400,
        "invalid_input",
        "resync_rate_mbps",
    );
    // The QEMU binary runs as root on every PM: only a QEMU system
    // emulator, by name or from a system directory.
    for b in ["/tmp/qemu-system-x86_64", "/bin/sh", "bash"] {
        refused(
            &d,
            "PATCH",
            "/settings",
            Some(json!({"qemu_binary": b})),
            400,
            "invalid_input",
            "give qemu-system-ARCH",
        );
    }

    // Users.
    refused(
        &d,
        "POST",
        "/users",
        Some(json!({"name": "bob", "role": "operator", "password": "short"})),
        400,
        "invalid_input",
        "at least 8",
    );
    refused(
        &d,
        "POST",
        "/users",
        Some(json!({"name": "admin", "role": "operator", "password": "long enough"})),
        409,
        "already_exists",
        "user 'admin'",
    );
    refused(
        &d,
        "DELETE",
        "/users/admin",
        None,
        409,
        "conflict",
        "last administrator",
    );

    // Unknown route.
    let (s, v) = d.call("GET", "/nope", None);
    assert_eq!((s, v["code"].as_str()), (404, Some("not_found")));
}

#[test]
fn vcd_upload_add_insert_remove_and_interrupted_upload() {
    let d = Daemon::start();
    d.ok("POST", "/vms", Some(vm_body("web")));
    // Upload through HTTP.
    let iso: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let (s, v) = d.call_raw(
        "PUT",
        "/vcds/install",
        iso.clone(),
        "application/octet-stream",
    );
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["size_bytes"], 300_000);
    assert_eq!(v["can_remove"], true);
    let stored = std::fs::read(d.data.path().join("vcds/install.iso")).unwrap();
    assert_eq!(stored, iso, "uploaded image stored byte for byte");
    // Add from a path on the PM: only from an import directory.
    let src = d.data.path().join("import/local.iso");
    std::fs::write(&src, b"ISO DATA").unwrap();
    d.ok("POST", "/vcds", Some(json!({"name": "local", "path": src})));
    for secret in [
        d.data
            .path()
            .join("tls/api-ca-key.pem")
            .display()
            .to_string(),
        format!("{}/import/../state.redb", d.data.path().display()),
        "/etc/shadow".to_string(),
    ] {
        refused(
            &d,
            "POST",
            "/vcds",
            Some(json!({"name": "stolen", "path": secret})),
            400,
            "invalid_input",
            "outside the import directories",
        );
    }
    let mut vm = vm_body("thief");
    vm["kernel"] = json!({"kernel": "/etc/shadow", "cmdline": ""});
    refused(
        &d,
        "POST",
        "/vms",
        Some(vm),
        400,
        "invalid_input",
        "outside the import directories",
    );
    refused(
        &d,
        "PUT",
        "/vcds/install",
        None,
        409,
        "already_exists",
        "VCD 'install'",
    );

    // Insert into a stopped VM: no longer removable.
    d.ok("PUT", "/vms/web/cd", Some(json!({"vcd": "install"})));
    let list = d.ok("GET", "/vcds", None);
    let install = list
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "install")
        .unwrap();
    assert_eq!(install["can_remove"], false);
    assert_eq!(install["inserted_in"], json!(["web"]));
    refused(
        &d,
        "DELETE",
        "/vcds/install",
        None,
        409,
        "conflict",
        "inserted in VM(s) web; eject it first",
    );
    d.ok("DELETE", "/vms/web/cd", None);
    refused(
        &d,
        "DELETE",
        "/vms/web/cd",
        None,
        409,
        "conflict",
        "no CD inserted",
    );
    let (s, _) = d.call("DELETE", "/vcds/install", None);
    assert_eq!(s, 204);
    assert!(!d.data.path().join("vcds/install.iso").exists());

    // Plain HTTP on the API port is redirected to HTTPS, path kept.
    {
        use std::io::Read;
        let addr = d.url.trim_start_matches("https://");
        let mut plain = std::net::TcpStream::connect(addr).unwrap();
        write!(plain, "GET /ui/vms?x=1 HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
        let mut answer = String::new();
        plain.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 308"), "{answer}");
        assert!(
            answer.contains(&format!("Location: https://{addr}/ui/vms?x=1\r\n")),
            "{answer}"
        );
        // And HTTPS answers tell browsers to stay on HTTPS (HSTS).
        let r = d.http().get(format!("{}/health", d.url)).send().unwrap();
        assert_eq!(
            r.headers()
                .get("strict-transport-security")
                .and_then(|v| v.to_str().ok()),
            Some("max-age=31536000")
        );
    }

    // An upload interrupted half-way leaves nothing behind.
    let before = snapshot(&d);
    let addr = d.url.trim_start_matches("https://").to_string();
    let mut sock = common::tls_stream(&addr, &d.ca_file());
    write!(
        sock,
        "PUT /api/v1/vcds/half HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: 1048576\r\n\r\n",
        d.token
    )
    .unwrap();
    sock.write_all(&vec![7u8; 400_000]).unwrap();
    sock.flush().unwrap();
    // Wait until the daemon has received the first half (the partial file
    // exists), then cut the connection.
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_dir(d.data.path().join("tmp"))
        .unwrap()
        .count()
        == 0
    {
        assert!(Instant::now() < deadline, "upload never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    sock.get_ref().shutdown(std::net::Shutdown::Both).unwrap();
    drop(sock);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_dir(d.data.path().join("tmp"))
        .unwrap()
        .count()
        != 0
    {
        assert!(Instant::now() < deadline, "partial upload file left behind");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(snapshot(&d), before, "interrupted upload changed something");
}

/// The minimum role for each route; the test checks that this table covers
/// every operation in the OpenAPI document, so a new route cannot skip it.
const ROUTES: &[(&str, &str, &str)] = &[
    ("POST", "/auth/logout", "read_only"),
    ("GET", "/auth/whoami", "read_only"),
    ("GET", "/vms", "read_only"),
    ("POST", "/vms", "administrator"),
    ("GET", "/vms/{name}", "read_only"),
    ("DELETE", "/vms/{name}", "administrator"),
    ("POST", "/vms/{name}/start", "operator"),
    ("POST", "/vms/{name}/shutdown", "operator"),
    ("POST", "/vms/{name}/poweroff", "operator"),
    ("POST", "/vms/{name}/dump", "operator"),
    ("POST", "/vms/{name}/migrate", "operator"),
    ("GET", "/vms/{name}/migration", "read_only"),
    ("DELETE", "/vms/{name}/migration", "operator"),
    ("POST", "/vms/{name}/migration/remedy", "operator"),
    ("POST", "/vms/{name}/migration/estimate", "read_only"),
    ("POST", "/vms/{name}/reset-device", "operator"),
    ("POST", "/vms/{name}/promote-anyway", "administrator"),
    ("GET", "/volumes/{name}/split-brain", "read_only"),
    ("POST", "/volumes/{name}/resolve", "administrator"),
    ("POST", "/vms/{name}/boot-from-cd", "operator"),
    ("PUT", "/vms/{name}/cd", "operator"),
    ("DELETE", "/vms/{name}/cd", "operator"),
    ("POST", "/vms/{name}/config", "administrator"),
    ("GET", "/vms/{name}/console", "read_only"),
    ("GET", "/volumes", "read_only"),
    ("POST", "/volumes", "administrator"),
    ("GET", "/volumes/{name}", "read_only"),
    ("DELETE", "/volumes/{name}", "administrator"),
    ("POST", "/volumes/{name}/attach", "administrator"),
    ("POST", "/volumes/{name}/detach", "administrator"),
    ("GET", "/storage-groups", "read_only"),
    ("POST", "/storage-groups", "administrator"),
    ("GET", "/vcds", "read_only"),
    ("POST", "/vcds", "administrator"),
    ("PUT", "/vcds/{name}", "administrator"),
    ("DELETE", "/vcds/{name}", "administrator"),
    ("GET", "/users", "administrator"),
    ("POST", "/users", "administrator"),
    ("DELETE", "/users/{name}", "administrator"),
    ("GET", "/settings", "read_only"),
    ("PATCH", "/settings", "administrator"),
    ("GET", "/audit", "read_only"),
    ("GET", "/pm", "read_only"),
    ("GET", "/events", "read_only"),
    ("GET", "/vms/{name}/vnc", "operator"),
    ("GET", "/alerts", "read_only"),
    ("DELETE", "/alerts/{id}", "operator"),
    ("GET", "/unit", "read_only"),
    ("POST", "/unit/init", "administrator"),
    ("POST", "/unit/join-token", "administrator"),
    ("POST", "/unit/join", "administrator"),
    ("GET", "/unit/force-quorum", "administrator"),
    ("POST", "/unit/shutdown", "administrator"),
    ("GET", "/pms", "read_only"),
    ("POST", "/pms/{name}/work-on", "administrator"),
    ("POST", "/pms/{name}/finalize", "administrator"),
    ("POST", "/pms/{name}/shutdown", "administrator"),
    ("POST", "/pms/{name}/poweroff", "administrator"),
    ("POST", "/pms/{name}/reset-device", "administrator"),
    ("PUT", "/vms/{name}/placement", "administrator"),
    ("POST", "/unit/force-quorum", "administrator"),
];

fn rank(role: &str) -> u8 {
    match role {
        "read_only" => 0,
        "operator" => 1,
        "administrator" => 2,
        other => panic!("unknown role {other}"),
    }
}

#[test]
fn roles_are_enforced_on_every_route_and_requests_are_audited() {
    let d = Daemon::start();
    d.ok(
        "POST",
        "/users",
        Some(json!({"name": "op", "role": "operator", "password": "operator pw"})),
    );
    d.ok(
        "POST",
        "/users",
        Some(json!({"name": "ro", "role": "read_only", "password": "readonly pw"})),
    );
    let op = d.login("op", "operator pw").unwrap();
    let ro = d.login("ro", "readonly pw").unwrap();
    let (s, v) = d.call_as(
        None,
        "POST",
        "/auth/login",
        Some(json!({"user": "op", "password": "wrong password"})),
    );
    assert_eq!((s, v["code"].as_str()), (401, Some("bad_credentials")));
    let (s, _) = d.call_as(
        None,
        "POST",
        "/auth/login",
        Some(json!({"user": "ghost", "password": "whatever!"})),
    );
    assert_eq!(s, 401);

    // The table covers every operation of the OpenAPI document.
    let (_, doc) = d.call_as(None, "GET", "/openapi.json", None);
    let mut documented = Vec::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            let p = path.trim_start_matches("/api/v1").to_string();
            if p != "/auth/login" {
                documented.push((method.to_uppercase(), p));
            }
        }
    }
    documented.sort();
    let mut table: Vec<(String, String)> = ROUTES
        .iter()
        .map(|(m, p, _)| (m.to_string(), p.to_string()))
        .collect();
    table.sort();
    assert_eq!(documented, table, "ROUTES must list every documented route");

    for (method, path, min) in ROUTES {
        let concrete = path.replace("{name}", "nope").replace("{id}", "nope");
        // Without a token: 401 everywhere.
        let (s, v) = d.call_as(None, method, &concrete, Some(json!({})));
        assert_eq!(
            (s, v["code"].as_str()),
            (401, Some("unauthenticated")),
            "{method} {path}"
        );
        let (s, _) = d.call_as(Some("bogus-token"), method, &concrete, Some(json!({})));
        assert_eq!(s, 401, "{method} {path} with a bogus token");
        if *path == "/auth/logout" {
            continue; // would revoke the token used below
        }
        for (token, role) in [(&ro, "read_only"), (&op, "operator")] {
            let (s, v) = d.call_as(Some(token), method, &concrete, Some(json!({})));
            if rank(role) < rank(min) {
                assert_eq!(
                    (s, v["code"].as_str()),
                    (403, Some("forbidden")),
                    "{role} {method} {path}: {v}"
                );
                assert!(v["message"]
                    .as_str()
                    .unwrap()
                    .contains(&format!("has role {role}")));
            } else {
                assert_ne!(s, 403, "{role} may {method} {path}: {v}");
                assert_ne!(s, 401, "{role} {method} {path}: {v}");
            }
        }
    }
    // An operator cannot remove a VM, but may try to start it.
    d.ok("POST", "/vms", Some(vm_body("web")));
    let (s, _) = d.call_as(Some(&op), "DELETE", "/vms/web", None);
    assert_eq!(s, 403);
    let (s, v) = d.call_as(Some(&op), "POST", "/vms/web/shutdown", None);
    assert_eq!(
        (s, v["code"].as_str()),
        (409, Some("operation_not_allowed"))
    );

    // Audit: who, what, when, result.
    let audit = d.ok("GET", "/audit?limit=1000", None);
    let entries = audit.as_array().unwrap();
    let find = |user: &str, action: &str, result_prefix: &str| {
        entries.iter().any(|e| {
            e["user"] == user
                && e["action"] == action
                && e["result"].as_str().unwrap().starts_with(result_prefix)
                && e["time"].as_u64().unwrap() > 1_700_000_000
        })
    };
    assert!(find("admin", "POST /api/v1/vms", "ok"), "{audit:#}");
    assert!(find("op", "DELETE /api/v1/vms/web", "403 forbidden"));
    assert!(find(
        "op",
        "POST /api/v1/vms/web/shutdown",
        "409 operation_not_allowed"
    ));
    assert!(find("op", "POST /api/v1/auth/login", "401"));
    assert!(find("ro", "POST /api/v1/auth/login", "ok"));
    assert!(
        !audit.to_string().contains("operator pw"),
        "no secrets in the audit log"
    );

    // Logout revokes the token.
    let (s, _) = d.call_as(Some(&ro), "POST", "/auth/logout", None);
    assert_eq!(s, 204);
    let (s, _) = d.call_as(Some(&ro), "GET", "/vms", None);
    assert_eq!(s, 401);
    assert!(!d.log().contains("operator pw") && !d.log().contains(common::ADMIN_PASSWORD));
}

#[test]
fn openapi_document_is_served_and_matches_the_checked_in_copy() {
    let d = Daemon::start();
    let (s, served) = d.call_as(None, "GET", "/openapi.json", None);
    assert_eq!(s, 200);
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
    let pretty = serde_json::to_string_pretty(&served).unwrap() + "\n";
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &pretty).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path)
        .expect("docs/openapi.json is missing; run with UPDATE_OPENAPI=1 to create it");
    let checked: Value = serde_json::from_str(&checked_in).unwrap();
    // Compare without dumping both documents on failure.
    assert!(
        served == checked,
        "the served OpenAPI document differs from docs/openapi.json: review the API change and \
         re-run this test with UPDATE_OPENAPI=1"
    );
}

#[test]
fn a_daemon_waits_for_the_state_database_held_by_an_exiting_one() {
    let mut d = Daemon::start();
    d.kill9();
    // Stands in for a killed daemon whose last threads still hold the lock.
    let held = pairvisor_store::Store::open(&d.data.path().join("state.redb")).unwrap();
    let log = d.data.path().join("daemon.log");
    let release = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("locked by another process; waiting")
        {
            assert!(Instant::now() < deadline, "the daemon never said it waits");
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(held);
    });
    d.restart();
    release.join().unwrap();
    let (s, v) = d.call("GET", "/vms", None);
    assert_eq!(s, 200, "{v}");
}

/// Issue 13 (secrets at rest): a fresh data directory and everything the
/// daemon puts in it (state database with password hashes, TLS keys, disks)
/// is private to the daemon's user; a loosened one is made private again
/// on the next start, with a warning naming what is still open.
#[test]
fn the_data_directory_is_private_and_a_loosened_one_is_reported() {
    use std::os::unix::fs::PermissionsExt;
    let mut d = Daemon::start();
    // A disk too, so that storage files are covered.
    let (s, v) = d.call(
        "POST",
        "/volumes",
        Some(json!({"name": "secret-disk", "size_bytes": 8 << 20})),
    );
    assert!(s < 300, "{v}");
    let root = d.data.path().to_path_buf();
    // Written by this harness, not by the daemon.
    let harness = ["admin-password", "daemon.log"];
    let mut checked = 0;
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let md = e.path().symlink_metadata().unwrap();
            if dir == root && harness.iter().any(|h| e.file_name() == *h) {
                continue;
            }
            if md.file_type().is_symlink() {
                continue;
            }
            let mode = md.permissions().mode() & 0o777;
            assert_eq!(
                mode & 0o077,
                0,
                "{} is mode {mode:o}: open to other users",
                e.path().display()
            );
            checked += 1;
            if md.is_dir() {
                stack.push(e.path());
            }
        }
    }
    assert!(checked >= 5, "only {checked} entries in the data directory");
    assert!(
        std::fs::read_dir(root.join("storage"))
            .map(|r| r.count() > 0)
            .unwrap_or(false),
        "the volume made no file"
    );
    // Loosened by hand: the next start makes the directory private again
    // and says what inside is still open.
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let ca_key = root.join("tls/api-ca-key.pem");
    let loose = if ca_key.exists() {
        ca_key
    } else {
        root.join("state.redb")
    };
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    d.restart();
    let mode = std::fs::metadata(&root).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    let log = d.log();
    assert!(log.contains("was mode 755: made private (0700)"), "{log}");
    assert!(
        log.contains(&format!("{} (644)", loose.display())) && log.contains("chmod -R go-rwx"),
        "{log}"
    );
}

/// A tmpfs mounted for one test (as root), unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, mib: u64) -> Tmpfs {
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .expect("mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs and must run as root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Issue 13: an upload or a copy that would fill the PM's file system is
/// refused with the figures (keeping a reserve for the state database), and
/// leaves nothing behind.
#[test]
fn uploads_and_copies_that_would_fill_the_disk_are_refused() {
    let d = Daemon::start();
    let tmp = d.data.path().join("tmp");
    let _fs = Tmpfs::mount(&tmp, 160);
    // A copy from a path on the PM: refused before a byte is written.
    let src = d.data.path().join("import/big.iso");
    std::fs::File::create(&src)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    refused(
        &d,
        "POST",
        "/vcds",
        Some(json!({"name": "big", "path": src})),
        422,
        "admission_refused",
        "not enough free space for the VCD copy",
    );
    // An upload (size unknown up front): refused once it would eat into the
    // reserve, and its partial file removed.
    let (s, v) = d.call_raw(
        "PUT",
        "/vcds/big",
        vec![7u8; 48 << 20],
        "application/octet-stream",
    );
    assert_eq!(s, 422, "{v}");
    let msg = v["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("not enough free space for the upload") && msg.contains("remove old"),
        "{v}"
    );
    let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().flatten().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    let vcds = d.ok("GET", "/vcds", None);
    assert_eq!(vcds, json!([]), "{vcds}");
}

/// Issue 13 (login flood): failed logins are limited per user and per
/// client address with a clear 429 and Retry-After, refused before any
/// password hashing; an authenticated request still answers at once.
#[test]
fn a_login_flood_is_throttled_and_the_api_still_answers() {
    let d = Daemon::start();
    d.ok(
        "POST",
        "/users",
        Some(json!({"name": "bob", "role": "operator", "password": "bob's long password"})),
    );
    // Per user: 10 failures, then even the right password waits.
    for _ in 0..10 {
        let (s, v) = d.login("bob", "wrong").unwrap_err();
        assert_eq!(s, 401, "{v}");
    }
    let (s, v) = d.login("bob", "bob's long password").unwrap_err();
    assert_eq!(s, 429, "{v}");
    assert_eq!(v["code"], "too_many_requests", "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or_default()
            .contains("too many failed logins for user 'bob': wait"),
        "{v}"
    );
    // Per address: a flood from 8 threads with random user names.
    let sent = std::sync::atomic::AtomicU32::new(0);
    let throttled = std::sync::atomic::AtomicU32::new(0);
    let mut retry_after = None;
    std::thread::scope(|s| {
        for t in 0..8 {
            let (d, sent, throttled) = (&d, &sent, &throttled);
            s.spawn(move || {
                for i in 0..25 {
                    let r = d
                        .http()
                        .post(format!("{}/api/v1/auth/login", d.url))
                        .json(&json!({"user": format!("guess{t}x{i}"), "password": "x"}))
                        .send()
                        .unwrap();
                    sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if r.status() == 429 {
                        throttled.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }
            });
        }
    });
    let r = d
        .http()
        .post(format!("{}/api/v1/auth/login", d.url))
        .json(&json!({"user": "admin", "password": common::ADMIN_PASSWORD}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 429, "the address is over its limit");
    if let Some(h) = r.headers().get("retry-after") {
        retry_after = h.to_str().ok().and_then(|s| s.parse::<u64>().ok());
    }
    let v: serde_json::Value = r.json().unwrap();
    assert!(
        v["message"]
            .as_str()
            .unwrap_or_default()
            .contains("too many failed logins from 127.0.0.1"),
        "{v}"
    );
    assert!(
        retry_after.is_some_and(|s| (1..=60).contains(&s)),
        "{retry_after:?}"
    );
    let (sent, throttled) = (sent.into_inner(), throttled.into_inner());
    // 10 failures of bob's count for the address too: at most 10 more were
    // hashed.
    assert!(throttled >= sent - 10, "{throttled} of {sent} throttled");
    // An authenticated request is not affected.
    let t = Instant::now();
    let (s, _) = d.call("GET", "/vms", None);
    assert_eq!(s, 200);
    eprintln!(
        "login flood: {sent} sent, {throttled} refused with 429; GET /vms then took {:?}",
        t.elapsed()
    );
}

/// Issue 13 (audit amplification): requests without a valid token, to
/// known or unknown routes, are not written to the durable audit log (they
/// are counted and reported in a rate-limited log line); audited fields are
/// cut and have control characters escaped.
#[test]
fn unauthenticated_requests_do_not_fill_the_audit_log() {
    let d = Daemon::start();
    let count = |d: &Daemon| {
        d.ok("GET", "/audit?limit=10000", None)
            .as_array()
            .unwrap()
            .len()
    };
    let before = count(&d);
    let long = "a".repeat(8000);
    let http = d.http();
    for i in 0..100 {
        let path = if i % 2 == 0 {
            format!("{}/api/v1/{long}/{i}", d.url)
        } else {
            format!("{}/api/v1/vms", d.url)
        };
        let r = http.post(path).body("{}").send().unwrap();
        assert!(r.status() == 401 || r.status() == 404, "{}", r.status());
    }
    assert_eq!(count(&d), before, "unauthenticated requests were audited");
    let log = d.log();
    assert!(log.contains("not written to the audit log"), "{log}");
    // A login with a crafted user name: audited, escaped.
    let (s, _) = d
        .login("x\u{1b}[31mred\nforged", "wrong password")
        .unwrap_err();
    assert_eq!(s, 401);
    let audit = d.ok("GET", "/audit?limit=5", None);
    let user = audit[0]["user"].as_str().unwrap().to_string();
    assert!(
        !user.contains('\u{1b}') && !user.contains('\n') && user.contains("\\u{1b}"),
        "{user:?}"
    );
    // An authenticated request is still audited, with its path cut.
    let (s, _) = d.call("POST", &format!("/vms/{}/start", "b".repeat(2000)), None);
    assert!(s >= 400);
    let audit = d.ok("GET", "/audit?limit=1", None);
    let action = audit[0]["action"].as_str().unwrap();
    assert!(action.starts_with("POST /api/v1/vms/bbb"), "{action}");
    assert!(action.chars().count() <= 301, "{}", action.len());
}
