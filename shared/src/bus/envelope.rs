//! The signed message format every bus entry carries.
//!
//! Wire form: a JSON object (field `m` of the stream entry). Its MAC is HMAC-SHA256, with the
//! bus key named by `kid`, over the **canonical encoding**: the length-prefixed sequence
//! `"caracal-bus-v1", v, id, stream, kind, tenant, seq, ts, body` (absent values are empty).
//! `body` is the exact JSON text of the payload. On the wire it is carried either verbatim, as
//! the JSON value it is (what this crate writes for bodies it built: no escaping on the way out
//! or unescaping on the way in), or as a JSON string holding that text (what it writes for text
//! it did not build, such as an outbox row's); a reader takes the text from either form, so no
//! JSON re-serialisation can change what was signed. Binding `stream` stops a message signed
//! for one stream from being replayed on another.
//!
//! [`BusAuth::verify`] refuses unsigned, malformed, unknown-key, forged, wrong-stream, too-old,
//! from-the-future and replayed messages, and counts each refusal in a metric.

use std::time::Duration;

use bytes::Bytes;
use moka::sync::Cache;
use serde::Deserialize;
use serde_json::Value;

use crate::crypto::{KeyRing, b64url, b64url_decode};
use crate::ids::{EventId, TenantId};
use crate::metrics::BusMetrics;
use crate::store::outbox::OutboxRow;
use crate::time::{Micros, micros, now_micros};

pub const VERSION: u8 = 1;

#[derive(Debug, Clone, Deserialize)]
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
    #[serde(deserialize_with = "body_text")]
    pub body: String,
    #[serde(default)]
    pub kid: String,
    #[serde(default)]
    pub mac: String,
    /// Whether `body` is known to be exactly one JSON value (this crate serialised it), so
    /// [`Envelope::to_bytes`] can write it verbatim; otherwise it goes as a JSON string.
    #[serde(skip)]
    body_is_json: bool,
}

/// The body's JSON text from either wire form: a JSON string holding it, or the value itself.
fn body_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let raw = Box::<serde_json::value::RawValue>::deserialize(d)?;
    let text = raw.get();
    if text.starts_with('"') {
        serde_json::from_str(text).map_err(serde::de::Error::custom)
    } else {
        Ok(text.to_owned())
    }
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
    /// An envelope whose body is already JSON text: exactly one JSON value, which the caller
    /// built (it is written verbatim into the message; see the module's documentation).
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
            body_is_json: true,
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
            body_is_json: true,
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
            // The database's text is carried as a string, whatever it holds.
            body_is_json: false,
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

    /// The message as it goes on the bus: a JSON object with the fields in declaration order,
    /// the body verbatim when it is known to be one JSON value, else as a JSON string.
    pub fn to_bytes(&self) -> Bytes {
        use std::io::Write as _;
        let body_room = if self.body_is_json {
            self.body.len()
        } else {
            self.body.len() + self.body.len() / 4 + 2
        };
        let mut out = Vec::with_capacity(body_room + self.stream.len() + self.kind.len() + self.mac.len() + 160);
        // Writing to a Vec cannot fail, and these values (integers, strings, ids) always
        // serialise.
        let _ = write!(out, "{{\"v\":{},\"id\":", self.v);
        let _ = serde_json::to_writer(&mut out, &self.id);
        out.extend_from_slice(b",\"stream\":");
        let _ = serde_json::to_writer(&mut out, &self.stream);
        out.extend_from_slice(b",\"kind\":");
        let _ = serde_json::to_writer(&mut out, &self.kind);
        if let Some(t) = &self.tenant {
            out.extend_from_slice(b",\"tenant\":");
            let _ = serde_json::to_writer(&mut out, t);
        }
        if let Some(seq) = self.seq {
            let _ = write!(out, ",\"seq\":{seq}");
        }
        let _ = write!(out, ",\"ts\":{},\"body\":", self.ts);
        if self.body_is_json {
            out.extend_from_slice(self.body.as_bytes());
        } else {
            let _ = serde_json::to_writer(&mut out, &self.body);
        }
        out.extend_from_slice(b",\"kid\":");
        let _ = serde_json::to_writer(&mut out, &self.kid);
        out.extend_from_slice(b",\"mac\":");
        let _ = serde_json::to_writer(&mut out, &self.mac);
        out.push(b'}');
        Bytes::from(out)
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

    #[test]
    fn bodies_go_verbatim_or_as_strings_and_verify_the_same_either_way() {
        let ring = KeyRing::generate("b1");
        let a = auth(&ring);
        let body = json!({"path": "/a\"b\\c", "n": [1, 2.5, null], "s": "é\u{1}"});
        // Built here: the body is written as the JSON value it is, not escaped into a string.
        let env = Envelope::new("s", "k", Some(TenantId::new()), &body).sign(&ring);
        let verbatim = env.to_bytes();
        let text = std::str::from_utf8(&verbatim).unwrap();
        assert!(text.contains(&format!(",\"body\":{},\"kid\":", env.body)), "{text}");
        let ev = a.verify("s", "1-0", Some(&verbatim), 1).unwrap();
        assert_eq!(ev.body, body);
        // The same signed message with its body carried as a string (as outbox rows are).
        let mut as_string = env.clone();
        as_string.body_is_json = false;
        let quoted = as_string.to_bytes();
        assert!(std::str::from_utf8(&quoted).unwrap().contains(",\"body\":\"{"));
        let ev2 = auth(&ring).verify("s", "1-0", Some(&quoted), 1).unwrap();
        assert_eq!((ev2.body, ev2.id, ev2.tenant), (body.clone(), ev.id, ev.tenant));
        // Both are what serde would read back into the same envelope.
        let back: Envelope = serde_json::from_slice(&verbatim).unwrap();
        assert_eq!(
            (back.body.as_str(), back.mac.as_str()),
            (env.body.as_str(), env.mac.as_str())
        );
        // Editing the verbatim body breaks the MAC like editing a string body does.
        let edited = text.replace("2.5", "3.5");
        assert_eq!(
            a.verify("s", "2-0", Some(edited.as_bytes()), 1).unwrap_err(),
            Rejection::Forged
        );
        // Whitespace is part of the signed text too.
        let spaced = text.replace("\"n\":[1,", "\"n\":[1, ");
        assert_ne!(spaced, text);
        assert_eq!(
            a.verify("s", "3-0", Some(spaced.as_bytes()), 1).unwrap_err(),
            Rejection::Forged
        );
        // An outbox row's text goes as a string whatever it holds, and comes back the same.
        let row_text = "{\"a\": 1 }";
        let mut from_db = Envelope::new("s", "k", None, &json!({}));
        from_db.body = row_text.to_string();
        from_db.body_is_json = false;
        let from_db = from_db.sign(&ring);
        let ev3 = auth(&ring).verify("s", "4-0", Some(&from_db.to_bytes()), 1).unwrap();
        assert_eq!(ev3.body, json!({"a": 1}));
    }
}
