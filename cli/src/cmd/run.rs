//! `caracal run -- CMD [ARGS…]`: run an agent process under authority, unchanged.
//!
//! 1. Authenticates the workload (an API key from `CARACAL_API_KEY` or `--api-key-file`),
//!    obtains a mandate from the STS, starts a session with the coordinator, and from then on
//!    holds a mandate **bound to that session** (revoking the session refuses the child).
//! 2. Serves a loopback relay (`127.0.0.1:<port>`) and starts the child with
//!    `HTTP_PROXY`/`HTTPS_PROXY` (both cases) pointing at it, `NO_PROXY` for loopback, and a CA
//!    bundle (the system roots plus the gateway's interception CA) in `SSL_CERT_FILE`,
//!    `REQUESTS_CA_BUNDLE`, `NODE_EXTRA_CA_CERTS` and `CURL_CA_BUNDLE`. The relay forwards every
//!    request and CONNECT to the gateway with the **current** mandate in
//!    `Proxy-Authorization`, so the child keeps working across renewals without a restart.
//! 3. Renews the mandate before it expires, heartbeats the session, forwards SIGINT/SIGTERM to
//!    the child, ends the session when the child exits (completed on exit 0, failed otherwise)
//!    and returns the child's exit code.
//!
//! It is lifecycle-only: it holds a workload credential, never an admin token, so it cannot
//! change policy, grants or budgets.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use caracal_shared::http::client::HttpClient;
use clap::Args;
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The gateway's forward proxy.
    #[arg(long, env = "CARACAL_GATEWAY", default_value = "127.0.0.1:7400")]
    gateway: String,
    /// The gateway's admin listener (serves the interception CA at /ca.pem).
    #[arg(long, env = "CARACAL_GATEWAY_ADMIN_URL", default_value = "http://127.0.0.1:7401")]
    gateway_admin: String,
    /// The STS.
    #[arg(long, env = "CARACAL_STS_URL", default_value = "http://127.0.0.1:7403")]
    sts: String,
    /// The coordinator.
    #[arg(long, env = "CARACAL_COORDINATOR_URL", default_value = "http://127.0.0.1:7404")]
    coordinator: String,
    /// A file holding the workload's API key (else CARACAL_API_KEY).
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// Authenticate with an mTLS identity instead: the workload's certificate (PEM; with
    /// --key), presented to the STS's TLS listener (--sts https://…).
    #[arg(long, env = "CARACAL_CLIENT_CERT", requires = "key")]
    cert: Option<PathBuf>,
    #[arg(long, env = "CARACAL_CLIENT_KEY", requires = "cert")]
    key: Option<PathBuf>,
    /// CA bundle (PEM) to verify the STS's TLS listener (else the public roots).
    #[arg(long, env = "CARACAL_STS_CA")]
    sts_ca: Option<PathBuf>,
    /// The interception CA bundle (else fetched from the gateway's admin listener).
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Mandate lifetime to ask for, seconds (renewed well before it ends).
    #[arg(long, default_value_t = 300)]
    lifetime: u64,
    /// Labels for the session (key=value, repeatable).
    #[arg(long = "label")]
    labels: Vec<String>,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("caracal run: {msg}");
    ExitCode::from(125)
}

/// The workload credential `caracal run` authenticates with.
enum Cred {
    ApiKey(String),
    /// A client certificate (the TLS client carries it).
    Mtls,
}

struct Ctx {
    sts: String,
    coordinator: String,
    cred: Cred,
    lifetime: u64,
    client: HttpClient,
    /// The client for the STS (with the workload's certificate under mTLS).
    sts_client: HttpClient,
}

impl Ctx {
    async fn mint(&self, session: Option<&str>) -> Result<(String, i64), String> {
        let lifetime = self.lifetime.to_string();
        let mut f = vec![
            ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
            ("lifetime", lifetime.as_str()),
        ];
        match &self.cred {
            Cred::ApiKey(k) => {
                f.push(("subject_token_type", "urn:caracal:params:oauth:token-type:api-key"));
                f.push(("subject_token", k.as_str()));
            }
            Cred::Mtls => f.push(("subject_token_type", "urn:caracal:params:oauth:token-type:mtls")),
        }
        if let Some(s) = session {
            f.push(("session_id", s));
        }
        let r = self
            .sts_client
            .post_form(&format!("{}/oauth/token", self.sts.trim_end_matches('/')), &[], &f)
            .await
            .map_err(|e| format!("the STS at {} is unreachable: {}", self.sts, e.message))?;
        let v = r.json_value();
        if !r.status.is_success() {
            return Err(format!(
                "the STS refused: {} {}",
                v["error"].as_str().unwrap_or(""),
                v["error_description"].as_str().unwrap_or("")
            ));
        }
        Ok((
            v["access_token"].as_str().unwrap_or("").to_string(),
            v["expires_in"].as_i64().unwrap_or(60),
        ))
    }

    async fn coord(&self, path: &str, mandate: &str, body: Value) -> Result<Value, String> {
        let r = self
            .client
            .send_json(
                http::Method::POST,
                &format!("{}{path}", self.coordinator.trim_end_matches('/')),
                &[("authorization", &format!("Bearer {mandate}"))],
                &body,
            )
            .await
            .map_err(|e| format!("the coordinator at {} is unreachable: {}", self.coordinator, e.message))?;
        let v = r.json_value();
        if !r.status.is_success() {
            return Err(format!(
                "{} {}",
                v["error"]["code"].as_str().unwrap_or(""),
                v["error"]["message"].as_str().unwrap_or("")
            ));
        }
        Ok(v)
    }
}

/// The system roots (when found) followed by the gateway's CA.
fn ca_bundle(gateway_ca: &str) -> String {
    let mut out = String::new();
    for p in [
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
        "/etc/ssl/cert.pem",
    ] {
        if let Ok(s) = std::fs::read_to_string(p) {
            out.push_str(&s);
            if !out.ends_with('\n') {
                out.push('\n');
            }
            break;
        }
    }
    out.push_str(gateway_ca);
    out
}

pub fn run(a: RunArgs) -> ExitCode {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(run_async(a))
}

async fn run_async(a: RunArgs) -> ExitCode {
    // Handle SIGINT/SIGTERM from the start (forwarded to the child once it runs).
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
        return fail("cannot handle signals");
    };
    let client = HttpClient::unrestricted().with_timeout(Duration::from_secs(30));
    let (cred, sts_client) = match (&a.cert, &a.key) {
        (Some(cert), Some(key)) => {
            use rustls_pki_types::pem::PemObject;
            let chain: Vec<rustls_pki_types::CertificateDer<'static>> =
                match rustls_pki_types::CertificateDer::pem_file_iter(cert)
                    .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                {
                    Ok(c) if !c.is_empty() => c,
                    _ => return fail(format!("cannot read a certificate from {}", cert.display())),
                };
            let Ok(pk) = rustls_pki_types::PrivateKeyDer::from_pem_file(key) else {
                return fail(format!("cannot read a private key from {}", key.display()));
            };
            let ca = match &a.sts_ca {
                Some(p) => match std::fs::read(p) {
                    Ok(b) => Some(b),
                    Err(e) => return fail(format!("cannot read {}: {e}", p.display())),
                },
                None => None,
            };
            match caracal_shared::http::client::tls_client_config(ca.as_deref(), Some((chain, pk))) {
                Ok(tls) => (Cred::Mtls, client.clone().with_tls(tls)),
                Err(e) => return fail(format!("TLS client setup: {e}")),
            }
        }
        _ => {
            let key = match &a.api_key_file {
                Some(p) => match std::fs::read_to_string(p) {
                    Ok(s) => s.trim().to_string(),
                    Err(e) => return fail(format!("cannot read {}: {e}", p.display())),
                },
                None => match std::env::var("CARACAL_API_KEY") {
                    Ok(k) if !k.trim().is_empty() => k.trim().to_string(),
                    _ => {
                        return fail(
                            "no workload credential: set CARACAL_API_KEY, --api-key-file, or --cert and --key",
                        );
                    }
                },
            };
            (Cred::ApiKey(key), client.clone())
        }
    };
    let gateway: SocketAddr = match tokio::net::lookup_host(&a.gateway)
        .await
        .ok()
        .and_then(|mut i| i.next())
    {
        Some(g) => g,
        None => return fail(format!("cannot resolve the gateway address {}", a.gateway)),
    };
    let ctx = Arc::new(Ctx {
        sts: a.sts.clone(),
        coordinator: a.coordinator.clone(),
        cred,
        lifetime: a.lifetime.clamp(30, 86_400),
        client,
        sts_client,
    });
    // Session first (with an unbound mandate), then a mandate bound to it.
    let (first, _) = match ctx.mint(None).await {
        Ok(m) => m,
        Err(e) => return fail(e),
    };
    let mut labels = serde_json::Map::new();
    for l in &a.labels {
        match l.split_once('=') {
            Some((k, v)) => {
                labels.insert(k.to_string(), Value::String(v.to_string()));
            }
            None => return fail(format!("labels are key=value: {l:?}")),
        }
    }
    labels.insert(
        "command".into(),
        Value::String(a.command[0].chars().take(200).collect()),
    );
    let session = match ctx.coord("/v1/sessions", &first, json!({ "labels": labels })).await {
        Ok(v) => v,
        Err(e) => return fail(format!("cannot start a session: {e}")),
    };
    let sid = session["id"].as_str().unwrap_or("").to_string();
    let hb_ms = session["heartbeat_timeout_ms"].as_i64().unwrap_or(120_000).max(3000);
    let (mandate, expires_in) = match ctx.mint(Some(&sid)).await {
        Ok(m) => m,
        Err(e) => return fail(e),
    };
    let current = Arc::new(RwLock::new(mandate));

    // The CA bundle for the child.
    let gateway_ca = match &a.ca_file {
        Some(p) => std::fs::read_to_string(p).unwrap_or_default(),
        None => match ctx
            .client
            .get(&format!("{}/ca.pem", a.gateway_admin.trim_end_matches('/')))
            .await
        {
            Ok(r) if r.status.is_success() => r.text(),
            _ => {
                eprintln!("caracal run: the gateway's CA was not available; intercepted HTTPS will not verify");
                String::new()
            }
        },
    };
    let dir = std::env::temp_dir().join(format!("caracal-run-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let bundle = dir.join("ca-bundle.pem");
    if let Err(e) = std::fs::write(&bundle, ca_bundle(&gateway_ca)) {
        return fail(format!("cannot write {}: {e}", bundle.display()));
    }

    // The relay.
    let listener = match TcpListener::bind("127.0.0.1:0").await {
        Ok(l) => l,
        Err(e) => return fail(format!("cannot listen on loopback: {e}")),
    };
    let relay_addr = listener.local_addr().expect("local addr");
    {
        let current = current.clone();
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else { continue };
                let _ = s.set_nodelay(true);
                let current = current.clone();
                tokio::spawn(async move { serve_relay(s, gateway, current).await });
            }
        });
    }

    // Renewal and heartbeats.
    {
        let (ctx, current, sid) = (ctx.clone(), current.clone(), sid.clone());
        tokio::spawn(async move {
            let mut renew_in = Duration::from_secs((expires_in.max(10) as u64) * 3 / 5);
            let heartbeat = Duration::from_millis((hb_ms / 3) as u64);
            let mut next_renew = tokio::time::Instant::now() + renew_in;
            loop {
                tokio::time::sleep(heartbeat.min(next_renew.saturating_duration_since(tokio::time::Instant::now())))
                    .await;
                let m = current.read().unwrap_or_else(|p| p.into_inner()).clone();
                if let Err(e) = ctx.coord(&format!("/v1/sessions/{sid}/heartbeat"), &m, json!({})).await {
                    tracing::debug!(error = %e, "session heartbeat refused");
                }
                if tokio::time::Instant::now() >= next_renew {
                    match ctx.mint(Some(&sid)).await {
                        Ok((m, exp)) => {
                            *current.write().unwrap_or_else(|p| p.into_inner()) = m;
                            renew_in = Duration::from_secs((exp.max(10) as u64) * 3 / 5);
                        }
                        // Revoked or ended: keep the old mandate (the gateway refuses it).
                        Err(e) => {
                            eprintln!("caracal run: mandate renewal refused: {e}");
                            renew_in = Duration::from_secs(5);
                        }
                    }
                    next_renew = tokio::time::Instant::now() + renew_in;
                }
            }
        });
    }

    // The child.
    let proxy = format!("http://{relay_addr}");
    let mut cmd = tokio::process::Command::new(&a.command[0]);
    cmd.args(&a.command[1..])
        .env("HTTP_PROXY", &proxy)
        .env("HTTPS_PROXY", &proxy)
        .env("http_proxy", &proxy)
        .env("https_proxy", &proxy)
        .env("NO_PROXY", "localhost,127.0.0.1,::1")
        .env("no_proxy", "localhost,127.0.0.1,::1")
        .env("SSL_CERT_FILE", &bundle)
        .env("REQUESTS_CA_BUNDLE", &bundle)
        .env("CURL_CA_BUNDLE", &bundle)
        .env("NODE_EXTRA_CA_CERTS", &bundle)
        .env("CARACAL_SESSION_ID", &sid)
        .env_remove("CARACAL_API_KEY")
        .env_remove("CARACAL_ADMIN_TOKEN");
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot start {:?}: {e}", a.command[0])),
    };
    let pid = child.id().unwrap_or(0) as i32;
    let status = {
        loop {
            tokio::select! {
                s = child.wait() => break s,
                _ = int.recv() => forward(pid, libc::SIGINT),
                _ = term.recv() => forward(pid, libc::SIGTERM),
            }
        }
    };
    let code = match status {
        Ok(s) => s
            .code()
            .unwrap_or_else(|| 128 + std::os::unix::process::ExitStatusExt::signal(&s).unwrap_or(1)),
        Err(_) => 1,
    };
    // End the session (completed on success, failed otherwise).
    let m = current.read().unwrap_or_else(|p| p.into_inner()).clone();
    let end = if code == 0 { "complete" } else { "fail" };
    if let Err(e) = ctx
        .coord(
            &format!("/v1/sessions/{sid}/{end}"),
            &m,
            json!({ "reason": format!("exit code {code}") }),
        )
        .await
    {
        tracing::debug!(error = %e, "the session could not be ended (revoked or expired already)");
    }
    let _ = std::fs::remove_dir_all(&dir);
    ExitCode::from(code.clamp(0, 255) as u8)
}

fn forward(pid: i32, sig: i32) {
    if pid > 0 {
        // SAFETY: kill(2) with a pid we spawned and a valid signal number.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

fn auth(current: &RwLock<String>) -> String {
    format!("Bearer {}", current.read().unwrap_or_else(|p| p.into_inner()))
}

/// One connection from the child: requests go to the gateway with the current mandate.
async fn serve_relay(s: TcpStream, gateway: SocketAddr, current: Arc<RwLock<String>>) {
    let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
        let current = current.clone();
        async move { Ok::<_, std::convert::Infallible>(relay_one(req, gateway, current).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .preserve_header_case(true)
        .serve_connection(TokioIo::new(s), svc)
        .with_upgrades()
        .await;
}

type Body = BoxBody<Bytes, hyper::Error>;

fn plain(status: u16, msg: &str) -> http::Response<Body> {
    let body = json!({ "error": { "code": "relay_error", "message": msg } }).to_string();
    let mut r = http::Response::new(
        http_body_util::Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::BAD_GATEWAY);
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

async fn relay_one(
    mut req: http::Request<Incoming>,
    gateway: SocketAddr,
    current: Arc<RwLock<String>>,
) -> http::Response<Body> {
    let proxy_auth = auth(&current);
    if req.method() == http::Method::CONNECT {
        let authority = req.uri().authority().map(|a| a.to_string()).unwrap_or_default();
        let mut up = match TcpStream::connect(gateway).await {
            Ok(s) => s,
            Err(_) => return plain(502, "the gateway is unreachable"),
        };
        let _ = up.set_nodelay(true);
        let head =
            format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\nProxy-Authorization: {proxy_auth}\r\n\r\n");
        if up.write_all(head.as_bytes()).await.is_err() {
            return plain(502, "the gateway closed the connection");
        }
        // Read the gateway's answer head.
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 1024];
        loop {
            let n = match up.read(&mut chunk).await {
                Ok(0) | Err(_) => return plain(502, "the gateway closed the connection"),
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_string();
                let status: u16 = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(502);
                if status != 200 {
                    // Pass the refusal on as it is (status and JSON body).
                    let body = buf[end + 4..].to_vec();
                    let mut r = http::Response::new(
                        http_body_util::Full::new(Bytes::from(body))
                            .map_err(|never| match never {})
                            .boxed(),
                    );
                    *r.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::BAD_GATEWAY);
                    r.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/json"),
                    );
                    return r;
                }
                let early = buf[end + 4..].to_vec();
                let on_upgrade = hyper::upgrade::on(&mut req);
                tokio::spawn(async move {
                    if let Ok(upgraded) = on_upgrade.await {
                        let mut client = TokioIo::new(upgraded);
                        if !early.is_empty() && client.write_all(&early).await.is_err() {
                            return;
                        }
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                    }
                });
                return http::Response::new(http_body_util::Empty::new().map_err(|never| match never {}).boxed());
            }
            if buf.len() > 16 * 1024 {
                return plain(502, "the gateway's answer head is too large");
            }
        }
    }
    // Plain HTTP (absolute-form): to the gateway with the current mandate.
    let up = match TcpStream::connect(gateway).await {
        Ok(s) => s,
        Err(_) => return plain(502, "the gateway is unreachable"),
    };
    let _ = up.set_nodelay(true);
    let (mut send, conn) = match hyper::client::conn::http1::Builder::new()
        .preserve_header_case(true)
        .handshake::<_, Incoming>(TokioIo::new(up))
        .await
    {
        Ok(x) => x,
        Err(_) => return plain(502, "the gateway refused the connection"),
    };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    if let Ok(v) = http::HeaderValue::from_str(&proxy_auth) {
        req.headers_mut().insert(http::header::PROXY_AUTHORIZATION, v);
    }
    match send.send_request(req).await {
        Ok(resp) => resp.map(|b| b.boxed()),
        Err(_) => plain(502, "the gateway closed the connection"),
    }
}
