//! RFC 8693 token exchange end to end, on both backends.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use caracal_shared::http::client::HttpClient;
use caracal_shared::mandate::{Request, VerifiedMandate};
use caracal_shared::policy::Facts;
use caracal_shared::testing::Backend;
use common::*;
use http::Method;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair};
use serde_json::{Value, json};

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite { $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(caracal_shared::testing::Backend::Sqlite).await; })* }
        mod postgres { $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(caracal_shared::testing::Backend::Postgres).await; })* }
    };
}

on_both_backends!(
    api_key_exchange_issues_a_verifiable_mandate,
    scopes_targets_and_grants_are_enforced,
    bad_inputs_get_rfc6749_errors_and_audit_events,
    jwt_subjects_with_inline_and_fetched_keys,
    mtls_subjects_on_the_tls_listener,
    delegation_only_narrows_and_is_recorded,
    approvals_release_exactly_one_mandate,
    key_rotation_under_load_never_breaks_a_valid_mandate,
    failed_auth_is_limited_per_source_and_client,
    delegation_limits_come_from_the_policy,
);

fn verify(env_keys: &HashMap<u32, biscuit_auth::PublicKey>, token: &str) -> VerifiedMandate {
    VerifiedMandate::verify(token, env_keys, caracal_shared::time::now_secs()).expect("mandate verifies")
}

async fn setup(env: &Env) -> (String, String, String, String) {
    let res = env.resource("openai", "https://api.openai.com").await;
    let pol = env.policy("chat", POLICY).await;
    let (agent, key) = env.agent_with_key("researcher", &res, &pol, &["chat", "read"]).await;
    (res, pol, agent, key)
}

async fn api_key_exchange_issues_a_verifiable_mandate(b: Backend) {
    let Some(env) = start(b, |_| {}).await else { return };
    let (res, pol, agent, key) = setup(&env).await;
    let r = env.exchange_key(&key, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.headers["cache-control"], "no-store");
    let body = r.json_value();
    assert_eq!(body["issued_token_type"], MANDATE);
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["scope"], "chat read");
    let expires_in = body["expires_in"].as_i64().unwrap();
    assert!((290..=300).contains(&expires_in), "default lifetime 300s: {expires_in}");
    let token = body["access_token"].as_str().unwrap();
    assert!(token.starts_with("cm1_"));
    assert!(
        !token.contains(&key[4..]),
        "the mandate never carries the workload credential"
    );
    let v = verify(&env.keyset().await, token);
    assert_eq!(v.claims.agent.to_string(), agent);
    assert_eq!(v.claims.tenant.to_string(), env.tenant);
    assert_eq!(v.claims.resources[0].id.to_string(), res);
    assert_eq!(v.claims.resources[0].policy.to_string(), pol);
    assert_eq!(v.claims.resources[0].policy_version, 1);
    assert!(v.claims.credential.as_deref().unwrap().starts_with("cred_"));
    let rid = v.claims.resources[0].id;
    let ask = |m: &'static str, p: &'static str, model: &'static str| {
        v.authorize(
            &Request {
                resource: rid,
                facts: Facts {
                    method: m,
                    host: "api.openai.com",
                    path: p,
                    model,
                    tool: "",
                },
            },
            caracal_shared::time::now_secs(),
        )
        .unwrap()
        .allow
    };
    assert!(ask("POST", "/v1/chat/completions", "gpt-4o"));
    assert!(ask("GET", "/v1/models", ""));
    assert!(!ask("GET", "/v1/admin/keys", ""));
    assert!(!ask("DELETE", "/v1/files/x", ""));
    // A narrower request: one scope, a shorter lifetime.
    let r = env
        .exchange_key(&key, &[("scope", "read"), ("lifetime", "60"), ("resource", "openai")])
        .await;
    let body = r.json_value();
    assert_eq!(body["scope"], "read");
    assert!(body["expires_in"].as_i64().unwrap() <= 60);
    let v = verify(&env.keyset().await, body["access_token"].as_str().unwrap());
    assert!(
        !v.authorize(
            &Request {
                resource: rid,
                facts: Facts {
                    method: "POST",
                    host: "api.openai.com",
                    path: "/v1/chat/completions",
                    model: "gpt-4o",
                    tool: ""
                }
            },
            caracal_shared::time::now_secs()
        )
        .unwrap()
        .allow
    );
    // A lifetime above the grant's maximum is capped.
    let r = env.exchange_key(&key, &[("lifetime", "86400")]).await;
    assert!(r.json_value()["expires_in"].as_i64().unwrap() <= 600);
    // Public keys are published with their ids; private keys never are.
    let keys = env
        .client
        .get(&format!("{}/.well-known/caracal-keys", env.sts))
        .await
        .unwrap();
    assert!(keys.text().contains("ed25519/"));
    assert!(!keys.text().contains("priv"));
    // The mint is in the audit stream.
    assert!(
        caracal_shared::testing::eventually(Duration::from_secs(10), || async {
            env.audit_events()
                .await
                .iter()
                .filter(|e| e.body["type"] == "mint")
                .count()
                >= 3
        })
        .await
    );
    env.stop().await;
}

async fn scopes_targets_and_grants_are_enforced(b: Backend) {
    let Some(env) = start(b, |_| {}).await else { return };
    let (_res, pol, agent, key) = setup(&env).await;
    let r = env.exchange_key(&key, &[("scope", "chat admin")]).await;
    assert_eq!((r.status.as_u16(), err(&r).as_str()), (400, "invalid_scope"));
    let r = env.exchange_key(&key, &[("resource", "github")]).await;
    assert_eq!((r.status.as_u16(), err(&r).as_str()), (400, "invalid_target"));
    let other = env.resource("github", "https://api.github.com").await;
    let r = env.exchange_key(&key, &[("resource", &other)]).await;
    assert_eq!(err(&r), "invalid_target", "no grant on that resource");
    let r = env
        .exchange_key(&key, &[("resource", "https://api.openai.com/v1/chat")])
        .await;
    assert_eq!(r.status, 200, "a resource URL resolves by host: {}", r.text());
    // An agent without grants gets no mandate.
    let a = env
        .api(Method::POST, "/v1/agents", Some(json!({"name": "nobody"})))
        .await;
    let k = env
        .api(
            Method::POST,
            &format!("/v1/agents/{}/api-keys", a["id"].as_str().unwrap()),
            Some(json!({})),
        )
        .await;
    let r = env.exchange_key(k["secret"].as_str().unwrap(), &[]).await;
    assert_eq!(err(&r), "unauthorized_client");
    // A policy that allows nothing for the agent gives no mandate.
    let deny_all = env
        .policy("deny-all", "rules:\n  - id: nothing\n    effect: deny\n")
        .await;
    let r3 = env.resource("r3", "https://r3.example").await;
    let (_, k3) = env.agent_with_key("denied", &r3, &deny_all, &["*"]).await;
    assert_eq!(err(&env.exchange_key(&k3, &[]).await), "unauthorized_client");
    // A disabled agent gets nothing, at once (the control event invalidates the cache).
    env.api(
        Method::PATCH,
        &format!("/v1/agents/{agent}"),
        Some(json!({"disabled": true})),
    )
    .await;
    assert!(
        caracal_shared::testing::eventually(Duration::from_secs(10), || async {
            err(&env.exchange_key(&key, &[]).await) == "unauthorized_client"
        })
        .await
    );
    // Policy activation is picked up without restart: a new version narrows the next mandates.
    env.api(
        Method::PATCH,
        &format!("/v1/agents/{agent}"),
        Some(json!({"disabled": false})),
    )
    .await;
    env.api(Method::POST, &format!("/v1/policies/{pol}/versions"), Some(json!({"document": POLICY.replace("scopes: [read]", "scopes: [read]\n    approval: false\n    hosts: [\"nowhere.example\"]"), "activate": true}))).await;
    assert!(
        caracal_shared::testing::eventually(Duration::from_secs(10), || async {
            let r = env.exchange_key(&key, &[]).await;
            if r.status != 200 {
                return false;
            }
            let v = verify(&env.keyset().await, r.json_value()["access_token"].as_str().unwrap());
            v.claims.resources[0].policy_version == 2
        })
        .await
    );
    env.stop().await;
}

async fn bad_inputs_get_rfc6749_errors_and_audit_events(b: Backend) {
    let Some(env) = start(b, |_| {}).await else { return };
    let (_, _, _, key) = setup(&env).await;
    let url = format!("{}/oauth/token", env.sts);
    let raw = |ct: &'static str, body: String| {
        let c = env.client.clone();
        let url = url.clone();
        async move {
            c.request(Method::POST, &url, &[("content-type", ct)], body.into())
                .await
                .unwrap()
        }
    };
    let cases: Vec<(caracal_shared::http::client::ClientResponse, u16, &str)> = vec![
        (raw("application/json", "{}".into()).await, 400, "invalid_request"),
        (
            raw("application/x-www-form-urlencoded", "grant_type=x&grant_type=y".into()).await,
            400,
            "invalid_request",
        ),
        (
            env.token(&[("grant_type", "password")]).await,
            400,
            "unsupported_grant_type",
        ),
        (env.token(&[("grant_type", EXCHANGE)]).await, 400, "invalid_request"),
        (
            // A forged service signature (a client pretending to be the gateway attesting a
            // certificate): refused.
            env.client
                .post_form(
                    &url,
                    &[
                        ("x-caracal-key-id", "internal-test"),
                        ("x-caracal-timestamp", &caracal_shared::time::now_secs().to_string()),
                        ("x-caracal-nonce", "AAAAAAAAAAAAAAAAAAAAAA"),
                        ("x-caracal-signature", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
                    ],
                    &[
                        ("grant_type", EXCHANGE),
                        ("subject_token_type", MTLS),
                        ("subject_token", "AAAA"),
                    ],
                )
                .await
                .unwrap(),
            401,
            "invalid_client",
        ),
        (
            env.token(&[
                ("grant_type", EXCHANGE),
                ("subject_token_type", "urn:x:unknown"),
                ("subject_token", "x"),
            ])
            .await,
            400,
            "invalid_request",
        ),
        (
            env.token(&[
                ("grant_type", EXCHANGE),
                ("subject_token_type", API_KEY),
                ("subject_token", "cak_notakey"),
            ])
            .await,
            401,
            "invalid_client",
        ),
        (
            env.exchange_key(
                &key,
                &[("requested_token_type", "urn:ietf:params:oauth:token-type:saml2")],
            )
            .await,
            400,
            "invalid_request",
        ),
        (
            env.exchange_key(&key, &[("lifetime", "-5")]).await,
            400,
            "invalid_request",
        ),
        (
            env.exchange_key(&key, &[("scope", "bad\"scope")]).await,
            400,
            "invalid_scope",
        ),
        (
            env.token(&[
                ("grant_type", EXCHANGE),
                ("subject_token_type", JWT),
                ("subject_token", &"a".repeat(20_000)),
            ])
            .await,
            400,
            "invalid_grant",
        ),
        (
            env.token(&[
                ("grant_type", EXCHANGE),
                ("subject_token_type", JWT),
                ("subject_token", "not.a.jwt"),
            ])
            .await,
            400,
            "invalid_grant",
        ),
        (
            env.token(&[
                ("grant_type", EXCHANGE),
                ("subject_token_type", MANDATE),
                ("subject_token", "cm1_forged"),
            ])
            .await,
            400,
            "invalid_grant",
        ),
        (
            raw(
                "application/x-www-form-urlencoded",
                format!(
                    "grant_type={EXCHANGE}&subject_token_type={API_KEY}&subject_token={}",
                    "x".repeat(70_000)
                ),
            )
            .await,
            400,
            "invalid_request",
        ),
        (
            env.exchange_key(&key, &[("actor_token", "x"), ("actor_token_type", API_KEY)])
                .await,
            400,
            "invalid_request",
        ),
    ];
    for (i, (r, status, error)) in cases.iter().enumerate() {
        assert_eq!(
            (r.status.as_u16(), err(r).as_str()),
            (*status, *error),
            "case {i}: {}",
            r.text()
        );
        assert!(r.json_value()["error_description"].is_string(), "case {i}");
    }
    assert!(cases[4].0.headers.contains_key("www-authenticate") && cases[6].0.headers.contains_key("www-authenticate"));
    // A valid mandate, truncated or with a flipped byte, is refused.
    let good = env.exchange_key(&key, &[]).await.json_value()["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    let truncated = &good[..good.len() - 20];
    let mut flipped = good.clone().into_bytes();
    let mid = flipped.len() / 2;
    flipped[mid] = if flipped[mid] == b'A' { b'B' } else { b'A' };
    for bad in [truncated.to_string(), String::from_utf8(flipped).unwrap()] {
        let r = env
            .token(&[
                ("grant_type", EXCHANGE),
                ("subject_token_type", MANDATE),
                ("subject_token", &bad),
            ])
            .await;
        assert_eq!(err(&r), "invalid_grant", "{}", r.text());
    }
    // Every refusal left an audit event.
    let n = cases.len() + 2;
    assert!(
        caracal_shared::testing::eventually(Duration::from_secs(10), || async {
            env.audit_events()
                .await
                .iter()
                .filter(|e| e.body["type"] == "mint_refused")
                .count()
                >= n
        })
        .await
    );
    env.stop().await;
}

/// A JWT signer for tests: ES256 and EdDSA keys with JWKs.
struct Issuer {
    ec: EcdsaKeyPair,
    ed: Ed25519KeyPair,
    iss: String,
}

impl Issuer {
    fn new(iss: &str) -> Issuer {
        let rng = SystemRandom::new();
        let ec = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            Ed25519KeyPair::generate_pkcs8(&rng)
                .map(|_| ())
                .ok()
                .map(|_| EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap())
                .unwrap()
                .as_ref(),
            &rng,
        )
        .unwrap();
        let ed = Ed25519KeyPair::from_pkcs8(Ed25519KeyPair::generate_pkcs8(&rng).unwrap().as_ref()).unwrap();
        Issuer {
            ec,
            ed,
            iss: iss.into(),
        }
    }

    fn jwks(&self, ec_kid: &str, ed_kid: &str) -> Value {
        let p = self.ec.public_key().as_ref();
        json!({"keys": [
            {"kty": "EC", "crv": "P-256", "kid": ec_kid, "x": URL_SAFE_NO_PAD.encode(&p[1..33]), "y": URL_SAFE_NO_PAD.encode(&p[33..65])},
            {"kty": "OKP", "crv": "Ed25519", "kid": ed_kid, "x": URL_SAFE_NO_PAD.encode(self.ed.public_key().as_ref())},
        ]})
    }

    fn sign(&self, alg: &str, kid: &str, claims: Value) -> String {
        let header = URL_SAFE_NO_PAD.encode(json!({"alg": alg, "kid": kid, "typ": "JWT"}).to_string());
        let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
        let input = format!("{header}.{payload}");
        let sig = match alg {
            "ES256" => self
                .ec
                .sign(&SystemRandom::new(), input.as_bytes())
                .unwrap()
                .as_ref()
                .to_vec(),
            "EdDSA" => self.ed.sign(input.as_bytes()).as_ref().to_vec(),
            _ => b"nosig".to_vec(),
        };
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
    }

    fn claims(&self, sub: &str, aud: &str, exp_in: i64) -> Value {
        let now = caracal_shared::time::now_secs();
        json!({"iss": self.iss, "sub": sub, "aud": aud, "exp": now + exp_in, "iat": now, "nbf": now - 1})
    }
}

async fn jwt_subjects_with_inline_and_fetched_keys(b: Backend) {
    let Some(env) = start(b, |_| {}).await else { return };
    let (res, pol, _, _) = setup(&env).await;
    let ci = Issuer::new("https://ci.example");
    let iss = env
        .api(
            Method::POST,
            "/v1/jwt-issuers",
            Some(json!({"name": "ci", "issuer": ci.iss, "audiences": ["caracal"], "jwks": ci.jwks("ec1", "ed1")})),
        )
        .await;
    let a = env
        .api(Method::POST, "/v1/agents", Some(json!({"name": "deployer"})))
        .await;
    let aid = a["id"].as_str().unwrap();
    env.api(
        Method::POST,
        &format!("/v1/agents/{aid}/identities"),
        Some(json!({"kind": "jwt", "issuer_id": iss["id"], "subject": "repo:acme/app"})),
    )
    .await;
    env.api(
        Method::POST,
        "/v1/grants",
        Some(json!({"agent_id": aid, "resource_id": res, "policy_id": pol, "scopes": ["*"]})),
    )
    .await;
    let ex = |t: String| {
        let env = &env;
        async move {
            env.token(&[
                ("grant_type", EXCHANGE),
                ("subject_token_type", JWT),
                ("subject_token", &t),
            ])
            .await
        }
    };
    for alg in [("ES256", "ec1"), ("EdDSA", "ed1")] {
        let r = ex(ci.sign(alg.0, alg.1, ci.claims("repo:acme/app", "caracal", 300))).await;
        assert_eq!(r.status, 200, "{alg:?}: {}", r.text());
        let v = verify(&env.keyset().await, r.json_value()["access_token"].as_str().unwrap());
        assert_eq!(v.claims.agent.to_string(), aid);
        assert!(v.claims.credential.as_deref().unwrap().starts_with("idn_"));
    }
    let now = caracal_shared::time::now_secs();
    let mut future = ci.claims("repo:acme/app", "caracal", 300);
    future["nbf"] = json!(now + 600);
    let mut no_exp = ci.claims("repo:acme/app", "caracal", 300);
    no_exp.as_object_mut().unwrap().remove("exp");
    let other = Issuer::new("https://ci.example");
    let refused = [
        (
            "expired",
            ci.sign("ES256", "ec1", ci.claims("repo:acme/app", "caracal", -600)),
        ),
        ("not yet valid", ci.sign("ES256", "ec1", future)),
        ("no exp", ci.sign("ES256", "ec1", no_exp)),
        (
            "wrong audience",
            ci.sign("ES256", "ec1", ci.claims("repo:acme/app", "someone-else", 300)),
        ),
        (
            "unbound subject",
            ci.sign("ES256", "ec1", ci.claims("repo:evil/app", "caracal", 300)),
        ),
        ("alg none", {
            let t = ci.sign("ES256", "ec1", ci.claims("repo:acme/app", "caracal", 300));
            let parts: Vec<&str> = t.split('.').collect();
            format!(
                "{}.{}.",
                URL_SAFE_NO_PAD.encode(json!({"alg": "none"}).to_string()),
                parts[1]
            )
        }),
        (
            "HS256",
            ci.sign("HS256", "ec1", ci.claims("repo:acme/app", "caracal", 300)),
        ),
        (
            "another issuer's key",
            other.sign("ES256", "ec1", other.claims("repo:acme/app", "caracal", 300)),
        ),
        (
            "untrusted issuer",
            Issuer::new("https://evil.example").sign(
                "ES256",
                "x",
                json!({"iss": "https://evil.example", "sub": "repo:acme/app", "aud": "caracal", "exp": now + 60}),
            ),
        ),
        (
            "alg/key mismatch",
            ci.sign("EdDSA", "ec1", ci.claims("repo:acme/app", "caracal", 300)),
        ),
    ];
    for (what, t) in refused {
        let r = ex(t).await;
        assert_eq!(
            (r.status.as_u16(), err(&r).as_str()),
            (400, "invalid_grant"),
            "{what}: {}",
            r.text()
        );
    }

    // Keys fetched from a JWKS URL, refreshed when a token names an unknown key id.
    let served: Arc<Mutex<Value>> = Arc::new(Mutex::new(ci.jwks("ec1", "ed1")));
    let jwks_url = serve_jwks(served.clone()).await;
    let rotating = Issuer::new("https://rotating.example");
    *served.lock().unwrap() = rotating.jwks("r1", "r1-ed");
    let iss2 = env
        .api(
            Method::POST,
            "/v1/jwt-issuers",
            Some(json!({"name": "rot", "issuer": rotating.iss, "audiences": ["caracal"], "jwks_url": jwks_url})),
        )
        .await;
    env.api(
        Method::POST,
        &format!("/v1/agents/{aid}/identities"),
        Some(json!({"kind": "jwt", "issuer_id": iss2["id"], "subject": "svc"})),
    )
    .await;
    let r = ex(rotating.sign("ES256", "r1", rotating.claims("svc", "caracal", 300))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let rotated = Issuer::new("https://rotating.example");
    *served.lock().unwrap() = rotated.jwks("r2", "r2-ed");
    let r = ex(rotated.sign("ES256", "r2", rotated.claims("svc", "caracal", 300))).await;
    assert_eq!(r.status, 200, "an unknown kid triggers a refresh: {}", r.text());
    env.stop().await;
}

async fn serve_jwks(doc: Arc<Mutex<Value>>) -> String {
    use caracal_shared::http::{ApiRequest, HttpServer, Router, ServerOptions, ok};
    struct St(Arc<Mutex<Value>>);
    let router = Router::new().get("/jwks", |s: Arc<St>, _r: ApiRequest| async move {
        ok(&s.0.lock().unwrap().clone())
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jwks", l.local_addr().unwrap());
    let srv = Arc::new(HttpServer::new(
        "jwks",
        router,
        Arc::new(St(doc)),
        Default::default(),
        prometheus::Registry::new(),
        ServerOptions::default(),
    ));
    tokio::spawn(srv.serve(l, caracal_shared::shutdown::Shutdown::new()));
    url
}

async fn mtls_subjects_on_the_tls_listener(b: Backend) {
    use caracal_shared::testing::pki::Ca;
    let server_ca = Ca::new("sts server ca");
    let server = server_ca.server(&["localhost"]);
    let dir = std::env::temp_dir().join(format!("caracal-sts-tls-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cert.pem"), &server.cert_pem).unwrap();
    std::fs::write(dir.join("key.pem"), &server.key_pem).unwrap();
    let port = caracal_shared::testing::free_port();
    let d2 = dir.clone();
    let Some(env) = start(b, move |c| {
        c.sts.tls_listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
        c.sts.tls_cert = Some(d2.join("cert.pem"));
        c.sts.tls_key = Some(d2.join("key.pem"));
    })
    .await
    else {
        return;
    };
    let (res, pol, _, key) = setup(&env).await;
    let client_ca = Ca::new("corp workloads");
    let ca = env
        .api(
            Method::POST,
            "/v1/mtls-cas",
            Some(json!({"name": "corp", "ca_pem": client_ca.pem()})),
        )
        .await;
    let a = env.api(Method::POST, "/v1/agents", Some(json!({"name": "svc"}))).await;
    let aid = a["id"].as_str().unwrap();
    env.api(
        Method::POST,
        &format!("/v1/agents/{aid}/identities"),
        Some(json!({"kind": "mtls", "ca_id": ca["id"], "match": "san_uri", "subject": "spiffe://corp/svc"})),
    )
    .await;
    env.api(
        Method::POST,
        "/v1/grants",
        Some(json!({"agent_id": aid, "resource_id": res, "policy_id": pol, "scopes": ["*"]})),
    )
    .await;
    let tls_url = format!("{}/oauth/token", env.sts_tls.as_ref().unwrap());
    let client_for = |leaf: Option<&caracal_shared::testing::pki::Leaf>| {
        let cfg = caracal_shared::http::client::tls_client_config(
            Some(server_ca.pem().as_bytes()),
            leaf.map(|l| l.identity()),
        )
        .unwrap();
        HttpClient::unrestricted().with_tls(cfg)
    };
    let good = client_ca.client("spiffe://corp/svc", "svc");
    let form = [("grant_type", EXCHANGE), ("subject_token_type", MTLS)];
    // The STS picks up the new CA within its refresh interval.
    let mut ok = None;
    for i in 0..100 {
        match client_for(Some(&good)).post_form(&tls_url, &[], &form).await {
            Ok(r) if r.status == 200 => {
                ok = Some(r);
                break;
            }
            other => {
                if i % 20 == 19 {
                    eprintln!("mTLS attempt {i}: {other:?}");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = ok.expect("mTLS exchange succeeds");
    let v = verify(&env.keyset().await, r.json_value()["access_token"].as_str().unwrap());
    assert_eq!(v.claims.agent.to_string(), aid);
    // A certificate whose name is bound to nobody.
    let stranger = client_ca.client("spiffe://corp/other", "other");
    let r = client_for(Some(&stranger))
        .post_form(&tls_url, &[], &form)
        .await
        .unwrap();
    assert_eq!((r.status.as_u16(), err(&r).as_str()), (401, "invalid_client"));
    // No certificate.
    let r = client_for(None).post_form(&tls_url, &[], &form).await.unwrap();
    assert_eq!(err(&r), "invalid_client");
    // A certificate from an untrusted CA fails the handshake.
    let rogue = Ca::new("rogue").client("spiffe://corp/svc", "svc");
    assert!(
        client_for(Some(&rogue))
            .post_form(&tls_url, &[], &form)
            .await
            .map(|r| r.status != 200)
            .unwrap_or(true)
    );
    // API keys work over the TLS listener too; mTLS does not work on the plain listener.
    let r = client_for(None)
        .post_form(
            &tls_url,
            &[],
            &[
                ("grant_type", EXCHANGE),
                ("subject_token_type", API_KEY),
                ("subject_token", &key),
            ],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(err(&env.token(&form).await), "invalid_client");
    env.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

async fn delegation_only_narrows_and_is_recorded(b: Backend) {
    let Some(env) = start(b, |_| {}).await else { return };
    let (res, pol, parent_agent, key) = setup(&env).await;
    let (child_agent, child_key) = env.agent_with_key("helper", &res, &pol, &["read"]).await;
    let parent = env.exchange_key(&key, &[]).await.json_value()["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    let keys = env.keyset().await;
    let pv = verify(&keys, &parent);
    let delegate = |extra: Vec<(&'static str, String)>| {
        let env = &env;
        let parent = parent.clone();
        async move {
            let mut f: Vec<(&str, String)> = vec![
                ("grant_type", EXCHANGE.into()),
                ("subject_token_type", MANDATE.into()),
                ("subject_token", parent),
            ];
            f.extend(extra);
            let f: Vec<(&str, &str)> = f.iter().map(|(k, v)| (*k, v.as_str())).collect();
            env.token(&f).await
        }
    };
    // To another agent, narrowed to one scope and to chat paths.
    let r = delegate(vec![
        ("actor_token", child_key.clone()),
        ("actor_token_type", API_KEY.into()),
        ("scope", "chat".into()),
        (
            "restrict",
            json!([{"paths": ["/v1/chat/**"], "models": ["gpt-4o-mini"]}]).to_string(),
        ),
        ("lifetime", "120".into()),
    ])
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let child_token = r.json_value()["access_token"].as_str().unwrap().to_string();
    let cv = verify(&keys, &child_token);
    assert_eq!(cv.claims.agent.to_string(), child_agent);
    assert_eq!(cv.claims.parent, Some(pv.claims.mandate_id));
    assert_eq!(cv.claims.depth, 1);
    assert!(
        pv.revocation_ids.iter().all(|id| cv.claims.ancestors.contains(id)),
        "the parent's revocation ids travel"
    );
    assert!(
        cv.claims.expires_at <= pv.claims.expires_at && cv.claims.expires_at <= caracal_shared::time::now_secs() + 120
    );
    let rid = cv.claims.resources[0].id;
    let now = caracal_shared::time::now_secs();
    let ask = |v: &VerifiedMandate, m: &'static str, p: &'static str, model: &'static str| {
        v.authorize(
            &Request {
                resource: rid,
                facts: Facts {
                    method: m,
                    host: "api.openai.com",
                    path: p,
                    model,
                    tool: "",
                },
            },
            now,
        )
        .unwrap()
        .allow
    };
    assert!(ask(&cv, "POST", "/v1/chat/completions", "gpt-4o-mini"));
    assert!(!ask(&cv, "POST", "/v1/chat/completions", "gpt-4o"), "restricted model");
    assert!(!ask(&cv, "GET", "/v1/models", ""), "the read scope was not delegated");
    assert!(ask(&pv, "GET", "/v1/models", ""), "the parent keeps its authority");
    // Re-delegating the child cannot widen: scopes and restrictions accumulate.
    let grand = env
        .token(&[
            ("grant_type", EXCHANGE),
            ("subject_token_type", MANDATE),
            ("subject_token", &child_token),
            ("scope", "read"),
        ])
        .await;
    assert_eq!(err(&grand), "invalid_scope");
    let grand = env
        .token(&[
            ("grant_type", EXCHANGE),
            ("subject_token_type", MANDATE),
            ("subject_token", &child_token),
        ])
        .await;
    let gv = verify(&keys, grand.json_value()["access_token"].as_str().unwrap());
    assert_eq!(gv.claims.depth, 2);
    assert!(!ask(&gv, "POST", "/v1/chat/completions", "gpt-4o"));
    assert!(cv.revocation_ids.iter().all(|id| gv.claims.ancestors.contains(id)));
    // Refusals.
    assert_eq!(err(&delegate(vec![("scope", "admin".into())]).await), "invalid_scope");
    assert_eq!(
        err(&delegate(vec![("resource", "github".into())]).await),
        "invalid_target"
    );
    assert_eq!(
        err(&delegate(vec![("restrict", json!([{"paths": ["no-slash"]}]).to_string())]).await),
        "invalid_request"
    );
    assert_eq!(
        err(&delegate(vec![
            ("actor_token", "cak_wrong".into()),
            ("actor_token_type", API_KEY.into())
        ])
        .await),
        "invalid_client"
    );
    // The edge is recorded.
    let edges = env
        .rt
        .store
        .delegations_from(pv.claims.tenant, pv.claims.mandate_id)
        .await
        .unwrap();
    assert_eq!(edges.len(), 1);
    assert_eq!(edges[0].child_mandate, cv.claims.mandate_id);
    assert_eq!(edges[0].parent_agent.to_string(), parent_agent);
    // A revoked parent delegates nothing.
    let mut tx = env.rt.store.begin().await.unwrap();
    tx.insert_revocation(&caracal_shared::store::authority::Revocation {
        tenant_id: pv.claims.tenant,
        kind: caracal_shared::store::authority::RevocationKind::RevocationId,
        value: pv.revocation_ids[0].clone(),
        reason: "test".into(),
        revoked_at: caracal_shared::time::now_secs(),
        expires_at: caracal_shared::time::now_micros() + 3_600_000_000,
    })
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let r = delegate(vec![]).await;
    assert_eq!(err(&r), "invalid_grant");
    assert!(r.text().contains("revoked"));
    env.stop().await;
}

async fn approvals_release_exactly_one_mandate(b: Backend) {
    let Some(env) = start(b, |c| c.sts.approval_ttl = Duration::from_secs(3)).await else {
        return;
    };
    let res = env.resource("bank", "https://bank.example").await;
    let pol = env.policy("payments", "rules:\n  - id: pay\n    scopes: [pay]\n    methods: [POST]\n    paths: [\"/v1/payments\"]\n    approval: true\n  - id: read\n    scopes: [read]\n    methods: [GET]\n").await;
    let (_, key) = env.agent_with_key("payer", &res, &pol, &["*"]).await;
    // Without the approval scope: immediate.
    assert_eq!(env.exchange_key(&key, &[("scope", "read")]).await.status, 200);
    let r = env.exchange_key(&key, &[("scope", "pay")]).await;
    assert_eq!(
        (r.status.as_u16(), err(&r).as_str()),
        (400, "authorization_pending"),
        "{}",
        r.text()
    );
    let approval = r.json_value()["approval_id"].as_str().unwrap().to_string();
    assert!(r.json_value()["interval"].as_u64().is_some());
    let poll = |k: String, id: String| {
        let env = &env;
        async move {
            env.token(&[
                ("grant_type", APPROVAL),
                ("approval_id", &id),
                ("subject_token_type", API_KEY),
                ("subject_token", &k),
            ])
            .await
        }
    };
    assert_eq!(err(&poll(key.clone(), approval.clone()).await), "authorization_pending");
    assert_eq!(err(&poll(key.clone(), approval.clone()).await), "slow_down");
    // Another credential cannot collect it.
    let (_, other) = env.agent_with_key("other", &res, &pol, &["*"]).await;
    assert_eq!(err(&poll(other.clone(), approval.clone()).await), "invalid_grant");
    // A read-only admin cannot decide; an approver can.
    let ro = env
        .api(
            Method::POST,
            "/v1/admin-tokens",
            Some(json!({"name": "ro", "scopes": ["read"], "tenant_id": env.tenant})),
        )
        .await;
    let r = env
        .client
        .request(
            Method::POST,
            &format!("{}/v1/approvals/{approval}/approve", env.control),
            &[("authorization", &format!("Bearer {}", ro["secret"].as_str().unwrap()))],
            Default::default(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 403);
    let pending = env.api(Method::GET, "/v1/approvals?status=pending", None).await;
    assert_eq!(pending["items"].as_array().unwrap().len(), 1);
    env.api(
        Method::POST,
        &format!("/v1/approvals/{approval}/approve"),
        Some(json!({"reason": "ok for this run"})),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(350)).await;
    let r = poll(key.clone(), approval.clone()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = verify(&env.keyset().await, r.json_value()["access_token"].as_str().unwrap());
    assert_eq!(v.claims.approval.map(|a| a.to_string()), Some(approval.clone()));
    assert_eq!(r.json_value()["scope"], "pay", "bound to exactly the approved request");
    // Exactly one mandate: replaying the poll is refused, deciding again is a conflict.
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(err(&poll(key.clone(), approval.clone()).await), "invalid_grant");
    let r = env
        .api_raw(Method::POST, &format!("/v1/approvals/{approval}/deny"), None)
        .await;
    assert_eq!(r.status, 409);
    // Denied.
    let id2 = env.exchange_key(&key, &[("scope", "pay")]).await.json_value()["approval_id"]
        .as_str()
        .unwrap()
        .to_string();
    env.api(
        Method::POST,
        &format!("/v1/approvals/{id2}/deny"),
        Some(json!({"reason": "not today"})),
    )
    .await;
    let r = poll(key.clone(), id2).await;
    assert_eq!(err(&r), "access_denied");
    assert!(r.text().contains("not today"));
    // Expired.
    let id3 = env.exchange_key(&key, &[("scope", "pay")]).await.json_value()["approval_id"]
        .as_str()
        .unwrap()
        .to_string();
    tokio::time::sleep(Duration::from_millis(3200)).await;
    assert_eq!(err(&poll(key.clone(), id3.clone()).await), "expired_token");
    assert_eq!(
        env.api_raw(Method::POST, &format!("/v1/approvals/{id3}/approve"), None)
            .await
            .status,
        409
    );
    env.stop().await;
}

async fn key_rotation_under_load_never_breaks_a_valid_mandate(b: Backend) {
    let Some(env) = start(b, |_| {}).await else { return };
    let (_, _, _, key) = setup(&env).await;
    let env = Arc::new(env);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut minters = Vec::new();
    for _ in 0..3 {
        let env = env.clone();
        let key = key.clone();
        let stop = stop.clone();
        minters.push(tokio::spawn(async move {
            let mut tokens = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let r = env.exchange_key(&key, &[]).await;
                assert_eq!(r.status, 200, "minting keeps working during rotation: {}", r.text());
                tokens.push(r.json_value()["access_token"].as_str().unwrap().to_string());
            }
            tokens
        }));
    }
    let mut kids_used = std::collections::BTreeSet::new();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let r = env.api_raw(Method::POST, "/v1/keys/rotate", None).await;
        assert_eq!(r.status, 200);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut all = Vec::new();
    for m in minters {
        all.extend(m.await.unwrap());
    }
    // A verifier that knows the published set and refetches it on an unknown key id.
    let mut keys = HashMap::new();
    for t in &all {
        let v = match VerifiedMandate::verify(t, &keys, caracal_shared::time::now_secs()) {
            Err(caracal_shared::mandate::MandateError::UnknownKey(_)) => {
                keys = env.keyset().await;
                VerifiedMandate::verify(t, &keys, caracal_shared::time::now_secs())
            }
            other => other,
        };
        let v = v.unwrap_or_else(|e| panic!("a valid mandate was rejected after rotation: {e}"));
        kids_used.insert(v.kid);
    }
    assert!(all.len() > 20, "load was applied ({} mints)", all.len());
    assert!(
        kids_used.len() >= 2,
        "mandates were signed by several keys across rotations: {kids_used:?}"
    );
    let env = Arc::try_unwrap(env).ok().unwrap();
    env.stop().await;
}

async fn failed_auth_is_limited_per_source_and_client(b: Backend) {
    let Some(env) = start(b, |c| c.sts.auth_failures_per_minute = 5).await else {
        return;
    };
    let (_, _, _, key) = setup(&env).await;
    let wrong = "cak_thisisnotavalidkeythisisnotavalidkeyxxxx";
    let mut last = None;
    for _ in 0..8 {
        last = Some(env.exchange_key(wrong, &[]).await);
    }
    let r = last.unwrap();
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(r.headers.contains_key("retry-after"));
    // The real owner of another key, from the same source, is not locked out.
    assert_eq!(env.exchange_key(&key, &[]).await.status, 200);
    env.stop().await;
}

/// A policy's `delegation` block tightens the STS's limits for mandates minted under it:
/// fan-out per mandate and depth below the original.
async fn delegation_limits_come_from_the_policy(b: Backend) {
    let Some(env) = start(b, |_| {}).await else { return };
    let res = env.resource("openai", "https://api.openai.com").await;
    let doc = format!("{POLICY}\ndelegation:\n  max_depth: 1\n  max_fanout: 2\n");
    let pol = env.policy("chat-limited", &doc).await;
    let (_, key) = env.agent_with_key("researcher", &res, &pol, &["chat", "read"]).await;
    let parent = env.exchange_key(&key, &[]).await.json_value()["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    let delegate = |subject: String| {
        let env = &env;
        async move {
            env.token(&[
                ("grant_type", EXCHANGE),
                ("subject_token_type", MANDATE),
                ("subject_token", subject.as_str()),
                ("scope", "chat"),
            ])
            .await
        }
    };
    let first = delegate(parent.clone()).await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(delegate(parent.clone()).await.status, 200);
    let third = delegate(parent.clone()).await;
    assert_eq!(third.status, 400, "{}", third.text());
    assert_eq!(third.json_value()["error"], "unauthorized_client");
    assert!(third.text().contains("fan-out limit (2)"), "{}", third.text());
    // Depth 1: the child cannot delegate again.
    let child = first.json_value()["access_token"].as_str().unwrap().to_string();
    let grand = delegate(child).await;
    assert_eq!(grand.json_value()["error"], "unauthorized_client", "{}", grand.text());
    assert!(grand.text().contains("depth limit (1)"), "{}", grand.text());
    // Out-of-range limits are refused when the policy is written.
    let bad = env
        .api_raw(
            Method::POST,
            "/v1/policies/validate",
            Some(json!({"document": format!("{POLICY}\ndelegation:\n  max_depth: 99\n")})),
        )
        .await;
    assert!(bad.text().contains("delegation.max_depth"), "{}", bad.text());
    env.stop().await;
}
