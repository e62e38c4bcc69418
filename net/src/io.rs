//! A stream that tells a hook of the bytes each read and write moves.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What a [`Hooked`] stream does beside moving bytes.
pub trait IoHook<S> {
    /// After a read that brought `bytes` (never empty) from `io`.
    fn read(&self, _io: &S, _bytes: &[u8]) {}
    /// After a read that found the end of `io`.
    fn read_eof(&self, _io: &S) {}
    /// After a write that took `bytes` (never empty) into `io`; a
    /// vectored write tells of each slice it took from.
    fn wrote(&self, _io: &S, _bytes: &[u8]) {}
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

    /// The stream, for what is not reading or writing.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.io
    }
}

impl<S: AsyncRead + Unpin, H: IoHook<S> + Unpin> AsyncRead for Hooked<S, H> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let room = buf.remaining() > 0;
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        let read = &buf.filled()[before..];
        if !read.is_empty() {
            self.hook.read(&self.io, read);
        } else if room && matches!(polled, Poll::Ready(Ok(()))) {
            self.hook.read_eof(&self.io);
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
            self.hook.wrote(&self.io, &buf[..n]);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled {
            let mut left = n;
            for buf in bufs {
                if left == 0 {
                    break;
                }
                let took = left.min(buf.len());
                if took > 0 {
                    self.hook.wrote(&self.io, &buf[..took]);
                }
                left -= took;
            }
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Every call, in order.
    #[derive(Default)]
    struct Log(Mutex<Vec<String>>);

    impl<S> IoHook<S> for Log {
        fn read(&self, _io: &S, bytes: &[u8]) {
            self.0.lock().unwrap().push(format!("read {bytes:?}"));
        }

        fn read_eof(&self, _io: &S) {
            self.0.lock().unwrap().push("eof".into());
        }

        fn wrote(&self, _io: &S, bytes: &[u8]) {
            self.0.lock().unwrap().push(format!("wrote {bytes:?}"));
        }
    }

    #[tokio::test]
    async fn the_hook_sees_the_bytes_moved_and_the_end() {
        let (ours, mut theirs) = tokio::io::duplex(64);
        let mut hooked = Hooked::new(ours, Log::default());
        let slices = [io::IoSlice::new(b"ab"), io::IoSlice::new(b"cd")];
        let n = hooked.write_vectored(&slices).await.unwrap();
        theirs.write_all(b"xyz").await.unwrap();
        drop(theirs);
        let mut got = Vec::new();
        hooked.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"xyz");
        let log = hooked.hook.0.into_inner().unwrap();
        assert_eq!(n, 4);
        assert_eq!(
            log,
            [
                "wrote [97, 98]",
                "wrote [99, 100]",
                "read [120, 121, 122]",
                "eof"
            ]
        );
    }
}
