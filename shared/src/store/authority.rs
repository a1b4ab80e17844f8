//! Authority state: revocations (by subject), delegation edges and human approvals.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Store, Tx, read, tx, tx_exec, write_exec};
use crate::error::{Error, ErrorCode, Result};
use crate::ids::{AgentId, ApprovalId, DelegationId, MandateId, SessionId, TenantId};
use crate::mandate::Claims;
use crate::time::{Micros, now_micros};

// ---------------------------------------------------------------- revocations

/// What a revocation names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevocationKind {
    /// A Biscuit block revocation id (hex): that token and everything derived from it.
    RevocationId,
    Mandate,
    Agent,
    Session,
    Credential,
    /// Every mandate of a tenant (incidents).
    Tenant,
    /// Every mandate that names a resource (incidents).
    Resource,
}

impl RevocationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RevocationKind::RevocationId => "revocation_id",
            RevocationKind::Mandate => "mandate",
            RevocationKind::Agent => "agent",
            RevocationKind::Session => "session",
            RevocationKind::Credential => "credential",
            RevocationKind::Tenant => "tenant",
            RevocationKind::Resource => "resource",
        }
    }

    pub fn parse(s: &str) -> Option<RevocationKind> {
        serde_json::from_value(Value::String(s.into())).ok()
    }
}

/// One revocation: every mandate of `kind:value` issued at or before `revoked_at` is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub tenant_id: TenantId,
    pub kind: RevocationKind,
    pub value: String,
    pub reason: String,
    /// Seconds since the epoch (mandate issue times are seconds).
    pub revoked_at: i64,
    /// After this (µs) no mandate it could match is still valid.
    pub expires_at: Micros,
}

impl Revocation {
    pub fn key(&self) -> String {
        format!("{}:{}", self.kind.as_str(), self.value)
    }

    /// Does this revocation refuse the mandate?
    pub fn matches(&self, c: &Claims, revocation_ids: &[&str]) -> bool {
        if c.issued_at > self.revoked_at {
            return false;
        }
        let v = self.value.as_str();
        match self.kind {
            RevocationKind::RevocationId => revocation_ids.contains(&v),
            RevocationKind::Mandate => c.mandate_id.to_string() == v || c.parent.is_some_and(|p| p.to_string() == v),
            RevocationKind::Agent => c.agent.to_string() == v,
            RevocationKind::Session => c.session.is_some_and(|s| s.to_string() == v),
            RevocationKind::Credential => c.credential.as_deref() == Some(v),
            RevocationKind::Tenant => c.tenant.to_string() == v,
            RevocationKind::Resource => c.resources.iter().any(|r| r.id.to_string() == v),
        }
    }
}

type RevRow = (String, String, String, String, i64, i64);

fn rev_from_row(r: RevRow) -> Result<Revocation> {
    Ok(Revocation {
        tenant_id: TenantId::parse(&r.0)?,
        kind: RevocationKind::parse(&r.1).ok_or_else(|| Error::internal("bad revocation kind"))?,
        value: r.2,
        reason: r.3,
        revoked_at: r.4,
        expires_at: r.5,
    })
}

impl Tx {
    /// Record a revocation (a later revocation of the same subject moves `revoked_at` forward).
    pub async fn insert_revocation(&mut self, r: &Revocation) -> Result<()> {
        let key = r.key();
        let now = now_micros();
        tx_exec!(self, sqlx::query(
            "INSERT INTO revocations (id, tenant_id, kind, value, reason, revoked_at, expires_at, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (id) DO UPDATE SET revoked_at = excluded.revoked_at, expires_at = excluded.expires_at, reason = excluded.reason")
            .bind(&key).bind(r.tenant_id.to_string()).bind(r.kind.as_str()).bind(&r.value).bind(&r.reason)
            .bind(r.revoked_at).bind(r.expires_at).bind(now))?;
        Ok(())
    }
}

impl Store {
    /// Every revocation that can still match a valid mandate.
    pub async fn live_revocations(&self) -> Result<Vec<Revocation>> {
        let rows: Vec<RevRow> = read!(self, p => sqlx::query_as(
            "SELECT tenant_id, kind, value, reason, revoked_at, expires_at FROM revocations WHERE expires_at > $1")
            .bind(now_micros()).fetch_all(p).await)?;
        rows.into_iter().map(rev_from_row).collect()
    }

    pub async fn prune_revocations(&self) -> Result<u64> {
        Ok(write_exec!(
            self,
            sqlx::query("DELETE FROM revocations WHERE expires_at <= $1").bind(now_micros())
        )?)
    }
}

// ---------------------------------------------------------------- delegations

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Delegation {
    pub id: DelegationId,
    pub tenant_id: TenantId,
    pub parent_mandate: MandateId,
    pub child_mandate: MandateId,
    pub parent_agent: AgentId,
    pub child_agent: AgentId,
    pub parent_session: Option<SessionId>,
    pub child_session: Option<SessionId>,
    /// The attenuated scope (resources, scopes, restrictions) as granted.
    pub scope: Value,
    /// Revocation ids of the child mandate (hex).
    pub revocation_ids: Vec<String>,
    pub depth: i64,
    pub created_at: Micros,
    pub expires_at: Micros,
}

pub(crate) type DelegationRow = (
    String,
    String,
    String,
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    String,
    String,
    i64,
    i64,
    i64,
);
pub(crate) const DELEGATION_COLS: &str = "id, tenant_id, parent_mandate, child_mandate, parent_agent, child_agent, parent_session, child_session, scope, revocation_ids, depth, created_at, expires_at";

pub(crate) fn delegation_from_row(r: DelegationRow) -> Result<Delegation> {
    Ok(Delegation {
        id: DelegationId::parse(&r.0)?,
        tenant_id: TenantId::parse(&r.1)?,
        parent_mandate: MandateId::parse(&r.2)?,
        child_mandate: MandateId::parse(&r.3)?,
        parent_agent: AgentId::parse(&r.4)?,
        child_agent: AgentId::parse(&r.5)?,
        parent_session: r.6.as_deref().map(SessionId::parse).transpose()?,
        child_session: r.7.as_deref().map(SessionId::parse).transpose()?,
        scope: serde_json::from_str(&r.8).unwrap_or(Value::Null),
        revocation_ids: serde_json::from_str(&r.9).unwrap_or_default(),
        depth: r.10,
        created_at: r.11,
        expires_at: r.12,
    })
}

impl Tx {
    pub async fn insert_delegation(&mut self, d: &Delegation) -> Result<()> {
        tx_exec!(self, sqlx::query(
            "INSERT INTO delegations (id, tenant_id, parent_mandate, child_mandate, parent_agent, child_agent, parent_session, child_session, scope, revocation_ids, depth, created_at, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)")
            .bind(d.id.to_string()).bind(d.tenant_id.to_string()).bind(d.parent_mandate.to_string()).bind(d.child_mandate.to_string())
            .bind(d.parent_agent.to_string()).bind(d.child_agent.to_string()).bind(d.parent_session.map(|s| s.to_string()))
            .bind(d.child_session.map(|s| s.to_string())).bind(d.scope.to_string()).bind(serde_json::to_string(&d.revocation_ids)?)
            .bind(d.depth).bind(d.created_at).bind(d.expires_at))?;
        Ok(())
    }
}

impl Store {
    /// Delegations whose parent is `mandate` (one level).
    pub async fn delegations_from(&self, tenant: TenantId, mandate: MandateId) -> Result<Vec<Delegation>> {
        let sql = format!(
            "SELECT {DELEGATION_COLS} FROM delegations WHERE tenant_id = $1 AND parent_mandate = $2 ORDER BY id LIMIT 10000"
        );
        let rows: Vec<DelegationRow> = read!(self, p => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(tenant.to_string()).bind(mandate.to_string()).fetch_all(p).await)?;
        rows.into_iter().map(delegation_from_row).collect()
    }

    pub async fn delegation(&self, tenant: TenantId, id: DelegationId) -> Result<Delegation> {
        let sql = format!("SELECT {DELEGATION_COLS} FROM delegations WHERE tenant_id = $1 AND id = $2");
        let row: Option<DelegationRow> = read!(self, p => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(tenant.to_string()).bind(id.to_string()).fetch_optional(p).await)?;
        row.map(delegation_from_row)
            .transpose()?
            .ok_or_else(|| Error::not_found("delegation"))
    }

    /// Number of live delegations made from `mandate` (fan-out limits).
    pub async fn delegation_count(&self, tenant: TenantId, mandate: MandateId) -> Result<i64> {
        let (n,): (i64,) = read!(self, p => sqlx::query_as(
            "SELECT COUNT(*) FROM delegations WHERE tenant_id = $1 AND parent_mandate = $2 AND expires_at > $3")
            .bind(tenant.to_string()).bind(mandate.to_string()).bind(now_micros()).fetch_one(p).await)?;
        Ok(n)
    }
}

// ---------------------------------------------------------------- approvals

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalStatus {
    Pending,
    Approved,
    Denied,
    Expired,
    /// Approved and its one mandate has been collected.
    Released,
}

impl ApprovalStatus {
    fn as_str(self) -> &'static str {
        match self {
            ApprovalStatus::Pending => "pending",
            ApprovalStatus::Approved => "approved",
            ApprovalStatus::Denied => "denied",
            ApprovalStatus::Expired => "expired",
            ApprovalStatus::Released => "released",
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Approval {
    pub id: ApprovalId,
    pub tenant_id: TenantId,
    pub agent_id: AgentId,
    /// The exact request awaiting approval.
    pub request: Value,
    #[serde(skip)]
    pub requester: String,
    pub status: ApprovalStatus,
    pub created_at: Micros,
    pub expires_at: Micros,
    pub decided_at: Option<Micros>,
    pub decided_by: Option<String>,
    pub reason: Option<String>,
    pub released_at: Option<Micros>,
    pub mandate_id: Option<String>,
    #[serde(skip)]
    pub last_polled_at: Option<Micros>,
}

type ApprovalRow = (
    String,
    String,
    String,
    String,
    String,
    String,
    i64,
    i64,
    Option<i64>,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<String>,
    Option<i64>,
);
const APPROVAL_COLS: &str = "id, tenant_id, agent_id, request, requester, status, created_at, expires_at, decided_at, decided_by, reason, released_at, mandate_id, last_polled_at";

fn approval_from_row(r: ApprovalRow) -> Result<Approval> {
    let status: ApprovalStatus =
        serde_json::from_value(Value::String(r.5.clone())).map_err(|_| Error::internal("bad approval status"))?;
    Ok(Approval {
        id: ApprovalId::parse(&r.0)?,
        tenant_id: TenantId::parse(&r.1)?,
        agent_id: AgentId::parse(&r.2)?,
        request: serde_json::from_str(&r.3).unwrap_or(Value::Null),
        requester: r.4,
        status,
        created_at: r.6,
        expires_at: r.7,
        decided_at: r.8,
        decided_by: r.9,
        reason: r.10,
        released_at: r.11,
        mandate_id: r.12,
        last_polled_at: r.13,
    })
}

impl Approval {
    /// The status as seen now (a pending or approved request past its expiry is expired).
    pub fn effective_status(&self, now: Micros) -> ApprovalStatus {
        match self.status {
            ApprovalStatus::Pending | ApprovalStatus::Approved if now >= self.expires_at => ApprovalStatus::Expired,
            s => s,
        }
    }
}

impl Tx {
    pub async fn insert_approval(&mut self, a: &Approval) -> Result<()> {
        tx_exec!(
            self,
            sqlx::query(
                "INSERT INTO approvals (id, tenant_id, agent_id, request, requester, status, created_at, expires_at)
             VALUES ($1, $2, $3, $4, $5, 'pending', $6, $7)"
            )
            .bind(a.id.to_string())
            .bind(a.tenant_id.to_string())
            .bind(a.agent_id.to_string())
            .bind(a.request.to_string())
            .bind(&a.requester)
            .bind(a.created_at)
            .bind(a.expires_at)
        )?;
        Ok(())
    }

    pub async fn approval_for_update(&mut self, tenant: Option<TenantId>, id: ApprovalId) -> Result<Approval> {
        let lock = if self.kind() == crate::config::DbKind::Postgres {
            " FOR UPDATE"
        } else {
            ""
        };
        let row: Option<ApprovalRow> = match tenant {
            Some(t) => {
                let sql = format!("SELECT {APPROVAL_COLS} FROM approvals WHERE tenant_id = $1 AND id = $2{lock}");
                tx!(self, c => sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(t.to_string()).bind(id.to_string()).fetch_optional(c).await)?
            }
            None => {
                let sql = format!("SELECT {APPROVAL_COLS} FROM approvals WHERE id = $1{lock}");
                tx!(self, c => sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(id.to_string()).fetch_optional(c).await)?
            }
        };
        row.map(approval_from_row)
            .transpose()?
            .ok_or_else(|| Error::not_found("approval"))
    }

    /// Decide a pending approval. Deciding twice, or after expiry, is a conflict.
    pub async fn decide_approval(
        &mut self,
        tenant: TenantId,
        id: ApprovalId,
        approve: bool,
        by: &str,
        reason: Option<&str>,
    ) -> Result<Approval> {
        let a = self.approval_for_update(Some(tenant), id).await?;
        let now = now_micros();
        match a.effective_status(now) {
            ApprovalStatus::Pending => {}
            s => {
                return Err(
                    Error::new(ErrorCode::Conflict, format!("the approval is already {}", s.as_str()))
                        .with_details(serde_json::json!({ "status": s })),
                );
            }
        }
        let status = if approve {
            ApprovalStatus::Approved
        } else {
            ApprovalStatus::Denied
        };
        tx_exec!(self, sqlx::query(
            "UPDATE approvals SET status = $1, decided_at = $2, decided_by = $3, reason = $4 WHERE id = $5 AND status = 'pending'")
            .bind(status.as_str()).bind(now).bind(by).bind(reason).bind(id.to_string()))?;
        Ok(Approval {
            status,
            decided_at: Some(now),
            decided_by: Some(by.to_string()),
            reason: reason.map(String::from),
            ..a
        })
    }

    /// Mark an approved request released with its mandate; only one caller can win.
    pub async fn release_approval(&mut self, id: ApprovalId, mandate: MandateId) -> Result<bool> {
        let n = tx_exec!(self, sqlx::query(
            "UPDATE approvals SET status = 'released', released_at = $1, mandate_id = $2 WHERE id = $3 AND status = 'approved'")
            .bind(now_micros()).bind(mandate.to_string()).bind(id.to_string()))?;
        Ok(n == 1)
    }

    pub async fn touch_approval_poll(&mut self, id: ApprovalId) -> Result<()> {
        tx_exec!(
            self,
            sqlx::query("UPDATE approvals SET last_polled_at = $1 WHERE id = $2")
                .bind(now_micros())
                .bind(id.to_string())
        )?;
        Ok(())
    }
}

impl Store {
    pub async fn approvals(&self, tenant: TenantId, status: Option<ApprovalStatus>) -> Result<Vec<Approval>> {
        let rows: Vec<ApprovalRow> = match status {
            Some(s) => {
                let sql = format!(
                    "SELECT {APPROVAL_COLS} FROM approvals WHERE tenant_id = $1 AND status = $2 ORDER BY id LIMIT 500"
                );
                read!(self, p => sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(tenant.to_string()).bind(s.as_str()).fetch_all(p).await)?
            }
            None => {
                let sql = format!("SELECT {APPROVAL_COLS} FROM approvals WHERE tenant_id = $1 ORDER BY id LIMIT 500");
                read!(self, p => sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(tenant.to_string()).fetch_all(p).await)?
            }
        };
        rows.into_iter().map(approval_from_row).collect()
    }

    pub async fn approval(&self, tenant: TenantId, id: ApprovalId) -> Result<Approval> {
        let sql = format!("SELECT {APPROVAL_COLS} FROM approvals WHERE tenant_id = $1 AND id = $2");
        let row: Option<ApprovalRow> = read!(self, p => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(tenant.to_string()).bind(id.to_string()).fetch_optional(p).await)?;
        row.map(approval_from_row)
            .transpose()?
            .ok_or_else(|| Error::not_found("approval"))
    }
}

impl Tx {
    /// Revoke: record each revocation and publish it on the sequenced revocation stream (one
    /// transaction), so gateways apply it and notice if any event is lost.
    pub async fn revoke(&mut self, revocations: &[Revocation]) -> Result<()> {
        for r in revocations {
            self.insert_revocation(r).await?;
            self.emit(
                crate::store::outbox::NewEvent::new(
                    crate::bus::streams::REVOCATIONS,
                    "revocation",
                    Some(r.tenant_id),
                    serde_json::to_value(r)?,
                )
                .sequenced(),
            )
            .await?;
            self.emit(crate::store::outbox::NewEvent::new(
                crate::bus::streams::AUDIT,
                "revocation",
                Some(r.tenant_id),
                serde_json::json!({ "type": "revocation", "kind": r.kind, "value": r.value, "reason": r.reason, "revoked_at": r.revoked_at }),
            ))
            .await?;
        }
        Ok(())
    }
}

impl Revocation {
    /// A revocation of `kind:value` effective now, kept as long as any mandate could match it.
    pub fn now(
        tenant: TenantId,
        kind: RevocationKind,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) -> Revocation {
        let now = now_micros();
        Revocation {
            tenant_id: tenant,
            kind,
            value: value.into(),
            reason: reason.into(),
            revoked_at: now / 1_000_000,
            expires_at: now + (crate::store::policies::MAX_MANDATE_LIFETIME_SECS + 60) * 1_000_000,
        }
    }
}
