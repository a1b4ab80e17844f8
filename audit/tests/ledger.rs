//! The audit service end to end, on both backends: events from the streams land in the ledger
//! in one order, heads are signed, proofs verify with the shared RFC 6962 verifier, tenant
//! tokens see only their tenant, exports verify offline — and nothing is lost or duplicated
//! when consumers, Postgres or Redis die mid-load.

use std::sync::Arc;
use std::time::Duration;

use caracal_shared::audit::AuditEmitter;
use caracal_shared::bus::Bus;
use caracal_shared::config::BusBackend;
use caracal_shared::http::client::HttpClient;
use caracal_shared::ids::TenantId;
use caracal_shared::ledger::{self, LedgerPublicKey, Record, TreeHead, from_hex, verify_consistency, verify_inclusion};
use caracal_shared::runtime::Runtime;
use caracal_shared::shutdown::Shutdown;
use caracal_shared::store::admin::AdminScope;
use caracal_shared::store::authority::{Revocation, RevocationKind};
use caracal_shared::testing::{self, Backend, FaultyBus, TcpForwarder, TestDb, eventually};
use serde_json::{Value, json};

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite { $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(caracal_shared::testing::Backend::Sqlite).await; })* }
        mod postgres { $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(caracal_shared::testing::Backend::Postgres).await; })* }
    };
}

on_both_backends!(
    every_stream_lands_in_one_order_with_verifiable_proofs,
    tenant_tokens_see_their_tenant_and_exports_verify_offline,
    consumers_killed_mid_load_lose_and_duplicate_nothing,
    retention_drops_old_entries_and_every_proof_about_the_rest_stays_valid,
    an_event_with_a_nul_in_an_indexed_field_lands_with_its_batch,
);

struct Env {
    rt: Runtime,
    db: Option<TestDb>,
    sd: Shutdown,
    url: String,
    client: HttpClient,
    platform: String,
    emitter: AuditEmitter,
}

async fn start(b: Backend) -> Option<Env> {
    start_with(b, |_| {}, |bus| bus).await
}

async fn start_with(
    b: Backend,
    tweak: impl FnOnce(&mut caracal_shared::config::Config),
    wrap: impl FnOnce(Arc<dyn Bus>) -> Arc<dyn Bus>,
) -> Option<Env> {
    caracal_shared::telemetry::init_for_tests();
    let db = TestDb::new(b).await?;
    let bus = match b {
        Backend::Sqlite => BusBackend::Embedded,
        Backend::Postgres => BusBackend::Redis,
    };
    if bus == BusBackend::Redis {
        testing::test_bus(BusBackend::Redis, &db.store).await?;
    }
    let mut cfg = testing::test_config(&db.url, bus);
    cfg.audit.head_interval = Duration::from_millis(100);
    tweak(&mut cfg);
    let sd = Shutdown::new();
    let rt0 = Runtime::start(cfg, sd.clone()).await.expect("runtime");
    let ring = rt0.config.keys.bus.clone().unwrap();
    let rt = Runtime::from_parts(
        (*rt0.config).clone(),
        rt0.store.clone(),
        wrap(rt0.bus.clone()),
        ring,
        sd.clone(),
    );
    rt.spawn_relay();
    let pepper = rt.config.keys.pepper.clone().unwrap();
    let mut tx = rt.store.begin().await.unwrap();
    let (_, platform) = tx
        .issue_admin_token(&pepper, None, "auditor", &[AdminScope::Audit], None)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let rt2 = rt.clone();
    tokio::spawn(async move { caracal_audit::serve(rt2, l).await });
    let client = HttpClient::unrestricted().with_timeout(Duration::from_secs(30));
    let c = client.clone();
    let u = format!("{url}/readyz");
    assert!(
        eventually(Duration::from_secs(15), || {
            let c = c.clone();
            let u = u.clone();
            async move { c.get(&u).await.map(|r| r.status == 200).unwrap_or(false) }
        })
        .await
    );
    let (emitter, _) = AuditEmitter::start(
        rt.bus.clone(),
        rt.bus_auth.clone(),
        100_000,
        &prometheus::Registry::new(),
        sd.clone(),
    );
    Some(Env {
        rt,
        db: Some(db),
        sd,
        url,
        client,
        platform,
        emitter,
    })
}

impl Env {
    async fn get(&self, token: &str, path: &str) -> Value {
        let auth = format!("Bearer {token}");
        let r = self
            .client
            .get_with(&format!("{}{path}", self.url), &[("authorization", &auth)])
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        r.json_value()
    }

    async fn text(&self, token: &str, path: &str) -> String {
        let auth = format!("Bearer {token}");
        let r = self
            .client
            .get_with(&format!("{}{path}", self.url), &[("authorization", &auth)])
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        r.text()
    }

    async fn sign(&self) -> TreeHead {
        let auth = format!("Bearer {}", self.platform);
        let r = self
            .client
            .request(
                http::Method::POST,
                &format!("{}/v1/ledger/heads", self.url),
                &[("authorization", &auth)],
                Default::default(),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        serde_json::from_value(r.json_value()).unwrap()
    }

    async fn keys(&self) -> Vec<LedgerPublicKey> {
        let v = self.get(&self.platform, "/v1/ledger/keys").await;
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|k| LedgerPublicKey::from_pem(k["pem"].as_str().unwrap()).unwrap())
            .collect()
    }

    async fn wait_for_size(&self, n: u64) {
        let store = self.rt.store.clone();
        assert!(
            eventually(Duration::from_secs(60), || {
                let s = store.clone();
                async move { s.ledger_size().await.unwrap() >= n }
            })
            .await,
            "the ledger reached {n} entries (has {})",
            self.rt.store.ledger_size().await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            self.rt.store.ledger_size().await.unwrap(),
            n,
            "exactly {n} entries (nothing duplicated)"
        );
    }

    fn decision(&self, i: usize, tenant: TenantId, agent: &str) {
        self.emitter
            .emit(
                "decision",
                Some(tenant),
                &json!({"type": "decision", "decision": if i.is_multiple_of(3) { "deny" } else { "allow" }, "agent": agent, "resource": "res_1", "n": i}),
            )
            .unwrap();
    }

    async fn stop(mut self) {
        self.sd.trigger();
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.rt.store.close().await;
        if let Some(db) = self.db.take() {
            db.cleanup().await;
        }
    }
}

fn record_of(v: &Value) -> Record {
    Record {
        v: 1,
        seq: v["seq"].as_u64().unwrap(),
        event_id: v["event_id"].as_str().unwrap().into(),
        stream: v["stream"].as_str().unwrap().into(),
        kind: v["kind"].as_str().unwrap().into(),
        tenant: v["tenant"].as_str().map(String::from),
        occurred_at: v["occurred_at"].as_i64().unwrap(),
        recorded_at: v["recorded_at"].as_i64().unwrap(),
        body: v["body"].clone(),
    }
}

/// A NUL in a field the ledger indexes (Postgres text cannot hold one) must not keep the event,
/// or the batch it travels in, out of the ledger: it lands, with the field left unindexed and the
/// body as written.
async fn an_event_with_a_nul_in_an_indexed_field_lands_with_its_batch(b: Backend) {
    let Some(env) = start(b).await else { return };
    let t = TenantId::new();
    for i in 0..10 {
        env.decision(i, t, if i == 4 { "agt_\u{0}x" } else { "agt_a" });
    }
    env.wait_for_size(10).await;
    let all = env.get(&env.platform, "/v1/ledger/entries?limit=100").await;
    let items = all["items"].as_array().unwrap();
    let odd = items
        .iter()
        .find(|e| e["body"]["n"] == 4)
        .expect("the event is in the ledger");
    assert_eq!(odd["body"]["agent"], "agt_\u{0}x", "its body as written");
    let a = env
        .get(&env.platform, "/v1/ledger/entries?agent_id=agt_a&limit=100")
        .await;
    assert_eq!(a["items"].as_array().unwrap().len(), 9);
    env.stop().await;
}

async fn every_stream_lands_in_one_order_with_verifiable_proofs(b: Backend) {
    let Some(env) = start(b).await else { return };
    let t1 = TenantId::new();
    for i in 0..200 {
        env.decision(i, t1, if i % 2 == 0 { "agt_a" } else { "agt_b" });
    }
    // A revocation through the outbox (another stream, another producer path).
    let mut tx = env.rt.store.begin().await.unwrap();
    tx.revoke(&[Revocation::now(t1, RevocationKind::Agent, "agt_b", "test")])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    env.wait_for_size(201).await;

    let head = env.sign().await;
    assert_eq!(head.tree_size, 201);
    let keys = env.keys().await;
    assert_eq!(head.verify(&keys), Ok(()), "the head verifies with the published key");
    let latest: TreeHead = serde_json::from_value(env.get(&env.platform, "/v1/ledger/heads/latest").await).unwrap();
    assert_eq!(latest, head);
    // Root recomputed independently from every entry.
    let all = env.get(&env.platform, "/v1/ledger/entries?limit=1000").await;
    let items = all["items"].as_array().unwrap();
    assert_eq!(items.len(), 201);
    let leaves: Vec<ledger::Hash> = items.iter().map(|e| record_of(e).leaf_hash()).collect();
    for (i, e) in items.iter().enumerate() {
        assert_eq!(e["seq"].as_u64().unwrap(), i as u64, "one total order, no gaps");
        assert_eq!(from_hex(e["leaf_hash"].as_str().unwrap()).unwrap(), leaves[i]);
    }
    assert!(
        items
            .iter()
            .any(|e| e["kind"] == "revocation" && e["body"]["value"] == "agt_b")
    );
    // Filters.
    let a = env
        .get(
            &env.platform,
            "/v1/ledger/entries?agent_id=agt_a&decision=deny&limit=1000",
        )
        .await;
    let a = a["items"].as_array().unwrap();
    assert_eq!(a.len(), (0..200).filter(|i| i % 2 == 0 && i % 3 == 0).count());
    assert!(a.iter().all(|e| e["agent_id"] == "agt_a" && e["decision"] == "deny"));
    // Inclusion proofs for a spread of entries.
    let root = head.root().unwrap();
    for i in [0usize, 1, 2, 63, 64, 127, 128, 199, 200] {
        let id = items[i]["event_id"].as_str().unwrap();
        let p = env
            .get(&env.platform, &format!("/v1/ledger/proofs/inclusion?event_id={id}"))
            .await;
        let path: Vec<ledger::Hash> = p["audit_path"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| from_hex(h.as_str().unwrap()).unwrap())
            .collect();
        assert!(
            verify_inclusion(&leaves[i], i as u64, 201, &path, &root),
            "inclusion of #{i}"
        );
        assert!(!verify_inclusion(
            &ledger::leaf_hash(b"forged"),
            i as u64,
            201,
            &path,
            &root
        ));
    }
    // More events, a new head, and a consistency proof between the two.
    for i in 200..330 {
        env.decision(i, t1, "agt_c");
    }
    env.wait_for_size(331).await;
    let head2 = env.sign().await;
    let c = env
        .get(
            &env.platform,
            &format!("/v1/ledger/proofs/consistency?first=201&second={}", head2.tree_size),
        )
        .await;
    let proof: Vec<ledger::Hash> = c["proof"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| from_hex(h.as_str().unwrap()).unwrap())
        .collect();
    assert!(verify_consistency(
        201,
        &root,
        head2.tree_size,
        &head2.root().unwrap(),
        &proof
    ));
    // The periodic signer catches up on its own.
    let store = env.rt.store.clone();
    assert!(
        eventually(Duration::from_secs(5), || {
            let s = store.clone();
            async move {
                s.ledger_latest_head()
                    .await
                    .unwrap()
                    .is_some_and(|h| h.tree_size == 331)
            }
        })
        .await
    );
    // Public endpoints need no token; evidence endpoints do.
    assert_eq!(
        env.client
            .get(&format!("{}/v1/ledger/heads/latest", env.url))
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        env.client
            .get(&format!("{}/v1/ledger/entries", env.url))
            .await
            .unwrap()
            .status,
        401
    );
    let m = env.client.get(&format!("{}/metrics", env.url)).await.unwrap().text();
    assert!(m.contains("caracal_audit_tree_size 331"), "{m}");
    env.stop().await;
}

async fn tenant_tokens_see_their_tenant_and_exports_verify_offline(b: Backend) {
    let Some(env) = start(b).await else { return };
    let pepper = env.rt.config.keys.pepper.clone().unwrap();
    let mut tx = env.rt.store.begin().await.unwrap();
    let t1 = tx.insert_tenant("one", "One").await.unwrap().id;
    let t2 = tx.insert_tenant("two", "Two").await.unwrap().id;
    let (_, tok1) = tx
        .issue_admin_token(&pepper, Some(t1), "t1 auditor", &[AdminScope::Audit], None)
        .await
        .unwrap();
    let (_, reader) = tx
        .issue_admin_token(&pepper, None, "reader", &[AdminScope::Read], None)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    for i in 0..60 {
        env.decision(i, if i % 2 == 0 { t1 } else { t2 }, "agt_x");
    }
    env.wait_for_size(60).await;
    env.sign().await;
    let mine = env.get(&tok1, "/v1/ledger/entries?limit=1000").await;
    let mine = mine["items"].as_array().unwrap();
    assert_eq!(mine.len(), 30);
    assert!(mine.iter().all(|e| e["tenant"] == t1.to_string()));
    let auth = format!("Bearer {reader}");
    let r = env
        .client
        .get_with(&format!("{}/v1/ledger/entries", env.url), &[("authorization", &auth)])
        .await
        .unwrap();
    assert_eq!(r.status, 403, "the audit scope is required");

    let keys = env.keys().await;
    // A tenant's export: its entries in full, the others as leaf hashes; verifies offline.
    let text = env.text(&tok1, "/v1/ledger/export?start=0&end=60").await;
    let report = ledger::verify_export(&text, &keys);
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!((report.entries, report.redacted), (30, 30));
    assert!(report.heads_verified.contains(&60));
    assert!(!text.contains(&t2.to_string()), "another tenant's content never leaves");
    // A platform export of a sub-range, by time.
    let text = env
        .text(
            &env.platform,
            "/v1/ledger/export?since=2000-01-01&until=2100-01-01&sign=true",
        )
        .await;
    let report = ledger::verify_export(&text, &keys);
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.entries, 60);
    // Tampering with the export is caught, and located.
    let lines: Vec<&str> = text.lines().collect();
    let idx = lines
        .iter()
        .position(|l| l.contains("\"type\":\"entry\"") && l.contains("\"seq\":7,"))
        .unwrap();
    let edited: Vec<String> = lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            if i == idx {
                l.replace("\"n\":7", "\"n\":8")
            } else {
                l.to_string()
            }
        })
        .collect();
    let r = ledger::verify_export(&edited.join("\n"), &keys);
    assert!(
        r.problems
            .iter()
            .any(|p| matches!(p, ledger::Problem::Edited { seq: 7, .. })),
        "{:?}",
        r.problems
    );
    let deleted: Vec<&str> = lines
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != idx)
        .map(|(_, l)| *l)
        .collect();
    let r = ledger::verify_export(&deleted.join("\n"), &keys);
    assert!(
        r.problems.contains(&ledger::Problem::Missing { seq: 7 }),
        "{:?}",
        r.problems
    );
    let other = ledger::LedgerSigner::from_pkcs8(&ledger::LedgerSigner::generate_pkcs8().unwrap()).unwrap();
    let r = ledger::verify_export(&text, std::slice::from_ref(&other.public));
    assert!(
        r.problems.iter().any(|p| matches!(p, ledger::Problem::Head { .. })),
        "a head under an unknown key is refused"
    );
    env.stop().await;
}

fn hashes(v: &Value) -> Vec<ledger::Hash> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|h| from_hex(h.as_str().unwrap()).unwrap())
        .collect()
}

async fn retention_drops_old_entries_and_every_proof_about_the_rest_stays_valid(b: Backend) {
    // Small partitions (Postgres) so retention drops whole ones and deletes within another.
    let Some(env) = start_with(b, |c| c.audit.partition_entries = 16, |bus| bus).await else {
        return;
    };
    let t = TenantId::new();
    let store = env.rt.store.clone();
    // Old entries: 37 of them (32 + 4 + 1: the kept prefix has a lone leaf), a head at 20 and 37.
    for i in 0..20 {
        env.decision(i, t, "agt_old");
    }
    env.wait_for_size(20).await;
    let h20 = env.sign().await;
    for i in 20..37 {
        env.decision(i, t, "agt_old");
    }
    env.wait_for_size(37).await;
    let h37 = env.sign().await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let cutoff = caracal_shared::time::now_micros();
    tokio::time::sleep(Duration::from_millis(5)).await;
    // Young entries, and a head over them.
    for i in 37..70 {
        env.decision(i, t, "agt_young");
    }
    env.wait_for_size(70).await;
    let h70 = env.sign().await;
    let young = env
        .get(&env.platform, "/v1/ledger/entries?agent_id=agt_young&limit=1000")
        .await;
    let young: Vec<Record> = young["items"].as_array().unwrap().iter().map(record_of).collect();
    assert_eq!(young.len(), 33);
    let parts = store.ledger_partitions().await.unwrap();
    if b == Backend::Postgres {
        // Created ahead of the ledger as it grew: #0..#79 in partitions of 16, one spare.
        assert_eq!(parts, (0..6).map(|n| (n * 16, n * 16 + 16)).collect::<Vec<_>>());
    } else {
        assert!(parts.is_empty(), "the embedded database keeps one table");
    }

    // Nothing is old before the first entry: nothing to cut.
    assert_eq!(store.ledger_retention_boundary(0).await.unwrap(), 0);
    assert_eq!(store.ledger_prune(0).await.unwrap(), 0);
    // The cut is the largest signed head inside the old part; never anywhere else.
    let below = store.ledger_retention_boundary(cutoff).await.unwrap();
    assert_eq!(below, 37);
    let err = store.ledger_prune(30).await.unwrap_err();
    assert!(err.to_string().contains("signed head"), "{err}");
    // What the periodic retention task runs (an audit State of its own, with its metrics).
    let registry = prometheus::Registry::new();
    let state = caracal_audit::start(&env.rt, &registry).await.unwrap();
    assert_eq!(state.apply_retention(cutoff).await.unwrap(), (37, 37));
    assert_eq!(state.apply_retention(cutoff).await.unwrap(), (37, 0), "idempotent");
    assert_eq!(state.metrics.pruned_below.get(), 37);
    assert_eq!(state.metrics.pruned.get(), 37);
    assert_eq!(store.ledger_prune(below).await.unwrap(), 0, "idempotent");
    assert_eq!(store.ledger_prune(20).await.unwrap(), 0, "never backwards");
    assert_eq!(store.ledger_pruned_below().await.unwrap(), 37);
    if b == Backend::Postgres {
        // #0..#31 went with their partitions; #32..#36 were deleted from the next one.
        assert_eq!(store.ledger_partitions().await.unwrap()[0], (32, 48));
    }
    // Only the prefix's own subtrees remain of it: (5, 0) = #0..#31, (2, 8) = #32..#35, leaf #36.
    let kept = store
        .ledger_nodes(&[(5, 0), (2, 8), (0, 36), (0, 35), (1, 0), (3, 1), (4, 0), (1, 17)])
        .await
        .unwrap();
    let mut have: Vec<(u32, u64)> = kept.keys().copied().collect();
    have.sort_unstable();
    assert_eq!(have, vec![(0, 36), (2, 8), (5, 0)]);

    // The dropped entries are gone from every query; the rest answer as before.
    let old = env.get(&env.platform, "/v1/ledger/entries?agent_id=agt_old").await;
    assert!(old["items"].as_array().unwrap().is_empty());
    let all = env.get(&env.platform, "/v1/ledger/entries?limit=1000").await;
    assert_eq!(all["items"].as_array().unwrap().len(), 33);
    assert_eq!(all["items"][0]["seq"], 37);
    let ret = env.get(&env.platform, "/v1/ledger/retention").await;
    assert_eq!(ret["pruned_below"], 37);
    if b == Backend::Postgres {
        assert_eq!(ret["partitions"][0], json!({"from_seq": 32, "to_seq": 48}));
    }
    let summary: TreeHead = serde_json::from_value(ret["summary_head"].clone()).unwrap();
    assert_eq!(summary, h37, "the signed head that summarizes what was dropped");
    let m = env.client.get(&format!("{}/metrics", env.url)).await.unwrap().text();
    assert!(m.contains("caracal_audit_pruned_below"), "{m}");

    // Growth after the cut: the appender pairs new leaves with the kept subtrees.
    for i in 70..100 {
        env.decision(i, t, "agt_young");
    }
    env.wait_for_size(100).await;
    let h100 = env.sign().await;
    let later = env
        .get(&env.platform, "/v1/ledger/entries?after_seq=69&limit=1000")
        .await;
    let later: Vec<Record> = later["items"].as_array().unwrap().iter().map(record_of).collect();
    assert_eq!(later.len(), 30);
    // Inclusion of every remaining entry in the heads after the cut (#37: its proof reads the
    // kept leaf #36).
    for (rec, head) in young.iter().map(|r| (r, &h70)).chain(later.iter().map(|r| (r, &h100))) {
        for h in [head, &h100] {
            let p = env
                .get(
                    &env.platform,
                    &format!("/v1/ledger/proofs/inclusion?seq={}&tree_size={}", rec.seq, h.tree_size),
                )
                .await;
            assert!(
                verify_inclusion(
                    &rec.leaf_hash(),
                    rec.seq,
                    h.tree_size,
                    &hashes(&p["audit_path"]),
                    &h.root().unwrap()
                ),
                "inclusion of #{} in {}",
                rec.seq,
                h.tree_size
            );
        }
    }
    // Consistency from the summary head (and later ones) to the newest: the ledger after the cut
    // extends exactly what the summary committed to.
    for first in [&h37, &h70] {
        let c = env
            .get(
                &env.platform,
                &format!("/v1/ledger/proofs/consistency?first={}&second=100", first.tree_size),
            )
            .await;
        assert!(verify_consistency(
            first.tree_size,
            &first.root().unwrap(),
            100,
            &h100.root().unwrap(),
            &hashes(&c["proof"])
        ));
    }
    // Before the cut there is nothing left to prove from: a clear 410.
    let r = env
        .client
        .get(&format!(
            "{}/v1/ledger/proofs/consistency?first={}&second=100",
            env.url, h20.tree_size
        ))
        .await
        .unwrap();
    assert_eq!(r.status, 410, "{}", r.text());
    assert_eq!(r.json_value()["error"]["code"], "gone", "{}", r.text());

    // An export of everything starts at the cut, carries the summary head, and verifies offline.
    let keys = env.keys().await;
    let text = env.text(&env.platform, "/v1/ledger/export?start=0").await;
    let report = ledger::verify_export(&text, &keys);
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!((report.start, report.end, report.entries), (37, 100, 63));
    assert_eq!(report.summarized_below, Some(37));
    assert!(report.heads_verified.contains(&70) && report.heads_verified.contains(&100));
    // So does one by time from long before the cut.
    let text2 = env
        .text(&env.platform, "/v1/ledger/export?since=2000-01-01&until=2100-01-01")
        .await;
    let report = ledger::verify_export(&text2, &keys);
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.summarized_below, Some(37));
    // Tampering is still caught: an edited entry, and a summary head whose root was changed.
    let edited = text.replace("\"n\":50,", "\"n\":51,");
    assert_ne!(edited, text);
    let r = ledger::verify_export(&edited, &keys);
    assert!(
        r.problems
            .iter()
            .any(|p| matches!(p, ledger::Problem::Edited { seq, .. } if *seq >= 37)),
        "{:?}",
        r.problems
    );
    let forged_root = ledger::to_hex(&ledger::leaf_hash(b"forged"));
    let forged: String = text
        .lines()
        .map(|l| {
            if l.contains("\"type\":\"head\"") && l.contains("\"tree_size\":37") {
                l.replace(&h37.root_hash, &forged_root)
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let r = ledger::verify_export(&forged, &keys);
    assert!(
        r.problems
            .iter()
            .any(|p| matches!(p, ledger::Problem::Head { tree_size: 37, .. })),
        "{:?}",
        r.problems
    );
    assert_eq!(r.summarized_below, None);
    // An export whose summary head was withheld is not a verified summary.
    let withheld: String = text
        .lines()
        .filter(|l| !(l.contains("\"type\":\"head\"") && l.contains("\"tree_size\":37")))
        .collect::<Vec<_>>()
        .join("\n");
    let r = ledger::verify_export(&withheld, &keys);
    assert!(
        r.problems.contains(&ledger::Problem::Unprovable { tree_size: 37 }),
        "{:?}",
        r.problems
    );
    env.stop().await;
}

async fn consumers_killed_mid_load_lose_and_duplicate_nothing(b: Backend) {
    // The audit service reads through a bus whose acknowledgements fail for a while (a consumer
    // that dies after its append committed but before XACK), and the database or Redis is cut
    // mid-load. Every event must end up in the ledger exactly once.
    let faulty: Arc<std::sync::Mutex<Option<Arc<FaultyBus>>>> = Arc::default();
    let f2 = faulty.clone();
    let (pg_fwd, redis_fwd) = match b {
        Backend::Postgres => {
            let pg = TcpForwarder::start(testing::url_addr(&testing::pg_admin_url(), 5432)).await;
            let rd = TcpForwarder::start(testing::url_addr(&testing::redis_url(), 6379)).await;
            (Some(pg), Some(rd))
        }
        Backend::Sqlite => (None, None),
    };
    let (pg_addr, redis_addr) = (pg_fwd.as_ref().map(|f| f.addr), redis_fwd.as_ref().map(|f| f.addr));
    let Some(env) = start_with(
        b,
        move |c| {
            c.bus.claim_idle = Duration::from_millis(400);
            if let (Some(pg), Some(rd)) = (pg_addr, redis_addr) {
                c.database.url = testing::url_with_addr(&c.database.url, pg);
                c.bus.redis_url = testing::url_with_addr(&c.bus.redis_url, rd);
            }
        },
        move |bus| {
            let f = Arc::new(FaultyBus::new(bus));
            *f2.lock().unwrap() = Some(f.clone());
            f
        },
    )
    .await
    else {
        return;
    };
    let f = faulty.lock().unwrap().clone().unwrap();
    let t = TenantId::new();
    let total = 3000usize;
    let (mut pg_fwd, mut redis_fwd) = (pg_fwd, redis_fwd);
    for i in 0..total {
        env.decision(i, t, "agt_load");
        match i {
            500 => f.fail_acks(true),
            900 => f.fail_acks(false),
            1200 => {
                if let Some(p) = &pg_fwd {
                    p.cut();
                }
            }
            1700 => {
                if let Some(p) = pg_fwd.as_mut() {
                    p.restore().await;
                }
            }
            2000 => {
                if let Some(r) = &redis_fwd {
                    r.cut();
                }
            }
            2400 => {
                if let Some(r) = redis_fwd.as_mut() {
                    r.restore().await;
                }
            }
            _ => {}
        }
        if i % 100 == 0 {
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    }
    env.wait_for_size(total as u64).await;
    let head = env.sign().await;
    let text = env
        .text(&env.platform, &format!("/v1/ledger/export?start=0&end={total}"))
        .await;
    let report = ledger::verify_export(&text, &env.keys().await);
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.entries, total as u64);
    assert_eq!(head.tree_size, total as u64);
    let ns: std::collections::BTreeSet<u64> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["type"] == "entry")
        .map(|v| v["record"]["body"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(ns.len(), total, "every produced event once");
    env.stop().await;
}
