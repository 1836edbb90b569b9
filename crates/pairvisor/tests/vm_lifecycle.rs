//! VM life cycle end to end: the real daemon runs the project's test guest
//! under real QEMU (TCG). Needs `guest/build.sh` to have run.

mod common;

use common::{pid_alive, Daemon};
use serde_json::json;
use std::time::Duration;

const BOOT: Duration = Duration::from_secs(90);

#[test]
fn start_acpi_shutdown_and_power_off() {
    let d = Daemon::start();
    d.ok("POST", "/vms", Some(d.guest_vm("web")));
    let r = d.ok("POST", "/vms/web/start", None);
    assert_eq!(r["vm"]["state"], "booting");
    // V2: vCPUs may be over-provisioned, with a warning. The PM offers its
    // threads minus the 2 reserved ones.
    let pm = d.ok("GET", "/pm", None);
    if pm["vcpu_capacity"].as_u64().unwrap() < 1 {
        assert!(
            r["warnings"][0]
                .as_str()
                .unwrap()
                .contains("over-provisioned"),
            "{r}"
        );
    }
    let vm = d.wait_state("web", "running", BOOT);
    assert_eq!(
        vm["health"]["instance_ok"], true,
        "running means the guest agent answered"
    );
    assert_eq!(vm["health"]["system_ok"], true);
    let pid = vm["pid"].as_i64().unwrap();
    assert!(pid_alive(pid));
    d.wait_console("web", "pv-guest: ready", BOOT);
    // Follow mode streams new output as the guest prints it (heartbeats).
    {
        use std::io::Read;
        let resp = d
            .http()
            .get(format!(
                "{}/api/v1/vms/web/console?tail_bytes=1&follow=true",
                d.url
            ))
            .bearer_auth(&d.token)
            .send()
            .unwrap();
        assert_eq!(resp.status(), 200);
        let mut resp = resp;
        let mut seen = String::new();
        let mut buf = [0u8; 4096];
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !seen.contains("pv-guest: heartbeat") {
            assert!(
                std::time::Instant::now() < deadline,
                "follow showed no heartbeat: {seen:?}"
            );
            let n = resp.read(&mut buf).unwrap();
            assert!(n > 0, "stream ended");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
    // The console log is served, tail-limited.
    let (s, tail) = d.call("GET", "/vms/web/console?tail_bytes=20", None);
    assert_eq!(s, 200);
    assert!(tail.as_str().unwrap().len() <= 20);

    // Running: start is refused with the V4 message.
    let (s, v) = d.call("POST", "/vms/web/start", None);
    assert_eq!(s, 409);
    assert!(v["message"]
        .as_str()
        .unwrap()
        .contains("it is running; allowed while running: console, shutdown"));

    // ACPI shutdown: the guest powers itself off.
    let v = d.ok("POST", "/vms/web/shutdown", None);
    assert_eq!(v["state"], "stopping");
    let vm = d.wait_state("web", "stopped", Duration::from_secs(60));
    assert!(vm["pid"].is_null());
    assert!(!pid_alive(pid), "QEMU exited");
    assert!(
        d.console("web").contains("pv-guest: ready"),
        "log kept after stop"
    );

    // Start again and power off (immediate).
    d.ok("POST", "/vms/web/start", None);
    let vm = d.wait_state("web", "running", BOOT);
    let pid = vm["pid"].as_i64().unwrap();
    let v = d.ok("POST", "/vms/web/poweroff", None);
    assert_eq!(v["state"], "stopped");
    assert!(!pid_alive(pid));
    assert_eq!(d.vm("web")["recent_crashes"], 0, "power off is not a crash");

    // Remove: the boot volume goes with it.
    let (s, _) = d.call("DELETE", "/vms/web", None);
    assert_eq!(s, 204);
    assert_eq!(d.ok("GET", "/volumes", None), json!([]));
}

#[test]
fn crash_restarts_then_critical_then_reset_device() {
    let d = Daemon::start();
    let mut spec = d.guest_vm("db");
    // Tolerate one crash per hour: the second is one too many.
    spec["mtbf_threshold"] = json!({"max_failures": 1, "window_secs": 3600});
    d.ok("POST", "/vms", Some(spec));
    d.ok("POST", "/vms/db/start", None);
    let vm = d.wait_state("db", "running", BOOT);
    let pid1 = vm["pid"].as_i64().unwrap();
    d.wait_console("db", "pv-guest: ready", BOOT);

    // Crash 1: guest kernel panic (pvpanic) → restarted automatically.
    d.type_console("db", "pv panic");
    let deadline = std::time::Instant::now() + BOOT;
    let vm = loop {
        let vm = d.vm("db");
        if vm["recent_crashes"] == 1 && vm["state"] == "running" {
            break vm;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no automatic restart: {vm:#}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(vm["last_crash"], "guest kernel panicked");
    let alerts = d.ok("GET", "/alerts", None);
    assert_eq!(alerts[0]["id"], "vm_crashed:vm/db", "{alerts:#}");
    assert!(alerts[0]["message"]
        .as_str()
        .unwrap()
        .contains("guest kernel panicked"));
    let pid2 = vm["pid"].as_i64().unwrap();
    assert_ne!(pid1, pid2, "a new QEMU process");
    assert!(!pid_alive(pid1));

    // Crash 2: the QEMU process dies → over the threshold → critical.
    // SAFETY: kill(2) on the QEMU pid the daemon reported.
    unsafe {
        libc::kill(pid2 as i32, libc::SIGKILL);
    }
    let vm = d.wait_state("db", "critical", Duration::from_secs(30));
    assert_eq!(vm["last_crash"], "QEMU process exited unexpectedly");
    assert_eq!(vm["allowed_operations"], json!(["reset device"]));
    assert_eq!(vm["activity"], "crashed");
    let alerts = d.ok("GET", "/alerts", None);
    assert_eq!(
        alerts.as_array().unwrap().len(),
        1,
        "critical replaces crashed: {alerts:#}"
    );
    assert_eq!(
        (alerts[0]["id"].as_str(), alerts[0]["severity"].as_str()),
        (Some("vm_critical:vm/db"), Some("critical"))
    );
    assert!(alerts[0]["action"]
        .as_str()
        .unwrap()
        .contains("Reset Device"));
    // Stays down.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(d.vm("db")["state"], "critical");
    let (s, v) = d.call("POST", "/vms/db/start", None);
    assert_eq!(s, 409, "{v}");

    // Reset device: restarted, counter cleared.
    let v = d.ok("POST", "/vms/db/reset-device", None);
    assert_eq!(v["state"], "booting");
    let vm = d.wait_state("db", "running", BOOT);
    assert_eq!(vm["recent_crashes"], 0);
    assert_eq!(
        d.ok("GET", "/alerts", None),
        json!([]),
        "reset device clears the alerts"
    );
    d.ok("POST", "/vms/db/poweroff", None);
}

#[test]
fn dump_writes_a_file_then_restarts() {
    let d = Daemon::start();
    let pid = d.start_guest("hung");
    let v = d.ok("POST", "/vms/hung/dump", None);
    assert_eq!(v["state"], "dumping");
    let (s, _) = d.call("POST", "/vms/hung/shutdown", None);
    assert_eq!(s, 409, "only power off is allowed while dumping");
    let vm = d.wait_state("hung", "running", BOOT);
    let dump = vm["last_dump"].as_str().expect("dump recorded").to_string();
    let size = std::fs::metadata(&dump).unwrap().len();
    assert!(size > 1 << 20, "dump file {dump} has {size} bytes");
    let head = std::fs::read(&dump).unwrap()[..4].to_vec();
    assert_eq!(head, b"\x7fELF", "ELF core");
    assert_ne!(vm["pid"].as_i64().unwrap(), pid, "restarted after the dump");
    assert_eq!(vm["recent_crashes"], 0, "a dump is not a crash");
    d.ok("POST", "/vms/hung/poweroff", None);
}

#[test]
fn vm_survives_daemon_sigkill_and_stays_manageable() {
    let mut d = Daemon::start();
    let pid = d.start_guest("app");
    // Records of every kind, to check that a SIGKILL loses none of them.
    d.ok(
        "POST",
        "/users",
        Some(json!({"name": "op", "role": "operator", "password": "operator pw"})),
    );
    let iso = d.data.path().join("import/x.iso");
    std::fs::write(&iso, b"iso").unwrap();
    d.ok("POST", "/vcds", Some(json!({"name": "x", "path": iso})));
    d.ok(
        "POST",
        "/volumes",
        Some(json!({"name": "spare", "size_bytes": 1 << 20})),
    );
    d.ok(
        "PATCH",
        "/settings",
        Some(json!({"timezone": "Europe/Paris"})),
    );
    let before: Vec<_> = [
        "/users",
        "/vcds",
        "/volumes",
        "/settings",
        "/storage-groups",
    ]
    .iter()
    .map(|p| d.ok("GET", p, None))
    .collect();

    d.kill9();
    assert!(pid_alive(pid), "QEMU must outlive the daemon");
    d.restart();
    let after: Vec<_> = [
        "/users",
        "/vcds",
        "/volumes",
        "/settings",
        "/storage-groups",
    ]
    .iter()
    .map(|p| d.ok("GET", p, None))
    .collect();
    assert_eq!(before, after, "nothing lost across a daemon SIGKILL");
    assert!(
        d.login("op", "operator pw").is_ok(),
        "the old token and users still work"
    );
    let vm = d.vm("app");
    assert_eq!(vm["state"], "running");
    assert_eq!(
        vm["pid"].as_i64().unwrap(),
        pid,
        "re-attached to the same QEMU"
    );
    assert_eq!(vm["recent_crashes"], 0);
    // The re-attached monitor still sees the guest.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while d.vm("app")["health"]["instance_ok"] != true {
        assert!(
            std::time::Instant::now() < deadline,
            "instance check never answered after re-attach"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // And manageable: ACPI shutdown through the new daemon.
    d.ok("POST", "/vms/app/shutdown", None);
    d.wait_state("app", "stopped", Duration::from_secs(60));
    assert!(!pid_alive(pid));

    // A VM whose QEMU died while the daemon was down counts as crashed and is
    // restarted at the next start.
    d.ok("POST", "/vms/app/start", None);
    let vm = d.wait_state("app", "running", BOOT);
    let pid = vm["pid"].as_i64().unwrap();
    d.kill9();
    // SAFETY: kill(2) on the QEMU pid the daemon reported.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
    while pid_alive(pid) {
        std::thread::sleep(Duration::from_millis(50));
    }
    d.restart();
    let vm = d.wait_state("app", "running", BOOT);
    assert_eq!(vm["recent_crashes"], 1);
    assert_eq!(
        vm["last_crash"],
        "QEMU process ended while the daemon was down"
    );
    d.ok("POST", "/vms/app/poweroff", None);
}

#[test]
fn memory_admission_names_holders_and_cd_insert_while_running() {
    let d = Daemon::start();
    let pm = d.ok("GET", "/pm", None);
    let total = pm["memory_mib"].as_u64().unwrap();
    // Leave exactly 400 MiB for VMs: one 256 MiB VM fits, a second does not.
    d.ok(
        "PATCH",
        "/settings",
        Some(json!({"memory_reserve_mib": total - 400})),
    );
    d.ok("POST", "/vms", Some(d.guest_vm("a")));
    d.ok("POST", "/vms", Some(d.guest_vm("b")));
    d.ok("POST", "/vms/a/start", None);
    let (s, v) = d.call("POST", "/vms/b/start", None);
    assert_eq!(s, 422, "{v}");
    assert_eq!(
        v["message"],
        "not enough memory: the VM needs 256 MiB, 144 MiB is free, 112 MiB is missing; memory is \
         held by a (256 MiB) — stop one of them or lower this VM's memory"
    );
    assert_eq!(v["details"]["missing_mib"], 112);
    assert_eq!(d.vm("b")["state"], "stopped", "nothing changed");

    // Insert and eject a CD while the VM runs.
    d.wait_state("a", "running", BOOT);
    let iso = d.data.path().join("import/tools.iso");
    std::fs::write(&iso, vec![0u8; 2048 * 16]).unwrap();
    d.ok("POST", "/vcds", Some(json!({"name": "tools", "path": iso})));
    let v = d.ok("PUT", "/vms/a/cd", Some(json!({"vcd": "tools"})));
    assert_eq!(v["cdrom"], "tools");
    let (s, _) = d.call("DELETE", "/vcds/tools", None);
    assert_eq!(s, 409, "inserted VCD cannot be removed");
    let v = d.ok("DELETE", "/vms/a/cd", None);
    assert!(v["cdrom"].is_null());
    d.ok("POST", "/vms/a/poweroff", None);
    // Now b fits.
    d.ok("POST", "/vms/b/start", None);
    d.wait_state("b", "running", BOOT);
    d.ok("POST", "/vms/b/poweroff", None);
}

#[test]
fn boot_once_from_a_vcd() {
    let d = Daemon::start();
    let iso = common::guest_dir().join("guest.iso");
    assert!(
        iso.is_file(),
        "{} missing: run guest/build-iso.sh",
        iso.display()
    );
    d.ok(
        "POST",
        "/vcds",
        Some(json!({"name": "installer", "path": iso})),
    );
    // No kernel, an empty boot volume: only the CD can boot it.
    d.ok(
        "POST",
        "/vms",
        Some(json!({"name": "inst", "vcpus": 1, "memory_mib": 256, "boot_volume": {"size_bytes": 64 << 20}})),
    );
    let r = d.ok(
        "POST",
        "/vms/inst/boot-from-cd",
        Some(json!({"vcd": "installer"})),
    );
    assert_eq!(r["vm"]["cdrom"], "installer");
    let vm = d.wait_state("inst", "running", BOOT);
    d.wait_console("inst", "pv-guest: ready", BOOT);
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", vm["pid"])).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.contains("once=d"), "{cmdline}");
    d.ok("POST", "/vms/inst/poweroff", None);

    // A normal start boots from the (empty) boot volume: once means once.
    d.ok("POST", "/vms/inst/start", None);
    let vm = d.vm("inst");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", vm["pid"])).unwrap();
    assert!(!String::from_utf8_lossy(&cmdline).contains("once=d"));
    d.ok("POST", "/vms/inst/poweroff", None);
}

/// SPEC V8: the unit sees which virtio devices the guest drives, and warns
/// about VMs running without paravirtual drivers.
#[test]
fn paravirtual_drivers_are_detected() {
    let d = Daemon::start();
    d.ok("PATCH", "/settings", Some(json!({"boot_grace_secs": 1})));
    let mut spec = d.guest_vm("pv");
    spec["nics"] = json!([{"network": "user"}]);
    d.ok("POST", "/vms", Some(spec));
    // A VM whose "guest" never loads a driver: an empty disk, nothing boots.
    d.ok(
        "POST",
        "/vms",
        Some(
            json!({"name": "bare", "vcpus": 1, "memory_mib": 256, "instance_check": "none",
                    "boot_volume": {"size_bytes": 1 << 20}}),
        ),
    );
    d.ok("POST", "/vms/pv/start", None);
    d.ok("POST", "/vms/bare/start", None);
    let deadline = std::time::Instant::now() + BOOT;
    let (pv, bare) = loop {
        let pv = d.vm("pv");
        let bare = d.vm("bare");
        let ready =
            |v: &serde_json::Value| !v["health"]["paravirtual"].as_array().unwrap().is_empty();
        if ready(&pv) && ready(&bare) {
            break (pv, bare);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no driver report: {pv:#} {bare:#}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    let kinds = |v: &serde_json::Value, ok: bool| -> Vec<String> {
        v["health"]["paravirtual"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["driver_ok"] == ok)
            .map(|d| d["kind"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(
        kinds(&pv, false).is_empty(),
        "the test guest drives every virtio device: {pv:#}"
    );
    for k in ["virtio-blk", "virtio-net", "virtio-serial"] {
        assert!(kinds(&pv, true).iter().any(|x| x == k), "{k} in {pv:#}");
    }
    // Nothing but firmware runs there: SeaBIOS drives the virtio disk while
    // probing boot devices, but no driver ever takes the virtio-serial port.
    assert!(
        kinds(&bare, false).contains(&"virtio-serial".to_string()),
        "{bare:#}"
    );
    let warnings = d.ok("GET", "/pm", None)["warnings"].to_string();
    assert!(
        warnings.contains("VM 'bare' runs without paravirtual drivers"),
        "{warnings}"
    );
    assert!(!warnings.contains("VM 'pv'"), "{warnings}");
    d.ok("POST", "/vms/pv/poweroff", None);
    d.ok("POST", "/vms/bare/poweroff", None);
}

/// V7: a hung VM (its QEMU stopped with SIGSTOP: neither QMP nor the guest
/// answers) raises an alert, and with the restart policy on it is restarted
/// as a crash.
#[test]
fn unresponsive_guest_raises_an_alert_and_the_policy_restarts_it() {
    let d = Daemon::start();
    d.ok(
        "PATCH",
        "/settings",
        Some(json!({"unresponsive_restart_secs": 10})),
    );
    let pid = d.start_guest("hang");
    // SAFETY: kill(2) with SIGSTOP on the QEMU pid the daemon reported.
    unsafe {
        libc::kill(pid as i32, libc::SIGSTOP);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let alerts = d.ok("GET", "/alerts", None);
        if alerts.to_string().contains("guest_unresponsive:vm/hang") {
            let vm = d.vm("hang");
            assert_eq!(
                vm["state"], "running",
                "the process still exists: running, not answering"
            );
            assert_eq!(vm["health"]["instance_ok"], false);
            assert_eq!(
                vm["health"]["system_ok"], false,
                "QMP does not answer either"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no alert: {alerts:#}");
        std::thread::sleep(Duration::from_millis(300));
    }
    // The policy kills and restarts it.
    let deadline = std::time::Instant::now() + BOOT;
    let vm = loop {
        let vm = d.vm("hang");
        if vm["recent_crashes"] == 1 && vm["state"] == "running" {
            break vm;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not restarted: {vm:#}\nLOG {} BYTES:\n{}",
            d.log().len(),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(
        vm["last_crash"]
            .as_str()
            .unwrap()
            .starts_with("guest stopped answering"),
        "{vm:#}\n{}",
        d.log()
    );
    assert_ne!(vm["pid"].as_i64().unwrap(), pid);
    let alerts = d.ok("GET", "/alerts", None).to_string();
    assert!(
        !alerts.contains("guest_unresponsive") && alerts.contains("vm_crashed:vm/hang"),
        "{alerts}"
    );
    // Acknowledge it (operator action).
    let (s, _) = d.call("DELETE", "/alerts/vm_crashed:vm%2Fhang", None);
    assert_eq!(s, 204);
    assert_eq!(d.ok("GET", "/alerts", None), json!([]));
    d.ok("POST", "/vms/hang/poweroff", None);
}

/// V5: an ACPI shutdown the guest ignores ends in a power off after the
/// shutdown timeout (not a crash).
#[test]
fn shutdown_ignored_by_the_guest_powers_off_after_the_timeout() {
    let d = Daemon::start();
    d.ok(
        "PATCH",
        "/settings",
        Some(json!({"shutdown_timeout_secs": 3})),
    );
    let pid = d.start_guest("stubborn");
    d.wait_console("stubborn", "pv-guest: ready", BOOT);
    d.type_console("stubborn", "pv ignore-acpi");
    d.wait_console(
        "stubborn",
        "pv-guest: ignoring acpi",
        Duration::from_secs(30),
    );
    let v = d.ok("POST", "/vms/stubborn/shutdown", None);
    assert_eq!(v["state"], "stopping");
    let vm = d.wait_state("stubborn", "stopped", Duration::from_secs(60));
    assert!(!pid_alive(pid));
    assert_eq!(
        vm["recent_crashes"], 0,
        "a timed-out shutdown is not a crash"
    );
    assert!(d.log().contains("did not shut down in time"), "{}", d.log());
    assert!(
        !d.console("stubborn").contains("powering off"),
        "the guest really ignored it"
    );
}

/// Issue 13: a guest printing to its console as fast as it can does not
/// fill the PM's disk (the log is capped and rotated, one older generation
/// kept), and the console's tail still answers, read by seeking.
#[test]
fn a_guest_flooding_its_console_is_capped_and_the_tail_still_answers() {
    let d = Daemon::start();
    d.ok(
        "PATCH",
        "/settings",
        Some(json!({"console_log_max_mib": 1})),
    );
    // Out of range: refused with the allowed range.
    let (s, v) = d.call(
        "PATCH",
        "/settings",
        Some(json!({"console_log_max_mib": 0})),
    );
    assert_eq!(s, 400, "{v}");
    assert!(v.to_string().contains("console_log_max_mib"), "{v}");
    d.start_guest("noisy");
    d.wait_console("noisy", "pv-guest: ready", BOOT);
    d.type_console("noisy", "pv flood 4");
    let id = d.vm("noisy")["id"].as_str().unwrap().to_string();
    let run = d.data.path().join("run").join(&id);
    let log = run.join("console.log");
    let prev = run.join("console.log.1");
    let cap = 1u64 << 20;
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    let mut rotated = false;
    let mut largest = 0u64;
    loop {
        let len = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let plen = std::fs::metadata(&prev).map(|m| m.len()).unwrap_or(0);
        largest = largest.max(len);
        rotated |= plen > 0;
        assert!(plen <= cap, "the older generation holds {plen} bytes");
        // Checked every second: the log may overshoot by one second of
        // output (a few hundred KiB under TCG), never grow without bound.
        assert!(len < 2 * cap, "console.log grew to {len} bytes");
        if d.console("noisy").contains("pv-guest: flood done") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the flood did not finish"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(rotated, "4 MiB of output never rotated a 1 MiB log");
    // The tail is served across the rotation, capped at what was asked.
    let (s, tail) = d.call("GET", "/vms/noisy/console?tail_bytes=65536", None);
    assert_eq!(s, 200);
    let tail = tail.as_str().unwrap_or_default().to_string();
    assert!(
        tail.len() <= 65536 && tail.contains("pv-guest: flood"),
        "{}",
        tail.len()
    );
    // The guest still answers.
    d.type_console("noisy", "pv ping");
    d.wait_console("noisy", "pv-guest: pong", Duration::from_secs(60));
    eprintln!("console.log peaked at {largest} bytes with a 1 MiB cap");
}
