//! The one error vocabulary of Caracal.
//!
//! Every failure a client can observe is an [`Error`] carrying an [`ErrorCode`]. The code is a
//! stable, machine-readable string; its HTTP status is decided here and nowhere else
//! ([`ErrorCode::status`]), and the JSON body is rendered by [`Error::to_json`]. The STS speaks
//! RFC 6749 error codes on its OAuth endpoint; that mapping lives in [`ErrorCode::oauth`].
//!
//! Messages are written for humans and must never contain secrets: constructors take the
//! message explicitly and callers pass only non-secret context.

use std::borrow::Cow;
use std::fmt;

use http::StatusCode;
use serde_json::{Value, json};

/// Stable error codes. The string form (see [`ErrorCode::as_str`]) is part of the public API:
/// never rename a variant's string, only add new ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    // 4xx: the caller can fix it.
    BadRequest,
    InvalidJson,
    ValidationFailed,
    Unauthenticated,
    ProxyAuthRequired,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    Conflict,
    /// A state machine refused a transition from the current state (409, with the state).
    InvalidTransition,
    /// A lease is held by another instance (409).
    LeaseHeld,
    /// A lease holder presented a stale fencing generation (409).
    LeaseFenced,
    /// The lease expired before this call (410).
    LeaseExpired,
    /// A configured per-tenant limit would be exceeded (429).
    LimitExceeded,
    Gone,
    PreconditionFailed,
    PreconditionRequired,
    PayloadTooLarge,
    UnsupportedMediaType,
    RateLimited,
    BudgetExhausted,
    // Authority decisions.
    MandateMissing,
    MandateInvalid,
    MandateExpired,
    MandateRevoked,
    PolicyDenied,
    EgressDenied,
    LoopDetected,
    ApprovalPending,
    // 5xx: the system cannot serve right now.
    Internal,
    StoreUnavailable,
    BusUnavailable,
    NotReady,
    RevocationFeedStale,
    AuditUnavailable,
    BudgetLedgerUnavailable,
    UpstreamUnreachable,
    UpstreamTimeout,
    Unavailable,
}

impl ErrorCode {
    pub const ALL: &'static [ErrorCode] = &[
        ErrorCode::BadRequest,
        ErrorCode::InvalidJson,
        ErrorCode::ValidationFailed,
        ErrorCode::Unauthenticated,
        ErrorCode::ProxyAuthRequired,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::Conflict,
        ErrorCode::InvalidTransition,
        ErrorCode::LeaseHeld,
        ErrorCode::LeaseFenced,
        ErrorCode::LeaseExpired,
        ErrorCode::LimitExceeded,
        ErrorCode::Gone,
        ErrorCode::PreconditionFailed,
        ErrorCode::PreconditionRequired,
        ErrorCode::PayloadTooLarge,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::RateLimited,
        ErrorCode::BudgetExhausted,
        ErrorCode::MandateMissing,
        ErrorCode::MandateInvalid,
        ErrorCode::MandateExpired,
        ErrorCode::MandateRevoked,
        ErrorCode::PolicyDenied,
        ErrorCode::EgressDenied,
        ErrorCode::LoopDetected,
        ErrorCode::ApprovalPending,
        ErrorCode::Internal,
        ErrorCode::StoreUnavailable,
        ErrorCode::BusUnavailable,
        ErrorCode::NotReady,
        ErrorCode::RevocationFeedStale,
        ErrorCode::AuditUnavailable,
        ErrorCode::BudgetLedgerUnavailable,
        ErrorCode::UpstreamUnreachable,
        ErrorCode::UpstreamTimeout,
        ErrorCode::Unavailable,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::ValidationFailed => "validation_failed",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::ProxyAuthRequired => "proxy_auth_required",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::Conflict => "conflict",
            ErrorCode::InvalidTransition => "invalid_transition",
            ErrorCode::LeaseHeld => "lease_held",
            ErrorCode::LeaseFenced => "lease_fenced",
            ErrorCode::LeaseExpired => "lease_expired",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::Gone => "gone",
            ErrorCode::PreconditionFailed => "precondition_failed",
            ErrorCode::PreconditionRequired => "precondition_required",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::BudgetExhausted => "budget_exhausted",
            ErrorCode::MandateMissing => "mandate_missing",
            ErrorCode::MandateInvalid => "mandate_invalid",
            ErrorCode::MandateExpired => "mandate_expired",
            ErrorCode::MandateRevoked => "mandate_revoked",
            ErrorCode::PolicyDenied => "policy_denied",
            ErrorCode::EgressDenied => "egress_denied",
            ErrorCode::LoopDetected => "loop_detected",
            ErrorCode::ApprovalPending => "approval_pending",
            ErrorCode::Internal => "internal",
            ErrorCode::StoreUnavailable => "store_unavailable",
            ErrorCode::BusUnavailable => "bus_unavailable",
            ErrorCode::NotReady => "not_ready",
            ErrorCode::RevocationFeedStale => "revocation_feed_stale",
            ErrorCode::AuditUnavailable => "audit_unavailable",
            ErrorCode::BudgetLedgerUnavailable => "budget_ledger_unavailable",
            ErrorCode::UpstreamUnreachable => "upstream_unreachable",
            ErrorCode::UpstreamTimeout => "upstream_timeout",
            ErrorCode::Unavailable => "unavailable",
        }
    }

    /// The HTTP status for this code. This is the only place statuses are chosen.
    pub const fn status(self) -> StatusCode {
        match self {
            ErrorCode::BadRequest | ErrorCode::InvalidJson | ErrorCode::ValidationFailed => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthenticated => StatusCode::UNAUTHORIZED,
            ErrorCode::ProxyAuthRequired | ErrorCode::MandateMissing => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            ErrorCode::MandateInvalid | ErrorCode::MandateExpired => StatusCode::UNAUTHORIZED,
            ErrorCode::Forbidden | ErrorCode::MandateRevoked | ErrorCode::PolicyDenied | ErrorCode::EgressDenied => {
                StatusCode::FORBIDDEN
            }
            ErrorCode::NotFound => StatusCode::NOT_FOUND,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::Conflict => StatusCode::CONFLICT,
            ErrorCode::InvalidTransition | ErrorCode::LeaseHeld | ErrorCode::LeaseFenced => StatusCode::CONFLICT,
            ErrorCode::LeaseExpired => StatusCode::GONE,
            ErrorCode::LimitExceeded => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::Gone => StatusCode::GONE,
            ErrorCode::PreconditionFailed => StatusCode::PRECONDITION_FAILED,
            ErrorCode::PreconditionRequired => StatusCode::PRECONDITION_REQUIRED,
            ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::RateLimited | ErrorCode::BudgetExhausted => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::LoopDetected => StatusCode::LOOP_DETECTED,
            ErrorCode::ApprovalPending => StatusCode::ACCEPTED,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::UpstreamUnreachable => StatusCode::BAD_GATEWAY,
            ErrorCode::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorCode::StoreUnavailable
            | ErrorCode::BusUnavailable
            | ErrorCode::NotReady
            | ErrorCode::RevocationFeedStale
            | ErrorCode::AuditUnavailable
            | ErrorCode::BudgetLedgerUnavailable
            | ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// RFC 6749 §5.2 error code used by the STS token endpoint for this error.
    pub const fn oauth(self) -> &'static str {
        match self {
            ErrorCode::Unauthenticated | ErrorCode::ProxyAuthRequired => "invalid_client",
            ErrorCode::MandateMissing
            | ErrorCode::MandateInvalid
            | ErrorCode::MandateExpired
            | ErrorCode::MandateRevoked => "invalid_grant",
            ErrorCode::Forbidden | ErrorCode::PolicyDenied => "unauthorized_client",
            ErrorCode::RateLimited => "slow_down",
            ErrorCode::ApprovalPending => "authorization_pending",
            ErrorCode::Internal
            | ErrorCode::StoreUnavailable
            | ErrorCode::BusUnavailable
            | ErrorCode::NotReady
            | ErrorCode::RevocationFeedStale
            | ErrorCode::AuditUnavailable
            | ErrorCode::BudgetLedgerUnavailable
            | ErrorCode::UpstreamUnreachable
            | ErrorCode::UpstreamTimeout
            | ErrorCode::Unavailable => "temporarily_unavailable",
            _ => "invalid_request",
        }
    }

    pub fn from_str_code(s: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.iter().copied().find(|c| c.as_str() == s)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A client-observable error: a stable code, a human message, optional structured details.
///
/// The `source` is kept for logs only and is never rendered into a response body.
pub struct Error {
    pub code: ErrorCode,
    pub message: Cow<'static, str>,
    pub details: Option<Value>,
    pub retry_after_secs: Option<u64>,
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Self {
        Error {
            code,
            message: message.into(),
            details: None,
            retry_after_secs: None,
            source: None,
        }
    }

    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs.max(1));
        self
    }

    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    pub fn bad_request(message: impl Into<Cow<'static, str>>) -> Self {
        Error::new(ErrorCode::BadRequest, message)
    }
    pub fn validation(message: impl Into<Cow<'static, str>>) -> Self {
        Error::new(ErrorCode::ValidationFailed, message)
    }
    pub fn not_found(what: &str) -> Self {
        Error::new(ErrorCode::NotFound, format!("{what} not found"))
    }
    pub fn conflict(message: impl Into<Cow<'static, str>>) -> Self {
        Error::new(ErrorCode::Conflict, message)
    }
    pub fn forbidden(message: impl Into<Cow<'static, str>>) -> Self {
        Error::new(ErrorCode::Forbidden, message)
    }
    pub fn unauthenticated(message: impl Into<Cow<'static, str>>) -> Self {
        Error::new(ErrorCode::Unauthenticated, message)
    }
    pub fn internal(message: impl Into<Cow<'static, str>>) -> Self {
        Error::new(ErrorCode::Internal, message)
    }
    pub fn unavailable(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Self {
        Error::new(code, message)
    }

    pub fn status(&self) -> StatusCode {
        self.code.status()
    }

    pub fn source_ref(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        self.source.as_deref()
    }

    /// The JSON body every service returns for this error.
    pub fn to_json(&self, request_id: Option<&str>) -> Value {
        let mut err = json!({
            "code": self.code.as_str(),
            "message": self.message,
        });
        if let Some(d) = &self.details {
            err["details"] = d.clone();
        }
        if let Some(r) = self.retry_after_secs {
            err["retry_after"] = json!(r);
        }
        if let Some(id) = request_id {
            err["request_id"] = json!(id);
        }
        json!({ "error": err })
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("code", &self.code).field("message", &self.message);
        if let Some(details) = &self.details {
            d.field("details", details);
        }
        if let Some(src) = &self.source {
            d.field("source", &src.to_string());
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)?;
        if let Some(src) = &self.source {
            write!(f, " ({src})")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::RowNotFound => Error::new(ErrorCode::NotFound, "not found"),
            sqlx::Error::Database(db) if db.is_unique_violation() => {
                Error::new(ErrorCode::Conflict, "already exists").with_source(e)
            }
            sqlx::Error::Database(db) if db.is_foreign_key_violation() => {
                Error::new(ErrorCode::Conflict, "referenced object does not exist or is in use").with_source(e)
            }
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Protocol(_) => {
                Error::new(ErrorCode::StoreUnavailable, "the database is unavailable").with_source(e)
            }
            sqlx::Error::Database(db) if is_transient_db_error(db.code().as_deref()) => {
                Error::new(ErrorCode::StoreUnavailable, "the database is unavailable").with_source(e)
            }
            _ => Error::new(ErrorCode::Internal, "storage error").with_source(e),
        }
    }
}

impl Error {
    /// A transaction lost a race the database resolved by aborting it (deadlock or
    /// serialization failure): retrying the whole transaction is safe and will likely succeed.
    pub fn is_retryable_conflict(&self) -> bool {
        let Some(src) = self.source_ref() else { return false };
        match src.downcast_ref::<sqlx::Error>() {
            Some(sqlx::Error::Database(db)) => matches!(db.code().as_deref(), Some("40001" | "40P01")),
            _ => false,
        }
    }
}

/// Postgres SQLSTATE classes that mean "try again later": connection exceptions (08),
/// insufficient resources (53), operator intervention (57: admin shutdown, cannot connect now,
/// a statement cancelled by `statement_timeout`), a session ended for idling in a transaction
/// (25P03). SQLite busy/locked (5, 6) behave the same way.
fn is_transient_db_error(code: Option<&str>) -> bool {
    match code {
        Some(c) => {
            c.starts_with("08")
                || c.starts_with("53")
                || c.starts_with("57")
                || c == "25P03"
                || c == "5"
                || c == "6"
                || c == "40001"
                || c == "40P01"
        }
        None => false,
    }
}

impl From<fred::error::Error> for Error {
    fn from(e: fred::error::Error) -> Self {
        Error::new(ErrorCode::BusUnavailable, "the event bus is unavailable").with_source(e)
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::new(ErrorCode::InvalidJson, format!("invalid JSON: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for c in ErrorCode::ALL {
            assert!(seen.insert(c.as_str()), "duplicate code {c}");
            assert_eq!(ErrorCode::from_str_code(c.as_str()), Some(*c));
        }
    }

    #[test]
    fn json_body_shape_and_no_source_leak() {
        let inner = std::io::Error::other("password=hunter2");
        let e = Error::new(ErrorCode::StoreUnavailable, "the database is unavailable")
            .with_source(inner)
            .with_retry_after(3);
        let body = e.to_json(Some("req-1")).to_string();
        assert!(body.contains("\"code\":\"store_unavailable\""));
        assert!(body.contains("\"request_id\":\"req-1\""));
        assert!(body.contains("\"retry_after\":3"));
        assert!(!body.contains("hunter2"), "sources must never reach a response body");
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn limits_are_429_not_403() {
        assert_eq!(ErrorCode::RateLimited.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(ErrorCode::BudgetExhausted.status(), StatusCode::TOO_MANY_REQUESTS);
    }
}
