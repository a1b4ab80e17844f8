//! The signed message format every bus entry carries.
//!
//! Wire form: a JSON object (field `m` of the stream entry). Its MAC is HMAC-SHA256, with the
//! bus key named by `kid`, over the **canonical encoding**: the length-prefixed sequence
//! `"caracal-bus-v1", v, id, stream, kind, tenant, seq, ts, body` (absent values are empty).
//! `body` is the exact JSON text of the payload, carried as a string, so no JSON
//! re-serialisation can change what was signed. Binding `stream` stops a message signed for
//! one stream from being replayed on another.
//!
//! [`BusAuth::verify`] refuses unsigned, malformed, unknown-key, forged, wrong-stream, too-old,
//! from-the-future and replayed messages, and counts each refusal in a metric.

use std::time::Duration;

use bytes::Bytes;
use moka::sync::Cache;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::crypto::{KeyRing, b64url, b64url_decode};
use crate::ids::{EventId, TenantId};
use crate::metrics::BusMetrics;
use crate::store::outbox::OutboxRow;
use crate::time::{Micros, micros, now_micros};

pub const VERSION: u8 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub v: u8,
    pub id: EventId,
    pub stream: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<TenantId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<i64>,
    /// Producer time, microseconds since the epoch.
    pub ts: Micros,
    /// Exact JSON text of the payload.
    pub body: String,
    #[serde(default)]
    pub kid: String,
    #[serde(default)]
    pub mac: String,
}

/// A verified message, ready for a consumer.
#[derive(Debug, Clone)]
pub struct Event {
    /// Bus entry id (stream position).
    pub entry_id: String,
    pub id: EventId,
    pub stream: String,
    pub kind: String,
    pub tenant: Option<TenantId>,
    pub seq: Option<i64>,
    pub ts: Micros,
    pub body: Value,
    /// How many times this entry has been delivered to a group consumer (1 = first time).
    pub deliveries: u64,
}

impl Envelope {
    /// An envelope whose body is already JSON text.
    pub fn with_body(stream: &str, kind: &str, tenant: Option<TenantId>, body: String) -> Self {
        Envelope {
            v: VERSION,
            id: EventId::new(),
            stream: stream.to_string(),
            kind: kind.to_string(),
            tenant,
            seq: None,
            ts: now_micros(),
            body,
            kid: String::new(),
            mac: String::new(),
        }
    }

    pub fn new(stream: &str, kind: &str, tenant: Option<TenantId>, body: &Value) -> Self {
        Envelope {
            v: VERSION,
            id: EventId::new(),
            stream: stream.to_string(),
            kind: kind.to_string(),
            tenant,
            seq: None,
            ts: now_micros(),
            body: body.to_string(),
            kid: String::new(),
            mac: String::new(),
        }
    }

    pub fn from_outbox(row: &OutboxRow) -> Self {
        Envelope {
            v: VERSION,
            id: row.event_id,
            stream: row.stream.clone(),
            kind: row.kind.clone(),
            tenant: row.tenant,
            seq: row.seq,
            ts: row.created_at,
            body: row.body.clone(),
            kid: String::new(),
            mac: String::new(),
        }
    }

    fn canonical_parts(&self) -> (String, String, String, String, String) {
        (
            self.v.to_string(),
            self.id.to_string(),
            self.tenant.map(|t| t.to_string()).unwrap_or_default(),
            self.seq.map(|s| s.to_string()).unwrap_or_default(),
            self.ts.to_string(),
        )
    }

    fn mac_input<'a>(&'a self, p: &'a (String, String, String, String, String)) -> [&'a [u8]; 9] {
        [
            b"caracal-bus-v1",
            p.0.as_bytes(),
            p.1.as_bytes(),
            self.stream.as_bytes(),
            self.kind.as_bytes(),
            p.2.as_bytes(),
            p.3.as_bytes(),
            p.4.as_bytes(),
            self.body.as_bytes(),
        ]
    }

    /// Sign with the ring's active key.
    pub fn sign(mut self, ring: &KeyRing) -> Self {
        let parts = self.canonical_parts();
        let (kid, tag) = ring.mac(&self.mac_input(&parts));
        let kid = kid.to_string();
        self.kid = kid;
        self.mac = b64url(&tag);
        self
    }

    pub fn to_bytes(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).expect("envelope serialises"))
    }
}

/// Why a message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Malformed,
    Unsigned,
    UnknownKey,
    Forged,
    WrongStream,
    Stale,
    Future,
    Replayed,
}

impl Rejection {
    pub const ALL: [Rejection; 8] = [
        Rejection::Malformed,
        Rejection::Unsigned,
        Rejection::UnknownKey,
        Rejection::Forged,
        Rejection::WrongStream,
        Rejection::Stale,
        Rejection::Future,
        Rejection::Replayed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Malformed => "malformed",
            Rejection::Unsigned => "unsigned",
            Rejection::UnknownKey => "unknown_key",
            Rejection::Forged => "forged",
            Rejection::WrongStream => "wrong_stream",
            Rejection::Stale => "stale",
            Rejection::Future => "future",
            Rejection::Replayed => "replayed",
        }
    }
}

/// Signs outgoing messages and verifies incoming ones.
#[derive(Clone)]
pub struct BusAuth {
    ring: KeyRing,
    max_age: Duration,
    max_future: Duration,
    /// event id → entry id of first sight. A known event id arriving under a *different* entry
    /// id is a replay (or a relay re-publish after a crash): refused either way, since
    /// consumers already saw it.
    seen: Cache<EventId, String>,
    metrics: BusMetrics,
}

impl BusAuth {
    pub fn new(ring: KeyRing, max_age: Duration, metrics: BusMetrics) -> Self {
        BusAuth {
            ring,
            max_age,
            max_future: Duration::from_secs(300),
            seen: Cache::builder().max_capacity(1_000_000).time_to_live(max_age).build(),
            metrics,
        }
    }

    pub fn metrics(&self) -> &BusMetrics {
        &self.metrics
    }

    pub fn sign(&self, env: Envelope) -> Envelope {
        env.sign(&self.ring)
    }

    /// Verify one raw entry read from `stream`.
    pub fn verify(
        &self,
        stream: &str,
        entry_id: &str,
        payload: Option<&[u8]>,
        deliveries: u64,
    ) -> Result<Event, Rejection> {
        let r = self.verify_inner(stream, entry_id, payload, deliveries);
        if let Err(why) = r {
            self.metrics.rejected.with_label_values(&[stream, why.as_str()]).inc();
            tracing::warn!(stream, entry_id, reason = why.as_str(), "refused a bus message");
        }
        r
    }

    fn verify_inner(
        &self,
        stream: &str,
        entry_id: &str,
        payload: Option<&[u8]>,
        deliveries: u64,
    ) -> Result<Event, Rejection> {
        let payload = payload.ok_or(Rejection::Malformed)?;
        let env: Envelope = serde_json::from_slice(payload).map_err(|_| Rejection::Malformed)?;
        if env.v != VERSION {
            return Err(Rejection::Malformed);
        }
        if env.kid.is_empty() || env.mac.is_empty() {
            return Err(Rejection::Unsigned);
        }
        if self.ring.secret(&env.kid).is_none() {
            return Err(Rejection::UnknownKey);
        }
        let tag = b64url_decode(&env.mac).ok_or(Rejection::Forged)?;
        let parts = env.canonical_parts();
        if !self.ring.verify(&env.kid, &env.mac_input(&parts), &tag) {
            return Err(Rejection::Forged);
        }
        if env.stream != stream {
            return Err(Rejection::WrongStream);
        }
        let now = now_micros();
        if env.ts < now - micros(self.max_age) {
            return Err(Rejection::Stale);
        }
        if env.ts > now + micros(self.max_future) {
            return Err(Rejection::Future);
        }
        let first = self.seen.get_with(env.id, || entry_id.to_string());
        if first != entry_id {
            return Err(Rejection::Replayed);
        }
        let body: Value = serde_json::from_str(&env.body).map_err(|_| Rejection::Malformed)?;
        Ok(Event {
            entry_id: entry_id.to_string(),
            id: env.id,
            stream: env.stream,
            kind: env.kind,
            tenant: env.tenant,
            seq: env.seq,
            ts: env.ts,
            body,
            deliveries,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn auth(ring: &KeyRing) -> BusAuth {
        BusAuth::new(ring.clone(), Duration::from_secs(3600), BusMetrics::detached())
    }

    #[test]
    fn verify_accepts_signed_and_refuses_everything_else() {
        let ring = KeyRing::generate("b1");
        let a = auth(&ring);
        let env = Envelope::new("s", "k", None, &json!({"x": 1})).sign(&ring);
        let bytes = env.to_bytes();
        let ev = a.verify("s", "1-0", Some(&bytes), 1).unwrap();
        assert_eq!(ev.body, json!({"x": 1}));
        // Redelivery of the same entry is fine.
        assert!(a.verify("s", "1-0", Some(&bytes), 2).is_ok());
        // The same event under a new entry id is a replay.
        assert_eq!(a.verify("s", "2-0", Some(&bytes), 1).unwrap_err(), Rejection::Replayed);
        // Another stream.
        let b = auth(&ring);
        assert_eq!(
            b.verify("t", "1-0", Some(&bytes), 1).unwrap_err(),
            Rejection::WrongStream
        );
        // Unsigned.
        let unsigned = Envelope::new("s", "k", None, &json!({})).to_bytes();
        assert_eq!(
            a.verify("s", "3-0", Some(&unsigned), 1).unwrap_err(),
            Rejection::Unsigned
        );
        // Forged: body edited after signing.
        let mut forged = Envelope::new("s", "k", None, &json!({"amount": 1})).sign(&ring);
        forged.body = json!({"amount": 1000}).to_string();
        assert_eq!(
            a.verify("s", "4-0", Some(&forged.to_bytes()), 1).unwrap_err(),
            Rejection::Forged
        );
        // Signed by a key we don't hold (same id, other secret).
        let other = KeyRing::generate("b1");
        let env = Envelope::new("s", "k", None, &json!({})).sign(&other);
        assert_eq!(
            a.verify("s", "5-0", Some(&env.to_bytes()), 1).unwrap_err(),
            Rejection::Forged
        );
        let other = KeyRing::generate("b9");
        let env = Envelope::new("s", "k", None, &json!({})).sign(&other);
        assert_eq!(
            a.verify("s", "6-0", Some(&env.to_bytes()), 1).unwrap_err(),
            Rejection::UnknownKey
        );
        // Too old.
        let mut old = Envelope::new("s", "k", None, &json!({}));
        old.ts -= micros(Duration::from_secs(7200));
        assert_eq!(
            a.verify("s", "7-0", Some(&old.sign(&ring).to_bytes()), 1).unwrap_err(),
            Rejection::Stale
        );
        // Garbage.
        assert_eq!(
            a.verify("s", "8-0", Some(b"nope"), 1).unwrap_err(),
            Rejection::Malformed
        );
        assert_eq!(a.verify("s", "9-0", None, 1).unwrap_err(), Rejection::Malformed);
        let rejected: u64 = ["replayed", "unsigned", "forged", "unknown_key", "stale", "malformed"]
            .iter()
            .map(|r| a.metrics().rejected.with_label_values(&["s", r]).get())
            .sum();
        assert_eq!(rejected, 8);
    }
}
