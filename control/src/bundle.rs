//! Declarative bundles (`POST /v1/apply`): agents, resources, policies, grants and budgets in
//! one YAML or JSON document, applied by name in one transaction. Re-applying an unchanged
//! bundle writes nothing; `?dry_run=true` returns the diff without writing.
//!
//! Upstream credentials are **references**, never literals: `{ env: CARACAL_SECRET_OPENAI }`
//! (only variables named `CARACAL_SECRET_*`, so a bundle cannot read the server's own secrets)
//! or `{ file: name }` (only inside the configured `control.secret_dir`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path};

use caracal_shared::crypto::{Secret, ct_eq};
use caracal_shared::error::{Error, Result};
use caracal_shared::ids::{AgentId, BudgetId, GrantId, PolicyId, ResourceId, TenantId};
use caracal_shared::policy::{CompiledPolicy, Format, problems_error};
use caracal_shared::store::admin::{Budget, BudgetScopeKind, BudgetUnit};
use caracal_shared::store::agents::Agent;
use caracal_shared::store::policies::{Grant, Policy};
use caracal_shared::store::resources::{InjectKind, Injection, Resource, ResourceSettings};
use caracal_shared::time::now_micros;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::State;
use crate::api::Change;
use crate::handlers::WindowBody;
use crate::policies::DocumentBody;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    #[serde(default)]
    pub agents: Vec<BAgent>,
    #[serde(default)]
    pub resources: Vec<BResource>,
    #[serde(default)]
    pub policies: Vec<BPolicy>,
    #[serde(default)]
    pub grants: Vec<BGrant>,
    #[serde(default)]
    pub budgets: Vec<BBudget>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BAgent {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub disabled: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretRef {
    pub env: Option<String>,
    pub file: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BResource {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub base_url: String,
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default = "bearer")]
    pub inject: Injection,
    pub credential: Option<SecretRef>,
    #[serde(default)]
    pub settings: ResourceSettings,
}

fn bearer() -> Injection {
    Injection {
        kind: InjectKind::Bearer,
        name: None,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BPolicy {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub document: DocumentBody,
    pub format: Option<Format>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BGrant {
    pub agent: String,
    pub resource: String,
    pub policy: String,
    #[serde(default = "all_scopes")]
    pub scopes: Vec<String>,
    #[serde(default = "default_lifetime")]
    pub max_lifetime_secs: i64,
}

fn all_scopes() -> Vec<String> {
    vec!["*".into()]
}

fn default_lifetime() -> i64 {
    900
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BScope {
    pub kind: BudgetScopeKind,
    /// The agent or resource *name* (bundles refer to objects by name).
    pub name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BBudget {
    pub name: String,
    pub scope: BScope,
    pub unit: BudgetUnit,
    pub limit: i64,
    pub window: WindowBody,
    #[serde(default = "yes")]
    pub hard: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DiffEntry {
    pub kind: &'static str,
    pub name: String,
    pub action: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<String>,
}

pub fn parse(body: &[u8], content_type: &str) -> Result<Bundle> {
    let text = std::str::from_utf8(body).map_err(|_| Error::bad_request("the bundle is not UTF-8"))?;
    let is_json = content_type.contains("json") || text.trim_start().starts_with('{');
    if is_json {
        caracal_shared::http::parse_json(body)
    } else {
        serde_yaml_ng::from_str(text).map_err(|e| {
            let loc = e.location();
            Error::validation(format!("invalid bundle: {e}")).with_details(json!({
                "line": loc.as_ref().map(|l| l.line()),
                "column": loc.as_ref().map(|l| l.column()),
            }))
        })
    }
}

fn resolve_secret(r: &SecretRef, secret_dir: Option<&Path>) -> Result<Secret> {
    match (&r.env, &r.file) {
        (Some(var), None) => {
            if !var.starts_with("CARACAL_SECRET_") {
                return Err(Error::validation(format!(
                    "credential env {var:?}: only variables named CARACAL_SECRET_* may be referenced"
                )));
            }
            let v = std::env::var(var).map_err(|_| Error::validation(format!("credential env {var:?} is not set")))?;
            Ok(Secret::new(v.trim_end_matches(['\n', '\r']).as_bytes().to_vec()))
        }
        (None, Some(name)) => {
            let dir = secret_dir.ok_or_else(|| {
                Error::validation("file credentials need control.secret_dir to be configured on the server")
            })?;
            let rel = Path::new(name);
            if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
                return Err(Error::validation(
                    "credential file must be a plain name inside control.secret_dir",
                ));
            }
            let v = std::fs::read(dir.join(rel))
                .map_err(|_| Error::validation(format!("credential file {name:?} cannot be read")))?;
            let trimmed = v.strip_suffix(b"\n").unwrap_or(&v).to_vec();
            Ok(Secret::new(trimmed))
        }
        _ => Err(Error::validation(
            "a credential reference is { env: NAME } or { file: NAME }",
        )),
    }
}

/// Compute the diff and, unless `dry_run`, apply it in one transaction. Returns the diff and
/// the changes written.
pub async fn apply(
    s: &State,
    tenant: TenantId,
    b: Bundle,
    dry_run: bool,
) -> Result<(Vec<DiffEntry>, Vec<Change>, Option<caracal_shared::store::Tx>)> {
    let store = &s.rt.store;
    let mut diff = Vec::new();
    let mut changes = Vec::new();
    let mut tx = if dry_run { None } else { Some(store.begin().await?) };
    let now = now_micros();

    // Names must be unique within the bundle.
    fn dupes<'a>(kind: &str, names: impl Iterator<Item = &'a str>) -> Result<()> {
        let mut seen = std::collections::HashSet::new();
        for n in names {
            if !seen.insert(n) {
                return Err(Error::validation(format!("{kind} {n:?} appears twice in the bundle")));
            }
        }
        Ok(())
    }
    dupes("agent", b.agents.iter().map(|a| a.name.as_str()))?;
    dupes("resource", b.resources.iter().map(|a| a.name.as_str()))?;
    dupes("policy", b.policies.iter().map(|a| a.name.as_str()))?;
    dupes("budget", b.budgets.iter().map(|a| a.name.as_str()))?;

    let mut agent_ids: HashMap<String, AgentId> = HashMap::new();
    for a in &b.agents {
        match store.agent_by_name(tenant, &a.name).await {
            Ok(cur) => {
                agent_ids.insert(a.name.clone(), cur.id);
                let mut fields = Vec::new();
                if cur.description != a.description {
                    fields.push("description".into());
                }
                if cur.labels != a.labels {
                    fields.push("labels".into());
                }
                if cur.disabled != a.disabled {
                    fields.push("disabled".into());
                }
                let action = if fields.is_empty() { "unchanged" } else { "update" };
                if let (Some(tx), false) = (tx.as_mut(), fields.is_empty()) {
                    let next = Agent {
                        description: a.description.clone(),
                        labels: a.labels.clone(),
                        disabled: a.disabled,
                        ..cur.clone()
                    };
                    let saved = tx.save_agent(&next, Some(cur.version)).await?;
                    changes.push(Change::new(
                        "agent.updated",
                        Some(tenant),
                        serde_json::to_value(&saved)?,
                    ));
                }
                diff.push(DiffEntry {
                    kind: "agent",
                    name: a.name.clone(),
                    action,
                    fields,
                });
            }
            Err(e) if e.code == caracal_shared::ErrorCode::NotFound => {
                if let Some(tx) = tx.as_mut() {
                    let mut created = tx.insert_agent(tenant, &a.name, &a.description, &a.labels).await?;
                    if a.disabled {
                        created.disabled = true;
                        created = tx.save_agent(&created, None).await?;
                    }
                    agent_ids.insert(a.name.clone(), created.id);
                    changes.push(Change::new(
                        "agent.created",
                        Some(tenant),
                        serde_json::to_value(&created)?,
                    ));
                } else {
                    agent_ids.insert(a.name.clone(), AgentId::new());
                }
                diff.push(DiffEntry {
                    kind: "agent",
                    name: a.name.clone(),
                    action: "create",
                    fields: vec![],
                });
            }
            Err(e) => return Err(e),
        }
    }

    let mut resource_ids: HashMap<String, ResourceId> = HashMap::new();
    for r in &b.resources {
        let secret = r
            .credential
            .as_ref()
            .map(|c| resolve_secret(c, s.secret_dir.as_deref()))
            .transpose()?;
        let desired = Resource {
            id: ResourceId::new(),
            tenant_id: tenant,
            name: r.name.clone(),
            description: r.description.clone(),
            base_url: r.base_url.clone(),
            hosts: r.hosts.clone(),
            inject: r.inject.clone(),
            has_credential: false,
            credential_version: 0,
            settings: r.settings.clone(),
            version: 1,
            created_at: now,
            updated_at: now,
        };
        desired.validate()?;
        match store.resource_by_name(tenant, &r.name).await {
            Ok(cur) => {
                resource_ids.insert(r.name.clone(), cur.id);
                let mut fields = Vec::new();
                if cur.description != desired.description {
                    fields.push("description".to_string());
                }
                if cur.base_url != desired.base_url {
                    fields.push("base_url".into());
                }
                if cur.hosts != desired.hosts {
                    fields.push("hosts".into());
                }
                if cur.inject != desired.inject {
                    fields.push("inject".into());
                }
                if cur.settings != desired.settings {
                    fields.push("settings".into());
                }
                let cred_changed = match &secret {
                    None => false,
                    Some(new) => match store.resource_credential(&s.seal, &cur).await? {
                        Some(old) => !ct_eq(old.expose(), new.expose()),
                        None => true,
                    },
                };
                if cred_changed {
                    fields.push("credential".into());
                }
                if let (Some(tx), false) = (tx.as_mut(), fields.is_empty()) {
                    let mut saved = cur.clone();
                    if fields.iter().any(|f| f != "credential") {
                        saved = tx
                            .save_resource(
                                &Resource {
                                    id: cur.id,
                                    version: cur.version,
                                    ..desired.clone()
                                },
                                Some(cur.version),
                            )
                            .await?;
                    }
                    if cred_changed && let Some(sec) = &secret {
                        saved = tx.set_resource_credential(&s.seal, tenant, cur.id, Some(sec)).await?;
                    }
                    changes.push(Change::new(
                        "resource.updated",
                        Some(tenant),
                        serde_json::to_value(&saved)?,
                    ));
                }
                let action = if fields.is_empty() { "unchanged" } else { "update" };
                diff.push(DiffEntry {
                    kind: "resource",
                    name: r.name.clone(),
                    action,
                    fields,
                });
            }
            Err(e) if e.code == caracal_shared::ErrorCode::NotFound => {
                if let Some(tx) = tx.as_mut() {
                    let mut created = tx.insert_resource(&desired).await?;
                    if let Some(sec) = &secret {
                        created = tx
                            .set_resource_credential(&s.seal, tenant, created.id, Some(sec))
                            .await?;
                    }
                    resource_ids.insert(r.name.clone(), created.id);
                    changes.push(Change::new(
                        "resource.created",
                        Some(tenant),
                        serde_json::to_value(&created)?,
                    ));
                } else {
                    resource_ids.insert(r.name.clone(), desired.id);
                }
                diff.push(DiffEntry {
                    kind: "resource",
                    name: r.name.clone(),
                    action: "create",
                    fields: vec![],
                });
            }
            Err(e) => return Err(e),
        }
    }

    let mut policy_ids: HashMap<String, PolicyId> = HashMap::new();
    for (i, p) in b.policies.into_iter().enumerate() {
        let (source, format) = p.document.source(p.format)?;
        let compiled = CompiledPolicy::from_source(&source, format).map_err(|problems| {
            let mut e = problems_error(problems);
            e.message = format!("policies[{i}] ({}): {}", p.name, e.message).into();
            e
        })?;
        let normalized = serde_json::to_value(&compiled.doc)?;
        match store.policy_by_name(tenant, &p.name).await {
            Ok(cur) => {
                policy_ids.insert(p.name.clone(), cur.id);
                let latest = store.policy_version(tenant, cur.id, cur.latest_version).await?;
                let mut fields = Vec::new();
                if latest.normalized != normalized {
                    fields.push("document".to_string());
                } else if cur.active_version != Some(cur.latest_version) {
                    fields.push("active_version".to_string());
                }
                if cur.description != p.description {
                    fields.push("description".into());
                }
                if let (Some(tx), false) = (tx.as_mut(), fields.is_empty()) {
                    let mut version = cur.version;
                    if fields.iter().any(|f| f == "description") {
                        version = tx
                            .save_policy_description(
                                &Policy {
                                    description: p.description.clone(),
                                    ..cur.clone()
                                },
                                Some(version),
                            )
                            .await?
                            .version;
                    }
                    let target = if fields.iter().any(|f| f == "document") {
                        let (pol, v) = tx
                            .add_policy_version(tenant, cur.id, Some(version), &source, format)
                            .await?;
                        version = pol.version;
                        changes.push(Change::new(
                            "policy.version_added",
                            Some(tenant),
                            json!({ "id": cur.id, "version": v.version }),
                        ));
                        Some(v.version)
                    } else if fields.iter().any(|f| f == "active_version") {
                        Some(cur.latest_version)
                    } else {
                        None
                    };
                    if let Some(v) = target {
                        tx.activate_policy_version(tenant, cur.id, v, Some(version)).await?;
                        changes.push(Change::new(
                            "policy.activated",
                            Some(tenant),
                            json!({ "id": cur.id, "active_version": v }),
                        ));
                    }
                }
                let action = if fields.is_empty() { "unchanged" } else { "update" };
                diff.push(DiffEntry {
                    kind: "policy",
                    name: p.name.clone(),
                    action,
                    fields,
                });
            }
            Err(e) if e.code == caracal_shared::ErrorCode::NotFound => {
                if let Some(tx) = tx.as_mut() {
                    let (pol, _) = tx
                        .insert_policy(tenant, &p.name, &p.description, &source, format)
                        .await?;
                    tx.activate_policy_version(tenant, pol.id, 1, None).await?;
                    policy_ids.insert(p.name.clone(), pol.id);
                    changes.push(Change::new(
                        "policy.created",
                        Some(tenant),
                        json!({ "id": pol.id, "name": pol.name, "version": 1 }),
                    ));
                    changes.push(Change::new(
                        "policy.activated",
                        Some(tenant),
                        json!({ "id": pol.id, "active_version": 1 }),
                    ));
                } else {
                    policy_ids.insert(p.name.clone(), PolicyId::new());
                }
                diff.push(DiffEntry {
                    kind: "policy",
                    name: p.name.clone(),
                    action: "create",
                    fields: vec![],
                });
            }
            Err(e) => return Err(e),
        }
    }

    let lookup_agent = async |name: &str| -> Result<AgentId> {
        match agent_ids.get(name) {
            Some(id) => Ok(*id),
            None => Ok(store
                .agent_by_name(tenant, name)
                .await
                .map_err(|_| Error::validation(format!("unknown agent {name:?}")))?
                .id),
        }
    };
    let lookup_resource = async |name: &str| -> Result<ResourceId> {
        match resource_ids.get(name) {
            Some(id) => Ok(*id),
            None => Ok(store
                .resource_by_name(tenant, name)
                .await
                .map_err(|_| Error::validation(format!("unknown resource {name:?}")))?
                .id),
        }
    };

    for g in &b.grants {
        let agent = lookup_agent(&g.agent).await?;
        let resource = lookup_resource(&g.resource).await?;
        let policy = match policy_ids.get(&g.policy) {
            Some(id) => *id,
            None => {
                store
                    .policy_by_name(tenant, &g.policy)
                    .await
                    .map_err(|_| Error::validation(format!("unknown policy {:?}", g.policy)))?
                    .id
            }
        };
        let name = format!("{}/{}", g.agent, g.resource);
        let existing = store
            .grants_of(tenant, agent)
            .await
            .unwrap_or_default()
            .into_iter()
            .find(|x| x.resource_id == resource);
        let desired = Grant {
            id: GrantId::new(),
            tenant_id: tenant,
            agent_id: agent,
            resource_id: resource,
            policy_id: policy,
            scopes: g.scopes.clone(),
            max_lifetime_secs: g.max_lifetime_secs,
            version: 1,
            created_at: now,
            updated_at: now,
        };
        desired.validate()?;
        match existing {
            Some(cur) => {
                let mut fields = Vec::new();
                if cur.policy_id != policy {
                    fields.push("policy".to_string());
                }
                if cur.scopes != g.scopes {
                    fields.push("scopes".into());
                }
                if cur.max_lifetime_secs != g.max_lifetime_secs {
                    fields.push("max_lifetime_secs".into());
                }
                if let (Some(tx), false) = (tx.as_mut(), fields.is_empty()) {
                    let saved = tx
                        .upsert_grant(
                            &Grant {
                                id: cur.id,
                                ..desired.clone()
                            },
                            Some(cur.version),
                            false,
                        )
                        .await?;
                    changes.push(Change::new(
                        "grant.updated",
                        Some(tenant),
                        serde_json::to_value(&saved)?,
                    ));
                }
                let action = if fields.is_empty() { "unchanged" } else { "update" };
                diff.push(DiffEntry {
                    kind: "grant",
                    name,
                    action,
                    fields,
                });
            }
            None => {
                if let Some(tx) = tx.as_mut() {
                    let created = tx.upsert_grant(&desired, None, true).await?;
                    changes.push(Change::new(
                        "grant.created",
                        Some(tenant),
                        serde_json::to_value(&created)?,
                    ));
                }
                diff.push(DiffEntry {
                    kind: "grant",
                    name,
                    action: "create",
                    fields: vec![],
                });
            }
        }
    }

    let existing_budgets = store.list_all::<Budget>(tenant, 10_000).await?;
    for bb in &b.budgets {
        let scope_id = match (bb.scope.kind, &bb.scope.name) {
            (BudgetScopeKind::Tenant, None) => None,
            (BudgetScopeKind::Agent, Some(n)) => Some(lookup_agent(n).await?.to_string()),
            (BudgetScopeKind::Resource, Some(n)) => Some(lookup_resource(n).await?.to_string()),
            _ => {
                return Err(Error::validation(format!(
                    "budget {:?}: agent and resource scopes need a name, tenant scopes none",
                    bb.name
                )));
            }
        };
        let desired = Budget {
            id: BudgetId::new(),
            tenant_id: tenant,
            name: bb.name.clone(),
            scope_kind: bb.scope.kind,
            scope_id,
            unit: bb.unit,
            limit: bb.limit,
            window: bb.window.kind,
            window_tz: bb.window.tz.clone(),
            rolling_secs: bb.window.rolling_secs,
            hard: bb.hard,
            version: 1,
            created_at: now,
            updated_at: now,
        };
        desired.validate()?;
        match existing_budgets.iter().find(|x| x.name == bb.name) {
            Some(cur) => {
                let mut fields = Vec::new();
                if cur.scope_kind != desired.scope_kind || cur.scope_id != desired.scope_id {
                    return Err(Error::validation(format!(
                        "budget {:?}: its scope cannot change; use a new name",
                        bb.name
                    )));
                }
                for (f, changed) in [
                    ("unit", cur.unit != desired.unit),
                    ("limit", cur.limit != desired.limit),
                    (
                        "window",
                        cur.window != desired.window
                            || cur.window_tz != desired.window_tz
                            || cur.rolling_secs != desired.rolling_secs,
                    ),
                    ("hard", cur.hard != desired.hard),
                ] {
                    if changed {
                        fields.push(f.to_string());
                    }
                }
                if let (Some(tx), false) = (tx.as_mut(), fields.is_empty()) {
                    let saved = tx
                        .upsert_budget(
                            &Budget {
                                id: cur.id,
                                ..desired.clone()
                            },
                            Some(cur.version),
                            false,
                        )
                        .await?;
                    changes.push(Change::new(
                        "budget.updated",
                        Some(tenant),
                        serde_json::to_value(&saved)?,
                    ));
                }
                let action = if fields.is_empty() { "unchanged" } else { "update" };
                diff.push(DiffEntry {
                    kind: "budget",
                    name: bb.name.clone(),
                    action,
                    fields,
                });
            }
            None => {
                if let Some(tx) = tx.as_mut() {
                    let created = tx.upsert_budget(&desired, None, true).await?;
                    changes.push(Change::new(
                        "budget.created",
                        Some(tenant),
                        serde_json::to_value(&created)?,
                    ));
                }
                diff.push(DiffEntry {
                    kind: "budget",
                    name: bb.name.clone(),
                    action: "create",
                    fields: vec![],
                });
            }
        }
    }
    Ok((diff, changes, tx))
}

pub fn summary(diff: &[DiffEntry]) -> Value {
    let count = |a: &str| diff.iter().filter(|d| d.action == a).count();
    json!({ "create": count("create"), "update": count("update"), "unchanged": count("unchanged") })
}
