//! Control + STS on one runtime, on real sockets, over a real backend.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use caracal_shared::config::{BusBackend, Config};
use caracal_shared::http::client::{ClientResponse, HttpClient};
use caracal_shared::runtime::Runtime;
use caracal_shared::shutdown::Shutdown;
use caracal_shared::testing::{self, Backend, TestDb};
use http::Method;
use serde_json::{Value, json};

pub const API_KEY: &str = "urn:caracal:params:oauth:token-type:api-key";
pub const JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
pub const MTLS: &str = "urn:caracal:params:oauth:token-type:mtls";
pub const MANDATE: &str = "urn:caracal:params:oauth:token-type:mandate";
pub const EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const APPROVAL: &str = "urn:caracal:params:oauth:grant-type:approval";

pub struct Env {
    pub control: String,
    pub sts: String,
    pub sts_tls: Option<String>,
    pub admin: String,
    pub tenant: String,
    pub rt: Runtime,
    pub db: Option<TestDb>,
    pub sd: Shutdown,
    pub tasks: Vec<tokio::task::JoinHandle<std::io::Result<()>>>,
    pub client: HttpClient,
}

pub async fn start(backend: Backend, tweak: impl FnOnce(&mut Config)) -> Option<Env> {
    let db = TestDb::new(backend).await?;
    let bus = match backend {
        Backend::Sqlite => BusBackend::Embedded,
        Backend::Postgres => BusBackend::Redis,
    };
    if bus == BusBackend::Redis {
        testing::test_bus(BusBackend::Redis, &db.store).await?;
    }
    let mut cfg = testing::test_config(&db.url, bus);
    cfg.sts.approval_interval = Duration::from_millis(300);
    cfg.sts.egress_allow = vec!["127.0.0.0/8".parse().unwrap()];
    cfg.sts.jwks_min_refresh = Duration::ZERO;
    tweak(&mut cfg);
    let sd = Shutdown::new();
    let rt = Runtime::start(cfg, sd.clone()).await.expect("runtime");
    let admin = caracal_control::bootstrap_admin_token(&rt).await.unwrap().unwrap();
    let cl = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sl = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let control = format!("http://{}", cl.local_addr().unwrap());
    let sts = format!("http://{}", sl.local_addr().unwrap());
    let sts_tls = rt
        .config
        .sts
        .tls_listen
        .map(|a| format!("https://localhost:{}", a.port()));
    let mut tasks = Vec::new();
    let relay = rt.spawn_relay();
    tasks.push(tokio::spawn(async move {
        let _ = relay.await;
        Ok(())
    }));
    let rt2 = rt.clone();
    tasks.push(tokio::spawn(async move { caracal_control::serve(rt2, cl).await }));
    let rt3 = rt.clone();
    tasks.push(tokio::spawn(async move { caracal_sts::serve(rt3, sl).await }));
    let client = HttpClient::unrestricted().with_timeout(Duration::from_secs(20));
    for base in [&control, &sts] {
        let c = client.clone();
        let url = format!("{base}/readyz");
        assert!(
            testing::eventually(Duration::from_secs(15), || {
                let c = c.clone();
                let url = url.clone();
                async move { c.get(&url).await.map(|r| r.status == 200).unwrap_or(false) }
            })
            .await
        );
    }
    let mut env = Env {
        control,
        sts,
        sts_tls,
        admin,
        tenant: String::new(),
        rt,
        db: Some(db),
        sd,
        tasks,
        client,
    };
    let r = env
        .api(Method::POST, "/v1/tenants", Some(json!({"name": "acme"})))
        .await;
    env.tenant = r["id"].as_str().unwrap().to_string();
    Some(env)
}

impl Env {
    pub async fn stop(mut self) {
        self.sd.trigger();
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
        self.rt.store.close().await;
        if let Some(db) = self.db.take() {
            db.cleanup().await;
        }
    }

    /// Control API call with the platform token in the test tenant; panics on non-2xx.
    pub async fn api(&self, m: Method, path: &str, body: Option<Value>) -> Value {
        let r = self.api_raw(m.clone(), path, body).await;
        assert!(r.status.is_success(), "{m} {path}: {} {}", r.status, r.text());
        r.json_value()
    }

    pub async fn api_raw(&self, m: Method, path: &str, body: Option<Value>) -> ClientResponse {
        let auth = format!("Bearer {}", self.admin);
        let mut h: Vec<(&str, &str)> = vec![("authorization", &auth)];
        if !self.tenant.is_empty() {
            h.push(("x-caracal-tenant", &self.tenant));
        }
        let url = format!("{}{path}", self.control);
        match body {
            Some(b) => self.client.send_json(m, &url, &h, &b).await.unwrap(),
            None => self.client.request(m, &url, &h, Default::default()).await.unwrap(),
        }
    }

    pub async fn token(&self, form: &[(&str, &str)]) -> ClientResponse {
        self.client
            .post_form(&format!("{}/oauth/token", self.sts), &[], form)
            .await
            .unwrap()
    }

    pub async fn exchange_key(&self, key: &str, extra: &[(&str, &str)]) -> ClientResponse {
        let mut f = vec![
            ("grant_type", EXCHANGE),
            ("subject_token_type", API_KEY),
            ("subject_token", key),
        ];
        f.extend_from_slice(extra);
        self.token(&f).await
    }

    /// An agent with an API key, a grant on `resource` under `policy`. Returns (agent id, key).
    pub async fn agent_with_key(&self, name: &str, resource: &str, policy: &str, scopes: &[&str]) -> (String, String) {
        let a = self.api(Method::POST, "/v1/agents", Some(json!({"name": name}))).await;
        let aid = a["id"].as_str().unwrap().to_string();
        let k = self
            .api(
                Method::POST,
                &format!("/v1/agents/{aid}/api-keys"),
                Some(json!({"name": "k"})),
            )
            .await;
        self.api(Method::POST, "/v1/grants", Some(json!({"agent_id": aid, "resource_id": resource, "policy_id": policy, "scopes": scopes, "max_lifetime_secs": 600}))).await;
        (aid, k["secret"].as_str().unwrap().to_string())
    }

    pub async fn resource(&self, name: &str, base_url: &str) -> String {
        self.api(
            Method::POST,
            "/v1/resources",
            Some(json!({"name": name, "base_url": base_url})),
        )
        .await["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    pub async fn policy(&self, name: &str, doc: &str) -> String {
        self.api(
            Method::POST,
            "/v1/policies",
            Some(json!({"name": name, "document": doc, "activate": true})),
        )
        .await["policy"]["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// The published key set, as a verifier sees it.
    pub async fn keyset(&self) -> HashMap<u32, biscuit_auth::PublicKey> {
        let r = self
            .client
            .get(&format!("{}/.well-known/caracal-keys", self.sts))
            .await
            .unwrap()
            .json_value();
        r["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| {
                (
                    k["kid"].as_u64().unwrap() as u32,
                    caracal_shared::mandate::public_key_from_str(k["public_key"].as_str().unwrap()).unwrap(),
                )
            })
            .collect()
    }

    /// Audit events on the bus so far (the relay must be running for outbox events).
    pub async fn audit_events(&self) -> Vec<caracal_shared::bus::Event> {
        let entries = self
            .rt
            .bus
            .read_after(
                caracal_shared::bus::streams::AUDIT,
                "0",
                100_000,
                Duration::from_millis(10),
            )
            .await
            .unwrap();
        entries
            .iter()
            .filter_map(|e| {
                self.rt
                    .bus_auth
                    .verify(caracal_shared::bus::streams::AUDIT, &e.id, e.payload.as_deref(), 0)
                    .ok()
            })
            .flat_map(caracal_shared::audit::expand)
            .collect()
    }
}

pub fn err(r: &ClientResponse) -> String {
    r.json_value()["error"].as_str().unwrap_or("").to_string()
}

pub const POLICY: &str = r#"
rules:
  - id: chat
    scopes: [chat]
    methods: [POST]
    paths: ["/v1/chat/completions"]
    models: ["gpt-4o*"]
  - id: read
    scopes: [read]
    methods: [GET]
    paths: ["/v1/**"]
  - id: no-admin
    effect: deny
    paths: ["/v1/admin/**"]
"#;

pub fn arc<T>(t: T) -> Arc<T> {
    Arc::new(t)
}
