//! The Pingora `ProxyHttp` implementation: the per-request path of the forward proxy
//! (`HTTP_PROXY`, absolute-form) and of sidecar listeners (origin-form, bound to one resource).
//!
//! `request_filter` decides (see `decide`); nothing is connected before an allow. The upstream
//! is the egress-checked address; the forwarded path is the one that was authorized; the
//! caller's authority headers are stripped and the resource's credential is injected.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use caracal_shared::error::{Error, ErrorCode};
use caracal_shared::policy::Facts;
use http::header::{self, HeaderName, HeaderValue};
use http_body_util::{BodyExt, Full};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::FailToProxy;
use serde_json::json;

use crate::decide::{AuditInfo, Decision, Established, Target, Who, body_facts, credential};
use crate::forward::Forwarder;
use crate::intercept::TunnelCtx;
use crate::request_id::RequestId;
use crate::state::{Gateway, Injection};

/// Largest body Pingora can replay to the upstream after the gateway read it.
const REPLAY_LIMIT: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub enum Mode {
    /// `HTTP_PROXY`: absolute-form targets (or origin-form with `Host`), `Proxy-Authorization`.
    Forward,
    /// Bound to one resource: origin-form, `Authorization: Bearer` or `X-Caracal-Mandate`.
    Sidecar { tenant: String, resource: String },
}

pub struct Proxy {
    pub gw: Arc<Gateway>,
    pub mode: Mode,
    pub fwd: Arc<Forwarder>,
}

pub struct Ctx {
    /// When the request's head had been read (Pingora makes the context then).
    started: Instant,
    /// This request's id (the client's `X-Request-Id` when usable, else a fresh one), copied
    /// into its audit events.
    rid: RequestId,
    /// (Boxed: the context is moved with Pingora's futures, several times per request.)
    decision: Option<Box<Decision>>,
    /// Body read to decide (replayed or forwarded as a whole).
    body: Option<Bytes>,
    /// Path and query to send upstream.
    forward_target: String,
    /// Budgets reserved for this request, settled when it ends.
    /// (Boxed, as the scanner below: only budgeted requests have one, and every request's
    /// context is moved with Pingora's futures.)
    reservation: Option<Box<crate::budget::Reservation>>,
    /// Reads usage from the response as it streams by (when a budget needs it).
    usage: Option<Box<caracal_shared::metering::UsageScanner>>,
    /// Why the exchange was cut in flight, if it was.
    cut: Option<Cut>,
    /// The request asks for a WebSocket (see [`websocket_upgrade`]); once allowed, the one
    /// upgrade the gateway forwards and lets the upstream accept.
    websocket: bool,
}

/// Write a Caracal JSON error. Authentication failures on the forward proxy answer 407 with
/// `Proxy-Authenticate` (proxy semantics); on a sidecar, 401 with `WWW-Authenticate`.
pub async fn respond_error(
    session: &mut Session,
    err: &Error,
    proxy_auth: bool,
    request_id: &str,
) -> pingora::Result<()> {
    let auth_failure = matches!(
        err.code,
        ErrorCode::MandateMissing
            | ErrorCode::MandateInvalid
            | ErrorCode::MandateExpired
            | ErrorCode::ProxyAuthRequired
            | ErrorCode::Unauthenticated
    );
    let status = match (auth_failure, proxy_auth) {
        (true, true) => 407,
        (true, false) => 401,
        _ => err.status().as_u16(),
    };
    let body = Bytes::from(err.to_json(Some(request_id)).to_string());
    let mut resp = ResponseHeader::build(status, Some(6))?;
    resp.insert_header(header::CONTENT_TYPE, "application/json")?;
    resp.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
    if auth_failure {
        if proxy_auth {
            resp.insert_header(header::PROXY_AUTHENTICATE, "Basic realm=\"caracal\"")?;
        } else {
            resp.insert_header(header::WWW_AUTHENTICATE, "Bearer realm=\"caracal\"")?;
        }
    }
    if let Some(s) = err.retry_after_secs {
        resp.insert_header(header::RETRY_AFTER, s.to_string())?;
    }
    resp.insert_header(X_REQUEST_ID, request_id)?;
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
}

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

fn request_id(req: &RequestHeader) -> RequestId {
    RequestId::from_caller(req.headers.get(X_REQUEST_ID).map(HeaderValue::as_bytes))
}

/// `part`, a slice of `whole`'s bytes, as a `str` (no second UTF-8 check; `None` if it is
/// not inside `whole` or does not start and end on character boundaries).
fn within<'a>(whole: &'a str, part: &[u8]) -> Option<&'a str> {
    let start = (part.as_ptr() as usize).checked_sub(whole.as_ptr() as usize)?;
    whole.get(start..start.checked_add(part.len())?)
}

/// The method's name in upper case, as policy matches it (no allocation for the standard
/// methods).
fn method_name(m: &http::Method) -> Cow<'static, str> {
    use http::Method as M;
    Cow::Borrowed(match *m {
        M::GET => "GET",
        M::POST => "POST",
        M::PUT => "PUT",
        M::DELETE => "DELETE",
        M::PATCH => "PATCH",
        M::HEAD => "HEAD",
        M::OPTIONS => "OPTIONS",
        M::CONNECT => "CONNECT",
        M::TRACE => "TRACE",
        _ => return Cow::Owned(m.as_str().to_ascii_uppercase()),
    })
}

/// Whether a target's scheme is `https` (`Some(true)`) or `http` (`Some(false)`), in any case;
/// `None` for any other scheme (compared in place, without a lower-cased copy).
fn is_https(scheme: &[u8]) -> Option<bool> {
    if scheme.eq_ignore_ascii_case(b"http") {
        Some(false)
    } else if scheme.eq_ignore_ascii_case(b"https") {
        Some(true)
    } else {
        None
    }
}

fn split_host_port(authority: &str, default_port: u16) -> Result<(String, u16), Error> {
    let bad = || Error::bad_request("invalid target authority");
    if authority.contains('@') {
        return Err(Error::bad_request("credentials in the target URL are refused"));
    }
    let (mut host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or_else(bad)?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| bad())?,
            None if after.is_empty() => default_port,
            None => return Err(bad()),
        };
        (h.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().map_err(|_| bad())?),
            None => (authority.to_string(), default_port),
        }
    };
    if host.is_empty() || host.len() > 253 {
        return Err(bad());
    }
    host.make_ascii_lowercase();
    Ok((host, port))
}

/// Whether a `Host` value is exactly `host` (followed by `:port` when one is given).
fn host_is(v: &[u8], host: &str, port: Option<u16>) -> bool {
    let Some(rest) = v.strip_prefix(host.as_bytes()) else {
        return false;
    };
    match port {
        None => rest.is_empty(),
        Some(p) => rest.strip_prefix(b":").is_some_and(|digits| {
            !digits.starts_with(b"0") && std::str::from_utf8(digits).ok().and_then(|d| d.parse::<u16>().ok()) == Some(p)
        }),
    }
}

/// Whether `hosts` (a request's `Host` values) is exactly one value, and that one is `host`
/// (with `:port` when one is given): a second `Host` must never survive the rewrite.
fn only_host_is<'a>(hosts: &mut impl Iterator<Item = &'a HeaderValue>, host: &str, port: Option<u16>) -> bool {
    let first = hosts.next();
    hosts.next().is_none() && first.is_some_and(|h| host_is(h.as_bytes(), host, port))
}

/// The path and query sent upstream: the sidecar's base path, the authorized path re-encoded,
/// the client's parameters minus any that would shadow an injected credential, then that
/// credential.
fn forward_target(base: Option<&str>, path: &str, query: Option<&str>, injected: Option<(&str, &str)>) -> String {
    let mut out = String::with_capacity(
        base.map_or(0, str::len)
            + path.len()
            + query.map_or(0, str::len)
            + injected.map_or(0, |(n, v)| n.len() + v.len() + 2)
            + 8,
    );
    if let Some(b) = base {
        out.push_str(b);
    }
    caracal_shared::reqpath::encode_path_into(path, &mut out);
    let mut sep = '?';
    for p in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        if let Some((name, _)) = injected
            && param_named(p, name)
        {
            continue;
        }
        out.push(sep);
        out.push_str(p);
        sep = '&';
    }
    if let Some((name, value)) = injected {
        out.push(sep);
        out.push_str(name);
        out.push('=');
        out.push_str(value);
    }
    out
}

/// Whether the query parameter `param` (`name` or `name=value`, as sent) is named `name` once
/// its name is decoded as an upstream decodes it (form decoding: `%XX` is the byte it
/// encodes, `+` a space; a `%` not followed by two hex digits is itself). Compared byte by
/// byte as it decodes: nothing is allocated.
fn param_named(param: &str, name: &str) -> bool {
    let raw = param.as_bytes();
    let raw = &raw[..raw.iter().position(|&b| b == b'=').unwrap_or(raw.len())];
    let mut want = name.as_bytes().iter();
    let mut i = 0;
    while i < raw.len() {
        let (c, step) = match raw[i] {
            b'%' => match (
                raw.get(i + 1).and_then(|c| caracal_shared::http::hex_val(*c)),
                raw.get(i + 2).and_then(|c| caracal_shared::http::hex_val(*c)),
            ) {
                (Some(h), Some(l)) => (h * 16 + l, 3),
                _ => (b'%', 1),
            },
            b'+' => (b' ', 1),
            c => (c, 1),
        };
        if want.next() != Some(&c) {
            return false;
        }
        i += step;
    }
    want.next().is_none()
}

/// The token of a `Bearer` authorization header, as [`credential`] would split it (the
/// header trimmed, the scheme up to the first space, the rest trimmed), on raw bytes.
fn raw_bearer(h: &[u8]) -> Option<&[u8]> {
    let h = h.trim_ascii();
    let sp = h.iter().position(|&b| b == b' ')?;
    let (scheme, rest) = (&h[..sp], h[sp + 1..].trim_ascii());
    (scheme.eq_ignore_ascii_case(b"bearer") && !rest.is_empty()).then_some(rest)
}

/// Whether a request asks for a WebSocket (RFC 6455 §4.1): an HTTP/1.1 `GET` whose only
/// `Upgrade` value is `websocket` (any case) — the one upgrade Pingora's upstream request policy
/// forwards (with `Connection: Upgrade`). Any other upgrade (`h2c`, a list, another protocol,
/// another method) is stripped and the request goes as a plain one.
fn websocket_upgrade(req: &RequestHeader) -> bool {
    if req.version != http::Version::HTTP_11 || req.method != http::Method::GET {
        return false;
    }
    only_value(&req.headers, header::UPGRADE, |v| v.eq_ignore_ascii_case(b"websocket"))
}

/// Whether `headers` carry `name` exactly once, with a value `ok` accepts.
fn only_value(headers: &http::HeaderMap, name: HeaderName, ok: impl FnOnce(&[u8]) -> bool) -> bool {
    let mut all = headers.get_all(name).iter();
    all.next().is_some_and(|v| ok(v.as_bytes())) && all.next().is_none()
}

/// Whether a `101` accepts the WebSocket `req` asked for (RFC 6455 §4.2.2): `Upgrade:
/// websocket` and the `Sec-WebSocket-Accept` of the request's one `Sec-WebSocket-Key`. A 101
/// without them did not come from a WebSocket handshake (an endpoint whose status a client can
/// steer, a server switching to something else): the raw pipe it would open could carry plain
/// HTTP requests to the upstream, past every per-request decision.
fn accepts_websocket(req: &RequestHeader, resp: &ResponseHeader) -> bool {
    use base64::Engine as _;
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let mut keys = req.headers.get_all(header::SEC_WEBSOCKET_KEY).iter();
    let (Some(key), None) = (keys.next(), keys.next()) else {
        return false;
    };
    if !only_value(&resp.headers, header::UPGRADE, |v| v.eq_ignore_ascii_case(b"websocket")) {
        return false;
    }
    let mut sha1 = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    sha1.update(key.as_bytes());
    sha1.update(GUID);
    let want = base64::engine::general_purpose::STANDARD.encode(sha1.finish());
    only_value(&resp.headers, header::SEC_WEBSOCKET_ACCEPT, |v| v == want.as_bytes())
}

/// The request's declared `Content-Length`, when it is a number.
fn content_length(req: &RequestHeader) -> Option<usize> {
    req.headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// The request's body, read whole (for a rule or budget that inspects it), at most `max` bytes.
async fn read_body(session: &mut Session, max: usize) -> Result<Bytes, Error> {
    session.enable_retry_buffering();
    let mut buf = BytesMut::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if buf.len() + chunk.len() > max {
                    return Err(too_big(max));
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(buf.freeze()),
            Err(_) => return Err(Error::bad_request("the request body could not be read")),
        }
    }
}

/// A request whose header map cannot take the gateway's additions.
fn too_many_headers() -> Box<pingora::Error> {
    pingora::Error::explain(pingora::ErrorType::InvalidHTTPHeader, "too many request headers")
}

fn too_big(max: usize) -> Error {
    Error::new(
        ErrorCode::PayloadTooLarge,
        format!("request bodies that policy inspects are limited to {max} bytes"),
    )
}

/// Remove from `headers`, in place, every field whose name `drop` matches (all its values);
/// each other field keeps all its values, in order (the order between different names may
/// change, which HTTP leaves without meaning). Each pass over the names removes up to
/// four of them; a request that carries none (the common case) costs one pass and no hashing.
fn remove_matching(headers: &mut http::HeaderMap, drop: impl Fn(&HeaderName) -> bool) {
    loop {
        let mut found: [Option<HeaderName>; 4] = [const { None }; 4];
        let mut n = 0;
        for name in headers.keys() {
            if drop(name) {
                found[n] = Some(name.clone());
                n += 1;
                if n == found.len() {
                    break;
                }
            }
        }
        for name in found.iter().flatten() {
            headers.remove(name);
        }
        if n < found.len() {
            return;
        }
    }
}

/// The fields a message's `Connection` header nominates (RFC 9110 §7.6.1), as the raw tokens
/// (any case); the `keep-alive` and `close` options name no field and are left out. Most
/// messages carry no `Connection`, or only those options: then this yields nothing, and
/// allocates nothing either way.
fn connection_nominations(headers: &http::HeaderMap) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty() && !t.eq_ignore_ascii_case(b"keep-alive") && !t.eq_ignore_ascii_case(b"close"))
}

/// Whether `headers`' `Connection` nominates the field `name`.
fn nominated(headers: &http::HeaderMap, name: &HeaderName) -> bool {
    connection_nominations(headers).any(|t| t.eq_ignore_ascii_case(name.as_str().as_bytes()))
}

/// Remove an upstream response's hop-by-hop fields (RFC 9110 §7.6.1): those of
/// [`RESPONSE_STRIPPED`] and the fields its `Connection` nominates, except those Pingora writes
/// the client's response from (`Connection` itself, which it rewrites, and the framing). A
/// response without them (the common case) costs one pass over its names and a scan of
/// `Connection`, and allocates nothing. The 101 that accepts a WebSocket keeps its `Upgrade`
/// (`switched`): the client's handshake needs it.
fn strip_response_hop_by_hop(resp: &mut ResponseHeader, switched: bool) {
    if resp.headers.keys().any(|n| RESPONSE_STRIPPED.contains(n)) {
        for n in &RESPONSE_STRIPPED {
            resp.remove_header(n);
        }
    }
    if connection_nominations(&resp.headers).next().is_some() {
        let names: Vec<HeaderName> = connection_nominations(&resp.headers)
            .filter_map(|t| HeaderName::from_bytes(t).ok())
            .filter(|n| !(kept_in_response(n) || switched && n == header::UPGRADE))
            .collect();
        for n in &names {
            resp.remove_header(n);
        }
    }
}

/// Response fields a `Connection` nomination never removes: `Connection` (rewritten by
/// Pingora) and the framing the client's response is written from.
fn kept_in_response(name: &HeaderName) -> bool {
    name == header::CONNECTION || name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING
}

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// Upstream response fields that never reach the client: `Keep-Alive` (hop-by-hop), and an
/// upstream's proxy authentication challenge and its result (RFC 9110 §11.7: they concern
/// only the next client on the chain, which is the gateway; relayed, they would read as the
/// gateway asking the agent for proxy credentials).
const RESPONSE_STRIPPED: [HeaderName; 3] = [
    KEEP_ALIVE,
    header::PROXY_AUTHENTICATE,
    HeaderName::from_static("proxy-authentication-info"),
];

/// Request headers that never go upstream: the caller's authority and hop-by-hop fields
/// (`Connection` and what it names are handled by Pingora and the forwarder).
const STRIPPED: [HeaderName; 7] = [
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("proxy-connection"),
    X_CARACAL_MANDATE,
    KEEP_ALIVE,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

const X_CARACAL_MANDATE: HeaderName = HeaderName::from_static("x-caracal-mandate");

impl Proxy {
    fn proxy_auth(&self) -> bool {
        matches!(self.mode, Mode::Forward)
    }

    fn secret<'a>(&self, req: &'a RequestHeader, tunnel: Option<&'a TunnelCtx>) -> Option<Cow<'a, str>> {
        // UTF-8 is all the credential parsers need (a cached token is compared byte for byte;
        // anything else is parsed and verified), and it is checked faster than `to_str`'s
        // visible-ASCII rule over a 2 KB mandate.
        let get = |n: &HeaderName| req.headers.get(n).and_then(|v| std::str::from_utf8(v.as_bytes()).ok());
        match self.mode {
            // Inside an intercepted tunnel the CONNECT's credential applies.
            Mode::Forward => get(&header::PROXY_AUTHORIZATION)
                .and_then(credential)
                .or_else(|| tunnel.and_then(|t| t.secret.as_deref().map(Cow::Borrowed))),
            Mode::Sidecar { .. } => get(&X_CARACAL_MANDATE)
                .map(|s| Cow::Borrowed(s.trim()))
                .or_else(|| get(&header::AUTHORIZATION).and_then(credential)),
        }
    }

    /// The bearer token [`Proxy::secret`] would find, as raw header bytes — `None` where it
    /// would find something else (a Basic credential, no credential). Only for the cache-hit
    /// fast path: a hit means the bytes are a verified token, so `secret` would have found
    /// the same one; anything else takes the full path.
    fn raw_bearer<'a>(&self, req: &'a RequestHeader, tunnel: Option<&'a TunnelCtx>) -> Option<&'a [u8]> {
        let get = |n: &HeaderName| req.headers.get(n).map(|v| v.as_bytes());
        match self.mode {
            Mode::Forward => match get(&header::PROXY_AUTHORIZATION) {
                Some(h) => raw_bearer(h),
                None => tunnel.and_then(|t| t.secret.as_deref().map(str::as_bytes)),
            },
            Mode::Sidecar { .. } => match get(&X_CARACAL_MANDATE) {
                Some(h) => Some(h.trim_ascii()),
                None => get(&header::AUTHORIZATION).and_then(raw_bearer),
            },
        }
    }

    fn target(
        &self,
        req: &RequestHeader,
        tunnel: Option<&TunnelCtx>,
    ) -> Result<(Target, Option<caracal_shared::ids::ResourceId>), Error> {
        let raw =
            std::str::from_utf8(req.raw_path()).map_err(|_| Error::bad_request("the request target is not UTF-8"))?;
        let method = method_name(&req.method);
        let split = |pq: &str| -> (String, Option<String>) {
            match pq.split_once('?') {
                Some((p, q)) => (
                    if p.is_empty() { "/".into() } else { p.to_string() },
                    Some(q.to_string()),
                ),
                None => (if pq.is_empty() { "/".into() } else { pq.to_string() }, None),
            }
        };
        if let Some(t) = tunnel {
            // Inside an intercepted tunnel: origin-form, to the host the CONNECT named.
            if !raw.starts_with('/') {
                return Err(Error::bad_request("requests inside a tunnel are origin-form"));
            }
            if let Some(h) = req.headers.get(header::HOST).and_then(|h| h.to_str().ok()) {
                let (host, port) = split_host_port(h, t.port)?;
                if host != t.host || port != t.port {
                    return Err(Error::bad_request(
                        "the request's Host is not the host the tunnel was opened to",
                    ));
                }
            }
            let (path, query) = split(raw);
            return Ok((
                Target {
                    method,
                    host: t.host.clone(),
                    port: t.port,
                    https: true,
                    path,
                    query,
                },
                None,
            ));
        }
        match &self.mode {
            Mode::Sidecar { tenant, resource } => {
                let snap = self.gw.snapshot();
                let id = snap
                    .tenants
                    .get(tenant)
                    .and_then(|t| snap.by_name.get(&(*t, resource.clone())))
                    .copied()
                    .ok_or_else(|| Error::new(ErrorCode::Unavailable, "the sidecar's resource does not exist"))?;
                let r = snap
                    .resources
                    .get(&id)
                    .ok_or_else(|| Error::new(ErrorCode::Unavailable, "the sidecar's resource is unavailable"))?;
                if !raw.starts_with('/') {
                    return Err(Error::bad_request("a sidecar takes origin-form requests"));
                }
                let (path, query) = split(raw);
                Ok((
                    Target {
                        method,
                        host: r.base_host.clone(),
                        port: r.base_port,
                        https: r.https,
                        path,
                        query,
                    },
                    Some(id),
                ))
            }
            Mode::Forward => match pingora_http::authority::raw_target_authority(raw.as_bytes()) {
                pingora_http::authority::RawTargetAuthority::Absolute {
                    scheme,
                    authority,
                    path_and_query,
                } => {
                    let https = is_https(scheme)
                        .ok_or_else(|| Error::bad_request("only http and https targets are proxied"))?;
                    let authority = within(raw, authority).ok_or_else(|| Error::bad_request("invalid authority"))?;
                    let (host, port) = split_host_port(authority, if https { 443 } else { 80 })?;
                    let pq = within(raw, path_and_query).ok_or_else(|| Error::bad_request("invalid path"))?;
                    let (path, query) = split(pq);
                    Ok((
                        Target {
                            method,
                            host,
                            port,
                            https,
                            path,
                            query,
                        },
                        None,
                    ))
                }
                pingora_http::authority::RawTargetAuthority::None => {
                    let host = req
                        .headers
                        .get(header::HOST)
                        .and_then(|h| h.to_str().ok())
                        .ok_or_else(|| Error::bad_request("the request names no host"))?;
                    let (host, port) = split_host_port(host, 80)?;
                    let (path, query) = split(raw);
                    Ok((
                        Target {
                            method,
                            host,
                            port,
                            https: false,
                            path,
                            query,
                        },
                        None,
                    ))
                }
                pingora_http::authority::RawTargetAuthority::AmbiguousAuthority => {
                    Err(Error::bad_request("ambiguous request target"))
                }
            },
        }
    }

    /// Who is asking: the request's mandate or API key (borrowed from its headers), else the
    /// client certificate the mTLS listener verified.
    async fn authenticate(
        &self,
        session: &Session,
        tunnel: Option<&TunnelCtx>,
        request_id: &str,
    ) -> Result<Arc<crate::state::Cached>, Error> {
        if let Some(token) = self.raw_bearer(session.req_header(), tunnel)
            && let Some(decided) = self.gw.authenticate_cached(token)
        {
            return decided;
        }
        let secret = self.secret(session.req_header(), tunnel);
        let cert = crate::mtls::peer_cert_of(session.digest().and_then(|d| d.ssl_digest.as_deref()));
        Box::pin(self.gw.authenticate(secret.as_deref(), cert.as_deref(), request_id)).await
    }

    /// The decision for an authenticated request, reading the body first when a rule needs
    /// it. On refusal, what was established so far goes with the error (for the audit event).
    async fn decide(
        &self,
        session: &mut Session,
        t: &Target,
        bound: Option<caracal_shared::ids::ResourceId>,
        c: Arc<crate::state::Cached>,
        ctx: &mut Ctx,
    ) -> Result<Decision, (Error, Partial)> {
        let gw = &self.gw;
        // One snapshot for the whole decision (taking it costs a lock and a reference count).
        let snap = gw.snapshot();
        let (r, path) = gw.select(&snap, &c, t, bound).map_err(|e| {
            (
                e,
                Partial {
                    mandate: Some(c.clone()),
                    ..Default::default()
                },
            )
        })?;
        let partial = |e: Error| {
            (
                e,
                Partial {
                    mandate: Some(c.clone()),
                    resource: Some(r.clone()),
                    path: Some(path.clone()),
                },
            )
        };
        let budgets = gw.budgets_for(&snap, &c, &r);
        // A WebSocket's frames are not read: where a rule, an allowlist or a budget would read
        // a request's body (as they would a `POST`'s), the upgrade is refused.
        if ctx.websocket && gw.body_need(&snap, &c, &r, "POST", &budgets).is_some() {
            return Err(partial(
                Error::new(
                    ErrorCode::PolicyDenied,
                    "a rule, allowlist or budget here reads request bodies, which a WebSocket's frames do not \
                     expose: the upgrade is refused",
                )
                .with_details(json!({ "reason": "upgrade_uninspectable" })),
            ));
        }
        let body_facts_v = if let Some(need) = gw.body_need(&snap, &c, &r, &t.method, &budgets) {
            let max = gw.rt.config.gateway.max_inspect_body;
            if let Some(len) = content_length(session.req_header())
                && len > max
            {
                return Err(partial(too_big(max)));
            }
            // (Boxed, as every await below that an unbudgeted request with no inspected body
            // does not reach: their futures would otherwise be laid out inside this one, which
            // Pingora boxes and copies on every request. A budgeted request pays one small
            // allocation for its reservation and still costs fewer instructions: see
            // bench/RESULTS.md.)
            let body = Box::pin(read_body(session, max)).await.map_err(partial)?;
            let facts = body_facts(&body, need).map_err(partial)?;
            ctx.body = Some(body);
            facts
        } else {
            Default::default()
        };
        let facts = Facts {
            method: &t.method,
            host: &t.host,
            path: &path,
            model: &body_facts_v.model,
            tool: &body_facts_v.tool,
        };
        let rule = gw.authorize(&snap, &c, &r, &facts).map_err(partial)?;
        let upstream_host = if bound.is_some() {
            r.base_host.clone()
        } else {
            t.host.clone()
        };
        let addr = gw.resolve(&r, &upstream_host, r.base_port).await.map_err(partial)?;
        // Last step: reserve the worst case on every budget that applies.
        if !budgets.is_empty() {
            let body_len = ctx
                .body
                .as_ref()
                .map(|b| b.len())
                .unwrap_or_else(|| content_length(session.req_header()).unwrap_or(0));
            // The tenant's name labels the budget's spend metric (names, never ids).
            let tenant = snap.tenant_names.get(&c.m.claims.tenant).map_or("", |t| &**t);
            let rfacts = caracal_shared::metering::RequestFacts {
                model: body_facts_v.model,
                max_tokens: body_facts_v.max_tokens,
                body_len,
            };
            let reservation = Box::pin(gw.budgets.reserve(budgets, tenant, r.pricing.clone(), rfacts))
                .await
                .map_err(partial)?;
            ctx.reservation = reservation.map(Box::new);
        }
        Ok(Decision {
            mandate: c,
            resource: r,
            path,
            rule,
            addr,
            upstream_host,
        })
    }

    /// Whether the request carries exactly one `Host`, already the one to send upstream.
    fn host_ok<'a>(d: &Decision, mut hosts: impl Iterator<Item = &'a HeaderValue>) -> bool {
        let default_port = if d.resource.https { 443 } else { 80 };
        let port = (d.resource.base_port != default_port).then_some(d.resource.base_port);
        only_host_is(&mut hosts, &d.upstream_host, port)
    }

    /// Whether a request header never goes upstream: the caller's authority (on a sidecar
    /// also `Authorization`) and hop-by-hop fields.
    fn stripped(&self, name: &HeaderName) -> bool {
        STRIPPED.contains(name) || matches!(self.mode, Mode::Sidecar { .. }) && name == header::AUTHORIZATION
    }

    /// Add the gateway's upstream request headers to headers already stripped (see
    /// [`Self::stripped`]): the resource's credential, `Host` (unless `host_ok`: already the
    /// one to send, see [`Self::host_ok`]), `X-Request-Id` and this gateway's `Via` entry.
    /// Room is made once, first, for exactly the fields that may be new (Pingora sizes the map
    /// to the request's own fields, so it grows once here); a map already at its size limit
    /// refuses.
    fn add_headers(
        &self,
        d: &Decision,
        request_id: &str,
        host_ok: bool,
        headers: &mut http::HeaderMap,
    ) -> Result<(), http::header::MaxSizeReached> {
        let inject = match &d.resource.inject {
            Injection::Header(name, value) => Some((name, value)),
            _ => None,
        };
        headers.try_reserve(usize::from(inject.is_some()) + usize::from(!host_ok) + 2)?;
        if let Some((name, value)) = inject {
            // `insert` replaces every value the caller sent under that name.
            headers.try_insert(name.clone(), value.clone())?;
        }
        if !host_ok {
            let default_port = if d.resource.https { 443 } else { 80 };
            let port = (d.resource.base_port != default_port).then_some(d.resource.base_port);
            let value = match port {
                None => HeaderValue::from_str(&d.upstream_host),
                Some(p) => HeaderValue::from_str(&format!("{}:{p}", d.upstream_host)),
            };
            if let Ok(v) = value {
                headers.try_insert(header::HOST, v)?;
            }
        }
        if let Ok(v) = HeaderValue::from_str(request_id) {
            headers.try_insert(X_REQUEST_ID, v)?;
        }
        // This gateway's entry goes last in the `Via` list, as a field line of its own: the
        // same list as one comma-joined line (RFC 9110 §5.3), and every entry the client sent
        // is kept as it was.
        headers.try_append(header::VIA, self.gw.via.clone())?;
        Ok(())
    }

    fn forward_target(&self, d: &Decision, query: Option<&str>) -> String {
        let base = matches!(self.mode, Mode::Sidecar { .. }).then_some(d.resource.base_path.as_str());
        let injected = match &d.resource.inject {
            Injection::Query(name, value) => Some((name.as_str(), value.as_str())),
            _ => None,
        };
        forward_target(base, &d.path, query, injected)
    }

    /// Send a request whose (large) body was read to decide, with the gateway's forwarder, and
    /// stream the response back.
    async fn forward_buffered(&self, session: &mut Session, ctx: &mut Ctx) -> pingora::Result<()> {
        let d = ctx.decision.as_ref().expect("decided");
        let req = session.req_header();
        let mut b = http::Request::builder()
            .method(req.method.clone())
            .uri(ctx.forward_target.as_str());
        let mut headers = req.headers.clone();
        // `Connection` goes, and so do the fields it nominates (RFC 9110 §7.6.1), as on
        // Pingora's path; `Host` and the credential are set again below.
        let nominates = connection_nominations(&req.headers).next().is_some();
        remove_matching(&mut headers, |n| {
            self.stripped(n) || n == header::CONNECTION || nominates && nominated(&req.headers, n)
        });
        self.add_headers(d, &ctx.rid, false, &mut headers)
            .map_err(|_| too_many_headers())?;
        if let Some(h) = b.headers_mut() {
            *h = headers;
        }
        let body = ctx.body.take().unwrap_or_default();
        let hreq = b
            .body(Full::new(body))
            .map_err(|_| pingora::Error::new(pingora::ErrorType::InternalError))?;
        let sni = d.resource.https.then_some(d.upstream_host.as_str());
        let ca = d.resource.upstream_ca_der.as_deref().map(|v| v.as_slice());
        match self.fwd.send(d.addr, sni, ca, hreq).await {
            Ok((resp, lease)) => {
                // Nothing this forwarder sends asks to switch protocols (the request's
                // `Upgrade` stays here): an upstream's 101 is refused, as on Pingora's path.
                if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                    return Err(pingora::Error::explain(
                        pingora::ErrorType::HTTPStatus(502),
                        "the upstream switched protocols without an upgrade the gateway forwarded",
                    ));
                }
                let (parts, mut body) = resp.into_parts();
                if ctx.reservation.as_ref().is_some_and(|r| r.needs_usage()) {
                    let ct = parts
                        .headers
                        .get(header::CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    ctx.usage = Some(Box::new(caracal_shared::metering::UsageScanner::new(ct)));
                }
                let mut rh = ResponseHeader::build(parts.status, Some(parts.headers.len()))?;
                // Hop-by-hop fields stay on the upstream's hop: `Connection`, `Keep-Alive`,
                // what `Connection` nominates (RFC 9110 §7.6.1), and the framing (Pingora
                // frames the client's response).
                let nominates = connection_nominations(&parts.headers).next().is_some();
                for (k, v) in parts.headers.iter() {
                    if k == header::CONNECTION
                        || k == header::TRANSFER_ENCODING
                        || RESPONSE_STRIPPED.contains(k)
                        || nominates && !kept_in_response(k) && nominated(&parts.headers, k)
                    {
                        continue;
                    }
                    rh.append_header(k.clone(), v.clone())?;
                }
                session.write_response_header(Box::new(rh), false).await?;
                let mut complete = true;
                while let Some(frame) = body.frame().await {
                    match frame {
                        Ok(f) => {
                            if d.mandate.is_revoked(&self.gw.revocations) {
                                self.gw.metrics.responses_cut.inc();
                                return Err(pingora::Error::explain(
                                    pingora::ErrorType::InternalError,
                                    "mandate revoked mid-response",
                                ));
                            }
                            if let Ok(data) = f.into_data() {
                                if let Some(u) = ctx.usage.as_mut() {
                                    u.feed(&data);
                                }
                                session.write_response_body(Some(data), false).await?;
                            }
                        }
                        Err(_) => {
                            complete = false;
                            break;
                        }
                    }
                }
                session.write_response_body(None, true).await?;
                if complete {
                    lease.release();
                }
                Ok(())
            }
            Err(e) => {
                self.gw
                    .metrics
                    .upstream_errors
                    .with_label_values(&[e.code.as_str()])
                    .inc();
                respond_error(session, &e, false, &ctx.rid).await
            }
        }
    }
}

impl Proxy {
    /// Cut a request in flight whose mandate was revoked (one atomic load unless the
    /// revocation set changed); a WebSocket's session is cut at its mandate's expiry too, and
    /// while the revocation feed is stale (a revocation may be missing: new requests are
    /// refused then, and a session outlives any request).
    fn cut_if_over(&self, ctx: &mut Ctx) -> pingora::Result<()> {
        let Some(d) = &ctx.decision else { return Ok(()) };
        let cut = if d.mandate.is_revoked(&self.gw.revocations) {
            Cut::Revoked
        } else if ctx.websocket && d.mandate.m.claims.expires_at <= caracal_shared::time::coarse_now_secs() {
            Cut::Expired
        } else if ctx.websocket && self.gw.revocations.is_stale() {
            Cut::FeedStale
        } else {
            return Ok(());
        };
        self.gw.metrics.responses_cut.inc();
        ctx.cut = Some(cut);
        Err(pingora::Error::explain(
            pingora::ErrorType::InternalError,
            cut.log_line(),
        ))
    }

    /// Record how a WebSocket session, or an exchange cut in flight, ended (its decision
    /// event recorded how it began).
    fn record_end(&self, session: &Session, failed: bool, ctx: &Ctx) {
        let Some(d) = &ctx.decision else { return };
        let who = Who::of(&d.mandate);
        let ev = ExchangeEnd {
            request_id: ctx.rid,
            kind: if ctx.websocket { "websocket" } else { "http" },
            outcome: match ctx.cut {
                Some(c) => c.outcome(),
                None if failed => "error",
                None => "closed",
            },
            status: session.response_written().map(|r| r.status.as_u16()),
            duration_ms: i64::try_from(ctx.started.elapsed().as_millis()).unwrap_or(i64::MAX),
            resource: d.resource.res.id,
            who,
            gateway: self.gw.gateway_id,
        };
        if let Err(e) = self.gw.audit.emit_record("exchange_end", Some(who.tenant), ev) {
            tracing::warn!(error = %e, request_id = %ctx.rid, "the end of an exchange could not be recorded");
        }
    }

    /// Settle a request's budgets from what the response reported, and record it.
    fn settle(&self, r: crate::budget::Reservation, ctx: &mut Ctx, failed: bool) {
        let mut scanner = ctx.usage.take();
        let usage = scanner.as_mut().and_then(|s| s.finish());
        // A stream that ended early (client gone, upstream cut) is settled for what was
        // delivered; anything else without usage at the worst case.
        let cut_short = scanner
            .as_ref()
            .filter(|s| failed && (s.deltas > 0 || usage.is_some()))
            .map(|s| s.delivered_output());
        let model = r.facts.model.clone();
        let settled = r.settle(usage, cut_short);
        if let Some(d) = &ctx.decision {
            let c = &d.mandate.m.claims;
            let ev = SettlementRecord {
                kind_of: "budget_settlement",
                request_id: ctx.rid,
                agent: c.agent,
                mandate_id: c.mandate_id,
                resource: d.resource.res.id,
                model,
                usage,
                cut_short: cut_short.is_some(),
                settled,
            };
            // Serialised by the audit publisher, not on this (the request's) thread.
            if let Err(e) = self.gw.audit.emit_record("metering", Some(c.tenant), ev) {
                tracing::warn!(error = %e, request_id = %ctx.rid, "a budget settlement could not be recorded");
            }
        }
    }
}

/// The metering event of one settled request (owned: the audit publisher writes it, as serde
/// would — tested — without serde's per-key cost).
#[cfg_attr(test, derive(serde::Serialize))]
struct SettlementRecord {
    #[cfg_attr(test, serde(rename = "type"))]
    kind_of: &'static str,
    #[cfg_attr(test, serde(serialize_with = "as_str"))]
    request_id: RequestId,
    agent: caracal_shared::ids::AgentId,
    mandate_id: caracal_shared::ids::MandateId,
    resource: caracal_shared::ids::ResourceId,
    model: String,
    usage: Option<caracal_shared::metering::Usage>,
    cut_short: bool,
    settled: Vec<crate::budget::Settled>,
}

#[cfg(test)]
fn as_str<S: serde::Serializer>(v: &RequestId, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v)
}

impl caracal_shared::audit::Record for SettlementRecord {
    fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        let mut id = [0u8; caracal_shared::ids::ID_TEXT_MAX];
        let mut o = caracal_shared::audit::JsonObject::new(out);
        o.str("type", self.kind_of).str("request_id", &self.request_id);
        o.str("agent", self.agent.encode(&mut id));
        o.str("mandate_id", self.mandate_id.encode(&mut id));
        o.str("resource", self.resource.encode(&mut id));
        o.str("model", &self.model);
        match &self.usage {
            Some(u) => o.object("usage", |o| {
                o.int("input", u.input)
                    .int("cached_input", u.cached_input)
                    .int("output", u.output);
            }),
            None => o.null("usage"),
        }
        .bool("cut_short", self.cut_short)
        .objects("settled", &self.settled, |s, o| s.write(o));
        o.finish();
        Ok(())
    }
}

/// Why the gateway cut an exchange in flight: its mandate was revoked; for a WebSocket also, its
/// mandate expired or the revocation feed went stale (a revocation may be missing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    Revoked,
    Expired,
    FeedStale,
}

impl Cut {
    /// The [`ExchangeEnd`] outcome.
    fn outcome(self) -> &'static str {
        match self {
            Cut::Revoked => "revoked",
            Cut::Expired => "expired",
            Cut::FeedStale => "revocation_feed_stale",
        }
    }

    /// What the proxy framework's error (and log) says.
    fn log_line(self) -> &'static str {
        match self {
            Cut::Revoked => "mandate revoked mid-response",
            Cut::Expired => "mandate expired mid-session",
            Cut::FeedStale => "revocation feed stale mid-session",
        }
    }

    /// What the client is told when nothing had been answered yet.
    fn error(self) -> Error {
        match self {
            Cut::Revoked => Error::new(
                ErrorCode::MandateRevoked,
                "the mandate was revoked while the request was in flight",
            ),
            Cut::Expired => Error::new(ErrorCode::MandateExpired, "the mandate expired during the session"),
            Cut::FeedStale => Error::new(
                ErrorCode::RevocationFeedStale,
                "the revocation feed went stale during the session",
            ),
        }
    }
}

/// How a WebSocket session, or an exchange the gateway cut in flight, ended (owned: the audit
/// publisher writes it). Outcomes: `closed`, `error`, or the cut's reason (`revoked`,
/// `expired`, `revocation_feed_stale`).
struct ExchangeEnd {
    request_id: RequestId,
    kind: &'static str,
    outcome: &'static str,
    /// The status the client was answered (`None`: nothing was written).
    status: Option<u16>,
    duration_ms: i64,
    resource: caracal_shared::ids::ResourceId,
    who: Who,
    gateway: &'static str,
}

impl caracal_shared::audit::Record for ExchangeEnd {
    fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        let mut id = [0u8; caracal_shared::ids::ID_TEXT_MAX];
        let mut o = caracal_shared::audit::JsonObject::new(out);
        o.str("type", "exchange_end")
            .str("kind", self.kind)
            .str("outcome", self.outcome);
        match self.status {
            Some(s) => o.int("status", i64::from(s)),
            None => o.null("status"),
        };
        o.int("duration_ms", self.duration_ms);
        o.str("agent", self.who.agent.encode(&mut id));
        o.str("mandate_id", self.who.mandate_id.encode(&mut id));
        o.opt_str("session", self.who.session.as_ref().map(|s| s.encode(&mut id)));
        o.str("resource", self.resource.encode(&mut id));
        o.str("request_id", &self.request_id).str("gateway", self.gateway);
        o.finish();
        Ok(())
    }
}

/// What was established before a refusal.
#[derive(Default)]
struct Partial {
    mandate: Option<Arc<crate::state::Cached>>,
    resource: Option<Arc<crate::state::ResourceEntry>>,
    path: Option<String>,
}

#[async_trait]
impl ProxyHttp for Proxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            started: Instant::now(),
            rid: RequestId::UNKNOWN,
            decision: None,
            body: None,
            forward_target: String::new(),
            reservation: None,
            usage: None,
            cut: None,
            websocket: false,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> pingora::Result<bool> {
        ctx.rid = request_id(session.req_header());
        ctx.websocket = websocket_upgrade(session.req_header());
        let source = session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip());
        let gw = &self.gw;
        let tunnel = gw
            .interceptor
            .tunnel_of(session.digest().and_then(|d| d.ssl_digest.as_deref()));
        let mode = match (tunnel.is_some(), self.proxy_auth()) {
            (true, _) => "intercept",
            (false, true) => "forward",
            (false, false) => "sidecar",
        };
        let via_loop = session
            .req_header()
            .headers
            .get_all(header::VIA)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|p| p.trim().ends_with(&gw.rt.config.gateway.id)));
        let outcome = if via_loop {
            Err((
                Error::new(ErrorCode::LoopDetected, "the request already passed this gateway"),
                None,
                Partial::default(),
            ))
        } else {
            match self.target(session.req_header(), tunnel.as_deref()) {
                Err(e) => Err((e, None, Partial::default())),
                Ok((t, bound)) => match self.authenticate(session, tunnel.as_deref(), &ctx.rid).await {
                    Err(e) => Err((e, Some(t), Partial::default())),
                    Ok(c) => match self.decide(session, &t, bound, c, ctx).await {
                        Ok(d) => Ok((t, d)),
                        Err((e, partial)) => Err((e, Some(t), partial)),
                    },
                },
            }
        };
        let info = AuditInfo {
            request_id: ctx.rid,
            source,
            kind: if ctx.websocket { "websocket" } else { "http" },
            mode,
        };
        match outcome {
            Ok((t, mut d)) => {
                ctx.forward_target = self.forward_target(&d, t.query.as_deref());
                // The path and rule were needed for the forward target; the audit event
                // takes them now.
                let est = Established {
                    mandate: Some(Who::of(&d.mandate)),
                    resource: Some(d.resource.res.id),
                    path: Some(std::mem::take(&mut d.path)),
                    rule: Some(std::mem::take(&mut d.rule)),
                    reserved: ctx.reservation.as_ref().map(|r| r.view()),
                    ..Default::default()
                }
                .asked(Some(t));
                if let Err(e) = gw.audit_decision(true, "ok", est, info) {
                    if let Some(mut r) = ctx.reservation.take() {
                        r.abort();
                    }
                    gw.metrics.decisions.with_label_values(&["deny", e.code.as_str()]).inc();
                    Box::pin(respond_error(session, &e, false, &ctx.rid)).await?;
                    return Ok(true);
                }
                gw.metrics.allowed.inc();
                ctx.decision = Some(Box::new(d));
                if ctx.body.as_ref().is_some_and(|b| b.len() > REPLAY_LIMIT) {
                    Box::pin(self.forward_buffered(session, ctx)).await?;
                    return Ok(true);
                }
                Ok(false)
            }
            Err((e, t, partial)) => {
                gw.metrics.decisions.with_label_values(&["deny", e.code.as_str()]).inc();
                let est = Established {
                    resource: partial.resource.as_ref().map(|r| r.res.id),
                    mandate: partial.mandate.as_deref().map(Who::of),
                    path: partial.path,
                    ..Default::default()
                }
                .asked(t);
                if let Err(ae) = gw.audit_decision(false, e.code.as_str(), est, info) {
                    tracing::warn!(error = %ae, "a denial could not be audited");
                }
                Box::pin(respond_error(session, &e, self.proxy_auth(), &ctx.rid)).await?;
                Ok(true)
            }
        }
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end: bool,
        ctx: &mut Ctx,
    ) -> pingora::Result<()> {
        // The body read to decide is replayed whole.
        if let Some(b) = ctx.body.take() {
            *body = Some(b);
        }
        // A WebSocket's frames towards the upstream stop with its mandate's life.
        if ctx.websocket {
            self.cut_if_over(ctx)?;
        }
        Ok(())
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> pingora::Result<Box<HttpPeer>> {
        let d = ctx
            .decision
            .as_ref()
            .ok_or_else(|| pingora::Error::explain(pingora::ErrorType::HTTPStatus(403), "no decision"))?;
        // The name matters only to TLS (SNI and the certificate check); a plain HTTP
        // connection is chosen by the checked address alone.
        let sni = if d.resource.https {
            d.upstream_host.clone()
        } else {
            String::new()
        };
        let mut peer = HttpPeer::new(d.addr, d.resource.https, sni);
        let cfg = &self.gw.rt.config.gateway;
        peer.options.connection_timeout = Some(cfg.upstream_connect_timeout);
        peer.options.read_timeout = Some(cfg.upstream_read_timeout);
        if let Some(ca) = &d.resource.upstream_ca {
            peer.options.ca = Some(ca.clone());
        }
        self.gw.metrics.added.observe(ctx.started.elapsed().as_secs_f64());
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        up: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> pingora::Result<()> {
        let Some(d) = ctx.decision.as_ref() else {
            return Err(pingora::Error::explain(
                pingora::ErrorType::HTTPStatus(403),
                "no decision",
            ));
        };
        // The headers are edited as a plain `http` map (Pingora's header type also keeps each
        // name's original case in a second map, which made every edit cost two map updates
        // and a name re-parse); header names go upstream in canonical case.
        let mut parts: http::request::Parts =
            std::mem::replace(up, RequestHeader::from(http::Request::new(()).into_parts().0)).into();
        let host_ok = Self::host_ok(d, parts.headers.get_all(header::HOST).iter());
        // Edited in place: Pingora has already taken the standard hop-by-hop fields out (its
        // default upstream request policy, Proxy-Authorization included), so this pass over
        // the names usually finds nothing to remove.
        let websocket = ctx.websocket;
        remove_matching(&mut parts.headers, |n| {
            self.stripped(n) && !(websocket && n == header::UPGRADE)
        });
        self.add_headers(d, &ctx.rid, host_ok, &mut parts.headers)
            .map_err(|_| too_many_headers())?;
        let mut edited = RequestHeader::from(parts);
        // Parses the target into the request's URI too.
        edited.set_raw_path(ctx.forward_target.as_bytes())?;
        *up = edited;
        Ok(())
    }

    async fn logging(&self, session: &mut Session, e: Option<&pingora::Error>, ctx: &mut Ctx) {
        // (A WebSocket's time is its session's length, not a request's latency.)
        if !ctx.websocket {
            self.gw.metrics.total.observe(ctx.started.elapsed().as_secs_f64());
        }
        if ctx.websocket || ctx.cut.is_some() {
            self.record_end(session, e.is_some(), ctx);
        }
        if let Some(r) = ctx.reservation.take() {
            self.settle(*r, ctx, e.is_some());
        }
        if let Some(e) = e
            && ctx.decision.is_some()
        {
            self.gw
                .metrics
                .upstream_errors
                .with_label_values(&[&format!("{:?}", e.etype()).to_ascii_lowercase()])
                .inc();
        }
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> pingora::Result<()> {
        // Only the WebSocket upgrade the gateway forwarded may switch protocols, and only to
        // a WebSocket that accepts it: another 101 would turn the connection into a raw pipe
        // past the per-request checks. (Defence in depth: it holds whatever the proxy
        // framework makes of such a response.)
        if resp.status == http::StatusCode::SWITCHING_PROTOCOLS
            && !(ctx.websocket && accepts_websocket(session.req_header(), resp))
        {
            return Err(pingora::Error::explain(
                pingora::ErrorType::HTTPStatus(502),
                "the upstream switched protocols without accepting the WebSocket the gateway forwarded",
            ));
        }
        if ctx.reservation.as_ref().is_some_and(|r| r.needs_usage()) {
            let ct = resp
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            ctx.usage = Some(Box::new(caracal_shared::metering::UsageScanner::new(ct)));
        }
        let switched = resp.status == http::StatusCode::SWITCHING_PROTOCOLS;
        strip_response_hop_by_hop(resp, switched);
        Ok(())
    }

    /// Cut a response in flight when its mandate is revoked (checked per body chunk: one
    /// atomic load unless the revocation set changed); read usage as it streams by.
    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> pingora::Result<Option<std::time::Duration>> {
        if let (Some(u), Some(b)) = (ctx.usage.as_mut(), body.as_ref()) {
            u.feed(b);
        }
        self.cut_if_over(ctx)?;
        Ok(None)
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &Ctx, error: &pingora::Error) -> bool {
        matches!(error.esource(), pingora::ErrorSource::Downstream)
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &pingora::Error, ctx: &mut Ctx) -> FailToProxy {
        use pingora::ErrorType::*;
        if session.response_written().is_some() {
            // Too late for an error response (e.g. cut mid-stream): close the connection.
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        }
        // Cut before anything was sent: say why (the client may retry with a new mandate).
        if let Some(cut) = ctx.cut {
            let err = cut.error();
            let _ = respond_error(session, &err, false, &ctx.rid).await;
            return FailToProxy {
                error_code: err.status().as_u16(),
                can_reuse_downstream: false,
            };
        }
        let code = match e.etype() {
            ConnectTimedout | ReadTimedout | WriteTimedout => ErrorCode::UpstreamTimeout,
            _ if matches!(e.esource(), pingora::ErrorSource::Upstream) => ErrorCode::UpstreamUnreachable,
            HTTPStatus(403) => ErrorCode::Forbidden,
            HTTPStatus(502) => ErrorCode::UpstreamUnreachable,
            _ if matches!(e.esource(), pingora::ErrorSource::Downstream) => {
                return FailToProxy {
                    error_code: 0,
                    can_reuse_downstream: false,
                };
            }
            _ => ErrorCode::Internal,
        };
        let err = Error::new(
            code,
            match code {
                ErrorCode::UpstreamTimeout => "the upstream timed out",
                _ => "the upstream could not be reached",
            },
        );
        let _ = respond_error(session, &err, false, &ctx.rid).await;
        FailToProxy {
            error_code: err.status().as_u16(),
            can_reuse_downstream: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_named_in_upper_case_as_before() {
        for m in [
            "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE", "get", "Purge", "X-CUSTOM",
        ] {
            let method = http::Method::from_bytes(m.as_bytes()).unwrap();
            assert_eq!(method_name(&method), m.to_ascii_uppercase(), "{m}");
        }
        assert!(matches!(method_name(&http::Method::GET), Cow::Borrowed(_)));
    }

    #[test]
    fn parts_of_a_str_are_taken_only_from_inside_it_on_character_boundaries() {
        let whole = "http://é.test:80/p?q";
        let b = whole.as_bytes();
        assert_eq!(within(whole, &b[7..17]), Some("é.test:80"));
        assert_eq!(within(whole, &b[..0]), Some(""));
        assert_eq!(within(whole, b), Some(whole));
        // Splitting 'é' (two bytes) is refused.
        assert_eq!(within(whole, &b[8..12]), None);
        assert_eq!(within(whole, &b[7..8]), None);
        // Bytes from elsewhere are refused.
        let other = String::from(whole);
        assert_eq!(within(whole, &other.as_bytes()[7..17]), None);
    }

    #[test]
    fn settlement_records_are_written_exactly_as_serde_writes_them() {
        use caracal_shared::audit::Record as _;
        use caracal_shared::ids::{AgentId, BudgetId, MandateId, ResourceId};
        use caracal_shared::store::admin::BudgetUnit;
        for (usage, settled, model) in [
            (None, vec![], "gpt-4o"),
            (
                Some(caracal_shared::metering::Usage {
                    input: 12,
                    cached_input: 3,
                    output: 40,
                }),
                vec![
                    crate::budget::Settled {
                        budget_id: BudgetId::new(),
                        unit: BudgetUnit::Tokens,
                        reserved: 4096,
                        actual: 52,
                    },
                    crate::budget::Settled {
                        budget_id: BudgetId::new(),
                        unit: BudgetUnit::Requests,
                        reserved: 1,
                        actual: 1,
                    },
                    crate::budget::Settled {
                        budget_id: BudgetId::new(),
                        unit: BudgetUnit::Micros,
                        reserved: -3,
                        actual: i64::MAX,
                    },
                ],
                "odd \"model\"\u{2}é",
            ),
        ] {
            let ev = SettlementRecord {
                kind_of: "budget_settlement",
                request_id: RequestId::parse(b"rid-1").unwrap(),
                agent: AgentId::new(),
                mandate_id: MandateId::new(),
                resource: ResourceId::new(),
                model: model.into(),
                usage,
                cut_short: usage.is_none(),
                settled,
            };
            let mut direct = Vec::new();
            ev.write_json(&mut direct).unwrap();
            assert_eq!(String::from_utf8(direct).unwrap(), serde_json::to_string(&ev).unwrap());
        }
    }

    #[test]
    fn raw_bearer_finds_what_credential_finds_or_nothing() {
        let cases: &[&[u8]] = &[
            b"Bearer cm1.abc",
            b"  bearer   cm1.abc  ",
            b"BEARER\tcm1.abc",
            b"Bearer",
            b"Bearer   ",
            b"Bearer a b",
            b"Bearerx cm1.abc",
            b"Basic dXNlcjpjbTEuYWJj",
            b"cm1.abc",
            b"",
            b" Bearer cm1.abc\r\n",
            b"Bearer cm1.abc\xc2\x85",
            b"\xc2\xa0Bearer cm1.abc",
        ];
        for &h in cases {
            let raw = raw_bearer(h);
            let parsed = std::str::from_utf8(h).ok().and_then(credential);
            match raw {
                // What the raw path finds is what the parser finds; where they differ (Unicode
                // whitespace the parser trims), the raw bytes are not a token and miss the cache.
                Some(r) => match &parsed {
                    Some(p) if p.as_bytes() == r => {}
                    _ => assert!(
                        std::str::from_utf8(r).is_err() || r.iter().any(|b| !b.is_ascii()),
                        "{:?}: raw {:?} vs parsed {:?}",
                        String::from_utf8_lossy(h),
                        String::from_utf8_lossy(r),
                        parsed
                    ),
                },
                None => assert!(
                    parsed.is_none() || !h.trim_ascii().to_ascii_lowercase().starts_with(b"bearer "),
                    "{:?}",
                    String::from_utf8_lossy(h)
                ),
            }
        }
        assert_eq!(raw_bearer(b"  bearer   cm1.abc  "), Some(&b"cm1.abc"[..]));
        assert_eq!(raw_bearer(b"Basic dXNlcjpjbTEuYWJj"), None);
    }

    #[test]
    fn forward_targets_keep_parameters_and_let_no_client_parameter_shadow_the_credential() {
        assert_eq!(forward_target(None, "/v1/models", None, None), "/v1/models");
        assert_eq!(forward_target(None, "/v1/a b", Some("x=1&&y"), None), "/v1/a%20b?x=1&y");
        assert_eq!(forward_target(Some("/base"), "/v1", Some(""), None), "/base/v1");
        let key = Some(("key", "s3cret"));
        assert_eq!(forward_target(None, "/v1", None, key), "/v1?key=s3cret");
        assert_eq!(
            forward_target(None, "/v1", Some("key=mine&keys=2&key&q=key"), key),
            "/v1?keys=2&q=key&key=s3cret"
        );
        // Names are compared as the upstream decodes them (`%XX`, and `+` as a space).
        assert_eq!(
            forward_target(
                None,
                "/v1",
                Some("k%65y=mine&%6Bey=2&%6b%65%79&x=1&KEY=3&ke%79s=4"),
                key
            ),
            "/v1?x=1&KEY=3&ke%79s=4&key=s3cret"
        );
        let spaced = Some(("api key", "s3cret"));
        assert_eq!(
            forward_target(None, "/v1", Some("api+key=1&api%20key=2&api%2Bkey=3&apikey=4"), spaced),
            "/v1?api%2Bkey=3&apikey=4&api key=s3cret"
        );
        // A '%' that encodes nothing is itself.
        let pct = Some(("k%", "s3cret"));
        assert_eq!(
            forward_target(None, "/v1", Some("k%=1&k%25=2&k%2=3&k%zz=4"), pct),
            "/v1?k%2=3&k%zz=4&k%=s3cret"
        );
    }

    #[test]
    fn removing_headers_keeps_every_other_value_in_order_and_drops_every_named_one() {
        let mut h = http::HeaderMap::new();
        h.append("accept", HeaderValue::from_static("a"));
        h.append("proxy-authorization", HeaderValue::from_static("Bearer x"));
        h.append("x-multi", HeaderValue::from_static("1"));
        h.append("accept", HeaderValue::from_static("b"));
        h.append("x-multi", HeaderValue::from_static("2"));
        h.append("te", HeaderValue::from_static("trailers"));
        for (name, n) in ["x-extra-1", "x-extra-2", "x-extra-3", "x-extra-4"]
            .into_iter()
            .zip(1..)
        {
            h.append(name, HeaderValue::from(n));
        }
        h.append("proxy-authorization", HeaderValue::from_static("Basic y"));
        // Six of its names are dropped, more than one pass removes.
        let drop = |n: &HeaderName| STRIPPED.contains(n) || n.as_str().starts_with("x-extra-");
        remove_matching(&mut h, drop);
        let m = &h;
        let all = |n: &str| {
            m.get_all(n)
                .iter()
                .map(|v| v.to_str().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(all("accept"), ["a", "b"]);
        assert_eq!(all("x-multi"), ["1", "2"]);
        assert!(m.get("proxy-authorization").is_none() && m.get("te").is_none());
        assert_eq!(m.len(), 4);
    }

    #[test]
    fn connection_nominates_the_fields_it_names_in_any_case_but_not_its_options() {
        let mut h = http::HeaderMap::new();
        assert_eq!(connection_nominations(&h).count(), 0);
        h.append("connection", HeaderValue::from_static("keep-alive"));
        h.append("connection", HeaderValue::from_static(" Close ,, "));
        assert_eq!(connection_nominations(&h).count(), 0, "options name no field");
        h.append("connection", HeaderValue::from_static("Keep-Alive, X-Hop ,x-other"));
        assert_eq!(
            connection_nominations(&h).collect::<Vec<_>>(),
            [&b"X-Hop"[..], b"x-other"]
        );
        assert!(nominated(&h, &HeaderName::from_static("x-hop")));
        assert!(nominated(&h, &HeaderName::from_static("x-other")));
        assert!(!nominated(&h, &HeaderName::from_static("x-ho")));
        assert!(!nominated(&h, &HeaderName::from_static("keep-alive")));
    }

    #[test]
    fn upstream_responses_lose_their_hop_by_hop_fields_but_not_their_framing() {
        let mut r = ResponseHeader::build(200, None).unwrap();
        r.append_header("content-type", "application/json").unwrap();
        r.append_header("content-length", "2").unwrap();
        strip_response_hop_by_hop(&mut r, false);
        assert_eq!(r.headers.len(), 2, "nothing to strip");
        r.append_header("Connection", "keep-alive, X-Up-Hop, content-length")
            .unwrap();
        r.append_header("connection", "transfer-encoding, Connection").unwrap();
        r.append_header("X-Up-Hop", "a").unwrap();
        r.append_header("x-up-hop", "b").unwrap();
        r.append_header("Keep-Alive", "timeout=5").unwrap();
        r.append_header("Proxy-Authenticate", "Basic realm=\"up\"").unwrap();
        r.append_header("proxy-authentication-info", "nextnonce=\"x\"").unwrap();
        strip_response_hop_by_hop(&mut r, false);
        for gone in [
            "x-up-hop",
            "keep-alive",
            "proxy-authenticate",
            "proxy-authentication-info",
        ] {
            assert!(r.headers.get(gone).is_none(), "{gone}");
        }
        assert_eq!(r.headers["content-length"], "2");
        assert_eq!(r.headers["content-type"], "application/json");
        assert_eq!(r.headers.get_all("connection").iter().count(), 2, "Pingora rewrites it");
        // A WebSocket's 101 keeps the Upgrade its Connection names; nothing else does.
        for switched in [true, false] {
            let mut r = ResponseHeader::build(101, None).unwrap();
            r.append_header("Connection", "Upgrade").unwrap();
            r.append_header("Upgrade", "websocket").unwrap();
            strip_response_hop_by_hop(&mut r, switched);
            assert_eq!(r.headers.contains_key("upgrade"), switched);
        }
    }

    #[test]
    fn schemes_are_http_or_https_in_any_case() {
        for (s, want) in [
            ("http", Some(false)),
            ("HTTP", Some(false)),
            ("hTtP", Some(false)),
            ("https", Some(true)),
            ("HTTPS", Some(true)),
            ("ftp", None),
            ("httpx", None),
            ("http ", None),
            ("", None),
            ("ws", None),
        ] {
            assert_eq!(is_https(s.as_bytes()), want, "{s:?}");
        }
    }

    #[test]
    fn host_values_match_exactly() {
        assert!(host_is(b"api.test", "api.test", None));
        assert!(!host_is(b"api.test:80", "api.test", None));
        assert!(host_is(b"api.test:8080", "api.test", Some(8080)));
        for v in [
            &b"api.test"[..],
            b"api.test:08080",
            b"api.test:8081",
            b"api.test:",
            b"api.testx:8080",
            b"api.test:8080x",
        ] {
            assert!(!host_is(v, "api.test", Some(8080)), "{:?}", String::from_utf8_lossy(v));
        }
        let v = |s: &'static str| HeaderValue::from_static(s);
        let right = [v("api.test:8080")];
        assert!(only_host_is(&mut right.iter(), "api.test", Some(8080)));
        assert!(
            !only_host_is(&mut [].iter(), "api.test", Some(8080)),
            "no Host: set one"
        );
        let two = [v("api.test:8080"), v("evil.test")];
        assert!(
            !only_host_is(&mut two.iter(), "api.test", Some(8080)),
            "a second Host is replaced"
        );
    }

    #[test]
    fn a_101_accepts_a_websocket_only_with_the_keys_accept() {
        // RFC 6455 §1.3's example key and accept.
        let mut req = RequestHeader::build("GET", b"/chat", None).unwrap();
        req.append_header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
            .unwrap();
        let resp = |upgrade: &[&str], accept: &[&str]| {
            let mut r = ResponseHeader::build(101, None).unwrap();
            for u in upgrade {
                r.append_header("Upgrade", *u).unwrap();
            }
            for a in accept {
                r.append_header("Sec-WebSocket-Accept", *a).unwrap();
            }
            r
        };
        const GOOD: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
        assert!(accepts_websocket(&req, &resp(&["WebSocket"], &[GOOD])));
        for (upgrade, accept) in [
            (&[][..], &[GOOD][..]),
            (&["h2c"], &[GOOD]),
            (&["websocket", "h2c"], &[GOOD]),
            (&["websocket"], &[]),
            (&["websocket"], &["s3pPLMBiTxaQ9kYGzzhZRbK+xOo"]),
            (&["websocket"], &[GOOD, GOOD]),
        ] {
            assert!(
                !accepts_websocket(&req, &resp(upgrade, accept)),
                "{upgrade:?} {accept:?}"
            );
        }
        let no_key = RequestHeader::build("GET", b"/chat", None).unwrap();
        assert!(!accepts_websocket(&no_key, &resp(&["websocket"], &[GOOD])));
        req.append_header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
            .unwrap();
        assert!(!accepts_websocket(&req, &resp(&["websocket"], &[GOOD])), "two keys");
    }
}
