//! The request inspector: HTTP tunnels with `inspect` (the default, as in
//! ngrok) are served as HTTP/1.1 (or HTTP/2, for `upstream_protocol:
//! http2`) on each data stream and forwarded to the upstream with a hyper
//! client, so the agent sees every request and response. Bodies are teed
//! into the capture as they stream, up to [`BODY_CAPTURE_LIMIT`] each, never
//! buffered whole, and their trailers kept; the captures live in memory,
//! bounded by `inspect_db_size`, and can be replayed.

mod proxy;
mod store;
mod tee;

pub(crate) use proxy::{Replay, Stream, replay, serve};
#[cfg(test)]
pub(crate) use store::tests as store_tests;
pub(crate) use store::{BodyState, Captured, CapturedBody, Captures, ResponseCapture};

/// `inspect_db_size` when the config leaves it at 0: ngrok's 50 MB.
pub(crate) const DEFAULT_DB_SIZE: u64 = 50 * 1000 * 1000;

/// Bytes of each request or response body kept in a capture; the rest
/// streams through uncounted in memory (its size is still recorded).
pub(crate) const BODY_CAPTURE_LIMIT: usize = 256 * 1024;
