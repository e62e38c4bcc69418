//! The edge's side of one muxado session (frames in
//! `postern_proto::muxado`): a reader that dispatches frames to streams, a
//! writer that owns the TLS write half, and streams with per-stream windows
//! both ways. The agent opens odd ids, the edge even ids from 2.
//!
//! Memory is bounded: a stream buffers at most the window it granted
//! (more is a flow-control reset), the agent may hold only
//! [`MAX_PEER_STREAMS`] streams open at once, and the edge opens streams
//! only for visitors it holds a permit for.

use std::{
    collections::HashMap,
    io,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering},
    },
    time::Instant,
};

use bytes::{Bytes, BytesMut};
use postern_proto::muxado::{Frame, FrameError, HEADER_LEN, Header, INITIAL_WINDOW, MuxError};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::{Notify, mpsc},
};
use tokio_util::sync::CancellationToken;

/// Streams the agent may have open at once: a heartbeat and RPCs.
pub const MAX_PEER_STREAMS: usize = 64;
/// The largest DATA frame the edge sends.
const MAX_DATA: usize = 64 * 1024;
/// Frames queued for the writer.
const OUT_QUEUE: usize = 64;
/// Bytes of frames gathered before they are written; a larger frame is
/// written as it is.
const WRITE_BUFFER: usize = 16 * 1024;

/// What arrives on a stream.
enum Inbound {
    Data(Bytes),
    Fin,
    Reset(MuxError),
}

/// A stream's send window: credit the peer granted.
struct Window {
    state: Mutex<(i64, Option<MuxError>)>,
    notify: Notify,
}

impl Window {
    fn new() -> Window {
        Window {
            state: Mutex::new((i64::from(INITIAL_WINDOW), None)),
            notify: Notify::new(),
        }
    }

    fn grant(&self, increment: u32) {
        let mut state = self.state.lock().expect("window lock");
        state.0 = (state.0 + i64::from(increment)).min(i64::from(u32::MAX));
        drop(state);
        self.notify.notify_waiters();
    }

    fn close(&self, code: MuxError) {
        self.state
            .lock()
            .expect("window lock")
            .1
            .get_or_insert(code);
        self.notify.notify_waiters();
    }

    /// Up to `want` bytes of credit, waiting for some.
    async fn take(&self, want: usize) -> Result<usize, MuxError> {
        loop {
            let granted = self.notify.notified();
            {
                let mut state = self.state.lock().expect("window lock");
                if let Some(code) = state.1 {
                    return Err(code);
                }
                if state.0 > 0 {
                    let n = (state.0 as usize).min(want);
                    state.0 -= n as i64;
                    return Ok(n);
                }
            }
            granted.await;
        }
    }
}

struct Slot {
    tx: mpsc::UnboundedSender<Inbound>,
    /// Bytes delivered and not yet read: at most the window granted.
    buffered: Arc<AtomicUsize>,
    window: Arc<Window>,
}

struct Shared {
    out: mpsc::Sender<Bytes>,
    streams: Mutex<HashMap<u32, Slot>>,
    next_id: AtomicU32,
    peer_streams: AtomicUsize,
    /// The session is over: nothing more is read or written.
    gone: CancellationToken,
    /// A GOAWAY is queued; the writer ends after it.
    closing: CancellationToken,
    last_heard: Mutex<Instant>,
}

impl Shared {
    /// Queues a frame; false when the session is over.
    async fn send(&self, frame: Frame) -> bool {
        tokio::select! {
            sent = self.out.send(frame.encode()) => sent.is_ok(),
            _ = self.gone.cancelled() => false,
        }
    }

    /// Queues a frame if there is room now (resets from drops).
    fn try_send(&self, frame: Frame) {
        let _ = self.out.try_send(frame.encode());
    }

    fn remove(&self, id: u32) -> Option<Slot> {
        let mut streams = self.streams.lock().expect("streams lock");
        self.remove_locked(&mut streams, id)
    }

    /// Forgets stream `id`, counting the agent's streams down.
    fn remove_locked(&self, streams: &mut HashMap<u32, Slot>, id: u32) -> Option<Slot> {
        let slot = streams.remove(&id)?;
        if id % 2 == 1 {
            self.peer_streams.fetch_sub(1, Ordering::Relaxed);
        }
        Some(slot)
    }
}

/// A handle on the session: opens streams, closes the session.
#[derive(Clone)]
pub struct Mux {
    shared: Arc<Shared>,
}

/// The halves of a stream share this; the last one dropped resets a
/// stream that did not end both ways.
struct StreamState {
    id: u32,
    shared: Arc<Shared>,
    /// The SYN went out (edge-opened streams open on their first write).
    opened: AtomicBool,
    fin_sent: AtomicBool,
    ended_in: AtomicBool,
}

impl Drop for StreamState {
    fn drop(&mut self) {
        let _ = self.shared.remove(self.id);
        let finished =
            self.fin_sent.load(Ordering::Relaxed) && self.ended_in.load(Ordering::Relaxed);
        if self.opened.load(Ordering::Relaxed) && !finished {
            self.shared.try_send(Frame::Rst {
                stream_id: self.id,
                code: MuxError::STREAM_CANCELLED,
            });
        }
    }
}

/// One stream, to split into its reading and writing halves.
pub struct MuxStream {
    pub reader: StreamReader,
    pub writer: StreamWriter,
}

/// The receiving half: data, then `None` at the peer's FIN.
pub struct StreamReader {
    rx: mpsc::UnboundedReceiver<Inbound>,
    buffered: Arc<AtomicUsize>,
    state: Arc<StreamState>,
    done: bool,
}

impl StreamReader {
    /// The next bytes; `Ok(None)` once the peer half-closed; an error when
    /// the stream was reset or the session ended.
    pub async fn read(&mut self) -> Result<Option<Bytes>, MuxError> {
        if self.done {
            return Ok(None);
        }
        match self.rx.recv().await {
            Some(Inbound::Data(data)) => {
                self.buffered.fetch_sub(data.len(), Ordering::Relaxed);
                let increment = Frame::WndInc {
                    stream_id: self.state.id,
                    increment: data.len() as u32,
                };
                if !self.state.shared.send(increment).await {
                    return Err(MuxError::SESSION_CLOSED);
                }
                Ok(Some(data))
            }
            Some(Inbound::Fin) => {
                self.done = true;
                self.state.ended_in.store(true, Ordering::Relaxed);
                Ok(None)
            }
            Some(Inbound::Reset(code)) => {
                self.done = true;
                self.state.ended_in.store(true, Ordering::Relaxed);
                self.state.fin_sent.store(true, Ordering::Relaxed);
                Err(code)
            }
            None => Err(MuxError::SESSION_CLOSED),
        }
    }

    /// Reads until `buf` holds at least `n` bytes; false at the peer's
    /// FIN before that.
    pub async fn read_at_least(&mut self, buf: &mut BytesMut, n: usize) -> Result<bool, MuxError> {
        while buf.len() < n {
            match self.read().await? {
                Some(data) => buf.extend_from_slice(&data),
                None => return Ok(false),
            }
        }
        Ok(true)
    }
}

/// The sending half.
pub struct StreamWriter {
    window: Arc<Window>,
    state: Arc<StreamState>,
}

impl StreamWriter {
    /// Sends `data` within the stream's window.
    pub async fn write(&mut self, mut data: Bytes) -> Result<(), MuxError> {
        while !data.is_empty() {
            let n = self.window.take(data.len().min(MAX_DATA)).await?;
            let chunk = data.split_to(n);
            self.frame(chunk, false).await?;
        }
        Ok(())
    }

    /// Half-closes: the peer gets a FIN.
    pub async fn finish(&mut self) -> Result<(), MuxError> {
        if self.state.fin_sent.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.frame(Bytes::new(), true).await?;
        self.state.fin_sent.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Aborts the stream with `code`.
    pub async fn reset(&mut self, code: MuxError) {
        if self.state.opened.load(Ordering::Relaxed) {
            self.state.fin_sent.store(true, Ordering::Relaxed);
            self.state.ended_in.store(true, Ordering::Relaxed);
            self.state
                .shared
                .send(Frame::Rst {
                    stream_id: self.state.id,
                    code,
                })
                .await;
        }
    }

    async fn frame(&mut self, data: Bytes, fin: bool) -> Result<(), MuxError> {
        let syn = !self.state.opened.swap(true, Ordering::Relaxed);
        let frame = Frame::Data {
            stream_id: self.state.id,
            syn,
            fin,
            data,
        };
        if self.state.shared.send(frame).await {
            Ok(())
        } else {
            Err(MuxError::SESSION_CLOSED)
        }
    }
}

impl Mux {
    /// A session over `io`: the handle, the driver that must be run for
    /// anything to move, and the streams the agent opens.
    pub fn new<T>(io: T) -> (Mux, MuxDriver<T>, mpsc::Receiver<MuxStream>)
    where
        T: AsyncRead + AsyncWrite + Send + Unpin,
    {
        let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE);
        let (accept_tx, accept_rx) = mpsc::channel(MAX_PEER_STREAMS);
        let shared = Arc::new(Shared {
            out: out_tx,
            streams: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(0),
            peer_streams: AtomicUsize::new(0),
            gone: CancellationToken::new(),
            closing: CancellationToken::new(),
            last_heard: Mutex::new(Instant::now()),
        });
        let driver = MuxDriver {
            io,
            shared: shared.clone(),
            out_rx,
            accept_tx,
        };
        (Mux { shared }, driver, accept_rx)
    }

    /// A new edge-opened stream; nothing goes out before its first write.
    pub fn open(&self) -> Result<MuxStream, MuxError> {
        if self.shared.gone.is_cancelled() || self.shared.closing.is_cancelled() {
            return Err(MuxError::SESSION_CLOSED);
        }
        let id = self.shared.next_id.fetch_add(2, Ordering::Relaxed) + 2;
        if id > 0x7FFF_FFFF {
            return Err(MuxError::SESSION_CLOSED);
        }
        Ok(self.register(id, true))
    }

    fn register(&self, id: u32, edge_opened: bool) -> MuxStream {
        let (tx, rx) = mpsc::unbounded_channel();
        let buffered = Arc::new(AtomicUsize::new(0));
        let window = Arc::new(Window::new());
        self.shared.streams.lock().expect("streams lock").insert(
            id,
            Slot {
                tx,
                buffered: buffered.clone(),
                window: window.clone(),
            },
        );
        let state = Arc::new(StreamState {
            id,
            shared: self.shared.clone(),
            opened: AtomicBool::new(!edge_opened),
            fin_sent: AtomicBool::new(false),
            ended_in: AtomicBool::new(false),
        });
        MuxStream {
            reader: StreamReader {
                rx,
                buffered,
                state: state.clone(),
                done: false,
            },
            writer: StreamWriter { window, state },
        }
    }

    /// Ends the session with a GOAWAY carrying `code` and `message`.
    pub fn go_away(&self, code: MuxError, message: &str) {
        if self.shared.closing.is_cancelled() {
            return;
        }
        let mut message = message.as_bytes().to_vec();
        message.truncate(512);
        self.shared.try_send(Frame::GoAway {
            last_stream_id: self.shared.next_peer_id(),
            code,
            message: message.into(),
        });
        self.shared.closing.cancel();
    }

    /// Ends the session at once, when its driver is no longer run: every
    /// stream fails.
    pub fn abort(&self) {
        self.shared.finish();
    }

    /// Resolves when the session is over.
    pub async fn gone(&self) {
        self.shared.gone.cancelled().await
    }

    /// When the agent last sent anything.
    pub fn last_heard(&self) -> Instant {
        *self.shared.last_heard.lock().expect("heard lock")
    }
}

impl Shared {
    /// The session is over: every stream fails, nothing more is sent.
    fn finish(&self) {
        self.gone.cancel();
        let slots: Vec<Slot> = self
            .streams
            .lock()
            .expect("streams lock")
            .drain()
            .map(|(_, slot)| slot)
            .collect();
        for slot in slots {
            let _ = slot.tx.send(Inbound::Reset(MuxError::SESSION_CLOSED));
            slot.window.close(MuxError::SESSION_CLOSED);
        }
    }

    /// The highest stream id the agent opened so far (for GOAWAY).
    fn next_peer_id(&self) -> u32 {
        self.streams
            .lock()
            .expect("streams lock")
            .keys()
            .filter(|id| *id % 2 == 1)
            .max()
            .copied()
            .unwrap_or(0)
    }
}

/// Runs the session: reads and dispatches frames, writes queued ones.
pub struct MuxDriver<T> {
    io: T,
    shared: Arc<Shared>,
    out_rx: mpsc::Receiver<Bytes>,
    accept_tx: mpsc::Sender<MuxStream>,
}

/// How a session ended.
#[derive(Debug)]
pub enum MuxEnd {
    /// The agent closed the connection or went away, or the edge did.
    Closed,
    /// The agent broke the protocol; a GOAWAY told it why.
    Protocol(FrameError),
    Io(io::Error),
}

impl std::fmt::Display for MuxEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MuxEnd::Closed => f.write_str("closed"),
            MuxEnd::Protocol(e) => write!(f, "protocol error ({}): {e}", e.code.name()),
            MuxEnd::Io(e) => write!(f, "connection error: {e}"),
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> MuxDriver<T> {
    /// Runs until either side ends the session; every stream then fails.
    pub async fn run(self) -> MuxEnd {
        let MuxDriver {
            io,
            shared,
            mut out_rx,
            accept_tx,
        } = self;
        let mux = Mux {
            shared: shared.clone(),
        };
        let (mut read, write) = tokio::io::split(io);
        // Frames queued together leave together: written one by one to
        // TLS, each would be a record and a system call of its own.
        let mut write = tokio::io::BufWriter::with_capacity(WRITE_BUFFER, write);
        let reader = read_frames(&mut read, &mux, &accept_tx);
        let writer = async {
            loop {
                let frame = tokio::select! {
                    frame = out_rx.recv() => frame,
                    _ = shared.closing.cancelled() => None,
                };
                let Some(frame) = frame else { break };
                write.write_all(&frame).await?;
                if out_rx.is_empty() {
                    write.flush().await?;
                }
            }
            // Closing: what is queued (the GOAWAY last) goes out first.
            while let Ok(frame) = out_rx.try_recv() {
                write.write_all(&frame).await?;
            }
            write.flush().await?;
            let _ = write.shutdown().await;
            Ok::<(), io::Error>(())
        };
        let end = tokio::select! {
            end = reader => end,
            written = writer => match written {
                Ok(()) => MuxEnd::Closed,
                Err(e) => MuxEnd::Io(e),
            },
        };
        if let MuxEnd::Protocol(e) = &end {
            // Best effort: the peer learns why before the connection goes.
            let goaway = Frame::GoAway {
                last_stream_id: shared.next_peer_id(),
                code: e.code,
                message: Bytes::from(e.reason.clone()),
            };
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
                write.write_all(&goaway.encode()).await?;
                write.flush().await
            })
            .await;
        }
        shared.finish();
        end
    }
}

async fn read_frames<R: AsyncRead + Unpin>(
    read: &mut R,
    mux: &Mux,
    accept_tx: &mpsc::Sender<MuxStream>,
) -> MuxEnd {
    let shared = &mux.shared;
    let mut last_peer_id = 0u32;
    loop {
        let mut raw = [0u8; HEADER_LEN];
        match read.read_exact(&mut raw).await {
            Ok(_) => {}
            // A silent close, or a close without GOAWAY: a normal end.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return MuxEnd::Closed,
            Err(e) => return MuxEnd::Io(e),
        }
        *shared.last_heard.lock().expect("heard lock") = Instant::now();
        let header = match Header::parse(raw) {
            Ok(header) => header,
            Err(e) => return MuxEnd::Protocol(e),
        };
        if header.is_go_away() {
            // The session is over; the body is not trusted (see the docs).
            return MuxEnd::Closed;
        }
        let mut body = BytesMut::zeroed(header.length);
        if let Err(e) = read.read_exact(&mut body).await {
            return match e.kind() {
                io::ErrorKind::UnexpectedEof => MuxEnd::Closed,
                _ => MuxEnd::Io(e),
            };
        }
        let frame = match Frame::from_parts(header, body.freeze()) {
            Ok(frame) => frame,
            Err(e) => return MuxEnd::Protocol(e),
        };
        let reply = match frame {
            Frame::Data {
                stream_id,
                syn,
                fin,
                data,
            } => {
                if syn {
                    if stream_id % 2 == 0 || stream_id <= last_peer_id {
                        return MuxEnd::Protocol(FrameError {
                            code: MuxError::PROTOCOL,
                            reason: format!(
                                "the agent opened stream {stream_id}: agents open odd, increasing ids"
                            ),
                        });
                    }
                    last_peer_id = stream_id;
                    if shared.peer_streams.load(Ordering::Relaxed) >= MAX_PEER_STREAMS {
                        shared
                            .send(Frame::Rst {
                                stream_id,
                                code: MuxError::STREAM_REFUSED,
                            })
                            .await;
                        continue;
                    }
                    shared.peer_streams.fetch_add(1, Ordering::Relaxed);
                    let stream = mux.register(stream_id, false);
                    if accept_tx.try_send(stream).is_err() {
                        // The state's drop resets it.
                        continue;
                    }
                }
                deliver(shared, stream_id, fin, data)
            }
            Frame::Rst { stream_id, code } => {
                if let Some(slot) = shared.remove(stream_id) {
                    let _ = slot.tx.send(Inbound::Reset(code));
                    slot.window.close(code);
                }
                None
            }
            Frame::WndInc {
                stream_id,
                increment,
            } => {
                if let Some(slot) = shared.streams.lock().expect("streams lock").get(&stream_id) {
                    slot.window.grant(increment);
                }
                None
            }
            Frame::GoAway { .. } => return MuxEnd::Closed,
        };
        if let Some(reply) = reply
            && !shared.send(reply).await
        {
            return MuxEnd::Closed;
        }
    }
}

/// Hands DATA to its stream; the frame to answer with, if any.
fn deliver(shared: &Shared, stream_id: u32, fin: bool, data: Bytes) -> Option<Frame> {
    let mut streams = shared.streams.lock().expect("streams lock");
    let Some(slot) = streams.get(&stream_id) else {
        // Data on a stream that is gone; an empty FIN is harmless.
        return (!(data.is_empty() && fin)).then_some(Frame::Rst {
            stream_id,
            code: MuxError::STREAM_CLOSED,
        });
    };
    if !data.is_empty() {
        let buffered = slot.buffered.fetch_add(data.len(), Ordering::Relaxed) + data.len();
        if buffered > INITIAL_WINDOW as usize {
            let _ = slot.tx.send(Inbound::Reset(MuxError::FLOW_CONTROL));
            slot.window.close(MuxError::FLOW_CONTROL);
            shared.remove_locked(&mut streams, stream_id);
            return Some(Frame::Rst {
                stream_id,
                code: MuxError::FLOW_CONTROL,
            });
        }
        let _ = slot.tx.send(Inbound::Data(data));
    }
    if fin {
        let _ = slot.tx.send(Inbound::Fin);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::DuplexStream;

    /// The agent's end: raw frames.
    struct Peer(DuplexStream);

    impl Peer {
        async fn send(&mut self, frame: Frame) {
            self.0.write_all(&frame.encode()).await.unwrap();
        }

        async fn frame(&mut self) -> Frame {
            let mut raw = [0u8; HEADER_LEN];
            self.0.read_exact(&mut raw).await.unwrap();
            let header = Header::parse(raw).unwrap();
            let mut body = vec![0u8; header.length];
            self.0.read_exact(&mut body).await.unwrap();
            Frame::from_parts(header, body.into()).unwrap()
        }
    }

    fn session() -> (Mux, mpsc::Receiver<MuxStream>, Peer) {
        let (edge, agent) = tokio::io::duplex(1 << 20);
        let (mux, driver, accepted) = Mux::new(edge);
        tokio::spawn(driver.run());
        (mux, accepted, Peer(agent))
    }

    fn data(stream_id: u32, syn: bool, fin: bool, data: &'static [u8]) -> Frame {
        Frame::Data {
            stream_id,
            syn,
            fin,
            data: Bytes::from_static(data),
        }
    }

    #[tokio::test]
    async fn the_edge_never_writes_past_the_agents_window() {
        let (mux, _accepted, mut peer) = session();
        let MuxStream { mut writer, .. } = mux.open().unwrap();
        let big = Bytes::from(vec![7u8; INITIAL_WINDOW as usize + 1000]);
        let write = tokio::spawn(async move { writer.write(big).await });
        let mut got = 0usize;
        while got < INITIAL_WINDOW as usize {
            match peer.frame().await {
                Frame::Data {
                    stream_id: 2, data, ..
                } => got += data.len(),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(got, INITIAL_WINDOW as usize);
        // Nothing more until the agent grants more.
        let more = tokio::time::timeout(Duration::from_millis(200), peer.frame()).await;
        assert!(more.is_err(), "wrote past the window");
        peer.send(Frame::WndInc {
            stream_id: 2,
            increment: 1000,
        })
        .await;
        match peer.frame().await {
            Frame::Data { data, .. } => assert_eq!(data.len(), 1000),
            other => panic!("unexpected {other:?}"),
        }
        write.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn data_beyond_the_granted_window_resets_only_that_stream() {
        let (_mux, mut accepted, mut peer) = session();
        peer.send(data(3, true, false, b"abcd")).await;
        let mut stream = accepted.recv().await.unwrap();
        let chunk = Bytes::from(vec![0u8; 128 * 1024]);
        for _ in 0..3 {
            peer.send(Frame::Data {
                stream_id: 3,
                syn: false,
                fin: false,
                data: chunk.clone(),
            })
            .await;
        }
        assert!(matches!(
            peer.frame().await,
            Frame::Rst {
                stream_id: 3,
                code: MuxError::FLOW_CONTROL
            }
        ));
        // The session goes on: another stream works.
        peer.send(data(5, true, true, b"next")).await;
        let mut next = accepted.recv().await.unwrap();
        assert_eq!(&next.reader.read().await.unwrap().unwrap()[..], b"next");
        let _ = stream.reader.read().await;
    }

    #[tokio::test]
    async fn reads_grant_the_window_back_and_fins_end_the_stream() {
        let (_mux, mut accepted, mut peer) = session();
        peer.send(data(3, true, false, b"hello")).await;
        let MuxStream {
            mut reader,
            mut writer,
        } = accepted.recv().await.unwrap();
        assert_eq!(&reader.read().await.unwrap().unwrap()[..], b"hello");
        assert_eq!(
            peer.frame().await,
            Frame::WndInc {
                stream_id: 3,
                increment: 5
            }
        );
        peer.send(data(3, false, true, b"")).await;
        assert_eq!(reader.read().await.unwrap(), None);
        writer.write(Bytes::from_static(b"bye")).await.unwrap();
        writer.finish().await.unwrap();
        assert_eq!(peer.frame().await, data(3, false, false, b"bye"));
        assert_eq!(peer.frame().await, data(3, false, true, b""));
    }

    #[tokio::test]
    async fn a_silent_close_ends_the_session_and_fails_its_streams() {
        let (edge, agent) = tokio::io::duplex(1 << 16);
        let (mux, driver, _accepted) = Mux::new(edge);
        let run = tokio::spawn(driver.run());
        let MuxStream { mut reader, .. } = mux.open().unwrap();
        drop(agent);
        assert!(matches!(run.await.unwrap(), MuxEnd::Closed | MuxEnd::Io(_)));
        assert_eq!(reader.read().await, Err(MuxError::SESSION_CLOSED));
    }

    #[tokio::test]
    async fn a_syn_of_the_wrong_parity_is_a_protocol_error() {
        let (edge, agent) = tokio::io::duplex(1 << 16);
        let (_mux, driver, _accepted) = Mux::new(edge);
        let run = tokio::spawn(driver.run());
        let mut peer = Peer(agent);
        peer.send(data(4, true, false, b"\0\0\0\x08")).await;
        assert!(matches!(run.await.unwrap(), MuxEnd::Protocol(_)));
        assert!(matches!(
            peer.frame().await,
            Frame::GoAway {
                code: MuxError::PROTOCOL,
                ..
            }
        ));
    }
}
