//! The shared hyper server over real TCP: error vocabulary on bad input, rate limits,
//! readiness that follows dependencies (Postgres and Redis cut and restored), graceful stop.

use std::sync::Arc;
use std::time::Duration;

use caracal_shared::config::BusBackend;
use caracal_shared::error::Error;
use caracal_shared::health::Health;
use caracal_shared::http::client::HttpClient;
use caracal_shared::http::{ApiRequest, HttpServer, Router, ServerOptions, ok};
use caracal_shared::runtime::Runtime;
use caracal_shared::shutdown::Shutdown;
use caracal_shared::store::Store;
use caracal_shared::testing::{self, TcpForwarder, eventually};
use http::Method;
use prometheus::Registry;
use serde::Deserialize;
use serde_json::json;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Thing {
    name: String,
    #[allow(dead_code)]
    size: u32,
}

struct St {
    store: Option<Store>,
}

fn router() -> Router<St> {
    Router::new()
        .post("/v1/things", |_s: Arc<St>, mut r: ApiRequest| async move {
            let t: Thing = r.json().await?;
            ok(&json!({ "name": t.name }))
        })
        .get("/v1/things/{id}", |_s, r: ApiRequest| async move {
            ok(&json!({ "id": r.param("id")? }))
        })
        .get("/v1/db", |s: Arc<St>, _r| async move {
            let store = s.store.as_ref().ok_or_else(|| Error::internal("no store"))?;
            store.ping().await?;
            ok(&json!({ "db": "ok" }))
        })
        .get("/v1/panic-free-internal", |_s, _r| async move {
            Err::<caracal_shared::http::Response, _>(Error::internal("boom"))
        })
}

async fn start(
    opts: ServerOptions,
    store: Option<Store>,
    health: Health,
) -> (String, Shutdown, tokio::task::JoinHandle<std::io::Result<()>>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", l.local_addr().unwrap());
    let sd = Shutdown::new();
    let srv = Arc::new(HttpServer::new(
        "test",
        router(),
        Arc::new(St { store }),
        health,
        Registry::new(),
        opts,
    ));
    let h = tokio::spawn(srv.serve(l, sd.clone()));
    (base, sd, h)
}

#[tokio::test]
async fn bad_input_gets_typed_json_errors() {
    let opts = ServerOptions {
        max_body_bytes: 2048,
        ..Default::default()
    };
    let (base, sd, h) = start(opts, None, Health::new()).await;
    let c = HttpClient::unrestricted();
    let code = |r: &caracal_shared::http::client::ClientResponse| {
        r.json_value()["error"]["code"].as_str().unwrap_or("").to_string()
    };

    let r = c.get(&format!("{base}/nope")).await.unwrap();
    assert_eq!((r.status.as_u16(), code(&r).as_str()), (404, "not_found"));
    assert!(r.headers.contains_key("x-request-id"));

    let r = c
        .request(Method::DELETE, &format!("{base}/v1/things/1"), &[], Default::default())
        .await
        .unwrap();
    assert_eq!((r.status.as_u16(), code(&r).as_str()), (405, "method_not_allowed"));
    assert_eq!(r.headers["allow"], "GET");

    let r = c
        .request(
            Method::POST,
            &format!("{base}/v1/things"),
            &[("content-type", "text/plain")],
            "x".into(),
        )
        .await
        .unwrap();
    assert_eq!((r.status.as_u16(), code(&r).as_str()), (415, "unsupported_media_type"));

    let json_ct = [("content-type", "application/json")];
    let r = c
        .request(
            Method::POST,
            &format!("{base}/v1/things"),
            &json_ct,
            "{\"name\": ".into(),
        )
        .await
        .unwrap();
    assert_eq!((r.status.as_u16(), code(&r).as_str()), (400, "invalid_json"));

    let r = c
        .request(
            Method::POST,
            &format!("{base}/v1/things"),
            &json_ct,
            r#"{"name":"a","size":1,"extra":true}"#.into(),
        )
        .await
        .unwrap();
    assert_eq!((r.status.as_u16(), code(&r).as_str()), (400, "validation_failed"));
    assert!(
        r.text().contains("extra"),
        "the error names the unknown field: {}",
        r.text()
    );

    let r = c
        .request(
            Method::POST,
            &format!("{base}/v1/things"),
            &json_ct,
            r#"{"name":"a","size":-1}"#.into(),
        )
        .await
        .unwrap();
    assert_eq!(code(&r), "validation_failed");

    let big = format!(r#"{{"name":"{}","size":1}}"#, "x".repeat(4096));
    let r = c
        .request(Method::POST, &format!("{base}/v1/things"), &json_ct, big.into())
        .await
        .unwrap();
    assert_eq!((r.status.as_u16(), code(&r).as_str()), (413, "payload_too_large"));

    let r = c
        .request(
            Method::POST,
            &format!("{base}/v1/things"),
            &json_ct,
            r#"{"name":"ok","size":1}"#.into(),
        )
        .await
        .unwrap();
    assert_eq!(r.status.as_u16(), 200);

    let r = c
        .get_with(
            &format!("{base}/v1/panic-free-internal"),
            &[("x-request-id", "abc-123")],
        )
        .await
        .unwrap();
    assert_eq!((r.status.as_u16(), code(&r).as_str()), (500, "internal"));
    assert_eq!(r.json_value()["error"]["request_id"], "abc-123");
    assert_eq!(r.headers["x-request-id"], "abc-123");

    let r = c.get(&format!("{base}/metrics")).await.unwrap();
    assert!(
        r.text()
            .contains("caracal_http_requests_total{method=\"POST\",route=\"/v1/things\",status=\"413\"} 1"),
        "{}",
        r.text()
    );
    sd.trigger();
    h.await.unwrap().unwrap();
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_after() {
    let opts = ServerOptions {
        rate_limit: Some((1, 3)),
        ..Default::default()
    };
    let (base, sd, h) = start(opts, None, Health::new()).await;
    let c = HttpClient::unrestricted();
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(c.get(&format!("{base}/v1/things/1")).await.unwrap());
    }
    assert_eq!(statuses.iter().filter(|r| r.status == 200).count(), 3);
    let limited = statuses.iter().find(|r| r.status == 429).unwrap();
    assert_eq!(limited.json_value()["error"]["code"], "rate_limited");
    assert!(limited.headers["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    // Health endpoints are never limited.
    assert_eq!(c.get(&format!("{base}/healthz")).await.unwrap().status, 200);
    sd.trigger();
    h.await.unwrap().unwrap();
}

/// Postgres and Redis behind forwarders: cut them, readiness turns false and requests answer
/// 503 store_unavailable; restore them, everything recovers with no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_dependencies_and_recovers() {
    let Some(db) = testing::TestDb::postgres().await else {
        return;
    };
    let Some(_probe) = testing::test_bus(BusBackend::Redis, &db.store).await else {
        return;
    };
    let mut pg_fwd = TcpForwarder::start(testing::url_addr(&db.url, 5432)).await;
    let mut redis_fwd = TcpForwarder::start(testing::url_addr(&testing::redis_url(), 6379)).await;
    let mut cfg = testing::test_config(&testing::url_with_addr(&db.url, pg_fwd.addr), BusBackend::Redis);
    cfg.bus.redis_url = testing::url_with_addr(&testing::redis_url(), redis_fwd.addr);
    cfg.database.acquire_timeout = Duration::from_millis(500);
    let sd = Shutdown::new();
    let rt = Runtime::start(cfg, sd.clone()).await.unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", l.local_addr().unwrap());
    let st = Arc::new(St {
        store: Some(rt.store.clone()),
    });
    let rt2 = rt.clone();
    let h = tokio::spawn(async move { rt2.serve("test", router(), st, l).await });
    let c = HttpClient::unrestricted().with_timeout(Duration::from_secs(5));
    let ready = |want: u16| {
        let c = c.clone();
        let base = base.clone();
        async move {
            c.get(&format!("{base}/readyz"))
                .await
                .map(|r| r.status.as_u16() == want)
                .unwrap_or(false)
        }
    };
    assert!(
        eventually(Duration::from_secs(10), || ready(200)).await,
        "ready at start"
    );
    assert_eq!(c.get(&format!("{base}/v1/db")).await.unwrap().status, 200);

    pg_fwd.cut();
    assert!(
        eventually(Duration::from_secs(10), || ready(503)).await,
        "not ready without Postgres"
    );
    let r = c.get(&format!("{base}/readyz")).await.unwrap();
    assert_eq!(r.json_value()["checks"]["database"]["ok"], false);
    assert_eq!(r.json_value()["error"]["code"], "not_ready");
    let r = c.get(&format!("{base}/v1/db")).await.unwrap();
    assert_eq!(
        (r.status.as_u16(), r.json_value()["error"]["code"].as_str()),
        (503, Some("store_unavailable"))
    );
    assert_eq!(
        c.get(&format!("{base}/healthz")).await.unwrap().status,
        200,
        "liveness is unaffected"
    );

    pg_fwd.restore().await;
    assert!(
        eventually(Duration::from_secs(15), || ready(200)).await,
        "recovers when Postgres returns"
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            c.get(&format!("{base}/v1/db"))
                .await
                .map(|r| r.status == 200)
                .unwrap_or(false)
        })
        .await
    );

    redis_fwd.cut();
    assert!(
        eventually(Duration::from_secs(15), || ready(503)).await,
        "not ready without Redis"
    );
    let r = c.get(&format!("{base}/readyz")).await.unwrap();
    assert_eq!(r.json_value()["checks"]["bus"]["ok"], false);
    redis_fwd.restore().await;
    assert!(
        eventually(Duration::from_secs(20), || ready(200)).await,
        "recovers when Redis returns"
    );

    sd.trigger();
    h.await.unwrap().unwrap();
    rt.store.close().await;
    db.cleanup().await;
}
