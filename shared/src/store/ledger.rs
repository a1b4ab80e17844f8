//! The audit ledger's storage: entries in one total order, the complete-subtree hashes every
//! proof is made of, signed tree heads and the head-signing keys.
//!
//! [`Store::ledger_append`] is the only writer path. In one transaction it locks the ledger's
//! size (a row lock on Postgres; SQLite has one writer), drops events already recorded (by
//! event id: delivery is at-least-once), numbers the rest from the current size, writes them with
//! their leaf hashes, writes the subtree hashes they complete, and moves the size. Concurrent
//! appenders (several audit consumers or instances) serialise on that lock, which is what makes
//! the order total.

use serde_json::Value;

use super::{Store, Tx, read, tx, tx_exec};
use crate::config::DbKind;
use crate::crypto::KeyRing;
use crate::error::{Error, ErrorCode, Result};
use crate::ledger::{self, Hash, LedgerPublicKey, LedgerSigner, NodeMap, NodeSource, Planner, Record, TreeHead};
use crate::seal::{Sealed, open, seal};
use crate::time::now_micros;

/// An event to record (what the bus delivered, with the fields the ledger indexes).
#[derive(Debug, Clone)]
pub struct NewLedgerEvent {
    pub event_id: String,
    pub stream: String,
    pub kind: String,
    pub tenant: Option<String>,
    pub agent_id: Option<String>,
    pub resource_id: Option<String>,
    pub decision: Option<String>,
    pub occurred_at: i64,
    pub body: Value,
}

/// A recorded entry.
#[derive(Debug, Clone)]
pub struct LedgerEntry {
    pub record: Record,
    pub agent_id: Option<String>,
    pub resource_id: Option<String>,
    pub decision: Option<String>,
    /// The stored leaf hash (a verifier recomputes it from `record`).
    pub leaf_hash: Hash,
}

/// Filters for ledger queries (all optional; results in ledger order).
#[derive(Debug, Clone, Default)]
pub struct LedgerFilter {
    pub tenant: Option<String>,
    pub agent_id: Option<String>,
    pub resource_id: Option<String>,
    pub decision: Option<String>,
    pub kind: Option<String>,
    /// occurred_at ≥ since (µs)
    pub since: Option<i64>,
    /// occurred_at < until (µs)
    pub until: Option<i64>,
    /// seq > after
    pub after_seq: Option<u64>,
    pub limit: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Events newly recorded (the rest were duplicates).
    pub appended: u64,
    /// The ledger's size after the append.
    pub size: u64,
}

type EntryRow = (
    i64,
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    i64,
    i64,
    String,
    Vec<u8>,
);
const ENTRY_COLS: &str = "seq, event_id, stream, kind, tenant_id, agent_id, resource_id, decision, occurred_at, recorded_at, body, leaf_hash";

fn entry_from_row(r: EntryRow) -> Result<LedgerEntry> {
    let leaf_hash: Hash =
        r.11.as_slice()
            .try_into()
            .map_err(|_| Error::internal("a stored leaf hash is not 32 bytes"))?;
    Ok(LedgerEntry {
        record: Record {
            v: ledger::ENCODING_VERSION,
            seq: r.0 as u64,
            event_id: r.1,
            stream: r.2,
            kind: r.3,
            tenant: r.4,
            occurred_at: r.8,
            recorded_at: r.9,
            // A body that is not JSON (edited in the database) still hashes as text.
            body: serde_json::from_str(&r.10).unwrap_or(Value::String(r.10)),
        },
        agent_id: r.5,
        resource_id: r.6,
        decision: r.7,
        leaf_hash,
    })
}

fn placeholders(start: usize, n: usize) -> String {
    (start..start + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Reads nodes inside a transaction (for appends).
struct TxNodes<'a>(&'a NodeMap);

impl NodeSource for TxNodes<'_> {
    fn node(&self, level: u32, index: u64) -> Result<Hash> {
        self.0.node(level, index)
    }
}

/// The ledger's state row, read under its lock.
struct LedgerState {
    size: u64,
    pruned_below: u64,
    /// Entries per partition of `ledger_entries` (Postgres; 0: not partitioned).
    partition_size: u64,
    /// Partitions exist for every seq below this.
    partitions_below: u64,
}

/// Partition `n` of the ledger's entries: seq in `[n * size, (n + 1) * size)` (the naming the
/// Postgres migration 0006 uses too).
fn partition_name(n: u64) -> String {
    format!("ledger_entries_p{n}")
}

impl Tx {
    async fn ledger_state_locked(&mut self) -> Result<LedgerState> {
        let sql = if self.kind() == DbKind::Postgres {
            "SELECT size, pruned_below, partition_size, partitions_below FROM ledger_state WHERE id = 1 FOR UPDATE"
        } else {
            "SELECT size, pruned_below, partition_size, partitions_below FROM ledger_state WHERE id = 1"
        };
        let (size, pruned, psize, pbelow): (i64, i64, i64, i64) =
            tx!(self, c => sqlx::query_as(sql).fetch_one(c).await)?;
        Ok(LedgerState {
            size: size as u64,
            pruned_below: pruned as u64,
            // 0 on SQLite (its column default; only Postgres sets a size).
            partition_size: psize.max(0) as u64,
            partitions_below: pbelow as u64,
        })
    }

    /// Make sure partitions exist for every seq below `new`, one partition ahead (Postgres).
    async fn ledger_ensure_partitions(&mut self, st: &LedgerState, new: u64) -> Result<()> {
        let ps = st.partition_size;
        if ps == 0 || new <= st.partitions_below {
            return Ok(());
        }
        let mut below = st.partitions_below.max(st.size / ps * ps);
        while below < new + ps {
            let n = below / ps;
            let sql = format!(
                "CREATE TABLE IF NOT EXISTS {} PARTITION OF ledger_entries FOR VALUES FROM ({}) TO ({})",
                partition_name(n),
                n * ps,
                (n + 1) * ps
            );
            tx_exec!(self, sqlx::query(sqlx::AssertSqlSafe(sql.clone())))?;
            below += ps;
        }
        tx_exec!(
            self,
            sqlx::query("UPDATE ledger_state SET partitions_below = $1 WHERE id = 1").bind(below as i64)
        )?;
        Ok(())
    }

    async fn ledger_fetch_nodes(&mut self, wanted: &[(u32, u64)]) -> Result<NodeMap> {
        let mut out = NodeMap::new();
        let leaves: Vec<i64> = wanted.iter().filter(|(l, _)| *l == 0).map(|(_, i)| *i as i64).collect();
        let inner: Vec<(u32, u64)> = wanted.iter().filter(|(l, _)| *l > 0).copied().collect();
        for chunk in leaves.chunks(500) {
            let sql = format!(
                "SELECT seq, leaf_hash FROM ledger_entries WHERE seq IN ({})",
                placeholders(1, chunk.len())
            );
            let rows: Vec<(i64, Vec<u8>)> = tx!(self, c => {
                let mut q = sqlx::query_as(sqlx::AssertSqlSafe(sql.clone()));
                for s in chunk {
                    q = q.bind(*s);
                }
                q.fetch_all(c).await
            })?;
            for (s, h) in rows {
                out.insert((0, s as u64), to_hash(&h)?);
            }
        }
        let inner = with_pruned_leaves(inner, &leaves, &out);
        for chunk in inner.chunks(200) {
            let cond = (0..chunk.len())
                .map(|i| format!("(level = ${} AND idx = ${})", 2 * i + 1, 2 * i + 2))
                .collect::<Vec<_>>()
                .join(" OR ");
            let sql = format!("SELECT level, idx, hash FROM ledger_nodes WHERE {cond}");
            let rows: Vec<(i32, i64, Vec<u8>)> = tx!(self, c => {
                let mut q = sqlx::query_as(sqlx::AssertSqlSafe(sql.clone()));
                for (l, i) in chunk {
                    q = q.bind(*l as i32).bind(*i as i64);
                }
                q.fetch_all(c).await
            })?;
            for (l, i, h) in rows {
                out.insert((l as u32, i as u64), to_hash(&h)?);
            }
        }
        Ok(out)
    }
}

/// Leaf hashes not found among the entries are looked up among the nodes: retention keeps there
/// the one leaf (if any) of the pruned prefix that later proofs still read.
fn with_pruned_leaves(mut inner: Vec<(u32, u64)>, leaves: &[i64], found: &NodeMap) -> Vec<(u32, u64)> {
    inner.extend(leaves.iter().map(|s| (0, *s as u64)).filter(|k| !found.contains_key(k)));
    inner
}

fn to_hash(v: &[u8]) -> Result<Hash> {
    v.try_into()
        .map_err(|_| Error::internal("a stored hash is not 32 bytes"))
}

impl Store {
    /// Record `events` (dropping ones already recorded) in one transaction; returns how many
    /// were new and the ledger's size after.
    pub async fn ledger_append(&self, events: &[NewLedgerEvent]) -> Result<Appended> {
        let mut tx = self.begin().await?;
        let st = tx.ledger_state_locked().await?;
        let old = st.size;
        if events.is_empty() {
            tx.rollback().await?;
            return Ok(Appended { appended: 0, size: old });
        }
        // Drop duplicates: already recorded, or repeated within the batch.
        let mut seen_here = std::collections::HashSet::new();
        let mut known = std::collections::HashSet::new();
        match tx.conn() {
            // Postgres: one array parameter (a statement with hundreds of parameters costs more
            // to parse and plan than to run).
            super::TxConn::Pg(t) => {
                let ids: Vec<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
                let rows: Vec<(String,)> =
                    sqlx::query_as("SELECT event_id FROM ledger_entries WHERE event_id = ANY($1)")
                        .bind(&ids)
                        .fetch_all(&mut **t)
                        .await?;
                known.extend(rows.into_iter().map(|r| r.0));
            }
            super::TxConn::Sqlite(t) => {
                for chunk in events.chunks(200) {
                    let sql = format!(
                        "SELECT event_id FROM ledger_entries WHERE event_id IN ({})",
                        placeholders(1, chunk.len())
                    );
                    let mut q = sqlx::query_as(sqlx::AssertSqlSafe(sql));
                    for e in chunk {
                        q = q.bind(&e.event_id);
                    }
                    let rows: Vec<(String,)> = q.fetch_all(&mut **t).await?;
                    known.extend(rows.into_iter().map(|r| r.0));
                }
            }
        }
        let fresh: Vec<&NewLedgerEvent> = events
            .iter()
            .filter(|e| !known.contains(&e.event_id) && seen_here.insert(e.event_id.as_str()))
            .collect();
        if fresh.is_empty() {
            tx.rollback().await?;
            return Ok(Appended { appended: 0, size: old });
        }
        let recorded_at = now_micros();
        let new = old + fresh.len() as u64;
        tx.ledger_ensure_partitions(&st, new).await?;
        let mut nodes = NodeMap::new();
        let mut rows = Vec::with_capacity(fresh.len());
        for (i, e) in fresh.iter().enumerate() {
            let record = Record {
                v: ledger::ENCODING_VERSION,
                seq: old + i as u64,
                event_id: e.event_id.clone(),
                stream: e.stream.clone(),
                kind: e.kind.clone(),
                tenant: e.tenant.clone(),
                occurred_at: e.occurred_at,
                recorded_at,
                body: e.body.clone(),
            };
            let h = record.leaf_hash();
            nodes.insert((0, record.seq), h);
            rows.push((record, *e, h));
        }
        // Subtree hashes completed by these leaves, from the older ones they pair with.
        let plan = Planner::default();
        ledger::build_nodes(&plan, &mut nodes.clone(), old, new)?;
        let older: Vec<(u32, u64)> = plan
            .into_wanted()
            .into_iter()
            .filter(|(l, i)| !(*l == 0 && *i >= old))
            .collect();
        let fetched = tx.ledger_fetch_nodes(&older).await?;
        let built = ledger::build_nodes(&TxNodes(&fetched), &mut nodes, old, new)?;

        match tx.conn() {
            super::TxConn::Pg(t) => {
                let mut cols: (Vec<i64>, Vec<&str>, Vec<&str>, Vec<&str>, Vec<Option<&str>>) = Default::default();
                let mut more: (
                    Vec<Option<&str>>,
                    Vec<Option<&str>>,
                    Vec<Option<&str>>,
                    Vec<i64>,
                    Vec<i64>,
                ) = Default::default();
                let mut bodies: Vec<String> = Vec::with_capacity(rows.len());
                let mut hashes: Vec<Vec<u8>> = Vec::with_capacity(rows.len());
                for (r, e, h) in &rows {
                    cols.0.push(r.seq as i64);
                    cols.1.push(&r.event_id);
                    cols.2.push(&r.stream);
                    cols.3.push(&r.kind);
                    cols.4.push(r.tenant.as_deref());
                    more.0.push(e.agent_id.as_deref());
                    more.1.push(e.resource_id.as_deref());
                    more.2.push(e.decision.as_deref());
                    more.3.push(r.occurred_at);
                    more.4.push(r.recorded_at);
                    bodies.push(r.body.to_string());
                    hashes.push(h.to_vec());
                }
                sqlx::query(
                    "INSERT INTO ledger_entries (seq, event_id, stream, kind, tenant_id, agent_id, resource_id, decision, occurred_at, recorded_at, body, leaf_hash)
                     SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::bigint[], $10::bigint[], $11::text[], $12::bytea[])",
                )
                .bind(&cols.0)
                .bind(&cols.1)
                .bind(&cols.2)
                .bind(&cols.3)
                .bind(&cols.4)
                .bind(&more.0)
                .bind(&more.1)
                .bind(&more.2)
                .bind(&more.3)
                .bind(&more.4)
                .bind(&bodies)
                .bind(&hashes)
                .execute(&mut **t)
                .await?;
                if !built.is_empty() {
                    let levels: Vec<i32> = built.iter().map(|((l, _), _)| *l as i32).collect();
                    let idxs: Vec<i64> = built.iter().map(|((_, i), _)| *i as i64).collect();
                    let hs: Vec<Vec<u8>> = built.iter().map(|(_, h)| h.to_vec()).collect();
                    sqlx::query(
                        "INSERT INTO ledger_nodes (level, idx, hash) SELECT * FROM UNNEST($1::int[], $2::bigint[], $3::bytea[])",
                    )
                    .bind(&levels)
                    .bind(&idxs)
                    .bind(&hs)
                    .execute(&mut **t)
                    .await?;
                }
            }
            super::TxConn::Sqlite(t) => {
                for chunk in rows.chunks(200) {
                    let n = 12;
                    let values = (0..chunk.len())
                        .map(|i| format!("({})", placeholders(i * n + 1, n)))
                        .collect::<Vec<_>>()
                        .join(", ");
                    let sql = format!("INSERT INTO ledger_entries ({ENTRY_COLS}) VALUES {values}");
                    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
                    for (r, e, h) in chunk {
                        q = q
                            .bind(r.seq as i64)
                            .bind(&r.event_id)
                            .bind(&r.stream)
                            .bind(&r.kind)
                            .bind(&r.tenant)
                            .bind(&e.agent_id)
                            .bind(&e.resource_id)
                            .bind(&e.decision)
                            .bind(r.occurred_at)
                            .bind(r.recorded_at)
                            .bind(r.body.to_string())
                            .bind(h.to_vec());
                    }
                    q.execute(&mut **t).await?;
                }
                for chunk in built.chunks(500) {
                    let values = (0..chunk.len())
                        .map(|i| format!("({})", placeholders(i * 3 + 1, 3)))
                        .collect::<Vec<_>>()
                        .join(", ");
                    let sql = format!("INSERT INTO ledger_nodes (level, idx, hash) VALUES {values}");
                    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
                    for ((l, i), h) in chunk {
                        q = q.bind(*l as i32).bind(*i as i64).bind(h.to_vec());
                    }
                    q.execute(&mut **t).await?;
                }
            }
        }
        tx_exec!(
            tx,
            sqlx::query("UPDATE ledger_state SET size = $1 WHERE id = 1").bind(new as i64)
        )?;
        tx.commit().await?;
        Ok(Appended {
            appended: fresh.len() as u64,
            size: new,
        })
    }

    pub async fn ledger_size(&self) -> Result<u64> {
        let (size,): (i64,) =
            read!(self, p => sqlx::query_as("SELECT size FROM ledger_state WHERE id = 1").fetch_one(p).await)?;
        Ok(size as u64)
    }

    /// Complete-subtree hashes by `(level, index)` (level 0: leaf hashes).
    pub async fn ledger_nodes(&self, wanted: &[(u32, u64)]) -> Result<NodeMap> {
        // Reads go through a transaction-less path on the read pool.
        let mut out = NodeMap::new();
        let leaves: Vec<i64> = wanted.iter().filter(|(l, _)| *l == 0).map(|(_, i)| *i as i64).collect();
        let inner: Vec<(u32, u64)> = wanted.iter().filter(|(l, _)| *l > 0).copied().collect();
        for chunk in leaves.chunks(500) {
            let sql = format!(
                "SELECT seq, leaf_hash FROM ledger_entries WHERE seq IN ({})",
                placeholders(1, chunk.len())
            );
            let rows: Vec<(i64, Vec<u8>)> = read!(self, p => {
                let mut q = sqlx::query_as(sqlx::AssertSqlSafe(sql.clone()));
                for s in chunk {
                    q = q.bind(*s);
                }
                q.fetch_all(p).await
            })?;
            for (s, h) in rows {
                out.insert((0, s as u64), to_hash(&h)?);
            }
        }
        let inner = with_pruned_leaves(inner, &leaves, &out);
        for chunk in inner.chunks(200) {
            let cond = (0..chunk.len())
                .map(|i| format!("(level = ${} AND idx = ${})", 2 * i + 1, 2 * i + 2))
                .collect::<Vec<_>>()
                .join(" OR ");
            let sql = format!("SELECT level, idx, hash FROM ledger_nodes WHERE {cond}");
            let rows: Vec<(i32, i64, Vec<u8>)> = read!(self, p => {
                let mut q = sqlx::query_as(sqlx::AssertSqlSafe(sql.clone()));
                for (l, i) in chunk {
                    q = q.bind(*l as i32).bind(*i as i64);
                }
                q.fetch_all(p).await
            })?;
            for (l, i, h) in rows {
                out.insert((l as u32, i as u64), to_hash(&h)?);
            }
        }
        Ok(out)
    }

    /// The nodes a computation over stored hashes reads, fetched in a few queries.
    pub async fn ledger_nodes_for(&self, plan: Planner) -> Result<NodeMap> {
        self.ledger_nodes(&plan.into_wanted()).await
    }

    /// Root of the ledger at `size` (≤ the current size).
    pub async fn ledger_root(&self, size: u64) -> Result<Hash> {
        let plan = Planner::default();
        ledger::root(&plan, size)?;
        let nodes = self.ledger_nodes_for(plan).await?;
        ledger::root(&nodes, size)
    }

    /// Entries with `start ≤ seq < end`, in order.
    pub async fn ledger_range(&self, start: u64, end: u64) -> Result<Vec<LedgerEntry>> {
        let sql = format!("SELECT {ENTRY_COLS} FROM ledger_entries WHERE seq >= $1 AND seq < $2 ORDER BY seq");
        let rows: Vec<EntryRow> = read!(self, p => sqlx::query_as(sqlx::AssertSqlSafe(sql.clone()))
            .bind(start as i64).bind(end as i64).fetch_all(p).await)?;
        rows.into_iter().map(entry_from_row).collect()
    }

    pub async fn ledger_entry_by_event(&self, event_id: &str) -> Result<Option<LedgerEntry>> {
        let sql = format!("SELECT {ENTRY_COLS} FROM ledger_entries WHERE event_id = $1");
        let row: Option<EntryRow> =
            read!(self, p => sqlx::query_as(sqlx::AssertSqlSafe(sql.clone())).bind(event_id).fetch_optional(p).await)?;
        row.map(entry_from_row).transpose()
    }

    /// Entries matching `f`, in ledger order, at most `f.limit` (1..=10 000).
    pub async fn ledger_query(&self, f: &LedgerFilter) -> Result<Vec<LedgerEntry>> {
        let mut conds: Vec<String> = Vec::new();
        let mut texts: Vec<String> = Vec::new();
        let mut ints: Vec<i64> = Vec::new();
        // Text parameters first ($1..), then integers.
        for (col, v) in [
            ("tenant_id", &f.tenant),
            ("agent_id", &f.agent_id),
            ("resource_id", &f.resource_id),
            ("decision", &f.decision),
            ("kind", &f.kind),
        ] {
            if let Some(v) = v {
                texts.push(v.clone());
                conds.push(format!("{col} = ${}", texts.len()));
            }
        }
        let base = texts.len();
        for (cond, v) in [
            ("occurred_at >= ", f.since),
            ("occurred_at < ", f.until),
            ("seq > ", f.after_seq.map(|s| s as i64)),
        ] {
            if let Some(v) = v {
                ints.push(v);
                conds.push(format!("{cond}${}", base + ints.len()));
            }
        }
        let limit = f.limit.clamp(1, 10_000);
        let filter = if conds.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conds.join(" AND "))
        };
        let sql = format!("SELECT {ENTRY_COLS} FROM ledger_entries {filter} ORDER BY seq LIMIT {limit}");
        let rows: Vec<EntryRow> = read!(self, p => {
            let mut q = sqlx::query_as(sqlx::AssertSqlSafe(sql.clone()));
            for t in &texts {
                q = q.bind(t);
            }
            for i in &ints {
                q = q.bind(*i);
            }
            q.fetch_all(p).await
        })?;
        rows.into_iter().map(entry_from_row).collect()
    }

    /// `[first, end)`: the seq range of entries recorded in `[since, until)` (µs).
    pub async fn ledger_seq_range(&self, since: i64, until: i64) -> Result<(u64, u64)> {
        let (lo, hi): (Option<i64>, Option<i64>) = read!(self, p => sqlx::query_as(
            "SELECT MIN(seq), MAX(seq) FROM ledger_entries WHERE recorded_at >= $1 AND recorded_at < $2")
            .bind(since).bind(until).fetch_one(p).await)?;
        Ok(match (lo, hi) {
            (Some(lo), Some(hi)) => (lo as u64, hi as u64 + 1),
            _ => (0, 0),
        })
    }

    /// How far retention has pruned: entries below this sequence number are gone, summarized
    /// by the signed head of exactly this size (0: nothing pruned).
    pub async fn ledger_pruned_below(&self) -> Result<u64> {
        let (p,): (i64,) =
            read!(self, p => sqlx::query_as("SELECT pruned_below FROM ledger_state WHERE id = 1").fetch_one(p).await)?;
        Ok(p as u64)
    }

    /// Where retention may cut for entries recorded before `cutoff` (µs): the largest signed
    /// head size not beyond the first entry recorded at or after the cutoff (so every entry
    /// dropped is old, and the head summarizes exactly what is dropped).
    pub async fn ledger_retention_boundary(&self, cutoff: i64) -> Result<u64> {
        let (young,): (Option<i64>,) = read!(self, p => sqlx::query_as(
            "SELECT MIN(seq) FROM ledger_entries WHERE recorded_at >= $1").bind(cutoff).fetch_one(p).await)?;
        let limit = match young {
            Some(s) => s,
            None => self.ledger_size().await? as i64,
        };
        let (b,): (Option<i64>,) = read!(self, p => sqlx::query_as(
            "SELECT MAX(tree_size) FROM ledger_heads WHERE tree_size <= $1").bind(limit).fetch_one(p).await)?;
        Ok(b.unwrap_or(0) as u64)
    }

    /// Retention: drop the entries below `below` — which must be the size of a signed head:
    /// that head stays as their summary — with every subtree hash inside them except the
    /// prefix's own ([`ledger::prefix_blocks`]), which later proofs and roots still read. Every
    /// proof about what remains stays valid and servable. Returns the entries dropped.
    pub async fn ledger_prune(&self, below: u64) -> Result<u64> {
        let mut tx = self.begin().await?;
        let st = tx.ledger_state_locked().await?;
        let (size, pruned) = (st.size, st.pruned_below);
        if below <= pruned {
            tx.rollback().await?;
            return Ok(0);
        }
        if below > size {
            return Err(Error::validation(format!(
                "cannot prune below {below}: the ledger holds {size} entries"
            )));
        }
        let head: Option<(i64,)> = tx!(tx, c => sqlx::query_as("SELECT tree_size FROM ledger_heads WHERE tree_size = $1")
            .bind(below as i64).fetch_optional(c).await)?;
        if head.is_none() {
            return Err(Error::validation(format!(
                "retention cuts only at a signed head's size, and none has size {below}"
            )));
        }
        let keep = ledger::prefix_blocks(below);
        if let Some(&(0, leaf)) = keep.last() {
            let (h,): (Vec<u8>,) = tx!(tx, c => sqlx::query_as("SELECT leaf_hash FROM ledger_entries WHERE seq = $1")
                .bind(leaf as i64).fetch_one(c).await)?;
            tx_exec!(
                tx,
                sqlx::query(
                    "INSERT INTO ledger_nodes (level, idx, hash) VALUES (0, $1, $2) ON CONFLICT (level, idx) DO NOTHING"
                )
                .bind(leaf as i64)
                .bind(h)
            )?;
        }
        // Whole partitions below the cut are dropped; the rest of the prefix is deleted.
        if let (Some(first), Some(end)) = (
            pruned.checked_div(st.partition_size),
            below.checked_div(st.partition_size),
        ) {
            for n in first..end {
                let sql = format!("DROP TABLE IF EXISTS {}", partition_name(n));
                tx_exec!(tx, sqlx::query(sqlx::AssertSqlSafe(sql.clone())))?;
            }
        }
        tx_exec!(
            tx,
            sqlx::query("DELETE FROM ledger_entries WHERE seq < $1").bind(below as i64)
        )?;
        // Subtrees wholly inside the prefix, except the prefix's own blocks.
        let except = (0..keep.len())
            .map(|i| format!(" AND NOT (level = ${} AND idx = ${})", 2 * i + 2, 2 * i + 3))
            .collect::<String>();
        let sql = format!("DELETE FROM ledger_nodes WHERE ((idx + 1) << level) <= $1{except}");
        tx_exec!(tx, {
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql.clone())).bind(below as i64);
            for (l, i) in &keep {
                q = q.bind(*l as i32).bind(*i as i64);
            }
            q
        })?;
        tx_exec!(
            tx,
            sqlx::query("UPDATE ledger_state SET pruned_below = $1 WHERE id = 1").bind(below as i64)
        )?;
        tx.commit().await?;
        Ok(below - pruned)
    }

    /// Entries per partition of the ledger (Postgres): `entries` until the first partition
    /// exists, fixed after. Returns the size in effect (0: this backend does not partition).
    pub async fn ledger_set_partition_size(&self, entries: u64) -> Result<u64> {
        if self.kind() != DbKind::Postgres {
            return Ok(0);
        }
        super::write_exec!(
            self,
            sqlx::query("UPDATE ledger_state SET partition_size = $1 WHERE id = 1 AND partitions_below = 0")
                .bind(entries as i64)
        )?;
        let (ps,): (i64,) = read!(self, p => sqlx::query_as("SELECT partition_size FROM ledger_state WHERE id = 1").fetch_one(p).await)?;
        Ok(ps as u64)
    }

    /// The partitions holding the ledger's entries, as `[first seq, end)` ranges in order
    /// (empty on a backend that does not partition).
    pub async fn ledger_partitions(&self) -> Result<Vec<(u64, u64)>> {
        let super::Backend::Pg(pool) = self.backend() else {
            return Ok(Vec::new());
        };
        let (ps,): (i64,) = sqlx::query_as("SELECT partition_size FROM ledger_state WHERE id = 1")
            .fetch_one(pool)
            .await?;
        let names: Vec<(String,)> = sqlx::query_as(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'ledger_entries'::regclass",
        )
        .fetch_all(pool)
        .await?;
        let ps = ps as u64;
        let mut out: Vec<(u64, u64)> = names
            .iter()
            .filter_map(|(n,)| n.strip_prefix("ledger_entries_p")?.parse::<u64>().ok())
            .map(|n| (n * ps, (n + 1) * ps))
            .collect();
        out.sort_unstable();
        Ok(out)
    }

    pub async fn ledger_insert_head(&self, h: &TreeHead) -> Result<bool> {
        let sql = "INSERT INTO ledger_heads (tree_size, root_hash, signed_at, key_id, signature) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tree_size) DO NOTHING";
        let n = super::write_exec!(
            self,
            sqlx::query(sql)
                .bind(h.tree_size as i64)
                .bind(&h.root_hash)
                .bind(h.timestamp)
                .bind(&h.key_id)
                .bind(&h.signature)
        )?;
        Ok(n == 1)
    }

    /// Signed heads with `from ≤ tree_size ≤ to`, by size, at most `limit`.
    pub async fn ledger_heads(&self, from: u64, to: u64, limit: u64) -> Result<Vec<TreeHead>> {
        let sql = format!(
            "SELECT tree_size, root_hash, signed_at, key_id, signature FROM ledger_heads WHERE tree_size >= $1 AND tree_size <= $2 ORDER BY tree_size LIMIT {}",
            limit.clamp(1, 100_000)
        );
        let rows: Vec<(i64, String, i64, String, String)> = read!(self, p => sqlx::query_as(sqlx::AssertSqlSafe(sql.clone())).bind(from as i64).bind(to.min(i64::MAX as u64) as i64).fetch_all(p).await)?;
        Ok(rows.into_iter().map(head_from_row).collect())
    }

    pub async fn ledger_latest_head(&self) -> Result<Option<TreeHead>> {
        let row: Option<(i64, String, i64, String, String)> = read!(self, p => sqlx::query_as(
            "SELECT tree_size, root_hash, signed_at, key_id, signature FROM ledger_heads ORDER BY tree_size DESC LIMIT 1")
            .fetch_optional(p).await)?;
        Ok(row.map(head_from_row))
    }

    /// The first signed head at or after `size`.
    pub async fn ledger_head_covering(&self, size: u64) -> Result<Option<TreeHead>> {
        let row: Option<(i64, String, i64, String, String)> = read!(self, p => sqlx::query_as(
            "SELECT tree_size, root_hash, signed_at, key_id, signature FROM ledger_heads WHERE tree_size >= $1 ORDER BY tree_size LIMIT 1")
            .bind(size as i64).fetch_optional(p).await)?;
        Ok(row.map(head_from_row))
    }

    /// The active head-signing key, created (and sealed) on first use.
    pub async fn ledger_signer(&self, seal_ring: &KeyRing) -> Result<LedgerSigner> {
        if let Some(s) = self.ledger_active_signer(seal_ring).await? {
            return Ok(s);
        }
        let der = LedgerSigner::generate_pkcs8()?;
        let signer = LedgerSigner::from_pkcs8(&der)?;
        let kid = signer.public.key_id.clone();
        let s = seal(seal_ring, &ledger_key_aad(&kid), &der)?;
        let point = hex::encode(&signer.public.point);
        let mut tx = self.begin().await?;
        // Only one active key: if another instance won the race, use its key.
        let existing: Option<(String,)> = tx!(tx, c => sqlx::query_as("SELECT key_id FROM ledger_keys WHERE state = 'active'").fetch_optional(c).await)?;
        if existing.is_none() {
            tx_exec!(tx, sqlx::query(
                "INSERT INTO ledger_keys (key_id, public_key, priv_kek_id, priv_wrapped, priv_nonce, priv_sealed, state, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, 'active', $7)")
                .bind(&kid).bind(&point).bind(&s.kek_id).bind(&s.wrapped_dek).bind(&s.nonce).bind(&s.ciphertext).bind(now_micros()))?;
        }
        tx.commit().await?;
        self.ledger_active_signer(seal_ring)
            .await?
            .ok_or_else(|| Error::internal("no active ledger key after creating one"))
    }

    async fn ledger_active_signer(&self, seal_ring: &KeyRing) -> Result<Option<LedgerSigner>> {
        let row: Option<(String, String, Vec<u8>, Vec<u8>, Vec<u8>)> = read!(self, p => sqlx::query_as(
            "SELECT key_id, priv_kek_id, priv_wrapped, priv_nonce, priv_sealed FROM ledger_keys WHERE state = 'active' ORDER BY created_at DESC LIMIT 1")
            .fetch_optional(p).await)?;
        let Some((kid, kek_id, wrapped_dek, nonce, ciphertext)) = row else {
            return Ok(None);
        };
        let sealed = Sealed {
            kek_id,
            wrapped_dek,
            nonce,
            ciphertext,
        };
        let der = open(seal_ring, &ledger_key_aad(&kid), &sealed)?;
        let signer = LedgerSigner::from_pkcs8(der.expose())?;
        if signer.public.key_id != kid {
            return Err(Error::new(ErrorCode::Internal, "a ledger key does not match its id"));
        }
        Ok(Some(signer))
    }

    /// Every head-signing public key (active and retired: old heads stay verifiable).
    pub async fn ledger_public_keys(&self) -> Result<Vec<(LedgerPublicKey, String)>> {
        let rows: Vec<(String, String, String)> = read!(self, p => sqlx::query_as(
            "SELECT key_id, public_key, state FROM ledger_keys ORDER BY created_at").fetch_all(p).await)?;
        rows.into_iter()
            .map(|(kid, point, state)| {
                let point = hex::decode(&point).map_err(|_| Error::internal("bad ledger public key"))?;
                let k = LedgerPublicKey::from_point(point)?;
                if k.key_id != kid {
                    return Err(Error::internal("a ledger public key does not match its id"));
                }
                Ok((k, state))
            })
            .collect()
    }
}

fn head_from_row(r: (i64, String, i64, String, String)) -> TreeHead {
    TreeHead {
        tree_size: r.0 as u64,
        root_hash: r.1,
        timestamp: r.2,
        key_id: r.3,
        signature: r.4,
    }
}

fn ledger_key_aad(kid: &str) -> Vec<u8> {
    format!("caracal-ledger-key|{kid}").into_bytes()
}
