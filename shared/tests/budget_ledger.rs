//! The budget ledger contract, run unchanged against the in-process ledger and Redis: leases
//! never reserve past the limit (even with many concurrent takers), a released lease becomes
//! its actual spend, an expired one becomes its charge and returns the rest, rolling windows
//! forget old spend.

use std::sync::Arc;
use std::time::Duration;

use caracal_shared::budget_ledger::{BudgetLedger, LocalLedger, RedisLedger, Window};
use caracal_shared::ids::BudgetId;
use caracal_shared::testing;

fn window() -> Window {
    Window {
        counted: vec![1_000],
        record: 1_000,
        resets_at: i64::MAX,
        bucket_ttl_secs: 3600,
    }
}

async fn ledgers() -> Vec<(&'static str, Arc<dyn BudgetLedger>)> {
    let mut v: Vec<(&'static str, Arc<dyn BudgetLedger>)> = vec![("local", Arc::new(LocalLedger::default()))];
    let url = testing::redis_url();
    let prefix = format!("test-ledger-{}:", uuid::Uuid::new_v4().simple());
    match RedisLedger::connect(&url, &prefix).await {
        Ok(r) if r.usage(BudgetId::new(), &window()).await.is_ok() => v.push(("redis", Arc::new(r))),
        _ => testing::unavailable("Redis", "the budget ledger contract runs on the local ledger only"),
    }
    v
}

#[tokio::test]
async fn leases_never_reserve_past_the_limit() {
    for (name, l) in ledgers().await {
        let b = BudgetId::new();
        let w = window();
        let ttl = Duration::from_secs(30);
        let g = l.grant(b, &w, 100, 60, 10, 10, ttl).await.unwrap();
        assert_eq!((g.granted, g.spent, g.reserved), (60, 0, 60), "{name}");
        // Only 40 left: a partial grant, then nothing below the minimum.
        let g2 = l.grant(b, &w, 100, 60, 10, 10, ttl).await.unwrap();
        assert_eq!(g2.granted, 40, "{name}");
        let g3 = l.grant(b, &w, 100, 60, 1, 1, ttl).await.unwrap();
        assert_eq!((g3.lease, g3.granted), (None, 0), "{name}");
        // Released: actual spend (capped at the lease) and the rest returns.
        assert!(l.release(b, g.lease.as_deref().unwrap(), 25).await.unwrap());
        assert!(
            !l.release(b, g.lease.as_deref().unwrap(), 25).await.unwrap(),
            "{name}: twice"
        );
        let u = l.usage(b, &w).await.unwrap();
        assert_eq!((u.spent, u.reserved, u.leases), (25, 40, 1), "{name}");
        assert!(l.release(b, g2.lease.as_deref().unwrap(), 1000).await.unwrap());
        let u = l.usage(b, &w).await.unwrap();
        assert_eq!(
            (u.spent, u.reserved),
            (65, 0),
            "{name}: spend is capped at what was reserved"
        );
    }
}

#[tokio::test]
async fn an_expired_lease_becomes_its_charge_and_returns_the_rest() {
    for (name, l) in ledgers().await {
        let b = BudgetId::new();
        let w = window();
        let short = Duration::from_millis(200);
        let g = l.grant(b, &w, 1000, 500, 1, 50, short).await.unwrap();
        assert_eq!(g.granted, 500);
        // The holder raised its charge to 120, then died.
        assert!(l.report(b, g.lease.as_deref().unwrap(), 120, short).await.unwrap());
        // A lower report never lowers the charge.
        assert!(l.report(b, g.lease.as_deref().unwrap(), 80, short).await.unwrap());
        tokio::time::sleep(Duration::from_millis(400)).await;
        let u = l.usage(b, &w).await.unwrap();
        assert_eq!((u.spent, u.reserved, u.leases), (120, 0, 0), "{name}");
        assert!(
            !l.report(b, g.lease.as_deref().unwrap(), 130, short).await.unwrap(),
            "{name}: gone"
        );
        assert!(!l.release(b, g.lease.as_deref().unwrap(), 10).await.unwrap());
        // The returned budget can be leased again.
        let again = l.grant(b, &w, 1000, 2000, 1, 1, short).await.unwrap();
        assert_eq!(again.granted, 880, "{name}");
    }
}

#[tokio::test]
async fn concurrent_takers_never_exceed_the_limit() {
    for (name, l) in ledgers().await {
        let b = BudgetId::new();
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let l = l.clone();
            tasks.push(tokio::spawn(async move {
                let g = l
                    .grant(b, &window(), 1000, 37, 37, 37, Duration::from_secs(30))
                    .await
                    .unwrap();
                if let Some(id) = g.lease {
                    assert_eq!(g.granted, 37);
                    l.release(b, &id, 37).await.unwrap();
                    37
                } else {
                    0
                }
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        let u = l.usage(b, &window()).await.unwrap();
        assert_eq!(u.spent, total, "{name}");
        assert!(total <= 1000 && total > 1000 - 37, "{name}: {total}");
        assert_eq!(u.reserved, 0);
    }
}

#[tokio::test]
async fn only_counted_buckets_count() {
    for (name, l) in ledgers().await {
        let b = BudgetId::new();
        let old = Window {
            counted: vec![1],
            record: 1,
            resets_at: 0,
            bucket_ttl_secs: 3600,
        };
        l.add_spend(b, &old, 90).await.unwrap();
        let now = Window {
            counted: vec![2, 3],
            record: 3,
            resets_at: 0,
            bucket_ttl_secs: 3600,
        };
        assert_eq!(l.usage(b, &now).await.unwrap().spent, 0, "{name}");
        let both = Window {
            counted: vec![1, 2, 3],
            record: 3,
            resets_at: 0,
            bucket_ttl_secs: 3600,
        };
        let g = l.grant(b, &both, 100, 50, 1, 1, Duration::from_secs(5)).await.unwrap();
        assert_eq!(g.granted, 10, "{name}");
    }
}
