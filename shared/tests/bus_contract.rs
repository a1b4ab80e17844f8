//! Bus contract: the same tests, unchanged, against the embedded bus (on SQLite) and Redis
//! Streams (with Postgres as the consumers' store).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use caracal_shared::bus::relay::Relay;
use caracal_shared::bus::seq::{SeqCheck, SeqTracker};
use caracal_shared::bus::{ConsumerSpec, Envelope, Event, Handler, run_group_consumer};
use caracal_shared::crypto::KeyRing;
use caracal_shared::error::{Error, ErrorCode, Result};
use caracal_shared::store::Store;
use caracal_shared::store::outbox::NewEvent;
use caracal_shared::testing::{BusEnv, FaultyBus, eventually, shutdown};
use serde_json::json;

macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let env = caracal_shared::testing::BusEnv::new(caracal_shared::config::BusBackend::Embedded).await.unwrap();
                super::$name(&env).await;
                env.cleanup().await;
            })*
        }
        mod redis {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let Some(env) = caracal_shared::testing::BusEnv::new(caracal_shared::config::BusBackend::Redis).await else { return };
                super::$name(&env).await;
                env.cleanup().await;
            })*
        }
    };
}

contract!(
    publish_read_ack,
    a_group_delivers_each_entry_to_exactly_one_consumer,
    unacknowledged_entries_come_back_to_their_consumer,
    idle_entries_are_reclaimed_by_another_consumer,
    tail_readers_see_everything_and_wake_on_publish,
    trimming_never_passes_unacknowledged_entries,
    consumer_killed_between_read_and_ack_loses_and_duplicates_nothing,
    relay_killed_mid_batch_loses_and_duplicates_nothing,
    forged_unsigned_and_replayed_messages_are_refused,
    a_lost_sequenced_event_is_noticed,
    transient_failures_are_retried_never_dead_lettered,
    a_failing_event_is_dead_lettered_without_holding_up_the_rest,
);

fn payload(i: usize) -> Bytes {
    Bytes::from(format!("p{i}"))
}

async fn publish_read_ack(env: &BusEnv) {
    let b = &env.bus;
    b.ensure_group("s", "g").await.unwrap();
    b.ensure_group("s", "g").await.unwrap(); // idempotent
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(b.publish("s", payload(i)).await.unwrap());
    }
    ids.extend(b.publish_many("s", (5..10).map(payload).collect()).await.unwrap());
    assert_eq!(b.last_id("s").await.unwrap(), *ids.last().unwrap());
    assert_eq!(b.len("s").await.unwrap(), 10);
    let got = b
        .read_group("s", "g", "c1", 100, Duration::from_millis(50))
        .await
        .unwrap();
    assert_eq!(
        got.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
        ids,
        "in publish order"
    );
    assert_eq!(got[3].payload.as_deref(), Some(&b"p3"[..]));
    assert!(got.iter().all(|e| e.deliveries == 1));
    assert_eq!(b.pending_count("s", "g").await.unwrap(), 10);
    b.ack("s", "g", &ids).await.unwrap();
    assert_eq!(b.pending_count("s", "g").await.unwrap(), 0);
    assert!(
        b.read_group("s", "g", "c1", 100, Duration::from_millis(20))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(b.pending_count("s", "no-such-group").await.unwrap(), 0);
    assert_eq!(b.last_id("missing").await.unwrap().split('-').next(), Some("0"));
}

async fn a_group_delivers_each_entry_to_exactly_one_consumer(env: &BusEnv) {
    let b = env.bus.clone();
    b.ensure_group("s", "g").await.unwrap();
    for i in 0..60 {
        b.publish("s", payload(i)).await.unwrap();
    }
    let mut tasks = Vec::new();
    for c in 0..3 {
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let got = b
                    .read_group("s", "g", &format!("c{c}"), 7, Duration::from_millis(30))
                    .await
                    .unwrap();
                if got.is_empty() {
                    break;
                }
                let ids: Vec<String> = got.iter().map(|e| e.id.clone()).collect();
                b.ack("s", "g", &ids).await.unwrap();
                mine.extend(ids);
            }
            mine
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let unique: HashSet<_> = all.iter().collect();
    assert_eq!(all.len(), 60, "every entry delivered");
    assert_eq!(unique.len(), 60, "no entry delivered twice");
}

async fn unacknowledged_entries_come_back_to_their_consumer(env: &BusEnv) {
    let b = &env.bus;
    b.ensure_group("s", "g").await.unwrap();
    for i in 0..4 {
        b.publish("s", payload(i)).await.unwrap();
    }
    let first = b
        .read_group("s", "g", "c1", 10, Duration::from_millis(50))
        .await
        .unwrap();
    b.ack("s", "g", &[first[0].id.clone()]).await.unwrap();
    // "Restart": c1 reads its own pending entries first.
    let again = b.read_own_pending("s", "g", "c1", 10).await.unwrap();
    assert_eq!(
        again.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
        first[1..].iter().map(|e| e.id.clone()).collect::<Vec<_>>()
    );
    assert!(again.iter().all(|e| e.deliveries >= 2), "redeliveries are counted");
    assert_eq!(again[0].payload.as_deref(), Some(&b"p1"[..]));
    assert!(
        b.read_own_pending("s", "g", "c2", 10).await.unwrap().is_empty(),
        "other consumers' entries are not mine"
    );
}

async fn idle_entries_are_reclaimed_by_another_consumer(env: &BusEnv) {
    let b = &env.bus;
    b.ensure_group("s", "g").await.unwrap();
    for i in 0..3 {
        b.publish("s", payload(i)).await.unwrap();
    }
    let taken = b
        .read_group("s", "g", "dead", 10, Duration::from_millis(50))
        .await
        .unwrap();
    assert_eq!(taken.len(), 3);
    // Not idle long enough yet.
    assert!(
        b.claim_idle("s", "g", "alive", Duration::from_secs(60), 10)
            .await
            .unwrap()
            .is_empty()
    );
    tokio::time::sleep(Duration::from_millis(120)).await;
    let claimed = b
        .claim_idle("s", "g", "alive", Duration::from_millis(100), 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 3);
    assert!(claimed.iter().all(|e| e.deliveries >= 2 && e.payload.is_some()));
    // Now they belong to "alive": a second claimer finds nothing idle.
    assert!(
        b.claim_idle("s", "g", "third", Duration::from_millis(100), 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(b.read_own_pending("s", "g", "alive", 10).await.unwrap().len(), 3);
    assert!(b.read_own_pending("s", "g", "dead", 10).await.unwrap().is_empty());
}

async fn tail_readers_see_everything_and_wake_on_publish(env: &BusEnv) {
    let b = env.bus.clone();
    for i in 0..3 {
        b.publish("t", payload(i)).await.unwrap();
    }
    let all = b.read_after("t", "0", 100, Duration::from_millis(10)).await.unwrap();
    assert_eq!(all.len(), 3);
    let last = all.last().unwrap().id.clone();
    // A second reader sees the same entries (broadcast, no group).
    assert_eq!(
        b.read_after("t", "0", 100, Duration::from_millis(10))
            .await
            .unwrap()
            .len(),
        3
    );
    let b2 = b.clone();
    let waiter = tokio::spawn(async move {
        let t0 = Instant::now();
        let got = b2.read_after("t", &last, 100, Duration::from_secs(5)).await.unwrap();
        (got, t0.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    b.publish("t", payload(9)).await.unwrap();
    let (got, waited) = waiter.await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload.as_deref(), Some(&b"p9"[..]));
    assert!(
        waited < Duration::from_secs(4),
        "a blocked reader wakes on publish, not at its timeout"
    );
}

async fn trimming_never_passes_unacknowledged_entries(env: &BusEnv) {
    let b = &env.bus;
    // No group yet: nothing may be trimmed.
    for i in 0..10 {
        b.publish("s", payload(i)).await.unwrap();
    }
    assert_eq!(b.trim_acknowledged("s").await.unwrap(), 0);
    b.ensure_group("s", "fast").await.unwrap();
    b.ensure_group("s", "slow").await.unwrap();
    let got = b
        .read_group("s", "fast", "c", 100, Duration::from_millis(50))
        .await
        .unwrap();
    b.ack("s", "fast", &got.iter().map(|e| e.id.clone()).collect::<Vec<_>>())
        .await
        .unwrap();
    assert_eq!(
        b.trim_acknowledged("s").await.unwrap(),
        0,
        "the slow group has read nothing"
    );
    let slow = b
        .read_group("s", "slow", "c", 100, Duration::from_millis(50))
        .await
        .unwrap();
    b.ack("s", "slow", &slow[..4].iter().map(|e| e.id.clone()).collect::<Vec<_>>())
        .await
        .unwrap();
    b.ack("s", "slow", &[slow[6].id.clone()]).await.unwrap();
    assert_eq!(
        b.trim_acknowledged("s").await.unwrap(),
        4,
        "only the acknowledged prefix goes"
    );
    assert_eq!(b.len("s").await.unwrap(), 6);
    // The unacknowledged entries are still deliverable.
    let pending = b.read_own_pending("s", "slow", "c", 100).await.unwrap();
    assert_eq!(pending.len(), 5);
    assert!(pending.iter().all(|e| e.payload.is_some()));
    b.ack("s", "slow", &pending.iter().map(|e| e.id.clone()).collect::<Vec<_>>())
        .await
        .unwrap();
    assert_eq!(b.trim_acknowledged("s").await.unwrap(), 6);
    assert_eq!(b.len("s").await.unwrap(), 0);
    // Ids keep increasing after a full trim.
    let next = b.publish("s", payload(99)).await.unwrap();
    assert!(caracal_shared::bus::id_cmp(&next, &got.last().unwrap().id).is_gt());
}

/// Applies each event once, durably: the effect (a tenant row) and the idempotency mark are
/// written in one transaction. Counts effects in memory to detect double application.
struct TenantEffect {
    store: Store,
    name: &'static str,
    applied: Arc<Mutex<HashMap<String, u32>>>,
    /// Apply at most this many events, then hang forever without returning (a consumer that
    /// dies between read and ack).
    hang_after: Option<usize>,
    fail_transiently: Arc<std::sync::atomic::AtomicBool>,
}

#[async_trait]
impl Handler for TenantEffect {
    async fn handle(&self, events: &[Event]) -> Result<()> {
        if self.fail_transiently.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(Error::new(ErrorCode::StoreUnavailable, "injected outage"));
        }
        for (i, ev) in events.iter().enumerate() {
            if self.hang_after == Some(i) {
                std::future::pending::<()>().await;
            }
            let mut tx = self.store.begin().await?;
            if tx.mark_consumed(self.name, &ev.id.to_string()).await? {
                let n = ev.body["n"].as_u64().unwrap();
                tx.insert_tenant(&format!("t{n}"), "x").await?;
                tx.commit().await?;
                *self.applied.lock().unwrap().entry(ev.id.to_string()).or_default() += 1;
            }
        }
        Ok(())
    }
}

fn spec(consumer: &str) -> ConsumerSpec {
    let mut s = ConsumerSpec::new("work", "workers", consumer);
    s.batch = 8;
    s.block = Duration::from_millis(50);
    s.claim_idle = Duration::from_millis(300);
    s
}

async fn publish_signed(env: &BusEnv, stream: &str, n: usize) -> Vec<String> {
    let auth = env.auth();
    let mut ids = Vec::new();
    for i in 0..n {
        let env_ = auth.sign(Envelope::new(stream, "test", None, &json!({ "n": i })));
        ids.push(env_.id.to_string());
        env.bus.publish(stream, env_.to_bytes()).await.unwrap();
    }
    ids
}

async fn consumer_killed_between_read_and_ack_loses_and_duplicates_nothing(env: &BusEnv) {
    let n = 20;
    publish_signed(env, "work", n).await;
    let applied = Arc::new(Mutex::new(HashMap::new()));
    let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let victim = TenantEffect {
        store: env.db.store.clone(),
        name: "effects",
        applied: applied.clone(),
        hang_after: Some(5),
        fail_transiently: flag.clone(),
    };
    let sd = shutdown();
    let victim_task = tokio::spawn(run_group_consumer(
        env.bus.clone(),
        env.auth(),
        spec("victim"),
        Arc::new(victim),
        sd.clone(),
    ));
    // Wait until the victim has applied its 5 effects (and is hanging before its ack).
    assert!(eventually(Duration::from_secs(10), || async { applied.lock().unwrap().len() == 5 }).await);
    victim_task.abort(); // killed between read and ack
    let _ = victim_task.await;
    assert!(
        env.bus.pending_count("work", "workers").await.unwrap() >= 8,
        "the victim's batch is still pending"
    );

    let survivor = TenantEffect {
        store: env.db.store.clone(),
        name: "effects",
        applied: applied.clone(),
        hang_after: None,
        fail_transiently: flag,
    };
    let sd2 = shutdown();
    let task = tokio::spawn(run_group_consumer(
        env.bus.clone(),
        env.auth(),
        spec("survivor"),
        Arc::new(survivor),
        sd2.clone(),
    ));
    assert!(
        eventually(Duration::from_secs(15), || async {
            applied.lock().unwrap().len() == n && env.bus.pending_count("work", "workers").await.unwrap() == 0
        })
        .await,
        "every event applied and acknowledged"
    );
    sd2.trigger();
    task.await.unwrap();
    sd.trigger();
    let counts = applied.lock().unwrap().clone();
    assert!(counts.values().all(|c| *c == 1), "no event applied twice: {counts:?}");
    for i in 0..n {
        env.db.store.tenant_by_name(&format!("t{i}")).await.unwrap();
    }
}

async fn relay_killed_mid_batch_loses_and_duplicates_nothing(env: &BusEnv) {
    let n = 30;
    let store = env.db.store.clone();
    let mut tx = store.begin().await.unwrap();
    for i in 0..n {
        tx.emit(NewEvent::new("work", "test", None, json!({ "n": i })))
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();

    // The first relay dies after publishing 12 rows, before marking any of them.
    let faulty = Arc::new(FaultyBus::new(env.bus.clone()));
    faulty.fail_after(12);
    let relay = Relay::new(store.clone(), faulty.clone(), env.auth()).with_batch(50);
    assert!(relay.publish_pending().await.is_err());
    assert_eq!(faulty.published(), 12);
    assert_eq!(
        store.outbox_unpublished_count().await.unwrap(),
        n as i64,
        "nothing marked before the crash"
    );

    // A new relay publishes everything, including the 12 again.
    let relay = Relay::new(store.clone(), env.bus.clone(), env.auth()).with_batch(7);
    assert_eq!(relay.publish_pending().await.unwrap(), n);
    assert_eq!(store.outbox_unpublished_count().await.unwrap(), 0);
    assert_eq!(
        env.bus.len("work").await.unwrap(),
        (n + 12) as u64,
        "12 duplicates on the stream"
    );

    let applied = Arc::new(Mutex::new(HashMap::new()));
    let h = TenantEffect {
        store: store.clone(),
        name: "effects",
        applied: applied.clone(),
        hang_after: None,
        fail_transiently: Arc::new(Default::default()),
    };
    let sd = shutdown();
    let task = tokio::spawn(run_group_consumer(
        env.bus.clone(),
        env.auth(),
        spec("c"),
        Arc::new(h),
        sd.clone(),
    ));
    assert!(
        eventually(Duration::from_secs(15), || async {
            applied.lock().unwrap().len() == n && env.bus.pending_count("work", "workers").await.unwrap() == 0
        })
        .await
    );
    sd.trigger();
    task.await.unwrap();
    assert!(applied.lock().unwrap().values().all(|c| *c == 1));
}

struct Collect(Arc<Mutex<Vec<Event>>>);

#[async_trait]
impl Handler for Collect {
    async fn handle(&self, events: &[Event]) -> Result<()> {
        self.0.lock().unwrap().extend(events.iter().cloned());
        Ok(())
    }
}

async fn forged_unsigned_and_replayed_messages_are_refused(env: &BusEnv) {
    let auth = env.auth();
    let good = auth.sign(Envelope::new("work", "ok", None, &json!({"n": 1})));
    env.bus.publish("work", good.to_bytes()).await.unwrap();
    // Replay: the same signed bytes appended again.
    env.bus.publish("work", good.to_bytes()).await.unwrap();
    // Unsigned.
    env.bus
        .publish("work", Envelope::new("work", "x", None, &json!({})).to_bytes())
        .await
        .unwrap();
    // Forged: a writer with Redis access but without the key.
    let forged = Envelope::new("work", "policy.activated", None, &json!({"allow": "everything"}))
        .sign(&KeyRing::generate("bus-test"));
    env.bus.publish("work", forged.to_bytes()).await.unwrap();
    // Tampered after signing.
    let mut tampered = auth.sign(Envelope::new("work", "ok", None, &json!({"n": 2})));
    tampered.body = json!({"n": 2000}).to_string();
    env.bus.publish("work", tampered.to_bytes()).await.unwrap();
    // Signed for another stream.
    let other = auth.sign(Envelope::new("elsewhere", "ok", None, &json!({"n": 3})));
    env.bus.publish("work", other.to_bytes()).await.unwrap();
    env.bus.publish("work", Bytes::from_static(b"garbage")).await.unwrap();

    let seen = Arc::new(Mutex::new(Vec::new()));
    let sd = shutdown();
    let metrics = auth.metrics().clone();
    let task = tokio::spawn(run_group_consumer(
        env.bus.clone(),
        auth,
        spec("c"),
        Arc::new(Collect(seen.clone())),
        sd.clone(),
    ));
    assert!(
        eventually(Duration::from_secs(10), || async {
            env.bus.pending_count("work", "workers").await.unwrap() == 0 && !seen.lock().unwrap().is_empty()
        })
        .await
    );
    sd.trigger();
    task.await.unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1, "only the genuine message is applied");
    assert_eq!(seen[0].body, json!({"n": 1}));
    let count = |r: &str| metrics.rejected.with_label_values(&["work", r]).get();
    assert_eq!(count("replayed"), 1);
    assert_eq!(count("unsigned"), 1);
    assert_eq!(count("forged"), 2);
    assert_eq!(count("wrong_stream"), 1);
    assert_eq!(count("malformed"), 1);
}

async fn a_lost_sequenced_event_is_noticed(env: &BusEnv) {
    let store = env.db.store.clone();
    let mut tx = store.begin().await.unwrap();
    for i in 0..5 {
        tx.emit(NewEvent::new("rev", "revoked", None, json!({ "n": i })).sequenced())
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    // The third publish is lost (an entry deleted from the stream behaves the same).
    let faulty = Arc::new(FaultyBus::new(env.bus.clone()));
    faulty.drop_publish(2);
    Relay::new(store.clone(), faulty, env.auth())
        .publish_pending()
        .await
        .unwrap();

    let auth = env.auth();
    let entries = env
        .bus
        .read_after("rev", "0", 100, Duration::from_millis(20))
        .await
        .unwrap();
    let mut tracker = SeqTracker::starting_after(0);
    let mut checks = Vec::new();
    for e in entries {
        let ev = auth.verify("rev", &e.id, e.payload.as_deref(), 0).unwrap();
        checks.push(tracker.observe(ev.seq.unwrap()));
    }
    assert_eq!(
        checks,
        vec![
            SeqCheck::InOrder,
            SeqCheck::InOrder,
            SeqCheck::Gap { expected: 3, got: 4 },
            SeqCheck::InOrder
        ]
    );
    // Reconciliation reads the source of truth: the database knows the last number issued.
    assert_eq!(store.stream_last_seq("rev").await.unwrap(), 5);
}

async fn transient_failures_are_retried_never_dead_lettered(env: &BusEnv) {
    publish_signed(env, "work", 6).await;
    let applied = Arc::new(Mutex::new(HashMap::new()));
    let outage = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let h = TenantEffect {
        store: env.db.store.clone(),
        name: "effects",
        applied: applied.clone(),
        hang_after: None,
        fail_transiently: outage.clone(),
    };
    let mut s = spec("c");
    s.max_deliveries = 2;
    let sd = shutdown();
    let auth = env.auth();
    let metrics = auth.metrics().clone();
    let task = tokio::spawn(run_group_consumer(env.bus.clone(), auth, s, Arc::new(h), sd.clone()));
    // Let it fail several times (more than max_deliveries).
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(applied.lock().unwrap().is_empty());
    assert_eq!(
        env.bus.pending_count("work", "workers").await.unwrap(),
        6,
        "nothing acknowledged during the outage"
    );
    outage.store(false, std::sync::atomic::Ordering::SeqCst);
    assert!(eventually(Duration::from_secs(15), || async { applied.lock().unwrap().len() == 6 }).await);
    sd.trigger();
    task.await.unwrap();
    assert_eq!(metrics.rejected.with_label_values(&["work", "dead_letter"]).get(), 0);
}

/// Refuses the event whose `n` is 0 (a permanent error, as for a body the handler can never
/// apply), applies every other one.
struct Poisoned {
    applied: Arc<Mutex<HashMap<u64, u32>>>,
    poison_attempts: Arc<std::sync::atomic::AtomicU32>,
}

#[async_trait]
impl Handler for Poisoned {
    async fn handle(&self, events: &[Event]) -> Result<()> {
        if events.iter().any(|e| e.body["n"] == 0) {
            self.poison_attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            return Err(Error::bad_request("this event can never be applied"));
        }
        let mut applied = self.applied.lock().unwrap();
        for e in events {
            *applied.entry(e.body["n"].as_u64().unwrap()).or_default() += 1;
        }
        Ok(())
    }
}

async fn a_failing_event_is_dead_lettered_without_holding_up_the_rest(env: &BusEnv) {
    let auth = env.auth();
    let publish = |n: u64| {
        let e = auth.sign(Envelope::new("work", "test", None, &json!({ "n": n })));
        env.bus.publish("work", e.to_bytes())
    };
    publish(0).await.unwrap();
    let applied = Arc::new(Mutex::new(HashMap::new()));
    let attempts = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let h = Poisoned {
        applied: applied.clone(),
        poison_attempts: attempts.clone(),
    };
    // Retried after 0.1, 0.2, 0.4, 0.8 and 1.6 s: dead-lettered at its sixth delivery, ~3 s on.
    let mut s = spec("c");
    s.max_deliveries = 6;
    let sd = shutdown();
    let metrics = auth.metrics().clone();
    let task = tokio::spawn(run_group_consumer(
        env.bus.clone(),
        auth.clone(),
        s,
        Arc::new(h),
        sd.clone(),
    ));
    assert!(
        eventually(Duration::from_secs(10), || async {
            attempts.load(std::sync::atomic::Ordering::SeqCst) > 0
        })
        .await
    );
    for n in 1..=5 {
        publish(n).await.unwrap();
    }
    // The events after it are handled while it still waits for its retries.
    // (Each is acknowledged just after it is applied: wait for the acknowledgements too.)
    assert!(eventually(Duration::from_secs(10), || async { applied.lock().unwrap().len() == 5 }).await);
    assert!(
        eventually(Duration::from_secs(10), || async {
            env.bus.pending_count("work", "workers").await.unwrap() == 1
        })
        .await,
        "the failing event is still pending, not yet dead-lettered, when the rest were handled"
    );
    assert_eq!(metrics.rejected.with_label_values(&["work", "dead_letter"]).get(), 0);
    // Then it is dead-lettered: acknowledged, counted, never applied.
    assert!(
        eventually(Duration::from_secs(20), || async {
            env.bus.pending_count("work", "workers").await.unwrap() == 0
        })
        .await
    );
    sd.trigger();
    task.await.unwrap();
    assert_eq!(metrics.rejected.with_label_values(&["work", "dead_letter"]).get(), 1);
    let applied = applied.lock().unwrap();
    assert_eq!(applied.len(), 5);
    assert!(
        applied.values().all(|c| *c == 1),
        "each other event applied once: {applied:?}"
    );
    assert!(!applied.contains_key(&0));
}

/// `RedisBus::drop_prefix` (benchmarks give a shared Redis its memory back): it deletes the
/// keys under its own prefix only, even when the prefix holds glob characters.
#[tokio::test]
async fn redis_drop_prefix_deletes_its_own_keys_only() {
    use caracal_shared::bus::Bus;
    use caracal_shared::bus::redis::RedisBus;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let connect = |p: String| async move { RedisBus::connect(&caracal_shared::testing::redis_url(), &p).await };
    let a = connect(format!("caracal_test_drop_{run}_a:")).await.unwrap();
    if let Err(e) = a.ping().await {
        caracal_shared::testing::unavailable("Redis", &e.to_string());
        return;
    }
    let b = connect(format!("caracal_test_drop_{run}_b:")).await.unwrap();
    // As a glob, `[a]` would match `a`: the pattern must be escaped.
    let glob = connect(format!("caracal_test_drop_{run}_[a]:")).await.unwrap();
    for (bus, streams) in [(&a, &["s1", "s2"][..]), (&b, &["s1"][..]), (&glob, &["s1"][..])] {
        for s in streams {
            bus.publish(s, payload(1)).await.unwrap();
        }
    }
    assert_eq!(glob.drop_prefix().await.unwrap(), 1);
    assert_eq!(
        a.drop_prefix().await.unwrap(),
        2,
        "the glob-like prefix left a's keys alone"
    );
    assert_eq!(a.drop_prefix().await.unwrap(), 0);
    assert_eq!(b.drop_prefix().await.unwrap(), 1, "dropping a left b's keys alone");
}

/// A read whose reply is lost with its connection (Redis delivered the entries, so they are
/// pending for the consumer, but the consumer never saw them) is handled at once, not after
/// `claim_idle`: the blocking read is not silently re-sent on a new connection (which would
/// read past those entries); it fails, and the consumer reads its own pending entries first.
/// The consumer reaches Redis through a loopback relay that drops the connection carrying the
/// first reply with the published entry, without forwarding it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_read_reply_lost_with_its_connection_is_handled_at_once() {
    use caracal_shared::bus::Bus;
    use caracal_shared::bus::redis::RedisBus;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let url = caracal_shared::testing::redis_url();
    let prefix = format!("caracal_test_lost_{}:", uuid::Uuid::new_v4().simple());
    let direct = RedisBus::connect(&url, &prefix).await.unwrap();
    if let Err(e) = direct.ping().await {
        caracal_shared::testing::unavailable("Redis", &e.to_string());
        return;
    }
    let marker = format!("lost-reply-{}", uuid::Uuid::new_v4().simple());
    let armed = Arc::new(AtomicBool::new(true));
    let dropped = Arc::new(AtomicBool::new(false));

    // The relay: client → Redis verbatim; Redis → client verbatim, except the first chunk
    // holding the marker, on which both sides are closed.
    let authority = url.trim_start_matches("redis://").split('/').next().unwrap_or_default();
    let (userinfo, upstream) = match authority.rsplit_once('@') {
        Some((u, h)) => (format!("{u}@"), h.to_string()),
        None => (String::new(), authority.to_string()),
    };
    let relay = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let (m, a, d) = (marker.clone(), armed.clone(), dropped.clone());
    let relay_task = tokio::spawn(async move {
        loop {
            let Ok((client, _)) = relay.accept().await else { return };
            let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                return;
            };
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut cr, &mut sw).await;
            });
            let (m, a, d) = (m.clone(), a.clone(), d.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                // The end of the previous chunk, so a marker split across reads is still seen
                // (the reply is then cut mid-frame: lost all the same).
                let mut tail: Vec<u8> = Vec::new();
                loop {
                    let n = match sr.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    let chunk = &buf[..n];
                    tail.extend_from_slice(chunk);
                    let found = tail.windows(m.len()).any(|w| w == m.as_bytes());
                    tail.drain(..tail.len().saturating_sub(m.len() - 1));
                    if found && a.swap(false, Ordering::SeqCst) {
                        d.store(true, Ordering::SeqCst);
                        let _ = cw.shutdown().await;
                        return; // drops both halves: the client sees the connection close
                    }
                    if cw.write_all(chunk).await.is_err() {
                        return;
                    }
                }
            });
        }
    });

    let via_relay: Arc<dyn Bus> = Arc::new(
        RedisBus::connect(&format!("redis://{userinfo}{relay_addr}"), &prefix)
            .await
            .unwrap(),
    );
    via_relay.ensure_group("work", "workers").await.unwrap();
    struct Seen(Arc<Mutex<Vec<String>>>);
    #[async_trait]
    impl Handler for Seen {
        async fn handle(&self, events: &[Event]) -> Result<()> {
            let mut s = self.0.lock().unwrap();
            s.extend(
                events
                    .iter()
                    .map(|e| e.body["marker"].as_str().unwrap_or("").to_string()),
            );
            Ok(())
        }
    }
    let seen = Arc::new(Mutex::new(Vec::new()));
    let ring = KeyRing::generate("bus-test");
    let auth = caracal_shared::testing::test_bus_auth(&ring);
    let mut s = ConsumerSpec::new("work", "workers", "c1");
    s.block = Duration::from_millis(100);
    // Far beyond the test's patience: only the consumer's own recovery can deliver in time.
    s.claim_idle = Duration::from_secs(600);
    let sd = shutdown();
    let consumer = tokio::spawn(run_group_consumer(
        via_relay.clone(),
        auth.clone(),
        s,
        Arc::new(Seen(seen.clone())),
        sd.clone(),
    ));
    // Published directly (whenever the consumer gets to it, the first reply holding the entry
    // is its blocking read's: its own pending list is empty until then, and nothing is idle
    // long enough to be claimed).
    let env_ = auth.sign(Envelope::new("work", "test", None, &json!({ "marker": marker })));
    direct.publish("work", env_.to_bytes()).await.unwrap();

    let handled = eventually(Duration::from_secs(10), || async { !seen.lock().unwrap().is_empty() }).await;
    sd.trigger();
    let _ = tokio::time::timeout(Duration::from_secs(5), consumer).await;
    relay_task.abort();
    let _ = direct.drop_prefix().await;
    assert!(dropped.load(Ordering::SeqCst), "the relay never saw the reply to drop");
    assert!(
        handled,
        "an entry whose read reply was lost stayed pending (it would wait for claim_idle)"
    );
    assert_eq!(
        seen.lock().unwrap().as_slice(),
        [marker.as_str()],
        "handled exactly once"
    );
}
