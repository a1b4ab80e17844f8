//! The event bus: one interface ([`Bus`]) over Redis Streams (production) and an embedded,
//! durable log in the SQLite database (`caracal dev`, tests).
//!
//! Semantics (both backends, checked by one contract suite):
//! - streams are append-only logs of entries with increasing ids;
//! - consumer groups deliver each entry to one consumer of the group and keep it *pending*
//!   until acknowledged; a consumer re-reads its own pending entries after a restart, and
//!   entries idle longer than a bound are reclaimed by another consumer ([`Bus::claim_idle`]);
//! - tail readers ([`Bus::read_after`]) see every entry (broadcast, e.g. revocations to every
//!   gateway);
//! - [`Bus::trim_acknowledged`] never removes an entry some group has not acknowledged.
//!
//! Above it, [`envelope`] signs and verifies messages, [`consumer`] runs at-least-once consumer
//! loops with idempotent handlers, [`relay`] publishes the outbox and [`seq`] notices lost
//! events on sequenced streams.

pub mod consumer;
pub mod embedded;
pub mod envelope;
pub mod redis;
pub mod relay;
pub mod seq;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::config::{BusBackend, BusConfig};
use crate::error::Result;
use crate::store::Store;

pub use consumer::{ConsumerSpec, Handler, run_group_consumer};
pub use envelope::{BusAuth, Envelope, Event, Rejection};

/// Stream names. One stream per purpose; consumers subscribe to what they need.
pub mod streams {
    /// Decisions, mints, admin changes: everything the audit ledger records.
    pub const AUDIT: &str = "caracal:audit";
    /// Control-plane changes (policies, agents, credentials, resources, grants, budgets).
    /// Consumers treat these as invalidation hints and reload from the database.
    pub const CONTROL: &str = "caracal:control";
    /// Revocations (sequenced): every gateway applies every entry.
    pub const REVOCATIONS: &str = "caracal:revocations";
    /// Signing-key lifecycle (sequenced).
    pub const KEYS: &str = "caracal:keys";
    /// Budget reservations and settlements.
    pub const METERING: &str = "caracal:metering";
    /// Sessions, invocations, delegations, leases.
    pub const COORDINATION: &str = "caracal:coordination";
    /// Approval requests and decisions.
    pub const APPROVALS: &str = "caracal:approvals";

    pub const ALL: &[&str] = &[AUDIT, CONTROL, REVOCATIONS, KEYS, METERING, COORDINATION, APPROVALS];
}

/// One raw entry read from a stream.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: String,
    /// `None` when the entry was deleted from the stream while still pending.
    pub payload: Option<Bytes>,
    /// Delivery count for group reads (1 on first delivery); 0 for tail reads.
    pub deliveries: u64,
}

#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Append `payload` to `stream`; returns the entry id.
    async fn publish(&self, stream: &str, payload: Bytes) -> Result<String>;

    /// Append several entries (one round trip / transaction where the backend allows).
    async fn publish_many(&self, stream: &str, payloads: Vec<Bytes>) -> Result<Vec<String>> {
        let mut ids = Vec::with_capacity(payloads.len());
        for p in payloads {
            ids.push(self.publish(stream, p).await?);
        }
        Ok(ids)
    }

    /// Create `group` on `stream` (starting from the beginning) if it does not exist.
    async fn ensure_group(&self, stream: &str, group: &str) -> Result<()>;

    /// New entries for `consumer` of `group` (waiting up to `block` when there are none).
    async fn read_group(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<Entry>>;

    /// Entries already delivered to `consumer` and not yet acknowledged (after a restart).
    async fn read_own_pending(&self, stream: &str, group: &str, consumer: &str, count: usize) -> Result<Vec<Entry>>;

    async fn ack(&self, stream: &str, group: &str, ids: &[String]) -> Result<()>;

    /// Take over entries of `group` idle for at least `min_idle` (their consumer is presumed
    /// dead) and deliver them to `consumer`.
    async fn claim_idle(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<Entry>>;

    /// Entries after `after` (`"0"` for all, see [`Bus::last_id`]), waiting up to `block`.
    async fn read_after(&self, stream: &str, after: &str, count: usize, block: Duration) -> Result<Vec<Entry>>;

    /// Id of the newest entry, or `"0"` for an empty stream.
    async fn last_id(&self, stream: &str) -> Result<String>;

    /// Number of entries pending (delivered, unacknowledged) in `group` (0 for a missing group).
    async fn pending_count(&self, stream: &str, group: &str) -> Result<u64>;

    /// Remove entries every group has acknowledged. Returns how many were removed.
    async fn trim_acknowledged(&self, stream: &str) -> Result<u64>;

    /// Number of entries currently in the stream.
    async fn len(&self, stream: &str) -> Result<u64>;

    async fn ping(&self) -> Result<()>;
}

/// Connect the configured backend. The embedded backend needs the (SQLite) store.
pub async fn connect(cfg: &BusConfig, store: &Store) -> Result<Arc<dyn Bus>> {
    match cfg.backend {
        BusBackend::Embedded => Ok(Arc::new(embedded::EmbeddedBus::new(store.clone()))),
        BusBackend::Redis => Ok(Arc::new(
            redis::RedisBus::connect(&cfg.redis_url, &cfg.redis_prefix).await?,
        )),
    }
}

/// Compare two entry ids (`ms-seq` on both backends).
pub fn id_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    parse_id(a).cmp(&parse_id(b))
}

pub fn parse_id(s: &str) -> (u64, u64) {
    let (a, b) = s.split_once('-').unwrap_or((s, "0"));
    (a.parse().unwrap_or(0), b.parse().unwrap_or(0))
}
