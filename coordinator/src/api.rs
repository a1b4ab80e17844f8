//! Routes of the coordinator API (`/v1/…`), the bulk revocation and tenant-limit handlers,
//! and request-body helpers.

use std::sync::Arc;

use caracal_shared::error::{Error, ErrorCode, Result};
use caracal_shared::http::{ApiRequest, Response, Router, ok, parse_json};
use caracal_shared::store::admin::AdminScope;
use caracal_shared::store::coordination::TenantLimits;
use http::header;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::cascade::{self, Target};
use crate::{State, invocations as inv, leases, sessions};

type S = Arc<State>;

/// An optional JSON body: empty means `T::default()`; otherwise `application/json`.
pub async fn body<T: DeserializeOwned + Default>(r: &mut ApiRequest) -> Result<T> {
    let is_json = r
        .header_str(header::CONTENT_TYPE)
        .map(|ct| {
            let m = ct.split(';').next().unwrap_or("").trim();
            m.eq_ignore_ascii_case("application/json") || m.ends_with("+json")
        })
        .unwrap_or(false);
    let b = r.body_bytes().await?;
    if b.is_empty() {
        return Ok(T::default());
    }
    if !is_json {
        return Err(Error::new(
            ErrorCode::UnsupportedMediaType,
            "expected Content-Type: application/json",
        ));
    }
    parse_json(&b)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    /// One target …
    kind: Option<cascade::TargetKind>,
    value: Option<String>,
    /// … or several (the bulk form).
    targets: Option<Vec<Target>>,
    reason: String,
}

/// `POST /v1/revocations`: revoke targets and everything they started (operators).
async fn revoke(s: S, mut r: ApiRequest) -> Result<Response> {
    let c = s.operator(&r, AdminScope::Write).await?;
    let t = c.tenant()?;
    let b: RevokeBody = r.json().await?;
    let targets = match (b.kind, b.value, b.targets) {
        (Some(kind), Some(value), None) => vec![Target { kind, value }],
        (None, None, Some(ts)) => ts,
        _ => {
            return Err(Error::validation(
                "name either kind and value, or targets (a list of {kind, value})",
            ));
        }
    };
    let out = cascade::run(&s, t, &targets, &b.reason, &c.actor()).await?;
    ok(&out)
}

async fn get_limits(s: S, r: ApiRequest) -> Result<Response> {
    let c = s.operator(&r, AdminScope::Read).await?;
    let t = c.tenant()?;
    let own = s.rt.store.tenant_limits(t).await?;
    let cfg = &s.rt.config.coordinator;
    ok(&json!({
        "max_active_sessions": own.max_active_sessions.unwrap_or(cfg.max_active_sessions as i64),
        "max_leases": own.max_leases.unwrap_or(cfg.max_leases as i64),
        "max_open_invocations": own.max_open_invocations.unwrap_or(cfg.max_open_invocations as i64),
        "overrides": own,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsBody {
    max_active_sessions: Option<i64>,
    max_leases: Option<i64>,
    max_open_invocations: Option<i64>,
}

async fn put_limits(s: S, mut r: ApiRequest) -> Result<Response> {
    let c = s.operator(&r, AdminScope::Write).await?;
    let t = c.tenant()?;
    let b: LimitsBody = r.json().await?;
    for v in [b.max_active_sessions, b.max_leases, b.max_open_invocations]
        .into_iter()
        .flatten()
    {
        if !(0..=100_000_000).contains(&v) {
            return Err(Error::validation("limits are between 0 and 100000000"));
        }
    }
    let l = TenantLimits {
        max_active_sessions: b.max_active_sessions,
        max_leases: b.max_leases,
        max_open_invocations: b.max_open_invocations,
    };
    let mut tx = s.rt.store.begin().await?;
    tx.put_tenant_limits(t, &l).await?;
    crate::events::emit(&mut tx, "limits.updated", t, &l, &c.actor()).await?;
    tx.commit().await?;
    get_limits(s, r).await
}

async fn openapi_doc(_s: S, _r: ApiRequest) -> Result<Response> {
    ok(&crate::openapi::document())
}

pub fn router() -> Router<State> {
    Router::new()
        .get("/v1/openapi.json", openapi_doc)
        .post("/v1/sessions", sessions::start)
        .get("/v1/sessions", sessions::list)
        .get("/v1/sessions/{session_id}", sessions::get)
        .post("/v1/sessions/{session_id}/heartbeat", sessions::heartbeat)
        .post("/v1/sessions/{session_id}/complete", sessions::complete)
        .post("/v1/sessions/{session_id}/fail", sessions::fail)
        .post("/v1/sessions/{session_id}/revoke", sessions::revoke)
        .get("/v1/leases", leases::list)
        .get("/v1/leases/{name}", leases::get)
        .post("/v1/leases/{name}/acquire", leases::acquire)
        .post("/v1/leases/{name}/renew", leases::renew)
        .post("/v1/leases/{name}/release", leases::release)
        .post("/v1/leases/{name}/check", leases::check)
        .post("/v1/invocations", inv::create)
        .get("/v1/invocations", inv::list)
        .post("/v1/invocations/claim", inv::claim)
        .get("/v1/invocations/{invocation_id}", inv::get)
        .post("/v1/invocations/{invocation_id}/complete", inv::complete)
        .post("/v1/invocations/{invocation_id}/fail", inv::fail)
        .post("/v1/invocations/{invocation_id}/cancel", inv::cancel)
        .post("/v1/revocations", revoke)
        .get("/v1/limits", get_limits)
        .put("/v1/limits", put_limits)
}
