//! A connection with bytes already read from it put back in front: the callback lane reads a
//! request head before it knows whether hyper must serve the connection, and hyper then reads
//! that head again from here.

use bytes::{Buf, Bytes};
use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub(super) struct Rewind<I> {
    read_ahead: Bytes,
    inner: I,
}

impl<I> Rewind<I> {
    pub(super) fn new(read_ahead: Bytes, inner: I) -> Rewind<I> {
        Rewind { read_ahead, inner }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.read_ahead.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = self.read_ahead.len().min(buf.remaining());
        buf.put_slice(self.read_ahead.get(..n).unwrap_or_default());
        self.read_ahead.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn reads_the_read_ahead_first_in_pieces_then_the_connection() {
        let (mut near, far) = tokio::io::duplex(64);
        let mut rewound = Rewind::new(Bytes::from_static(b"GET / HT"), far);
        near.write_all(b"TP/1.1\r\n").await.ok();
        drop(near);
        let mut small = [0u8; 3];
        let n = rewound.read(&mut small).await.unwrap_or(0);
        assert_eq!(&small[..n], b"GET");
        let mut rest = Vec::new();
        rewound.read_to_end(&mut rest).await.ok();
        assert_eq!(rest, b" / HTTP/1.1\r\n");
    }
}
