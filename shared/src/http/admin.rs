//! Admin-token authentication for the management and evidence APIs (control plane, audit):
//! `Authorization: Bearer cat_…` with scopes, and the tenant the request acts in, resolved in
//! one place. Unknown, revoked and expired tokens and missing headers all answer the same 401.

use http::header;
use serde_json::{Value, json};

use super::ApiRequest;
use crate::crypto::KeyRing;
use crate::error::{Error, Result};
use crate::ids::{AdminTokenId, TenantId};
use crate::store::Store;
use crate::store::admin::{AdminScope, AdminToken};
use crate::time::now_micros;

/// Header a platform token uses to act inside a tenant.
pub const TENANT_HEADER: &str = "x-caracal-tenant";

/// Who is calling, and in which tenant.
#[derive(Debug, Clone)]
pub struct Caller {
    pub token: AdminToken,
    /// The tenant the request acts in (`None` only for platform-level requests).
    pub tenant: Option<TenantId>,
}

impl Caller {
    pub fn is_platform(&self) -> bool {
        self.token.tenant_id.is_none()
    }

    /// The tenant, or a 400 explaining how to name one.
    pub fn tenant(&self) -> Result<TenantId> {
        self.tenant.ok_or_else(|| {
            Error::bad_request(format!(
                "this endpoint acts inside a tenant: platform tokens must send {TENANT_HEADER}: <tenant id>"
            ))
        })
    }

    pub fn actor(&self) -> Value {
        json!({ "token_id": self.token.id, "token_name": self.token.name })
    }

    pub fn token_id(&self) -> AdminTokenId {
        self.token.id
    }
}

/// Authenticate the request's admin token and check it holds `scope`.
pub async fn authenticate(store: &Store, pepper: &KeyRing, r: &ApiRequest, scope: AdminScope) -> Result<Caller> {
    let unauth = || Error::unauthenticated("a valid admin token is required (Authorization: Bearer cat_…)");
    let secret = r
        .header_str(header::AUTHORIZATION)
        .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
        .map(str::trim)
        .ok_or_else(unauth)?;
    let token = store
        .admin_token_by_secret(pepper, secret)
        .await?
        .filter(|t| t.usable_at(now_micros()))
        .ok_or_else(unauth)?;
    if !token.scopes.contains(&scope) {
        return Err(Error::forbidden(format!(
            "this token lacks the {:?} scope",
            serde_json::to_value(scope).unwrap_or_default()
        )));
    }
    let asked = r.header_str(TENANT_HEADER).map(|s| s.trim().to_string());
    let tenant = match (token.tenant_id, asked) {
        (Some(t), None) => Some(t),
        (Some(t), Some(a)) if a == t.to_string() => Some(t),
        // A tenant token naming another tenant learns nothing about it.
        (Some(_), Some(_)) => return Err(Error::not_found("tenant")),
        (None, None) => None,
        (None, Some(a)) => {
            let id = TenantId::parse(&a)?;
            store.tenant(id).await?;
            Some(id)
        }
    };
    Ok(Caller { token, tenant })
}
