//! The outbox relay: publishes outbox rows to the bus in outbox order, then marks them
//! published. One relay publishes at a time across all processes (a Postgres advisory lock),
//! so per-stream order is kept. It wakes on a local commit, on a Postgres `NOTIFY` from another
//! process, or after a short poll interval.
//!
//! Crash safety: rows are marked published only after the bus accepted them. A relay killed in
//! between re-publishes those rows on restart (same event ids), and idempotent consumers drop
//! the duplicates — at-least-once, nothing lost.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::{Bus, BusAuth, Envelope};
use crate::error::Result;
use crate::shutdown::Shutdown;
use crate::store::Store;
use crate::store::outbox::OUTBOX_CHANNEL;

const LEADER_KEY: i64 = 0x6361_7261_6361_6c01;

pub struct Relay {
    store: Store,
    bus: Arc<dyn Bus>,
    auth: BusAuth,
    batch: i64,
    poll: Duration,
}

impl Relay {
    pub fn new(store: Store, bus: Arc<dyn Bus>, auth: BusAuth) -> Self {
        Relay {
            store,
            bus,
            auth,
            batch: 500,
            poll: Duration::from_millis(250),
        }
    }

    pub fn with_batch(mut self, batch: i64) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// Publish every pending row once. Returns how many rows were published.
    pub async fn publish_pending(&self) -> Result<usize> {
        let mut total = 0;
        loop {
            let rows = self.store.outbox_pending(self.batch).await?;
            if rows.is_empty() {
                return Ok(total);
            }
            // Consecutive rows of one stream go in one call; order is kept within each stream.
            let mut i = 0;
            while i < rows.len() {
                let stream = rows[i].stream.clone();
                let mut j = i;
                let mut payloads: Vec<Bytes> = Vec::new();
                while j < rows.len() && rows[j].stream == stream {
                    payloads.push(self.auth.sign(Envelope::from_outbox(&rows[j])).to_bytes());
                    j += 1;
                }
                self.bus.publish_many(&stream, payloads).await?;
                self.auth
                    .metrics()
                    .published
                    .with_label_values(&[&stream])
                    .inc_by((j - i) as u64);
                let ids: Vec<i64> = rows[i..j].iter().map(|r| r.id).collect();
                self.store.outbox_mark_published(&ids).await?;
                total += j - i;
                i = j;
            }
        }
    }

    /// Run until shutdown.
    pub async fn run(self, shutdown: Shutdown) {
        let signal = self.store.outbox_signal();
        let mut backoff = Duration::from_millis(100);
        'outer: while !shutdown.is_triggered() {
            // Become the leader (or wait for the current one to go away).
            let mut lock = match self.store.try_leader_lock(LEADER_KEY).await {
                Ok(Some(l)) => l,
                Ok(None) => {
                    tokio::select! { _ = tokio::time::sleep(Duration::from_secs(1)) => {}, _ = shutdown.wait() => break }
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "outbox relay cannot reach the database");
                    tokio::select! { _ = tokio::time::sleep(backoff) => {}, _ = shutdown.wait() => break }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            let mut listener = self.store.listen(OUTBOX_CHANNEL).await.ok().flatten();
            tracing::debug!("outbox relay is the leader");
            let mut idle_rounds = 0u32;
            loop {
                let notified = signal.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                match self.publish_pending().await {
                    Ok(_) => backoff = Duration::from_millis(100),
                    Err(e) => {
                        tracing::warn!(error = %e, "outbox relay failed to publish; will retry");
                        tokio::select! { _ = tokio::time::sleep(backoff) => {}, _ = shutdown.wait() => break 'outer }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                }
                let wait_pg = async {
                    match listener.as_mut() {
                        Some(l) => {
                            let _ = l.recv().await;
                        }
                        None => std::future::pending::<()>().await,
                    }
                };
                tokio::select! {
                    _ = shutdown.wait() => break 'outer,
                    _ = &mut notified => {}
                    _ = wait_pg => {}
                    _ = tokio::time::sleep(self.poll) => {
                        idle_rounds += 1;
                        // Check the leadership session now and then.
                        if idle_rounds.is_multiple_of(20) && !lock.still_held().await {
                            tracing::warn!("outbox relay lost its leadership session");
                            continue 'outer;
                        }
                    }
                }
            }
        }
    }
}
