//! Agents and their workload credentials: API keys (stored only as a keyed hash), trusted JWT
//! issuers, trusted mTLS CAs and the identities that bind a JWT subject or a certificate name
//! to an agent.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::entity::{Entity, check_version, conflict_on_unique, entity_sql};
use super::{Store, Tx, read, tx_exec};
use crate::crypto::KeyRing;
use crate::error::{Error, ErrorCode, Result};
use crate::ids::{AgentId, CredentialId, IdentityId, JwtIssuerId, MtlsCaId, TenantId};
use crate::time::{Micros, now_micros};

// ---------------------------------------------------------------- agents

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Agent {
    pub id: AgentId,
    pub tenant_id: TenantId,
    pub name: String,
    pub description: String,
    pub labels: BTreeMap<String, String>,
    pub disabled: bool,
    pub version: i64,
    pub created_at: Micros,
    pub updated_at: Micros,
}

type AgentRow = (String, String, String, String, String, i64, i64, i64, i64);

impl Entity for Agent {
    type Row = AgentRow;
    const WHAT: &'static str = "agent";
    entity_sql!(
        "agents",
        "id, tenant_id, name, description, labels, disabled, version, created_at, updated_at"
    );
    fn from_row(r: AgentRow) -> Result<Agent> {
        Ok(Agent {
            id: AgentId::parse(&r.0)?,
            tenant_id: TenantId::parse(&r.1)?,
            name: r.2,
            description: r.3,
            labels: serde_json::from_str(&r.4).unwrap_or_default(),
            disabled: r.5 != 0,
            version: r.6,
            created_at: r.7,
            updated_at: r.8,
        })
    }
    fn id_string(&self) -> String {
        self.id.to_string()
    }
}

pub fn validate_labels(labels: &BTreeMap<String, String>) -> Result<()> {
    if labels.len() > 64 {
        return Err(Error::validation("at most 64 labels"));
    }
    for (k, v) in labels {
        if k.is_empty() || k.len() > 63 || v.len() > 256 {
            return Err(Error::validation(
                "label keys are 1-63 characters and values at most 256",
            ));
        }
    }
    Ok(())
}

impl Tx {
    pub async fn insert_agent(
        &mut self,
        tenant: TenantId,
        name: &str,
        description: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<Agent> {
        crate::store::tenants::validate_slug("name", name)?;
        validate_labels(labels)?;
        let now = now_micros();
        let a = Agent {
            id: AgentId::new(),
            tenant_id: tenant,
            name: name.into(),
            description: description.into(),
            labels: labels.clone(),
            disabled: false,
            version: 1,
            created_at: now,
            updated_at: now,
        };
        tx_exec!(self, sqlx::query(
            "INSERT INTO agents (id, tenant_id, name, description, labels, disabled, version, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, 0, 1, $6, $6)")
            .bind(a.id.to_string()).bind(tenant.to_string()).bind(name).bind(description)
            .bind(serde_json::to_string(labels)?).bind(now))
        .map_err(|e| conflict_on_unique(e, format!("an agent named {name:?} already exists")))?;
        Ok(a)
    }

    /// Write back a modified agent if its version is still `expected` (then bumps it).
    pub async fn save_agent(&mut self, a: &Agent, expected: Option<i64>) -> Result<Agent> {
        let cur: Agent = self.get(a.tenant_id, &a.id.to_string()).await?;
        check_version("agent", expected, cur.version)?;
        validate_labels(&a.labels)?;
        let now = now_micros();
        let n =
            tx_exec!(self, sqlx::query(
            "UPDATE agents SET description = $1, labels = $2, disabled = $3, version = version + 1, updated_at = $4
             WHERE tenant_id = $5 AND id = $6 AND version = $7")
            .bind(&a.description).bind(serde_json::to_string(&a.labels)?).bind(a.disabled as i64).bind(now)
            .bind(a.tenant_id.to_string()).bind(a.id.to_string()).bind(cur.version))?;
        if n != 1 {
            return Err(Error::new(
                ErrorCode::PreconditionFailed,
                "the agent was modified concurrently",
            ));
        }
        Ok(Agent {
            version: cur.version + 1,
            updated_at: now,
            created_at: cur.created_at,
            name: cur.name,
            ..a.clone()
        })
    }
}

impl Store {
    pub async fn agent_by_name(&self, tenant: TenantId, name: &str) -> Result<Agent> {
        let row: Option<AgentRow> = read!(self, p => sqlx::query_as(
            "SELECT id, tenant_id, name, description, labels, disabled, version, created_at, updated_at FROM agents WHERE tenant_id = $1 AND name = $2")
            .bind(tenant.to_string()).bind(name).fetch_optional(p).await)?;
        row.map(Agent::from_row)
            .transpose()?
            .ok_or_else(|| Error::not_found("agent"))
    }
}

// ---------------------------------------------------------------- API keys

/// Prefix of every agent API key, for secret scanners.
pub const API_KEY_PREFIX: &str = "cak_";

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ApiKey {
    pub id: CredentialId,
    pub tenant_id: TenantId,
    pub agent_id: AgentId,
    pub name: String,
    /// First characters of the key, for recognising it (never enough to use it).
    pub prefix: String,
    #[serde(skip)]
    pub hash_kid: String,
    #[serde(skip)]
    pub key_hash: String,
    pub created_at: Micros,
    pub expires_at: Option<Micros>,
    pub revoked_at: Option<Micros>,
    pub replaced_by: Option<CredentialId>,
}

impl ApiKey {
    pub fn usable_at(&self, now: Micros) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|e| now < e)
    }
}

type ApiKeyRow = (
    String,
    String,
    String,
    String,
    String,
    String,
    String,
    i64,
    Option<i64>,
    Option<i64>,
    Option<String>,
);
const API_KEY_COLS: &str =
    "id, tenant_id, agent_id, name, prefix, hash_kid, key_hash, created_at, expires_at, revoked_at, replaced_by";

impl Entity for ApiKey {
    type Row = ApiKeyRow;
    const WHAT: &'static str = "API key";
    entity_sql!(
        "api_keys",
        "id, tenant_id, agent_id, name, prefix, hash_kid, key_hash, created_at, expires_at, revoked_at, replaced_by"
    );
    fn from_row(r: ApiKeyRow) -> Result<ApiKey> {
        Ok(ApiKey {
            id: CredentialId::parse(&r.0)?,
            tenant_id: TenantId::parse(&r.1)?,
            agent_id: AgentId::parse(&r.2)?,
            name: r.3,
            prefix: r.4,
            hash_kid: r.5,
            key_hash: r.6,
            created_at: r.7,
            expires_at: r.8,
            revoked_at: r.9,
            replaced_by: r.10.as_deref().map(CredentialId::parse).transpose()?,
        })
    }
    fn id_string(&self) -> String {
        self.id.to_string()
    }
}

/// A freshly issued key: the secret is returned exactly once.
pub struct IssuedKey {
    pub key: ApiKey,
    pub secret: String,
}

impl std::fmt::Debug for IssuedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedKey")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl Tx {
    /// Issue a new 256-bit key for `agent`. Only its keyed hash is stored.
    pub async fn issue_api_key(
        &mut self,
        pepper: &KeyRing,
        tenant: TenantId,
        agent: AgentId,
        name: &str,
        expires_at: Option<Micros>,
    ) -> Result<IssuedKey> {
        let _: Agent = self.get(tenant, &agent.to_string()).await?;
        let secret = crate::crypto::random_token(API_KEY_PREFIX);
        let hash = hex::encode(pepper.keyed_hash(secret.as_bytes()));
        let key = ApiKey {
            id: CredentialId::new(),
            tenant_id: tenant,
            agent_id: agent,
            name: name.into(),
            prefix: secret[..API_KEY_PREFIX.len() + 6].to_string(),
            hash_kid: pepper.active_id().to_string(),
            key_hash: hash,
            created_at: now_micros(),
            expires_at,
            revoked_at: None,
            replaced_by: None,
        };
        tx_exec!(self, sqlx::query(
            "INSERT INTO api_keys (id, tenant_id, agent_id, name, prefix, hash_kid, key_hash, created_at, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)")
            .bind(key.id.to_string()).bind(tenant.to_string()).bind(agent.to_string()).bind(name)
            .bind(&key.prefix).bind(&key.hash_kid).bind(&key.key_hash).bind(key.created_at).bind(expires_at))?;
        Ok(IssuedKey { key, secret })
    }

    pub async fn revoke_api_key(&mut self, tenant: TenantId, id: CredentialId) -> Result<ApiKey> {
        let k: ApiKey = self.get(tenant, &id.to_string()).await?;
        if k.revoked_at.is_some() {
            return Ok(k);
        }
        let now = now_micros();
        tx_exec!(
            self,
            sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE tenant_id = $2 AND id = $3")
                .bind(now)
                .bind(tenant.to_string())
                .bind(id.to_string())
        )?;
        Ok(ApiKey {
            revoked_at: Some(now),
            ..k
        })
    }

    /// Rotation with overlap: a new key is issued and the old one keeps working until
    /// `now + overlap`.
    pub async fn rotate_api_key(
        &mut self,
        pepper: &KeyRing,
        tenant: TenantId,
        id: CredentialId,
        overlap_micros: Micros,
    ) -> Result<(ApiKey, IssuedKey)> {
        let old: ApiKey = self.get(tenant, &id.to_string()).await?;
        if !old.usable_at(now_micros()) {
            return Err(Error::conflict(
                "a revoked or expired key cannot be rotated; issue a new one",
            ));
        }
        let new = self
            .issue_api_key(pepper, tenant, old.agent_id, &old.name, None)
            .await?;
        let until = now_micros() + overlap_micros.max(0);
        let expires = old.expires_at.map_or(until, |e| e.min(until));
        tx_exec!(
            self,
            sqlx::query("UPDATE api_keys SET expires_at = $1, replaced_by = $2 WHERE tenant_id = $3 AND id = $4")
                .bind(expires)
                .bind(new.key.id.to_string())
                .bind(tenant.to_string())
                .bind(id.to_string())
        )?;
        Ok((
            ApiKey {
                expires_at: Some(expires),
                replaced_by: Some(new.key.id),
                ..old
            },
            new,
        ))
    }
}

impl Store {
    /// Find the key whose keyed hash matches `secret`, trying every pepper key (rotation). The
    /// secret itself is never stored or compared: the lookup is by hash, so it is constant time
    /// with respect to the secret's content.
    pub async fn api_key_by_secret(&self, pepper: &KeyRing, secret: &str) -> Result<Option<ApiKey>> {
        if !secret.starts_with(API_KEY_PREFIX) || secret.len() > 128 {
            return Ok(None);
        }
        for kid in pepper.ids() {
            let Some(h) = pepper.keyed_hash_with(kid, secret.as_bytes()) else {
                continue;
            };
            let sql = format!("SELECT {API_KEY_COLS} FROM api_keys WHERE key_hash = $1 AND hash_kid = $2");
            let row: Option<ApiKeyRow> = read!(self, p => sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(hex::encode(h)).bind(kid).fetch_optional(p).await)?;
            if let Some(r) = row {
                return Ok(Some(ApiKey::from_row(r)?));
            }
        }
        Ok(None)
    }

    pub async fn api_keys_of(&self, tenant: TenantId, agent: AgentId) -> Result<Vec<ApiKey>> {
        let sql = format!("SELECT {API_KEY_COLS} FROM api_keys WHERE tenant_id = $1 AND agent_id = $2 ORDER BY id");
        let rows: Vec<ApiKeyRow> = read!(self, p => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(tenant.to_string()).bind(agent.to_string()).fetch_all(p).await)?;
        rows.into_iter().map(ApiKey::from_row).collect()
    }
}

// ---------------------------------------------------------------- JWT issuers

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JwtIssuer {
    pub id: JwtIssuerId,
    pub tenant_id: TenantId,
    pub name: String,
    /// The `iss` claim value.
    pub issuer: String,
    /// Accepted `aud` values (one must be present in the token).
    pub audiences: Vec<String>,
    pub jwks_url: Option<String>,
    /// Inline JWKS document (`{"keys": [...]}`), when keys are not fetched.
    pub jwks: Option<serde_json::Value>,
    /// Claim that names the workload (default `sub`).
    pub subject_claim: String,
    pub max_skew_secs: i64,
    pub version: i64,
    pub created_at: Micros,
    pub updated_at: Micros,
}

type IssuerRow = (
    String,
    String,
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    String,
    i64,
    i64,
    i64,
    i64,
);
const ISSUER_COLS: &str = "id, tenant_id, name, issuer, audiences, jwks_url, jwks, subject_claim, max_skew_secs, version, created_at, updated_at";

impl Entity for JwtIssuer {
    type Row = IssuerRow;
    const WHAT: &'static str = "JWT issuer";
    entity_sql!(
        "jwt_issuers",
        "id, tenant_id, name, issuer, audiences, jwks_url, jwks, subject_claim, max_skew_secs, version, created_at, updated_at"
    );
    fn from_row(r: IssuerRow) -> Result<JwtIssuer> {
        Ok(JwtIssuer {
            id: JwtIssuerId::parse(&r.0)?,
            tenant_id: TenantId::parse(&r.1)?,
            name: r.2,
            issuer: r.3,
            audiences: serde_json::from_str(&r.4).unwrap_or_default(),
            jwks_url: r.5,
            jwks: r.6.as_deref().and_then(|s| serde_json::from_str(s).ok()),
            subject_claim: r.7,
            max_skew_secs: r.8,
            version: r.9,
            created_at: r.10,
            updated_at: r.11,
        })
    }
    fn id_string(&self) -> String {
        self.id.to_string()
    }
}

impl JwtIssuer {
    pub fn validate(&self) -> Result<()> {
        crate::store::tenants::validate_slug("name", &self.name)?;
        if self.issuer.is_empty() || self.issuer.len() > 512 {
            return Err(Error::validation("issuer must be 1-512 characters"));
        }
        if self.audiences.is_empty() || self.audiences.iter().any(|a| a.is_empty() || a.len() > 512) {
            return Err(Error::validation("audiences must list at least one non-empty audience"));
        }
        match (&self.jwks_url, &self.jwks) {
            (None, None) => return Err(Error::validation("give jwks_url or inline jwks")),
            (Some(_), Some(_)) => return Err(Error::validation("give jwks_url or inline jwks, not both")),
            (Some(u), None) if !u.starts_with("https://") && !u.starts_with("http://") => {
                return Err(Error::validation("jwks_url must be an http(s) URL"));
            }
            (None, Some(j)) if !j.get("keys").is_some_and(|k| k.is_array()) => {
                return Err(Error::validation("jwks must be a JWKS document with a \"keys\" array"));
            }
            _ => {}
        }
        if !(0..=600).contains(&self.max_skew_secs) {
            return Err(Error::validation("max_skew_secs must be between 0 and 600"));
        }
        if self.subject_claim.is_empty() || self.subject_claim.len() > 64 {
            return Err(Error::validation("subject_claim must be 1-64 characters"));
        }
        Ok(())
    }
}

impl Tx {
    pub async fn upsert_jwt_issuer(&mut self, i: &JwtIssuer, expected: Option<i64>, create: bool) -> Result<JwtIssuer> {
        i.validate()?;
        let now = now_micros();
        let audiences = serde_json::to_string(&i.audiences)?;
        let jwks = i.jwks.as_ref().map(|j| j.to_string());
        if create {
            tx_exec!(self, sqlx::query(
                "INSERT INTO jwt_issuers (id, tenant_id, name, issuer, audiences, jwks_url, jwks, subject_claim, max_skew_secs, version, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 1, $10, $10)")
                .bind(i.id.to_string()).bind(i.tenant_id.to_string()).bind(&i.name).bind(&i.issuer).bind(&audiences)
                .bind(&i.jwks_url).bind(&jwks).bind(&i.subject_claim).bind(i.max_skew_secs).bind(now))
            .map_err(|e| conflict_on_unique(e, "a JWT issuer with this name or issuer already exists"))?;
            return Ok(JwtIssuer {
                version: 1,
                created_at: now,
                updated_at: now,
                ..i.clone()
            });
        }
        let cur: JwtIssuer = self.get(i.tenant_id, &i.id.to_string()).await?;
        check_version("JWT issuer", expected, cur.version)?;
        let n = tx_exec!(self, sqlx::query(
            "UPDATE jwt_issuers SET issuer = $1, audiences = $2, jwks_url = $3, jwks = $4, subject_claim = $5, max_skew_secs = $6,
             version = version + 1, updated_at = $7 WHERE tenant_id = $8 AND id = $9 AND version = $10")
            .bind(&i.issuer).bind(&audiences).bind(&i.jwks_url).bind(&jwks).bind(&i.subject_claim).bind(i.max_skew_secs)
            .bind(now).bind(i.tenant_id.to_string()).bind(i.id.to_string()).bind(cur.version))
        .map_err(|e| conflict_on_unique(e, "a JWT issuer with this issuer already exists"))?;
        if n != 1 {
            return Err(Error::new(
                ErrorCode::PreconditionFailed,
                "the JWT issuer was modified concurrently",
            ));
        }
        Ok(JwtIssuer {
            version: cur.version + 1,
            created_at: cur.created_at,
            updated_at: now,
            name: cur.name,
            ..i.clone()
        })
    }
}

impl Store {
    /// Every tenant's issuer with this `iss` (a token names its issuer before it is trusted).
    pub async fn jwt_issuers_by_iss(&self, iss: &str) -> Result<Vec<JwtIssuer>> {
        let sql = format!("SELECT {ISSUER_COLS} FROM jwt_issuers WHERE issuer = $1 ORDER BY id LIMIT 50");
        let rows: Vec<IssuerRow> =
            read!(self, p => sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(iss).fetch_all(p).await)?;
        rows.into_iter().map(JwtIssuer::from_row).collect()
    }
}

// ---------------------------------------------------------------- mTLS CAs

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct MtlsCa {
    pub id: MtlsCaId,
    pub tenant_id: TenantId,
    pub name: String,
    pub ca_pem: String,
    /// SHA-256 of the (first) CA certificate DER, hex.
    pub fingerprint: String,
    pub version: i64,
    pub created_at: Micros,
    pub updated_at: Micros,
}

type CaRow = (String, String, String, String, String, i64, i64, i64);

impl Entity for MtlsCa {
    type Row = CaRow;
    const WHAT: &'static str = "mTLS CA";
    entity_sql!(
        "mtls_cas",
        "id, tenant_id, name, ca_pem, fingerprint, version, created_at, updated_at"
    );
    fn from_row(r: CaRow) -> Result<MtlsCa> {
        Ok(MtlsCa {
            id: MtlsCaId::parse(&r.0)?,
            tenant_id: TenantId::parse(&r.1)?,
            name: r.2,
            ca_pem: r.3,
            fingerprint: r.4,
            version: r.5,
            created_at: r.6,
            updated_at: r.7,
        })
    }
    fn id_string(&self) -> String {
        self.id.to_string()
    }
}

/// Parse CA PEM; returns the DER certificates (at least one) or a validation error.
pub fn parse_ca_pem(pem: &str) -> Result<Vec<Vec<u8>>> {
    use rustls_pki_types::pem::PemObject;
    let certs: Vec<Vec<u8>> = rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.map(|c| c.as_ref().to_vec()))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| Error::validation("ca_pem is not valid PEM"))?;
    if certs.is_empty() {
        return Err(Error::validation("ca_pem holds no certificate"));
    }
    let mut roots = rustls::RootCertStore::empty();
    for c in &certs {
        roots
            .add(rustls_pki_types::CertificateDer::from(c.clone()))
            .map_err(|e| Error::validation(format!("ca_pem is not a usable CA certificate: {e}")))?;
    }
    Ok(certs)
}

impl Tx {
    pub async fn insert_mtls_ca(&mut self, tenant: TenantId, name: &str, ca_pem: &str) -> Result<MtlsCa> {
        crate::store::tenants::validate_slug("name", name)?;
        let certs = parse_ca_pem(ca_pem)?;
        let now = now_micros();
        let ca = MtlsCa {
            id: MtlsCaId::new(),
            tenant_id: tenant,
            name: name.into(),
            ca_pem: ca_pem.into(),
            fingerprint: hex::encode(crate::crypto::sha256(&certs[0])),
            version: 1,
            created_at: now,
            updated_at: now,
        };
        tx_exec!(self, sqlx::query(
            "INSERT INTO mtls_cas (id, tenant_id, name, ca_pem, fingerprint, version, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, 1, $6, $6)")
            .bind(ca.id.to_string()).bind(tenant.to_string()).bind(name).bind(ca_pem).bind(&ca.fingerprint).bind(now))
        .map_err(|e| conflict_on_unique(e, format!("an mTLS CA named {name:?} already exists")))?;
        Ok(ca)
    }
}

impl Store {
    /// Every trusted CA of every tenant (the STS builds its client verifier from these).
    pub async fn all_mtls_cas(&self) -> Result<Vec<MtlsCa>> {
        let rows: Vec<CaRow> = read!(self, p => sqlx::query_as(
            "SELECT id, tenant_id, name, ca_pem, fingerprint, version, created_at, updated_at FROM mtls_cas ORDER BY id LIMIT 10000")
            .fetch_all(p).await)?;
        rows.into_iter().map(MtlsCa::from_row).collect()
    }
}

// ---------------------------------------------------------------- identities

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentityKind {
    Jwt,
    Mtls,
}

/// Which part of the credential names the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MatchKind {
    /// The JWT's subject claim.
    Subject,
    /// A URI subject alternative name (e.g. a SPIFFE id).
    SanUri,
    /// A DNS subject alternative name.
    SanDns,
    /// The certificate subject's common name.
    Cn,
}

impl MatchKind {
    fn as_str(self) -> &'static str {
        match self {
            MatchKind::Subject => "subject",
            MatchKind::SanUri => "san_uri",
            MatchKind::SanDns => "san_dns",
            MatchKind::Cn => "cn",
        }
    }
    fn parse(s: &str) -> Result<MatchKind> {
        Ok(match s {
            "subject" => MatchKind::Subject,
            "san_uri" => MatchKind::SanUri,
            "san_dns" => MatchKind::SanDns,
            "cn" => MatchKind::Cn,
            _ => return Err(Error::internal("unknown match kind in database")),
        })
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Identity {
    pub id: IdentityId,
    pub tenant_id: TenantId,
    pub agent_id: AgentId,
    pub kind: IdentityKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer_id: Option<JwtIssuerId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_id: Option<MtlsCaId>,
    pub match_kind: MatchKind,
    pub subject: String,
    pub created_at: Micros,
}

type IdentityRow = (
    String,
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    String,
    String,
    i64,
);
const IDENTITY_COLS: &str = "id, tenant_id, agent_id, kind, issuer_id, ca_id, match_kind, subject, created_at";

impl Entity for Identity {
    type Row = IdentityRow;
    const WHAT: &'static str = "identity";
    entity_sql!(
        "identities",
        "id, tenant_id, agent_id, kind, issuer_id, ca_id, match_kind, subject, created_at"
    );
    fn from_row(r: IdentityRow) -> Result<Identity> {
        Ok(Identity {
            id: IdentityId::parse(&r.0)?,
            tenant_id: TenantId::parse(&r.1)?,
            agent_id: AgentId::parse(&r.2)?,
            kind: if r.3 == "jwt" {
                IdentityKind::Jwt
            } else {
                IdentityKind::Mtls
            },
            issuer_id: r.4.as_deref().map(JwtIssuerId::parse).transpose()?,
            ca_id: r.5.as_deref().map(MtlsCaId::parse).transpose()?,
            match_kind: MatchKind::parse(&r.6)?,
            subject: r.7,
            created_at: r.8,
        })
    }
    fn id_string(&self) -> String {
        self.id.to_string()
    }
}

impl Tx {
    pub async fn insert_identity(&mut self, i: &Identity) -> Result<Identity> {
        let (ref_id, kind) = match (i.kind, i.issuer_id, i.ca_id, i.match_kind) {
            (IdentityKind::Jwt, Some(iss), None, MatchKind::Subject) => {
                let _: JwtIssuer = self.get(i.tenant_id, &iss.to_string()).await?;
                (iss.to_string(), "jwt")
            }
            (IdentityKind::Mtls, None, Some(ca), MatchKind::SanUri | MatchKind::SanDns | MatchKind::Cn) => {
                let _: MtlsCa = self.get(i.tenant_id, &ca.to_string()).await?;
                (ca.to_string(), "mtls")
            }
            (IdentityKind::Jwt, ..) => {
                return Err(Error::validation(
                    "a jwt identity needs issuer_id and match \"subject\"",
                ));
            }
            (IdentityKind::Mtls, ..) => {
                return Err(Error::validation(
                    "an mtls identity needs ca_id and match \"san_uri\", \"san_dns\" or \"cn\"",
                ));
            }
        };
        if i.subject.is_empty() || i.subject.len() > 1024 {
            return Err(Error::validation("subject must be 1-1024 characters"));
        }
        let _: Agent = self.get(i.tenant_id, &i.agent_id.to_string()).await?;
        tx_exec!(self, sqlx::query(
            "INSERT INTO identities (id, tenant_id, agent_id, kind, issuer_id, ca_id, ref_id, match_kind, subject, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)")
            .bind(i.id.to_string()).bind(i.tenant_id.to_string()).bind(i.agent_id.to_string()).bind(kind)
            .bind(i.issuer_id.map(|x| x.to_string())).bind(i.ca_id.map(|x| x.to_string())).bind(&ref_id)
            .bind(i.match_kind.as_str()).bind(&i.subject).bind(i.created_at))
        .map_err(|e| conflict_on_unique(e, "this identity is already bound to an agent"))?;
        Ok(i.clone())
    }
}

impl Store {
    /// The identity bound to (`ref_id` = issuer or CA id, match kind, subject), if any.
    pub async fn identity_for(&self, ref_id: &str, match_kind: MatchKind, subject: &str) -> Result<Option<Identity>> {
        let sql =
            format!("SELECT {IDENTITY_COLS} FROM identities WHERE ref_id = $1 AND match_kind = $2 AND subject = $3");
        let row: Option<IdentityRow> = read!(self, p => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(ref_id).bind(match_kind.as_str()).bind(subject).fetch_optional(p).await)?;
        row.map(Identity::from_row).transpose()
    }

    pub async fn identities_of(&self, tenant: TenantId, agent: AgentId) -> Result<Vec<Identity>> {
        let sql = format!("SELECT {IDENTITY_COLS} FROM identities WHERE tenant_id = $1 AND agent_id = $2 ORDER BY id");
        let rows: Vec<IdentityRow> = read!(self, p => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(tenant.to_string()).bind(agent.to_string()).fetch_all(p).await)?;
        rows.into_iter().map(Identity::from_row).collect()
    }
}
