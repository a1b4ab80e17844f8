//! Service leases: a long-running agent service holds a named lease with a TTL and renews it.
//! Every acquisition by a new holder increments the lease's **fencing generation**; the
//! holder passes its generation with its writes, and `check` (or any renew/release) refuses a
//! stale generation with 409 `lease_fenced` once another instance has taken over. An expired
//! lease answers 410 `lease_expired` to its old holder, and is swept (`lease.expired`).

use std::sync::Arc;

use caracal_shared::error::{Error, Result};
use caracal_shared::http::{ApiRequest, Response, ok};
use caracal_shared::store::Cursor;
use caracal_shared::store::admin::AdminScope;
use caracal_shared::store::coordination::validate_lease_name;
use serde::Deserialize;
use serde_json::json;

use crate::State;
use crate::events::emit;

type S = Arc<State>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AcquireBody {
    holder: String,
    ttl_seconds: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HolderBody {
    holder: String,
    generation: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckBody {
    generation: i64,
}

fn validate_holder(h: &str) -> Result<()> {
    if h.is_empty() || h.len() > 200 {
        return Err(Error::validation("holder must be 1-200 characters"));
    }
    Ok(())
}

pub async fn acquire(s: S, mut r: ApiRequest) -> Result<Response> {
    let p = s.principal(&r, AdminScope::Write).await?;
    let m = p.agent()?;
    let name = r.param("name")?.to_string();
    validate_lease_name(&name)?;
    let b: AcquireBody = r.json().await?;
    validate_holder(&b.holder)?;
    let cfg = &s.rt.config.coordinator;
    let ttl_ms = match b.ttl_seconds {
        None => 30_000,
        Some(t) if t >= 0.1 && t <= cfg.max_lease_ttl.as_secs_f64() => (t * 1000.0) as i64,
        Some(_) => {
            return Err(Error::validation(format!(
                "ttl_seconds must be between 0.1 and {}",
                cfg.max_lease_ttl.as_secs()
            )));
        }
    };
    let t = m.claims.tenant;
    let max =
        s.rt.store
            .tenant_limits(t)
            .await?
            .max_leases
            .unwrap_or(cfg.max_leases as i64);
    let mut tx = s.rt.store.begin().await?;
    let live = tx.count_live_leases(t).await?;
    if live >= max {
        let held_here = tx
            .lease(t, &name)
            .await
            .ok()
            .is_some_and(|l| l.is_live(caracal_shared::time::now_micros()));
        if !held_here {
            return Err(crate::sessions::limit_error("leases", max));
        }
    }
    let (lease, fresh) = tx.acquire_lease(t, &name, m.claims.agent, &b.holder, ttl_ms).await?;
    if fresh {
        emit(&mut tx, "lease.acquired", t, &lease, &p.actor()).await?;
    }
    tx.commit().await?;
    ok(&lease)
}

pub async fn renew(s: S, mut r: ApiRequest) -> Result<Response> {
    let p = s.principal(&r, AdminScope::Write).await?;
    let t = p.agent()?.claims.tenant;
    let name = r.param("name")?.to_string();
    let b: HolderBody = r.json().await?;
    let mut tx = s.rt.store.begin().await?;
    let lease = tx.renew_lease(t, &name, &b.holder, b.generation).await?;
    tx.commit().await?;
    ok(&lease)
}

pub async fn release(s: S, mut r: ApiRequest) -> Result<Response> {
    let p = s.principal(&r, AdminScope::Write).await?;
    let t = p.agent()?.claims.tenant;
    let name = r.param("name")?.to_string();
    let b: HolderBody = r.json().await?;
    let mut tx = s.rt.store.begin().await?;
    let lease = tx.release_lease(t, &name, &b.holder, b.generation).await?;
    emit(&mut tx, "lease.released", t, &lease, &p.actor()).await?;
    tx.commit().await?;
    ok(&lease)
}

/// Fence check: 200 while `generation` is the live lease's, 409/410 otherwise.
pub async fn check(s: S, mut r: ApiRequest) -> Result<Response> {
    let p = s.principal(&r, AdminScope::Read).await?;
    let t = p.tenant()?;
    let name = r.param("name")?.to_string();
    let b: CheckBody = r.json().await?;
    let mut tx = s.rt.store.begin().await?;
    let lease = tx.check_lease(t, &name, b.generation).await?;
    tx.rollback().await?;
    ok(
        &json!({ "name": lease.name, "generation": lease.generation, "holder": lease.holder, "expires_at": lease.expires_at }),
    )
}

pub async fn get(s: S, r: ApiRequest) -> Result<Response> {
    let p = s.principal(&r, AdminScope::Read).await?;
    ok(&s.rt.store.lease(p.tenant()?, r.param("name")?).await?)
}

pub async fn list(s: S, r: ApiRequest) -> Result<Response> {
    let p = s.principal(&r, AdminScope::Read).await?;
    let cursor = Cursor::parse(r.query_param("cursor").as_deref(), r.query_param("limit").as_deref())?;
    ok(&s.rt.store.leases(p.tenant()?, &cursor).await?)
}
