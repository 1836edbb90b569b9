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
            CliError::Unreachable { .. } => ExitCode::Unreachable,
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
    /// Base URL, e.g. `http://127.0.0.1:7480`.
    pub url: String,
    token: Option<String>,
}

impl Client {
    /// A client for `url` with an optional bearer token.
    pub fn new(url: String, token: Option<String>) -> Self {
        Client {
            http: reqwest::Client::new(),
            url: url.trim_end_matches('/').to_string(),
            token,
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
        let resp = rb.send().await.map_err(|source| CliError::Unreachable {
            url: self.url.clone(),
            source,
        })?;
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
