//! The writes of one pass of a connection's task, gathered into one.
//!
//! h2 does not copy a DATA frame of 256 bytes or more into its own buffer:
//! it writes the frame's bytes as they are, chained to the frame's head,
//! and flushes the connection before it takes the next frame. A connection
//! whose streams each send one message of a few hundred bytes in a turn
//! (a small response, as most are) then makes one TLS record and one
//! `writev` per message. Measured at the agent through the TCP endpoint
//! (64 connections, 249-byte responses): 0.99 `writev` calls per request,
//! against 0.12 at the edge, whose messages (the requests) were under 256
//! bytes and so were gathered in h2's buffer.
//!
//! [`Corked`] sits between h2 and the connection's TLS stream. It copies
//! small writes into a buffer of its own; while its [`Cork`] is in, a flush
//! is only noted as owed. The connection's task keeps the cork in while it
//! polls the connection, and when a flush is owed polls it once more
//! without: h2 then flushes, and everything the pass wrote goes out in one
//! write (as TLS records of up to 16 KiB). Large writes (bulk data) are
//! not copied: they go out in one write with what is buffered.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Writes of this size or more are not copied.
const PASS_THROUGH: usize = 8 * 1024;
/// Bytes buffered at most; more are written out first.
const CAPACITY: usize = 64 * 1024;
/// A drained buffer larger than this is let go, so that a connection that
/// was busy once does not hold it while idle (h2 keeps 16 KiB of its own).
const KEPT: usize = 16 * 1024;

/// Whether a connection's flushes are held back, and whether one is owed:
/// shared by the connection's [`Corked`] stream and the task that polls
/// the connection (the same task, so the flags are only ever read where
/// they were set).
#[derive(Clone, Default)]
pub struct Cork(Arc<Flags>);

#[derive(Default)]
struct Flags {
    corked: AtomicBool,
    owed: AtomicBool,
}

impl Cork {
    /// Polls the connection (`poll`) with the cork in; when that is
    /// pending with a flush held back, polls it once more without, so that
    /// what the pass wrote goes out in one write.
    pub fn poll<R>(&self, mut poll: impl FnMut() -> Poll<R>) -> Poll<R> {
        match self.held(&mut poll) {
            (Poll::Pending, true) => poll(),
            (polled, _) => polled,
        }
    }

    /// Runs `poll` with the cork in, and says whether a flush was held back
    /// during it.
    fn held<R>(&self, poll: impl FnOnce() -> R) -> (R, bool) {
        self.0.corked.store(true, Ordering::Relaxed);
        let polled = poll();
        self.0.corked.store(false, Ordering::Relaxed);
        (polled, self.0.owed.swap(false, Ordering::Relaxed))
    }
}

/// A connection's stream whose small writes are gathered (see the module's
/// documentation).
pub struct Corked<T> {
    io: T,
    cork: Cork,
    buf: Vec<u8>,
    /// The bytes of `buf` already written to `io`.
    sent: usize,
    /// Something was written since the last flush.
    dirty: bool,
}

impl<T: AsyncWrite + Unpin> Corked<T> {
    pub fn new(io: T, cork: Cork) -> Corked<T> {
        Corked {
            io,
            cork,
            buf: Vec::new(),
            sent: 0,
            dirty: false,
        }
    }

    /// Writes out what is buffered.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.buf.len() {
            match ready!(Pin::new(&mut self.io).poll_write(cx, &self.buf[self.sent..]))? {
                0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                n => self.sent += n,
            }
        }
        self.emptied();
        Poll::Ready(Ok(()))
    }

    /// Everything buffered was written.
    fn emptied(&mut self) {
        self.sent = 0;
        if self.buf.capacity() > KEPT {
            self.buf = Vec::new();
        } else {
            self.buf.clear();
        }
    }

    /// Takes `data` (a large write) after what is buffered, in one write
    /// of both where the stream takes it: the bytes of `data` written.
    fn poll_write_through(
        &mut self,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            let buffered = &self.buf[self.sent..];
            if buffered.is_empty() {
                self.emptied();
                return Pin::new(&mut self.io).poll_write_vectored(cx, data);
            }
            let mut slices = [io::IoSlice::new(&[]); 4];
            slices[0] = io::IoSlice::new(buffered);
            let taken = data.len().min(slices.len() - 1);
            slices[1..=taken].copy_from_slice(&data[..taken]);
            let n = ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..=taken]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            if n <= buffered.len() {
                self.sent += n;
                continue;
            }
            let of_data = n - buffered.len();
            self.emptied();
            return Poll::Ready(Ok(of_data));
        }
    }

    /// Takes the `len` bytes of `data`: copied into the buffer, or, from
    /// [`PASS_THROUGH`] bytes, written after it.
    fn poll_take(
        &mut self,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
        len: usize,
    ) -> Poll<io::Result<usize>> {
        self.dirty = true;
        if len >= PASS_THROUGH {
            return self.poll_write_through(cx, data);
        }
        if self.buf.len() + len > CAPACITY {
            ready!(self.poll_drain(cx))?;
        }
        for slice in data {
            self.buf.extend_from_slice(slice);
        }
        Poll::Ready(Ok(len))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Corked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Corked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_take(cx, &[io::IoSlice::new(data)], data.len())
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len = bufs.iter().map(|b| b.len()).sum();
        self.poll_take(cx, bufs, len)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.dirty {
            return Poll::Ready(Ok(()));
        }
        if self.cork.0.corked.load(Ordering::Relaxed) {
            self.cork.0.owed.store(true, Ordering::Relaxed);
            return Poll::Ready(Ok(()));
        }
        ready!(self.poll_drain(cx))?;
        ready!(Pin::new(&mut self.io).poll_flush(cx))?;
        self.dirty = false;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;

    use tokio::io::AsyncWriteExt;

    use super::*;

    /// What reached a stream: each write's bytes, and the flushes.
    #[derive(Clone, Default)]
    pub(crate) struct Log(Arc<Mutex<(Vec<Vec<u8>>, usize)>>);

    impl Log {
        pub(crate) fn writes(&self) -> Vec<Vec<u8>> {
            self.0.lock().unwrap().0.clone()
        }

        fn flushes(&self) -> usize {
            self.0.lock().unwrap().1
        }
    }

    /// A writer that logs its writes (and flushes) on their way to `io`;
    /// `tokio::io::join` it with a reader for a whole stream.
    pub(crate) struct Logged<S> {
        pub(crate) io: S,
        pub(crate) log: Log,
    }

    impl<S: AsyncWrite + Unpin> AsyncWrite for Logged<S> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, data))?;
            self.log.0.lock().unwrap().0.push(data[..n].to_vec());
            Poll::Ready(Ok(n))
        }

        /// All the slices in one write, as `writev` takes them.
        fn poll_write_vectored(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            self.poll_write(cx, &all)
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            ready!(Pin::new(&mut self.io).poll_flush(cx))?;
            self.log.0.lock().unwrap().1 += 1;
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    fn corked() -> (Corked<Logged<tokio::io::Sink>>, Cork, Log) {
        let (cork, log) = (Cork::default(), Log::default());
        let io = Logged {
            io: tokio::io::sink(),
            log: log.clone(),
        };
        (Corked::new(io, cork.clone()), cork, log)
    }

    #[tokio::test]
    async fn flushes_with_the_cork_in_are_owed_and_the_next_one_writes_all_at_once() {
        let (mut io, cork, log) = corked();
        let ((), owed) = cork.held(|| {
            futures_util::FutureExt::now_or_never(async {
                for message in [&b"one "[..], b"two ", b"three"] {
                    io.write_all(message).await.unwrap();
                    io.flush().await.unwrap();
                }
            })
            .expect("nothing waits")
        });
        assert!(owed, "a flush was held back");
        assert!(log.writes().is_empty(), "nothing written while corked");
        assert_eq!(log.flushes(), 0);
        io.flush().await.unwrap();
        assert_eq!(log.writes(), [b"one two three".to_vec()]);
        assert_eq!(log.flushes(), 1);
        // Nothing new: no flush owed, none done.
        let ((), owed) = cork.held(|| {
            futures_util::FutureExt::now_or_never(io.flush())
                .unwrap()
                .unwrap()
        });
        assert!(!owed);
        io.flush().await.unwrap();
        assert_eq!(log.flushes(), 1);
    }

    #[tokio::test]
    async fn a_large_write_leaves_in_one_write_with_what_is_buffered_and_shutdown_writes_the_rest()
    {
        let (mut io, _, log) = corked();
        let large = vec![7u8; PASS_THROUGH];
        io.write_all(b"head").await.unwrap();
        io.write_all(&large).await.unwrap();
        io.write_all(b"tail").await.unwrap();
        assert_eq!(log.writes(), [[&b"head"[..], &large].concat()]);
        io.shutdown().await.unwrap();
        assert_eq!(log.writes().last().unwrap(), b"tail");
    }

    #[tokio::test]
    async fn a_large_buffer_is_let_go_once_written_a_small_one_kept() {
        let (mut io, _, _) = corked();
        for _ in 0..10 {
            io.write_all(&[1; 4096]).await.unwrap();
        }
        assert!(io.buf.capacity() > KEPT);
        io.flush().await.unwrap();
        assert_eq!(io.buf.capacity(), 0, "let go");
        io.write_all(&[1; 100]).await.unwrap();
        io.flush().await.unwrap();
        assert!(io.buf.capacity() >= 100, "kept");
    }
}
