//! One-call cascading revocation.
//!
//! Revoking an agent, a session, a delegation, a credential or a mandate (or, for incidents,
//! a whole tenant or resource, or a set of any of these) walks everything it started, in one
//! transaction:
//!
//! * sessions: the named ones, every active session of a revoked agent / credential / mandate,
//!   and recursively their child sessions — each becomes `revoked`, and every mandate bound to
//!   it (minted with its `session_id`, or delegated from such a mandate) is refused;
//! * delegated mandates: every delegation edge from a revoked mandate, agent or session, and
//!   recursively the delegations made from those children;
//! * invocations in flight (`pending`/`running`) asked by a revoked session or agent, or
//!   addressed to a revoked agent — each becomes `cancelled`.
//!
//! It records one revocation per subject (carrying the Biscuit revocation ids of every mandate
//! reached) and publishes them on the sequenced revocation stream, which every gateway
//! applies; the transaction commits everything or nothing. A walk larger than
//! `coordinator.max_cascade` is refused as a whole.

use std::time::Duration;

use std::collections::{BTreeMap, HashSet, VecDeque};

use caracal_shared::error::{Error, ErrorCode, Result};
use caracal_shared::ids::{DelegationId, MandateId, ResourceId, SessionId, TenantId};
use caracal_shared::store::Tx;
use caracal_shared::store::authority::{Revocation, RevocationKind};
use caracal_shared::store::coordination::{DelegationLink, InvocationLink, SessionLink, SessionStatus};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::State;
use crate::events::emit;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetKind {
    Agent,
    Session,
    Delegation,
    Credential,
    Mandate,
    /// A Biscuit revocation id (hex): that token and everything attenuated from it.
    RevocationId,
    Tenant,
    Resource,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Target {
    pub kind: TargetKind,
    pub value: String,
}

/// What one revocation reached.
#[derive(Debug, Default, Serialize)]
pub struct Outcome {
    pub sessions_revoked: Vec<SessionId>,
    pub mandates_revoked: Vec<MandateId>,
    pub delegations_revoked: Vec<DelegationId>,
    pub invocations_cancelled: usize,
    /// Biscuit revocation ids published.
    pub revocation_ids: Vec<String>,
    /// The revocation records published (`kind:value`).
    pub revocations: Vec<String>,
    /// Whether the records were on the bus (which every gateway follows) when the call
    /// answered; false: committed and queued, the relay publishes them shortly.
    pub published: bool,
}

struct Walk<'a> {
    tx: &'a mut Tx,
    t: TenantId,
    reason: &'a str,
    actor: &'a Value,
    max: usize,
    revs: BTreeMap<String, Revocation>,
    sessions: VecDeque<SessionId>,
    mandates: VecDeque<MandateId>,
    seen_sessions: HashSet<SessionId>,
    seen_mandates: HashSet<MandateId>,
    seen_delegations: HashSet<DelegationId>,
    out: Outcome,
}

impl Walk<'_> {
    fn revoke(&mut self, kind: RevocationKind, value: String) {
        let r = Revocation::now(self.t, kind, value, self.reason);
        self.revs.entry(r.key()).or_insert(r);
    }

    fn nodes(&self) -> usize {
        self.seen_sessions.len() + self.seen_mandates.len() + self.seen_delegations.len()
    }

    fn check_size(&self) -> Result<()> {
        if self.nodes() > self.max {
            return Err(Error::new(
                ErrorCode::LimitExceeded,
                format!(
                    "this revocation reaches more than {} sessions and mandates (coordinator.max_cascade); nothing was revoked — narrow it or revoke the tenant",
                    self.max
                ),
            ));
        }
        Ok(())
    }

    fn push_session(&mut self, id: SessionId) -> Result<()> {
        if self.seen_sessions.insert(id) {
            self.sessions.push_back(id);
            self.check_size()?;
        }
        Ok(())
    }

    fn push_mandate(&mut self, id: MandateId) -> Result<()> {
        if self.seen_mandates.insert(id) {
            self.mandates.push_back(id);
            self.check_size()?;
        }
        Ok(())
    }

    async fn sessions_by(&mut self, link: SessionLink, value: &str) -> Result<()> {
        for s in self.tx.active_sessions_by(self.t, link, value).await? {
            self.push_session(s.id)?;
        }
        Ok(())
    }

    async fn delegations_by(&mut self, link: DelegationLink, value: &str) -> Result<()> {
        for d in self.tx.delegations_by(self.t, link, value).await? {
            if !self.seen_delegations.insert(d.id) {
                continue;
            }
            self.out.delegations_revoked.push(d.id);
            // The child's authority block id revokes it and every attenuation of it.
            if let Some(id) = d.revocation_ids.first() {
                self.revoke(RevocationKind::RevocationId, id.clone());
            }
            self.push_mandate(d.child_mandate)?;
            if let Some(cs) = d.child_session {
                self.push_session(cs)?;
            }
        }
        Ok(())
    }

    async fn cancel(&mut self, link: InvocationLink, value: &str) -> Result<()> {
        let cancelled = self
            .tx
            .cancel_invocations_by(self.t, link, value, &format!("revoked: {}", self.reason))
            .await?;
        self.out.invocations_cancelled += cancelled.len();
        for i in cancelled {
            emit(self.tx, "invocation.cancelled", self.t, &i, self.actor).await?;
        }
        Ok(())
    }

    async fn seed(&mut self, target: &Target) -> Result<()> {
        let v = target.value.trim().to_string();
        match target.kind {
            TargetKind::Agent => {
                let a = caracal_shared::ids::AgentId::parse(&v)?;
                self.revoke(RevocationKind::Agent, a.to_string());
                self.sessions_by(SessionLink::Agent, &v).await?;
                self.delegations_by(DelegationLink::ParentAgent, &v).await?;
                self.cancel(InvocationLink::CallerAgent, &v).await?;
                self.cancel(InvocationLink::Target, &v).await?;
            }
            TargetKind::Session => {
                let s = SessionId::parse(&v)?;
                self.tx.session(self.t, s).await?;
                self.push_session(s)?;
            }
            TargetKind::Delegation => {
                let d = DelegationId::parse(&v)?;
                let found = self
                    .tx
                    .delegations_by(self.t, DelegationLink::Id, &d.to_string())
                    .await?;
                if found.is_empty() {
                    // Expired edges are not followed (their mandates are dead already); an
                    // unknown id is a 404.
                    self.tx
                        .delegations_by_any(self.t, d)
                        .await?
                        .ok_or_else(|| Error::not_found("delegation"))?;
                }
                self.delegations_by(DelegationLink::Id, &d.to_string()).await?;
            }
            TargetKind::Credential => {
                if v.is_empty() || v.len() > 200 {
                    return Err(Error::validation("invalid credential id"));
                }
                self.revoke(RevocationKind::Credential, v.clone());
                self.sessions_by(SessionLink::Credential, &v).await?;
            }
            TargetKind::Mandate => {
                let m = MandateId::parse(&v)?;
                self.push_mandate(m)?;
            }
            TargetKind::RevocationId => {
                if v.is_empty() || v.len() > 256 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(Error::validation("a revocation id is hex"));
                }
                self.revoke(RevocationKind::RevocationId, v.to_ascii_lowercase());
            }
            TargetKind::Tenant => {
                let t = TenantId::parse(&v)?;
                if t != self.t {
                    return Err(Error::not_found("tenant"));
                }
                self.revoke(RevocationKind::Tenant, v.clone());
                self.sessions_by(SessionLink::Tenant, &v).await?;
                self.cancel(InvocationLink::Tenant, &v).await?;
            }
            TargetKind::Resource => {
                let r = ResourceId::parse(&v)?;
                self.revoke(RevocationKind::Resource, r.to_string());
            }
        }
        Ok(())
    }

    async fn visit_session(&mut self, id: SessionId) -> Result<()> {
        let s = self.tx.session(self.t, id).await?;
        if s.status == SessionStatus::Active {
            match self
                .tx
                .transition_session(
                    self.t,
                    id,
                    &[SessionStatus::Active],
                    SessionStatus::Revoked,
                    Some(self.reason),
                )
                .await
            {
                Ok(s) => {
                    emit(self.tx, "session.revoked", self.t, &s, self.actor).await?;
                    self.out.sessions_revoked.push(id);
                }
                // Ended meanwhile (a concurrent revocation or end): still revoke below.
                Err(e) if e.code == ErrorCode::InvalidTransition => {}
                Err(e) => return Err(e),
            }
        }
        // Mandates bound to the session (minted with its id, or delegated from one) are its
        // descendants; the mandate that started it is not (it may run other sessions).
        self.revoke(RevocationKind::Session, id.to_string());
        self.sessions_by(SessionLink::Parent, &id.to_string()).await?;
        self.delegations_by(DelegationLink::ParentSession, &id.to_string())
            .await?;
        self.cancel(InvocationLink::CallerSession, &id.to_string()).await?;
        Ok(())
    }

    async fn visit_mandate(&mut self, id: MandateId) -> Result<()> {
        self.revoke(RevocationKind::Mandate, id.to_string());
        self.out.mandates_revoked.push(id);
        self.sessions_by(SessionLink::Mandate, &id.to_string()).await?;
        self.delegations_by(DelegationLink::ParentMandate, &id.to_string())
            .await?;
        Ok(())
    }
}

/// Revoke `targets` (all in tenant `t`) and everything they started; commit; report.
/// Concurrent cascades over overlapping sessions may deadlock on PostgreSQL; the loser is
/// aborted by the database and retried here (the walk is recomputed from scratch).
pub async fn run(s: &State, t: TenantId, targets: &[Target], reason: &str, actor: &Value) -> Result<Outcome> {
    if targets.is_empty() || targets.len() > 1000 {
        return Err(Error::validation("name between 1 and 1000 targets"));
    }
    if reason.is_empty() || reason.len() > 1000 {
        return Err(Error::validation("a reason of 1 to 1000 characters is required"));
    }
    let mut attempt = 0;
    loop {
        match run_once(s, t, targets, reason, actor).await {
            Err(e) if e.is_retryable_conflict() && attempt < 5 => {
                attempt += 1;
                tracing::debug!(attempt, "revocation cascade lost a lock race; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(5 * attempt)).await;
            }
            r => return r,
        }
    }
}

async fn run_once(s: &State, t: TenantId, targets: &[Target], reason: &str, actor: &Value) -> Result<Outcome> {
    let mut tx = s.rt.store.begin().await?;
    let mut w = Walk {
        tx: &mut tx,
        t,
        reason,
        actor,
        max: s.rt.config.coordinator.max_cascade,
        revs: BTreeMap::new(),
        sessions: VecDeque::new(),
        mandates: VecDeque::new(),
        seen_sessions: HashSet::new(),
        seen_mandates: HashSet::new(),
        seen_delegations: HashSet::new(),
        out: Outcome::default(),
    };
    for target in targets {
        w.seed(target).await?;
    }
    loop {
        if let Some(sid) = w.sessions.pop_front() {
            w.visit_session(sid).await?;
        } else if let Some(mid) = w.mandates.pop_front() {
            w.visit_mandate(mid).await?;
        } else {
            break;
        }
    }
    let revs: Vec<Revocation> = w.revs.into_values().collect();
    let mut out = w.out;
    out.revocation_ids = revs
        .iter()
        .filter(|r| r.kind == RevocationKind::RevocationId)
        .map(|r| r.value.clone())
        .collect();
    out.revocations = revs.iter().map(|r| r.key()).collect();
    tx.revoke(&revs).await?;
    emit(
        &mut tx,
        "revocation.cascade",
        t,
        &json!({ "targets": targets, "reason": reason, "outcome": &out }),
        actor,
    )
    .await?;
    tx.commit().await?;
    s.metrics.cascades.inc();
    // Answer once the records are on the bus, so a caller's next request meets gateways that
    // have them rather than racing the outbox relay.
    out.published = s.rt.store.outbox_wait_published(Duration::from_secs(2)).await?;
    Ok(out)
}
