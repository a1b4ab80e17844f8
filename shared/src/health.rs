//! Liveness and readiness. `/healthz` answers while the process runs; `/readyz` answers 200
//! only while every dependency probe (database, bus, …) last succeeded. Probes run in the
//! background, so a lost dependency turns readiness false within one interval and a returning
//! one turns it true again with no restart.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use crate::shutdown::Shutdown;

const NOT_CHECKED: &str = "not checked yet";

type ProbeFn = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

struct Check {
    name: &'static str,
    ok: AtomicBool,
    detail: Mutex<String>,
    probe: ProbeFn,
}

#[derive(Clone, Default)]
pub struct Health {
    checks: Arc<Mutex<Vec<Arc<Check>>>>,
    started: Arc<AtomicBool>,
}

impl Health {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a dependency probe. It starts "not ready" until it first succeeds.
    pub fn add_probe<F, Fut>(&self, name: &'static str, probe: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let probe: ProbeFn = Arc::new(move || Box::pin(probe()));
        self.checks.lock().unwrap().push(Arc::new(Check {
            name,
            ok: AtomicBool::new(false),
            detail: Mutex::new(NOT_CHECKED.into()),
            probe,
        }));
    }

    /// Mark the service itself as started (listeners bound, initial loads done).
    pub fn set_started(&self) {
        self.started.store(true, Ordering::SeqCst);
    }

    /// Run every probe once now.
    pub async fn probe_now(&self) {
        let checks: Vec<Arc<Check>> = self.checks.lock().unwrap().clone();
        for c in checks {
            let r = tokio::time::timeout(Duration::from_secs(2), (c.probe)()).await;
            let (ok, detail) = match r {
                Ok(Ok(())) => (true, "ok".to_string()),
                Ok(Err(e)) => (false, e),
                Err(_) => (false, "probe timed out".to_string()),
            };
            let was = c.ok.swap(ok, Ordering::SeqCst);
            let first = *c.detail.lock().unwrap() == NOT_CHECKED;
            if was != ok && !(first && ok) {
                if ok {
                    tracing::info!(dependency = c.name, "dependency is reachable again");
                } else {
                    tracing::warn!(dependency = c.name, error = %detail, "dependency unreachable; not ready");
                }
            }
            *c.detail.lock().unwrap() = detail;
        }
    }

    /// Probe every `interval` until shutdown.
    pub fn spawn_prober(&self, interval: Duration, shutdown: Shutdown) {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                me.probe_now().await;
                tokio::select! {
                    _ = shutdown.wait() => break,
                    _ = tokio::time::sleep(interval) => {}
                }
            }
        });
    }

    /// Whether a named dependency is currently reachable (unknown names count as reachable).
    pub fn dependency_ok(&self, name: &str) -> bool {
        self.checks
            .lock()
            .unwrap()
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.ok.load(Ordering::SeqCst))
            .unwrap_or(true)
    }

    pub fn is_ready(&self) -> bool {
        self.started.load(Ordering::SeqCst) && self.checks.lock().unwrap().iter().all(|c| c.ok.load(Ordering::SeqCst))
    }

    pub fn report(&self) -> Value {
        let mut checks = serde_json::Map::new();
        for c in self.checks.lock().unwrap().iter() {
            checks.insert(
                c.name.to_string(),
                json!({ "ok": c.ok.load(Ordering::SeqCst), "detail": *c.detail.lock().unwrap() }),
            );
        }
        json!({
            "status": if self.is_ready() { "ready" } else { "not_ready" },
            "started": self.started.load(Ordering::SeqCst),
            "checks": checks,
        })
    }
}
