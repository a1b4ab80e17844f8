//! The shared budget ledger: how much of each budget window is spent and how much is reserved
//! by gateways' leases. Redis (atomic Lua scripts) in production, so every gateway replica
//! draws from the same ledger; an in-process ledger for `caracal dev` (one process).
//!
//! A gateway takes a **lease** — a slice of the remaining budget, reserved in the ledger — and
//! serves requests from it with no round trip. The lease carries a **charge**: how much the
//! gateway may have consumed without telling the ledger. The gateway raises the charge (one
//! round trip) before consuming beyond it, so the charge is always at least what was really
//! consumed. Released, a lease converts into its actual spend and returns the rest. Expired
//! (its gateway died), it converts into its charge and returns the rest. Hence **spend never
//! exceeds the limit**: `spent + reserved ≤ limit` whenever a lease is granted, and a lease
//! turns into at most what it reserved.
//!
//! Rolling windows count 60 buckets (the oldest partly outside the window, so the count errs on
//! the side of spend); calendar windows count their one bucket.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;

use crate::error::{Error, ErrorCode, Result};
use crate::ids::BudgetId;
use crate::store::admin::{Budget, WindowKind};
use crate::time::Micros;

/// Which buckets a budget counts now, and where new spend goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Bucket start times (µs) whose spend counts against the limit.
    pub counted: Vec<i64>,
    /// The bucket new spend is recorded in.
    pub record: i64,
    /// When the current window ends (calendar), or when the oldest counted bucket leaves it
    /// (rolling): the earliest moment more budget can appear.
    pub resets_at: Micros,
    /// How long a bucket must be kept.
    pub bucket_ttl_secs: i64,
}

pub fn window_of(b: &Budget, now: Micros) -> Window {
    if b.window == WindowKind::Rolling {
        let len = b.rolling_secs.unwrap_or(86_400).max(60) * 1_000_000;
        let bl = (len / 60).max(1_000_000);
        let cur = now - now.rem_euclid(bl);
        let first = (now - len) - (now - len).rem_euclid(bl);
        let counted: Vec<i64> = (0..).map(|i| first + i * bl).take_while(|s| *s <= cur).collect();
        return Window {
            resets_at: first + bl + len,
            counted,
            record: cur,
            bucket_ttl_secs: len / 1_000_000 * 2 + 3600,
        };
    }
    let (start, end) = crate::budget::window_bounds(b, now);
    Window {
        counted: vec![start],
        record: start,
        resets_at: end,
        bucket_ttl_secs: ((end - start) / 1_000_000).max(1) * 2 + 86_400,
    }
}

/// The answer to a lease request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// None when nothing could be granted (the budget is exhausted, counting other leases).
    pub lease: Option<String>,
    pub granted: i64,
    pub spent: i64,
    pub reserved: i64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LedgerUsage {
    pub spent: i64,
    pub reserved: i64,
    pub leases: i64,
}

#[async_trait]
pub trait BudgetLedger: Send + Sync {
    /// Reserve up to `want` (at least `min`, else nothing) of what `limit` leaves, as a lease
    /// that expires after `ttl` unless reported; its charge starts at `charge`.
    #[allow(clippy::too_many_arguments)]
    async fn grant(
        &self,
        budget: BudgetId,
        w: &Window,
        limit: i64,
        want: i64,
        min: i64,
        charge: i64,
        ttl: Duration,
    ) -> Result<Grant>;

    /// Raise a lease's charge (never above what it reserved) and extend it. False when the
    /// lease is gone (expired: it was converted into its charge).
    async fn report(&self, budget: BudgetId, lease: &str, charge: i64, ttl: Duration) -> Result<bool>;

    /// Convert a lease into its actual spend and return the rest. False when it had expired.
    async fn release(&self, budget: BudgetId, lease: &str, actual: i64) -> Result<bool>;

    /// Record spend that needed no reservation (soft budgets).
    async fn add_spend(&self, budget: BudgetId, w: &Window, amount: i64) -> Result<()>;

    /// Spend and reservations counted now (expired leases converted first).
    async fn usage(&self, budget: BudgetId, w: &Window) -> Result<LedgerUsage>;
}

fn unavailable(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::new(ErrorCode::BudgetLedgerUnavailable, "the budget ledger is unavailable").with_source(e)
}

// ---------------------------------------------------------------- in-process

#[derive(Default)]
struct LocalBudget {
    reserved: i64,
    /// lease → (granted, charge, bucket, expires at µs)
    leases: HashMap<String, (i64, i64, i64, Micros)>,
    spent: HashMap<i64, i64>,
}

impl LocalBudget {
    fn expire(&mut self, now: Micros) {
        let dead: Vec<String> = self
            .leases
            .iter()
            .filter(|(_, l)| l.3 <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for id in dead {
            if let Some((g, c, bucket, _)) = self.leases.remove(&id) {
                self.reserved -= g;
                *self.spent.entry(bucket).or_default() += c;
            }
        }
    }

    fn spent(&self, w: &Window) -> i64 {
        w.counted.iter().map(|b| self.spent.get(b).copied().unwrap_or(0)).sum()
    }
}

/// The ledger of one process (`caracal dev`): the same semantics, in memory.
#[derive(Default)]
pub struct LocalLedger {
    budgets: Mutex<HashMap<BudgetId, LocalBudget>>,
}

impl LocalLedger {
    /// The process-wide instance (every service of `caracal dev` shares it).
    pub fn global() -> std::sync::Arc<LocalLedger> {
        static L: std::sync::OnceLock<std::sync::Arc<LocalLedger>> = std::sync::OnceLock::new();
        L.get_or_init(Default::default).clone()
    }
}

#[async_trait]
impl BudgetLedger for LocalLedger {
    async fn grant(
        &self,
        budget: BudgetId,
        w: &Window,
        limit: i64,
        want: i64,
        min: i64,
        charge: i64,
        ttl: Duration,
    ) -> Result<Grant> {
        let now = crate::time::now_micros();
        let mut all = self.budgets.lock().unwrap_or_else(|p| p.into_inner());
        let b = all.entry(budget).or_default();
        b.expire(now);
        let spent = b.spent(w);
        let avail = limit - spent - b.reserved;
        if avail < min.max(1) {
            return Ok(Grant {
                lease: None,
                granted: 0,
                spent,
                reserved: b.reserved,
            });
        }
        let g = want.min(avail);
        let id = crate::ids::EventId::new().to_string();
        b.reserved += g;
        b.leases.insert(
            id.clone(),
            (g, charge.clamp(0, g), w.record, now + ttl.as_micros() as i64),
        );
        Ok(Grant {
            lease: Some(id),
            granted: g,
            spent,
            reserved: b.reserved,
        })
    }

    async fn report(&self, budget: BudgetId, lease: &str, charge: i64, ttl: Duration) -> Result<bool> {
        let now = crate::time::now_micros();
        let mut all = self.budgets.lock().unwrap_or_else(|p| p.into_inner());
        let b = all.entry(budget).or_default();
        b.expire(now);
        match b.leases.get_mut(lease) {
            Some(l) => {
                l.1 = l.1.max(charge.clamp(0, l.0));
                l.3 = now + ttl.as_micros() as i64;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn release(&self, budget: BudgetId, lease: &str, actual: i64) -> Result<bool> {
        let now = crate::time::now_micros();
        let mut all = self.budgets.lock().unwrap_or_else(|p| p.into_inner());
        let b = all.entry(budget).or_default();
        b.expire(now);
        match b.leases.remove(lease) {
            Some((g, _, bucket, _)) => {
                b.reserved -= g;
                *b.spent.entry(bucket).or_default() += actual.clamp(0, g);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn add_spend(&self, budget: BudgetId, w: &Window, amount: i64) -> Result<()> {
        let mut all = self.budgets.lock().unwrap_or_else(|p| p.into_inner());
        *all.entry(budget).or_default().spent.entry(w.record).or_default() += amount.max(0);
        Ok(())
    }

    async fn usage(&self, budget: BudgetId, w: &Window) -> Result<LedgerUsage> {
        let now = crate::time::now_micros();
        let mut all = self.budgets.lock().unwrap_or_else(|p| p.into_inner());
        let b = all.entry(budget).or_default();
        b.expire(now);
        Ok(LedgerUsage {
            spent: b.spent(w),
            reserved: b.reserved,
            leases: b.leases.len() as i64,
        })
    }
}

// ---------------------------------------------------------------- Redis

/// Converts expired leases of one budget into their charge. Shared by every script.
const EXPIRE_LUA: &str = r#"
local base = ARGV[1]
local now = tonumber(ARGV[2])
local leases = base .. ':leases'
local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', now)
for _, id in ipairs(expired) do
  local lk = base .. ':l:' .. id
  local f = redis.call('HMGET', lk, 'granted', 'charge', 'bucket', 'bttl')
  if f[1] then
    redis.call('DECRBY', base .. ':r', tonumber(f[1]))
    local sk = base .. ':s:' .. f[3]
    redis.call('INCRBY', sk, tonumber(f[2]))
    redis.call('EXPIRE', sk, tonumber(f[4]))
  end
  redis.call('DEL', lk)
  redis.call('ZREM', leases, id)
end
"#;

/// ARGV: base, now_ms… then per script.
const GRANT_LUA: &str = r#"
-- ARGV[3]=limit ARGV[4]=want ARGV[5]=min ARGV[6]=charge ARGV[7]=ttl_ms ARGV[8]=lease
-- ARGV[9]=record bucket ARGV[10]=bucket ttl s ARGV[11..]=counted buckets
local spent = 0
for i = 11, #ARGV do
  spent = spent + tonumber(redis.call('GET', base .. ':s:' .. ARGV[i]) or '0')
end
local reserved = tonumber(redis.call('GET', base .. ':r') or '0')
local avail = tonumber(ARGV[3]) - spent - reserved
local min = math.max(tonumber(ARGV[5]), 1)
if avail < min then
  return {0, spent, reserved}
end
local g = math.min(tonumber(ARGV[4]), avail)
local charge = math.max(0, math.min(tonumber(ARGV[6]), g))
local ttl = tonumber(ARGV[7])
local lk = base .. ':l:' .. ARGV[8]
redis.call('HSET', lk, 'granted', g, 'charge', charge, 'bucket', ARGV[9], 'bttl', ARGV[10])
redis.call('PEXPIRE', lk, ttl * 4 + 60000)
redis.call('ZADD', base .. ':leases', now + ttl, ARGV[8])
redis.call('INCRBY', base .. ':r', g)
-- Idle budgets' bookkeeping goes away on its own.
redis.call('EXPIRE', base .. ':r', tonumber(ARGV[10]))
redis.call('EXPIRE', base .. ':leases', tonumber(ARGV[10]))
return {g, spent, reserved + g}
"#;

const REPORT_LUA: &str = r#"
-- ARGV[3]=lease ARGV[4]=charge ARGV[5]=ttl_ms
local lk = base .. ':l:' .. ARGV[3]
local g = redis.call('HGET', lk, 'granted')
if not g then return 0 end
local cur = tonumber(redis.call('HGET', lk, 'charge'))
local c = math.max(cur, math.max(0, math.min(tonumber(ARGV[4]), tonumber(g))))
redis.call('HSET', lk, 'charge', c)
redis.call('PEXPIRE', lk, tonumber(ARGV[5]) * 4 + 60000)
redis.call('ZADD', base .. ':leases', now + tonumber(ARGV[5]), ARGV[3])
return 1
"#;

const RELEASE_LUA: &str = r#"
-- ARGV[3]=lease ARGV[4]=actual
local lk = base .. ':l:' .. ARGV[3]
local f = redis.call('HMGET', lk, 'granted', 'bucket', 'bttl')
if not f[1] then return 0 end
local g = tonumber(f[1])
redis.call('DECRBY', base .. ':r', g)
local sk = base .. ':s:' .. f[2]
redis.call('INCRBY', sk, math.max(0, math.min(tonumber(ARGV[4]), g)))
redis.call('EXPIRE', sk, tonumber(f[3]))
redis.call('DEL', lk)
redis.call('ZREM', base .. ':leases', ARGV[3])
return 1
"#;

const SPEND_LUA: &str = r#"
-- ARGV[3]=bucket ARGV[4]=amount ARGV[5]=bucket ttl
local sk = base .. ':s:' .. ARGV[3]
redis.call('INCRBY', sk, tonumber(ARGV[4]))
redis.call('EXPIRE', sk, tonumber(ARGV[5]))
return 1
"#;

const USAGE_LUA: &str = r#"
-- ARGV[3..]=counted buckets
local spent = 0
for i = 3, #ARGV do
  spent = spent + tonumber(redis.call('GET', base .. ':s:' .. ARGV[i]) or '0')
end
return {spent, tonumber(redis.call('GET', base .. ':r') or '0'), redis.call('ZCARD', base .. ':leases')}
"#;

/// The Redis ledger (every gateway replica shares it).
pub struct RedisLedger {
    client: fred::clients::Pool,
    prefix: String,
}

impl RedisLedger {
    pub async fn connect(url: &str, prefix: &str) -> Result<RedisLedger> {
        use fred::prelude::{Builder, ClientLike, Config, ReconnectPolicy};
        let mut config = Config::from_url(url)
            .map_err(|e| Error::new(ErrorCode::ValidationFailed, format!("invalid Redis URL: {e}")))?;
        config.fail_fast = false;
        let pool = Builder::from_config(config)
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2))
            .with_connection_config(|c| {
                c.connection_timeout = Duration::from_secs(3);
                c.tcp.nodelay = Some(true);
            })
            .with_performance_config(|p| p.default_command_timeout = Duration::from_secs(2))
            .build_pool(2)
            .map_err(unavailable)?;
        let _ = pool.init().await;
        Ok(RedisLedger {
            client: pool,
            prefix: prefix.to_string(),
        })
    }

    fn base(&self, b: BudgetId) -> String {
        // The hash tag keeps every key of a budget in one cluster slot.
        format!("{}caracal:budget:{{{b}}}", self.prefix)
    }

    async fn eval(&self, body: &str, b: BudgetId, args: Vec<String>) -> Result<fred::types::Value> {
        use fred::interfaces::LuaInterface;
        let script = format!("local base = ARGV[1]\nlocal now = tonumber(ARGV[2])\n{EXPIRE_LUA}\n{body}");
        let now_ms = (crate::time::now_micros() / 1000).to_string();
        let mut argv = vec![self.base(b), now_ms];
        argv.extend(args);
        let key = format!("{}:r", self.base(b));
        self.client
            .next()
            .eval::<fred::types::Value, _, _, _>(script, vec![key], argv)
            .await
            .map_err(unavailable)
    }
}

fn ints(v: fred::types::Value) -> Vec<i64> {
    match v {
        fred::types::Value::Array(a) => a.into_iter().map(|x| x.as_i64().unwrap_or(0)).collect(),
        other => vec![other.as_i64().unwrap_or(0)],
    }
}

#[async_trait]
impl BudgetLedger for RedisLedger {
    async fn grant(
        &self,
        budget: BudgetId,
        w: &Window,
        limit: i64,
        want: i64,
        min: i64,
        charge: i64,
        ttl: Duration,
    ) -> Result<Grant> {
        let lease = crate::ids::EventId::new().to_string();
        let mut args = vec![
            limit.to_string(),
            want.to_string(),
            min.to_string(),
            charge.to_string(),
            ttl.as_millis().to_string(),
            lease.clone(),
            w.record.to_string(),
            w.bucket_ttl_secs.to_string(),
        ];
        args.extend(w.counted.iter().map(|b| b.to_string()));
        let r = ints(self.eval(GRANT_LUA, budget, args).await?);
        let (g, spent, reserved) = (
            r.first().copied().unwrap_or(0),
            r.get(1).copied().unwrap_or(0),
            r.get(2).copied().unwrap_or(0),
        );
        Ok(Grant {
            lease: (g > 0).then_some(lease),
            granted: g,
            spent,
            reserved,
        })
    }

    async fn report(&self, budget: BudgetId, lease: &str, charge: i64, ttl: Duration) -> Result<bool> {
        let r = ints(
            self.eval(
                REPORT_LUA,
                budget,
                vec![lease.to_string(), charge.to_string(), ttl.as_millis().to_string()],
            )
            .await?,
        );
        Ok(r.first() == Some(&1))
    }

    async fn release(&self, budget: BudgetId, lease: &str, actual: i64) -> Result<bool> {
        let r = ints(
            self.eval(RELEASE_LUA, budget, vec![lease.to_string(), actual.to_string()])
                .await?,
        );
        Ok(r.first() == Some(&1))
    }

    async fn add_spend(&self, budget: BudgetId, w: &Window, amount: i64) -> Result<()> {
        self.eval(
            SPEND_LUA,
            budget,
            vec![
                w.record.to_string(),
                amount.max(0).to_string(),
                w.bucket_ttl_secs.to_string(),
            ],
        )
        .await?;
        Ok(())
    }

    async fn usage(&self, budget: BudgetId, w: &Window) -> Result<LedgerUsage> {
        let r = ints(
            self.eval(USAGE_LUA, budget, w.counted.iter().map(|b| b.to_string()).collect())
                .await?,
        );
        Ok(LedgerUsage {
            spent: r.first().copied().unwrap_or(0),
            reserved: r.get(1).copied().unwrap_or(0),
            leases: r.get(2).copied().unwrap_or(0),
        })
    }
}

/// The ledger for this configuration: Redis with the Redis bus, in-process otherwise.
pub async fn connect(cfg: &crate::config::BusConfig) -> Result<std::sync::Arc<dyn BudgetLedger>> {
    Ok(match cfg.backend {
        crate::config::BusBackend::Redis => {
            std::sync::Arc::new(RedisLedger::connect(&cfg.redis_url, &cfg.redis_prefix).await?)
        }
        crate::config::BusBackend::Embedded => LocalLedger::global(),
    })
}
