//! Invocations: one agent asking another to do work.
//! `pending → running → succeeded | failed | cancelled | timed_out`, and `running → pending`
//! when a retryable failure has attempts left (after `backoff × 2^(attempt-1)`). Deadlines are
//! enforced by the sweeper; an idempotency key makes a repeated create return the first
//! invocation.

use std::sync::Arc;

use caracal_shared::error::{Error, ErrorCode, Result};
use caracal_shared::http::{ApiRequest, Response, created, json_response, ok};
use caracal_shared::ids::{AgentId, InvocationId, SessionId};
use caracal_shared::store::Cursor;
use caracal_shared::store::admin::AdminScope;
use caracal_shared::store::agents::Agent;
use caracal_shared::store::coordination::{
    Invocation, InvocationFilter, InvocationStatus as St, SessionStatus, retry_delay_ms,
};
use caracal_shared::time::now_micros;
use http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::State;
use crate::auth::Principal;
use crate::events::emit;

type S = Arc<State>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    target: AgentId,
    operation: String,
    #[serde(default)]
    input: Value,
    deadline_seconds: Option<i64>,
    max_attempts: Option<i64>,
    backoff_ms: Option<i64>,
    idempotency_key: Option<String>,
    session_id: Option<SessionId>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClaimBody {
    worker: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CompleteBody {
    worker: String,
    #[serde(default)]
    result: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FailBody {
    worker: String,
    error: String,
    #[serde(default)]
    retryable: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CancelBody {
    reason: Option<String>,
}

const MAX_INPUT: usize = 256 * 1024;

pub async fn create(s: S, mut r: ApiRequest) -> Result<Response> {
    let p = s.principal(&r, AdminScope::Write).await?;
    let m = p.agent()?;
    let header_key = r.header_str("idempotency-key").map(str::to_string);
    let b: CreateBody = r.json().await?;
    let cfg = &s.rt.config.coordinator;
    if b.operation.is_empty() || b.operation.len() > 200 {
        return Err(Error::validation("operation must be 1-200 characters"));
    }
    if b.input.to_string().len() > MAX_INPUT {
        return Err(Error::validation(format!("input is at most {MAX_INPUT} bytes of JSON")));
    }
    let deadline = b.deadline_seconds.unwrap_or(300);
    if deadline < 1 || deadline as u64 > cfg.max_invocation_deadline.as_secs() {
        return Err(Error::validation(format!(
            "deadline_seconds must be between 1 and {}",
            cfg.max_invocation_deadline.as_secs()
        )));
    }
    let max_attempts = b.max_attempts.unwrap_or(1);
    if max_attempts < 1 || max_attempts > cfg.max_invocation_attempts as i64 {
        return Err(Error::validation(format!(
            "max_attempts must be between 1 and {}",
            cfg.max_invocation_attempts
        )));
    }
    let backoff = b.backoff_ms.unwrap_or(1000);
    if !(0..=3_600_000).contains(&backoff) {
        return Err(Error::validation("backoff_ms must be between 0 and 3600000"));
    }
    let key = match (b.idempotency_key, header_key) {
        (Some(a), Some(h)) if a != h => {
            return Err(Error::validation(
                "the Idempotency-Key header and idempotency_key differ",
            ));
        }
        (a, h) => a.or(h),
    };
    if key.as_ref().is_some_and(|k| k.is_empty() || k.len() > 200) {
        return Err(Error::validation("an idempotency key is 1-200 characters"));
    }
    let c = &m.claims;
    let t = c.tenant;
    let session = b.session_id.or(c.session);
    let target: Agent = s.rt.store.get(t, &b.target.to_string()).await.map_err(|e| {
        if e.code == ErrorCode::NotFound {
            Error::not_found("target agent")
        } else {
            e
        }
    })?;
    if target.disabled {
        return Err(Error::new(ErrorCode::Conflict, "the target agent is disabled"));
    }
    if let Some(sid) = session {
        let sess = s.rt.store.session(t, sid).await?;
        if sess.agent_id != c.agent {
            return Err(Error::not_found("session"));
        }
        let st = sess.effective_status(now_micros());
        if st != SessionStatus::Active {
            return Err(
                Error::new(ErrorCode::InvalidTransition, format!("the session is {}", st.as_str()))
                    .with_details(json!({ "status": st.as_str(), "session_id": sid })),
            );
        }
    }
    let max_open =
        s.rt.store
            .tenant_limits(t)
            .await?
            .max_open_invocations
            .unwrap_or(cfg.max_open_invocations as i64);
    let now = now_micros();
    let inv = Invocation {
        id: InvocationId::new(),
        tenant_id: t,
        caller_agent: c.agent,
        caller_session: session,
        target: b.target,
        operation: b.operation,
        input: b.input,
        status: St::Pending,
        attempt: 0,
        max_attempts,
        backoff_ms: backoff,
        deadline_at: now + deadline * 1_000_000,
        next_attempt_at: now,
        worker: None,
        result: None,
        error: None,
        idempotency_key: key,
        created_at: now,
        updated_at: now,
        version: 1,
    };
    let mut tx = s.rt.store.begin().await?;
    if tx.count_open_invocations(t).await? >= max_open {
        return Err(crate::sessions::limit_error("open invocations", max_open));
    }
    let (inv, fresh) = tx.create_invocation(&inv).await?;
    if fresh {
        emit(&mut tx, "invocation.created", t, &inv, &p.actor()).await?;
    }
    tx.commit().await?;
    if fresh {
        created(&inv)
    } else {
        Ok(json_response(StatusCode::OK, &inv))
    }
}

/// A worker of the target agent takes the next due invocation (204 when none).
pub async fn claim(s: S, mut r: ApiRequest) -> Result<Response> {
    let p = s.principal(&r, AdminScope::Write).await?;
    let m = p.agent()?;
    let b: ClaimBody = r.json().await?;
    if b.worker.is_empty() || b.worker.len() > 200 {
        return Err(Error::validation("worker must be 1-200 characters"));
    }
    let mut tx = s.rt.store.begin().await?;
    let got = tx.claim_invocation(m.claims.tenant, m.claims.agent, &b.worker).await?;
    let Some(inv) = got else {
        tx.rollback().await?;
        return caracal_shared::http::no_content();
    };
    emit(&mut tx, "invocation.running", inv.tenant_id, &inv, &p.actor()).await?;
    tx.commit().await?;
    ok(&inv)
}

/// Load an invocation the caller may act on: its target agent (`worker_side`), or its caller /
/// an operator.
async fn load(s: &State, p: &Principal, r: &ApiRequest, worker_side: bool) -> Result<Invocation> {
    let id = InvocationId::parse(r.param("invocation_id")?)?;
    let inv = s.rt.store.invocation(p.tenant()?, id).await?;
    match p.agent_id() {
        Some(a) if a == inv.target || (!worker_side && a == inv.caller_agent) => Ok(inv),
        Some(_) => Err(Error::not_found("invocation")),
        None if worker_side => Err(Error::forbidden("only the target agent's workers report results")),
        None => Ok(inv),
    }
}

pub async fn complete(s: S, mut r: ApiRequest) -> Result<Response> {
    let p = s.principal(&r, AdminScope::Write).await?;
    let inv = load(&s, &p, &r, true).await?;
    let b: CompleteBody = r.json().await?;
    if b.result.to_string().len() > MAX_INPUT {
        return Err(Error::validation(format!(
            "result is at most {MAX_INPUT} bytes of JSON"
        )));
    }
    let mut tx = s.rt.store.begin().await?;
    let inv = tx
        .transition_invocation(
            inv.tenant_id,
            inv.id,
            &[St::Running],
            St::Succeeded,
            Some(&b.worker),
            Some(&b.result),
            None,
            None,
        )
        .await?;
    emit(&mut tx, "invocation.succeeded", inv.tenant_id, &inv, &p.actor()).await?;
    tx.commit().await?;
    ok(&inv)
}

pub async fn fail(s: S, mut r: ApiRequest) -> Result<Response> {
    let p = s.principal(&r, AdminScope::Write).await?;
    let inv = load(&s, &p, &r, true).await?;
    let b: FailBody = r.json().await?;
    if b.error.is_empty() || b.error.len() > 4000 {
        return Err(Error::validation("error must be 1-4000 characters"));
    }
    let now = now_micros();
    let next = now + retry_delay_ms(inv.backoff_ms, inv.attempt.max(1)) * 1000;
    let retry = b.retryable && inv.attempt < inv.max_attempts && next < inv.deadline_at;
    let (to, next_at) = if retry {
        (St::Pending, Some(next))
    } else {
        (St::Failed, None)
    };
    let mut tx = s.rt.store.begin().await?;
    let inv = tx
        .transition_invocation(
            inv.tenant_id,
            inv.id,
            &[St::Running],
            to,
            Some(&b.worker),
            None,
            Some(&b.error),
            next_at,
        )
        .await?;
    let kind = if retry {
        "invocation.retrying"
    } else {
        "invocation.failed"
    };
    emit(&mut tx, kind, inv.tenant_id, &inv, &p.actor()).await?;
    tx.commit().await?;
    ok(&inv)
}

pub async fn cancel(s: S, mut r: ApiRequest) -> Result<Response> {
    let p = s.principal(&r, AdminScope::Write).await?;
    let inv = load(&s, &p, &r, false).await?;
    if p.agent_id().is_some_and(|a| a != inv.caller_agent) {
        return Err(Error::forbidden(
            "only the caller (or an operator) cancels an invocation",
        ));
    }
    let b: CancelBody = crate::api::body(&mut r).await?;
    let reason = b.reason.unwrap_or_else(|| "cancelled".into());
    let mut tx = s.rt.store.begin().await?;
    let inv = tx
        .transition_invocation(
            inv.tenant_id,
            inv.id,
            &[St::Pending, St::Running],
            St::Cancelled,
            None,
            None,
            Some(&reason),
            None,
        )
        .await?;
    emit(&mut tx, "invocation.cancelled", inv.tenant_id, &inv, &p.actor()).await?;
    tx.commit().await?;
    ok(&inv)
}

pub async fn get(s: S, r: ApiRequest) -> Result<Response> {
    let p = s.principal(&r, AdminScope::Read).await?;
    ok(&load(&s, &p, &r, false).await?)
}

pub async fn list(s: S, r: ApiRequest) -> Result<Response> {
    let p = s.principal(&r, AdminScope::Read).await?;
    let t = p.tenant()?;
    let mut f = InvocationFilter {
        status: r.query_param("status").as_deref().map(St::parse).transpose()?,
        target: r.query_param("target").as_deref().map(AgentId::parse).transpose()?,
        caller: r.query_param("caller").as_deref().map(AgentId::parse).transpose()?,
    };
    if let Some(a) = p.agent_id()
        && f.target != Some(a)
    {
        f.caller = Some(a);
    }
    let cursor = Cursor::parse(r.query_param("cursor").as_deref(), r.query_param("limit").as_deref())?;
    ok(&s.rt.store.invocations(t, &f, &cursor).await?)
}
