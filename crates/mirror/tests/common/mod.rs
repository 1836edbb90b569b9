//! Helpers shared by the integration tests: run `pv-mirror` processes,
//! talk to their control sockets, poll with deadlines.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_pv-mirror");

/// A free TCP port on the loopback interface.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` until it returns `Some`, failing after `timeout`.
pub fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// True when a program is installed.
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Configuration of one replica process.
#[derive(Clone)]
pub struct Node {
    pub name: String,
    pub dir: PathBuf,
    pub size: u64,
    pub region_size: u64,
    pub nbd_port: u16,
    pub nbd_unix: PathBuf,
    pub repl_port: u16,
    pub partner: Option<String>,
    pub secret: PathBuf,
    pub control: PathBuf,
    pub initial_gen: Option<u64>,
    pub extra: Vec<String>,
}

/// A running replica process.
pub struct Proc {
    pub node: Node,
    pub child: Option<Child>,
}

impl Node {
    pub fn new(root: &Path, name: &str, size: u64) -> Node {
        let secret = root.join("secret");
        if !secret.exists() {
            std::fs::write(&secret, b"unit-secret-for-tests").unwrap();
        }
        Node {
            name: name.into(),
            dir: root.join(name),
            size,
            region_size: 1 << 20,
            nbd_port: free_port(),
            nbd_unix: root.join(format!("{name}.nbd")),
            repl_port: free_port(),
            partner: None,
            secret,
            control: root.join(format!("{name}.ctl")),
            initial_gen: None,
            extra: Vec::new(),
        }
    }

    pub fn repl_addr(&self) -> String {
        format!("127.0.0.1:{}", self.repl_port)
    }

    pub fn nbd_addr(&self) -> String {
        format!("127.0.0.1:{}", self.nbd_port)
    }

    pub fn nbd_uri(&self) -> String {
        format!("nbd://127.0.0.1:{}/vol", self.nbd_port)
    }

    /// Starts the process with `role` (and `epoch` when primary).
    pub fn start(&self, role: &str, epoch: u64) -> Proc {
        let mut c = Command::new(BIN);
        c.arg("--dir")
            .arg(&self.dir)
            .arg("--size")
            .arg(self.size.to_string())
            .arg("--volume-id")
            .arg("vol")
            .arg("--region-size")
            .arg(self.region_size.to_string())
            .arg("--nbd-tcp")
            .arg(self.nbd_addr())
            .arg("--nbd-unix")
            .arg(&self.nbd_unix)
            .arg("--repl-listen")
            .arg(self.repl_addr())
            .arg("--secret-file")
            .arg(&self.secret)
            .arg("--control")
            .arg(&self.control)
            .arg("--role")
            .arg(role)
            .arg("--epoch")
            .arg(epoch.to_string())
            .arg("--link-timeout-ms")
            .arg("2000");
        if let Some(p) = &self.partner {
            c.arg("--partner").arg(p);
        }
        if let Some(g) = self.initial_gen {
            c.arg("--initial-gen").arg(g.to_string());
        }
        c.args(&self.extra);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.with_extension("log"))
            .unwrap();
        c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        c.env("RUST_LOG", "info");
        let _ = std::fs::remove_file(&self.control);
        let child = c.spawn().expect("spawn pv-mirror");
        let p = Proc {
            node: self.clone(),
            child: Some(child),
        };
        wait_until("control socket", Duration::from_secs(20), || {
            UnixStream::connect(&self.control).ok()
        });
        p
    }
}

impl Proc {
    /// Sends one control request.
    pub fn ctl(&self, req: Value) -> Value {
        ctl(&self.node.control, req)
    }

    pub fn status(&self) -> Value {
        let r = self.ctl(json!({"cmd":"status"}));
        assert_eq!(r["ok"], true, "{r}");
        r["result"].clone()
    }

    pub fn link_state(&self) -> String {
        self.status()["link"]["state"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// Waits until the link state is `state`.
    pub fn wait_link(&self, state: &str, timeout: Duration) {
        wait_until(&format!("{} link {state}", self.node.name), timeout, || {
            (self.link_state() == state).then_some(())
        });
    }

    /// SIGKILLs the process.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The replica's data file contents.
    pub fn data(&self) -> Vec<u8> {
        std::fs::read(self.node.dir.join("data.raw")).unwrap()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends one control request to a socket.
pub fn ctl(path: &Path, req: Value) -> Value {
    let mut s = UnixStream::connect(path).expect("control socket");
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut line = serde_json::to_vec(&req).unwrap();
    line.push(b'\n');
    s.write_all(&line).unwrap();
    let mut out = String::new();
    BufReader::new(s).read_line(&mut out).unwrap();
    serde_json::from_str(&out).expect("control response is JSON")
}

/// Runs a command, panicking with its output on failure; returns stdout
/// followed by stderr.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn tool");
    if !out.status.success() {
        panic!(
            "{cmd:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}
