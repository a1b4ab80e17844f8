//! Policies: declarative documents over request facts, compiled to matchers.
//!
//! A document (YAML or JSON) is a list of rules. A rule matches a request when every field it
//! sets matches (fields are ANDed; the values listed in one field are ORed):
//!
//! ```yaml
//! version: 1
//! description: Chat completions on small models, weekdays only
//! rules:
//!   - id: chat
//!     effect: allow              # or deny
//!     scopes: [chat]             # which grant scopes this rule belongs to (empty: all)
//!     resources: [openai]        # resource names (empty: any resource of the grant)
//!     methods: [POST]            # empty: any
//!     hosts: ["api.openai.com"]  # `*` is one DNS label; empty: any host of the resource
//!     paths: ["/v1/chat/completions", "/v1/files/*", "/v1/batches/**"]  # `*` one segment, `**` any
//!     models: ["gpt-4o-mini", "gpt-4o*"]   # JSON `model` field; `*` any characters
//!     tools: ["search", "fs.*"]            # MCP tool names
//!     time: { days: [mon, tue, wed, thu, fri], start: "08:00", end: "20:00", tz: "Europe/Paris" }
//!     approval: true             # minting needs a human approval
//!   - id: no-admin
//!     effect: deny
//!     paths: ["/v1/admin/**"]
//! ```
//!
//! **Decision**: a matching `deny` rule denies (deny wins); otherwise the first matching
//! `allow` rule allows; otherwise the default is deny.
//!
//! **Compilation**: every field compiles to one anchored regular expression (globs escaped,
//! alternatives joined). The same regex strings are written into mandates as Datalog facts
//! (`op(…)`, `deny_op(…)`) checked with `.matches()`, and the gateway's native matcher runs the
//! same regexes with the same `regex` engine, so the fast path and the Datalog semantics agree by
//! construction (and a property test checks it). Time windows and approval are decided when the
//! STS mints (a mandate never outlives the window it was minted in).

use std::fmt;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorCode};

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Day {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeWindow {
    #[serde(default)]
    pub days: Vec<Day>,
    #[serde(default)]
    pub start: Option<String>,
    #[serde(default)]
    pub end: Option<String>,
    #[serde(default = "utc")]
    pub tz: String,
}

fn utc() -> String {
    "UTC".into()
}

fn allow() -> Effect {
    Effect::Allow
}

fn one() -> u32 {
    SCHEMA_VERSION
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleDoc {
    pub id: String,
    #[serde(default = "allow")]
    pub effect: Effect,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<TimeWindow>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub approval: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDocument {
    #[serde(default = "one")]
    pub version: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    pub rules: Vec<RuleDoc>,
    /// Limits on delegating mandates issued under this policy (tighter than the STS's
    /// configured limits; the tightest of a mandate's policies applies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegation: Option<DelegationLimits>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DelegationLimits {
    /// How many delegation steps below the original mandate (0: no delegation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_depth: Option<i64>,
    /// How many live delegations one mandate may make.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_fanout: Option<i64>,
}

/// One problem in a policy document: where (a field path, and a line when known) and what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<usize>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "line {l}: {}: {}", self.path, self.message),
            None => write!(f, "{}: {}", self.path, self.message),
        }
    }
}

/// The error for an invalid document: `validation_failed` with every problem in `details`.
pub fn problems_error(problems: Vec<Problem>) -> Error {
    let summary = problems
        .first()
        .map(|p| p.to_string())
        .unwrap_or_else(|| "invalid policy".into());
    Error::new(
        ErrorCode::ValidationFailed,
        format!(
            "invalid policy document ({} problem(s)); first: {summary}",
            problems.len()
        ),
    )
    .with_details(serde_json::json!({ "problems": problems }))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Yaml,
    Json,
}

/// Parse a document, reporting the line and column of syntax and type errors.
pub fn parse(source: &str, format: Format) -> Result<PolicyDocument, Vec<Problem>> {
    match format {
        Format::Json => serde_json::from_str(source).map_err(|e| {
            vec![Problem {
                path: String::new(),
                line: Some(e.line()),
                column: Some(e.column()),
                message: e.to_string(),
            }]
        }),
        Format::Yaml => serde_yaml_ng::from_str(source).map_err(|e| {
            let loc = e.location();
            vec![Problem {
                path: String::new(),
                line: loc.as_ref().map(|l| l.line()),
                column: loc.as_ref().map(|l| l.column()),
                message: e.to_string(),
            }]
        }),
    }
}

/// Guess the format: JSON documents start with `{`.
pub fn detect_format(source: &str) -> Format {
    if source.trim_start().starts_with('{') {
        Format::Json
    } else {
        Format::Yaml
    }
}

const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE", "*",
];

fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' || b == b'.')
}

fn parse_hhmm(s: &str) -> Option<u32> {
    let (h, m) = s.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h <= 24 && m < 60 && (h < 24 || m == 0)).then_some(h * 60 + m)
}

/// Check a parsed document; every problem is reported with its field path.
pub fn validate(doc: &PolicyDocument) -> Vec<Problem> {
    let mut out = Vec::new();
    let mut p = |path: String, message: String| {
        out.push(Problem {
            path,
            line: None,
            column: None,
            message,
        })
    };
    if let Some(d) = &doc.delegation {
        if d.max_depth.is_some_and(|x| !(0..=32).contains(&x)) {
            p("delegation.max_depth".into(), "must be between 0 and 32".into());
        }
        if d.max_fanout.is_some_and(|x| !(0..=100_000).contains(&x)) {
            p("delegation.max_fanout".into(), "must be between 0 and 100000".into());
        }
    }
    if doc.version != SCHEMA_VERSION {
        p(
            "version".into(),
            format!(
                "unsupported policy schema version {} (expected {SCHEMA_VERSION})",
                doc.version
            ),
        );
    }
    if doc.rules.is_empty() {
        p("rules".into(), "a policy needs at least one rule".into());
    }
    if doc.rules.len() > 500 {
        p("rules".into(), "at most 500 rules".into());
    }
    let mut seen = std::collections::HashSet::new();
    for (i, r) in doc.rules.iter().enumerate() {
        let at = |f: &str| format!("rules[{i}].{f}");
        if !valid_id(&r.id) {
            p(at("id"), "must be 1-64 characters of a-z, 0-9, '-', '_', '.'".into());
        } else if !seen.insert(r.id.as_str()) {
            p(at("id"), format!("duplicate rule id {:?}", r.id));
        }
        for (j, s) in r.scopes.iter().enumerate() {
            if !valid_scope(s) {
                p(
                    format!("rules[{i}].scopes[{j}]"),
                    "scopes are 1-64 printable characters without spaces".into(),
                );
            }
        }
        for (j, s) in r.resources.iter().enumerate() {
            if crate::store::tenants::validate_slug("resource", s).is_err() {
                p(
                    format!("rules[{i}].resources[{j}]"),
                    "must be a resource name (a-z, 0-9, '-')".into(),
                );
            }
        }
        for (j, m) in r.methods.iter().enumerate() {
            if !METHODS.contains(&m.to_ascii_uppercase().as_str()) {
                p(format!("rules[{i}].methods[{j}]"), format!("unknown method {m:?}"));
            }
        }
        let checks: [(&str, &Vec<String>, GlobKind); 4] = [
            ("hosts", &r.hosts, GlobKind::Host),
            ("paths", &r.paths, GlobKind::Path),
            ("models", &r.models, GlobKind::Name),
            ("tools", &r.tools, GlobKind::Name),
        ];
        for (field, list, kind) in checks {
            if list.len() > 100 {
                p(at(field), "at most 100 patterns".into());
            }
            for (j, g) in list.iter().enumerate() {
                if let Err(e) = check_glob(g, kind) {
                    p(format!("rules[{i}].{field}[{j}]"), e);
                }
            }
        }
        if let Some(t) = &r.time {
            if let Some(s) = &t.start
                && parse_hhmm(s).is_none()
            {
                p(at("time.start"), "must be HH:MM (00:00-24:00)".into());
            }
            if let Some(s) = &t.end
                && parse_hhmm(s).is_none()
            {
                p(at("time.end"), "must be HH:MM (00:00-24:00)".into());
            }
            if jiff::tz::TimeZone::get(&t.tz).is_err() {
                p(
                    at("time.tz"),
                    format!("unknown time zone {:?} (use an IANA name such as Europe/Paris)", t.tz),
                );
            }
            if r.effect == Effect::Deny {
                p(at("time"), "time windows apply to allow rules only".into());
            }
        }
        if r.approval && r.effect == Effect::Deny {
            p(at("approval"), "approval applies to allow rules only".into());
        }
    }
    out
}

fn valid_scope(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GlobKind {
    /// `*` matches within one path segment, `**` across segments.
    Path,
    /// `*` matches within one DNS label.
    Host,
    /// `*` matches any characters.
    Name,
}

fn check_glob(g: &str, kind: GlobKind) -> Result<(), String> {
    if g.is_empty() || g.len() > 512 {
        return Err("patterns are 1-512 characters".into());
    }
    if g.chars().any(|c| c.is_control()) {
        return Err("patterns cannot contain control characters".into());
    }
    match kind {
        GlobKind::Path => {
            if !g.starts_with('/') {
                return Err("path patterns start with '/'".into());
            }
            if g.contains('?') || g.contains('#') {
                return Err("path patterns match the path only (no query or fragment)".into());
            }
            if g.split('/').any(|seg| seg == "." || seg == "..") {
                return Err("path patterns cannot contain dot segments".into());
            }
            if g.contains('%') {
                return Err("write path patterns decoded (no percent-encoding)".into());
            }
        }
        GlobKind::Host => {
            if g.contains('/') || g.contains(':') && !g.starts_with('[') {
                return Err("host patterns are host names (no scheme, port or path)".into());
            }
        }
        GlobKind::Name => {}
    }
    if g.contains("***") {
        return Err("use '*' or '**'".into());
    }
    Ok(())
}

/// Translate one glob to a regex fragment (unanchored).
pub fn glob_to_regex(g: &str, kind: GlobKind) -> String {
    let g = if kind == GlobKind::Host {
        g.to_ascii_lowercase()
    } else {
        g.to_string()
    };
    let mut out = String::with_capacity(g.len() * 2);
    let chars: Vec<char> = g.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '*' {
            let double = chars.get(i + 1) == Some(&'*');
            let frag = match (kind, double) {
                (GlobKind::Path, true) => ".*",
                (GlobKind::Path, false) => "[^/]*",
                (GlobKind::Host, true) => ".*",
                (GlobKind::Host, false) => "[^.]*",
                (GlobKind::Name, _) => ".*",
            };
            out.push_str(frag);
            i += if double { 2 } else { 1 };
            continue;
        }
        let mut buf = [0u8; 4];
        out.push_str(&regex::escape(c.encode_utf8(&mut buf)));
        i += 1;
    }
    out
}

/// One anchored regex for a list of globs; an empty list matches anything.
pub fn globs_to_regex(list: &[String], kind: GlobKind) -> String {
    if list.is_empty() {
        return ANY.to_string();
    }
    let alts: Vec<String> = list.iter().map(|g| glob_to_regex(g, kind)).collect();
    format!("^(?:{})$", alts.join("|"))
}

pub fn methods_to_regex(list: &[String]) -> String {
    if list.is_empty() || list.iter().any(|m| m == "*") {
        return ANY.to_string();
    }
    let alts: Vec<String> = list.iter().map(|m| regex::escape(&m.to_ascii_uppercase())).collect();
    format!("^(?:{})$", alts.join("|"))
}

/// The regex that matches everything (including the empty string: an absent model or tool).
pub const ANY: &str = ".*";

/// A compiled regex with fast paths for "anything" and for what policy globs and method
/// lists compile to: an anchored list of literals and literal prefixes (`^(?:/a/b|/v1/.*)$`),
/// matched without the regex engine (identical results: see the tests).
#[derive(Debug, Clone)]
pub struct Pattern {
    source: String,
    m: Matcher,
}

#[derive(Debug, Clone)]
enum Matcher {
    Any,
    /// Alternatives: a literal, matched whole, or (`true`) a prefix followed by `.*`.
    Literals(Box<[(Box<str>, bool)]>),
    Re(Regex),
}

/// The alternatives of `^(?:a|b.*|...)$` when each is a literal, optionally followed by `.*`;
/// `None` for anything else (left to the regex engine).
fn literal_alternatives(src: &str) -> Option<Vec<(Box<str>, bool)>> {
    const META: &str = "\\.+*?()|[]{}^$#&-~";
    let body = src.strip_prefix("^(?:")?.strip_suffix(")$")?;
    let mut alts = Vec::new();
    let mut lit = String::new();
    let mut prefix = false;
    let mut chars = body.chars().peekable();
    loop {
        let c = chars.next();
        if prefix && !matches!(c, None | Some('|')) {
            return None;
        }
        match c {
            None | Some('|') => {
                alts.push((std::mem::take(&mut lit).into_boxed_str(), prefix));
                prefix = false;
                if c.is_none() {
                    return Some(alts);
                }
            }
            Some('\\') => match chars.next() {
                Some(e) if META.contains(e) => lit.push(e),
                _ => return None,
            },
            Some('.') if chars.peek() == Some(&'*') => {
                chars.next();
                prefix = true;
            }
            Some(c) if META.contains(c) => return None,
            Some(c) => lit.push(c),
        }
    }
}

impl Pattern {
    pub fn new(source: &str) -> Result<Pattern, String> {
        let m = if source == ANY {
            Matcher::Any
        } else if let Some(alts) = literal_alternatives(source) {
            Matcher::Literals(alts.into_boxed_slice())
        } else {
            Matcher::Re(
                regex::RegexBuilder::new(source)
                    .size_limit(1 << 20)
                    .dfa_size_limit(1 << 20)
                    .build()
                    .map_err(|e| format!("invalid pattern: {e}"))?,
            )
        };
        Ok(Pattern {
            source: source.to_string(),
            m,
        })
    }

    #[inline]
    pub fn matches(&self, s: &str) -> bool {
        match &self.m {
            Matcher::Any => true,
            // `.` does not match a line feed; `$` is the end of the text.
            Matcher::Literals(alts) => alts.iter().any(|(lit, prefix)| {
                if *prefix {
                    s.strip_prefix(&**lit).is_some_and(|rest| !rest.contains('\n'))
                } else {
                    s == &**lit
                }
            }),
            Matcher::Re(r) => r.is_match(s),
        }
    }

    pub fn source(&self) -> &str {
        &self.source
    }
}

/// A rule in matcher form: what mandates carry and what the gateway runs.
#[derive(Debug, Clone)]
pub struct MatchRule {
    pub id: String,
    pub effect: Effect,
    pub method: Pattern,
    pub host: Pattern,
    pub path: Pattern,
    pub model: Pattern,
    pub tool: Pattern,
}

/// The facts of one request, as the gateway establishes them. `host` is lowercase without
/// port; `path` is decoded and normalised; an absent model or tool is the empty string.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    pub model: &'a str,
    pub tool: &'a str,
}

impl MatchRule {
    pub fn from_sources(id: &str, effect: Effect, srcs: [&str; 5]) -> Result<MatchRule, String> {
        Ok(MatchRule {
            id: id.to_string(),
            effect,
            method: Pattern::new(srcs[0])?,
            host: Pattern::new(srcs[1])?,
            path: Pattern::new(srcs[2])?,
            model: Pattern::new(srcs[3])?,
            tool: Pattern::new(srcs[4])?,
        })
    }

    #[inline]
    pub fn matches(&self, f: &Facts<'_>) -> bool {
        self.method.matches(f.method)
            && self.path.matches(f.path)
            && self.host.matches(f.host)
            && self.model.matches(f.model)
            && self.tool.matches(f.tool)
    }

    pub fn sources(&self) -> [&str; 5] {
        [
            self.method.source(),
            self.host.source(),
            self.path.source(),
            self.model.source(),
            self.tool.source(),
        ]
    }
}

/// Outcome of evaluating rules against a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub allow: bool,
    /// The rule that decided, or `None` for the default deny.
    pub rule: Option<String>,
}

/// Deny wins; then the first matching allow; otherwise deny by default.
pub fn decide<'r>(rules: impl IntoIterator<Item = &'r MatchRule> + Clone, f: &Facts<'_>) -> Decision {
    for r in rules.clone() {
        if r.effect == Effect::Deny && r.matches(f) {
            return Decision {
                allow: false,
                rule: Some(r.id.clone()),
            };
        }
    }
    for r in rules {
        if r.effect == Effect::Allow && r.matches(f) {
            return Decision {
                allow: true,
                rule: Some(r.id.clone()),
            };
        }
    }
    Decision {
        allow: false,
        rule: None,
    }
}

/// A validated, compiled policy version.
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    pub doc: PolicyDocument,
    pub rules: Vec<CompiledRule>,
}

#[derive(Debug, Clone)]
pub struct CompiledRule {
    pub doc: RuleDoc,
    pub matcher: MatchRule,
}

impl CompiledPolicy {
    /// Parse, validate and compile; every problem is reported.
    pub fn from_source(source: &str, format: Format) -> Result<CompiledPolicy, Vec<Problem>> {
        let doc = parse(source, format)?;
        CompiledPolicy::compile(doc)
    }

    pub fn compile(doc: PolicyDocument) -> Result<CompiledPolicy, Vec<Problem>> {
        let problems = validate(&doc);
        if !problems.is_empty() {
            return Err(problems);
        }
        let mut rules = Vec::with_capacity(doc.rules.len());
        for (i, r) in doc.rules.iter().enumerate() {
            let srcs = [
                methods_to_regex(&r.methods),
                globs_to_regex(&r.hosts, GlobKind::Host),
                globs_to_regex(&r.paths, GlobKind::Path),
                globs_to_regex(&r.models, GlobKind::Name),
                globs_to_regex(&r.tools, GlobKind::Name),
            ];
            let m = MatchRule::from_sources(&r.id, r.effect, [&srcs[0], &srcs[1], &srcs[2], &srcs[3], &srcs[4]])
                .map_err(|e| {
                    vec![Problem {
                        path: format!("rules[{i}]"),
                        line: None,
                        column: None,
                        message: e,
                    }]
                })?;
            rules.push(CompiledRule {
                doc: r.clone(),
                matcher: m,
            });
        }
        Ok(CompiledPolicy { doc, rules })
    }

    /// The rules that apply to `resource` under `scopes` (`None`: every scope).
    pub fn applicable<'a>(
        &'a self,
        resource: &'a str,
        scopes: Option<&'a [String]>,
    ) -> impl Iterator<Item = &'a CompiledRule> + Clone + 'a {
        self.rules.iter().filter(move |r| {
            (r.doc.resources.is_empty() || r.doc.resources.iter().any(|n| n == resource))
                && (r.doc.effect == Effect::Deny
                    || r.doc.scopes.is_empty()
                    || scopes.is_none_or(|s| r.doc.scopes.iter().any(|x| s.contains(x))))
        })
    }

    /// Every scope the policy names.
    pub fn scopes(&self) -> Vec<String> {
        let mut s: Vec<String> = self.rules.iter().flat_map(|r| r.doc.scopes.iter().cloned()).collect();
        s.sort();
        s.dedup();
        s
    }

    /// Evaluate at time `at` (microseconds): time windows are applied; approval is reported.
    pub fn evaluate(&self, resource: &str, scopes: Option<&[String]>, f: &Facts<'_>, at: i64) -> Evaluation {
        let rules: Vec<&CompiledRule> = self.applicable(resource, scopes).collect();
        let in_window: Vec<&MatchRule> = rules
            .iter()
            .filter(|r| r.doc.time.as_ref().is_none_or(|w| window_contains(w, at)))
            .map(|r| &r.matcher)
            .collect();
        let d = decide(in_window.iter().copied(), f);
        let approval = d.allow
            && d.rule
                .as_ref()
                .and_then(|id| rules.iter().find(|r| &r.doc.id == id))
                .is_some_and(|r| r.doc.approval);
        Evaluation {
            decision: d,
            approval_required: approval,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Evaluation {
    #[serde(flatten)]
    pub decision: Decision,
    pub approval_required: bool,
}

/// Whether `at` (µs since epoch) falls inside the window.
pub fn window_contains(w: &TimeWindow, at: i64) -> bool {
    window_end(w, at).is_some()
}

/// If `at` is inside the window, when the current stretch of the window ends (µs).
pub fn window_end(w: &TimeWindow, at: i64) -> Option<i64> {
    let tz = jiff::tz::TimeZone::get(&w.tz).ok()?;
    let ts = jiff::Timestamp::from_microsecond(at).ok()?;
    let z = ts.to_zoned(tz.clone());
    let day = match z.weekday() {
        jiff::civil::Weekday::Monday => Day::Mon,
        jiff::civil::Weekday::Tuesday => Day::Tue,
        jiff::civil::Weekday::Wednesday => Day::Wed,
        jiff::civil::Weekday::Thursday => Day::Thu,
        jiff::civil::Weekday::Friday => Day::Fri,
        jiff::civil::Weekday::Saturday => Day::Sat,
        jiff::civil::Weekday::Sunday => Day::Sun,
    };
    if !w.days.is_empty() && !w.days.contains(&day) {
        return None;
    }
    let minute = z.hour() as u32 * 60 + z.minute() as u32;
    let start = w.start.as_deref().and_then(parse_hhmm).unwrap_or(0);
    let end = w.end.as_deref().and_then(parse_hhmm).unwrap_or(24 * 60);
    if minute < start || minute >= end {
        return None;
    }
    let end_time = jiff::civil::Time::new((end / 60).min(23) as i8, (end % 60) as i8, 0, 0).ok()?;
    let end_dt = if end >= 24 * 60 {
        z.date().tomorrow().ok()?.to_datetime(jiff::civil::Time::midnight())
    } else {
        z.date().to_datetime(end_time)
    };
    let end_z = end_dt.to_zoned(tz).ok()?;
    Some(end_z.timestamp().as_microsecond())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts<'a>(m: &'a str, h: &'a str, p: &'a str, model: &'a str) -> Facts<'a> {
        Facts {
            method: m,
            host: h,
            path: p,
            model,
            tool: "",
        }
    }

    const DOC: &str = r#"
version: 1
rules:
  - id: chat
    scopes: [chat]
    methods: [POST]
    hosts: ["api.openai.com", "*.example.com"]
    paths: ["/v1/chat/completions", "/v1/files/*", "/v1/batches/**"]
    models: ["gpt-4o-mini", "gpt-4o*"]
  - id: read
    scopes: [read]
    methods: [GET]
  - id: no-admin
    effect: deny
    paths: ["/v1/admin/**"]
"#;

    /// The literal fast path decides exactly as the regex engine does, for what globs and
    /// method lists compile to and for hand-written regexes that only look similar.
    #[test]
    fn literal_patterns_match_as_the_regex_would() {
        let globs = |g: &[&str], k| globs_to_regex(&g.iter().map(|s| s.to_string()).collect::<Vec<_>>(), k);
        let sources = [
            globs(&["/v1/**"], GlobKind::Path),
            globs(&["/v1/chat/completions", "/v1/batches/**", "/"], GlobKind::Path),
            globs(&["/v1/files/*"], GlobKind::Path),
            globs(&["/a.b/c+d(e)/**", "/x-y~z#&/**"], GlobKind::Path),
            globs(&["api.openai.com", "*.example.com"], GlobKind::Host),
            globs(&["gpt-4o*", "o1"], GlobKind::Name),
            methods_to_regex(&["get".into(), "POST".into()]),
            "^(?:/v1/.*)$".into(),
            "^(?:/v1/.+)$".into(),
            "^(?:/v1/.*x)$".into(),
            "^(?:\\d+)$".into(),
            "^(?:a|)$".into(),
            "^(?:)$".into(),
            "^(?:é/.*)$".into(),
            "^(?:a(b)c)$".into(),
            "/v1/.*".into(),
            "^(?:a)$|^(?:b)$".into(),
        ];
        let inputs = [
            "",
            "/",
            "/v1",
            "/v1/",
            "/v1/models",
            "/v1/a/b",
            "/v1/\nx",
            "/v1/x\n",
            "/v2/models",
            "/v1/chat/completions",
            "/v1/chat/completions/",
            "/v1/batches",
            "/v1/batches/1",
            "/v1/files/a",
            "/v1/files/a/b",
            "/a.b/c+d(e)/q",
            "/aXb/c+d(e)/q",
            "/x-y~z#&/1",
            "api.openai.com",
            "API.openai.com",
            "a.example.com",
            "a.b.example.com",
            "example.com",
            "gpt-4o",
            "gpt-4o-mini",
            "o1",
            "o1-mini",
            "GET",
            "POST",
            "get",
            "PUT",
            "a",
            "b",
            "ab",
            "123",
            "é/x",
            "abc",
            "x/v1/y",
        ];
        for src in &sources {
            let fast = Pattern::new(src).unwrap();
            let re = regex::Regex::new(src).unwrap();
            for i in inputs {
                assert_eq!(fast.matches(i), re.is_match(i), "pattern {src:?} on {i:?}");
            }
        }
        // What the compilers emit takes the fast path; the rest stays with the regex engine.
        assert!(matches!(Pattern::new(&sources[1]).unwrap().m, Matcher::Literals(_)));
        assert!(matches!(Pattern::new(&sources[6]).unwrap().m, Matcher::Literals(_)));
        assert!(matches!(Pattern::new(&sources[2]).unwrap().m, Matcher::Re(_)));
        assert!(matches!(Pattern::new("^(?:/v1/.+)$").unwrap().m, Matcher::Re(_)));
    }

    #[test]
    fn decisions_follow_rules_and_deny_wins() {
        let p = CompiledPolicy::from_source(DOC, Format::Yaml).unwrap();
        let ev = |f: Facts<'_>| p.evaluate("openai", None, &f, 0).decision;
        assert_eq!(
            ev(facts("POST", "api.openai.com", "/v1/chat/completions", "gpt-4o"))
                .rule
                .as_deref(),
            Some("chat")
        );
        assert!(ev(facts("POST", "a.example.com", "/v1/files/abc", "gpt-4o-2024")).allow);
        assert!(
            !ev(facts("POST", "a.b.example.com", "/v1/files/abc", "gpt-4o")).allow,
            "* is one label"
        );
        assert!(
            !ev(facts("POST", "api.openai.com", "/v1/files/a/b", "gpt-4o")).allow,
            "* is one segment"
        );
        assert!(
            ev(facts("POST", "api.openai.com", "/v1/batches/a/b/c", "gpt-4o")).allow,
            "** spans segments"
        );
        assert!(!ev(facts("POST", "api.openai.com", "/v1/chat/completions", "gpt-3.5")).allow);
        assert!(
            !ev(facts("POST", "api.openai.com", "/v1/chat/completions", "")).allow,
            "model required"
        );
        assert!(
            !ev(facts("POST", "api.openai.com", "/v1/chat/completionsX", "gpt-4o")).allow,
            "anchored"
        );
        assert!(ev(facts("GET", "anything", "/whatever", "")).allow);
        let d = ev(facts("GET", "anything", "/v1/admin/users", ""));
        assert_eq!((d.allow, d.rule.as_deref()), (false, Some("no-admin")));
        assert_eq!(
            ev(facts("DELETE", "x", "/y", "")),
            Decision {
                allow: false,
                rule: None
            }
        );
        // Scopes narrow the rules; deny rules always apply.
        let read_only = ["read".to_string()];
        let d = p.evaluate(
            "openai",
            Some(&read_only),
            &facts("POST", "api.openai.com", "/v1/chat/completions", "gpt-4o"),
            0,
        );
        assert!(!d.decision.allow);
        assert_eq!(p.scopes(), vec!["chat", "read"]);
    }

    #[test]
    fn regex_metacharacters_in_globs_are_literal() {
        let doc = "rules:\n  - id: r\n    paths: [\"/v1/a.b/(x)+\"]\n";
        let p = CompiledPolicy::from_source(doc, Format::Yaml).unwrap();
        let ev = |path| p.evaluate("r", None, &facts("GET", "h", path, ""), 0).decision.allow;
        assert!(ev("/v1/a.b/(x)+"));
        assert!(!ev("/v1/aXb/(x)+"));
        assert!(!ev("/v1/a.b/xx"));
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let doc = r#"
version: 2
rules:
  - id: "Bad Id"
    methods: [GTE]
    paths: ["no-slash", "/a/../b", "/a%2fb"]
    time: { start: "25:00", tz: "Mars/Olympus" }
  - id: dup
  - id: dup
    effect: deny
    approval: true
"#;
        let problems = CompiledPolicy::from_source(doc, Format::Yaml).unwrap_err();
        let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        for want in [
            "version",
            "rules[0].id",
            "rules[0].methods[0]",
            "rules[0].paths[0]",
            "rules[0].paths[1]",
            "rules[0].paths[2]",
            "rules[0].time.start",
            "rules[0].time.tz",
            "rules[2].id",
            "rules[2].approval",
        ] {
            assert!(paths.contains(&want), "missing {want} in {paths:?}");
        }
    }

    #[test]
    fn syntax_and_unknown_fields_report_lines() {
        let problems = parse("rules:\n  - id: a\n    pathz: [\"/x\"]\n", Format::Yaml).unwrap_err();
        assert_eq!(problems[0].line, Some(3), "{problems:?}");
        assert!(problems[0].message.contains("pathz"));
        let problems = parse("{\"rules\": [ {\"id\": \"a\",, } ]}", Format::Json).unwrap_err();
        assert_eq!(problems[0].line, Some(1));
    }

    #[test]
    fn time_windows() {
        let w = TimeWindow {
            days: vec![Day::Mon, Day::Tue, Day::Wed, Day::Thu, Day::Fri],
            start: Some("09:00".into()),
            end: Some("18:00".into()),
            tz: "Europe/Paris".into(),
        };
        let t = |s: &str| s.parse::<jiff::Timestamp>().unwrap().as_microsecond();
        // Monday 2026-11-23 10:00 Paris = 09:00 UTC.
        let end = window_end(&w, t("2026-11-23T09:00:00Z")).unwrap();
        assert_eq!(end, t("2026-11-23T17:00:00Z"));
        assert!(!window_contains(&w, t("2026-11-23T17:00:00Z")));
        assert!(!window_contains(&w, t("2026-11-22T10:00:00Z")), "Sunday");
        let all_day = TimeWindow {
            days: vec![],
            start: None,
            end: None,
            tz: "UTC".into(),
        };
        assert_eq!(
            window_end(&all_day, t("2026-11-23T23:30:00Z")),
            Some(t("2026-11-24T00:00:00Z"))
        );
    }
}
