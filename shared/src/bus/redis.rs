//! Redis Streams backend (fred). XADD to publish; consumer groups with XREADGROUP / XACK;
//! XAUTOCLAIM to take over entries of dead consumers; XTRIM MINID only past what every group
//! has acknowledged.
//!
//! Blocking reads get a dedicated connection each (a blocked connection would otherwise stall
//! every command multiplexed on it); everything else shares a small pool. Replies are parsed
//! by hand so RESP2 and RESP3 and every Redis ≥ 6.2 reply shape are handled.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand};

use super::{Bus, Entry, id_cmp, parse_id};
use crate::error::{Error, ErrorCode, Result};

const FIELD: &str = "m";

pub struct RedisBus {
    /// Prepended to every stream key (namespacing a shared Redis; isolating tests).
    prefix: String,
    pool: Pool,
    config: Config,
    blockers: Mutex<HashMap<String, Client>>,
}

fn builder(config: &Config) -> Builder {
    let mut b = Builder::from_config(config.clone());
    b.set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2))
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(3);
            c.internal_command_timeout = Duration::from_secs(5);
            c.max_command_attempts = 3;
            // Nagle + delayed ACK would hold every pipelined batch for ~40 ms.
            c.tcp.nodelay = Some(true);
        })
        .with_performance_config(|p| {
            p.default_command_timeout = Duration::from_secs(10);
        });
    b
}

fn cmd(name: &'static str, blocking: bool) -> CustomCommand {
    CustomCommand::new_static(name, ClusterHash::FirstKey, blocking)
}

fn bus_err(e: fred::error::Error) -> Error {
    Error::new(ErrorCode::BusUnavailable, "the event bus is unavailable").with_source(e)
}

impl RedisBus {
    pub async fn connect(url: &str, prefix: &str) -> Result<RedisBus> {
        let mut config = Config::from_url(url)
            .map_err(|e| Error::new(ErrorCode::ValidationFailed, format!("invalid Redis URL: {e}")))?;
        // Keep retrying in the background when Redis is down at start: the service starts
        // not-ready and becomes ready when Redis answers.
        config.fail_fast = false;
        let pool = builder(&config).build_pool(4).map_err(bus_err)?;
        let _ = pool.init().await;
        Ok(RedisBus {
            prefix: prefix.to_string(),
            pool,
            config,
            blockers: Mutex::new(HashMap::new()),
        })
    }

    /// Delete every key under this bus's prefix (streams, groups, budget ledgers): for tests
    /// and benchmarks that fill a shared Redis under a prefix of their own. Returns how many
    /// keys were deleted.
    pub async fn drop_prefix(&self) -> Result<u64> {
        let mut pattern = String::with_capacity(self.prefix.len() + 1);
        for c in self.prefix.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern.push('*');
        let keys = self.run(self.client(), "KEYS", false, vec![pattern.into()]).await?;
        let keys: Vec<Value> = match keys {
            Value::Array(v) => v,
            _ => Vec::new(),
        };
        let mut dropped = 0;
        for chunk in keys.chunks(512) {
            let n = self.run(self.client(), "UNLINK", false, chunk.to_vec()).await?;
            dropped += n.as_u64().unwrap_or(0);
        }
        Ok(dropped)
    }

    fn key(&self, stream: &str) -> String {
        format!("{}{stream}", self.prefix)
    }

    fn client(&self) -> &Client {
        self.pool.next()
    }

    /// A dedicated connection for blocking reads by `key` (one per consumer / reader).
    async fn blocker(&self, key: &str) -> Result<Client> {
        if let Some(c) = self.blockers.lock().unwrap().get(key) {
            return Ok(c.clone());
        }
        // Never re-sent after a dropped connection: a blocking read whose reply was lost with
        // the connection has already delivered its entries (they are pending for this
        // consumer), and re-sending it would read past them, leaving them unseen until another
        // consumer reclaims them (`bus.claim_idle` later). As an error, the consumer loop reads
        // its own pending entries first and handles them at once.
        let mut b = builder(&self.config);
        b.with_connection_config(|c| c.max_command_attempts = 1);
        let c = b.build().map_err(bus_err)?;
        let _ = c.init().await;
        let mut map = self.blockers.lock().unwrap();
        Ok(map.entry(key.to_string()).or_insert(c).clone())
    }

    async fn run(&self, c: &Client, name: &'static str, blocking: bool, args: Vec<Value>) -> Result<Value> {
        c.custom::<Value, Value>(cmd(name, blocking), args)
            .await
            .map_err(bus_err)
    }

    /// Delivery counts of `consumer`'s pending entries (for entries just re-delivered).
    async fn delivery_counts(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        ids: &[String],
    ) -> Result<HashMap<String, u64>> {
        let mut out = HashMap::new();
        if ids.is_empty() {
            return Ok(out);
        }
        let lo = ids.iter().min_by(|a, b| id_cmp(a, b)).cloned().unwrap_or_default();
        let hi = ids.iter().max_by(|a, b| id_cmp(a, b)).cloned().unwrap_or_default();
        let v = self
            .run(
                self.client(),
                "XPENDING",
                false,
                vec![
                    self.key(stream).into(),
                    group.into(),
                    lo.into(),
                    hi.into(),
                    (ids.len() as i64).into(),
                    consumer.into(),
                ],
            )
            .await?;
        for row in v.into_array() {
            let row = row.into_array();
            if row.len() >= 4
                && let (Some(id), Some(n)) = (row[0].as_string(), row[3].as_u64())
            {
                out.insert(id, n);
            }
        }
        Ok(out)
    }
}

/// Parse `[[id, [f, v, …] | nil], …]` into entries.
fn parse_entries(v: Value, deliveries: u64) -> Vec<Entry> {
    let mut out = Vec::new();
    for e in v.into_array() {
        let mut parts = e.into_array().into_iter();
        let Some(id) = parts.next().and_then(|i| i.as_string()) else {
            continue;
        };
        let fields = parts.next().unwrap_or(Value::Null);
        let payload = match fields {
            Value::Null => None,
            Value::Map(m) => m
                .inner()
                .into_iter()
                .find(|(k, _)| k.as_str() == Some(FIELD))
                .and_then(|(_, v)| v.into_bytes()),
            other => {
                let mut it = other.into_array().into_iter();
                let mut found = None;
                while let (Some(k), Some(val)) = (it.next(), it.next()) {
                    if k.as_str().as_deref() == Some(FIELD) {
                        found = val.into_bytes();
                        break;
                    }
                }
                found
            }
        };
        out.push(Entry {
            id,
            payload,
            deliveries,
        });
    }
    out
}

/// Parse an XREAD/XREADGROUP reply for a single stream (RESP2 array or RESP3 map).
fn parse_read_reply(v: Value, deliveries: u64) -> Vec<Entry> {
    match v {
        Value::Null => Vec::new(),
        Value::Map(m) => m
            .inner()
            .into_values()
            .flat_map(|entries| parse_entries(entries, deliveries))
            .collect(),
        other => other
            .into_array()
            .into_iter()
            .flat_map(|pair| {
                let mut p = pair.into_array().into_iter();
                let _name = p.next();
                parse_entries(p.next().unwrap_or(Value::Null), deliveries)
            })
            .collect(),
    }
}

/// Flattened `[k, v, k, v]` or a map → lookup by key.
fn kv(v: Value) -> HashMap<String, Value> {
    match v {
        Value::Map(m) => m
            .inner()
            .into_iter()
            .filter_map(|(k, v)| k.as_str().map(|s| (s.to_string(), v)))
            .collect(),
        other => {
            let mut out = HashMap::new();
            let mut it = other.into_array().into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                if let Some(k) = k.as_string() {
                    out.insert(k, v);
                }
            }
            out
        }
    }
}

fn next_id(id: &str) -> String {
    let (ms, seq) = parse_id(id);
    if seq == u64::MAX {
        format!("{}-0", ms + 1)
    } else {
        format!("{ms}-{}", seq + 1)
    }
}

fn is_busygroup(e: &Error) -> bool {
    e.source_ref()
        .map(|s| s.to_string().contains("BUSYGROUP"))
        .unwrap_or(false)
}

fn is_no_such_key(e: &Error) -> bool {
    e.source_ref()
        .map(|s| s.to_string().contains("no such key"))
        .unwrap_or(false)
}

#[async_trait]
impl Bus for RedisBus {
    async fn publish(&self, stream: &str, payload: Bytes) -> Result<String> {
        let v = self
            .run(
                self.client(),
                "XADD",
                false,
                vec![self.key(stream).into(), "*".into(), FIELD.into(), Value::Bytes(payload)],
            )
            .await?;
        v.as_string()
            .ok_or_else(|| Error::new(ErrorCode::BusUnavailable, "XADD returned no id"))
    }

    async fn publish_many(&self, stream: &str, payloads: Vec<Bytes>) -> Result<Vec<String>> {
        if payloads.is_empty() {
            return Ok(Vec::new());
        }
        let pipe = self.client().pipeline();
        for p in payloads {
            let _: () = pipe
                .custom(
                    cmd("XADD", false),
                    vec![Value::from(self.key(stream)), "*".into(), FIELD.into(), Value::Bytes(p)],
                )
                .await
                .map_err(bus_err)?;
        }
        let results: Vec<Value> = pipe.all().await.map_err(bus_err)?;
        results
            .into_iter()
            .map(|v| {
                v.as_string()
                    .ok_or_else(|| Error::new(ErrorCode::BusUnavailable, "XADD returned no id"))
            })
            .collect()
    }

    async fn ensure_group(&self, stream: &str, group: &str) -> Result<()> {
        match self
            .run(
                self.client(),
                "XGROUP",
                false,
                vec![
                    "CREATE".into(),
                    self.key(stream).into(),
                    group.into(),
                    "0".into(),
                    "MKSTREAM".into(),
                ],
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_busygroup(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn read_group(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<Entry>> {
        let c = self
            .blocker(&format!("g:{}:{group}:{consumer}", self.key(stream)))
            .await?;
        let v = self
            .run(
                &c,
                "XREADGROUP",
                true,
                vec![
                    "GROUP".into(),
                    group.into(),
                    consumer.into(),
                    "COUNT".into(),
                    (count as i64).into(),
                    "BLOCK".into(),
                    (block.as_millis().max(1) as i64).into(),
                    "STREAMS".into(),
                    self.key(stream).into(),
                    ">".into(),
                ],
            )
            .await?;
        Ok(parse_read_reply(v, 1))
    }

    async fn read_own_pending(&self, stream: &str, group: &str, consumer: &str, count: usize) -> Result<Vec<Entry>> {
        let v = self
            .run(
                self.client(),
                "XREADGROUP",
                false,
                vec![
                    "GROUP".into(),
                    group.into(),
                    consumer.into(),
                    "COUNT".into(),
                    (count as i64).into(),
                    "STREAMS".into(),
                    self.key(stream).into(),
                    "0".into(),
                ],
            )
            .await?;
        let mut entries = parse_read_reply(v, 2);
        let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
        let counts = self.delivery_counts(stream, group, consumer, &ids).await?;
        for e in &mut entries {
            if let Some(n) = counts.get(&e.id) {
                e.deliveries = *n;
            }
        }
        Ok(entries)
    }

    async fn ack(&self, stream: &str, group: &str, ids: &[String]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut args: Vec<Value> = vec![self.key(stream).into(), group.into()];
        args.extend(ids.iter().map(|i| Value::from(i.as_str())));
        self.run(self.client(), "XACK", false, args).await?;
        Ok(())
    }

    async fn claim_idle(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<Entry>> {
        let v = self
            .run(
                self.client(),
                "XAUTOCLAIM",
                false,
                vec![
                    self.key(stream).into(),
                    group.into(),
                    consumer.into(),
                    (min_idle.as_millis() as i64).into(),
                    "0-0".into(),
                    "COUNT".into(),
                    (count as i64).into(),
                ],
            )
            .await?;
        // [next-start, [entries…], [deleted ids…]] (the third element since Redis 7).
        let mut parts = v.into_array().into_iter();
        let _next = parts.next();
        let mut entries = parse_entries(parts.next().unwrap_or(Value::Null), 2);
        let ids: Vec<String> = entries.iter().map(|e| e.id.clone()).collect();
        let counts = self.delivery_counts(stream, group, consumer, &ids).await?;
        for e in &mut entries {
            if let Some(n) = counts.get(&e.id) {
                e.deliveries = *n;
            }
        }
        Ok(entries)
    }

    async fn read_after(&self, stream: &str, after: &str, count: usize, block: Duration) -> Result<Vec<Entry>> {
        let c = self.blocker(&format!("t:{}", self.key(stream))).await?;
        let v = self
            .run(
                &c,
                "XREAD",
                true,
                vec![
                    "COUNT".into(),
                    (count as i64).into(),
                    "BLOCK".into(),
                    (block.as_millis().max(1) as i64).into(),
                    "STREAMS".into(),
                    self.key(stream).into(),
                    after.into(),
                ],
            )
            .await?;
        Ok(parse_read_reply(v, 0))
    }

    async fn last_id(&self, stream: &str) -> Result<String> {
        match self
            .run(
                self.client(),
                "XINFO",
                false,
                vec!["STREAM".into(), self.key(stream).into()],
            )
            .await
        {
            Ok(v) => Ok(kv(v)
                .remove("last-generated-id")
                .and_then(|v| v.as_string())
                .unwrap_or_else(|| "0-0".into())),
            Err(e) if is_no_such_key(&e) => Ok("0-0".into()),
            Err(e) => Err(e),
        }
    }

    async fn pending_count(&self, stream: &str, group: &str) -> Result<u64> {
        match self
            .run(
                self.client(),
                "XPENDING",
                false,
                vec![self.key(stream).into(), group.into()],
            )
            .await
        {
            Ok(v) => Ok(v.into_array().first().and_then(|n| n.as_u64()).unwrap_or(0)),
            // A group that does not exist has nothing pending (same as the embedded bus).
            Err(e)
                if e.source_ref()
                    .map(|s| s.to_string().contains("NOGROUP"))
                    .unwrap_or(false) =>
            {
                Ok(0)
            }
            Err(e) => Err(e),
        }
    }

    async fn trim_acknowledged(&self, stream: &str) -> Result<u64> {
        let groups = match self
            .run(
                self.client(),
                "XINFO",
                false,
                vec!["GROUPS".into(), self.key(stream).into()],
            )
            .await
        {
            Ok(v) => v.into_array(),
            Err(e) if is_no_such_key(&e) => return Ok(0),
            Err(e) => return Err(e),
        };
        if groups.is_empty() {
            return Ok(0);
        }
        let mut floor: Option<String> = None;
        for g in groups {
            let mut info = kv(g);
            let name = info.remove("name").and_then(|v| v.as_string()).unwrap_or_default();
            let pending = info.remove("pending").and_then(|v| v.as_u64()).unwrap_or(0);
            let last = info
                .remove("last-delivered-id")
                .and_then(|v| v.as_string())
                .unwrap_or_else(|| "0-0".into());
            let g_floor = if pending > 0 {
                let v = self
                    .run(
                        self.client(),
                        "XPENDING",
                        false,
                        vec![self.key(stream).into(), name.into()],
                    )
                    .await?;
                v.into_array()
                    .get(1)
                    .and_then(|v| v.as_string())
                    .unwrap_or_else(|| "0-0".into())
            } else {
                next_id(&last)
            };
            floor = Some(match floor {
                None => g_floor,
                Some(f) => {
                    if id_cmp(&g_floor, &f).is_lt() {
                        g_floor
                    } else {
                        f
                    }
                }
            });
        }
        let Some(floor) = floor else { return Ok(0) };
        let v = self
            .run(
                self.client(),
                "XTRIM",
                false,
                vec![self.key(stream).into(), "MINID".into(), "=".into(), floor.into()],
            )
            .await?;
        Ok(v.as_u64().unwrap_or(0))
    }

    async fn len(&self, stream: &str) -> Result<u64> {
        let v = self
            .run(self.client(), "XLEN", false, vec![self.key(stream).into()])
            .await?;
        Ok(v.as_u64().unwrap_or(0))
    }

    async fn ping(&self) -> Result<()> {
        let v = self.run(self.client(), "PING", false, vec![]).await?;
        match v.as_str().as_deref() {
            Some("PONG") => Ok(()),
            _ => Err(Error::new(ErrorCode::BusUnavailable, "unexpected PING reply")),
        }
    }
}
