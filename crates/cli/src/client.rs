//! A small REST client: base URL + bearer token, errors mapped to exit codes.

use crate::ExitCode;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::path::PathBuf;
use thiserror::Error;

/// A failed CLI request.
#[derive(Debug, Error)]
pub enum CliError {
    /// The daemon answered with an error body.
    #[error("{message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The API's error code.
        code: String,
        /// The API's message.
        message: String,
        /// The whole body.
        body: Value,
    },
    /// The daemon's certificate is not one this CLI trusts.
    #[error("the daemon at {url} presented a certificate this CLI does not trust ({detail}); give its CA with --ca-cert FILE (on a PM: DATA_DIR/tls/api-ca.pem), or set PAIRVISOR_CA_CERT")]
    Untrusted {
        /// The URL tried.
        url: String,
        /// What the TLS layer said.
        detail: String,
    },
    /// The daemon could not be reached.
    #[error("cannot reach the Pairvisor daemon at {url}: {source}; is `pairvisor serve` running? (set --url or PAIRVISOR_URL)")]
    Unreachable {
        /// The URL tried.
        url: String,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
    /// Local problem (config file, input file).
    #[error("{0}")]
    Local(String),
    /// Bad usage detected after parsing.
    #[error("{0}")]
    Usage(String),
}

impl CliError {
    /// The exit code for this error.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            CliError::Api { status, .. } => match status {
                401 => ExitCode::Unauthenticated,
                403 => ExitCode::Forbidden,
                404 => ExitCode::NotFound,
                409 => ExitCode::Conflict,
                400 | 413 | 422 => ExitCode::Invalid,
                _ => ExitCode::Failure,
            },
            CliError::Unreachable { .. } | CliError::Untrusted { .. } => ExitCode::Unreachable,
            CliError::Local(_) => ExitCode::Failure,
            CliError::Usage(_) => ExitCode::Usage,
        }
    }
}

/// Saved login: where the daemon is and the token.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, Default)]
pub struct Saved {
    /// Daemon base URL.
    pub url: Option<String>,
    /// Bearer token.
    pub token: Option<String>,
    /// The certificates trusted for `url` (PEM), saved at login.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
}

/// The certificates to trust for the daemon's HTTPS: `--ca-cert` /
/// `$PAIRVISOR_CA_CERT` first, then what the saved login trusted, then —
/// on a PM itself — the local daemon's own API CA
/// (`$PAIRVISOR_DATA_DIR` or `/var/lib/pairvisor`, `tls/api-ca.pem`).
pub fn trust_pem(
    ca_file: Option<&std::path::Path>,
    saved: &Saved,
) -> Result<Option<String>, CliError> {
    if let Some(f) = ca_file {
        return std::fs::read_to_string(f)
            .map(Some)
            .map_err(|e| CliError::Local(format!("cannot read the CA file {}: {e}", f.display())));
    }
    if saved.ca_pem.is_some() {
        return Ok(saved.ca_pem.clone());
    }
    let data = std::env::var_os("PAIRVISOR_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/pairvisor"));
    Ok(std::fs::read_to_string(data.join("tls/api-ca.pem")).ok())
}

/// An HTTP client that trusts exactly `pem`'s certificates (no public CAs:
/// a PM's API is vouched for by its own or the administrator's CA).
pub fn http_client(pem: Option<&str>) -> Result<reqwest::Client, CliError> {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false);
    if let Some(pem) = pem {
        let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
            .map_err(|e| CliError::Local(format!("the CA certificates are not valid PEM: {e}")))?;
        if certs.is_empty() {
            return Err(CliError::Local(
                "the CA file holds no CERTIFICATE block".into(),
            ));
        }
        for c in certs {
            b = b.add_root_certificate(c);
        }
    }
    b.build()
        .map_err(|e| CliError::Local(format!("cannot set up HTTPS: {e}")))
}

/// Tells a certificate problem from other transport errors.
fn certificate_problem(e: &reqwest::Error) -> Option<String> {
    let mut src: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = src {
        let text = s.to_string();
        if text.contains("certificate") || text.contains("UnknownIssuer") {
            return Some(text);
        }
        src = s.source();
    }
    None
}

/// Where `pairvisor login` saves the token: `$PAIRVISOR_CONFIG`, else
/// `$HOME/.config/pairvisor/cli.json`.
pub fn config_path() -> PathBuf {
    if let Some(p) = std::env::var_os("PAIRVISOR_CONFIG") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".config/pairvisor/cli.json")
}

/// Reads the saved login, if any.
pub fn load_saved() -> Saved {
    std::fs::read(config_path())
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Saves the login (file mode 0600: it holds a token).
pub fn save(saved: &Saved) -> Result<(), CliError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = config_path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| CliError::Local(format!("cannot create {}: {e}", dir.display())))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| CliError::Local(format!("cannot write {}: {e}", path.display())))?;
    f.write_all(&serde_json::to_vec_pretty(saved).unwrap_or_default())
        .map_err(|e| CliError::Local(format!("cannot write {}: {e}", path.display())))
}

/// A REST client for one daemon.
pub struct Client {
    http: reqwest::Client,
    /// Base URL, e.g. `https://127.0.0.1:7480`.
    pub url: String,
    token: Option<String>,
}

impl Client {
    /// A client for `url` with an optional bearer token that trusts `pem`'s
    /// certificates (see [`trust_pem`]).
    pub fn with_trust(
        url: String,
        token: Option<String>,
        pem: Option<&str>,
    ) -> Result<Self, CliError> {
        Ok(Client {
            http: http_client(pem)?,
            url: url.trim_end_matches('/').to_string(),
            token,
        })
    }

    /// Maps a transport error: certificate problems get their own advice.
    fn transport(&self, source: reqwest::Error) -> CliError {
        match certificate_problem(&source) {
            Some(detail) => CliError::Untrusted {
                url: self.url.clone(),
                detail,
            },
            None => CliError::Unreachable {
                url: self.url.clone(),
                source,
            },
        }
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self
            .http
            .request(method, format!("{}/api/v1{path}", self.url));
        if let Some(t) = &self.token {
            r = r.bearer_auth(t);
        }
        r
    }

    async fn send(&self, rb: reqwest::RequestBuilder) -> Result<reqwest::Response, CliError> {
        let resp = rb.send().await.map_err(|e| self.transport(e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        Err(CliError::Api {
            status,
            code: body["code"].as_str().unwrap_or("error").to_string(),
            message: body["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("the daemon answered HTTP {status}")),
            body,
        })
    }

    /// Sends a request with an optional JSON body; returns the JSON answer
    /// (`null` for empty answers).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, CliError> {
        let mut rb = self.req(method, path);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let resp = self.send(rb).await?;
        let bytes = resp.bytes().await.map_err(|source| CliError::Unreachable {
            url: self.url.clone(),
            source,
        })?;
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        Ok(serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into())))
    }

    /// Like [`Client::call`] with one extra request header (e.g. the mark of
    /// an already forwarded request, to ask this very PM).
    pub async fn call_with_header(
        &self,
        method: reqwest::Method,
        path: &str,
        header: (&str, &str),
    ) -> Result<Value, CliError> {
        let rb = self.req(method, path).header(header.0, header.1);
        let resp = self.send(rb).await?;
        resp.json().await.map_err(|source| CliError::Unreachable {
            url: self.url.clone(),
            source,
        })
    }

    /// GET and decode.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, CliError> {
        let v = self.call(reqwest::Method::GET, path, None).await?;
        serde_json::from_value(v)
            .map_err(|e| CliError::Local(format!("unexpected answer from the daemon: {e}")))
    }

    /// Uploads a file as the raw body of a PUT.
    pub async fn upload(&self, path: &str, file: &std::path::Path) -> Result<Value, CliError> {
        let f = tokio::fs::File::open(file)
            .await
            .map_err(|e| CliError::Local(format!("cannot open {}: {e}", file.display())))?;
        let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
        let stream = tokio_util_stream(f);
        let rb = self
            .req(reqwest::Method::PUT, path)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .header(reqwest::header::CONTENT_LENGTH, len)
            .body(reqwest::Body::wrap_stream(stream));
        let resp = self.send(rb).await?;
        resp.json().await.map_err(|source| CliError::Unreachable {
            url: self.url.clone(),
            source,
        })
    }

    /// Streams a text response to stdout (console follow).
    pub async fn stream_to_stdout(&self, path: &str) -> Result<(), CliError> {
        use futures_util::StreamExt;
        use std::io::Write;
        let resp = self.send(self.req(reqwest::Method::GET, path)).await?;
        let mut s = resp.bytes_stream();
        let mut out = std::io::stdout();
        while let Some(chunk) = s.next().await {
            let chunk = chunk.map_err(|source| CliError::Unreachable {
                url: self.url.clone(),
                source,
            })?;
            let _ = out.write_all(&chunk);
            let _ = out.flush();
        }
        Ok(())
    }
}

/// Reads a file in 64 KiB chunks as a stream (for uploads).
fn tokio_util_stream(
    f: tokio::fs::File,
) -> impl futures_util::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures_util::stream::unfold(f, |mut f| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 64 * 1024];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(buf), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    })
}
