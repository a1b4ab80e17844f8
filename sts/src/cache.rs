//! What the STS keeps warm so a mint needs no database round trip in the common case:
//! credentials (by keyed hash), agents, grants, resources, active policy versions, compiled
//! policies, budgets, trusted issuers and CAs, and the signing keys.
//!
//! Every entry is invalidated by control-plane events (tail of the control stream) and expires
//! after a short TTL regardless, which bounds staleness if an event is lost. Compiled policy
//! versions are immutable and never invalidated.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use biscuit_auth::{KeyPair, PublicKey};
use caracal_shared::crypto::KeyRing;
use caracal_shared::error::{Error, ErrorCode, Result};
use caracal_shared::ids::{AgentId, PolicyId, ResourceId, TenantId};
use caracal_shared::policy::CompiledPolicy;
use caracal_shared::store::Store;
use caracal_shared::store::admin::{Budget, KeyState};
use caracal_shared::store::agents::{Agent, ApiKey, JwtIssuer, MtlsCa};
use caracal_shared::store::policies::{Grant, Policy};
use caracal_shared::store::resources::Resource;
use moka::future::Cache;

const TTL: Duration = Duration::from_secs(30);

fn cache<K, V>(cap: u64) -> Cache<K, V>
where
    K: std::hash::Hash + Eq + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    Cache::builder().max_capacity(cap).time_to_live(TTL).build()
}

pub struct Signer {
    pub kid: u32,
    pub key: KeyPair,
}

pub struct Caches {
    store: Store,
    pub api_keys: Cache<[u8; 32], Option<ApiKey>>,
    pub agents: Cache<(TenantId, AgentId), Agent>,
    pub grants: Cache<(TenantId, AgentId), Arc<Vec<Grant>>>,
    pub resources: Cache<(TenantId, ResourceId), Resource>,
    pub resource_names: Cache<(TenantId, String), ResourceId>,
    pub active: Cache<(TenantId, PolicyId), Option<i64>>,
    pub compiled: Cache<(PolicyId, i64), Arc<CompiledPolicy>>,
    pub budgets: Cache<TenantId, Arc<Vec<Budget>>>,
    pub issuers: Cache<String, Arc<Vec<JwtIssuer>>>,
    pub cas: Cache<(), Arc<Vec<MtlsCa>>>,
    signer: RwLock<Option<Arc<Signer>>>,
    keyset: RwLock<Arc<HashMap<u32, PublicKey>>>,
    seal: KeyRing,
}

impl Caches {
    pub fn new(store: Store, seal: KeyRing) -> Caches {
        Caches {
            store,
            api_keys: cache(100_000),
            agents: cache(100_000),
            grants: cache(100_000),
            resources: cache(100_000),
            resource_names: cache(100_000),
            active: cache(100_000),
            compiled: Cache::builder().max_capacity(10_000).build(),
            budgets: cache(10_000),
            issuers: cache(10_000),
            cas: cache(1),
            signer: RwLock::new(None),
            keyset: RwLock::new(Arc::new(HashMap::new())),
            seal,
        }
    }

    /// Drop everything that may have changed (a control-plane event arrived).
    pub fn invalidate(&self) {
        self.api_keys.invalidate_all();
        self.agents.invalidate_all();
        self.grants.invalidate_all();
        self.resources.invalidate_all();
        self.resource_names.invalidate_all();
        self.active.invalidate_all();
        self.budgets.invalidate_all();
        self.issuers.invalidate_all();
        self.cas.invalidate_all();
    }

    pub async fn api_key(&self, pepper: &KeyRing, secret: &str) -> Result<Option<ApiKey>> {
        let h = pepper.keyed_hash(secret.as_bytes());
        if let Some(v) = self.api_keys.get(&h).await {
            return Ok(v);
        }
        let v = self.store.api_key_by_secret(pepper, secret).await?;
        self.api_keys.insert(h, v.clone()).await;
        Ok(v)
    }

    pub async fn agent(&self, t: TenantId, a: AgentId) -> Result<Agent> {
        if let Some(v) = self.agents.get(&(t, a)).await {
            return Ok(v);
        }
        let v: Agent = self.store.get(t, &a.to_string()).await?;
        self.agents.insert((t, a), v.clone()).await;
        Ok(v)
    }

    pub async fn grants(&self, t: TenantId, a: AgentId) -> Result<Arc<Vec<Grant>>> {
        if let Some(v) = self.grants.get(&(t, a)).await {
            return Ok(v);
        }
        let v = Arc::new(self.store.grants_of(t, a).await?);
        self.grants.insert((t, a), v.clone()).await;
        Ok(v)
    }

    pub async fn resource(&self, t: TenantId, r: ResourceId) -> Result<Resource> {
        if let Some(v) = self.resources.get(&(t, r)).await {
            return Ok(v);
        }
        let v: Resource = self.store.get(t, &r.to_string()).await?;
        self.resources.insert((t, r), v.clone()).await;
        Ok(v)
    }

    pub async fn resource_by_name(&self, t: TenantId, name: &str) -> Result<Resource> {
        if let Some(id) = self.resource_names.get(&(t, name.to_string())).await {
            return self.resource(t, id).await;
        }
        let v = self.store.resource_by_name(t, name).await?;
        self.resource_names.insert((t, name.to_string()), v.id).await;
        self.resources.insert((t, v.id), v.clone()).await;
        Ok(v)
    }

    /// The active compiled version of a policy, if any.
    pub async fn active_policy(&self, t: TenantId, p: PolicyId) -> Result<Option<(i64, Arc<CompiledPolicy>)>> {
        let active = match self.active.get(&(t, p)).await {
            Some(v) => v,
            None => {
                let pol: Policy = self.store.get(t, &p.to_string()).await?;
                self.active.insert((t, p), pol.active_version).await;
                pol.active_version
            }
        };
        let Some(v) = active else { return Ok(None) };
        Ok(Some((v, self.compiled(t, p, v).await?)))
    }

    pub async fn compiled(&self, t: TenantId, p: PolicyId, v: i64) -> Result<Arc<CompiledPolicy>> {
        if let Some(c) = self.compiled.get(&(p, v)).await {
            return Ok(c);
        }
        let c = Arc::new(self.store.policy_version(t, p, v).await?.compile()?);
        self.compiled.insert((p, v), c.clone()).await;
        Ok(c)
    }

    pub async fn budgets(&self, t: TenantId) -> Result<Arc<Vec<Budget>>> {
        if let Some(v) = self.budgets.get(&t).await {
            return Ok(v);
        }
        let v = Arc::new(self.store.list_all::<Budget>(t, 10_000).await?);
        self.budgets.insert(t, v.clone()).await;
        Ok(v)
    }

    pub async fn issuers(&self, iss: &str) -> Result<Arc<Vec<JwtIssuer>>> {
        if let Some(v) = self.issuers.get(iss).await {
            return Ok(v);
        }
        let v = Arc::new(self.store.jwt_issuers_by_iss(iss).await?);
        self.issuers.insert(iss.to_string(), v.clone()).await;
        Ok(v)
    }

    pub async fn cas(&self) -> Result<Arc<Vec<MtlsCa>>> {
        if let Some(v) = self.cas.get(&()).await {
            return Ok(v);
        }
        let v = Arc::new(self.store.all_mtls_cas().await?);
        self.cas.insert((), v.clone()).await;
        Ok(v)
    }

    /// Reload the signing key and the verification key set from the database.
    pub async fn reload_keys(&self) -> Result<()> {
        let keys = self.store.signing_keys().await?;
        let mut set = HashMap::new();
        for k in caracal_shared::keys::published(&keys) {
            set.insert(k.kid, caracal_shared::mandate::public_key_from_str(&k.public_key)?);
        }
        let active = keys
            .iter()
            .find(|k| k.state == KeyState::Active)
            .ok_or_else(|| Error::new(ErrorCode::Unavailable, "no active signing key"))?;
        let current = self.signer.read().unwrap().as_ref().map(|s| s.kid);
        if current != Some(active.kid) {
            let private = self.store.signing_key_private(&self.seal, active.kid).await?;
            let key = caracal_shared::mandate::keypair_from_private(private.expose())?;
            *self.signer.write().unwrap() = Some(Arc::new(Signer { kid: active.kid, key }));
            tracing::info!(kid = active.kid, "signing with key");
        }
        *self.keyset.write().unwrap() = Arc::new(set);
        Ok(())
    }

    pub fn signer(&self) -> Result<Arc<Signer>> {
        self.signer
            .read()
            .unwrap()
            .clone()
            .ok_or_else(|| Error::new(ErrorCode::Unavailable, "no signing key loaded"))
    }

    pub fn keyset(&self) -> Arc<HashMap<u32, PublicKey>> {
        self.keyset.read().unwrap().clone()
    }
}
