//! The signals that stop a Postern process.

use std::{future::Future, io};

use tokio::signal::unix::{SignalKind, signal};

/// Resolves on SIGTERM or SIGINT (Ctrl-C), logging which. Both handlers are
/// installed by this call, so a signal that comes before the future is
/// first polled is not lost.
pub fn shutdown_signal() -> io::Result<impl Future<Output = ()> + Send + 'static> {
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = interrupt.recv() => tracing::info!("interrupt received"),
        }
    })
}
