//! The coordinator's state: agent sessions, service leases with fencing generations, and
//! invocations between agents. Every state change is one conditional `UPDATE … WHERE status
//! IN (…) RETURNING`, so concurrent callers never both win a transition and no lock wider
//! than the row is taken. Callers (the coordinator) wrap these in transactions that also
//! write the transition's events to the outbox.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{Cursor, Page, Store, Tx, read, tx, tx_exec};
use crate::error::{Error, ErrorCode, Result};
use crate::ids::{AgentId, InvocationId, MandateId, SessionId, TenantId};
use crate::mandate::Claims;
use crate::store::authority::Revocation;
use crate::time::{Micros, now_micros};

fn invalid_transition(what: &str, status: &str, to: &str) -> Error {
    Error::new(
        ErrorCode::InvalidTransition,
        format!("the {what} is {status}; it cannot become {to}"),
    )
    .with_details(json!({ "status": status }))
}

fn in_list(states: &[&str]) -> String {
    states.iter().map(|s| format!("'{s}'")).collect::<Vec<_>>().join(", ")
}

// ---------------------------------------------------------------- sessions

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionStatus {
    Active,
    Completed,
    Failed,
    Expired,
    Revoked,
}

impl SessionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionStatus::Active => "active",
            SessionStatus::Completed => "completed",
            SessionStatus::Failed => "failed",
            SessionStatus::Expired => "expired",
            SessionStatus::Revoked => "revoked",
        }
    }

    pub fn parse(s: &str) -> Result<SessionStatus> {
        serde_json::from_value(Value::String(s.into()))
            .map_err(|_| Error::validation(format!("unknown session status {s:?}")))
    }

    pub fn is_terminal(self) -> bool {
        self != SessionStatus::Active
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Session {
    pub id: SessionId,
    pub tenant_id: TenantId,
    pub agent_id: AgentId,
    /// The mandate the session was started with.
    pub mandate_id: MandateId,
    /// The workload credential behind that mandate (an identifier, never a secret).
    pub credential: Option<String>,
    /// Biscuit revocation ids (hex) of the starting mandate.
    pub revocation_ids: Vec<String>,
    pub parent_session: Option<SessionId>,
    pub status: SessionStatus,
    pub labels: BTreeMap<String, String>,
    pub started_at: Micros,
    pub heartbeat_at: Micros,
    pub heartbeat_timeout_ms: i64,
    pub expires_at: Micros,
    pub ended_at: Option<Micros>,
    pub end_reason: Option<String>,
    pub version: i64,
}

impl Session {
    /// When the session expires if it hears nothing more.
    pub fn deadline(&self) -> Micros {
        self.expires_at
            .min(self.heartbeat_at + self.heartbeat_timeout_ms * 1000)
    }

    /// The status as of `now` (an active session past its deadline is expired even before the
    /// sweeper records it).
    pub fn effective_status(&self, now: Micros) -> SessionStatus {
        if self.status == SessionStatus::Active && self.deadline() <= now {
            SessionStatus::Expired
        } else {
            self.status
        }
    }
}

type SessionRow = (
    String,
    String,
    String,
    String,
    Option<String>,
    String,
    Option<String>,
    String,
    String,
    i64,
    i64,
    i64,
    i64,
    Option<i64>,
    Option<String>,
    i64,
);
const SESSION_COLS: &str = "id, tenant_id, agent_id, mandate_id, credential, revocation_ids, parent_session, status, labels, started_at, heartbeat_at, heartbeat_timeout_ms, expires_at, ended_at, end_reason, version";

fn session_from_row(r: SessionRow) -> Result<Session> {
    Ok(Session {
        id: SessionId::parse(&r.0)?,
        tenant_id: TenantId::parse(&r.1)?,
        agent_id: AgentId::parse(&r.2)?,
        mandate_id: MandateId::parse(&r.3)?,
        credential: r.4,
        revocation_ids: serde_json::from_str(&r.5).unwrap_or_default(),
        parent_session: r.6.as_deref().map(SessionId::parse).transpose()?,
        status: SessionStatus::parse(&r.7).map_err(|_| Error::internal("bad session status"))?,
        labels: serde_json::from_str(&r.8).unwrap_or_default(),
        started_at: r.9,
        heartbeat_at: r.10,
        heartbeat_timeout_ms: r.11,
        expires_at: r.12,
        ended_at: r.13,
        end_reason: r.14,
        version: r.15,
    })
}

/// Columns a cascade may follow to find active sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionLink {
    Agent,
    Credential,
    Mandate,
    Parent,
    Tenant,
}

impl SessionLink {
    fn column(self) -> &'static str {
        match self {
            SessionLink::Agent => "agent_id",
            SessionLink::Credential => "credential",
            SessionLink::Mandate => "mandate_id",
            SessionLink::Parent => "parent_session",
            SessionLink::Tenant => "tenant_id",
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct SessionFilter {
    pub status: Option<SessionStatus>,
    pub agent: Option<AgentId>,
    pub parent: Option<SessionId>,
}

impl Tx {
    pub async fn insert_session(&mut self, s: &Session) -> Result<()> {
        tx_exec!(self, sqlx::query(
            "INSERT INTO sessions (id, tenant_id, agent_id, mandate_id, credential, revocation_ids, parent_session, status, labels, started_at, heartbeat_at, heartbeat_timeout_ms, expires_at, ended_at, end_reason, version)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)")
            .bind(s.id.to_string()).bind(s.tenant_id.to_string()).bind(s.agent_id.to_string()).bind(s.mandate_id.to_string())
            .bind(&s.credential).bind(serde_json::to_string(&s.revocation_ids)?).bind(s.parent_session.map(|p| p.to_string()))
            .bind(s.status.as_str()).bind(serde_json::to_string(&s.labels)?).bind(s.started_at).bind(s.heartbeat_at)
            .bind(s.heartbeat_timeout_ms).bind(s.expires_at).bind(s.ended_at).bind(&s.end_reason).bind(s.version))?;
        Ok(())
    }

    pub async fn session(&mut self, tenant: TenantId, id: SessionId) -> Result<Session> {
        let sql = format!("SELECT {SESSION_COLS} FROM sessions WHERE tenant_id = $1 AND id = $2");
        let row: Option<SessionRow> = tx!(self, c => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(tenant.to_string()).bind(id.to_string()).fetch_optional(c).await)?;
        row.map(session_from_row)
            .transpose()?
            .ok_or_else(|| Error::not_found("session"))
    }

    /// Active sessions (not yet past their deadline or not) linked to `value` by `link`.
    pub async fn active_sessions_by(
        &mut self,
        tenant: TenantId,
        link: SessionLink,
        value: &str,
    ) -> Result<Vec<Session>> {
        let sql = format!(
            "SELECT {SESSION_COLS} FROM sessions WHERE tenant_id = $1 AND {} = $2 AND status = 'active' ORDER BY id",
            link.column()
        );
        let rows: Vec<SessionRow> = tx!(self, c => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(tenant.to_string()).bind(value).fetch_all(c).await)?;
        rows.into_iter().map(session_from_row).collect()
    }

    pub async fn count_active_sessions(&mut self, tenant: TenantId) -> Result<i64> {
        let (n,): (i64,) = tx!(self, c => sqlx::query_as(
            "SELECT COUNT(*) FROM sessions WHERE tenant_id = $1 AND status = 'active'")
            .bind(tenant.to_string()).fetch_one(c).await)?;
        Ok(n)
    }

    /// Move a session from one of `from` to `to` (terminal states record the end). A session
    /// in another state is a 409 `invalid_transition` carrying its status.
    pub async fn transition_session(
        &mut self,
        tenant: TenantId,
        id: SessionId,
        from: &[SessionStatus],
        to: SessionStatus,
        reason: Option<&str>,
    ) -> Result<Session> {
        let now = now_micros();
        let from_sql = in_list(&from.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        let sql = format!(
            "UPDATE sessions SET status = $3, ended_at = $4, end_reason = $5, version = version + 1
             WHERE tenant_id = $1 AND id = $2 AND status IN ({from_sql}) RETURNING {SESSION_COLS}"
        );
        let row: Option<SessionRow> = tx!(self, c => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(tenant.to_string()).bind(id.to_string()).bind(to.as_str())
            .bind(to.is_terminal().then_some(now)).bind(reason).fetch_optional(c).await)?;
        match row {
            Some(r) => session_from_row(r),
            None => {
                let cur = self.session(tenant, id).await?;
                Err(invalid_transition("session", cur.status.as_str(), to.as_str()))
            }
        }
    }

    /// Record a heartbeat of an active session that has not passed its deadline.
    pub async fn heartbeat_session(&mut self, tenant: TenantId, id: SessionId) -> Result<Session> {
        let now = now_micros();
        let sql = format!(
            "UPDATE sessions SET heartbeat_at = $3, version = version + 1
             WHERE tenant_id = $1 AND id = $2 AND status = 'active' AND expires_at > $3
               AND heartbeat_at + heartbeat_timeout_ms * 1000 > $3
             RETURNING {SESSION_COLS}"
        );
        let row: Option<SessionRow> = tx!(self, c => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(tenant.to_string()).bind(id.to_string()).bind(now).fetch_optional(c).await)?;
        match row {
            Some(r) => session_from_row(r),
            None => {
                let cur = self.session(tenant, id).await?;
                Err(invalid_transition(
                    "session",
                    cur.effective_status(now).as_str(),
                    "active",
                ))
            }
        }
    }

    /// Expire every active session past its deadline (at most `limit`), returning them.
    pub async fn expire_sessions(&mut self, limit: i64) -> Result<Vec<Session>> {
        let now = now_micros();
        let sql = format!(
            "UPDATE sessions SET status = 'expired', ended_at = $1, end_reason = 'deadline passed', version = version + 1
             WHERE id IN (SELECT id FROM sessions WHERE status = 'active'
                            AND (expires_at <= $1 OR heartbeat_at + heartbeat_timeout_ms * 1000 <= $1) LIMIT $2)
               AND status = 'active'
             RETURNING {SESSION_COLS}"
        );
        let rows: Vec<SessionRow> = tx!(self, c => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(now).bind(limit).fetch_all(c).await)?;
        rows.into_iter().map(session_from_row).collect()
    }
}

impl Store {
    pub async fn session(&self, tenant: TenantId, id: SessionId) -> Result<Session> {
        let sql = format!("SELECT {SESSION_COLS} FROM sessions WHERE tenant_id = $1 AND id = $2");
        let row: Option<SessionRow> = read!(self, p => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(tenant.to_string()).bind(id.to_string()).fetch_optional(p).await)?;
        row.map(session_from_row)
            .transpose()?
            .ok_or_else(|| Error::not_found("session"))
    }

    pub async fn sessions(&self, tenant: TenantId, f: &SessionFilter, cursor: &Cursor) -> Result<Page<Session>> {
        let sql = format!(
            "SELECT {SESSION_COLS} FROM sessions WHERE tenant_id = $1 AND id > $2
               AND ($3 = '' OR status = $3) AND ($4 = '' OR agent_id = $4) AND ($5 = '' OR parent_session = $5)
             ORDER BY id LIMIT $6"
        );
        let rows: Vec<SessionRow> = read!(self, p => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(tenant.to_string()).bind(cursor.after_str())
            .bind(f.status.map(|s| s.as_str()).unwrap_or(""))
            .bind(f.agent.map(|a| a.to_string()).unwrap_or_default())
            .bind(f.parent.map(|a| a.to_string()).unwrap_or_default())
            .bind(cursor.fetch_limit()).fetch_all(p).await)?;
        let items = rows.into_iter().map(session_from_row).collect::<Result<Vec<_>>>()?;
        Ok(Page::from_rows(items, cursor, |s| s.id.to_string()))
    }

    /// Does any recorded revocation refuse this mandate? (The database's answer; gateways keep
    /// the same set in memory.)
    pub async fn mandate_revoked(&self, c: &Claims, revocation_ids: &[&str]) -> Result<bool> {
        let mut values: Vec<String> = vec![c.mandate_id.to_string(), c.agent.to_string(), c.tenant.to_string()];
        values.extend(c.parent.map(|p| p.to_string()));
        values.extend(c.session.map(|s| s.to_string()));
        values.extend(c.credential.clone());
        values.extend(c.resources.iter().map(|r| r.id.to_string()));
        values.extend(revocation_ids.iter().map(|s| s.to_string()));
        values.truncate(500);
        let placeholders = (0..values.len())
            .map(|i| format!("${}", i + 3))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT tenant_id, kind, value, reason, revoked_at, expires_at FROM revocations
             WHERE tenant_id = $1 AND expires_at > $2 AND value IN ({placeholders})"
        );
        type R = (String, String, String, String, i64, i64);
        let rows: Vec<R> = read!(self, p => {
            let mut q = sqlx::query_as(sqlx::AssertSqlSafe(sql.clone())).bind(c.tenant.to_string()).bind(now_micros());
            for v in &values {
                q = q.bind(v.clone());
            }
            q.fetch_all(p).await
        })?;
        for r in rows {
            let Some(kind) = crate::store::authority::RevocationKind::parse(&r.1) else {
                continue;
            };
            let rev = Revocation {
                tenant_id: c.tenant,
                kind,
                value: r.2,
                reason: r.3,
                revoked_at: r.4,
                expires_at: r.5,
            };
            if rev.matches(c, revocation_ids) {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

// ---------------------------------------------------------------- leases

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Lease {
    pub tenant_id: TenantId,
    pub name: String,
    pub agent_id: AgentId,
    pub holder: Option<String>,
    /// Fencing generation: +1 on every acquisition by a new holder.
    pub generation: i64,
    pub ttl_ms: i64,
    pub acquired_at: Option<Micros>,
    pub renewed_at: Option<Micros>,
    pub expires_at: Option<Micros>,
    pub released_at: Option<Micros>,
}

impl Lease {
    pub fn is_live(&self, now: Micros) -> bool {
        self.released_at.is_none() && self.expires_at.is_some_and(|e| e > now)
    }

    fn view(&self, now: Micros) -> Value {
        json!({ "holder": self.holder, "generation": self.generation, "expires_at": self.expires_at, "live": self.is_live(now) })
    }
}

type LeaseRow = (
    String,
    String,
    String,
    Option<String>,
    i64,
    i64,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
);
const LEASE_COLS: &str =
    "tenant_id, name, agent_id, holder, generation, ttl_ms, acquired_at, renewed_at, expires_at, released_at";

fn lease_from_row(r: LeaseRow) -> Result<Lease> {
    Ok(Lease {
        tenant_id: TenantId::parse(&r.0)?,
        name: r.1,
        agent_id: AgentId::parse(&r.2)?,
        holder: r.3,
        generation: r.4,
        ttl_ms: r.5,
        acquired_at: r.6,
        renewed_at: r.7,
        expires_at: r.8,
        released_at: r.9,
    })
}

/// Lease names: 1–200 characters of `[A-Za-z0-9._:/-]`.
pub fn validate_lease_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 200 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:/-".contains(&b))
    {
        return Err(Error::validation(
            "lease names are 1-200 characters of letters, digits and . _ : / -",
        ));
    }
    Ok(())
}

impl Tx {
    pub async fn lease(&mut self, tenant: TenantId, name: &str) -> Result<Lease> {
        let sql = format!("SELECT {LEASE_COLS} FROM leases WHERE tenant_id = $1 AND name = $2");
        let row: Option<LeaseRow> = tx!(self, c => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(tenant.to_string()).bind(name).fetch_optional(c).await)?;
        row.map(lease_from_row)
            .transpose()?
            .ok_or_else(|| Error::not_found("lease"))
    }

    pub async fn count_live_leases(&mut self, tenant: TenantId) -> Result<i64> {
        let (n,): (i64,) = tx!(self, c => sqlx::query_as(
            "SELECT COUNT(*) FROM leases WHERE tenant_id = $1 AND released_at IS NULL AND expires_at > $2")
            .bind(tenant.to_string()).bind(now_micros()).fetch_one(c).await)?;
        Ok(n)
    }

    /// Take the lease when it is free (never held, released or expired) — a new fencing
    /// generation — or renew it when `holder` already holds it (same generation). Held by
    /// another: 409 `lease_held`. Returns the lease and whether it was newly acquired.
    pub async fn acquire_lease(
        &mut self,
        tenant: TenantId,
        name: &str,
        agent: AgentId,
        holder: &str,
        ttl_ms: i64,
    ) -> Result<(Lease, bool)> {
        let now = now_micros();
        let same = "leases.holder = excluded.holder AND leases.agent_id = excluded.agent_id AND leases.released_at IS NULL AND leases.expires_at > $6";
        let sql = format!(
            "INSERT INTO leases ({LEASE_COLS}) VALUES ($1, $2, $3, $4, 1, $5, $6, $6, $7, NULL)
             ON CONFLICT (tenant_id, name) DO UPDATE SET
               generation = CASE WHEN {same} THEN leases.generation ELSE leases.generation + 1 END,
               acquired_at = CASE WHEN {same} THEN leases.acquired_at ELSE excluded.acquired_at END,
               agent_id = excluded.agent_id, holder = excluded.holder, ttl_ms = excluded.ttl_ms,
               renewed_at = excluded.renewed_at, expires_at = excluded.expires_at, released_at = NULL
             WHERE leases.released_at IS NOT NULL OR leases.expires_at <= $6
                OR (leases.holder = excluded.holder AND leases.agent_id = excluded.agent_id)
             RETURNING {LEASE_COLS}"
        );
        let row: Option<LeaseRow> = tx!(self, c => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(tenant.to_string()).bind(name).bind(agent.to_string()).bind(holder).bind(ttl_ms)
            .bind(now).bind(now + ttl_ms * 1000).fetch_optional(c).await)?;
        match row {
            Some(r) => {
                let l = lease_from_row(r)?;
                let fresh = l.acquired_at == Some(now);
                Ok((l, fresh))
            }
            None => {
                let cur = self.lease(tenant, name).await?;
                Err(Error::new(ErrorCode::LeaseHeld, "the lease is held by another holder").with_details(cur.view(now)))
            }
        }
    }

    /// Explain why `holder`/`generation` may not act on the lease now.
    async fn lease_refusal(&mut self, tenant: TenantId, name: &str, holder: &str, generation: i64) -> Error {
        let now = now_micros();
        match self.lease(tenant, name).await {
            Err(e) => e,
            Ok(cur) if cur.generation != generation || cur.holder.as_deref() != Some(holder) => Error::new(
                ErrorCode::LeaseFenced,
                "stale fencing generation: the lease has been taken over",
            )
            .with_details(cur.view(now)),
            Ok(cur) => {
                Error::new(ErrorCode::LeaseExpired, "the lease has expired or was released").with_details(cur.view(now))
            }
        }
    }

    /// Extend a live lease held by `holder` at `generation`.
    pub async fn renew_lease(&mut self, tenant: TenantId, name: &str, holder: &str, generation: i64) -> Result<Lease> {
        let now = now_micros();
        let sql = format!(
            "UPDATE leases SET renewed_at = $5, expires_at = $5 + ttl_ms * 1000
             WHERE tenant_id = $1 AND name = $2 AND holder = $3 AND generation = $4
               AND released_at IS NULL AND expires_at > $5
             RETURNING {LEASE_COLS}"
        );
        let row: Option<LeaseRow> = tx!(self, c => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(tenant.to_string()).bind(name).bind(holder).bind(generation).bind(now).fetch_optional(c).await)?;
        match row {
            Some(r) => lease_from_row(r),
            None => Err(self.lease_refusal(tenant, name, holder, generation).await),
        }
    }

    /// Give the lease up (only its current holder can).
    pub async fn release_lease(
        &mut self,
        tenant: TenantId,
        name: &str,
        holder: &str,
        generation: i64,
    ) -> Result<Lease> {
        let now = now_micros();
        let sql = format!(
            "UPDATE leases SET released_at = $5
             WHERE tenant_id = $1 AND name = $2 AND holder = $3 AND generation = $4
               AND released_at IS NULL AND expires_at > $5
             RETURNING {LEASE_COLS}"
        );
        let row: Option<LeaseRow> = tx!(self, c => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(tenant.to_string()).bind(name).bind(holder).bind(generation).bind(now).fetch_optional(c).await)?;
        match row {
            Some(r) => lease_from_row(r),
            None => Err(self.lease_refusal(tenant, name, holder, generation).await),
        }
    }

    /// Fence check: Ok when `generation` is the live lease's generation.
    pub async fn check_lease(&mut self, tenant: TenantId, name: &str, generation: i64) -> Result<Lease> {
        let now = now_micros();
        let cur = self.lease(tenant, name).await?;
        if cur.generation != generation {
            return Err(Error::new(
                ErrorCode::LeaseFenced,
                "stale fencing generation: the lease has been taken over",
            )
            .with_details(cur.view(now)));
        }
        if !cur.is_live(now) {
            return Err(
                Error::new(ErrorCode::LeaseExpired, "the lease has expired or was released")
                    .with_details(cur.view(now)),
            );
        }
        Ok(cur)
    }

    /// Mark expired leases released (at their expiry), returning them.
    pub async fn expire_leases(&mut self, limit: i64) -> Result<Vec<Lease>> {
        let now = now_micros();
        let sql = format!(
            "UPDATE leases SET released_at = expires_at
             WHERE (tenant_id, name) IN (SELECT tenant_id, name FROM leases WHERE released_at IS NULL AND expires_at <= $1 LIMIT $2)
               AND released_at IS NULL AND expires_at <= $1
             RETURNING {LEASE_COLS}"
        );
        let rows: Vec<LeaseRow> = tx!(self, c => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(now).bind(limit).fetch_all(c).await)?;
        rows.into_iter().map(lease_from_row).collect()
    }
}

impl Store {
    pub async fn lease(&self, tenant: TenantId, name: &str) -> Result<Lease> {
        let sql = format!("SELECT {LEASE_COLS} FROM leases WHERE tenant_id = $1 AND name = $2");
        let row: Option<LeaseRow> = read!(self, p => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(tenant.to_string()).bind(name).fetch_optional(p).await)?;
        row.map(lease_from_row)
            .transpose()?
            .ok_or_else(|| Error::not_found("lease"))
    }

    pub async fn leases(&self, tenant: TenantId, cursor: &Cursor) -> Result<Page<Lease>> {
        let sql = format!("SELECT {LEASE_COLS} FROM leases WHERE tenant_id = $1 AND name > $2 ORDER BY name LIMIT $3");
        let rows: Vec<LeaseRow> = read!(self, p => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(tenant.to_string()).bind(cursor.after_str()).bind(cursor.fetch_limit()).fetch_all(p).await)?;
        let items = rows.into_iter().map(lease_from_row).collect::<Result<Vec<_>>>()?;
        Ok(Page::from_rows(items, cursor, |l| l.name.clone()))
    }
}

// ---------------------------------------------------------------- invocations

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InvocationStatus {
    Pending,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
}

impl InvocationStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            InvocationStatus::Pending => "pending",
            InvocationStatus::Running => "running",
            InvocationStatus::Succeeded => "succeeded",
            InvocationStatus::Failed => "failed",
            InvocationStatus::Cancelled => "cancelled",
            InvocationStatus::TimedOut => "timed_out",
        }
    }

    pub fn parse(s: &str) -> Result<InvocationStatus> {
        serde_json::from_value(Value::String(s.into()))
            .map_err(|_| Error::validation(format!("unknown invocation status {s:?}")))
    }

    pub fn is_open(self) -> bool {
        matches!(self, InvocationStatus::Pending | InvocationStatus::Running)
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Invocation {
    pub id: InvocationId,
    pub tenant_id: TenantId,
    pub caller_agent: AgentId,
    pub caller_session: Option<SessionId>,
    /// The agent asked to do the work.
    pub target: AgentId,
    pub operation: String,
    pub input: Value,
    pub status: InvocationStatus,
    /// Attempts started so far.
    pub attempt: i64,
    pub max_attempts: i64,
    /// First retry delay; doubles on each further retry.
    pub backoff_ms: i64,
    pub deadline_at: Micros,
    pub next_attempt_at: Micros,
    pub worker: Option<String>,
    pub result: Option<Value>,
    pub error: Option<String>,
    pub idempotency_key: Option<String>,
    pub created_at: Micros,
    pub updated_at: Micros,
    pub version: i64,
}

/// An invocation row (more columns than sqlx's tuple rows take, so decoded by position).
struct InvocationRow(
    String,
    String,
    String,
    Option<String>,
    String,
    String,
    String,
    String,
    i64,
    i64,
    i64,
    i64,
    i64,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    i64,
    i64,
    i64,
);

macro_rules! invocation_row {
    ($row:ty) => {
        impl<'r> sqlx::FromRow<'r, $row> for InvocationRow {
            fn from_row(r: &'r $row) -> std::result::Result<Self, sqlx::Error> {
                use sqlx::Row;
                Ok(InvocationRow(
                    r.try_get(0)?,
                    r.try_get(1)?,
                    r.try_get(2)?,
                    r.try_get(3)?,
                    r.try_get(4)?,
                    r.try_get(5)?,
                    r.try_get(6)?,
                    r.try_get(7)?,
                    r.try_get(8)?,
                    r.try_get(9)?,
                    r.try_get(10)?,
                    r.try_get(11)?,
                    r.try_get(12)?,
                    r.try_get(13)?,
                    r.try_get(14)?,
                    r.try_get(15)?,
                    r.try_get(16)?,
                    r.try_get(17)?,
                    r.try_get(18)?,
                    r.try_get(19)?,
                ))
            }
        }
    };
}
invocation_row!(sqlx::postgres::PgRow);
invocation_row!(sqlx::sqlite::SqliteRow);
const INVOCATION_COLS: &str = "id, tenant_id, caller_agent, caller_session, target, operation, input, status, attempt, max_attempts, backoff_ms, deadline_at, next_attempt_at, worker, result, error, idempotency_key, created_at, updated_at, version";

fn invocation_from_row(r: InvocationRow) -> Result<Invocation> {
    Ok(Invocation {
        id: InvocationId::parse(&r.0)?,
        tenant_id: TenantId::parse(&r.1)?,
        caller_agent: AgentId::parse(&r.2)?,
        caller_session: r.3.as_deref().map(SessionId::parse).transpose()?,
        target: AgentId::parse(&r.4)?,
        operation: r.5,
        input: serde_json::from_str(&r.6).unwrap_or(Value::Null),
        status: InvocationStatus::parse(&r.7).map_err(|_| Error::internal("bad invocation status"))?,
        attempt: r.8,
        max_attempts: r.9,
        backoff_ms: r.10,
        deadline_at: r.11,
        next_attempt_at: r.12,
        worker: r.13,
        result: r.14.as_deref().and_then(|s| serde_json::from_str(s).ok()),
        error: r.15,
        idempotency_key: r.16,
        created_at: r.17,
        updated_at: r.18,
        version: r.19,
    })
}

/// Retry delay before attempt `attempt + 1`: `backoff × 2^(attempt-1)`, capped at one hour.
pub fn retry_delay_ms(backoff_ms: i64, attempt: i64) -> i64 {
    let shift = (attempt - 1).clamp(0, 20) as u32;
    backoff_ms.saturating_mul(1i64 << shift).min(3_600_000)
}

impl Tx {
    pub async fn invocation(&mut self, tenant: TenantId, id: InvocationId) -> Result<Invocation> {
        let sql = format!("SELECT {INVOCATION_COLS} FROM invocations WHERE tenant_id = $1 AND id = $2");
        let row: Option<InvocationRow> = tx!(self, c => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(tenant.to_string()).bind(id.to_string()).fetch_optional(c).await)?;
        row.map(invocation_from_row)
            .transpose()?
            .ok_or_else(|| Error::not_found("invocation"))
    }

    pub async fn count_open_invocations(&mut self, tenant: TenantId) -> Result<i64> {
        let (n,): (i64,) = tx!(self, c => sqlx::query_as(
            "SELECT COUNT(*) FROM invocations WHERE tenant_id = $1 AND status IN ('pending', 'running')")
            .bind(tenant.to_string()).fetch_one(c).await)?;
        Ok(n)
    }

    /// Insert a new invocation; with an idempotency key already used by this caller, return the
    /// first invocation instead (`false`) — or a 409 when the request differs from the first.
    pub async fn create_invocation(&mut self, i: &Invocation) -> Result<(Invocation, bool)> {
        let sql = format!(
            "INSERT INTO invocations ({INVOCATION_COLS})
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20)
             ON CONFLICT (tenant_id, caller_agent, idempotency_key) DO NOTHING
             RETURNING {INVOCATION_COLS}"
        );
        let row: Option<InvocationRow> = tx!(self, c => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(i.id.to_string()).bind(i.tenant_id.to_string()).bind(i.caller_agent.to_string())
            .bind(i.caller_session.map(|s| s.to_string())).bind(i.target.to_string()).bind(&i.operation)
            .bind(i.input.to_string()).bind(i.status.as_str()).bind(i.attempt).bind(i.max_attempts).bind(i.backoff_ms)
            .bind(i.deadline_at).bind(i.next_attempt_at).bind(&i.worker).bind(i.result.as_ref().map(|v| v.to_string()))
            .bind(&i.error).bind(&i.idempotency_key).bind(i.created_at).bind(i.updated_at).bind(i.version)
            .fetch_optional(c).await)?;
        if let Some(r) = row {
            return Ok((invocation_from_row(r)?, true));
        }
        let key = i.idempotency_key.as_deref().unwrap_or_default();
        let sql = format!(
            "SELECT {INVOCATION_COLS} FROM invocations WHERE tenant_id = $1 AND caller_agent = $2 AND idempotency_key = $3"
        );
        let row: Option<InvocationRow> = tx!(self, c => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(i.tenant_id.to_string()).bind(i.caller_agent.to_string()).bind(key).fetch_optional(c).await)?;
        let first = invocation_from_row(row.ok_or_else(|| Error::internal("idempotent invocation vanished"))?)?;
        if first.target != i.target || first.operation != i.operation || first.input != i.input {
            return Err(
                Error::conflict("this idempotency key was used for a different invocation")
                    .with_details(json!({ "invocation_id": first.id })),
            );
        }
        Ok((first, false))
    }

    /// Hand the next due pending invocation for `target` to `worker` (skipping rows another
    /// worker is claiming right now).
    pub async fn claim_invocation(
        &mut self,
        tenant: TenantId,
        target: AgentId,
        worker: &str,
    ) -> Result<Option<Invocation>> {
        let now = now_micros();
        let lock = if self.kind() == crate::config::DbKind::Postgres {
            "FOR UPDATE SKIP LOCKED"
        } else {
            ""
        };
        let sql = format!(
            "UPDATE invocations SET status = 'running', worker = $3, attempt = attempt + 1, updated_at = $4, version = version + 1
             WHERE id = (SELECT id FROM invocations WHERE tenant_id = $1 AND target = $2 AND status = 'pending'
                           AND next_attempt_at <= $4 AND deadline_at > $4 ORDER BY next_attempt_at, id LIMIT 1 {lock})
               AND status = 'pending'
             RETURNING {INVOCATION_COLS}"
        );
        let row: Option<InvocationRow> = tx!(self, c => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(tenant.to_string()).bind(target.to_string()).bind(worker).bind(now).fetch_optional(c).await)?;
        row.map(invocation_from_row).transpose()
    }

    /// Conditional transition; `worker` (when given) must be the one running it.
    #[allow(clippy::too_many_arguments)]
    pub async fn transition_invocation(
        &mut self,
        tenant: TenantId,
        id: InvocationId,
        from: &[InvocationStatus],
        to: InvocationStatus,
        worker: Option<&str>,
        result: Option<&Value>,
        error: Option<&str>,
        next_attempt_at: Option<Micros>,
    ) -> Result<Invocation> {
        let now = now_micros();
        let from_sql = in_list(&from.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        let sql = format!(
            "UPDATE invocations SET status = $3, result = COALESCE($5, result), error = COALESCE($6, error),
                    next_attempt_at = COALESCE($7, next_attempt_at), updated_at = $8, version = version + 1,
                    worker = CASE WHEN $3 = 'pending' THEN NULL ELSE worker END
             WHERE tenant_id = $1 AND id = $2 AND status IN ({from_sql}) AND ($4 = '' OR worker = $4)
             RETURNING {INVOCATION_COLS}"
        );
        let row: Option<InvocationRow> = tx!(self, c => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(tenant.to_string()).bind(id.to_string()).bind(to.as_str()).bind(worker.unwrap_or(""))
            .bind(result.map(|v| v.to_string())).bind(error).bind(next_attempt_at).bind(now).fetch_optional(c).await)?;
        match row {
            Some(r) => invocation_from_row(r),
            None => {
                let cur = self.invocation(tenant, id).await?;
                if from.contains(&cur.status) && worker.is_some_and(|w| cur.worker.as_deref() != Some(w)) {
                    return Err(Error::new(
                        ErrorCode::InvalidTransition,
                        "the invocation is being run by another worker",
                    )
                    .with_details(json!({ "status": cur.status.as_str() })));
                }
                Err(invalid_transition("invocation", cur.status.as_str(), to.as_str()))
            }
        }
    }

    /// Cancel every open invocation matching `column = value` (cascades).
    pub async fn cancel_invocations_by(
        &mut self,
        tenant: TenantId,
        column: InvocationLink,
        value: &str,
        reason: &str,
    ) -> Result<Vec<Invocation>> {
        let sql = format!(
            "UPDATE invocations SET status = 'cancelled', error = $3, updated_at = $4, version = version + 1
             WHERE tenant_id = $1 AND {} = $2 AND status IN ('pending', 'running')
             RETURNING {INVOCATION_COLS}",
            column.column()
        );
        let rows: Vec<InvocationRow> = tx!(self, c => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(tenant.to_string()).bind(value).bind(reason).bind(now_micros()).fetch_all(c).await)?;
        rows.into_iter().map(invocation_from_row).collect()
    }

    /// Time out open invocations past their deadline.
    pub async fn time_out_invocations(&mut self, limit: i64) -> Result<Vec<Invocation>> {
        let now = now_micros();
        let sql = format!(
            "UPDATE invocations SET status = 'timed_out', error = 'deadline passed', updated_at = $1, version = version + 1
             WHERE id IN (SELECT id FROM invocations WHERE status IN ('pending', 'running') AND deadline_at <= $1 LIMIT $2)
               AND status IN ('pending', 'running')
             RETURNING {INVOCATION_COLS}"
        );
        let rows: Vec<InvocationRow> = tx!(self, c => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(now).bind(limit).fetch_all(c).await)?;
        rows.into_iter().map(invocation_from_row).collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvocationLink {
    CallerSession,
    CallerAgent,
    Target,
    Tenant,
}

impl InvocationLink {
    fn column(self) -> &'static str {
        match self {
            InvocationLink::CallerSession => "caller_session",
            InvocationLink::CallerAgent => "caller_agent",
            InvocationLink::Target => "target",
            InvocationLink::Tenant => "tenant_id",
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct InvocationFilter {
    pub status: Option<InvocationStatus>,
    pub target: Option<AgentId>,
    pub caller: Option<AgentId>,
}

impl Store {
    pub async fn invocation(&self, tenant: TenantId, id: InvocationId) -> Result<Invocation> {
        let sql = format!("SELECT {INVOCATION_COLS} FROM invocations WHERE tenant_id = $1 AND id = $2");
        let row: Option<InvocationRow> = read!(self, p => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(tenant.to_string()).bind(id.to_string()).fetch_optional(p).await)?;
        row.map(invocation_from_row)
            .transpose()?
            .ok_or_else(|| Error::not_found("invocation"))
    }

    pub async fn invocations(
        &self,
        tenant: TenantId,
        f: &InvocationFilter,
        cursor: &Cursor,
    ) -> Result<Page<Invocation>> {
        let sql = format!(
            "SELECT {INVOCATION_COLS} FROM invocations WHERE tenant_id = $1 AND id > $2
               AND ($3 = '' OR status = $3) AND ($4 = '' OR target = $4) AND ($5 = '' OR caller_agent = $5)
             ORDER BY id LIMIT $6"
        );
        let rows: Vec<InvocationRow> = read!(self, p => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(tenant.to_string()).bind(cursor.after_str())
            .bind(f.status.map(|s| s.as_str()).unwrap_or(""))
            .bind(f.target.map(|a| a.to_string()).unwrap_or_default())
            .bind(f.caller.map(|a| a.to_string()).unwrap_or_default())
            .bind(cursor.fetch_limit()).fetch_all(p).await)?;
        let items = rows.into_iter().map(invocation_from_row).collect::<Result<Vec<_>>>()?;
        Ok(Page::from_rows(items, cursor, |i| i.id.to_string()))
    }
}

// ---------------------------------------------------------------- tenant limits

/// A tenant's own limits; `None` falls back to the configured default.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TenantLimits {
    pub max_active_sessions: Option<i64>,
    pub max_leases: Option<i64>,
    pub max_open_invocations: Option<i64>,
}

impl Tx {
    pub async fn put_tenant_limits(&mut self, tenant: TenantId, l: &TenantLimits) -> Result<()> {
        tx_exec!(self, sqlx::query(
            "INSERT INTO tenant_limits (tenant_id, max_active_sessions, max_leases, max_open_invocations, updated_at)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (tenant_id) DO UPDATE SET max_active_sessions = excluded.max_active_sessions,
               max_leases = excluded.max_leases, max_open_invocations = excluded.max_open_invocations, updated_at = excluded.updated_at")
            .bind(tenant.to_string()).bind(l.max_active_sessions).bind(l.max_leases).bind(l.max_open_invocations).bind(now_micros()))?;
        Ok(())
    }
}

impl Store {
    pub async fn tenant_limits(&self, tenant: TenantId) -> Result<TenantLimits> {
        let row: Option<(Option<i64>, Option<i64>, Option<i64>)> = read!(self, p => sqlx::query_as(
            "SELECT max_active_sessions, max_leases, max_open_invocations FROM tenant_limits WHERE tenant_id = $1")
            .bind(tenant.to_string()).fetch_optional(p).await)?;
        Ok(row
            .map(|r| TenantLimits {
                max_active_sessions: r.0,
                max_leases: r.1,
                max_open_invocations: r.2,
            })
            .unwrap_or_default())
    }
}

// ---------------------------------------------------------------- delegation edges (cascades)

/// Columns a cascade may follow from a revoked node to the delegations it made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DelegationLink {
    Id,
    ParentMandate,
    ParentAgent,
    ParentSession,
}

impl DelegationLink {
    fn column(self) -> &'static str {
        match self {
            DelegationLink::Id => "id",
            DelegationLink::ParentMandate => "parent_mandate",
            DelegationLink::ParentAgent => "parent_agent",
            DelegationLink::ParentSession => "parent_session",
        }
    }
}

impl Tx {
    /// Delegation edges (still able to matter: their child mandate has not expired).
    pub async fn delegations_by(
        &mut self,
        tenant: TenantId,
        link: DelegationLink,
        value: &str,
    ) -> Result<Vec<crate::store::authority::Delegation>> {
        let sql = format!(
            "SELECT {} FROM delegations WHERE tenant_id = $1 AND {} = $2 AND expires_at > $3 ORDER BY id",
            crate::store::authority::DELEGATION_COLS,
            link.column()
        );
        let rows: Vec<crate::store::authority::DelegationRow> = tx!(self, c => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(tenant.to_string()).bind(value).bind(now_micros()).fetch_all(c).await)?;
        rows.into_iter()
            .map(crate::store::authority::delegation_from_row)
            .collect()
    }
}

impl Tx {
    /// A delegation edge by id, expired or not.
    pub async fn delegations_by_any(
        &mut self,
        tenant: TenantId,
        id: crate::ids::DelegationId,
    ) -> Result<Option<crate::store::authority::Delegation>> {
        let sql = format!(
            "SELECT {} FROM delegations WHERE tenant_id = $1 AND id = $2",
            crate::store::authority::DELEGATION_COLS
        );
        let row: Option<crate::store::authority::DelegationRow> = tx!(self, c => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(tenant.to_string()).bind(id.to_string()).fetch_optional(c).await)?;
        row.map(crate::store::authority::delegation_from_row).transpose()
    }
}
