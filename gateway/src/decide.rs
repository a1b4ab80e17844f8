//! The decision for one request, whatever way it came in (forward proxy, sidecar, CONNECT):
//!
//! 1. the revocation feed is fresh (else 503 `revocation_feed_stale`);
//! 2. the credential is a mandate (verified once, cached) or an API key (exchanged once per
//!    mandate lifetime), not expired, not revoked;
//! 3. the target host selects one of the mandate's resources (and the port and scheme are the
//!    resource's);
//! 4. the path is decoded and normalised (what is authorized is what is forwarded);
//! 5. the mandate's rules allow exactly this request — and so does the *current* active version
//!    of the policy it was minted under (a tightened policy applies at once), and the
//!    resource's own model / operation allowlists;
//! 6. the agent is within its rate limit;
//! 7. the destination resolves to addresses the egress guard accepts (connect to those only);
//! 8. the decision is queued as an audit event — if it cannot be, the request is refused.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use base64::Engine as _;
use caracal_shared::error::{Error, ErrorCode, Result};
use caracal_shared::mandate::{self, Request};
use caracal_shared::policy::{ANY, Facts, decide};
use caracal_shared::time::coarse_now_secs;
use serde::Deserialize;
use serde_json::json;

use crate::mtls::PeerCert;
use crate::state::{Cached, Gateway, ResourceEntry};

/// Where a request is going, as the client asked.
#[derive(Debug, Clone)]
pub struct Target {
    /// Upper case (see `proxy::method_name`).
    pub method: Cow<'static, str>,
    /// Lowercase host, without brackets or port.
    pub host: String,
    pub port: u16,
    pub https: bool,
    /// The raw path (not decoded), without the query.
    pub path: String,
    pub query: Option<String>,
}

/// What the request path needs after an allow.
pub struct Decision {
    pub mandate: Arc<Cached>,
    pub resource: Arc<ResourceEntry>,
    /// Decoded, normalised path that was authorized.
    pub path: String,
    pub rule: String,
    pub addr: SocketAddr,
    /// Host name to send (Host header, SNI).
    pub upstream_host: String,
}

/// What a decision had established when it ended (allow: everything; deny: what was known
/// before the refusal), for its audit event. Owned: the audit publisher serialises the event,
/// off the request's thread.
#[derive(Default)]
pub struct Established {
    pub mandate: Option<Who>,
    pub resource: Option<caracal_shared::ids::ResourceId>,
    pub method: Option<Cow<'static, str>>,
    pub host: Option<String>,
    /// The authorized (decoded, normalised) path; else the raw path asked for.
    pub path: Option<String>,
    pub rule: Option<String>,
    /// Budget reservations made for an allowed request (recorded with its decision).
    pub reserved: Option<Vec<crate::budget::HoldView>>,
}

/// Whom a decision's mandate speaks for, copied out of it for the audit record: the record is
/// written and dropped on the publisher's thread, and sharing the cached mandate with it would
/// move that mandate's reference count between cores on every request.
#[derive(Debug, Clone, Copy)]
pub struct Who {
    pub tenant: caracal_shared::ids::TenantId,
    pub agent: caracal_shared::ids::AgentId,
    pub mandate_id: caracal_shared::ids::MandateId,
    pub session: Option<caracal_shared::ids::SessionId>,
}

impl Who {
    pub fn of(c: &Cached) -> Who {
        let claims = &c.m.claims;
        Who {
            tenant: claims.tenant,
            agent: claims.agent,
            mandate_id: claims.mandate_id,
            session: claims.session,
        }
    }
}

impl Established {
    /// Fill in what the client asked for (`target`), keeping an authorized path if one is set.
    pub fn asked(mut self, target: Option<Target>) -> Self {
        if let Some(t) = target {
            self.method = Some(t.method);
            self.host = Some(t.host);
            if self.path.is_none() {
                self.path = Some(t.path);
            }
        }
        self
    }
}

/// The audit event of one decision.
struct DecisionEvent {
    allow: bool,
    reason: &'static str,
    est: Established,
    info: AuditInfo,
    gateway: &'static str,
}

impl caracal_shared::audit::Record for DecisionEvent {
    fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        self.view().write_json(self.est.reserved.as_deref(), out);
        Ok(())
    }
}

impl DecisionEvent {
    /// Its fields as the JSON writer takes them (budget holds aside).
    fn view(&self) -> DecisionView<'_> {
        let claims = self.est.mandate.as_ref();
        DecisionView {
            allow: self.allow,
            reason: self.reason,
            kind: self.info.kind,
            mode: self.info.mode,
            agent: claims.map(|c| c.agent),
            mandate_id: claims.map(|c| c.mandate_id),
            session: claims.and_then(|c| c.session),
            resource: self.est.resource,
            method: self.est.method.as_deref(),
            host: self.est.host.as_deref(),
            path: self.est.path.as_deref(),
            rule: self.est.rule.as_deref(),
            source: self.info.source,
            request_id: &self.info.request_id,
            gateway: self.gateway,
        }
    }

    /// This record packed into the audit queue's slot (see [`caracal_shared::audit::Packed`]),
    /// read back by [`write_packed`]; `None` when it holds budget reservations or does not
    /// fit (it then goes boxed).
    fn pack(&self) -> Option<caracal_shared::audit::Packed> {
        if self.est.reserved.is_some() {
            return None;
        }
        let v = self.view();
        let mut p = Pack(caracal_shared::audit::Packed::new(write_packed), true);
        p.u8(u8::from(v.allow));
        for s in [v.reason, v.kind, v.mode, v.request_id, v.gateway] {
            p.str(Some(s));
        }
        p.id(v.agent.map(|a| a.uuid()));
        p.id(v.mandate_id.map(|m| m.uuid()));
        p.id(v.session.map(|s| s.uuid()));
        p.id(v.resource.map(|r| r.uuid()));
        for s in [v.method, v.host, v.path, v.rule] {
            p.str(s);
        }
        match v.source {
            None => p.u8(0),
            Some(IpAddr::V4(a)) => {
                p.u8(4);
                p.bytes(&a.octets());
            }
            Some(IpAddr::V6(a)) => {
                p.u8(6);
                p.bytes(&a.octets());
            }
        }
        p.1.then_some(p.0)
    }
}

/// Writes into a [`caracal_shared::audit::Packed`], remembering whether everything fit.
struct Pack(caracal_shared::audit::Packed, bool);

impl Pack {
    fn bytes(&mut self, b: &[u8]) {
        self.1 = self.1 && self.0.push(b);
    }

    fn u8(&mut self, v: u8) {
        self.bytes(&[v]);
    }

    /// A length (`u16::MAX` for none), then the bytes.
    fn str(&mut self, s: Option<&str>) {
        match s {
            Some(s) if s.len() < usize::from(u16::MAX) => {
                self.bytes(&(s.len() as u16).to_le_bytes());
                self.bytes(s.as_bytes());
            }
            Some(_) => self.1 = false,
            None => self.bytes(&u16::MAX.to_le_bytes()),
        }
    }

    fn id(&mut self, id: Option<uuid::Uuid>) {
        match id {
            Some(u) => {
                self.u8(1);
                self.bytes(u.as_bytes());
            }
            None => self.u8(0),
        }
    }
}

/// Reads what [`Pack`] wrote.
struct Unpack<'a>(&'a [u8]);

fn corrupt() -> serde_json::Error {
    <serde_json::Error as serde::de::Error>::custom("a packed decision record is malformed")
}

impl<'a> Unpack<'a> {
    fn take(&mut self, n: usize) -> serde_json::Result<&'a [u8]> {
        if n > self.0.len() {
            return Err(corrupt());
        }
        let (b, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(b)
    }

    fn u8(&mut self) -> serde_json::Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn str(&mut self) -> serde_json::Result<Option<&'a str>> {
        let len = u16::from_le_bytes(self.take(2)?.try_into().map_err(|_| corrupt())?);
        if len == u16::MAX {
            return Ok(None);
        }
        let b = self.take(usize::from(len))?;
        std::str::from_utf8(b).map(Some).map_err(|_| corrupt())
    }

    fn some_str(&mut self) -> serde_json::Result<&'a str> {
        self.str()?.ok_or_else(corrupt)
    }

    fn id<T>(&mut self, make: fn(uuid::Uuid) -> T) -> serde_json::Result<Option<T>> {
        Ok(match self.u8()? {
            0 => None,
            1 => Some(make(uuid::Uuid::from_slice(self.take(16)?).map_err(|_| corrupt())?)),
            _ => return Err(corrupt()),
        })
    }
}

/// The JSON of a decision record packed by [`DecisionEvent::pack`] (on the audit publisher's
/// thread).
fn write_packed(b: &[u8], out: &mut Vec<u8>) -> serde_json::Result<()> {
    use caracal_shared::ids::{AgentId, MandateId, ResourceId, SessionId};
    let mut u = Unpack(b);
    let allow = match u.u8()? {
        0 => false,
        1 => true,
        _ => return Err(corrupt()),
    };
    let (reason, kind, mode, request_id, gateway) = (
        u.some_str()?,
        u.some_str()?,
        u.some_str()?,
        u.some_str()?,
        u.some_str()?,
    );
    let (agent, mandate_id) = (u.id(AgentId::from_uuid)?, u.id(MandateId::from_uuid)?);
    let (session, resource) = (u.id(SessionId::from_uuid)?, u.id(ResourceId::from_uuid)?);
    let (method, host, path, rule) = (u.str()?, u.str()?, u.str()?, u.str()?);
    let source = match u.u8()? {
        0 => None,
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(u.take(4)?).map_err(|_| corrupt())?)),
        6 => Some(IpAddr::from(<[u8; 16]>::try_from(u.take(16)?).map_err(|_| corrupt())?)),
        _ => return Err(corrupt()),
    };
    if !u.0.is_empty() {
        return Err(corrupt());
    }
    DecisionView {
        allow,
        reason,
        kind,
        mode,
        agent,
        mandate_id,
        session,
        resource,
        method,
        host,
        path,
        rule,
        source,
        request_id,
        gateway,
    }
    .write_json(None, out);
    Ok(())
}

/// A decision record's fields, borrowed from a [`DecisionEvent`] or from its packed bytes: the
/// one writer of its JSON.
#[cfg_attr(test, derive(serde::Serialize))]
struct DecisionView<'a> {
    #[cfg_attr(test, serde(skip))]
    allow: bool,
    reason: &'a str,
    kind: &'a str,
    mode: &'a str,
    agent: Option<caracal_shared::ids::AgentId>,
    mandate_id: Option<caracal_shared::ids::MandateId>,
    session: Option<caracal_shared::ids::SessionId>,
    resource: Option<caracal_shared::ids::ResourceId>,
    method: Option<&'a str>,
    host: Option<&'a str>,
    path: Option<&'a str>,
    rule: Option<&'a str>,
    source: Option<IpAddr>,
    request_id: &'a str,
    gateway: &'a str,
}

impl DecisionView<'_> {
    /// The event's JSON, written directly (the publisher writes one per request: ~3,900
    /// instructions against serde's ~6,200). Tested byte-identical to the serde form.
    fn write_json(&self, reserved: Option<&[crate::budget::HoldView]>, out: &mut Vec<u8>) {
        // Ids are encoded into this buffer, one at a time (not through `Display`).
        let mut id = [0u8; caracal_shared::ids::ID_TEXT_MAX];
        let mut o = caracal_shared::audit::JsonObject::new(out);
        o.str("type", "decision")
            .str("decision", if self.allow { "allow" } else { "deny" })
            .str("reason", self.reason)
            .str("kind", self.kind)
            .str("mode", self.mode);
        o.opt_str("agent", self.agent.as_ref().map(|a| a.encode(&mut id)));
        o.opt_str("mandate_id", self.mandate_id.as_ref().map(|m| m.encode(&mut id)));
        o.opt_str("session", self.session.as_ref().map(|s| s.encode(&mut id)));
        o.opt_str("resource", self.resource.as_ref().map(|r| r.encode(&mut id)));
        o.opt_str("method", self.method)
            .opt_str("host", self.host)
            .opt_str("path", self.path)
            .opt_str("rule", self.rule)
            .opt_ip("source", self.source)
            .str("request_id", self.request_id)
            .str("gateway", self.gateway);
        if let Some(r) = reserved {
            o.objects("reserved", r, |h, o| h.write(o));
        }
        o.finish();
    }
}

/// The decision event's JSON form as serde writes it (its view's fields, serde-derived, after
/// the type and the decision): the reference [`DecisionView::write_json`] is tested against.
#[cfg(test)]
#[derive(serde::Serialize)]
struct DecisionRecord<'a> {
    #[serde(rename = "type")]
    kind_of: &'static str,
    decision: &'static str,
    #[serde(flatten)]
    view: DecisionView<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reserved: Option<&'a [crate::budget::HoldView]>,
}

#[cfg(test)]
impl serde::Serialize for DecisionEvent {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let view = self.view();
        DecisionRecord {
            kind_of: "decision",
            decision: if view.allow { "allow" } else { "deny" },
            view,
            reserved: self.est.reserved.as_deref(),
        }
        .serialize(s)
    }
}

/// Context for the audit event.
pub struct AuditInfo {
    pub request_id: crate::request_id::RequestId,
    pub source: Option<IpAddr>,
    pub kind: &'static str,
    pub mode: &'static str,
}

/// Pull the secret out of `Proxy-Authorization` / `Authorization`: `Basic user:secret` (the
/// secret is the password) or `Bearer secret` (borrowed from the header: a mandate is ~1.5 KB).
pub fn credential(header: &str) -> Option<Cow<'_, str>> {
    let (scheme, rest) = header.trim().split_once(' ')?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return (!rest.is_empty()).then_some(Cow::Borrowed(rest));
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let raw = base64::engine::general_purpose::STANDARD.decode(rest).ok()?;
        let s = String::from_utf8(raw).ok()?;
        let (_, pass) = s.split_once(':')?;
        return (!pass.is_empty()).then(|| Cow::Owned(pass.to_string()));
    }
    None
}

/// What a JSON request body says: its `model`, the MCP tool of a `tools/call`, and the most
/// output tokens it asks for (`max_tokens`, `max_completion_tokens` or `max_output_tokens`).
#[derive(Debug, Default, Clone)]
pub struct BodyFacts {
    pub model: String,
    pub tool: String,
    pub max_tokens: Option<i64>,
}

/// Why a decision reads the request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyNeed {
    /// A rule or the resource's model allowlist matches on model or tool: the body must say
    /// them unambiguously (one JSON object), or the request is refused.
    Rules,
    /// Only a budget prices it: a body that is not JSON (a file upload) is priced without
    /// facts; one that looks like JSON must read unambiguously, as for rules.
    Budget,
}

/// Whether an object key spells `name` (ASCII lower case) as the most lenient common decoders
/// match keys: ASCII case-insensitively, with the two non-ASCII letters Go's `encoding/json`
/// folds into ASCII ones (`ſ` → `s`, the Kelvin sign → `k`).
fn folds_to(key: &str, name: &str) -> bool {
    let mut want = name.bytes();
    for c in key.chars() {
        let c = match c {
            'ſ' => 's',
            '\u{212A}' => 'k',
            c => c.to_ascii_lowercase(),
        };
        if !c.is_ascii() || want.next() != Some(c as u8) {
            return false;
        }
    }
    want.next().is_none()
}

/// Walk an object's entries: the value of each key that spells one of `names` (see
/// [`folds_to`]) goes to `take` with that name, at most once per name — a second spelling is
/// ambiguous (decoders differ on which one wins) and an error; other values are skipped (still
/// parsed).
fn read_fields<'de, A: serde::de::MapAccess<'de>>(
    mut m: A,
    names: &[&'static str],
    mut take: impl FnMut(&'static str, &mut A) -> std::result::Result<(), A::Error>,
) -> std::result::Result<(), A::Error> {
    use serde::de::Error as _;
    let mut seen = 0u32;
    while let Some(k) = m.next_key::<Cow<'de, str>>()? {
        match names.iter().position(|n| folds_to(&k, n)) {
            Some(i) if seen & (1 << i) != 0 => return Err(A::Error::custom("a field is given twice")),
            Some(i) => {
                seen |= 1 << i;
                take(names[i], &mut m)?;
            }
            None => {
                m.next_value::<serde::de::IgnoredAny>()?;
            }
        }
    }
    Ok(())
}

/// A token count: an integer, or a number with no fraction (`256.0`), as decoders accept it.
struct Count(i64);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error as _;
        let n = serde_json::Number::deserialize(d)?;
        if let Some(i) = n.as_i64() {
            return Ok(Count(i));
        }
        match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(Count(f as i64)),
            _ => Err(D::Error::custom("a token count must be a whole number")),
        }
    }
}

/// `params` of a JSON-RPC call: its `name` when it is an object (an array or null says no tool).
struct Params(Option<String>);

impl<'de> Deserialize<'de> for Params {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Params;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("JSON-RPC params")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, m: A) -> std::result::Result<Params, A::Error> {
                let mut name = None;
                read_fields(m, &["name"], |_, m| {
                    name = Some(m.next_value::<String>()?);
                    Ok(())
                })?;
                Ok(Params(name))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut s: A) -> std::result::Result<Params, A::Error> {
                while s.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Params(None))
            }
            fn visit_unit<E>(self) -> std::result::Result<Params, E> {
                Ok(Params(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// The body as the probe reads it: one JSON object, each field it reads given once.
#[derive(Default)]
struct Probe {
    model: Option<String>,
    /// `max_tokens`, else `max_completion_tokens`, else `max_output_tokens`.
    max_tokens: [Option<i64>; 3],
    method: Option<String>,
    params: Option<Params>,
}

impl<'de> Deserialize<'de> for Probe {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Probe;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("one JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, m: A) -> std::result::Result<Probe, A::Error> {
                const TOKENS: [&str; 3] = ["max_tokens", "max_completion_tokens", "max_output_tokens"];
                let mut p = Probe::default();
                let names = ["model", TOKENS[0], TOKENS[1], TOKENS[2], "method", "params"];
                read_fields(m, &names, |name, m| {
                    match name {
                        "model" => p.model = Some(m.next_value()?),
                        "method" => p.method = Some(m.next_value()?),
                        "params" => p.params = Some(m.next_value()?),
                        tokens => {
                            let i = TOKENS.iter().position(|t| *t == tokens).unwrap_or(0);
                            p.max_tokens[i] = Some(m.next_value::<Count>()?.0);
                        }
                    }
                    Ok(())
                })?;
                Ok(p)
            }
        }
        d.deserialize_map(V)
    }
}

/// Read what a request body says, for a decision that needs it (`need`). A body whose model or
/// tool could be read differently by the upstream — not one JSON object (a JSON-RPC batch,
/// trailing text, invalid JSON), a field given twice, a field of the wrong type — is refused
/// (`invalid_json`): a rule that cannot read the body cannot be trusted to hold. An empty body
/// says nothing; a budget-only read of a body that does not look like JSON says nothing either.
pub fn body_facts(body: &[u8], need: BodyNeed) -> Result<BodyFacts> {
    let text = body.trim_ascii_start();
    if text.is_empty() || (need == BodyNeed::Budget && !matches!(text[0], b'{' | b'[')) {
        return Ok(BodyFacts::default());
    }
    // (The decoder's own message is not passed on: it can quote the body.)
    let p: Probe = serde_json::from_slice(body).map_err(|e| {
        let what = match e.classify() {
            serde_json::error::Category::Data => "not one JSON object, or a field it reads is given twice or has the wrong type",
            _ => "not valid JSON",
        };
        Error::new(
            ErrorCode::InvalidJson,
            format!(
                "policy reads this request's body (one JSON object, each field it reads given once): {what} (line {}, column {})",
                e.line(),
                e.column()
            ),
        )
    })?;
    let tool = match (p.method.as_deref(), p.params) {
        (Some("tools/call"), Some(Params(Some(n)))) => n,
        _ => String::new(),
    };
    Ok(BodyFacts {
        model: p.model.unwrap_or_default(),
        tool,
        max_tokens: p.max_tokens.into_iter().flatten().next(),
    })
}

impl Gateway {
    /// Steps 1-2: who, with which mandate. A secret (mandate or API key) in the request wins;
    /// without one, a client certificate verified by the mTLS listener is exchanged.
    pub async fn authenticate(
        &self,
        secret: Option<&str>,
        cert: Option<&PeerCert>,
        request_id: &str,
    ) -> Result<Arc<Cached>> {
        self.feed_fresh()?;
        let c = match (secret, cert) {
            // The common case answers from the cache without entering an async path; the
            // others are boxed, so their (large) futures do not weigh on every request's.
            (Some(secret), _) if mandate::is_mandate(secret) => match self.cached_mandate(secret.as_bytes()) {
                Some(c) => c,
                None => Box::pin(self.verify_mandate(secret)).await?,
            },
            (Some(secret), _) if secret.starts_with(caracal_shared::store::agents::API_KEY_PREFIX) => {
                Box::pin(self.mandate_for_api_key(secret, request_id)).await?
            }
            (Some(_), _) => {
                return Err(Error::new(
                    ErrorCode::MandateInvalid,
                    "the credential is neither a mandate nor an API key",
                ));
            }
            (None, Some(cert)) => Box::pin(self.mandate_for_cert(cert, request_id)).await?,
            (None, None) => {
                return Err(Error::new(
                    ErrorCode::MandateMissing,
                    "a mandate or API key is required",
                ));
            }
        };
        self.admit(c, secret.map(str::as_bytes))
    }

    /// [`Gateway::authenticate`] for a bearer token that is in the mandate cache, decided
    /// from the raw bytes of the header (no UTF-8 validation: a hit is byte for byte a token
    /// that was verified). `None` when it is not cached: the caller takes the full path,
    /// which decides every credential this one does identically.
    pub fn authenticate_cached(&self, token: &[u8]) -> Option<Result<Arc<Cached>>> {
        // Only mandates are in this cache (an API key as a bearer goes straight to the full
        // path, without a lookup that cannot hit).
        if !token.starts_with(mandate::TOKEN_PREFIX.as_bytes()) {
            return None;
        }
        if let Err(e) = self.feed_fresh() {
            return Some(Err(e));
        }
        let c = self.cached_mandate(token)?;
        Some(self.admit(c, Some(token)))
    }

    /// Step 1: a stale revocation feed refuses everything.
    fn feed_fresh(&self) -> Result<()> {
        if self.revocations.is_stale() {
            return Err(Error::new(
                ErrorCode::RevocationFeedStale,
                "the revocation feed is stale; refusing everything until it recovers",
            )
            .with_retry_after(1));
        }
        Ok(())
    }

    /// The end of step 2: the mandate found for `secret` is still live.
    fn admit(&self, c: Arc<Cached>, secret: Option<&[u8]>) -> Result<Arc<Cached>> {
        // The coarse clock (one timer tick behind at most) is read on every request: expiry
        // is whole seconds.
        if c.m.claims.expires_at <= coarse_now_secs() {
            if let Some(secret) = secret {
                self.mandates.invalidate(&crate::state::token_key(secret));
            }
            return Err(Error::new(ErrorCode::MandateExpired, "the mandate has expired"));
        }
        if c.is_revoked(&self.revocations) {
            return Err(Error::new(ErrorCode::MandateRevoked, "the mandate has been revoked"));
        }
        Ok(c)
    }

    /// Step 3-4: which resource, which normalised path.
    pub fn select(
        &self,
        snap: &crate::state::Snapshot,
        c: &Cached,
        t: &Target,
        bound: Option<caracal_shared::ids::ResourceId>,
    ) -> Result<(Arc<ResourceEntry>, String)> {
        let mut found = None;
        for rc in &c.m.claims.resources {
            if bound.is_some_and(|b| b != rc.id) {
                continue;
            }
            let Some(r) = snap.resources.get(&rc.id) else { continue };
            if r.host_allowed(&t.host) && r.base_port == t.port && r.https == t.https {
                found = Some(r.clone());
                break;
            }
        }
        let r = found.ok_or_else(|| {
            Error::new(
                ErrorCode::PolicyDenied,
                format!("the mandate covers no resource at {}:{}", t.host, t.port),
            )
            .with_details(json!({ "reason": "no_resource" }))
        })?;
        let path = caracal_shared::reqpath::normalize(&t.path).map_err(Error::from)?;
        Ok((r, path))
    }

    /// Whether deciding needs the request body, and why: a rule or allowlist looks at model or
    /// tool, or one of `budgets`, those the request draws from, counts tokens or money.
    pub fn body_need(
        &self,
        snap: &crate::state::Snapshot,
        c: &Cached,
        r: &ResourceEntry,
        method: &str,
        budgets: &[Arc<caracal_shared::store::admin::Budget>],
    ) -> Option<BodyNeed> {
        if matches!(method, "GET" | "HEAD" | "DELETE" | "OPTIONS" | "CONNECT") {
            return None;
        }
        let rule_needs = |m: &caracal_shared::policy::MatchRule| m.model.source() != ANY || m.tool.source() != ANY;
        if !r.models.is_empty() || c.m.rules_for(r.res.id).any(rule_needs) {
            return Some(BodyNeed::Rules);
        }
        if c.m
            .resource(r.res.id)
            .and_then(|rc| snap.active.get(&(c.m.claims.tenant, rc.policy)))
            .is_some_and(|(_, p)| p.rules.iter().any(|x| rule_needs(&x.matcher)))
        {
            return Some(BodyNeed::Rules);
        }
        budgets
            .iter()
            .any(|b| b.unit != caracal_shared::store::admin::BudgetUnit::Requests)
            .then_some(BodyNeed::Budget)
    }

    /// The budgets a request of this mandate on this resource draws from.
    pub fn budgets_for(
        &self,
        snap: &crate::state::Snapshot,
        c: &Cached,
        r: &ResourceEntry,
    ) -> Vec<Arc<caracal_shared::store::admin::Budget>> {
        if snap.budgets.is_empty() {
            return Vec::new();
        }
        match snap.budgets.get(&c.m.claims.tenant) {
            None => Vec::new(),
            Some(all) => crate::budget::Budgets::applicable(all, c.m.claims.agent, r.res.id),
        }
    }

    /// Step 5-6: is exactly this request allowed? Returns the deciding rule.
    pub fn authorize(
        &self,
        snap: &crate::state::Snapshot,
        c: &Cached,
        r: &ResourceEntry,
        facts: &Facts<'_>,
    ) -> Result<String> {
        let now = coarse_now_secs();
        let d =
            c.m.authorize(
                &Request {
                    resource: r.res.id,
                    facts: *facts,
                },
                now,
            )
            .map_err(Error::from)?;
        if !d.allow {
            return Err(
                Error::new(ErrorCode::PolicyDenied, "the mandate does not allow this request")
                    .with_details(json!({ "reason": "mandate", "rule": d.rule })),
            );
        }
        // The current policy version must agree (tightening applies to live mandates).
        if let Some(rc) = c.m.resource(r.res.id) {
            match snap.active.get(&(c.m.claims.tenant, rc.policy)) {
                Some((v, p)) if *v != rc.policy_version => {
                    let scopes = (!rc.scopes.is_empty()).then_some(rc.scopes.as_slice());
                    let rules: Vec<&caracal_shared::policy::MatchRule> =
                        p.applicable(&r.res.name, scopes).map(|x| &x.matcher).collect();
                    let now_d = decide(rules.iter().copied(), facts);
                    if !now_d.allow {
                        return Err(Error::new(
                            ErrorCode::PolicyDenied,
                            "the current policy no longer allows this request",
                        )
                        .with_details(json!({ "reason": "policy", "rule": now_d.rule, "policy_version": v })));
                    }
                }
                None => {
                    return Err(
                        Error::new(ErrorCode::PolicyDenied, "the mandate's policy has no active version")
                            .with_details(json!({ "reason": "policy_inactive" })),
                    );
                }
                _ => {}
            }
        }
        if !r.admits(facts.method, facts.path, facts.model) {
            return Err(Error::new(
                ErrorCode::PolicyDenied,
                "the resource does not allow this model or operation",
            )
            .with_details(json!({ "reason": "resource_allowlist" })));
        }
        if let Err(retry) = self.limiter.check(&c.m.claims.agent, 1.0) {
            return Err(
                Error::new(ErrorCode::RateLimited, "the agent's request rate is over its limit")
                    .with_retry_after(retry),
            );
        }
        Ok(d.rule.unwrap_or_default())
    }

    /// Step 8: one audit event per decision (serialised by the audit publisher). Failure
    /// means the caller must refuse.
    pub fn audit_decision(&self, allow: bool, reason: &'static str, est: Established, info: AuditInfo) -> Result<()> {
        let tenant = est.mandate.map(|w| w.tenant);
        let ev = DecisionEvent {
            allow,
            reason,
            est,
            info,
            gateway: self.gateway_id,
        };
        match ev.pack() {
            // The event's own memory is freed here, on the thread that allocated it.
            Some(packed) => self.audit.emit_packed("decision", tenant, packed),
            None => self.audit.emit_record("decision", tenant, ev),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request_id::RequestId;
    use caracal_shared::audit::Record as _;
    use caracal_shared::ids::{AgentId, MandateId, ResourceId, SessionId, TenantId};
    use caracal_shared::mandate::{Claims, VerifiedMandate};

    fn cached(session: Option<SessionId>) -> Arc<Cached> {
        let (private, public) = mandate::generate_key();
        let kp = mandate::keypair_from_private(&private).unwrap();
        let now = caracal_shared::time::now_secs();
        let claims = Claims {
            mandate_id: MandateId::new(),
            tenant: TenantId::new(),
            agent: AgentId::new(),
            session,
            issued_at: now,
            expires_at: now + 600,
            resources: vec![],
            ops: vec![],
            narrow: vec![],
            budgets: vec![],
            ancestors: vec![],
            parent: None,
            depth: 0,
            approval: None,
            credential: None,
        };
        let token = mandate::mint(&claims, &kp, 7).unwrap();
        let keys = std::collections::HashMap::from([(7u32, mandate::public_key_from_str(&public).unwrap())]);
        let v = VerifiedMandate::verify(&token, &keys, now).unwrap();
        Arc::new(Cached::new(v, &token))
    }

    #[test]
    fn bodies_are_read_as_the_most_lenient_upstream_would_or_refused() {
        let ok = |b: &str, need| body_facts(b.as_bytes(), need).unwrap();
        let refused = |b: &str, need| {
            let e = body_facts(b.as_bytes(), need).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidJson, "{b}");
            assert!(!e.message.contains("secret"), "the body is not quoted: {}", e.message);
        };
        let f = ok(
            r#"{"model":"gpt-4o","max_tokens":256,"messages":[{"model":"inner"}]}"#,
            BodyNeed::Rules,
        );
        assert_eq!((f.model.as_str(), f.max_tokens), ("gpt-4o", Some(256)));
        let f = ok(
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_repo","arguments":{"name":"x"}}}"#,
            BodyNeed::Rules,
        );
        assert_eq!(f.tool, "delete_repo");
        assert_eq!(
            ok(r#"{"method":"tools/list","params":{"name":"x"}}"#, BodyNeed::Rules).tool,
            ""
        );
        assert_eq!(ok(r#"{"method":"tools/call","params":[1]}"#, BodyNeed::Rules).tool, "");
        // Escapes in names are decoded, as every decoder does.
        assert_eq!(ok(r#"{"mod\u0065l":"m"}"#, BodyNeed::Rules).model, "m");
        // Whole-number floats are token counts.
        assert_eq!(
            ok(r#"{"max_completion_tokens":256.0}"#, BodyNeed::Rules).max_tokens,
            Some(256)
        );
        // Nothing to read.
        for b in ["", "  \r\n"] {
            assert_eq!(ok(b, BodyNeed::Rules).model, "");
        }
        // A budget alone does not refuse a body that is not JSON (an upload); rules do.
        assert_eq!(ok("--boundary\r\nmodel=x", BodyNeed::Budget).model, "");
        refused("--boundary\r\nmodel=x", BodyNeed::Rules);
        for need in [BodyNeed::Rules, BodyNeed::Budget] {
            for b in [
                // Given twice: decoders differ on which one wins.
                r#"{"model":"gpt-4o","model":"gpt-4-expensive"}"#,
                r#"{"model":"gpt-4o","Model":"gpt-4-expensive"}"#,
                r#"{"model":"gpt-4o","MODEL":"gpt-4-expensive"}"#,
                r#"{"max_tokens":1,"max_to\u212Aens":100000}"#,
                r#"{"method":"tools/call","method":"tools/list"}"#,
                r#"{"method":"tools/call","params":{"name":"a","NAME":"delete_repo"}}"#,
                r#"{"method":"tools/call","params":{"name":"a"},"paramſ":{"name":"b"}}"#,
                // Not one object.
                r#"[{"method":"tools/call","params":{"name":"delete_repo"}}]"#,
                r#"{"model":"a"} {"model":"b"}"#,
                r#"{"model":"gpt-4-expensive",}"#,
                r#"{"model":"secret"#,
                // The wrong type.
                r#"{"model":["secret"]}"#,
                r#"{"max_tokens":"secret"}"#,
                r#"{"max_tokens":2.5}"#,
                r#"{"method":"tools/call","params":{"name":7}}"#,
            ] {
                refused(b, need);
            }
        }
    }

    #[test]
    fn decision_records_are_written_exactly_as_serde_writes_them() {
        let odd = "/a\"b\\c\u{1}\u{7f}é\n\t/ü";
        let events = [
            DecisionEvent {
                allow: true,
                reason: "ok",
                est: Established {
                    mandate: Some(Who::of(&cached(Some(SessionId::new())))),
                    resource: Some(ResourceId::new()),
                    method: Some("GET".into()),
                    host: Some("api.example".into()),
                    path: Some("/v1/models".into()),
                    rule: Some("read".into()),
                    reserved: None,
                },
                info: AuditInfo {
                    request_id: RequestId::parse(b"0123abcd").unwrap(),
                    source: Some("127.0.0.1".parse().unwrap()),
                    kind: "http",
                    mode: "forward",
                },
                gateway: "gw-1",
            },
            DecisionEvent {
                allow: false,
                reason: "policy_denied",
                est: Established {
                    mandate: Some(Who::of(&cached(None))),
                    resource: None,
                    method: Some("POST".into()),
                    host: Some(odd.into()),
                    path: Some(odd.into()),
                    rule: None,
                    reserved: Some(vec![
                        crate::budget::HoldView {
                            budget_id: caracal_shared::ids::BudgetId::new(),
                            unit: caracal_shared::store::admin::BudgetUnit::Micros,
                            reserved: 1_250_000,
                        },
                        crate::budget::HoldView {
                            budget_id: caracal_shared::ids::BudgetId::new(),
                            unit: caracal_shared::store::admin::BudgetUnit::Requests,
                            reserved: 1,
                        },
                    ]),
                },
                info: AuditInfo {
                    request_id: RequestId::parse(b"req-2_x.y").unwrap(),
                    source: Some("::ffff:10.0.0.1".parse().unwrap()),
                    kind: "http",
                    mode: "sidecar",
                },
                gateway: "gw \"2\"",
            },
            DecisionEvent {
                allow: false,
                reason: "mandate_missing",
                est: Established::default(),
                info: AuditInfo {
                    request_id: RequestId::UNKNOWN,
                    source: None,
                    kind: "connect",
                    mode: "forward",
                },
                gateway: "g",
            },
        ];
        for ev in &events {
            let mut direct = Vec::new();
            ev.write_json(&mut direct).unwrap();
            let by_serde = serde_json::to_vec(ev).unwrap();
            assert_eq!(String::from_utf8(direct).unwrap(), String::from_utf8(by_serde).unwrap());
        }
        // Packed into the audit queue's slot, they read back as the same JSON — except the
        // one with budget reservations, which goes boxed.
        let packed: Vec<bool> = events
            .iter()
            .map(|ev| {
                let Some(p) = ev.pack() else { return false };
                let (mut direct, mut unpacked) = (Vec::new(), Vec::new());
                ev.write_json(&mut direct).unwrap();
                p.write_json(&mut unpacked).unwrap();
                assert_eq!(String::from_utf8(unpacked).unwrap(), String::from_utf8(direct).unwrap());
                true
            })
            .collect();
        assert_eq!(packed, [true, false, true]);
    }

    #[test]
    fn packed_decision_records_hold_every_field_or_go_boxed() {
        let ev = |path: String, source: Option<IpAddr>| DecisionEvent {
            allow: false,
            reason: "policy_denied",
            est: Established {
                mandate: Some(Who::of(&cached(None))),
                resource: Some(ResourceId::new()),
                method: Some(Cow::Owned("PROPFIND".into())),
                host: Some("api.example".into()),
                path: Some(path),
                rule: None,
                reserved: None,
            },
            info: AuditInfo {
                request_id: RequestId::random(),
                source,
                kind: "websocket",
                mode: "intercept",
            },
            gateway: "gw-1",
        };
        let json = |ev: &DecisionEvent| {
            let mut out = Vec::new();
            ev.write_json(&mut out).unwrap();
            out
        };
        for source in [
            None,
            Some("10.1.2.3".parse().unwrap()),
            Some("fd00:ec2::254".parse().unwrap()),
        ] {
            for len in [0, 1, 100, 200] {
                let e = ev(format!("/{}", "é".repeat(len)), source);
                let packed = e.pack();
                // Only the record whose path (400 bytes) does not fit goes boxed.
                assert_eq!(packed.is_none(), len == 200, "{len} {source:?}");
                if let Some(p) = packed {
                    let mut out = Vec::new();
                    p.write_json(&mut out).unwrap();
                    assert_eq!(out, json(&e), "{len} {source:?}");
                    // Every strict prefix of its bytes is refused, not misread.
                    for cut in 0..p.bytes().len() {
                        assert!(write_packed(&p.bytes()[..cut], &mut Vec::new()).is_err());
                    }
                }
            }
        }
        // Trailing bytes and unknown tags are refused too.
        let p = ev("/v1".into(), None).pack().unwrap();
        let mut longer = p.bytes().to_vec();
        longer.push(0);
        assert!(write_packed(&longer, &mut Vec::new()).is_err());
        let mut odd_allow = p.bytes().to_vec();
        odd_allow[0] = 2;
        assert!(write_packed(&odd_allow, &mut Vec::new()).is_err());
        let mut odd_source = p.bytes().to_vec();
        *odd_source.last_mut().unwrap() = 5;
        assert!(write_packed(&odd_source, &mut Vec::new()).is_err());
    }
}
