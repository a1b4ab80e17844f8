//! Storage: one interface over Postgres (production) and SQLite (embedded).
//!
//! [`Store`] dispatches each query to the backend's native sqlx driver. Queries are written once
//! in portable SQL (`$N` placeholders work on both drivers, times are `BIGINT` microseconds,
//! JSON is `TEXT`), and the `read!`/`write!`/`tx!` macros expand the same code for each
//! backend. Where the engines genuinely differ (row locking, advisory locks) a method matches
//! on the backend explicitly.
//!
//! SQLite runs in WAL mode with one writer connection and several readers, so writers never
//! race for the lock (no `SQLITE_BUSY` on lock upgrade) and reads proceed concurrently.
//!
//! Domain tables get their own modules (`tenants`, …) implemented on [`Store`] and [`Tx`].

pub mod admin;
pub mod agents;
pub mod authority;
pub mod coordination;
pub mod entity;
pub mod ledger;
pub mod migrate;
mod nodelay;
pub mod outbox;
pub mod page;
pub mod policies;
pub mod resources;
pub mod tenants;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

use crate::config::{DatabaseConfig, DbKind, db_kind, redact_url};
use crate::error::{Error, ErrorCode, Result};

pub use page::{Cursor, Page};

enum Inner {
    Pg(PgPool),
    Sqlite { read: SqlitePool, write: SqlitePool },
}

/// Handle to the database. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
    /// Woken when a transaction that wrote outbox rows commits (same process).
    outbox_signal: Arc<tokio::sync::Notify>,
}

/// Run `$body` with `$p` bound to the pool that serves reads.
#[macro_export]
#[doc(hidden)]
macro_rules! __store_read {
    ($store:expr, $p:ident => $body:expr) => {
        match $store.backend() {
            $crate::store::Backend::Pg(pg) => {
                let $p = pg;
                $body
            }
            $crate::store::Backend::Sqlite { read, .. } => {
                let $p = read;
                $body
            }
        }
    };
}

/// Run `$body` with `$p` bound to the pool that serves writes.
#[macro_export]
#[doc(hidden)]
macro_rules! __store_write {
    ($store:expr, $p:ident => $body:expr) => {
        match $store.backend() {
            $crate::store::Backend::Pg(pg) => {
                let $p = pg;
                $body
            }
            $crate::store::Backend::Sqlite { write, .. } => {
                let $p = write;
                $body
            }
        }
    };
}

/// Run `$body` with `$c` bound to the transaction's connection.
#[macro_export]
#[doc(hidden)]
macro_rules! __store_tx {
    ($tx:expr, $c:ident => $body:expr) => {
        match $tx.conn() {
            $crate::store::TxConn::Pg(t) => {
                let $c = &mut **t;
                $body
            }
            $crate::store::TxConn::Sqlite(t) => {
                let $c = &mut **t;
                $body
            }
        }
    };
}

/// Execute a statement in a transaction; yields `Result<u64, sqlx::Error>` (rows affected).
#[macro_export]
#[doc(hidden)]
macro_rules! __store_tx_exec {
    ($tx:expr, $q:expr) => {
        match $tx.conn() {
            $crate::store::TxConn::Pg(t) => $q.execute(&mut **t).await.map(|r| r.rows_affected()),
            $crate::store::TxConn::Sqlite(t) => $q.execute(&mut **t).await.map(|r| r.rows_affected()),
        }
    };
}

/// Execute a statement on the write pool; yields `Result<u64, sqlx::Error>` (rows affected).
#[macro_export]
#[doc(hidden)]
macro_rules! __store_write_exec {
    ($store:expr, $q:expr) => {
        match $store.backend() {
            $crate::store::Backend::Pg(p) => $q.execute(p).await.map(|r| r.rows_affected()),
            $crate::store::Backend::Sqlite { write, .. } => $q.execute(write).await.map(|r| r.rows_affected()),
        }
    };
}

pub use crate::__store_read as read;
pub use crate::__store_tx as tx;
pub use crate::__store_tx_exec as tx_exec;
pub use crate::__store_write as write;
pub use crate::__store_write_exec as write_exec;

/// Borrowed view of the pools, for the dispatch macros.
pub enum Backend<'a> {
    Pg(&'a PgPool),
    Sqlite {
        read: &'a SqlitePool,
        write: &'a SqlitePool,
    },
}

/// A transaction on either backend. Dropped without [`Tx::commit`] it rolls back.
pub struct Tx {
    conn: TxConnOwned,
    signal: Arc<tokio::sync::Notify>,
    emitted: bool,
}

enum TxConnOwned {
    Pg(sqlx::Transaction<'static, sqlx::Postgres>),
    Sqlite(sqlx::Transaction<'static, sqlx::Sqlite>),
}

pub enum TxConn<'a> {
    Pg(&'a mut sqlx::Transaction<'static, sqlx::Postgres>),
    Sqlite(&'a mut sqlx::Transaction<'static, sqlx::Sqlite>),
}

impl Tx {
    pub fn conn(&mut self) -> TxConn<'_> {
        match &mut self.conn {
            TxConnOwned::Pg(t) => TxConn::Pg(t),
            TxConnOwned::Sqlite(t) => TxConn::Sqlite(t),
        }
    }

    pub fn kind(&self) -> DbKind {
        match self.conn {
            TxConnOwned::Pg(_) => DbKind::Postgres,
            TxConnOwned::Sqlite(_) => DbKind::Sqlite,
        }
    }

    pub async fn commit(self) -> Result<()> {
        match self.conn {
            TxConnOwned::Pg(t) => t.commit().await?,
            TxConnOwned::Sqlite(t) => t.commit().await?,
        }
        if self.emitted {
            self.signal.notify_waiters();
            self.signal.notify_one();
        }
        Ok(())
    }

    pub async fn rollback(self) -> Result<()> {
        match self.conn {
            TxConnOwned::Pg(t) => t.rollback().await?,
            TxConnOwned::Sqlite(t) => t.rollback().await?,
        }
        Ok(())
    }
}

impl Store {
    /// Connect to the configured database. Postgres pools connect lazily (a database that is
    /// down at start makes the service not-ready, not dead); SQLite files are created.
    pub async fn connect(cfg: &DatabaseConfig) -> Result<Store> {
        match db_kind(&cfg.url) {
            Some(DbKind::Postgres) => {
                let invalid = |e: sqlx::Error| {
                    Error::new(
                        ErrorCode::ValidationFailed,
                        format!("invalid database URL {}: {e}", redact_url(&cfg.url)),
                    )
                };
                // Server-side limits, set on every session at its start (milliseconds).
                let opts = sqlx::postgres::PgConnectOptions::from_str(&cfg.url)
                    .map_err(invalid)?
                    .options([
                        ("statement_timeout", cfg.statement_timeout.as_millis().to_string()),
                        (
                            "idle_in_transaction_session_timeout",
                            cfg.idle_in_transaction_timeout.as_millis().to_string(),
                        ),
                    ]);
                let port = opts.get_port();
                let pool = PgPoolOptions::new()
                    .after_connect(move |_conn, _meta| {
                        Box::pin(async move {
                            nodelay::to_port(port);
                            Ok(())
                        })
                    })
                    .max_connections(cfg.max_connections)
                    .acquire_timeout(cfg.acquire_timeout)
                    .idle_timeout(Duration::from_secs(300))
                    .connect_lazy_with(opts);
                Ok(Store {
                    inner: Arc::new(Inner::Pg(pool)),
                    outbox_signal: Arc::new(tokio::sync::Notify::new()),
                })
            }
            Some(DbKind::Sqlite) => {
                if let Some(path) = sqlite_path(&cfg.url)
                    && let Some(dir) = std::path::Path::new(&path).parent()
                    && !dir.as_os_str().is_empty()
                {
                    std::fs::create_dir_all(dir).map_err(|e| {
                        Error::new(
                            ErrorCode::StoreUnavailable,
                            format!("cannot create {}: {e}", dir.display()),
                        )
                    })?;
                }
                let opts = SqliteConnectOptions::from_str(&cfg.url)
                    .map_err(|e| Error::validation(format!("invalid SQLite URL: {e}")))?
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Full)
                    .foreign_keys(true)
                    .busy_timeout(Duration::from_secs(10));
                let write = SqlitePoolOptions::new()
                    .max_connections(1)
                    .acquire_timeout(Duration::from_secs(30))
                    .connect_with(opts.clone())
                    .await?;
                let read = SqlitePoolOptions::new()
                    .max_connections(cfg.max_connections.max(2))
                    .acquire_timeout(cfg.acquire_timeout.max(Duration::from_secs(10)))
                    .connect_with(opts)
                    .await?;
                Ok(Store {
                    inner: Arc::new(Inner::Sqlite { read, write }),
                    outbox_signal: Arc::new(tokio::sync::Notify::new()),
                })
            }
            None => Err(Error::validation("database URL must start with postgres:// or sqlite:")),
        }
    }

    /// Connect and apply every pending migration.
    pub async fn open(cfg: &DatabaseConfig) -> Result<Store> {
        let s = Store::connect(cfg).await?;
        s.migrate().await?;
        Ok(s)
    }

    pub fn kind(&self) -> DbKind {
        match &*self.inner {
            Inner::Pg(_) => DbKind::Postgres,
            Inner::Sqlite { .. } => DbKind::Sqlite,
        }
    }

    pub fn backend(&self) -> Backend<'_> {
        match &*self.inner {
            Inner::Pg(p) => Backend::Pg(p),
            Inner::Sqlite { read, write } => Backend::Sqlite { read, write },
        }
    }

    /// Begin a write transaction.
    pub async fn begin(&self) -> Result<Tx> {
        let conn = match &*self.inner {
            Inner::Pg(p) => TxConnOwned::Pg(p.begin().await?),
            Inner::Sqlite { write, .. } => TxConnOwned::Sqlite(write.begin().await?),
        };
        Ok(Tx {
            conn,
            signal: self.outbox_signal.clone(),
            emitted: false,
        })
    }

    /// Resolves when a local transaction that emitted events commits.
    pub fn outbox_signal(&self) -> Arc<tokio::sync::Notify> {
        self.outbox_signal.clone()
    }

    /// A cheap round trip, for readiness probes.
    pub async fn ping(&self) -> Result<()> {
        let _: (i32,) = read!(self, p => sqlx::query_as("SELECT 1").fetch_one(p).await)?;
        Ok(())
    }

    pub async fn close(&self) {
        match &*self.inner {
            Inner::Pg(p) => p.close().await,
            Inner::Sqlite { read, write } => {
                read.close().await;
                write.close().await;
            }
        }
    }
}

fn sqlite_path(url: &str) -> Option<String> {
    let rest = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:"))?;
    if rest.starts_with(":memory:") || rest.is_empty() {
        return None;
    }
    Some(rest.split('?').next().unwrap_or(rest).to_string())
}

/// Leadership held through a Postgres session-level advisory lock on a dedicated connection:
/// released when the holder drops it or its process dies (the server ends the session).
/// On SQLite (one process) leadership is always granted.
pub struct LeaderLock {
    conn: Option<sqlx::PgConnection>,
}

impl LeaderLock {
    /// Whether the lock is still held (the session is alive).
    pub async fn still_held(&mut self) -> bool {
        match &mut self.conn {
            None => true,
            Some(c) => sqlx::query("SELECT 1").execute(&mut *c).await.is_ok(),
        }
    }
}

impl Store {
    /// Try to become the single holder of `key` across every process sharing the database.
    pub async fn try_leader_lock(&self, key: i64) -> Result<Option<LeaderLock>> {
        match &*self.inner {
            Inner::Sqlite { .. } => Ok(Some(LeaderLock { conn: None })),
            Inner::Pg(p) => {
                let mut conn = p.acquire().await?.detach();
                let (ok,): (bool,) = sqlx::query_as("SELECT pg_try_advisory_lock($1)")
                    .bind(key)
                    .fetch_one(&mut conn)
                    .await?;
                Ok(ok.then_some(LeaderLock { conn: Some(conn) }))
            }
        }
    }

    /// A Postgres listener on `channel` (None on SQLite).
    pub async fn listen(&self, channel: &str) -> Result<Option<sqlx::postgres::PgListener>> {
        match &*self.inner {
            Inner::Sqlite { .. } => Ok(None),
            Inner::Pg(p) => {
                let mut l = sqlx::postgres::PgListener::connect_with(p).await?;
                l.listen(channel).await?;
                Ok(Some(l))
            }
        }
    }
}
