//! A network namespace of its own for the browser under test.
//!
//! Chromium watches the host's network interfaces and, whenever one
//! appears or goes (other tests create veth pairs, bridges and taps all the
//! time), fails the requests it is making with `ERR_NETWORK_CHANGED` — a
//! browser test then fails for something that has nothing to do with the
//! console. So, when we are root, the browser runs in a namespace where
//! nothing ever changes: its loopback carries the very addresses the
//! console is served on, and a forwarder in this test process relays each
//! connection to the real address in the test's own namespace. The page
//! still talks to `https://ADDR:PORT` (same host, certificate and origin).
//! Without root the browser runs as before.

use std::fs::File;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;

/// Where the browser runs; its namespace (if any) is removed on drop.
pub struct BrowserNet {
    /// The namespace, when we are root.
    name: Option<String>,
    /// What to run as Chromium: a wrapper that enters the namespace, or
    /// Chromium itself.
    pub chromium: String,
    _dir: Option<tempfile::TempDir>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Moves the calling thread into the network namespace `ns` (a handle on
/// `/run/netns/NAME` or `/proc/thread-self/ns/net`).
fn enter(ns: &File) {
    // SAFETY: setns(2) on a descriptor we own, for the calling thread only.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

/// Copies one direction until EOF, then half-closes the other side.
fn pump(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}

impl BrowserNet {
    /// A namespace where `targets` (the console's addresses) are reachable,
    /// for `chromium`; without root, Chromium as is, in the test's namespace.
    pub fn new(targets: &[SocketAddr], chromium: &str) -> BrowserNet {
        if !super::is_root() {
            return BrowserNet {
                name: None,
                chromium: chromium.to_string(),
                _dir: None,
            };
        }
        let name = format!("pvbrowser{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        let ns_path = PathBuf::from(format!("/run/netns/{name}"));
        for t in targets {
            if !t.ip().is_loopback() {
                let cidr = format!("{}/{}", t.ip(), if t.is_ipv4() { 32 } else { 128 });
                ip(&["-n", &name, "addr", "add", &cidr, "dev", "lo"]);
            }
            // Bind inside the browser's namespace, then come back: sockets
            // belong to the namespace they were made in, so connections are
            // accepted there and relayed from here.
            let ns = File::open(&ns_path).unwrap_or_else(|e| panic!("{}: {e}", ns_path.display()));
            let target = *t;
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let home = File::open("/proc/thread-self/ns/net").expect("own namespace");
                enter(&ns);
                let l = TcpListener::bind(target);
                enter(&home);
                let l = match l {
                    Ok(l) => {
                        let _ = tx.send(Ok(()));
                        l
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                for c in l.incoming() {
                    let Ok(inner) = c else { break };
                    let Ok(outer) = TcpStream::connect(target) else {
                        continue;
                    };
                    let _ = (inner.set_nodelay(true), outer.set_nodelay(true));
                    let (i2, o2) = (inner.try_clone().unwrap(), outer.try_clone().unwrap());
                    std::thread::spawn(move || pump(inner, outer));
                    std::thread::spawn(move || pump(o2, i2));
                }
            });
            rx.recv()
                .expect("forwarder thread")
                .unwrap_or_else(|e| panic!("listen on {t} in the browser's namespace: {e}"));
        }
        let dir = tempfile::tempdir().unwrap();
        let wrapper = dir.path().join("chromium");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nexec nsenter --net={} -- {chromium} \"$@\"\n",
                ns_path.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
        BrowserNet {
            name: Some(name),
            chromium: wrapper.display().to_string(),
            _dir: Some(dir),
        }
    }
}

impl Drop for BrowserNet {
    fn drop(&mut self) {
        if let Some(name) = &self.name {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

/// The socket address of an `https://HOST:PORT` URL.
pub fn url_addr(url: &str) -> SocketAddr {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let hostport = rest.split('/').next().unwrap_or(rest);
    hostport
        .parse()
        .unwrap_or_else(|e| panic!("{url}: not HOST:PORT with a numeric host: {e}"))
}
