//! [`SmallReads`]: a byte-stream adapter that keeps an idle connection's read buffer from
//! becoming resident memory.
//!
//! The rpc layer reads each channel into a buffer with 64 KiB of spare capacity (more for a
//! large frame), and the mux channel under it (a `tokio_util` compat stream) zero-fills all of
//! the spare capacity it is handed before every read, even a read of a few bytes. So one
//! small message made 64 KiB resident per channel, and a hub with two channels per client
//! paid about 128 KiB per idle client. Through this adapter the channel only ever sees a
//! 16 KiB buffer on the stack, already initialised, and the rpc buffer gets just the bytes
//! that arrived: its untouched capacity stays unbacked by memory.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest read handed to the wrapped stream at once.
const STEP: usize = 16 * 1024;

/// Wraps a byte stream so that each read goes through a small initialised stack buffer (see
/// the module docs). Writes pass straight through.
pub(crate) struct SmallReads<T>(pub(crate) T);

impl<T: AsyncRead + Unpin> AsyncRead for SmallReads<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut step = [0u8; STEP];
        let want = buf.remaining().min(STEP);
        let mut small = ReadBuf::new(&mut step[..want]);
        ready!(Pin::new(&mut self.0).poll_read(cx, &mut small))?;
        buf.put_slice(small.filled());
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for SmallReads<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn bytes_pass_through_unchanged_in_both_directions() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (mut a, mut b) = (SmallReads(a), b);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        let writer = {
            let data = data.clone();
            tokio::spawn(async move {
                b.write_all(&data).await.unwrap();
                b.shutdown().await.unwrap();
                b
            })
        };
        let mut got = Vec::new();
        a.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, data);
        let mut b = writer.await.unwrap();
        a.write_all(b"back").await.unwrap();
        let mut four = [0u8; 4];
        b.read_exact(&mut four).await.unwrap();
        assert_eq!(&four, b"back");
    }
}
