//! HTTPS for the REST API and the browser console.
//!
//! Every PM serves its API over TLS. Unless the administrator installs a
//! certificate of their own (`--tls-cert`/`--tls-key`, e.g. from the
//! company's CA, covering the unit's management address), the daemon makes
//! a small certificate authority of its own on first start
//! (`DATA/tls/api-ca.pem`, the file to import into a browser or give to the
//! CLI) and a server certificate signed by it for the names the PM is
//! reached by. The CA stays; the server certificate is re-issued when the
//! names change, so a browser that trusts the CA keeps trusting the PM.
//!
//! The CA's private key never leaves the PM and is written mode 0600, like
//! the server key; neither is ever logged.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why the API's TLS set-up failed; each message names the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A PEM file holds no usable certificate or key.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong and what is expected.
        what: String,
    },
    /// Certificate generation failed.
    #[error("generating the API certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the certificate or key.
    #[error("the API certificate or key is not usable: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The API's TLS material, ready to serve.
#[derive(Clone)]
pub struct ApiTls {
    /// The server configuration (HTTP/1.1 and HTTP/2 by ALPN).
    pub server: Arc<ServerConfig>,
    /// The certificates a client should trust to reach this PM (PEM): the
    /// PM's own API CA, or the chain of an administrator's certificate.
    pub trust_pem: String,
    /// The file holding [`ApiTls::trust_pem`] (for messages and the CLI).
    pub trust_file: PathBuf,
}

impl std::fmt::Debug for ApiTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiTls")
            .field("trust_file", &self.trust_file)
            .finish_non_exhaustive()
    }
}

/// File names inside the TLS directory.
pub const CA_CERT: &str = "api-ca.pem";
const CA_KEY: &str = "api-ca-key.pem";
const CERT: &str = "api-cert.pem";
const KEY: &str = "api-key.pem";
const NAMES: &str = "api-names.json";

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsSetupError + '_ {
    move |source| TlsSetupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn read(path: &Path) -> Result<String, TlsSetupError> {
    std::fs::read_to_string(path).map_err(io_err(path))
}

/// Writes a file atomically (temporary file, fsync, rename), private when
/// it holds a key.
fn write(path: &Path, data: &str, private: bool) -> Result<(), TlsSetupError> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(data.as_bytes()).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// The current year, for certificate validity (no clock crate needed: a
/// year is precise enough for "valid from last year for ten years").
fn this_year() -> i32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    1970 + (secs / 31_556_952) as i32
}

fn ca_params(pm: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Pairvisor");
    dn.push(DnType::CommonName, format!("Pairvisor API CA {pm}"));
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let y = this_year();
    p.not_before = rcgen::date_time_ymd(y - 1, 1, 1);
    p.not_after = rcgen::date_time_ymd(y + 20, 1, 1);
    p
}

fn server_params(pm: &str, names: &[String]) -> Result<CertificateParams, rcgen::Error> {
    let mut p = CertificateParams::new(names.to_vec())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Pairvisor");
    dn.push(DnType::CommonName, format!("Pairvisor API {pm}"));
    p.distinguished_name = dn;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let y = this_year();
    p.not_before = rcgen::date_time_ymd(y - 1, 1, 1);
    p.not_after = rcgen::date_time_ymd(y + 10, 1, 1);
    Ok(p)
}

/// The names a generated certificate covers: loopback, the host name, the
/// address the API listens on (when it is a specific one) and any extra
/// names the administrator gives (management address, DNS names).
pub fn default_names(
    listen: std::net::SocketAddr,
    hostname: Option<&str>,
    extra: &[String],
) -> Vec<String> {
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    if let Some(h) = hostname.map(str::trim).filter(|h| !h.is_empty()) {
        names.push(h.to_string());
    }
    if !listen.ip().is_unspecified() {
        names.push(listen.ip().to_string());
    }
    names.extend(extra.iter().map(|s| s.trim().to_string()));
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| !n.is_empty() && seen.insert(n.clone()));
    names
}

fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, TlsSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let pem = read(path)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsSetupError::Pem {
            path: path.to_path_buf(),
            what: format!("not a PEM certificate chain ({e})"),
        })?;
    if chain.is_empty() {
        return Err(TlsSetupError::Pem {
            path: path.to_path_buf(),
            what: "no CERTIFICATE block; expected the server certificate first, then its CA chain"
                .into(),
        });
    }
    Ok(chain)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsSetupError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsSetupError::Pem {
        path: path.to_path_buf(),
        what: format!("no usable private key (PKCS#8, PKCS#1 or SEC1 PEM expected): {e}"),
    })
}

/// Uses the administrator's certificate chain and key. The chain file (the
/// server certificate, then its CA chain) is what clients are told to trust.
pub fn from_files(cert: &Path, key: &Path) -> Result<ApiTls, TlsSetupError> {
    let chain = load_chain(cert)?;
    let key_der = load_key(key)?;
    Ok(ApiTls {
        server: server_config(chain, key_der)?,
        trust_pem: read(cert)?,
        trust_file: cert.to_path_buf(),
    })
}

/// Loads the PM's own API CA and server certificate from `dir`, creating
/// them on first use and re-issuing the server certificate when `names`
/// changed.
pub fn load_or_create(dir: &Path, pm: &str, names: &[String]) -> Result<ApiTls, TlsSetupError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let (ca_cert, ca_key) = (dir.join(CA_CERT), dir.join(CA_KEY));
    if !ca_cert.exists() || !ca_key.exists() {
        let key = KeyPair::generate()?;
        let cert = ca_params(pm).self_signed(&key)?;
        write(&ca_key, &key.serialize_pem(), true)?;
        write(&ca_cert, &cert.pem(), false)?;
        tracing::info!(
            "created the API certificate authority {}",
            ca_cert.display()
        );
    }
    let (cert, key, names_file) = (dir.join(CERT), dir.join(KEY), dir.join(NAMES));
    let wanted = serde_json::to_string(&(pm, names)).unwrap_or_default();
    let current = std::fs::read_to_string(&names_file).unwrap_or_default();
    if current != wanted || !cert.exists() || !key.exists() {
        let ca_key_pair = KeyPair::from_pem(&read(&ca_key)?).map_err(|e| TlsSetupError::Pem {
            path: ca_key.clone(),
            what: format!("not a usable CA key ({e}); remove the api-ca files to make a new CA"),
        })?;
        let issuer = Issuer::new(ca_params(pm), ca_key_pair);
        let leaf_key = KeyPair::generate()?;
        let leaf = server_params(pm, names)?.signed_by(&leaf_key, &issuer)?;
        write(&key, &leaf_key.serialize_pem(), true)?;
        // The chain sent to clients: server certificate, then the CA.
        write(&cert, &format!("{}{}", leaf.pem(), read(&ca_cert)?), false)?;
        write(&names_file, &wanted, false)?;
        tracing::info!(names = ?names, "issued the API server certificate");
    }
    Ok(ApiTls {
        server: server_config(load_chain(&cert)?, load_key(&key)?)?,
        trust_pem: read(&ca_cert)?,
        trust_file: ca_cert,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_cover_loopback_host_listen_and_extras_once() {
        let n = default_names(
            "10.0.0.1:7480".parse().unwrap(),
            Some("pm-a\n"),
            &["mgmt.example".into(), "127.0.0.1".into(), " ".into()],
        );
        assert_eq!(
            n,
            [
                "localhost",
                "127.0.0.1",
                "::1",
                "pm-a",
                "10.0.0.1",
                "mgmt.example"
            ]
        );
        let n = default_names("0.0.0.0:7480".parse().unwrap(), None, &[]);
        assert_eq!(n, ["localhost", "127.0.0.1", "::1"]);
    }

    #[test]
    fn the_ca_persists_and_the_server_certificate_follows_the_names() {
        let d = tempfile::tempdir().unwrap();
        let a = load_or_create(d.path(), "pm-a", &["localhost".into()]).unwrap();
        let leaf1 = std::fs::read_to_string(d.path().join(CERT)).unwrap();
        let b = load_or_create(d.path(), "pm-a", &["localhost".into()]).unwrap();
        assert_eq!(a.trust_pem, b.trust_pem);
        assert_eq!(leaf1, std::fs::read_to_string(d.path().join(CERT)).unwrap());
        let c = load_or_create(d.path(), "pm-a", &["localhost".into(), "10.1.1.1".into()]).unwrap();
        assert_eq!(a.trust_pem, c.trust_pem, "the CA is kept");
        assert_ne!(leaf1, std::fs::read_to_string(d.path().join(CERT)).unwrap());
        use std::os::unix::fs::PermissionsExt;
        for k in [CA_KEY, KEY] {
            let mode = std::fs::metadata(d.path().join(k))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{k} must be private");
        }
    }

    #[test]
    fn bad_files_are_refused_with_the_file_named() {
        let d = tempfile::tempdir().unwrap();
        let cert = d.path().join("c.pem");
        let key = d.path().join("k.pem");
        std::fs::write(&cert, "not a certificate").unwrap();
        std::fs::write(&key, "nor a key").unwrap();
        let e = from_files(&cert, &key).unwrap_err().to_string();
        assert!(e.contains("c.pem") && e.contains("CERTIFICATE"), "{e}");
        let e = from_files(&d.path().join("missing.pem"), &key)
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.pem"), "{e}");
    }
}
