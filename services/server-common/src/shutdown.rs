//! Shutdown on SIGTERM or Ctrl-C; a second signal during the drain exits at once.

use tokio::signal::unix::{SignalKind, signal};

async fn any_signal() {
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Resolves on the next SIGTERM/SIGINT and arms nothing: for a caller that has
/// its own cleanup to do when a second signal cuts the drain short.
pub async fn next_signal() {
    any_signal().await
}

/// Resolves on the first SIGTERM/SIGINT; arms a task that exits the process with
/// status 130 on the second, so a stuck drain never traps the operator.
pub async fn signal_received() {
    any_signal().await;
    tracing::info!("shutdown requested; draining (signal again to exit at once)");
    tokio::spawn(async {
        any_signal().await;
        tracing::warn!("second signal; exiting without draining");
        std::process::exit(130);
    });
}
