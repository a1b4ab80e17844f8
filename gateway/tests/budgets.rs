//! Budgets end to end: two gateway replicas drawing from one shared ledger never spend past a
//! limit under concurrent load; usage is settled from JSON and streamed (SSE) responses without
//! holding the stream back; a client gone mid-stream is settled for what was delivered; a
//! response without usage settles at the worst case; a gateway that dies holding a lease gives
//! its unused budget back when the lease expires. Both backends (the in-process ledger with
//! SQLite, Redis with Postgres). Everything on loopback.

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use caracal_shared::testing::{Backend, eventually};
use common::*;
use http::Method;
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite { $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(caracal_shared::testing::Backend::Sqlite).await; })* }
        mod postgres { $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(caracal_shared::testing::Backend::Postgres).await; })* }
    };
}

on_both_backends!(two_gateways_never_overspend, streams_are_metered_as_they_flow,);

/// Completion tokens the mock reports per call.
const COMPLETION: i64 = 7;
const PROMPT: i64 = 10;

/// An OpenAI-compatible mock: `/v1/chat/completions` answers JSON with usage, or (with
/// `"stream": true`) 6 SSE chunks 150 ms apart and a final usage chunk; it answers
/// JSON without usage when asked with `?usage=none`.
async fn llm() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = calls.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { continue };
            let calls = c2.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let calls = calls.clone();
                    async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        let no_usage = req.uri().query() == Some("usage=none");
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|c| c.to_bytes())
                            .unwrap_or_default();
                        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        let usage = json!({"prompt_tokens": PROMPT, "completion_tokens": COMPLETION, "total_tokens": PROMPT + COMPLETION});
                        if v["stream"] == true {
                            let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(8);
                            tokio::spawn(async move {
                                for i in 0..6 {
                                    let ev = json!({"choices": [{"delta": {"content": format!("t{i}")}}]});
                                    if tx.send(Bytes::from(format!("data: {ev}\n\n"))).await.is_err() {
                                        return;
                                    }
                                    tokio::time::sleep(Duration::from_millis(150)).await;
                                }
                                let last = json!({"choices": [], "usage": usage});
                                let _ = tx.send(Bytes::from(format!("data: {last}\n\ndata: [DONE]\n\n"))).await;
                            });
                            let mut r = http::Response::new(ChannelBody::new(rx).boxed());
                            r.headers_mut()
                                .insert("content-type", "text/event-stream".parse().unwrap());
                            return Ok::<_, Infallible>(r);
                        }
                        let out = if no_usage {
                            json!({"ok": true})
                        } else {
                            json!({"id": "c1", "choices": [{"message": {"content": "hi"}}], "usage": usage})
                        };
                        let mut r = http::Response::new(Full::new(Bytes::from(out.to_string())).boxed());
                        r.headers_mut()
                            .insert("content-type", "application/json".parse().unwrap());
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = http1::Builder::new().serve_connection(TokioIo::new(s), svc).await;
            });
        }
    });
    (addr, calls)
}

struct B {
    env: Env,
    llm: std::net::SocketAddr,
    calls: Arc<AtomicUsize>,
    budget: String,
}

/// The test env plus a resource `llm` (the mock) with a token budget of `limit` on it.
async fn setup(b: Backend, limit: i64, tweak: impl FnOnce(&mut caracal_shared::config::Config)) -> Option<B> {
    let env = start(b, tweak).await?;
    let (llm, calls) = llm().await;
    env.resolver.set("llm.test", &["127.0.0.1"]);
    let r = env
        .api(
            Method::POST,
            "/v1/resources",
            Some(json!({
                "name": "llm", "base_url": format!("http://llm.test:{}", llm.port()), "inject": {"kind": "bearer"},
                "credential": {"value": "sk-llm"}, "settings": {"egress_allow": ["127.0.0.1/32"],
                "pricing": {"models": [{"model": "gpt-*", "input_per_mtok": 1000000, "output_per_mtok": 2000000}]}}
            })),
        )
        .await;
    assert!(r.status.is_success(), "{}", r.text());
    let res = r.json_value()["id"].as_str().unwrap().to_string();
    env.grant(&res, &env.policy).await;
    let bud = env
        .api(
            Method::POST,
            "/v1/budgets",
            Some(
                json!({"name": "llm-tokens", "scope": {"kind": "resource", "id": res}, "unit": "tokens",
                        "limit": limit, "window": {"kind": "daily", "tz": "UTC"}, "hard": true}),
            ),
        )
        .await;
    assert!(bud.status.is_success(), "{}", bud.text());
    let budget = bud.json_value()["id"].as_str().unwrap().to_string();
    // The gateway learns the resource and the budget from the control stream.
    let m = env.mandate(&[]).await;
    let probe = B {
        env,
        llm,
        calls,
        budget,
    };
    // Until the gateway knows the budget too (it may learn the resource first), a probe passes
    // unbudgeted; the first budgeted one takes a lease. Exactly one probe is charged.
    assert!(
        eventually(Duration::from_secs(10), || async {
            probe
                .chat(probe.env.proxy, &m, "/v1/chat/completions?usage=none", 1)
                .await
                .0
                == 200
                && probe.usage().await["leases"].as_i64().unwrap_or(0) > 0
        })
        .await,
        "the gateway knows the resource and its budget"
    );
    Some(probe)
}

impl B {
    fn url(&self, path: &str) -> String {
        format!("http://llm.test:{}{path}", self.llm.port())
    }

    /// One chat call through `proxy`: (status, error code).
    async fn chat(&self, proxy: std::net::SocketAddr, m: &str, path: &str, max_tokens: i64) -> (u16, String) {
        let body = json!({"model": "gpt-4o-mini", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hello"}]});
        let r = proxy_request(
            proxy,
            "POST",
            &self.url(path),
            &[
                ("proxy-authorization", &Env::basic(m)),
                ("content-type", "application/json"),
            ],
            body.to_string().as_bytes(),
        )
        .await;
        (r.status, r.code())
    }

    async fn usage(&self) -> Value {
        self.env
            .api(Method::GET, &format!("/v1/budgets/{}", self.budget), None)
            .await
            .json_value()["usage"]
            .clone()
    }

    /// Wait until no lease holds budget, then return the settled spend.
    async fn settled_spend(&self) -> i64 {
        let last = std::sync::Mutex::new(Value::Null);
        let ok = eventually(Duration::from_secs(15), || async {
            let u = self.usage().await;
            let done = u["reserved"] == 0 && u["leases"] == 0;
            *last.lock().unwrap() = u;
            done
        })
        .await;
        let last = last.into_inner().unwrap();
        assert!(ok, "leases were released: {last}");
        last["spent"].as_i64().unwrap()
    }
}

/// Worst case of one `chat` call with `max_tokens` (tokens: body bytes + max_tokens).
fn worst(max_tokens: i64) -> i64 {
    let body =
        json!({"model": "gpt-4o-mini", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hello"}]});
    body.to_string().len() as i64 + max_tokens
}

async fn two_gateways_never_overspend(b: Backend) {
    // Room for exactly 3 calls in flight at their worst case once the two probes (one per
    // gateway, no usage reported: charged at their worst case) are paid. (It was `+ 40`, less
    // than the probes' spend: only 2 fitted at once, and the test passed only when calls
    // finished before the last ones reserved.)
    let limit = 3 * worst(50) + 2 * worst(1);
    let Some(t) = setup(b, limit, |_| {}).await else { return };
    let port = caracal_shared::testing::free_port();
    let proxy2: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let admin2 = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw2 = caracal_gateway::start_with(t.env.rt.clone(), proxy2, admin2, t.env.resolver.clone())
        .await
        .unwrap();
    let m = t.env.mandate(&[]).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            t.chat(proxy2, &m, "/v1/chat/completions?usage=none", 1).await.0 == 200
        })
        .await
    );
    let before_calls = t.calls.load(Ordering::SeqCst);
    let t = Arc::new(t);
    let mut tasks = Vec::new();
    for i in 0..40 {
        let (t, m) = (t.clone(), m.clone());
        let proxy = if i % 2 == 0 { t.env.proxy } else { proxy2 };
        tasks.push(tokio::spawn(async move {
            t.chat(proxy, &m, "/v1/chat/completions", 50).await
        }));
    }
    let (mut ok, mut refused) = (0i64, 0);
    for task in tasks {
        match task.await.unwrap() {
            (200, _) => ok += 1,
            (429, code) => {
                assert_eq!(code, "budget_exhausted");
                refused += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(ok >= 3, "some calls went through: {ok}");
    assert!(refused > 0, "the budget ran out: {ok} ok");
    assert_eq!(
        t.calls.load(Ordering::SeqCst) - before_calls,
        ok as usize,
        "refused calls never reached the upstream"
    );
    // Settled spend is each call's reported usage; the probes' (no usage) at their worst case.
    let spent = t.settled_spend().await;
    let probes = 2 * worst(1);
    assert_eq!(
        spent,
        ok * (PROMPT + COMPLETION) + probes,
        "spend is what the upstream reported"
    );
    assert!(spent <= limit);
    // Over budget: 429 with a machine-readable reason and when the window resets.
    let r = proxy_request(
        t.env.proxy,
        "POST",
        &t.url("/v1/chat/completions"),
        &[
            ("proxy-authorization", &Env::basic(&m)),
            ("content-type", "application/json"),
        ],
        json!({"model": "gpt-4o-mini", "max_tokens": 100000, "messages": []})
            .to_string()
            .as_bytes(),
    )
    .await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["details"]["budget_id"], t.budget.as_str());
    assert!(r.json()["error"]["details"]["resets_at"].is_i64());
    assert!(r.headers.get("retry-after").is_some());
    // Every reservation (recorded with its allow decision) and settlement is in the audit stream.
    let counts = || async {
        let events = t.env.audit().await;
        // Reservations are recorded with each allow decision, settlements on their own.
        let reserved = events
            .iter()
            .filter(|e| e.body["type"] == "decision" && e.body["reserved"][0]["reserved"].as_i64().is_some())
            .count() as i64;
        let settled = events.iter().filter(|e| e.body["type"] == "budget_settlement").count() as i64;
        (reserved, settled)
    };
    assert!(
        eventually(Duration::from_secs(10), || async { counts().await == (ok + 2, ok + 2) }).await,
        "{:?} for {ok} calls and 2 probes",
        counts().await
    );
    gw2.shutdown(caracal_gateway::Stop::Fast).await;
    let t = Arc::try_unwrap(t).ok().unwrap();
    t.env.stop().await;
}

async fn streams_are_metered_as_they_flow(b: Backend) {
    let Some(t) = setup(b, 1_000_000, |_| {}).await else {
        return;
    };
    let m = t.env.mandate(&[]).await;
    let auth = Env::basic(&m);
    let stream_body = json!({"model": "gpt-4o-mini", "max_tokens": 500, "stream": true, "messages": []}).to_string();
    let raw_request = |body: &str| {
        format!(
            "POST {} HTTP/1.1\r\nHost: llm.test:{}\r\nProxy-Authorization: {auth}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            t.url("/v1/chat/completions"),
            t.llm.port(),
            body.len()
        )
    };

    // The whole stream: events arrive as the upstream sends them (the first long before the
    // last), and the settlement is the reported usage.
    let mut s = tokio::net::TcpStream::connect(t.env.proxy).await.unwrap();
    s.write_all(raw_request(&stream_body).as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut got = Vec::new();
    let mut first_at = None;
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if first_at.is_none() && text.contains("t0") {
            first_at = Some(started.elapsed());
        }
        if text.contains("[DONE]") {
            break;
        }
    }
    let total = started.elapsed();
    let first = first_at.expect("the first event arrived");
    assert!(
        first + Duration::from_millis(500) < total,
        "events were not held back: first after {first:?}, all after {total:?}"
    );
    drop(s);
    let events = || async {
        t.env
            .audit()
            .await
            .into_iter()
            .filter(|e| e.body["type"] == "budget_settlement")
            .map(|e| e.body)
            .collect::<Vec<Value>>()
    };
    assert!(eventually(Duration::from_secs(20), || async { events().await.len() == 2 }).await);
    let full = events()
        .await
        .into_iter()
        .find(|e| e["cut_short"] == false && e["usage"].is_object())
        .unwrap();
    assert_eq!(full["usage"]["output"], COMPLETION);
    assert_eq!(full["settled"][0]["actual"], PROMPT + COMPLETION);

    // A client gone after two events: settled for what was delivered (input at its upper
    // bound, two output tokens), far below the worst case.
    let mut s = tokio::net::TcpStream::connect(t.env.proxy).await.unwrap();
    s.write_all(raw_request(&stream_body).as_bytes()).await.unwrap();
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("t1") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    drop(s);
    assert!(
        eventually(Duration::from_secs(20), || async { events().await.len() == 3 }).await,
        "the cut stream was settled"
    );
    let cut = events().await.into_iter().find(|e| e["cut_short"] == true).unwrap();
    let actual = cut["settled"][0]["actual"].as_i64().unwrap();
    let reserved = cut["settled"][0]["reserved"].as_i64().unwrap();
    assert!(actual < reserved, "{cut}");
    // Two events were read; the gateway notices the client is gone within a few more.
    assert!(
        (2..=6).contains(&(actual - stream_body.len() as i64)),
        "delivered: {cut}"
    );

    // No usage in the response: settled at the worst case.
    assert_eq!(
        t.chat(t.env.proxy, &m, "/v1/chat/completions?usage=none", 40).await.0,
        200
    );
    assert!(eventually(Duration::from_secs(20), || async { events().await.len() == 4 }).await);
    let none = events()
        .await
        .into_iter()
        .find(|e| e["usage"].is_null() && e["cut_short"] == false)
        .unwrap();
    assert_eq!(none["settled"][0]["actual"], none["settled"][0]["reserved"]);
    t.env.stop().await;
}

/// A gateway that dies holding a lease (its Redis connection cut, so it cannot give anything
/// back) costs at most the lease's charge; the rest returns when the lease expires. Redis only:
/// the embedded ledger lives and dies with its one process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_gateways_lease_returns_after_expiry() {
    let Some(t) = setup(Backend::Postgres, 100_000, |_| {}).await else {
        return;
    };
    let redis = t.env.rt.config.bus.redis_url.clone();
    let fwd = caracal_shared::testing::TcpForwarder::start(caracal_shared::testing::url_addr(&redis, 6379)).await;
    let mut cfg = (*t.env.rt.config).clone();
    cfg.bus.redis_url = caracal_shared::testing::url_with_addr(&redis, fwd.addr);
    cfg.gateway.budget_lease_ttl = Duration::from_secs(1);
    let sd = caracal_shared::shutdown::Shutdown::new();
    let rt2 = caracal_shared::runtime::Runtime::start(cfg, sd.clone()).await.unwrap();
    let port = caracal_shared::testing::free_port();
    let proxy2: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let admin2 = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw2 = caracal_gateway::start_with(rt2, proxy2, admin2, t.env.resolver.clone())
        .await
        .unwrap();
    let m = t.env.mandate(&[]).await;
    // Gateway 1's lease (from the set-up probe) goes idle and is released.
    let spent_before = t.settled_spend().await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            t.chat(proxy2, &m, "/v1/chat/completions", 50).await.0 == 200
        })
        .await
    );
    // Gateway 2 holds a lease of 1/20 of the limit, charged a quarter of it (it would release
    // it after 2 s idle: it dies before).
    let u = t.usage().await;
    assert_eq!(
        (u["reserved"].as_i64(), u["leases"].as_i64()),
        (Some(5_000), Some(1)),
        "{u}"
    );
    // It dies: nothing can be given back.
    fwd.cut();
    gw2.shutdown(caracal_gateway::Stop::Fast).await;
    sd.trigger();
    // After expiry the ledger converts the lease into its charge and returns the rest.
    let last = std::sync::Mutex::new(Value::Null);
    let returned = eventually(Duration::from_secs(10), || async {
        let u = t.usage().await;
        let done = u["reserved"] == 0 && u["leases"] == 0;
        *last.lock().unwrap() = u;
        done
    })
    .await;
    let u = last.into_inner().unwrap();
    assert!(returned, "{u}");
    let charged = u["spent"].as_i64().unwrap() - spent_before;
    assert_eq!(
        charged, 1_250,
        "a quarter of the lease is charged, the rest returned: {u}"
    );
    assert!(
        charged >= PROMPT + COMPLETION,
        "the charge covers what was really spent"
    );
    // The returned budget is usable by the surviving gateway.
    assert_eq!(t.chat(t.env.proxy, &m, "/v1/chat/completions", 50).await.0, 200);
    t.env.stop().await;
}
