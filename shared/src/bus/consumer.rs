//! At-least-once consumer loops.
//!
//! [`run_group_consumer`] reads a stream as one consumer of a group: first its own pending
//! entries (left over from a crash), then new ones, and every `claim_idle / 2` it takes over
//! entries a dead consumer left pending. Each entry is verified ([`BusAuth`]); the verified
//! events go to the [`Handler`], and **only after the handler returns `Ok`** — meaning the
//! effects are durable — are the entries acknowledged. Refused entries (forged, unsigned, …)
//! are acknowledged and dropped (they can never verify) and counted.
//!
//! A failing batch is retried one event at a time; an event that keeps failing with a
//! *permanent* error (not a store or bus outage) after `max_deliveries` is dead-lettered:
//! logged with its id, counted, acknowledged. Outages never dead-letter anything. An outage
//! pauses the consumer (nothing else could succeed either); an event failing on its own does
//! not: it is retried from the consumer's pending entries on a backoff while new entries keep
//! being read and handled.
//!
//! [`run_tail`] reads a stream from a position without a group (every reader sees every
//! entry): gateways use it for revocations.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{Bus, BusAuth, Entry, Event};
use crate::error::{ErrorCode, Result};
use crate::shutdown::Shutdown;

#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Apply `events`. Return `Ok` only once every effect is durable. Must be idempotent by
    /// event id (events can be delivered more than once).
    async fn handle(&self, events: &[Event]) -> Result<()>;
}

#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    pub stream: String,
    pub group: String,
    /// Unique per consumer instance (e.g. `audit-<host>-<pid>`).
    pub consumer: String,
    pub batch: usize,
    pub block: Duration,
    pub claim_idle: Duration,
    pub max_deliveries: u64,
}

impl ConsumerSpec {
    pub fn new(stream: &str, group: &str, consumer: &str) -> Self {
        ConsumerSpec {
            stream: stream.to_string(),
            group: group.to_string(),
            consumer: consumer.to_string(),
            batch: 256,
            block: Duration::from_millis(500),
            claim_idle: Duration::from_secs(30),
            max_deliveries: 16,
        }
    }
}

fn is_transient(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::StoreUnavailable
            | ErrorCode::BusUnavailable
            | ErrorCode::Unavailable
            | ErrorCode::NotReady
            | ErrorCode::UpstreamTimeout
            | ErrorCode::UpstreamUnreachable
    )
}

/// What became of one read's entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Every entry was acknowledged.
    Done,
    /// The handler reported an outage: everything read stays pending, to be retried once
    /// the outage is over.
    Outage,
    /// Some events failed on their own (a permanent error, not yet `max_deliveries` times):
    /// they stay pending; everything else was acknowledged.
    Failing,
}

/// Verify, apply and acknowledge one read.
async fn process(
    bus: &dyn Bus,
    auth: &BusAuth,
    spec: &ConsumerSpec,
    handler: &dyn Handler,
    entries: Vec<Entry>,
) -> Result<Outcome> {
    if entries.is_empty() {
        return Ok(Outcome::Done);
    }
    let mut dropped = Vec::new();
    let mut events = Vec::with_capacity(entries.len());
    for e in entries {
        match auth.verify(&spec.stream, &e.id, e.payload.as_deref(), e.deliveries) {
            Ok(ev) => events.push(ev),
            Err(_) => dropped.push(e.id),
        }
    }
    bus.ack(&spec.stream, &spec.group, &dropped).await?;
    if events.is_empty() {
        return Ok(Outcome::Done);
    }
    match handler.handle(&events).await {
        Ok(()) => {
            let ids: Vec<String> = events.iter().map(|e| e.entry_id.clone()).collect();
            bus.ack(&spec.stream, &spec.group, &ids).await?;
            auth.metrics()
                .consumed
                .with_label_values(&[&spec.stream])
                .inc_by(ids.len() as u64);
            Ok(Outcome::Done)
        }
        Err(e) if is_transient(e.code) => {
            tracing::warn!(stream = %spec.stream, group = %spec.group, error = %e, "consumer handler failed; will retry");
            Ok(Outcome::Outage)
        }
        Err(e) => {
            tracing::warn!(stream = %spec.stream, group = %spec.group, error = %e, "batch failed; retrying events one by one");
            let mut outcome = Outcome::Done;
            for ev in events {
                match handler.handle(std::slice::from_ref(&ev)).await {
                    Ok(()) => {
                        bus.ack(&spec.stream, &spec.group, std::slice::from_ref(&ev.entry_id))
                            .await?
                    }
                    Err(err) if !is_transient(err.code) && ev.deliveries >= spec.max_deliveries => {
                        tracing::error!(stream = %spec.stream, group = %spec.group, event_id = %ev.id, entry_id = %ev.entry_id,
                            deliveries = ev.deliveries, error = %err, "dead-lettering an event that keeps failing");
                        auth.metrics()
                            .rejected
                            .with_label_values(&[&spec.stream, "dead_letter"])
                            .inc();
                        bus.ack(&spec.stream, &spec.group, std::slice::from_ref(&ev.entry_id))
                            .await?;
                    }
                    // An outage met while retrying one by one pauses the consumer as above.
                    Err(err) if is_transient(err.code) => outcome = Outcome::Outage,
                    Err(_) => {
                        if outcome == Outcome::Done {
                            outcome = Outcome::Failing;
                        }
                    }
                }
            }
            Ok(outcome)
        }
    }
}

/// Run a group consumer until shutdown.
pub async fn run_group_consumer(
    bus: Arc<dyn Bus>,
    auth: BusAuth,
    spec: ConsumerSpec,
    handler: Arc<dyn Handler>,
    shutdown: Shutdown,
) {
    const FIRST_BACKOFF: Duration = Duration::from_millis(100);
    const MAX_BACKOFF: Duration = Duration::from_secs(5);
    // After an outage or a failed bus call: pause, then read this consumer's own pending
    // entries before anything new (also at start: entries left by a crash).
    let mut backoff = FIRST_BACKOFF;
    let mut drain_own = true;
    // Events that failed on their own stay pending and are read again from this consumer's
    // pending entries at `retry_at`, each time after a longer pause, while new entries keep
    // being read and handled meanwhile.
    let mut retry_at: Option<Instant> = None;
    let mut retry_backoff = FIRST_BACKOFF;
    let claim_every = (spec.claim_idle / 2).max(Duration::from_millis(50));
    let mut last_claim = Instant::now() - claim_every;
    while !shutdown.is_triggered() {
        let retry_due = retry_at.is_some_and(|t| Instant::now() >= t);
        let step: Result<Outcome> = async {
            bus.ensure_group(&spec.stream, &spec.group).await?;
            if drain_own || retry_due {
                let mine = bus.read_own_pending(&spec.stream, &spec.group, &spec.consumer, spec.batch).await?;
                if mine.is_empty() {
                    drain_own = false;
                    retry_at = None;
                    retry_backoff = FIRST_BACKOFF;
                    return Ok(Outcome::Done);
                }
                let full = mine.len() >= spec.batch;
                let outcome = process(bus.as_ref(), &auth, &spec, handler.as_ref(), mine).await?;
                if outcome == Outcome::Done && retry_due && !full {
                    // The retried events went through (or were dead-lettered).
                    retry_at = None;
                    retry_backoff = FIRST_BACKOFF;
                }
                if outcome == Outcome::Failing {
                    // What failed waits for its next retry (read from the start of the pending
                    // entries again, with whatever a full read left behind).
                    drain_own = false;
                }
                return Ok(outcome);
            }
            if last_claim.elapsed() >= claim_every {
                last_claim = Instant::now();
                let claimed = bus
                    .claim_idle(&spec.stream, &spec.group, &spec.consumer, spec.claim_idle, spec.batch)
                    .await?;
                if !claimed.is_empty() {
                    tracing::info!(stream = %spec.stream, group = %spec.group, n = claimed.len(), "reclaimed entries from an idle consumer");
                    return process(bus.as_ref(), &auth, &spec, handler.as_ref(), claimed).await;
                }
            }
            let mut block = spec.block.min(claim_every);
            if let Some(t) = retry_at {
                block = block.min(t.saturating_duration_since(Instant::now()));
            }
            let entries = tokio::select! {
                r = bus.read_group(&spec.stream, &spec.group, &spec.consumer, spec.batch, block) => r?,
                _ = shutdown.wait() => return Ok(Outcome::Done),
            };
            process(bus.as_ref(), &auth, &spec, handler.as_ref(), entries).await
        }
        .await;
        match step {
            Ok(Outcome::Done) => backoff = FIRST_BACKOFF,
            Ok(Outcome::Failing) => {
                backoff = FIRST_BACKOFF;
                // Retry the failed events later; a retry that fails again waits longer. Events
                // failing for the first time while a retry is already planned keep its time.
                if retry_due || retry_at.is_none() {
                    retry_at = Some(Instant::now() + retry_backoff);
                    retry_backoff = (retry_backoff * 2).min(MAX_BACKOFF);
                }
            }
            Ok(Outcome::Outage) => {
                // Everything read stays pending: come back to it after a pause.
                drain_own = true;
                sleep_or_shutdown(backoff, &shutdown).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Err(e) => {
                tracing::warn!(stream = %spec.stream, group = %spec.group, error = %e, "consumer loop error; backing off");
                drain_own = true;
                sleep_or_shutdown(backoff, &shutdown).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

async fn sleep_or_shutdown(d: Duration, shutdown: &Shutdown) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = shutdown.wait() => {}
    }
}

/// Where a tail reader starts and how long each read blocks.
#[derive(Debug, Clone)]
pub struct TailSpec {
    pub stream: String,
    /// Entry id to read after (`"0"` for the whole stream, or [`Bus::last_id`] for new ones).
    pub start: String,
    pub block: Duration,
}

/// Read a stream after a position (no group: every reader sees every entry), verifying and
/// handing each event to `on_event` in order, until shutdown. `on_read` learns the outcome of
/// every read, so a caller can track how fresh its feed is.
pub async fn run_tail<F, E>(
    bus: Arc<dyn Bus>,
    auth: BusAuth,
    spec: TailSpec,
    mut on_event: F,
    mut on_read: E,
    shutdown: Shutdown,
) where
    F: FnMut(Event) + Send,
    E: FnMut(Result<usize>) + Send,
{
    let mut pos = spec.start;
    let mut backoff = Duration::from_millis(50);
    while !shutdown.is_triggered() {
        let r = tokio::select! {
            r = bus.read_after(&spec.stream, &pos, 512, spec.block) => r,
            _ = shutdown.wait() => break,
        };
        match r {
            Ok(entries) => {
                backoff = Duration::from_millis(50);
                let n = entries.len();
                for e in entries {
                    pos = e.id.clone();
                    if let Ok(ev) = auth.verify(&spec.stream, &e.id, e.payload.as_deref(), 0) {
                        on_event(ev);
                    }
                }
                on_read(Ok(n));
            }
            Err(e) => {
                on_read(Err(e));
                sleep_or_shutdown(backoff, &shutdown).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}
