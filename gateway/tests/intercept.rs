//! TLS interception through `HTTPS_PROXY`, with real clients trusting the exported CA: curl,
//! Python `requests` and the OpenAI Python SDK against a local OpenAI-compatible mock over HTTPS,
//! and Python `websockets` (`wss://`) against a WebSocket server over TLS.
//! Inside the tunnel every request goes through the full path: the resource's credential is
//! injected (the client's never reaches the upstream), usage is metered, the budget is enforced
//! (429), the upstream's certificate is verified. Both backends; everything on loopback (the
//! clients send `CONNECT llm.test:<port>` and the gateway resolves it through the stub resolver).

mod common;

use std::time::Duration;

use caracal_shared::testing::{Backend, eventually, pki::Ca, services_required};
use common::*;
use http::Method;
use serde_json::{Value, json};

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite { $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(caracal_shared::testing::Backend::Sqlite).await; })* }
        mod postgres { $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(caracal_shared::testing::Backend::Postgres).await; })* }
    };
}

on_both_backends!(
    real_clients_through_an_intercepted_tunnel,
    a_secure_websocket_through_an_intercepted_tunnel,
);

async fn real_clients_through_an_intercepted_tunnel(b: Backend) {
    let Some(env) = start(b, |_| {}).await else { return };
    let upstream_ca = Ca::new("mock upstream CA");
    let (addr, seen) = https_llm(&upstream_ca).await;
    env.resolver.set("llm.test", &["127.0.0.1"]);
    let port = addr.port();
    let r = env
        .api(
            Method::POST,
            "/v1/resources",
            Some(json!({
                "name": "openai", "base_url": format!("https://llm.test:{port}"), "inject": {"kind": "bearer"},
                "credential": {"value": "sk-openai-real"},
                "settings": {"egress_allow": ["127.0.0.1/32"], "intercept_tls": true, "upstream_ca_pem": upstream_ca.pem(),
                             "pricing": {"models": [{"model": "gpt-*", "input_per_mtok": 1000000, "output_per_mtok": 1000000}]}}
            })),
        )
        .await;
    assert!(r.status.is_success(), "{}", r.text());
    let res = r.json_value()["id"].as_str().unwrap().to_string();
    env.grant(&res, &env.policy).await;
    // Room for a handful of calls at their worst case (body + 20 output tokens).
    let bud = env
        .api(
            Method::POST,
            "/v1/budgets",
            Some(
                json!({"name": "openai-tokens", "scope": {"kind": "resource", "id": res}, "unit": "tokens",
                        "limit": 2000, "window": {"kind": "daily", "tz": "UTC"}}),
            ),
        )
        .await;
    assert!(bud.status.is_success(), "{}", bud.text());

    // The CA agents trust (what `caracal ca export` prints).
    let dir = std::env::temp_dir().join(format!("caracal-intercept-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("caracal-ca.pem");
    let ca = caracal_gateway::intercept::CaFile::load(&caracal_gateway::intercept::ca_path(&env.rt.config)).unwrap();
    std::fs::write(&ca_file, ca.bundle()).unwrap();
    let proxy_url = format!("http://agent:{}@{}", env.key, env.proxy);
    let url = format!("https://llm.test:{port}/v1/chat/completions");
    let body =
        json!({"model": "gpt-4o-mini", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}).to_string();

    // curl --proxy … --cacert: the gateway's certificate for llm.test verifies.
    let curl = |extra: Vec<String>| {
        let mut args = vec![
            "-sS".to_string(),
            "--proxy".into(),
            proxy_url.clone(),
            "--cacert".into(),
            ca_file.display().to_string(),
            "-H".into(),
            "content-type: application/json".into(),
            "-H".into(),
            "authorization: Bearer sk-client-must-not-pass".into(),
        ];
        args.extend(extra);
        async move { tokio::process::Command::new("curl").args(&args).output().await.unwrap() }
    };
    let mut ok = false;
    for _ in 0..50 {
        let out = curl(vec!["-d".into(), body.clone(), url.clone()]).await;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if text.contains("chatcmpl-1") {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ok, "curl through the intercepted tunnel");
    assert_eq!(
        seen.lock().unwrap().last().unwrap(),
        "Bearer sk-openai-real",
        "credential injected"
    );
    // Without trusting the CA, curl refuses the gateway's certificate.
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--proxy", &proxy_url, "-d", &body, &url])
        .output()
        .await
        .unwrap();
    assert!(
        !out.status.success(),
        "an untrusted interception certificate is refused by curl"
    );

    // Python requests with HTTPS_PROXY and REQUESTS_CA_BUNDLE.
    let py = |code: &str| {
        let code = code.to_string();
        let (proxy_url, ca_file) = (proxy_url.clone(), ca_file.clone());
        async move {
            tokio::process::Command::new("python3")
                .args(["-c", &code])
                .env("HTTPS_PROXY", &proxy_url)
                .env("REQUESTS_CA_BUNDLE", &ca_file)
                .env("SSL_CERT_FILE", &ca_file)
                .env("NO_PROXY", "")
                .output()
                .await
                .unwrap()
        }
    };
    for (module, code) in [
        (
            "requests",
            format!(
                "import requests; r = requests.post('{url}', json={{'model': 'gpt-4o-mini', 'max_tokens': 20, 'messages': []}}, headers={{'authorization': 'Bearer nope'}}); print(r.status_code, r.json()['usage']['total_tokens'])"
            ),
        ),
        (
            "openai",
            format!(
                "from openai import OpenAI; c = OpenAI(api_key='sk-ignored-by-the-gateway', base_url='https://llm.test:{port}/v1', max_retries=0); r = c.chat.completions.create(model='gpt-4o-mini', max_tokens=20, messages=[{{'role': 'user', 'content': 'hi'}}]); print(200, r.usage.total_tokens)"
            ),
        ),
    ] {
        if !python_has(module) {
            assert!(!services_required(), "python3 module {module} is required in CI");
            eprintln!("SKIPPED: python3 module {module} is not installed");
            continue;
        }
        let out = py(&code).await;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert_eq!(
            text.trim(),
            "200 14",
            "{module}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            seen.lock().unwrap().last().unwrap(),
            "Bearer sk-openai-real",
            "{module}"
        );
    }

    // Usage metered per request inside the tunnel.
    assert!(
        eventually(Duration::from_secs(10), || async {
            env.audit()
                .await
                .iter()
                .any(|e| e.body["type"] == "budget_settlement" && e.body["usage"]["output"] == 3)
        })
        .await
    );
    // Over budget (a worst case above what remains): 429 inside the tunnel, never reaching the
    // upstream.
    let before = seen.lock().unwrap().len();
    let mut statuses = Vec::new();
    for _ in 0..40 {
        let out = curl(vec![
            "-o".into(),
            "/dev/null".into(),
            "-w".into(),
            "%{http_code}".into(),
            "-d".into(),
            json!({"model": "gpt-4o-mini", "max_tokens": 5000, "messages": []}).to_string(),
            url.clone(),
        ])
        .await;
        let code = String::from_utf8_lossy(&out.stdout).to_string();
        statuses.push(code.clone());
        if code == "429" {
            break;
        }
    }
    assert_eq!(statuses.last().map(String::as_str), Some("429"), "{statuses:?}");
    assert_eq!(seen.lock().unwrap().len(), before + statuses.len() - 1);
    // A model the policy does not allow is refused inside the tunnel too.
    let out = curl(vec![
        "-o".into(),
        "/dev/null".into(),
        "-w".into(),
        "%{http_code}".into(),
        "-d".into(),
        json!({"model": "o1-preview", "max_tokens": 1, "messages": []}).to_string(),
        url.clone(),
    ])
    .await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "403");
    assert!(
        env.audited(|e| e["mode"] == "intercept" && e["decision"] == "deny")
            .await
    );
    let _ = std::fs::remove_dir_all(dir);
    let _: Value = Value::Null;
    env.stop().await;
}

/// `wss://` through `HTTPS_PROXY` with interception (as an agent reaches a realtime API): a
/// Python `websockets` client CONNECTs with its API key, trusts the exported CA, and its
/// upgrade inside the tunnel is decided like any request, forwarded over TLS to a Python
/// `websockets` server with the resource's credential; frames pass both ways.
async fn a_secure_websocket_through_an_intercepted_tunnel(b: Backend) {
    const SERVER: &str = r#"
import asyncio, ssl, sys, websockets
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[2], sys.argv[3])
async def echo(ws):
    auth = ws.request.headers.get("Authorization", "-")
    async for msg in ws:
        await ws.send(auth + "|" + msg)
async def main():
    async with websockets.serve(echo, "127.0.0.1", int(sys.argv[1]), ssl=ctx):
        await asyncio.Future()
asyncio.run(main())
"#;
    const CLIENT: &str = r#"
import asyncio, ssl, sys, websockets
async def main():
    ctx = ssl.create_default_context(cafile=sys.argv[3])
    async with websockets.connect(sys.argv[1], proxy=sys.argv[2], ssl=ctx, open_timeout=10,
                                  additional_headers={"Authorization": "Bearer sk-client-must-not-pass"}) as ws:
        await ws.send("hello")
        print(await asyncio.wait_for(ws.recv(), 10))
asyncio.run(main())
"#;
    if !python_has("websockets") {
        assert!(!services_required(), "python3 module websockets is required in CI");
        eprintln!("SKIPPED: python3 module websockets is not installed");
        return;
    }
    let Some(env) = start(b, |_| {}).await else { return };
    let dir = std::env::temp_dir().join(format!("caracal-wss-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let upstream_ca = Ca::new("mock upstream CA");
    let leaf = upstream_ca.server(&["rt.test"]);
    let (cert, key) = (dir.join("rt.pem"), dir.join("rt.key"));
    std::fs::write(&cert, &leaf.cert_pem).unwrap();
    std::fs::write(&key, &leaf.key_pem).unwrap();
    let (_server, port) = python_server(SERVER, &[&cert.display().to_string(), &key.display().to_string()]).await;
    env.resolver.set("rt.test", &["127.0.0.1"]);
    let p = env
        .api(
            Method::POST,
            "/v1/policies",
            Some(json!({"name": "ws", "document": "rules:\n  - id: read\n    methods: [GET]\n    paths: [\"/v1/**\"]\n  - id: tunnel\n    methods: [CONNECT]\n", "activate": true})),
        )
        .await;
    assert!(p.status.is_success(), "{}", p.text());
    let policy = p.json_value()["policy"]["id"].as_str().unwrap().to_string();
    let r = env
        .api(
            Method::POST,
            "/v1/resources",
            Some(json!({
                "name": "realtime", "base_url": format!("https://rt.test:{port}"), "inject": {"kind": "bearer"},
                "credential": {"value": "sk-realtime-real"},
                "settings": {"egress_allow": ["127.0.0.1/32"], "intercept_tls": true, "upstream_ca_pem": upstream_ca.pem()}
            })),
        )
        .await;
    assert!(r.status.is_success(), "{}", r.text());
    let res = r.json_value()["id"].as_str().unwrap().to_string();
    env.grant(&res, &policy).await;
    let ca_file = dir.join("caracal-ca.pem");
    let ca = caracal_gateway::intercept::CaFile::load(&caracal_gateway::intercept::ca_path(&env.rt.config)).unwrap();
    std::fs::write(&ca_file, ca.bundle()).unwrap();
    let proxy_url = format!("http://agent:{}@{}", env.key, env.proxy);
    let url = format!("wss://rt.test:{port}/v1/realtime");
    // (The grant reaches the STS's cache and the gateway's snapshot shortly: retry until then.)
    let last = std::sync::Mutex::new(String::new());
    let ok = eventually(Duration::from_secs(20), || async {
        let (ran, text) = python_run(CLIENT, &[&url, &proxy_url, &ca_file.display().to_string()]).await;
        let good = ran && text.trim() == "Bearer sk-realtime-real|hello";
        *last.lock().unwrap() = text;
        good
    })
    .await;
    assert!(ok, "{}", last.lock().unwrap());
    assert!(
        env.audited(|e| e["kind"] == "websocket"
            && e["mode"] == "intercept"
            && e["decision"] == "allow"
            && e["resource"] == res.as_str())
            .await,
        "the upgrade inside the tunnel is audited"
    );
    let _ = std::fs::remove_dir_all(&dir);
    env.stop().await;
}
