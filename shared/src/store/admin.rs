//! Admin tokens (for humans and automation on the control API), idempotency records, budgets
//! and mandate signing keys.

use serde::{Deserialize, Serialize};

use super::entity::{Entity, check_version, conflict_on_unique, entity_sql};
use super::{Store, Tx, read, tx, tx_exec, write_exec};
use crate::crypto::KeyRing;
use crate::error::{Error, ErrorCode, Result};
use crate::ids::{AdminTokenId, BudgetId, TenantId};
use crate::seal::{Sealed, open, seal};
use crate::time::{Micros, now_micros};

// ---------------------------------------------------------------- admin tokens

pub const ADMIN_TOKEN_PREFIX: &str = "cat_";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminScope {
    /// Read configuration.
    Read,
    /// Change configuration.
    Write,
    /// Decide human approvals.
    Approve,
    /// Read the audit ledger.
    Audit,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AdminToken {
    pub id: AdminTokenId,
    /// `None`: a platform token (all tenants; manages tenants and platform keys).
    pub tenant_id: Option<TenantId>,
    pub name: String,
    pub prefix: String,
    #[serde(skip)]
    pub hash_kid: String,
    #[serde(skip)]
    pub token_hash: String,
    pub scopes: Vec<AdminScope>,
    pub created_at: Micros,
    pub expires_at: Option<Micros>,
    pub revoked_at: Option<Micros>,
}

type TokenRow = (
    String,
    Option<String>,
    String,
    String,
    String,
    String,
    String,
    i64,
    Option<i64>,
    Option<i64>,
);
const TOKEN_COLS: &str =
    "id, tenant_id, name, prefix, hash_kid, token_hash, scopes, created_at, expires_at, revoked_at";

fn token_from_row(r: TokenRow) -> Result<AdminToken> {
    Ok(AdminToken {
        id: AdminTokenId::parse(&r.0)?,
        tenant_id: r.1.as_deref().map(TenantId::parse).transpose()?,
        name: r.2,
        prefix: r.3,
        hash_kid: r.4,
        token_hash: r.5,
        scopes: serde_json::from_str(&r.6).unwrap_or_default(),
        created_at: r.7,
        expires_at: r.8,
        revoked_at: r.9,
    })
}

impl AdminToken {
    pub fn usable_at(&self, now: Micros) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|e| now < e)
    }
}

impl Tx {
    /// Issue a token; the secret is returned once and only its keyed hash is stored.
    pub async fn issue_admin_token(
        &mut self,
        pepper: &KeyRing,
        tenant: Option<TenantId>,
        name: &str,
        scopes: &[AdminScope],
        expires_at: Option<Micros>,
    ) -> Result<(AdminToken, String)> {
        if name.is_empty() || name.len() > 128 {
            return Err(Error::validation("name must be 1-128 characters"));
        }
        if scopes.is_empty() {
            return Err(Error::validation("scopes must not be empty"));
        }
        let secret = crate::crypto::random_token(ADMIN_TOKEN_PREFIX);
        let mut scopes = scopes.to_vec();
        scopes.sort();
        scopes.dedup();
        let t = AdminToken {
            id: AdminTokenId::new(),
            tenant_id: tenant,
            name: name.into(),
            prefix: secret[..ADMIN_TOKEN_PREFIX.len() + 6].to_string(),
            hash_kid: pepper.active_id().into(),
            token_hash: hex::encode(pepper.keyed_hash(secret.as_bytes())),
            scopes,
            created_at: now_micros(),
            expires_at,
            revoked_at: None,
        };
        tx_exec!(self, sqlx::query(
            "INSERT INTO admin_tokens (id, tenant_id, name, prefix, hash_kid, token_hash, scopes, created_at, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)")
            .bind(t.id.to_string()).bind(tenant.map(|x| x.to_string())).bind(name).bind(&t.prefix).bind(&t.hash_kid)
            .bind(&t.token_hash).bind(serde_json::to_string(&t.scopes)?).bind(t.created_at).bind(expires_at))?;
        Ok((t, secret))
    }

    pub async fn revoke_admin_token(&mut self, tenant: Option<TenantId>, id: AdminTokenId) -> Result<()> {
        // Never lock the platform out: the last usable platform token cannot be revoked.
        let target: Option<(Option<String>,)> = tx!(self, c => sqlx::query_as("SELECT tenant_id FROM admin_tokens WHERE id = $1 AND revoked_at IS NULL")
            .bind(id.to_string()).fetch_optional(c).await)?;
        if let Some((None,)) = target {
            let (n,): (i64,) = tx!(self, c => sqlx::query_as(
                "SELECT COUNT(*) FROM admin_tokens WHERE tenant_id IS NULL AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $1)")
                .bind(now_micros()).fetch_one(c).await)?;
            if n <= 1 {
                return Err(Error::conflict(
                    "this is the last platform token; create another before revoking it",
                ));
            }
        }
        let n = match tenant {
            Some(t) => tx_exec!(
                self,
                sqlx::query(
                    "UPDATE admin_tokens SET revoked_at = $1 WHERE id = $2 AND tenant_id = $3 AND revoked_at IS NULL"
                )
                .bind(now_micros())
                .bind(id.to_string())
                .bind(t.to_string())
            )?,
            None => tx_exec!(
                self,
                sqlx::query("UPDATE admin_tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
                    .bind(now_micros())
                    .bind(id.to_string())
            )?,
        };
        if n == 0 {
            return Err(Error::not_found("admin token"));
        }
        Ok(())
    }
}

impl Store {
    pub async fn admin_token_by_secret(&self, pepper: &KeyRing, secret: &str) -> Result<Option<AdminToken>> {
        if !secret.starts_with(ADMIN_TOKEN_PREFIX) || secret.len() > 128 {
            return Ok(None);
        }
        for kid in pepper.ids() {
            let Some(h) = pepper.keyed_hash_with(kid, secret.as_bytes()) else {
                continue;
            };
            let sql = format!("SELECT {TOKEN_COLS} FROM admin_tokens WHERE token_hash = $1 AND hash_kid = $2");
            let row: Option<TokenRow> = read!(self, p => sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(hex::encode(h)).bind(kid).fetch_optional(p).await)?;
            if let Some(r) = row {
                return Ok(Some(token_from_row(r)?));
            }
        }
        Ok(None)
    }

    /// Tokens visible to `tenant` (`None`: every token).
    pub async fn admin_tokens(&self, tenant: Option<TenantId>) -> Result<Vec<AdminToken>> {
        let rows: Vec<TokenRow> = match tenant {
            Some(t) => {
                let sql = format!("SELECT {TOKEN_COLS} FROM admin_tokens WHERE tenant_id = $1 ORDER BY id LIMIT 1000");
                read!(self, p => sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(t.to_string()).fetch_all(p).await)?
            }
            None => {
                let sql = format!("SELECT {TOKEN_COLS} FROM admin_tokens ORDER BY id LIMIT 1000");
                read!(self, p => sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_all(p).await)?
            }
        };
        rows.into_iter().map(token_from_row).collect()
    }
}

// ---------------------------------------------------------------- idempotency

/// A stored response to a create that carried an `Idempotency-Key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotentResponse {
    pub method: String,
    pub path: String,
    pub request_hash: String,
    pub status: u16,
    pub body: String,
}

impl Store {
    pub async fn idempotent_response(&self, scope: &str, key: &str) -> Result<Option<IdempotentResponse>> {
        let row: Option<(String, String, String, i64, String)> = read!(self, p => sqlx::query_as(
            "SELECT method, path, request_hash, status, body FROM idempotency_keys WHERE scope = $1 AND key = $2")
            .bind(scope).bind(key).fetch_optional(p).await)?;
        Ok(row.map(|r| IdempotentResponse {
            method: r.0,
            path: r.1,
            request_hash: r.2,
            status: r.3 as u16,
            body: r.4,
        }))
    }

    /// Retention for idempotency records.
    pub async fn prune_idempotency(&self, before: Micros) -> Result<u64> {
        Ok(write_exec!(
            self,
            sqlx::query("DELETE FROM idempotency_keys WHERE created_at < $1").bind(before)
        )?)
    }
}

impl Tx {
    /// Record the response in the transaction that made the change (so a crash cannot leave a
    /// change without its record). A concurrent duplicate fails with a conflict.
    pub async fn put_idempotent_response(&mut self, scope: &str, key: &str, r: &IdempotentResponse) -> Result<()> {
        tx_exec!(self, sqlx::query(
            "INSERT INTO idempotency_keys (scope, key, method, path, request_hash, status, body, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)")
            .bind(scope).bind(key).bind(&r.method).bind(&r.path).bind(&r.request_hash).bind(r.status as i64).bind(&r.body).bind(now_micros()))
        .map_err(|e| conflict_on_unique(e, "a request with this Idempotency-Key is in progress"))?;
        Ok(())
    }
}

// ---------------------------------------------------------------- budgets

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetScopeKind {
    Agent,
    Resource,
    Tenant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetUnit {
    /// Money in micro-units (1 USD = 1 000 000).
    Micros,
    Tokens,
    Requests,
}

impl BudgetUnit {
    /// The name serde gives it.
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetUnit::Micros => "micros",
            BudgetUnit::Tokens => "tokens",
            BudgetUnit::Requests => "requests",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowKind {
    Daily,
    Weekly,
    Monthly,
    Rolling,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Budget {
    pub id: BudgetId,
    pub tenant_id: TenantId,
    pub name: String,
    pub scope_kind: BudgetScopeKind,
    /// The agent or resource id (none for tenant budgets).
    pub scope_id: Option<String>,
    pub unit: BudgetUnit,
    pub limit: i64,
    pub window: WindowKind,
    /// IANA time zone calendar windows align to.
    pub window_tz: String,
    pub rolling_secs: Option<i64>,
    /// A hard budget refuses requests over the limit; a soft one only reports.
    pub hard: bool,
    pub version: i64,
    pub created_at: Micros,
    pub updated_at: Micros,
}

type BudgetRow = (
    String,
    String,
    String,
    String,
    Option<String>,
    String,
    i64,
    String,
    String,
    Option<i64>,
    i64,
    i64,
    i64,
    i64,
);

fn enum_from<T: for<'de> Deserialize<'de>>(s: &str) -> Result<T> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| Error::internal("bad enum in database"))
}

fn enum_str<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

impl Entity for Budget {
    type Row = BudgetRow;
    const WHAT: &'static str = "budget";
    entity_sql!(
        "budgets",
        "id, tenant_id, name, scope_kind, scope_id, unit, limit_amount, window_kind, window_tz, rolling_secs, hard, version, created_at, updated_at"
    );
    fn from_row(r: BudgetRow) -> Result<Budget> {
        Ok(Budget {
            id: BudgetId::parse(&r.0)?,
            tenant_id: TenantId::parse(&r.1)?,
            name: r.2,
            scope_kind: enum_from(&r.3)?,
            scope_id: r.4,
            unit: enum_from(&r.5)?,
            limit: r.6,
            window: enum_from(&r.7)?,
            window_tz: r.8,
            rolling_secs: r.9,
            hard: r.10 != 0,
            version: r.11,
            created_at: r.12,
            updated_at: r.13,
        })
    }
    fn id_string(&self) -> String {
        self.id.to_string()
    }
}

impl Budget {
    pub fn validate(&self) -> Result<()> {
        crate::store::tenants::validate_slug("name", &self.name)?;
        if self.limit < 0 {
            return Err(Error::validation("limit must not be negative"));
        }
        match (self.scope_kind, &self.scope_id) {
            (BudgetScopeKind::Tenant, Some(_)) => return Err(Error::validation("a tenant budget has no scope id")),
            (BudgetScopeKind::Agent, Some(id)) => {
                crate::ids::AgentId::parse(id)?;
            }
            (BudgetScopeKind::Resource, Some(id)) => {
                crate::ids::ResourceId::parse(id)?;
            }
            (BudgetScopeKind::Agent | BudgetScopeKind::Resource, None) => {
                return Err(Error::validation("agent and resource budgets need scope.id"));
            }
            _ => {}
        }
        if jiff::tz::TimeZone::get(&self.window_tz).is_err() {
            return Err(Error::validation(format!("unknown time zone {:?}", self.window_tz)));
        }
        match (self.window, self.rolling_secs) {
            (WindowKind::Rolling, Some(s)) if (60..=366 * 86_400).contains(&s) => {}
            (WindowKind::Rolling, _) => {
                return Err(Error::validation(
                    "rolling windows need rolling_secs between 60 and 31622400",
                ));
            }
            (_, Some(_)) => return Err(Error::validation("rolling_secs applies to rolling windows only")),
            _ => {}
        }
        Ok(())
    }
}

impl Tx {
    pub async fn upsert_budget(&mut self, b: &Budget, expected: Option<i64>, create: bool) -> Result<Budget> {
        b.validate()?;
        match (b.scope_kind, &b.scope_id) {
            (BudgetScopeKind::Agent, Some(id)) => {
                let _: crate::store::agents::Agent = self.get(b.tenant_id, id).await?;
            }
            (BudgetScopeKind::Resource, Some(id)) => {
                let _: crate::store::resources::Resource = self.get(b.tenant_id, id).await?;
            }
            _ => {}
        }
        let now = now_micros();
        if create {
            tx_exec!(self, sqlx::query(
                "INSERT INTO budgets (id, tenant_id, name, scope_kind, scope_id, unit, limit_amount, window_kind, window_tz, rolling_secs, hard, version, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 1, $12, $12)")
                .bind(b.id.to_string()).bind(b.tenant_id.to_string()).bind(&b.name).bind(enum_str(&b.scope_kind)).bind(&b.scope_id)
                .bind(enum_str(&b.unit)).bind(b.limit).bind(enum_str(&b.window)).bind(&b.window_tz).bind(b.rolling_secs)
                .bind(b.hard as i64).bind(now))
            .map_err(|e| conflict_on_unique(e, format!("a budget named {:?} already exists", b.name)))?;
            return Ok(Budget {
                version: 1,
                created_at: now,
                updated_at: now,
                ..b.clone()
            });
        }
        let cur: Budget = self.get(b.tenant_id, &b.id.to_string()).await?;
        check_version("budget", expected, cur.version)?;
        let n = tx_exec!(self, sqlx::query(
            "UPDATE budgets SET unit = $1, limit_amount = $2, window_kind = $3, window_tz = $4, rolling_secs = $5, hard = $6,
             version = version + 1, updated_at = $7 WHERE tenant_id = $8 AND id = $9 AND version = $10")
            .bind(enum_str(&b.unit)).bind(b.limit).bind(enum_str(&b.window)).bind(&b.window_tz).bind(b.rolling_secs).bind(b.hard as i64)
            .bind(now).bind(b.tenant_id.to_string()).bind(b.id.to_string()).bind(cur.version))?;
        if n != 1 {
            return Err(Error::new(
                ErrorCode::PreconditionFailed,
                "the budget was modified concurrently",
            ));
        }
        Ok(Budget {
            name: cur.name,
            scope_kind: cur.scope_kind,
            scope_id: cur.scope_id,
            version: cur.version + 1,
            created_at: cur.created_at,
            updated_at: now,
            ..b.clone()
        })
    }
}

impl Store {
    /// Settled spend and outstanding reservations recorded for a budget window.
    pub async fn budget_usage(&self, id: BudgetId, window_start: Micros) -> Result<(i64, i64)> {
        let r: Option<(i64, i64)> = read!(self, p => sqlx::query_as(
            "SELECT spent, reserved FROM budget_usage WHERE budget_id = $1 AND window_start = $2")
            .bind(id.to_string()).bind(window_start).fetch_optional(p).await)?;
        Ok(r.unwrap_or((0, 0)))
    }

    pub async fn all_budgets(&self, max: i64) -> Result<Vec<Budget>> {
        let rows: Vec<BudgetRow> = read!(self, p => sqlx::query_as(
            "SELECT id, tenant_id, name, scope_kind, scope_id, unit, limit_amount, window_kind, window_tz, rolling_secs, hard, version, created_at, updated_at
             FROM budgets ORDER BY id LIMIT $1").bind(max).fetch_all(p).await)?;
        rows.into_iter().map(Budget::from_row).collect()
    }
}

// ---------------------------------------------------------------- signing keys

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    /// Published, not yet signing.
    Next,
    /// Signing new mandates.
    Active,
    /// Published for verification until every mandate it signed has expired.
    Retiring,
    /// No longer published.
    Retired,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SigningKey {
    pub kid: u32,
    pub alg: String,
    /// `ed25519/<hex>` public key.
    pub public_key: String,
    pub state: KeyState,
    pub created_at: Micros,
    pub activated_at: Option<Micros>,
    pub retire_after: Option<Micros>,
    pub retired_at: Option<Micros>,
}

type KeyRow = (i64, String, String, String, i64, Option<i64>, Option<i64>, Option<i64>);

fn key_from_row(r: KeyRow) -> Result<SigningKey> {
    Ok(SigningKey {
        kid: u32::try_from(r.0).map_err(|_| Error::internal("bad kid"))?,
        alg: r.1,
        public_key: r.2,
        state: enum_from(&r.3)?,
        created_at: r.4,
        activated_at: r.5,
        retire_after: r.6,
        retired_at: r.7,
    })
}

fn key_aad(kid: u32) -> Vec<u8> {
    format!("caracal-signing-key-v1|{kid}").into_bytes()
}

impl Tx {
    /// Store a new key with its private part sealed.
    pub async fn insert_signing_key(
        &mut self,
        seal_ring: &KeyRing,
        kid: u32,
        public_key: &str,
        private: &[u8],
        state: KeyState,
    ) -> Result<SigningKey> {
        let s = seal(seal_ring, &key_aad(kid), private)?;
        let now = now_micros();
        let activated = (state == KeyState::Active).then_some(now);
        tx_exec!(self, sqlx::query(
            "INSERT INTO signing_keys (kid, alg, public_key, priv_kek_id, priv_wrapped, priv_nonce, priv_sealed, state, created_at, activated_at)
             VALUES ($1, 'ed25519', $2, $3, $4, $5, $6, $7, $8, $9)")
            .bind(kid as i64).bind(public_key).bind(&s.kek_id).bind(&s.wrapped_dek).bind(&s.nonce).bind(&s.ciphertext)
            .bind(enum_str(&state)).bind(now).bind(activated))?;
        Ok(SigningKey {
            kid,
            alg: "ed25519".into(),
            public_key: public_key.into(),
            state,
            created_at: now,
            activated_at: activated,
            retire_after: None,
            retired_at: None,
        })
    }

    pub async fn set_key_state(&mut self, kid: u32, state: KeyState, retire_after: Option<Micros>) -> Result<()> {
        let now = now_micros();
        tx_exec!(
            self,
            sqlx::query(
                "UPDATE signing_keys SET state = $1,
               activated_at = CASE WHEN $1 = 'active' THEN $2 ELSE activated_at END,
               retire_after = COALESCE($3, retire_after),
               retired_at = CASE WHEN $1 = 'retired' THEN $2 ELSE retired_at END
             WHERE kid = $4"
            )
            .bind(enum_str(&state))
            .bind(now)
            .bind(retire_after)
            .bind(kid as i64)
        )?;
        Ok(())
    }

    pub async fn signing_keys_locked(&mut self) -> Result<Vec<SigningKey>> {
        let sql = if self.kind() == crate::config::DbKind::Postgres {
            "SELECT kid, alg, public_key, state, created_at, activated_at, retire_after, retired_at FROM signing_keys ORDER BY kid FOR UPDATE"
        } else {
            "SELECT kid, alg, public_key, state, created_at, activated_at, retire_after, retired_at FROM signing_keys ORDER BY kid"
        };
        let rows: Vec<KeyRow> = tx!(self, c => sqlx::query_as(sql).fetch_all(c).await)?;
        rows.into_iter().map(key_from_row).collect()
    }
}

impl Store {
    pub async fn signing_keys(&self) -> Result<Vec<SigningKey>> {
        let rows: Vec<KeyRow> = read!(self, p => sqlx::query_as(
            "SELECT kid, alg, public_key, state, created_at, activated_at, retire_after, retired_at FROM signing_keys ORDER BY kid")
            .fetch_all(p).await)?;
        rows.into_iter().map(key_from_row).collect()
    }

    /// Open a key's private part (STS only).
    pub async fn signing_key_private(&self, seal_ring: &KeyRing, kid: u32) -> Result<crate::crypto::Secret> {
        let row: Option<(String, Vec<u8>, Vec<u8>, Vec<u8>)> = read!(self, p => sqlx::query_as(
            "SELECT priv_kek_id, priv_wrapped, priv_nonce, priv_sealed FROM signing_keys WHERE kid = $1")
            .bind(kid as i64).fetch_optional(p).await)?;
        let (kek_id, wrapped_dek, nonce, ciphertext) = row.ok_or_else(|| Error::not_found("signing key"))?;
        open(
            seal_ring,
            &key_aad(kid),
            &Sealed {
                kek_id,
                wrapped_dek,
                nonce,
                ciphertext,
            },
        )
    }
}
