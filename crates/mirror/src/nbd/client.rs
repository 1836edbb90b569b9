//! A small NBD client: fixed newstyle handshake with `NBD_OPT_GO`, simple
//! replies, many requests in flight on one connection. Used by the tests,
//! the crash-safety harness and the benchmark.

use super::proto::*;
use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;

/// Where a reply goes: the read length expected and the waiting request.
type Waiter = (u32, oneshot::Sender<Result<Vec<u8>, u32>>);

/// Requests waiting for their reply, by cookie.
#[derive(Default)]
struct Waiters {
    /// Set when the reply reader stopped: nobody would answer a new waiter.
    closed: bool,
    by_cookie: HashMap<u64, Waiter>,
}

type Pending = Arc<Mutex<Waiters>>;

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Socket error, or the server closed the connection.
    #[error("nbd connection")]
    Io(#[from] io::Error),
    /// The server answered with an NBD error number.
    #[error("server returned error {0}")]
    Server(u32),
    /// The server does not speak the protocol as expected.
    #[error("protocol: {0}")]
    Protocol(String),
}

/// A connected NBD client; clone it to issue requests from several tasks.
#[derive(Clone)]
pub struct NbdClient {
    writer: Arc<tokio::sync::Mutex<Box<dyn AsyncWrite + Send + Unpin>>>,
    pending: Pending,
    next: Arc<AtomicU64>,
    size: u64,
    flags: u16,
}

impl NbdClient {
    /// Connects to a Unix socket.
    pub async fn connect_unix(path: &std::path::Path, export: &str) -> Result<Self, ClientError> {
        let s = tokio::net::UnixStream::connect(path).await?;
        Self::handshake(s, export).await
    }

    /// Connects to a TCP address.
    pub async fn connect_tcp(addr: &str, export: &str) -> Result<Self, ClientError> {
        let s = tokio::net::TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Self::handshake(s, export).await
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Transmission flags sent by the server.
    pub fn flags(&self) -> u16 {
        self.flags
    }

    async fn handshake<S>(stream: S, export: &str) -> Result<Self, ClientError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (mut rd, mut wr) = tokio::io::split(stream);
        if rd.read_u64().await? != NBDMAGIC || rd.read_u64().await? != IHAVEOPT {
            return Err(ClientError::Protocol("not a newstyle NBD server".into()));
        }
        let hflags = rd.read_u16().await?;
        if hflags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(ClientError::Protocol("server lacks fixed newstyle".into()));
        }
        let mut cflags = FLAG_C_FIXED_NEWSTYLE;
        if hflags & FLAG_NO_ZEROES != 0 {
            cflags |= FLAG_C_NO_ZEROES;
        }
        wr.write_u32(cflags).await?;
        let mut data = (export.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        wr.write_u64(IHAVEOPT).await?;
        wr.write_u32(OPT_GO).await?;
        wr.write_u32(data.len() as u32).await?;
        wr.write_all(&data).await?;
        wr.flush().await?;
        let mut size = None;
        let mut flags = 0;
        loop {
            if rd.read_u64().await? != REPLY_MAGIC_OPT {
                return Err(ClientError::Protocol("bad option reply magic".into()));
            }
            let _opt = rd.read_u32().await?;
            let rep = rd.read_u32().await?;
            let len = rd.read_u32().await?;
            if len > MAX_OPTION_LEN {
                return Err(ClientError::Protocol("option reply too long".into()));
            }
            let mut d = vec![0u8; len as usize];
            rd.read_exact(&mut d).await?;
            match rep {
                REP_ACK => break,
                REP_INFO if d.len() >= 12 && d[0..2] == INFO_EXPORT.to_be_bytes() => {
                    size = Some(u64::from_be_bytes(d[2..10].try_into().expect("8 bytes")));
                    flags = u16::from_be_bytes([d[10], d[11]]);
                }
                REP_INFO => {}
                e => {
                    return Err(ClientError::Protocol(format!(
                        "GO refused with {e:#x}: {}",
                        String::from_utf8_lossy(&d)
                    )))
                }
            }
        }
        let size = size.ok_or_else(|| ClientError::Protocol("no export info".into()))?;
        let pending: Pending = Arc::default();
        let p2 = pending.clone();
        tokio::spawn(async move {
            let res: io::Result<()> = async {
                loop {
                    let magic = rd.read_u32().await?;
                    if magic != SIMPLE_REPLY_MAGIC {
                        return Err(io::Error::other("unexpected reply magic"));
                    }
                    let err = rd.read_u32().await?;
                    let cookie = rd.read_u64().await?;
                    let entry = p2
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .by_cookie
                        .remove(&cookie);
                    let Some((rlen, tx)) = entry else {
                        return Err(io::Error::other("reply for unknown cookie"));
                    };
                    if err != 0 {
                        let _ = tx.send(Err(err));
                        continue;
                    }
                    let mut buf = vec![0u8; rlen as usize];
                    rd.read_exact(&mut buf).await?;
                    let _ = tx.send(Ok(buf));
                }
            }
            .await;
            let _ = res;
            // Fail everything still pending (dropping the senders does it),
            // and every later request.
            let mut p = p2.lock().unwrap_or_else(|e| e.into_inner());
            p.closed = true;
            p.by_cookie.clear();
        });
        Ok(NbdClient {
            writer: Arc::new(tokio::sync::Mutex::new(Box::new(wr))),
            pending,
            next: Arc::new(AtomicU64::new(1)),
            size,
            flags,
        })
    }

    async fn request(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
        read_len: u32,
    ) -> Result<Vec<u8>, ClientError> {
        let cookie = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            if p.closed {
                return Err(ClientError::Io(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "connection closed",
                )));
            }
            p.by_cookie.insert(cookie, (read_len, tx));
        }
        let hdr = Request {
            flags,
            kind,
            cookie,
            offset,
            length,
        }
        .encode();
        {
            let mut w = self.writer.lock().await;
            // Header and payload in one call, as QEMU's client sends them (it
            // corks the socket).
            crate::vectored::write_all(
                &mut *w,
                &mut [io::IoSlice::new(&hdr), io::IoSlice::new(payload)],
            )
            .await?;
            w.flush().await?;
        }
        match rx.await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(ClientError::Server(e)),
            Err(_) => Err(ClientError::Io(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection closed with the request in flight",
            ))),
        }
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, ClientError> {
        self.request(CMD_READ, 0, offset, len, &[], len).await
    }

    /// Writes `data` at `offset`, with FUA if `fua`.
    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ClientError> {
        let f = if fua { CMD_FLAG_FUA } else { 0 };
        self.request(CMD_WRITE, f, offset, data.len() as u32, data, 0)
            .await
            .map(|_| ())
    }

    /// Flushes.
    pub async fn flush(&self) -> Result<(), ClientError> {
        self.request(CMD_FLUSH, 0, 0, 0, &[], 0).await.map(|_| ())
    }

    /// Writes zeroes.
    pub async fn write_zeroes(&self, offset: u64, len: u32) -> Result<(), ClientError> {
        self.request(CMD_WRITE_ZEROES, 0, offset, len, &[], 0)
            .await
            .map(|_| ())
    }

    /// Sends an arbitrary request (for protocol tests).
    pub async fn raw(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
    ) -> Result<Vec<u8>, ClientError> {
        self.request(kind, flags, offset, length, &[], 0).await
    }

    /// Sends NBD_CMD_DISC and closes the connection.
    pub async fn disconnect(self) -> Result<(), ClientError> {
        let hdr = Request {
            flags: 0,
            kind: CMD_DISC,
            cookie: 0,
            offset: 0,
            length: 0,
        }
        .encode();
        let mut w = self.writer.lock().await;
        w.write_all(&hdr).await?;
        w.flush().await?;
        w.shutdown().await?;
        Ok(())
    }
}
