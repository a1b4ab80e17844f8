//! The coordinator end to end, on both storage backends: control + STS + coordinator + a
//! running gateway on one runtime (SQLite with the embedded bus, PostgreSQL with Redis).
//! Every session, lease and invocation transition (legal and illegal), the cascade of one
//! revocation down to a gateway refusing every descendant mandate (and cutting a stream in
//! flight), and concurrent heartbeats, takeovers, claims and revocations.

#[path = "../../gateway/tests/common/mod.rs"]
mod common;

use std::collections::HashSet;
use std::time::Duration;

use caracal_shared::testing::{Backend, eventually};
use common::*;
use http::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite { $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(caracal_shared::testing::Backend::Sqlite).await; })* }
        mod postgres { $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(caracal_shared::testing::Backend::Postgres).await; })* }
    };
}

on_both_backends!(
    session_transitions,
    lease_fencing,
    invocation_transitions,
    cascade_reaches_the_gateway,
    concurrent_heartbeats_takeovers_claims_and_revocations,
);

const TT_MANDATE: &str = "urn:caracal:params:oauth:token-type:mandate";
const TT_API_KEY: &str = "urn:caracal:params:oauth:token-type:api-key";

struct C {
    env: Env,
    url: String,
}

struct R {
    status: u16,
    body: Value,
}

impl R {
    fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
    fn id(&self) -> String {
        self.body["id"].as_str().expect("an id").to_string()
    }
}

async fn start_env(b: Backend) -> Option<C> {
    let env = start(b, |c| {
        c.coordinator.sweep_interval = Duration::from_millis(50);
    })
    .await?;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let rt = env.rt.clone();
    tokio::spawn(async move { caracal_coordinator::serve(rt, l).await });
    let c = env.client.clone();
    let u = format!("{url}/readyz");
    assert!(
        eventually(Duration::from_secs(15), || {
            let (c, u) = (c.clone(), u.clone());
            async move { c.get(&u).await.map(|r| r.status == 200).unwrap_or(false) }
        })
        .await
    );
    Some(C { env, url })
}

impl C {
    /// Call the coordinator with a bearer (a mandate, or the admin token in the test tenant).
    async fn call(&self, m: Method, path: &str, bearer: &str, body: Option<Value>) -> R {
        let auth = format!("Bearer {bearer}");
        let mut h = vec![("authorization", auth.as_str())];
        if bearer == self.env.admin {
            h.push(("x-caracal-tenant", self.env.tenant.as_str()));
        }
        let url = format!("{}{path}", self.url);
        let r = match body {
            Some(b) => self.env.client.send_json(m, &url, &h, &b).await.unwrap(),
            None => self.env.client.request(m, &url, &h, Default::default()).await.unwrap(),
        };
        R {
            status: r.status.as_u16(),
            body: serde_json::from_slice(&r.body).unwrap_or(Value::Null),
        }
    }

    async fn admin(&self, m: Method, path: &str, body: Option<Value>) -> R {
        let a = self.env.admin.clone();
        self.call(m, path, &a, body).await
    }

    /// Another agent with an API key and the same grant as the test agent.
    async fn agent(&self, name: &str) -> (String, String) {
        let e = &self.env;
        let a = e
            .api(Method::POST, "/v1/agents", Some(json!({"name": name})))
            .await
            .json_value()["id"]
            .as_str()
            .unwrap()
            .to_string();
        let k = e
            .api(Method::POST, &format!("/v1/agents/{a}/api-keys"), Some(json!({})))
            .await
            .json_value()["secret"]
            .as_str()
            .unwrap()
            .to_string();
        let g = e
            .api(
                Method::POST,
                "/v1/grants",
                Some(json!({"agent_id": a, "resource_id": e.resource, "policy_id": e.policy, "scopes": ["*"]})),
            )
            .await;
        assert!(g.status.is_success(), "{}", g.text());
        (a, k)
    }

    async fn exchange(&self, form: &[(&str, &str)]) -> (u16, Value) {
        let mut f = vec![("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange")];
        f.extend_from_slice(form);
        let r = self
            .env
            .client
            .post_form(&format!("{}/oauth/token", self.env.rt.config.gateway.sts_url), &[], &f)
            .await
            .unwrap();
        (r.status.as_u16(), r.json_value())
    }

    /// A mandate for the API key `key`, with extra form fields.
    async fn mandate(&self, key: &str, extra: &[(&str, &str)]) -> String {
        let mut f = vec![("subject_token_type", TT_API_KEY), ("subject_token", key)];
        f.extend_from_slice(extra);
        let (s, b) = self.exchange(&f).await;
        assert_eq!(s, 200, "{b}");
        b["access_token"].as_str().unwrap().to_string()
    }

    async fn gateway_status(&self, mandate: &str) -> (u16, String) {
        let u = format!("{}/v1/models", self.env.api_url());
        let r = self
            .env
            .via_proxy("GET", &u, &[("proxy-authorization", &Env::basic(mandate))], b"")
            .await;
        (r.status, r.code())
    }

    async fn refused_everywhere(&self, mandates: &[&str]) -> bool {
        eventually(Duration::from_secs(10), || async {
            for m in mandates {
                if self.gateway_status(m).await.1 != "mandate_revoked" {
                    return false;
                }
            }
            true
        })
        .await
    }

    async fn events(&self, stream: &str) -> Vec<caracal_shared::bus::Event> {
        let es = self
            .env
            .rt
            .bus
            .read_after(stream, "0", 100_000, Duration::from_millis(5))
            .await
            .unwrap();
        es.iter()
            .filter_map(|e| self.env.rt.bus_auth.verify(stream, &e.id, e.payload.as_deref(), 0).ok())
            .flat_map(caracal_shared::audit::expand)
            .collect()
    }

    async fn saw_event(&self, stream: &str, kind: &str, id: &str) -> bool {
        eventually(Duration::from_secs(10), || async {
            self.events(stream)
                .await
                .iter()
                .any(|e| e.kind == kind && e.body["object"]["id"] == id)
        })
        .await
    }
}

async fn session_transitions(b: Backend) {
    let Some(c) = start_env(b).await else { return };
    let key = c.env.key.clone();
    let m = c.mandate(&key, &[]).await;

    // Bad input and authentication.
    assert_eq!(
        c.call(Method::POST, "/v1/sessions", "nope", Some(json!({})))
            .await
            .status,
        401
    );
    assert_eq!(
        c.call(Method::POST, "/v1/sessions", &m, Some(json!({"ttl_seconds": 0})))
            .await
            .code(),
        "validation_failed"
    );
    let r = c
        .call(Method::POST, "/v1/sessions", &m, Some(json!({"colour": "red"})))
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(c.admin(Method::POST, "/v1/sessions", Some(json!({}))).await.status, 403);

    // active → heartbeat → completed; nothing after an end.
    let r = c
        .call(Method::POST, "/v1/sessions", &m, Some(json!({"labels": {"run": "1"}})))
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["status"], "active");
    let s1 = r.id();
    assert!(
        c.saw_event(caracal_shared::bus::streams::COORDINATION, "session.started", &s1)
            .await
    );
    let r = c
        .call(Method::POST, &format!("/v1/sessions/{s1}/heartbeat"), &m, None)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        c.call(Method::GET, &format!("/v1/sessions/{s1}"), &m, None).await.body["status"],
        "active"
    );
    assert_eq!(
        c.admin(Method::GET, &format!("/v1/sessions/{s1}"), None).await.status,
        200
    );

    // A mandate bound to the session works while it is active; binding needs an active
    // session of the same agent.
    let bound = c.mandate(&key, &[("session_id", &s1)]).await;
    assert_eq!(c.gateway_status(&bound).await.0, 200);
    let ghost = caracal_shared::ids::SessionId::new().to_string();
    let (st, body) = c
        .exchange(&[
            ("subject_token_type", TT_API_KEY),
            ("subject_token", &key),
            ("session_id", &ghost),
        ])
        .await;
    assert_eq!((st, body["error"].as_str()), (400, Some("invalid_request")), "{body}");
    let (_, other_key) = c.agent("other").await;
    let (st, _) = c
        .exchange(&[
            ("subject_token_type", TT_API_KEY),
            ("subject_token", &other_key),
            ("session_id", &s1),
        ])
        .await;
    assert_eq!(st, 400, "another agent cannot bind its mandate to this session");
    let om = c.mandate(&other_key, &[]).await;
    assert_eq!(
        c.call(Method::GET, &format!("/v1/sessions/{s1}"), &om, None)
            .await
            .status,
        404
    );
    assert_eq!(
        c.call(Method::POST, &format!("/v1/sessions/{s1}/complete"), &om, None)
            .await
            .status,
        404
    );

    let r = c
        .call(
            Method::POST,
            &format!("/v1/sessions/{s1}/complete"),
            &m,
            Some(json!({"reason": "done"})),
        )
        .await;
    assert_eq!(
        (r.status, r.body["status"].as_str()),
        (200, Some("completed")),
        "{}",
        r.body
    );
    assert_eq!(r.body["end_reason"], "done");
    for action in ["complete", "fail", "heartbeat"] {
        let r = c
            .call(Method::POST, &format!("/v1/sessions/{s1}/{action}"), &m, None)
            .await;
        assert_eq!(r.status, 409, "{action}: {}", r.body);
        assert_eq!(r.code(), "invalid_transition");
        assert_eq!(r.body["error"]["details"]["status"], "completed");
    }
    // Ending the session revoked the mandate bound to it, at the gateway.
    assert!(c.refused_everywhere(&[&bound]).await);
    assert_eq!(c.gateway_status(&m).await.0, 200, "the unbound mandate still works");
    let (st, _) = c
        .exchange(&[
            ("subject_token_type", TT_API_KEY),
            ("subject_token", &key),
            ("session_id", &s1),
        ])
        .await;
    assert_eq!(st, 400, "no new mandate for an ended session");

    // active → failed.
    let s2 = c.call(Method::POST, "/v1/sessions", &m, None).await.id();
    let r = c.call(Method::POST, &format!("/v1/sessions/{s2}/fail"), &m, None).await;
    assert_eq!(r.body["status"], "failed");

    // active → expired (missed heartbeat), by the sweeper; then nothing.
    let s3 = c
        .call(
            Method::POST,
            "/v1/sessions",
            &m,
            Some(json!({"heartbeat_timeout_seconds": 1})),
        )
        .await
        .id();
    assert!(
        eventually(Duration::from_secs(10), || async {
            c.admin(Method::GET, &format!("/v1/sessions/{s3}"), None).await.body["status"] == "expired"
        })
        .await
    );
    assert!(
        c.saw_event(caracal_shared::bus::streams::COORDINATION, "session.expired", &s3)
            .await
    );
    let r = c
        .call(Method::POST, &format!("/v1/sessions/{s3}/heartbeat"), &m, None)
        .await;
    assert_eq!((r.status, r.code()), (409, "invalid_transition"));
    assert_eq!(r.body["error"]["details"]["status"], "expired");

    // active → revoked (by its own agent): mandates bound to it are refused, the mandate that
    // started it is not (it may run other sessions).
    let s4 = c.call(Method::POST, "/v1/sessions", &m, None).await.id();
    let bound4 = c.mandate(&key, &[("session_id", &s4)]).await;
    let r = c
        .call(Method::POST, &format!("/v1/sessions/{s4}/revoke"), &m, None)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["sessions_revoked"], json!([s4]));
    assert!(c.refused_everywhere(&[&bound4]).await);
    assert_eq!(c.gateway_status(&m).await.0, 200);
    let r = c
        .call(Method::POST, &format!("/v1/sessions/{s4}/complete"), &m, None)
        .await;
    assert_eq!(r.body["error"]["details"]["status"], "revoked");

    // Unknown and malformed ids.
    let unknown = caracal_shared::ids::SessionId::new();
    assert_eq!(
        c.admin(Method::GET, &format!("/v1/sessions/{unknown}"), None)
            .await
            .status,
        404
    );
    assert_eq!(
        c.call(Method::POST, &format!("/v1/sessions/{unknown}/heartbeat"), &m, None)
            .await
            .status,
        404
    );
    assert_eq!(c.admin(Method::GET, "/v1/sessions/agt_nope", None).await.status, 400);

    // Listing, filtered.
    let r = c.admin(Method::GET, "/v1/sessions?status=completed", None).await;
    let items = r.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["id"], s1.as_str());

    // Per-tenant limits.
    let r = c
        .admin(Method::PUT, "/v1/limits", Some(json!({"max_active_sessions": 1})))
        .await;
    assert_eq!((r.status, r.body["max_active_sessions"].as_i64()), (200, Some(1)));
    assert_eq!(c.call(Method::POST, "/v1/sessions", &m, None).await.status, 201);
    let r = c.call(Method::POST, "/v1/sessions", &m, None).await;
    assert_eq!((r.status, r.code()), (429, "limit_exceeded"));
    c.env.stop().await;
}

async fn lease_fencing(b: Backend) {
    let Some(c) = start_env(b).await else { return };
    let m = c.mandate(&c.env.key.clone(), &[]).await;
    let acq = |holder: &'static str, ttl: f64| {
        let body = json!({"holder": holder, "ttl_seconds": ttl});
        let m = m.clone();
        let c = &c;
        async move { c.call(Method::POST, "/v1/leases/indexer/acquire", &m, Some(body)).await }
    };
    let a = acq("a", 2.0).await;
    assert_eq!((a.status, a.body["generation"].as_i64()), (200, Some(1)), "{}", a.body);
    let r = acq("b", 2.0).await;
    assert_eq!((r.status, r.code()), (409, "lease_held"));
    assert_eq!(r.body["error"]["details"]["holder"], "a");
    // Renewing (or re-acquiring) by its holder keeps the generation.
    let r = c
        .call(
            Method::POST,
            "/v1/leases/indexer/renew",
            &m,
            Some(json!({"holder": "a", "generation": 1})),
        )
        .await;
    assert_eq!((r.status, r.body["generation"].as_i64()), (200, Some(1)));
    assert_eq!(acq("a", 2.0).await.body["generation"], 1);

    // Expiry, takeover, and the stale holder fenced off.
    assert!(
        eventually(Duration::from_secs(5), || async {
            c.admin(Method::GET, "/v1/leases/indexer", None).await.body["released_at"].is_i64()
        })
        .await,
        "the sweeper released the expired lease"
    );
    let r = c
        .call(
            Method::POST,
            "/v1/leases/indexer/renew",
            &m,
            Some(json!({"holder": "a", "generation": 1})),
        )
        .await;
    assert_eq!((r.status, r.code()), (410, "lease_expired"));
    let bl = acq("b", 30.0).await;
    assert_eq!((bl.status, bl.body["generation"].as_i64()), (200, Some(2)));
    for path in ["renew", "release"] {
        let r = c
            .call(
                Method::POST,
                &format!("/v1/leases/indexer/{path}"),
                &m,
                Some(json!({"holder": "a", "generation": 1})),
            )
            .await;
        assert_eq!((r.status, r.code()), (409, "lease_fenced"), "{path}");
    }
    let r = c
        .call(
            Method::POST,
            "/v1/leases/indexer/check",
            &m,
            Some(json!({"generation": 1})),
        )
        .await;
    assert_eq!((r.status, r.code()), (409, "lease_fenced"));
    let r = c
        .call(
            Method::POST,
            "/v1/leases/indexer/check",
            &m,
            Some(json!({"generation": 2})),
        )
        .await;
    assert_eq!(r.status, 200);
    let r = c
        .call(
            Method::POST,
            "/v1/leases/indexer/release",
            &m,
            Some(json!({"holder": "b", "generation": 2})),
        )
        .await;
    assert_eq!(r.status, 200);
    let r = c
        .call(
            Method::POST,
            "/v1/leases/indexer/check",
            &m,
            Some(json!({"generation": 2})),
        )
        .await;
    assert_eq!((r.status, r.code()), (410, "lease_expired"));
    assert_eq!(acq("c", 1.0).await.body["generation"], 3);

    // Bad input.
    assert_eq!(
        c.call(
            Method::POST,
            "/v1/leases/bad%20name/acquire",
            &m,
            Some(json!({"holder": "a"}))
        )
        .await
        .status,
        400
    );
    assert_eq!(
        c.call(
            Method::POST,
            "/v1/leases/x/acquire",
            &m,
            Some(json!({"holder": "a", "ttl_seconds": 1e9}))
        )
        .await
        .status,
        400
    );
    assert_eq!(c.admin(Method::GET, "/v1/leases/unknown", None).await.status, 404);
    let events = c.events(caracal_shared::bus::streams::COORDINATION).await;
    let kinds: HashSet<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert!(kinds.contains("lease.acquired") && kinds.contains("lease.expired") && kinds.contains("lease.released"));
    c.env.stop().await;
}

async fn invocation_transitions(b: Backend) {
    let Some(c) = start_env(b).await else { return };
    let m1 = c.mandate(&c.env.key.clone(), &[]).await;
    let (a2, k2) = c.agent("worker").await;
    let m2 = c.mandate(&k2, &[]).await;
    let create = |body: Value| {
        let m1 = m1.clone();
        let c = &c;
        async move { c.call(Method::POST, "/v1/invocations", &m1, Some(body)).await }
    };

    // Idempotency: a repeated create returns the first invocation.
    let body = json!({"target": a2, "operation": "summarise", "input": {"doc": 1}, "idempotency_key": "k1"});
    let first = create(body.clone()).await;
    assert_eq!(
        (first.status, first.body["status"].as_str()),
        (201, Some("pending")),
        "{}",
        first.body
    );
    let again = create(body).await;
    assert_eq!((again.status, again.id()), (200, first.id()));
    let r = create(json!({"target": a2, "operation": "summarise", "input": {"doc": 2}, "idempotency_key": "k1"})).await;
    assert_eq!((r.status, r.code()), (409, "conflict"));
    let i1 = first.id();

    // pending → running → succeeded; only the running worker reports.
    let claim = |w: &'static str| {
        let m2 = m2.clone();
        let c = &c;
        async move {
            c.call(Method::POST, "/v1/invocations/claim", &m2, Some(json!({"worker": w})))
                .await
        }
    };
    let r = claim("w1").await;
    assert_eq!(
        (r.status, r.id(), r.body["attempt"].as_i64()),
        (200, i1.clone(), Some(1))
    );
    assert_eq!(claim("w1").await.status, 204, "nothing else is due");
    let done = |w: &str| json!({"worker": w, "result": {"summary": "ok"}});
    let r = c
        .call(
            Method::POST,
            &format!("/v1/invocations/{i1}/complete"),
            &m2,
            Some(done("w2")),
        )
        .await;
    assert_eq!((r.status, r.code()), (409, "invalid_transition"));
    let r = c
        .call(
            Method::POST,
            &format!("/v1/invocations/{i1}/complete"),
            &m1,
            Some(done("w1")),
        )
        .await;
    assert_eq!(r.status, 404, "the caller does not report results");
    let r = c
        .call(
            Method::POST,
            &format!("/v1/invocations/{i1}/complete"),
            &m2,
            Some(done("w1")),
        )
        .await;
    assert_eq!((r.status, r.body["status"].as_str()), (200, Some("succeeded")));
    assert_eq!(
        c.call(Method::GET, &format!("/v1/invocations/{i1}"), &m1, None)
            .await
            .body["result"]["summary"],
        "ok"
    );
    for (path, body) in [
        ("complete", done("w1")),
        ("fail", json!({"worker": "w1", "error": "x"})),
        ("cancel", json!({})),
    ] {
        let who = if path == "cancel" { &m1 } else { &m2 };
        let r = c
            .call(Method::POST, &format!("/v1/invocations/{i1}/{path}"), who, Some(body))
            .await;
        assert_eq!((r.status, r.code()), (409, "invalid_transition"), "{path}");
        assert_eq!(r.body["error"]["details"]["status"], "succeeded");
    }

    // Retries with backoff: running → pending (retryable) → running → failed (attempts spent).
    let i2 = create(json!({"target": a2, "operation": "flaky", "max_attempts": 2, "backoff_ms": 200}))
        .await
        .id();
    assert_eq!(claim("w1").await.id(), i2);
    let r = c
        .call(
            Method::POST,
            &format!("/v1/invocations/{i2}/fail"),
            &m2,
            Some(json!({"worker": "w1", "error": "503", "retryable": true})),
        )
        .await;
    assert_eq!(
        (r.body["status"].as_str(), r.body["attempt"].as_i64()),
        (Some("pending"), Some(1))
    );
    assert_eq!(claim("w1").await.status, 204, "not before the backoff");
    let got = std::sync::Mutex::new(None);
    assert!(
        eventually(Duration::from_secs(5), || async {
            let r = claim("w2").await;
            if r.status == 200 {
                *got.lock().unwrap() = Some(r.body);
                true
            } else {
                false
            }
        })
        .await
    );
    let got = got.into_inner().unwrap();
    assert_eq!(got.unwrap()["attempt"], 2);
    let r = c
        .call(
            Method::POST,
            &format!("/v1/invocations/{i2}/fail"),
            &m2,
            Some(json!({"worker": "w2", "error": "503", "retryable": true})),
        )
        .await;
    assert_eq!(r.body["status"], "failed");

    // pending → cancelled, running → cancelled.
    let i3 = create(json!({"target": a2, "operation": "x"})).await.id();
    let r = c
        .call(Method::POST, &format!("/v1/invocations/{i3}/cancel"), &m1, None)
        .await;
    assert_eq!(r.body["status"], "cancelled");
    assert_eq!(claim("w1").await.status, 204);
    let i4 = create(json!({"target": a2, "operation": "x"})).await.id();
    assert_eq!(claim("w1").await.id(), i4);
    let r = c
        .admin(
            Method::POST,
            &format!("/v1/invocations/{i4}/cancel"),
            Some(json!({"reason": "ops"})),
        )
        .await;
    assert_eq!(r.body["status"], "cancelled");
    let r = c
        .call(
            Method::POST,
            &format!("/v1/invocations/{i4}/complete"),
            &m2,
            Some(done("w1")),
        )
        .await;
    assert_eq!(r.body["error"]["details"]["status"], "cancelled");

    // Deadlines: pending → timed_out and running → timed_out.
    let i5 = create(json!({"target": a2, "operation": "x", "deadline_seconds": 1}))
        .await
        .id();
    let i6 = create(json!({"target": a2, "operation": "y", "deadline_seconds": 1}))
        .await
        .id();
    assert_eq!(claim("w1").await.id(), i5);
    for i in [&i5, &i6] {
        assert!(
            eventually(Duration::from_secs(10), || async {
                c.admin(Method::GET, &format!("/v1/invocations/{i}"), None).await.body["status"] == "timed_out"
            })
            .await
        );
    }
    assert!(
        c.saw_event(caracal_shared::bus::streams::COORDINATION, "invocation.timed_out", &i6)
            .await
    );

    // Bad input.
    let r = create(json!({"target": caracal_shared::ids::AgentId::new(), "operation": "x"})).await;
    assert_eq!(r.status, 404);
    assert_eq!(create(json!({"target": a2, "operation": ""})).await.status, 400);
    assert_eq!(
        create(json!({"target": a2, "operation": "x", "max_attempts": 1000}))
            .await
            .status,
        400
    );
    assert_eq!(create(json!({"target": "agt_x", "operation": "x"})).await.status, 400);
    c.env.stop().await;
}

/// Send a GET through the proxy and read the raw response until EOF (bounded).
async fn stream_through(
    proxy: std::net::SocketAddr,
    url: &str,
    auth: &str,
) -> tokio::task::JoinHandle<(Vec<u8>, bool)> {
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let host = url.split('/').nth(2).unwrap().to_string();
    let req = format!("GET {url} HTTP/1.1\r\nHost: {host}\r\nProxy-Authorization: {auth}\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    tokio::spawn(async move {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
                Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
                Err(_) => return (out, false),
            }
        }
    })
}

async fn cascade_reaches_the_gateway(b: Backend) {
    let Some(c) = start_env(b).await else { return };
    let key1 = c.env.key.clone();
    let (a2, key2) = c.agent("child").await;
    let (_a3, key3) = c.agent("bystander").await;

    // Root session S1 (started with m0); m1 bound to S1; m2 delegated from m1 to agent 2, who
    // starts child session S2 with it; m3 bound to S2.
    let m0 = c.mandate(&key1, &[]).await;
    let s1 = c.call(Method::POST, "/v1/sessions", &m0, None).await.id();
    let m1 = c.mandate(&key1, &[("session_id", &s1)]).await;
    let (st, d) = c
        .exchange(&[
            ("subject_token_type", TT_MANDATE),
            ("subject_token", &m1),
            ("actor_token_type", TT_API_KEY),
            ("actor_token", &key2),
        ])
        .await;
    assert_eq!(st, 200, "{d}");
    let m2 = d["access_token"].as_str().unwrap().to_string();
    let r = c.call(Method::POST, "/v1/sessions", &m2, None).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["parent_session"], s1.as_str());
    let s2 = r.id();
    let m3 = c.mandate(&key2, &[("session_id", &s2)]).await;
    // Work in flight from S1 to agent 2, one pending and one running.
    for op in ["a", "b"] {
        let r = c
            .call(
                Method::POST,
                "/v1/invocations",
                &m1,
                Some(json!({"target": a2, "operation": op})),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let claimed = c
        .call(Method::POST, "/v1/invocations/claim", &m3, Some(json!({"worker": "w"})))
        .await;
    assert_eq!(claimed.status, 200);
    let bystander = c.mandate(&key3, &[]).await;
    let fresh1 = c.mandate(&key1, &[]).await;
    for m in [&m0, &m1, &m2, &m3, &bystander, &fresh1] {
        assert_eq!(c.gateway_status(m).await.0, 200);
    }
    // A response streaming to a descendant mandate while the root is revoked.
    let stream = stream_through(c.env.proxy, &format!("{}/v1/stream", c.env.api_url()), &Env::basic(&m3)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let r = c
        .admin(
            Method::POST,
            "/v1/revocations",
            Some(json!({"kind": "session", "value": s1, "reason": "incident 42"})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let got: HashSet<&str> = r.body["sessions_revoked"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(got, HashSet::from([s1.as_str(), s2.as_str()]));
    assert_eq!(r.body["delegations_revoked"].as_array().unwrap().len(), 1);
    assert_eq!(r.body["invocations_cancelled"], 2);
    assert!(!r.body["revocation_ids"].as_array().unwrap().is_empty());
    assert_eq!(r.body["published"], true, "answered once the records were on the bus");

    // Every descendant's mandate is refused by the running gateway; others (including the
    // mandate that started the root, which is not its descendant) are not.
    assert!(c.refused_everywhere(&[&m1, &m2, &m3]).await);
    assert_eq!(c.gateway_status(&m0).await.0, 200);
    assert_eq!(c.gateway_status(&bystander).await.0, 200);
    assert_eq!(c.gateway_status(&fresh1).await.0, 200);
    let (raw, closed) = stream.await.unwrap();
    let text = String::from_utf8_lossy(&raw);
    assert!(closed, "the stream was cut, not left running");
    assert!(text.contains("data: 0"), "the stream had started: {text}");
    assert!(!text.contains("data: 199"), "the stream did not run to its end");
    assert!(
        !text.ends_with("0\r\n\r\n"),
        "the cut response is not a complete message"
    );
    for s in [&s1, &s2] {
        assert_eq!(
            c.admin(Method::GET, &format!("/v1/sessions/{s}"), None).await.body["status"],
            "revoked"
        );
    }
    let open = c.admin(Method::GET, "/v1/invocations?status=cancelled", None).await;
    assert_eq!(open.body["items"].as_array().unwrap().len(), 2);
    assert!(
        c.saw_event(caracal_shared::bus::streams::AUDIT, "session.revoked", &s2)
            .await
    );

    // Revoking a mandate: the sessions it started too.
    let r5 = c.call(Method::POST, "/v1/sessions", &m0, None).await;
    let (s5, mid0) = (r5.id(), r5.body["mandate_id"].clone());
    let r = c
        .admin(
            Method::POST,
            "/v1/revocations",
            Some(json!({"kind": "mandate", "value": mid0, "reason": "leaked"})),
        )
        .await;
    assert_eq!(r.body["sessions_revoked"], json!([s5]), "{}", r.body);
    assert!(c.refused_everywhere(&[&m0]).await);

    // Revoking an agent: every mandate of agent 2, even a fresh one minted before.
    let fresh2 = c.mandate(&key2, &[]).await;
    let r = c
        .admin(
            Method::POST,
            "/v1/revocations",
            Some(json!({"kind": "agent", "value": a2, "reason": "compromised"})),
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(c.refused_everywhere(&[&fresh2]).await);
    assert_eq!(c.gateway_status(&fresh1).await.0, 200);

    // Bulk form for incidents: the whole tenant.
    let r = c
        .admin(
            Method::POST,
            "/v1/revocations",
            Some(json!({"targets": [{"kind": "tenant", "value": c.env.tenant}, {"kind": "resource", "value": c.env.resource}], "reason": "incident"})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(c.refused_everywhere(&[&fresh1, &bystander]).await);

    // Bad input.
    let bad = [
        json!({"kind": "session", "value": "ses_nope", "reason": "x"}),
        json!({"kind": "planet", "value": "x", "reason": "x"}),
        json!({"kind": "session", "value": caracal_shared::ids::SessionId::new(), "reason": ""}),
        json!({"reason": "x"}),
    ];
    for body in bad {
        let r = c.admin(Method::POST, "/v1/revocations", Some(body.clone())).await;
        assert_eq!(r.status, 400, "{body}: {}", r.body);
    }
    let r = c
        .admin(
            Method::POST,
            "/v1/revocations",
            Some(json!({"kind": "session", "value": caracal_shared::ids::SessionId::new(), "reason": "x"})),
        )
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(
        c.call(
            Method::POST,
            "/v1/revocations",
            &fresh1,
            Some(json!({"kind": "agent", "value": a2, "reason": "x"}))
        )
        .await
        .status,
        403,
        "agents do not revoke others (and this one is revoked)"
    );
    c.env.stop().await;
}

async fn concurrent_heartbeats_takeovers_claims_and_revocations(b: Backend) {
    let Some(c) = start_env(b).await else { return };
    let m = c.mandate(&c.env.key.clone(), &[]).await;
    let (a2, k2) = c.agent("worker").await;
    let m2 = c.mandate(&k2, &[]).await;
    let c = std::sync::Arc::new(c);

    // 40 heartbeats on one session and one each on 10 others, all at once: no lost update.
    let s = c.call(Method::POST, "/v1/sessions", &m, None).await.id();
    let mut others = Vec::new();
    for _ in 0..10 {
        others.push(c.call(Method::POST, "/v1/sessions", &m, None).await.id());
    }
    let mut tasks = Vec::new();
    for i in 0..50 {
        let (c, m) = (c.clone(), m.clone());
        let id = if i < 40 { s.clone() } else { others[i - 40].clone() };
        tasks.push(tokio::spawn(async move {
            c.call(Method::POST, &format!("/v1/sessions/{id}/heartbeat"), &m, None)
                .await
                .status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(
        c.admin(Method::GET, &format!("/v1/sessions/{s}"), None).await.body["version"],
        41
    );

    // 20 instances race for one free lease: exactly one holder, one new generation.
    let mut tasks = Vec::new();
    for i in 0..20 {
        let (c, m) = (c.clone(), m.clone());
        tasks.push(tokio::spawn(async move {
            let r = c
                .call(
                    Method::POST,
                    "/v1/leases/leader/acquire",
                    &m,
                    Some(json!({"holder": format!("h{i}"), "ttl_seconds": 2})),
                )
                .await;
            (r.status, r.code().to_string())
        }));
    }
    let mut won = 0;
    for t in tasks {
        match t.await.unwrap() {
            (200, _) => won += 1,
            (409, code) => assert_eq!(code, "lease_held"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(won, 1);
    assert_eq!(
        c.admin(Method::GET, "/v1/leases/leader", None).await.body["generation"],
        1
    );
    // After expiry, another race: again exactly one, generation 2.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let (c, m) = (c.clone(), m.clone());
        tasks.push(tokio::spawn(async move {
            c.call(
                Method::POST,
                "/v1/leases/leader/acquire",
                &m,
                Some(json!({"holder": format!("g{i}"), "ttl_seconds": 30})),
            )
            .await
            .status
        }));
    }
    let mut won = 0;
    for t in tasks {
        if t.await.unwrap() == 200 {
            won += 1;
        }
    }
    assert_eq!(won, 1);
    assert_eq!(
        c.admin(Method::GET, "/v1/leases/leader", None).await.body["generation"],
        2
    );

    // 20 invocations, 10 workers claiming at once: each claimed exactly once.
    for i in 0..20 {
        let r = c
            .call(
                Method::POST,
                "/v1/invocations",
                &m,
                Some(json!({"target": a2, "operation": format!("op{i}")})),
            )
            .await;
        assert_eq!(r.status, 201);
    }
    let mut tasks = Vec::new();
    for w in 0..10 {
        let (c, m2) = (c.clone(), m2.clone());
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let r = c
                    .call(
                        Method::POST,
                        "/v1/invocations/claim",
                        &m2,
                        Some(json!({"worker": format!("w{w}")})),
                    )
                    .await;
                if r.status != 200 {
                    assert_eq!(r.status, 204);
                    return got;
                }
                got.push(r.id());
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let unique: HashSet<_> = all.iter().collect();
    assert_eq!((all.len(), unique.len()), (20, 20));

    // Revocations in parallel (the same session several times, and distinct ones).
    let mut tasks = Vec::new();
    for i in 0..12 {
        let c = c.clone();
        let id = if i < 4 { s.clone() } else { others[i - 4].clone() };
        tasks.push(tokio::spawn(async move {
            c.admin(
                Method::POST,
                "/v1/revocations",
                Some(json!({"kind": "session", "value": id, "reason": "race"})),
            )
            .await
            .status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    for id in std::iter::once(&s).chain(others.iter().take(8)) {
        assert_eq!(
            c.admin(Method::GET, &format!("/v1/sessions/{id}"), None).await.body["status"],
            "revoked"
        );
    }
    let c = std::sync::Arc::try_unwrap(c).ok().expect("sole owner");
    c.env.stop().await;
}

#[test]
fn every_route_is_documented_and_nothing_else() {
    let served: HashSet<(String, String)> = caracal_coordinator::router()
        .routes()
        .into_iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    let documented: HashSet<(String, String)> = caracal_coordinator::openapi::documented_routes().into_iter().collect();
    assert_eq!(served, documented);
    let doc = caracal_coordinator::openapi::document();
    assert_eq!(doc["openapi"], "3.1.0");
}
