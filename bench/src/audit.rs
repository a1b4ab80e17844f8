//! Audit ingest, in two parts, on the configured store:
//!
//! 1. **Throughput**: `events` signed events are put on the audit stream first (as every
//!    service does, in batches), then the audit service starts and drains them into the ledger
//!    (one transaction per batch, acknowledged after the commit, heads signed every
//!    `audit.head_interval`). Reported: events/s from start to the last event under a signed
//!    head.
//! 2. **Lag**: producers emit at a fixed `rate` for `seconds` while the audit service runs;
//!    reported: p50/p99 from an event's production to the first signed head covering it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use caracal_shared::audit::AuditEmitter;
use caracal_shared::ids::TenantId;
use serde_json::json;

use crate::{Store, System};

fn body(p: usize, i: u64) -> serde_json::Value {
    json!({"type": "decision", "decision": "allow", "agent": "agt_01a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6", "resource": "res_01a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6",
           "method": "GET", "host": "api.bench", "path": "/v1/models", "reason": "ok", "rule": "read", "producer": p, "n": i})
}

/// Emit `total` events from `producers` tasks (as fast as the emitters accept, or at `rate`/s
/// overall), returning when all are queued.
async fn produce(sys: &System, producers: usize, total: u64, rate: Option<u64>) -> u64 {
    let tenant = TenantId::new();
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    let per = total / producers as u64;
    for p in 0..producers {
        let (emitter, _) = AuditEmitter::start(
            sys.rt.bus.clone(),
            sys.rt.bus_auth.clone(),
            65_536,
            &prometheus::Registry::new(),
            sys.rt.shutdown.clone(),
        );
        let done = done.clone();
        let stop = stop.clone();
        let interval = rate.map(|r| Duration::from_secs_f64(producers as f64 / r as f64));
        tasks.push(tokio::spawn(async move {
            let start = Instant::now();
            let mut i = 0u64;
            while i < per && !stop.load(Ordering::Relaxed) {
                if let Some(iv) = interval {
                    let due = start + iv.mul_f64(i as f64);
                    let now = Instant::now();
                    if due > now {
                        tokio::time::sleep(due - now).await;
                    }
                }
                match emitter.emit("decision", Some(tenant), &body(p, i)) {
                    Ok(()) => {
                        i += 1;
                        done.fetch_add(1, Ordering::Relaxed);
                        if i.is_multiple_of(512) {
                            tokio::task::yield_now().await;
                        }
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
                }
            }
            // Let the emitter flush its queue.
            tokio::time::sleep(Duration::from_millis(200)).await;
            drop(emitter);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    done.load(Ordering::Relaxed)
}

async fn wait_covered(sys: &System, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let head = sys
            .rt
            .store
            .ledger_latest_head()
            .await
            .unwrap()
            .map(|h| h.tree_size)
            .unwrap_or(0);
        if head >= n {
            return;
        }
        let size = sys.rt.store.ledger_size().await.unwrap();
        assert!(
            Instant::now() < deadline,
            "the ledger did not catch up: {size}/{n}, head {head}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn run(store: Store, events: u64, seconds: u64, rate: u64, producers: usize) {
    let sys = System::start(store).await;
    println!("machine: {}", caracal_bench::machine());
    println!(
        "store: {}, heads every {:?}, batch {}",
        store.label(),
        sys.rt.config.audit.head_interval,
        sys.rt.config.audit.batch
    );

    // 1. Throughput: drain a backlog.
    let t0 = Instant::now();
    let queued = produce(&sys, producers, events, None).await;
    let bus_len = sys.rt.bus.len(caracal_shared::bus::streams::AUDIT).await.unwrap_or(0);
    println!(
        "queued {queued} events on the audit stream in {:.1}s (stream length {bus_len})",
        t0.elapsed().as_secs_f64()
    );
    let registry = prometheus::Registry::new();
    let started = Instant::now();
    let _state = caracal_audit::start(&sys.rt, &registry).await.expect("audit service");
    wait_covered(&sys, queued).await;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "| audit ingest (drain), {} | {:.0} events/s | {queued} events in {secs:.1}s, all under a signed head |",
        store.label(),
        queued as f64 / secs
    );

    let m = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap_or_default();
    for l in m.lines().filter(|l| {
        l.starts_with("caracal_audit_append_duration_seconds_sum")
            || l.starts_with("caracal_audit_append_duration_seconds_count")
            || l.starts_with("caracal_audit_append_batch_events_sum")
    }) {
        println!("  {l}");
    }

    // 2. Lag at a fixed rate, audit running.
    let base = sys.rt.store.ledger_size().await.unwrap();
    let total = rate * seconds;
    let produced = produce(&sys, producers, total, Some(rate)).await;
    wait_covered(&sys, base + produced).await;
    let heads = sys.rt.store.ledger_heads(base + 1, u64::MAX, 1_000_000).await.unwrap();
    let mut lags: Vec<i64> = Vec::with_capacity(produced as usize);
    let mut h = 0usize;
    let mut from = base;
    while from < base + produced {
        let to = (from + 50_000).min(base + produced);
        for e in sys.rt.store.ledger_range(from, to).await.unwrap() {
            while heads[h].tree_size <= e.record.seq {
                h += 1;
            }
            lags.push(heads[h].timestamp - e.record.occurred_at);
        }
        from = to;
    }
    lags.sort_unstable();
    let pct = |p: f64| lags[((p / 100.0) * (lags.len() - 1) as f64).round() as usize] as f64 / 1000.0;
    println!(
        "| audit lag at {rate} events/s, {} | produced → in a signed head: p50 {:.0} ms, p99 {:.0} ms | {} heads for {produced} events |",
        store.label(),
        pct(50.0),
        pct(99.0),
        heads.len()
    );
    sys.stop().await;
}
