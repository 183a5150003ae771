//! The signals that start a drain.

use std::future::Future;

use tokio::signal::unix::{SignalKind, signal};

/// Resolves on the first SIGTERM or SIGINT. Installs the handlers at once
/// (not on first poll), so a signal that arrives before the caller awaits
/// is not lost. If they cannot be installed it logs an error and resolves
/// at once: a daemon that cannot be stopped cleanly should not start serving.
///
/// Call it inside the Tokio runtime (the handlers register with its driver).
pub fn shutdown() -> impl Future<Output = ()> + Send + 'static {
    let handlers = signal(SignalKind::terminate()).and_then(|term| Ok((term, signal(SignalKind::interrupt())?)));
    async move {
        match handlers {
            Ok((mut term, mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM"),
                    _ = int.recv() => tracing::info!("SIGINT"),
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot listen for SIGTERM/SIGINT; stopping now"),
        }
    }
}
