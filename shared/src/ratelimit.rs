//! Token-bucket rate limiting keyed by anything hashable (client address, agent id, or a
//! (source, client) pair so that failed attempts from one source cannot lock out a known
//! client connecting from elsewhere). Idle buckets are evicted.

use std::hash::Hash;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::time::coarse_monotonic_millis;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    /// When it was last refilled, in [`coarse_monotonic_millis`] (read on every request:
    /// the coarse clock costs no TSC read; refill in steps of a timer tick is exact enough).
    last: u64,
}

/// Seconds from `last` to `now` (both coarse monotonic milliseconds).
fn secs_since(last: u64, now: u64) -> f64 {
    now.saturating_sub(last) as f64 / 1000.0
}

/// Most keys kept; past it, idle buckets are dropped (and if none is idle, all of them: a
/// flood of distinct keys resets the limiter's memory rather than growing it without bound).
const MAX_KEYS: usize = 1_000_000;

#[derive(Clone)]
pub struct RateLimiter<K: Hash + Eq + Send + Sync + 'static> {
    inner: Arc<Inner<K>>,
}

struct Inner<K> {
    rate: f64,
    burst: f64,
    /// A bucket idle this long has refilled completely and carries no information.
    idle: Duration,
    /// The common case is a read lock and a hash lookup (no allocation, no cache machinery);
    /// the write lock is taken only to add a key or to drop idle ones.
    buckets: RwLock<Map<K>>,
}

struct Map<K> {
    buckets: crate::FastMap<K, Arc<Mutex<Bucket>>>,
    /// Size at which idle buckets are next swept (amortised: sweeps happen on insertion only).
    sweep_at: usize,
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> RateLimiter<K> {
    /// `rate` tokens per second, up to `burst` stored.
    pub fn new(rate_per_sec: u32, burst: u32) -> Self {
        let rate = f64::from(rate_per_sec.max(1));
        let burst = f64::from(burst.max(1));
        let idle = Duration::from_secs_f64((burst / rate).max(1.0) * 2.0);
        RateLimiter {
            inner: Arc::new(Inner {
                rate,
                burst,
                idle,
                buckets: RwLock::new(Map {
                    buckets: crate::FastMap::default(),
                    sweep_at: 1024,
                }),
            }),
        }
    }

    fn get(&self, key: &K) -> Option<Arc<Mutex<Bucket>>> {
        let m = self.inner.buckets.read().unwrap_or_else(|p| p.into_inner());
        m.buckets.get(key).cloned()
    }

    fn get_or_insert(&self, key: &K) -> Arc<Mutex<Bucket>> {
        if let Some(b) = self.get(key) {
            return b;
        }
        let now = coarse_monotonic_millis();
        let mut m = self.inner.buckets.write().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = m.buckets.get(key) {
            return b.clone();
        }
        if m.buckets.len() >= m.sweep_at {
            let idle = self.inner.idle;
            m.buckets.retain(|_, b| {
                Arc::strong_count(b) > 1
                    || secs_since(b.lock().unwrap_or_else(|p| p.into_inner()).last, now) < idle.as_secs_f64()
            });
            if m.buckets.len() >= MAX_KEYS {
                m.buckets.clear();
            }
            m.sweep_at = (m.buckets.len() * 2).clamp(1024, MAX_KEYS);
        }
        let b = Arc::new(Mutex::new(Bucket {
            tokens: self.inner.burst,
            last: now,
        }));
        m.buckets.insert(key.clone(), b.clone());
        b
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner
            .buckets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .buckets
            .len()
    }

    /// Whether `key` currently has at least `cost` tokens (nothing is taken).
    pub fn has(&self, key: &K, cost: f64) -> bool {
        match self.get(key) {
            None => true,
            Some(b) => {
                let b = b.lock().unwrap_or_else(|p| p.into_inner());
                let elapsed = secs_since(b.last, coarse_monotonic_millis());
                let refilled = (b.tokens + elapsed * self.inner.rate).min(self.inner.burst);
                refilled >= cost
            }
        }
    }

    /// Take `cost` tokens for `key`. `Err(retry_after_secs)` when the bucket is empty.
    pub fn check(&self, key: &K, cost: f64) -> Result<(), u64> {
        let b = self.get_or_insert(key);
        let (rate, burst) = (self.inner.rate, self.inner.burst);
        let mut b = b.lock().unwrap_or_else(|p| p.into_inner());
        let now = coarse_monotonic_millis();
        let elapsed = secs_since(b.last, now);
        b.tokens = (b.tokens + elapsed * rate).min(burst);
        b.last = now;
        if b.tokens >= cost {
            b.tokens -= cost;
            Ok(())
        } else {
            let wait = (cost - b.tokens) / rate;
            Err(wait.ceil().max(1.0) as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refuse_then_other_keys_unaffected() {
        let l = RateLimiter::new(1, 3);
        for _ in 0..3 {
            l.check(&"a", 1.0).unwrap();
        }
        assert!(matches!(l.check(&"a", 1.0), Err(s) if s >= 1));
        l.check(&"b", 1.0).unwrap();
    }

    #[test]
    fn idle_buckets_are_swept_when_the_map_grows_and_busy_ones_are_kept() {
        // 1 token/s, burst 1: an empty bucket refills in 1 s; a bucket is idle after 2 s.
        let l = RateLimiter::new(1, 1);
        l.check(&0u32, 1.0).unwrap();
        assert!(l.check(&0u32, 1.0).is_err(), "the bucket of key 0 is empty");
        for k in 1..1024u32 {
            l.check(&k, 1.0).unwrap();
        }
        assert_eq!(l.len(), 1024);
        // Nothing is idle yet: the sweep at 1024 keeps every bucket (key 0 stays limited).
        l.check(&5000, 1.0).unwrap();
        assert_eq!(l.len(), 1025);
        assert!(l.check(&0u32, 1.0).is_err(), "a sweep must not forget a busy bucket");
        // Once idle, the next sweep drops them.
        let l = RateLimiter::new(1, 1);
        {
            let mut m = l.inner.buckets.write().unwrap();
            m.sweep_at = 4;
        }
        for k in 0..4u32 {
            l.check(&k, 1.0).unwrap();
        }
        for b in l.inner.buckets.read().unwrap().buckets.values() {
            b.lock().unwrap().last -= 5_000;
        }
        l.check(&99, 1.0).unwrap();
        assert_eq!(l.len(), 1, "idle buckets were swept, the new key kept");
    }
}
