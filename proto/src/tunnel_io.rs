//! A tunnel data stream as an `AsyncRead + AsyncWrite` byte stream, for code
//! that wants an IO object rather than a pump: hyper's HTTP/1 client at the
//! edge, and TLS termination inside the agent. The edge's own HTTP/1.1
//! exchange takes and gives whole frames instead ([`TunnelIo::poll_chunk`],
//! [`TunnelIo::poll_send`]), without copying them.
//!
//! Writes go through a small channel to [`ChannelFrames`], the `Stream` handed
//! to tonic. Prefer [`crate::pipe`] where both ends are sockets: it needs no
//! channel.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, Wake, Waker, ready},
};

use bytes::{Buf, Bytes};
use futures_util::{Stream, task::AtomicWaker};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::mpsc,
};
use tokio_util::sync::PollSender;

use crate::{ErrorCode, pb, pipe::MAX_READ};

/// Frames buffered between the writer and HTTP/2.
const CHANNEL_FRAMES: usize = 8;

/// Wraps the peer's frames (`inbound`) as a byte stream. The returned
/// [`ChannelFrames`] must be sent to the peer; `first` frames lead it.
pub fn tunnel_io<S>(inbound: S, first: Vec<pb::Frame>) -> (TunnelIo<S>, ChannelFrames) {
    let (tx, rx) = mpsc::channel(CHANNEL_FRAMES);
    let wakes = Arc::new(Wakes {
        task: AtomicWaker::new(),
        deferred: AtomicBool::new(false),
    });
    let io = TunnelIo {
        wakes: wakes.clone(),
        inbound,
        pending: Bytes::new(),
        read_done: false,
        tx: PollSender::new(tx),
        reserving: false,
        write_closed: false,
    };
    let frames = ChannelFrames {
        first: first.into_iter().rev().collect(),
        rx,
        sent_eof: false,
        done: false,
        waker: Waker::from(wakes.clone()),
        wakes,
    };
    (io, frames)
}

/// The byte-stream side. Dropping it without `shutdown` resets the stream.
pub struct TunnelIo<S> {
    wakes: Arc<Wakes>,
    inbound: S,
    pending: Bytes,
    read_done: bool,
    tx: PollSender<pb::Frame>,
    /// A reservation of `tx` is under way.
    reserving: bool,
    write_closed: bool,
}

impl<S> TunnelIo<S> {
    /// Bytes that arrived before the stream was wrapped (with the `open`
    /// frame); they are read first. Call before any read.
    pub fn prepend(&mut self, data: Bytes) {
        debug_assert!(self.pending.is_empty());
        self.pending = data;
    }
}

impl<S> TunnelIo<S>
where
    S: Stream<Item = Result<pb::Frame, tonic::Status>> + Unpin,
{
    /// Waits until bytes the peer sent are at hand: `false` at eof.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        loop {
            if !self.pending.is_empty() {
                return Poll::Ready(Ok(true));
            }
            if self.read_done {
                return Poll::Ready(Ok(false));
            }
            match ready!(Pin::new(&mut self.inbound).poll_next(cx)) {
                Some(Ok(frame)) => {
                    if let Some(error) = frame.error {
                        self.read_done = true;
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::ConnectionReset,
                            error,
                        )));
                    }
                    self.pending = frame.data;
                    if frame.eof {
                        self.read_done = true;
                    }
                }
                Some(Err(status)) => {
                    self.read_done = true;
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        format!("tunnel stream: {}", status.message()),
                    )));
                }
                None => {
                    self.read_done = true;
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "the tunnel stream ended without eof",
                    )));
                }
            }
        }
    }

    /// The next bytes the peer sent, as they arrived (not copied); `None`
    /// at eof.
    pub fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        let more = ready!(self.poll_fill(cx))?;
        Poll::Ready(Ok(more.then(|| std::mem::take(&mut self.pending))))
    }

    /// Whether the frames written from now on wake the task sending them
    /// to the peer only once the worker has run every other ready task
    /// (see [`Wakes`]). For a writer that knows others are writing too.
    pub fn defer_wakes(&self, deferred: bool) {
        self.wakes.deferred.store(deferred, Ordering::Relaxed);
    }

    /// Writes the start of `data` as one frame (all of it up to the size
    /// a write takes), without copying it; what is left stays in `data`.
    pub fn poll_send(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>> {
        self.poll_put(cx, || pb::Frame {
            data: data.split_to(data.len().min(MAX_READ)),
            ..Default::default()
        })
    }
}

impl<S> TunnelIo<S> {
    /// Sends the frame `make` gives once there is room for it.
    fn poll_put(
        &mut self,
        cx: &mut Context<'_>,
        make: impl FnOnce() -> pb::Frame,
    ) -> Poll<io::Result<()>> {
        if self.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        // Room at once, the usual case, needs no reservation future. One
        // under way (the channel was full) is finished first: left behind,
        // it would hold a slot of the channel that nothing fills.
        if !self.reserving
            && let Some(tx) = self.tx.get_ref()
        {
            match tx.try_reserve() {
                Ok(permit) => {
                    permit.send(make());
                    return Poll::Ready(Ok(()));
                }
                Err(mpsc::error::TrySendError::Closed(())) => return Poll::Ready(Err(broken())),
                Err(mpsc::error::TrySendError::Full(())) => {}
            }
        }
        self.reserving = true;
        let reserved = ready!(self.tx.poll_reserve(cx));
        self.reserving = false;
        reserved.map_err(|_| broken())?;
        self.tx.send_item(make()).map_err(|_| broken())?;
        Poll::Ready(Ok(()))
    }
}

impl<S> AsyncRead for TunnelIo<S>
where
    S: Stream<Item = Result<pb::Frame, tonic::Status>> + Unpin,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if ready!(self.poll_fill(cx))? {
            let n = self.pending.len().min(buf.remaining());
            buf.put_slice(&self.pending[..n]);
            self.pending.advance(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: Unpin> AsyncWrite for TunnelIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let n = buf.len().min(MAX_READ);
        ready!(self.poll_put(cx, || pb::Frame {
            data: Bytes::copy_from_slice(&buf[..n]),
            ..Default::default()
        }))?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.write_closed {
            return Poll::Ready(Ok(()));
        }
        ready!(self.poll_put(cx, || pb::Frame {
            eof: true,
            ..Default::default()
        }))?;
        self.write_closed = true;
        Poll::Ready(Ok(()))
    }
}

fn broken() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the tunnel stream is gone")
}

/// The frames a [`TunnelIo`] writes. It stays open after the writer's eof
/// until the [`TunnelIo`] is dropped, and ends with an error frame when the
/// writer went away without eof.
pub struct ChannelFrames {
    first: Vec<pb::Frame>,
    rx: mpsc::Receiver<pb::Frame>,
    sent_eof: bool,
    done: bool,
    /// What the channel wakes: [`Wakes`], over the task's waker.
    wakes: Arc<Wakes>,
    waker: Waker,
}

/// The waker of the task that sends a stream's frames to the peer (the
/// connection's task), as the channel from [`TunnelIo`] wakes it. With
/// `deferred`, the wake is handed to tokio's scheduler to do once the
/// worker has run every task that is ready, as `yield_now` does with its
/// own: the frames that other visitors' tasks write in the same turn then
/// go to the peer in one write, not one each. Without, or outside a
/// worker of the runtime, it wakes at once: when a worker runs out of
/// tasks before a deferred wake is due, tokio wakes its other worker, a
/// futex wake-up that one visitor alone would pay on every request.
struct Wakes {
    task: AtomicWaker,
    deferred: AtomicBool,
}

impl Wake for Wakes {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let Some(task) = self.task.take() else { return };
        if !self.deferred.load(Ordering::Relaxed) {
            return task.wake();
        }
        let mut defer = std::pin::pin!(tokio::task::yield_now());
        // Its first poll hands the waker to the scheduler; it is pending.
        let _ = defer.as_mut().poll(&mut Context::from_waker(&task));
    }
}

impl Stream for ChannelFrames {
    type Item = pb::Frame;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<pb::Frame>> {
        if let Some(frame) = self.first.pop() {
            return Poll::Ready(Some(frame));
        }
        if self.done {
            return Poll::Ready(None);
        }
        self.wakes.task.register(cx.waker());
        let this = self.as_mut().get_mut();
        // Outside tokio's budget: a receiver whose task has spent it hands
        // the waker it was polled with (this one) to the same deferred list,
        // and tokio wakes that list holding it, so this waker's deferring
        // again from there would find it taken. The task's own budget is
        // spent by its sockets and its HTTP/2 connection.
        let mut recv = std::pin::pin!(tokio::task::unconstrained(std::future::poll_fn(|cx| this
            .rx
            .poll_recv(cx))));
        match ready!(recv.as_mut().poll(&mut Context::from_waker(&this.waker))) {
            Some(frame) => {
                self.sent_eof |= frame.eof;
                Poll::Ready(Some(frame))
            }
            None => {
                self.done = true;
                if self.sent_eof {
                    Poll::Ready(None)
                } else {
                    Poll::Ready(Some(pb::Frame {
                        error: Some(
                            ErrorCode::CONNECTION_RESET.to_pb("the connection was dropped"),
                        ),
                        ..Default::default()
                    }))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn reads_frames_and_writes_frames() {
        let peer = futures_util::stream::iter(vec![
            Ok(pb::Frame {
                data: Bytes::from_static(b"abc"),
                ..Default::default()
            }),
            Ok(pb::Frame {
                data: Bytes::from_static(b"def"),
                eof: true,
                ..Default::default()
            }),
        ]);
        let (mut io, mut frames) = tunnel_io(peer, vec![]);
        let mut got = String::new();
        io.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "abcdef");

        io.write_all(b"xyz").await.unwrap();
        io.shutdown().await.unwrap();
        assert_eq!(&frames.next().await.unwrap().data[..], b"xyz");
        assert!(frames.next().await.unwrap().eof);
        drop(io);
        assert!(frames.next().await.is_none());
    }

    #[tokio::test]
    async fn whole_frames_are_taken_and_given_without_a_copy() {
        let sent = Bytes::from(vec![7u8; 100]);
        let peer = futures_util::stream::iter(vec![
            Ok(pb::Frame {
                data: sent.clone(),
                ..Default::default()
            }),
            Ok(pb::Frame {
                eof: true,
                ..Default::default()
            }),
        ]);
        let (mut io, mut frames) = tunnel_io(peer, vec![]);
        let chunk = std::future::poll_fn(|cx| io.poll_chunk(cx)).await.unwrap();
        assert_eq!(
            chunk.unwrap().as_ptr(),
            sent.as_ptr(),
            "the frame's own bytes"
        );
        let end = std::future::poll_fn(|cx| io.poll_chunk(cx)).await.unwrap();
        assert!(end.is_none(), "eof");

        let big = Bytes::from(vec![1u8; MAX_READ + 10]);
        let mut left = big.clone();
        while !left.is_empty() {
            std::future::poll_fn(|cx| io.poll_send(cx, &mut left))
                .await
                .unwrap();
        }
        let first = frames.next().await.unwrap().data;
        assert_eq!((first.len(), first.as_ptr()), (MAX_READ, big.as_ptr()));
        assert_eq!(frames.next().await.unwrap().data.len(), 10);
    }

    /// On a worker of its own, which of two tasks runs first once a writer
    /// has written a frame: the one taking the frames (woken by it), or one
    /// the writer spawned just before writing.
    async fn first_after_a_write(deferred: bool) -> Vec<&'static str> {
        let (mut io, mut frames) = tunnel_io(
            futures_util::stream::pending::<Result<pb::Frame, tonic::Status>>(),
            vec![],
        );
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = log.clone();
        let (waiting, ready) = tokio::sync::oneshot::channel();
        let taker = tokio::spawn(async move {
            let _ = waiting.send(());
            frames.next().await;
            seen.lock().unwrap().push("taker");
        });
        // The one worker is in the taker's poll when this hears from it, so
        // the writer, spawned from this thread, runs only once the taker
        // waits on the channel.
        ready.await.unwrap();
        let seen = log.clone();
        let writer = tokio::spawn(async move {
            io.defer_wakes(deferred);
            let other = tokio::spawn(async move { seen.lock().unwrap().push("other") });
            let mut data = Bytes::from_static(b"x");
            std::future::poll_fn(|cx| io.poll_send(cx, &mut data))
                .await
                .unwrap();
            (io, other)
        });
        let (_io, other) = writer.await.unwrap();
        other.await.unwrap();
        taker.await.unwrap();
        log.lock().unwrap().clone()
    }

    /// tokio runs a task woken by the running one next, before the tasks
    /// already waiting; a deferred wake waits for them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_deferred_wake_lets_the_ready_tasks_run_first() {
        assert_eq!(first_after_a_write(false).await, ["taker", "other"]);
        assert_eq!(first_after_a_write(true).await, ["other", "taker"]);
    }

    #[tokio::test]
    async fn frames_keep_their_order_when_the_channel_fills() {
        let (mut io, frames) = tunnel_io(
            futures_util::stream::pending::<Result<pb::Frame, tonic::Status>>(),
            vec![],
        );
        let writer = tokio::spawn(async move {
            for i in 0..(CHANNEL_FRAMES * 4) {
                let mut data = Bytes::from(i.to_string());
                std::future::poll_fn(|cx| io.poll_send(cx, &mut data))
                    .await
                    .unwrap();
            }
            io.shutdown().await.unwrap();
            io
        });
        // Read slowly, so that the writer finds the channel full.
        let mut got = Vec::new();
        let mut frames = Box::pin(frames);
        while let Some(frame) = frames.next().await {
            if frame.eof {
                break;
            }
            got.push(String::from_utf8(frame.data.to_vec()).unwrap());
            tokio::task::yield_now().await;
        }
        let want: Vec<String> = (0..CHANNEL_FRAMES * 4).map(|i| i.to_string()).collect();
        assert_eq!(got, want);
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn dropping_without_shutdown_sends_an_error() {
        let (io, mut frames) = tunnel_io(
            futures_util::stream::pending::<Result<pb::Frame, tonic::Status>>(),
            vec![],
        );
        drop(io);
        let f = frames.next().await.unwrap();
        assert_eq!(f.error.unwrap().code, ErrorCode::CONNECTION_RESET.number);
        assert!(frames.next().await.is_none());
    }

    #[tokio::test]
    async fn peer_error_is_a_reset() {
        let peer = futures_util::stream::iter(vec![Ok(pb::Frame {
            error: Some(ErrorCode::UPSTREAM_DIAL_FAILED.to_pb("connection refused")),
            ..Default::default()
        })]);
        let (mut io, _frames) = tunnel_io(peer, vec![]);
        let err = io.read_u8().await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert!(err.to_string().contains("ERR_POSTERN_8012"), "{err}");
    }
}
