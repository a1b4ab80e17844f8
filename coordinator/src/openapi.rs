//! The OpenAPI 3.1 document of the coordinator API, served at `/v1/openapi.json`. A test
//! checks it lists exactly the routes the router serves.

use serde_json::{Map, Value, json};

fn r(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}
fn st() -> Value {
    json!({ "type": "string" })
}
fn int() -> Value {
    json!({ "type": "integer", "format": "int64" })
}
fn id(prefix: &str) -> Value {
    json!({ "type": "string", "pattern": format!("^{prefix}_[0-9a-f]{{32}}$") })
}
fn en(v: &[&str]) -> Value {
    json!({ "type": "string", "enum": v })
}
fn nullable(v: Value) -> Value {
    json!({ "oneOf": [v, { "type": "null" }] })
}
fn obj(props: &[(&str, Value)], required: &[&str]) -> Value {
    let mut p = Map::new();
    for (k, v) in props {
        p.insert(k.to_string(), v.clone());
    }
    json!({ "type": "object", "properties": p, "required": required, "additionalProperties": false })
}
fn open(props: &[(&str, Value)]) -> Value {
    let mut p = Map::new();
    for (k, v) in props {
        p.insert(k.to_string(), v.clone());
    }
    json!({ "type": "object", "properties": p })
}
fn page(item: &str) -> Value {
    open(&[
        ("items", json!({ "type": "array", "items": r(item) })),
        ("next_cursor", nullable(st())),
    ])
}

/// (method, path, summary, who, request body, success status, response)
type Op = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    Option<Value>,
    u16,
    Value,
);

fn operations() -> Vec<Op> {
    let holder = obj(&[("holder", st()), ("generation", int())], &["holder", "generation"]);
    let end = obj(&[("reason", st())], &[]);
    vec![
        (
            "get",
            "/v1/openapi.json",
            "This document",
            "none",
            None,
            200,
            json!({ "type": "object" }),
        ),
        (
            "post",
            "/v1/sessions",
            "Start a session for the calling agent",
            "agent",
            Some(obj(
                &[
                    ("ttl_seconds", int()),
                    ("heartbeat_timeout_seconds", int()),
                    ("labels", json!({ "type": "object", "additionalProperties": st() })),
                    ("parent_session", id("ses")),
                ],
                &[],
            )),
            201,
            r("Session"),
        ),
        (
            "get",
            "/v1/sessions",
            "List sessions (filters: status, agent_id, parent_session)",
            "read",
            None,
            200,
            page("Session"),
        ),
        (
            "get",
            "/v1/sessions/{session_id}",
            "Read a session",
            "read",
            None,
            200,
            r("Session"),
        ),
        (
            "post",
            "/v1/sessions/{session_id}/heartbeat",
            "Record a heartbeat",
            "agent",
            None,
            200,
            json!({ "type": "object" }),
        ),
        (
            "post",
            "/v1/sessions/{session_id}/complete",
            "End a session as completed",
            "agent or write",
            Some(end.clone()),
            200,
            r("Session"),
        ),
        (
            "post",
            "/v1/sessions/{session_id}/fail",
            "End a session as failed",
            "agent or write",
            Some(end.clone()),
            200,
            r("Session"),
        ),
        (
            "post",
            "/v1/sessions/{session_id}/revoke",
            "Revoke a session and everything it started",
            "agent or write",
            Some(end.clone()),
            200,
            r("RevocationOutcome"),
        ),
        ("get", "/v1/leases", "List leases", "read", None, 200, page("Lease")),
        (
            "get",
            "/v1/leases/{name}",
            "Read a lease",
            "read",
            None,
            200,
            r("Lease"),
        ),
        (
            "post",
            "/v1/leases/{name}/acquire",
            "Acquire (or renew, for its holder) a lease",
            "agent",
            Some(obj(
                &[("holder", st()), ("ttl_seconds", json!({ "type": "number" }))],
                &["holder"],
            )),
            200,
            r("Lease"),
        ),
        (
            "post",
            "/v1/leases/{name}/renew",
            "Renew a held lease",
            "agent",
            Some(holder.clone()),
            200,
            r("Lease"),
        ),
        (
            "post",
            "/v1/leases/{name}/release",
            "Release a held lease",
            "agent",
            Some(holder),
            200,
            r("Lease"),
        ),
        (
            "post",
            "/v1/leases/{name}/check",
            "Fence check: is this generation current?",
            "read or agent",
            Some(obj(&[("generation", int())], &["generation"])),
            200,
            json!({ "type": "object" }),
        ),
        (
            "post",
            "/v1/invocations",
            "Ask another agent to do work (Idempotency-Key honoured)",
            "agent",
            Some(obj(
                &[
                    ("target", id("agt")),
                    ("operation", st()),
                    ("input", json!({})),
                    ("deadline_seconds", int()),
                    ("max_attempts", int()),
                    ("backoff_ms", int()),
                    ("idempotency_key", st()),
                    ("session_id", id("ses")),
                ],
                &["target", "operation"],
            )),
            201,
            r("Invocation"),
        ),
        (
            "get",
            "/v1/invocations",
            "List invocations (filters: status, target, caller)",
            "read",
            None,
            200,
            page("Invocation"),
        ),
        (
            "post",
            "/v1/invocations/claim",
            "Take the next due invocation addressed to the calling agent (204: none)",
            "agent",
            Some(obj(&[("worker", st())], &["worker"])),
            200,
            r("Invocation"),
        ),
        (
            "get",
            "/v1/invocations/{invocation_id}",
            "Read an invocation",
            "read",
            None,
            200,
            r("Invocation"),
        ),
        (
            "post",
            "/v1/invocations/{invocation_id}/complete",
            "Report success",
            "agent (target)",
            Some(obj(&[("worker", st()), ("result", json!({}))], &["worker"])),
            200,
            r("Invocation"),
        ),
        (
            "post",
            "/v1/invocations/{invocation_id}/fail",
            "Report failure (retried when retryable and attempts remain)",
            "agent (target)",
            Some(obj(
                &[
                    ("worker", st()),
                    ("error", st()),
                    ("retryable", json!({ "type": "boolean" })),
                ],
                &["worker", "error"],
            )),
            200,
            r("Invocation"),
        ),
        (
            "post",
            "/v1/invocations/{invocation_id}/cancel",
            "Cancel an open invocation",
            "agent (caller) or write",
            Some(obj(&[("reason", st())], &[])),
            200,
            r("Invocation"),
        ),
        (
            "post",
            "/v1/revocations",
            "Revoke agents, sessions, delegations, credentials, mandates, revocation ids, the tenant or resources, and everything they started",
            "write",
            Some(open(&[
                ("kind", r("TargetKind")),
                ("value", st()),
                (
                    "targets",
                    json!({ "type": "array", "items": obj(&[("kind", r("TargetKind")), ("value", st())], &["kind", "value"]) }),
                ),
                ("reason", st()),
            ])),
            200,
            r("RevocationOutcome"),
        ),
        (
            "get",
            "/v1/limits",
            "The tenant's coordinator limits",
            "read",
            None,
            200,
            r("Limits"),
        ),
        (
            "put",
            "/v1/limits",
            "Set the tenant's coordinator limits (null: the configured default)",
            "write",
            Some(obj(
                &[
                    ("max_active_sessions", nullable(int())),
                    ("max_leases", nullable(int())),
                    ("max_open_invocations", nullable(int())),
                ],
                &[],
            )),
            200,
            r("Limits"),
        ),
    ]
}

fn schemas() -> Value {
    json!({
        "Error": open(&[("error", open(&[("code", st()), ("message", st()), ("details", json!({})), ("request_id", st())]))]),
        "TargetKind": en(&["agent", "session", "delegation", "credential", "mandate", "revocation_id", "tenant", "resource"]),
        "Session": open(&[("id", id("ses")), ("tenant_id", id("ten")), ("agent_id", id("agt")), ("mandate_id", id("mdt")),
            ("credential", nullable(st())), ("revocation_ids", json!({ "type": "array", "items": st() })),
            ("parent_session", nullable(id("ses"))), ("status", en(&["active", "completed", "failed", "expired", "revoked"])),
            ("labels", json!({ "type": "object" })), ("started_at", int()), ("heartbeat_at", int()), ("heartbeat_timeout_ms", int()),
            ("expires_at", int()), ("ended_at", nullable(int())), ("end_reason", nullable(st())), ("version", int())]),
        "Lease": open(&[("tenant_id", id("ten")), ("name", st()), ("agent_id", id("agt")), ("holder", nullable(st())),
            ("generation", int()), ("ttl_ms", int()), ("acquired_at", nullable(int())), ("renewed_at", nullable(int())),
            ("expires_at", nullable(int())), ("released_at", nullable(int()))]),
        "Invocation": open(&[("id", id("inv")), ("tenant_id", id("ten")), ("caller_agent", id("agt")), ("caller_session", nullable(id("ses"))),
            ("target", id("agt")), ("operation", st()), ("input", json!({})),
            ("status", en(&["pending", "running", "succeeded", "failed", "cancelled", "timed_out"])),
            ("attempt", int()), ("max_attempts", int()), ("backoff_ms", int()), ("deadline_at", int()), ("next_attempt_at", int()),
            ("worker", nullable(st())), ("result", json!({})), ("error", nullable(st())), ("idempotency_key", nullable(st())),
            ("created_at", int()), ("updated_at", int()), ("version", int())]),
        "RevocationOutcome": open(&[("sessions_revoked", json!({ "type": "array", "items": id("ses") })),
            ("mandates_revoked", json!({ "type": "array", "items": id("mdt") })),
            ("delegations_revoked", json!({ "type": "array", "items": id("dlg") })),
            ("invocations_cancelled", int()), ("revocation_ids", json!({ "type": "array", "items": st() })),
            ("revocations", json!({ "type": "array", "items": st() })),
            ("published", json!({ "type": "boolean", "description": "the revocation records were on the bus every gateway follows when the call answered (false: committed and queued)" }))]),
        "Limits": open(&[("max_active_sessions", int()), ("max_leases", int()), ("max_open_invocations", int()), ("overrides", json!({ "type": "object" }))]),
    })
}

pub fn document() -> Value {
    let mut paths = Map::new();
    for (method, path, summary, who, request, status, response) in operations() {
        let mut params = Vec::new();
        for seg in path.split('/') {
            if let Some(name) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                params.push(json!({ "name": name, "in": "path", "required": true, "schema": st() }));
            }
        }
        let mut o = json!({
            "operationId": format!("{method}_{}", path.trim_start_matches("/v1/").replace(['/', '{', '}', '.'], "_")),
            "summary": summary,
            "description": format!("Caller: {who}."),
            "parameters": params,
            "responses": {
                status.to_string(): { "description": "OK", "content": { "application/json": { "schema": response } } },
                "default": { "description": "Error", "content": { "application/json": { "schema": r("Error") } } },
            },
        });
        if let Some(req) = request {
            o["requestBody"] = json!({ "required": false, "content": { "application/json": { "schema": req } } });
        }
        paths
            .entry(path.to_string())
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("object")
            .insert(method.to_string(), o);
    }
    json!({
        "openapi": "3.1.0",
        "info": { "title": "Caracal coordinator API", "version": env!("CARGO_PKG_VERSION") },
        "components": {
            "schemas": schemas(),
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer",
                "description": "An agent's mandate, or an admin token (cat_…) with x-caracal-tenant for platform tokens" } },
        },
        "security": [{ "bearer": [] }],
        "paths": paths,
    })
}

/// `(METHOD, path)` of every documented operation.
pub fn documented_routes() -> Vec<(String, String)> {
    operations()
        .into_iter()
        .map(|(m, p, ..)| (m.to_ascii_uppercase(), p.to_string()))
        .collect()
}
