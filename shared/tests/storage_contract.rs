//! Storage contract: the same tests, unchanged, against SQLite and Postgres.

use std::time::Duration;

use caracal_shared::ErrorCode;
use caracal_shared::store::outbox::NewEvent;
use caracal_shared::store::{Cursor, Store};
use caracal_shared::testing::TestDb;
use serde_json::json;

macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let db = caracal_shared::testing::TestDb::new(caracal_shared::testing::Backend::Sqlite).await.unwrap();
                super::$name(&db).await;
                db.cleanup().await;
            })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let Some(db) = caracal_shared::testing::TestDb::new(caracal_shared::testing::Backend::Postgres).await else { return };
                super::$name(&db).await;
                db.cleanup().await;
            })*
        }
    };
}

contract!(
    migrations_are_recorded_and_idempotent,
    tenant_crud_and_optimistic_concurrency,
    tenant_pagination_is_stable_and_complete,
    outbox_is_atomic_with_the_state_change,
    sequenced_streams_number_events_densely,
    concurrent_sequenced_writers_agree_on_order,
    consumed_marks_are_idempotent,
    retention_prunes_only_published_rows,
    store_is_reopenable,
);

async fn migrations_are_recorded_and_idempotent(db: &TestDb) {
    let s = &db.store;
    let applied = s.applied_migrations().await.unwrap();
    assert_eq!(applied, (1..=applied.len() as i64).collect::<Vec<_>>());
    assert!(
        s.migrate().await.unwrap().is_empty(),
        "a second migrate applies nothing"
    );
}

async fn tenant_crud_and_optimistic_concurrency(db: &TestDb) {
    let s = &db.store;
    let mut tx = s.begin().await.unwrap();
    let t = tx.insert_tenant("acme", "Acme Corp").await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(s.tenant(t.id).await.unwrap(), t);
    assert_eq!(s.tenant_by_name("acme").await.unwrap().id, t.id);

    let mut tx = s.begin().await.unwrap();
    let e = tx.insert_tenant("acme", "again").await.unwrap_err();
    assert_eq!(e.code, ErrorCode::Conflict);
    drop(tx);

    let mut tx = s.begin().await.unwrap();
    assert_eq!(
        tx.insert_tenant("Bad Name", "x").await.unwrap_err().code,
        ErrorCode::ValidationFailed
    );
    drop(tx);

    let mut tx = s.begin().await.unwrap();
    let e = tx.update_tenant(t.id, Some(7), "nope").await.unwrap_err();
    assert_eq!(e.code, ErrorCode::PreconditionFailed);
    let u = tx.update_tenant(t.id, Some(1), "Acme Inc").await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(u.version, 2);
    assert_eq!(s.tenant(t.id).await.unwrap().display_name, "Acme Inc");

    let mut tx = s.begin().await.unwrap();
    tx.delete_tenant(t.id).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(s.tenant(t.id).await.unwrap_err().code, ErrorCode::NotFound);
    let mut tx = s.begin().await.unwrap();
    assert_eq!(tx.delete_tenant(t.id).await.unwrap_err().code, ErrorCode::NotFound);
}

async fn tenant_pagination_is_stable_and_complete(db: &TestDb) {
    let s = &db.store;
    let mut want = Vec::new();
    for i in 0..7 {
        let mut tx = s.begin().await.unwrap();
        want.push(tx.insert_tenant(&format!("t{i}"), "x").await.unwrap().id);
        tx.commit().await.unwrap();
    }
    let mut got = Vec::new();
    let mut cursor = Cursor::first(3);
    let mut pages = 0;
    loop {
        let page = s.list_tenants(&cursor).await.unwrap();
        pages += 1;
        got.extend(page.items.iter().map(|t| t.id));
        match page.next_cursor {
            Some(c) => cursor = Cursor::parse(Some(&c), Some("3")).unwrap(),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(
        got, want,
        "pages follow creation order with nothing missing or repeated"
    );
    assert!(Cursor::parse(Some("!!"), None).is_err());
    assert!(Cursor::parse(None, Some("0")).is_err());
    assert!(Cursor::parse(None, Some("201")).is_err());
}

async fn outbox_is_atomic_with_the_state_change(db: &TestDb) {
    let s = &db.store;
    let mut tx = s.begin().await.unwrap();
    tx.insert_tenant("rolled-back", "x").await.unwrap();
    tx.emit(NewEvent::new(
        "s",
        "tenant.created",
        None,
        json!({"name": "rolled-back"}),
    ))
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(
        s.tenant_by_name("rolled-back").await.unwrap_err().code,
        ErrorCode::NotFound
    );
    assert_eq!(s.outbox_unpublished_count().await.unwrap(), 0);

    let mut tx = s.begin().await.unwrap();
    let t = tx.insert_tenant("kept", "x").await.unwrap();
    let id = tx
        .emit(NewEvent::new(
            "s",
            "tenant.created",
            Some(t.id),
            json!({"name": "kept"}),
        ))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let rows = s.outbox_pending(10).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].event_id, id);
    assert_eq!(rows[0].tenant, Some(t.id));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&rows[0].body).unwrap(),
        json!({"name": "kept"})
    );
    // Waiting for publication: not while the row is pending, at once after.
    assert!(!s.outbox_wait_published(Duration::from_millis(30)).await.unwrap());
    s.outbox_mark_published(&[rows[0].id]).await.unwrap();
    assert!(s.outbox_wait_published(Duration::from_millis(30)).await.unwrap());
}

async fn sequenced_streams_number_events_densely(db: &TestDb) {
    let s = &db.store;
    let mut tx = s.begin().await.unwrap();
    for _ in 0..3 {
        tx.emit(NewEvent::new("rev", "k", None, json!({})).sequenced())
            .await
            .unwrap();
    }
    tx.emit(NewEvent::new("other", "k", None, json!({})).sequenced())
        .await
        .unwrap();
    tx.emit(NewEvent::new("plain", "k", None, json!({}))).await.unwrap();
    tx.commit().await.unwrap();
    let rows = s.outbox_pending(10).await.unwrap();
    let seqs: Vec<(String, Option<i64>)> = rows.iter().map(|r| (r.stream.clone(), r.seq)).collect();
    assert_eq!(
        seqs,
        vec![
            ("rev".into(), Some(1)),
            ("rev".into(), Some(2)),
            ("rev".into(), Some(3)),
            ("other".into(), Some(1)),
            ("plain".into(), None)
        ]
    );
    assert_eq!(s.stream_last_seq("rev").await.unwrap(), 3);
    assert_eq!(s.stream_last_seq("nothing").await.unwrap(), 0);
}

async fn concurrent_sequenced_writers_agree_on_order(db: &TestDb) {
    let s = db.store.clone();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut tx = s.begin().await.unwrap();
            tx.emit(NewEvent::new("rev", "k", None, json!({ "i": i })).sequenced())
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
            tx.commit().await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let rows = s.outbox_pending(100).await.unwrap();
    let seqs: Vec<i64> = rows.iter().map(|r| r.seq.unwrap()).collect();
    assert_eq!(seqs, (1..=16).collect::<Vec<_>>(), "outbox order equals sequence order");
}

async fn consumed_marks_are_idempotent(db: &TestDb) {
    let s = &db.store;
    let mut tx = s.begin().await.unwrap();
    assert!(tx.mark_consumed("c1", "evt_1").await.unwrap());
    assert!(!tx.mark_consumed("c1", "evt_1").await.unwrap());
    assert!(tx.mark_consumed("c2", "evt_1").await.unwrap());
    tx.commit().await.unwrap();
    assert!(s.is_consumed("c1", "evt_1").await.unwrap());
    // A rolled-back mark does not count.
    let mut tx = s.begin().await.unwrap();
    assert!(tx.mark_consumed("c1", "evt_2").await.unwrap());
    tx.rollback().await.unwrap();
    assert!(!s.is_consumed("c1", "evt_2").await.unwrap());
}

async fn retention_prunes_only_published_rows(db: &TestDb) {
    let s = &db.store;
    let mut tx = s.begin().await.unwrap();
    for _ in 0..4 {
        tx.emit(NewEvent::new("s", "k", None, json!({}))).await.unwrap();
    }
    tx.mark_consumed("c", "old").await.unwrap();
    tx.commit().await.unwrap();
    let rows = s.outbox_pending(10).await.unwrap();
    s.outbox_mark_published(&[rows[0].id, rows[1].id]).await.unwrap();
    let future = caracal_shared::time::now_micros() + 1_000_000;
    let (outbox, consumed) = s.prune_outbox(future, future).await.unwrap();
    assert_eq!((outbox, consumed), (2, 1));
    assert_eq!(
        s.outbox_unpublished_count().await.unwrap(),
        2,
        "unpublished rows are never pruned"
    );
}

async fn store_is_reopenable(db: &TestDb) {
    // A second handle on the same database sees the same data (a restart).
    let mut tx = db.store.begin().await.unwrap();
    tx.insert_tenant("persisted", "x").await.unwrap();
    tx.commit().await.unwrap();
    let again = Store::open(&caracal_shared::testing::db_config(&db.url)).await.unwrap();
    assert_eq!(again.tenant_by_name("persisted").await.unwrap().name, "persisted");
    again.close().await;
}

/// Postgres migration 0006 partitions a ledger that already holds entries: every entry keeps
/// its place, the root does not move, and appends go on into partitions created ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_partitioning_migration_keeps_existing_entries() {
    use caracal_shared::store::ledger::NewLedgerEvent;
    let Some(db) = TestDb::new(caracal_shared::testing::Backend::Postgres).await else {
        return;
    };
    let s = &db.store;
    let event = |i: u64| NewLedgerEvent {
        event_id: format!("evt_{i}"),
        stream: "audit".into(),
        kind: "decision".into(),
        tenant: None,
        agent_id: Some("agt_1".into()),
        resource_id: None,
        decision: Some("allow".into()),
        occurred_at: 1_000 + i as i64,
        body: json!({ "n": i }),
    };
    let first: Vec<NewLedgerEvent> = (0..45).map(event).collect();
    s.ledger_append(&first).await.unwrap();
    let root = s.ledger_root(45).await.unwrap();
    // Back to the layout before 0006 (what an older release left): one plain table.
    let pre_0006 = include_str!("../../migrations/postgres/0004_ledger.sql");
    let create = &pre_0006
        [pre_0006.find("CREATE TABLE ledger_entries").unwrap()..pre_0006.find("-- Hashes of complete").unwrap()];
    let caracal_shared::store::Backend::Pg(pool) = s.backend() else {
        unreachable!()
    };
    let steps = format!(
        "CREATE TABLE saved AS SELECT * FROM ledger_entries;
         DROP TABLE ledger_entries;
         {create}
         INSERT INTO ledger_entries SELECT * FROM saved;
         DROP TABLE saved;
         ALTER TABLE ledger_state DROP COLUMN partition_size, DROP COLUMN partitions_below;
         DELETE FROM _caracal_migrations WHERE version = 6;"
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(steps)).execute(pool).await.unwrap();
    assert!(s.ledger_partitions().await.is_err(), "not partitioned any more");

    assert_eq!(s.migrate().await.unwrap(), vec![6]);
    let ps = 1u64 << 22;
    assert_eq!(s.ledger_partitions().await.unwrap(), vec![(0, ps)]);
    assert_eq!(s.ledger_root(45).await.unwrap(), root, "the same tree");
    let all = s.ledger_range(0, 45).await.unwrap();
    assert_eq!(all.len(), 45);
    assert!(all.iter().all(|e| e.record.leaf_hash() == e.leaf_hash));
    // Duplicates are still dropped by event id; new events land after the old ones.
    let more: Vec<NewLedgerEvent> = (40..60).map(event).collect();
    let a = s.ledger_append(&more).await.unwrap();
    assert_eq!((a.appended, a.size), (15, 60));
    assert_eq!(s.ledger_entry_by_event("evt_59").await.unwrap().unwrap().record.seq, 59);
    assert_eq!(
        s.ledger_partitions().await.unwrap(),
        vec![(0, ps)],
        "still room in the first"
    );
    db.cleanup().await;
}

/// Postgres sessions carry the configured server-side limits: a statement running past
/// `database.statement_timeout` is cancelled and reported as a store outage (which consumers
/// retry, never dead-letter); a transaction left idle past `database.idle_in_transaction_timeout`
/// loses its session, and with it its locks; the pool goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_sessions_carry_the_statement_and_idle_transaction_limits() {
    let Some(db) = TestDb::postgres().await else { return };
    let mut cfg = caracal_shared::testing::db_config(&db.url);
    cfg.statement_timeout = Duration::from_millis(300);
    cfg.idle_in_transaction_timeout = Duration::from_millis(300);
    let store = Store::connect(&cfg).await.unwrap();
    let caracal_shared::store::Backend::Pg(pool) = store.backend() else {
        panic!("a Postgres store")
    };
    let started = std::time::Instant::now();
    let err: caracal_shared::Error = sqlx::query("SELECT pg_sleep(30)")
        .execute(pool)
        .await
        .unwrap_err()
        .into();
    assert_eq!(err.code, ErrorCode::StoreUnavailable, "{err}");
    assert!(started.elapsed() < Duration::from_secs(10), "cancelled by the server");

    // A transaction that takes a lock and then sits idle.
    let mut tx = pool.begin().await.unwrap();
    let (pid,): (i32,) = sqlx::query_as("SELECT pg_backend_pid()")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(4242)")
        .execute(&mut *tx)
        .await
        .unwrap();
    assert!(
        caracal_shared::testing::eventually(Duration::from_secs(10), || async {
            let n: std::result::Result<(i64,), _> =
                sqlx::query_as("SELECT count(*) FROM pg_stat_activity WHERE pid = $1")
                    .bind(pid)
                    .fetch_one(pool)
                    .await;
            n.is_ok_and(|(n,)| n == 0)
        })
        .await,
        "the server ended the idle transaction's session"
    );
    let err: caracal_shared::Error = sqlx::query("SELECT 1").execute(&mut *tx).await.unwrap_err().into();
    assert_eq!(err.code, ErrorCode::StoreUnavailable, "{err}");
    drop(tx);
    // Its lock went with it; the pool serves on.
    let (got,): (bool,) = sqlx::query_as("SELECT pg_try_advisory_lock(4242)")
        .fetch_one(pool)
        .await
        .unwrap();
    assert!(got, "the idle transaction's lock was released");
    store.close().await;
    db.cleanup().await;
}
