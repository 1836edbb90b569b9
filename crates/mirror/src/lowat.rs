//! Reading a large payload from a TCP socket with one wakeup.
//!
//! Without help the kernel reports a socket readable as soon as the first
//! segment of a payload is queued, so a 1 MiB payload costs a wakeup (and a
//! read) per segment batch. Each wakeup of a task on another CPU is an
//! inter-processor interrupt on the CPU that delivered the data, i.e. the
//! sender's on loopback and in a VM an expensive exit. `SO_RCVLOWAT` set
//! to what is still to come makes it one.

use std::os::fd::RawFd;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Payload remainders from this size on are waited for whole.
pub const MIN: usize = 64 << 10;

/// Sets the socket's receive low-water mark. Best effort: if it fails the
/// reads are just more frequent.
fn set(fd: RawFd, n: usize) {
    let v = n.min(i32::MAX as usize) as libc::c_int;
    // SAFETY: `fd` is a socket the caller keeps open for the duration of
    // the call; the option value is a c_int of the size passed.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Puts the mark back to one byte however the read ends.
struct Reset(Option<RawFd>);

impl Drop for Reset {
    fn drop(&mut self) {
        if let Some(fd) = self.0 {
            set(fd, 1);
        }
    }
}

/// Fills `buf` from `rd`. `fd` is the TCP socket behind `rd`, if it is one
/// (`SO_RCVLOWAT` does not change when a Unix socket polls readable).
pub async fn read_exact<R: AsyncRead + Unpin>(
    rd: &mut R,
    fd: Option<RawFd>,
    buf: &mut [u8],
) -> std::io::Result<()> {
    let Some(fd) = fd.filter(|_| buf.len() >= MIN) else {
        rd.read_exact(buf).await?;
        return Ok(());
    };
    let mut reset = Reset(None);
    let mut got = 0;
    while got < buf.len() {
        let rest = buf.len() - got;
        // Never more than what is still to come: the sender may send
        // nothing else until it has our reply.
        if rest >= MIN {
            set(fd, rest);
            reset.0 = Some(fd);
        } else if reset.0.take().is_some() {
            set(fd, 1);
        }
        let n = rd.read(&mut buf[got..]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    fn lowat_of(fd: RawFd) -> libc::c_int {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: valid socket, out-pointers sized for a c_int.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                &mut v as *mut libc::c_int as *mut libc::c_void,
                &mut len,
            )
        };
        assert_eq!(rc, 0);
        v
    }

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn payload_sent_in_pieces_arrives_whole_and_the_mark_is_reset() {
        let (mut tx, mut rx) = pair().await;
        let fd = rx.as_raw_fd();
        let data: Vec<u8> = (0..(700u32 << 10)).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        // Pieces with pauses, the last one smaller than MIN: a mark left at
        // the full length would wait for bytes that never come, as the
        // sender then waits for our reply.
        let writer = tokio::spawn(async move {
            for piece in sent.chunks(300 << 10) {
                tx.write_all(piece).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tx
        });
        let mut buf = vec![0u8; data.len()];
        tokio::time::timeout(
            Duration::from_secs(10),
            read_exact(&mut rx, Some(fd), &mut buf),
        )
        .await
        .expect("read stalled")
        .unwrap();
        assert!(buf == data);
        assert_eq!(lowat_of(fd), 1);
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn early_end_of_stream_is_an_error_and_resets_the_mark() {
        let (mut tx, mut rx) = pair().await;
        let fd = rx.as_raw_fd();
        tx.write_all(&vec![7u8; 100 << 10]).await.unwrap();
        drop(tx);
        let mut buf = vec![0u8; 1 << 20];
        let e = read_exact(&mut rx, Some(fd), &mut buf).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
        assert_eq!(lowat_of(fd), 1);
    }
}
