//! A QEMU guest (the project's test guest, TCG) runs with its disk on a
//! mirrored volume exported over NBD, and keeps writing verifiable blocks
//! while the secondary is SIGKILLed and restarted: every acknowledged block
//! is on both replicas after the resync, and verify is clean.
//!
//! Skips when QEMU or the guest (built by `guest/build.sh` into
//! `target/guest`, or `PV_GUEST_DIR`) is missing.

mod common;
use common::*;
use serde_json::json;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn guest_dir() -> PathBuf {
    std::env::var_os("PV_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/guest"))
}

fn pv_block(seed: &str, block: u64, gen: u64) -> Vec<u8> {
    let hdr = format!("PVBLK seed={seed} block={block} gen={gen}\n");
    hdr.as_bytes().iter().copied().cycle().take(4096).collect()
}

struct Qemu(std::process::Child);
impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn guest_writes_through_secondary_restart() {
    let gd = guest_dir();
    if !have("qemu-system-x86_64")
        || !gd.join("vmlinuz").exists()
        || !gd.join("initrd.img").exists()
    {
        eprintln!(
            "skipped: qemu-system-x86_64 or the test guest ({}) is missing",
            gd.display()
        );
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let mut a = Node::new(d.path(), "a", 64 * MIB);
    let b = Node::new(d.path(), "b", 64 * MIB);
    a.partner = Some(b.repl_addr());
    let mut pb = b.start("secondary", 0);
    let pa = a.start("primary", 1);
    pa.wait_link("in_sync", Duration::from_secs(30));

    let console = d.path().join("console.sock");
    let drive = format!(
        "file=nbd+unix:///vol?socket={},format=raw,if=none,id=d0",
        a.nbd_unix.display()
    );
    let _qemu = Qemu(
        Command::new("qemu-system-x86_64")
            .args([
                "-accel",
                "tcg",
                "-m",
                "256",
                "-smp",
                "1",
                "-nodefaults",
                "-no-user-config",
            ])
            .args(["-display", "none"])
            .arg("-kernel")
            .arg(gd.join("vmlinuz"))
            .arg("-initrd")
            .arg(gd.join("initrd.img"))
            .args(["-append", "console=ttyS0 panic=0 quiet pv.hb=0"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=console,path={},server=on,wait=off,logfile={}",
                console.display(),
                d.path().join("console.log").display()
            ))
            .args(["-serial", "chardev:console"])
            .args(["-drive", &drive, "-device", "virtio-blk-pci,drive=d0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.path().join("qemu.err")).unwrap())
            .spawn()
            .expect("spawn qemu"),
    );
    let sock = wait_until("console socket", Duration::from_secs(30), || {
        UnixStream::connect(&console).ok()
    });
    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    let acks: Arc<Mutex<HashMap<u64, u64>>> = Arc::default();
    {
        let (lines, acks) = (lines.clone(), acks.clone());
        let rd = sock.try_clone().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(rd).lines() {
                let Ok(line) = line else { return };
                let line = line.trim_end_matches('\r').to_string();
                let w: Vec<&str> = line.split_whitespace().collect();
                if w.len() == 5 && w[0] == "pv-guest:" && w[1] == "acked" && w[2] == "77" {
                    if let (Ok(bk), Ok(g)) = (w[3].parse::<u64>(), w[4].parse::<u64>()) {
                        let mut a = acks.lock().unwrap();
                        let e = a.entry(bk).or_insert(0);
                        *e = (*e).max(g);
                    }
                }
                lines.lock().unwrap().push(line);
            }
        });
    }
    let saw = |what: &str| lines.lock().unwrap().iter().any(|l| l.contains(what));
    let count = || acks.lock().unwrap().values().sum::<u64>();
    wait_until("guest ready", Duration::from_secs(120), || {
        saw("pv-guest: ready").then_some(())
    });
    let mut w = sock.try_clone().unwrap();
    w.write_all(b"pv writer 77 64\n").unwrap();
    wait_until("first acks", Duration::from_secs(60), || {
        (count() >= 40).then_some(())
    });
    // The secondary dies; the guest keeps writing (degraded).
    pb.kill();
    let before = count();
    wait_until("acks while degraded", Duration::from_secs(60), || {
        (count() >= before + 40).then_some(())
    });
    assert_eq!(pa.status()["degraded"], true);
    let pb = b.start("secondary", 0);
    pa.wait_link("in_sync", Duration::from_secs(60));
    let before = count();
    wait_until("acks after resync", Duration::from_secs(60), || {
        (count() >= before + 40).then_some(())
    });
    w.write_all(b"pv stop\n").unwrap();
    wait_until("writer stopped", Duration::from_secs(60), || {
        saw("pv-guest: stopped").then_some(())
    });
    let v = pa.ctl(json!({"cmd":"verify"}));
    assert_eq!(v["result"]["differing_count"], 0, "{v}");
    let acks = acks.lock().unwrap().clone();
    for (name, image) in [("primary", pa.data()), ("secondary", pb.data())] {
        for (&blk, &g) in &acks {
            let got = &image[blk as usize * 4096..blk as usize * 4096 + 4096];
            assert!(
                got == &pv_block("77", blk, g)[..] || got == &pv_block("77", blk, g + 1)[..],
                "{name}: block {blk} lost acknowledged generation {g}"
            );
        }
    }
    let s = pa.status();
    assert!(s["stats"]["flush_ops"].as_u64().unwrap() > 0, "{s}");
    eprintln!(
        "guest: {} blocks, {} acknowledged writes checked on both replicas",
        acks.len(),
        acks.values().sum::<u64>()
    );
}
