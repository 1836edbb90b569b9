//! Real network namespaces (needs root, as CI and the lab run): the
//! topology comes up, TCP flows over the private link and the business
//! network, a cut link carries nothing, a healed one carries again, and
//! destroy leaves nothing behind.

use pairvisor_lab::{Link, Topology};
use std::process::Command;

/// Tries a TCP connection from inside namespace `from` to addr:port, where
/// a listener runs inside namespace `to`. Uses busybox nc, bounded by timeouts.
fn reachable(t: &Topology, from: char, to: char, addr: &str) -> bool {
    static PORT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(7700);
    let port = PORT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let port_s = port.to_string();
    let hex = format!(":{port:04X} ");
    let mut listener = Command::new("ip")
        .args([
            "netns",
            "exec",
            &t.ns(to),
            "timeout",
            "5",
            "busybox",
            "nc",
            "-l",
            "-p",
            &port_s,
        ])
        .spawn()
        .unwrap();
    // Wait until the listener is bound (poll /proc/net/tcp inside the ns).
    for _ in 0..100 {
        let out = Command::new("ip")
            .args(["netns", "exec", &t.ns(to), "cat", "/proc/net/tcp"])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&out.stdout).contains(&hex) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let ok = Command::new("ip")
        .args([
            "netns",
            "exec",
            &t.ns(from),
            "timeout",
            "2",
            "busybox",
            "nc",
            "-w",
            "1",
            addr,
            &port_s,
        ])
        .stdin(std::process::Stdio::null())
        .status()
        .unwrap()
        .success();
    // SIGTERM to `timeout`, which passes it on to nc (SIGKILL would orphan nc).
    let _ = Command::new("kill").arg(listener.id().to_string()).status();
    let _ = listener.wait();
    ok
}

#[test]
fn topology_cut_heal_destroy() {
    let t = Topology::new(
        &format!("pvn{}", std::process::id() % 1000),
        100 + (std::process::id() % 40) as u8,
    )
    .unwrap();
    t.destroy();
    t.create().expect("create the lab topology (needs root)");
    assert!(
        reachable(&t, 'a', 'b', &t.private_addr('b')),
        "private link"
    );
    assert!(
        reachable(&t, 'b', 'w', &t.business_addr('w')),
        "business network to the witness"
    );
    assert!(t.is_up(Link::Private).unwrap());

    t.cut(Link::Private).unwrap();
    assert!(!t.is_up(Link::Private).unwrap());
    assert!(
        !reachable(&t, 'a', 'b', &t.private_addr('b')),
        "cut private link carries nothing"
    );
    assert!(
        reachable(&t, 'a', 'b', &t.business_addr('b')),
        "business still works"
    );
    t.cut(Link::BusinessA).unwrap();
    assert!(
        !reachable(&t, 'a', 'w', &t.business_addr('w')),
        "A isolated from the witness"
    );
    assert!(
        reachable(&t, 'b', 'w', &t.business_addr('w')),
        "B still reaches the witness"
    );

    t.heal(Link::Private).unwrap();
    t.heal(Link::BusinessA).unwrap();
    assert!(reachable(&t, 'a', 'b', &t.private_addr('b')), "healed");
    assert!(reachable(&t, 'a', 'w', &t.business_addr('w')), "healed");

    t.destroy();
    let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&list.stdout).contains(&t.ns('a')),
        "namespaces removed"
    );
}
