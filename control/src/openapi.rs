//! The OpenAPI 3.1 document of the control API, served at `/v1/openapi.json`. A test checks
//! that it lists exactly the routes the router serves, and a schema-driven fuzzer runs against
//! it in CI.

use serde_json::{Map, Value, json};

fn r(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}
fn st() -> Value {
    json!({ "type": "string" })
}
fn st_max(n: u32) -> Value {
    json!({ "type": "string", "maxLength": n })
}
fn slug() -> Value {
    json!({ "type": "string", "pattern": "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$" })
}
fn id(prefix: &str) -> Value {
    json!({ "type": "string", "pattern": format!("^{prefix}_[0-9a-f]{{32}}$") })
}
fn int() -> Value {
    json!({ "type": "integer", "format": "int64" })
}
fn boolean() -> Value {
    json!({ "type": "boolean" })
}
fn time() -> Value {
    json!({ "type": "string", "format": "date-time" })
}
fn arr(v: Value) -> Value {
    json!({ "type": "array", "items": v })
}
fn nullable(v: Value) -> Value {
    json!({ "oneOf": [v, { "type": "null" }] })
}
fn en(values: &[&str]) -> Value {
    json!({ "type": "string", "enum": values })
}
fn obj(props: &[(&str, Value)], required: &[&str]) -> Value {
    let mut p = Map::new();
    for (k, v) in props {
        p.insert(k.to_string(), v.clone());
    }
    json!({ "type": "object", "properties": p, "required": required, "additionalProperties": false })
}
fn open_obj(props: &[(&str, Value)]) -> Value {
    let mut p = Map::new();
    for (k, v) in props {
        p.insert(k.to_string(), v.clone());
    }
    json!({ "type": "object", "properties": p })
}
fn page(item: &str) -> Value {
    open_obj(&[("items", arr(r(item))), ("next_cursor", nullable(st()))])
}

/// How an operation is described: method, path, summary, scope, request and response schemas.
struct Op {
    method: &'static str,
    path: &'static str,
    summary: &'static str,
    scope: &'static str,
    request: Option<Value>,
    status: u16,
    response: Value,
    paged: bool,
}

fn op(
    method: &'static str,
    path: &'static str,
    summary: &'static str,
    scope: &'static str,
    request: Option<Value>,
    status: u16,
    response: Value,
) -> Op {
    Op {
        method,
        path,
        summary,
        scope,
        request,
        status,
        response,
        paged: false,
    }
}

fn list(path: &'static str, summary: &'static str, item: &str) -> Op {
    Op {
        method: "get",
        path,
        summary,
        scope: "read",
        request: None,
        status: 200,
        response: page(item),
        paged: true,
    }
}

fn operations() -> Vec<Op> {
    let deleted = open_obj(&[("deleted", st())]);
    let policy_pair = open_obj(&[("policy", r("Policy")), ("version", r("PolicyVersion"))]);
    vec![
        op(
            "get",
            "/v1/openapi.json",
            "This document",
            "none",
            None,
            200,
            json!({ "type": "object" }),
        ),
        op(
            "post",
            "/v1/tenants",
            "Create a tenant (platform tokens)",
            "write",
            Some(r("TenantInput")),
            201,
            r("Tenant"),
        ),
        list("/v1/tenants", "List tenants", "Tenant"),
        op(
            "get",
            "/v1/tenants/{tenant_id}",
            "Get a tenant",
            "read",
            None,
            200,
            r("Tenant"),
        ),
        op(
            "patch",
            "/v1/tenants/{tenant_id}",
            "Update a tenant",
            "write",
            Some(obj(&[("display_name", st_max(256))], &["display_name"])),
            200,
            r("Tenant"),
        ),
        op(
            "delete",
            "/v1/tenants/{tenant_id}",
            "Delete a tenant and everything in it (platform tokens)",
            "write",
            None,
            200,
            deleted.clone(),
        ),
        op(
            "post",
            "/v1/agents",
            "Create an agent",
            "write",
            Some(r("AgentInput")),
            201,
            r("Agent"),
        ),
        list("/v1/agents", "List agents", "Agent"),
        op(
            "get",
            "/v1/agents/{agent_id}",
            "Get an agent",
            "read",
            None,
            200,
            r("Agent"),
        ),
        op(
            "patch",
            "/v1/agents/{agent_id}",
            "Update an agent",
            "write",
            Some(r("AgentPatch")),
            200,
            r("Agent"),
        ),
        op(
            "delete",
            "/v1/agents/{agent_id}",
            "Delete an agent",
            "write",
            None,
            200,
            deleted.clone(),
        ),
        op(
            "post",
            "/v1/agents/{agent_id}/api-keys",
            "Issue an API key (the secret is shown once)",
            "write",
            Some(obj(&[("name", st_max(128)), ("expires_at", time())], &[])),
            201,
            r("IssuedKey"),
        ),
        list("/v1/agents/{agent_id}/api-keys", "List an agent's API keys", "ApiKey"),
        op(
            "delete",
            "/v1/agents/{agent_id}/api-keys/{key_id}",
            "Revoke an API key",
            "write",
            None,
            200,
            r("ApiKey"),
        ),
        op(
            "post",
            "/v1/agents/{agent_id}/api-keys/{key_id}/rotate",
            "Rotate an API key with overlap",
            "write",
            Some(obj(&[("overlap_secs", int())], &[])),
            201,
            open_obj(&[("old", r("ApiKey")), ("new", r("IssuedKey"))]),
        ),
        op(
            "post",
            "/v1/agents/{agent_id}/identities",
            "Bind a JWT subject or mTLS name to the agent",
            "write",
            Some(r("IdentityInput")),
            201,
            r("Identity"),
        ),
        list(
            "/v1/agents/{agent_id}/identities",
            "List an agent's identities",
            "Identity",
        ),
        op(
            "delete",
            "/v1/agents/{agent_id}/identities/{identity_id}",
            "Remove an identity",
            "write",
            None,
            200,
            deleted.clone(),
        ),
        op(
            "post",
            "/v1/jwt-issuers",
            "Trust a JWT issuer",
            "write",
            Some(r("JwtIssuerInput")),
            201,
            r("JwtIssuer"),
        ),
        list("/v1/jwt-issuers", "List JWT issuers", "JwtIssuer"),
        op(
            "get",
            "/v1/jwt-issuers/{issuer_id}",
            "Get a JWT issuer",
            "read",
            None,
            200,
            r("JwtIssuer"),
        ),
        op(
            "patch",
            "/v1/jwt-issuers/{issuer_id}",
            "Update a JWT issuer",
            "write",
            Some(r("JwtIssuerPatch")),
            200,
            r("JwtIssuer"),
        ),
        op(
            "delete",
            "/v1/jwt-issuers/{issuer_id}",
            "Remove a JWT issuer",
            "write",
            None,
            200,
            deleted.clone(),
        ),
        op(
            "post",
            "/v1/mtls-cas",
            "Trust an mTLS CA",
            "write",
            Some(obj(&[("name", slug()), ("ca_pem", st_max(65536))], &["name", "ca_pem"])),
            201,
            r("MtlsCa"),
        ),
        list("/v1/mtls-cas", "List mTLS CAs", "MtlsCa"),
        op(
            "get",
            "/v1/mtls-cas/{ca_id}",
            "Get an mTLS CA",
            "read",
            None,
            200,
            r("MtlsCa"),
        ),
        op(
            "delete",
            "/v1/mtls-cas/{ca_id}",
            "Remove an mTLS CA",
            "write",
            None,
            200,
            deleted.clone(),
        ),
        op(
            "post",
            "/v1/resources",
            "Create a resource (credential write-only)",
            "write",
            Some(r("ResourceInput")),
            201,
            r("Resource"),
        ),
        list("/v1/resources", "List resources", "Resource"),
        op(
            "get",
            "/v1/resources/{resource_id}",
            "Get a resource",
            "read",
            None,
            200,
            r("Resource"),
        ),
        op(
            "patch",
            "/v1/resources/{resource_id}",
            "Update a resource",
            "write",
            Some(r("ResourcePatch")),
            200,
            r("Resource"),
        ),
        op(
            "delete",
            "/v1/resources/{resource_id}",
            "Delete a resource",
            "write",
            None,
            200,
            deleted.clone(),
        ),
        op(
            "put",
            "/v1/resources/{resource_id}/credential",
            "Set the sealed upstream credential",
            "write",
            Some(r("CredentialInput")),
            200,
            r("Resource"),
        ),
        op(
            "delete",
            "/v1/resources/{resource_id}/credential",
            "Remove the upstream credential",
            "write",
            None,
            200,
            r("Resource"),
        ),
        op(
            "post",
            "/v1/policies",
            "Create a policy with its first version",
            "write",
            Some(r("PolicyInput")),
            201,
            policy_pair.clone(),
        ),
        list("/v1/policies", "List policies", "Policy"),
        op(
            "post",
            "/v1/policies/validate",
            "Validate a policy document",
            "read",
            Some(r("DocumentInput")),
            200,
            r("Validation"),
        ),
        op(
            "get",
            "/v1/policies/{policy_id}",
            "Get a policy and its active version",
            "read",
            None,
            200,
            r("Policy"),
        ),
        op(
            "patch",
            "/v1/policies/{policy_id}",
            "Update a policy's description",
            "write",
            Some(obj(&[("description", st_max(1024))], &["description"])),
            200,
            r("Policy"),
        ),
        op(
            "delete",
            "/v1/policies/{policy_id}",
            "Delete an unused policy",
            "write",
            None,
            200,
            deleted.clone(),
        ),
        op(
            "post",
            "/v1/policies/{policy_id}/versions",
            "Add an immutable version",
            "write",
            Some(r("VersionInput")),
            201,
            policy_pair,
        ),
        list("/v1/policies/{policy_id}/versions", "List versions", "PolicyVersion"),
        op(
            "get",
            "/v1/policies/{policy_id}/versions/{version}",
            "Get a version",
            "read",
            None,
            200,
            r("PolicyVersion"),
        ),
        op(
            "post",
            "/v1/policies/{policy_id}/versions/{version}/activate",
            "Activate a version",
            "write",
            None,
            200,
            r("Policy"),
        ),
        op(
            "post",
            "/v1/policies/{policy_id}/simulate",
            "Decide a hypothetical request (no side effects)",
            "read",
            Some(r("SimulationInput")),
            200,
            r("Simulation"),
        ),
        op(
            "post",
            "/v1/grants",
            "Grant an agent scopes on a resource",
            "write",
            Some(r("GrantInput")),
            201,
            r("Grant"),
        ),
        list("/v1/grants", "List grants", "Grant"),
        op(
            "get",
            "/v1/grants/{grant_id}",
            "Get a grant",
            "read",
            None,
            200,
            r("Grant"),
        ),
        op(
            "patch",
            "/v1/grants/{grant_id}",
            "Update a grant",
            "write",
            Some(r("GrantPatch")),
            200,
            r("Grant"),
        ),
        op(
            "delete",
            "/v1/grants/{grant_id}",
            "Delete a grant",
            "write",
            None,
            200,
            deleted.clone(),
        ),
        op(
            "post",
            "/v1/budgets",
            "Create a budget",
            "write",
            Some(r("BudgetInput")),
            201,
            r("Budget"),
        ),
        list("/v1/budgets", "List budgets with current usage", "Budget"),
        op(
            "get",
            "/v1/budgets/{budget_id}",
            "Get a budget with current usage",
            "read",
            None,
            200,
            r("Budget"),
        ),
        op(
            "patch",
            "/v1/budgets/{budget_id}",
            "Update a budget",
            "write",
            Some(r("BudgetPatch")),
            200,
            r("Budget"),
        ),
        op(
            "delete",
            "/v1/budgets/{budget_id}",
            "Delete a budget",
            "write",
            None,
            200,
            deleted.clone(),
        ),
        op(
            "get",
            "/v1/keys",
            "Signing-key inventory",
            "read",
            None,
            200,
            open_obj(&[("items", arr(r("SigningKey")))]),
        ),
        op(
            "post",
            "/v1/keys/rotate",
            "Rotate mandate signing keys (platform tokens)",
            "write",
            None,
            200,
            open_obj(&[("items", arr(r("SigningKey")))]),
        ),
        op(
            "post",
            "/v1/admin-tokens",
            "Issue an admin token (the secret is shown once)",
            "write",
            Some(r("AdminTokenInput")),
            201,
            open_obj(&[("token", r("AdminToken")), ("secret", st())]),
        ),
        list("/v1/admin-tokens", "List admin tokens", "AdminToken"),
        op(
            "delete",
            "/v1/admin-tokens/{token_id}",
            "Revoke an admin token",
            "write",
            None,
            200,
            open_obj(&[("revoked", st())]),
        ),
        op(
            "get",
            "/v1/approvals",
            "List approval requests (?status=pending|approved|denied|expired|released)",
            "approve",
            None,
            200,
            page("Approval"),
        ),
        op(
            "get",
            "/v1/approvals/{approval_id}",
            "Get an approval request",
            "approve",
            None,
            200,
            r("Approval"),
        ),
        op(
            "post",
            "/v1/approvals/{approval_id}/approve",
            "Approve a pending request (the next poll releases exactly one mandate)",
            "approve",
            Some(r("DecisionInput")),
            200,
            r("Approval"),
        ),
        op(
            "post",
            "/v1/approvals/{approval_id}/deny",
            "Deny a pending request",
            "approve",
            Some(r("DecisionInput")),
            200,
            r("Approval"),
        ),
        op(
            "post",
            "/v1/apply",
            "Apply a declarative bundle (YAML or JSON); ?dry_run=true shows the diff",
            "write",
            Some(r("Bundle")),
            200,
            r("ApplyResult"),
        ),
    ]
}

fn path_param(name: &str) -> Value {
    let schema = match name {
        "tenant_id" => id("ten"),
        "agent_id" => id("agt"),
        "key_id" => id("cred"),
        "identity_id" => id("idn"),
        "issuer_id" => id("jwi"),
        "ca_id" => id("mca"),
        "resource_id" => id("res"),
        "policy_id" => id("pol"),
        "grant_id" => id("grt"),
        "budget_id" => id("bud"),
        "token_id" => id("adm"),
        "approval_id" => id("apr"),
        "version" => json!({ "type": "integer", "minimum": 1 }),
        _ => st(),
    };
    json!({ "name": name, "in": "path", "required": true, "schema": schema })
}

fn schemas() -> Value {
    let labels = json!({ "type": "object", "additionalProperties": { "type": "string", "maxLength": 256 }, "maxProperties": 64 });
    let scopes = arr(json!({ "type": "string", "pattern": "^[!-~]{1,64}$" }));
    let injection = obj(
        &[
            ("kind", en(&["bearer", "header", "basic", "query", "none"])),
            ("name", st_max(128)),
        ],
        &["kind"],
    );
    let settings = obj(
        &[
            ("egress_allow", arr(st_max(64))),
            ("intercept_tls", boolean()),
            ("models", arr(st_max(256))),
            ("operations", arr(st_max(512))),
            (
                "pricing",
                open_obj(&[("per_request", int()), ("models", arr(json!({ "type": "object" })))]),
            ),
            ("upstream_ca_pem", st_max(65536)),
        ],
        &[],
    );
    let credential = obj(
        &[
            ("value", st_max(16384)),
            ("username", st_max(1024)),
            ("password", st_max(16384)),
        ],
        &[],
    );
    let document = json!({ "oneOf": [ { "type": "string", "maxLength": 262144 }, { "type": "object" } ] });
    let window = obj(
        &[
            ("kind", en(&["daily", "weekly", "monthly", "rolling"])),
            ("tz", st_max(64)),
            ("rolling_secs", int()),
        ],
        &["kind"],
    );
    json!({
        "Error": open_obj(&[("error", open_obj(&[("code", st()), ("message", st()), ("details", json!({})), ("request_id", st()), ("retry_after", int())]))]),
        "TenantInput": obj(&[("name", slug()), ("display_name", st_max(256))], &["name"]),
        "Tenant": open_obj(&[("id", id("ten")), ("name", st()), ("display_name", st()), ("version", int()), ("created_at", int()), ("updated_at", int())]),
        "AgentInput": obj(&[("name", slug()), ("description", st_max(1024)), ("labels", labels.clone())], &["name"]),
        "AgentPatch": obj(&[("description", st_max(1024)), ("labels", labels), ("disabled", boolean())], &[]),
        "Agent": open_obj(&[("id", id("agt")), ("tenant_id", id("ten")), ("name", st()), ("description", st()), ("labels", json!({ "type": "object" })), ("disabled", boolean()), ("version", int())]),
        "ApiKey": open_obj(&[("id", id("cred")), ("agent_id", id("agt")), ("name", st()), ("prefix", st()), ("created_at", int()), ("expires_at", nullable(int())), ("revoked_at", nullable(int())), ("replaced_by", nullable(st()))]),
        "IssuedKey": open_obj(&[("key", r("ApiKey")), ("secret", st())]),
        "IdentityInput": obj(&[("kind", en(&["jwt", "mtls"])), ("issuer_id", id("jwi")), ("ca_id", id("mca")), ("match", en(&["subject", "san_uri", "san_dns", "cn"])), ("subject", st_max(1024))], &["kind", "subject"]),
        "Identity": open_obj(&[("id", id("idn")), ("agent_id", id("agt")), ("kind", st()), ("match_kind", st()), ("subject", st())]),
        "JwtIssuerInput": obj(&[("name", slug()), ("issuer", st_max(512)), ("audiences", arr(st_max(512))), ("jwks_url", st_max(2048)), ("jwks", json!({ "type": "object" })), ("subject_claim", st_max(64)), ("max_skew_secs", int())], &["name", "issuer", "audiences"]),
        "JwtIssuerPatch": obj(&[("issuer", st_max(512)), ("audiences", arr(st_max(512))), ("jwks_url", st_max(2048)), ("jwks", json!({ "type": "object" })), ("subject_claim", st_max(64)), ("max_skew_secs", int())], &[]),
        "JwtIssuer": open_obj(&[("id", id("jwi")), ("name", st()), ("issuer", st()), ("audiences", arr(st())), ("version", int())]),
        "MtlsCa": open_obj(&[("id", id("mca")), ("name", st()), ("ca_pem", st()), ("fingerprint", st()), ("version", int())]),
        "CredentialInput": credential.clone(),
        "ResourceInput": obj(&[("name", slug()), ("description", st_max(1024)), ("base_url", st_max(2048)), ("hosts", arr(st_max(253))), ("inject", injection.clone()), ("credential", credential.clone()), ("settings", settings.clone())], &["name", "base_url"]),
        "ResourcePatch": obj(&[("description", st_max(1024)), ("base_url", st_max(2048)), ("hosts", arr(st_max(253))), ("inject", injection), ("credential", credential), ("settings", settings)], &[]),
        "Resource": open_obj(&[("id", id("res")), ("name", st()), ("base_url", st()), ("hosts", arr(st())), ("has_credential", boolean()), ("credential_version", int()), ("version", int())]),
        "DocumentInput": obj(&[("document", document.clone()), ("format", en(&["yaml", "json"]))], &["document"]),
        "PolicyInput": obj(&[("name", slug()), ("description", st_max(1024)), ("document", document.clone()), ("format", en(&["yaml", "json"])), ("activate", boolean())], &["name", "document"]),
        "VersionInput": obj(&[("document", document), ("format", en(&["yaml", "json"])), ("activate", boolean())], &["document"]),
        "Policy": open_obj(&[("id", id("pol")), ("name", st()), ("description", st()), ("active_version", nullable(int())), ("latest_version", int()), ("version", int())]),
        "PolicyVersion": open_obj(&[("policy_id", id("pol")), ("version", int()), ("format", st()), ("source", st()), ("normalized", json!({})), ("checksum", st())]),
        "Validation": open_obj(&[("valid", boolean()), ("problems", json!({})), ("scopes", arr(st()))]),
        "SimulationInput": obj(&[
            ("agent_id", id("agt")), ("resource_id", id("res")), ("method", st_max(16)), ("url", st_max(4096)), ("host", st_max(253)),
            ("path", st_max(4096)), ("model", st_max(256)), ("tool", st_max(256)), ("scopes", scopes.clone()), ("version", json!({ "type": "integer", "minimum": 1 })), ("at", time()),
        ], &["agent_id", "resource_id", "method"]),
        "Simulation": open_obj(&[("decision", en(&["allow", "deny"])), ("reason", st()), ("rule", nullable(st())), ("approval_required", boolean()), ("policy_version", int())]),
        "GrantInput": obj(&[("agent_id", id("agt")), ("resource_id", id("res")), ("policy_id", id("pol")), ("scopes", scopes.clone()), ("max_lifetime_secs", int())], &["agent_id", "resource_id", "policy_id"]),
        "GrantPatch": obj(&[("policy_id", id("pol")), ("scopes", scopes), ("max_lifetime_secs", int())], &[]),
        "Grant": open_obj(&[("id", id("grt")), ("agent_id", id("agt")), ("resource_id", id("res")), ("policy_id", id("pol")), ("scopes", arr(st())), ("max_lifetime_secs", int()), ("version", int())]),
        "BudgetInput": obj(&[
            ("name", slug()), ("scope", obj(&[("kind", en(&["agent", "resource", "tenant"])), ("id", st_max(64))], &["kind"])),
            ("unit", en(&["micros", "tokens", "requests"])), ("limit", int()), ("window", window.clone()), ("hard", boolean()),
        ], &["name", "unit", "limit"]),
        "BudgetPatch": obj(&[("unit", en(&["micros", "tokens", "requests"])), ("limit", int()), ("window", window), ("hard", boolean())], &[]),
        "Budget": open_obj(&[("id", id("bud")), ("name", st()), ("unit", st()), ("limit", int()), ("usage", open_obj(&[("spent", int()), ("reserved", int()), ("remaining", int())])), ("version", int())]),
        "SigningKey": open_obj(&[("kid", int()), ("alg", st()), ("public_key", st()), ("state", en(&["next", "active", "retiring", "retired"]))]),
        "AdminTokenInput": obj(&[("name", st_max(128)), ("scopes", arr(en(&["read", "write", "approve", "audit"]))), ("tenant_id", id("ten")), ("expires_at", time())], &["name", "scopes"]),
        "AdminToken": open_obj(&[("id", id("adm")), ("tenant_id", nullable(id("ten"))), ("name", st()), ("prefix", st()), ("scopes", arr(st()))]),
        "Bundle": open_obj(&[("agents", arr(json!({ "type": "object" }))), ("resources", arr(json!({ "type": "object" }))), ("policies", arr(json!({ "type": "object" }))), ("grants", arr(json!({ "type": "object" }))), ("budgets", arr(json!({ "type": "object" })))]),
        "Approval": open_obj(&[("id", id("apr")), ("agent_id", id("agt")), ("status", en(&["pending", "approved", "denied", "expired", "released"])), ("request", json!({})), ("expires_at", int())]),
        "DecisionInput": obj(&[("reason", st_max(1024))], &[]),
        "ApplyResult": open_obj(&[("dry_run", boolean()), ("summary", json!({ "type": "object" })), ("diff", arr(json!({ "type": "object" })))]),
    })
}

/// The whole document.
pub fn document() -> Value {
    let mut paths = Map::new();
    for o in operations() {
        let mut params: Vec<Value> = o
            .path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(path_param)
            .collect();
        if o.scope != "none"
            && !o.path.starts_with("/v1/tenants")
            && !o.path.starts_with("/v1/keys")
            && !o.path.starts_with("/v1/admin-tokens")
        {
            params.push(
                json!({ "name": "X-Caracal-Tenant", "in": "header", "required": false, "schema": id("ten"),
                "description": "With a platform token: the tenant to act in." }),
            );
        }
        if o.method == "patch" || o.path.ends_with("/activate") || (o.method == "post" && o.path.ends_with("/versions"))
        {
            params.push(
                json!({ "name": "If-Match", "in": "header", "required": false, "schema": st(),
                "description": "The ETag last read; 412 if the object changed since." }),
            );
        }
        if o.method == "post" && o.status == 201 {
            params.push(json!({ "name": "Idempotency-Key", "in": "header", "required": false, "schema": json!({ "type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]+$" }),
                "description": "A repeated create with the same key returns the first response." }));
        }
        if o.paged {
            params.push(json!({ "name": "cursor", "in": "query", "required": false, "schema": st() }));
            params.push(json!({ "name": "limit", "in": "query", "required": false, "schema": json!({ "type": "integer", "minimum": 1, "maximum": 200 }) }));
        }
        if o.path == "/v1/apply" {
            params.push(json!({ "name": "dry_run", "in": "query", "required": false, "schema": boolean() }));
        }
        if o.path == "/v1/approvals" {
            params.push(json!({ "name": "status", "in": "query", "required": false,
                "schema": en(&["pending", "approved", "denied", "expired", "released"]) }));
        }
        let mut operation = json!({
            "summary": o.summary,
            "operationId": format!("{}{}", o.method, o.path.replace(['/', '{', '}', '-', '.'], "_")),
            "parameters": params,
            "responses": {
                o.status.to_string(): { "description": "success", "content": { "application/json": { "schema": o.response } } },
                "default": { "description": "error", "content": { "application/json": { "schema": r("Error") } } },
            },
        });
        if o.scope != "none" {
            operation["security"] = json!([{ "adminToken": [] }]);
            operation["x-required-scope"] = json!(o.scope);
        }
        if let Some(req) = o.request {
            let mut content = json!({ "application/json": { "schema": req } });
            if o.path == "/v1/apply" {
                content["application/yaml"] = json!({ "schema": { "type": "string" } });
            }
            let required = !o.path.starts_with("/v1/approvals/");
            operation["requestBody"] = json!({ "required": required, "content": content });
        }
        let entry = paths.entry(o.path.to_string()).or_insert_with(|| json!({}));
        entry[o.method] = operation;
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Caracal control plane",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Tenants, agents, workload credentials, resources, policies, grants, budgets, keys and admin tokens.",
        },
        "servers": [{ "url": "/" }],
        "paths": paths,
        "components": {
            "securitySchemes": { "adminToken": { "type": "http", "scheme": "bearer", "description": "An admin token (cat_…)" } },
            "schemas": schemas(),
        },
    })
}

/// (METHOD, path) of every operation in the document.
pub fn documented_routes() -> Vec<(String, String)> {
    operations()
        .into_iter()
        .map(|o| (o.method.to_ascii_uppercase(), o.path.to_string()))
        .collect()
}
