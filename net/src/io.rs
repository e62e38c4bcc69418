//! A stream that tells a hook of the bytes each read and write moves.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What a [`Hooked`] stream does beside moving bytes.
pub trait IoHook<S> {
    /// After a read that brought `n > 0` bytes from `io`.
    fn read(&self, _io: &S, _n: usize) {}
    /// After a write that took `n > 0` bytes into `io`.
    fn wrote(&self, _io: &S, _n: usize) {}
}

/// `io`, with `hook` told of every read and write that moves bytes.
pub struct Hooked<S, H> {
    io: S,
    hook: H,
}

impl<S, H> Hooked<S, H> {
    pub fn new(io: S, hook: H) -> Self {
        Hooked { io, hook }
    }
}

impl<S: AsyncRead + Unpin, H: IoHook<S> + Unpin> AsyncRead for Hooked<S, H> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.hook.read(&self.io, n);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin, H: IoHook<S> + Unpin> AsyncWrite for Hooked<S, H> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled
            && n > 0
        {
            self.hook.wrote(&self.io, n);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled
            && n > 0
        {
            self.hook.wrote(&self.io, n);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
