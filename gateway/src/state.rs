//! Everything the request path reads, kept in memory: a snapshot of resources (with their
//! unsealed credentials and egress rules) and active policies, the verification key set, the
//! revocation set, and caches of verified mandates, exchanged API keys and checked DNS answers.
//!
//! The snapshot is loaded at start and reloaded when a control-plane event arrives (and every
//! minute regardless). Keys reload on key events and on an unknown key id. Nothing here does a
//! database or network round trip per request in the common case.

use caracal_shared::FastMap as HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use biscuit_auth::PublicKey;
use caracal_shared::audit::AuditEmitter;
use caracal_shared::crypto::{KeyRing, Secret};
use caracal_shared::egress::{Cidr, EgressGuard, EgressPolicy, Resolver};
use caracal_shared::error::{Error, ErrorCode, Result};
use caracal_shared::http::client::HttpClient;
use caracal_shared::ids::{AgentId, PolicyId, ResourceId, TenantId};
use caracal_shared::mandate::{MandateError, VerifiedMandate};
use caracal_shared::policy::{
    ANY, CompiledPolicy, Effect, GlobKind, MatchRule, Pattern, globs_to_regex, methods_to_regex,
};
use caracal_shared::ratelimit::RateLimiter;
use caracal_shared::runtime::Runtime;
use caracal_shared::store::resources::{InjectKind, Resource, parse_base_url};
use caracal_shared::time::{coarse_monotonic_millis, now_secs};
use http::HeaderValue;
use http::header::HeaderName;

use caracal_shared::http::signing::RequestSigner;
use caracal_shared::tls::DynamicClientVerifier;

use crate::metrics::Metrics;
use crate::mtls::PeerCert;

const TT_API_KEY: &str = "urn:caracal:params:oauth:token-type:api-key";
const TT_MTLS: &str = "urn:caracal:params:oauth:token-type:mtls";
use crate::revocation::RevocationSet;

/// How the resource's credential is added to forwarded requests.
#[derive(Clone)]
pub enum Injection {
    None,
    Header(HeaderName, HeaderValue),
    Query(String, String),
}

/// A resource as the request path needs it.
pub struct ResourceEntry {
    pub res: Resource,
    /// The hosts this resource answers for (computed once: matched per request).
    pub hosts: Vec<String>,
    pub https: bool,
    pub base_host: String,
    pub base_port: u16,
    /// Path prefix of the base URL (sidecar mode prepends it).
    pub base_path: String,
    pub inject: Injection,
    pub guard: EgressGuard,
    /// Allowed models (the resource's allowlist), empty: any.
    pub models: Vec<Pattern>,
    /// Allowed operations (`METHOD /glob`), empty: any.
    pub operations: Vec<MatchRule>,
    /// CA for the upstream's certificate (instead of the system roots).
    pub upstream_ca: Option<Arc<[pingora::utils::tls::WrappedX509]>>,
    /// The same CA as DER, for the gateway's own forwarder.
    pub upstream_ca_der: Option<Arc<Vec<Vec<u8>>>>,
    /// Prices for budgets (`settings.pricing`).
    pub pricing: Arc<caracal_shared::metering::Pricing>,
    /// Egress-checked addresses of the hosts requests went to (dropped with the entry when
    /// the resource, and so its egress rules, change).
    pub dns: DnsCache,
}

/// Checked answers for the hosts of one resource, looked up per request by the borrowed host
/// name (no allocation, no async cache machinery on the hot path).
pub struct DnsCache {
    ttl: Duration,
    /// Keyed by names requests choose (wildcard resources): SipHash, not [`HashMap`].
    hosts: RwLock<std::collections::HashMap<String, Vec<DnsAnswer>>>,
}

/// `(port, valid until (coarse monotonic milliseconds), checked address)`.
type DnsAnswer = (u16, u64, SocketAddr);

/// Most distinct hosts one resource caches (wildcard resources may see many).
const DNS_CACHE_HOSTS: usize = 4096;

impl DnsCache {
    pub fn new(ttl: Duration) -> DnsCache {
        DnsCache {
            ttl,
            hosts: RwLock::new(std::collections::HashMap::new()),
        }
    }

    pub fn get(&self, host: &str, port: u16) -> Option<SocketAddr> {
        let now = coarse_monotonic_millis();
        let m = self.hosts.read().unwrap_or_else(|p| p.into_inner());
        m.get(host)?
            .iter()
            .find(|(p, until, _)| *p == port && *until > now)
            .map(|(_, _, a)| *a)
    }

    pub fn insert(&self, host: &str, port: u16, addr: SocketAddr) {
        let now = coarse_monotonic_millis();
        let mut m = self.hosts.write().unwrap_or_else(|p| p.into_inner());
        if m.len() >= DNS_CACHE_HOSTS && !m.contains_key(host) {
            m.retain(|_, v| {
                v.retain(|(_, until, _)| *until > now);
                !v.is_empty()
            });
            if m.len() >= DNS_CACHE_HOSTS {
                m.clear();
            }
        }
        let v = m.entry(host.to_string()).or_default();
        v.retain(|(p, _, _)| *p != port);
        v.push((port, now.saturating_add(self.ttl.as_millis() as u64), addr));
    }
}

impl std::fmt::Debug for ResourceEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResourceEntry")
            .field("id", &self.res.id)
            .field("name", &self.res.name)
            .finish_non_exhaustive()
    }
}

impl ResourceEntry {
    /// Whether `host` is one this resource answers for.
    pub fn host_allowed(&self, host: &str) -> bool {
        caracal_shared::store::resources::host_matches(&self.hosts, host)
    }

    fn build(
        res: Resource,
        credential: Option<Secret>,
        deny: &[SocketAddr],
        resolver: Arc<dyn Resolver>,
        dns_ttl: Duration,
    ) -> Result<ResourceEntry> {
        let (scheme, base_host, base_port, base_path) = parse_base_url(&res.base_url)?;
        let sensitive = |v: String| -> Result<HeaderValue> {
            let mut h = HeaderValue::from_str(&v)
                .map_err(|_| Error::validation("the resource credential is not a valid header value"))?;
            h.set_sensitive(true);
            Ok(h)
        };
        let inject = match (res.inject.kind, credential) {
            (InjectKind::None, _) | (_, None) => Injection::None,
            (InjectKind::Bearer, Some(c)) => Injection::Header(
                http::header::AUTHORIZATION,
                sensitive(format!("Bearer {}", String::from_utf8_lossy(c.expose())))?,
            ),
            (InjectKind::Basic, Some(c)) => Injection::Header(
                http::header::AUTHORIZATION,
                sensitive(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(c.expose())
                ))?,
            ),
            (InjectKind::Header, Some(c)) => {
                let name = HeaderName::from_bytes(res.inject.name.as_deref().unwrap_or("x-api-key").as_bytes())
                    .map_err(|_| Error::validation("invalid header name"))?;
                Injection::Header(name, sensitive(String::from_utf8_lossy(c.expose()).into_owned())?)
            }
            (InjectKind::Query, Some(c)) => Injection::Query(
                res.inject.name.clone().unwrap_or_else(|| "key".into()),
                caracal_shared::http::form_encode(&String::from_utf8_lossy(c.expose())),
            ),
        };
        let allow: Vec<Cidr> = res
            .settings
            .egress_allow
            .iter()
            .filter_map(|c| c.parse().ok())
            .collect();
        let guard = EgressGuard::new(
            EgressPolicy {
                allow,
                deny: deny.to_vec(),
                allow_all: false,
            },
            resolver,
        );
        let models = res
            .settings
            .models
            .iter()
            .map(|m| Pattern::new(&globs_to_regex(std::slice::from_ref(m), GlobKind::Name)))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(Error::validation)?;
        let mut operations = Vec::new();
        for op in &res.settings.operations {
            let (m, p) = op.split_once(' ').unwrap_or(("*", "/**"));
            let mr = MatchRule::from_sources(
                op,
                Effect::Allow,
                [
                    &methods_to_regex(&[m.to_string()]),
                    ANY,
                    &globs_to_regex(&[p.trim().to_string()], GlobKind::Path),
                    ANY,
                    ANY,
                ],
            )
            .map_err(Error::validation)?;
            operations.push(mr);
        }
        let (upstream_ca, upstream_ca_der) = match &res.settings.upstream_ca_pem {
            None => (None, None),
            Some(pem) => {
                let ders = caracal_shared::store::agents::parse_ca_pem(pem)?;
                let v: Vec<pingora::utils::tls::WrappedX509> = ders
                    .iter()
                    .map(|d| pingora::utils::tls::WrappedX509::new(d.clone(), pingora::utils::tls::parse_x509))
                    .collect();
                (Some(Arc::from(v.into_boxed_slice())), Some(Arc::new(ders)))
            }
        };
        Ok(ResourceEntry {
            dns: DnsCache::new(dns_ttl),
            hosts: res.effective_hosts(),
            https: scheme == "https",
            base_host,
            base_port,
            base_path,
            inject,
            guard,
            models,
            operations,
            upstream_ca,
            upstream_ca_der,
            pricing: Arc::new(res.settings.pricing.clone().unwrap_or_default()),
            res,
        })
    }

    /// Does the resource's own allowlist admit this request (models, operations)?
    pub fn admits(&self, method: &str, path: &str, model: &str) -> bool {
        let model_ok = self.models.is_empty() || (!model.is_empty() && self.models.iter().any(|p| p.matches(model)));
        let op_ok = self.operations.is_empty()
            || self.operations.iter().any(|r| {
                r.matches(&caracal_shared::policy::Facts {
                    method,
                    host: "",
                    path,
                    model: "",
                    tool: "",
                })
            });
        model_ok && op_ok
    }
}

/// Resources and active policies, swapped as a whole.
#[derive(Default)]
pub struct Snapshot {
    pub resources: HashMap<ResourceId, Arc<ResourceEntry>>,
    /// (tenant, name) → id, for sidecars.
    pub by_name: HashMap<(TenantId, String), ResourceId>,
    pub tenants: HashMap<String, TenantId>,
    pub active: HashMap<(TenantId, PolicyId), (i64, Arc<CompiledPolicy>)>,
    /// Budgets by tenant, and tenant names (metric labels).
    pub budgets: HashMap<TenantId, Vec<crate::budget::BudgetEntry>>,
    pub tenant_names: HashMap<TenantId, Arc<str>>,
}

/// The cache key of a mandate: its last 32 bytes (the end of the final block's signature and
/// proof, unique to the token), so a lookup hashes 32 bytes, not kilobytes. Different tokens
/// sharing an ending are told apart by [`Cached::token_matches`].
pub fn token_key(b: &[u8]) -> [u8; 32] {
    let mut k = [0u8; 32];
    let tail = &b[b.len().saturating_sub(32)..];
    k[32 - tail.len()..].copy_from_slice(tail);
    k
}

/// Source of [`Gateway::instance`].
static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(1);

/// A memo entry: gateway instance, cache key, the shared cache's entry.
type MemoEntry = (u64, [u8; 32], Option<Arc<Cached>>);

/// How many mandates each thread remembers in front of the shared cache.
const RECENT: usize = 4;

thread_local! {
    /// Per thread, the mandates it last found in the shared cache (gateway instance, key,
    /// entry): the shared cache's lookup (epoch pinning, access recording, a clock read) cost
    /// ~900 instructions per request. An entry is the very `Arc` the shared cache held, so a
    /// memo hit is confirmed against the whole token and then checked for expiry and
    /// revocation like any hit; an entry evicted from the shared cache lives on here until
    /// pushed out by newer ones, and nothing else removes entries from the shared cache
    /// before they expire.
    static RECENT_MANDATES: std::cell::RefCell<[MemoEntry; RECENT]> =
        const { std::cell::RefCell::new([const { (0, [0; 32], None) }; RECENT]) };
}

/// A verified mandate as cached: revocation is re-checked only when the set changed.
pub struct Cached {
    pub m: VerifiedMandate,
    /// The token it was verified from (compared on every cache hit, in constant time).
    token: Box<str>,
    checked_generation: AtomicU64,
    revoked: AtomicBool,
}

impl Cached {
    pub fn new(m: VerifiedMandate, token: &str) -> Self {
        Cached {
            m,
            token: token.into(),
            checked_generation: AtomicU64::new(0),
            revoked: AtomicBool::new(false),
        }
    }

    /// Whether `token` is exactly the token this entry was verified from.
    #[inline]
    pub fn token_matches(&self, token: &[u8]) -> bool {
        caracal_shared::crypto::ct_eq(self.token.as_bytes(), token)
    }

    /// Revoked according to the set at its current generation.
    #[inline]
    pub fn is_revoked(&self, set: &RevocationSet) -> bool {
        let g = set.generation();
        if self.checked_generation.load(Ordering::Acquire) == g {
            return self.revoked.load(Ordering::Acquire);
        }
        let r = set.is_revoked(&self.m);
        self.revoked.store(r, Ordering::Release);
        self.checked_generation.store(g, Ordering::Release);
        r
    }
}

/// A `'static` copy of `s`, made once per distinct value (gateway ids: one per process, a
/// few in tests that start several gateways).
fn intern(s: &str) -> &'static str {
    static SEEN: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(v) = seen.iter().find(|v| **v == s) {
        return v;
    }
    let v: &'static str = Box::leak(s.to_owned().into_boxed_str());
    seen.push(v);
    v
}

pub struct Gateway {
    pub rt: Runtime,
    /// This gateway's `Via` entry (`1.1 <gateway id>`), built once.
    pub via: HeaderValue,
    /// This gateway's id, for the audit events it records (interned: a shared `Arc` would
    /// have its reference count moved between the proxy's and the publisher's cores on every
    /// event).
    pub gateway_id: &'static str,
    /// Tells this gateway's entries in the per-thread memo of recent mandates from those of
    /// another gateway in the same process (see [`RECENT_MANDATES`]).
    instance: u64,
    pub snapshot: RwLock<Arc<Snapshot>>,
    keys: RwLock<Arc<std::collections::HashMap<u32, PublicKey>>>,
    keys_reloaded: std::sync::Mutex<Instant>,
    /// Verified mandates, keyed by [`token_key`] (a hit is confirmed against the whole token).
    pub mandates: moka::sync::Cache<[u8; 32], Arc<Cached>, foldhash::fast::RandomState>,
    pub exchanged: moka::future::Cache<[u8; 32], Arc<Cached>>,
    pub revocations: RevocationSet,
    pub audit: AuditEmitter,
    pub limiter: RateLimiter<AgentId>,
    pub metrics: Metrics,
    pub resolver: Arc<dyn Resolver>,
    pub own: Vec<SocketAddr>,
    pub sts: HttpClient,
    /// Whether requests to the STS are signed (keys.internal is configured).
    sts_signed: bool,
    /// Trust anchors of the mTLS listener (every tenant's client CAs, refreshed on reload).
    pub client_verifier: Arc<DynamicClientVerifier>,
    pub seal: KeyRing,
    compiled: moka::sync::Cache<(PolicyId, i64), Arc<CompiledPolicy>>,
    pub budgets: Arc<crate::budget::Budgets>,
    /// Issues certificates for intercepted hosts and tracks live tunnels.
    pub interceptor: Arc<crate::intercept::Interceptor>,
}

impl Gateway {
    pub fn new(
        rt: Runtime,
        audit: AuditEmitter,
        metrics: Metrics,
        resolver: Arc<dyn Resolver>,
        own: Vec<SocketAddr>,
        budgets: Arc<crate::budget::Budgets>,
    ) -> Result<Gateway> {
        let cfg = &rt.config.gateway;
        let seal = rt.config.keys.seal.clone().ok_or_else(|| {
            Error::new(
                ErrorCode::ValidationFailed,
                "the gateway needs keys.seal (to open resource credentials)",
            )
        })?;
        // The STS may run on loopback (caracal dev); the gateway's own listeners stay refused.
        let sts_guard = EgressGuard::system(EgressPolicy {
            allow_all: true,
            deny: own.clone(),
            allow: vec![],
        });
        Ok(Gateway {
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            keys: RwLock::new(Arc::new(std::collections::HashMap::new())),
            keys_reloaded: std::sync::Mutex::new(Instant::now() - Duration::from_secs(60)),
            mandates: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(
                    caracal_shared::store::policies::MAX_MANDATE_LIFETIME_SECS as u64,
                ))
                // Keys are token endings, inserted only once the token verified.
                .build_with_hasher(foldhash::fast::RandomState::default()),
            exchanged: moka::future::Cache::builder().max_capacity(100_000).build(),
            revocations: RevocationSet::new(cfg.revocation_staleness),
            audit,
            limiter: RateLimiter::new(cfg.agent_rate_per_sec, cfg.agent_rate_burst),
            metrics,
            resolver,
            own,
            sts: match rt.config.keys.internal.clone() {
                Some(k) => HttpClient::new(Arc::new(sts_guard))
                    .with_timeout(Duration::from_secs(10))
                    .with_signer(RequestSigner::new(k, "gateway")),
                None => HttpClient::new(Arc::new(sts_guard)).with_timeout(Duration::from_secs(10)),
            },
            sts_signed: rt.config.keys.internal.is_some(),
            client_verifier: DynamicClientVerifier::new(&[])?,
            seal,
            compiled: moka::sync::Cache::builder().max_capacity(10_000).build(),
            budgets,
            interceptor: Arc::new(crate::intercept::Interceptor::new(
                &crate::intercept::CaFile::load_or_create(&crate::intercept::ca_path(&rt.config))?,
            )?),
            via: HeaderValue::from_str(&format!("1.1 {}", rt.config.gateway.id))
                .unwrap_or_else(|_| HeaderValue::from_static("1.1 caracal")),
            gateway_id: intern(&rt.config.gateway.id),
            instance: NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed),
            rt,
        })
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reload resources (unsealing credentials) and active policies from the database.
    pub async fn reload_snapshot(&self) -> Result<()> {
        let store = &self.rt.store;
        let mut snap = Snapshot::default();
        for res in store.all_resources(100_000).await? {
            let cred = match store.resource_credential(&self.seal, &res).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(resource = %res.id, error = %e, "cannot open a resource credential; the resource is unavailable");
                    continue;
                }
            };
            let id = res.id;
            let key = (res.tenant_id, res.name.clone());
            match ResourceEntry::build(
                res,
                cred,
                &self.own,
                self.resolver.clone(),
                self.rt.config.gateway.dns_ttl,
            ) {
                Ok(e) => {
                    snap.resources.insert(id, Arc::new(e));
                    snap.by_name.insert(key, id);
                }
                Err(e) => tracing::error!(resource = %id, error = %e, "unusable resource"),
            }
        }
        if let Err(e) = self.client_verifier.update(&store.all_mtls_cas().await?) {
            tracing::error!(error = %e, "cannot rebuild the trusted client CAs");
        }
        for t in store.list_all_tenants(100_000).await? {
            snap.tenants.insert(t.name.clone(), t.id);
            snap.tenant_names.insert(t.id, Arc::from(t.name.as_str()));
        }
        for b in store.all_budgets(1_000_000).await? {
            snap.budgets
                .entry(b.tenant_id)
                .or_default()
                .push(crate::budget::BudgetEntry::new(b));
        }
        for (tenant, policy, version) in store.active_policy_versions().await? {
            let compiled = match self.compiled.get(&(policy, version)) {
                Some(c) => c,
                None => {
                    let c = Arc::new(store.policy_version(tenant, policy, version).await?.compile()?);
                    self.compiled.insert((policy, version), c.clone());
                    c
                }
            };
            snap.active.insert((tenant, policy), (version, compiled));
        }
        // Cached DNS answers go with the old entries (checked against the old egress rules).
        *self.snapshot.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(snap);
        Ok(())
    }

    pub async fn reload_keys(&self) -> Result<()> {
        let keys = self.rt.store.signing_keys().await?;
        let mut set = std::collections::HashMap::new();
        for k in caracal_shared::keys::published(&keys) {
            set.insert(k.kid, caracal_shared::mandate::public_key_from_str(&k.public_key)?);
        }
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
        *self.keys_reloaded.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        Ok(())
    }

    /// Reload revocations from the database (start, gaps, periodically).
    pub async fn reconcile_revocations(&self) -> Result<()> {
        let last = self
            .rt
            .store
            .stream_last_seq(caracal_shared::bus::streams::REVOCATIONS)
            .await?;
        let all = self.rt.store.live_revocations().await?;
        self.revocations.replace(&all, last);
        Ok(())
    }

    /// The verified mandate of `token` if it is cached (counted as a cache hit). Bytes, not
    /// `str`: a hit is byte for byte a token that was verified (so valid UTF-8), and the
    /// request path looks up the raw header before paying to validate 2 KB of it.
    pub fn cached_mandate(&self, token: &[u8]) -> Option<Arc<Cached>> {
        let key = token_key(token);
        let c = match self.recent_mandate(&key) {
            Some(c) => c,
            None => {
                let c = self.mandates.get(&key)?;
                self.remember_mandate(key, &c);
                c
            }
        };
        if !c.token_matches(token) {
            return None;
        }
        self.metrics.cache_hit.inc();
        Some(c)
    }

    /// This thread's memo of `key`, if it has one for this gateway.
    fn recent_mandate(&self, key: &[u8; 32]) -> Option<Arc<Cached>> {
        RECENT_MANDATES.with(|r| {
            r.borrow()
                .iter()
                .find(|(g, k, _)| *g == self.instance && k == key)
                .and_then(|(_, _, c)| c.clone())
        })
    }

    fn remember_mandate(&self, key: [u8; 32], c: &Arc<Cached>) {
        RECENT_MANDATES.with(|r| {
            let mut r = r.borrow_mut();
            r.rotate_right(1);
            r[0] = (self.instance, key, Some(c.clone()));
        })
    }

    /// Verify a mandate (once per token; cached until it expires).
    pub async fn verify_mandate(&self, token: &str) -> Result<Arc<Cached>> {
        if let Some(c) = self.cached_mandate(token.as_bytes()) {
            return Ok(c);
        }
        let key = token_key(token.as_bytes());
        self.metrics.cache_miss.inc();
        let now = now_secs();
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner()).clone();
        let v = match VerifiedMandate::verify(token, keys.as_ref(), now) {
            Err(MandateError::UnknownKey(_)) => {
                // A key published since the last reload: refresh (at most once a second).
                let due =
                    self.keys_reloaded.lock().unwrap_or_else(|p| p.into_inner()).elapsed() > Duration::from_secs(1);
                if due {
                    self.reload_keys().await?;
                }
                let keys = self.keys.read().unwrap_or_else(|p| p.into_inner()).clone();
                VerifiedMandate::verify(token, keys.as_ref(), now)
            }
            other => other,
        }
        .map_err(Error::from)?;
        let c = Arc::new(Cached::new(v, token));
        self.mandates.insert(key, c.clone());
        Ok(c)
    }

    /// Exchange an API key with the STS for a mandate — once per mandate lifetime: the result
    /// is cached and renewed when less than a fifth of its life remains.
    pub async fn mandate_for_api_key(&self, key: &str, request_id: &str) -> Result<Arc<Cached>> {
        let cache_key = caracal_shared::crypto::sha256(key.as_bytes());
        self.exchange_cached(cache_key, TT_API_KEY, key, request_id).await
    }

    /// Exchange a client certificate verified by the mTLS listener (the request to the STS is
    /// signed with the internal key: the STS trusts the gateway's attestation that the holder
    /// proved its key, and checks the chain and identity itself). Cached like API keys.
    pub async fn mandate_for_cert(&self, cert: &PeerCert, request_id: &str) -> Result<Arc<Cached>> {
        if !self.sts_signed {
            return Err(Error::new(
                ErrorCode::Unavailable,
                "client certificates need keys.internal (to sign the exchange with the STS)",
            ));
        }
        let mut key = b"client-certificate:".to_vec();
        key.extend_from_slice(&cert.fingerprint);
        let cache_key = caracal_shared::crypto::sha256(&key);
        self.exchange_cached(
            cache_key,
            TT_MTLS,
            &caracal_shared::crypto::b64url(&cert.der),
            request_id,
        )
        .await
    }

    async fn exchange_cached(
        &self,
        cache_key: [u8; 32],
        subject_type: &str,
        subject_token: &str,
        request_id: &str,
    ) -> Result<Arc<Cached>> {
        if let Some(c) = self.exchanged.get(&cache_key).await {
            let left = c.m.claims.expires_at - now_secs();
            let life = (c.m.claims.expires_at - c.m.claims.issued_at).max(1);
            if left * 5 > life {
                return Ok(c);
            }
            self.exchanged.invalidate(&cache_key).await;
        }
        self.exchanged
            .try_get_with(cache_key, async {
                let url = format!("{}/oauth/token", self.rt.config.gateway.sts_url.trim_end_matches('/'));
                let r = self
                    .sts
                    .post_form(
                        &url,
                        // The request id travels to the STS (one id across both services' logs).
                        &[("x-request-id", request_id)],
                        &[
                            ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
                            ("subject_token_type", subject_type),
                            ("subject_token", subject_token),
                        ],
                    )
                    .await
                    .map_err(|e| {
                        Error::new(ErrorCode::Unavailable, format!("the STS is unreachable: {}", e.message))
                    })?;
                if !r.status.is_success() {
                    let v = r.json_value();
                    let code = v["error"].as_str().unwrap_or("");
                    let msg = v["error_description"]
                        .as_str()
                        .unwrap_or("exchange refused")
                        .to_string();
                    return Err(match code {
                        "invalid_client" | "invalid_grant" => Error::new(ErrorCode::ProxyAuthRequired, msg),
                        "unauthorized_client" | "invalid_scope" | "invalid_target" => {
                            Error::new(ErrorCode::PolicyDenied, msg)
                        }
                        "slow_down" => Error::new(ErrorCode::RateLimited, msg).with_retry_after(10),
                        _ => Error::new(ErrorCode::Unavailable, msg),
                    });
                }
                let token = r.json_value()["access_token"].as_str().unwrap_or("").to_string();
                let c = self.verify_mandate(&token).await?;
                Ok::<_, Error>(c)
            })
            .await
            .map_err(|e: Arc<Error>| Error::new(e.code, e.message.to_string()))
    }

    /// Resolve (cached) and check `host:port` for a resource; returns a checked address.
    pub async fn resolve(&self, r: &Arc<ResourceEntry>, host: &str, port: u16) -> Result<SocketAddr> {
        match r.dns.get(host, port) {
            Some(a) => Ok(a),
            // Boxed: the resolver's future is large, and this one is laid out inside the
            // request's (which Pingora boxes and copies on every request).
            None => Box::pin(Self::resolve_uncached(r, host, port)).await,
        }
    }

    async fn resolve_uncached(r: &Arc<ResourceEntry>, host: &str, port: u16) -> Result<SocketAddr> {
        let addrs = r.guard.resolve_checked(host, port).await?;
        let first = *addrs
            .first()
            .ok_or_else(|| Error::new(ErrorCode::UpstreamUnreachable, "no address"))?;
        r.dns.insert(host, port, first);
        Ok(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_answers_are_per_host_and_port_and_expire() {
        let a: SocketAddr = "127.0.0.1:80".parse().unwrap();
        let b: SocketAddr = "127.0.0.2:8080".parse().unwrap();
        let c = DnsCache::new(Duration::from_secs(60));
        assert_eq!(c.get("api.test", 80), None);
        c.insert("api.test", 80, a);
        c.insert("api.test", 8080, b);
        assert_eq!(c.get("api.test", 80), Some(a));
        assert_eq!(c.get("api.test", 8080), Some(b));
        assert_eq!(c.get("api.test", 443), None);
        assert_eq!(c.get("other.test", 80), None);
        c.insert("api.test", 80, b);
        assert_eq!(c.get("api.test", 80), Some(b), "a new answer replaces the old one");
        let gone = DnsCache::new(Duration::ZERO);
        gone.insert("api.test", 80, a);
        assert_eq!(gone.get("api.test", 80), None, "expired");
        // Bounded: past the cap, expired hosts go first, then everything.
        let full = DnsCache::new(Duration::from_secs(60));
        for i in 0..DNS_CACHE_HOSTS + 10 {
            full.insert(&format!("h{i}.test"), 80, a);
        }
        assert!(full.hosts.read().unwrap().len() <= DNS_CACHE_HOSTS);
        assert_eq!(full.get(&format!("h{}.test", DNS_CACHE_HOSTS + 9), 80), Some(a));
    }
}
