//! The migration stream under TLS (`tls-creds-x509`, as the unit uses it
//! between PMs): two real QEMUs running the test guest. A source whose
//! certificate comes from another CA is refused and keeps running; with
//! certificates of the same CA the guest migrates, and what crossed the
//! wire (seen by a relay between the two) was TLS, never QEMU's plain
//! stream.

mod common;

use common::{guest_spec, qemu_binary, temp_dir, wait_for_text, QemuGuard};
use pairvisor_hypervisor::{
    MigrationCaps, MigrationParams, MigrationStatus, QemuVm, RunState, TlsEndpoint,
};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const BOOT: Duration = Duration::from_secs(180);
/// The name the destination's certificate carries (as a unit node's does).
const DEST_NAME: &str = "node-2.pairvisor.unit";

struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().unwrap();
    let pem = params.self_signed(&key).unwrap().pem();
    Ca { params, key, pem }
}

/// Writes QEMU's credential files for `end`, signed by `ca`, into `dir`.
fn creds(dir: &Path, ca: &Ca, end: TlsEndpoint, name: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let mut p = CertificateParams::new(vec![name.to_string()]).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let issuer = Issuer::new(ca.params.clone(), &ca.key);
    let cert = p.signed_by(&key, &issuer).unwrap();
    let side = end.qemu_name();
    std::fs::write(dir.join("ca-cert.pem"), &ca.pem).unwrap();
    std::fs::write(dir.join(format!("{side}-cert.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{side}-key.pem")), key.serialize_pem()).unwrap();
    dir.to_path_buf()
}

/// Relays one connection from `front` to `back`, keeping the first bytes
/// the source sent.
async fn relay(front: PathBuf, back: PathBuf, seen: Arc<Mutex<Vec<u8>>>) {
    let l = tokio::net::UnixListener::bind(&front).unwrap();
    tokio::spawn(async move {
        while let Ok((mut a, _)) = l.accept().await {
            let Ok(b) = tokio::net::UnixStream::connect(&back).await else {
                continue;
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let (mut br, mut bw) = b.into_split();
                let (mut ar, mut aw) = a.split();
                let up = async {
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        let n = match ar.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        {
                            let mut s = seen.lock().unwrap();
                            if s.len() < 64 << 10 {
                                s.extend_from_slice(&buf[..n]);
                            }
                        }
                        if bw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = bw.shutdown().await;
                };
                let down = async {
                    let _ = tokio::io::copy(&mut br, &mut aw).await;
                };
                tokio::join!(up, down);
            });
        }
    });
}

/// A paused destination with server credentials, waiting on `uri`.
async fn destination(dir: &Path, run: &str, creds_dir: &Path) -> (QemuVm, QemuGuard) {
    let mut spec = guest_spec("mig", dir);
    spec.start_paused = true;
    spec.incoming_defer = true;
    let rb = dir.join(run);
    let b = QemuVm::launch(&qemu_binary(), &spec, &rb).await.unwrap();
    let g = QemuGuard::new(&rb);
    b.set_migration_caps(MigrationCaps::default())
        .await
        .unwrap();
    b.add_tls_creds("tls0", creds_dir, TlsEndpoint::Server)
        .await
        .unwrap();
    b.set_migration_params(MigrationParams {
        tls_creds: Some("tls0".into()),
        ..Default::default()
    })
    .await
    .unwrap();
    b.migrate_incoming(&format!(
        "unix:{}",
        dir.join(format!("{run}.sock")).display()
    ))
    .await
    .unwrap();
    (b, g)
}

#[tokio::test]
async fn migration_stream_is_tls_and_a_foreign_certificate_is_refused() {
    let dir = temp_dir();
    let d = dir.path();
    let (unit, stranger) = (ca("unit CA"), ca("another CA"));
    let spec = guest_spec("mig", d);
    let ra = d.join("a");
    let a = QemuVm::launch(&qemu_binary(), &spec, &ra).await.unwrap();
    let _ga = QemuGuard::new(&ra);
    wait_for_text(&ra.join("console.log"), "pv-guest: ready", BOOT).await;
    let server = creds(&d.join("server"), &unit, TlsEndpoint::Server, DEST_NAME);

    // 1. A source with a certificate of another CA: refused, keeps running.
    let (_b1, _gb1) = destination(d, "b1", &server).await;
    let foreign = creds(&d.join("foreign"), &stranger, TlsEndpoint::Client, "node-9");
    a.add_tls_creds("tls0", &foreign, TlsEndpoint::Client)
        .await
        .unwrap();
    a.set_migration_params(MigrationParams {
        tls_creds: Some("tls0".into()),
        tls_hostname: Some(DEST_NAME.into()),
        ..Default::default()
    })
    .await
    .unwrap();
    a.migrate(&format!("unix:{}", d.join("b1.sock").display()))
        .await
        .unwrap();
    let p = a
        .wait_migration(Duration::from_secs(60), |p| p.status.is_final(), |_| {})
        .await
        .unwrap();
    assert_eq!(p.status, MigrationStatus::Failed, "{p:?}");
    println!("foreign certificate: {:?}", p.error);
    assert_eq!(a.status().await.unwrap(), RunState::Running);

    // 2. Certificates of the unit CA, through a relay that sees the bytes.
    let (b2, _gb2) = destination(d, "b2", &server).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    relay(d.join("relay.sock"), d.join("b2.sock"), seen.clone()).await;
    let client = creds(&d.join("client"), &unit, TlsEndpoint::Client, "node-1");
    a.add_tls_creds("tls0", &client, TlsEndpoint::Client)
        .await
        .unwrap();
    a.migrate(&format!("unix:{}", d.join("relay.sock").display()))
        .await
        .unwrap();
    let p = a
        .wait_migration(Duration::from_secs(120), |p| p.status.is_final(), |_| {})
        .await
        .unwrap();
    assert_eq!(p.status, MigrationStatus::Completed, "{p:?}");
    let bytes = seen.lock().unwrap().clone();
    assert!(bytes.len() > 1024, "the relay saw {} bytes", bytes.len());
    assert_eq!(bytes[0], 0x16, "the stream starts with a TLS handshake");
    assert!(
        !bytes.windows(4).any(|w| w == b"QEVM"),
        "QEMU's plain stream magic crossed the wire"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while b2.status().await.unwrap() == RunState::Inmigrate {
        assert!(tokio::time::Instant::now() < deadline, "destination stuck");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b2.cont().await.unwrap();
    b2.guest_ping(Duration::from_secs(10)).await.unwrap();
}
