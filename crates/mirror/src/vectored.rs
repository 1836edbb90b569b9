//! Writing several buffers as one: a header and its payload leave in one
//! call, so the header does not go out as a segment of its own (our sockets
//! have `TCP_NODELAY`) and wake the receiver for a few bytes.

use std::io::IoSlice;
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// Writes all of `bufs`, in order, with as few writes as the stream takes.
pub async fn write_all<W: AsyncWrite + Unpin + ?Sized>(
    wr: &mut W,
    mut bufs: &mut [IoSlice<'_>],
) -> std::io::Result<()> {
    while !bufs.is_empty() {
        let n = wr.write_vectored(bufs).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// Takes at most `step` bytes per call, like a socket with little room.
    struct Trickle {
        got: Vec<u8>,
        calls: usize,
        step: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.poll_write_vectored(cx, &[IoSlice::new(buf)])
        }
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            self.calls += 1;
            let mut room = self.step;
            let mut n = 0;
            for b in bufs {
                let k = b.len().min(room);
                self.got.extend_from_slice(&b[..k]);
                room -= k;
                n += k;
            }
            Poll::Ready(Ok(n))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn writes_everything_in_order_across_short_writes() {
        let head: Vec<u8> = (0..32).collect();
        let body: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        for step in [1, 7, 32, 33, 4096] {
            let mut w = Trickle {
                got: Vec::new(),
                calls: 0,
                step,
            };
            write_all(&mut w, &mut [IoSlice::new(&head), IoSlice::new(&body)])
                .await
                .unwrap();
            assert_eq!(w.got, [&head[..], &body[..]].concat(), "step {step}");
            assert_eq!(w.calls, (head.len() + body.len()).div_ceil(step));
        }
        // An empty payload: the header alone, in one call.
        let mut w = Trickle {
            got: Vec::new(),
            calls: 0,
            step: 4096,
        };
        write_all(&mut w, &mut [IoSlice::new(&head), IoSlice::new(&[])])
            .await
            .unwrap();
        assert_eq!((w.got.as_slice(), w.calls), (&head[..], 1));
    }

    #[tokio::test]
    async fn a_stream_that_takes_nothing_is_an_error() {
        let mut w = Trickle {
            got: Vec::new(),
            calls: 0,
            step: 0,
        };
        let e = write_all(&mut w, &mut [IoSlice::new(b"hdr")])
            .await
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WriteZero);
    }
}
