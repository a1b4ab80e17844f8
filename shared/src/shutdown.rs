//! Graceful shutdown: one token shared by every task of a process. Cancelling it stops
//! listeners from accepting, lets in-flight work drain within the grace period, then exits.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

#[derive(Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
}

impl Shutdown {
    pub fn new() -> Self {
        Shutdown {
            token: CancellationToken::new(),
        }
    }

    /// Begin shutting down.
    pub fn trigger(&self) {
        self.token.cancel();
    }

    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves once shutdown has begun.
    pub async fn wait(&self) {
        self.token.cancelled().await
    }

    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// A child that is cancelled with this one but can also be cancelled alone
    /// (e.g. to stop one service of `caracal dev` in a test).
    pub fn child(&self) -> Shutdown {
        Shutdown {
            token: self.token.child_token(),
        }
    }

    /// Trigger on SIGINT (Ctrl-C) or SIGTERM. Spawns a task; returns immediately.
    pub fn trigger_on_signals(&self) {
        let me = self.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown signal received; draining");
            me.trigger();
        });
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Run `fut` but give up after `grace` once shutdown is triggered.
pub async fn drain_within<F: std::future::Future>(grace: Duration, fut: F) -> Option<F::Output> {
    tokio::time::timeout(grace, fut).await.ok()
}
