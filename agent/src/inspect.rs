//! The request inspector: HTTP tunnels with `inspect` (the default, as in
//! ngrok) show every request and response. An HTTP/1.1 stream goes through
//! the byte pipe as if uninspected, with a parse of its bytes beside it
//! ([`passive`]). Streams that need more than a copy of their bytes go
//! through a proxy instead ([`proxy`]): HTTP/2 (`upstream_protocol: http2`),
//! and any stream while spans are recorded (each request then gets a span
//! and carries its trace context to the upstream). There the agent serves
//! the stream with hyper and forwards each request with a hyper client.
//! Either way bodies are copied into the capture as they stream, up to
//! [`BODY_CAPTURE_LIMIT`] each, never buffered whole, and their trailers
//! kept; the captures live in memory, bounded by `inspect_db_size`, and can
//! be replayed.

mod passive;
mod proxy;
mod store;
mod tee;

pub(crate) use passive::{Tap, Watch};
pub(crate) use proxy::{Replay, Stream, replay, serve};
#[cfg(test)]
pub(crate) use store::Headers;
#[cfg(test)]
pub(crate) use store::tests as store_tests;
pub(crate) use store::{BodyState, Captured, CapturedBody, Captures, ResponseCapture};

/// `inspect_db_size` when the config leaves it at 0: ngrok's 50 MB.
pub(crate) const DEFAULT_DB_SIZE: u64 = 50 * 1000 * 1000;

/// Bytes of each request or response body kept in a capture; the rest
/// streams through uncounted in memory (its size is still recorded).
pub(crate) const BODY_CAPTURE_LIMIT: usize = 256 * 1024;
