//! Handlers for tenants, agents and their credentials, resources, grants, budgets, signing keys
//! and admin tokens. Every tenant-owned read and write goes through the store with the caller's
//! tenant, so another tenant's object is a plain 404.

use std::collections::BTreeMap;
use std::sync::Arc;

use caracal_shared::crypto::Secret;
use caracal_shared::error::{Error, Result};
use caracal_shared::http::{ApiRequest, Response, ok};
use caracal_shared::ids::{
    AdminTokenId, AgentId, BudgetId, CredentialId, GrantId, IdentityId, JwtIssuerId, MtlsCaId, PolicyId, ResourceId,
    TenantId,
};
use caracal_shared::store::admin::{AdminScope, Budget, BudgetScopeKind, BudgetUnit, WindowKind};
use caracal_shared::store::agents::{Agent, ApiKey, Identity, IdentityKind, JwtIssuer, MatchKind, MtlsCa};
use caracal_shared::store::authority::{Revocation, RevocationKind};
use caracal_shared::store::policies::Grant;
use caracal_shared::store::resources::{Injection, Resource, ResourceSettings};
use caracal_shared::time::now_micros;
use http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::State;
use crate::api::{Change, body_json, cursor, if_match, opt_time, read_ok};

type S = Arc<State>;

fn v<T: serde::Serialize>(x: &T) -> Result<Value> {
    Ok(serde_json::to_value(x)?)
}

// ------------------------------------------------------------------ tenants

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewTenant {
    name: String,
    #[serde(default)]
    display_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchTenant {
    display_name: String,
}

pub async fn create_tenant(s: S, mut r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Write).await?;
    if !c.is_platform() {
        return Err(Error::forbidden("only platform tokens create tenants"));
    }
    let (b, raw): (NewTenant, _) = body_json(&mut r).await?;
    s.mutate(&mut r, &c, StatusCode::CREATED, &raw, async |tx| {
        let t = tx
            .insert_tenant(&b.name, b.display_name.as_deref().unwrap_or(&b.name))
            .await?;
        let val = v(&t)?;
        Ok((val.clone(), vec![Change::new("tenant.created", Some(t.id), val)]))
    })
    .await
}

pub async fn list_tenants(s: S, r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Read).await?;
    match c.token.tenant_id {
        None => read_ok(&s.rt.store.list_tenants(&cursor(&r)?).await?),
        Some(t) => read_ok(&json!({ "items": [s.rt.store.tenant(t).await?], "next_cursor": null })),
    }
}

fn tenant_param(r: &ApiRequest, c: &crate::api::Caller) -> Result<TenantId> {
    let id = TenantId::parse(r.param("tenant_id")?)?;
    match c.token.tenant_id {
        Some(own) if own != id => Err(Error::not_found("tenant")),
        _ => Ok(id),
    }
}

pub async fn get_tenant(s: S, r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Read).await?;
    read_ok(&s.rt.store.tenant(tenant_param(&r, &c)?).await?)
}

pub async fn patch_tenant(s: S, mut r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Write).await?;
    let id = tenant_param(&r, &c)?;
    let expected = if_match(&r)?;
    let (b, raw): (PatchTenant, _) = body_json(&mut r).await?;
    s.mutate(&mut r, &c, StatusCode::OK, &raw, async |tx| {
        let t = tx.update_tenant(id, expected, &b.display_name).await?;
        let val = v(&t)?;
        Ok((val.clone(), vec![Change::new("tenant.updated", Some(id), val)]))
    })
    .await
}

pub async fn delete_tenant(s: S, mut r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Write).await?;
    if !c.is_platform() {
        return Err(Error::forbidden("only platform tokens delete tenants"));
    }
    let id = tenant_param(&r, &c)?;
    s.mutate(&mut r, &c, StatusCode::OK, &Default::default(), async |tx| {
        tx.delete_tenant(id).await?;
        Ok((
            json!({ "deleted": id }),
            vec![Change::new("tenant.deleted", Some(id), json!({ "id": id }))],
        ))
    })
    .await
}

// ------------------------------------------------------------------ agents

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewAgent {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchAgent {
    description: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    disabled: Option<bool>,
}

pub async fn create_agent(s: S, mut r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Write).await?;
    let t = c.tenant()?;
    let (b, raw): (NewAgent, _) = body_json(&mut r).await?;
    s.mutate(&mut r, &c, StatusCode::CREATED, &raw, async |tx| {
        let a = tx.insert_agent(t, &b.name, &b.description, &b.labels).await?;
        let val = v(&a)?;
        Ok((val.clone(), vec![Change::new("agent.created", Some(t), val)]))
    })
    .await
}

pub async fn list_agents(s: S, r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Read).await?;
    read_ok(&s.rt.store.list::<Agent>(c.tenant()?, &cursor(&r)?).await?)
}

pub async fn get_agent(s: S, r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Read).await?;
    read_ok(&s.rt.store.get::<Agent>(c.tenant()?, r.param("agent_id")?).await?)
}

pub async fn patch_agent(s: S, mut r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Write).await?;
    let t = c.tenant()?;
    let id = AgentId::parse(r.param("agent_id")?)?;
    let expected = if_match(&r)?;
    let (b, raw): (PatchAgent, _) = body_json(&mut r).await?;
    s.mutate(&mut r, &c, StatusCode::OK, &raw, async |tx| {
        let mut a: Agent = tx.get(t, &id.to_string()).await?;
        if let Some(d) = b.description {
            a.description = d;
        }
        if let Some(l) = b.labels {
            a.labels = l;
        }
        let disabled_now = b.disabled == Some(true) && !a.disabled;
        if let Some(d) = b.disabled {
            a.disabled = d;
        }
        let a = tx.save_agent(&a, expected).await?;
        let val = v(&a)?;
        let mut changes = vec![Change::new("agent.updated", Some(t), val.clone())];
        if disabled_now {
            tx.revoke(&[Revocation::now(
                t,
                RevocationKind::Agent,
                id.to_string(),
                "agent disabled",
            )])
            .await?;
            changes.push(Change::new("agent.disabled", Some(t), json!({ "id": id })));
        }
        Ok((val, changes))
    })
    .await
}

pub async fn delete_agent(s: S, mut r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Write).await?;
    let t = c.tenant()?;
    let id = AgentId::parse(r.param("agent_id")?)?;
    s.mutate(&mut r, &c, StatusCode::OK, &Default::default(), async |tx| {
        tx.delete::<Agent>(t, &id.to_string()).await?;
        tx.revoke(&[Revocation::now(
            t,
            RevocationKind::Agent,
            id.to_string(),
            "agent deleted",
        )])
        .await?;
        Ok((
            json!({ "deleted": id }),
            vec![Change::new("agent.deleted", Some(t), json!({ "id": id }))],
        ))
    })
    .await
}

// ------------------------------------------------------------------ API keys

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKey {
    #[serde(default = "default_key_name")]
    name: String,
    expires_at: Option<String>,
}

fn default_key_name() -> String {
    "default".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateKey {
    /// How long the old key keeps working (default 1 hour).
    #[serde(default = "default_overlap")]
    overlap_secs: i64,
}

fn default_overlap() -> i64 {
    3600
}

pub async fn issue_api_key(s: S, mut r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Write).await?;
    let t = c.tenant()?;
    let agent = AgentId::parse(r.param("agent_id")?)?;
    let (b, raw): (NewKey, _) = body_json(&mut r).await?;
    if b.name.is_empty() || b.name.len() > 128 {
        return Err(Error::validation("name must be 1-128 characters"));
    }
    let expires = opt_time("expires_at", &b.expires_at)?;
    let pepper = s.pepper.clone();
    s.mutate(&mut r, &c, StatusCode::CREATED, &raw, async |tx| {
        let issued = tx.issue_api_key(&pepper, t, agent, &b.name, expires).await?;
        let key = v(&issued.key)?;
        Ok((
            json!({ "key": key, "secret": issued.secret, "note": "store the secret now: it is shown exactly once" }),
            vec![Change::new("credential.issued", Some(t), key)],
        ))
    })
    .await
}

pub async fn list_api_keys(s: S, r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Read).await?;
    let t = c.tenant()?;
    let agent = AgentId::parse(r.param("agent_id")?)?;
    s.rt.store.get::<Agent>(t, &agent.to_string()).await?;
    ok(&json!({ "items": s.rt.store.api_keys_of(t, agent).await?, "next_cursor": null }))
}

async fn key_of_agent(s: &State, t: TenantId, r: &ApiRequest) -> Result<(AgentId, CredentialId)> {
    let agent = AgentId::parse(r.param("agent_id")?)?;
    let id = CredentialId::parse(r.param("key_id")?)?;
    let k: ApiKey = s.rt.store.get(t, &id.to_string()).await?;
    if k.agent_id != agent {
        return Err(Error::not_found("API key"));
    }
    Ok((agent, id))
}

pub async fn revoke_api_key(s: S, mut r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Write).await?;
    let t = c.tenant()?;
    let (_, id) = key_of_agent(&s, t, &r).await?;
    s.mutate(&mut r, &c, StatusCode::OK, &Default::default(), async |tx| {
        let k = tx.revoke_api_key(t, id).await?;
        tx.revoke(&[Revocation::now(
            t,
            RevocationKind::Credential,
            id.to_string(),
            "API key revoked",
        )])
        .await?;
        let val = v(&k)?;
        Ok((val.clone(), vec![Change::new("credential.revoked", Some(t), val)]))
    })
    .await
}

pub async fn rotate_api_key(s: S, mut r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Write).await?;
    let t = c.tenant()?;
    let (_, id) = key_of_agent(&s, t, &r).await?;
    let (b, raw): (RotateKey, _) = body_json(&mut r).await?;
    if !(0..=30 * 86_400).contains(&b.overlap_secs) {
        return Err(Error::validation("overlap_secs must be between 0 and 2592000"));
    }
    let pepper = s.pepper.clone();
    s.mutate(&mut r, &c, StatusCode::CREATED, &raw, async |tx| {
        let (old, new) = tx.rotate_api_key(&pepper, t, id, b.overlap_secs * 1_000_000).await?;
        let (old, newk) = (v(&old)?, v(&new.key)?);
        Ok((
            json!({ "old": old, "new": { "key": newk, "secret": new.secret } }),
            vec![Change::new(
                "credential.rotated",
                Some(t),
                json!({ "old": old, "new": newk }),
            )],
        ))
    })
    .await
}

// ------------------------------------------------------------------ identities

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewIdentity {
    kind: IdentityKind,
    issuer_id: Option<JwtIssuerId>,
    ca_id: Option<MtlsCaId>,
    #[serde(rename = "match")]
    match_kind: Option<MatchKind>,
    subject: String,
}

pub async fn create_identity(s: S, mut r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Write).await?;
    let t = c.tenant()?;
    let agent = AgentId::parse(r.param("agent_id")?)?;
    let (b, raw): (NewIdentity, _) = body_json(&mut r).await?;
    let match_kind = b.match_kind.unwrap_or(match b.kind {
        IdentityKind::Jwt => MatchKind::Subject,
        IdentityKind::Mtls => MatchKind::SanUri,
    });
    let ident = Identity {
        id: IdentityId::new(),
        tenant_id: t,
        agent_id: agent,
        kind: b.kind,
        issuer_id: b.issuer_id,
        ca_id: b.ca_id,
        match_kind,
        subject: b.subject,
        created_at: now_micros(),
    };
    s.mutate(&mut r, &c, StatusCode::CREATED, &raw, async |tx| {
        let i = tx.insert_identity(&ident).await?;
        let val = v(&i)?;
        Ok((val.clone(), vec![Change::new("identity.created", Some(t), val)]))
    })
    .await
}

pub async fn list_identities(s: S, r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Read).await?;
    let t = c.tenant()?;
    let agent = AgentId::parse(r.param("agent_id")?)?;
    s.rt.store.get::<Agent>(t, &agent.to_string()).await?;
    ok(&json!({ "items": s.rt.store.identities_of(t, agent).await?, "next_cursor": null }))
}

pub async fn delete_identity(s: S, mut r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Write).await?;
    let t = c.tenant()?;
    let agent = AgentId::parse(r.param("agent_id")?)?;
    let id = IdentityId::parse(r.param("identity_id")?)?;
    let i: Identity = s.rt.store.get(t, &id.to_string()).await?;
    if i.agent_id != agent {
        return Err(Error::not_found("identity"));
    }
    s.mutate(&mut r, &c, StatusCode::OK, &Default::default(), async |tx| {
        tx.delete::<Identity>(t, &id.to_string()).await?;
        tx.revoke(&[Revocation::now(
            t,
            RevocationKind::Credential,
            id.to_string(),
            "identity removed",
        )])
        .await?;
        Ok((
            json!({ "deleted": id }),
            vec![Change::new(
                "credential.revoked",
                Some(t),
                json!({ "identity_id": id, "agent_id": agent }),
            )],
        ))
    })
    .await
}

// ------------------------------------------------------------------ JWT issuers

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IssuerBody {
    name: Option<String>,
    issuer: Option<String>,
    audiences: Option<Vec<String>>,
    jwks_url: Option<String>,
    jwks: Option<Value>,
    subject_claim: Option<String>,
    max_skew_secs: Option<i64>,
}

pub async fn create_issuer(s: S, mut r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Write).await?;
    let t = c.tenant()?;
    let (b, raw): (IssuerBody, _) = body_json(&mut r).await?;
    let now = now_micros();
    let i = JwtIssuer {
        id: JwtIssuerId::new(),
        tenant_id: t,
        name: b.name.ok_or_else(|| Error::validation("name is required"))?,
        issuer: b.issuer.ok_or_else(|| Error::validation("issuer is required"))?,
        audiences: b.audiences.unwrap_or_default(),
        jwks_url: b.jwks_url,
        jwks: b.jwks,
        subject_claim: b.subject_claim.unwrap_or_else(|| "sub".into()),
        max_skew_secs: b.max_skew_secs.unwrap_or(60),
        version: 1,
        created_at: now,
        updated_at: now,
    };
    s.mutate(&mut r, &c, StatusCode::CREATED, &raw, async |tx| {
        let i = tx.upsert_jwt_issuer(&i, None, true).await?;
        let val = v(&i)?;
        Ok((val.clone(), vec![Change::new("jwt_issuer.created", Some(t), val)]))
    })
    .await
}

pub async fn list_issuers(s: S, r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Read).await?;
    read_ok(&s.rt.store.list::<JwtIssuer>(c.tenant()?, &cursor(&r)?).await?)
}

pub async fn get_issuer(s: S, r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Read).await?;
    read_ok(&s.rt.store.get::<JwtIssuer>(c.tenant()?, r.param("issuer_id")?).await?)
}

pub async fn patch_issuer(s: S, mut r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Write).await?;
    let t = c.tenant()?;
    let id = JwtIssuerId::parse(r.param("issuer_id")?)?;
    let expected = if_match(&r)?;
    let (b, raw): (IssuerBody, _) = body_json(&mut r).await?;
    if b.name.is_some() {
        return Err(Error::validation("name cannot be changed"));
    }
    s.mutate(&mut r, &c, StatusCode::OK, &raw, async |tx| {
        let mut i: JwtIssuer = tx.get(t, &id.to_string()).await?;
        if let Some(x) = b.issuer {
            i.issuer = x;
        }
        if let Some(x) = b.audiences {
            i.audiences = x;
        }
        if b.jwks_url.is_some() || b.jwks.is_some() {
            i.jwks_url = b.jwks_url;
            i.jwks = b.jwks;
        }
        if let Some(x) = b.subject_claim {
            i.subject_claim = x;
        }
        if let Some(x) = b.max_skew_secs {
            i.max_skew_secs = x;
        }
        let i = tx.upsert_jwt_issuer(&i, expected, false).await?;
        let val = v(&i)?;
        Ok((val.clone(), vec![Change::new("jwt_issuer.updated", Some(t), val)]))
    })
    .await
}

pub async fn delete_issuer(s: S, mut r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Write).await?;
    let t = c.tenant()?;
    let id = JwtIssuerId::parse(r.param("issuer_id")?)?;
    s.mutate(&mut r, &c, StatusCode::OK, &Default::default(), async |tx| {
        tx.delete::<JwtIssuer>(t, &id.to_string()).await?;
        Ok((
            json!({ "deleted": id }),
            vec![Change::new("jwt_issuer.deleted", Some(t), json!({ "id": id }))],
        ))
    })
    .await
}

// ------------------------------------------------------------------ mTLS CAs

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewCa {
    name: String,
    ca_pem: String,
}

pub async fn create_ca(s: S, mut r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Write).await?;
    let t = c.tenant()?;
    let (b, raw): (NewCa, _) = body_json(&mut r).await?;
    s.mutate(&mut r, &c, StatusCode::CREATED, &raw, async |tx| {
        let ca = tx.insert_mtls_ca(t, &b.name, &b.ca_pem).await?;
        let val = v(&ca)?;
        Ok((
            val.clone(),
            vec![Change::new(
                "mtls_ca.created",
                Some(t),
                json!({ "id": ca.id, "name": ca.name, "fingerprint": ca.fingerprint }),
            )],
        ))
    })
    .await
}

pub async fn list_cas(s: S, r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Read).await?;
    read_ok(&s.rt.store.list::<MtlsCa>(c.tenant()?, &cursor(&r)?).await?)
}

pub async fn get_ca(s: S, r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Read).await?;
    read_ok(&s.rt.store.get::<MtlsCa>(c.tenant()?, r.param("ca_id")?).await?)
}

pub async fn delete_ca(s: S, mut r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Write).await?;
    let t = c.tenant()?;
    let id = MtlsCaId::parse(r.param("ca_id")?)?;
    s.mutate(&mut r, &c, StatusCode::OK, &Default::default(), async |tx| {
        tx.delete::<MtlsCa>(t, &id.to_string()).await?;
        Ok((
            json!({ "deleted": id }),
            vec![Change::new("mtls_ca.deleted", Some(t), json!({ "id": id }))],
        ))
    })
    .await
}

// ------------------------------------------------------------------ resources

/// An upstream credential as submitted (write-only).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialBody {
    pub value: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl CredentialBody {
    pub fn secret(self) -> Result<Secret> {
        match (self.value, self.username, self.password) {
            (Some(v), None, None) => Ok(Secret::new(v.into_bytes())),
            (None, Some(u), Some(p)) => {
                if u.contains(':') {
                    return Err(Error::validation("username cannot contain ':'"));
                }
                Ok(Secret::new(format!("{u}:{p}").into_bytes()))
            }
            _ => Err(Error::validation("give either value, or username and password")),
        }
    }
}

impl std::fmt::Debug for CredentialBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CredentialBody(***)")
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResourceBody {
    name: Option<String>,
    description: Option<String>,
    base_url: Option<String>,
    hosts: Option<Vec<String>>,
    inject: Option<Injection>,
    credential: Option<CredentialBody>,
    settings: Option<ResourceSettings>,
}

pub async fn create_resource(s: S, mut r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Write).await?;
    let t = c.tenant()?;
    let (b, raw): (ResourceBody, _) = body_json(&mut r).await?;
    let now = now_micros();
    let res = Resource {
        id: ResourceId::new(),
        tenant_id: t,
        name: b.name.ok_or_else(|| Error::validation("name is required"))?,
        description: b.description.unwrap_or_default(),
        base_url: b.base_url.ok_or_else(|| Error::validation("base_url is required"))?,
        hosts: b.hosts.unwrap_or_default(),
        inject: b.inject.unwrap_or(Injection {
            kind: caracal_shared::store::resources::InjectKind::Bearer,
            name: None,
        }),
        has_credential: false,
        credential_version: 0,
        settings: b.settings.unwrap_or_default(),
        version: 1,
        created_at: now,
        updated_at: now,
    };
    let cred = b.credential.map(CredentialBody::secret).transpose()?;
    let seal = s.seal.clone();
    s.mutate(&mut r, &c, StatusCode::CREATED, &raw, async |tx| {
        let mut created = tx.insert_resource(&res).await?;
        if let Some(secret) = &cred {
            created = tx.set_resource_credential(&seal, t, created.id, Some(secret)).await?;
        }
        let val = v(&created)?;
        Ok((val.clone(), vec![Change::new("resource.created", Some(t), val)]))
    })
    .await
}

pub async fn list_resources(s: S, r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Read).await?;
    read_ok(&s.rt.store.list::<Resource>(c.tenant()?, &cursor(&r)?).await?)
}

pub async fn get_resource(s: S, r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Read).await?;
    read_ok(&s.rt.store.get::<Resource>(c.tenant()?, r.param("resource_id")?).await?)
}

pub async fn patch_resource(s: S, mut r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Write).await?;
    let t = c.tenant()?;
    let id = ResourceId::parse(r.param("resource_id")?)?;
    let expected = if_match(&r)?;
    let (b, raw): (ResourceBody, _) = body_json(&mut r).await?;
    if b.name.is_some() {
        return Err(Error::validation("name cannot be changed"));
    }
    let cred = b.credential.map(CredentialBody::secret).transpose()?;
    let seal = s.seal.clone();
    s.mutate(&mut r, &c, StatusCode::OK, &raw, async |tx| {
        let mut res: Resource = tx.get(t, &id.to_string()).await?;
        if let Some(x) = b.description {
            res.description = x;
        }
        if let Some(x) = b.base_url {
            res.base_url = x;
        }
        if let Some(x) = b.hosts {
            res.hosts = x;
        }
        if let Some(x) = b.inject {
            res.inject = x;
        }
        if let Some(x) = b.settings {
            res.settings = x;
        }
        let mut saved = tx.save_resource(&res, expected).await?;
        if let Some(secret) = &cred {
            saved = tx.set_resource_credential(&seal, t, id, Some(secret)).await?;
        }
        let val = v(&saved)?;
        Ok((val.clone(), vec![Change::new("resource.updated", Some(t), val)]))
    })
    .await
}

pub async fn put_credential(s: S, mut r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Write).await?;
    let t = c.tenant()?;
    let id = ResourceId::parse(r.param("resource_id")?)?;
    let (b, raw): (CredentialBody, _) = body_json(&mut r).await?;
    let secret = b.secret()?;
    let seal = s.seal.clone();
    s.mutate(&mut r, &c, StatusCode::OK, &raw, async |tx| {
        let res = tx.set_resource_credential(&seal, t, id, Some(&secret)).await?;
        let val = v(&res)?;
        Ok((
            val.clone(),
            vec![Change::new(
                "resource.credential_set",
                Some(t),
                json!({ "id": id, "credential_version": res.credential_version }),
            )],
        ))
    })
    .await
}

pub async fn delete_credential(s: S, mut r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Write).await?;
    let t = c.tenant()?;
    let id = ResourceId::parse(r.param("resource_id")?)?;
    let seal = s.seal.clone();
    s.mutate(&mut r, &c, StatusCode::OK, &Default::default(), async |tx| {
        let res = tx.set_resource_credential(&seal, t, id, None).await?;
        let val = v(&res)?;
        Ok((
            val.clone(),
            vec![Change::new("resource.credential_removed", Some(t), json!({ "id": id }))],
        ))
    })
    .await
}

pub async fn delete_resource(s: S, mut r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Write).await?;
    let t = c.tenant()?;
    let id = ResourceId::parse(r.param("resource_id")?)?;
    s.mutate(&mut r, &c, StatusCode::OK, &Default::default(), async |tx| {
        tx.delete::<Resource>(t, &id.to_string()).await?;
        Ok((
            json!({ "deleted": id }),
            vec![Change::new("resource.deleted", Some(t), json!({ "id": id }))],
        ))
    })
    .await
}

// ------------------------------------------------------------------ grants

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantBody {
    agent_id: Option<AgentId>,
    resource_id: Option<ResourceId>,
    policy_id: Option<PolicyId>,
    scopes: Option<Vec<String>>,
    max_lifetime_secs: Option<i64>,
}

pub async fn create_grant(s: S, mut r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Write).await?;
    let t = c.tenant()?;
    let (b, raw): (GrantBody, _) = body_json(&mut r).await?;
    let now = now_micros();
    let g = Grant {
        id: GrantId::new(),
        tenant_id: t,
        agent_id: b.agent_id.ok_or_else(|| Error::validation("agent_id is required"))?,
        resource_id: b
            .resource_id
            .ok_or_else(|| Error::validation("resource_id is required"))?,
        policy_id: b.policy_id.ok_or_else(|| Error::validation("policy_id is required"))?,
        scopes: b.scopes.unwrap_or_else(|| vec!["*".into()]),
        max_lifetime_secs: b.max_lifetime_secs.unwrap_or(900),
        version: 1,
        created_at: now,
        updated_at: now,
    };
    s.mutate(&mut r, &c, StatusCode::CREATED, &raw, async |tx| {
        let g = tx.upsert_grant(&g, None, true).await?;
        let val = v(&g)?;
        Ok((val.clone(), vec![Change::new("grant.created", Some(t), val)]))
    })
    .await
}

pub async fn list_grants(s: S, r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Read).await?;
    read_ok(&s.rt.store.list::<Grant>(c.tenant()?, &cursor(&r)?).await?)
}

pub async fn get_grant(s: S, r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Read).await?;
    read_ok(&s.rt.store.get::<Grant>(c.tenant()?, r.param("grant_id")?).await?)
}

pub async fn patch_grant(s: S, mut r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Write).await?;
    let t = c.tenant()?;
    let id = GrantId::parse(r.param("grant_id")?)?;
    let expected = if_match(&r)?;
    let (b, raw): (GrantBody, _) = body_json(&mut r).await?;
    if b.agent_id.is_some() || b.resource_id.is_some() {
        return Err(Error::validation(
            "agent_id and resource_id cannot be changed; create another grant",
        ));
    }
    s.mutate(&mut r, &c, StatusCode::OK, &raw, async |tx| {
        let mut g: Grant = tx.get(t, &id.to_string()).await?;
        if let Some(x) = b.policy_id {
            g.policy_id = x;
        }
        if let Some(x) = b.scopes {
            g.scopes = x;
        }
        if let Some(x) = b.max_lifetime_secs {
            g.max_lifetime_secs = x;
        }
        let g = tx.upsert_grant(&g, expected, false).await?;
        let val = v(&g)?;
        Ok((val.clone(), vec![Change::new("grant.updated", Some(t), val)]))
    })
    .await
}

pub async fn delete_grant(s: S, mut r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Write).await?;
    let t = c.tenant()?;
    let id = GrantId::parse(r.param("grant_id")?)?;
    s.mutate(&mut r, &c, StatusCode::OK, &Default::default(), async |tx| {
        tx.delete::<Grant>(t, &id.to_string()).await?;
        Ok((
            json!({ "deleted": id }),
            vec![Change::new("grant.deleted", Some(t), json!({ "id": id }))],
        ))
    })
    .await
}

// ------------------------------------------------------------------ budgets

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetScopeBody {
    pub kind: BudgetScopeKind,
    pub id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowBody {
    pub kind: WindowKind,
    #[serde(default = "utc")]
    pub tz: String,
    pub rolling_secs: Option<i64>,
}

fn utc() -> String {
    "UTC".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BudgetBody {
    name: Option<String>,
    scope: Option<BudgetScopeBody>,
    unit: Option<BudgetUnit>,
    limit: Option<i64>,
    window: Option<WindowBody>,
    hard: Option<bool>,
}

/// A budget with its current window's usage.
pub async fn budget_view(s: &State, b: &Budget) -> Result<Value> {
    let now = now_micros();
    let (start, end) = caracal_shared::budget::window_bounds(b, now);
    let u = s.budget_usage(b).await?;
    let resets = caracal_shared::budget_ledger::window_of(b, now).resets_at;
    let mut val = v(b)?;
    val["usage"] = json!({
        "window_start": caracal_shared::time::rfc3339(start),
        "window_end": caracal_shared::time::rfc3339(end),
        "resets_at": caracal_shared::time::rfc3339(resets),
        "spent": u.spent,
        "reserved": u.reserved,
        "leases": u.leases,
        "remaining": (b.limit - u.spent - u.reserved).max(0),
    });
    Ok(val)
}

pub async fn create_budget(s: S, mut r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Write).await?;
    let t = c.tenant()?;
    let (b, raw): (BudgetBody, _) = body_json(&mut r).await?;
    let scope = b.scope.unwrap_or(BudgetScopeBody {
        kind: BudgetScopeKind::Tenant,
        id: None,
    });
    let window = b.window.unwrap_or(WindowBody {
        kind: WindowKind::Monthly,
        tz: utc(),
        rolling_secs: None,
    });
    let now = now_micros();
    let budget = Budget {
        id: BudgetId::new(),
        tenant_id: t,
        name: b.name.ok_or_else(|| Error::validation("name is required"))?,
        scope_kind: scope.kind,
        scope_id: scope.id,
        unit: b
            .unit
            .ok_or_else(|| Error::validation("unit is required (micros, tokens or requests)"))?,
        limit: b.limit.ok_or_else(|| Error::validation("limit is required"))?,
        window: window.kind,
        window_tz: window.tz,
        rolling_secs: window.rolling_secs,
        hard: b.hard.unwrap_or(true),
        version: 1,
        created_at: now,
        updated_at: now,
    };
    s.mutate(&mut r, &c, StatusCode::CREATED, &raw, async |tx| {
        let b = tx.upsert_budget(&budget, None, true).await?;
        let val = v(&b)?;
        Ok((val.clone(), vec![Change::new("budget.created", Some(t), val)]))
    })
    .await
}

pub async fn list_budgets(s: S, r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Read).await?;
    let page = s.rt.store.list::<Budget>(c.tenant()?, &cursor(&r)?).await?;
    let mut items = Vec::with_capacity(page.items.len());
    for b in &page.items {
        items.push(budget_view(&s, b).await?);
    }
    ok(&json!({ "items": items, "next_cursor": page.next_cursor }))
}

pub async fn get_budget(s: S, r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Read).await?;
    let b: Budget = s.rt.store.get(c.tenant()?, r.param("budget_id")?).await?;
    read_ok(&budget_view(&s, &b).await?)
}

pub async fn patch_budget(s: S, mut r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Write).await?;
    let t = c.tenant()?;
    let id = BudgetId::parse(r.param("budget_id")?)?;
    let expected = if_match(&r)?;
    let (b, raw): (BudgetBody, _) = body_json(&mut r).await?;
    if b.name.is_some() || b.scope.is_some() {
        return Err(Error::validation("name and scope cannot be changed"));
    }
    s.mutate(&mut r, &c, StatusCode::OK, &raw, async |tx| {
        let mut cur: Budget = tx.get(t, &id.to_string()).await?;
        if let Some(x) = b.unit {
            cur.unit = x;
        }
        if let Some(x) = b.limit {
            cur.limit = x;
        }
        if let Some(w) = b.window {
            cur.window = w.kind;
            cur.window_tz = w.tz;
            cur.rolling_secs = w.rolling_secs;
        }
        if let Some(x) = b.hard {
            cur.hard = x;
        }
        let b = tx.upsert_budget(&cur, expected, false).await?;
        let val = v(&b)?;
        Ok((val.clone(), vec![Change::new("budget.updated", Some(t), val)]))
    })
    .await
}

pub async fn delete_budget(s: S, mut r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Write).await?;
    let t = c.tenant()?;
    let id = BudgetId::parse(r.param("budget_id")?)?;
    s.mutate(&mut r, &c, StatusCode::OK, &Default::default(), async |tx| {
        tx.delete::<Budget>(t, &id.to_string()).await?;
        Ok((
            json!({ "deleted": id }),
            vec![Change::new("budget.deleted", Some(t), json!({ "id": id }))],
        ))
    })
    .await
}

// ------------------------------------------------------------------ signing keys

pub async fn list_keys(s: S, r: ApiRequest) -> Result<Response> {
    s.auth(&r, AdminScope::Read).await?;
    ok(&json!({ "items": s.rt.store.signing_keys().await? }))
}

pub async fn rotate_keys(s: S, r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Write).await?;
    if !c.is_platform() {
        return Err(Error::forbidden("only platform tokens rotate signing keys"));
    }
    let keys = caracal_shared::keys::rotate(&s.rt.store, &s.seal).await?;
    let mut tx = s.rt.store.begin().await?;
    tx.emit(caracal_shared::store::outbox::NewEvent::new(
        caracal_shared::bus::streams::AUDIT,
        "admin.change",
        None,
        json!({ "type": "admin_change", "change": "keys.rotated", "actor": c.actor(), "request_id": r.ctx.request_id }),
    ))
    .await?;
    tx.commit().await?;
    ok(&json!({ "items": keys }))
}

// ------------------------------------------------------------------ admin tokens

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    name: String,
    scopes: Vec<AdminScope>,
    /// Platform tokens may issue a token for a tenant; tenant tokens issue for their own.
    tenant_id: Option<TenantId>,
    expires_at: Option<String>,
}

pub async fn create_token(s: S, mut r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Write).await?;
    let (b, raw): (NewToken, _) = body_json(&mut r).await?;
    let tenant = match (c.token.tenant_id, b.tenant_id) {
        (Some(own), None) => Some(own),
        (Some(own), Some(t)) if own == t => Some(own),
        (Some(_), Some(_)) => return Err(Error::not_found("tenant")),
        (None, t) => {
            if let Some(t) = t {
                s.rt.store.tenant(t).await?;
            }
            t
        }
    };
    // A token never grants scopes its issuer lacks.
    if let Some(missing) = b.scopes.iter().find(|sc| !c.token.scopes.contains(sc)) {
        return Err(Error::forbidden(format!(
            "cannot grant the {missing:?} scope, which this token lacks"
        )));
    }
    let expires = opt_time("expires_at", &b.expires_at)?;
    let pepper = s.pepper.clone();
    s.mutate(&mut r, &c, StatusCode::CREATED, &raw, async |tx| {
        let (t, secret) = tx
            .issue_admin_token(&pepper, tenant, &b.name, &b.scopes, expires)
            .await?;
        let val = v(&t)?;
        Ok((
            json!({ "token": val, "secret": secret, "note": "store the secret now: it is shown exactly once" }),
            vec![Change::new("admin_token.created", tenant, val)],
        ))
    })
    .await
}

pub async fn list_tokens(s: S, r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Read).await?;
    ok(&json!({ "items": s.rt.store.admin_tokens(c.token.tenant_id).await?, "next_cursor": null }))
}

pub async fn revoke_token(s: S, mut r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Write).await?;
    let id = AdminTokenId::parse(r.param("token_id")?)?;
    let tenant = c.token.tenant_id;
    s.mutate(&mut r, &c, StatusCode::OK, &Default::default(), async |tx| {
        tx.revoke_admin_token(tenant, id).await?;
        Ok((
            json!({ "revoked": id }),
            vec![Change::new("admin_token.revoked", tenant, json!({ "id": id }))],
        ))
    })
    .await
}

// ------------------------------------------------------------------ approvals

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Decision {
    reason: Option<String>,
}

pub async fn list_approvals(s: S, r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Approve).await?;
    let status = match r.query_param("status").as_deref() {
        None => None,
        Some(x) => Some(
            serde_json::from_value(json!(x))
                .map_err(|_| Error::validation("status must be pending, approved, denied, expired or released"))?,
        ),
    };
    ok(&json!({ "items": s.rt.store.approvals(c.tenant()?, status).await?, "next_cursor": null }))
}

pub async fn get_approval(s: S, r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Approve).await?;
    let id = caracal_shared::ids::ApprovalId::parse(r.param("approval_id")?)?;
    read_ok(&s.rt.store.approval(c.tenant()?, id).await?)
}

async fn decide(s: S, mut r: ApiRequest, approve: bool) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Approve).await?;
    let t = c.tenant()?;
    let id = caracal_shared::ids::ApprovalId::parse(r.param("approval_id")?)?;
    let raw = r.body_bytes().await?;
    let b: Decision = if raw.is_empty() {
        Decision { reason: None }
    } else {
        caracal_shared::http::parse_json(&raw)?
    };
    if b.reason.as_ref().is_some_and(|x| x.len() > 1024) {
        return Err(Error::validation("reason is at most 1024 characters"));
    }
    let by = format!("{} ({})", c.token.name, c.token.id);
    s.mutate(&mut r, &c, StatusCode::OK, &raw, async |tx| {
        let a = tx.decide_approval(t, id, approve, &by, b.reason.as_deref()).await?;
        let val = v(&a)?;
        let kind = if approve {
            "approval.approved"
        } else {
            "approval.denied"
        };
        tx.emit(caracal_shared::store::outbox::NewEvent::new(
            caracal_shared::bus::streams::APPROVALS,
            kind,
            Some(t),
            json!({ "approval_id": id }),
        ))
        .await?;
        Ok((val.clone(), vec![Change::new(kind, Some(t), val)]))
    })
    .await
}

pub async fn approve(s: S, r: ApiRequest) -> Result<Response> {
    decide(s, r, true).await
}

pub async fn deny(s: S, r: ApiRequest) -> Result<Response> {
    decide(s, r, false).await
}
