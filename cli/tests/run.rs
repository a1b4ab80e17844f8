//! `caracal run -- CMD`: real agent stacks, unchanged, under authority. The system (control,
//! STS, coordinator, gateway) runs in-process on loopback; `caracal run` is the real binary and
//! the children are real clients (curl, Python requests, the OpenAI SDK through an intercepted
//! HTTPS tunnel). Success with the credential injected, a policy denial, budget exhaustion,
//! revocation mid-run, exit codes, signals and the session's end.

#[path = "../../gateway/tests/common/mod.rs"]
mod common;

use std::process::Stdio;
use std::time::Duration;

use caracal_shared::testing::{Backend, eventually, pki::Ca, services_required};
use common::*;
use http::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite { $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(caracal_shared::testing::Backend::Sqlite).await; })* }
        mod postgres { $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(caracal_shared::testing::Backend::Postgres).await; })* }
    };
}

on_both_backends!(
    agents_run_unchanged_under_authority,
    an_mtls_identity_is_a_workload_credential
);

/// Mandates are short-lived: an agent running longer than its mandate keeps working, unchanged
/// and never restarted, while `caracal run` renews the session-bound mandate behind its relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_outlives_its_mandates() {
    let Some(s) = start_sys(Backend::Sqlite).await else {
        return;
    };
    let api = s.env.api_url();
    // Mandates of 30 s, renewed at 3/5 of their life: a 25 s run crosses a renewal.
    let script = format!(
        "import sys, time, urllib.request\n\
         bad = 0\nend = time.time() + 25\n\
         while time.time() < end:\n    \
         try:\n        urllib.request.urlopen('{api}/v1/models', timeout=5).read()\n    \
         except Exception as e:\n        bad += 1\n        print(e, flush=True)\n    time.sleep(0.5)\n\
         sys.exit(1 if bad else 0)\n"
    );
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_caracal"));
    cmd.args(["run", "--lifetime", "30", "--", "python3", "-c", &script])
        .env("CARACAL_GATEWAY", s.env.proxy.to_string())
        .env("CARACAL_GATEWAY_ADMIN_URL", format!("http://{}", s.env.admin_addr))
        .env("CARACAL_STS_URL", &s.env.rt.config.gateway.sts_url)
        .env("CARACAL_COORDINATOR_URL", &s.coordinator)
        .env("CARACAL_API_KEY", &s.env.key);
    let out = cmd.output().await.unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The first mandate, the session-bound one, and at least one renewal.
    let mints = s.env.audit().await.iter().filter(|e| e.body["type"] == "mint").count();
    assert!(mints >= 3, "{mints} mandates minted");
    s.env.stop().await;
}

/// The OpenAI SDK with its default base URL (https://api.openai.com/v1), redirected only by
/// the proxy environment `caracal run` sets: the gateway intercepts the tunnel and the stub
/// resolver maps api.openai.com to a local mock on 127.0.0.1:443 (nothing leaves the machine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_with_its_default_base_url() {
    let upstream_ca = Ca::new("mock api.openai.com CA");
    let Some((_, seen)) = https_llm_on(&upstream_ca, "api.openai.com", "127.0.0.1:443").await else {
        assert!(
            !services_required(),
            "port 443 on loopback is needed in CI (run as root)"
        );
        eprintln!("SKIPPED: cannot listen on 127.0.0.1:443");
        return;
    };
    if !python_has("openai") {
        assert!(!services_required(), "python3 module openai is required in CI");
        eprintln!("SKIPPED: python3 module openai is not installed");
        return;
    }
    let Some(s) = start_sys(Backend::Sqlite).await else {
        return;
    };
    s.env.resolver.set("api.openai.com", &["127.0.0.1"]);
    let res = s
        .env
        .api(
            Method::POST,
            "/v1/resources",
            Some(json!({
                "name": "openai", "base_url": "https://api.openai.com", "inject": {"kind": "bearer"},
                "credential": {"value": "sk-openai-real"},
                "settings": {"egress_allow": ["127.0.0.1/32"], "intercept_tls": true, "upstream_ca_pem": upstream_ca.pem()}
            })),
        )
        .await
        .json_value()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let g = s
        .env
        .api(
            Method::POST,
            "/v1/grants",
            Some(json!({"agent_id": s.env.agent, "resource_id": res, "policy_id": s.env.policy, "scopes": ["*"]})),
        )
        .await;
    assert!(g.status.is_success());
    let code = "from openai import OpenAI\n\
                c = OpenAI(api_key='sk-the-agent-never-had-the-real-key', max_retries=0)\n\
                r = c.chat.completions.create(model='gpt-4o-mini', max_tokens=5, messages=[{'role': 'user', 'content': 'hi'}])\n\
                print(r.id, r.usage.total_tokens)\n";
    let out = s.run(&["python3", "-c", code]).output().await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "chatcmpl-1 14",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(seen.lock().unwrap().last().unwrap(), "Bearer sk-openai-real");
    s.env.stop().await;
}

/// A client command line for a request body.
type Argv = Box<dyn Fn(&str) -> Vec<String>>;

struct Sys {
    env: Env,
    coordinator: String,
}

async fn start_sys(b: Backend) -> Option<Sys> {
    let env = start(b, |_| {}).await?;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let coordinator = format!("http://{}", l.local_addr().unwrap());
    let rt = env.rt.clone();
    tokio::spawn(async move { caracal_coordinator::serve(rt, l).await });
    let c = env.client.clone();
    let u = format!("{coordinator}/readyz");
    assert!(
        eventually(Duration::from_secs(15), || {
            let (c, u) = (c.clone(), u.clone());
            async move { c.get(&u).await.map(|r| r.status == 200).unwrap_or(false) }
        })
        .await
    );
    Some(Sys { env, coordinator })
}

impl Sys {
    fn run(&self, args: &[&str]) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_caracal"));
        c.arg("run")
            .arg("--")
            .args(args)
            .env("CARACAL_GATEWAY", self.env.proxy.to_string())
            .env("CARACAL_GATEWAY_ADMIN_URL", format!("http://{}", self.env.admin_addr))
            .env("CARACAL_STS_URL", &self.env.rt.config.gateway.sts_url)
            .env("CARACAL_COORDINATOR_URL", &self.coordinator)
            .env("CARACAL_API_KEY", &self.env.key)
            .kill_on_drop(true);
        c
    }

    async fn sessions(&self) -> Vec<Value> {
        let auth = format!("Bearer {}", self.env.admin);
        let r = self
            .env
            .client
            .get_with(
                &format!("{}/v1/sessions?limit=200", self.coordinator),
                &[("authorization", &auth), ("x-caracal-tenant", &self.env.tenant)],
            )
            .await
            .unwrap();
        r.json_value()["items"].as_array().cloned().unwrap_or_default()
    }
}

async fn agents_run_unchanged_under_authority(b: Backend) {
    let Some(s) = start_sys(b).await else { return };
    let api = s.env.api_url();

    // curl over HTTP_PROXY: allowed, the credential injected, the mandate never upstream.
    let out = s
        .run(&["curl", "-sS", &format!("{api}/v1/models")])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"ok\":true"));
    let seen = s.env.upstream.last();
    assert_eq!(seen.headers["authorization"], "Bearer sk-upstream-secret-42");
    assert!(!seen.headers.contains_key("proxy-authorization"));
    // The run was a session, completed when the child exited 0.
    let sessions = s.sessions().await;
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0]["status"], "completed");
    assert_eq!(sessions[0]["labels"]["command"], "curl");

    // A policy denial surfaces as the gateway's clear error; the child's exit code is returned
    // and the session is failed.
    let out = s
        .run(&["sh", "-c", &format!("curl -s {api}/v1/admin/users; exit 3")])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let body: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert_eq!(
        body["error"]["code"],
        "policy_denied",
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(s.sessions().await.iter().any(|x| x["status"] == "failed"));

    // An OpenAI-compatible upstream over HTTPS, intercepted; a token budget on it.
    let upstream_ca = Ca::new("mock upstream CA");
    let (addr, seen) = https_llm(&upstream_ca).await;
    s.env.resolver.set("llm.test", &["127.0.0.1"]);
    let res = s
        .env
        .api(
            Method::POST,
            "/v1/resources",
            Some(json!({
                "name": "openai", "base_url": format!("https://llm.test:{}", addr.port()), "inject": {"kind": "bearer"},
                "credential": {"value": "sk-openai-real"},
                "settings": {"egress_allow": ["127.0.0.1/32"], "intercept_tls": true, "upstream_ca_pem": upstream_ca.pem()}
            })),
        )
        .await
        .json_value()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let g = s
        .env
        .api(
            Method::POST,
            "/v1/grants",
            Some(json!({"agent_id": s.env.agent, "resource_id": res, "policy_id": s.env.policy, "scopes": ["*"]})),
        )
        .await;
    assert!(g.status.is_success());
    let bud = s
        .env
        .api(
            Method::POST,
            "/v1/budgets",
            Some(
                json!({"name": "openai", "scope": {"kind": "resource", "id": res}, "unit": "tokens", "limit": 3000,
                        "window": {"kind": "daily", "tz": "UTC"}}),
            ),
        )
        .await;
    assert!(bud.status.is_success());
    let base = format!("https://llm.test:{}/v1", addr.port());
    let sdk = format!(
        "from openai import OpenAI, PermissionDeniedError, RateLimitError\n\
         c = OpenAI(api_key='sk-ignored', base_url='{base}', max_retries=0)\n\
         r = c.chat.completions.create(model='gpt-4o-mini', max_tokens=20, messages=[{{'role': 'user', 'content': 'hi'}}])\n\
         print('ok', r.usage.total_tokens)\n\
         try:\n    c.chat.completions.create(model='gpt-4o-mini', max_tokens=100000, messages=[])\n    print('not limited')\n\
         except RateLimitError as e:\n    print('limited', e.status_code, e.body['code'])\n\
         try:\n    c.chat.completions.create(model='o1-preview', max_tokens=5, messages=[])\n    print('not denied')\n\
         except PermissionDeniedError as e:\n    print('denied', e.status_code, e.body['code'])\n"
    );
    for module in ["requests", "openai"] {
        if !python_has(module) {
            assert!(!services_required(), "python3 module {module} is required in CI");
            eprintln!("SKIPPED: python3 module {module} is not installed");
            return s.env.stop().await;
        }
    }
    let out = s.run(&["python3", "-c", &sdk]).output().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        vec!["ok 14", "limited 429 budget_exhausted", "denied 403 policy_denied"],
        "{text}"
    );
    assert_eq!(seen.lock().unwrap().last().unwrap(), "Bearer sk-openai-real");

    // The same through other stacks, unchanged: curl and Python httpx over HTTPS_PROXY with the
    // exported CA — success (credential injected), a policy denial, budget exhaustion.
    let chat = |model: &str, max: i64| json!({"model": model, "max_tokens": max, "messages": []}).to_string();
    let url = format!("{base}/chat/completions");
    let (u1, u2, u3) = (url.clone(), url.clone(), url.clone());
    let clients: Vec<(&str, Argv)> = vec![
        (
            "curl",
            Box::new(move |body: &str| {
                vec![
                    "curl".into(),
                    "-s".into(),
                    "-w".into(),
                    " %{http_code}".into(),
                    "-H".into(),
                    "content-type: application/json".into(),
                    "-d".into(),
                    body.to_string(),
                    u1.clone(),
                ]
            }),
        ),
        (
            "requests",
            Box::new(move |body: &str| {
                vec![
                    "python3".into(),
                    "-c".into(),
                    format!(
                        "import requests; r = requests.post({u3:?}, data={body:?}, headers={{'content-type': 'application/json'}}); print(r.text, r.status_code)"
                    ),
                ]
            }),
        ),
        (
            "httpx",
            Box::new(move |body: &str| {
                vec![
                    "python3".into(),
                    "-c".into(),
                    format!(
                        "import httpx, sys; r = httpx.post({u2:?}, content={body:?}, headers={{'content-type': 'application/json'}}); print(r.text, r.status_code)"
                    ),
                ]
            }),
        ),
    ];
    for (name, argv) in &clients {
        if *name == "httpx" && !python_has("httpx") {
            assert!(!services_required(), "python3 module httpx is required in CI");
            continue;
        }
        for (body, expect_code, expect_text) in [
            (chat("gpt-4o-mini", 10), "200", "chatcmpl-1"),
            (chat("o1-preview", 10), "403", "policy_denied"),
            (chat("gpt-4o-mini", 100000), "429", "budget_exhausted"),
        ] {
            let args = argv(&body);
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = s.run(&refs).output().await.unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            assert!(
                text.trim_end().ends_with(expect_code) && text.contains(expect_text),
                "{name}: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert_eq!(seen.lock().unwrap().last().unwrap(), "Bearer sk-openai-real", "{name}");
    }

    // Node's fetch with undici's EnvHttpProxyAgent (the documented way to honour HTTPS_PROXY),
    // trusting NODE_EXTRA_CA_CERTS: success, denial, budget exhaustion.
    let node_modules = std::env::var("CARACAL_NODE_MODULES").unwrap_or_else(|_| {
        format!(
            "{}/.cache/caracal-ci/node/node_modules",
            std::env::var("HOME").unwrap_or_default()
        )
    });
    let have_node = std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if have_node && std::path::Path::new(&node_modules).join("undici").exists() {
        for (body, expect_code, expect_text) in [
            (chat("gpt-4o-mini", 10), "200", "chatcmpl-1"),
            (chat("o1-preview", 10), "403", "policy_denied"),
            (chat("gpt-4o-mini", 100000), "429", "budget_exhausted"),
        ] {
            let script = format!(
                "const {{ EnvHttpProxyAgent, setGlobalDispatcher }} = require('undici');\n\
                 setGlobalDispatcher(new EnvHttpProxyAgent());\n\
                 fetch({url:?}, {{ method: 'POST', headers: {{ 'content-type': 'application/json' }}, body: {body:?} }})\n\
                 .then(async r => console.log(await r.text(), r.status)).catch(e => {{ console.error(e); process.exit(2); }});\n"
            );
            let mut cmd = s.run(&["node", "-e", &script]);
            cmd.env("NODE_PATH", &node_modules);
            let out = cmd.output().await.unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            assert!(
                text.trim_end().ends_with(expect_code) && text.contains(expect_text),
                "node: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert_eq!(seen.lock().unwrap().last().unwrap(), "Bearer sk-openai-real", "node");
    } else {
        assert!(
            !(have_node && services_required()),
            "undici is required in CI when Node is present"
        );
        eprintln!("SKIPPED: Node or undici not available");
    }

    // Revocation mid-run, for each stack: a long-running agent is refused from the moment its
    // session is revoked, without a restart. Each program prints the status of every call and,
    // on a 403, the error, then exits 0.
    let mut programs: Vec<(&str, Vec<String>)> = vec![
        (
            "requests",
            vec![
                "python3".into(),
                "-c".into(),
                format!(
                    "import requests, sys, time\n\
                 for i in range(400):\n    r = requests.get('{api}/v1/models')\n    print(r.status_code, flush=True)\n    \
                 if r.status_code == 403:\n        print(r.json()['error']['code'], flush=True)\n        sys.exit(0)\n    time.sleep(0.05)\n\
                 sys.exit(1)\n"
                ),
            ],
        ),
        (
            "curl",
            vec![
                "sh".into(),
                "-c".into(),
                format!(
                    "f=$(mktemp); for i in $(seq 1 400); do c=$(curl -s -o \"$f\" -w '%{{http_code}}' {api}/v1/models); echo $c; \
                 if [ \"$c\" = 403 ]; then cat \"$f\"; echo; exit 0; fi; sleep 0.05; done; exit 1"
                ),
            ],
        ),
        (
            "httpx",
            vec![
                "python3".into(),
                "-c".into(),
                format!(
                    "import httpx, sys, time\nc = httpx.Client()\n\
                 for i in range(400):\n    r = c.post('{base}/chat/completions', json={{'model': 'gpt-4o-mini', 'max_tokens': 5, 'messages': []}})\n    \
                 print(r.status_code, flush=True)\n    if r.status_code == 403:\n        print(r.text, flush=True)\n        sys.exit(0)\n    time.sleep(0.05)\n\
                 sys.exit(1)\n"
                ),
            ],
        ),
        (
            "openai",
            vec![
                "python3".into(),
                "-c".into(),
                format!(
                    "import sys, time\nfrom openai import OpenAI, PermissionDeniedError\n\
                 c = OpenAI(api_key='x', base_url='{base}', max_retries=0)\n\
                 for i in range(400):\n    try:\n        c.chat.completions.create(model='gpt-4o-mini', max_tokens=5, messages=[])\n        print(200, flush=True)\n    \
                 except PermissionDeniedError as e:\n        print(403, flush=True)\n        print(str(e), e.body, flush=True)\n        sys.exit(0)\n    time.sleep(0.05)\n\
                 sys.exit(1)\n"
                ),
            ],
        ),
    ];
    if have_node && std::path::Path::new(&node_modules).join("undici").exists() {
        programs.push((
            "node",
            vec!["node".into(), "-e".into(), format!(
                "const {{ EnvHttpProxyAgent, setGlobalDispatcher }} = require('undici');\n\
                 setGlobalDispatcher(new EnvHttpProxyAgent());\n\
                 (async () => {{ for (let i = 0; i < 400; i++) {{\n\
                 let r;\n\
                 try {{ r = await fetch('{api}/v1/models'); }} catch (e) {{\n\
                 // undici tunnels even plain HTTP: a refused CONNECT surfaces as the proxy's status.\n\
                 // undici reports a refused tunnel as an aborted request: check it stays refused.\n\
                 console.log(String(e.cause && e.cause.message));\n\
                 for (let j = 0; j < 5; j++) {{ await new Promise(res => setTimeout(res, 50));\n\
                 try {{ const again = await fetch('{api}/v1/models'); console.log(again.status); process.exit(1); }} catch (_) {{}} }}\n\
                 console.log('refused'); process.exit(0); }}\n\
                 console.log(r.status);\n\
                 if (r.status === 403) {{ console.log(await r.text()); process.exit(0); }}\n\
                 await new Promise(res => setTimeout(res, 50)); }} process.exit(1); }})();\n"
            )],
        ));
    }
    for (name, argv) in programs {
        let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
        let mut cmd = s.run(&refs);
        cmd.env("NODE_PATH", &node_modules);
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line()).await;
        assert!(matches!(&first, Ok(Ok(Some(l))) if l == "200"), "{name}: {first:?}");
        let running = s
            .sessions()
            .await
            .into_iter()
            .find(|x| x["status"] == "active")
            .expect("the running agent's session");
        let sid = running["id"].as_str().unwrap().to_string();
        let auth = format!("Bearer {}", s.env.admin);
        let r = s
            .env
            .client
            .send_json(
                Method::POST,
                &format!("{}/v1/revocations", s.coordinator),
                &[("authorization", &auth), ("x-caracal-tenant", &s.env.tenant)],
                &json!({"kind": "session", "value": sid, "reason": "test"}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let mut rest = Vec::new();
        while let Ok(Ok(Some(l))) = tokio::time::timeout(Duration::from_secs(20), lines.next_line()).await {
            rest.push(l);
        }
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            use tokio::io::AsyncReadExt;
            let _ = e.read_to_string(&mut err).await;
        }
        let status = child.wait().await.unwrap();
        // The gateway's reason where the client exposes it; a refused CONNECT otherwise (undici
        // reports the proxy's status only).
        let refused = rest.iter().any(|l| l.contains("mandate_revoked"))
            || (name == "node" && rest.last().is_some_and(|l| l == "refused"));
        assert!(refused, "{name}: {rest:?} {err}");
        assert_eq!(status.code(), Some(0), "{name}: the agent saw the refusal: {rest:?}");
    }

    // Signals reach the child.
    let mut child = s.run(&["sleep", "30"]).spawn().unwrap();
    assert!(
        eventually(Duration::from_secs(10), || async {
            s.sessions().await.iter().any(|x| x["status"] == "active")
        })
        .await
    );
    // SAFETY: signalling the child we spawned.
    unsafe {
        libc::kill(child.id().unwrap() as i32, libc::SIGTERM);
    }
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        status.code(),
        Some(128 + libc::SIGTERM),
        "the child's termination is reported"
    );

    // Without a credential, nothing runs.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_caracal"))
        .args(["run", "--", "true"])
        .env_remove("CARACAL_API_KEY")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("CARACAL_API_KEY"));
    s.env.stop().await;
}

/// `caracal run --cert --key`: the workload authenticates with its client certificate at the
/// STS's TLS listener (an mTLS identity mapped to an agent), no API key anywhere.
async fn an_mtls_identity_is_a_workload_credential(b: Backend) {
    let server_ca = Ca::new("sts server ca");
    let server = server_ca.server(&["localhost", "127.0.0.1"]);
    let dir = std::env::temp_dir().join(format!("caracal-run-mtls-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cert.pem"), &server.cert_pem).unwrap();
    std::fs::write(dir.join("key.pem"), &server.key_pem).unwrap();
    std::fs::write(dir.join("sts-ca.pem"), server_ca.pem()).unwrap();
    let port = caracal_shared::testing::free_port();
    let d2 = dir.clone();
    let env = start(b, move |c| {
        c.sts.tls_listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
        c.sts.tls_cert = Some(d2.join("cert.pem"));
        c.sts.tls_key = Some(d2.join("key.pem"));
    })
    .await;
    let Some(env) = env else { return };
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let coordinator = format!("http://{}", l.local_addr().unwrap());
    let rt = env.rt.clone();
    tokio::spawn(async move { caracal_coordinator::serve(rt, l).await });
    // A workload CA and an identity mapping its SPIFFE id to the test agent.
    let client_ca = Ca::new("corp workloads");
    let ca = env
        .api(
            Method::POST,
            "/v1/mtls-cas",
            Some(json!({"name": "corp", "ca_pem": client_ca.pem()})),
        )
        .await
        .json_value();
    let r = env
        .api(
            Method::POST,
            &format!("/v1/agents/{}/identities", env.agent),
            Some(json!({"kind": "mtls", "ca_id": ca["id"], "match": "san_uri", "subject": "spiffe://corp/agent"})),
        )
        .await;
    assert!(r.status.is_success(), "{}", r.text());
    let leaf = client_ca.client("spiffe://corp/agent", "agent");
    std::fs::write(dir.join("client.pem"), &leaf.cert_pem).unwrap();
    std::fs::write(dir.join("client.key"), &leaf.key_pem).unwrap();
    let api = env.api_url();
    let run = || {
        let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_caracal"));
        c.args(["run", "--cert"])
            .arg(dir.join("client.pem"))
            .arg("--key")
            .arg(dir.join("client.key"))
            .arg("--sts-ca")
            .arg(dir.join("sts-ca.pem"))
            .args(["--", "curl", "-sS", &format!("{api}/v1/models")])
            .env("CARACAL_GATEWAY", env.proxy.to_string())
            .env("CARACAL_GATEWAY_ADMIN_URL", format!("http://{}", env.admin_addr))
            .env("CARACAL_STS_URL", format!("https://127.0.0.1:{port}"))
            .env("CARACAL_COORDINATOR_URL", &coordinator)
            .env_remove("CARACAL_API_KEY");
        c
    };
    // The STS picks the new CA up within its refresh interval.
    let last = std::sync::Mutex::new(String::new());
    let ok = eventually(Duration::from_secs(45), || {
        let out = run().output();
        let last = &last;
        async move {
            let out = out.await.unwrap();
            let text = format!(
                "{} {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let ok = out.status.success() && text.contains("\"ok\":true");
            *last.lock().unwrap() = text;
            ok
        }
    })
    .await;
    assert!(ok, "{}", last.lock().unwrap());
    assert_eq!(
        env.upstream.last().headers["authorization"],
        "Bearer sk-upstream-secret-42"
    );
    // A certificate from another CA gets nothing.
    let stranger = Ca::new("stranger").client("spiffe://corp/agent", "agent");
    std::fs::write(dir.join("client.pem"), &stranger.cert_pem).unwrap();
    std::fs::write(dir.join("client.key"), &stranger.key_pem).unwrap();
    let out = run().output().await.unwrap();
    assert_eq!(out.status.code(), Some(125), "{}", String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(dir);
    env.stop().await;
}
