//! The evidence API under `/v1/ledger/`.
//!
//! Public (no tenant data): signing keys, signed tree heads, consistency proofs. With an admin
//! token holding the `audit` scope: entries (a tenant token sees only its tenant's), inclusion
//! proofs, and exports. An export is JSON Lines that `caracal merkle verify-range` checks
//! offline: the entries of a sequence range (other tenants' entries reduced to their leaf
//! hash), every signed head over the range, and the subtree hashes outside it that recomputing
//! those heads' roots needs.

use std::fmt::Write as _;
use std::sync::Arc;

use caracal_shared::error::{Error, ErrorCode, Result};
use caracal_shared::http::admin::{Caller, authenticate};
use caracal_shared::http::{ApiRequest, Response, Router, ok, text_response};
use caracal_shared::ledger::{self, Planner, RangeProof, TreeHead, to_hex};
use caracal_shared::store::admin::AdminScope;
use caracal_shared::store::ledger::{LedgerEntry, LedgerFilter};
use http::StatusCode;
use serde_json::{Value, json};

use crate::State;

type S = Arc<State>;

pub fn router() -> Router<State> {
    Router::new()
        .get("/v1/ledger/keys", keys)
        .get("/v1/ledger/heads", heads)
        .post("/v1/ledger/heads", sign)
        .get("/v1/ledger/heads/latest", latest)
        .get("/v1/ledger/heads/{tree_size}", head_at)
        .get("/v1/ledger/proofs/consistency", consistency)
        .get("/v1/ledger/proofs/inclusion", inclusion)
        .get("/v1/ledger/entries", entries)
        .get("/v1/ledger/entries/{event_id}", entry)
        .get("/v1/ledger/export", export)
        .get("/v1/ledger/retention", retention)
}

/// Largest export (entries) in one response; page with `start`/`end`.
pub const MAX_EXPORT: u64 = 500_000;

async fn auditor(s: &State, r: &ApiRequest) -> Result<Caller> {
    authenticate(&s.rt.store, &s.pepper, r, AdminScope::Audit).await
}

fn u64_param(r: &ApiRequest, name: &str) -> Result<Option<u64>> {
    r.query_param(name)
        .map(|v| {
            v.parse::<u64>()
                .map_err(|_| Error::validation(format!("{name} must be a non-negative integer")))
        })
        .transpose()
}

/// A time: RFC 3339 (`2026-11-26T10:00:00Z`), a date (`2026-11-26`, UTC midnight) or µs since
/// the epoch.
pub fn parse_time(name: &str, v: &str) -> Result<i64> {
    if let Ok(us) = v.parse::<i64>() {
        return Ok(us);
    }
    if let Ok(t) = v.parse::<jiff::Timestamp>() {
        return Ok(t.as_microsecond());
    }
    if let Ok(d) = v.parse::<jiff::civil::Date>()
        && let Ok(z) = d.to_zoned(jiff::tz::TimeZone::UTC)
    {
        return Ok(z.timestamp().as_microsecond());
    }
    Err(Error::validation(format!(
        "{name} must be an RFC 3339 time, a date (YYYY-MM-DD) or microseconds since the epoch"
    )))
}

fn time_param(r: &ApiRequest, name: &str) -> Result<Option<i64>> {
    r.query_param(name).map(|v| parse_time(name, &v)).transpose()
}

fn head_json(h: &TreeHead) -> Value {
    json!({
        "tree_size": h.tree_size,
        "root_hash": h.root_hash,
        "timestamp": h.timestamp,
        "key_id": h.key_id,
        "signature": h.signature,
        "checkpoint": h.checkpoint(),
    })
}

fn entry_json(e: &LedgerEntry) -> Value {
    json!({
        "seq": e.record.seq,
        "event_id": e.record.event_id,
        "stream": e.record.stream,
        "kind": e.record.kind,
        "tenant": e.record.tenant,
        "agent_id": e.agent_id,
        "resource_id": e.resource_id,
        "decision": e.decision,
        "occurred_at": e.record.occurred_at,
        "recorded_at": e.record.recorded_at,
        "body": e.record.body,
        "leaf_hash": to_hex(&e.leaf_hash),
    })
}

/// Whether the caller may see this entry's content.
fn visible(c: &Caller, e: &LedgerEntry) -> bool {
    match c.tenant {
        None => true,
        Some(t) => e.record.tenant.as_deref() == Some(t.to_string().as_str()),
    }
}

async fn keys(s: S, _r: ApiRequest) -> Result<Response> {
    let keys = s.rt.store.ledger_public_keys().await?;
    ok(&json!({
        "items": keys.iter().map(|(k, state)| json!({
            "key_id": k.key_id,
            "alg": "ES256",
            "state": state,
            "public_key": hex::encode(&k.point),
            "pem": k.to_pem(),
        })).collect::<Vec<_>>(),
    }))
}

async fn latest(s: S, _r: ApiRequest) -> Result<Response> {
    match s.rt.store.ledger_latest_head().await? {
        Some(h) => ok(&head_json(&h)),
        None => Err(Error::not_found("tree head (the ledger is empty)")),
    }
}

async fn head_at(s: S, r: ApiRequest) -> Result<Response> {
    let size: u64 = r
        .param("tree_size")?
        .parse()
        .map_err(|_| Error::validation("tree_size must be a positive integer"))?;
    let heads = s.rt.store.ledger_heads(size, size, 1).await?;
    match heads.first() {
        Some(h) => ok(&head_json(h)),
        None => Err(Error::not_found("signed tree head of that size")),
    }
}

async fn heads(s: S, r: ApiRequest) -> Result<Response> {
    let from = u64_param(&r, "from_size")?.unwrap_or(0);
    let to = u64_param(&r, "to_size")?.unwrap_or(u64::MAX);
    let limit = u64_param(&r, "limit")?.unwrap_or(100).clamp(1, 1000);
    let hs = s.rt.store.ledger_heads(from, to, limit).await?;
    ok(&json!({ "items": hs.iter().map(head_json).collect::<Vec<_>>() }))
}

/// What retention has dropped, and the signed head that summarizes it.
async fn retention(s: S, _r: ApiRequest) -> Result<Response> {
    let store = &s.rt.store;
    let below = store.ledger_pruned_below().await?;
    let summary = if below > 0 {
        store.ledger_heads(below, below, 1).await?.into_iter().next()
    } else {
        None
    };
    ok(&json!({
        "pruned_below": below,
        "summary_head": summary.as_ref().map(head_json),
        "retention_seconds": s.rt.config.audit.retention.map(|d| d.as_secs()),
        "partitions": store.ledger_partitions().await?.iter().map(|(lo, hi)| json!({"from_seq": lo, "to_seq": hi})).collect::<Vec<_>>(),
    }))
}

/// Sign a head now (when the ledger grew since the last one).
async fn sign(s: S, r: ApiRequest) -> Result<Response> {
    auditor(&s, &r).await?;
    match s.sign_head().await? {
        Some(h) => ok(&head_json(&h)),
        None => Err(Error::not_found("tree head (the ledger is empty)")),
    }
}

async fn consistency(s: S, r: ApiRequest) -> Result<Response> {
    let first = u64_param(&r, "first")?.ok_or_else(|| Error::validation("first is required"))?;
    let second = u64_param(&r, "second")?.ok_or_else(|| Error::validation("second is required"))?;
    let size = s.rt.store.ledger_size().await?;
    if first == 0 || first > second || second > size {
        return Err(Error::validation(format!(
            "a consistency proof needs 0 < first ≤ second ≤ {size} (the ledger's size)"
        )));
    }
    let pruned = s.rt.store.ledger_pruned_below().await?;
    if first < pruned {
        return Err(Error::new(
            ErrorCode::Gone,
            format!(
                "entries below #{pruned} were dropped by retention: consistency proofs start at size {pruned}, whose signed head summarizes them"
            ),
        ));
    }
    let plan = Planner::default();
    ledger::consistency_proof(&plan, first, second)?;
    let nodes = s.rt.store.ledger_nodes_for(plan).await?;
    let proof = ledger::consistency_proof(&nodes, first, second)?;
    ok(&json!({
        "first": first,
        "second": second,
        "proof": proof.iter().map(to_hex).collect::<Vec<_>>(),
    }))
}

/// Inclusion of an entry (by `event_id` or `seq`) in the head of `tree_size` (default: the
/// latest signed head).
async fn inclusion(s: S, r: ApiRequest) -> Result<Response> {
    let c = auditor(&s, &r).await?;
    let e = match (r.query_param("event_id"), u64_param(&r, "seq")?) {
        (Some(id), _) => s.rt.store.ledger_entry_by_event(&id).await?,
        (None, Some(seq)) => s.rt.store.ledger_range(seq, seq + 1).await?.into_iter().next(),
        (None, None) => return Err(Error::validation("event_id or seq is required")),
    };
    let e = e
        .filter(|e| visible(&c, e))
        .ok_or_else(|| Error::not_found("ledger entry"))?;
    inclusion_body(&s, &e, u64_param(&r, "tree_size")?)
        .await
        .and_then(|v| ok(&v))
}

async fn inclusion_body(s: &State, e: &LedgerEntry, tree_size: Option<u64>) -> Result<Value> {
    let head = match tree_size {
        Some(n) => s.rt.store.ledger_heads(n, n, 1).await?.into_iter().next(),
        None => s.rt.store.ledger_latest_head().await?,
    };
    let head = head
        .filter(|h| h.tree_size > e.record.seq)
        .ok_or_else(|| Error::new(ErrorCode::NotFound, "no signed head covers this entry yet"))?;
    let plan = Planner::default();
    ledger::inclusion_proof(&plan, e.record.seq, head.tree_size)?;
    let nodes = s.rt.store.ledger_nodes_for(plan).await?;
    let path = ledger::inclusion_proof(&nodes, e.record.seq, head.tree_size)?;
    Ok(json!({
        "leaf_index": e.record.seq,
        "leaf_hash": to_hex(&e.leaf_hash),
        "tree_size": head.tree_size,
        "audit_path": path.iter().map(to_hex).collect::<Vec<_>>(),
        "head": head_json(&head),
    }))
}

fn filter_from(r: &ApiRequest, c: &Caller) -> Result<LedgerFilter> {
    Ok(LedgerFilter {
        tenant: c.tenant.map(|t| t.to_string()),
        agent_id: r.query_param("agent_id"),
        resource_id: r.query_param("resource_id"),
        decision: r.query_param("decision"),
        kind: r.query_param("kind"),
        since: time_param(r, "since")?,
        until: time_param(r, "until")?,
        after_seq: u64_param(r, "after_seq")?,
        limit: u64_param(r, "limit")?.unwrap_or(100).clamp(1, 10_000),
    })
}

async fn entries(s: S, r: ApiRequest) -> Result<Response> {
    let c = auditor(&s, &r).await?;
    let f = filter_from(&r, &c)?;
    let items = s.rt.store.ledger_query(&f).await?;
    let next = (items.len() as u64 == f.limit)
        .then(|| items.last().map(|e| e.record.seq))
        .flatten();
    ok(&json!({
        "items": items.iter().map(entry_json).collect::<Vec<_>>(),
        "next_after_seq": next,
    }))
}

async fn entry(s: S, r: ApiRequest) -> Result<Response> {
    let c = auditor(&s, &r).await?;
    let e =
        s.rt.store
            .ledger_entry_by_event(r.param("event_id")?)
            .await?
            .filter(|e| visible(&c, e))
            .ok_or_else(|| Error::not_found("ledger entry"))?;
    let proof = inclusion_body(&s, &e, None).await.ok();
    ok(&json!({ "entry": entry_json(&e), "inclusion": proof }))
}

/// JSON Lines: `start`/`end` (sequence numbers) or `since`/`until` (times of recording).
/// `sign=true` signs a head first so the newest entries are covered.
async fn export(s: S, r: ApiRequest) -> Result<Response> {
    let c = auditor(&s, &r).await?;
    let store = &s.rt.store;
    if r.query_param("sign").as_deref() == Some("true") {
        s.sign_head().await?;
    }
    let size = store.ledger_size().await?;
    let pruned = store.ledger_pruned_below().await?;
    let (start, end) = match (u64_param(&r, "start")?, u64_param(&r, "end")?) {
        (Some(a), b) => (a, b.unwrap_or(size).min(size)),
        (None, Some(b)) => (0, b.min(size)),
        (None, None) => {
            let since = time_param(&r, "since")?.unwrap_or(0);
            let until = time_param(&r, "until")?.unwrap_or(i64::MAX);
            store.ledger_seq_range(since, until).await?
        }
    };
    if start > end {
        return Err(Error::validation("start must not be after end"));
    }
    // Entries dropped by retention: the export starts where the ledger does, with the head
    // that summarizes the rest.
    let (start, end) = (start.max(pruned), end.max(pruned));
    if end - start > MAX_EXPORT {
        return Err(Error::validation(format!(
            "at most {MAX_EXPORT} entries per export; page with start/end"
        )));
    }
    let latest = store.ledger_latest_head().await?;
    // Heads over the range (from one of the range's start: it proves the hashes left of the
    // range, and after retention it is the summary of what was dropped), and the first head at
    // or after its end (which proves all of it).
    let mut heads = store.ledger_heads(start.max(1), end, 100_000).await?;
    let covering = store.ledger_head_covering(end.max(1)).await?;
    if let Some(h) = &covering
        && heads.last().map(|x| x.tree_size) != Some(h.tree_size)
    {
        heads.push(h.clone());
    }
    let mut out = String::new();
    let line = |out: &mut String, v: Value| {
        let _ = writeln!(out, "{v}");
    };
    line(
        &mut out,
        json!({
            "type": "export",
            "format": "caracal-ledger-export/v1",
            "start": start,
            "end": end,
            "ledger_size": size,
            "pruned_below": pruned,
            "latest_head_size": latest.as_ref().map(|h| h.tree_size),
            "tenant": c.tenant,
            "generated_at": caracal_shared::time::now_micros(),
        }),
    );
    for (k, state) in store.ledger_public_keys().await? {
        line(
            &mut out,
            json!({ "type": "key", "key_id": k.key_id, "state": state, "pem": k.to_pem() }),
        );
    }
    for h in &heads {
        let mut v = head_json(h);
        v["type"] = json!("head");
        line(&mut out, v);
    }
    // Subtree hashes outside the range for every head over it (heads inside the range need
    // only the left side; the covering head also the right side). A head beyond what the
    // ledger holds (tail truncated) cannot be proven: its proof is omitted and the verifier
    // reports it.
    for h in &heads {
        let hend = end.min(h.tree_size);
        let proof = if h.tree_size <= size {
            let wanted = ledger::range_proof_nodes(start, hend, h.tree_size)?;
            let nodes = store.ledger_nodes(&wanted).await?;
            let mut list = Vec::with_capacity(wanted.len());
            let mut complete = true;
            for (l, i) in wanted {
                match nodes.get(&(l, i)) {
                    Some(hash) => list.push((l, i, to_hex(hash))),
                    None => complete = false,
                }
            }
            complete.then_some(RangeProof {
                start,
                end: hend,
                size: h.tree_size,
                nodes: list,
            })
        } else {
            None
        };
        line(
            &mut out,
            json!({ "type": "range_proof", "tree_size": h.tree_size, "proof": proof }),
        );
    }
    let mut from = start;
    while from < end {
        let to = (from + 10_000).min(end);
        for e in store.ledger_range(from, to).await? {
            if visible(&c, &e) {
                line(
                    &mut out,
                    json!({ "type": "entry", "record": e.record, "leaf_hash": to_hex(&e.leaf_hash) }),
                );
            } else {
                line(
                    &mut out,
                    json!({ "type": "redacted", "seq": e.record.seq, "leaf_hash": to_hex(&e.leaf_hash) }),
                );
            }
        }
        from = to;
    }
    Ok(text_response(StatusCode::OK, "application/x-ndjson", out))
}
