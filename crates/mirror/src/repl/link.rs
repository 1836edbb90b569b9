//! The primary's end of an established replication connection: sends
//! request frames, matches replies by id, and fails every waiter when the
//! connection breaks or a reply takes longer than the link timeout.

use super::proto::*;
use std::collections::HashMap;
use std::io::IoSlice;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::AbortHandle;

/// A reply from the secondary.
#[derive(Debug)]
pub struct Reply {
    /// 0 or an errno.
    pub status: u32,
    /// Reply payload.
    pub payload: Vec<u8>,
}

/// Why a request over the link failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkError {
    /// The connection is gone.
    #[error("replication link down: {0}")]
    Down(String),
}

type Waiters = Mutex<HashMap<u64, oneshot::Sender<Reply>>>;

/// A frame on its way out: the encoded header (and small payloads), plus a
/// shared large payload sent as is, so that a replicated write's data is not
/// copied again on the primary before the socket.
struct Outgoing {
    head: Vec<u8>,
    shared: Option<Arc<Vec<u8>>>,
}

/// An established, authenticated replication connection.
pub struct PeerLink {
    tx: mpsc::Sender<Outgoing>,
    pending: Waiters,
    next: AtomicU64,
    dead: AtomicBool,
    reason: Mutex<Option<String>>,
    closed: Notify,
    tasks: Mutex<Vec<AbortHandle>>,
    timeout: Duration,
    /// Address of the partner.
    pub peer: String,
}

impl std::fmt::Debug for PeerLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerLink")
            .field("peer", &self.peer)
            .finish()
    }
}

impl PeerLink {
    /// Starts the reader and writer tasks on an established connection.
    pub fn start<R, W>(rd: R, wr: W, peer: String, timeout: Duration) -> Arc<PeerLink>
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, mut rx) = mpsc::channel::<Outgoing>(1024);
        let link = Arc::new(PeerLink {
            tx,
            pending: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            dead: AtomicBool::new(false),
            reason: Mutex::new(None),
            closed: Notify::new(),
            tasks: Mutex::new(Vec::new()),
            timeout,
            peer,
        });
        let weak = Arc::downgrade(&link);
        let writer = tokio::spawn(async move {
            let mut wr = BufWriter::with_capacity(256 << 10, wr);
            let res: std::io::Result<()> = async {
                while let Some(out) = rx.recv().await {
                    write_out(&mut wr, &out).await?;
                    while let Ok(more) = rx.try_recv() {
                        write_out(&mut wr, &more).await?;
                    }
                    wr.flush().await?;
                }
                Ok(())
            }
            .await;
            if let (Err(e), Some(l)) = (res, weak.upgrade()) {
                l.close(&format!("send failed: {e}"));
            }
        });
        let weak = Arc::downgrade(&link);
        let reader = tokio::spawn(async move {
            let mut rd = rd;
            let why = loop {
                let mut hdr = [0u8; Frame::LEN];
                if let Err(e) = rd.read_exact(&mut hdr).await {
                    break format!("receive failed: {e}");
                }
                let Some(f) = Frame::decode(&hdr) else {
                    break "bad frame magic from partner".to_string();
                };
                if f.kind != K_REPLY || f.len > MAX_FRAME_PAYLOAD {
                    break format!("unexpected frame kind {} from partner", f.kind);
                }
                let mut payload = vec![0u8; f.len as usize];
                if let Err(e) = rd.read_exact(&mut payload).await {
                    break format!("receive failed: {e}");
                }
                let Some(l) = weak.upgrade() else { return };
                let w = l
                    .pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&f.id);
                if let Some(w) = w {
                    let _ = w.send(Reply {
                        status: f.aux,
                        payload,
                    });
                }
            };
            if let Some(l) = weak.upgrade() {
                l.close(&why);
            }
        });
        link.tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend([writer.abort_handle(), reader.abort_handle()]);
        link
    }

    /// True until the connection broke or was closed.
    pub fn is_alive(&self) -> bool {
        !self.dead.load(Ordering::SeqCst)
    }

    /// Why the link closed, if it did.
    pub fn close_reason(&self) -> Option<String> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Closes the link and fails every waiter.
    pub fn close(&self, why: &str) {
        if self.dead.swap(true, Ordering::SeqCst) {
            return;
        }
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.to_string());
        tracing::info!(peer = %self.peer, "replication link closed: {why}");
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            t.abort();
        }
        self.closed.notify_waiters();
    }

    /// Waits until the link is closed.
    pub async fn closed(&self) {
        loop {
            let n = self.closed.notified();
            tokio::pin!(n);
            n.as_mut().enable();
            if !self.is_alive() {
                return;
            }
            n.await;
        }
    }

    fn down(&self) -> LinkError {
        LinkError::Down(self.close_reason().unwrap_or_else(|| "closed".into()))
    }

    /// Sends a request and waits for its reply.
    pub async fn request(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Result<Reply, LinkError> {
        let rx = self
            .enqueue(kind, flags, offset, len, payload, None)
            .await?;
        self.await_reply(rx, tokio::time::Instant::now() + self.timeout)
            .await
    }

    /// Like [`PeerLink::request`] with a shared payload (a write's data),
    /// which is sent without another copy.
    pub async fn request_shared(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        payload: Arc<Vec<u8>>,
    ) -> Result<Reply, LinkError> {
        let len = payload.len() as u32;
        let rx = self
            .enqueue(kind, flags, offset, len, &[], Some(payload))
            .await?;
        self.await_reply(rx, tokio::time::Instant::now() + self.timeout)
            .await
    }

    /// Queues a request with a shared payload and returns as soon as it is
    /// queued, without waiting for the reply: frames queued by successive
    /// calls go out in call order, and their replies are awaited later with
    /// [`PendingReply::wait`]. This is what lets a streamed write send its
    /// chunks while the rest of its data is still arriving.
    pub async fn send_shared(
        self: &Arc<Self>,
        kind: u16,
        flags: u16,
        offset: u64,
        payload: Arc<Vec<u8>>,
    ) -> Result<PendingReply, LinkError> {
        let len = payload.len() as u32;
        let rx = self
            .enqueue(kind, flags, offset, len, &[], Some(payload))
            .await?;
        Ok(PendingReply {
            link: self.clone(),
            rx,
            deadline: tokio::time::Instant::now() + self.timeout,
        })
    }

    /// Registers a waiter for a new request id and queues the frame.
    async fn enqueue(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
        shared: Option<Arc<Vec<u8>>>,
    ) -> Result<oneshot::Receiver<Reply>, LinkError> {
        if !self.is_alive() {
            return Err(self.down());
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        if !self.is_alive() {
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            return Err(self.down());
        }
        let hdr = Frame {
            kind,
            flags,
            id,
            offset,
            len,
            aux: 0,
        }
        .encode();
        let mut buf = Vec::with_capacity(Frame::LEN + payload.len());
        buf.extend_from_slice(&hdr);
        buf.extend_from_slice(payload);
        if self.tx.send(Outgoing { head: buf, shared }).await.is_err() {
            return Err(self.down());
        }
        Ok(rx)
    }

    /// Waits for a reply until `deadline`; a late reply breaks the link.
    async fn await_reply(
        &self,
        rx: oneshot::Receiver<Reply>,
        deadline: tokio::time::Instant,
    ) -> Result<Reply, LinkError> {
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Err(self.down()),
            Err(_) => {
                self.close(&format!("no reply within {:?}", self.timeout));
                Err(self.down())
            }
        }
    }
}

/// A request queued with [`PeerLink::send_shared`] whose reply has not been
/// awaited yet. Dropping it forgets the reply (the request still goes out).
#[derive(Debug)]
pub struct PendingReply {
    link: Arc<PeerLink>,
    rx: oneshot::Receiver<Reply>,
    deadline: tokio::time::Instant,
}

impl PendingReply {
    /// Waits for the reply; the link timeout counts from when the request
    /// was queued, and a late reply breaks the link.
    pub async fn wait(self) -> Result<Reply, LinkError> {
        self.link.await_reply(self.rx, self.deadline).await
    }
}

impl Drop for PeerLink {
    fn drop(&mut self) {
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            t.abort();
        }
    }
}

async fn write_out<W: AsyncWrite + Unpin>(wr: &mut W, out: &Outgoing) -> std::io::Result<()> {
    let Some(p) = &out.shared else {
        return wr.write_all(&out.head).await;
    };
    // Header and data in one call: a header written on its own would leave
    // as a segment of its own, waking the partner for 32 bytes.
    crate::vectored::write_all(wr, &mut [IoSlice::new(&out.head), IoSlice::new(p)]).await
}
