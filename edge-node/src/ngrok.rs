//! The second agent ingress: ngrok's agent protocol, as the ngrok SDKs
//! (the Rust crate, and the Python and Node packages built on it, and
//! ngrok-go) speak it, on its own TLS listener (`listen.ngrok_agent`).
//!
//! A connection is a muxado session ([`mux`]); the SDK authenticates with
//! an Auth RPC, which opens an ordinary registry session, and binds with
//! Bind RPCs, which become Postern bind requests ([`bind`]) that the
//! registry checks and builds as it does for its own agents. Visitors reach
//! the SDK through the registry's `StreamSource` seam: the session's link
//! opens a muxado stream, writes the proxy header, then relays frames.
//! See `docs/ngrok-agent-protocol.md`.

mod bind;
mod conn;
mod messages;
mod mux;

use std::sync::Arc;

use futures_util::StreamExt;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{registry::Registry, service::tls_incoming};

/// Serves ngrok SDK sessions on `listener` until `stop`; every connection
/// and stream task runs on `tracker`.
pub fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    registry: Arc<Registry>,
    tracker: &TaskTracker,
    stop: CancellationToken,
) {
    let mut incoming = Box::pin(tls_incoming(
        "ngrok agent",
        listener,
        tls,
        tracker,
        &stop,
        true,
    ));
    let connections = tracker.clone();
    tracker.spawn(async move {
        loop {
            let conn = tokio::select! {
                conn = incoming.next() => conn,
                _ = stop.cancelled() => None,
            };
            let Some(conn) = conn else { break };
            match conn {
                Ok(conn) => {
                    let (registry, tasks) = (registry.clone(), connections.clone());
                    connections.spawn(conn::run(conn, registry, tasks, stop.clone()));
                }
                Err(e) => tracing::info!(error = %e, "ngrok agent connection failed"),
            }
        }
    });
}
