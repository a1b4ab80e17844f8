//! HTTP plumbing shared by the hyper services: request context, body limits, JSON in and out,
//! and the single place where an [`Error`] becomes a response ([`error_response`]).

pub mod admin;
pub mod client;
pub mod router;
pub mod server;
pub mod signing;

use std::net::SocketAddr;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, ErrorCode, Result};

pub use router::Router;
pub use server::{App, HttpServer, ServerOptions};

pub type Response = http::Response<Full<Bytes>>;

/// Per-request context assigned by the server before a handler runs.
#[derive(Debug, Clone)]
pub struct RequestCtx {
    pub request_id: String,
    pub peer: SocketAddr,
    /// Identity taken from a verified client certificate, when the listener does mTLS.
    pub client_cert: Option<ClientCert>,
}

/// What the TLS layer proved about the client.
#[derive(Debug, Clone)]
pub struct ClientCert {
    /// DER of the leaf certificate.
    pub der: Vec<u8>,
    /// SHA-256 of the leaf certificate DER, hex.
    pub fingerprint: String,
}

pub struct ApiRequest {
    pub parts: http::request::Parts,
    body: Option<Incoming>,
    preloaded: Option<Bytes>,
    pub params: Vec<(&'static str, String)>,
    pub ctx: RequestCtx,
    max_body: usize,
}

impl ApiRequest {
    pub fn new(req: http::Request<Incoming>, ctx: RequestCtx, max_body: usize) -> Self {
        let (parts, body) = req.into_parts();
        ApiRequest {
            parts,
            body: Some(body),
            preloaded: None,
            params: Vec::new(),
            ctx,
            max_body,
        }
    }

    /// A request with an in-memory body (tests, internal dispatch).
    pub fn from_bytes(parts: http::request::Parts, body: Bytes, ctx: RequestCtx) -> Self {
        ApiRequest {
            parts,
            body: None,
            preloaded: Some(body),
            params: Vec::new(),
            ctx,
            max_body: usize::MAX,
        }
    }

    pub fn param(&self, name: &str) -> Result<&str> {
        self.params
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
            .ok_or_else(|| Error::internal(format!("route has no parameter {name}")))
    }

    pub fn headers(&self) -> &HeaderMap {
        &self.parts.headers
    }

    pub fn header_str(&self, name: impl header::AsHeaderName) -> Option<&str> {
        self.parts.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Query string parameters (percent-decoded). Repeated keys are kept in order.
    pub fn query(&self) -> Vec<(String, String)> {
        self.parts.uri.query().map(parse_form).unwrap_or_default()
    }

    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query().into_iter().find(|(k, _)| k == name).map(|(_, v)| v)
    }

    /// Read the whole body, refusing more than the configured limit with 413.
    pub async fn body_bytes(&mut self) -> Result<Bytes> {
        if let Some(b) = self.preloaded.take() {
            return Ok(b);
        }
        let Some(body) = self.body.take() else {
            return Ok(Bytes::new());
        };
        if let Some(len) = self
            .parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            && len > self.max_body
        {
            return Err(too_large(self.max_body));
        }
        match Limited::new(body, self.max_body).collect().await {
            Ok(c) => Ok(c.to_bytes()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large(self.max_body)),
            Err(_) => Err(Error::bad_request("could not read the request body")),
        }
    }

    /// Parse a JSON body into `T` (declare `T` with `#[serde(deny_unknown_fields)]` so unknown
    /// fields are rejected). Requires `Content-Type: application/json`.
    pub async fn json<T: DeserializeOwned>(&mut self) -> Result<T> {
        let ct = self.header_str(header::CONTENT_TYPE).unwrap_or("");
        let mime = ct.split(';').next().unwrap_or("").trim();
        if !(mime.eq_ignore_ascii_case("application/json") || mime.ends_with("+json")) {
            return Err(Error::new(
                ErrorCode::UnsupportedMediaType,
                "expected Content-Type: application/json",
            ));
        }
        let body = self.body_bytes().await?;
        parse_json(&body)
    }
}

fn too_large(limit: usize) -> Error {
    Error::new(
        ErrorCode::PayloadTooLarge,
        format!("request body exceeds the limit of {limit} bytes"),
    )
}

/// Parse JSON with errors that name the line, column and field at fault.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| {
        let code = if e.is_data() {
            ErrorCode::ValidationFailed
        } else {
            ErrorCode::InvalidJson
        };
        Error::new(code, e.to_string()).with_details(serde_json::json!({
            "line": e.line(),
            "column": e.column(),
        }))
    })
}

/// `a=1&b=x%20y` → pairs, percent- and plus-decoded.
pub fn parse_form(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (form_decode(k), form_decode(v))
        })
        .collect()
}

fn form_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex_val(bytes[i + 1]), hex_val(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Percent-encode for `application/x-www-form-urlencoded` values.
pub fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

pub fn json_response<T: Serialize + ?Sized>(status: StatusCode, body: &T) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = http::Response::new(Full::new(Bytes::from(bytes)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

pub fn ok<T: Serialize + ?Sized>(body: &T) -> Result<Response> {
    Ok(json_response(StatusCode::OK, body))
}

pub fn created<T: Serialize + ?Sized>(body: &T) -> Result<Response> {
    Ok(json_response(StatusCode::CREATED, body))
}

pub fn no_content() -> Result<Response> {
    let mut r = http::Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    Ok(r)
}

pub fn text_response(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response {
    let mut r = http::Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// The one place an [`Error`] becomes an HTTP response: status from the code, JSON body,
/// `Retry-After` for limits, `Allow` for 405.
pub fn error_response(err: &Error, request_id: Option<&str>) -> Response {
    let mut r = json_response(err.status(), &err.to_json(request_id));
    if let Some(secs) = err.retry_after_secs
        && let Ok(v) = HeaderValue::from_str(&secs.to_string())
    {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    if err.code == ErrorCode::MethodNotAllowed
        && let Some(allow) = err
            .details
            .as_ref()
            .and_then(|d| d.get("allow"))
            .and_then(|a| a.as_str())
        && let Ok(v) = HeaderValue::from_str(allow)
    {
        r.headers_mut().insert(header::ALLOW, v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_decoding() {
        let f = parse_form("a=1&b=x%20y+z&c=%zz&d");
        assert_eq!(
            f,
            vec![
                ("a".into(), "1".into()),
                ("b".into(), "x y z".into()),
                ("c".into(), "%zz".into()),
                ("d".into(), "".into())
            ]
        );
        assert_eq!(
            parse_form(&format!("k={}", form_encode("a b&c=d/é"))),
            vec![("k".into(), "a b&c=d/é".into())]
        );
        assert_eq!(form_decode("%4"), "%4");
        assert_eq!(form_decode("%41"), "A");
    }

    #[test]
    fn errors_render_retry_after_and_allow() {
        let e = Error::new(ErrorCode::RateLimited, "slow down").with_retry_after(2);
        let r = error_response(&e, None);
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
    }
}
