//! The gateway's revocation set: every live revocation, indexed by kind, fed by the sequenced
//! revocation stream and reconciled with the database (the source of truth) at start, on a
//! sequence gap and periodically.
//!
//! Checking a request costs one atomic load in the common case: each cached mandate remembers
//! the set's generation when it was last checked and is re-checked only after a change.
//! **Staleness bound**: when the feed has not been read successfully for longer than the
//! configured bound, the gateway refuses everything (`revocation_feed_stale`).

use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use caracal_shared::bus::seq::{SeqCheck, SeqTracker};
use caracal_shared::mandate::VerifiedMandate;
use caracal_shared::store::authority::{Revocation, RevocationKind};
use caracal_shared::time::now_micros;

#[derive(Default)]
struct Index {
    /// kind → value → revoked_at (seconds): mandates issued at or before are refused.
    by_kind: HashMap<RevocationKind, HashMap<String, i64>>,
}

impl Index {
    fn insert(&mut self, r: &Revocation) {
        let e = self
            .by_kind
            .entry(r.kind)
            .or_default()
            .entry(r.value.clone())
            .or_insert(r.revoked_at);
        *e = (*e).max(r.revoked_at);
    }

    fn revoked(&self, m: &VerifiedMandate) -> bool {
        let c = &m.claims;
        let hit = |kind: RevocationKind, v: &str| {
            self.by_kind
                .get(&kind)
                .and_then(|m| m.get(v))
                .is_some_and(|at| c.issued_at <= *at)
        };
        if self.by_kind.is_empty() {
            return false;
        }
        m.all_revocation_ids().any(|id| hit(RevocationKind::RevocationId, id))
            || hit(RevocationKind::Mandate, &c.mandate_id.to_string())
            || c.parent.is_some_and(|p| hit(RevocationKind::Mandate, &p.to_string()))
            || hit(RevocationKind::Agent, &c.agent.to_string())
            || c.session.is_some_and(|s| hit(RevocationKind::Session, &s.to_string()))
            || c.credential
                .as_deref()
                .is_some_and(|cr| hit(RevocationKind::Credential, cr))
            || hit(RevocationKind::Tenant, &c.tenant.to_string())
            || c.resources
                .iter()
                .any(|r| hit(RevocationKind::Resource, &r.id.to_string()))
    }
}

pub struct RevocationSet {
    index: RwLock<Index>,
    generation: AtomicU64,
    /// When the feed was last read (or reconciled) successfully, µs.
    last_ok: AtomicI64,
    seq: std::sync::Mutex<SeqTracker>,
    staleness: Duration,
}

impl RevocationSet {
    pub fn new(staleness: Duration) -> Self {
        RevocationSet {
            index: RwLock::new(Index::default()),
            generation: AtomicU64::new(1),
            last_ok: AtomicI64::new(0),
            seq: std::sync::Mutex::new(SeqTracker::default()),
            staleness,
        }
    }

    #[inline]
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn is_revoked(&self, m: &VerifiedMandate) -> bool {
        self.index.read().unwrap_or_else(|p| p.into_inner()).revoked(m)
    }

    /// Apply one revocation from the feed. Returns false when a sequence gap was noticed
    /// (the caller reconciles).
    pub fn apply(&self, r: &Revocation, seq: Option<i64>) -> bool {
        self.index.write().unwrap_or_else(|p| p.into_inner()).insert(r);
        self.generation.fetch_add(1, Ordering::AcqRel);
        match seq {
            Some(s) => !matches!(
                self.seq.lock().unwrap_or_else(|p| p.into_inner()).observe(s),
                SeqCheck::Gap { .. }
            ),
            None => true,
        }
    }

    /// Replace everything with the database's view (reconciliation), continuing the sequence
    /// after `last_seq`.
    pub fn replace(&self, all: &[Revocation], last_seq: i64) {
        let mut idx = Index::default();
        for r in all {
            idx.insert(r);
        }
        *self.index.write().unwrap_or_else(|p| p.into_inner()) = idx;
        self.seq.lock().unwrap_or_else(|p| p.into_inner()).reset_to(last_seq);
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.mark_fresh();
    }

    pub fn mark_fresh(&self) {
        self.last_ok.store(now_micros(), Ordering::Release);
    }

    /// How old the feed is.
    pub fn age(&self) -> Duration {
        let last = self.last_ok.load(Ordering::Acquire);
        Duration::from_micros((now_micros() - last).max(0) as u64)
    }

    #[inline]
    pub fn is_stale(&self) -> bool {
        self.age() > self.staleness
    }

    pub fn len(&self) -> usize {
        self.index
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_kind
            .values()
            .map(|m| m.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
