//! Tenant-scoped reads and deletes, written once for every entity table.
//!
//! Every query here filters on `tenant_id`: an object of another tenant is simply not found
//! (a 404 that does not reveal it exists). Entity modules implement [`Entity`] with the SQL of
//! their table; inserts and updates stay in the modules (their columns differ).

use sqlx::postgres::PgRow;
use sqlx::sqlite::SqliteRow;

use super::{Cursor, Page, Store, Tx, read, tx, tx_exec};
use crate::error::{Error, Result};
use crate::ids::TenantId;

pub trait Entity: Sized + Send + 'static {
    type Row: for<'r> sqlx::FromRow<'r, PgRow> + for<'r> sqlx::FromRow<'r, SqliteRow> + Send + Unpin;
    /// Human name for errors ("agent").
    const WHAT: &'static str;
    /// `SELECT … WHERE tenant_id = $1 AND id = $2`
    const SELECT_ONE: &'static str;
    /// `SELECT … WHERE tenant_id = $1 AND id > $2 ORDER BY id LIMIT $3`
    const SELECT_PAGE: &'static str;
    /// `DELETE FROM … WHERE tenant_id = $1 AND id = $2`
    const DELETE: &'static str;

    fn from_row(r: Self::Row) -> Result<Self>;
    fn id_string(&self) -> String;
}

/// Declare the SQL of an entity table from its name and column list.
#[macro_export]
#[doc(hidden)]
macro_rules! __entity_sql {
    ($table:literal, $cols:literal) => {
        const SELECT_ONE: &'static str = concat!(
            "SELECT ",
            $cols,
            " FROM ",
            $table,
            " WHERE tenant_id = $1 AND id = $2"
        );
        const SELECT_PAGE: &'static str = concat!(
            "SELECT ",
            $cols,
            " FROM ",
            $table,
            " WHERE tenant_id = $1 AND id > $2 ORDER BY id LIMIT $3"
        );
        const DELETE: &'static str = concat!("DELETE FROM ", $table, " WHERE tenant_id = $1 AND id = $2");
    };
}
pub use crate::__entity_sql as entity_sql;

impl Store {
    pub async fn get<E: Entity>(&self, tenant: TenantId, id: &str) -> Result<E> {
        let row: Option<E::Row> = read!(self, p => sqlx::query_as(E::SELECT_ONE)
            .bind(tenant.to_string()).bind(id).fetch_optional(p).await)?;
        row.map(E::from_row)
            .transpose()?
            .ok_or_else(|| Error::not_found(E::WHAT))
    }

    pub async fn list<E: Entity>(&self, tenant: TenantId, cursor: &Cursor) -> Result<Page<E>> {
        let rows: Vec<E::Row> = read!(self, p => sqlx::query_as(E::SELECT_PAGE)
            .bind(tenant.to_string()).bind(cursor.after_str()).bind(cursor.fetch_limit()).fetch_all(p).await)?;
        let items = rows.into_iter().map(E::from_row).collect::<Result<Vec<_>>>()?;
        Ok(Page::from_rows(items, cursor, |e| e.id_string()))
    }

    /// Every row of a tenant (bounded by `max`), for snapshots and bundles.
    pub async fn list_all<E: Entity>(&self, tenant: TenantId, max: usize) -> Result<Vec<E>> {
        let mut out = Vec::new();
        let mut cursor = Cursor::first(super::page::MAX_LIMIT);
        loop {
            let page = self.list::<E>(tenant, &cursor).await?;
            out.extend(page.items);
            if out.len() >= max {
                out.truncate(max);
                return Ok(out);
            }
            match page.next_cursor {
                Some(_) => cursor.after = out.last().map(|e| e.id_string()),
                None => return Ok(out),
            }
        }
    }
}

impl Tx {
    pub async fn get<E: Entity>(&mut self, tenant: TenantId, id: &str) -> Result<E> {
        let row: Option<E::Row> = tx!(self, c => sqlx::query_as(E::SELECT_ONE)
            .bind(tenant.to_string()).bind(id).fetch_optional(c).await)?;
        row.map(E::from_row)
            .transpose()?
            .ok_or_else(|| Error::not_found(E::WHAT))
    }

    pub async fn delete<E: Entity>(&mut self, tenant: TenantId, id: &str) -> Result<()> {
        let n = tx_exec!(self, sqlx::query(E::DELETE).bind(tenant.to_string()).bind(id))?;
        if n == 0 {
            return Err(Error::not_found(E::WHAT));
        }
        Ok(())
    }
}

/// Check an optimistic-concurrency precondition (`If-Match`).
pub fn check_version(what: &str, expected: Option<i64>, current: i64) -> Result<()> {
    match expected {
        Some(v) if v != current => Err(Error::new(
            crate::error::ErrorCode::PreconditionFailed,
            format!("the {what} was modified (version {current}); re-read it and retry"),
        )
        .with_details(serde_json::json!({ "current_version": current }))),
        _ => Ok(()),
    }
}

/// Map a unique violation to a clear conflict.
pub fn conflict_on_unique(e: sqlx::Error, msg: impl Into<String>) -> Error {
    let err = Error::from(e);
    if err.code == crate::error::ErrorCode::Conflict {
        Error::conflict(msg.into())
    } else {
        err
    }
}
