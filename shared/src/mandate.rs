//! Mandates: Biscuit tokens (Ed25519) issued by the STS and verified by gateways.
//!
//! ## Token contents (authority block, signed by the STS key named by the root key id)
//!
//! ```text
//! caracal_mandate(1);
//! mandate("mdt_…"); tenant("ten_…"); agent("agt_…"); session("ses_…");   // session optional
//! issued(2026-11-22T10:00:00Z); expires(2026-11-22T10:05:00Z);
//! resource("res_…", "openai", "pol_…", 3, "grt_…");        // id, name, policy, policy version, grant
//! scope("res_…", "chat");
//! budget("bud_…");
//! op("res_…", "chat", "^(?:POST)$", "^(?:api\.openai\.com)$", "^(?:/v1/chat/completions)$", ".*", ".*");
//! op_scope("res_…", "chat", "chat");
//! deny_op("res_…", "no-admin", ".*", ".*", "^(?:/v1/admin/.*)$", ".*", ".*");
//! narrow(0, "res_…", "^(?:POST)$", ".*", "^(?:/v1/chat/.*)$", ".*", ".*"); // delegated mandates only
//! ancestor("<hex revocation id>");  parent("mdt_…"); depth(1); approval("apr_…"); credential("cred_…");
//!
//! check if time($t), expires($e), $t <= $e;
//! check if req_resource($r), resource($r, $n, $p, $v, $g);
//! check if req_resource($r), req($m, $h, $p, $mo, $to), op($r, $i, $om, $oh, $op, $omo, $oto),
//!          $m.matches($om), $h.matches($oh), $p.matches($op), $mo.matches($omo), $to.matches($oto);
//! reject if req_resource($r), req($m, $h, $p, $mo, $to), deny_op($r, $i, $om, …), <same matches>;
//! check if req_resource($r), req(…), narrow(K, $r, …), <same matches>;            // one per narrow set K
//! ```
//!
//! A verifier supplies `time(now)`, `req_resource(id)` and `req(method, host, path, model, tool)`.
//!
//! ## Verification
//!
//! [`VerifiedMandate::verify`] checks the signature (key chosen by root key id; an unknown id is
//! reported so the caller can refresh its key set), reads the claims from the authority block
//! with Datalog queries (never from text; facts of later blocks cannot add authority), and keeps
//! the block revocation ids (the caller checks them against its revocation set; `ancestor`
//! facts extend revocation to every mandate a delegated one descends from).
//!
//! [`VerifiedMandate::authorize`] decides per request. For mandates made only of the authority
//! block (everything the STS issues, delegation included) it runs the same regexes natively —
//! equivalent to the Datalog by construction, checked by a property test. A token a holder
//! attenuated offline (extra blocks) is honoured too: every request additionally runs the full
//! Biscuit authorizer, so the extra checks apply (slower, never wider).

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use biscuit_auth::builder::{self, Term};
use biscuit_auth::{Algorithm, AuthorizerBuilder, AuthorizerLimits, Biscuit, KeyPair, PrivateKey, PublicKey};
use serde::Serialize;

use crate::error::{Error, ErrorCode};
use crate::ids::{AgentId, ApprovalId, BudgetId, GrantId, MandateId, PolicyId, ResourceId, SessionId, TenantId};
use crate::policy::{Decision, Effect, Facts, MatchRule, decide};

/// Every mandate starts with this, for secret scanners and quick recognition.
pub const TOKEN_PREFIX: &str = "cm1_";
/// Largest accepted token (encoded).
pub const MAX_TOKEN_LEN: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResourceClaim {
    pub id: ResourceId,
    pub name: String,
    pub policy: PolicyId,
    pub policy_version: i64,
    pub grant: GrantId,
    pub scopes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OpClaim {
    pub resource: ResourceId,
    pub rule: String,
    pub effect: Effect,
    /// method, host, path, model, tool regexes.
    pub patterns: [String; 5],
    /// Policy scopes the rule belongs to (empty: every scope).
    pub scopes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NarrowClaim {
    /// The delegation level that added it (all sets must match).
    pub set: i64,
    pub resource: ResourceId,
    pub patterns: [String; 5],
}

/// Everything a mandate states.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Claims {
    pub mandate_id: MandateId,
    pub tenant: TenantId,
    pub agent: AgentId,
    pub session: Option<SessionId>,
    /// Seconds since the epoch.
    pub issued_at: i64,
    pub expires_at: i64,
    pub resources: Vec<ResourceClaim>,
    pub ops: Vec<OpClaim>,
    pub narrow: Vec<NarrowClaim>,
    pub budgets: Vec<BudgetId>,
    /// Revocation ids (hex) of every mandate this one descends from.
    pub ancestors: Vec<String>,
    pub parent: Option<MandateId>,
    pub depth: i64,
    pub approval: Option<ApprovalId>,
    /// The workload credential (API key, identity) the mandate was obtained with.
    pub credential: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MandateError {
    Malformed,
    /// Signed by a key id the verifier does not know (refresh the key set and retry).
    UnknownKey(Option<u32>),
    BadSignature,
    Expired,
    NotYetValid,
    Revoked,
}

impl fmt::Display for MandateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MandateError::Malformed => f.write_str("the mandate is malformed"),
            MandateError::UnknownKey(k) => write!(f, "the mandate is signed by an unknown key ({k:?})"),
            MandateError::BadSignature => f.write_str("the mandate signature is invalid"),
            MandateError::Expired => f.write_str("the mandate has expired"),
            MandateError::NotYetValid => f.write_str("the mandate is not valid yet"),
            MandateError::Revoked => f.write_str("the mandate has been revoked"),
        }
    }
}

impl From<MandateError> for Error {
    fn from(e: MandateError) -> Error {
        let code = match e {
            MandateError::Expired => ErrorCode::MandateExpired,
            MandateError::Revoked => ErrorCode::MandateRevoked,
            _ => ErrorCode::MandateInvalid,
        };
        Error::new(code, e.to_string())
    }
}

fn s(v: impl Into<String>) -> Term {
    builder::string(&v.into())
}

fn date(secs: i64) -> Term {
    builder::date(&(UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64)))
}

fn fact(name: &str, terms: &[Term]) -> builder::Fact {
    builder::fact(name, terms)
}

const MATCHES: &str = "$m.matches($om), $h.matches($oh), $p.matches($op), $mo.matches($omo), $to.matches($oto)";

/// The checks every mandate carries, parsed once (parsing them on every mint costs more than
/// cloning them).
fn fixed_checks() -> &'static [builder::Check] {
    static CHECKS: std::sync::OnceLock<Vec<builder::Check>> = std::sync::OnceLock::new();
    CHECKS.get_or_init(|| {
        [
            "check if time($t), expires($e), $t <= $e".to_string(),
            "check if req_resource($r), resource($r, $n, $p, $v, $g)".to_string(),
            format!("check if req_resource($r), req($m, $h, $p, $mo, $to), op($r, $i, $om, $oh, $op, $omo, $oto), {MATCHES}"),
            format!("reject if req_resource($r), req($m, $h, $p, $mo, $to), deny_op($r, $i, $om, $oh, $op, $omo, $oto), {MATCHES}"),
        ]
        .iter()
        .map(|c| builder::Check::try_from(c.as_str()).expect("the fixed checks parse"))
        .collect()
    })
}

/// The check for narrowing set `k` (delegation level), cached for the first levels.
fn narrow_check(k: i64) -> builder::Check {
    static CHECKS: std::sync::OnceLock<Vec<builder::Check>> = std::sync::OnceLock::new();
    let make = |k: i64| {
        builder::Check::try_from(
            format!("check if req_resource($r), req($m, $h, $p, $mo, $to), narrow({k}, $r, $om, $oh, $op, $omo, $oto), {MATCHES}").as_str(),
        )
        .expect("the narrow check parses")
    };
    let cached = CHECKS.get_or_init(|| (0..16).map(make).collect());
    usize::try_from(k)
        .ok()
        .and_then(|i| cached.get(i))
        .cloned()
        .unwrap_or_else(|| make(k))
}

/// Generate an Ed25519 signing key pair (private bytes, `ed25519/<hex>` public key).
pub fn generate_key() -> (Vec<u8>, String) {
    let kp = KeyPair::new_with_algorithm(Algorithm::Ed25519);
    (kp.private().to_bytes().to_vec(), kp.public().to_string())
}

pub fn keypair_from_private(bytes: &[u8]) -> Result<KeyPair, Error> {
    let pk = PrivateKey::from_bytes(bytes, Algorithm::Ed25519).map_err(|_| Error::internal("invalid signing key"))?;
    Ok(KeyPair::from(&pk))
}

pub fn public_key_from_str(s: &str) -> Result<PublicKey, Error> {
    let hex = s
        .strip_prefix("ed25519/")
        .ok_or_else(|| Error::validation("public keys are written ed25519/<hex>"))?;
    PublicKey::from_bytes_hex(hex, Algorithm::Ed25519).map_err(|_| Error::validation("invalid public key"))
}

/// Build and sign a mandate. Returns the encoded token.
pub fn mint(c: &Claims, key: &KeyPair, kid: u32) -> Result<String, Error> {
    let bad = |e: biscuit_auth::error::Token| Error::internal(format!("cannot build mandate: {e}"));
    let mut b = Biscuit::builder().root_key_id(kid);
    let mut facts = vec![
        fact("caracal_mandate", &[builder::int(1)]),
        fact("mandate", &[s(c.mandate_id.to_string())]),
        fact("tenant", &[s(c.tenant.to_string())]),
        fact("agent", &[s(c.agent.to_string())]),
        fact("issued", &[date(c.issued_at)]),
        fact("expires", &[date(c.expires_at)]),
        fact("depth", &[builder::int(c.depth)]),
    ];
    if let Some(sid) = c.session {
        facts.push(fact("session", &[s(sid.to_string())]));
    }
    if let Some(p) = c.parent {
        facts.push(fact("parent", &[s(p.to_string())]));
    }
    if let Some(a) = c.approval {
        facts.push(fact("approval", &[s(a.to_string())]));
    }
    if let Some(cr) = &c.credential {
        facts.push(fact("credential", &[s(cr)]));
    }
    for r in &c.resources {
        facts.push(fact(
            "resource",
            &[
                s(r.id.to_string()),
                s(&r.name),
                s(r.policy.to_string()),
                builder::int(r.policy_version),
                s(r.grant.to_string()),
            ],
        ));
        for sc in &r.scopes {
            facts.push(fact("scope", &[s(r.id.to_string()), s(sc)]));
        }
    }
    for bud in &c.budgets {
        facts.push(fact("budget", &[s(bud.to_string())]));
    }
    for a in &c.ancestors {
        facts.push(fact("ancestor", &[s(a)]));
    }
    for o in &c.ops {
        let name = if o.effect == Effect::Allow { "op" } else { "deny_op" };
        let mut t = vec![s(o.resource.to_string()), s(&o.rule)];
        t.extend(o.patterns.iter().map(s));
        facts.push(fact(name, &t));
        for sc in &o.scopes {
            facts.push(fact("op_scope", &[s(o.resource.to_string()), s(&o.rule), s(sc)]));
        }
    }
    let mut sets: Vec<i64> = c.narrow.iter().map(|n| n.set).collect();
    sets.sort();
    sets.dedup();
    for n in &c.narrow {
        let mut t = vec![builder::int(n.set), s(n.resource.to_string())];
        t.extend(n.patterns.iter().map(s));
        facts.push(fact("narrow", &t));
    }
    for f in facts {
        b = b.fact(f).map_err(bad)?;
    }
    for c in fixed_checks() {
        b = b.check(c.clone()).map_err(bad)?;
    }
    for k in sets {
        b = b.check(narrow_check(k)).map_err(bad)?;
    }
    let token = b.build(key).map_err(bad)?;
    Ok(format!("{TOKEN_PREFIX}{}", token.to_base64().map_err(bad)?))
}

/// Does this string look like a mandate (rather than an API key)?
pub fn is_mandate(s: &str) -> bool {
    s.starts_with(TOKEN_PREFIX)
}

/// The public keys a verifier knows, by root key id.
pub trait KeySet {
    fn key(&self, kid: u32) -> Option<PublicKey>;
}

impl KeySet for std::collections::HashMap<u32, PublicKey> {
    fn key(&self, kid: u32) -> Option<PublicKey> {
        self.get(&kid).copied()
    }
}

/// A mandate whose signature verified, with its claims and matchers ready.
#[derive(Clone)]
pub struct VerifiedMandate {
    pub claims: Claims,
    pub kid: Option<u32>,
    /// Hex revocation ids of every block (the first is the authority block's).
    pub revocation_ids: Vec<String>,
    rules: Vec<(ResourceId, MatchRule)>,
    narrow: Vec<(i64, ResourceId, MatchRule)>,
    narrow_sets: Vec<i64>,
    /// Present when a holder attenuated the token offline: evaluated per request.
    attenuated: Option<Biscuit>,
}

impl fmt::Debug for VerifiedMandate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifiedMandate")
            .field("mandate_id", &self.claims.mandate_id)
            .field("agent", &self.claims.agent)
            .field("expires_at", &self.claims.expires_at)
            .field("attenuated", &self.attenuated.is_some())
            .finish()
    }
}

/// The facts of one request, for [`VerifiedMandate::authorize`].
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub resource: ResourceId,
    pub facts: Facts<'a>,
}

fn limits() -> AuthorizerLimits {
    AuthorizerLimits {
        max_time: Duration::from_millis(250),
        ..Default::default()
    }
}

fn date_secs(t: &Term) -> Option<i64> {
    match t {
        Term::Date(d) => i64::try_from(*d).ok(),
        _ => None,
    }
}

impl VerifiedMandate {
    /// Verify the signature and read the claims. Expiry is checked against `now_secs`.
    pub fn verify(token: &str, keys: &dyn KeySet, now_secs: i64) -> Result<VerifiedMandate, MandateError> {
        let b64 = token.strip_prefix(TOKEN_PREFIX).ok_or(MandateError::Malformed)?;
        if b64.is_empty() || b64.len() > MAX_TOKEN_LEN {
            return Err(MandateError::Malformed);
        }
        let asked = std::cell::Cell::new(None::<Option<u32>>);
        let provider = |kid: Option<u32>| {
            asked.set(Some(kid));
            kid.and_then(|k| keys.key(k))
                .ok_or(biscuit_auth::error::Format::UnknownPublicKey)
        };
        let token = match Biscuit::from_base64(b64, provider) {
            Ok(t) => t,
            Err(biscuit_auth::error::Token::Format(biscuit_auth::error::Format::UnknownPublicKey)) => {
                return Err(MandateError::UnknownKey(asked.get().flatten()));
            }
            Err(biscuit_auth::error::Token::Format(biscuit_auth::error::Format::Signature(_))) => {
                return Err(MandateError::BadSignature);
            }
            Err(_) => return Err(MandateError::Malformed),
        };
        let claims = extract(&token)?;
        if claims.expires_at <= now_secs {
            return Err(MandateError::Expired);
        }
        if claims.issued_at > now_secs + 300 {
            return Err(MandateError::NotYetValid);
        }
        let mut rules = Vec::with_capacity(claims.ops.len());
        for o in &claims.ops {
            let p = &o.patterns;
            let m = MatchRule::from_sources(&o.rule, o.effect, [&p[0], &p[1], &p[2], &p[3], &p[4]])
                .map_err(|_| MandateError::Malformed)?;
            rules.push((o.resource, m));
        }
        let mut narrow = Vec::new();
        for n in &claims.narrow {
            let p = &n.patterns;
            let m = MatchRule::from_sources("narrow", Effect::Allow, [&p[0], &p[1], &p[2], &p[3], &p[4]])
                .map_err(|_| MandateError::Malformed)?;
            narrow.push((n.set, n.resource, m));
        }
        let mut narrow_sets: Vec<i64> = claims.narrow.iter().map(|n| n.set).collect();
        narrow_sets.sort();
        narrow_sets.dedup();
        let revocation_ids = token.revocation_identifiers().iter().map(hex::encode).collect();
        let kid = token.root_key_id();
        let attenuated = (token.block_count() > 1).then_some(token);
        Ok(VerifiedMandate {
            claims,
            kid,
            revocation_ids,
            rules,
            narrow,
            narrow_sets,
            attenuated,
        })
    }

    pub fn is_attenuated(&self) -> bool {
        self.attenuated.is_some()
    }

    /// Every revocation id that, if revoked, invalidates this mandate.
    pub fn all_revocation_ids(&self) -> impl Iterator<Item = &str> {
        self.revocation_ids
            .iter()
            .chain(self.claims.ancestors.iter())
            .map(|s| s.as_str())
    }

    pub fn resource(&self, id: ResourceId) -> Option<&ResourceClaim> {
        self.claims.resources.iter().find(|r| r.id == id)
    }

    /// The rules of one resource, in matcher form (what the gateway runs).
    pub fn rules_for(&self, id: ResourceId) -> impl Iterator<Item = &MatchRule> + Clone {
        self.rules.iter().filter(move |(r, _)| *r == id).map(|(_, m)| m)
    }

    /// Decide one request at `now_secs`.
    pub fn authorize(&self, req: &Request<'_>, now_secs: i64) -> Result<Decision, MandateError> {
        if now_secs >= self.claims.expires_at {
            return Err(MandateError::Expired);
        }
        if self.resource(req.resource).is_none() {
            return Ok(Decision {
                allow: false,
                rule: None,
            });
        }
        let mut d = decide(self.rules_for(req.resource), &req.facts);
        if d.allow {
            for set in &self.narrow_sets {
                let ok = self
                    .narrow
                    .iter()
                    .any(|(k, r, m)| k == set && *r == req.resource && m.matches(&req.facts));
                if !ok {
                    d = Decision {
                        allow: false,
                        rule: Some("delegation".into()),
                    };
                    break;
                }
            }
        }
        if d.allow
            && let Some(token) = &self.attenuated
            && !datalog_allows(token, req, now_secs)
        {
            d = Decision {
                allow: false,
                rule: Some("attenuation".into()),
            };
        }
        Ok(d)
    }
}

/// Evaluate the full token (every block's checks) with the Biscuit authorizer.
pub fn datalog_allows(token: &Biscuit, req: &Request<'_>, now_secs: i64) -> bool {
    let f = &req.facts;
    let build = || -> Result<bool, biscuit_auth::error::Token> {
        let mut a = AuthorizerBuilder::new()
            .set_limits(limits())
            .fact(fact("time", &[date(now_secs)]))?
            .fact(fact("req_resource", &[s(req.resource.to_string())]))?
            .fact(fact("req", &[s(f.method), s(f.host), s(f.path), s(f.model), s(f.tool)]))?
            .code("allow if true;")?
            .build(token)?;
        Ok(a.authorize().is_ok())
    };
    build().unwrap_or(false)
}

fn extract(token: &Biscuit) -> Result<Claims, MandateError> {
    let mut a = AuthorizerBuilder::new()
        .set_limits(limits())
        .build(token)
        .map_err(|_| MandateError::Malformed)?;
    // `query` sees the authority block and the authorizer only: later blocks cannot add claims.
    let bad = |_| MandateError::Malformed;
    let one = |a: &mut biscuit_auth::Authorizer, rule: &str| -> Result<Vec<builder::Fact>, MandateError> {
        a.query::<&str, builder::Fact, std::convert::Infallible>(rule)
            .map_err(bad)
    };
    let strings =
        |facts: Vec<builder::Fact>| -> Vec<Vec<Term>> { facts.into_iter().map(|f| f.predicate.terms).collect() };
    let text = |t: &Term| -> Result<String, MandateError> {
        match t {
            Term::Str(s) => Ok(s.clone()),
            _ => Err(MandateError::Malformed),
        }
    };
    let int = |t: &Term| -> Result<i64, MandateError> {
        match t {
            Term::Integer(i) => Ok(*i),
            _ => Err(MandateError::Malformed),
        }
    };
    let single = |rows: Vec<Vec<Term>>| -> Result<Option<Term>, MandateError> {
        match rows.len() {
            0 => Ok(None),
            1 => Ok(rows.into_iter().next().and_then(|r| r.into_iter().next())),
            _ => Err(MandateError::Malformed),
        }
    };
    let version = single(strings(one(&mut a, "x($v) <- caracal_mandate($v)")?))?.ok_or(MandateError::Malformed)?;
    if int(&version)? != 1 {
        return Err(MandateError::Malformed);
    }
    let req_str = |a: &mut biscuit_auth::Authorizer, name: &str| -> Result<String, MandateError> {
        let t = single(strings(one(a, &format!("x($v) <- {name}($v)"))?))?.ok_or(MandateError::Malformed)?;
        text(&t)
    };
    let opt_str = |a: &mut biscuit_auth::Authorizer, name: &str| -> Result<Option<String>, MandateError> {
        single(strings(one(a, &format!("x($v) <- {name}($v)"))?))?
            .as_ref()
            .map(text)
            .transpose()
    };
    let mid = MandateId::parse(&req_str(&mut a, "mandate")?).map_err(|_| MandateError::Malformed)?;
    let tenant = TenantId::parse(&req_str(&mut a, "tenant")?).map_err(|_| MandateError::Malformed)?;
    let agent = AgentId::parse(&req_str(&mut a, "agent")?).map_err(|_| MandateError::Malformed)?;
    let session = opt_str(&mut a, "session")?
        .map(|s| SessionId::parse(&s))
        .transpose()
        .map_err(|_| MandateError::Malformed)?;
    let parent = opt_str(&mut a, "parent")?
        .map(|s| MandateId::parse(&s))
        .transpose()
        .map_err(|_| MandateError::Malformed)?;
    let approval = opt_str(&mut a, "approval")?
        .map(|s| ApprovalId::parse(&s))
        .transpose()
        .map_err(|_| MandateError::Malformed)?;
    let credential = opt_str(&mut a, "credential")?;
    let issued = single(strings(one(&mut a, "x($v) <- issued($v)")?))?
        .as_ref()
        .and_then(date_secs)
        .ok_or(MandateError::Malformed)?;
    let expires = single(strings(one(&mut a, "x($v) <- expires($v)")?))?
        .as_ref()
        .and_then(date_secs)
        .ok_or(MandateError::Malformed)?;
    let depth = single(strings(one(&mut a, "x($v) <- depth($v)")?))?
        .as_ref()
        .map(int)
        .transpose()?
        .unwrap_or(0);

    let mut resources = Vec::new();
    for r in strings(one(&mut a, "x($r, $n, $p, $v, $g) <- resource($r, $n, $p, $v, $g)")?) {
        let [r0, r1, r2, r3, r4] = <[Term; 5]>::try_from(r).map_err(|_| MandateError::Malformed)?;
        let id = ResourceId::parse(&text(&r0)?).map_err(|_| MandateError::Malformed)?;
        resources.push(ResourceClaim {
            id,
            name: text(&r1)?,
            policy: PolicyId::parse(&text(&r2)?).map_err(|_| MandateError::Malformed)?,
            policy_version: int(&r3)?,
            grant: GrantId::parse(&text(&r4)?).map_err(|_| MandateError::Malformed)?,
            scopes: Vec::new(),
        });
    }
    resources.sort_by_key(|r| r.id);
    for row in strings(one(&mut a, "x($r, $s) <- scope($r, $s)")?) {
        let [r0, r1] = <[Term; 2]>::try_from(row).map_err(|_| MandateError::Malformed)?;
        let rid = text(&r0)?;
        if let Some(r) = resources.iter_mut().find(|r| r.id.to_string() == rid) {
            r.scopes.push(text(&r1)?);
        }
    }
    for r in &mut resources {
        r.scopes.sort();
    }
    let mut budgets = Vec::new();
    for row in strings(one(&mut a, "x($b) <- budget($b)")?) {
        budgets.push(BudgetId::parse(&text(&row[0])?).map_err(|_| MandateError::Malformed)?);
    }
    budgets.sort();
    let mut ancestors: Vec<String> = strings(one(&mut a, "x($a) <- ancestor($a)")?)
        .iter()
        .map(|r| text(&r[0]))
        .collect::<Result<_, _>>()?;
    ancestors.sort();

    let op_rows =
        |a: &mut biscuit_auth::Authorizer, name: &str, effect: Effect| -> Result<Vec<OpClaim>, MandateError> {
            let rows = strings(one(
                a,
                &format!("x($r, $i, $m, $h, $p, $mo, $to) <- {name}($r, $i, $m, $h, $p, $mo, $to)"),
            )?);
            let mut out = Vec::new();
            for row in rows {
                let t = <[Term; 7]>::try_from(row).map_err(|_| MandateError::Malformed)?;
                out.push(OpClaim {
                    resource: ResourceId::parse(&text(&t[0])?).map_err(|_| MandateError::Malformed)?,
                    rule: text(&t[1])?,
                    effect,
                    patterns: [text(&t[2])?, text(&t[3])?, text(&t[4])?, text(&t[5])?, text(&t[6])?],
                    scopes: Vec::new(),
                });
            }
            Ok(out)
        };
    let mut ops = op_rows(&mut a, "op", Effect::Allow)?;
    ops.extend(op_rows(&mut a, "deny_op", Effect::Deny)?);
    for row in strings(one(&mut a, "x($r, $i, $s) <- op_scope($r, $i, $s)")?) {
        let [r0, r1, r2] = <[Term; 3]>::try_from(row).map_err(|_| MandateError::Malformed)?;
        let (rid, rule, sc) = (text(&r0)?, text(&r1)?, text(&r2)?);
        for o in ops
            .iter_mut()
            .filter(|o| o.resource.to_string() == rid && o.rule == rule)
        {
            o.scopes.push(sc.clone());
        }
    }
    for o in &mut ops {
        o.scopes.sort();
    }
    ops.sort_by(|x, y| {
        (x.resource, &x.rule, x.effect == Effect::Deny).cmp(&(y.resource, &y.rule, y.effect == Effect::Deny))
    });
    let mut narrow = Vec::new();
    for row in strings(one(
        &mut a,
        "x($k, $r, $m, $h, $p, $mo, $to) <- narrow($k, $r, $m, $h, $p, $mo, $to)",
    )?) {
        let t = <[Term; 7]>::try_from(row).map_err(|_| MandateError::Malformed)?;
        narrow.push(NarrowClaim {
            set: int(&t[0])?,
            resource: ResourceId::parse(&text(&t[1])?).map_err(|_| MandateError::Malformed)?,
            patterns: [text(&t[2])?, text(&t[3])?, text(&t[4])?, text(&t[5])?, text(&t[6])?],
        });
    }
    narrow.sort_by(|x, y| (x.set, x.resource, &x.patterns).cmp(&(y.set, y.resource, &y.patterns)));
    Ok(Claims {
        mandate_id: mid,
        tenant,
        agent,
        session,
        issued_at: issued,
        expires_at: expires,
        resources,
        ops,
        narrow,
        budgets,
        ancestors,
        parent,
        depth,
        approval,
        credential,
    })
}

/// Append an offline attenuation block: the holder restricts the token to requests matching
/// one of `allowed` (method, host, path, model, tool regexes) and, optionally, to an earlier
/// expiry. Needs no key; the result can only be narrower.
pub fn attenuate_offline(token: &str, allowed: &[[String; 5]], expires_at: Option<i64>) -> Result<String, Error> {
    let b64 = token
        .strip_prefix(TOKEN_PREFIX)
        .ok_or_else(|| Error::validation("not a mandate"))?;
    let parsed =
        biscuit_auth::UnverifiedBiscuit::from_base64(b64).map_err(|_| Error::validation("malformed mandate"))?;
    let bad = |e: biscuit_auth::error::Token| Error::internal(format!("cannot attenuate: {e}"));
    let mut blk = builder::BlockBuilder::new();
    for p in allowed {
        let t: Vec<Term> = p.iter().map(s).collect();
        blk = blk.fact(fact("allowed", &t)).map_err(bad)?;
    }
    let mut code = format!("check if req($m, $h, $p, $mo, $to), allowed($om, $oh, $op, $omo, $oto), {MATCHES};\n");
    if let Some(e) = expires_at {
        code.push_str("check if time($t), $t <= {exp};\n");
        let mut params = std::collections::HashMap::new();
        params.insert("exp".to_string(), date(e));
        blk = blk.code_with_params(code, params, Default::default()).map_err(bad)?;
    } else {
        blk = blk.code(code).map_err(bad)?;
    }
    let out = parsed.append(blk).map_err(bad)?;
    Ok(format!("{TOKEN_PREFIX}{}", out.to_base64().map_err(bad)?))
}

/// Seconds since the epoch for a `SystemTime` (helper for callers).
pub fn secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{CompiledPolicy, Format};
    use std::collections::HashMap;

    fn claims(ops: Vec<OpClaim>, res: ResourceId, narrow: Vec<NarrowClaim>) -> Claims {
        Claims {
            mandate_id: MandateId::new(),
            tenant: TenantId::new(),
            agent: AgentId::new(),
            session: Some(SessionId::new()),
            issued_at: 1_000,
            expires_at: 2_000,
            resources: vec![ResourceClaim {
                id: res,
                name: "openai".into(),
                policy: PolicyId::new(),
                policy_version: 3,
                grant: GrantId::new(),
                scopes: vec!["chat".into(), "read".into()],
            }],
            ops,
            narrow,
            budgets: vec![BudgetId::new()],
            ancestors: vec!["abcd".into()],
            parent: Some(MandateId::new()),
            depth: 1,
            approval: None,
            credential: Some("cred_0123".into()),
        }
    }

    fn ops_from(doc: &str, res: ResourceId) -> Vec<OpClaim> {
        let p = CompiledPolicy::from_source(doc, Format::Yaml).unwrap();
        p.rules
            .iter()
            .map(|r| {
                let src = r.matcher.sources();
                OpClaim {
                    resource: res,
                    rule: r.doc.id.clone(),
                    effect: r.doc.effect,
                    patterns: src.map(String::from),
                    scopes: r.doc.scopes.clone(),
                }
            })
            .collect()
    }

    const DOC: &str = r#"
rules:
  - id: chat
    scopes: [chat]
    methods: [POST]
    hosts: ["api.openai.com"]
    paths: ["/v1/chat/completions", "/v1/files/*"]
    models: ["gpt-4o*"]
  - id: read
    methods: [GET, HEAD]
    paths: ["/v1/**"]
  - id: no-admin
    effect: deny
    paths: ["/v1/admin/**"]
"#;

    fn keys() -> (KeyPair, HashMap<u32, PublicKey>) {
        let kp = KeyPair::new_with_algorithm(Algorithm::Ed25519);
        let mut m = HashMap::new();
        m.insert(7, kp.public());
        (kp, m)
    }

    #[test]
    fn mint_verify_round_trip_claims() {
        let (kp, ks) = keys();
        let res = ResourceId::new();
        let c = claims(ops_from(DOC, res), res, vec![]);
        let tok = mint(&c, &kp, 7).unwrap();
        assert!(tok.starts_with(TOKEN_PREFIX));
        let v = VerifiedMandate::verify(&tok, &ks, 1_500).unwrap();
        let mut want = c.clone();
        want.ops.sort_by(|x, y| {
            (x.resource, &x.rule, x.effect == Effect::Deny).cmp(&(y.resource, &y.rule, y.effect == Effect::Deny))
        });
        assert_eq!(v.claims, want);
        assert_eq!(v.kid, Some(7));
        assert_eq!(v.revocation_ids.len(), 1);
        assert_eq!(v.all_revocation_ids().count(), 2, "own id plus ancestors");
        assert_eq!(
            VerifiedMandate::verify(&tok, &ks, 2_000).unwrap_err(),
            MandateError::Expired
        );
        let mut other = HashMap::new();
        other.insert(8, kp.public());
        assert_eq!(
            VerifiedMandate::verify(&tok, &other, 1_500).unwrap_err(),
            MandateError::UnknownKey(Some(7))
        );
        let (_, wrong) = keys();
        let mut wrong7 = HashMap::new();
        wrong7.insert(7, *wrong.get(&7).unwrap());
        assert!(matches!(
            VerifiedMandate::verify(&tok, &wrong7, 1_500),
            Err(MandateError::BadSignature | MandateError::Malformed)
        ));
        // Truncated, garbage, missing prefix.
        assert!(VerifiedMandate::verify(&tok[..tok.len() - 10], &ks, 1_500).is_err());
        assert_eq!(
            VerifiedMandate::verify("cm1_!!!", &ks, 1_500).unwrap_err(),
            MandateError::Malformed
        );
        assert_eq!(
            VerifiedMandate::verify(&tok[4..], &ks, 1_500).unwrap_err(),
            MandateError::Malformed
        );
    }

    /// The native matcher and the Biscuit authorizer agree on every request of a corpus.
    #[test]
    fn native_matches_datalog() {
        let (kp, ks) = keys();
        let res = ResourceId::new();
        let other_res = ResourceId::new();
        let narrow = vec![NarrowClaim {
            set: 0,
            resource: res,
            patterns: [
                ".*".into(),
                ".*".into(),
                "^(?:/v1/(?:chat|models)/.*)$".into(),
                ".*".into(),
                ".*".into(),
            ],
        }];
        for nar in [vec![], narrow] {
            let c = claims(ops_from(DOC, res), res, nar);
            let tok = mint(&c, &kp, 7).unwrap();
            let v = VerifiedMandate::verify(&tok, &ks, 1_500).unwrap();
            let b = Biscuit::from_base64(&tok[4..], |_| Ok(*ks.get(&7).unwrap())).unwrap();
            let methods = ["GET", "POST", "HEAD", "DELETE"];
            let hosts = ["api.openai.com", "evil.com"];
            let paths = [
                "/v1/chat/completions",
                "/v1/files/x",
                "/v1/files/x/y",
                "/v1/admin/u",
                "/v1/models/a",
                "/v2/x",
                "/",
            ];
            let models = ["", "gpt-4o", "gpt-4o-mini", "gpt-3.5"];
            let mut allowed = 0;
            for m in methods {
                for h in hosts {
                    for p in paths {
                        for mo in models {
                            for r in [res, other_res] {
                                let req = Request {
                                    resource: r,
                                    facts: Facts {
                                        method: m,
                                        host: h,
                                        path: p,
                                        model: mo,
                                        tool: "",
                                    },
                                };
                                let native = v.authorize(&req, 1_500).unwrap().allow;
                                let datalog = datalog_allows(&b, &req, 1_500);
                                assert_eq!(native, datalog, "{m} {h} {p} {mo:?} res={}", r == res);
                                allowed += native as usize;
                            }
                        }
                    }
                }
            }
            assert!(allowed > 10, "the corpus exercises both outcomes");
        }
    }

    #[test]
    fn offline_attenuation_only_narrows() {
        let (kp, ks) = keys();
        let res = ResourceId::new();
        let tok = mint(&claims(ops_from(DOC, res), res, vec![]), &kp, 7).unwrap();
        let narrowed = attenuate_offline(
            &tok,
            &[[
                "^(?:GET)$".into(),
                ".*".into(),
                "^(?:/v1/models/.*)$".into(),
                ".*".into(),
                ".*".into(),
            ]],
            Some(1_800),
        )
        .unwrap();
        let v = VerifiedMandate::verify(&narrowed, &ks, 1_500).unwrap();
        assert!(v.is_attenuated());
        assert_eq!(v.revocation_ids.len(), 2);
        let req = |m: &'static str, p: &'static str| Request {
            resource: res,
            facts: Facts {
                method: m,
                host: "api.openai.com",
                path: p,
                model: "",
                tool: "",
            },
        };
        assert!(v.authorize(&req("GET", "/v1/models/x"), 1_500).unwrap().allow);
        assert!(
            !v.authorize(&req("GET", "/v1/files/x"), 1_500).unwrap().allow,
            "narrowed away"
        );
        assert!(
            !v.authorize(&req("GET", "/v1/models/x"), 1_900).unwrap().allow,
            "earlier expiry"
        );
        // An attenuation block cannot add authority: an op fact in it is ignored.
        let parsed = biscuit_auth::UnverifiedBiscuit::from_base64(&tok[4..]).unwrap();
        let widened = parsed
            .append(
                builder::BlockBuilder::new()
                    .code(format!("op(\"{res}\", \"x\", \".*\", \".*\", \".*\", \".*\", \".*\");"))
                    .unwrap(),
            )
            .unwrap();
        let w = VerifiedMandate::verify(&format!("cm1_{}", widened.to_base64().unwrap()), &ks, 1_500).unwrap();
        assert!(!w.authorize(&req("DELETE", "/anything"), 1_500).unwrap().allow);
    }
}
