//! Deciding what a mandate may say, then signing it.
//!
//! For a workload: its grants, narrowed to the requested resources and scopes, each with the
//! **active** version of its policy. Allow rules outside their time window are left out and the
//! lifetime is capped at the end of the windows that are in; rules marked `approval` make the
//! whole request wait for a human; deny rules always travel. Nothing allowed → no mandate.
//!
//! For a delegation: a strict subset of a parent mandate — resources, scopes, restrictions
//! added as `narrow` sets, an expiry no later than the parent's — carrying the parent's
//! revocation ids as ancestors so revoking the parent revokes the child.

use std::collections::{BTreeMap, BTreeSet};

use caracal_shared::ids::{ApprovalId, BudgetId, MandateId, ResourceId, SessionId};
use caracal_shared::mandate::{self, Claims, NarrowClaim, OpClaim, ResourceClaim, VerifiedMandate};
use caracal_shared::policy::{Effect, GlobKind, globs_to_regex, methods_to_regex, window_end};
use caracal_shared::store::admin::BudgetScopeKind;
use caracal_shared::time::{now_micros, now_secs};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::State;
use crate::authn::Principal;
use crate::oauth::OAuthError;

/// What a workload asked for.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MintRequest {
    /// Resource ids, names or URLs (empty: every granted resource).
    pub resources: Vec<String>,
    pub scopes: Option<Vec<String>>,
    pub lifetime: Option<i64>,
    pub session: Option<SessionId>,
}

/// A decided mandate, not yet signed.
pub struct Plan {
    pub claims: Claims,
    pub scopes: Vec<String>,
    /// Rules that need a human approval (empty: none).
    pub approval_rules: Vec<String>,
}

impl State {
    async fn resolve_resource(&self, p: &Principal, r: &str) -> Result<ResourceId, OAuthError> {
        let unknown = || OAuthError::invalid_target(format!("unknown resource {r:?}"));
        if let Ok(id) = ResourceId::parse(r) {
            return self
                .caches
                .resource(p.tenant, id)
                .await
                .map(|x| x.id)
                .map_err(|_| unknown());
        }
        if r.starts_with("http://") || r.starts_with("https://") {
            let uri: http::Uri = r.parse().map_err(|_| unknown())?;
            let host = uri.host().ok_or_else(unknown)?.to_ascii_lowercase();
            for g in self.caches.grants(p.tenant, p.agent.id).await?.iter() {
                let res = self.caches.resource(p.tenant, g.resource_id).await?;
                if res.host_allowed(&host) {
                    return Ok(res.id);
                }
            }
            return Err(unknown());
        }
        self.caches
            .resource_by_name(p.tenant, r)
            .await
            .map(|x| x.id)
            .map_err(|_| unknown())
    }

    /// Decide the mandate for `p` (an approved request passes `approved`).
    pub async fn plan(
        &self,
        p: &Principal,
        req: &MintRequest,
        approved: Option<ApprovalId>,
    ) -> Result<Plan, OAuthError> {
        if p.agent.disabled {
            return Err(OAuthError::unauthorized_client("the agent is disabled"));
        }
        let grants = self.caches.grants(p.tenant, p.agent.id).await?;
        if grants.is_empty() {
            return Err(OAuthError::unauthorized_client("the agent has no grant"));
        }
        let mut wanted: BTreeSet<ResourceId> = BTreeSet::new();
        for r in &req.resources {
            let id = self.resolve_resource(p, r).await?;
            if !grants.iter().any(|g| g.resource_id == id) {
                return Err(OAuthError::invalid_target(format!(
                    "the agent has no grant on resource {r:?}"
                )));
            }
            wanted.insert(id);
        }
        let now_us = now_micros();
        let now = now_secs();
        let mut lifetime = req
            .lifetime
            .unwrap_or(self.rt.config.sts.default_lifetime.as_secs() as i64);
        if lifetime < 1 {
            return Err(OAuthError::invalid_request("lifetime must be positive"));
        }
        // Scopes the agent could obtain, per resource.
        let mut per_resource = Vec::new();
        let mut obtainable: BTreeSet<String> = BTreeSet::new();
        for g in grants
            .iter()
            .filter(|g| wanted.is_empty() || wanted.contains(&g.resource_id))
        {
            let Some((version, compiled)) = self.caches.active_policy(p.tenant, g.policy_id).await? else {
                continue;
            };
            let scopes: Vec<String> = if g.scopes.iter().any(|s| s == "*") {
                compiled.scopes()
            } else {
                g.scopes.clone()
            };
            obtainable.extend(scopes.iter().cloned());
            per_resource.push((g.clone(), version, compiled, scopes));
        }
        if let Some(req_scopes) = &req.scopes {
            let missing: Vec<&String> = req_scopes.iter().filter(|s| !obtainable.contains(*s)).collect();
            if !missing.is_empty() {
                return Err(OAuthError::invalid_scope(format!(
                    "scopes not granted: {}",
                    missing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" ")
                )));
            }
        }
        let mut resources = Vec::new();
        let mut ops = Vec::new();
        let mut approval_rules = Vec::new();
        let mut all_scopes: BTreeSet<String> = BTreeSet::new();
        for (g, version, compiled, grant_scopes) in per_resource {
            let res = self.caches.resource(p.tenant, g.resource_id).await?;
            let effective: Vec<String> = match &req.scopes {
                Some(r) => grant_scopes.iter().filter(|s| r.contains(s)).cloned().collect(),
                None => grant_scopes.clone(),
            };
            if req.scopes.is_some() && effective.is_empty() && !grant_scopes.is_empty() {
                if wanted.contains(&res.id) {
                    return Err(OAuthError::invalid_scope(format!(
                        "none of the requested scopes apply to {:?}",
                        res.name
                    )));
                }
                continue;
            }
            let filter = if grant_scopes.is_empty() {
                None
            } else {
                Some(effective.as_slice())
            };
            let mut allows = 0;
            let mut res_ops = Vec::new();
            for rule in compiled.applicable(&res.name, filter) {
                if rule.doc.effect == Effect::Allow {
                    if let Some(w) = &rule.doc.time {
                        match window_end(w, now_us) {
                            Some(end) => lifetime = lifetime.min(((end - now_us) / 1_000_000).max(1)),
                            None => continue,
                        }
                    }
                    if rule.doc.approval && approved.is_none() {
                        approval_rules.push(format!("{}/{}", res.name, rule.doc.id));
                    }
                    allows += 1;
                }
                res_ops.push(OpClaim {
                    resource: res.id,
                    rule: rule.doc.id.clone(),
                    effect: rule.doc.effect,
                    patterns: rule.matcher.sources().map(String::from),
                    scopes: rule.doc.scopes.clone(),
                });
            }
            if allows == 0 {
                continue;
            }
            lifetime = lifetime.min(g.max_lifetime_secs);
            all_scopes.extend(effective.iter().cloned());
            ops.extend(res_ops);
            resources.push(ResourceClaim {
                id: res.id,
                name: res.name.clone(),
                policy: g.policy_id,
                policy_version: version,
                grant: g.id,
                scopes: effective,
            });
        }
        if resources.is_empty() {
            return Err(OAuthError::unauthorized_client(
                "the policy allows nothing for this request",
            ));
        }
        let budgets = self
            .caches
            .budgets(p.tenant)
            .await?
            .iter()
            .filter(|b| match b.scope_kind {
                BudgetScopeKind::Tenant => true,
                BudgetScopeKind::Agent => b.scope_id.as_deref() == Some(&p.agent.id.to_string()),
                BudgetScopeKind::Resource => resources
                    .iter()
                    .any(|r| b.scope_id.as_deref() == Some(&r.id.to_string())),
            })
            .map(|b| b.id)
            .collect::<Vec<BudgetId>>();
        let claims = Claims {
            mandate_id: MandateId::new(),
            tenant: p.tenant,
            agent: p.agent.id,
            session: req.session,
            issued_at: now,
            expires_at: now + lifetime,
            resources,
            ops,
            narrow: Vec::new(),
            budgets,
            ancestors: Vec::new(),
            parent: None,
            depth: 0,
            approval: approved,
            credential: Some(p.credential.clone()),
        };
        Ok(Plan {
            claims,
            scopes: all_scopes.into_iter().collect(),
            approval_rules,
        })
    }

    pub fn sign(&self, c: &Claims) -> Result<String, OAuthError> {
        let s = self.caches.signer()?;
        Ok(mandate::mint(c, &s.key, s.kid)?)
    }
}

/// One restriction a delegator adds (all its fields must match; absent fields match anything).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Restriction {
    /// Resource name or id (default: every delegated resource).
    pub resource: Option<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub tools: Vec<String>,
}

/// Child claims for a delegation of `parent` to `child` (a principal of the same tenant, or the
/// parent's own agent). Refuses anything wider than the parent.
pub fn delegate(
    parent: &VerifiedMandate,
    child: Option<&Principal>,
    req: &MintRequest,
    restrictions: &[Restriction],
    max_depth: i64,
) -> Result<(Claims, Vec<String>), OAuthError> {
    let pc = &parent.claims;
    if pc.depth + 1 > max_depth {
        return Err(OAuthError::unauthorized_client(format!(
            "delegation depth limit ({max_depth}) reached"
        )));
    }
    if let Some(c) = child
        && c.tenant != pc.tenant
    {
        return Err(OAuthError::invalid_grant("the actor belongs to another tenant"));
    }
    let find =
        |r: &str| -> Option<&ResourceClaim> { pc.resources.iter().find(|x| x.id.to_string() == r || x.name == r) };
    let resources: Vec<ResourceClaim> = if req.resources.is_empty() {
        pc.resources.clone()
    } else {
        let mut out = Vec::new();
        for r in &req.resources {
            let rc = find(r)
                .ok_or_else(|| OAuthError::invalid_target(format!("the parent mandate does not cover {r:?}")))?;
            if !out.iter().any(|x: &ResourceClaim| x.id == rc.id) {
                out.push(rc.clone());
            }
        }
        out
    };
    let parent_scopes: BTreeSet<&String> = resources.iter().flat_map(|r| r.scopes.iter()).collect();
    if let Some(s) = &req.scopes
        && let Some(wider) = s.iter().find(|x| !parent_scopes.contains(x))
    {
        return Err(OAuthError::invalid_scope(format!(
            "scope {wider:?} is not in the parent mandate (delegation only narrows)"
        )));
    }
    let resources: Vec<ResourceClaim> = resources
        .into_iter()
        .map(|mut r| {
            if let Some(s) = &req.scopes {
                r.scopes.retain(|x| s.contains(x));
            }
            r
        })
        .collect();
    let keep_resource = |id: ResourceId| resources.iter().any(|r| r.id == id);
    let ops: Vec<OpClaim> = pc
        .ops
        .iter()
        .filter(|o| keep_resource(o.resource))
        .filter(|o| {
            o.effect == Effect::Deny
                || o.scopes.is_empty()
                || req
                    .scopes
                    .as_ref()
                    .is_none_or(|s| o.scopes.iter().any(|x| s.contains(x)))
        })
        .cloned()
        .collect();
    if !ops.iter().any(|o| o.effect == Effect::Allow) {
        return Err(OAuthError::invalid_scope(
            "nothing would remain of the parent's authority",
        ));
    }
    let mut narrow = pc
        .narrow
        .iter()
        .filter(|n| keep_resource(n.resource))
        .cloned()
        .collect::<Vec<_>>();
    if !restrictions.is_empty() {
        let set = pc.narrow.iter().map(|n| n.set).max().map_or(0, |m| m + 1);
        for r in restrictions {
            let targets: Vec<&ResourceClaim> = match &r.resource {
                Some(name) => vec![
                    resources
                        .iter()
                        .find(|x| x.id.to_string() == *name || x.name == *name)
                        .ok_or_else(|| {
                            OAuthError::invalid_target(format!("restriction names {name:?}, which is not delegated"))
                        })?,
                ],
                None => resources.iter().collect(),
            };
            let doc = caracal_shared::policy::RuleDoc {
                id: "restriction".into(),
                effect: Effect::Allow,
                description: String::new(),
                scopes: vec![],
                resources: vec![],
                methods: r.methods.clone(),
                hosts: r.hosts.clone(),
                paths: r.paths.clone(),
                models: r.models.clone(),
                tools: r.tools.clone(),
                time: None,
                approval: false,
            };
            let check = caracal_shared::policy::validate(&caracal_shared::policy::PolicyDocument {
                version: 1,
                description: String::new(),
                rules: vec![doc],
                delegation: None,
            });
            if let Some(p) = check.first() {
                return Err(OAuthError::invalid_request(format!(
                    "invalid restriction: {}: {}",
                    p.path.replace("rules[0].", ""),
                    p.message
                )));
            }
            let patterns = [
                methods_to_regex(&r.methods),
                globs_to_regex(&r.hosts, GlobKind::Host),
                globs_to_regex(&r.paths, GlobKind::Path),
                globs_to_regex(&r.models, GlobKind::Name),
                globs_to_regex(&r.tools, GlobKind::Name),
            ];
            for t in targets {
                narrow.push(NarrowClaim {
                    set,
                    resource: t.id,
                    patterns: patterns.clone(),
                });
            }
        }
    }
    let now = now_secs();
    let lifetime = req.lifetime.unwrap_or(pc.expires_at - now);
    let expires_at = (now + lifetime.max(1)).min(pc.expires_at);
    let mut ancestors: Vec<String> = pc.ancestors.clone();
    ancestors.extend(parent.revocation_ids.iter().cloned());
    ancestors.sort();
    ancestors.dedup();
    let scopes: BTreeSet<String> = resources.iter().flat_map(|r| r.scopes.iter().cloned()).collect();
    let claims = Claims {
        mandate_id: MandateId::new(),
        tenant: pc.tenant,
        agent: child.map(|c| c.agent.id).unwrap_or(pc.agent),
        session: req.session.or(pc.session),
        issued_at: now,
        expires_at,
        resources,
        ops,
        narrow,
        budgets: pc.budgets.clone(),
        ancestors,
        parent: Some(pc.mandate_id),
        depth: pc.depth + 1,
        approval: pc.approval,
        credential: child.map(|c| c.credential.clone()).or_else(|| pc.credential.clone()),
    };
    Ok((claims, scopes.into_iter().collect()))
}

/// The non-secret description of a mandate for audit events and delegation records.
pub fn describe(c: &Claims) -> Value {
    let mut by_resource: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in &c.resources {
        by_resource.insert(r.name.clone(), r.scopes.clone());
    }
    serde_json::json!({
        "mandate_id": c.mandate_id,
        "agent": c.agent,
        "session": c.session,
        "resources": c.resources.iter().map(|r| r.id).collect::<Vec<_>>(),
        "scopes": by_resource,
        "issued_at": c.issued_at,
        "expires_at": c.expires_at,
        "parent": c.parent,
        "depth": c.depth,
        "approval": c.approval,
        "narrowed": !c.narrow.is_empty(),
    })
}
