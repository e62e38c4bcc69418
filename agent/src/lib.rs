//! The Postern agent: runs next to a private service, keeps one TLS/HTTP2
//! session to an edge node, binds the configured tunnels and forwards each
//! visitor's connection to the upstream. The library runs a whole agent so
//! tests can drive it in-process; `main.rs` is the `postern` CLI.

mod config;
mod forward;
mod session;
mod tls;

use tokio::{sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;

pub use config::{
    AgentConfig, Proto, RawAgentConfig, RawTunnel, RootCas, Secret, TerminateAt, TunnelSpec,
    Upstream, load_files, merge, parse_raw, parse_upstream,
};
pub use session::Status;

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    status: watch::Receiver<Status>,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Agent {
    /// Starts the agent in the background.
    pub fn start(config: AgentConfig) -> Agent {
        let (tx, status) = watch::channel(Status::default());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(session::run(config, tx, shutdown.clone()));
        Agent {
            status,
            shutdown,
            task,
        }
    }

    /// Status updates.
    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// Unbinds the tunnels and stops.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }

    /// Waits until the agent stops by itself (a fatal error).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task
            .await
            .map_err(|e| anyhow::anyhow!("agent task: {e}"))?
    }

    /// Runs until the agent fails or `stop` resolves; then unbinds and stops.
    pub async fn run_until(
        mut self,
        stop: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        tokio::select! {
            joined = &mut self.task => joined.map_err(|e| anyhow::anyhow!("agent task: {e}"))?,
            _ = stop => self.shutdown().await,
        }
    }
}
