//! Interoperability with the real NBD clients: qemu-img, qemu-io, nbdinfo,
//! nbdcopy (Debian's qemu-utils and libnbd-bin). Each test skips (with a
//! message) when its tool is missing.

mod common;
use common::*;
use std::process::Command;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn simplex(root: &std::path::Path, size: u64) -> Proc {
    let n = Node::new(root, "a", size);
    let p = n.start("primary", 1);
    wait_until("nbd socket", Duration::from_secs(10), || {
        std::net::TcpStream::connect(n.nbd_addr()).ok()
    });
    p
}

#[test]
fn nbdinfo_reports_size_and_capabilities() {
    if !have("nbdinfo") {
        eprintln!("skipped: nbdinfo not installed");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let p = simplex(d.path(), 64 * MIB);
    let out = run(Command::new("nbdinfo").arg("--json").arg(p.node.nbd_uri()));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let e = &v["exports"][0];
    assert_eq!(e["export-size"], 64 * MIB);
    for cap in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
    ] {
        assert_eq!(e[cap], true, "{cap}: {out}");
    }
    assert_eq!(e["is_read_only"], false);
    // Over the Unix socket too.
    let uri = format!("nbd+unix:///vol?socket={}", p.node.nbd_unix.display());
    let out = run(Command::new("nbdinfo").arg("--size").arg(uri));
    assert_eq!(out.trim(), (64 * MIB).to_string());
    // Unknown export names are refused.
    let bad = Command::new("nbdinfo")
        .arg(format!("nbd://127.0.0.1:{}/nope", p.node.nbd_port))
        .output()
        .unwrap();
    assert!(!bad.status.success());
}

#[test]
fn qemu_io_read_write_zero_discard_flush_aio() {
    if !have("qemu-io") {
        eprintln!("skipped: qemu-io not installed");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let p = simplex(d.path(), 64 * MIB);
    let uri = p.node.nbd_uri();
    let out = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0xab 0 1M",
        "-c",
        "write -P 0xcd -f 1M 4k",
        "-c",
        "read -P 0xab 0 1M",
        "-c",
        "read -P 0xcd 1M 4k",
        "-c",
        "write -z 2M 512k",
        "-c",
        "read -P 0 2M 512k",
        "-c",
        "write -P 0x55 3M 64k",
        "-c",
        "discard 3M 64k",
        "-c",
        "flush",
        "-c",
        "aio_write -P 0x11 4M 64k",
        "-c",
        "aio_write -P 0x12 5M 64k",
        "-c",
        "aio_write -P 0x13 6M 64k",
        "-c",
        "aio_write -P 0x14 7M 64k",
        "-c",
        "aio_flush",
        "-c",
        "read -P 0x11 4M 64k",
        "-c",
        "read -P 0x14 7M 64k",
        "-c",
        "read -P 0 63M 1M",
        &uri,
    ]));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(!out.to_lowercase().contains("error"), "{out}");
    // Through the Unix socket and with an unaligned write.
    let uri = format!("nbd+unix:///vol?socket={}", p.node.nbd_unix.display());
    let out = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x77 10001 333",
        "-c",
        "read -P 0x77 10001 333",
        &uri,
    ]));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // A read past the end is refused.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 64M 4k", &p.node.nbd_uri()])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("Input/output error")
            || text.contains("Invalid argument")
            || text.contains("out of bounds")
            || text.contains("beyond"),
        "{text}"
    );
}

#[test]
fn qemu_img_info_convert_in_and_out() {
    if !have("qemu-img") {
        eprintln!("skipped: qemu-img not installed");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let p = simplex(d.path(), 32 * MIB);
    let uri = p.node.nbd_uri();
    let info = run(Command::new("qemu-img").args(["info", "--output=json", &uri]));
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["virtual-size"], 32 * MIB);
    // A source image with data and holes, converted into the export.
    let src = d.path().join("src.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-f", "qcow2"])
        .arg(&src)
        .arg("32M"));
    run(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 1M 3M",
            "-c",
            "write -P 0xa5 20M 1M",
        ])
        .arg(&src));
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "qcow2", "-O", "raw"])
        .arg(&src)
        .arg(&uri));
    run(Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(&src)
        .arg(&uri));
    // And out of it again, into a fresh file.
    let out = d.path().join("out.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(&uri)
        .arg(&out));
    run(Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(&src)
        .arg(&out));
    // The allocation map (base:allocation) shows the holes.
    let map = run(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &uri]));
    assert!(map.contains("\"data\": false"), "{map}");
}

#[test]
fn nbdcopy_in_and_out() {
    if !have("nbdcopy") {
        eprintln!("skipped: nbdcopy not installed");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let p = simplex(d.path(), 16 * MIB);
    let src = d.path().join("src.raw");
    let mut data = vec![0u8; 16 * MIB as usize];
    for (i, b) in data.iter_mut().enumerate() {
        if (i / 65536) % 3 != 0 {
            *b = (i % 251) as u8;
        }
    }
    std::fs::write(&src, &data).unwrap();
    run(Command::new("nbdcopy")
        .arg(&src)
        .arg(p.node.nbd_uri())
        .arg("--flush"));
    let back = d.path().join("back.raw");
    run(Command::new("nbdcopy").arg(p.node.nbd_uri()).arg(&back));
    assert!(
        std::fs::read(&back).unwrap() == data,
        "nbdcopy round trip differs"
    );
    // Several connections at once (nbdcopy uses multi-conn when offered).
    run(Command::new("nbdcopy")
        .args(["--connections=4", "--requests=16"])
        .arg(&src)
        .arg(p.node.nbd_uri()));
}
