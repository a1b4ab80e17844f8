//! The control API end to end, over real TCP, on both storage backends.

mod common;

use std::time::Duration;

use caracal_shared::bus::streams;
use caracal_shared::testing::eventually;
use common::{Control, POLICY, ca_pem, code};
use http::Method;
use serde_json::{Value, json};

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let c = super::common::Control::start(caracal_shared::testing::Backend::Sqlite).await.unwrap();
                super::$name(&c).await;
                c.stop().await;
            })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let Some(c) = super::common::Control::start(caracal_shared::testing::Backend::Postgres).await else { return };
                super::$name(&c).await;
                c.stop().await;
            })*
        }
    };
}

on_both_backends!(
    every_resource_round_trips_through_crud,
    optimistic_concurrency_with_etags,
    idempotent_creates,
    tenants_are_isolated_in_the_data_layer,
    tokens_are_scoped,
    policy_simulate_and_activate_reach_the_bus,
    bundles_apply_reapply_and_dry_run,
    bad_input_is_refused_with_the_field_at_fault,
    pagination_walks_every_page,
);

async fn create(c: &Control, t: &str, path: &str, body: Value) -> Value {
    let r = c.call(Method::POST, path, Some(t), Some(&body)).await;
    assert_eq!(r.status, 201, "POST {path}: {}", r.text());
    r.json_value()
}

async fn get(c: &Control, t: &str, path: &str) -> Value {
    let r = c.call(Method::GET, path, Some(t), None).await;
    assert_eq!(r.status, 200, "GET {path}: {}", r.text());
    r.json_value()
}

async fn every_resource_round_trips_through_crud(c: &Control) {
    let t = c.tenant("acme").await;
    assert_eq!(get(c, &t, &format!("/v1/tenants/{t}")).await["name"], "acme");

    // Agent.
    let a = create(
        c,
        &t,
        "/v1/agents",
        json!({"name": "researcher", "labels": {"team": "r"}}),
    )
    .await;
    let aid = a["id"].as_str().unwrap().to_string();
    let r = c
        .call(
            Method::PATCH,
            &format!("/v1/agents/{aid}"),
            Some(&t),
            Some(&json!({"description": "d"})),
        )
        .await;
    assert_eq!((r.status.as_u16(), r.json_value()["version"].as_i64()), (200, Some(2)));
    assert_eq!(get(c, &t, "/v1/agents").await["items"].as_array().unwrap().len(), 1);

    // API keys: issued once, listed without secret, rotated with overlap, revoked.
    let k = create(c, &t, &format!("/v1/agents/{aid}/api-keys"), json!({"name": "ci"})).await;
    let secret = k["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("cak_") && secret.len() >= 47);
    let kid = k["key"]["id"].as_str().unwrap().to_string();
    let listed = get(c, &t, &format!("/v1/agents/{aid}/api-keys")).await;
    assert!(!listed.to_string().contains(&secret[4..]), "secrets are never listed");
    assert!(
        listed.to_string().contains(&secret[..10]),
        "the prefix identifies the key"
    );
    let rot = create(
        c,
        &t,
        &format!("/v1/agents/{aid}/api-keys/{kid}/rotate"),
        json!({"overlap_secs": 60}),
    )
    .await;
    assert!(rot["old"]["expires_at"].as_i64().is_some());
    assert_ne!(rot["new"]["secret"], secret);
    let new_kid = rot["new"]["key"]["id"].as_str().unwrap().to_string();
    let r = c
        .call(
            Method::DELETE,
            &format!("/v1/agents/{aid}/api-keys/{new_kid}"),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(r.json_value()["revoked_at"].as_i64().is_some());
    // The keyed-hash lookup finds the old key by its secret and nothing for garbage.
    let pepper = c.rt.config.keys.pepper.clone().unwrap();
    let found = c.rt.store.api_key_by_secret(&pepper, &secret).await.unwrap().unwrap();
    assert_eq!(found.id.to_string(), kid);
    assert!(
        c.rt.store
            .api_key_by_secret(&pepper, "cak_nope")
            .await
            .unwrap()
            .is_none()
    );

    // JWT issuer and a JWT identity.
    let iss = create(
        c,
        &t,
        "/v1/jwt-issuers",
        json!({"name": "ci", "issuer": "https://ci.example", "audiences": ["caracal"], "jwks": {"keys": []}}),
    )
    .await;
    let iss_id = iss["id"].as_str().unwrap().to_string();
    let r = c
        .call(
            Method::PATCH,
            &format!("/v1/jwt-issuers/{iss_id}"),
            Some(&t),
            Some(&json!({"audiences": ["caracal", "x"]})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let ident = create(
        c,
        &t,
        &format!("/v1/agents/{aid}/identities"),
        json!({"kind": "jwt", "issuer_id": iss_id, "subject": "repo:acme/app"}),
    )
    .await;
    let r = c
        .call(
            Method::POST,
            &format!("/v1/agents/{aid}/identities"),
            Some(&t),
            Some(&json!({"kind": "jwt", "issuer_id": iss_id, "subject": "repo:acme/app"})),
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), code(&r).as_str()),
        (409, "conflict"),
        "one subject, one agent"
    );

    // mTLS CA and an mTLS identity.
    let ca = create(c, &t, "/v1/mtls-cas", json!({"name": "corp", "ca_pem": ca_pem()})).await;
    let ca_id = ca["id"].as_str().unwrap().to_string();
    assert_eq!(ca["fingerprint"].as_str().unwrap().len(), 64);
    create(
        c,
        &t,
        &format!("/v1/agents/{aid}/identities"),
        json!({"kind": "mtls", "ca_id": ca_id, "match": "san_uri", "subject": "spiffe://acme/agent"}),
    )
    .await;
    assert_eq!(
        get(c, &t, &format!("/v1/agents/{aid}/identities")).await["items"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let r = c
        .call(
            Method::DELETE,
            &format!("/v1/agents/{aid}/identities/{}", ident["id"].as_str().unwrap()),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(r.status, 200);

    // Resource with a sealed, write-only credential.
    let res = create(
        c,
        &t,
        "/v1/resources",
        json!({
            "name": "openai", "base_url": "https://api.openai.com", "inject": {"kind": "bearer"},
            "credential": {"value": "sk-very-secret-upstream"}, "settings": {"models": ["gpt-4o*"]}
        }),
    )
    .await;
    let rid = res["id"].as_str().unwrap().to_string();
    assert_eq!(res["has_credential"], true);
    assert!(!res.to_string().contains("sk-very-secret"));
    let fetched = get(c, &t, &format!("/v1/resources/{rid}")).await;
    assert!(!fetched.to_string().contains("sk-very-secret"));
    let r = c
        .call(
            Method::PUT,
            &format!("/v1/resources/{rid}/credential"),
            Some(&t),
            Some(&json!({"value": "sk-rotated"})),
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), r.json_value()["credential_version"].as_i64()),
        (200, Some(2))
    );
    // Only the holder of the seal key can open it, and it opens only for its own row.
    let seal = c.rt.config.keys.seal.clone().unwrap();
    let res_obj: caracal_shared::store::resources::Resource =
        c.rt.store
            .get(caracal_shared::ids::TenantId::parse(&t).unwrap(), &rid)
            .await
            .unwrap();
    assert_eq!(
        c.rt.store
            .resource_credential(&seal, &res_obj)
            .await
            .unwrap()
            .unwrap()
            .expose(),
        b"sk-rotated"
    );

    // Policy, versions, activation.
    let p = create(
        c,
        &t,
        "/v1/policies",
        json!({"name": "openai-chat", "document": POLICY}),
    )
    .await;
    let pid = p["policy"]["id"].as_str().unwrap().to_string();
    assert_eq!(p["policy"]["active_version"], Value::Null);
    let v2 = create(
        c,
        &t,
        &format!("/v1/policies/{pid}/versions"),
        json!({"document": POLICY.replace("gpt-4o*", "gpt-4o-mini")}),
    )
    .await;
    assert_eq!(v2["version"]["version"], 2);
    assert_eq!(
        get(c, &t, &format!("/v1/policies/{pid}/versions")).await["items"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let r = c
        .call(
            Method::POST,
            &format!("/v1/policies/{pid}/versions/1/activate"),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(
        (r.status.as_u16(), r.json_value()["active_version"].as_i64()),
        (200, Some(1))
    );
    assert_eq!(get(c, &t, &format!("/v1/policies/{pid}")).await["active"]["version"], 1);
    assert!(
        get(c, &t, &format!("/v1/policies/{pid}/versions/2")).await["source"]
            .as_str()
            .unwrap()
            .contains("gpt-4o-mini")
    );

    // Grant and budget.
    let g = create(
        c,
        &t,
        "/v1/grants",
        json!({"agent_id": aid, "resource_id": rid, "policy_id": pid, "scopes": ["chat"], "max_lifetime_secs": 300}),
    )
    .await;
    let gid = g["id"].as_str().unwrap().to_string();
    let r = c
        .call(
            Method::PATCH,
            &format!("/v1/grants/{gid}"),
            Some(&t),
            Some(&json!({"scopes": ["chat", "read"]})),
        )
        .await;
    assert_eq!(r.json_value()["scopes"], json!(["chat", "read"]));
    let b = create(c, &t, "/v1/budgets", json!({"name": "monthly", "scope": {"kind": "agent", "id": aid}, "unit": "micros", "limit": 5000000, "window": {"kind": "monthly", "tz": "Europe/Paris"}})).await;
    let bid = b["id"].as_str().unwrap().to_string();
    let bv = get(c, &t, &format!("/v1/budgets/{bid}")).await;
    assert_eq!(bv["usage"]["remaining"], 5000000);
    assert!(
        bv["usage"]["window_start"]
            .as_str()
            .unwrap()
            .ends_with(":00:00.000000Z")
    );
    let r = c
        .call(
            Method::PATCH,
            &format!("/v1/budgets/{bid}"),
            Some(&t),
            Some(&json!({"limit": 1})),
        )
        .await;
    assert_eq!(r.json_value()["limit"], 1);

    // A policy in use cannot be deleted.
    let r = c
        .call(Method::DELETE, &format!("/v1/policies/{pid}"), Some(&t), None)
        .await;
    assert_eq!((r.status.as_u16(), code(&r).as_str()), (409, "conflict"));

    // Signing keys: inventory and rotation (platform).
    caracal_shared::keys::ensure(&c.rt.store, &seal).await.unwrap();
    let keys = get(c, &t, "/v1/keys").await;
    assert_eq!(keys["items"].as_array().unwrap().len(), 2);
    let r = c.call(Method::POST, "/v1/keys/rotate", None, None).await;
    let states: Vec<String> = r.json_value()["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["state"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(states, vec!["retiring", "active", "next"]);
    assert!(!r.text().contains("priv"), "private keys never leave the server");

    // Admin tokens.
    let tok = c
        .call(
            Method::POST,
            "/v1/admin-tokens",
            None,
            Some(&json!({"name": "reader", "scopes": ["read"], "tenant_id": t})),
        )
        .await;
    assert_eq!(tok.status, 201);
    let tok_id = tok.json_value()["token"]["id"].as_str().unwrap().to_string();
    assert!(
        c.call(Method::GET, "/v1/admin-tokens", None, None)
            .await
            .text()
            .contains(&tok_id)
    );
    assert_eq!(
        c.call(Method::DELETE, &format!("/v1/admin-tokens/{tok_id}"), None, None)
            .await
            .status,
        200
    );

    // Deletes.
    for path in [
        format!("/v1/grants/{gid}"),
        format!("/v1/budgets/{bid}"),
        format!("/v1/policies/{pid}"),
        format!("/v1/resources/{rid}"),
        format!("/v1/mtls-cas/{ca_id}"),
        format!("/v1/jwt-issuers/{iss_id}"),
        format!("/v1/agents/{aid}"),
    ] {
        let r = c.call(Method::DELETE, &path, Some(&t), None).await;
        assert_eq!(r.status, 200, "DELETE {path}: {}", r.text());
        let r = c.call(Method::GET, &path, Some(&t), None).await;
        assert_eq!((r.status.as_u16(), code(&r).as_str()), (404, "not_found"), "{path}");
    }
    assert_eq!(
        c.call(Method::DELETE, &format!("/v1/tenants/{t}"), None, None)
            .await
            .status,
        200
    );
}

async fn optimistic_concurrency_with_etags(c: &Control) {
    let t = c.tenant("etags").await;
    let r = c
        .call(Method::POST, "/v1/agents", Some(&t), Some(&json!({"name": "a"})))
        .await;
    assert_eq!(r.headers["etag"], "\"1\"");
    let id = r.json_value()["id"].as_str().unwrap().to_string();
    let auth = format!("Bearer {}", c.token);
    let patch = |etag: &'static str| {
        let auth = auth.clone();
        let id = id.clone();
        let t = t.clone();
        async move {
            c.raw(
                Method::PATCH,
                &format!("/v1/agents/{id}"),
                &[("authorization", &auth), ("x-caracal-tenant", &t), ("if-match", etag)],
                Some(&json!({"description": etag})),
            )
            .await
        }
    };
    let ok = patch("\"1\"").await;
    assert_eq!(
        (ok.status.as_u16(), ok.headers["etag"].to_str().unwrap()),
        (200, "\"2\"")
    );
    let stale = patch("\"1\"").await;
    assert_eq!(
        (stale.status.as_u16(), code(&stale).as_str()),
        (412, "precondition_failed")
    );
    assert_eq!(stale.json_value()["error"]["details"]["current_version"], 2);
    let bad = patch("nonsense").await;
    assert_eq!(bad.status, 400);
    assert_eq!(
        c.call(Method::GET, &format!("/v1/agents/{id}"), Some(&t), None)
            .await
            .headers["etag"],
        "\"2\""
    );
}

async fn idempotent_creates(c: &Control) {
    let t = c.tenant("idem").await;
    let auth = format!("Bearer {}", c.token);
    let post = |key: &'static str, name: &'static str| {
        let auth = auth.clone();
        let t = t.clone();
        async move {
            c.raw(
                Method::POST,
                "/v1/agents",
                &[
                    ("authorization", &auth),
                    ("x-caracal-tenant", &t),
                    ("idempotency-key", key),
                ],
                Some(&json!({"name": name})),
            )
            .await
        }
    };
    let first = post("k-1", "alpha").await;
    assert_eq!(first.status, 201);
    let again = post("k-1", "alpha").await;
    assert_eq!(again.status, 201);
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(
        again.json_value()["id"],
        first.json_value()["id"],
        "the first result, not a second agent"
    );
    let other = post("k-1", "beta").await;
    assert_eq!((other.status.as_u16(), code(&other).as_str()), (409, "conflict"));
    let list = c.call(Method::GET, "/v1/agents", Some(&t), None).await.json_value();
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
}

async fn tenants_are_isolated_in_the_data_layer(c: &Control) {
    let a = c.tenant("alpha").await;
    let b = c.tenant("beta").await;
    let agent_b = c
        .call(Method::POST, "/v1/agents", Some(&b), Some(&json!({"name": "bob"})))
        .await
        .json_value();
    let bid = agent_b["id"].as_str().unwrap();
    // Tenant A's own token.
    let tok = c
        .call(
            Method::POST,
            "/v1/admin-tokens",
            None,
            Some(&json!({"name": "a-admin", "scopes": ["read", "write"], "tenant_id": a})),
        )
        .await;
    let a_secret = tok.json_value()["secret"].as_str().unwrap().to_string();
    let r = c
        .call_as(&a_secret, Method::GET, &format!("/v1/agents/{bid}"), None, None)
        .await;
    assert_eq!(
        (r.status.as_u16(), code(&r).as_str()),
        (404, "not_found"),
        "another tenant's agent does not exist for A"
    );
    let nonexistent = caracal_shared::ids::AgentId::new();
    let r2 = c
        .call_as(&a_secret, Method::GET, &format!("/v1/agents/{nonexistent}"), None, None)
        .await;
    assert_eq!(
        r.json_value()["error"]["message"],
        r2.json_value()["error"]["message"],
        "same answer as a missing id"
    );
    let r = c
        .call_as(&a_secret, Method::DELETE, &format!("/v1/agents/{bid}"), None, None)
        .await;
    assert_eq!(r.status, 404);
    let r = c.call_as(&a_secret, Method::GET, "/v1/agents", Some(&b), None).await;
    assert_eq!(r.status, 404, "a tenant token cannot switch tenants by header");
    let r = c
        .call_as(&a_secret, Method::GET, &format!("/v1/tenants/{b}"), None, None)
        .await;
    assert_eq!(r.status, 404);
    // A grant cannot reference another tenant's objects.
    let pol = c
        .call_as(
            &a_secret,
            Method::POST,
            "/v1/policies",
            None,
            Some(&json!({"name": "p", "document": POLICY})),
        )
        .await
        .json_value();
    let res = c
        .call_as(
            &a_secret,
            Method::POST,
            "/v1/resources",
            None,
            Some(&json!({"name": "r", "base_url": "https://x.example"})),
        )
        .await
        .json_value();
    let r = c
        .call_as(
            &a_secret,
            Method::POST,
            "/v1/grants",
            None,
            Some(&json!({"agent_id": bid, "resource_id": res["id"], "policy_id": pol["policy"]["id"]})),
        )
        .await;
    assert_eq!(r.status, 404);
    // The platform token sees B's agent only when acting in B.
    assert_eq!(
        c.call(Method::GET, &format!("/v1/agents/{bid}"), Some(&b), None)
            .await
            .status,
        200
    );
    assert_eq!(
        c.call(Method::GET, &format!("/v1/agents/{bid}"), Some(&a), None)
            .await
            .status,
        404
    );
    let r = c.call(Method::GET, "/v1/agents", None, None).await;
    assert_eq!(r.status, 400, "platform tokens must name a tenant");
}

async fn tokens_are_scoped(c: &Control) {
    let t = c.tenant("scoped").await;
    let r = c.raw(Method::GET, "/v1/agents", &[], None).await;
    assert_eq!((r.status.as_u16(), code(&r).as_str()), (401, "unauthenticated"));
    let r = c
        .raw(
            Method::GET,
            "/v1/agents",
            &[("authorization", "Bearer cat_forged")],
            None,
        )
        .await;
    assert_eq!(r.status, 401);
    let tok = c
        .call(
            Method::POST,
            "/v1/admin-tokens",
            None,
            Some(&json!({"name": "ro", "scopes": ["read"], "tenant_id": t})),
        )
        .await;
    let ro = tok.json_value()["secret"].as_str().unwrap().to_string();
    assert_eq!(c.call_as(&ro, Method::GET, "/v1/agents", None, None).await.status, 200);
    let r = c
        .call_as(&ro, Method::POST, "/v1/agents", None, Some(&json!({"name": "x"})))
        .await;
    assert_eq!((r.status.as_u16(), code(&r).as_str()), (403, "forbidden"));
    // A read-only token cannot mint a more powerful one.
    let r = c
        .call_as(
            &ro,
            Method::POST,
            "/v1/admin-tokens",
            None,
            Some(&json!({"name": "w", "scopes": ["write"]})),
        )
        .await;
    assert_eq!(r.status, 403);
    // The last platform token cannot be revoked (no lock-out).
    let platform: Vec<Value> = c.call(Method::GET, "/v1/admin-tokens", None, None).await.json_value()["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["tenant_id"].is_null() && x["revoked_at"].is_null())
        .cloned()
        .collect();
    assert_eq!(platform.len(), 1);
    let r = c
        .call(
            Method::DELETE,
            &format!("/v1/admin-tokens/{}", platform[0]["id"].as_str().unwrap()),
            None,
            None,
        )
        .await;
    assert_eq!((r.status.as_u16(), code(&r).as_str()), (409, "conflict"));
    // A revoked token stops working at once.
    let id = tok.json_value()["token"]["id"].as_str().unwrap().to_string();
    c.call(Method::DELETE, &format!("/v1/admin-tokens/{id}"), None, None)
        .await;
    assert_eq!(c.call_as(&ro, Method::GET, "/v1/agents", None, None).await.status, 401);
}

async fn policy_simulate_and_activate_reach_the_bus(c: &Control) {
    let t = c.tenant("sim").await;
    let agent = create(c, &t, "/v1/agents", json!({"name": "a"})).await;
    let res = create(
        c,
        &t,
        "/v1/resources",
        json!({"name": "openai", "base_url": "https://api.openai.com"}),
    )
    .await;
    let p = create(
        c,
        &t,
        "/v1/policies",
        json!({"name": "p", "document": POLICY, "activate": true}),
    )
    .await;
    let pid = p["policy"]["id"].as_str().unwrap().to_string();
    let sim = |body: Value| {
        let pid = pid.clone();
        let t = t.clone();
        async move {
            c.call(
                Method::POST,
                &format!("/v1/policies/{pid}/simulate"),
                Some(&t),
                Some(&body),
            )
            .await
            .json_value()
        }
    };
    let base = json!({"agent_id": agent["id"], "resource_id": res["id"], "method": "POST", "url": "https://api.openai.com/v1/chat/completions", "model": "gpt-4o"});
    let s = sim(base.clone()).await;
    assert_eq!(
        (s["decision"].as_str(), s["reason"].as_str()),
        (Some("deny"), Some("no_grant"))
    );
    create(
        c,
        &t,
        "/v1/grants",
        json!({"agent_id": agent["id"], "resource_id": res["id"], "policy_id": pid, "scopes": ["chat"]}),
    )
    .await;
    let s = sim(base.clone()).await;
    assert_eq!(
        (s["decision"].as_str(), s["rule"].as_str()),
        (Some("allow"), Some("chat")),
        "{s}"
    );
    let mut wrong_model = base.clone();
    wrong_model["model"] = json!("gpt-3.5");
    assert_eq!(sim(wrong_model).await["reason"], "no_rule_matched");
    let mut admin = base.clone();
    admin["url"] = json!("https://api.openai.com/v1/chat/%2e%2e/admin/users");
    let s = sim(admin).await;
    assert_eq!(
        (
            s["decision"].as_str(),
            s["rule"].as_str(),
            s["request"]["path"].as_str()
        ),
        (Some("deny"), Some("no-admin"), Some("/v1/admin/users"))
    );
    let mut read = base.clone();
    read["method"] = json!("GET");
    read["url"] = json!("https://api.openai.com/v1/models");
    assert_eq!(sim(read).await["decision"], "deny", "the read scope is not granted");
    let mut other_host = base.clone();
    other_host["url"] = json!("https://evil.example/v1/chat/completions");
    assert_eq!(sim(other_host).await["reason"], "host_not_in_resource");

    // Activation is an event on the control stream (via the outbox and the relay).
    let relay = c.rt.spawn_relay();
    let v2 = create(
        c,
        &t,
        &format!("/v1/policies/{pid}/versions"),
        json!({"document": POLICY, "activate": true}),
    )
    .await;
    assert_eq!(v2["policy"]["active_version"], 2);
    let bus = c.rt.bus.clone();
    let auth = c.rt.bus_auth.clone();
    let found = eventually(Duration::from_secs(10), || {
        let bus = bus.clone();
        let auth = auth.clone();
        async move {
            let entries = bus
                .read_after(streams::CONTROL, "0", 1000, Duration::from_millis(10))
                .await
                .unwrap_or_default();
            entries.iter().any(|e| {
                auth.verify(streams::CONTROL, &e.id, e.payload.as_deref(), 0)
                    .map(|ev| ev.kind == "policy.activated" && ev.body["active_version"] == 2)
                    .unwrap_or(false)
            })
        }
    })
    .await;
    assert!(found, "policy.activated reached the bus");
    relay.abort();
}

const BUNDLE: &str = r#"
agents:
  - name: researcher
    description: reads papers
resources:
  - name: openai
    base_url: https://api.openai.com
    inject: { kind: bearer }
    credential: { env: CARACAL_SECRET_BUNDLE_TEST }
policies:
  - name: chat
    document: |
      rules:
        - id: chat
          methods: [POST]
          paths: ["/v1/chat/completions"]
grants:
  - agent: researcher
    resource: openai
    policy: chat
    scopes: ["*"]
budgets:
  - name: researcher-monthly
    scope: { kind: agent, name: researcher }
    unit: micros
    limit: 1000000
    window: { kind: monthly }
"#;

async fn bundles_apply_reapply_and_dry_run(c: &Control) {
    // SAFETY: tests in this binary that read this variable only ever set the same value.
    unsafe { std::env::set_var("CARACAL_SECRET_BUNDLE_TEST", "sk-from-env") };
    let t = c.tenant("gitops").await;
    let apply = |body: &'static str, dry: bool| {
        let t = t.clone();
        let auth = format!("Bearer {}", c.token);
        async move {
            let path = if dry { "/v1/apply?dry_run=true" } else { "/v1/apply" };
            c.client
                .request(
                    Method::POST,
                    &format!("{}{path}", c.base),
                    &[
                        ("authorization", &auth),
                        ("x-caracal-tenant", &t),
                        ("content-type", "application/yaml"),
                    ],
                    body.into(),
                )
                .await
                .unwrap()
        }
    };
    let first = apply(BUNDLE, false).await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(
        first.json_value()["summary"],
        json!({"create": 5, "update": 0, "unchanged": 0})
    );
    let again = apply(BUNDLE, false).await;
    assert_eq!(
        again.json_value()["summary"],
        json!({"create": 0, "update": 0, "unchanged": 5}),
        "{}",
        again.text()
    );
    let changed: &'static str = Box::leak(
        BUNDLE
            .replace("limit: 1000000", "limit: 2000000")
            .replace("reads papers", "writes papers")
            .into_boxed_str(),
    );
    let dry = apply(changed, true).await;
    let diff = dry.json_value();
    assert_eq!(diff["summary"], json!({"create": 0, "update": 2, "unchanged": 3}));
    assert!(diff["diff"].to_string().contains("\"limit\""));
    let budgets = c.call(Method::GET, "/v1/budgets", Some(&t), None).await.json_value();
    assert_eq!(budgets["items"][0]["limit"], 1000000, "dry run wrote nothing");
    assert_eq!(apply(changed, false).await.json_value()["summary"]["update"], 2);
    assert_eq!(
        c.call(Method::GET, "/v1/budgets", Some(&t), None).await.json_value()["items"][0]["limit"],
        2000000
    );
    // Literal secrets and references to server variables are refused.
    let literal = apply(
        "resources:\n  - name: x\n    base_url: https://x.example\n    credential: { value: sk-literal }\n",
        false,
    )
    .await;
    assert_eq!(literal.status, 400);
    let sneaky = apply(
        "resources:\n  - name: x\n    base_url: https://x.example\n    credential: { env: DATABASE_URL }\n",
        false,
    )
    .await;
    assert_eq!(sneaky.status, 400);
    assert!(sneaky.text().contains("CARACAL_SECRET_"));
    let traversal = apply(
        "resources:\n  - name: x\n    base_url: https://x.example\n    credential: { file: ../../etc/passwd }\n",
        false,
    )
    .await;
    assert_eq!(traversal.status, 400);
    // An invalid policy in a bundle names the policy and writes nothing.
    let bad = apply(
        "agents:\n  - name: ghost\npolicies:\n  - name: broken\n    document: \"rules: [{id: X Y}]\"\n",
        false,
    )
    .await;
    assert_eq!(bad.status, 400);
    assert!(bad.text().contains("broken"));
    assert_eq!(
        c.call(Method::GET, "/v1/agents", Some(&t), None).await.json_value()["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

async fn bad_input_is_refused_with_the_field_at_fault(c: &Control) {
    let t = c.tenant("badinput").await;
    let r = c
        .call(
            Method::POST,
            "/v1/agents",
            Some(&t),
            Some(&json!({"name": "a", "colour": "red"})),
        )
        .await;
    assert_eq!((r.status.as_u16(), code(&r).as_str()), (400, "validation_failed"));
    assert!(r.text().contains("colour"));
    let r = c
        .call(
            Method::POST,
            "/v1/agents",
            Some(&t),
            Some(&json!({"name": "Not A Slug"})),
        )
        .await;
    assert_eq!(code(&r), "validation_failed");
    let r = c
        .call(
            Method::POST,
            "/v1/policies",
            Some(&t),
            Some(&json!({"name": "p", "document": "rules:\n  - id: ok\n    methods: [GTE]\n    paths: [nope]\n"})),
        )
        .await;
    assert_eq!(r.status, 400);
    let problems = r.json_value()["error"]["details"]["problems"].clone();
    let paths: Vec<&str> = problems
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, vec!["rules[0].methods[0]", "rules[0].paths[0]"]);
    let r = c
        .call(
            Method::POST,
            "/v1/policies",
            Some(&t),
            Some(&json!({"name": "p", "document": "rules:\n  - id: ok\n    pathz: [\"/x\"]\n"})),
        )
        .await;
    assert_eq!(r.json_value()["error"]["details"]["problems"][0]["line"], 3);
    let v = c
        .call(
            Method::POST,
            "/v1/policies/validate",
            Some(&t),
            Some(&json!({"document": {"rules": [{"id": "x", "paths": ["/a/*"]}]}})),
        )
        .await;
    assert_eq!(v.json_value()["valid"], true);
    let big = json!({"name": "p", "document": "x".repeat(2 * 1024 * 1024)});
    let r = c.call(Method::POST, "/v1/policies", Some(&t), Some(&big)).await;
    assert_eq!((r.status.as_u16(), code(&r).as_str()), (413, "payload_too_large"));
    let r = c.call(Method::GET, "/v1/agents/agt_zzz", Some(&t), None).await;
    assert_eq!(r.status, 404);
    let r = c
        .call(
            Method::POST,
            "/v1/resources",
            Some(&t),
            Some(&json!({"name": "r", "base_url": "ftp://x"})),
        )
        .await;
    assert_eq!(code(&r), "validation_failed");
    let r = c
        .call(
            Method::POST,
            "/v1/budgets",
            Some(&t),
            Some(&json!({"name": "b", "unit": "micros", "limit": 5, "window": {"kind": "daily", "tz": "Mars/Base"}})),
        )
        .await;
    assert_eq!(code(&r), "validation_failed");
}

async fn pagination_walks_every_page(c: &Control) {
    let t = c.tenant("pages").await;
    let mut want = Vec::new();
    for i in 0..5 {
        want.push(create(c, &t, "/v1/agents", json!({"name": format!("a{i}")})).await["id"].clone());
    }
    let mut got = Vec::new();
    let mut path = "/v1/agents?limit=2".to_string();
    loop {
        let page = get(c, &t, &path).await;
        got.extend(page["items"].as_array().unwrap().iter().map(|a| a["id"].clone()));
        match page["next_cursor"].as_str() {
            Some(cur) => path = format!("/v1/agents?limit=2&cursor={cur}"),
            None => break,
        }
    }
    assert_eq!(got, want);
    let r = c.call(Method::GET, "/v1/agents?limit=0", Some(&t), None).await;
    assert_eq!(r.status, 400);
}
