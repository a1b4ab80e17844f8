//! Policies with immutable versions, and grants (who may obtain which scopes on which resource,
//! under which policy).

use serde::Serialize;

use super::entity::{Entity, check_version, conflict_on_unique, entity_sql};
use super::{Store, Tx, read, tx, tx_exec};
use crate::error::{Error, ErrorCode, Result};
use crate::ids::{AgentId, GrantId, PolicyId, ResourceId, TenantId};
use crate::policy::{CompiledPolicy, Format, problems_error};
use crate::time::{Micros, now_micros};

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Policy {
    pub id: PolicyId,
    pub tenant_id: TenantId,
    pub name: String,
    pub description: String,
    pub active_version: Option<i64>,
    pub latest_version: i64,
    pub version: i64,
    pub created_at: Micros,
    pub updated_at: Micros,
}

type PolicyRow = (String, String, String, String, Option<i64>, i64, i64, i64, i64);

impl Entity for Policy {
    type Row = PolicyRow;
    const WHAT: &'static str = "policy";
    entity_sql!(
        "policies",
        "id, tenant_id, name, description, active_version, latest_version, version, created_at, updated_at"
    );
    fn from_row(r: PolicyRow) -> Result<Policy> {
        Ok(Policy {
            id: PolicyId::parse(&r.0)?,
            tenant_id: TenantId::parse(&r.1)?,
            name: r.2,
            description: r.3,
            active_version: r.4,
            latest_version: r.5,
            version: r.6,
            created_at: r.7,
            updated_at: r.8,
        })
    }
    fn id_string(&self) -> String {
        self.id.to_string()
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PolicyVersion {
    pub policy_id: PolicyId,
    pub version: i64,
    pub format: Format,
    /// The document exactly as submitted.
    pub source: String,
    /// Normalised JSON of the document.
    pub normalized: serde_json::Value,
    pub checksum: String,
    pub created_at: Micros,
}

type VersionRow = (String, i64, String, String, String, String, i64);

fn version_from_row(r: VersionRow) -> Result<PolicyVersion> {
    Ok(PolicyVersion {
        policy_id: PolicyId::parse(&r.0)?,
        version: r.1,
        format: if r.2 == "json" { Format::Json } else { Format::Yaml },
        source: r.3,
        normalized: serde_json::from_str(&r.4).unwrap_or_default(),
        checksum: r.5,
        created_at: r.6,
    })
}

impl PolicyVersion {
    pub fn compile(&self) -> Result<CompiledPolicy> {
        CompiledPolicy::from_source(&self.source, self.format).map_err(problems_error)
    }
}

impl Tx {
    /// Create a policy with its first version (not yet active).
    pub async fn insert_policy(
        &mut self,
        tenant: TenantId,
        name: &str,
        description: &str,
        source: &str,
        format: Format,
    ) -> Result<(Policy, PolicyVersion)> {
        crate::store::tenants::validate_slug("name", name)?;
        let compiled = CompiledPolicy::from_source(source, format).map_err(problems_error)?;
        let now = now_micros();
        let p = Policy {
            id: PolicyId::new(),
            tenant_id: tenant,
            name: name.into(),
            description: description.into(),
            active_version: None,
            latest_version: 1,
            version: 1,
            created_at: now,
            updated_at: now,
        };
        tx_exec!(self, sqlx::query(
            "INSERT INTO policies (id, tenant_id, name, description, active_version, latest_version, version, created_at, updated_at)
             VALUES ($1, $2, $3, $4, NULL, 1, 1, $5, $5)")
            .bind(p.id.to_string()).bind(tenant.to_string()).bind(name).bind(description).bind(now))
        .map_err(|e| conflict_on_unique(e, format!("a policy named {name:?} already exists")))?;
        let v = self
            .write_version(tenant, p.id, 1, source, format, &compiled, now)
            .await?;
        Ok((p, v))
    }

    #[allow(clippy::too_many_arguments)]
    async fn write_version(
        &mut self,
        tenant: TenantId,
        id: PolicyId,
        version: i64,
        source: &str,
        format: Format,
        compiled: &CompiledPolicy,
        now: Micros,
    ) -> Result<PolicyVersion> {
        let normalized = serde_json::to_value(&compiled.doc)?;
        let checksum = hex::encode(crate::crypto::sha256(source.as_bytes()));
        let fmt = match format {
            Format::Json => "json",
            Format::Yaml => "yaml",
        };
        tx_exec!(self, sqlx::query(
            "INSERT INTO policy_versions (policy_id, version, tenant_id, format, source, normalized, checksum, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)")
            .bind(id.to_string()).bind(version).bind(tenant.to_string()).bind(fmt).bind(source)
            .bind(normalized.to_string()).bind(&checksum).bind(now))?;
        Ok(PolicyVersion {
            policy_id: id,
            version,
            format,
            source: source.into(),
            normalized,
            checksum,
            created_at: now,
        })
    }

    /// Add an immutable version. `expected` is the policy's ETag version.
    pub async fn add_policy_version(
        &mut self,
        tenant: TenantId,
        id: PolicyId,
        expected: Option<i64>,
        source: &str,
        format: Format,
    ) -> Result<(Policy, PolicyVersion)> {
        let compiled = CompiledPolicy::from_source(source, format).map_err(problems_error)?;
        let cur: Policy = self.get(tenant, &id.to_string()).await?;
        check_version("policy", expected, cur.version)?;
        let now = now_micros();
        let next = cur.latest_version + 1;
        let n = tx_exec!(self, sqlx::query(
            "UPDATE policies SET latest_version = $1, version = version + 1, updated_at = $2 WHERE tenant_id = $3 AND id = $4 AND version = $5")
            .bind(next).bind(now).bind(tenant.to_string()).bind(id.to_string()).bind(cur.version))?;
        if n != 1 {
            return Err(Error::new(
                ErrorCode::PreconditionFailed,
                "the policy was modified concurrently",
            ));
        }
        let v = self
            .write_version(tenant, id, next, source, format, &compiled, now)
            .await?;
        Ok((
            Policy {
                latest_version: next,
                version: cur.version + 1,
                updated_at: now,
                ..cur
            },
            v,
        ))
    }

    /// Make `version` the active one.
    pub async fn activate_policy_version(
        &mut self,
        tenant: TenantId,
        id: PolicyId,
        version: i64,
        expected: Option<i64>,
    ) -> Result<Policy> {
        let cur: Policy = self.get(tenant, &id.to_string()).await?;
        check_version("policy", expected, cur.version)?;
        if version < 1 || version > cur.latest_version {
            return Err(Error::not_found("policy version"));
        }
        let now = now_micros();
        let n = tx_exec!(self, sqlx::query(
            "UPDATE policies SET active_version = $1, version = version + 1, updated_at = $2 WHERE tenant_id = $3 AND id = $4 AND version = $5")
            .bind(version).bind(now).bind(tenant.to_string()).bind(id.to_string()).bind(cur.version))?;
        if n != 1 {
            return Err(Error::new(
                ErrorCode::PreconditionFailed,
                "the policy was modified concurrently",
            ));
        }
        Ok(Policy {
            active_version: Some(version),
            version: cur.version + 1,
            updated_at: now,
            ..cur
        })
    }

    pub async fn save_policy_description(&mut self, p: &Policy, expected: Option<i64>) -> Result<Policy> {
        let cur: Policy = self.get(p.tenant_id, &p.id.to_string()).await?;
        check_version("policy", expected, cur.version)?;
        let now = now_micros();
        tx_exec!(self, sqlx::query("UPDATE policies SET description = $1, version = version + 1, updated_at = $2 WHERE tenant_id = $3 AND id = $4")
            .bind(&p.description).bind(now).bind(p.tenant_id.to_string()).bind(p.id.to_string()))?;
        Ok(Policy {
            description: p.description.clone(),
            version: cur.version + 1,
            updated_at: now,
            ..cur
        })
    }

    pub async fn delete_policy(&mut self, tenant: TenantId, id: PolicyId) -> Result<()> {
        let (n,): (i64,) = tx!(self, c => sqlx::query_as("SELECT COUNT(*) FROM grants WHERE tenant_id = $1 AND policy_id = $2")
            .bind(tenant.to_string()).bind(id.to_string()).fetch_one(c).await)?;
        if n > 0 {
            return Err(Error::conflict(format!(
                "the policy is used by {n} grant(s); delete or change them first"
            )));
        }
        self.delete::<Policy>(tenant, &id.to_string()).await
    }
}

impl Store {
    pub async fn policy_version(&self, tenant: TenantId, id: PolicyId, version: i64) -> Result<PolicyVersion> {
        let row: Option<VersionRow> = read!(self, p => sqlx::query_as(
            "SELECT policy_id, version, format, source, normalized, checksum, created_at FROM policy_versions
             WHERE tenant_id = $1 AND policy_id = $2 AND version = $3")
            .bind(tenant.to_string()).bind(id.to_string()).bind(version).fetch_optional(p).await)?;
        row.map(version_from_row)
            .transpose()?
            .ok_or_else(|| Error::not_found("policy version"))
    }

    pub async fn policy_versions(&self, tenant: TenantId, id: PolicyId) -> Result<Vec<PolicyVersion>> {
        let rows: Vec<VersionRow> = read!(self, p => sqlx::query_as(
            "SELECT policy_id, version, format, source, normalized, checksum, created_at FROM policy_versions
             WHERE tenant_id = $1 AND policy_id = $2 ORDER BY version LIMIT 1000")
            .bind(tenant.to_string()).bind(id.to_string()).fetch_all(p).await)?;
        rows.into_iter().map(version_from_row).collect()
    }

    pub async fn policy_by_name(&self, tenant: TenantId, name: &str) -> Result<Policy> {
        let row: Option<PolicyRow> = read!(self, p => sqlx::query_as(
            "SELECT id, tenant_id, name, description, active_version, latest_version, version, created_at, updated_at FROM policies WHERE tenant_id = $1 AND name = $2")
            .bind(tenant.to_string()).bind(name).fetch_optional(p).await)?;
        row.map(Policy::from_row)
            .transpose()?
            .ok_or_else(|| Error::not_found("policy"))
    }

    /// The active version of a policy, compiled.
    pub async fn active_policy(&self, tenant: TenantId, id: PolicyId) -> Result<(Policy, Option<PolicyVersion>)> {
        let p: Policy = self.get(tenant, &id.to_string()).await?;
        let v = match p.active_version {
            Some(v) => Some(self.policy_version(tenant, id, v).await?),
            None => None,
        };
        Ok((p, v))
    }
}

// ---------------------------------------------------------------- grants

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Grant {
    pub id: GrantId,
    pub tenant_id: TenantId,
    pub agent_id: AgentId,
    pub resource_id: ResourceId,
    pub policy_id: PolicyId,
    /// Scopes the agent may obtain (`*` for every scope of the policy).
    pub scopes: Vec<String>,
    pub max_lifetime_secs: i64,
    pub version: i64,
    pub created_at: Micros,
    pub updated_at: Micros,
}

type GrantRow = (String, String, String, String, String, String, i64, i64, i64, i64);
const GRANT_COLS: &str =
    "id, tenant_id, agent_id, resource_id, policy_id, scopes, max_lifetime_secs, version, created_at, updated_at";

impl Entity for Grant {
    type Row = GrantRow;
    const WHAT: &'static str = "grant";
    entity_sql!(
        "grants",
        "id, tenant_id, agent_id, resource_id, policy_id, scopes, max_lifetime_secs, version, created_at, updated_at"
    );
    fn from_row(r: GrantRow) -> Result<Grant> {
        Ok(Grant {
            id: GrantId::parse(&r.0)?,
            tenant_id: TenantId::parse(&r.1)?,
            agent_id: AgentId::parse(&r.2)?,
            resource_id: ResourceId::parse(&r.3)?,
            policy_id: PolicyId::parse(&r.4)?,
            scopes: serde_json::from_str(&r.5).unwrap_or_default(),
            max_lifetime_secs: r.6,
            version: r.7,
            created_at: r.8,
            updated_at: r.9,
        })
    }
    fn id_string(&self) -> String {
        self.id.to_string()
    }
}

/// Longest mandate lifetime a grant may allow (mandates are short-lived).
pub const MAX_MANDATE_LIFETIME_SECS: i64 = 24 * 3600;

impl Grant {
    pub fn validate(&self) -> Result<()> {
        if !(10..=MAX_MANDATE_LIFETIME_SECS).contains(&self.max_lifetime_secs) {
            return Err(Error::validation(format!(
                "max_lifetime_secs must be between 10 and {MAX_MANDATE_LIFETIME_SECS}"
            )));
        }
        if self.scopes.is_empty() {
            return Err(Error::validation("scopes must list at least one scope (or \"*\")"));
        }
        for s in &self.scopes {
            if s.is_empty() || s.len() > 64 || s.contains(' ') {
                return Err(Error::validation("scopes are 1-64 characters without spaces"));
            }
        }
        Ok(())
    }

    pub fn allows_scope(&self, s: &str) -> bool {
        self.scopes.iter().any(|g| g == "*" || g == s)
    }
}

impl Tx {
    pub async fn upsert_grant(&mut self, g: &Grant, expected: Option<i64>, create: bool) -> Result<Grant> {
        g.validate()?;
        // Every referenced object must exist in the same tenant.
        let _: crate::store::agents::Agent = self.get(g.tenant_id, &g.agent_id.to_string()).await?;
        let _: crate::store::resources::Resource = self.get(g.tenant_id, &g.resource_id.to_string()).await?;
        let _: Policy = self.get(g.tenant_id, &g.policy_id.to_string()).await?;
        let now = now_micros();
        let scopes = serde_json::to_string(&g.scopes)?;
        if create {
            tx_exec!(self, sqlx::query(
                "INSERT INTO grants (id, tenant_id, agent_id, resource_id, policy_id, scopes, max_lifetime_secs, version, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, 1, $8, $8)")
                .bind(g.id.to_string()).bind(g.tenant_id.to_string()).bind(g.agent_id.to_string()).bind(g.resource_id.to_string())
                .bind(g.policy_id.to_string()).bind(&scopes).bind(g.max_lifetime_secs).bind(now))
            .map_err(|e| conflict_on_unique(e, "this agent already has a grant on this resource"))?;
            return Ok(Grant {
                version: 1,
                created_at: now,
                updated_at: now,
                ..g.clone()
            });
        }
        let cur: Grant = self.get(g.tenant_id, &g.id.to_string()).await?;
        check_version("grant", expected, cur.version)?;
        let n = tx_exec!(self, sqlx::query(
            "UPDATE grants SET policy_id = $1, scopes = $2, max_lifetime_secs = $3, version = version + 1, updated_at = $4
             WHERE tenant_id = $5 AND id = $6 AND version = $7")
            .bind(g.policy_id.to_string()).bind(&scopes).bind(g.max_lifetime_secs).bind(now)
            .bind(g.tenant_id.to_string()).bind(g.id.to_string()).bind(cur.version))?;
        if n != 1 {
            return Err(Error::new(
                ErrorCode::PreconditionFailed,
                "the grant was modified concurrently",
            ));
        }
        Ok(Grant {
            agent_id: cur.agent_id,
            resource_id: cur.resource_id,
            version: cur.version + 1,
            created_at: cur.created_at,
            updated_at: now,
            ..g.clone()
        })
    }
}

impl Store {
    pub async fn grants_of(&self, tenant: TenantId, agent: AgentId) -> Result<Vec<Grant>> {
        let sql =
            format!("SELECT {GRANT_COLS} FROM grants WHERE tenant_id = $1 AND agent_id = $2 ORDER BY id LIMIT 1000");
        let rows: Vec<GrantRow> = read!(self, p => sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(tenant.to_string()).bind(agent.to_string()).fetch_all(p).await)?;
        rows.into_iter().map(Grant::from_row).collect()
    }
}

impl Store {
    /// (tenant, policy, active version) of every policy with an active version.
    pub async fn active_policy_versions(&self) -> Result<Vec<(TenantId, PolicyId, i64)>> {
        let rows: Vec<(String, String, i64)> = read!(self, p => sqlx::query_as(
            "SELECT tenant_id, id, active_version FROM policies WHERE active_version IS NOT NULL ORDER BY id LIMIT 100000")
            .fetch_all(p).await)?;
        rows.into_iter()
            .map(|(t, p, v)| Ok((TenantId::parse(&t)?, PolicyId::parse(&p)?, v)))
            .collect()
    }
}
