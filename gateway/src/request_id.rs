//! A request's id: the caller's `X-Request-Id` when it is safe to echo, else a fresh random
//! one. Held inline (`Copy`, no allocation): the request's context, its response headers and
//! its audit events each carry their own copy, so nothing about it is shared between the
//! proxy's thread and the audit publisher's (a shared `Arc<str>` moved its reference count
//! between the two cores on every event).

use std::fmt;

/// Ids longer than this from a caller are replaced by a fresh one.
pub const MAX_LEN: usize = 64;

#[derive(Clone, Copy)]
pub struct RequestId {
    len: u8,
    bytes: [u8; MAX_LEN],
}

impl RequestId {
    /// The id of a request that has none yet (a refusal before its head was read).
    pub const UNKNOWN: RequestId = RequestId::from_valid(b"-");

    /// Copied from `b`, which [`Self::parse`] accepts (or is `-`). Anything else that is not
    /// ASCII of at most [`MAX_LEN`] bytes becomes `-`: [`Self::as_str`] relies on it.
    const fn from_valid(b: &[u8]) -> RequestId {
        let b: &[u8] = if b.is_ascii() && b.len() <= MAX_LEN { b } else { b"-" };
        let mut bytes = [0u8; MAX_LEN];
        let mut i = 0;
        while i < b.len() {
            bytes[i] = b[i];
            i += 1;
        }
        RequestId {
            len: b.len() as u8,
            bytes,
        }
    }

    /// The caller's id, when it is 1–64 bytes of `A–Z a–z 0–9 - _ .` (safe in a header, a
    /// log line and JSON as it is).
    pub fn parse(b: &[u8]) -> Option<RequestId> {
        let ok = !b.is_empty()
            && b.len() <= MAX_LEN
            && b.iter()
                .all(|&c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.');
        ok.then(|| RequestId::from_valid(b))
    }

    /// A fresh id: 128 random bits as 32 lower-case hex digits (a UUID v4's simple form).
    pub fn random() -> RequestId {
        let mut buf = uuid::Uuid::encode_buffer();
        RequestId::from_valid(uuid::Uuid::new_v4().simple().encode_lower(&mut buf).as_bytes())
    }

    /// The caller's id if it is usable, else a fresh one.
    pub fn from_caller(v: Option<&[u8]>) -> RequestId {
        v.and_then(RequestId::parse).unwrap_or_else(RequestId::random)
    }

    pub fn as_str(&self) -> &str {
        let b = &self.bytes[..usize::from(self.len)];
        debug_assert!(b.is_ascii());
        // SAFETY: only ASCII is ever stored: the fields are private and `from_valid`, the one
        // constructor, stores nothing else. (Checking again as UTF-8 on every read cost ~170
        // instructions, several times per request.)
        unsafe { std::str::from_utf8_unchecked(b) }
    }
}

impl std::ops::Deref for RequestId {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_ids_are_kept_only_when_safe_to_echo() {
        for ok in ["a", "0123abcd", "req-1_2.3", &"x".repeat(MAX_LEN)] {
            assert_eq!(
                RequestId::parse(ok.as_bytes()).map(|r| r.to_string()),
                Some(ok.to_string())
            );
            assert_eq!(RequestId::from_caller(Some(ok.as_bytes())).as_str(), ok);
        }
        for bad in [
            "".to_string(),
            "x".repeat(MAX_LEN + 1),
            "a b".into(),
            "a\"b".into(),
            "a\r\nX-Evil: 1".into(),
            "é".into(),
            "a/b".into(),
        ] {
            assert!(RequestId::parse(bad.as_bytes()).is_none(), "{bad:?}");
            let fresh = RequestId::from_caller(Some(bad.as_bytes()));
            assert_eq!(fresh.len(), 32);
            assert!(fresh.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        }
    }

    #[test]
    fn fresh_ids_differ_and_the_unknown_id_is_a_dash() {
        let a = RequestId::from_caller(None);
        let b = RequestId::random();
        assert_ne!(a.as_str(), b.as_str());
        assert_eq!(a.len(), 32);
        assert_eq!(RequestId::UNKNOWN.as_str(), "-");
        // Whatever the constructor is given, it holds ASCII (`as_str` relies on it).
        assert_eq!(RequestId::from_valid("é".as_bytes()).as_str(), "-");
        assert_eq!(RequestId::from_valid(&[b'a'; MAX_LEN + 1]).as_str(), "-");
        assert_eq!(RequestId::from_valid(b"abc").as_str(), "abc");
        assert_eq!(format!("{:?}", RequestId::UNKNOWN), "\"-\"");
    }
}
