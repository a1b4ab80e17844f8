//! caracal-audit: the evidence service.
//!
//! - [`ingest`]: consumer groups on every evidence stream append events to the ledger in
//!   batches (one transaction each) and acknowledge only after the commit.
//! - [`State::sign_head`]: signs a tree head (ECDSA P-256) whenever the ledger grew, every
//!   `audit.head_interval`, and on demand.
//! - [`State::apply_retention`]: every `audit.retention_interval`, drops entries older than
//!   `audit.retention` up to a signed head, which stays as their summary.
//! - [`api`]: heads, inclusion and consistency proofs, queries and JSON Lines exports that
//!   `caracal merkle verify-range` checks offline.
//!
//! The hashing, proofs and head format are in `caracal_shared::ledger` (anyone can verify).

pub mod api;
pub mod ingest;
pub mod metrics;

use std::sync::Arc;
use std::time::Duration;

use caracal_shared::crypto::KeyRing;
use caracal_shared::error::{Error, ErrorCode, Result};
use caracal_shared::ledger::{LedgerSigner, TreeHead};
use caracal_shared::runtime::Runtime;
use caracal_shared::time::now_micros;
use tokio::net::TcpListener;

use crate::metrics::Metrics;

/// Service state shared by every request handler.
pub struct State {
    pub rt: Runtime,
    pub pepper: KeyRing,
    pub signer: LedgerSigner,
    pub metrics: Metrics,
    /// One signer at a time in this process (another instance may race: heads are unique by
    /// size and the loser reads the winner's).
    sign_lock: tokio::sync::Mutex<()>,
}

impl State {
    /// Sign a head for the current size unless one exists; returns the latest head (None while
    /// the ledger is empty).
    pub async fn sign_head(&self) -> Result<Option<TreeHead>> {
        let _g = self.sign_lock.lock().await;
        let store = &self.rt.store;
        let size = store.ledger_size().await?;
        let latest = store.ledger_latest_head().await?;
        if size == 0 || latest.as_ref().is_some_and(|h| h.tree_size >= size) {
            return Ok(latest);
        }
        let root = store.ledger_root(size).await?;
        let head = self.signer.sign(size, &root, now_micros())?;
        if !store.ledger_insert_head(&head).await? {
            // Another instance signed this size first.
            return store.ledger_latest_head().await;
        }
        self.metrics.head_size.set(head.tree_size as i64);
        self.metrics.head_timestamp.set(head.timestamp as f64 / 1e6);
        Ok(Some(head))
    }

    /// Retention: drop the entries recorded before `cutoff` (µs) up to the largest signed head
    /// they fill, which stays as their summary. Returns the new boundary and the entries
    /// dropped (0 when nothing is old enough or no head falls inside the old part yet).
    pub async fn apply_retention(&self, cutoff: i64) -> Result<(u64, u64)> {
        let store = &self.rt.store;
        let below = store.ledger_retention_boundary(cutoff).await?;
        let removed = store.ledger_prune(below).await?;
        let now = store.ledger_pruned_below().await?;
        self.metrics.pruned_below.set(now as i64);
        self.metrics.pruned.inc_by(removed);
        if removed > 0 {
            tracing::info!(pruned_below = now, removed, "retention dropped old ledger entries");
        }
        Ok((now, removed))
    }
}

/// Load keys, start the consumers and the head signer.
pub async fn start(rt: &Runtime, registry: &prometheus::Registry) -> Result<Arc<State>> {
    let keys = &rt.config.keys;
    let missing = |k: &str| Error::new(ErrorCode::ValidationFailed, format!("the audit service needs keys.{k}"));
    let seal = keys.seal.clone().ok_or_else(|| missing("seal"))?;
    let pepper = keys.pepper.clone().ok_or_else(|| missing("pepper"))?;
    let signer = rt.store.ledger_signer(&seal).await?;
    tracing::info!(key_id = %signer.public.key_id, "ledger heads are signed with this key");
    let wanted = rt.config.audit.partition_entries;
    let psize = rt.store.ledger_set_partition_size(wanted).await?;
    if psize != 0 && psize != wanted {
        tracing::warn!(
            configured = wanted,
            in_effect = psize,
            "audit.partition_entries is fixed once the ledger has partitions; keeping the size in effect"
        );
    }
    let metrics = Metrics::new(registry);
    metrics.tree_size.set(rt.store.ledger_size().await? as i64);
    metrics.pruned_below.set(rt.store.ledger_pruned_below().await? as i64);
    let state = Arc::new(State {
        rt: rt.clone(),
        pepper,
        signer,
        metrics: metrics.clone(),
        sign_lock: tokio::sync::Mutex::new(()),
    });
    let consumer = format!("audit-{}-{}", hostname(), std::process::id());
    ingest::spawn(rt, metrics, &consumer);
    let s2 = state.clone();
    let sd = rt.shutdown.clone();
    let every = rt.config.audit.head_interval;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = sd.wait() => break,
            }
            if let Err(e) = s2.sign_head().await {
                s2.metrics.head_errors.inc();
                tracing::warn!(error = %e, "cannot sign a tree head");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });
    if let Some(keep) = rt.config.audit.retention {
        let s3 = state.clone();
        let sd = rt.shutdown.clone();
        let every = rt.config.audit.retention_interval;
        tokio::spawn(async move {
            loop {
                let cutoff = now_micros() - keep.as_micros() as i64;
                if let Err(e) = s3.apply_retention(cutoff).await {
                    tracing::warn!(error = %e, "ledger retention failed");
                }
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = sd.wait() => break,
                }
            }
        });
    }
    Ok(state)
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "host".into())
}

/// Serve until the runtime's shutdown is triggered, then drain.
pub async fn serve(rt: Runtime, listener: TcpListener) -> std::io::Result<()> {
    let registry = rt.service_registry();
    let state = start(&rt, &registry)
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let server = caracal_shared::http::HttpServer::new(
        "audit",
        api::router(),
        state,
        rt.health(),
        registry,
        caracal_shared::http::ServerOptions::from_config(&rt.config.http),
    );
    Arc::new(server).serve(listener, rt.shutdown.clone()).await
}
