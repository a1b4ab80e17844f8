//! Schema migrations: append-only SQL files, one set per backend, embedded in the binary.
//!
//! Each applied migration is recorded with a SHA-256 checksum of its text; a recorded migration
//! whose text changed is refused (migrations are append-only). On Postgres, concurrent starts
//! are serialised with a transaction-scoped advisory lock; SQLite has a single writer.

use crate::config::DbKind;
use crate::crypto::sha256;
use crate::error::{Error, ErrorCode, Result};
use crate::time::now_micros;

use super::{Store, tx, tx_exec};

pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub postgres: &'static str,
    pub sqlite: &'static str,
}

macro_rules! migration {
    ($v:expr, $name:literal) => {
        Migration {
            version: $v,
            name: $name,
            postgres: include_str!(concat!("../../../migrations/postgres/", $name, ".sql")),
            sqlite: include_str!(concat!("../../../migrations/sqlite/", $name, ".sql")),
        }
    };
}

/// Every migration, in order. A test checks this list matches the files on disk.
pub const MIGRATIONS: &[Migration] = &[
    migration!(1, "0001_foundation"),
    migration!(2, "0002_control"),
    migration!(3, "0003_authority"),
    migration!(4, "0004_ledger"),
    migration!(5, "0005_coordination"),
    migration!(6, "0006_ledger_partitions"),
];

const LOCK_KEY: i64 = 0x6361_7261_6361_6c00; // "caracal\0"

impl Migration {
    fn sql(&self, kind: DbKind) -> &'static str {
        match kind {
            DbKind::Postgres => self.postgres,
            DbKind::Sqlite => self.sqlite,
        }
    }
}

impl Store {
    /// Apply every pending migration. Returns the versions applied by this call.
    pub async fn migrate(&self) -> Result<Vec<i64>> {
        let kind = self.kind();
        let mut t = self.begin().await?;
        tx_exec!(
            t,
            sqlx::query(
                "CREATE TABLE IF NOT EXISTS _caracal_migrations (
                version BIGINT PRIMARY KEY, name TEXT NOT NULL, checksum TEXT NOT NULL, applied_at BIGINT NOT NULL)"
            )
        )?;
        t.commit().await?;

        let mut applied_now = Vec::new();
        for m in MIGRATIONS {
            let mut t = self.begin().await?;
            if kind == DbKind::Postgres {
                // A migration (or waiting for another instance's) may take longer than the
                // sessions' statement limit: none for this transaction.
                tx_exec!(t, sqlx::query("SET LOCAL statement_timeout = 0"))?;
                tx_exec!(t, sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(LOCK_KEY))?;
            }
            let sql = m.sql(kind);
            let checksum = hex::encode(sha256(sql.as_bytes()));
            let existing: Option<(String,)> = tx!(t, c => sqlx::query_as(
                "SELECT checksum FROM _caracal_migrations WHERE version = $1").bind(m.version).fetch_optional(c).await)?;
            match existing {
                Some((sum,)) if sum == checksum => {
                    t.rollback().await?;
                    continue;
                }
                Some(_) => {
                    return Err(Error::new(
                        ErrorCode::Internal,
                        format!(
                            "migration {} ({}) was changed after it was applied; migrations are append-only",
                            m.version, m.name
                        ),
                    ));
                }
                None => {}
            }
            tx_exec!(t, sqlx::raw_sql(sql)).map_err(|e| {
                Error::new(
                    ErrorCode::Internal,
                    format!("migration {} ({}) failed", m.version, m.name),
                )
                .with_source(e)
            })?;
            tx_exec!(
                t,
                sqlx::query(
                    "INSERT INTO _caracal_migrations (version, name, checksum, applied_at) VALUES ($1, $2, $3, $4)"
                )
                .bind(m.version)
                .bind(m.name)
                .bind(&checksum)
                .bind(now_micros())
            )?;
            t.commit().await?;
            tracing::info!(version = m.version, name = m.name, "applied migration");
            applied_now.push(m.version);
        }
        Ok(applied_now)
    }

    /// Versions recorded as applied.
    pub async fn applied_migrations(&self) -> Result<Vec<i64>> {
        let rows: Vec<(i64,)> = super::read!(self, p => sqlx::query_as(
            "SELECT version FROM _caracal_migrations ORDER BY version").fetch_all(p).await)?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_migration_file_is_listed_for_both_backends() {
        for backend in ["postgres", "sqlite"] {
            let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations/");
            let mut files: Vec<String> = std::fs::read_dir(format!("{dir}{backend}"))
                .unwrap()
                .map(|e| {
                    e.unwrap()
                        .file_name()
                        .to_string_lossy()
                        .trim_end_matches(".sql")
                        .to_string()
                })
                .collect();
            files.sort();
            let listed: Vec<String> = MIGRATIONS.iter().map(|m| m.name.to_string()).collect();
            assert_eq!(files, listed, "migrations/{backend} and MIGRATIONS differ");
        }
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i64 + 1, "versions are dense and ordered");
            assert!(m.name.starts_with(&format!("{:04}_", m.version)));
        }
    }
}
