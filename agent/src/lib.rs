//! The Postern agent: runs next to a private service, keeps one TLS/HTTP2
//! session to an edge node, binds the configured tunnels and forwards each
//! visitor's connection to the upstream. It serves ngrok's agent API and a
//! request inspector on `web_addr`. The library runs a whole agent so tests
//! can drive it in-process; `main.rs` is the `postern` CLI.

mod api;
mod config;
mod error;
mod forward;
mod inspect;
mod modules;
mod oauth;
mod proxy;
mod resolve;
mod session;
mod state;
mod tls;

use std::{net::SocketAddr, sync::Arc};

use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

pub use api::{HostRule, RawWebAuth, WebAddr, WebAuth, WebConfig};
pub use config::{
    AgentConfig, ApiUrl, Proto, RawAgentConfig, RawTunnel, RootCas, TerminateAt, TunnelSpec,
    Upstream, load_files, merge, overlay, parse_raw, parse_upstream,
};
pub use error::{AgentError, ConfigError, FieldCause, TlsSetupError};
pub use modules::{HttpModules, ModuleFlags};
pub use oauth::{AuthFlags, OAuthSpec};
pub use session::Status;
pub use tls::https_client_config;

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    status: watch::Receiver<Status>,
    web_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), AgentError>>,
}

impl Agent {
    /// Starts the agent in the background. The agent API's listener is
    /// bound here, so [`Agent::web_addr`] is known at once; when it cannot
    /// be bound the agent stops with that error.
    pub fn start(config: AgentConfig) -> Agent {
        let (tx, status) = watch::channel(Status::default());
        let shutdown = CancellationToken::new();
        let web = config.web.bind();
        let web_addr = match &web {
            Ok(Some(listener)) => listener.local_addr().ok(),
            _ => None,
        };
        let task = tokio::spawn(run(config, web, tx, status.clone(), shutdown.clone()));
        Agent {
            status,
            web_addr,
            shutdown,
            task,
        }
    }

    /// Status updates.
    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// Where the agent API and inspector listen, if they do.
    pub fn web_addr(&self) -> Option<SocketAddr> {
        self.web_addr
    }

    /// Unbinds the tunnels and stops.
    pub async fn shutdown(self) -> Result<(), AgentError> {
        self.shutdown.cancel();
        self.wait().await
    }

    /// Waits until the agent stops by itself (a fatal error).
    pub async fn wait(self) -> Result<(), AgentError> {
        self.task.await.map_err(AgentError::Task)?
    }

    /// Runs until the agent fails or `stop` resolves; then unbinds and stops.
    pub async fn run_until(
        mut self,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<(), AgentError> {
        tokio::select! {
            joined = &mut self.task => joined.map_err(AgentError::Task)?,
            _ = stop => self.shutdown().await,
        }
    }
}

/// The agent's task: the session and, beside it, the agent API.
async fn run(
    config: AgentConfig,
    web: Result<Option<std::net::TcpListener>, AgentError>,
    status_tx: watch::Sender<Status>,
    status: watch::Receiver<Status>,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    let web = web?;
    let captures = (web.is_some() && config.web.inspect_db_size > 0)
        .then(|| Arc::new(inspect::Captures::new(config.web.inspect_db_size)));
    let targets = config
        .tunnels
        .iter()
        .map(|spec| forward::Target::new(spec.clone(), captures.as_ref()).map(Arc::new))
        .collect::<Result<Vec<_>, _>>()?;
    let (commands_tx, commands) = mpsc::channel(16);
    let state = Arc::new(state::AgentState::new(
        config,
        targets,
        captures,
        commands_tx,
        status,
    ));
    let api_shutdown = CancellationToken::new();
    let api = match web {
        Some(listener) => Some(api::spawn(listener, state.clone(), api_shutdown.clone())?),
        None => None,
    };
    let result = session::run(state, commands, status_tx, shutdown).await;
    api_shutdown.cancel();
    if let Some(api) = api {
        api.await.map_err(AgentError::ApiTask)?;
    }
    result
}
