//! Control + STS + gateway on one runtime, a loopback echo upstream, and a stub resolver that
//! maps test names to loopback canaries (or to private addresses the guard must refuse —
//! refused before any connect, so no packet ever leaves the machine).
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use caracal_shared::config::{BusBackend, Config};
use caracal_shared::egress::Resolver;
use caracal_shared::http::client::{ClientResponse, HttpClient};
use caracal_shared::runtime::Runtime;
use caracal_shared::shutdown::Shutdown;
use caracal_shared::testing::{self, Backend, TestDb};
use http::Method;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

/// Names → addresses, changeable during a test.
#[derive(Default)]
pub struct StubResolver {
    pub map: Mutex<HashMap<String, Vec<IpAddr>>>,
    pub calls: AtomicUsize,
}

impl StubResolver {
    pub fn set(&self, name: &str, ips: &[&str]) {
        self.map
            .lock()
            .unwrap()
            .insert(name.to_string(), ips.iter().map(|i| i.parse().unwrap()).collect());
    }
}

#[async_trait]
impl Resolver for StubResolver {
    async fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match self.map.lock().unwrap().get(host) {
            Some(ips) => Ok(ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect()),
            None => Err(std::io::Error::other("no such test name")),
        }
    }
}

/// What the echo upstream saw.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    pub method: String,
    pub target: String,
    pub headers: HashMap<String, String>,
    pub body: Bytes,
}

pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    pub fn last(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("the upstream was called")
    }
    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

/// A response body fed by a channel (a slow stream).
pub struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl ChannelBody {
    pub fn new(rx: tokio::sync::mpsc::Receiver<Bytes>) -> Self {
        ChannelBody(rx)
    }
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

/// An HTTP upstream that records each request and answers JSON (special paths: `/redirect`
/// answers a redirect to the metadata address; `/status/<n>` answers that status; `/stream`
/// streams a chunk every 50 ms; `/slow` answers after 3 s).
pub async fn upstream() -> Upstream {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let s2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = l.accept().await else { continue };
            let seen = s2.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let seen = seen.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
                        // A field sent on several lines is seen as its one comma-joined list
                        // (RFC 9110 §5.3), so a duplicate shows.
                        let mut headers: HashMap<String, String> = HashMap::new();
                        for (k, v) in &parts.headers {
                            let v = v.to_str().unwrap_or("");
                            headers
                                .entry(k.to_string())
                                .and_modify(|l| {
                                    l.push_str(", ");
                                    l.push_str(v);
                                })
                                .or_insert_with(|| v.to_string());
                        }
                        let target = parts.uri.to_string();
                        seen.lock().unwrap().push(Seen {
                            method: parts.method.to_string(),
                            target: target.clone(),
                            headers,
                            body: body.clone(),
                        });
                        if target.ends_with("/stream") {
                            // One chunk every 50 ms, at most 200 (bounded in time).
                            let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
                            tokio::spawn(async move {
                                for i in 0..200 {
                                    if tx.send(Bytes::from(format!("data: {i}\n\n"))).await.is_err() {
                                        return;
                                    }
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                }
                            });
                            let mut resp = http::Response::new(ChannelBody(rx).boxed());
                            resp.headers_mut()
                                .insert("content-type", "text/event-stream".parse().unwrap());
                            return Ok::<_, Infallible>(resp);
                        }
                        if target.ends_with("/slow") {
                            tokio::time::sleep(Duration::from_secs(3)).await;
                        }
                        let mut resp = http::Response::new(
                            Full::new(Bytes::from(
                                json!({"ok": true, "target": target, "len": body.len()}).to_string(),
                            ))
                            .boxed(),
                        );
                        if target.ends_with("/redirect") {
                            *resp.status_mut() = http::StatusCode::FOUND;
                            resp.headers_mut()
                                .insert("location", "http://169.254.169.254/latest/meta-data/".parse().unwrap());
                        }
                        if let Some(code) = target.strip_prefix("/status/") {
                            *resp.status_mut() = http::StatusCode::from_u16(code.parse().unwrap_or(500)).unwrap();
                        }
                        resp.headers_mut()
                            .insert("content-type", "application/json".parse().unwrap());
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    Upstream { addr, seen }
}

pub struct Env {
    pub rt: Runtime,
    pub db: Option<TestDb>,
    pub sd: Shutdown,
    pub control: String,
    pub admin: String,
    pub tenant: String,
    pub gw: Option<caracal_gateway::GatewayHandle>,
    pub proxy: SocketAddr,
    pub admin_addr: SocketAddr,
    pub resolver: Arc<StubResolver>,
    pub client: HttpClient,
    pub upstream: Upstream,
    /// An agent with a grant on `api` (resource at http://api.test:<upstream port>).
    pub key: String,
    pub agent: String,
    pub resource: String,
    pub policy: String,
}

pub const POLICY: &str = r#"
rules:
  - id: read
    methods: [GET, HEAD]
    paths: ["/v1/**"]
  - id: chat
    methods: [POST]
    paths: ["/v1/chat/completions"]
    models: ["gpt-4o-mini", "gpt-4o"]
  - id: tunnel
    methods: [CONNECT]
  - id: no-admin
    effect: deny
    paths: ["/v1/admin/**"]
"#;

/// Control-plane calls with the platform token (in `tenant` when given).
async fn admin_call(
    c: &HttpClient,
    control: &str,
    admin: &str,
    tenant: Option<&str>,
    m: Method,
    path: &str,
    body: Value,
) -> Value {
    let auth = format!("Bearer {admin}");
    let mut h = vec![("authorization", auth.as_str())];
    if let Some(t) = tenant {
        h.push(("x-caracal-tenant", t));
    }
    let r = c.send_json(m, &format!("{control}{path}"), &h, &body).await.unwrap();
    assert!(r.status.is_success(), "{path}: {}", r.text());
    r.json_value()
}

pub async fn start(backend: Backend, tweak: impl FnOnce(&mut Config)) -> Option<Env> {
    start_with_bus(backend, tweak, |b| b).await
}

/// [`start`] with a sidecar listener bound to the resource named `resource` of the test tenant
/// (which need not exist yet); the sidecar's port.
pub async fn start_with_sidecar(backend: Backend, resource: &str) -> Option<(Env, u16)> {
    let port = caracal_shared::testing::free_port();
    let resource = resource.to_string();
    let env = start(backend, move |c| {
        c.gateway.sidecars = vec![caracal_shared::config::SidecarConfig {
            listen: format!("127.0.0.1:{port}"),
            tenant: "acme".into(),
            resource,
        }];
    })
    .await?;
    Some((env, port))
}

/// Like [`start`], with the runtime's bus wrapped (fault injection).
pub async fn start_with_bus(
    backend: Backend,
    tweak: impl FnOnce(&mut Config),
    wrap: impl FnOnce(Arc<dyn caracal_shared::bus::Bus>) -> Arc<dyn caracal_shared::bus::Bus>,
) -> Option<Env> {
    caracal_shared::telemetry::init_for_tests();
    let db = TestDb::new(backend).await?;
    let bus = match backend {
        Backend::Sqlite => BusBackend::Embedded,
        Backend::Postgres => BusBackend::Redis,
    };
    if bus == BusBackend::Redis {
        testing::test_bus(BusBackend::Redis, &db.store).await?;
    }
    let mut cfg = testing::test_config(&db.url, bus);
    let sts_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    cfg.gateway.sts_url = format!("http://{}", sts_l.local_addr().unwrap());
    cfg.gateway.dns_ttl = Duration::from_millis(200);
    cfg.data_dir = std::env::temp_dir().join(format!("caracal-gw-{}", uuid::Uuid::new_v4().simple()));
    tweak(&mut cfg);
    let sd = Shutdown::new();
    let rt = Runtime::start(cfg, sd.clone()).await.expect("runtime");
    let ring = rt.config.keys.bus.clone().unwrap();
    let rt = Runtime::from_parts(
        (*rt.config).clone(),
        rt.store.clone(),
        wrap(rt.bus.clone()),
        ring,
        sd.clone(),
    );
    rt.spawn_relay();
    let admin = caracal_control::bootstrap_admin_token(&rt).await.unwrap().unwrap();
    let cl = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let control = format!("http://{}", cl.local_addr().unwrap());
    let rt2 = rt.clone();
    tokio::spawn(async move { caracal_control::serve(rt2, cl).await });
    let rt3 = rt.clone();
    tokio::spawn(async move { caracal_sts::serve(rt3, sts_l).await });
    let client = HttpClient::unrestricted().with_timeout(Duration::from_secs(20));
    for base in [control.clone(), rt.config.gateway.sts_url.clone()] {
        let c = client.clone();
        assert!(
            testing::eventually(Duration::from_secs(15), || {
                let c = c.clone();
                let u = format!("{base}/readyz");
                async move { c.get(&u).await.map(|r| r.status == 200).unwrap_or(false) }
            })
            .await
        );
    }
    let upstream = upstream().await;
    let resolver = Arc::new(StubResolver::default());
    resolver.set("api.test", &["127.0.0.1"]);

    let tenant = admin_call(
        &client,
        &control,
        &admin,
        None,
        Method::POST,
        "/v1/tenants",
        json!({"name": "acme"}),
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let call = |m: Method, path: String, body: Value| {
        let (client, control, admin, tenant) = (client.clone(), control.clone(), admin.clone(), tenant.clone());
        async move { admin_call(&client, &control, &admin, Some(&tenant), m, &path, body).await }
    };
    let port = upstream.addr.port();
    let resource = call(
        Method::POST,
        "/v1/resources".into(),
        json!({
            "name": "api", "base_url": format!("http://api.test:{port}"), "inject": {"kind": "bearer"},
            "credential": {"value": "sk-upstream-secret-42"}, "settings": {"egress_allow": ["127.0.0.1/32"]}
        }),
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let policy = call(
        Method::POST,
        "/v1/policies".into(),
        json!({"name": "p", "document": POLICY, "activate": true}),
    )
    .await["policy"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let agent = call(Method::POST, "/v1/agents".into(), json!({"name": "bot"})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let key = call(Method::POST, format!("/v1/agents/{agent}/api-keys"), json!({})).await["secret"]
        .as_str()
        .unwrap()
        .to_string();
    call(
        Method::POST,
        "/v1/grants".into(),
        json!({"agent_id": agent, "resource_id": resource, "policy_id": policy, "scopes": ["*"]}),
    )
    .await;

    let proxy_port = caracal_shared::testing::free_port();
    let proxy: SocketAddr = format!("127.0.0.1:{proxy_port}").parse().unwrap();
    let admin_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin_l.local_addr().unwrap();
    let gw = caracal_gateway::start_with(rt.clone(), proxy, admin_l, resolver.clone())
        .await
        .expect("gateway");
    Some(Env {
        rt,
        db: Some(db),
        sd,
        control,
        admin,
        tenant,
        gw: Some(gw),
        proxy,
        admin_addr,
        resolver,
        client,
        upstream,
        key,
        agent,
        resource,
        policy,
    })
}

impl Env {
    pub async fn stop(mut self) {
        if let Some(g) = self.gw.take() {
            g.shutdown(caracal_gateway::Stop::Fast).await;
        }
        self.sd.trigger();
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.rt.store.close().await;
        let dir = self.rt.config.data_dir.clone();
        if let Some(db) = self.db.take() {
            db.cleanup().await;
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    pub fn api_url(&self) -> String {
        format!("http://api.test:{}", self.upstream.addr.port())
    }

    /// Grant `resource` (an id) to the test agent under `policy`, every scope.
    pub async fn grant(&self, resource: &str, policy: &str) {
        let g = self
            .api(
                Method::POST,
                "/v1/grants",
                Some(json!({"agent_id": self.agent, "resource_id": resource, "policy_id": policy, "scopes": ["*"]})),
            )
            .await;
        assert!(g.status.is_success(), "{}", g.text());
    }

    pub async fn api(&self, m: Method, path: &str, body: Option<Value>) -> ClientResponse {
        let auth = format!("Bearer {}", self.admin);
        let h = [
            ("authorization", auth.as_str()),
            ("x-caracal-tenant", self.tenant.as_str()),
        ];
        let url = format!("{}{path}", self.control);
        match body {
            Some(b) => self.client.send_json(m, &url, &h, &b).await.unwrap(),
            None => self.client.request(m, &url, &h, Default::default()).await.unwrap(),
        }
    }

    /// A mandate for the test agent (exchanged with the STS).
    pub async fn mandate(&self, extra: &[(&str, &str)]) -> String {
        let mut f = vec![
            ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
            ("subject_token_type", "urn:caracal:params:oauth:token-type:api-key"),
            ("subject_token", self.key.as_str()),
        ];
        f.extend_from_slice(extra);
        let r = self
            .client
            .post_form(&format!("{}/oauth/token", self.rt.config.gateway.sts_url), &[], &f)
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        r.json_value()["access_token"].as_str().unwrap().to_string()
    }

    /// Send one request through the forward proxy (absolute-form).
    pub async fn via_proxy(&self, method: &str, url: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
        proxy_request(self.proxy, method, url, headers, body).await
    }

    /// A request without a body through the forward proxy, carrying only `Proxy-Authorization`.
    pub async fn with_credential(&self, method: &str, url: &str, proxy_authorization: &str) -> Resp {
        self.via_proxy(method, url, &[("proxy-authorization", proxy_authorization)], b"")
            .await
    }

    pub fn basic(secret: &str) -> String {
        use base64::Engine as _;
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("agent:{secret}"))
        )
    }

    pub async fn audit(&self) -> Vec<caracal_shared::bus::Event> {
        let es = self
            .rt
            .bus
            .read_after(
                caracal_shared::bus::streams::AUDIT,
                "0",
                100_000,
                Duration::from_millis(5),
            )
            .await
            .unwrap();
        es.iter()
            .filter_map(|e| {
                self.rt
                    .bus_auth
                    .verify(caracal_shared::bus::streams::AUDIT, &e.id, e.payload.as_deref(), 0)
                    .ok()
            })
            .flat_map(caracal_shared::audit::expand)
            .collect()
    }

    /// Wait for a decision audit event matching `pred`.
    pub async fn audited(&self, pred: impl Fn(&Value) -> bool) -> bool {
        self.recorded("decision", pred).await
    }

    /// Wait for an audit event of `type` matching `pred`.
    pub async fn recorded(&self, kind: &str, pred: impl Fn(&Value) -> bool) -> bool {
        testing::eventually(Duration::from_secs(10), || async {
            self.audit()
                .await
                .iter()
                .any(|e| e.body["type"] == kind && pred(&e.body))
        })
        .await
    }
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    pub fn code(&self) -> String {
        self.json()["error"]["code"].as_str().unwrap_or("").to_string()
    }
}

pub async fn proxy_request(proxy: SocketAddr, method: &str, url: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
    let stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let uri: http::Uri = url.parse().unwrap();
    let mut b = http::Request::builder().method(method).uri(uri.clone());
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        b = b.header("host", uri.authority().unwrap().as_str());
    }
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = send
        .send_request(b.body(Full::new(Bytes::copy_from_slice(body))).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    Resp {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    }
}

/// An OpenAI-compatible mock over HTTPS (certificate for llm.test from `ca`); records the
/// Authorization header of each call.
pub async fn https_llm(ca: &caracal_shared::testing::pki::Ca) -> (std::net::SocketAddr, Arc<Mutex<Vec<String>>>) {
    https_llm_on(ca, "llm.test", "127.0.0.1:0").await.expect("bind")
}

/// The same mock with a certificate for `host`, listening on `bind` (None when it cannot).
pub async fn https_llm_on(
    ca: &caracal_shared::testing::pki::Ca,
    host: &str,
    bind: &str,
) -> Option<(std::net::SocketAddr, Arc<Mutex<Vec<String>>>)> {
    let leaf = ca.server(&[host]);
    let (chain, key) = leaf.identity();
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = tokio::net::TcpListener::bind(bind).await.ok()?;
    let addr = l.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let s2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { continue };
            let (acceptor, seen) = (acceptor.clone(), s2.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else { return };
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let seen = seen.clone();
                    async move {
                        let auth = req
                            .headers()
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string();
                        seen.lock().unwrap().push(auth);
                        let _ = req.into_body().collect().await;
                        let out = json!({
                            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
                            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hi"}}],
                            "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
                        });
                        let mut r = http::Response::new(Full::new(Bytes::from(out.to_string())));
                        r.headers_mut()
                            .insert("content-type", "application/json".parse().unwrap());
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = http1::Builder::new().serve_connection(TokioIo::new(tls), svc).await;
            });
        }
    });
    Some((addr, seen))
}

/// A Python server (`python3 -c script port args…`) listening on a free loopback port, once it
/// accepts connections; killed when the handle is dropped. Its port.
pub async fn python_server(script: &str, args: &[&str]) -> (tokio::process::Child, u16) {
    let port = caracal_shared::testing::free_port();
    let child = tokio::process::Command::new("python3")
        .args(["-c", script, &port.to_string()])
        .args(args)
        .kill_on_drop(true)
        .spawn()
        .expect("python3");
    assert!(
        caracal_shared::testing::eventually(Duration::from_secs(20), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
        })
        .await,
        "the Python server listens"
    );
    (child, port)
}

/// Run `python3 -c script args…` (no proxy from the environment unless the script asks for
/// one): whether it succeeded, and its stdout then stderr.
pub async fn python_run(script: &str, args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new("python3")
        .args(["-c", script])
        .args(args)
        .env("NO_PROXY", "")
        .output()
        .await
        .expect("python3");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Whether python3 can import `module`.
pub fn python_has(module: &str) -> bool {
    std::process::Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}
