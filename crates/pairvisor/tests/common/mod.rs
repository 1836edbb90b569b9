//! Test harness: runs the real `pairvisor serve` binary on a temporary data
//! directory and talks to it over HTTPS, like an administrator would,
//! trusting only the CA the daemon made for itself.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod browser_net;

pub const ADMIN_PASSWORD: &str = "correct horse battery";

/// Where the test guest lives (built by guest/build.sh).
pub fn guest_dir() -> PathBuf {
    std::env::var_os("PAIRVISOR_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/guest"))
}

/// The guest's kernel and initrd, or a panic telling how to build them.
pub fn guest() -> (String, String) {
    let d = guest_dir();
    let k = d.join("vmlinuz");
    let i = d.join("initrd.img");
    assert!(
        k.is_file() && i.is_file(),
        "the test guest is missing in {}: run guest/build.sh first",
        d.display()
    );
    (k.display().to_string(), i.display().to_string())
}

/// An HTTPS client (blocking) that trusts only the certificates in `ca`.
pub fn https_client(ca: &Path) -> reqwest::blocking::Client {
    https_client_with_timeout(ca, Duration::from_secs(120))
}

/// [`https_client`] with a request timeout.
pub fn https_client_with_timeout(ca: &Path, timeout: Duration) -> reqwest::blocking::Client {
    let pem = std::fs::read(ca).unwrap_or_else(|e| panic!("{}: {e}", ca.display()));
    let mut b = reqwest::blocking::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .timeout(timeout);
    for c in reqwest::Certificate::from_pem_bundle(&pem).expect("CA PEM") {
        b = b.add_root_certificate(c);
    }
    b.build().expect("https client")
}

/// A raw TLS connection to `addr` (host:port) that trusts only `ca`, for
/// tests that need to misbehave below HTTP (half-sent bodies).
pub fn tls_stream(
    addr: &str,
    ca: &Path,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots.add(c.expect("CA certificate")).expect("CA usable");
    }
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).expect("server name");
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).unwrap();
    let tcp = std::net::TcpStream::connect(addr).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

pub struct Daemon {
    child: Option<Child>,
    pub url: String,
    pub data: tempfile::TempDir,
    pub token: String,
    listen: String,
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_pairvisor")
}

impl Daemon {
    /// Starts a daemon on a fresh data directory with TCG and logs in as admin.
    pub fn start() -> Daemon {
        let data = tempfile::Builder::new()
            .prefix("pv")
            .tempdir()
            .expect("tempdir");
        let pw = data.path().join("admin-password");
        std::fs::write(&pw, ADMIN_PASSWORD).unwrap();
        let mut d = Daemon {
            child: None,
            url: String::new(),
            data,
            token: String::new(),
            listen: "127.0.0.1:0".into(),
        };
        d.spawn(true);
        d.token = d.login("admin", ADMIN_PASSWORD).expect("admin login");
        // Quick, deterministic settings for tests.
        let (s, _) = d.call(
            "PATCH",
            "/settings",
            Some(json!({"accel": "tcg", "shutdown_timeout_secs": 30, "instance_check_interval_secs": 1})),
        );
        assert_eq!(s, 200);
        d
    }

    fn spawn(&mut self, first: bool) {
        let mut cmd = Command::new(bin());
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(self.data.path())
            .arg("--listen")
            .arg(&self.listen)
            .arg("--accel")
            .arg("tcg")
            // The test guest's kernel and ISO may be named by API calls.
            .arg("--import-dir")
            .arg(std::fs::canonicalize(guest_dir()).unwrap_or_else(|_| guest_dir()))
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.data.path().join("daemon.log"))
                    .unwrap(),
            ));
        if first {
            cmd.arg("--admin-password-file")
                .arg(self.data.path().join("admin-password"));
        }
        let mut child = cmd.spawn().expect("spawn pairvisor serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(u) = line.strip_prefix("listening on ") {
                    let _ = tx.send(u.to_string());
                }
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("daemon did not start; log:\n{}", self.log()));
        // Keep the same port across restarts.
        self.listen = url.trim_start_matches("https://").to_string();
        self.url = url;
        self.child = Some(child);
    }

    /// The CA the daemon made for its API (what an administrator imports).
    pub fn ca_file(&self) -> PathBuf {
        self.data.path().join("tls/api-ca.pem")
    }

    /// An HTTPS client that trusts exactly the daemon's CA.
    pub fn http(&self) -> reqwest::blocking::Client {
        https_client(&self.ca_file())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.path().join("daemon.log")).unwrap_or_default()
    }

    /// SIGKILLs the daemon (VMs keep running).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the daemon again on the same data directory and port.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn(false);
    }

    pub fn login(&self, user: &str, password: &str) -> Result<String, (u16, Value)> {
        let (s, v) = self.call_as(
            None,
            "POST",
            "/auth/login",
            Some(json!({"user": user, "password": password})),
        );
        if s == 200 {
            Ok(v["token"].as_str().unwrap().to_string())
        } else {
            Err((s, v))
        }
    }

    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call_as(Some(&self.token), method, path, body)
    }

    pub fn call_as(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let c = self.http();
        let mut rb = c.request(
            method.parse().unwrap(),
            format!("{}/api/v1{path}", self.url),
        );
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let resp = rb.send().expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().unwrap_or_default();
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, v)
    }

    /// Sends a raw body (not JSON) with a content type.
    pub fn call_raw(&self, method: &str, path: &str, body: Vec<u8>, ctype: &str) -> (u16, Value) {
        let resp = self
            .http()
            .request(
                method.parse().unwrap(),
                format!("{}/api/v1{path}", self.url),
            )
            .bearer_auth(&self.token)
            .header("content-type", ctype)
            .body(body)
            .send()
            .expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (s, v) = self.call(method, path, body);
        assert!((200..300).contains(&s), "{method} {path} -> {s} {v}");
        v
    }

    pub fn vm(&self, name: &str) -> Value {
        self.ok("GET", &format!("/vms/{name}"), None)
    }

    /// Polls until the VM is in `state`; panics with the VM and the daemon
    /// log after `timeout`.
    pub fn wait_state(&self, name: &str, state: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.vm(name);
            if v["state"] == state {
                return v;
            }
            if Instant::now() > deadline {
                panic!(
                    "VM {name} did not reach {state} within {timeout:?}: {v:#}\nconsole:\n{}\ndaemon log:\n{}",
                    self.console(name),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn console(&self, name: &str) -> String {
        match self.call("GET", &format!("/vms/{name}/console?tail_bytes=4000"), None) {
            (200, Value::String(s)) => s,
            (_, v) => v.to_string(),
        }
    }

    /// Waits until the console log contains `needle`.
    pub fn wait_console(&self, name: &str, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.console(name).contains(needle) {
            assert!(
                Instant::now() < deadline,
                "console of {name} never showed {needle:?}:\n{}",
                self.console(name)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Types a line on the VM's serial console.
    pub fn type_console(&self, name: &str, line: &str) {
        let id = self.vm(name)["id"].as_str().unwrap().to_string();
        let sock = self.data.path().join("run").join(id).join("console.sock");
        let mut s = std::os::unix::net::UnixStream::connect(&sock).expect("console socket");
        s.write_all(format!("{line}\n").as_bytes()).unwrap();
        s.flush().unwrap();
        // Give QEMU a moment to read before we hang up; the guest sees the
        // line either way once QEMU has it.
        std::thread::sleep(Duration::from_millis(300));
    }

    /// Creates the test-guest VM `name`, starts it, waits until it runs and
    /// returns its QEMU pid.
    pub fn start_guest(&self, name: &str) -> i64 {
        self.ok("POST", "/vms", Some(self.guest_vm(name)));
        self.ok("POST", &format!("/vms/{name}/start"), None);
        let vm = self.wait_state(name, "running", Duration::from_secs(90));
        vm["pid"].as_i64().expect("a running VM has a pid")
    }

    /// A VM spec booting the test guest with a 64 MiB boot volume.
    pub fn guest_vm(&self, name: &str) -> Value {
        let (kernel, initrd) = guest();
        json!({
            "name": name, "vcpus": 1, "memory_mib": 256,
            "boot_volume": {"size_bytes": 64 << 20},
            "kernel": {"kernel": kernel, "initrd": initrd, "cmdline": "console=ttyS0 panic=0 quiet"},
        })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        // Kill every QEMU this daemon started.
        if let Ok(rd) = std::fs::read_dir(self.data.path().join("run")) {
            for e in rd.flatten() {
                if let Ok(p) = std::fs::read_to_string(e.path().join("qemu.pid")) {
                    if let Ok(pid) = p.trim().parse::<i32>() {
                        // SAFETY: kill(2) with a pid read from our own pid file
                        // and SIGKILL; no memory is involved.
                        unsafe {
                            libc::kill(pid, libc::SIGKILL);
                        }
                    }
                }
            }
        }
    }
}

pub fn pid_alive(pid: i64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true)
}

/// Whether the effective user is root (network namespaces need it).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|u| u.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// Accepts any server certificate: for tests that play a stranger who
/// does not care whom it talks to (it has no client certificate either).
#[derive(Debug)]
struct AnyServer(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS connection to `addr` as a stranger: no client certificate, any
/// server accepted, HTTP/1.1. `None` when the server refuses it.
pub fn stranger_tls(
    addr: &str,
) -> Option<rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .ok()?
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(AnyServer(provider)))
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("stranger.invalid").ok()?;
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).ok()?;
    let tcp = std::net::TcpStream::connect(addr).ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    tcp.set_write_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).ok()?;
    }
    Some(s)
}
