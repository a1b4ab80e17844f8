//! Agent sessions: `active → completed | failed | expired | revoked`.
//!
//! A session is started by an agent with its mandate; it lives until it is ended, its lifetime
//! passes, or it misses its heartbeat. When a session ends, mandates bound to it (minted with
//! `session_id`) stop working everywhere: the end records a `session` revocation.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use caracal_shared::error::{Error, ErrorCode, Result};
use caracal_shared::http::{ApiRequest, Response, created, ok};
use caracal_shared::ids::{AgentId, SessionId, TenantId};
use caracal_shared::store::Cursor;
use caracal_shared::store::Tx;
use caracal_shared::store::admin::AdminScope;
use caracal_shared::store::authority::{Revocation, RevocationKind};
use caracal_shared::store::coordination::{Session, SessionFilter, SessionStatus};
use caracal_shared::time::now_micros;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::State;
use crate::auth::Principal;
use crate::events::emit;

type S = Arc<State>;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StartBody {
    ttl_seconds: Option<i64>,
    heartbeat_timeout_seconds: Option<i64>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    parent_session: Option<SessionId>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct EndBody {
    reason: Option<String>,
}

fn secs(what: &str, v: Option<i64>, default: Duration, max: Duration) -> Result<i64> {
    match v {
        None => Ok(default.as_secs() as i64),
        Some(s) if s >= 1 && s as u64 <= max.as_secs() => Ok(s),
        Some(_) => Err(Error::validation(format!(
            "{what} must be between 1 and {}",
            max.as_secs()
        ))),
    }
}

pub fn limit_error(what: &str, limit: i64) -> Error {
    Error::new(
        ErrorCode::LimitExceeded,
        format!("the tenant's limit of {limit} {what} is reached"),
    )
    .with_details(json!({ "limit": limit, "what": what }))
}

/// Start a session for the calling agent.
pub async fn start(s: S, mut r: ApiRequest) -> Result<Response> {
    let p = s.principal(&r, AdminScope::Write).await?;
    let m = p.agent()?;
    let body: StartBody = crate::api::body(&mut r).await?;
    let cfg = &s.rt.config.coordinator;
    let ttl = secs("ttl_seconds", body.ttl_seconds, cfg.session_ttl, cfg.max_session_ttl)?;
    let hb = secs(
        "heartbeat_timeout_seconds",
        body.heartbeat_timeout_seconds,
        cfg.heartbeat_timeout.min(Duration::from_secs(ttl as u64)),
        cfg.max_session_ttl,
    )?;
    caracal_shared::store::agents::validate_labels(&body.labels)?;
    let c = &m.claims;
    let t = c.tenant;
    let parent = body.parent_session.or(c.session);
    let limits = s.rt.store.tenant_limits(t).await?;
    let max = limits.max_active_sessions.unwrap_or(cfg.max_active_sessions as i64);

    let mut tx = s.rt.store.begin().await?;
    if let Some(pid) = parent {
        let ps = tx.session(t, pid).await.map_err(|e| {
            if e.code == ErrorCode::NotFound {
                Error::not_found("parent session")
            } else {
                e
            }
        })?;
        let related = c.session == Some(pid)
            || ps.agent_id == c.agent
            || c.parent == Some(ps.mandate_id)
            || ps.revocation_ids.iter().any(|id| c.ancestors.contains(id));
        if !related {
            return Err(Error::forbidden(
                "the parent session is neither this agent's nor the one its mandate descends from",
            ));
        }
        let st = ps.effective_status(now_micros());
        if st != SessionStatus::Active {
            return Err(Error::new(
                ErrorCode::InvalidTransition,
                format!("the parent session is {}", st.as_str()),
            )
            .with_details(json!({ "status": st.as_str(), "session_id": pid })));
        }
    }
    let n = tx.count_active_sessions(t).await?;
    if n >= max {
        return Err(limit_error("active sessions", max));
    }
    let now = now_micros();
    let sess = Session {
        id: SessionId::new(),
        tenant_id: t,
        agent_id: c.agent,
        mandate_id: c.mandate_id,
        credential: c.credential.clone(),
        revocation_ids: m.revocation_ids.clone(),
        parent_session: parent,
        status: SessionStatus::Active,
        labels: body.labels,
        started_at: now,
        heartbeat_at: now,
        heartbeat_timeout_ms: hb * 1000,
        expires_at: now + ttl * 1_000_000,
        ended_at: None,
        end_reason: None,
        version: 1,
    };
    tx.insert_session(&sess).await?;
    emit(&mut tx, "session.started", t, &sess, &p.actor()).await?;
    tx.commit().await?;
    created(&sess)
}

/// Load a session the caller may see: operators of its tenant, or its own agent.
async fn visible(s: &State, p: &Principal, id: SessionId) -> Result<Session> {
    let t = p.tenant()?;
    let sess = s.rt.store.session(t, id).await?;
    if let Some(a) = p.agent_id()
        && a != sess.agent_id
    {
        return Err(Error::not_found("session"));
    }
    Ok(sess)
}

pub async fn get(s: S, r: ApiRequest) -> Result<Response> {
    let p = s.principal(&r, AdminScope::Read).await?;
    let id = SessionId::parse(r.param("session_id")?)?;
    let mut sess = visible(&s, &p, id).await?;
    sess.status = sess.effective_status(now_micros());
    ok(&sess)
}

pub async fn list(s: S, r: ApiRequest) -> Result<Response> {
    let p = s.principal(&r, AdminScope::Read).await?;
    let t = p.tenant()?;
    let mut f = SessionFilter {
        status: r
            .query_param("status")
            .as_deref()
            .map(SessionStatus::parse)
            .transpose()?,
        agent: r.query_param("agent_id").as_deref().map(AgentId::parse).transpose()?,
        parent: r
            .query_param("parent_session")
            .as_deref()
            .map(SessionId::parse)
            .transpose()?,
    };
    if let Some(a) = p.agent_id() {
        f.agent = Some(a);
    }
    let cursor = Cursor::parse(r.query_param("cursor").as_deref(), r.query_param("limit").as_deref())?;
    ok(&s.rt.store.sessions(t, &f, &cursor).await?)
}

pub async fn heartbeat(s: S, r: ApiRequest) -> Result<Response> {
    let p = s.principal(&r, AdminScope::Write).await?;
    let m = p.agent()?;
    let id = SessionId::parse(r.param("session_id")?)?;
    let t = m.claims.tenant;
    visible(&s, &p, id).await?;
    let mut tx = s.rt.store.begin().await?;
    let sess = tx.heartbeat_session(t, id).await?;
    tx.commit().await?;
    ok(&json!({ "id": sess.id, "status": sess.status, "heartbeat_at": sess.heartbeat_at, "deadline": sess.deadline() }))
}

/// End a session (`completed` or `failed`) and revoke mandates bound to it.
async fn end(s: S, mut r: ApiRequest, to: SessionStatus) -> Result<Response> {
    let p = s.principal(&r, AdminScope::Write).await?;
    let id = SessionId::parse(r.param("session_id")?)?;
    let body: EndBody = crate::api::body(&mut r).await?;
    let reason = body.reason.unwrap_or_else(|| to.as_str().to_string());
    if reason.len() > 1000 {
        return Err(Error::validation("reason is at most 1000 characters"));
    }
    let cur = visible(&s, &p, id).await?;
    if cur.status == SessionStatus::Active && cur.effective_status(now_micros()) == SessionStatus::Expired {
        return Err(Error::new(
            ErrorCode::InvalidTransition,
            format!("the session is expired; it cannot become {}", to.as_str()),
        )
        .with_details(json!({ "status": "expired" })));
    }
    let mut tx = s.rt.store.begin().await?;
    let sess = end_in(&mut tx, cur.tenant_id, id, to, &reason, &p.actor()).await?;
    tx.commit().await?;
    ok(&sess)
}

/// The transition to a terminal state with its event and the session revocation.
pub async fn end_in(
    tx: &mut Tx,
    t: TenantId,
    id: SessionId,
    to: SessionStatus,
    reason: &str,
    actor: &Value,
) -> Result<Session> {
    let sess = tx
        .transition_session(t, id, &[SessionStatus::Active], to, Some(reason))
        .await?;
    emit(tx, &format!("session.{}", to.as_str()), t, &sess, actor).await?;
    tx.revoke(&[Revocation::now(
        t,
        RevocationKind::Session,
        id.to_string(),
        format!("session {}", to.as_str()),
    )])
    .await?;
    Ok(sess)
}

pub async fn complete(s: S, r: ApiRequest) -> Result<Response> {
    end(s, r, SessionStatus::Completed).await
}

pub async fn fail(s: S, r: ApiRequest) -> Result<Response> {
    end(s, r, SessionStatus::Failed).await
}

/// Revoke a session and everything it started (operators, or the session's own agent).
pub async fn revoke(s: S, mut r: ApiRequest) -> Result<Response> {
    let p = s.principal(&r, AdminScope::Write).await?;
    let id = SessionId::parse(r.param("session_id")?)?;
    let body: EndBody = crate::api::body(&mut r).await?;
    let sess = visible(&s, &p, id).await?;
    let reason = body.reason.unwrap_or_else(|| "session revoked".into());
    let out = crate::cascade::run(
        &s,
        sess.tenant_id,
        &[crate::cascade::Target {
            kind: crate::cascade::TargetKind::Session,
            value: id.to_string(),
        }],
        &reason,
        &p.actor(),
    )
    .await?;
    ok(&out)
}
