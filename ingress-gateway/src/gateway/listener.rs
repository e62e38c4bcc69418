//! The public listeners' accept loop (`postern-net`'s), with the
//! gateway's counters and shedding.

use super::*;

/// What a plain-HTTP connection over the edge's cap gets.
pub(super) const SHED_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n\
ngrok-error-code: ERR_POSTERN_9003\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

impl AcceptEvents for Inner {
    fn accept_failed(&self) {
        self.count(Counter::AcceptErrors);
    }

    fn shed(&self) {
        self.count(Counter::ShedConnections);
    }

    fn bad_proxy_header(&self) {
        self.count(Counter::BadProxyHeaders);
    }
}

/// Accepts on a public listener until `token` is cancelled, through
/// `postern-net`'s loop: past the connection cap new connections are shed,
/// trusted load balancers' PROXY headers are read, and the gateway counts.
pub(super) fn spawn_accept_loop<F, Fut>(
    inner: &Arc<Inner>,
    name: &'static str,
    listener: TcpListener,
    token: &CancellationToken,
    shed: Shed,
    handler: F,
) where
    F: Fn(Arc<Inner>, Accepted) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let owner = inner.clone();
    AcceptLoop::new(name, &inner.tracker, token)
        .cap(&inner.connections, shed)
        .proxy_headers(
            &inner.config.trusted_proxies,
            inner.config.client_hello_timeout,
        )
        .events(inner.clone())
        .spawn(listener, move |accepted| handler(owner.clone(), accepted));
}
