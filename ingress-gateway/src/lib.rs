//! The public side of a Postern edge node: listeners for HTTP, HTTPS and
//! SNI-routed TLS, per-endpoint TCP listeners, the domain router, TLS
//! termination and HTTP proxying into tunnel data streams.
//!
//! It knows nothing of agent sessions, tokens or gossip: an endpoint comes
//! with a [`StreamSource`] that hands out data streams, and that is all the
//! gateway asks of the agent side.

mod endpoint;
mod gateway;
mod http;
mod ip;
mod metrics;
mod mtls;
mod oauth;
mod outcome;
mod policy;
mod route;
mod router;
mod sni;
mod tls;

pub use endpoint::{
    ClaimedStream, Endpoint, EndpointKind, Location, ServedBy, StreamSource, TerminateAt,
    open_frame,
};
pub use gateway::{EndpointSpec, Gateway, GatewayConfig, Protocol, Stats};
pub use http::{ERROR_CODE_HEADER, is_reserved_header};
pub use ip::{CidrError, IpPolicy, TrustedProxies, parse_cidr};
pub use metrics::{Metrics, header as metric_header, sample as metric_sample};
pub use mtls::{
    CaCert, CaError, CaResolver, ClientIdentity, MAX_CAS, MtlsPolicy, RequireClientCert, ca_cert,
    parse_ca_bundle,
};
pub use oauth::{
    Gate, IdpHttp, MemoryStore, NAMED_PROVIDERS, OAuthEndpoint, OAuthService, OAuthSettings,
    RedisOptions, RedisStore, RedisTarget, Secret, SessionKey, SessionQuery, SessionStore,
    SessionView, StoreError, StoreFuture, redact_url,
};
pub use outcome::Outcomes;
pub use policy::{Document as PolicyDocument, PolicyError, TrafficPolicy};
pub use router::{DomainPattern, NameError, Router, normalize_host, normalize_name};
pub use sni::{ClientHello, Peek, PeekError, peek_client_hello};
pub use tls::{
    CertStore, DevCa, Pem, ServingCert, TlsError, build_server_config, certificate_names,
    certified_key_from_pem, crypto_provider, single_cert_config,
};

/// A random id with a prefix, in the style of ngrok's (`ep_…`, `ts_…`):
/// 27 base-62 characters, about 160 bits.
pub fn random_id(prefix: &str) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::rng();
    let mut id = String::with_capacity(prefix.len() + 27);
    id.push_str(prefix);
    for _ in 0..27 {
        id.push(ALPHABET[rng.random_range(0..ALPHABET.len())] as char);
    }
    id
}

/// A random DNS label for endpoints bound without a domain.
pub fn random_label() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..12)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}
