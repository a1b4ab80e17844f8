//! `caracal ledger query` and `caracal merkle verify-range` as an auditor runs them, against a
//! real audit service on both backends — and every kind of tampering with the database is
//! reported, with the entry at fault.

use std::process::Command;
use std::time::Duration;

use caracal_shared::audit::AuditEmitter;
use caracal_shared::config::BusBackend;
use caracal_shared::http::client::HttpClient;
use caracal_shared::ids::TenantId;
use caracal_shared::ledger::{LedgerSigner, Record};
use caracal_shared::runtime::Runtime;
use caracal_shared::shutdown::Shutdown;
use caracal_shared::store::admin::AdminScope;
use caracal_shared::store::write_exec;
use caracal_shared::testing::{self, Backend, TestDb, eventually};
use serde_json::{Value, json};

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite { $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(caracal_shared::testing::Backend::Sqlite).await; })* }
        mod postgres { $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(caracal_shared::testing::Backend::Postgres).await; })* }
    };
}

on_both_backends!(query_and_verify_and_every_tamper_is_located);

struct Env {
    rt: Runtime,
    db: Option<TestDb>,
    sd: Shutdown,
    url: String,
    token: String,
    dir: std::path::PathBuf,
}

async fn start(b: Backend) -> Option<Env> {
    caracal_shared::telemetry::init_for_tests();
    let db = TestDb::new(b).await?;
    let bus = match b {
        Backend::Sqlite => BusBackend::Embedded,
        Backend::Postgres => BusBackend::Redis,
    };
    if bus == BusBackend::Redis {
        testing::test_bus(bus, &db.store).await?;
    }
    let mut cfg = testing::test_config(&db.url, bus);
    // Heads only on demand here, so the test decides which heads exist.
    cfg.audit.head_interval = Duration::from_secs(3600);
    let sd = Shutdown::new();
    let rt = Runtime::start(cfg, sd.clone()).await.unwrap();
    let pepper = rt.config.keys.pepper.clone().unwrap();
    let mut tx = rt.store.begin().await.unwrap();
    let (_, token) = tx
        .issue_admin_token(&pepper, None, "auditor", &[AdminScope::Audit], None)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let rt2 = rt.clone();
    tokio::spawn(async move { caracal_audit::serve(rt2, l).await });
    let c = HttpClient::unrestricted();
    let u = format!("{url}/readyz");
    assert!(
        eventually(Duration::from_secs(15), || {
            let c = c.clone();
            let u = u.clone();
            async move { c.get(&u).await.map(|r| r.status == 200).unwrap_or(false) }
        })
        .await
    );
    let dir = std::env::temp_dir().join(format!("caracal-ledger-cli-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    Some(Env {
        rt,
        db: Some(db),
        sd,
        url,
        token,
        dir,
    })
}

struct Out {
    code: i32,
    stdout: String,
}

impl Env {
    fn caracal(&self, args: &[&str]) -> Out {
        let o = Command::new(env!("CARGO_BIN_EXE_caracal"))
            .args(args)
            .env("CARACAL_AUDIT_URL", &self.url)
            .env("CARACAL_ADMIN_TOKEN", &self.token)
            .output()
            .unwrap();
        Out {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr),
        }
    }

    /// verify-range over everything, with the pinned public key.
    fn verify(&self) -> Out {
        let key = self.dir.join("ledger.pem");
        self.caracal(&[
            "merkle",
            "verify-range",
            "--start",
            "2000-01-01",
            "--end",
            "2100-01-01",
            "--public-key",
            key.to_str().unwrap(),
        ])
    }

    /// `caracal ledger export` of everything to a file, then verify-range on that file offline
    /// with the pinned public key.
    fn verify_offline(&self) -> Out {
        let export = self.dir.join("export.jsonl");
        let o = self.caracal(&[
            "ledger",
            "export",
            "--since",
            "2000-01-01",
            "--out",
            export.to_str().unwrap(),
        ]);
        assert_eq!(o.code, 0, "export: {}", o.stdout);
        let key = self.dir.join("ledger.pem");
        self.caracal(&[
            "merkle",
            "verify-range",
            "--file",
            export.to_str().unwrap(),
            "--public-key",
            key.to_str().unwrap(),
        ])
    }

    async fn sql(&self, q: &str) {
        let q = q.to_string();
        write_exec!(self.rt.store, sqlx::query(sqlx::AssertSqlSafe(q.clone()))).unwrap();
    }

    async fn entry(&self, seq: u64) -> (String, Vec<u8>) {
        let e = self.rt.store.ledger_range(seq, seq + 1).await.unwrap().remove(0);
        (e.record.body.to_string(), e.leaf_hash.to_vec())
    }

    async fn stop(mut self) {
        self.sd.trigger();
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.rt.store.close().await;
        if let Some(db) = self.db.take() {
            db.cleanup().await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn hexlit(b: Backend, bytes: &[u8]) -> String {
    match b {
        Backend::Postgres => format!("'\\x{}'::bytea", hex_string(bytes)),
        Backend::Sqlite => format!("X'{}'", hex_string(bytes)),
    }
}

fn hex_string(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

async fn query_and_verify_and_every_tamper_is_located(b: Backend) {
    let Some(env) = start(b).await else { return };
    let (emitter, _) = AuditEmitter::start(
        env.rt.bus.clone(),
        env.rt.bus_auth.clone(),
        10_000,
        &prometheus::Registry::new(),
        env.sd.clone(),
    );
    let t = TenantId::new();
    for i in 0..40 {
        emitter
            .emit(
                "decision",
                Some(t),
                &json!({"type": "decision", "decision": if i % 4 == 0 { "deny" } else { "allow" }, "agent": if i % 2 == 0 { "agt_alice" } else { "agt_bob" },
                        "resource": "res_api", "method": "GET", "host": "api.test", "path": format!("/v1/items/{i}"), "reason": "ok", "n": i}),
            )
            .unwrap();
    }
    let store = env.rt.store.clone();
    assert!(
        eventually(Duration::from_secs(20), || {
            let s = store.clone();
            async move { s.ledger_size().await.unwrap() == 40 }
        })
        .await
    );
    // Two signed heads (the first covers a prefix), signed through the API.
    let c = HttpClient::unrestricted();
    let sign = || async {
        let auth = format!("Bearer {}", env.token);
        c.request(
            http::Method::POST,
            &format!("{}/v1/ledger/heads", env.url),
            &[("authorization", &auth)],
            Default::default(),
        )
        .await
        .unwrap()
    };
    assert_eq!(sign().await.status, 200);
    // The auditor pins the key from the service once (out of band, in real life).
    let keys = c
        .get(&format!("{}/v1/ledger/keys", env.url))
        .await
        .unwrap()
        .json_value();
    std::fs::write(env.dir.join("ledger.pem"), keys["items"][0]["pem"].as_str().unwrap()).unwrap();

    // ledger query: table and JSON, with filters.
    let o = env.caracal(&["ledger", "query", "--agent-id", "agt_alice", "--decision", "deny"]);
    assert_eq!(o.code, 0, "{}", o.stdout);
    assert!(o.stdout.contains("GET api.test/v1/items/0"), "{}", o.stdout);
    assert!(o.stdout.contains("(10 entries)"), "{}", o.stdout);
    assert!(!o.stdout.contains("agt_bob"));
    let o = env.caracal(&[
        "ledger",
        "query",
        "--agent-id",
        "agt_bob",
        "--format",
        "json",
        "--since",
        "2000-01-01",
    ]);
    let lines: Vec<Value> = o.stdout.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert_eq!(lines.len(), 20);
    assert!(lines.iter().all(|l| l["agent_id"] == "agt_bob"));
    assert_eq!(
        env.caracal(&["ledger", "query", "--agent-id", "x", "--since", "not-a-date"])
            .code,
        2
    );

    // Intact: OK, online and offline.
    let o = env.verify();
    assert_eq!(o.code, 0, "{}", o.stdout);
    assert!(o.stdout.contains("40 entries checked"), "{}", o.stdout);
    let o = env.verify_offline();
    assert_eq!(o.code, 0, "offline: {}", o.stdout);

    // 1. An edited event.
    let (body5, _) = env.entry(5).await;
    env.sql(&format!(
        "UPDATE ledger_entries SET body = '{}' WHERE seq = 5",
        body5.replace("\"allow\"", "\"deny\"")
    ))
    .await;
    let o = env.verify();
    assert_eq!(o.code, 1, "{}", o.stdout);
    assert!(o.stdout.contains("FAIL: entry #5 "), "{}", o.stdout);
    env.sql(&format!("UPDATE ledger_entries SET body = '{body5}' WHERE seq = 5"))
        .await;
    assert_eq!(env.verify().code, 0);

    // 2. An edited event whose stored leaf hash was recomputed too: the signed root catches it,
    //    and inclusion proofs against the signed head locate it.
    let e12 = env.rt.store.ledger_range(12, 13).await.unwrap().remove(0);
    let (body12, leaf12) = env.entry(12).await;
    let mut forged: Record = e12.record.clone();
    forged.body["decision"] = json!("allow");
    forged.body["path"] = json!("/v1/admin/secrets");
    env.sql(&format!(
        "UPDATE ledger_entries SET body = '{}', leaf_hash = {} WHERE seq = 12",
        forged.body,
        hexlit(b, &forged.leaf_hash())
    ))
    .await;
    let o = env.verify();
    assert_eq!(o.code, 1, "{}", o.stdout);
    assert!(o.stdout.contains("does not match the entries"), "{}", o.stdout);
    assert!(
        o.stdout.contains("FAIL: entry #12 ") && o.stdout.contains("is not in the signed head of size 40"),
        "located: {}",
        o.stdout
    );
    // Located to the pair sharing the altered subtree, never further.
    assert!(
        o.stdout
            .lines()
            .filter(|l| l.contains("is not in the signed head"))
            .count()
            <= 2,
        "{}",
        o.stdout
    );
    env.sql(&format!(
        "UPDATE ledger_entries SET body = '{body12}', leaf_hash = {} WHERE seq = 12",
        hexlit(b, &leaf12)
    ))
    .await;
    assert_eq!(env.verify().code, 0);

    // 3. A deleted event.
    let (body9, leaf9) = env.entry(9).await;
    let row9 = env.rt.store.ledger_range(9, 10).await.unwrap().remove(0);
    env.sql("DELETE FROM ledger_entries WHERE seq = 9").await;
    let o = env.verify();
    assert_eq!(o.code, 1);
    assert!(o.stdout.contains("FAIL: entry #9 is missing"), "{}", o.stdout);
    env.sql(&format!(
        "INSERT INTO ledger_entries (seq, event_id, stream, kind, tenant_id, agent_id, resource_id, decision, occurred_at, recorded_at, body, leaf_hash) VALUES (9, '{}', '{}', '{}', '{}', '{}', '{}', '{}', {}, {}, '{body9}', {})",
        row9.record.event_id, row9.record.stream, row9.record.kind, row9.record.tenant.clone().unwrap(), row9.agent_id.clone().unwrap(),
        row9.resource_id.clone().unwrap(), row9.decision.clone().unwrap(), row9.record.occurred_at, row9.record.recorded_at, hexlit(b, &leaf9)
    ))
    .await;
    assert_eq!(env.verify().code, 0);

    // 4. Reordered events (rows 3 and 4 swap places, through a free seq inside the ledger's
    // first partition on Postgres).
    env.sql("UPDATE ledger_entries SET seq = 1000000 WHERE seq = 3").await;
    env.sql("UPDATE ledger_entries SET seq = 3 WHERE seq = 4").await;
    env.sql("UPDATE ledger_entries SET seq = 4 WHERE seq = 1000000").await;
    let o = env.verify();
    assert_eq!(o.code, 1);
    assert!(
        o.stdout.contains("FAIL: entry #3 ") && o.stdout.contains("FAIL: entry #4 "),
        "{}",
        o.stdout
    );
    env.sql("UPDATE ledger_entries SET seq = 1000000 WHERE seq = 3").await;
    env.sql("UPDATE ledger_entries SET seq = 3 WHERE seq = 4").await;
    env.sql("UPDATE ledger_entries SET seq = 4 WHERE seq = 1000000").await;
    assert_eq!(env.verify().code, 0);

    // 5. A forged head (its root edited), then a head signed by an unknown key.
    let head = env.rt.store.ledger_latest_head().await.unwrap().unwrap();
    env.sql(&format!(
        "UPDATE ledger_heads SET root_hash = '{}' WHERE tree_size = 40",
        "00".repeat(32)
    ))
    .await;
    let o = env.verify();
    assert_eq!(o.code, 1);
    assert!(
        o.stdout.contains("tree head of size 40: the signature does not verify"),
        "{}",
        o.stdout
    );
    env.sql(&format!(
        "UPDATE ledger_heads SET root_hash = '{}' WHERE tree_size = 40",
        head.root_hash
    ))
    .await;
    let rogue = LedgerSigner::from_pkcs8(&LedgerSigner::generate_pkcs8().unwrap()).unwrap();
    let root38 = env.rt.store.ledger_root(38).await.unwrap();
    env.rt
        .store
        .ledger_insert_head(&rogue.sign(38, &root38, head.timestamp).unwrap())
        .await
        .unwrap();
    let o = env.verify();
    assert_eq!(o.code, 1);
    assert!(
        o.stdout.contains("tree head of size 38: signed by an unknown key"),
        "{}",
        o.stdout
    );
    env.sql("DELETE FROM ledger_heads WHERE tree_size = 38").await;
    assert_eq!(env.verify().code, 0);

    // Retention: the first 25 entries dropped, summarized by a signed head of size 25; what
    // remains still verifies, online and offline, against that head.
    let signer = env
        .rt
        .store
        .ledger_signer(env.rt.config.keys.seal.as_ref().unwrap())
        .await
        .unwrap();
    let root25 = env.rt.store.ledger_root(25).await.unwrap();
    env.rt
        .store
        .ledger_insert_head(&signer.sign(25, &root25, head.timestamp).unwrap())
        .await
        .unwrap();
    assert_eq!(env.rt.store.ledger_prune(25).await.unwrap(), 25);
    let o = env.verify();
    assert_eq!(o.code, 0, "{}", o.stdout);
    assert!(o.stdout.contains("15 entries checked"), "{}", o.stdout);
    assert!(
        o.stdout.contains(
            "entries #0..#24 were dropped by retention; the signed head of size 25 summarizes them and matches"
        ),
        "{}",
        o.stdout
    );
    let o = env.verify_offline();
    assert_eq!(o.code, 0, "offline after retention: {}", o.stdout);
    assert!(o.stdout.contains("summarizes them and matches"), "{}", o.stdout);

    // 6. Tail truncation: the newest entries deleted and the size moved back.
    env.sql("DELETE FROM ledger_entries WHERE seq >= 37").await;
    env.sql("UPDATE ledger_state SET size = 37 WHERE id = 1").await;
    let o = env.verify();
    assert_eq!(o.code, 1);
    assert!(
        o.stdout.contains("entries #37..#39 were removed (tail truncation)"),
        "{}",
        o.stdout
    );
    env.stop().await;
}
