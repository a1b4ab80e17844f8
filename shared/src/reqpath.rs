//! Request-path normalisation, shared by the gateway (which authorizes and forwards) and the
//! control plane's simulator (which must answer exactly as the gateway would).
//!
//! A path is percent-decoded once (into UTF-8), its dot segments are resolved and each run of
//! empty segments (`//`) is merged into one `/` (a trailing `/` is kept), as upstreams that
//! merge slashes read it; the authorization sees that decoded form, and the gateway forwards
//! it re-encoded ([`encode_path`]) so the upstream decodes exactly the path that was
//! authorized. Refused
//! outright, because upstreams disagree on what they mean: an encoded `/` or `\` (`%2F`,
//! `%5C`), a backslash, `;` path parameters, NUL and control characters, invalid UTF-8 after
//! decoding, dot segments that climb above the root, and paths that are not absolute.

use crate::error::{Error, ErrorCode};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    NotAbsolute,
    EncodedSeparator,
    Backslash,
    Parameters,
    ControlCharacter,
    BadEncoding,
    AboveRoot,
    TooLong,
}

impl PathError {
    pub fn message(self) -> &'static str {
        match self {
            PathError::NotAbsolute => "the path must start with '/'",
            PathError::EncodedSeparator => "encoded '/' or '\\' in the path is refused",
            PathError::Backslash => "'\\' in the path is refused",
            PathError::Parameters => "';' path parameters are refused",
            PathError::ControlCharacter => "control characters in the path are refused",
            PathError::BadEncoding => "the path is not valid percent-encoded UTF-8",
            PathError::AboveRoot => "the path climbs above the root",
            PathError::TooLong => "the path is too long",
        }
    }
}

impl From<PathError> for Error {
    fn from(e: PathError) -> Error {
        Error::new(ErrorCode::BadRequest, e.message()).with_details(serde_json::json!({ "reason": "path_rejected" }))
    }
}

pub const MAX_PATH: usize = 8 * 1024;

/// Bytes that a path carries as themselves: nothing to decode, nothing refused, nothing
/// [`encode_path`] would encode.
#[inline]
fn is_plain(b: u8) -> bool {
    PLAIN[b as usize]
}

/// [`is_plain`] as a table (one load per byte on every request's path).
static PLAIN: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = matches!(b as u8,
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9'
            | b'-' | b'.' | b'_' | b'~' | b'/'
            | b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b'=' | b':' | b'@');
        b += 1;
    }
    t
};

/// Decode and normalise a raw request path (without the query).
pub fn normalize(raw: &str) -> Result<String, PathError> {
    // The common case: plain bytes, no empty segment and no dot segment; the normal form is
    // the path itself. (Every segment follows a '/', so a path without "/." has no dot
    // segment, and one without "//" no empty segment but perhaps the last.)
    if raw.len() <= MAX_PATH && raw.starts_with('/') && plain_without_empty_segments(raw.as_bytes()) {
        let no_dot_segment =
            !raw.as_bytes().windows(2).any(|w| w == b"/.") || !raw.split('/').any(|seg| seg == "." || seg == "..");
        if no_dot_segment {
            return Ok(raw.to_string());
        }
    }
    normalize_slow(raw)
}

/// Whether every byte of `b` is plain ([`is_plain`]) and no '/' follows another.
#[inline]
fn plain_without_empty_segments(b: &[u8]) -> bool {
    let mut after_slash = false;
    for &c in b {
        if !is_plain(c) || (after_slash && c == b'/') {
            return false;
        }
        after_slash = c == b'/';
    }
    true
}

fn normalize_slow(raw: &str) -> Result<String, PathError> {
    if raw.len() > MAX_PATH {
        return Err(PathError::TooLong);
    }
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let b = raw.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let (Some(h), Some(l)) = (
                    b.get(i + 1).and_then(|c| crate::http::hex_val(*c)),
                    b.get(i + 2).and_then(|c| crate::http::hex_val(*c)),
                ) else {
                    return Err(PathError::BadEncoding);
                };
                let c = h * 16 + l;
                if c == b'/' || c == b'\\' {
                    return Err(PathError::EncodedSeparator);
                }
                out.push(c);
                i += 3;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    let s = String::from_utf8(out).map_err(|_| PathError::BadEncoding)?;
    if s.chars().any(|c| c.is_control()) {
        return Err(PathError::ControlCharacter);
    }
    if s.contains('\\') {
        return Err(PathError::Backslash);
    }
    if s.contains(';') {
        return Err(PathError::Parameters);
    }
    // Resolve dot segments (RFC 3986 §5.2.4) on decoded segments, and merge each run of
    // empty segments into one '/' (as upstreams that merge slashes read the path): an empty
    // segment is dropped unless it is the last, which keeps a trailing '/'.
    let mut segs: Vec<&str> = Vec::new();
    let parts: Vec<&str> = s.split('/').skip(1).collect();
    let last = parts.len().saturating_sub(1);
    for (idx, seg) in parts.iter().enumerate() {
        match *seg {
            "" if idx != last => {}
            "." => {
                if idx == last {
                    segs.push("");
                }
            }
            ".." => {
                if segs.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
                if idx == last {
                    segs.push("");
                }
            }
            other => segs.push(other),
        }
    }
    Ok(format!("/{}", segs.join("/")))
}

/// Percent-encode a normalised path for forwarding: every byte outside the unreserved and
/// sub-delimiter set (and `%` itself) is encoded, so the upstream's single decode yields the
/// authorized path.
pub fn encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len() + 8);
    encode_path_into(path, &mut out);
    out
}

/// [`encode_path`], appended to `out`.
pub fn encode_path_into(path: &str, out: &mut String) {
    if path.bytes().all(is_plain) {
        out.push_str(path);
        return;
    }
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for b in path.bytes() {
        if is_plain(b) {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 15)] as char);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fast_path_answers_exactly_as_the_full_decoder() {
        // Every path over a small alphabet that covers each special case, up to 6 bytes.
        let alphabet: &[&str] = &["/", ".", "a", "%2e", "%41", ";", "\\", "é", "%", "~", "//"];
        let mut paths = vec![String::new()];
        for _ in 0..5 {
            let mut next = Vec::new();
            for p in &paths {
                for a in alphabet {
                    next.push(format!("{p}{a}"));
                }
            }
            paths.extend(next);
            paths.sort();
            paths.dedup();
        }
        for p in &paths {
            assert_eq!(normalize(p), normalize_slow(p), "{p:?}");
            let mut slow = String::new();
            for b in p.bytes() {
                if is_plain(b) {
                    slow.push(b as char);
                } else {
                    slow.push_str(&format!("%{b:02X}"));
                }
            }
            assert_eq!(encode_path(p), slow, "{p:?}");
        }
        assert!(paths.len() > 10_000);
    }

    #[test]
    fn normalization_and_refusals() {
        let ok = |raw: &str, want: &str| assert_eq!(normalize(raw).as_deref(), Ok(want), "{raw}");
        ok("/v1/chat/completions", "/v1/chat/completions");
        ok("/v1/./chat", "/v1/chat");
        ok("/v1/x/../chat", "/v1/chat");
        ok("/v1/%2e%2e/admin", "/admin");
        ok("/v1/%2E%2e/%2e/admin", "/admin");
        ok("/v1/a%20b", "/v1/a b");
        ok("/v1/%252e%252e/admin", "/v1/%2e%2e/admin"); // double encoding decodes once only
        ok("/v1/dir/", "/v1/dir/");
        ok("/v1/dir/.", "/v1/dir/");
        ok("/v1/dir/..", "/v1/");
        ok("/", "/");
        // Runs of empty segments merge into one '/'; a trailing '/' is kept.
        ok("/v1//admin/keys", "/v1/admin/keys");
        ok("/v1///admin//keys", "/v1/admin/keys");
        ok("//v1/admin", "/v1/admin");
        ok("/v1/.//admin/keys", "/v1/admin/keys");
        ok("/v1//./admin", "/v1/admin");
        ok("/v1/x//../admin", "/v1/admin");
        ok("/v1//%61dmin", "/v1/admin");
        ok("/v1/", "/v1/");
        ok("/v1//", "/v1/");
        ok("/v1/dir//.", "/v1/dir/");
        ok("//", "/");
        ok("///", "/");
        let bad = |raw: &str, e: PathError| assert_eq!(normalize(raw), Err(e), "{raw}");
        bad("/v1/a%2fb", PathError::EncodedSeparator);
        bad("/v1/a%2Fb", PathError::EncodedSeparator);
        bad("/v1/a%5cb", PathError::EncodedSeparator);
        bad("/v1/a\\b", PathError::Backslash);
        bad("/v1/chat;jsessionid=1/completions", PathError::Parameters);
        bad("/v1/a%3bb", PathError::Parameters);
        bad("/v1/%00", PathError::ControlCharacter);
        bad("/v1/%0d%0a", PathError::ControlCharacter);
        bad("/v1/%zz", PathError::BadEncoding);
        bad("/v1/%c3", PathError::BadEncoding);
        bad("/..", PathError::AboveRoot);
        bad("/v1/../../etc", PathError::AboveRoot);
        bad("v1/x", PathError::NotAbsolute);
    }

    #[test]
    fn forwarded_form_decodes_to_the_authorized_path() {
        for raw in ["/v1/a b", "/v1/%252e%252e/admin", "/v1/é/x", "/v1/q?x", "/v1/100%25"] {
            let authorized = normalize(raw).unwrap_or_else(|_| raw.to_string());
            let forwarded = encode_path(&authorized);
            assert_eq!(normalize(&forwarded).unwrap(), authorized, "{raw} -> {forwarded}");
        }
    }
}
