//! Drive the control API through every secret-bearing operation with logging at TRACE, then
//! search everything logged for every secret created. None may appear.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::{Control, POLICY};
use http::Method;
use serde_json::json;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_logs() {
    let cap = Capture::default();
    let writer = cap.clone();
    tracing_subscriber::fmt()
        .with_env_filter("trace")
        .json()
        .with_writer(move || writer.clone())
        .init();

    let c = Control::start(caracal_shared::testing::Backend::Sqlite).await.unwrap();
    let mut secrets = vec![c.token.clone()];
    let t = c.tenant("secrets").await;
    let a = c
        .call(Method::POST, "/v1/agents", Some(&t), Some(&json!({"name": "a"})))
        .await
        .json_value();
    let aid = a["id"].as_str().unwrap().to_string();
    let k = c
        .call(
            Method::POST,
            &format!("/v1/agents/{aid}/api-keys"),
            Some(&t),
            Some(&json!({"name": "k"})),
        )
        .await
        .json_value();
    secrets.push(k["secret"].as_str().unwrap().to_string());
    let kid = k["key"]["id"].as_str().unwrap();
    let rot = c
        .call(
            Method::POST,
            &format!("/v1/agents/{aid}/api-keys/{kid}/rotate"),
            Some(&t),
            Some(&json!({})),
        )
        .await
        .json_value();
    secrets.push(rot["new"]["secret"].as_str().unwrap().to_string());
    let upstream = "sk-upstream-credential-3f9a7c";
    secrets.push(upstream.to_string());
    let res = c
        .call(
            Method::POST,
            "/v1/resources",
            Some(&t),
            Some(&json!({"name": "r", "base_url": "https://x.example", "credential": {"value": upstream}})),
        )
        .await
        .json_value();
    let basic_pw = "hunter2-basic-password-81d";
    secrets.push(basic_pw.to_string());
    c.call(
        Method::PUT,
        &format!("/v1/resources/{}/credential", res["id"].as_str().unwrap()),
        Some(&t),
        Some(&json!({"username": "u", "password": basic_pw})),
    )
    .await;
    let tok = c
        .call(
            Method::POST,
            "/v1/admin-tokens",
            None,
            Some(&json!({"name": "x", "scopes": ["read"], "tenant_id": t})),
        )
        .await
        .json_value();
    secrets.push(tok["secret"].as_str().unwrap().to_string());
    // Failed authentications with secret-looking values.
    let wrong = "cat_wrongwrongwrongwrongwrongwrongwrongwrong1";
    secrets.push(wrong.to_string());
    c.call_as(wrong, Method::GET, "/v1/agents", None, None).await;
    // Errors that echo input.
    c.call(
        Method::POST,
        "/v1/policies",
        Some(&t),
        Some(&json!({"name": "p", "document": POLICY.replace("chat", "Bad Id")})),
    )
    .await;
    c.call(
        Method::POST,
        "/v1/resources",
        Some(&t),
        Some(&json!({"name": "bad", "base_url": "ftp://x", "credential": {"value": "sk-bad-request-secret-77"}})),
    )
    .await;
    secrets.push("sk-bad-request-secret-77".into());
    c.stop().await;

    let logs = String::from_utf8_lossy(&cap.0.lock().unwrap()).to_string();
    assert!(logs.len() > 1000, "logging was captured ({} bytes)", logs.len());
    for s in &secrets {
        assert!(!logs.contains(s.as_str()), "a secret reached the logs: {}…", &s[..8]);
        // Also the distinctive tail, in case the prefix was transformed.
        assert!(!logs.contains(&s[s.len() - 16..]), "a secret's tail reached the logs");
    }
}
