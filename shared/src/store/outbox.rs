//! The transactional outbox: a state change and the event describing it are written in one
//! transaction ([`Tx::emit`]); the relay (`bus::relay`) later publishes the rows in order.
//! Consumers make their effects idempotent with [`Tx::mark_consumed`] in the transaction that
//! applies the effect.

use serde_json::Value;

use super::{Store, Tx, read, tx, tx_exec, write_exec};
use crate::config::DbKind;
use crate::error::Result;
use crate::ids::{EventId, TenantId};
use crate::time::{Micros, now_micros};

/// Postgres channel the relay listens on so it wakes as soon as another process commits.
pub const OUTBOX_CHANNEL: &str = "caracal_outbox";

/// An event to publish once the surrounding transaction commits.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub stream: String,
    pub kind: String,
    pub tenant: Option<TenantId>,
    pub body: Value,
    /// Give the event the next sequence number of its stream, so consumers notice a lost one.
    pub sequenced: bool,
}

impl NewEvent {
    pub fn new(stream: &str, kind: &str, tenant: Option<TenantId>, body: Value) -> Self {
        NewEvent {
            stream: stream.to_string(),
            kind: kind.to_string(),
            tenant,
            body,
            sequenced: false,
        }
    }

    pub fn sequenced(mut self) -> Self {
        self.sequenced = true;
        self
    }
}

/// An outbox row as the relay sees it.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    pub event_id: EventId,
    pub stream: String,
    pub kind: String,
    pub tenant: Option<TenantId>,
    pub seq: Option<i64>,
    pub body: String,
    pub created_at: Micros,
}

type Row = (i64, String, String, String, Option<String>, Option<i64>, String, i64);

fn from_row(r: Row) -> Result<OutboxRow> {
    Ok(OutboxRow {
        id: r.0,
        event_id: EventId::parse(&r.1)?,
        stream: r.2,
        kind: r.3,
        tenant: r.4.as_deref().map(TenantId::parse).transpose()?,
        seq: r.5,
        body: r.6,
        created_at: r.7,
    })
}

impl Tx {
    /// Write `ev` to the outbox in this transaction. Returns its event id.
    pub async fn emit(&mut self, ev: NewEvent) -> Result<EventId> {
        let id = EventId::new();
        let seq = if ev.sequenced {
            // The row lock on the stream's counter orders concurrent writers of one stream, so
            // sequence order, outbox order and commit order agree.
            tx_exec!(
                self,
                sqlx::query(
                    "INSERT INTO stream_sequences (stream, last_seq) VALUES ($1, 0) ON CONFLICT (stream) DO NOTHING"
                )
                .bind(&ev.stream)
            )?;
            let (s,): (i64,) = tx!(self, c => sqlx::query_as(
                "UPDATE stream_sequences SET last_seq = last_seq + 1 WHERE stream = $1 RETURNING last_seq")
                .bind(&ev.stream).fetch_one(c).await)?;
            Some(s)
        } else {
            None
        };
        let body = serde_json::to_string(&ev.body)?;
        tx_exec!(self, sqlx::query(
            "INSERT INTO outbox (event_id, stream, kind, tenant_id, seq, body, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)")
            .bind(id.to_string()).bind(&ev.stream).bind(&ev.kind).bind(ev.tenant.map(|t| t.to_string()))
            .bind(seq).bind(body).bind(now_micros()))?;
        if !self.emitted && self.kind() == DbKind::Postgres {
            tx_exec!(self, sqlx::query("SELECT pg_notify($1, '')").bind(OUTBOX_CHANNEL))?;
        }
        self.emitted = true;
        Ok(id)
    }

    /// Record that `consumer` applied `event_id`. Returns false when it already had (the caller
    /// must then skip the effect). Call it in the transaction that applies the effect.
    pub async fn mark_consumed(&mut self, consumer: &str, event_id: &str) -> Result<bool> {
        let n = tx_exec!(self, sqlx::query(
            "INSERT INTO consumed_events (consumer, event_id, consumed_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING")
            .bind(consumer).bind(event_id).bind(now_micros()))?;
        Ok(n == 1)
    }
}

impl Store {
    /// The oldest unpublished rows, in outbox order.
    pub async fn outbox_pending(&self, limit: i64) -> Result<Vec<OutboxRow>> {
        let rows: Vec<Row> = read!(self, p => sqlx::query_as(
            "SELECT id, event_id, stream, kind, tenant_id, seq, body, created_at FROM outbox
             WHERE published_at IS NULL ORDER BY id LIMIT $1").bind(limit).fetch_all(p).await)?;
        rows.into_iter().map(from_row).collect()
    }

    pub async fn outbox_mark_published(&self, ids: &[i64]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let now = now_micros();
        let mut t = self.begin().await?;
        for chunk in ids.chunks(500) {
            let list = chunk.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",");
            // ids are integers we produced; no untrusted text reaches this statement.
            let sql = format!("UPDATE outbox SET published_at = $1 WHERE id IN ({list}) AND published_at IS NULL");
            tx_exec!(t, sqlx::query(sqlx::AssertSqlSafe(sql)).bind(now))?;
        }
        t.commit().await
    }

    pub async fn outbox_unpublished_count(&self) -> Result<i64> {
        let (n,): (i64,) = read!(self, p => sqlx::query_as(
            "SELECT COUNT(*) FROM outbox WHERE published_at IS NULL").fetch_one(p).await)?;
        Ok(n)
    }

    /// Wait (polling, at most `timeout`) until every row written so far is published; false if
    /// the relay did not get there in time (the rows stay queued and are published later).
    pub async fn outbox_wait_published(&self, timeout: std::time::Duration) -> Result<bool> {
        let (upto,): (Option<i64>,) =
            read!(self, p => sqlx::query_as("SELECT MAX(id) FROM outbox").fetch_one(p).await)?;
        let Some(upto) = upto else { return Ok(true) };
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (n,): (i64,) = read!(self, p => sqlx::query_as(
                "SELECT COUNT(*) FROM outbox WHERE published_at IS NULL AND id <= $1").bind(upto).fetch_one(p).await)?;
            if n == 0 {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Has `consumer` applied `event_id`?
    pub async fn is_consumed(&self, consumer: &str, event_id: &str) -> Result<bool> {
        let r: Option<(i64,)> = read!(self, p => sqlx::query_as(
            "SELECT consumed_at FROM consumed_events WHERE consumer = $1 AND event_id = $2")
            .bind(consumer).bind(event_id).fetch_optional(p).await)?;
        Ok(r.is_some())
    }

    /// Retention: drop published outbox rows and idempotency marks older than `before`.
    /// Idempotency marks must outlive the bus's maximum message age.
    pub async fn prune_outbox(&self, published_before: Micros, consumed_before: Micros) -> Result<(u64, u64)> {
        let a = write_exec!(
            self,
            sqlx::query("DELETE FROM outbox WHERE published_at IS NOT NULL AND published_at < $1")
                .bind(published_before)
        )?;
        let b = write_exec!(
            self,
            sqlx::query("DELETE FROM consumed_events WHERE consumed_at < $1").bind(consumed_before)
        )?;
        Ok((a, b))
    }

    /// Highest sequence number issued for `stream` (reconciliation).
    pub async fn stream_last_seq(&self, stream: &str) -> Result<i64> {
        let r: Option<(i64,)> = read!(self, p => sqlx::query_as(
            "SELECT last_seq FROM stream_sequences WHERE stream = $1").bind(stream).fetch_optional(p).await)?;
        Ok(r.map(|r| r.0).unwrap_or(0))
    }
}
