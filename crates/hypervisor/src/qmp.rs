//! An async QMP (QEMU Machine Protocol) client over a Unix socket.
//!
//! [`QmpClient::connect`] reads the greeting and negotiates capabilities;
//! then a reader task dispatches replies to the waiting callers by `id` (so
//! several commands may be in flight from different tasks) and broadcasts
//! events ([`QmpEvent`]). When the socket reaches EOF every waiter gets
//! [`QmpError::ConnectionClosed`] and subscribers get
//! [`QmpEvent::Disconnected`].
//!
//! Nothing QEMU sends can make this module panic: malformed lines are logged
//! and skipped, overlong lines close the connection.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Map, Value};
use thiserror::Error;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// Longest QMP line accepted (a `query-*` reply of a big VM is well below).
pub const MAX_LINE: u64 = 16 * 1024 * 1024;
/// Events buffered per subscriber before it lags.
const EVENT_CAPACITY: usize = 256;

/// What went wrong talking QMP.
#[derive(Debug, Error)]
pub enum QmpError {
    /// QEMU answered the command with an error.
    #[error("QEMU refused {command}: {class}: {desc}")]
    Command {
        /// The command sent.
        command: String,
        /// QEMU's error class, e.g. `GenericError`, `CommandNotFound`, `DeviceNotFound`.
        class: String,
        /// QEMU's human-readable description.
        desc: String,
    },
    /// Reading from or writing to the socket failed.
    #[error("QMP socket I/O failed")]
    Io(#[from] std::io::Error),
    /// QEMU sent something that is not QMP as we know it.
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    /// The connection is closed: QEMU has exited or is exiting.
    #[error("QMP connection closed (QEMU has exited or is exiting)")]
    ConnectionClosed,
    /// No greeting arrived in time (QEMU busy, or another client holds the monitor).
    #[error("no QMP greeting within {0:?} (is another client connected to the monitor?)")]
    GreetingTimeout(Duration),
}

impl QmpError {
    /// The QEMU error class when QEMU refused a command.
    pub fn class(&self) -> Option<&str> {
        match self {
            QmpError::Command { class, .. } => Some(class),
            _ => None,
        }
    }
}

/// An asynchronous event from QEMU.
#[derive(Debug, Clone, PartialEq)]
pub enum QmpEvent {
    /// QEMU is shutting down. `guest` is true when the guest asked for it
    /// (ACPI power off); `reason` is QEMU's ShutdownCause (`guest-shutdown`,
    /// `host-qmp-quit`, `host-signal`, ...).
    Shutdown {
        /// The guest initiated the shutdown.
        guest: bool,
        /// QEMU's reason string.
        reason: String,
    },
    /// The VM was reset.
    Reset {
        /// The guest initiated the reset.
        guest: bool,
    },
    /// The guest reported a panic (pvpanic); `action` is what QEMU did
    /// (`pause` with our `-action panic=pause`).
    GuestPanicked {
        /// QEMU's action: `pause`, `poweroff` or `run`.
        action: String,
    },
    /// The vCPUs stopped.
    Stop,
    /// The vCPUs resumed.
    Resume,
    /// A detached `dump-guest-memory` finished.
    DumpCompleted {
        /// Why the dump failed, if it did.
        error: Option<String>,
    },
    /// Any other event.
    Other {
        /// Event name, e.g. `DEVICE_TRAY_MOVED`.
        name: String,
        /// Event data (`{}` when QEMU sent none).
        data: Value,
    },
    /// Synthetic: the QMP socket reached EOF (QEMU exited or is exiting).
    Disconnected,
}

impl QmpEvent {
    /// Parses an event message's `event` name and `data`.
    pub fn from_parts(name: &str, data: Value) -> QmpEvent {
        let str_field = |key: &str| data.get(key).and_then(Value::as_str).map(str::to_owned);
        let bool_field = |key: &str| data.get(key).and_then(Value::as_bool);
        match name {
            "SHUTDOWN" => QmpEvent::Shutdown {
                guest: bool_field("guest").unwrap_or(false),
                reason: str_field("reason").unwrap_or_default(),
            },
            "RESET" => QmpEvent::Reset {
                guest: bool_field("guest").unwrap_or(false),
            },
            "GUEST_PANICKED" => QmpEvent::GuestPanicked {
                action: str_field("action").unwrap_or_default(),
            },
            "STOP" => QmpEvent::Stop,
            "RESUME" => QmpEvent::Resume,
            "DUMP_COMPLETED" => QmpEvent::DumpCompleted {
                error: str_field("error"),
            },
            _ => QmpEvent::Other {
                name: name.to_owned(),
                data,
            },
        }
    }
}

/// QEMU's version as announced in the QMP greeting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpGreeting {
    /// Major version.
    pub major: u64,
    /// Minor version.
    pub minor: u64,
    /// Micro version.
    pub micro: u64,
    /// Distribution package string, e.g. `Debian 1:7.2+dfsg-7+deb12u18`.
    pub package: String,
    /// Capabilities offered (e.g. `oob`); we enable none.
    pub capabilities: Vec<String>,
}

/// QEMU's run state (`query-status`), QAPI `RunState`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunState {
    /// Guest code runs.
    Running,
    /// Stopped by `stop` (a VM started with `-S` is `Prelaunch` until its first `cont`).
    Paused,
    /// Started with `-S`, never run yet.
    Prelaunch,
    /// Paused because the guest panicked (`-action panic=pause`).
    GuestPanicked,
    /// The guest shut down; QEMU stays only with `-no-shutdown`.
    Shutdown,
    /// Waiting for an incoming migration.
    Inmigrate,
    /// Migrated away; this QEMU must not continue.
    Postmigrate,
    /// Finishing an outgoing migration.
    FinishMigrate,
    /// Paused for an I/O error.
    IoError,
    /// An internal error stopped the VM.
    InternalError,
    /// Paused by the gdb stub.
    Debug,
    /// Saving the VM (also while `dump-guest-memory` runs).
    SaveVm,
    /// Restoring a snapshot.
    RestoreVm,
    /// The guest is suspended (S3).
    Suspended,
    /// Paused by a watchdog.
    Watchdog,
    /// COLO fault tolerance state.
    Colo,
    /// A state this code does not know.
    Unknown(String),
}

impl RunState {
    /// Maps QEMU's status string.
    pub fn parse(s: &str) -> RunState {
        match s {
            "running" => RunState::Running,
            "paused" => RunState::Paused,
            "prelaunch" => RunState::Prelaunch,
            "guest-panicked" => RunState::GuestPanicked,
            "shutdown" => RunState::Shutdown,
            "inmigrate" => RunState::Inmigrate,
            "postmigrate" => RunState::Postmigrate,
            "finish-migrate" => RunState::FinishMigrate,
            "io-error" => RunState::IoError,
            "internal-error" => RunState::InternalError,
            "debug" => RunState::Debug,
            "save-vm" => RunState::SaveVm,
            "restore-vm" => RunState::RestoreVm,
            "suspended" => RunState::Suspended,
            "watchdog" => RunState::Watchdog,
            "colo" => RunState::Colo,
            other => RunState::Unknown(other.to_owned()),
        }
    }
}

/// State of a `dump-guest-memory` job (`query-dump`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DumpStatus {
    /// No dump has been started.
    None,
    /// A dump is being written.
    Active,
    /// The last dump finished.
    Completed,
    /// The last dump failed.
    Failed,
}

/// Progress of a `dump-guest-memory` job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DumpProgress {
    /// Job state.
    pub status: DumpStatus,
    /// Bytes written so far.
    pub completed: u64,
    /// Bytes to write.
    pub total: u64,
}

/// Entry of `x-query-virtio`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtioDevice {
    /// QOM path of the virtio backend, e.g. `/machine/peripheral/nic0/virtio-backend`.
    pub path: String,
    /// Device type, e.g. `virtio-net`.
    pub name: String,
}

type Reply = Result<Value, QmpError>;
type Pending = Arc<Mutex<Option<HashMap<u64, (String, oneshot::Sender<Reply>)>>>>;

/// A connected QMP client. Cheap to clone; the connection closes when the
/// last clone is dropped.
#[derive(Clone)]
pub struct QmpClient {
    inner: Arc<Inner>,
}

struct Inner {
    greeting: QmpGreeting,
    next_id: AtomicU64,
    /// Waiters by id; `None` once the connection is closed.
    pending: Pending,
    writes: mpsc::UnboundedSender<(u64, Vec<u8>)>,
    events: broadcast::Sender<QmpEvent>,
    closed: watch::Receiver<bool>,
    tasks: [JoinHandle<()>; 2],
}

impl Drop for Inner {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl std::fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpClient")
            .field("greeting", &self.inner.greeting)
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// Reads one `\n`-terminated line of at most [`MAX_LINE`] bytes. `None` at EOF.
async fn read_line<R: AsyncBufRead + Unpin>(reader: &mut R) -> Result<Option<Vec<u8>>, QmpError> {
    let mut line = Vec::new();
    let n = (&mut *reader)
        .take(MAX_LINE)
        .read_until(b'\n', &mut line)
        .await?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        if n as u64 >= MAX_LINE {
            return Err(QmpError::Protocol(format!(
                "QEMU sent a line longer than {MAX_LINE} bytes"
            )));
        }
        // EOF in the middle of a line: treat as closed.
        return Ok(None);
    }
    Ok(Some(line))
}

fn parse_json(line: &[u8]) -> Result<Value, QmpError> {
    serde_json::from_slice(line).map_err(|e| {
        QmpError::Protocol(format!(
            "QEMU sent invalid JSON ({e}): {}",
            String::from_utf8_lossy(&line[..line.len().min(200)]).trim_end()
        ))
    })
}

fn parse_greeting(v: &Value) -> Result<QmpGreeting, QmpError> {
    let qmp = v.get("QMP").ok_or_else(|| {
        QmpError::Protocol(format!("expected a QMP greeting, got {}", truncate(v)))
    })?;
    let version = qmp.get("version").and_then(|v| v.get("qemu"));
    let num = |k: &str| {
        version
            .and_then(|v| v.get(k))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    Ok(QmpGreeting {
        major: num("major"),
        minor: num("minor"),
        micro: num("micro"),
        package: qmp
            .get("version")
            .and_then(|v| v.get("package"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .trim()
            .to_owned(),
        capabilities: qmp
            .get("capabilities")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default(),
    })
}

fn truncate(v: &Value) -> String {
    let mut s = v.to_string();
    if s.len() > 200 {
        let mut cut = 200;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// Turns a reply message into the command's result.
fn reply_result(command: &str, msg: &Value) -> Reply {
    if let Some(ret) = msg.get("return") {
        return Ok(ret.clone());
    }
    if let Some(err) = msg.get("error") {
        let field = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
        return Err(QmpError::Command {
            command: command.to_owned(),
            class: field("class"),
            desc: field("desc"),
        });
    }
    Err(QmpError::Protocol(format!(
        "reply to {command} has neither return nor error: {}",
        truncate(msg)
    )))
}

impl QmpClient {
    /// Connects to the QMP socket at `path`, reads the greeting and enters
    /// command mode. `greeting_timeout` bounds the wait for the greeting and
    /// the capabilities reply (QEMU serves one monitor client at a time; a
    /// second client waits silently).
    pub async fn connect(path: &Path, greeting_timeout: Duration) -> Result<QmpClient, QmpError> {
        let stream = UnixStream::connect(path).await?;
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let handshake = async {
            let line = read_line(&mut reader)
                .await?
                .ok_or(QmpError::ConnectionClosed)?;
            let greeting = parse_greeting(&parse_json(&line)?)?;
            write
                .write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
                .await?;
            loop {
                let line = read_line(&mut reader)
                    .await?
                    .ok_or(QmpError::ConnectionClosed)?;
                let msg = parse_json(&line)?;
                if msg.get("event").is_some() {
                    continue;
                }
                reply_result("qmp_capabilities", &msg)?;
                return Ok::<_, QmpError>(greeting);
            }
        };
        let greeting = tokio::time::timeout(greeting_timeout, handshake)
            .await
            .map_err(|_| QmpError::GreetingTimeout(greeting_timeout))??;
        Ok(Self::start(greeting, reader, write))
    }

    fn start(
        greeting: QmpGreeting,
        reader: BufReader<OwnedReadHalf>,
        write: OwnedWriteHalf,
    ) -> QmpClient {
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let (closed_tx, closed) = watch::channel(false);
        let (writes, write_rx) = mpsc::unbounded_channel();
        let reader_task = tokio::spawn(read_loop(
            reader,
            pending.clone(),
            events.clone(),
            closed_tx,
        ));
        let writer_task = tokio::spawn(write_loop(write, write_rx, pending.clone()));
        QmpClient {
            inner: Arc::new(Inner {
                greeting,
                next_id: AtomicU64::new(1),
                pending,
                writes,
                events,
                closed,
                tasks: [reader_task, writer_task],
            }),
        }
    }

    /// QEMU's greeting (its version).
    pub fn greeting(&self) -> &QmpGreeting {
        &self.inner.greeting
    }

    /// A receiver for events from now on. Also receives
    /// [`QmpEvent::Disconnected`] at EOF (unless the connection is already
    /// closed: check [`QmpClient::is_closed`]).
    pub fn subscribe(&self) -> broadcast::Receiver<QmpEvent> {
        self.inner.events.subscribe()
    }

    /// Whether the socket reached EOF or failed.
    pub fn is_closed(&self) -> bool {
        *self.inner.closed.borrow()
    }

    /// Resolves when the connection is closed.
    pub async fn closed(&self) {
        let mut rx = self.inner.closed.clone();
        // An error means the reader task is gone, which also means closed.
        let _ = rx.wait_for(|closed| *closed).await;
    }

    /// Runs `command` with optional `arguments` (a JSON object) and returns
    /// QEMU's `return` value. Cancel-safe: dropping the future leaves the
    /// connection usable.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = Map::new();
        msg.insert("execute".into(), Value::String(command.to_owned()));
        if let Some(args) = arguments {
            msg.insert("arguments".into(), args);
        }
        msg.insert("id".into(), Value::from(id));
        let mut line = serde_json::to_vec(&Value::Object(msg))
            .map_err(|e| QmpError::Protocol(format!("cannot encode {command}: {e}")))?;
        line.push(b'\n');

        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.inner.pending.lock().unwrap_or_else(|e| e.into_inner());
            match pending.as_mut() {
                Some(map) => map.insert(id, (command.to_owned(), tx)),
                None => return Err(QmpError::ConnectionClosed),
            };
        }
        tracing::trace!(command, id, "QMP execute");
        if self.inner.writes.send((id, line)).is_err() {
            return Err(QmpError::ConnectionClosed);
        }
        rx.await.unwrap_or(Err(QmpError::ConnectionClosed))
    }

    /// `query-status`: the run state.
    pub async fn query_status(&self) -> Result<RunState, QmpError> {
        let ret = self.execute("query-status", None).await?;
        ret.get("status")
            .and_then(Value::as_str)
            .map(RunState::parse)
            .ok_or_else(|| {
                QmpError::Protocol(format!(
                    "query-status returned no status: {}",
                    truncate(&ret)
                ))
            })
    }

    /// `cont`: start or resume the vCPUs.
    pub async fn cont(&self) -> Result<(), QmpError> {
        self.execute("cont", None).await.map(drop)
    }

    /// `stop`: pause the vCPUs.
    pub async fn stop(&self) -> Result<(), QmpError> {
        self.execute("stop", None).await.map(drop)
    }

    /// `system_powerdown`: press the ACPI power button.
    pub async fn system_powerdown(&self) -> Result<(), QmpError> {
        self.execute("system_powerdown", None).await.map(drop)
    }

    /// `system_reset`: hard reset.
    pub async fn system_reset(&self) -> Result<(), QmpError> {
        self.execute("system_reset", None).await.map(drop)
    }

    /// `quit`: QEMU exits at once. A connection closed before the reply counts
    /// as success.
    pub async fn quit(&self) -> Result<(), QmpError> {
        match self.execute("quit", None).await {
            Ok(_) | Err(QmpError::ConnectionClosed) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `query-block`: the block devices, as QEMU reports them.
    pub async fn query_block(&self) -> Result<Vec<Value>, QmpError> {
        match self.execute("query-block", None).await? {
            Value::Array(devices) => Ok(devices),
            other => Err(QmpError::Protocol(format!(
                "query-block returned {}",
                truncate(&other)
            ))),
        }
    }

    /// `dump-guest-memory` as an ELF file at `path`, detached (returns at
    /// once; watch [`QmpEvent::DumpCompleted`] or [`QmpClient::query_dump`]).
    pub async fn dump_guest_memory(&self, path: &str) -> Result<(), QmpError> {
        self.execute(
            "dump-guest-memory",
            Some(json!({
                "paging": false,
                "protocol": format!("file:{path}"),
                "detach": true,
                "format": "elf",
            })),
        )
        .await
        .map(drop)
    }

    /// `query-dump`: progress of the current or last dump.
    pub async fn query_dump(&self) -> Result<DumpProgress, QmpError> {
        let ret = self.execute("query-dump", None).await?;
        let status = match ret.get("status").and_then(Value::as_str) {
            Some("none") => DumpStatus::None,
            Some("active") => DumpStatus::Active,
            Some("completed") => DumpStatus::Completed,
            Some("failed") => DumpStatus::Failed,
            _ => {
                return Err(QmpError::Protocol(format!(
                    "query-dump returned {}",
                    truncate(&ret)
                )))
            }
        };
        let num = |k: &str| ret.get(k).and_then(Value::as_u64).unwrap_or(0);
        Ok(DumpProgress {
            status,
            completed: num("completed"),
            total: num("total"),
        })
    }

    /// `blockdev-change-medium` on device `id`: inserts the raw image at
    /// `path` read-only, forcing the tray open if the guest locked it.
    pub async fn blockdev_change_medium(&self, id: &str, path: &str) -> Result<(), QmpError> {
        self.execute(
            "blockdev-change-medium",
            Some(json!({
                "id": id,
                "filename": path,
                "format": "raw",
                "read-only-mode": "read-only",
                "force": true,
            })),
        )
        .await
        .map(drop)
    }

    /// `blockdev-open-tray` on device `id`, with `force` (ignore a guest lock).
    pub async fn blockdev_open_tray(&self, id: &str, force: bool) -> Result<(), QmpError> {
        self.execute(
            "blockdev-open-tray",
            Some(json!({"id": id, "force": force})),
        )
        .await
        .map(drop)
    }

    /// `blockdev-remove-medium` on device `id` (its tray must be open).
    pub async fn blockdev_remove_medium(&self, id: &str) -> Result<(), QmpError> {
        self.execute("blockdev-remove-medium", Some(json!({"id": id})))
            .await
            .map(drop)
    }

    /// `blockdev-close-tray` on device `id`.
    pub async fn blockdev_close_tray(&self, id: &str) -> Result<(), QmpError> {
        self.execute("blockdev-close-tray", Some(json!({"id": id})))
            .await
            .map(drop)
    }

    /// `x-query-virtio` (QEMU ≥ 7.2, unstable): the virtio devices.
    pub async fn query_virtio(&self) -> Result<Vec<VirtioDevice>, QmpError> {
        let ret = self.execute("x-query-virtio", None).await?;
        let list = ret.as_array().ok_or_else(|| {
            QmpError::Protocol(format!("x-query-virtio returned {}", truncate(&ret)))
        })?;
        Ok(list
            .iter()
            .filter_map(|d| {
                Some(VirtioDevice {
                    path: d.get("path")?.as_str()?.to_owned(),
                    name: d.get("name")?.as_str()?.to_owned(),
                })
            })
            .collect())
    }

    /// `x-query-virtio-status` for the backend at QOM `path`: the device
    /// status bits the driver set (e.g. `VIRTIO_CONFIG_S_DRIVER_OK: …`).
    pub async fn query_virtio_status(&self, path: &str) -> Result<Vec<String>, QmpError> {
        let ret = self
            .execute("x-query-virtio-status", Some(json!({"path": path})))
            .await?;
        Ok(ret
            .get("status")
            .and_then(|s| s.get("statuses"))
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default())
    }
}

async fn write_loop(
    mut write: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<(u64, Vec<u8>)>,
    pending: Pending,
) {
    while let Some((id, line)) = rx.recv().await {
        if let Err(e) = write.write_all(&line).await {
            tracing::debug!(error = %e, "QMP write failed");
            let waiter = pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_mut()
                .and_then(|m| m.remove(&id));
            if let Some((_, tx)) = waiter {
                let _ = tx.send(Err(QmpError::Io(e)));
            }
        }
    }
}

async fn read_loop(
    mut reader: BufReader<OwnedReadHalf>,
    pending: Pending,
    events: broadcast::Sender<QmpEvent>,
    closed: watch::Sender<bool>,
) {
    loop {
        let line = match read_line(&mut reader).await {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(e) => {
                tracing::warn!(error = %e, "QMP connection failed; closing it");
                break;
            }
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let msg = match parse_json(&line) {
            Ok(msg) => msg,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring QMP line");
                continue;
            }
        };
        if let Some(name) = msg.get("event").and_then(Value::as_str) {
            let data = msg.get("data").cloned().unwrap_or_else(|| json!({}));
            let event = QmpEvent::from_parts(name, data);
            tracing::debug!(?event, "QMP event");
            // No subscribers is fine.
            let _ = events.send(event);
            continue;
        }
        let Some(id) = msg.get("id").and_then(Value::as_u64) else {
            tracing::warn!(message = %truncate(&msg), "ignoring QMP message without a known id");
            continue;
        };
        let waiter = pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
            .and_then(|m| m.remove(&id));
        match waiter {
            Some((command, tx)) => {
                // The caller may have given up; that is fine.
                let _ = tx.send(reply_result(&command, &msg));
            }
            None => tracing::debug!(id, "QMP reply for a caller that gave up"),
        }
    }
    // Closed: fail every waiter, refuse new commands, tell subscribers.
    let waiters = pending.lock().unwrap_or_else(|e| e.into_inner()).take();
    for (_, (_, tx)) in waiters.into_iter().flatten() {
        let _ = tx.send(Err(QmpError::ConnectionClosed));
    }
    let _ = closed.send(true);
    let _ = events.send(QmpEvent::Disconnected);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::UnixListener;

    #[test]
    fn events_are_typed() {
        assert_eq!(
            QmpEvent::from_parts(
                "SHUTDOWN",
                json!({"guest": true, "reason": "guest-shutdown"})
            ),
            QmpEvent::Shutdown {
                guest: true,
                reason: "guest-shutdown".into()
            }
        );
        assert_eq!(
            QmpEvent::from_parts(
                "RESET",
                json!({"guest": false, "reason": "host-qmp-system-reset"})
            ),
            QmpEvent::Reset { guest: false }
        );
        assert_eq!(
            QmpEvent::from_parts("GUEST_PANICKED", json!({"action": "pause", "info": {}})),
            QmpEvent::GuestPanicked {
                action: "pause".into()
            }
        );
        assert_eq!(QmpEvent::from_parts("STOP", json!({})), QmpEvent::Stop);
        assert_eq!(QmpEvent::from_parts("RESUME", json!({})), QmpEvent::Resume);
        assert_eq!(
            QmpEvent::from_parts(
                "DUMP_COMPLETED",
                json!({"result": {"status": "failed"}, "error": "disk full"})
            ),
            QmpEvent::DumpCompleted {
                error: Some("disk full".into())
            }
        );
        assert_eq!(
            QmpEvent::from_parts("DUMP_COMPLETED", json!({"result": {"status": "completed"}})),
            QmpEvent::DumpCompleted { error: None }
        );
        // Wrong types do not panic.
        assert_eq!(
            QmpEvent::from_parts("SHUTDOWN", json!([1, 2])),
            QmpEvent::Shutdown {
                guest: false,
                reason: String::new()
            }
        );
        assert!(matches!(
            QmpEvent::from_parts("BLOCK_JOB_READY", json!({})),
            QmpEvent::Other { .. }
        ));
    }

    #[test]
    fn run_states() {
        assert_eq!(RunState::parse("guest-panicked"), RunState::GuestPanicked);
        assert_eq!(RunState::parse("inmigrate"), RunState::Inmigrate);
        assert_eq!(RunState::parse("postmigrate"), RunState::Postmigrate);
        assert_eq!(
            RunState::parse("new-state"),
            RunState::Unknown("new-state".into())
        );
    }

    /// A fake QEMU that speaks scripted QMP, to check the client against
    /// things real QEMU rarely does (garbage, out-of-order replies).
    async fn fake_qemu(
        script: impl FnOnce(UnixStream) -> tokio::task::JoinHandle<()>,
    ) -> (tempfile::TempDir, QmpClient) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7}, \"package\": \"\"}, \"capabilities\": [\"oob\"]}}\r\n")
                .await
                .unwrap();
            let mut r = BufReader::new(&mut s);
            let mut line = String::new();
            r.read_line(&mut line).await.unwrap();
            assert!(line.contains("qmp_capabilities"));
            s.write_all(b"{\"return\": {}}\r\n").await.unwrap();
            s
        });
        let client = QmpClient::connect(&path, Duration::from_secs(5))
            .await
            .unwrap();
        let stream = server.await.unwrap();
        script(stream);
        (dir, client)
    }

    #[tokio::test]
    async fn replies_are_matched_by_id_and_garbage_is_skipped() {
        let (_dir, client) = fake_qemu(|s| {
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                let mut r = BufReader::new(r);
                let mut ids = Vec::new();
                for _ in 0..2 {
                    let mut line = String::new();
                    r.read_line(&mut line).await.unwrap();
                    let v: Value = serde_json::from_str(&line).unwrap();
                    ids.push((v["execute"].as_str().unwrap().to_owned(), v["id"].clone()));
                }
                w.write_all(b"this is not json\r\n{\"unexpected\": 1}\r\n")
                    .await
                    .unwrap();
                w.write_all(b"{\"event\": \"STOP\", \"timestamp\": {}}\r\n")
                    .await
                    .unwrap();
                // Answer in reverse order.
                for (cmd, id) in ids.into_iter().rev() {
                    let reply = if cmd == "bad" {
                        json!({"error": {"class": "CommandNotFound", "desc": "no"}, "id": id})
                    } else {
                        json!({"return": {"cmd": cmd}, "id": id})
                    };
                    w.write_all(format!("{reply}\r\n").as_bytes())
                        .await
                        .unwrap();
                }
                // Then hang up.
            })
        })
        .await;
        assert_eq!(client.greeting().minor, 2);
        let mut events = client.subscribe();
        let (a, b) = tokio::join!(client.execute("good", None), client.execute("bad", None));
        assert_eq!(a.unwrap(), json!({"cmd": "good"}));
        match b.unwrap_err() {
            QmpError::Command {
                command,
                class,
                desc,
            } => {
                assert_eq!(
                    (command.as_str(), class.as_str(), desc.as_str()),
                    ("bad", "CommandNotFound", "no")
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(events.recv().await.unwrap(), QmpEvent::Stop);
        assert_eq!(events.recv().await.unwrap(), QmpEvent::Disconnected);
        client.closed().await;
        assert!(matches!(
            client.execute("late", None).await,
            Err(QmpError::ConnectionClosed)
        ));
    }

    #[tokio::test]
    async fn eof_fails_waiters() {
        let (_dir, client) = fake_qemu(|s| {
            tokio::spawn(async move {
                let mut r = BufReader::new(s);
                let mut line = String::new();
                r.read_line(&mut line).await.unwrap();
                // Partial line, then EOF.
                r.get_mut().write_all(b"{\"return\": ").await.unwrap();
            })
        })
        .await;
        assert!(matches!(
            client.execute("query-status", None).await,
            Err(QmpError::ConnectionClosed)
        ));
        assert!(client.is_closed());
    }

    #[tokio::test]
    async fn greeting_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let _listener = UnixListener::bind(&path).unwrap();
        let err = QmpClient::connect(&path, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(err, QmpError::GreetingTimeout(_)), "{err:?}");
    }
}
