//! Emitting evidence: every decision, mint and refusal becomes an event on the audit stream.
//!
//! [`AuditEmitter::emit`] never waits: it puts the event in a bounded in-memory queue and
//! returns. A background task drains the queue in batches (up to 1024 events or every few
//! milliseconds), signs them and publishes them in one call, retrying with backoff until the
//! bus accepts them. When the queue is full — the bus has been unreachable long enough — `emit`
//! fails, and callers **fail closed** (the gateway refuses the request, the STS refuses to
//! mint): nothing is decided that cannot be recorded. On shutdown the queue is flushed.
//!
//! The window of loss is the queue's content when a process is killed (`kill -9`) before the
//! next flush (a few milliseconds at most under load); graceful stops lose nothing.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::bus::{Bus, BusAuth, Envelope, streams};
use crate::error::{Error, ErrorCode, Result};
use crate::ids::TenantId;
use crate::metrics::NAMESPACE;
use crate::shutdown::Shutdown;

#[derive(Clone)]
pub struct AuditEmitter {
    tx: mpsc::Sender<Envelope>,
    depth: IntGauge,
    events: IntCounterVec,
}

impl AuditEmitter {
    /// Start the publisher task. `capacity` bounds the queue.
    pub fn start(
        bus: Arc<dyn Bus>,
        auth: BusAuth,
        capacity: usize,
        registry: &Registry,
        shutdown: Shutdown,
    ) -> (AuditEmitter, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(capacity.max(16));
        let depth = IntGauge::with_opts(
            Opts::new("audit_buffer_depth", "Audit events waiting to be published").namespace(NAMESPACE),
        )
        .expect("valid metric");
        let cap = IntGauge::with_opts(
            Opts::new("audit_buffer_capacity", "Capacity of the audit buffer").namespace(NAMESPACE),
        )
        .expect("valid metric");
        cap.set(capacity as i64);
        let events = IntCounterVec::new(
            Opts::new(
                "audit_events_total",
                "Audit events by outcome (queued, published, refused)",
            )
            .namespace(NAMESPACE),
            &["outcome"],
        )
        .expect("valid metric");
        let _ = registry.register(Box::new(depth.clone()));
        let _ = registry.register(Box::new(cap));
        let _ = registry.register(Box::new(events.clone()));
        let me = AuditEmitter {
            tx,
            depth: depth.clone(),
            events: events.clone(),
        };
        let task = tokio::spawn(publish_loop(bus, auth, rx, depth, events, shutdown));
        (me, task)
    }

    /// Queue one event. Fails (callers must refuse the action) when the queue is full.
    pub fn emit(&self, kind: &str, tenant: Option<TenantId>, body: &Value) -> Result<()> {
        let env = Envelope::new(streams::AUDIT, kind, tenant, body);
        match self.tx.try_send(env) {
            Ok(()) => {
                self.depth.inc();
                self.events.with_label_values(&["queued"]).inc();
                Ok(())
            }
            Err(_) => {
                self.events.with_label_values(&["refused"]).inc();
                Err(Error::new(
                    ErrorCode::AuditUnavailable,
                    "the audit pipeline cannot accept events; refusing to act unrecorded",
                ))
            }
        }
    }

    /// Whether the queue has room (for readiness and fail-closed checks before acting).
    pub fn has_room(&self) -> bool {
        self.tx.capacity() > 0
    }
}

async fn publish_loop(
    bus: Arc<dyn Bus>,
    auth: BusAuth,
    mut rx: mpsc::Receiver<Envelope>,
    depth: IntGauge,
    events: IntCounterVec,
    shutdown: Shutdown,
) {
    let mut batch: Vec<Envelope> = Vec::with_capacity(1024);
    loop {
        let first = tokio::select! {
            e = rx.recv() => e,
            _ = shutdown.wait() => {
                rx.close();
                rx.recv().await
            }
        };
        let Some(first) = first else { break };
        batch.push(first);
        while batch.len() < 1024 {
            match rx.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        let n = batch.len();
        let payloads: Vec<bytes::Bytes> = batch.drain(..).map(|e| auth.sign(e).to_bytes()).collect();
        let mut backoff = Duration::from_millis(20);
        loop {
            match bus.publish_many(streams::AUDIT, payloads.clone()).await {
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, events = n, "audit publish failed; retrying");
                    if shutdown.is_triggered() && backoff > Duration::from_secs(2) {
                        tracing::error!(events = n, "giving up on audit events at shutdown");
                        break;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
        depth.sub(n as i64);
        events.with_label_values(&["published"]).inc_by(n as u64);
    }
}
