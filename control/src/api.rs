//! Conventions every control endpoint follows: admin-token authentication with scopes, tenant
//! resolution in one place, `ETag`/`If-Match`, `Idempotency-Key` on creates, and state changes
//! written together with their events (control stream for invalidation, audit stream for the
//! ledger) in one transaction.

use bytes::Bytes;
use caracal_shared::bus::streams;
use caracal_shared::crypto::sha256;
use caracal_shared::error::{Error, ErrorCode, Result};
use caracal_shared::http::{ApiRequest, Response, json_response};
use caracal_shared::ids::TenantId;
use caracal_shared::store::Tx;
use caracal_shared::store::admin::{AdminScope, IdempotentResponse};
use caracal_shared::store::outbox::NewEvent;
use caracal_shared::store::page::Cursor;
use http::header::{self, HeaderValue};
use http::{Method, StatusCode};
use serde::Serialize;
use serde_json::{Value, json};

use crate::State;

pub use caracal_shared::http::admin::{Caller, TENANT_HEADER};

/// One state change: its kind (`agent.created`), tenant and non-secret description.
pub struct Change {
    pub kind: String,
    pub tenant: Option<TenantId>,
    pub body: Value,
}

impl Change {
    pub fn new(kind: &str, tenant: Option<TenantId>, body: Value) -> Self {
        Change {
            kind: kind.to_string(),
            tenant,
            body,
        }
    }
}

impl State {
    /// Authenticate the admin token and check `scope` (see `caracal_shared::http::admin`).
    pub async fn auth(&self, r: &ApiRequest, scope: AdminScope) -> Result<Caller> {
        caracal_shared::http::admin::authenticate(&self.rt.store, &self.pepper, r, scope).await
    }

    /// Run a change in one transaction with its events; honour `Idempotency-Key` on creates.
    pub async fn mutate<F>(
        &self,
        r: &mut ApiRequest,
        caller: &Caller,
        status: StatusCode,
        body: &Bytes,
        f: F,
    ) -> Result<Response>
    where
        F: AsyncFnOnce(&mut Tx) -> Result<(Value, Vec<Change>)>,
    {
        let idem = match r.header_str("idempotency-key") {
            Some(k) if r.parts.method == Method::POST => {
                if k.is_empty() || k.len() > 255 || !k.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(Error::validation(
                        "Idempotency-Key must be 1-255 visible ASCII characters",
                    ));
                }
                Some(k.to_string())
            }
            _ => None,
        };
        let scope = caller
            .tenant
            .map(|t| t.to_string())
            .unwrap_or_else(|| format!("platform:{}", caller.token.id));
        let request_hash = hex::encode(sha256(
            &[
                r.parts.method.as_str().as_bytes(),
                b"\n",
                r.parts.uri.path().as_bytes(),
                b"\n",
                body,
            ]
            .concat(),
        ));
        if let Some(key) = &idem
            && let Some(prev) = self.rt.store.idempotent_response(&scope, key).await?
        {
            if prev.request_hash != request_hash {
                return Err(Error::conflict("this Idempotency-Key was used for a different request"));
            }
            let mut resp = json_response(
                StatusCode::from_u16(prev.status).unwrap_or(StatusCode::OK),
                &serde_json::from_str::<Value>(&prev.body).unwrap_or(Value::Null),
            );
            resp.headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
            return Ok(resp);
        }
        let mut tx = self.rt.store.begin().await?;
        let (value, changes) = f(&mut tx).await?;
        self.emit_changes(&mut tx, caller, &r.ctx.request_id, &changes).await?;
        if let Some(key) = &idem {
            tx.put_idempotent_response(
                &scope,
                key,
                &IdempotentResponse {
                    method: r.parts.method.to_string(),
                    path: r.parts.uri.path().to_string(),
                    request_hash,
                    status: status.as_u16(),
                    body: value.to_string(),
                },
            )
            .await?;
        }
        tx.commit().await?;
        Ok(with_etag(json_response(status, &value), &value))
    }
}

impl State {
    /// Write each change's events (control stream: invalidation; audit stream: evidence).
    pub async fn emit_changes(&self, tx: &mut Tx, caller: &Caller, request_id: &str, changes: &[Change]) -> Result<()> {
        for c in changes {
            tx.emit(NewEvent::new(streams::CONTROL, &c.kind, c.tenant, c.body.clone()))
                .await?;
            tx.emit(NewEvent::new(
                streams::AUDIT,
                "admin.change",
                c.tenant,
                json!({
                    "type": "admin_change",
                    "change": c.kind,
                    "actor": caller.actor(),
                    "request_id": request_id,
                    "object": c.body,
                }),
            ))
            .await?;
        }
        Ok(())
    }
}

/// `ETag: "<version>"` when the body carries a version.
pub fn with_etag(mut resp: Response, v: &Value) -> Response {
    let version = v.get("version").and_then(|x| x.as_i64()).or_else(|| {
        v.as_object()
            .and_then(|o| o.values().find_map(|x| x.get("version").and_then(|x| x.as_i64())))
    });
    if let Some(ver) = version
        && let Ok(h) = HeaderValue::from_str(&format!("\"{ver}\""))
    {
        resp.headers_mut().insert(header::ETAG, h);
    }
    resp
}

/// A read answer with its ETag.
pub fn read_ok<T: Serialize>(v: &T) -> Result<Response> {
    let value = serde_json::to_value(v)?;
    Ok(with_etag(json_response(StatusCode::OK, &value), &value))
}

/// `If-Match: "3"` → Some(3); absent or `*` → None.
pub fn if_match(r: &ApiRequest) -> Result<Option<i64>> {
    match r.header_str(header::IF_MATCH) {
        None => Ok(None),
        Some(v) if v.trim() == "*" => Ok(None),
        Some(v) => v
            .trim()
            .trim_start_matches("W/")
            .trim_matches('"')
            .parse::<i64>()
            .map(Some)
            .map_err(|_| Error::bad_request("If-Match must be an ETag returned by this API (e.g. \"3\")")),
    }
}

pub fn cursor(r: &ApiRequest) -> Result<Cursor> {
    Cursor::parse(r.query_param("cursor").as_deref(), r.query_param("limit").as_deref())
}

/// Read the raw body and parse it as JSON into `T` (unknown fields rejected by `T`).
pub async fn body_json<T: serde::de::DeserializeOwned>(r: &mut ApiRequest) -> Result<(T, Bytes)> {
    let ct = r.header_str(header::CONTENT_TYPE).unwrap_or("").to_string();
    let mime = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if mime != "application/json" && !mime.ends_with("+json") {
        return Err(Error::new(
            ErrorCode::UnsupportedMediaType,
            "expected Content-Type: application/json",
        ));
    }
    let body = r.body_bytes().await?;
    let v = caracal_shared::http::parse_json(&body)?;
    Ok((v, body))
}

/// Parse an optional RFC 3339 time into microseconds.
pub fn opt_time(field: &str, s: &Option<String>) -> Result<Option<i64>> {
    match s {
        None => Ok(None),
        Some(s) => caracal_shared::time::parse_rfc3339(s)
            .map(Some)
            .ok_or_else(|| Error::validation(format!("{field} must be an RFC 3339 time"))),
    }
}
