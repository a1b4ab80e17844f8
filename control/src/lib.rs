//! caracal-control: the control-plane API. Tenants, agents and workload credentials,
//! resources with sealed credentials, versioned policies (validate, simulate, activate),
//! grants, budgets, signing keys, admin tokens, declarative bundles, and its OpenAPI document.

pub mod api;
pub mod bundle;
pub mod handlers;
pub mod openapi;
pub mod policies;

use std::path::PathBuf;
use std::sync::Arc;

use caracal_shared::crypto::KeyRing;
use caracal_shared::error::{Error, ErrorCode, Result};
use caracal_shared::http::{ApiRequest, Response, Router, ok};
use caracal_shared::runtime::Runtime;
use caracal_shared::store::admin::AdminScope;
use tokio::net::TcpListener;

/// Service state shared by every request handler.
pub struct State {
    pub rt: Runtime,
    /// Keyed hash for API keys and admin tokens.
    pub pepper: KeyRing,
    /// Key-encryption key for sealed credentials and signing keys.
    pub seal: KeyRing,
    pub secret_dir: Option<PathBuf>,
    /// The shared budget ledger (connected on first use).
    ledger: tokio::sync::OnceCell<Arc<dyn caracal_shared::budget_ledger::BudgetLedger>>,
}

impl State {
    pub fn new(rt: Runtime) -> Result<State> {
        let keys = &rt.config.keys;
        let missing = |k: &str| {
            Error::new(
                ErrorCode::ValidationFailed,
                format!("the control service needs keys.{k}"),
            )
        };
        Ok(State {
            pepper: keys.pepper.clone().ok_or_else(|| missing("pepper"))?,
            seal: keys.seal.clone().ok_or_else(|| missing("seal"))?,
            secret_dir: rt.config.control.secret_dir.clone(),
            ledger: tokio::sync::OnceCell::new(),
            rt,
        })
    }

    /// Spend and reservations counted now for a budget, from the shared ledger the gateways
    /// reserve from.
    pub async fn budget_usage(
        &self,
        b: &caracal_shared::store::admin::Budget,
    ) -> Result<caracal_shared::budget_ledger::LedgerUsage> {
        let ledger = self
            .ledger
            .get_or_try_init(|| caracal_shared::budget_ledger::connect(&self.rt.config.bus))
            .await?;
        let w = caracal_shared::budget_ledger::window_of(b, caracal_shared::time::now_micros());
        ledger.usage(b.id, &w).await
    }
}

async fn apply(s: Arc<State>, mut r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Write).await?;
    let t = c.tenant()?;
    let dry_run = matches!(r.query_param("dry_run").as_deref(), Some("true" | "1"));
    let ct = r.header_str(http::header::CONTENT_TYPE).unwrap_or("").to_string();
    let body = r.body_bytes().await?;
    let b = bundle::parse(&body, &ct)?;
    let (diff, changes, tx) = bundle::apply(&s, t, b, dry_run).await?;
    if let Some(mut tx) = tx {
        s.emit_changes(&mut tx, &c, &r.ctx.request_id, &changes).await?;
        tx.commit().await?;
    }
    ok(&serde_json::json!({ "dry_run": dry_run, "summary": bundle::summary(&diff), "diff": diff }))
}

async fn openapi_doc(_s: Arc<State>, _r: ApiRequest) -> Result<Response> {
    ok(&openapi::document())
}

pub fn router() -> Router<State> {
    use handlers as h;
    use policies as p;
    Router::new()
        .get("/v1/openapi.json", openapi_doc)
        .post("/v1/tenants", h::create_tenant)
        .get("/v1/tenants", h::list_tenants)
        .get("/v1/tenants/{tenant_id}", h::get_tenant)
        .patch("/v1/tenants/{tenant_id}", h::patch_tenant)
        .delete("/v1/tenants/{tenant_id}", h::delete_tenant)
        .post("/v1/agents", h::create_agent)
        .get("/v1/agents", h::list_agents)
        .get("/v1/agents/{agent_id}", h::get_agent)
        .patch("/v1/agents/{agent_id}", h::patch_agent)
        .delete("/v1/agents/{agent_id}", h::delete_agent)
        .post("/v1/agents/{agent_id}/api-keys", h::issue_api_key)
        .get("/v1/agents/{agent_id}/api-keys", h::list_api_keys)
        .delete("/v1/agents/{agent_id}/api-keys/{key_id}", h::revoke_api_key)
        .post("/v1/agents/{agent_id}/api-keys/{key_id}/rotate", h::rotate_api_key)
        .post("/v1/agents/{agent_id}/identities", h::create_identity)
        .get("/v1/agents/{agent_id}/identities", h::list_identities)
        .delete("/v1/agents/{agent_id}/identities/{identity_id}", h::delete_identity)
        .post("/v1/jwt-issuers", h::create_issuer)
        .get("/v1/jwt-issuers", h::list_issuers)
        .get("/v1/jwt-issuers/{issuer_id}", h::get_issuer)
        .patch("/v1/jwt-issuers/{issuer_id}", h::patch_issuer)
        .delete("/v1/jwt-issuers/{issuer_id}", h::delete_issuer)
        .post("/v1/mtls-cas", h::create_ca)
        .get("/v1/mtls-cas", h::list_cas)
        .get("/v1/mtls-cas/{ca_id}", h::get_ca)
        .delete("/v1/mtls-cas/{ca_id}", h::delete_ca)
        .post("/v1/resources", h::create_resource)
        .get("/v1/resources", h::list_resources)
        .get("/v1/resources/{resource_id}", h::get_resource)
        .patch("/v1/resources/{resource_id}", h::patch_resource)
        .delete("/v1/resources/{resource_id}", h::delete_resource)
        .put("/v1/resources/{resource_id}/credential", h::put_credential)
        .delete("/v1/resources/{resource_id}/credential", h::delete_credential)
        .post("/v1/policies", p::create)
        .get("/v1/policies", p::list)
        .post("/v1/policies/validate", p::validate)
        .get("/v1/policies/{policy_id}", p::get)
        .patch("/v1/policies/{policy_id}", p::patch)
        .delete("/v1/policies/{policy_id}", p::delete)
        .post("/v1/policies/{policy_id}/versions", p::add_version)
        .get("/v1/policies/{policy_id}/versions", p::list_versions)
        .get("/v1/policies/{policy_id}/versions/{version}", p::get_version)
        .post("/v1/policies/{policy_id}/versions/{version}/activate", p::activate)
        .post("/v1/policies/{policy_id}/simulate", p::simulate)
        .post("/v1/grants", h::create_grant)
        .get("/v1/grants", h::list_grants)
        .get("/v1/grants/{grant_id}", h::get_grant)
        .patch("/v1/grants/{grant_id}", h::patch_grant)
        .delete("/v1/grants/{grant_id}", h::delete_grant)
        .post("/v1/budgets", h::create_budget)
        .get("/v1/budgets", h::list_budgets)
        .get("/v1/budgets/{budget_id}", h::get_budget)
        .patch("/v1/budgets/{budget_id}", h::patch_budget)
        .delete("/v1/budgets/{budget_id}", h::delete_budget)
        .get("/v1/keys", h::list_keys)
        .post("/v1/keys/rotate", h::rotate_keys)
        .post("/v1/admin-tokens", h::create_token)
        .get("/v1/admin-tokens", h::list_tokens)
        .delete("/v1/admin-tokens/{token_id}", h::revoke_token)
        .post("/v1/apply", apply)
        .get("/v1/approvals", h::list_approvals)
        .get("/v1/approvals/{approval_id}", h::get_approval)
        .post("/v1/approvals/{approval_id}/approve", h::approve)
        .post("/v1/approvals/{approval_id}/deny", h::deny)
}

/// Serve until the runtime's shutdown is triggered, then drain.
pub async fn serve(rt: Runtime, listener: TcpListener) -> std::io::Result<()> {
    let state = Arc::new(State::new(rt.clone()).map_err(|e| std::io::Error::other(e.to_string()))?);
    rt.serve("control", router(), state, listener).await
}

/// Create a platform admin token when none exists (first start). Returns the secret once.
pub async fn bootstrap_admin_token(rt: &Runtime) -> Result<Option<String>> {
    let pepper = rt
        .config
        .keys
        .pepper
        .clone()
        .ok_or_else(|| Error::new(ErrorCode::ValidationFailed, "keys.pepper is required"))?;
    bootstrap_token(&rt.store, &pepper).await
}

/// [`bootstrap_admin_token`] on a bare store (the `caracal admin bootstrap-token` command).
pub async fn bootstrap_token(store: &caracal_shared::store::Store, pepper: &KeyRing) -> Result<Option<String>> {
    if store
        .admin_tokens(None)
        .await?
        .iter()
        .any(|t| t.tenant_id.is_none() && t.revoked_at.is_none())
    {
        return Ok(None);
    }
    let mut tx = store.begin().await?;
    let (_, secret) = tx
        .issue_admin_token(
            pepper,
            None,
            "bootstrap",
            &[
                AdminScope::Read,
                AdminScope::Write,
                AdminScope::Approve,
                AdminScope::Audit,
            ],
            None,
        )
        .await?;
    tx.commit().await?;
    Ok(Some(secret))
}
