//! Token-bucket rate limiting keyed by anything hashable (client address, agent id, or a
//! (source, client) pair so that failed attempts from one source cannot lock out a known
//! client connecting from elsewhere). Idle buckets are evicted.

use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moka::sync::Cache;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

#[derive(Clone)]
pub struct RateLimiter<K: Hash + Eq + Send + Sync + 'static> {
    rate: f64,
    burst: f64,
    buckets: Cache<K, Arc<Mutex<Bucket>>>,
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> RateLimiter<K> {
    /// `rate` tokens per second, up to `burst` stored.
    pub fn new(rate_per_sec: u32, burst: u32) -> Self {
        let rate = f64::from(rate_per_sec.max(1));
        let burst = f64::from(burst.max(1));
        // A bucket idle long enough to refill completely carries no information.
        let idle = Duration::from_secs_f64((burst / rate).max(1.0) * 2.0);
        RateLimiter {
            rate,
            burst,
            buckets: Cache::builder().max_capacity(1_000_000).time_to_idle(idle).build(),
        }
    }

    /// Whether `key` currently has at least `cost` tokens (nothing is taken).
    pub fn has(&self, key: &K, cost: f64) -> bool {
        match self.buckets.get(key) {
            None => true,
            Some(b) => {
                let b = b.lock().unwrap_or_else(|p| p.into_inner());
                let refilled = (b.tokens + b.last.elapsed().as_secs_f64() * self.rate).min(self.burst);
                refilled >= cost
            }
        }
    }

    /// Take `cost` tokens for `key`. `Err(retry_after_secs)` when the bucket is empty.
    pub fn check(&self, key: &K, cost: f64) -> Result<(), u64> {
        let b = self.buckets.get_with_by_ref(key, || {
            Arc::new(Mutex::new(Bucket {
                tokens: self.burst,
                last: Instant::now(),
            }))
        });
        let mut b = b.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let elapsed = now.duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
        b.last = now;
        if b.tokens >= cost {
            b.tokens -= cost;
            Ok(())
        } else {
            let wait = (cost - b.tokens) / self.rate;
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
}
