//! Counters of the public side.

use super::*;

/// Counters of the public side.
#[derive(Debug, Default)]
pub struct Stats {
    pub tls_no_sni: AtomicU64,
    pub tls_unknown_sni: AtomicU64,
    pub tls_bad_client_hello: AtomicU64,
    pub tls_client_hello_timeout: AtomicU64,
    pub tls_handshake_failed: AtomicU64,
    /// Handshakes refused for a missing or bad client certificate (mTLS).
    pub tls_bad_client_cert: AtomicU64,
    pub accept_errors: AtomicU64,
    pub http_requests: AtomicU64,
    pub tcp_connections: AtomicU64,
    /// New connections closed because the edge was at its connection cap.
    pub shed_connections: AtomicU64,
    /// Connections or requests refused by an IP restriction.
    pub ip_denied: AtomicU64,
    /// Bad or missing PROXY headers from trusted load balancers.
    pub bad_proxy_headers: AtomicU64,
    /// TCP/TLS endpoint connections closed for being idle.
    pub idle_closed: AtomicU64,
}

impl Stats {
    /// Name and value of every counter.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("tls_no_sni", get(&self.tls_no_sni)),
            ("tls_unknown_sni", get(&self.tls_unknown_sni)),
            ("tls_bad_client_hello", get(&self.tls_bad_client_hello)),
            (
                "tls_client_hello_timeout",
                get(&self.tls_client_hello_timeout),
            ),
            ("tls_handshake_failed", get(&self.tls_handshake_failed)),
            ("tls_bad_client_cert", get(&self.tls_bad_client_cert)),
            ("accept_errors", get(&self.accept_errors)),
            ("http_requests", get(&self.http_requests)),
            ("tcp_connections", get(&self.tcp_connections)),
            ("shed_connections", get(&self.shed_connections)),
            ("ip_denied", get(&self.ip_denied)),
            ("bad_proxy_headers", get(&self.bad_proxy_headers)),
            ("idle_closed", get(&self.idle_closed)),
        ]
    }
}

pub(super) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Counts a visitor an IP restriction refused.
pub(super) fn count_ip_denial(inner: &Inner, decision: Option<Decision>) {
    if decision == Some(Decision::Block) {
        bump(&inner.stats.ip_denied);
    }
}
