//! The networking pieces the agent and the edge share: the [`Secret`]
//! type, random ids, TLS basics (the crypto provider, serving keys from
//! PEM), CA bundles and client-certificate verification, IP rules and
//! trusted load balancers, the PROXY header codec, Prometheus text, a
//! stream wrapper with a hook on its reads and writes, the TLS connector
//! gRPC channels dial with, one accept loop, one small HTTP/1 server, and
//! the shutdown signal.
//!
//! Both binaries link it, so it must stay small: it never depends on
//! another Postern crate, nor on gRPC (tonic), Redis, OpenID Connect or
//! Kafka. Policy (tokens, routing, modules) lives elsewhere.

mod accept;
mod connect;
mod http_server;
mod ids;
mod io;
mod ip;
mod metrics;
mod mtls;
/// PROXY protocol v1 and v2, named as a module: `proxy_header::parse`.
pub mod proxy_header;
mod secret;
mod signal;
mod tls;

pub use accept::{
    AcceptEvents, AcceptLoop, Accepted, ConnectionLimit, ConnectionSlot, Prefixed, Shed,
};
pub use connect::{TlsConnect, tcp_nodelay};
pub use http_server::{HttpServer, HttpTimeouts};
pub use ids::{random_id, random_label};
pub use io::{Hooked, IoHook};
pub use ip::{CidrError, IpPolicy, TrustedProxies, parse_cidr};
pub use metrics::{metric_header, metric_sample};
pub use mtls::{
    CaCert, CaError, CaResolver, MAX_CAS, MtlsPolicy, RequestClientCert, RequireClientCert,
    ca_cert, fingerprint, parse_ca_bundle, usages,
};
pub use secret::Secret;
pub use signal::shutdown_signal;
pub use tls::{Pem, TlsError, certified_key_from_pem, crypto_provider};

/// An HTTP version as ngrok writes it in events, the agent API and Traffic
/// Policy's `req.version` (`"HTTP/1.1"`, `"HTTP/2.0"`): the text of
/// `http::Version`'s `Debug`, without formatting.
pub fn http_version_text(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2.0",
        http::Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}
