//! NBD server: exports one [`Volume`] under one export name.
//!
//! Fixed newstyle handshake with `NBD_OPT_EXPORT_NAME`, `INFO`, `GO`,
//! `LIST`, `ABORT`, `STRUCTURED_REPLY`, `LIST_META_CONTEXT` and
//! `SET_META_CONTEXT` (`base:allocation`). In transmission: `READ`,
//! `WRITE`, `FLUSH`, `TRIM`, `WRITE_ZEROES`, `CACHE`, `BLOCK_STATUS`,
//! `DISC`, the FUA flag, and many requests in flight (each request runs in
//! its own task, replies go out as they complete).
//!
//! A write of at least [`STREAM_MIN`] bytes is *streamed*: the volume
//! prepares it (region locks, dirty-bitmap mark) before its payload is
//! read, then each [`STREAM_CHUNK`] of payload is sent to the partner and
//! written locally as soon as it arrives, so that replication overlaps the
//! transfer from the client instead of following it.
//!
//! Hostile input never reaches the volume unchecked: a bad magic, an
//! oversized option or write payload closes the connection; an out-of-range
//! request, unknown command or flag gets an error reply.

use super::proto::*;
use crate::volume::{IoError, StreamedWrite, Volume};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, Semaphore};

/// Errors that end one NBD connection.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// Socket error or the client went away.
    #[error("connection i/o")]
    Io(#[from] std::io::Error),
    /// The client broke the protocol; the connection was closed.
    #[error("protocol violation by client: {0}")]
    Protocol(String),
}

/// Most requests processed concurrently on one connection.
const MAX_IN_FLIGHT: usize = 64;

/// Size of the chunks a streamed write is read, replicated and written in.
pub const STREAM_CHUNK: usize = 256 << 10;

/// Writes at least this long (two chunks) may be streamed: replicated and
/// written chunk by chunk while their payload is still arriving, instead
/// of after it arrived whole (see [`Volume::begin_write`]). Shorter ones
/// gain too little: only what precedes the last chunk is overlapped.
pub const STREAM_MIN: u32 = 2 * STREAM_CHUNK as u32;

/// Streaming pays while the connection's recent queue depth (requests
/// already in flight when one arrives, averaged) is below this. With
/// requests queued, replication already overlaps other requests'
/// transfers, and chunks cost CPU per byte (more frames, system calls and
/// replies): on a machine short of CPU, streaming then lowers throughput.
const STREAM_MAX_DEPTH: f32 = 0.5;

/// Serves a volume over NBD.
pub struct NbdServer {
    volume: Arc<Volume>,
    export_name: String,
}

struct Session {
    structured: bool,
    meta_base_allocation: bool,
}

fn errno_of(e: &IoError) -> u32 {
    e.errno
}

impl NbdServer {
    /// A server exporting `volume` under `export_name` (the empty name, the
    /// NBD default export, is accepted as well).
    pub fn new(volume: Arc<Volume>, export_name: impl Into<String>) -> Arc<Self> {
        Arc::new(NbdServer {
            volume,
            export_name: export_name.into(),
        })
    }

    /// Accepts connections on a Unix socket until the task is cancelled.
    pub async fn serve_unix(self: Arc<Self>, listener: UnixListener) -> std::io::Result<()> {
        loop {
            let (s, _) = listener.accept().await?;
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.handle(s).await {
                    tracing::debug!("nbd connection ended: {e}");
                }
            });
        }
    }

    /// Accepts connections on a TCP socket until the task is cancelled.
    pub async fn serve_tcp(self: Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        loop {
            let (s, peer) = listener.accept().await?;
            let _ = s.set_nodelay(true);
            let fd = s.as_raw_fd();
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.handle_socket(s, Some(fd)).await {
                    tracing::debug!("nbd connection from {peer} ended: {e}");
                }
            });
        }
    }

    fn transmission_flags(&self, structured: bool) -> u16 {
        let mut f = TFLAG_HAS_FLAGS
            | TFLAG_SEND_FLUSH
            | TFLAG_SEND_FUA
            | TFLAG_SEND_TRIM
            | TFLAG_SEND_WRITE_ZEROES
            | TFLAG_CAN_MULTI_CONN
            | TFLAG_SEND_CACHE
            | TFLAG_SEND_FAST_ZERO;
        if structured {
            f |= TFLAG_SEND_DF;
        }
        f
    }

    fn name_matches(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.export_name.as_bytes()
    }

    /// Runs one connection: handshake, then transmission.
    pub async fn handle<S>(self: Arc<Self>, stream: S) -> Result<(), NbdError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.handle_socket(stream, None).await
    }

    /// [`Self::handle`], told the TCP socket behind `stream` (which it
    /// keeps open) so that large payloads are read with one wakeup.
    async fn handle_socket<S>(
        self: Arc<Self>,
        stream: S,
        tcp_fd: Option<RawFd>,
    ) -> Result<(), NbdError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut rd, wr) = tokio::io::split(stream);
        let mut wr = BufWriter::new(wr);
        let session = match self.negotiate(&mut rd, &mut wr).await? {
            Some(s) => s,
            None => return Ok(()),
        };
        self.transmission(rd, wr, session, tcp_fd).await
    }

    async fn negotiate<R, W>(&self, rd: &mut R, wr: &mut W) -> Result<Option<Session>, NbdError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        wr.write_all(&NBDMAGIC.to_be_bytes()).await?;
        wr.write_all(&IHAVEOPT.to_be_bytes()).await?;
        wr.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())
            .await?;
        wr.flush().await?;
        let cflags = rd.read_u32().await?;
        if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(NbdError::Protocol(format!(
                "unknown client flags {cflags:#x}"
            )));
        }
        let no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
        let mut session = Session {
            structured: false,
            meta_base_allocation: false,
        };
        loop {
            let magic = rd.read_u64().await?;
            if magic != IHAVEOPT {
                return Err(NbdError::Protocol(format!("bad option magic {magic:#x}")));
            }
            let opt = rd.read_u32().await?;
            let len = rd.read_u32().await?;
            if len > MAX_OPTION_LEN {
                return Err(NbdError::Protocol(format!("option length {len} too large")));
            }
            let mut data = vec![0u8; len as usize];
            rd.read_exact(&mut data).await?;
            match opt {
                OPT_EXPORT_NAME => {
                    if !self.name_matches(&data) {
                        return Err(NbdError::Protocol("unknown export name".into()));
                    }
                    wr.write_all(&self.volume.size().to_be_bytes()).await?;
                    wr.write_all(&self.transmission_flags(session.structured).to_be_bytes())
                        .await?;
                    if !no_zeroes {
                        wr.write_all(&[0u8; 124]).await?;
                    }
                    wr.flush().await?;
                    return Ok(Some(session));
                }
                OPT_ABORT => {
                    wr.write_all(&option_reply(opt, REP_ACK, &[])).await?;
                    wr.flush().await?;
                    return Ok(None);
                }
                OPT_LIST => {
                    if !data.is_empty() {
                        wr.write_all(&option_reply(opt, REP_ERR_INVALID, b"LIST takes no data"))
                            .await?;
                    } else {
                        let name = self.export_name.as_bytes();
                        let mut d = (name.len() as u32).to_be_bytes().to_vec();
                        d.extend_from_slice(name);
                        wr.write_all(&option_reply(opt, REP_SERVER, &d)).await?;
                        wr.write_all(&option_reply(opt, REP_ACK, &[])).await?;
                    }
                }
                OPT_STARTTLS => {
                    wr.write_all(&option_reply(opt, REP_ERR_POLICY, b"TLS is not offered"))
                        .await?;
                }
                OPT_STRUCTURED_REPLY => {
                    if !data.is_empty() {
                        wr.write_all(&option_reply(opt, REP_ERR_INVALID, b"no data expected"))
                            .await?;
                    } else {
                        session.structured = true;
                        wr.write_all(&option_reply(opt, REP_ACK, &[])).await?;
                    }
                }
                OPT_INFO | OPT_GO => match parse_info(&data) {
                    None => {
                        wr.write_all(&option_reply(opt, REP_ERR_INVALID, b"malformed INFO/GO"))
                            .await?;
                    }
                    Some((name, _reqs)) if !self.name_matches(name) => {
                        wr.write_all(&option_reply(opt, REP_ERR_UNKNOWN, b"no such export"))
                            .await?;
                    }
                    Some((_name, reqs)) => {
                        let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                        info.extend_from_slice(&self.volume.size().to_be_bytes());
                        info.extend_from_slice(
                            &self.transmission_flags(session.structured).to_be_bytes(),
                        );
                        wr.write_all(&option_reply(opt, REP_INFO, &info)).await?;
                        let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                        bs.extend_from_slice(&1u32.to_be_bytes());
                        bs.extend_from_slice(&4096u32.to_be_bytes());
                        bs.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                        wr.write_all(&option_reply(opt, REP_INFO, &bs)).await?;
                        if reqs.contains(&INFO_NAME) {
                            let mut n = INFO_NAME.to_be_bytes().to_vec();
                            n.extend_from_slice(self.export_name.as_bytes());
                            wr.write_all(&option_reply(opt, REP_INFO, &n)).await?;
                        }
                        if reqs.contains(&INFO_DESCRIPTION) {
                            let mut n = INFO_DESCRIPTION.to_be_bytes().to_vec();
                            n.extend_from_slice(b"Pairvisor mirrored volume");
                            wr.write_all(&option_reply(opt, REP_INFO, &n)).await?;
                        }
                        wr.write_all(&option_reply(opt, REP_ACK, &[])).await?;
                        if opt == OPT_GO {
                            wr.flush().await?;
                            return Ok(Some(session));
                        }
                    }
                },
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                    if !session.structured {
                        wr.write_all(&option_reply(
                            opt,
                            REP_ERR_INVALID,
                            b"negotiate structured replies first",
                        ))
                        .await?;
                    } else {
                        match parse_meta_query(&data) {
                            None => {
                                wr.write_all(&option_reply(opt, REP_ERR_INVALID, b"malformed"))
                                    .await?;
                            }
                            Some((name, _)) if !self.name_matches(name) => {
                                wr.write_all(&option_reply(
                                    opt,
                                    REP_ERR_UNKNOWN,
                                    b"no such export",
                                ))
                                .await?;
                            }
                            Some((_, queries)) => {
                                let list = opt == OPT_LIST_META_CONTEXT;
                                let selected = (list && queries.is_empty())
                                    || queries.iter().any(|q| {
                                        *q == META_BASE_ALLOCATION.as_bytes()
                                            || (list && *q == b"base:")
                                    });
                                if opt == OPT_SET_META_CONTEXT {
                                    session.meta_base_allocation = selected;
                                }
                                if selected {
                                    let id = if list { 0 } else { META_BASE_ALLOCATION_ID };
                                    let mut d = id.to_be_bytes().to_vec();
                                    d.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
                                    wr.write_all(&option_reply(opt, REP_META_CONTEXT, &d))
                                        .await?;
                                }
                                wr.write_all(&option_reply(opt, REP_ACK, &[])).await?;
                            }
                        }
                    }
                }
                _ => {
                    wr.write_all(&option_reply(opt, REP_ERR_UNSUP, b"option not supported"))
                        .await?;
                }
            }
            wr.flush().await?;
        }
    }

    async fn transmission<R, W>(
        self: Arc<Self>,
        mut rd: R,
        mut wr: BufWriter<W>,
        session: Session,
        tcp_fd: Option<RawFd>,
    ) -> Result<(), NbdError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(256);
        let writer = tokio::spawn(async move {
            while let Some(buf) = rx.recv().await {
                wr.write_all(&buf).await?;
                while let Ok(more) = rx.try_recv() {
                    wr.write_all(&more).await?;
                }
                wr.flush().await?;
            }
            wr.flush().await?;
            Ok::<_, std::io::Error>(())
        });
        let session = Arc::new(session);
        let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        // Requests already in flight when one arrives, averaged over about
        // the last eight requests.
        let mut depth = 0f32;
        let result = loop {
            let mut hdr = [0u8; Request::LEN];
            match rd.read_exact(&mut hdr).await {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(()),
                Err(e) => break Err(e.into()),
            }
            let Some(req) = Request::decode(&hdr) else {
                break Err(NbdError::Protocol("bad request magic".into()));
            };
            if req.kind == CMD_DISC {
                break Ok(());
            }
            let in_flight = (MAX_IN_FLIGHT - slots.available_permits()) as f32;
            depth += (in_flight - depth) / 8.0;
            if depth < STREAM_MAX_DEPTH && self.streamable(&req) {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    break Ok(());
                };
                let work = match self.stream_write(&mut rd, tcp_fd, &req).await {
                    Ok(w) => w,
                    Err(e) => break Err(e),
                };
                let tx = tx.clone();
                let session = session.clone();
                tokio::spawn(async move {
                    let res = match work {
                        Ok(w) => w.finish().await,
                        Err(e) => Err(e),
                    };
                    let reply = match res {
                        Ok(()) => simple_reply(req.cookie, 0, &[]),
                        Err(e) => Self::error_reply(&session, req.cookie, e.errno, &e.message),
                    };
                    let _ = tx.send(reply).await;
                    drop(permit);
                });
                continue;
            }
            let mut payload = Vec::new();
            if req.kind == CMD_WRITE {
                if req.length > MAX_PAYLOAD {
                    break Err(NbdError::Protocol(format!(
                        "write payload of {} bytes exceeds {MAX_PAYLOAD}",
                        req.length
                    )));
                }
                payload = crate::bufpool::get(req.length as usize);
                if let Err(e) = crate::lowat::read_exact(&mut rd, tcp_fd, &mut payload).await {
                    break Err(e.into());
                }
            }
            let Ok(permit) = slots.clone().acquire_owned().await else {
                break Ok(());
            };
            let me = self.clone();
            let tx = tx.clone();
            let session = session.clone();
            tokio::spawn(async move {
                let reply = me.execute(&session, req, payload).await;
                let _ = tx.send(reply).await;
                drop(permit);
            });
        };
        // Wait for in-flight requests, then let the writer drain.
        let _ = slots.acquire_many(MAX_IN_FLIGHT as u32).await;
        drop(tx);
        let _ = writer.await;
        result
    }

    /// A valid write long enough to be streamed, while there is a partner to
    /// stream it to (anything else, including errors, takes the ordinary
    /// path: without a partner streaming gains nothing).
    fn streamable(&self, req: &Request) -> bool {
        req.kind == CMD_WRITE
            && req.length >= STREAM_MIN
            && req.length <= MAX_PAYLOAD
            && req.flags & !CMD_FLAGS_KNOWN == 0
            && crate::region::in_bounds(req.offset, req.length as u64, self.volume.size())
            && self.volume.is_replicating()
    }

    /// Starts a streamed write and reads its payload into it chunk by
    /// chunk. `Err` ends the connection (the client went away mid-payload:
    /// the write is dropped, i.e. abandoned); `Ok(Err)` is a write the
    /// volume refused, whose payload was read and discarded.
    async fn stream_write<R: AsyncRead + Unpin>(
        &self,
        rd: &mut R,
        tcp_fd: Option<RawFd>,
        req: &Request,
    ) -> Result<Result<StreamedWrite, IoError>, NbdError> {
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let len = req.length as usize;
        let mut w = match self.volume.begin_write(req.offset, len as u64, fua).await {
            Ok(w) => w,
            Err(e) => {
                let mut sink = vec![0u8; len.min(STREAM_CHUNK)];
                let mut left = len;
                while left > 0 {
                    let n = left.min(sink.len());
                    rd.read_exact(&mut sink[..n]).await?;
                    left -= n;
                }
                return Ok(Err(e));
            }
        };
        let mut left = len;
        while left > 0 {
            let n = left.min(STREAM_CHUNK);
            let mut chunk = crate::bufpool::get(n);
            crate::lowat::read_exact(rd, tcp_fd, &mut chunk).await?;
            left -= n;
            if let Err(e) = w.push(chunk).await {
                return Err(NbdError::Protocol(format!("streamed write: {e}")));
            }
        }
        Ok(Ok(w))
    }

    fn error_reply(session: &Session, cookie: u64, errno: u32, msg: &str) -> Vec<u8> {
        if session.structured {
            structured_error(cookie, errno, msg)
        } else {
            simple_reply(cookie, errno, &[])
        }
    }

    async fn execute(&self, session: &Session, req: Request, payload: Vec<u8>) -> Vec<u8> {
        let vol = &self.volume;
        let size = vol.size();
        let cookie = req.cookie;
        let err = |errno: u32, msg: &str| Self::error_reply(session, cookie, errno, msg);
        if req.flags & !CMD_FLAGS_KNOWN != 0 {
            return err(EINVAL, "unknown command flags");
        }
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let len = req.length as u64;
        let in_range = crate::region::in_bounds(req.offset, len, size);
        match req.kind {
            CMD_READ => {
                if req.length > MAX_PAYLOAD {
                    return err(EINVAL, "read length exceeds the maximum payload");
                }
                if !in_range {
                    return err(EINVAL, "read beyond the end of the export");
                }
                if session.structured && len >= 65536 {
                    // A large read of a hole is answered without data.
                    if let Ok(ext) = vol.extents(req.offset, len).await {
                        if ext.len() == 1 && ext[0].1 {
                            let mut v = Vec::with_capacity(32);
                            structured_header(
                                &mut v,
                                REPLY_FLAG_DONE,
                                REPLY_TYPE_OFFSET_HOLE,
                                cookie,
                                12,
                            );
                            v.extend_from_slice(&req.offset.to_be_bytes());
                            v.extend_from_slice(&req.length.to_be_bytes());
                            return v;
                        }
                    }
                }
                match vol.read(req.offset, req.length).await {
                    Ok(data) => {
                        if session.structured {
                            if data.is_empty() {
                                let mut v = Vec::new();
                                structured_header(
                                    &mut v,
                                    REPLY_FLAG_DONE,
                                    REPLY_TYPE_NONE,
                                    cookie,
                                    0,
                                );
                                return v;
                            }
                            let mut v = Vec::with_capacity(28 + data.len());
                            structured_header(
                                &mut v,
                                REPLY_FLAG_DONE,
                                REPLY_TYPE_OFFSET_DATA,
                                cookie,
                                8 + data.len() as u32,
                            );
                            v.extend_from_slice(&req.offset.to_be_bytes());
                            v.extend_from_slice(&data);
                            v
                        } else {
                            simple_reply(cookie, 0, &data)
                        }
                    }
                    Err(e) => err(errno_of(&e), &e.message),
                }
            }
            CMD_WRITE => {
                if !in_range {
                    return err(ENOSPC, "write beyond the end of the export");
                }
                match vol.write(req.offset, payload, fua).await {
                    Ok(()) => simple_reply(cookie, 0, &[]),
                    Err(e) => err(errno_of(&e), &e.message),
                }
            }
            CMD_FLUSH => match vol.flush().await {
                Ok(()) => simple_reply(cookie, 0, &[]),
                Err(e) => err(errno_of(&e), &e.message),
            },
            CMD_TRIM | CMD_WRITE_ZEROES => {
                if !in_range {
                    return err(ENOSPC, "range beyond the end of the export");
                }
                match vol.write_zeroes(req.offset, len, fua).await {
                    Ok(()) => simple_reply(cookie, 0, &[]),
                    Err(e) => err(errno_of(&e), &e.message),
                }
            }
            CMD_CACHE => {
                if !in_range {
                    return err(EINVAL, "range beyond the end of the export");
                }
                simple_reply(cookie, 0, &[])
            }
            CMD_BLOCK_STATUS => {
                if !session.structured || !session.meta_base_allocation {
                    return err(EINVAL, "no metadata context negotiated");
                }
                if !in_range || len == 0 {
                    return err(EINVAL, "block status range invalid");
                }
                match vol.extents(req.offset, len).await {
                    Ok(ext) => {
                        let one = req.flags & CMD_FLAG_REQ_ONE != 0;
                        let mut desc = Vec::new();
                        for (l, hole) in ext.iter().take(if one { 1 } else { 1024 }) {
                            desc.extend_from_slice(&(*l as u32).to_be_bytes());
                            let f = if *hole { STATE_HOLE | STATE_ZERO } else { 0 };
                            desc.extend_from_slice(&f.to_be_bytes());
                        }
                        let mut v = Vec::with_capacity(24 + desc.len());
                        structured_header(
                            &mut v,
                            REPLY_FLAG_DONE,
                            REPLY_TYPE_BLOCK_STATUS,
                            cookie,
                            4 + desc.len() as u32,
                        );
                        v.extend_from_slice(&META_BASE_ALLOCATION_ID.to_be_bytes());
                        v.extend_from_slice(&desc);
                        v
                    }
                    Err(e) => err(errno_of(&e), &e.message),
                }
            }
            _ => err(EINVAL, "unknown command"),
        }
    }
}

/// Parses INFO/GO data: name and requested info types.
fn parse_info(d: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let nlen = u32::from_be_bytes(d.get(0..4)?.try_into().ok()?) as usize;
    let name = d.get(4..4usize.checked_add(nlen)?)?;
    let rest = &d[4 + nlen..];
    let n = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?) as usize;
    if rest.len() != 2 + 2 * n {
        return None;
    }
    let reqs = (0..n)
        .map(|i| u16::from_be_bytes([rest[2 + 2 * i], rest[3 + 2 * i]]))
        .collect();
    Some((name, reqs))
}

/// Parses LIST/SET_META_CONTEXT data: export name and queries.
fn parse_meta_query(d: &[u8]) -> Option<(&[u8], Vec<&[u8]>)> {
    let nlen = u32::from_be_bytes(d.get(0..4)?.try_into().ok()?) as usize;
    let name = d.get(4..4usize.checked_add(nlen)?)?;
    let mut pos = 4 + nlen;
    let count = u32::from_be_bytes(d.get(pos..pos + 4)?.try_into().ok()?) as usize;
    pos += 4;
    let mut queries = Vec::new();
    for _ in 0..count {
        let qlen = u32::from_be_bytes(d.get(pos..pos + 4)?.try_into().ok()?) as usize;
        pos += 4;
        queries.push(d.get(pos..pos.checked_add(qlen)?)?);
        pos += qlen;
    }
    (pos == d.len()).then_some((name, queries))
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The option parsers take any bytes without a panic, and what they
        /// return lies within the input (no length field is believed past
        /// its end).
        #[test]
        fn option_parsers_take_any_bytes(
            d in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
        ) {
            if let Some((name, infos)) = parse_info(&d) {
                proptest::prop_assert!(name.len() + 2 * infos.len() + 6 <= d.len());
            }
            if let Some((name, queries)) = parse_meta_query(&d) {
                let total: usize = queries.iter().map(|q| q.len() + 4).sum();
                proptest::prop_assert!(name.len() + total + 8 <= d.len());
            }
        }
    }

    #[test]
    fn parse_info_table() {
        let mut good = 3u32.to_be_bytes().to_vec();
        good.extend_from_slice(b"abc");
        good.extend_from_slice(&1u16.to_be_bytes());
        good.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(
            parse_info(&good),
            Some((&b"abc"[..], vec![INFO_BLOCK_SIZE]))
        );
        assert_eq!(parse_info(&good[..good.len() - 1]), None);
        assert_eq!(parse_info(&[0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(parse_info(&[]), None);
    }

    #[test]
    fn parse_meta_table() {
        let mut d = 0u32.to_be_bytes().to_vec();
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&15u32.to_be_bytes());
        d.extend_from_slice(b"base:allocation");
        let (name, q) = parse_meta_query(&d).unwrap();
        assert!(name.is_empty());
        assert_eq!(q, vec![&b"base:allocation"[..]]);
        let mut bad = d.clone();
        bad.push(0);
        assert!(parse_meta_query(&bad).is_none());
        let mut huge = 0u32.to_be_bytes().to_vec();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta_query(&huge).is_none());
    }
}
