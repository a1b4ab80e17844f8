//! Deadlines: every `coordinator.sweep_interval`, sessions past their lifetime or heartbeat
//! timeout expire (revoking mandates bound to them), expired leases are released and open
//! invocations past their deadline time out. Each sweep step is a conditional update, so
//! several coordinator replicas may sweep at once without double transitions.

use std::sync::Arc;

use caracal_shared::error::Result;
use caracal_shared::store::authority::{Revocation, RevocationKind};
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};

use crate::State;
use crate::events::{emit, system};

const BATCH: i64 = 500;

#[derive(Clone)]
pub struct Metrics {
    pub swept: IntCounterVec,
    pub sweep_errors: IntCounter,
    pub cascades: IntCounter,
}

impl Metrics {
    pub fn new(r: &Registry) -> Metrics {
        let m = Metrics {
            swept: IntCounterVec::new(
                Opts::new(
                    "caracal_coordinator_swept_total",
                    "Objects moved by the deadline sweeper, by kind (session, lease, invocation)",
                ),
                &["kind"],
            )
            .expect("metric"),
            sweep_errors: IntCounter::new("caracal_coordinator_sweep_errors_total", "Failed sweeps").expect("metric"),
            cascades: IntCounter::new(
                "caracal_coordinator_revocations_total",
                "Cascading revocations committed",
            )
            .expect("metric"),
        };
        let _ = r.register(Box::new(m.swept.clone()));
        let _ = r.register(Box::new(m.sweep_errors.clone()));
        let _ = r.register(Box::new(m.cascades.clone()));
        m
    }
}

/// One pass; returns how many objects moved.
pub async fn once(s: &State) -> Result<usize> {
    let mut moved = 0;
    loop {
        let mut tx = s.rt.store.begin().await?;
        let expired = tx.expire_sessions(BATCH).await?;
        let n = expired.len();
        let actor = system("session deadline passed");
        let mut revs = Vec::with_capacity(n);
        for sess in &expired {
            emit(&mut tx, "session.expired", sess.tenant_id, sess, &actor).await?;
            revs.push(Revocation::now(
                sess.tenant_id,
                RevocationKind::Session,
                sess.id.to_string(),
                "session expired",
            ));
        }
        tx.revoke(&revs).await?;
        let leases = tx.expire_leases(BATCH).await?;
        let actor = system("lease expired");
        for l in &leases {
            emit(&mut tx, "lease.expired", l.tenant_id, l, &actor).await?;
        }
        let timed = tx.time_out_invocations(BATCH).await?;
        let actor = system("invocation deadline passed");
        for i in &timed {
            emit(&mut tx, "invocation.timed_out", i.tenant_id, i, &actor).await?;
        }
        tx.commit().await?;
        s.metrics.swept.with_label_values(&["session"]).inc_by(n as u64);
        s.metrics
            .swept
            .with_label_values(&["lease"])
            .inc_by(leases.len() as u64);
        s.metrics
            .swept
            .with_label_values(&["invocation"])
            .inc_by(timed.len() as u64);
        let step = n + leases.len() + timed.len();
        moved += step;
        if n < BATCH as usize && leases.len() < BATCH as usize && timed.len() < BATCH as usize {
            return Ok(moved);
        }
    }
}

pub fn spawn(s: Arc<State>) {
    let sd = s.rt.shutdown.clone();
    let every = s.rt.config.coordinator.sweep_interval;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = sd.wait() => break,
            }
            if let Err(e) = once(&s).await {
                s.metrics.sweep_errors.inc();
                tracing::warn!(error = %e, "coordinator sweep failed");
            }
        }
    });
}
