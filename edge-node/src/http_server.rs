//! A small HTTP/1 server for the edge's own APIs (admin, telemetry): one
//! accept loop and one task per connection, all owned by the returned
//! handle.

use std::{convert::Infallible, future::Future, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// A running server.
pub struct ServerHandle {
    stop: CancellationToken,
    tracker: TaskTracker,
}

impl ServerHandle {
    /// Stops accepting, closes connections, waits (at most 5 s) for the tasks.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tracker.wait()).await;
    }
}

/// Serves `handler` on `listener`; `what` names the server in logs.
pub fn serve<S, F, Fut>(
    what: &'static str,
    listener: TcpListener,
    state: Arc<S>,
    handler: F,
) -> ServerHandle
where
    S: Send + Sync + 'static,
    F: Fn(Arc<S>, Request<Incoming>, SocketAddr) -> Fut + Send + Sync + Copy + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let (accept_stop, accept_tracker) = (stop.clone(), tracker.clone());
    tracker.spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                _ = accept_stop.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "{what}: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let state = state.clone();
            let stop = accept_stop.clone();
            accept_tracker.spawn(async move {
                let service = service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(handler(state, req, peer).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                tokio::select! {
                    _ = conn => {}
                    _ = stop.cancelled() => {}
                }
            });
        }
    });
    ServerHandle { stop, tracker }
}
