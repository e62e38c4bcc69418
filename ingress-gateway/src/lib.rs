//! The public side of a Postern edge node: listeners for HTTP, HTTPS and
//! SNI-routed TLS, per-endpoint TCP listeners, the domain router, TLS
//! termination and HTTP proxying into tunnel data streams.
//!
//! It knows nothing of agent sessions, tokens or gossip: an endpoint comes
//! with a [`StreamSource`] that hands out data streams, and that is all the
//! gateway asks of the agent side. What it shares with the agent (TLS and
//! mTLS basics, IP rules, the accept loop) is `postern-net`'s.

mod acme_challenge;
mod endpoint;
mod gateway;
mod http;
mod metrics;
mod mtls;
mod oauth;
mod outcome;
mod policy;
mod route;
mod router;
mod sni;
mod tls;

pub use acme_challenge::{ACME_TLS_ALPN, AcmeChallenges, HTTP01_PREFIX};
pub use endpoint::{
    ClaimedStream, Endpoint, EndpointKind, Location, ServedBy, StreamSource, TerminateAt,
    open_frame,
};
pub use gateway::{EndpointSpec, Gateway, GatewayConfig, Protocol};
pub use http::{ERROR_CODE_HEADER, is_reserved_header};
pub use metrics::Metrics;
pub use mtls::ClientIdentity;
pub use oauth::{
    Gate, IdpHttp, MemoryStore, NAMED_PROVIDERS, OAuthEndpoint, OAuthService, OAuthSettings,
    RedisOptions, RedisStore, RedisTarget, SessionKey, SessionQuery, SessionStore, SessionView,
    StoreError, StoreFuture, redact_url,
};
pub use outcome::Outcomes;
pub use policy::{Document as PolicyDocument, PolicyError, RateStore, RedisRates, TrafficPolicy};
pub use router::{DomainPattern, NameError, Router, normalize_host, normalize_name};
pub use sni::{ClientHello, Peek, PeekError, peek_client_hello};
pub use tls::{
    CertSource, CertStore, DevCa, ServingCert, build_server_config, certificate_names, names_cover,
    single_cert_config,
};
