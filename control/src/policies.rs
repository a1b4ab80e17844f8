//! Policies: create with a first version, add immutable versions, validate, simulate, activate.

use std::sync::Arc;

use caracal_shared::error::{Error, Result};
use caracal_shared::http::{ApiRequest, Response, ok};
use caracal_shared::ids::{AgentId, PolicyId, ResourceId};
use caracal_shared::policy::{CompiledPolicy, Facts, Format, detect_format, problems_error};
use caracal_shared::store::admin::AdminScope;
use caracal_shared::store::agents::Agent;
use caracal_shared::store::policies::{Grant, Policy};
use caracal_shared::store::resources::Resource;
use caracal_shared::time::now_micros;
use http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::State;
use crate::api::{Change, body_json, cursor, if_match, read_ok};

type S = Arc<State>;

/// A policy document: text (YAML or JSON) or an inline JSON object.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum DocumentBody {
    Text(String),
    Object(Value),
}

impl DocumentBody {
    pub fn source(self, format: Option<Format>) -> Result<(String, Format)> {
        match self {
            DocumentBody::Text(t) => {
                let f = format.unwrap_or_else(|| detect_format(&t));
                Ok((t, f))
            }
            DocumentBody::Object(v) => {
                if format == Some(Format::Yaml) {
                    return Err(Error::validation(
                        "an inline object document is JSON; omit format or use \"json\"",
                    ));
                }
                Ok((serde_json::to_string_pretty(&v)?, Format::Json))
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewPolicy {
    name: String,
    #[serde(default)]
    description: String,
    document: DocumentBody,
    format: Option<Format>,
    /// Activate the first version at once.
    #[serde(default)]
    activate: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewVersion {
    document: DocumentBody,
    format: Option<Format>,
    #[serde(default)]
    activate: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchPolicy {
    description: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Validate {
    document: DocumentBody,
    format: Option<Format>,
}

pub async fn create(s: S, mut r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Write).await?;
    let t = c.tenant()?;
    let (b, raw): (NewPolicy, _) = body_json(&mut r).await?;
    let (source, format) = b.document.source(b.format)?;
    s.mutate(&mut r, &c, StatusCode::CREATED, &raw, async |tx| {
        let (mut p, v) = tx.insert_policy(t, &b.name, &b.description, &source, format).await?;
        let mut changes = vec![Change::new(
            "policy.created",
            Some(t),
            json!({ "id": p.id, "name": p.name, "version": 1 }),
        )];
        if b.activate {
            p = tx.activate_policy_version(t, p.id, 1, None).await?;
            changes.push(Change::new(
                "policy.activated",
                Some(t),
                json!({ "id": p.id, "active_version": 1 }),
            ));
        }
        Ok((json!({ "policy": p, "version": v }), changes))
    })
    .await
}

pub async fn list(s: S, r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Read).await?;
    read_ok(&s.rt.store.list::<Policy>(c.tenant()?, &cursor(&r)?).await?)
}

pub async fn get(s: S, r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Read).await?;
    let t = c.tenant()?;
    let id = PolicyId::parse(r.param("policy_id")?)?;
    let (p, active) = s.rt.store.active_policy(t, id).await?;
    let mut v = serde_json::to_value(&p)?;
    v["active"] = serde_json::to_value(active)?;
    read_ok(&v)
}

pub async fn patch(s: S, mut r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Write).await?;
    let t = c.tenant()?;
    let id = PolicyId::parse(r.param("policy_id")?)?;
    let expected = if_match(&r)?;
    let (b, raw): (PatchPolicy, _) = body_json(&mut r).await?;
    s.mutate(&mut r, &c, StatusCode::OK, &raw, async |tx| {
        let mut p: Policy = tx.get(t, &id.to_string()).await?;
        p.description = b.description;
        let p = tx.save_policy_description(&p, expected).await?;
        let v = serde_json::to_value(&p)?;
        Ok((v.clone(), vec![Change::new("policy.updated", Some(t), v)]))
    })
    .await
}

pub async fn delete(s: S, mut r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Write).await?;
    let t = c.tenant()?;
    let id = PolicyId::parse(r.param("policy_id")?)?;
    s.mutate(&mut r, &c, StatusCode::OK, &Default::default(), async |tx| {
        tx.delete_policy(t, id).await?;
        Ok((
            json!({ "deleted": id }),
            vec![Change::new("policy.deleted", Some(t), json!({ "id": id }))],
        ))
    })
    .await
}

pub async fn add_version(s: S, mut r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Write).await?;
    let t = c.tenant()?;
    let id = PolicyId::parse(r.param("policy_id")?)?;
    let expected = if_match(&r)?;
    let (b, raw): (NewVersion, _) = body_json(&mut r).await?;
    let (source, format) = b.document.source(b.format)?;
    s.mutate(&mut r, &c, StatusCode::CREATED, &raw, async |tx| {
        let (mut p, v) = tx.add_policy_version(t, id, expected, &source, format).await?;
        let mut changes = vec![Change::new(
            "policy.version_added",
            Some(t),
            json!({ "id": id, "version": v.version }),
        )];
        if b.activate {
            p = tx.activate_policy_version(t, id, v.version, None).await?;
            changes.push(Change::new(
                "policy.activated",
                Some(t),
                json!({ "id": id, "active_version": v.version }),
            ));
        }
        Ok((json!({ "policy": p, "version": v }), changes))
    })
    .await
}

pub async fn list_versions(s: S, r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Read).await?;
    let t = c.tenant()?;
    let id = PolicyId::parse(r.param("policy_id")?)?;
    s.rt.store.get::<Policy>(t, &id.to_string()).await?;
    ok(&json!({ "items": s.rt.store.policy_versions(t, id).await?, "next_cursor": null }))
}

fn version_param(r: &ApiRequest) -> Result<i64> {
    r.param("version")?
        .parse::<i64>()
        .ok()
        .filter(|v| *v >= 1)
        .ok_or_else(|| Error::not_found("policy version"))
}

pub async fn get_version(s: S, r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Read).await?;
    let id = PolicyId::parse(r.param("policy_id")?)?;
    read_ok(&s.rt.store.policy_version(c.tenant()?, id, version_param(&r)?).await?)
}

pub async fn activate(s: S, mut r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Write).await?;
    let t = c.tenant()?;
    let id = PolicyId::parse(r.param("policy_id")?)?;
    let version = version_param(&r)?;
    let expected = if_match(&r)?;
    s.mutate(&mut r, &c, StatusCode::OK, &Default::default(), async |tx| {
        let p = tx.activate_policy_version(t, id, version, expected).await?;
        let v = serde_json::to_value(&p)?;
        Ok((
            v,
            vec![Change::new(
                "policy.activated",
                Some(t),
                json!({ "id": id, "active_version": version }),
            )],
        ))
    })
    .await
}

pub async fn validate(s: S, mut r: ApiRequest) -> Result<Response> {
    s.auth(&r, AdminScope::Read).await?;
    let (b, _): (Validate, _) = body_json(&mut r).await?;
    let (source, format) = b.document.source(b.format)?;
    match CompiledPolicy::from_source(&source, format) {
        Ok(p) => ok(&json!({ "valid": true, "problems": [], "scopes": p.scopes(), "rules": p.doc.rules.len() })),
        Err(problems) => {
            let e = problems_error(problems);
            ok(&json!({ "valid": false, "problems": e.details.as_ref().map(|d| d["problems"].clone()) }))
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Simulate {
    agent_id: AgentId,
    resource_id: ResourceId,
    method: String,
    /// Full URL of the request, or give `host` and `path`.
    url: Option<String>,
    host: Option<String>,
    path: Option<String>,
    model: Option<String>,
    tool: Option<String>,
    /// Scopes requested at mint (default: everything the grant allows).
    scopes: Option<Vec<String>>,
    /// Policy version to evaluate (default: the active one).
    version: Option<i64>,
    /// Evaluation time (RFC 3339; default now), for time windows.
    at: Option<String>,
}

/// Answer allow/deny for a hypothetical request, with the rule that decided. No side effects.
pub async fn simulate(s: S, mut r: ApiRequest) -> Result<Response> {
    let c = s.auth(&r, AdminScope::Read).await?;
    let t = c.tenant()?;
    let id = PolicyId::parse(r.param("policy_id")?)?;
    let (b, _): (Simulate, _) = body_json(&mut r).await?;
    let store = &s.rt.store;
    let p: Policy = store.get(t, &id.to_string()).await?;
    let version = match b.version.or(p.active_version) {
        Some(v) => v,
        None => return Err(Error::conflict("the policy has no active version; pass \"version\"")),
    };
    let compiled = store.policy_version(t, id, version).await?.compile()?;
    let agent: Agent = store.get(t, &b.agent_id.to_string()).await?;
    let res: Resource = store.get(t, &b.resource_id.to_string()).await?;
    let (host, raw_path) = match (&b.url, &b.host, &b.path) {
        (Some(u), None, None) => {
            let uri: http::Uri = u.parse().map_err(|_| Error::validation("url is not a URL"))?;
            (
                uri.host()
                    .ok_or_else(|| Error::validation("url has no host"))?
                    .to_ascii_lowercase(),
                uri.path().to_string(),
            )
        }
        (None, Some(h), Some(p)) => (h.to_ascii_lowercase(), p.clone()),
        _ => return Err(Error::validation("give url, or host and path")),
    };
    let path = caracal_shared::reqpath::normalize(&raw_path).map_err(Error::from)?;
    let at = match &b.at {
        Some(a) => caracal_shared::time::parse_rfc3339(a).ok_or_else(|| Error::validation("at must be RFC 3339"))?,
        None => now_micros(),
    };
    let grant: Option<Grant> = store
        .grants_of(t, agent.id)
        .await?
        .into_iter()
        .find(|g| g.resource_id == res.id);
    let method = b.method.to_ascii_uppercase();
    let facts = Facts {
        method: &method,
        host: &host,
        path: &path,
        model: b.model.as_deref().unwrap_or(""),
        tool: b.tool.as_deref().unwrap_or(""),
    };
    let granted_scopes: Option<Vec<String>> = grant.as_ref().map(|g| {
        if g.scopes.iter().any(|s| s == "*") {
            compiled.scopes()
        } else {
            g.scopes.clone()
        }
    });
    let scopes: Option<Vec<String>> = match (&b.scopes, &granted_scopes) {
        (Some(req), Some(g)) => Some(req.iter().filter(|s| g.contains(s)).cloned().collect()),
        (Some(req), None) => Some(req.clone()),
        (None, g) => g.clone().filter(|g| !g.is_empty()),
    };
    let ev = compiled.evaluate(&res.name, scopes.as_deref(), &facts, at);
    let (decision, reason) = if agent.disabled {
        (false, "agent_disabled")
    } else if grant.is_none() {
        (false, "no_grant")
    } else if !res.host_allowed(&host) {
        (false, "host_not_in_resource")
    } else if ev.decision.allow {
        (true, "rule_matched")
    } else if ev.decision.rule.is_some() {
        (false, "deny_rule")
    } else {
        (false, "no_rule_matched")
    };
    ok(&json!({
        "decision": if decision { "allow" } else { "deny" },
        "reason": reason,
        "rule": ev.decision.rule,
        "approval_required": decision && ev.approval_required,
        "policy_id": id,
        "policy_version": version,
        "grant_id": grant.as_ref().map(|g| g.id),
        "grant_uses_this_policy": grant.as_ref().map(|g| g.policy_id == id),
        "scopes": scopes,
        "request": { "method": method, "host": host, "path": path, "model": b.model, "tool": b.tool },
    }))
}
