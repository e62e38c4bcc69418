//! The one small HTTP/1 server, under the edge's admin API, its metrics and
//! health endpoints, and the agent API. Every connection has a header-read
//! timeout (a client that does not send a whole request head in time, or
//! no next request on a kept-alive connection, is closed) and an idle
//! timeout (no byte either way for that long closes it), so a slow client
//! cannot hold a connection open.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, time::Instant};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    accept::{AcceptLoop, Accepted, Prefixed},
    io::{Hooked, IoHook},
};

/// How long an HTTP/1 client may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpTimeouts {
    /// To send a whole request head, counted from the end of the previous
    /// response on a kept-alive connection.
    pub header_read: Duration,
    /// Without a byte either way (a stalled body, a response nobody reads).
    pub idle: Duration,
}

impl Default for HttpTimeouts {
    /// 30 s for a request head (hyper's default), 60 s idle.
    fn default() -> HttpTimeouts {
        HttpTimeouts {
            header_read: Duration::from_secs(30),
            idle: Duration::from_secs(60),
        }
    }
}

impl AcceptLoop {
    /// Serves HTTP/1 on `listener`: `handler` answers every request, given
    /// the client's address. When the loop's stop token is cancelled,
    /// kept-alive connections close and requests in flight finish.
    pub fn serve_http<F, Fut>(self, listener: TcpListener, timeouts: HttpTimeouts, handler: F)
    where
        F: Fn(Request<Incoming>, SocketAddr) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let (name, stop) = (self.name, self.stop.clone());
        self.spawn(listener, move |accepted| {
            serve_connection(name, accepted, stop.clone(), timeouts, handler.clone())
        });
    }
}

async fn serve_connection<F, Fut>(
    name: &'static str,
    accepted: Accepted,
    stop: CancellationToken,
    timeouts: HttpTimeouts,
    handler: Arc<F>,
) where
    F: Fn(Request<Incoming>, SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let Accepted {
        stream,
        client,
        prefix,
        slot: _slot,
        ..
    } = accepted;
    let activity = Arc::new(Activity::new());
    let io = Hooked::new(Prefixed::new(prefix, stream), activity.clone());
    let service = service_fn(move |req| {
        let handler = handler.clone();
        async move { Ok::<_, Infallible>(handler(req, client).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.header_read)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let idle = activity.idle_for(timeouts.idle);
    tokio::pin!(idle);
    let result = tokio::select! {
        result = &mut conn => result,
        _ = &mut idle => return idle_closed(name, client),
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                result = &mut conn => result,
                _ = &mut idle => return idle_closed(name, client),
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(listener = name, %client, error = %e, "HTTP connection ended with an error");
    }
}

fn idle_closed(name: &'static str, client: SocketAddr) {
    tracing::debug!(listener = name, %client, "idle HTTP connection closed");
}

/// When a connection last moved a byte.
struct Activity {
    start: Instant,
    /// Milliseconds from `start`.
    last: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let now = self.start.elapsed().as_millis();
        self.last
            .store(u64::try_from(now).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Resolves once no byte has moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last.load(Ordering::Relaxed));
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// Notes every read or write that moves bytes.
impl<S> IoHook<S> for Arc<Activity> {
    fn read(&self, _io: &S, _bytes: &[u8]) {
        self.touch();
    }

    fn wrote(&self, _io: &S, _bytes: &[u8]) {
        self.touch();
    }
}

/// An HTTP/1 server that owns its tasks and its stop switch, for a
/// listener with nothing else beside it (the edge's admin API and
/// metrics).
pub struct HttpServer {
    stop: CancellationToken,
    tracker: TaskTracker,
}

impl HttpServer {
    /// Serves `handler` on `listener`; `name` names the server in logs.
    pub fn start<F, Fut>(
        name: &'static str,
        listener: TcpListener,
        timeouts: HttpTimeouts,
        handler: F,
    ) -> HttpServer
    where
        F: Fn(Request<Incoming>, SocketAddr) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
    {
        let (stop, tracker) = (CancellationToken::new(), TaskTracker::new());
        AcceptLoop::new(name, &tracker, &stop).serve_http(listener, timeouts, handler);
        HttpServer { stop, tracker }
    }

    /// Stops accepting, closes kept-alive connections, and lets requests
    /// in flight finish for at most `grace`.
    pub async fn shutdown(self, grace: Duration) {
        self.stop.cancel();
        self.tracker.close();
        let _ = tokio::time::timeout(grace, self.tracker.wait()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server answering with the path and the body's length.
    async fn server(header_read: Duration, idle: Duration) -> (HttpServer, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let timeouts = HttpTimeouts { header_read, idle };
        let server = HttpServer::start("test", listener, timeouts, |req, _client| async move {
            let path = req.uri().path().to_string();
            let body = req.into_body().collect().await.map(|b| b.to_bytes());
            let len = body.map_or(0, |b| b.len());
            Response::new(Full::new(Bytes::from(format!("{path} {len}"))))
        });
        (server, addr)
    }

    /// Sends `bytes` and reads until the server closes; `None` when it has
    /// not within 5 s.
    async fn send(addr: SocketAddr, bytes: &[u8]) -> Option<String> {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(bytes).await.unwrap();
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out));
        read.await
            .ok()
            .map(|_| String::from_utf8_lossy(&out).into_owned())
    }

    #[tokio::test]
    async fn answers_and_cuts_a_slow_request_head() {
        let (server, addr) = server(Duration::from_millis(200), Duration::from_secs(60)).await;
        let answer = send(
            addr,
            b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("/hello 0"),
            "{answer}"
        );
        let cut = send(addr, b"GET /slow HTTP/1.1\r\nHost:").await;
        assert!(cut.is_some(), "the slow client is cut off");
        server.shutdown(Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn a_stalled_body_is_cut_at_the_idle_timeout() {
        let (server, addr) = server(Duration::from_secs(60), Duration::from_millis(200)).await;
        let stalled = b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc";
        assert!(send(addr, stalled).await.is_some(), "cut when idle");
        server.shutdown(Duration::from_secs(1)).await;
    }
}
