//! The one accept loop: every listener of the agent and the edge accepts
//! through it. It runs until its stop token is cancelled; running out of
//! file descriptors or memory is back-pressure (log, back off, keep serving
//! what is open), never an exit. It can cap the connections open at once
//! (shedding new ones past the cap) and read a PROXY header from trusted
//! load balancers. The loop and every connection task run on a
//! [`TaskTracker`] the caller owns, so the caller can wait for them.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{ip::TrustedProxies, proxy_header};

/// The wait after an accept that failed for lack of resources: 10 ms,
/// doubling with every failure in a row up to 1 s.
const MIN_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// How long a shed connection's reply may take to write.
const SHED_REPLY_TIMEOUT: Duration = Duration::from_secs(1);

/// What a loop tells its owner, for counters. Every method defaults to
/// doing nothing.
pub trait AcceptEvents: Send + Sync + 'static {
    /// `accept` failed; the loop goes on.
    fn accept_failed(&self) {}
    /// A connection past the cap was shed.
    fn shed(&self) {}
    /// A trusted peer sent no valid PROXY header in time; it was closed.
    fn bad_proxy_header(&self) {}
}

struct Uncounted;

impl AcceptEvents for Uncounted {}

/// A cap on the connections open at once, shared by the loops given it.
#[derive(Debug)]
pub struct ConnectionLimit {
    max: usize,
    open: AtomicUsize,
}

impl ConnectionLimit {
    pub fn new(max: usize) -> Arc<ConnectionLimit> {
        Arc::new(ConnectionLimit {
            max,
            open: AtomicUsize::new(0),
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Counts a new connection; `false` when it is past the cap (it is
    /// counted all the same until the slot is dropped).
    fn take(self: &Arc<Self>) -> (ConnectionSlot, bool) {
        let before = self.open.fetch_add(1, Ordering::Relaxed);
        (ConnectionSlot(Some(self.clone())), before < self.max)
    }
}

/// One open connection under a [`ConnectionLimit`], counted while it lives.
pub struct ConnectionSlot(Option<Arc<ConnectionLimit>>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        if let Some(limit) = &self.0 {
            limit.open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// What a connection past the cap gets.
#[derive(Clone, Copy, Debug)]
pub enum Shed {
    /// Closed at once.
    Close,
    /// These bytes (a `503`, say), then closed.
    Reply(&'static [u8]),
}

/// An accepted connection.
pub struct Accepted {
    pub stream: TcpStream,
    /// The client: the TCP peer, or the source a trusted load balancer's
    /// PROXY header names.
    pub client: SocketAddr,
    pub local: SocketAddr,
    /// Bytes read after a PROXY header, to be handled as the connection's
    /// first (see [`Prefixed`]).
    pub prefix: Bytes,
    /// Keep it as long as the connection: it holds the connection's place
    /// under the cap.
    pub slot: ConnectionSlot,
}

/// Where PROXY headers are expected, and how long one may take.
struct ProxyHeaders {
    trusted: TrustedProxies,
    timeout: Duration,
}

/// An accept loop being set up; [`AcceptLoop::spawn`] starts it.
pub struct AcceptLoop {
    pub(crate) name: &'static str,
    tracker: TaskTracker,
    pub(crate) stop: CancellationToken,
    cap: Option<(Arc<ConnectionLimit>, Shed)>,
    proxy_headers: Option<Arc<ProxyHeaders>>,
    events: Arc<dyn AcceptEvents>,
}

impl AcceptLoop {
    /// A loop named `name` in logs, running on `tracker` until `stop`.
    pub fn new(name: &'static str, tracker: &TaskTracker, stop: &CancellationToken) -> AcceptLoop {
        AcceptLoop {
            name,
            tracker: tracker.clone(),
            stop: stop.clone(),
            cap: None,
            proxy_headers: None,
            events: Arc::new(Uncounted),
        }
    }

    /// Sheds new connections while `limit` is full.
    pub fn cap(mut self, limit: &Arc<ConnectionLimit>, shed: Shed) -> AcceptLoop {
        self.cap = Some((limit.clone(), shed));
        self
    }

    /// Reads a PROXY header (v1 or v2) from the peers `trusted` lists when
    /// it says they send one, within `timeout`; a trusted peer that sends
    /// none or a bad one is closed. Others are taken as they are.
    pub fn proxy_headers(mut self, trusted: &TrustedProxies, timeout: Duration) -> AcceptLoop {
        self.proxy_headers = trusted.proxy_protocol.then(|| {
            Arc::new(ProxyHeaders {
                trusted: trusted.clone(),
                timeout,
            })
        });
        self
    }

    /// Where the loop's counters go.
    pub fn events(mut self, events: Arc<dyn AcceptEvents>) -> AcceptLoop {
        self.events = events;
        self
    }

    /// Starts accepting on `listener`, each connection handled by `handler`
    /// in its own task.
    pub fn spawn<F, Fut>(self, listener: TcpListener, handler: F)
    where
        F: Fn(Accepted) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let tracker = self.tracker.clone();
        tracker.spawn(self.run(listener, handler));
    }

    async fn run<F, Fut>(self, listener: TcpListener, handler: F)
    where
        F: Fn(Accepted) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let mut backoff = MIN_BACKOFF;
        loop {
            let accepted = tokio::select! {
                _ = self.stop.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    self.events.accept_failed();
                    if !is_resource_exhaustion(&e) {
                        tracing::debug!(listener = self.name, error = %e, "accept failed");
                        continue;
                    }
                    tracing::warn!(listener = self.name, error = %e, backoff = ?backoff, "accept failed for lack of resources; backing off");
                    tokio::select! {
                        _ = self.stop.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            backoff = MIN_BACKOFF;
            let Some((stream, slot)) = self.admit(stream) else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let (handler, proxy_headers, events) = (
                handler.clone(),
                self.proxy_headers.clone(),
                self.events.clone(),
            );
            self.tracker.spawn(async move {
                let accepted =
                    identify(stream, peer, slot, proxy_headers.as_deref(), &*events).await;
                if let Some(accepted) = accepted {
                    handler(accepted).await;
                }
            });
        }
    }

    /// A place under the cap for a new connection, or `None` when it was
    /// shed (answered in the background, when the loop replies).
    fn admit(&self, mut stream: TcpStream) -> Option<(TcpStream, ConnectionSlot)> {
        let Some((limit, shed)) = &self.cap else {
            return Some((stream, ConnectionSlot(None)));
        };
        let (slot, admitted) = limit.take();
        if admitted {
            return Some((stream, slot));
        }
        self.events.shed();
        if let Shed::Reply(reply) = *shed {
            self.tracker.spawn(async move {
                let _ = tokio::time::timeout(SHED_REPLY_TIMEOUT, stream.write_all(reply)).await;
                drop(slot);
            });
        }
        None
    }
}

/// Whether an accept error means the process is out of something (EMFILE,
/// ENFILE, ENOBUFS, ENOMEM) rather than that one connection went wrong.
fn is_resource_exhaustion(e: &io::Error) -> bool {
    // EMFILE, ENFILE, ENOBUFS, ENOMEM (Linux numbers).
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12))
}

/// Learns who the client is: behind a trusted load balancer speaking the
/// PROXY protocol, the header's source; otherwise the TCP peer. A trusted
/// peer that sends no valid header in time is closed and counted.
async fn identify(
    mut stream: TcpStream,
    peer: SocketAddr,
    slot: ConnectionSlot,
    proxy_headers: Option<&ProxyHeaders>,
    events: &dyn AcceptEvents,
) -> Option<Accepted> {
    let local = stream.local_addr().ok()?;
    let Some(proxy_headers) = proxy_headers.filter(|p| p.trusted.trusts(peer.ip())) else {
        return Some(Accepted {
            stream,
            client: peer,
            local,
            prefix: Bytes::new(),
            slot,
        });
    };
    let mut buf = BytesMut::with_capacity(256);
    let read = async {
        loop {
            match proxy_header::parse(&buf) {
                Ok(Some((header, used))) => return Ok((header, used)),
                Ok(None) => {}
                Err(e) => return Err(e.to_string()),
            }
            if buf.len() >= 16 + proxy_header::V2_MAX_BLOCK {
                return Err("PROXY header too long".to_string());
            }
            match stream.read_buf(&mut buf).await {
                Ok(0) => return Err("closed before the PROXY header".to_string()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    match tokio::time::timeout(proxy_headers.timeout, read).await {
        Ok(Ok((header, used))) => {
            let prefix = buf.split_off(used).freeze();
            Some(Accepted {
                stream,
                client: header.source.unwrap_or(peer),
                local: header.destination.unwrap_or(local),
                prefix,
                slot,
            })
        }
        Ok(Err(reason)) => {
            events.bad_proxy_header();
            tracing::debug!(%peer, reason, "bad PROXY header from a trusted peer");
            None
        }
        Err(_) => {
            events.bad_proxy_header();
            None
        }
    }
}

/// A stream that first replays bytes already read from it.
pub struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Bytes, inner: S) -> Prefixed<S> {
        Prefixed { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let chunk = self.prefix.split_to(n);
            buf.put_slice(&chunk);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use tokio::sync::mpsc;

    use super::*;
    use crate::{ip::parse_cidr, proxy_header::Version};

    #[derive(Default)]
    struct Counts {
        shed: AtomicU64,
        bad_proxy_headers: AtomicU64,
    }

    impl AcceptEvents for Counts {
        fn shed(&self) {
            self.shed.fetch_add(1, Ordering::Relaxed);
        }

        fn bad_proxy_header(&self) {
            self.bad_proxy_headers.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A loop set up by `setup` whose connections come out of the receiver.
    async fn start(
        setup: impl FnOnce(AcceptLoop) -> AcceptLoop,
    ) -> (SocketAddr, mpsc::Receiver<Accepted>, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tracker, stop) = (TaskTracker::new(), CancellationToken::new());
        let (tx, rx) = mpsc::channel(4);
        setup(AcceptLoop::new("test", &tracker, &stop)).spawn(listener, move |accepted| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(accepted).await;
            }
        });
        (addr, rx, stop)
    }

    async fn read_all(mut stream: TcpStream) -> Vec<u8> {
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out))
            .await
            .expect("closed")
            .unwrap();
        out
    }

    #[tokio::test]
    async fn past_the_cap_new_connections_are_shed_until_a_place_frees() {
        let limit = ConnectionLimit::new(1);
        let counts = Arc::new(Counts::default());
        let (addr, mut accepted, stop) =
            start(|l| l.cap(&limit, Shed::Reply(b"busy")).events(counts.clone())).await;
        let _first = TcpStream::connect(addr).await.unwrap();
        let held = accepted.recv().await.unwrap();
        assert_eq!(limit.open(), 1);
        let shed = TcpStream::connect(addr).await.unwrap();
        assert_eq!(read_all(shed).await, b"busy");
        assert_eq!(counts.shed.load(Ordering::Relaxed), 1);
        drop(held);
        let _third = TcpStream::connect(addr).await.unwrap();
        assert!(
            accepted.recv().await.is_some(),
            "served once a place is free"
        );
        stop.cancel();
    }

    #[tokio::test]
    async fn trusted_peers_name_the_client_in_a_proxy_header() {
        let trusted = TrustedProxies {
            cidrs: vec![parse_cidr("cidrs", "127.0.0.1").unwrap()],
            proxy_protocol: true,
            forwarded_for: false,
        };
        let counts = Arc::new(Counts::default());
        let (addr, mut accepted, stop) = start(|l| {
            l.proxy_headers(&trusted, Duration::from_secs(5))
                .events(counts.clone())
        })
        .await;
        let visitor: SocketAddr = "203.0.113.7:4000".parse().unwrap();
        let mut conn = TcpStream::connect(addr).await.unwrap();
        let mut sent = proxy_header::encode(Version::V2, visitor, addr);
        sent.extend_from_slice(b"hello");
        conn.write_all(&sent).await.unwrap();
        drop(conn);
        let got = accepted.recv().await.unwrap();
        assert_eq!((got.client, got.local), (visitor, addr));
        let mut first = got.prefix.to_vec();
        first.extend(read_all(got.stream).await);
        assert_eq!(
            first, b"hello",
            "bytes after the header are the connection's"
        );

        let mut bad = TcpStream::connect(addr).await.unwrap();
        bad.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        assert!(read_all(bad).await.is_empty(), "closed without a header");
        assert_eq!(counts.bad_proxy_headers.load(Ordering::Relaxed), 1);
        stop.cancel();
    }
}
