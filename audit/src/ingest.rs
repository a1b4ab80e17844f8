//! From the bus to the ledger: one consumer group (`ledger`) per evidence stream. A batch is
//! appended in one transaction ([`caracal_shared::store::Store::ledger_append`]) and only then
//! acknowledged, so a consumer killed between read and append loses nothing (its entries are
//! redelivered or reclaimed) and a redelivered event is dropped by its id.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use caracal_shared::bus::consumer::{ConsumerSpec, Handler, run_group_consumer};
use caracal_shared::bus::{Event, streams};
use caracal_shared::error::Result;
use caracal_shared::runtime::Runtime;
use caracal_shared::store::ledger::NewLedgerEvent;
use caracal_shared::time::now_micros;
use serde_json::Value;

use crate::metrics::Metrics;

/// The evidence streams. Every state change writes its evidence on the audit stream through
/// the outbox (next to whatever operational stream it also feeds: revocations, keys,
/// coordination), so the ledger reads the audit stream — decisions, mints, refusals, admin
/// changes, revocations, key lifecycle — and the metering stream (reservations, settlements).
pub const EVIDENCE_STREAMS: &[&str] = &[streams::AUDIT, streams::METERING];

pub const GROUP: &str = "ledger";

pub struct LedgerWriter {
    pub rt: Runtime,
    pub metrics: Metrics,
}

/// A short text field of the body, copied into an indexed column of the entry (the body keeps
/// it as written). Empty, long and NUL-bearing values are not copied: Postgres text cannot hold
/// NUL, and one such value would fail its whole batch's append on every delivery.
fn text(body: &Value, keys: &[&str]) -> Option<String> {
    keys.iter()
        .find_map(|k| body.get(*k).and_then(|v| v.as_str()))
        .filter(|s| !s.is_empty() && s.len() <= 128 && !s.contains('\0'))
        .map(String::from)
}

/// The ledger's view of one bus event. The producer's clock is kept only within
/// `max_skew` of the ledger's; otherwise the entry is dated by the ledger and the producer's
/// time is kept in the body (`producer_ts`), so a wild clock cannot skew queries or retention.
pub fn to_ledger_event(e: &Event, max_skew: Duration) -> NewLedgerEvent {
    let now = now_micros();
    let skew = max_skew.as_micros() as i64;
    let mut body = e.body.clone();
    let occurred_at = if (e.ts - now).abs() <= skew {
        e.ts
    } else {
        if let Value::Object(m) = &mut body {
            m.insert("producer_ts".into(), Value::from(e.ts));
        }
        now
    };
    NewLedgerEvent {
        event_id: e.id.to_string(),
        stream: e.stream.clone(),
        kind: e.kind.clone(),
        tenant: e.tenant.map(|t| t.to_string()),
        agent_id: text(&body, &["agent", "agent_id"]),
        resource_id: text(&body, &["resource", "resource_id"]),
        decision: text(&body, &["decision"]),
        occurred_at,
        body,
    }
}

#[async_trait]
impl Handler for LedgerWriter {
    async fn handle(&self, events: &[Event]) -> Result<()> {
        let skew = self.rt.config.audit.max_clock_skew;
        let expanded: Vec<Event> = events.iter().cloned().flat_map(caracal_shared::audit::expand).collect();
        // A bus message may carry a whole batch of events: append in transactions of at most
        // `audit.batch` (redelivery after a partial failure is harmless: duplicates are dropped).
        for chunk in expanded.chunks(self.rt.config.audit.batch) {
            let batch: Vec<NewLedgerEvent> = chunk.iter().map(|e| to_ledger_event(e, skew)).collect();
            let t0 = std::time::Instant::now();
            let r = self.rt.store.ledger_append(&batch).await?;
            self.metrics.append.observe(t0.elapsed().as_secs_f64());
            self.metrics.batch_size.observe(batch.len() as f64);
            let now = now_micros();
            self.metrics.appended.inc_by(r.appended);
            self.metrics.duplicates.inc_by(batch.len() as u64 - r.appended);
            self.metrics.tree_size.set(r.size as i64);
            if let Some(oldest) = chunk.iter().map(|e| e.ts).min() {
                self.metrics.lag.set(((now - oldest).max(0) as f64) / 1e6);
            }
        }
        Ok(())
    }
}

/// Start the consumers: two per evidence stream, so one reads and verifies the next batch
/// while the other appends (appends serialise on the ledger's lock anyway).
pub fn spawn(rt: &Runtime, metrics: Metrics, consumer: &str) {
    let handler: Arc<dyn Handler> = Arc::new(LedgerWriter {
        rt: rt.clone(),
        metrics,
    });
    for stream in EVIDENCE_STREAMS {
        for n in 0..2 {
            let mut spec = ConsumerSpec::new(stream, GROUP, &format!("{consumer}-{n}"));
            // Messages per read: producers publish batches of up to 1024 events per message.
            spec.batch = 16;
            spec.claim_idle = rt.config.bus.claim_idle;
            spec.block = rt.config.bus.block;
            tokio::spawn(run_group_consumer(
                rt.bus.clone(),
                rt.bus_auth.clone(),
                spec,
                handler.clone(),
                rt.shutdown.clone(),
            ));
        }
    }
}
