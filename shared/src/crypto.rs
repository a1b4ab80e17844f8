//! Secrets, key rings and the small set of primitives every service uses (all from `ring`).
//!
//! - [`Secret`]: bytes that never print (`Debug`/`Display` show `***`).
//! - [`KeyRing`]: keys for one purpose, selected by id, with one active key for new MACs and
//!   older ones kept for verification during rotation.
//! - [`random_token`]: 256-bit random strings, [`ct_eq`]: constant-time comparison.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

/// Secret bytes. Never printed, never serialised by accident (no `Serialize`).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<Vec<u8>>);

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Self {
        Secret(Arc::new(bytes))
    }

    /// Fresh random secret of `len` bytes.
    pub fn random(len: usize) -> Self {
        Secret::new(random_bytes(len))
    }

    /// Resolve a secret specification: `env:VAR`, `file:/path`, `base64:…` or `hex:…`.
    pub fn from_spec(spec: &str) -> Result<Secret, String> {
        if let Some(var) = spec.strip_prefix("env:") {
            let v = std::env::var(var).map_err(|_| format!("environment variable {var} is not set"))?;
            return Secret::from_encoded(v.trim()).map_err(|e| format!("environment variable {var}: {e}"));
        }
        if let Some(path) = spec.strip_prefix("file:") {
            let v = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
            return Secret::from_encoded(v.trim()).map_err(|e| format!("file {path}: {e}"));
        }
        Secret::from_encoded(spec)
    }

    /// Decode `base64:…` or `hex:…`.
    pub fn from_encoded(s: &str) -> Result<Secret, String> {
        if let Some(b) = s.strip_prefix("base64:") {
            STANDARD
                .decode(b)
                .or_else(|_| URL_SAFE_NO_PAD.decode(b))
                .map(Secret::new)
                .map_err(|_| "invalid base64".to_string())
        } else if let Some(h) = s.strip_prefix("hex:") {
            hex::decode(h).map(Secret::new).map_err(|_| "invalid hex".to_string())
        } else {
            Err("secrets must be written as env:VAR, file:/path, base64:… or hex:… (never as plain text)".into())
        }
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `base64:…` form, for writing generated dev keys to disk.
    pub fn to_spec(&self) -> String {
        format!("base64:{}", STANDARD.encode(self.expose()))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Keys for one purpose, by id. The active key signs; every key verifies.
#[derive(Clone)]
pub struct KeyRing {
    active: String,
    keys: Arc<BTreeMap<String, (Secret, hmac::Key)>>,
}

impl KeyRing {
    pub fn new(active: String, keys: BTreeMap<String, Secret>) -> Result<KeyRing, String> {
        if !keys.contains_key(&active) {
            return Err(format!("active key {active:?} is not among the configured keys"));
        }
        for id in keys.keys() {
            if id.is_empty()
                || id.len() > 64
                || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(format!("key id {id:?} must be 1-64 characters of [A-Za-z0-9_-]"));
            }
        }
        let keys = keys
            .into_iter()
            .map(|(id, s)| {
                let k = hmac::Key::new(hmac::HMAC_SHA256, s.expose());
                (id, (s, k))
            })
            .collect();
        Ok(KeyRing {
            active,
            keys: Arc::new(keys),
        })
    }

    /// A ring with one fresh random key (dev mode, tests).
    pub fn generate(id: &str) -> KeyRing {
        let mut m = BTreeMap::new();
        m.insert(id.to_string(), Secret::random(32));
        KeyRing::new(id.to_string(), m).expect("valid generated ring")
    }

    pub fn active_id(&self) -> &str {
        &self.active
    }

    pub fn secret(&self, id: &str) -> Option<&Secret> {
        self.keys.get(id).map(|(s, _)| s)
    }

    pub fn active_secret(&self) -> &Secret {
        &self.keys[&self.active].0
    }

    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(|s| s.as_str())
    }

    /// HMAC-SHA256 over `parts` (each length-prefixed so boundaries are unambiguous) with the
    /// active key. Returns (key id, tag).
    pub fn mac(&self, parts: &[&[u8]]) -> (&str, [u8; 32]) {
        let tag = mac_with(&self.keys[&self.active].1, parts);
        (&self.active, tag)
    }

    /// Verify a tag made by [`KeyRing::mac`] with key `id`, in constant time.
    pub fn verify(&self, id: &str, parts: &[&[u8]], tag: &[u8]) -> bool {
        match self.keys.get(id) {
            Some((_, k)) => {
                let expected = mac_with(k, parts);
                ct_eq(&expected, tag)
            }
            None => false,
        }
    }

    /// Keyed hash with the *active* key, for lookups of high-entropy secrets (API keys).
    pub fn keyed_hash(&self, data: &[u8]) -> [u8; 32] {
        mac_with(&self.keys[&self.active].1, &[data])
    }

    /// Keyed hash with a specific key id (lookups must try every key during rotation).
    pub fn keyed_hash_with(&self, id: &str, data: &[u8]) -> Option<[u8; 32]> {
        self.keys.get(id).map(|(_, k)| mac_with(k, &[data]))
    }
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("active", &self.active)
            .field("ids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn mac_with(key: &hmac::Key, parts: &[&[u8]]) -> [u8; 32] {
    let mut ctx = hmac::Context::with_key(key);
    for p in parts {
        ctx.update(&(p.len() as u64).to_be_bytes());
        ctx.update(p);
    }
    let tag = ctx.sign();
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

/// Constant-time equality for secrets and MACs (the time depends on the length only, never
/// on where the inputs differ). Blocks of 128 bytes, then words, then bytes, are XORed and
/// OR-accumulated without branching; the accumulator goes through `black_box` after each, so
/// the loop cannot exit early. (This runs on every gateway request to confirm a cached
/// mandate: `subtle`'s byte-wise loop cost several microseconds on a 1.5 KB token, and a
/// barrier per 8-byte word still ~1,800 instructions.)
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let word = |s: &[u8]| u64::from_ne_bytes(s.try_into().unwrap_or([0; 8]));
    let mut acc: u64 = 0;
    // 128-byte blocks, in two 8-byte lanes (which the compiler turns into 16-byte vector
    // operations): the block's differences are OR-ed without a branch, then folded into the
    // accumulator through `black_box`, which the loop cannot see through to exit early.
    let (ab, ar) = a.split_at(a.len() / 128 * 128);
    let (bb, br) = b.split_at(b.len() / 128 * 128);
    for (x, y) in ab.chunks_exact(128).zip(bb.chunks_exact(128)) {
        let mut d = [0u64; 2];
        for (xs, ys) in x.chunks_exact(16).zip(y.chunks_exact(16)) {
            d[0] |= word(&xs[..8]) ^ word(&ys[..8]);
            d[1] |= word(&xs[8..]) ^ word(&ys[8..]);
        }
        acc = std::hint::black_box(acc | d[0] | d[1]);
    }
    let (aw, ar) = ar.split_at(ar.len() / 8 * 8);
    let (bw, br) = br.split_at(br.len() / 8 * 8);
    for (x, y) in aw.chunks_exact(8).zip(bw.chunks_exact(8)) {
        acc = std::hint::black_box(acc | (word(x) ^ word(y)));
    }
    for (x, y) in ar.iter().zip(br) {
        acc = std::hint::black_box(acc | u64::from(x ^ y));
    }
    std::hint::black_box(acc) == 0
}

pub fn random_bytes(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    SystemRandom::new()
        .fill(&mut v)
        .expect("the system random generator failed");
    v
}

/// A 256-bit random token, URL-safe base64, with a scanner-friendly prefix (`cak_…`).
pub fn random_token(prefix: &str) -> String {
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(random_bytes(32)))
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

pub fn b64url(data: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(data)
}

pub fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(s).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ct_eq_is_exact() {
        let a: Vec<u8> = (0..1500u32).map(|i| (i * 7) as u8).collect();
        assert!(ct_eq(&a, &a.clone()));
        for i in [0usize, 7, 8, 9, 1495, 1499] {
            let mut b = a.clone();
            b[i] ^= 0x40;
            assert!(!ct_eq(&a, &b), "difference at {i}");
        }
        assert!(!ct_eq(&a, &a[..1499]));
        // Every length across the block, word and byte tails; a difference at every index.
        for len in 0..300usize {
            let x: Vec<u8> = (0..len).map(|i| (i * 31 + 5) as u8).collect();
            assert!(ct_eq(&x, &x.clone()), "len {len}");
            for i in 0..len {
                let mut y = x.clone();
                y[i] ^= 1;
                assert!(!ct_eq(&x, &y), "len {len}, difference at {i}");
            }
        }
        assert!(ct_eq(b"", b""));
        assert!(!ct_eq(b"abc", b"abd"));
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::from_spec("hex:00112233").unwrap();
        assert_eq!(format!("{s:?} {s}"), "Secret(***) ***");
        assert!(Secret::from_spec("plaintext").is_err());
        assert!(Secret::from_spec("env:CARACAL_TEST_DOES_NOT_EXIST").is_err());
    }

    #[test]
    fn ring_rotation_verifies_old_and_new() {
        let mut m = BTreeMap::new();
        m.insert("old".to_string(), Secret::random(32));
        m.insert("new".to_string(), Secret::random(32));
        let old = KeyRing::new("old".into(), m.clone()).unwrap();
        let new = KeyRing::new("new".into(), m).unwrap();
        let (kid, tag) = old.mac(&[b"a", b"bc"]);
        assert_eq!(kid, "old");
        assert!(new.verify(kid, &[b"a", b"bc"], &tag));
        // Length prefixes: moving a byte across a boundary changes the MAC.
        assert!(!new.verify(kid, &[b"ab", b"c"], &tag));
        assert!(!new.verify("missing", &[b"a", b"bc"], &tag));
        assert!(!format!("{new:?}").contains("Secret("));
    }

    #[test]
    fn tokens_are_prefixed_and_long() {
        let t = random_token("cak_");
        assert!(t.starts_with("cak_"));
        assert_eq!(t.len(), 4 + 43);
        assert_ne!(t, random_token("cak_"));
    }
}
