//! The Postern tunnel protocol, shared by agent and edge: the generated gRPC
//! code, the adapters that carry a socket over a data stream, and the error
//! table. No policy lives here: nothing about tokens, routing or modules.
//! See `PROTOCOL.md` for the protocol in prose.

mod attach;
mod basic_auth;
mod budget;
mod codec;
mod cork;
pub mod direct;
pub mod drive;
mod error;
pub mod muxado;
mod pipe;
mod tunnel_io;
mod version;

/// Generated messages and the `Tunnel` service (client and server).
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("postern.tunnel.v1");
}

pub use attach::{AttachedFrames, BoxFrames, InboundFrames, attachable};
pub use budget::{Take, TokenBucket};
/// The generated code names it as `crate::TunnelCodec`.
use codec::TunnelCodec;
pub use error::{ErrorCode, Failure, Fault};
pub use pipe::{
    End, INITIAL_READ, InboundPump, LocalWrite, MAX_READ, OutboundFrames, PipeOutcome, pipe,
};
pub use tunnel_io::{ChannelFrames, TunnelIo, tunnel_io};
pub use version::{MAX_PROTOCOL_VERSION, MIN_PROTOCOL_VERSION, negotiate};

/// Where TLS ends for a TLS endpoint: the wire's [`pb::TerminateAt`]
/// without its unspecified value, as the agent's config and the gateway
/// hold it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TerminateAt {
    Edge,
    Agent,
    Upstream,
}

impl From<TerminateAt> for pb::TerminateAt {
    fn from(at: TerminateAt) -> Self {
        match at {
            TerminateAt::Edge => pb::TerminateAt::Edge,
            TerminateAt::Agent => pb::TerminateAt::Agent,
            TerminateAt::Upstream => pb::TerminateAt::Upstream,
        }
    }
}

/// Request metadata keys on `Data` and `NodeLink.Forward` streams.
pub mod metadata {
    pub const SESSION: &str = "postern-session";
    pub const STREAM_TOKEN: &str = "postern-stream-token";
    /// `NodeLink.Forward`: the endpoint id at the receiving node.
    pub const FORWARD_ENDPOINT: &str = "postern-forward-endpoint";
    /// `NodeLink.Forward`: the node that forwards.
    pub const FORWARD_FROM: &str = "postern-forward-from";
    /// On a refused `NodeLink.Forward`: the error code number.
    pub const ERROR_CODE: &str = "postern-error-code";
}

/// HTTP/2 settings used on both ends of the agent connection.
///
/// The per-stream window bounds what one slow visitor or upstream can park in
/// the receiver's buffers; the connection window bounds all of them together
/// and must stay several stream windows wide, so that a few stalled streams
/// cannot stall the rest of the session.
pub mod h2_settings {
    pub const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
    pub const CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;
    pub const MAX_FRAME_SIZE: u32 = 256 * 1024;
    /// Concurrent streams per agent connection (tonic's default is unlimited).
    pub const MAX_CONCURRENT_STREAMS: u32 = 16 * 1024;

    /// Connections one peer opens to another by default, streams taken in
    /// turn: one per core, at most 4 (one HTTP/2 connection is one task on
    /// each side, so one core).
    pub fn default_connections() -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
    }
}
