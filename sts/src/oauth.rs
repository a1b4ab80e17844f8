//! OAuth plumbing: RFC 6749 §5.2 error responses and strict form parsing for the token
//! endpoint (RFC 8693).

use std::collections::HashMap;

use bytes::Bytes;
use caracal_shared::error::{Error, ErrorCode};
use caracal_shared::http::{Response, json_response, parse_form};
use http::StatusCode;
use http::header::HeaderValue;
use serde_json::{Value, json};

pub const GT_TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const GT_APPROVAL: &str = "urn:caracal:params:oauth:grant-type:approval";
pub const TT_API_KEY: &str = "urn:caracal:params:oauth:token-type:api-key";
pub const TT_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
pub const TT_ID_TOKEN: &str = "urn:ietf:params:oauth:token-type:id_token";
pub const TT_MTLS: &str = "urn:caracal:params:oauth:token-type:mtls";
pub const TT_MANDATE: &str = "urn:caracal:params:oauth:token-type:mandate";

/// An RFC 6749 error answer.
#[derive(Debug, Clone)]
pub struct OAuthError {
    pub error: &'static str,
    pub description: String,
    pub status: StatusCode,
    pub retry_after: Option<u64>,
    pub extra: Option<Value>,
}

impl OAuthError {
    pub fn new(error: &'static str, description: impl Into<String>) -> Self {
        let status = match error {
            "invalid_client" => StatusCode::UNAUTHORIZED,
            "slow_down_limit" => StatusCode::TOO_MANY_REQUESTS,
            "temporarily_unavailable" => StatusCode::SERVICE_UNAVAILABLE,
            "server_error" => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        };
        OAuthError {
            error,
            description: description.into(),
            status,
            retry_after: None,
            extra: None,
        }
    }

    pub fn invalid_request(d: impl Into<String>) -> Self {
        Self::new("invalid_request", d)
    }
    pub fn invalid_client(d: impl Into<String>) -> Self {
        Self::new("invalid_client", d)
    }
    pub fn invalid_grant(d: impl Into<String>) -> Self {
        Self::new("invalid_grant", d)
    }
    pub fn invalid_scope(d: impl Into<String>) -> Self {
        Self::new("invalid_scope", d)
    }
    pub fn invalid_target(d: impl Into<String>) -> Self {
        Self::new("invalid_target", d)
    }
    pub fn unauthorized_client(d: impl Into<String>) -> Self {
        Self::new("unauthorized_client", d)
    }

    /// 429 with Retry-After (rate limits).
    pub fn rate_limited(retry_after: u64) -> Self {
        OAuthError {
            error: "slow_down",
            description: "too many requests; retry later".into(),
            status: StatusCode::TOO_MANY_REQUESTS,
            retry_after: Some(retry_after.max(1)),
            extra: None,
        }
    }

    pub fn with_extra(mut self, v: Value) -> Self {
        self.extra = Some(v);
        self
    }

    pub fn response(&self) -> Response {
        let mut body = json!({ "error": self.error, "error_description": self.description });
        if let (Some(Value::Object(extra)), Some(obj)) = (&self.extra, body.as_object_mut()) {
            for (k, v) in extra {
                obj.insert(k.clone(), v.clone());
            }
        }
        let mut r = json_response(self.status, &body);
        let h = r.headers_mut();
        h.insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(http::header::PRAGMA, HeaderValue::from_static("no-cache"));
        if self.status == StatusCode::UNAUTHORIZED {
            h.insert(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"caracal-sts\""),
            );
        }
        if let Some(s) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            h.insert(http::header::RETRY_AFTER, v);
        }
        r
    }
}

impl From<Error> for OAuthError {
    fn from(e: Error) -> Self {
        let error = e.code.oauth();
        let mut o = OAuthError::new(error, e.message.to_string());
        if error == "temporarily_unavailable" {
            o.status = StatusCode::SERVICE_UNAVAILABLE;
            o.retry_after = Some(1);
        }
        if e.code == ErrorCode::Internal {
            o = OAuthError::new("server_error", "internal error");
        }
        o
    }
}

/// Parameters that may legitimately repeat (RFC 8693 §2.1).
const REPEATABLE: &[&str] = &["resource", "audience"];

/// A parsed form: single-valued parameters plus the repeatable ones.
#[derive(Debug, Default)]
pub struct Form {
    single: HashMap<String, String>,
    multi: HashMap<String, Vec<String>>,
}

impl Form {
    /// Parse `application/x-www-form-urlencoded`; a repeated parameter is an error.
    pub fn parse(body: &Bytes) -> Result<Form, OAuthError> {
        let text = std::str::from_utf8(body).map_err(|_| OAuthError::invalid_request("the form is not UTF-8"))?;
        let mut f = Form::default();
        for (k, v) in parse_form(text) {
            if k.is_empty() {
                continue;
            }
            if REPEATABLE.contains(&k.as_str()) {
                f.multi.entry(k).or_default().push(v);
            } else if f.single.insert(k.clone(), v).is_some() {
                return Err(OAuthError::invalid_request(format!(
                    "parameter {k:?} appears more than once"
                )));
            }
        }
        Ok(f)
    }

    pub fn get(&self, k: &str) -> Option<&str> {
        self.single.get(k).map(|s| s.as_str()).filter(|s| !s.is_empty())
    }

    pub fn require(&self, k: &str) -> Result<&str, OAuthError> {
        self.get(k)
            .ok_or_else(|| OAuthError::invalid_request(format!("missing parameter {k:?}")))
    }

    pub fn all(&self, k: &str) -> &[String] {
        self.multi.get(k).map(|v| v.as_slice()).unwrap_or(&[])
    }
}

/// Scopes are space-delimited, each a printable token (RFC 6749 §3.3).
pub fn parse_scopes(s: Option<&str>) -> Result<Option<Vec<String>>, OAuthError> {
    let Some(s) = s else { return Ok(None) };
    let mut out: Vec<String> = Vec::new();
    for tok in s.split(' ').filter(|t| !t.is_empty()) {
        if tok.len() > 64
            || !tok
                .bytes()
                .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
        {
            return Err(OAuthError::invalid_scope(format!("malformed scope {tok:?}")));
        }
        if !out.iter().any(|x| x == tok) {
            out.push(tok.to_string());
        }
    }
    if out.len() > 64 {
        return Err(OAuthError::invalid_scope("too many scopes"));
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_are_refused_except_resource() {
        assert!(Form::parse(&Bytes::from_static(b"a=1&a=2")).is_err());
        let f = Form::parse(&Bytes::from_static(b"resource=x&resource=y&scope=a+b")).unwrap();
        assert_eq!(f.all("resource"), ["x", "y"]);
        assert_eq!(parse_scopes(f.get("scope")).unwrap().unwrap(), vec!["a", "b"]);
        assert!(parse_scopes(Some("a \"b")).is_err());
    }

    #[test]
    fn statuses() {
        assert_eq!(OAuthError::invalid_client("x").response().status(), 401);
        assert_eq!(OAuthError::invalid_grant("x").response().status(), 400);
        let r = OAuthError::rate_limited(3).response();
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "3");
        assert_eq!(r.headers()["cache-control"], "no-store");
    }
}
