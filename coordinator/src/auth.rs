//! Who is calling: an agent presenting its mandate (`Authorization: Bearer <mandate>`), or an
//! operator presenting an admin token (`Bearer cat_…`, scopes as on the control plane).
//!
//! A mandate is verified against the published signing keys (reloaded from the store on an
//! unknown key id, at most once a second) and checked against the revocations recorded in the
//! store: a revoked mandate cannot start, heartbeat or extend anything.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use biscuit_auth::PublicKey;
use caracal_shared::error::{Error, ErrorCode, Result};
use caracal_shared::http::ApiRequest;
use caracal_shared::http::admin::{self, Caller};
use caracal_shared::ids::{AgentId, TenantId};
use caracal_shared::mandate::{MandateError, VerifiedMandate};
use caracal_shared::store::Store;
use caracal_shared::store::admin::AdminScope;
use caracal_shared::time::now_secs;
use http::header;

use crate::State;

/// The verification key set, loaded from the store.
pub struct Keys {
    store: Store,
    set: RwLock<Arc<HashMap<u32, PublicKey>>>,
    last_reload: Mutex<Option<Instant>>,
}

impl Keys {
    pub fn new(store: Store) -> Keys {
        Keys {
            store,
            set: RwLock::new(Arc::new(HashMap::new())),
            last_reload: Mutex::new(None),
        }
    }

    async fn reload(&self) -> Result<()> {
        {
            let mut last = self.last_reload.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return Ok(());
            }
            *last = Some(Instant::now());
        }
        let keys = self.store.signing_keys().await?;
        let mut set = HashMap::new();
        for k in caracal_shared::keys::published(&keys) {
            set.insert(k.kid, caracal_shared::mandate::public_key_from_str(&k.public_key)?);
        }
        *self.set.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
        Ok(())
    }

    /// Verify a mandate's signature and lifetime.
    pub async fn verify(&self, token: &str) -> Result<VerifiedMandate> {
        let set = self.set.read().unwrap_or_else(|p| p.into_inner()).clone();
        let r = match VerifiedMandate::verify(token, set.as_ref(), now_secs()) {
            Err(MandateError::UnknownKey(_)) => {
                self.reload().await?;
                let set = self.set.read().unwrap_or_else(|p| p.into_inner()).clone();
                VerifiedMandate::verify(token, set.as_ref(), now_secs())
            }
            r => r,
        };
        r.map_err(|e| {
            let code = match e {
                MandateError::Expired | MandateError::NotYetValid => ErrorCode::MandateExpired,
                MandateError::Revoked => ErrorCode::MandateRevoked,
                _ => ErrorCode::MandateInvalid,
            };
            Error::new(code, e.to_string())
        })
    }
}

/// The authenticated caller of a coordinator request.
pub enum Principal {
    Agent(Box<VerifiedMandate>),
    Admin(Box<Caller>),
}

impl Principal {
    pub fn tenant(&self) -> Result<TenantId> {
        match self {
            Principal::Agent(m) => Ok(m.claims.tenant),
            Principal::Admin(c) => c.tenant(),
        }
    }

    /// The calling agent, or a 403 for operators on agent-only operations.
    pub fn agent(&self) -> Result<&VerifiedMandate> {
        match self {
            Principal::Agent(m) => Ok(m),
            Principal::Admin(_) => Err(Error::forbidden("this operation is for agents: present a mandate")),
        }
    }

    pub fn agent_id(&self) -> Option<AgentId> {
        match self {
            Principal::Agent(m) => Some(m.claims.agent),
            Principal::Admin(_) => None,
        }
    }

    pub fn is_admin(&self) -> bool {
        matches!(self, Principal::Admin(_))
    }

    /// Who acted, for events.
    pub fn actor(&self) -> serde_json::Value {
        match self {
            Principal::Agent(m) => serde_json::json!({ "agent_id": m.claims.agent, "mandate_id": m.claims.mandate_id }),
            Principal::Admin(c) => c.actor(),
        }
    }
}

fn bearer(r: &ApiRequest) -> Option<&str> {
    r.header_str(header::AUTHORIZATION)
        .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
        .map(str::trim)
}

impl State {
    /// Authenticate an agent (mandate) or an operator (admin token with `scope`).
    pub async fn principal(&self, r: &ApiRequest, scope: AdminScope) -> Result<Principal> {
        let token = bearer(r)
            .ok_or_else(|| Error::unauthenticated("present a mandate or an admin token (Authorization: Bearer …)"))?;
        if !caracal_shared::mandate::is_mandate(token) {
            return Ok(Principal::Admin(Box::new(
                admin::authenticate(&self.rt.store, &self.pepper, r, scope).await?,
            )));
        }
        let m = self.keys.verify(token).await?;
        let ids: Vec<&str> = m.all_revocation_ids().collect();
        if self.rt.store.mandate_revoked(&m.claims, &ids).await? {
            return Err(Error::new(ErrorCode::MandateRevoked, "the mandate has been revoked"));
        }
        Ok(Principal::Agent(Box::new(m)))
    }

    /// An operator with `scope` (agents are refused).
    pub async fn operator(&self, r: &ApiRequest, scope: AdminScope) -> Result<Caller> {
        match self.principal(r, scope).await? {
            Principal::Admin(c) => Ok(*c),
            Principal::Agent(_) => Err(Error::forbidden("this operation needs an admin token")),
        }
    }
}
