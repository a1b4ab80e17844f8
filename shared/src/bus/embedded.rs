//! The embedded bus: Redis-Streams semantics on tables of the embedded database, so
//! `caracal dev` needs no external service and survives a restart without losing entries.
//!
//! `bus_entries` is the log, `bus_groups` holds each group's last delivered id, `bus_pending`
//! the delivered-but-unacknowledged entries (consumer, delivery time, delivery count). Blocking
//! reads wait on an in-process notification, so a publish wakes readers at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::Notify;

use super::{Bus, Entry, parse_id};
use crate::error::{Error, ErrorCode, Result};
use crate::store::{Store, read, tx, tx_exec};
use crate::time::{micros, now_micros};

pub struct EmbeddedBus {
    store: Store,
    notifiers: Mutex<HashMap<String, Arc<Notify>>>,
}

fn fmt_id(id: i64) -> String {
    format!("{id}-0")
}

fn num_id(s: &str) -> i64 {
    parse_id(s).0 as i64
}

impl EmbeddedBus {
    pub fn new(store: Store) -> Self {
        EmbeddedBus {
            store,
            notifiers: Mutex::new(HashMap::new()),
        }
    }

    fn notifier(&self, stream: &str) -> Arc<Notify> {
        self.notifiers
            .lock()
            .unwrap()
            .entry(stream.to_string())
            .or_insert_with(|| Arc::new(Notify::new()))
            .clone()
    }

    /// Run `attempt` until it yields entries or `block` elapses, waking on publishes.
    async fn blocking<F, Fut>(&self, stream: &str, block: Duration, mut attempt: F) -> Result<Vec<Entry>>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Vec<Entry>>>,
    {
        let deadline = Instant::now() + block;
        let notify = self.notifier(stream);
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let got = attempt().await?;
            if !got.is_empty() {
                return Ok(got);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(got);
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(deadline - now) => return Ok(Vec::new()),
            }
        }
    }

    async fn read_group_once(&self, stream: &str, group: &str, consumer: &str, count: usize) -> Result<Vec<Entry>> {
        let mut t = self.store.begin().await?;
        let last: Option<(i64,)> = tx!(t, c => sqlx::query_as(
            "SELECT last_delivered FROM bus_groups WHERE stream = $1 AND grp = $2")
            .bind(stream).bind(group).fetch_optional(c).await)?;
        let Some((last,)) = last else {
            return Err(Error::new(
                ErrorCode::BusUnavailable,
                format!("no consumer group {group} on {stream}"),
            ));
        };
        let rows: Vec<(i64, Vec<u8>)> = tx!(t, c => sqlx::query_as(
            "SELECT id, payload FROM bus_entries WHERE stream = $1 AND id > $2 ORDER BY id LIMIT $3")
            .bind(stream).bind(last).bind(count as i64).fetch_all(c).await)?;
        if rows.is_empty() {
            t.rollback().await?;
            return Ok(Vec::new());
        }
        let max = rows.last().map(|r| r.0).unwrap_or(last);
        let now = now_micros();
        tx_exec!(
            t,
            sqlx::query("UPDATE bus_groups SET last_delivered = $1 WHERE stream = $2 AND grp = $3")
                .bind(max)
                .bind(stream)
                .bind(group)
        )?;
        for (id, _) in &rows {
            tx_exec!(t, sqlx::query(
                "INSERT INTO bus_pending (stream, grp, entry_id, consumer, delivered_at, deliveries) VALUES ($1, $2, $3, $4, $5, 1)")
                .bind(stream).bind(group).bind(*id).bind(consumer).bind(now))?;
        }
        t.commit().await?;
        Ok(rows
            .into_iter()
            .map(|(id, p)| Entry {
                id: fmt_id(id),
                payload: Some(Bytes::from(p)),
                deliveries: 1,
            })
            .collect())
    }

    /// Re-deliver pending entries selected by `filter_sql` (consumer or idleness) to `consumer`.
    async fn redeliver(&self, stream: &str, group: &str, consumer: &str, ids: Vec<i64>) -> Result<Vec<Entry>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let now = now_micros();
        let mut t = self.store.begin().await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let r: Option<(i64,)> = tx!(t, c => sqlx::query_as(
                "UPDATE bus_pending SET consumer = $1, delivered_at = $2, deliveries = deliveries + 1
                 WHERE stream = $3 AND grp = $4 AND entry_id = $5 RETURNING deliveries")
                .bind(consumer).bind(now).bind(stream).bind(group).bind(id).fetch_optional(c).await)?;
            let Some((deliveries,)) = r else { continue };
            let p: Option<(Vec<u8>,)> = tx!(t, c => sqlx::query_as(
                "SELECT payload FROM bus_entries WHERE stream = $1 AND id = $2")
                .bind(stream).bind(id).fetch_optional(c).await)?;
            out.push(Entry {
                id: fmt_id(id),
                payload: p.map(|p| Bytes::from(p.0)),
                deliveries: deliveries as u64,
            });
        }
        t.commit().await?;
        Ok(out)
    }

    async fn read_after_once(&self, stream: &str, after: i64, count: usize) -> Result<Vec<Entry>> {
        let rows: Vec<(i64, Vec<u8>)> = read!(self.store, p => sqlx::query_as(
            "SELECT id, payload FROM bus_entries WHERE stream = $1 AND id > $2 ORDER BY id LIMIT $3")
            .bind(stream).bind(after).bind(count as i64).fetch_all(p).await)?;
        Ok(rows
            .into_iter()
            .map(|(id, p)| Entry {
                id: fmt_id(id),
                payload: Some(Bytes::from(p)),
                deliveries: 0,
            })
            .collect())
    }

    async fn publish_in(&self, stream: &str, payloads: Vec<Bytes>) -> Result<Vec<String>> {
        let mut t = self.store.begin().await?;
        tx_exec!(
            t,
            sqlx::query("INSERT INTO bus_streams (stream, last_id) VALUES ($1, 0) ON CONFLICT (stream) DO NOTHING")
                .bind(stream)
        )?;
        let n = payloads.len() as i64;
        let (last,): (i64,) = tx!(t, c => sqlx::query_as(
            "UPDATE bus_streams SET last_id = last_id + $1 WHERE stream = $2 RETURNING last_id")
            .bind(n).bind(stream).fetch_one(c).await)?;
        let first = last - n + 1;
        let now = now_micros();
        let mut ids = Vec::with_capacity(payloads.len());
        for (i, p) in payloads.into_iter().enumerate() {
            let id = first + i as i64;
            tx_exec!(
                t,
                sqlx::query("INSERT INTO bus_entries (stream, id, payload, created_at) VALUES ($1, $2, $3, $4)")
                    .bind(stream)
                    .bind(id)
                    .bind(p.as_ref())
                    .bind(now)
            )?;
            ids.push(fmt_id(id));
        }
        t.commit().await?;
        self.notifier(stream).notify_waiters();
        Ok(ids)
    }
}

#[async_trait]
impl Bus for EmbeddedBus {
    async fn publish(&self, stream: &str, payload: Bytes) -> Result<String> {
        let mut ids = self.publish_in(stream, vec![payload]).await?;
        Ok(ids.remove(0))
    }

    async fn publish_many(&self, stream: &str, payloads: Vec<Bytes>) -> Result<Vec<String>> {
        if payloads.is_empty() {
            return Ok(Vec::new());
        }
        self.publish_in(stream, payloads).await
    }

    async fn ensure_group(&self, stream: &str, group: &str) -> Result<()> {
        let mut t = self.store.begin().await?;
        tx_exec!(
            t,
            sqlx::query(
                "INSERT INTO bus_groups (stream, grp, last_delivered) VALUES ($1, $2, 0) ON CONFLICT DO NOTHING"
            )
            .bind(stream)
            .bind(group)
        )?;
        t.commit().await
    }

    async fn read_group(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<Entry>> {
        self.blocking(stream, block, || self.read_group_once(stream, group, consumer, count))
            .await
    }

    async fn read_own_pending(&self, stream: &str, group: &str, consumer: &str, count: usize) -> Result<Vec<Entry>> {
        let ids: Vec<(i64,)> = read!(self.store, p => sqlx::query_as(
            "SELECT entry_id FROM bus_pending WHERE stream = $1 AND grp = $2 AND consumer = $3 ORDER BY entry_id LIMIT $4")
            .bind(stream).bind(group).bind(consumer).bind(count as i64).fetch_all(p).await)?;
        self.redeliver(stream, group, consumer, ids.into_iter().map(|r| r.0).collect())
            .await
    }

    async fn ack(&self, stream: &str, group: &str, ids: &[String]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut t = self.store.begin().await?;
        for id in ids {
            tx_exec!(
                t,
                sqlx::query("DELETE FROM bus_pending WHERE stream = $1 AND grp = $2 AND entry_id = $3")
                    .bind(stream)
                    .bind(group)
                    .bind(num_id(id))
            )?;
        }
        t.commit().await
    }

    async fn claim_idle(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<Entry>> {
        let cutoff = now_micros() - micros(min_idle);
        let ids: Vec<(i64,)> = read!(self.store, p => sqlx::query_as(
            "SELECT entry_id FROM bus_pending WHERE stream = $1 AND grp = $2 AND delivered_at <= $3 ORDER BY entry_id LIMIT $4")
            .bind(stream).bind(group).bind(cutoff).bind(count as i64).fetch_all(p).await)?;
        // Re-check idleness under the write lock so two claimers cannot both take an entry.
        let mut claimed = Vec::new();
        if !ids.is_empty() {
            let mut t = self.store.begin().await?;
            for (id,) in ids {
                let n = tx_exec!(t, sqlx::query(
                    "UPDATE bus_pending SET delivered_at = $1 WHERE stream = $2 AND grp = $3 AND entry_id = $4 AND delivered_at <= $5")
                    .bind(now_micros()).bind(stream).bind(group).bind(id).bind(cutoff))?;
                if n == 1 {
                    claimed.push(id);
                }
            }
            t.commit().await?;
        }
        self.redeliver(stream, group, consumer, claimed).await
    }

    async fn read_after(&self, stream: &str, after: &str, count: usize, block: Duration) -> Result<Vec<Entry>> {
        let after = num_id(after);
        self.blocking(stream, block, || self.read_after_once(stream, after, count))
            .await
    }

    async fn last_id(&self, stream: &str) -> Result<String> {
        let r: Option<(i64,)> = read!(self.store, p => sqlx::query_as(
            "SELECT last_id FROM bus_streams WHERE stream = $1").bind(stream).fetch_optional(p).await)?;
        Ok(fmt_id(r.map(|r| r.0).unwrap_or(0)))
    }

    async fn pending_count(&self, stream: &str, group: &str) -> Result<u64> {
        let (n,): (i64,) = read!(self.store, p => sqlx::query_as(
            "SELECT COUNT(*) FROM bus_pending WHERE stream = $1 AND grp = $2")
            .bind(stream).bind(group).fetch_one(p).await)?;
        Ok(n as u64)
    }

    async fn trim_acknowledged(&self, stream: &str) -> Result<u64> {
        let groups: Vec<(String, i64)> = read!(self.store, p => sqlx::query_as(
            "SELECT grp, last_delivered FROM bus_groups WHERE stream = $1").bind(stream).fetch_all(p).await)?;
        if groups.is_empty() {
            return Ok(0);
        }
        let mut floor = i64::MAX;
        for (g, last) in groups {
            let (min_pending,): (Option<i64>,) = read!(self.store, p => sqlx::query_as(
                "SELECT MIN(entry_id) FROM bus_pending WHERE stream = $1 AND grp = $2")
                .bind(stream).bind(&g).fetch_one(p).await)?;
            floor = floor.min(min_pending.unwrap_or(last + 1));
        }
        let mut t = self.store.begin().await?;
        let n = tx_exec!(
            t,
            sqlx::query("DELETE FROM bus_entries WHERE stream = $1 AND id < $2")
                .bind(stream)
                .bind(floor)
        )?;
        t.commit().await?;
        Ok(n)
    }

    async fn len(&self, stream: &str) -> Result<u64> {
        let (n,): (i64,) = read!(self.store, p => sqlx::query_as(
            "SELECT COUNT(*) FROM bus_entries WHERE stream = $1").bind(stream).fetch_one(p).await)?;
        Ok(n as u64)
    }

    async fn ping(&self) -> Result<()> {
        self.store.ping().await
    }
}
