//! Real QEMU (TCG) without a guest OS: process life cycle, QMP plumbing,
//! events, re-attaching, CD media, command-line acceptance.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::{bounded, empty_spec, qemu_binary, temp_dir, wait_event, QemuGuard};
use pairvisor_hypervisor::{
    qemu_version, Disk, DiskSource, Nic, NicBackend, QemuVm, QmpClient, QmpError, QmpEvent,
    RunState, VmError,
};
use serde_json::json;

const SEC: Duration = Duration::from_secs(1);

#[tokio::test]
async fn qemu_is_the_version_we_write_against() {
    let v = qemu_version(&qemu_binary()).await.unwrap();
    assert!(
        v.major > 7 || (v.major == 7 && v.minor >= 2),
        "QEMU {v} is older than 7.2"
    );
}

#[tokio::test]
async fn launch_status_stop_cont_quit() {
    bounded(60, "life cycle", async {
        let dir = temp_dir();
        let run = dir.path().join("vm");
        let _guard = QemuGuard::new(&run);
        let mut spec = empty_spec("lifecycle");
        spec.start_paused = true;
        let vm = QemuVm::launch(&qemu_binary(), &spec, &run).await.unwrap();
        assert!(vm.pid() > 0);
        let mode = std::fs::metadata(&run).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert!(vm.qmp().greeting().major >= 7);

        assert_eq!(vm.status().await.unwrap(), RunState::Prelaunch);
        let mut events = vm.subscribe();
        vm.cont().await.unwrap();
        assert_eq!(vm.status().await.unwrap(), RunState::Running);
        wait_event(&mut events, 5 * SEC, "RESUME", |e| {
            (*e == QmpEvent::Resume).then_some(())
        })
        .await;

        vm.stop().await.unwrap();
        assert_eq!(vm.status().await.unwrap(), RunState::Paused);
        wait_event(&mut events, 5 * SEC, "STOP", |e| {
            (*e == QmpEvent::Stop).then_some(())
        })
        .await;
        vm.cont().await.unwrap();
        assert_eq!(vm.status().await.unwrap(), RunState::Running);

        vm.system_reset().await.unwrap();
        wait_event(&mut events, 5 * SEC, "RESET", |e| {
            matches!(e, QmpEvent::Reset { guest: false }).then_some(())
        })
        .await;

        vm.quit().await.unwrap();
        let reason = wait_event(&mut events, 5 * SEC, "SHUTDOWN", |e| match e {
            QmpEvent::Shutdown {
                guest: false,
                reason,
            } => Some(reason.clone()),
            _ => None,
        })
        .await;
        assert_eq!(reason, "host-qmp-quit");
        wait_event(&mut events, 5 * SEC, "Disconnected", |e| {
            (*e == QmpEvent::Disconnected).then_some(())
        })
        .await;
        vm.wait_exit(10 * SEC).await.unwrap();
        assert!(vm.has_exited());
        // Commands after exit say so.
        assert!(matches!(
            vm.status().await,
            Err(VmError::Qmp(QmpError::ConnectionClosed))
        ));
    })
    .await;
}

#[tokio::test]
async fn qmp_errors_and_concurrent_commands() {
    bounded(60, "QMP errors", async {
        let dir = temp_dir();
        let run = dir.path().join("vm");
        let _guard = QemuGuard::new(&run);
        let mut spec = empty_spec("errors");
        spec.start_paused = true;
        let vm = QemuVm::launch(&qemu_binary(), &spec, &run).await.unwrap();

        match vm.qmp().execute("no-such-command", None).await {
            Err(QmpError::Command {
                command,
                class,
                desc,
            }) => {
                assert_eq!(command, "no-such-command");
                assert_eq!(class, "CommandNotFound");
                assert!(desc.contains("no-such-command"), "{desc}");
            }
            other => panic!("expected a command error, got {other:?}"),
        }
        let err = vm
            .qmp()
            .execute(
                "blockdev-remove-medium",
                Some(json!({"id": "no-such-device"})),
            )
            .await
            .unwrap_err();
        assert!(err.class().is_some(), "{err:?}");
        assert!(err.to_string().contains("blockdev-remove-medium"), "{err}");
        // The connection is still fine after errors.
        assert_eq!(vm.status().await.unwrap(), RunState::Prelaunch);

        // Many commands in flight from many tasks, replies matched by id.
        let mut tasks = Vec::new();
        for i in 0..32 {
            let qmp = vm.qmp().clone();
            tasks.push(tokio::spawn(async move {
                if i % 2 == 0 {
                    qmp.execute("query-name", None)
                        .await
                        .map(|v| v["name"].clone())
                } else {
                    qmp.execute("query-uuid", None)
                        .await
                        .map(|v| v["UUID"].clone())
                }
            }));
        }
        for (i, task) in tasks.into_iter().enumerate() {
            let value = task.await.unwrap().unwrap();
            let want = if i % 2 == 0 {
                json!("errors")
            } else {
                json!("6f1a2b3c-4d5e-4f60-8a7b-9c0d1e2f3a4b")
            };
            assert_eq!(value, want);
        }

        // QEMU serves one QMP client at a time: a second one gets no greeting.
        let second = QmpClient::connect(&run.join("qmp.sock"), Duration::from_millis(500)).await;
        assert!(
            matches!(second, Err(QmpError::GreetingTimeout(_))),
            "{second:?}"
        );

        vm.quit().await.unwrap();
        vm.wait_exit(10 * SEC).await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn kill_disconnects_and_wait_exit_returns() {
    bounded(60, "kill", async {
        let dir = temp_dir();
        let run = dir.path().join("vm");
        let _guard = QemuGuard::new(&run);
        let vm = QemuVm::launch(&qemu_binary(), &empty_spec("killed"), &run)
            .await
            .unwrap();
        assert_eq!(vm.status().await.unwrap(), RunState::Running);
        let mut events = vm.subscribe();
        vm.kill().unwrap();
        wait_event(&mut events, 10 * SEC, "Disconnected", |e| {
            (*e == QmpEvent::Disconnected).then_some(())
        })
        .await;
        vm.wait_exit(10 * SEC).await.unwrap();
        assert!(vm.has_exited());
        // Killing again is harmless.
        vm.kill().unwrap();
        // And the run directory can be launched again.
        let again = QemuVm::launch(&qemu_binary(), &empty_spec("killed"), &run)
            .await
            .unwrap();
        assert_ne!(again.pid(), vm.pid());
        assert!(run.join("qemu.log.1").exists());
        again.quit().await.unwrap();
        again.wait_exit(10 * SEC).await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn attach_after_daemon_restart() {
    bounded(60, "attach", async {
        let dir = temp_dir();
        let run = dir.path().join("vm");
        let _guard = QemuGuard::new(&run);
        let mut spec = empty_spec("attach");
        spec.start_paused = true;
        let vm = QemuVm::launch(&qemu_binary(), &spec, &run).await.unwrap();
        let pid = vm.pid();

        // A second launch into the same run directory is refused.
        match QemuVm::launch(&qemu_binary(), &spec, &run).await {
            Err(VmError::AlreadyRunning { pid: p, .. }) => assert_eq!(p, pid),
            other => panic!("expected AlreadyRunning, got {other:?}"),
        }

        // The daemon "restarts": the handle goes away, QEMU stays.
        drop(vm);
        let vm = QemuVm::attach(&run).await.unwrap();
        assert_eq!(vm.pid(), pid);
        assert_eq!(vm.status().await.unwrap(), RunState::Prelaunch);
        vm.cont().await.unwrap();
        assert_eq!(vm.status().await.unwrap(), RunState::Running);
        drop(vm);
        // The same run directory spelled differently is still recognised.
        let vm = QemuVm::attach(&dir.path().join("./vm/")).await.unwrap();
        assert_eq!(vm.pid(), pid);
        assert_eq!(vm.status().await.unwrap(), RunState::Running);
        vm.quit().await.unwrap();
        vm.wait_exit(10 * SEC).await.unwrap();

        // Gone: a clear error (QEMU removes its pid file on a clean exit).
        match QemuVm::attach(&run).await {
            Err(e @ VmError::NotRunning { .. }) => assert!(e.to_string().contains("exited"), "{e}"),
            other => panic!("expected NotRunning, got {other:?}"),
        }
        // A killed QEMU leaves its pid file behind.
        let vm = QemuVm::launch(&qemu_binary(), &spec, &run).await.unwrap();
        vm.kill().unwrap();
        vm.wait_exit(10 * SEC).await.unwrap();
        assert!(run.join("qemu.pid").exists());
        match QemuVm::attach(&run).await {
            Err(e @ VmError::NotRunning { .. }) => {
                assert!(e.to_string().contains("has exited"), "{e}")
            }
            other => panic!("expected NotRunning, got {other:?}"),
        }
        let empty = dir.path().join("never-ran");
        std::fs::create_dir(&empty).unwrap();
        match QemuVm::attach(&empty).await {
            Err(e @ VmError::NotRunning { .. }) => {
                assert!(e.to_string().contains("qemu.pid does not exist"), "{e}")
            }
            other => panic!("expected NotRunning, got {other:?}"),
        }
    })
    .await;
}

#[tokio::test]
async fn cdrom_insert_and_eject() {
    bounded(60, "cdrom", async {
        let dir = temp_dir();
        let run = dir.path().join("vm");
        let _guard = QemuGuard::new(&run);
        // Any small file works as raw CD media; a name with a comma checks escaping.
        let first = dir.path().join("first,disc.iso");
        let second = dir.path().join("second.iso");
        std::fs::write(&first, vec![0u8; 64 * 1024]).unwrap();
        std::fs::write(&second, vec![1u8; 64 * 1024]).unwrap();
        let mut spec = empty_spec("cdrom");
        spec.start_paused = true;
        spec.cdrom = Some(first.clone());
        let vm = QemuVm::launch(&qemu_binary(), &spec, &run).await.unwrap();
        assert_eq!(vm.cdrom_medium().await.unwrap(), Some(first.clone()));

        vm.eject_cdrom().await.unwrap();
        assert_eq!(vm.cdrom_medium().await.unwrap(), None);
        vm.insert_cdrom(&second).await.unwrap();
        assert_eq!(vm.cdrom_medium().await.unwrap(), Some(second.clone()));
        // Changing media while one is inserted replaces it.
        vm.insert_cdrom(&first).await.unwrap();
        assert_eq!(vm.cdrom_medium().await.unwrap(), Some(first.clone()));
        // And a running guest does not prevent it.
        vm.cont().await.unwrap();
        vm.eject_cdrom().await.unwrap();
        assert_eq!(vm.cdrom_medium().await.unwrap(), None);

        let missing = vm
            .insert_cdrom(&dir.path().join("missing.iso"))
            .await
            .unwrap_err();
        assert!(
            matches!(missing, VmError::Qmp(QmpError::Command { .. })),
            "{missing:?}"
        );
        assert!(matches!(
            vm.insert_cdrom(std::path::Path::new("relative.iso")).await,
            Err(VmError::InvalidPath { .. })
        ));
        vm.quit().await.unwrap();
        vm.wait_exit(10 * SEC).await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn launch_failure_reports_the_log_tail() {
    bounded(60, "launch failure", async {
        let dir = temp_dir();
        let run = dir.path().join("vm");
        let _guard = QemuGuard::new(&run);
        let mut spec = empty_spec("fails");
        spec.cdrom = Some(dir.path().join("does-not-exist.iso"));
        match QemuVm::launch(&qemu_binary(), &spec, &run).await {
            Err(e @ VmError::LaunchFailed { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("does-not-exist.iso"), "{msg}");
                assert!(msg.contains("No such file"), "{msg}");
            }
            other => panic!("expected LaunchFailed, got {other:?}"),
        }
        let missing = QemuVm::launch(std::path::Path::new("/nonexistent/qemu"), &spec, &run).await;
        assert!(matches!(missing, Err(VmError::Spawn { .. })), "{missing:?}");
    })
    .await;
}

/// Every optional device at once, a raw file with a comma in its path and
/// an NBD disk served by qemu-nbd: QEMU must accept the command line.
#[tokio::test]
async fn full_command_line_is_accepted() {
    bounded(60, "full command line", async {
        let dir = temp_dir();
        let run = dir.path().join("vm");
        let _guard = QemuGuard::new(&run);
        let raw = dir.path().join("root,disk.img");
        std::fs::File::create(&raw)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let nbd_image = dir.path().join("nbd.img");
        std::fs::File::create(&nbd_image)
            .unwrap()
            .set_len(4 << 20)
            .unwrap();
        let nbd_socket = dir.path().join("nbd.sock");
        let _nbd = tokio::process::Command::new("qemu-nbd")
            .args([
                "--format=raw",
                "--persistent",
                "--export-name=vol,1",
                "--socket",
            ])
            .arg(&nbd_socket)
            .arg(&nbd_image)
            .kill_on_drop(true)
            .spawn()
            .expect("qemu-nbd (qemu-utils) must be installed");
        let deadline = tokio::time::Instant::now() + 10 * SEC;
        while !nbd_socket.exists() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "qemu-nbd did not create its socket"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        let mut spec = empty_spec("full,name");
        spec.start_paused = true;
        spec.pvpanic = true;
        spec.guest_agent = true;
        spec.vnc = true;
        spec.boot_once_cdrom = true;
        spec.disks = vec![
            Disk {
                id: "root".into(),
                source: DiskSource::RawFile { path: raw.clone() },
                read_only: false,
            },
            Disk {
                id: "data".into(),
                source: DiskSource::NbdUnix {
                    socket: nbd_socket.clone(),
                    export: "vol,1".into(),
                },
                read_only: true,
            },
        ];
        spec.nics = vec![
            Nic {
                mac: "52:54:00:12:34:56".into(),
                backend: NicBackend::User,
            },
            Nic {
                mac: "52:54:00:12:34:57".into(),
                backend: NicBackend::None,
            },
        ];
        let vm = QemuVm::launch(&qemu_binary(), &spec, &run).await.unwrap();
        assert_eq!(
            vm.qmp().execute("query-name", None).await.unwrap()["name"],
            "full,name"
        );
        for socket in ["qmp.sock", "console.sock", "qga.sock", "vnc.sock"] {
            assert!(run.join(socket).exists(), "{socket} missing");
        }
        // QEMU's warnings land in qemu.log.
        let log = std::fs::read_to_string(run.join("qemu.log")).unwrap();
        assert!(log.contains("nic1 has no peer"), "qemu.log: {log}");
        let blocks = vm.qmp().query_block().await.unwrap();
        let file_of = |qdev: &str| {
            blocks
                .iter()
                .find(|b| b["qdev"].as_str().is_some_and(|q| q.contains(qdev)))
                .map(|b| b["inserted"].clone())
                .unwrap_or_else(|| panic!("no block device for {qdev}: {blocks:?}"))
        };
        let root = file_of("virtio-disk-root");
        assert_eq!(root["node-name"], "disk-root");
        assert!(
            root["file"].as_str().unwrap().contains("root,disk.img"),
            "{root}"
        );
        assert_eq!(root["cache"]["direct"], true);
        let data = file_of("virtio-disk-data");
        assert_eq!(data["ro"], true);
        assert_eq!(data["drv"], "nbd");

        // No guest: the virtio devices exist but no driver set them up.
        let virtio = vm.query_virtio_drivers().await.unwrap();
        let mut ids: Vec<_> = virtio.iter().filter_map(|d| d.device_id.clone()).collect();
        ids.sort();
        assert_eq!(
            ids,
            [
                "nic0",
                "nic1",
                "virtio-disk-data",
                "virtio-disk-root",
                "virtio-serial0"
            ]
        );
        assert!(virtio.iter().all(|d| !d.driver_ok), "{virtio:?}");

        // No guest agent answers.
        match vm.guest_ping(Duration::from_millis(300)).await {
            Err(VmError::GuestAgent(pairvisor_hypervisor::QgaError::Timeout(_))) => {}
            other => panic!("expected a guest agent timeout, got {other:?}"),
        }

        vm.quit().await.unwrap();
        vm.wait_exit(10 * SEC).await.unwrap();
    })
    .await;
}
