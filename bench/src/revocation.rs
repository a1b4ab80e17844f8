//! Revocation propagation: from the revoke call returning to the **last** of two gateway
//! instances refusing the revoked mandate.
//!
//! Production topology: PostgreSQL and Redis; the coordinator serves the revoke call; two
//! gateways, each on its own runtime (own database pool and Redis connections), follow the
//! revocation stream. Each iteration starts a session, mints a mandate bound to it, checks
//! both gateways accept it, revokes the session through the coordinator, then probes both
//! gateways back to back with that mandate until each answers 403 `mandate_revoked`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use caracal_bench::{fmt, machine};
use caracal_shared::runtime::Runtime;
use caracal_shared::shutdown::Shutdown;
use http::Method;
use http_body_util::{BodyExt, Full};
use serde_json::json;

use crate::gateway::{BenchResolver, upstream};
use crate::{Store, System};

type Conn = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> Conn {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// One GET through a gateway; the status.
async fn probe(c: &mut Conn, addr: SocketAddr, url: &str, host: &str, auth: &str) -> u16 {
    if c.ready().await.is_err() {
        *c = connect(addr).await;
    }
    let req = http::Request::get(url)
        .header("host", host)
        .header("proxy-authorization", auth)
        .body(Full::new(Bytes::new()))
        .unwrap();
    match c.send_request(req).await {
        Ok(r) => {
            let status = r.status().as_u16();
            let _ = r.into_body().collect().await;
            status
        }
        Err(_) => {
            *c = connect(addr).await;
            0
        }
    }
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    let i = ((p / 100.0) * (v.len() as f64 - 1.0)).round() as usize;
    v[i.min(v.len() - 1)]
}

pub async fn run(store: Store, iterations: usize) {
    let up = upstream();
    let sys = System::start(store).await;
    let port = up.port();
    let res = sys
        .api(
            Method::POST,
            "/v1/resources",
            json!({"name": "api", "base_url": format!("http://api.bench:{port}"), "inject": {"kind": "bearer"},
                   "credential": {"value": "sk-bench-upstream"}, "settings": {"egress_allow": ["127.0.0.1/32"]}}),
        )
        .await;
    let pol = sys
        .api(
            Method::POST,
            "/v1/policies",
            json!({"name": "read", "activate": true, "document": "rules:\n  - id: read\n    methods: [GET]\n    paths: [\"/v1/**\"]\n"}),
        )
        .await;
    let (_, key) = sys.agent_with_grant("bench", &res, &pol).await;
    let m0 = sys.mandate(&key).await;

    // The coordinator on the system's runtime.
    let cl = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let coord = format!("http://{}", cl.local_addr().unwrap());
    let rt = sys.rt.clone();
    tokio::spawn(async move { caracal_coordinator::serve(rt, cl).await });

    // Two gateways, each with its own runtime.
    let mut gws = Vec::new();
    let mut proxies = Vec::new();
    let gsd = Shutdown::new();
    for _ in 0..2 {
        let grt = Runtime::start((*sys.rt.config).clone(), gsd.clone())
            .await
            .expect("runtime");
        let port = caracal_shared::testing::free_port();
        let proxy: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        gws.push(
            caracal_gateway::start_with(grt, proxy, admin, Arc::new(BenchResolver))
                .await
                .expect("gateway"),
        );
        proxies.push(proxy);
    }
    let url = format!("http://api.bench:{port}/v1/models");
    let host = format!("api.bench:{port}");
    let admin_auth = format!("Bearer {}", sys.admin);
    let headers = [
        ("authorization", admin_auth.as_str()),
        ("x-caracal-tenant", sys.tenant.as_str()),
    ];
    let mut conns = Vec::new();
    for p in &proxies {
        conns.push(connect(*p).await);
    }
    let sts = sys.rt.config.gateway.sts_url.clone();

    let (mut after_return, mut from_call, mut call) = (Vec::new(), Vec::new(), Vec::new());
    let mut first_gw = Vec::new();
    for i in 0..iterations + 5 {
        // A session and a mandate bound to it, accepted by both gateways.
        let r = sys
            .client
            .send_json(
                Method::POST,
                &format!("{coord}/v1/sessions"),
                &[("authorization", &format!("Bearer {m0}"))],
                &json!({}),
            )
            .await
            .unwrap();
        assert_eq!(r.status, 201, "{}", r.text());
        let sid = r.json_value()["id"].as_str().unwrap().to_string();
        let r = sys
            .client
            .post_form(
                &format!("{sts}/oauth/token"),
                &[],
                &[
                    ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
                    ("subject_token_type", "urn:caracal:params:oauth:token-type:api-key"),
                    ("subject_token", key.as_str()),
                    ("session_id", sid.as_str()),
                ],
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let m = r.json_value()["access_token"].as_str().unwrap().to_string();
        let auth = format!("Bearer {m}");
        for (c, p) in conns.iter_mut().zip(&proxies) {
            assert_eq!(probe(c, *p, &url, &host, &auth).await, 200);
        }

        let t0 = Instant::now();
        let r = sys
            .client
            .send_json(
                Method::POST,
                &format!("{coord}/v1/sessions/{sid}/revoke"),
                &headers,
                &json!({"reason": "bench"}),
            )
            .await
            .unwrap();
        let t1 = Instant::now();
        assert_eq!(r.status, 200, "{}", r.text());

        // Probe both gateways until each refuses (bounded: 5 s).
        let mut refused = Vec::new();
        for (c, p) in conns.iter_mut().zip(&proxies) {
            let (p, url, host, auth) = (*p, url.clone(), host.clone(), auth.clone());
            let mut c2 = connect(p).await;
            std::mem::swap(c, &mut c2);
            refused.push(tokio::spawn(async move {
                let deadline = t1 + Duration::from_secs(5);
                loop {
                    let s = probe(&mut c2, p, &url, &host, &auth).await;
                    if s == 403 {
                        return (Instant::now(), c2);
                    }
                    assert!(Instant::now() < deadline, "revocation did not reach a gateway in 5 s");
                }
            }));
        }
        let mut times = Vec::new();
        for (slot, h) in conns.iter_mut().zip(refused) {
            let (t, c) = h.await.unwrap();
            *slot = c;
            times.push(t);
        }
        let last = *times.iter().max().unwrap();
        let first = *times.iter().min().unwrap();
        if i >= 5 {
            after_return.push(last.saturating_duration_since(t1));
            from_call.push(last - t0);
            call.push(t1 - t0);
            first_gw.push(first.saturating_duration_since(t1));
        }
    }

    let row = |name: &str, v: &mut Vec<Duration>| {
        format!(
            "| {name} | {} | {} | {} | {} |",
            fmt(pct(v, 50.0)),
            fmt(pct(v, 90.0)),
            fmt(pct(v, 99.0)),
            fmt(*v.iter().max().unwrap())
        )
    };
    println!("machine: {}", machine());
    println!(
        "revocation propagation, {}, 2 gateway instances, {iterations} revocations (session revoke through the coordinator):",
        store.label()
    );
    println!("| measure | p50 | p90 | p99 | max |");
    println!("|---|---|---|---|---|");
    println!("{}", row("revoke call (HTTP round trip, commit)", &mut call));
    println!("{}", row("call returned → first gateway refuses", &mut first_gw));
    println!("{}", row("call returned → last gateway refuses", &mut after_return));
    println!("{}", row("call sent → last gateway refuses", &mut from_call));

    for g in gws {
        g.shutdown(caracal_gateway::Stop::Fast).await;
    }
    gsd.trigger();
    sys.stop().await;
}
