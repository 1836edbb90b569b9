//! A minimal qemu-guest-agent client: is the agent in the guest answering?
//!
//! QEMU's chardev socket serves one client at a time and keeps whatever a
//! previous client left unread, so every call connects, synchronises with
//! `guest-sync` and a fresh random id (discarding stale lines until the
//! matching reply), runs its command and disconnects.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Longest line accepted from the agent.
const MAX_LINE: u64 = 1024 * 1024;

/// Why the guest agent did not answer.
#[derive(Debug, Error)]
pub enum QgaError {
    /// The agent socket cannot be reached (VM without agent port, or QEMU gone).
    #[error("cannot connect to the guest agent socket {path}")]
    Connect {
        /// Socket path.
        path: String,
        /// The connect error.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("guest agent socket I/O failed")]
    Io(#[from] std::io::Error),
    /// The agent did not answer in time (not running in the guest, or the
    /// guest is paused or hung).
    #[error("the guest agent did not answer within {0:?}")]
    Timeout(Duration),
    /// The agent answered a command with an error.
    #[error("the guest agent refused {command}: {class}: {desc}")]
    Command {
        /// Command sent.
        command: String,
        /// Error class.
        class: String,
        /// Description.
        desc: String,
    },
    /// The socket closed before the agent answered.
    #[error("the guest agent socket closed before an answer")]
    Closed,
}

/// A fresh id for `guest-sync`: not cryptographic, only unlikely to repeat.
fn sync_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    // guest-sync ids are int; keep within the JSON-safe range.
    h.finish() & ((1 << 53) - 1)
}

/// Pings the guest agent behind `socket`: `guest-sync`, then `guest-ping`.
pub async fn guest_ping(socket: &Path, timeout: Duration) -> Result<(), QgaError> {
    match tokio::time::timeout(timeout, ping(socket)).await {
        Ok(result) => result,
        Err(_) => Err(QgaError::Timeout(timeout)),
    }
}

async fn ping(socket: &Path) -> Result<(), QgaError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| QgaError::Connect {
            path: socket.display().to_string(),
            source,
        })?;
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);

    let id = sync_id();
    // A leading newline ends any partial line a previous client left behind.
    write
        .write_all(
            format!(
                "\n{}\n",
                json!({"execute": "guest-sync", "arguments": {"id": id}})
            )
            .as_bytes(),
        )
        .await?;
    loop {
        let reply = read_message(&mut reader).await?;
        match reply {
            Some(v) if v.get("return").and_then(Value::as_u64) == Some(id) => break,
            Some(v) => tracing::debug!(line = %v, "discarding stale guest agent line"),
            None => continue,
        }
    }
    write.write_all(b"{\"execute\": \"guest-ping\"}\n").await?;
    loop {
        match read_message(&mut reader).await? {
            Some(v) if v.get("return").is_some() => return Ok(()),
            Some(v) if v.get("error").is_some() => {
                let field = |k: &str| {
                    v["error"]
                        .get(k)
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned()
                };
                return Err(QgaError::Command {
                    command: "guest-ping".into(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            _ => continue,
        }
    }
}

/// Reads one line; `None` for a line that is not JSON (skipped by callers).
async fn read_message(
    reader: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
) -> Result<Option<Value>, QgaError> {
    let mut line = Vec::new();
    let n = (&mut *reader)
        .take(MAX_LINE)
        .read_until(b'\n', &mut line)
        .await?;
    if n == 0 {
        return Err(QgaError::Closed);
    }
    // guest-sync-delimited replies start with 0xFF; tolerate it.
    let text = line.strip_prefix(&[0xff]).unwrap_or(&line);
    Ok(serde_json::from_slice(text).ok())
}
