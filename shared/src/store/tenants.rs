//! Tenants: the namespace every other object lives in.

use serde::Serialize;

use super::{Cursor, Page, Store, Tx, read, tx, tx_exec};
use crate::error::{Error, Result};
use crate::ids::TenantId;
use crate::time::{Micros, now_micros};

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Tenant {
    pub id: TenantId,
    pub name: String,
    pub display_name: String,
    pub version: i64,
    pub created_at: Micros,
    pub updated_at: Micros,
}

type Row = (String, String, String, i64, i64, i64);
macro_rules! cols {
    () => {
        "id, name, display_name, version, created_at, updated_at"
    };
}

fn from_row(r: Row) -> Result<Tenant> {
    Ok(Tenant {
        id: TenantId::parse(&r.0)?,
        name: r.1,
        display_name: r.2,
        version: r.3,
        created_at: r.4,
        updated_at: r.5,
    })
}

/// Tenant names are DNS-label-like slugs: 1-63 of [a-z0-9-], not starting or ending with '-'.
pub fn validate_slug(field: &str, s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::validation(format!(
            "{field} must be 1-63 characters of a-z, 0-9 and '-', not starting or ending with '-'"
        )))
    }
}

impl Tx {
    pub async fn insert_tenant(&mut self, name: &str, display_name: &str) -> Result<Tenant> {
        validate_slug("name", name)?;
        let now = now_micros();
        let t = Tenant {
            id: TenantId::new(),
            name: name.to_string(),
            display_name: display_name.to_string(),
            version: 1,
            created_at: now,
            updated_at: now,
        };
        tx_exec!(self, sqlx::query(
            "INSERT INTO tenants (id, name, display_name, version, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(t.id.to_string()).bind(&t.name).bind(&t.display_name).bind(t.version).bind(t.created_at).bind(t.updated_at)
            )
        .map_err(|e| match Error::from(e) {
            err if err.code == crate::error::ErrorCode::Conflict => Error::conflict(format!("a tenant named {name:?} already exists")),
            err => err,
        })?;
        Ok(t)
    }

    /// Update with optimistic concurrency: `expected_version` must match or the update fails
    /// with `precondition_failed`.
    pub async fn update_tenant(
        &mut self,
        id: TenantId,
        expected_version: Option<i64>,
        display_name: &str,
    ) -> Result<Tenant> {
        let cur = self.tenant_for_update(id).await?;
        if let Some(v) = expected_version
            && v != cur.version
        {
            return Err(Error::new(
                crate::error::ErrorCode::PreconditionFailed,
                "the tenant was modified; re-read it and retry",
            )
            .with_details(serde_json::json!({ "current_version": cur.version })));
        }
        let now = now_micros();
        let n = tx_exec!(self, sqlx::query(
            "UPDATE tenants SET display_name = $1, version = version + 1, updated_at = $2 WHERE id = $3 AND version = $4")
            .bind(display_name).bind(now).bind(id.to_string()).bind(cur.version))?;
        if n != 1 {
            return Err(Error::new(
                crate::error::ErrorCode::PreconditionFailed,
                "the tenant was modified concurrently",
            ));
        }
        Ok(Tenant {
            display_name: display_name.to_string(),
            version: cur.version + 1,
            updated_at: now,
            ..cur
        })
    }

    pub async fn tenant_for_update(&mut self, id: TenantId) -> Result<Tenant> {
        let row: Option<Row> = tx!(self, c => sqlx::query_as(
            concat!("SELECT ", cols!(), " FROM tenants WHERE id = $1")).bind(id.to_string()).fetch_optional(c).await)?;
        row.map(from_row).transpose()?.ok_or_else(|| Error::not_found("tenant"))
    }

    pub async fn delete_tenant(&mut self, id: TenantId) -> Result<()> {
        let n = tx_exec!(
            self,
            sqlx::query("DELETE FROM tenants WHERE id = $1").bind(id.to_string())
        )?;
        if n == 0 {
            return Err(Error::not_found("tenant"));
        }
        Ok(())
    }
}

impl Store {
    pub async fn tenant(&self, id: TenantId) -> Result<Tenant> {
        let row: Option<Row> = read!(self, p => sqlx::query_as(
            concat!("SELECT ", cols!(), " FROM tenants WHERE id = $1")).bind(id.to_string()).fetch_optional(p).await)?;
        row.map(from_row).transpose()?.ok_or_else(|| Error::not_found("tenant"))
    }

    pub async fn tenant_by_name(&self, name: &str) -> Result<Tenant> {
        let row: Option<Row> = read!(self, p => sqlx::query_as(
            concat!("SELECT ", cols!(), " FROM tenants WHERE name = $1")).bind(name).fetch_optional(p).await)?;
        row.map(from_row).transpose()?.ok_or_else(|| Error::not_found("tenant"))
    }

    pub async fn list_tenants(&self, cursor: &Cursor) -> Result<Page<Tenant>> {
        let rows: Vec<Row> = read!(self, p => sqlx::query_as(
            concat!("SELECT ", cols!(), " FROM tenants WHERE id > $1 ORDER BY id LIMIT $2"))
            .bind(cursor.after_str()).bind(cursor.fetch_limit()).fetch_all(p).await)?;
        let items = rows.into_iter().map(from_row).collect::<Result<Vec<_>>>()?;
        Ok(Page::from_rows(items, cursor, |t| t.id.to_string()))
    }
}

impl Store {
    /// Every tenant (bounded), for gateway snapshots.
    pub async fn list_all_tenants(&self, max: i64) -> Result<Vec<Tenant>> {
        let rows: Vec<Row> = read!(self, p => sqlx::query_as(concat!("SELECT ", cols!(), " FROM tenants ORDER BY id LIMIT $1"))
            .bind(max).fetch_all(p).await)?;
        rows.into_iter().map(from_row).collect()
    }
}
