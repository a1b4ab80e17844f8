//! caracal-sts: RFC 8693 token exchange. A workload credential (API key, JWT, mTLS
//! certificate) or a mandate (delegation) comes in; a Biscuit mandate goes out. Also publishes
//! the mandate verification keys and runs the human-approval polling flow.

pub mod authn;
pub mod cache;
pub mod jwt;
pub mod mint;
pub mod oauth;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use caracal_shared::audit::AuditEmitter;
use caracal_shared::bus::consumer::{TailSpec, run_tail};
use caracal_shared::bus::streams;
use caracal_shared::crypto::KeyRing;
use caracal_shared::error::{Error, ErrorCode, Result};
use caracal_shared::http::signing::{self, RequestVerifier};
use caracal_shared::http::{ApiRequest, ClientCert, Response, Router, json_response};
use caracal_shared::ids::{ApprovalId, DelegationId};
use caracal_shared::mandate::{MandateError, VerifiedMandate};
use caracal_shared::ratelimit::RateLimiter;
use caracal_shared::runtime::Runtime;
use caracal_shared::store::authority::{Approval, ApprovalStatus, Delegation};
use caracal_shared::store::outbox::NewEvent;
use caracal_shared::time::{now_micros, now_secs};
use http::StatusCode;
use http::header::HeaderValue;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::authn::{JwksCache, Principal, client_hint};
use crate::cache::Caches;
use crate::mint::{MintRequest, Restriction};
use crate::oauth::*;

pub struct Metrics {
    pub mints: IntCounterVec,
    pub duration: HistogramVec,
}

impl Metrics {
    fn new(r: &Registry) -> Metrics {
        let mints = IntCounterVec::new(
            Opts::new(
                "sts_exchanges_total",
                "Token exchanges by outcome (issued or the OAuth error)",
            )
            .namespace("caracal"),
            &["outcome", "via"],
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new("sts_exchange_duration_seconds", "Token exchange latency")
                .namespace("caracal")
                .buckets(vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5,
                ]),
            &["outcome"],
        )
        .expect("valid metric");
        let _ = r.register(Box::new(mints.clone()));
        let _ = r.register(Box::new(duration.clone()));
        // Every refusal outcome starts at 0, so error rates read 0 (not "no data") until the
        // first error.
        for outcome in [
            "invalid_request",
            "invalid_client",
            "invalid_grant",
            "invalid_scope",
            "invalid_target",
            "unauthorized_client",
            "unsupported_grant_type",
            "access_denied",
            "server_error",
            "temporarily_unavailable",
        ] {
            mints.with_label_values(&[outcome, "-"]);
        }
        Metrics { mints, duration }
    }
}

pub struct State {
    pub rt: Runtime,
    pub pepper: KeyRing,
    pub caches: Caches,
    pub jwks: JwksCache,
    pub audit: AuditEmitter,
    /// Failed authentications, per (source address, claimed client).
    failures: RateLimiter<(IpAddr, String)>,
    pub metrics: Metrics,
    /// Verifies service-signed requests (the gateway attesting a client certificate it
    /// verified on its own mTLS listener). None without `keys.internal`.
    internal: Option<RequestVerifier>,
}

impl State {
    pub fn new(rt: Runtime, registry: &Registry) -> Result<(State, tokio::task::JoinHandle<()>)> {
        let keys = &rt.config.keys;
        let missing = |k: &str| Error::new(ErrorCode::ValidationFailed, format!("the STS needs keys.{k}"));
        let pepper = keys.pepper.clone().ok_or_else(|| missing("pepper"))?;
        let seal = keys.seal.clone().ok_or_else(|| missing("seal"))?;
        let (audit, task) = AuditEmitter::start(
            rt.bus.clone(),
            rt.bus_auth.clone(),
            65_536,
            registry,
            rt.shutdown.clone(),
        );
        let per_min = rt.config.sts.auth_failures_per_minute.max(1);
        Ok((
            State {
                caches: Caches::new(rt.store.clone(), seal),
                jwks: JwksCache::new(rt.config.sts.egress_allow.clone(), rt.config.sts.jwks_min_refresh),
                pepper,
                audit,
                failures: RateLimiter::new(per_min.div_ceil(60).max(1), per_min),
                metrics: Metrics::new(registry),
                internal: keys
                    .internal
                    .clone()
                    .map(|k| RequestVerifier::new(k, std::time::Duration::from_secs(60))),
                rt,
            },
            task,
        ))
    }

    /// A request signed by another Caracal service (the gateway) with the internal key. An
    /// invalid signature is refused. With subject type mTLS, it carries a client certificate
    /// the gateway's mTLS listener verified (the holder proved its key there); the STS checks
    /// the chain and the identity mapping itself, exactly as for its own listener.
    fn service_signed(
        &self,
        r: &ApiRequest,
        body: &[u8],
        f: &Form,
    ) -> std::result::Result<Option<ClientCert>, OAuthError> {
        let v = self
            .internal
            .as_ref()
            .ok_or_else(|| OAuthError::invalid_client("service-signed requests are not accepted here"))?;
        let target = r.parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        v.verify(&r.parts.headers, r.parts.method.as_str(), target, body)
            .map_err(|e| OAuthError::invalid_client(e.message.to_string()))?;
        if f.get("subject_token_type") != Some(TT_MTLS) {
            return Ok(None);
        }
        let der = f
            .get("subject_token")
            .and_then(caracal_shared::crypto::b64url_decode)
            .filter(|d| !d.is_empty() && d.len() <= 16 * 1024)
            .ok_or_else(|| OAuthError::invalid_request("subject_token must be the certificate's DER, base64url"))?;
        Ok(Some(ClientCert {
            fingerprint: hex::encode(caracal_shared::crypto::sha256(&der)),
            der,
        }))
    }

    fn audit_refusal(&self, e: &OAuthError, r: &ApiRequest, subject_type: Option<&str>, who: Option<&Principal>) {
        let _ = self.audit.emit(
            "mint_refused",
            who.map(|p| p.tenant),
            &json!({
                "type": "mint_refused",
                "error": e.error,
                "description": e.description,
                "subject_token_type": subject_type,
                "agent": who.map(|p| p.agent.id),
                "source": r.ctx.peer.ip().to_string(),
                "request_id": r.ctx.request_id,
            }),
        );
    }

    async fn authenticate(
        &self,
        r: &ApiRequest,
        subject_type: &str,
        token: Option<&str>,
    ) -> std::result::Result<Principal, OAuthError> {
        let need = || OAuthError::invalid_request("missing parameter \"subject_token\"");
        match subject_type {
            TT_API_KEY => self.principal_from_api_key(token.ok_or_else(need)?).await,
            TT_JWT | TT_ID_TOKEN => self.principal_from_jwt(token.ok_or_else(need)?).await,
            TT_MTLS => self.principal_from_cert(r.ctx.client_cert.as_ref()).await,
            other => Err(OAuthError::invalid_request(format!("unsupported token type {other:?}"))),
        }
    }

    /// Authenticate, applying the per-(source, client) failure limit.
    async fn authenticate_limited(
        &self,
        r: &ApiRequest,
        subject_type: &str,
        token: Option<&str>,
    ) -> std::result::Result<Principal, OAuthError> {
        let hint = match (subject_type, token) {
            (TT_MTLS, _) => format!(
                "cert:{}",
                r.ctx
                    .client_cert
                    .as_ref()
                    .map(|c| c.fingerprint.as_str())
                    .unwrap_or("none")
            ),
            (t, Some(tok)) => client_hint(t, tok),
            (_, None) => "none".into(),
        };
        let key = (r.ctx.peer.ip(), hint);
        if !self.failures.has(&key, 1.0) {
            return Err(OAuthError::rate_limited(10));
        }
        match self.authenticate(r, subject_type, token).await {
            Ok(p) => Ok(p),
            Err(e) => {
                if matches!(e.error, "invalid_client" | "invalid_grant") {
                    let _ = self.failures.check(&key, 1.0);
                }
                Err(e)
            }
        }
    }

    /// Verify a mandate presented for delegation: signature (refreshing keys on an unknown id),
    /// expiry and revocation.
    async fn verify_parent(&self, token: &str) -> std::result::Result<VerifiedMandate, OAuthError> {
        let now = now_secs();
        let mut v = VerifiedMandate::verify(token, self.caches.keyset().as_ref(), now);
        if let Err(MandateError::UnknownKey(_)) = v {
            self.caches.reload_keys().await?;
            v = VerifiedMandate::verify(token, self.caches.keyset().as_ref(), now);
        }
        let v = v.map_err(|e| OAuthError::invalid_grant(e.to_string()))?;
        let ids: Vec<&str> = v.all_revocation_ids().collect();
        if self
            .rt
            .store
            .live_revocations()
            .await?
            .iter()
            .any(|rv| rv.matches(&v.claims, &ids))
        {
            return Err(OAuthError::invalid_grant(MandateError::Revoked.to_string()));
        }
        Ok(v)
    }

    fn issued(&self, token: &str, claims: &caracal_shared::mandate::Claims, scopes: &[String]) -> Response {
        let mut r = json_response(
            StatusCode::OK,
            &json!({
                "access_token": token,
                "issued_token_type": TT_MANDATE,
                "token_type": "Bearer",
                "expires_in": (claims.expires_at - now_secs()).max(0),
                "scope": scopes.join(" "),
            }),
        );
        r.headers_mut()
            .insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        r.headers_mut()
            .insert(http::header::PRAGMA, HeaderValue::from_static("no-cache"));
        r
    }

    fn audit_mint(
        &self,
        r: &ApiRequest,
        claims: &caracal_shared::mandate::Claims,
        via: &str,
    ) -> std::result::Result<(), OAuthError> {
        let mut body = mint::describe(claims);
        body["type"] = json!("mint");
        body["via"] = json!(via);
        body["source"] = json!(r.ctx.peer.ip().to_string());
        body["request_id"] = json!(r.ctx.request_id);
        self.audit
            .emit("mint", Some(claims.tenant), &body)
            .map_err(OAuthError::from)
    }

    async fn exchange(&self, r: &ApiRequest, f: &Form) -> std::result::Result<Response, OAuthError> {
        let subject_type = f.require("subject_token_type")?;
        if let Some(t) = f.get("requested_token_type")
            && t != TT_MANDATE
        {
            return Err(OAuthError::invalid_request(format!(
                "requested_token_type must be {TT_MANDATE}"
            )));
        }
        let mut req = MintRequest {
            resources: f
                .all("resource")
                .iter()
                .chain(f.all("audience"))
                .filter(|s| !s.is_empty())
                .cloned()
                .collect(),
            scopes: parse_scopes(f.get("scope"))?,
            lifetime: match f.get("lifetime") {
                None => None,
                Some(l) => Some(
                    l.parse::<i64>()
                        .ok()
                        .filter(|l| *l > 0)
                        .ok_or_else(|| OAuthError::invalid_request("lifetime must be a positive number of seconds"))?,
                ),
            },
            session: None,
        };
        if let Some(s) = f.get("session_id") {
            req.session = Some(
                caracal_shared::ids::SessionId::parse(s)
                    .map_err(|_| OAuthError::invalid_request("invalid session_id"))?,
            );
        }
        if req.resources.len() > 50 {
            return Err(OAuthError::invalid_request("too many resources"));
        }
        let restrictions: Vec<Restriction> = match f.get("restrict") {
            None => Vec::new(),
            Some(j) => serde_json::from_str(j).map_err(|e| OAuthError::invalid_request(format!("restrict: {e}")))?,
        };

        if subject_type == TT_MANDATE {
            let token = f.require("subject_token")?;
            let parent = self.verify_parent(token).await?;
            let child = match (f.get("actor_token"), f.get("actor_token_type")) {
                (Some(t), Some(tt)) => Some(self.authenticate_limited(r, tt, Some(t)).await?),
                (None, None) => None,
                _ => {
                    return Err(OAuthError::invalid_request(
                        "actor_token and actor_token_type go together",
                    ));
                }
            };
            if let Some(c) = &child
                && c.agent.disabled
            {
                return Err(OAuthError::unauthorized_client("the actor agent is disabled"));
            }
            if let Some(sid) = req.session {
                let agent = child.as_ref().map(|c| c.agent.id).unwrap_or(parent.claims.agent);
                self.check_session(parent.claims.tenant, agent, sid).await?;
            }
            let (max_depth, max_fanout) = self.delegation_limits(&parent).await?;
            let fanout = self
                .rt
                .store
                .delegation_count(parent.claims.tenant, parent.claims.mandate_id)
                .await?;
            if fanout >= max_fanout {
                return Err(OAuthError::unauthorized_client(format!(
                    "delegation fan-out limit ({max_fanout}) reached for this mandate"
                )));
            }
            let (claims, scopes) = mint::delegate(&parent, child.as_ref(), &req, &restrictions, max_depth)?;
            let token = self.sign(&claims)?;
            let child_ids = VerifiedMandate::verify(&token, self.caches.keyset().as_ref(), now_secs())
                .map(|v| v.revocation_ids)
                .unwrap_or_default();
            let d = Delegation {
                id: DelegationId::new(),
                tenant_id: claims.tenant,
                parent_mandate: parent.claims.mandate_id,
                child_mandate: claims.mandate_id,
                parent_agent: parent.claims.agent,
                child_agent: claims.agent,
                parent_session: parent.claims.session,
                child_session: claims.session,
                scope: json!({ "resources": mint::describe(&claims)["scopes"], "restrictions": restrictions }),
                revocation_ids: child_ids,
                depth: claims.depth,
                created_at: now_micros(),
                expires_at: claims.expires_at * 1_000_000,
            };
            let mut tx = self.rt.store.begin().await?;
            tx.insert_delegation(&d).await?;
            let edge = serde_json::to_value(&d).unwrap_or_default();
            tx.emit(NewEvent::new(
                streams::COORDINATION,
                "delegation.created",
                Some(d.tenant_id),
                edge.clone(),
            ))
            .await?;
            let mut evidence = edge;
            evidence["type"] = json!("delegation_created");
            tx.emit(NewEvent::new(
                streams::AUDIT,
                "delegation.created",
                Some(d.tenant_id),
                evidence,
            ))
            .await?;
            tx.commit().await?;
            self.audit_mint(r, &claims, "delegation")?;
            self.metrics.mints.with_label_values(&["issued", "delegation"]).inc();
            return Ok(self.issued(&token, &claims, &scopes));
        }

        if f.get("actor_token").is_some() {
            return Err(OAuthError::invalid_request(
                "actor_token is only used when the subject is a mandate (delegation)",
            ));
        }
        let p = self
            .authenticate_limited(r, subject_type, f.get("subject_token"))
            .await?;
        if let Some(sid) = req.session {
            self.check_session(p.tenant, p.agent.id, sid).await?;
        }
        let plan = self.plan(&p, &req, None).await?;
        if !plan.approval_rules.is_empty() {
            return self.request_approval(r, &p, &req, &plan.approval_rules).await;
        }
        let token = self.sign(&plan.claims)?;
        self.audit_mint(r, &plan.claims, p.via)?;
        self.metrics.mints.with_label_values(&["issued", p.via]).inc();
        Ok(self.issued(&token, &plan.claims, &plan.scopes))
    }

    /// Delegation limits for `parent`: the configured ones, tightened by every policy its
    /// resources were granted under (the exact versions it was minted with).
    async fn delegation_limits(&self, parent: &VerifiedMandate) -> std::result::Result<(i64, i64), OAuthError> {
        let cfg = &self.rt.config.sts;
        let (mut depth, mut fanout) = (cfg.max_delegation_depth, cfg.max_delegation_fanout);
        let mut seen = std::collections::HashSet::new();
        for rc in &parent.claims.resources {
            if !seen.insert((rc.policy, rc.policy_version)) {
                continue;
            }
            let v = self
                .rt
                .store
                .policy_version(parent.claims.tenant, rc.policy, rc.policy_version)
                .await?;
            let doc: caracal_shared::policy::PolicyDocument = serde_json::from_value(v.normalized)
                .map_err(|_| OAuthError::new("server_error", "a policy version could not be read"))?;
            if let Some(d) = doc.delegation {
                depth = depth.min(d.max_depth.unwrap_or(i64::MAX));
                fanout = fanout.min(d.max_fanout.unwrap_or(i64::MAX));
            }
        }
        Ok((depth, fanout))
    }

    /// A mandate may be bound only to an active session of the agent it is issued to.
    async fn check_session(
        &self,
        tenant: caracal_shared::ids::TenantId,
        agent: caracal_shared::ids::AgentId,
        id: caracal_shared::ids::SessionId,
    ) -> std::result::Result<(), OAuthError> {
        let refuse = || OAuthError::invalid_request("session_id names no active session of this agent");
        let s = match self.rt.store.session(tenant, id).await {
            Ok(s) => s,
            Err(e) if e.code == caracal_shared::error::ErrorCode::NotFound => return Err(refuse()),
            Err(e) => return Err(e.into()),
        };
        if s.agent_id != agent
            || s.effective_status(now_micros()) != caracal_shared::store::coordination::SessionStatus::Active
        {
            return Err(refuse());
        }
        Ok(())
    }

    async fn request_approval(
        &self,
        r: &ApiRequest,
        p: &Principal,
        req: &MintRequest,
        rules: &[String],
    ) -> std::result::Result<Response, OAuthError> {
        let ttl = self.rt.config.sts.approval_ttl;
        let now = now_micros();
        let a = Approval {
            id: ApprovalId::new(),
            tenant_id: p.tenant,
            agent_id: p.agent.id,
            request: json!({ "request": req, "rules": rules, "via": p.via, "credential": p.credential }),
            requester: p.requester(),
            status: ApprovalStatus::Pending,
            created_at: now,
            expires_at: now + caracal_shared::time::micros(ttl),
            decided_at: None,
            decided_by: None,
            reason: None,
            released_at: None,
            mandate_id: None,
            last_polled_at: None,
        };
        let mut tx = self.rt.store.begin().await?;
        tx.insert_approval(&a).await?;
        let notice = json!({ "approval_id": a.id, "agent": a.agent_id, "rules": rules, "request": req, "expires_at": a.expires_at });
        tx.emit(NewEvent::new(
            streams::APPROVALS,
            "approval.requested",
            Some(p.tenant),
            notice.clone(),
        ))
        .await?;
        let mut audit = notice;
        audit["type"] = json!("approval_requested");
        audit["request_id"] = json!(r.ctx.request_id);
        tx.emit(NewEvent::new(
            streams::AUDIT,
            "approval_requested",
            Some(p.tenant),
            audit,
        ))
        .await?;
        tx.commit().await?;
        Err(OAuthError::new(
            "authorization_pending",
            "this request needs a human approval; poll with the approval grant",
        )
        .with_extra(json!({
            "approval_id": a.id,
            "interval": self.rt.config.sts.approval_interval.as_secs().max(1),
            "expires_in": ttl.as_secs(),
        })))
    }

    /// Poll an approval with the same credential that asked.
    async fn poll_approval(&self, r: &ApiRequest, f: &Form) -> std::result::Result<Response, OAuthError> {
        let id = ApprovalId::parse(f.require("approval_id")?)
            .map_err(|_| OAuthError::invalid_request("invalid approval_id"))?;
        let p = self
            .authenticate_limited(r, f.require("subject_token_type")?, f.get("subject_token"))
            .await?;
        let mut tx = self.rt.store.begin().await?;
        let a = tx
            .approval_for_update(Some(p.tenant), id)
            .await
            .map_err(|_| OAuthError::invalid_grant("unknown approval"))?;
        if a.requester != p.requester() {
            return Err(OAuthError::invalid_grant(
                "this approval was requested by another credential",
            ));
        }
        let now = now_micros();
        let interval = caracal_shared::time::micros(self.rt.config.sts.approval_interval);
        match a.effective_status(now) {
            ApprovalStatus::Pending => {
                let too_fast = a.last_polled_at.is_some_and(|t| now - t < interval);
                tx.touch_approval_poll(id).await?;
                tx.commit().await?;
                return Err(if too_fast {
                    OAuthError::new("slow_down", "polling too fast; wait the interval")
                        .with_extra(json!({ "interval": interval / 1_000_000 + 1 }))
                } else {
                    OAuthError::new("authorization_pending", "waiting for an approver")
                        .with_extra(json!({ "interval": interval / 1_000_000 }))
                });
            }
            ApprovalStatus::Denied => {
                return Err(OAuthError::new(
                    "access_denied",
                    a.reason.unwrap_or_else(|| "the request was denied".into()),
                ));
            }
            ApprovalStatus::Expired => return Err(OAuthError::new("expired_token", "the approval request expired")),
            ApprovalStatus::Released => {
                return Err(OAuthError::invalid_grant("the approved mandate was already collected"));
            }
            ApprovalStatus::Approved => {}
        }
        let req: MintRequest = serde_json::from_value(a.request["request"].clone())
            .map_err(|_| OAuthError::new("server_error", "corrupt approval"))?;
        let plan = self.plan(&p, &req, Some(id)).await?;
        let token = self.sign(&plan.claims)?;
        if !tx.release_approval(id, plan.claims.mandate_id).await? {
            return Err(OAuthError::invalid_grant("the approved mandate was already collected"));
        }
        tx.commit().await?;
        self.audit_mint(r, &plan.claims, p.via)?;
        self.metrics.mints.with_label_values(&["issued", "approval"]).inc();
        Ok(self.issued(&token, &plan.claims, &plan.scopes))
    }
}

async fn token(s: Arc<State>, mut r: ApiRequest) -> Result<Response> {
    let started = Instant::now();
    let ct = r
        .header_str(http::header::CONTENT_TYPE)
        .unwrap_or("")
        .to_ascii_lowercase();
    let result: std::result::Result<Response, OAuthError> = async {
        if !ct.starts_with("application/x-www-form-urlencoded") {
            return Err(OAuthError::invalid_request(
                "the token endpoint takes application/x-www-form-urlencoded",
            ));
        }
        let body = r.body_bytes().await.map_err(|e| match e.code {
            ErrorCode::PayloadTooLarge => OAuthError::invalid_request("the request is too large"),
            _ => OAuthError::invalid_request("the request body cannot be read"),
        })?;
        if body.len() > 64 * 1024 {
            return Err(OAuthError::invalid_request("the request is too large"));
        }
        let f = Form::parse(&body)?;
        if r.parts.headers.contains_key(signing::H_SIGNATURE)
            && let Some(cert) = s.service_signed(&r, &body, &f)?
            && r.ctx.client_cert.is_none()
        {
            r.ctx.client_cert = Some(cert);
        }
        match f.require("grant_type")? {
            GT_TOKEN_EXCHANGE => s.exchange(&r, &f).await,
            GT_APPROVAL => s.poll_approval(&r, &f).await,
            other => Err(OAuthError::new(
                "unsupported_grant_type",
                format!("grant type {other:?} is not supported"),
            )),
        }
    }
    .await;
    let outcome = match &result {
        Ok(_) => "issued",
        Err(e) => e.error,
    };
    s.metrics
        .duration
        .with_label_values(&[outcome])
        .observe(started.elapsed().as_secs_f64());
    match result {
        Ok(resp) => Ok(resp),
        Err(e) => {
            if e.error != "authorization_pending" && e.error != "slow_down" {
                s.audit_refusal(&e, &r, None, None);
            }
            s.metrics.mints.with_label_values(&[outcome, "-"]).inc();
            Ok(e.response())
        }
    }
}

async fn keys(s: Arc<State>, _r: ApiRequest) -> Result<Response> {
    let keys = s.rt.store.signing_keys().await?;
    let published: Vec<Value> = caracal_shared::keys::published(&keys)
        .into_iter()
        .map(|k| json!({ "kid": k.kid, "alg": k.alg, "public_key": k.public_key, "state": k.state, "retire_after": k.retire_after }))
        .collect();
    let mut r = json_response(StatusCode::OK, &json!({ "keys": published }));
    r.headers_mut().insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=60"),
    );
    Ok(r)
}

pub fn router() -> Router<State> {
    Router::new()
        .post("/oauth/token", token)
        .get("/.well-known/caracal-keys", keys)
}

/// Build the STS state and its background tasks (key loading, cache invalidation, sweeping).
pub async fn start(rt: Runtime, registry: &Registry) -> Result<Arc<State>> {
    let seal = rt
        .config
        .keys
        .seal
        .clone()
        .ok_or_else(|| Error::new(ErrorCode::ValidationFailed, "the STS needs keys.seal"))?;
    caracal_shared::keys::ensure(&rt.store, &seal).await?;
    let (state, _audit_task) = State::new(rt.clone(), registry)?;
    let state = Arc::new(state);
    state.caches.reload_keys().await?;
    // Control-plane changes invalidate the caches; key changes reload the keys.
    for stream in [streams::CONTROL, streams::KEYS] {
        let st = state.clone();
        let bus = rt.bus.clone();
        let start = bus.last_id(stream).await.unwrap_or_else(|_| "0".into());
        let spec = TailSpec {
            stream: stream.to_string(),
            start,
            block: Duration::from_millis(500),
        };
        tokio::spawn(run_tail(
            bus,
            rt.bus_auth.clone(),
            spec,
            move |ev| {
                st.caches.invalidate();
                if ev.stream == streams::KEYS {
                    let st = st.clone();
                    tokio::spawn(async move {
                        if let Err(e) = st.caches.reload_keys().await {
                            tracing::warn!(error = %e, "cannot reload signing keys");
                        }
                    });
                }
            },
            |_| {},
            rt.shutdown.clone(),
        ));
    }
    // Periodic: reload keys (rotation without events), retire expired keys.
    let st = state.clone();
    let sd = rt.shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(30)) => {}
                _ = sd.wait() => break,
            }
            let _ = caracal_shared::keys::sweep(&st.rt.store).await;
            if let Err(e) = st.caches.reload_keys().await {
                tracing::warn!(error = %e, "cannot reload signing keys");
            }
        }
    });
    Ok(state)
}

/// Serve until shutdown: the HTTP listener, and the mTLS listener when configured.
pub async fn serve(rt: Runtime, listener: TcpListener) -> std::io::Result<()> {
    let registry = rt.service_registry();
    let state = start(rt.clone(), &registry)
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let opts = caracal_shared::http::ServerOptions::from_config(&rt.config.http);
    let mut tasks = Vec::new();
    if let Some(addr) = rt.config.sts.tls_listen {
        let tls = tls::server_config(&rt, state.clone())
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let l = TcpListener::bind(addr).await?;
        let server = caracal_shared::http::HttpServer::new(
            "sts-tls",
            router(),
            state.clone(),
            rt.health(),
            registry.clone(),
            opts.clone(),
        )
        .with_tls(tls);
        let sd = rt.shutdown.clone();
        tasks.push(tokio::spawn(async move { Arc::new(server).serve(l, sd).await }));
    }
    let server = caracal_shared::http::HttpServer::new("sts", router(), state, rt.health(), registry, opts);
    let r = Arc::new(server).serve(listener, rt.shutdown.clone()).await;
    for t in tasks {
        let _ = t.await;
    }
    r
}

pub mod tls;
