//! Turns a socket into one side of a tunnel data stream and back.
//!
//! A proxied connection is a pair of directions. The outbound direction
//! ([`OutboundFrames`]) reads the local socket and is the `Stream` handed to
//! tonic, so hyper's stream task polls the socket itself: no channel and no
//! extra task between the socket and HTTP/2. The inbound direction
//! ([`InboundPump`]) reads frames from the peer and writes them to the local
//! socket; HTTP/2 flow control holds the peer back while the socket is slow.
//!
//! Neither direction ends the gRPC stream before both are done: a server that
//! finishes its response while the request is still open gets its request
//! reset by hyper (RFC 9113 8.1), which would cut a half-closed connection.

use std::{
    future::Future,
    io,
    mem::MaybeUninit,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
};

use bytes::{BufMut, BytesMut};
use futures_util::{Stream, StreamExt};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf},
    sync::oneshot,
};

use crate::{ErrorCode, pb};

/// First read size of a direction; it doubles after every read that fills
/// the buffer, up to [`MAX_READ`]. Reads of this size go through the stack,
/// so a connection holds no read buffer until it moves bulk data.
pub const INITIAL_READ: usize = 4 * 1024;
/// Largest read, and so the largest data frame.
pub const MAX_READ: usize = 64 * 1024;

/// How a direction of a pipe ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// Orderly half-close.
    Eof,
    /// Reset or failure, with the reason.
    Aborted(String),
}

/// What a finished pipe did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PipeOutcome {
    /// Bytes that arrived from the peer and were written to the local socket.
    pub bytes_from_peer: u64,
    /// Bytes read from the local socket and sent to the peer.
    pub bytes_to_peer: u64,
    pub inbound: End,
    pub outbound: End,
}

struct Counters {
    to_peer: AtomicU64,
    epoch: tokio::time::Instant,
    /// Milliseconds after `epoch` of the last byte either way.
    touched: AtomicU64,
}

impl Counters {
    fn touch(&self) {
        self.touched
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_for(&self) -> std::time::Duration {
        let last = std::time::Duration::from_millis(self.touched.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }
}

/// Builds both directions of a pipe between a local socket (`reader` and
/// `writer`) and a tunnel data stream (`inbound` from the peer; the returned
/// [`OutboundFrames`] must be sent to the peer). `first` frames go out before
/// anything read from `reader` (the edge's `open`, or bytes already peeked).
pub fn pipe<R, W, S>(
    reader: R,
    writer: W,
    inbound: S,
    first: Vec<pb::Frame>,
) -> (OutboundFrames<R>, InboundPump<W, S>)
where
    R: AsyncRead + Unpin,
    W: LocalWrite,
    S: Stream<Item = Result<pb::Frame, tonic::Status>> + Unpin,
{
    let counters = Arc::new(Counters {
        to_peer: AtomicU64::new(0),
        epoch: tokio::time::Instant::now(),
        touched: AtomicU64::new(0),
    });
    let (inbound_end_tx, inbound_end_rx) = oneshot::channel();
    let (outbound_end_tx, outbound_end_rx) = oneshot::channel();
    let outbound = OutboundFrames {
        first: first.into_iter().rev().collect(),
        reader: Some(reader),
        buf: BytesMut::new(),
        next_read: INITIAL_READ,
        state: OutState::Reading,
        peer_end: Some(inbound_end_rx),
        peer_eof: false,
        done: Some(outbound_end_tx),
        counters: counters.clone(),
    };
    let pump = InboundPump {
        writer,
        inbound,
        inbound_end: Some(inbound_end_tx),
        outbound_end: outbound_end_rx,
        counters,
    };
    (outbound, pump)
}

enum OutState {
    Reading,
    /// Our eof is sent; waiting for the peer's direction to end.
    Lingering,
    Finished,
}

/// The outbound direction: a `Stream` of frames read from a local socket.
pub struct OutboundFrames<R> {
    first: Vec<pb::Frame>,
    reader: Option<R>,
    buf: BytesMut,
    next_read: usize,
    state: OutState,
    peer_end: Option<oneshot::Receiver<End>>,
    peer_eof: bool,
    done: Option<oneshot::Sender<End>>,
    counters: Arc<Counters>,
}

impl<R> OutboundFrames<R> {
    fn finish(&mut self, end: End) {
        self.state = OutState::Finished;
        self.reader = None;
        if let Some(done) = self.done.take() {
            let _ = done.send(end);
        }
    }

    /// Polls the peer's direction; `Some(reason)` when it aborted.
    fn poll_peer(&mut self, cx: &mut Context<'_>) -> Poll<Option<String>> {
        let Some(rx) = self.peer_end.as_mut() else {
            return Poll::Ready(None);
        };
        let end = ready!(Pin::new(rx).poll(cx));
        self.peer_end = None;
        match end {
            Ok(End::Eof) => {
                self.peer_eof = true;
                Poll::Ready(None)
            }
            Ok(End::Aborted(reason)) => Poll::Ready(Some(reason)),
            Err(_) => Poll::Ready(Some("the inbound direction was dropped".into())),
        }
    }
}

impl<R: AsyncRead + Unpin> Stream for OutboundFrames<R> {
    type Item = pb::Frame;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<pb::Frame>> {
        let this = &mut *self;
        if let Some(frame) = this.first.pop() {
            return Poll::Ready(Some(frame));
        }
        loop {
            match this.state {
                OutState::Finished => return Poll::Ready(None),
                OutState::Lingering => {
                    if this.peer_eof {
                        this.finish(End::Eof);
                        return Poll::Ready(None);
                    }
                    match ready!(this.poll_peer(cx)) {
                        None => continue,
                        Some(reason) => {
                            this.finish(End::Aborted(reason));
                            return Poll::Ready(None);
                        }
                    }
                }
                OutState::Reading => {
                    if !this.peer_eof
                        && let Poll::Ready(Some(reason)) = this.poll_peer(cx)
                    {
                        // The peer reset: stop reading, drop the socket.
                        this.finish(End::Aborted(reason));
                        return Poll::Ready(None);
                    }
                    let reader = this.reader.as_mut().expect("reader present while reading");
                    let read = if this.next_read == INITIAL_READ {
                        // Small reads go through the stack: a connection
                        // waiting for its next bytes holds no buffer.
                        let mut chunk = [MaybeUninit::<u8>::uninit(); INITIAL_READ];
                        let mut window = ReadBuf::uninit(&mut chunk);
                        ready!(Pin::new(reader).poll_read(cx, &mut window)).map(|()| {
                            this.buf.extend_from_slice(window.filled());
                            window.filled().len()
                        })
                    } else {
                        if this.buf.capacity() < this.next_read {
                            this.buf.reserve(this.next_read);
                        }
                        let mut window = (&mut this.buf).limit(this.next_read);
                        ready!(tokio_util::io::poll_read_buf(
                            Pin::new(reader),
                            cx,
                            &mut window
                        ))
                    };
                    match read {
                        Ok(0) => {
                            this.state = OutState::Lingering;
                            this.reader = None;
                            return Poll::Ready(Some(pb::Frame {
                                eof: true,
                                ..Default::default()
                            }));
                        }
                        Ok(n) => {
                            if n >= this.next_read && this.next_read < MAX_READ {
                                this.next_read *= 2;
                            }
                            this.counters.to_peer.fetch_add(n as u64, Ordering::Relaxed);
                            this.counters.touch();
                            let data = this.buf.split_to(n).freeze();
                            return Poll::Ready(Some(pb::Frame {
                                data,
                                ..Default::default()
                            }));
                        }
                        Err(e) => {
                            let reason = format!("read from the local socket: {e}");
                            this.finish(End::Aborted(reason.clone()));
                            return Poll::Ready(Some(pb::Frame {
                                error: Some(ErrorCode::CONNECTION_RESET.to_pb(reason)),
                                ..Default::default()
                            }));
                        }
                    }
                }
            }
        }
    }
}

impl<R> Drop for OutboundFrames<R> {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            let _ = done.send(End::Aborted("the outbound stream was dropped".into()));
        }
    }
}

/// The inbound direction: writes the peer's frames to the local socket, then
/// waits for the outbound direction and reports the whole pipe.
pub struct InboundPump<W, S> {
    writer: W,
    inbound: S,
    inbound_end: Option<oneshot::Sender<End>>,
    outbound_end: oneshot::Receiver<End>,
    counters: Arc<Counters>,
}

/// How long a finished pipe waits for the peer to end the stream.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The local socket's write side, and how to reset it.
pub trait LocalWrite: AsyncWrite + Unpin {
    /// Makes the coming close a reset (TCP: RST). The default does nothing:
    /// for TLS, a close without close_notify already tells truncation apart.
    fn abort(&mut self) {}
}

impl LocalWrite for tokio::net::tcp::OwnedWriteHalf {
    fn abort(&mut self) {
        let socket: &tokio::net::TcpStream = self.as_ref();
        let _ = socket2::SockRef::from(socket).set_linger(Some(std::time::Duration::ZERO));
    }
}

impl<T: AsyncWrite> LocalWrite for tokio::io::WriteHalf<T> {}

/// A hooked socket resets as the socket does.
impl<S: LocalWrite, H: postern_net::IoHook<S> + Unpin> LocalWrite for postern_net::Hooked<S, H> {
    fn abort(&mut self) {
        self.get_mut().abort();
    }
}

impl<W, S> InboundPump<W, S>
where
    W: LocalWrite,
    S: Stream<Item = Result<pb::Frame, tonic::Status>> + Unpin,
{
    /// Runs until both directions have ended.
    pub async fn run(mut self) -> PipeOutcome {
        let mut from_peer = 0u64;
        let inbound = self.pump(&mut from_peer).await;
        if let Some(tx) = self.inbound_end.take() {
            let _ = tx.send(inbound.clone());
        }
        if inbound != End::Eof {
            // The local peer must see a reset, not a clean close that would
            // pass a truncated stream off as complete.
            self.writer.abort();
        }
        let outbound = (&mut self.outbound_end)
            .await
            .unwrap_or_else(|_| End::Aborted("the outbound stream was dropped".into()));
        // Keep the stream until the peer ends its half, however this side
        // ended: dropping it earlier resets it (RST_STREAM) with our last
        // frames still queued, and the peer's frames already on the way then
        // arrive for a stream HTTP/2 has forgotten. It answers each of those
        // with a reset of its own and closes the whole connection after
        // 1,024 of them. The peer ends its half at once after our eof, our
        // error frame or the end of our half.
        let drained = async { while let Some(Ok(_)) = self.inbound.next().await {} };
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, drained).await;
        PipeOutcome {
            bytes_from_peer: from_peer,
            bytes_to_peer: self.counters.to_peer.load(Ordering::Relaxed),
            inbound,
            outbound,
        }
    }

    /// As [`InboundPump::run`], but gives up when no byte has moved either
    /// way for `idle`.
    pub async fn run_with_idle_timeout(self, idle: std::time::Duration) -> PipeOutcome {
        let counters = self.counters.clone();
        let run = self.run();
        tokio::pin!(run);
        loop {
            let quiet = counters.idle_for();
            if quiet >= idle {
                let reason = format!("idle for {quiet:?}");
                return PipeOutcome {
                    bytes_from_peer: 0,
                    bytes_to_peer: counters.to_peer.load(Ordering::Relaxed),
                    inbound: End::Aborted(reason.clone()),
                    outbound: End::Aborted(reason),
                };
            }
            tokio::select! {
                outcome = &mut run => return outcome,
                _ = tokio::time::sleep(idle - quiet) => {}
            }
        }
    }

    async fn pump(&mut self, written: &mut u64) -> End {
        loop {
            let frame = match self.inbound.next().await {
                Some(Ok(frame)) => frame,
                Some(Err(status)) => {
                    return End::Aborted(format!("tunnel stream: {}", status.message()));
                }
                None => return End::Aborted("the tunnel stream ended without eof".into()),
            };
            if !frame.data.is_empty() {
                if let Err(e) = write_data(&mut self.writer, &frame.data).await {
                    return End::Aborted(format!("write to the local socket: {e}"));
                }
                *written += frame.data.len() as u64;
                self.counters.touch();
            }
            if frame.eof {
                let _ = self.writer.shutdown().await;
                return End::Eof;
            }
            if let Some(error) = frame.error {
                return End::Aborted(error.to_string());
            }
        }
    }
}

async fn write_data<W: LocalWrite>(writer: &mut W, data: &[u8]) -> io::Result<()> {
    writer.write_all(data).await?;
    writer.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use tokio::io::{AsyncReadExt, duplex};

    fn data(b: &'static [u8]) -> Result<pb::Frame, tonic::Status> {
        Ok(pb::Frame {
            data: Bytes::from_static(b),
            ..Default::default()
        })
    }

    fn eof() -> Result<pb::Frame, tonic::Status> {
        Ok(pb::Frame {
            eof: true,
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn both_directions_with_half_close() {
        // local socket <-> (reader, writer); the peer is simulated by frames.
        let (local, mut app) = duplex(1 << 16);
        let (r, w) = tokio::io::split(local);
        let peer = futures_util::stream::iter(vec![data(b"hello "), data(b"world"), eof()]);
        let open = pb::Frame {
            open: Some(pb::StreamOpen::default()),
            ..Default::default()
        };
        let (mut out, pump) = pipe(r, w, peer, vec![open]);
        let pump = tokio::spawn(pump.run());

        let mut got = Vec::new();
        app.read_to_end(&mut got).await.unwrap();
        assert_eq!(
            got, b"hello world",
            "peer data reached the local socket, then eof"
        );

        assert!(
            out.next().await.unwrap().open.is_some(),
            "first frames go out first"
        );
        app.write_all(b"reply").await.unwrap();
        app.shutdown().await.unwrap();
        let f = out.next().await.unwrap();
        assert_eq!(&f.data[..], b"reply");
        assert!(out.next().await.unwrap().eof);
        assert!(
            out.next().await.is_none(),
            "ends after both directions are done"
        );
        let outcome = pump.await.unwrap();
        assert_eq!(outcome.bytes_from_peer, 11);
        assert_eq!(outcome.bytes_to_peer, 5);
        assert_eq!(outcome.inbound, End::Eof);
        assert_eq!(outcome.outbound, End::Eof);
    }

    #[tokio::test]
    async fn peer_abort_ends_outbound_without_eof() {
        let (local, _app) = duplex(1024);
        let (r, w) = tokio::io::split(local);
        let peer = futures_util::stream::iter(vec![Ok(pb::Frame {
            error: Some(ErrorCode::UPSTREAM_DIAL_FAILED.to_pb("refused")),
            ..Default::default()
        })]);
        let (mut out, pump) = pipe(r, w, peer, vec![]);
        let pump = tokio::spawn(pump.run());
        assert!(out.next().await.is_none());
        let outcome = pump.await.unwrap();
        assert!(matches!(outcome.inbound, End::Aborted(ref m) if m.contains("8012")));
    }

    #[tokio::test(start_paused = true)]
    async fn an_aborted_pipe_keeps_the_stream_until_the_peer_ends_it() {
        let (local, _app) = duplex(1024);
        let (r, w) = tokio::io::split(local);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let peer = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let (mut out, pump) = pipe(r, w, peer, vec![]);
        let mut pump = tokio::spawn(pump.run());
        tx.send(Ok(pb::Frame {
            error: Some(ErrorCode::CONNECTION_RESET.to_pb("reset")),
            ..Default::default()
        }))
        .unwrap();
        assert!(out.next().await.is_none(), "our half ends at once");
        let early = tokio::time::timeout(std::time::Duration::from_secs(1), &mut pump).await;
        assert!(
            early.is_err(),
            "dropping the stream before the peer ends it would reset it"
        );
        drop(tx);
        let outcome = pump.await.unwrap();
        assert!(matches!(outcome.inbound, End::Aborted(ref m) if m.contains("9005")));
    }

    #[tokio::test]
    async fn stream_without_eof_is_an_abort() {
        let (local, _app) = duplex(1024);
        let (r, w) = tokio::io::split(local);
        let (mut out, pump) = pipe(r, w, futures_util::stream::iter(vec![data(b"x")]), vec![]);
        let pump = tokio::spawn(pump.run());
        assert!(out.next().await.is_none());
        let outcome = pump.await.unwrap();
        assert_eq!(outcome.bytes_from_peer, 1);
        assert!(matches!(outcome.inbound, End::Aborted(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_pipe_is_given_up() {
        let (local, _app) = duplex(1024);
        let (r, w) = tokio::io::split(local);
        let (_out, pump) = pipe(r, w, futures_util::stream::pending(), vec![]);
        let outcome = pump
            .run_with_idle_timeout(std::time::Duration::from_secs(60))
            .await;
        assert!(
            matches!(outcome.inbound, End::Aborted(ref m) if m.starts_with("idle")),
            "{outcome:?}"
        );
    }

    #[tokio::test]
    async fn reads_grow_up_to_the_cap() {
        let (local, mut app) = duplex(1 << 20);
        let (r, w) = tokio::io::split(local);
        let (mut out, _pump) = pipe(r, w, futures_util::stream::pending(), vec![]);
        app.write_all(&vec![7u8; 512 * 1024]).await.unwrap();
        let mut sizes = Vec::new();
        let mut total = 0;
        while total < 512 * 1024 {
            let f = out.next().await.unwrap();
            total += f.data.len();
            sizes.push(f.data.len());
        }
        assert_eq!(sizes[0], INITIAL_READ);
        assert!(sizes.iter().all(|&n| n <= MAX_READ));
        assert!(sizes.contains(&MAX_READ), "{sizes:?}");
    }
}
