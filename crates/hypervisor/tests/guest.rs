//! Real QEMU (TCG) booting the project's test guest (guest/build.sh):
//! console, guest agent, virtio drivers, dumps, panics, ACPI power-off and
//! re-attaching to a running guest.
//!
//! These tests FAIL when the guest is missing: run guest/build.sh.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{bounded, guest_spec, qemu_binary, temp_dir, wait_event, wait_for_text, QemuGuard};
use pairvisor_hypervisor::{DumpStatus, QemuVm, QmpEvent, RunState, VmError};
use tokio::io::AsyncWriteExt;

const SEC: Duration = Duration::from_secs(1);
/// Boot under TCG on a busy machine can be slow.
const BOOT: Duration = Duration::from_secs(180);

/// Pings the guest agent until it answers (it starts shortly before `ready`).
async fn ping_until_ok(vm: &QemuVm, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match vm.guest_ping(5 * SEC).await {
            Ok(()) => return,
            Err(e) if tokio::time::Instant::now() < deadline => {
                eprintln!("guest agent not answering yet: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("guest agent did not answer within {timeout:?}: {e}"),
        }
    }
}

/// Types `line` on the serial console. The connection stays open, drained
/// by a task, until the returned handle is aborted: a console client that
/// does not read stalls the guest's serial output (see guest/README.md).
async fn type_on_console(vm: &QemuVm, line: &str) -> tokio::task::JoinHandle<()> {
    let mut console = tokio::net::UnixStream::connect(vm.run_dir().join("console.sock"))
        .await
        .expect("connect to console.sock");
    console
        .write_all(format!("{line}\n").as_bytes())
        .await
        .unwrap();
    tokio::spawn(async move {
        let mut sink = tokio::io::sink();
        let _ = tokio::io::copy(&mut console, &mut sink).await;
    })
}

async fn dump_and_check(vm: &QemuVm, path: &Path) {
    let mut updates = Vec::new();
    let last = vm
        .dump_guest_memory(path, 120 * SEC, |p| updates.push(p))
        .await
        .unwrap();
    assert_eq!(last.status, DumpStatus::Completed);
    assert!(last.total > 0 && last.completed == last.total, "{last:?}");
    assert!(!updates.is_empty(), "no progress reported");
    let head = std::fs::read(path).unwrap();
    assert!(
        head.len() as u64 > 1 << 20,
        "dump is only {} bytes",
        head.len()
    );
    assert_eq!(&head[..4], b"\x7fELF", "dump is not an ELF file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_ping_virtio_dump_and_panic() {
    bounded(480, "guest boot/ping/dump/panic", async {
        let dir = temp_dir();
        let run = dir.path().join("vm");
        let _guard = QemuGuard::new(&run);
        let spec = guest_spec("guest-panic", dir.path());
        let vm = QemuVm::launch(&qemu_binary(), &spec, &run).await.unwrap();
        let mut events = vm.subscribe();

        wait_for_text(&run.join("console.log"), "pv-guest: ready", BOOT).await;
        assert_eq!(vm.status().await.unwrap(), RunState::Running);
        ping_until_ok(&vm, 60 * SEC).await;
        // Again: a fresh connection each time, stale lines are skipped.
        vm.guest_ping(10 * SEC).await.unwrap();

        let virtio = vm.query_virtio_drivers().await.unwrap();
        for id in ["virtio-disk-root", "virtio-serial0"] {
            let dev = virtio
                .iter()
                .find(|d| d.device_id.as_deref() == Some(id))
                .unwrap_or_else(|| panic!("{id} not listed: {virtio:?}"));
            assert!(dev.driver_ok, "guest driver not ready for {id}: {dev:?}");
        }

        // Dump of the running guest; it runs on afterwards.
        dump_and_check(&vm, &dir.path().join("running.core")).await;
        assert_eq!(vm.status().await.unwrap(), RunState::Running);

        let console = type_on_console(&vm, "pv panic").await;
        let action = wait_event(&mut events, 60 * SEC, "GUEST_PANICKED", |e| match e {
            QmpEvent::GuestPanicked { action } => Some(action.clone()),
            _ => None,
        })
        .await;
        assert_eq!(action, "pause");
        console.abort();
        wait_for_text(&run.join("console.log"), "pv-guest: panicking", 10 * SEC).await;
        assert_eq!(vm.status().await.unwrap(), RunState::GuestPanicked);

        // The panicked guest stays for a dump.
        dump_and_check(&vm, &dir.path().join("panicked.core")).await;
        assert_eq!(vm.status().await.unwrap(), RunState::GuestPanicked);

        vm.kill().unwrap();
        vm.wait_exit(10 * SEC).await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_to_running_guest_then_acpi_powerdown() {
    bounded(480, "guest attach/powerdown", async {
        let dir = temp_dir();
        let run = dir.path().join("vm");
        let _guard = QemuGuard::new(&run);
        let spec = guest_spec("guest-poweroff", dir.path());
        let vm = QemuVm::launch(&qemu_binary(), &spec, &run).await.unwrap();
        let pid = vm.pid();
        wait_for_text(&run.join("console.log"), "pv-guest: ready", BOOT).await;

        // The daemon restarts while the guest runs.
        drop(vm);
        let vm = QemuVm::attach(&run).await.unwrap();
        assert_eq!(vm.pid(), pid);
        assert_eq!(vm.status().await.unwrap(), RunState::Running);
        ping_until_ok(&vm, 60 * SEC).await;

        let mut events = vm.subscribe();
        vm.system_powerdown().await.unwrap();
        let reason = wait_event(&mut events, 60 * SEC, "SHUTDOWN", |e| match e {
            QmpEvent::Shutdown {
                guest: true,
                reason,
            } => Some(reason.clone()),
            _ => None,
        })
        .await;
        assert_eq!(reason, "guest-shutdown");
        wait_for_text(
            &run.join("console.log"),
            "pv-guest: acpi power button",
            10 * SEC,
        )
        .await;
        wait_event(&mut events, 30 * SEC, "Disconnected", |e| {
            (*e == QmpEvent::Disconnected).then_some(())
        })
        .await;
        vm.wait_exit(30 * SEC).await.unwrap();
        assert!(matches!(
            QemuVm::attach(&run).await,
            Err(VmError::NotRunning { .. })
        ));
    })
    .await;
}
