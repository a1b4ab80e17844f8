//! Authenticated service-to-service requests: an HMAC over the method, target, timestamp,
//! nonce and body digest, with a key id so keys rotate. The verifier refuses a request whose
//! timestamp is outside the allowed skew, whose nonce it has already seen (replay), or whose
//! MAC does not match (checked in constant time).

use std::time::Duration;

use http::HeaderMap;
use http::header::HeaderValue;
use moka::sync::Cache;

use crate::crypto::{KeyRing, b64url, b64url_decode, random_bytes, sha256};
use crate::error::{Error, ErrorCode, Result};
use crate::time::now_secs;

pub const H_KEY_ID: &str = "x-caracal-key-id";
pub const H_TIMESTAMP: &str = "x-caracal-timestamp";
pub const H_NONCE: &str = "x-caracal-nonce";
pub const H_SIGNATURE: &str = "x-caracal-signature";
/// Which service signed (informational; the key decides trust).
pub const H_CALLER: &str = "x-caracal-caller";

fn signed_parts<'a>(
    method: &'a str,
    target: &'a str,
    ts: &'a str,
    nonce: &'a str,
    body_digest: &'a [u8],
) -> [&'a [u8]; 6] {
    [
        b"caracal-request-v1",
        method.as_bytes(),
        target.as_bytes(),
        ts.as_bytes(),
        nonce.as_bytes(),
        body_digest,
    ]
}

#[derive(Clone, Debug)]
pub struct RequestSigner {
    ring: KeyRing,
    caller: String,
}

impl RequestSigner {
    pub fn new(ring: KeyRing, caller: impl Into<String>) -> Self {
        RequestSigner {
            ring,
            caller: caller.into(),
        }
    }

    /// Add the signature headers for `method target` (target = path and query) with `body`.
    pub fn sign(&self, headers: &mut HeaderMap, method: &str, target: &str, body: &[u8]) {
        let ts = now_secs().to_string();
        let nonce = b64url(&random_bytes(16));
        let digest = sha256(body);
        let (kid, tag) = self.ring.mac(&signed_parts(method, target, &ts, &nonce, &digest));
        let set = |h: &mut HeaderMap, k: &'static str, v: &str| {
            if let Ok(v) = HeaderValue::from_str(v) {
                h.insert(k, v);
            }
        };
        set(headers, H_KEY_ID, kid);
        set(headers, H_TIMESTAMP, &ts);
        set(headers, H_NONCE, &nonce);
        set(headers, H_SIGNATURE, &b64url(&tag));
        set(headers, H_CALLER, &self.caller);
    }
}

pub struct RequestVerifier {
    ring: KeyRing,
    max_skew: Duration,
    seen: Cache<String, ()>,
}

impl RequestVerifier {
    pub fn new(ring: KeyRing, max_skew: Duration) -> Self {
        RequestVerifier {
            ring,
            max_skew,
            seen: Cache::builder()
                .max_capacity(2_000_000)
                .time_to_live(max_skew * 2 + Duration::from_secs(1))
                .build(),
        }
    }

    /// Verify a signed request; returns the caller name it claims (trusted because the key
    /// verified).
    pub fn verify(&self, headers: &HeaderMap, method: &str, target: &str, body: &[u8]) -> Result<String> {
        let get = |k: &str| headers.get(k).and_then(|v| v.to_str().ok());
        let unauth = |m: &'static str| Error::new(ErrorCode::Unauthenticated, m);
        let (Some(kid), Some(ts), Some(nonce), Some(sig)) =
            (get(H_KEY_ID), get(H_TIMESTAMP), get(H_NONCE), get(H_SIGNATURE))
        else {
            return Err(unauth("missing service signature"));
        };
        let t: i64 = ts.parse().map_err(|_| unauth("invalid signature timestamp"))?;
        if (now_secs() - t).unsigned_abs() > self.max_skew.as_secs() {
            return Err(unauth("signature timestamp outside the allowed window"));
        }
        if nonce.len() < 16 || nonce.len() > 64 {
            return Err(unauth("invalid nonce"));
        }
        let tag = b64url_decode(sig).ok_or_else(|| unauth("invalid signature encoding"))?;
        let digest = sha256(body);
        if !self
            .ring
            .verify(kid, &signed_parts(method, target, ts, nonce, &digest), &tag)
        {
            return Err(unauth("invalid service signature"));
        }
        // Only a verified request may consume a nonce, so forgeries cannot burn real nonces.
        let key = format!("{kid}:{nonce}");
        let mut fresh = false;
        self.seen.entry(key).or_insert_with(|| {
            fresh = true;
        });
        if !fresh {
            return Err(unauth("replayed request"));
        }
        Ok(get(H_CALLER).unwrap_or("unknown").to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_replay_tamper() {
        let ring = KeyRing::generate("k1");
        let s = RequestSigner::new(ring.clone(), "gateway");
        let v = RequestVerifier::new(ring, Duration::from_secs(60));
        let mut h = HeaderMap::new();
        s.sign(&mut h, "POST", "/internal/x?a=1", b"body");
        assert_eq!(v.verify(&h, "POST", "/internal/x?a=1", b"body").unwrap(), "gateway");
        // Replay of the same signed request.
        assert!(v.verify(&h, "POST", "/internal/x?a=1", b"body").is_err());
        let mut h2 = HeaderMap::new();
        s.sign(&mut h2, "POST", "/internal/x?a=1", b"body");
        assert!(v.verify(&h2, "POST", "/internal/x?a=2", b"body").is_err());
        assert!(v.verify(&h2, "POST", "/internal/x?a=1", b"bodz").is_err());
        assert!(v.verify(&h2, "GET", "/internal/x?a=1", b"body").is_err());
        // An unknown key (another deployment) is refused.
        let other = RequestVerifier::new(KeyRing::generate("k1"), Duration::from_secs(60));
        let mut h3 = HeaderMap::new();
        s.sign(&mut h3, "GET", "/", b"");
        assert!(other.verify(&h3, "GET", "/", b"").is_err());
        assert!(v.verify(&HeaderMap::new(), "GET", "/", b"").is_err());
    }
}
