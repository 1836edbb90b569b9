//! The unit's certificate authority, node identities, join tokens and the
//! rustls configurations built from them.
//!
//! * `unit init` creates a CA (ECDSA P-256) and the first node's certificate.
//! * Every node certificate names the node: DNS `node-<id>.pairvisor.unit`.
//!   A client connecting to node N verifies the server against the unit CA
//!   *and* that name; a server accepts client certificates of the unit CA
//!   only. A certificate from any other CA fails the TLS handshake.
//! * Private keys never appear in `Debug` output or logs.

use crate::types::{NodeId, NodeRole};
use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SignatureAlgorithm,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;
use std::sync::Arc;

/// A failure to create, load or use the unit's TLS material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Certificate generation failed.
    #[error("cannot generate a certificate")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the material.
    #[error("the TLS material is not usable")]
    Rustls(#[from] rustls::Error),
    /// A PEM file does not parse.
    #[error("{what} is not valid PEM; restore it from a backup or re-join this node to the unit")]
    Pem {
        /// Which file.
        what: String,
    },
    /// Reading or writing the identity files failed.
    #[error("cannot access the node identity files in {dir}")]
    Io {
        /// The directory.
        dir: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The identity directory holds no identity.
    #[error("no node identity in {dir}: run 'unit init' on the first PM or 'unit join' with a join token")]
    Missing {
        /// The directory.
        dir: String,
    },
    /// This node holds no CA key and cannot issue certificates.
    #[error(
        "this node does not hold the unit CA key (only PMs do): create the join token on a PM"
    )]
    NoCaKey,
    /// A join token does not parse.
    #[error("the join token is malformed (copy it again from 'unit join-token' on a PM)")]
    BadToken,
    /// A join token field does not parse.
    #[error("the public key in the join request is not a valid P-256 key")]
    BadPublicKey,
    /// The operating system's random source failed.
    #[error("the operating system's random number source failed: no secret was made (check /dev/urandom and the kernel's entropy)")]
    NoRandom,
}

/// The DNS name in node `id`'s certificate (not resolved, only matched).
pub fn node_name(id: NodeId) -> String {
    format!("node-{id}.pairvisor.unit")
}

/// The rustls crypto provider used everywhere (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Hex SHA-256 of a DER certificate.
pub fn fingerprint(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex SHA-256 of a secret (join tokens are stored by this hash only).
pub fn secret_hash(secret: &[u8]) -> String {
    fingerprint(secret)
}

/// Fresh random bytes from the operating system. Its failure (no entropy
/// source at all) is an error: a secret of zeroes would be guessable.
pub fn random_secret() -> Result<[u8; 32], TlsError> {
    let mut b = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map_err(|_| TlsError::NoRandom)?;
    Ok(b)
}

fn pem_cert(pem: &str, what: &str) -> Result<CertificateDer<'static>, TlsError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|_| TlsError::Pem { what: what.into() })
}

fn pem_key(pem: &str, what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|_| TlsError::Pem { what: what.into() })
}

fn ca_params(unit_name: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Pairvisor");
    dn.push(DnType::CommonName, format!("Pairvisor unit CA {unit_name}"));
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

fn node_params(unit_name: &str, id: NodeId) -> Result<CertificateParams, TlsError> {
    let mut p = CertificateParams::new(vec![node_name(id)])?;
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::OrganizationName,
        format!("Pairvisor unit {unit_name}"),
    );
    dn.push(DnType::CommonName, format!("pairvisor node {id}"));
    p.distinguished_name = dn;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    Ok(p)
}

/// A P-256 public key sent by a joining node (raw SubjectPublicKey bits).
struct RawPublicKey(Vec<u8>);

impl PublicKeyData for RawPublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// The unit's certificate authority: its certificate and private key.
#[derive(Clone)]
pub struct UnitCa {
    unit_name: String,
    cert_pem: String,
    key_pem: String,
}

impl fmt::Debug for UnitCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UnitCa")
            .field("unit_name", &self.unit_name)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl UnitCa {
    /// Creates a new CA for the unit `unit_name`.
    pub fn create(unit_name: &str) -> Result<UnitCa, TlsError> {
        let key = KeyPair::generate()?;
        let cert = ca_params(unit_name).self_signed(&key)?;
        Ok(UnitCa {
            unit_name: unit_name.to_string(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The hex SHA-256 fingerprint of the CA certificate.
    pub fn fingerprint(&self) -> Result<String, TlsError> {
        Ok(fingerprint(&pem_cert(
            &self.cert_pem,
            "the CA certificate",
        )?))
    }

    /// Signs a certificate for node `id` over `public_key` (raw P-256 point);
    /// returns the PEM certificate.
    pub fn sign_node(&self, id: NodeId, public_key: &[u8]) -> Result<String, TlsError> {
        if public_key.len() != 65 || public_key[0] != 4 {
            return Err(TlsError::BadPublicKey);
        }
        let key = KeyPair::from_pem(&self.key_pem)?;
        let issuer = Issuer::new(ca_params(&self.unit_name), key);
        let cert = node_params(&self.unit_name, id)?
            .signed_by(&RawPublicKey(public_key.to_vec()), &issuer)?;
        Ok(cert.pem())
    }

    /// Creates a complete identity (new key pair and certificate) for node
    /// `id`, e.g. for the first node at `unit init`.
    pub fn issue_identity(&self, id: NodeId, with_ca_key: bool) -> Result<NodeIdentity, TlsError> {
        let key = KeyPair::generate()?;
        let cert_pem = self.sign_node(id, key.public_key_raw())?;
        Ok(NodeIdentity {
            node_id: id,
            unit_name: self.unit_name.clone(),
            ca_cert_pem: self.cert_pem.clone(),
            cert_pem,
            key_pem: key.serialize_pem(),
            ca_key_pem: with_ca_key.then(|| self.key_pem.clone()),
        })
    }
}

/// A node's TLS identity: the unit CA certificate, the node's certificate and
/// key, and (on PMs) the CA key that lets it admit new nodes.
#[derive(Clone)]
pub struct NodeIdentity {
    /// The node this identity belongs to.
    pub node_id: NodeId,
    /// The unit's name.
    pub unit_name: String,
    /// The unit CA certificate (PEM).
    pub ca_cert_pem: String,
    /// This node's certificate (PEM).
    pub cert_pem: String,
    key_pem: String,
    ca_key_pem: Option<String>,
}

/// A node's certificate, key and the unit CA in PEM.
#[derive(Clone)]
pub struct NodePem {
    /// The unit CA certificate.
    pub ca_cert: String,
    /// This node's certificate.
    pub cert: String,
    /// This node's private key.
    pub key: String,
}

impl fmt::Debug for NodePem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NodePem { key: <redacted>, .. }")
    }
}

impl NodeIdentity {
    /// The certificate material in PEM (the key included: only for this
    /// node's own processes).
    pub fn node_pem(&self) -> NodePem {
        NodePem {
            ca_cert: self.ca_cert_pem.clone(),
            cert: self.cert_pem.clone(),
            key: self.key_pem.clone(),
        }
    }
}

impl fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("node_id", &self.node_id)
            .field("unit_name", &self.unit_name)
            .field("key", &"<redacted>")
            .field("holds_ca_key", &self.ca_key_pem.is_some())
            .finish()
    }
}

#[derive(Serialize, Deserialize)]
struct IdentityInfo {
    node_id: NodeId,
    unit_name: String,
}

const CA_CRT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const NODE_CRT: &str = "node.crt";
const NODE_KEY: &str = "node.key";
const INFO: &str = "identity.json";

fn write_file(dir: &Path, name: &str, data: &str, secret: bool) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&tmp)?;
    f.write_all(data.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))
}

impl NodeIdentity {
    /// Creates a new unit: a CA and node `id`'s identity holding the CA key.
    pub fn create_unit(unit_name: &str, id: NodeId) -> Result<NodeIdentity, TlsError> {
        UnitCa::create(unit_name)?.issue_identity(id, true)
    }

    /// The CA this identity can issue with, if it holds the CA key.
    pub fn ca(&self) -> Option<UnitCa> {
        self.ca_key_pem.as_ref().map(|k| UnitCa {
            unit_name: self.unit_name.clone(),
            cert_pem: self.ca_cert_pem.clone(),
            key_pem: k.clone(),
        })
    }

    /// The hex SHA-256 fingerprint of the unit CA certificate.
    pub fn ca_fingerprint(&self) -> Result<String, TlsError> {
        Ok(fingerprint(&pem_cert(
            &self.ca_cert_pem,
            "the CA certificate",
        )?))
    }

    /// Builds an identity from a freshly generated key and the certificate a
    /// PM issued for it.
    pub(crate) fn from_parts(
        node_id: NodeId,
        unit_name: String,
        ca_cert_pem: String,
        cert_pem: String,
        key_pem: String,
        ca_key_pem: Option<String>,
    ) -> NodeIdentity {
        NodeIdentity {
            node_id,
            unit_name,
            ca_cert_pem,
            cert_pem,
            key_pem,
            ca_key_pem,
        }
    }

    pub(crate) fn ca_key_pem(&self) -> Option<&str> {
        self.ca_key_pem.as_deref()
    }

    /// True if `dir` holds an identity.
    pub fn exists(dir: &Path) -> bool {
        dir.join(INFO).exists()
    }

    /// Writes the identity into `dir` (created if needed); keys are mode 0600.
    pub fn save(&self, dir: &Path) -> Result<(), TlsError> {
        let io = |source| TlsError::Io {
            dir: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        write_file(dir, CA_CRT, &self.ca_cert_pem, false).map_err(io)?;
        write_file(dir, NODE_CRT, &self.cert_pem, false).map_err(io)?;
        write_file(dir, NODE_KEY, &self.key_pem, true).map_err(io)?;
        if let Some(k) = &self.ca_key_pem {
            write_file(dir, CA_KEY, k, true).map_err(io)?;
        }
        let info = serde_json::to_string_pretty(&IdentityInfo {
            node_id: self.node_id,
            unit_name: self.unit_name.clone(),
        })
        .unwrap_or_default();
        // Written last: its presence means the identity is complete.
        write_file(dir, INFO, &info, false).map_err(io)?;
        Ok(())
    }

    /// Reads the identity saved in `dir`.
    pub fn load(dir: &Path) -> Result<NodeIdentity, TlsError> {
        let d = dir.display().to_string();
        if !Self::exists(dir) {
            return Err(TlsError::Missing { dir: d });
        }
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name)).map_err(|source| TlsError::Io {
                dir: d.clone(),
                source,
            })
        };
        let info: IdentityInfo =
            serde_json::from_str(&read(INFO)?).map_err(|_| TlsError::Pem { what: INFO.into() })?;
        let ca_key_pem = if dir.join(CA_KEY).exists() {
            Some(read(CA_KEY)?)
        } else {
            None
        };
        Ok(NodeIdentity {
            node_id: info.node_id,
            unit_name: info.unit_name,
            ca_cert_pem: read(CA_CRT)?,
            cert_pem: read(NODE_CRT)?,
            key_pem: read(NODE_KEY)?,
            ca_key_pem,
        })
    }

    fn roots(&self) -> Result<RootCertStore, TlsError> {
        let mut roots = RootCertStore::empty();
        roots.add(pem_cert(&self.ca_cert_pem, "the CA certificate")?)?;
        Ok(roots)
    }

    fn chain(&self) -> Result<Vec<CertificateDer<'static>>, TlsError> {
        Ok(vec![
            pem_cert(&self.cert_pem, "the node certificate")?,
            pem_cert(&self.ca_cert_pem, "the CA certificate")?,
        ])
    }

    /// The server side: presents this node's certificate (and the CA, so that
    /// joining nodes can pin it) and verifies client certificates against the
    /// unit CA. Clients without a certificate are let through the handshake
    /// but may only call the join endpoint.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(self.roots()?), provider())
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain()?, pem_key(&self.key_pem, "the node key")?)?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// The client side: presents this node's certificate and trusts only the
    /// unit CA (the server name checked is [`node_name`] of the target).
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain()?, pem_key(&self.key_pem, "the node key")?)?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(cfg))
    }
}

/// Tells whether a certificate of this unit names a given node (the CA
/// already verified the chain during the handshake; this binds the node id a
/// request claims to the certificate that sent it).
#[derive(Debug, Clone)]
pub(crate) struct NodeNameCheck {
    verifier: Arc<rustls::client::WebPkiServerVerifier>,
}

impl NodeNameCheck {
    /// True when `cert` is valid under the unit CA for node `id`.
    pub(crate) fn names(&self, cert: &CertificateDer<'_>, id: NodeId) -> bool {
        let Ok(name) = ServerName::try_from(node_name(id)) else {
            return false;
        };
        // Node certificates carry both server and client auth, so the
        // server-side check of the name applies to a client certificate.
        self.verifier
            .verify_server_cert(cert, &[], &name, &[], UnixTime::now())
            .is_ok()
    }
}

impl NodeIdentity {
    /// The name check for peers of this node's unit.
    pub(crate) fn node_name_check(&self) -> Result<NodeNameCheck, TlsError> {
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(self.roots()?),
            provider(),
        )
        .build()
        .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
        Ok(NodeNameCheck { verifier })
    }
}

/// A client configuration for a node that has no certificate yet: it accepts
/// a server only if the server's chain contains a CA certificate with the
/// pinned fingerprint and the server certificate is valid under that CA.
pub fn join_client_config(ca_fingerprint: &str) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier = PinnedCaVerifier {
        fingerprint: ca_fingerprint.to_ascii_lowercase(),
        provider: provider(),
    };
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

#[derive(Debug)]
struct PinnedCaVerifier {
    fingerprint: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| fingerprint(c) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the server does not present the unit CA named in the join token".into(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// What a new node needs to join: where to ask, which CA to trust, and a
/// one-time secret. Print it with `to_string()`; `Debug` hides the secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    /// `host:port` of the PM that issued the token (it holds the CA key).
    pub addr: String,
    /// That PM's node id (its certificate name is checked).
    pub issuer: NodeId,
    /// Hex SHA-256 of the unit CA certificate.
    pub ca_fingerprint: String,
    /// The node id the new node will have.
    pub node_id: NodeId,
    /// What the new node will be.
    pub role: NodeRole,
    /// The one-time secret (base64url).
    pub secret: String,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("addr", &self.addr)
            .field("issuer", &self.issuer)
            .field("ca_fingerprint", &self.ca_fingerprint)
            .field("node_id", &self.node_id)
            .field("role", &self.role)
            .field("secret", &"<redacted>")
            .finish()
    }
}

const TOKEN_PREFIX: &str = "pvjoin1.";

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let json = serde_json::to_vec(self).unwrap_or_default();
        write!(
            f,
            "{TOKEN_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
        )
    }
}

impl std::str::FromStr for JoinToken {
    type Err = TlsError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let body = s
            .trim()
            .strip_prefix(TOKEN_PREFIX)
            .ok_or(TlsError::BadToken)?;
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TlsError::BadToken)?;
        serde_json::from_slice(&json).map_err(|_| TlsError::BadToken)
    }
}

/// Decodes a base64url secret.
pub(crate) fn decode_b64(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .ok()
}

/// Encodes bytes as base64url.
pub(crate) fn encode_b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// Generates a key pair for a joining node: (private key PEM, raw public key).
pub(crate) fn new_node_key() -> Result<(String, Vec<u8>), TlsError> {
    let key = KeyPair::generate()?;
    Ok((key.serialize_pem(), key.public_key_raw().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trips_and_hides_secret() {
        let t = JoinToken {
            addr: "127.0.0.1:7000".into(),
            issuer: 1,
            ca_fingerprint: "ab".repeat(32),
            node_id: 3,
            role: NodeRole::Witness,
            secret: encode_b64(&random_secret().unwrap()),
        };
        let s = t.to_string();
        assert!(s.starts_with("pvjoin1."));
        let back: JoinToken = s.parse().unwrap();
        assert_eq!(back, t);
        assert!(!format!("{t:?}").contains(&t.secret));
        assert!("pvjoin1.!!".parse::<JoinToken>().is_err());
        assert!("hello".parse::<JoinToken>().is_err());
    }

    #[test]
    fn identity_debug_hides_keys_and_files_round_trip() {
        let id = NodeIdentity::create_unit("lab", 1).unwrap();
        let dbg = format!("{id:?}");
        assert!(!dbg.contains("PRIVATE KEY"), "{dbg}");
        assert!(!format!("{:?}", id.ca().unwrap()).contains("PRIVATE KEY"));
        let dir = tempfile::tempdir().unwrap();
        id.save(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join(NODE_KEY)).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.permissions().mode() & 0o777, 0o600);
        let back = NodeIdentity::load(dir.path()).unwrap();
        assert_eq!(back.cert_pem, id.cert_pem);
        assert!(back.ca().is_some());
        back.server_config().unwrap();
        back.client_config().unwrap();
        assert!(NodeIdentity::load(&dir.path().join("nope")).is_err());
    }

    #[test]
    fn sign_node_rejects_bad_keys() {
        let ca = UnitCa::create("lab").unwrap();
        assert!(matches!(
            ca.sign_node(2, &[1, 2, 3]),
            Err(TlsError::BadPublicKey)
        ));
        let (_, pk) = new_node_key().unwrap();
        let pem = ca.sign_node(2, &pk).unwrap();
        assert!(pem.contains("BEGIN CERTIFICATE"));
    }
}
