//! A control service on a real socket over a real backend, with a platform admin token.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use caracal_shared::config::BusBackend;
use caracal_shared::http::client::{ClientResponse, HttpClient};
use caracal_shared::runtime::Runtime;
use caracal_shared::shutdown::Shutdown;
use caracal_shared::testing::{self, Backend, TestDb};
use http::Method;
use serde_json::Value;

pub struct Control {
    pub base: String,
    pub token: String,
    pub rt: Runtime,
    pub db: Option<TestDb>,
    pub sd: Shutdown,
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
    pub client: HttpClient,
}

impl Control {
    pub async fn start(backend: Backend) -> Option<Control> {
        let db = TestDb::new(backend).await?;
        let bus = match backend {
            Backend::Sqlite => BusBackend::Embedded,
            Backend::Postgres => BusBackend::Redis,
        };
        if bus == BusBackend::Redis {
            testing::test_bus(BusBackend::Redis, &db.store).await?;
        }
        let cfg = testing::test_config(&db.url, bus);
        let sd = Shutdown::new();
        let rt = Runtime::start(cfg, sd.clone()).await.expect("runtime");
        let token = caracal_control::bootstrap_admin_token(&rt)
            .await
            .unwrap()
            .expect("first token");
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", l.local_addr().unwrap());
        let rt2 = rt.clone();
        let task = tokio::spawn(async move { caracal_control::serve(rt2, l).await });
        let client = HttpClient::unrestricted().with_timeout(Duration::from_secs(20));
        let c = Control {
            base,
            token,
            rt,
            db: Some(db),
            sd,
            task,
            client,
        };
        assert!(
            testing::eventually(Duration::from_secs(10), || async {
                c.raw(Method::GET, "/readyz", &[], None).await.status == 200
            })
            .await
        );
        Some(c)
    }

    pub async fn stop(mut self) {
        self.sd.trigger();
        let _ = self.task.await;
        self.rt.store.close().await;
        if let Some(db) = self.db.take() {
            db.cleanup().await;
        }
    }

    pub async fn raw(&self, m: Method, path: &str, headers: &[(&str, &str)], body: Option<&Value>) -> ClientResponse {
        let url = format!("{}{path}", self.base);
        match body {
            Some(b) => self.client.send_json(m, &url, headers, b).await.unwrap(),
            None => self.client.request(m, &url, headers, Default::default()).await.unwrap(),
        }
    }

    /// A request with the platform token (and a tenant header when given).
    pub async fn call(&self, m: Method, path: &str, tenant: Option<&str>, body: Option<&Value>) -> ClientResponse {
        self.call_as(&self.token.clone(), m, path, tenant, body).await
    }

    pub async fn call_as(
        &self,
        token: &str,
        m: Method,
        path: &str,
        tenant: Option<&str>,
        body: Option<&Value>,
    ) -> ClientResponse {
        let auth = format!("Bearer {token}");
        let mut h: Vec<(&str, &str)> = vec![("authorization", auth.as_str())];
        if let Some(t) = tenant {
            h.push(("x-caracal-tenant", t));
        }
        self.raw(m, path, &h, body).await
    }

    /// Create a tenant and return its id.
    pub async fn tenant(&self, name: &str) -> String {
        let r = self
            .call(
                Method::POST,
                "/v1/tenants",
                None,
                Some(&serde_json::json!({ "name": name })),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text());
        r.json_value()["id"].as_str().unwrap().to_string()
    }
}

pub fn code(r: &ClientResponse) -> String {
    r.json_value()["error"]["code"].as_str().unwrap_or("").to_string()
}

/// A CA certificate PEM for mTLS CA tests.
pub fn ca_pem() -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name.push(rcgen::DnType::CommonName, "test ca");
    p.self_signed(&key).unwrap().pem()
}

pub const POLICY: &str = r#"
version: 1
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
