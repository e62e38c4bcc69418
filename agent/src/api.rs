//! The agent API and the inspector page, on `web_addr` (127.0.0.1:4040 by
//! default), in ngrok's paths and JSON shapes: list, start and stop tunnels,
//! list, show, replay and clear captured requests, and the agent's status;
//! and Prometheus metrics on `/metrics`.
//!
//! Who may call it: loopback `Host` names and `web_allow_hosts`, plus the
//! domains of tunnels that forward to the API itself (so the API can be
//! reached through its own tunnel); the `web_auth` credentials when set; and
//! no browser request from another site may change anything.

mod config;
mod guard;
mod json;
mod metrics;
mod routes;

use std::{net::SocketAddr, sync::Arc};

use postern_net::{AcceptLoop, HttpTimeouts};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use config::{RawWebAuth, WebAddr, WebAuth, WebConfig};
pub use guard::HostRule;

use crate::{
    config::{Proto, TunnelSpec},
    error::AgentError,
    state::AgentState,
};

/// Serves the API on `listener` until `shutdown`; the task then finishes
/// the requests in flight and the replays it started.
pub(crate) fn spawn(
    listener: std::net::TcpListener,
    state: Arc<AgentState>,
    shutdown: CancellationToken,
) -> Result<JoinHandle<()>, AgentError> {
    let listener = TcpListener::from_std(listener).map_err(AgentError::WebListener)?;
    let web_addr = listener.local_addr()?;
    for t in state.tunnels() {
        warn_if_open(&state, &t.target.spec, web_addr);
    }
    let api = Arc::new(routes::Api {
        state,
        web_addr,
        tracker: TaskTracker::new(),
        shutdown: shutdown.clone(),
    });
    tracing::info!(addr = %web_addr, "agent API listening");
    let handler = api.clone();
    AcceptLoop::new("agent API", &api.tracker, &shutdown).serve_http(
        listener,
        HttpTimeouts::default(),
        move |req, _client| {
            let api = handler.clone();
            async move { api.handle(req).await }
        },
    );
    Ok(tokio::spawn(async move {
        shutdown.cancelled().await;
        api.tracker.close();
        api.tracker.wait().await;
    }))
}

/// Whether a tunnel publishes this API: an HTTP tunnel to a loopback
/// address on the API's port.
pub(crate) fn forwards_to_api(spec: &TunnelSpec, web_addr: SocketAddr) -> bool {
    let host = &spec.upstream.host;
    let local = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback() || ip == web_addr.ip());
    spec.proto == Proto::Http && spec.upstream.port == web_addr.port() && local
}

/// Warns when a tunnel publishes an API that asks for no credentials.
pub(crate) fn warn_if_open(state: &AgentState, spec: &TunnelSpec, web_addr: SocketAddr) {
    if matches!(state.config.web.auth, WebAuth::Open) && forwards_to_api(spec, web_addr) {
        tracing::warn!(
            tunnel = %spec.name,
            "this tunnel publishes the agent API without web_auth: whoever reaches it can start tunnels"
        );
    }
}
