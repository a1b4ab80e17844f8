//! The gateway end to end: real sockets, in-process Pingora, real clients (curl, Python), both
//! storage backends. No packet leaves the machine: upstreams are loopback canaries and names
//! resolve through a stub resolver; addresses the guard must refuse are refused before any
//! connect.

mod common;

use std::sync::Arc;
use std::time::Duration;

use caracal_shared::testing::{Backend, FaultyBus, eventually};
use common::*;
use http::Method;
use serde_json::json;

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite { $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(caracal_shared::testing::Backend::Sqlite).await; })* }
        mod postgres { $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(caracal_shared::testing::Backend::Postgres).await; })* }
    };
}

on_both_backends!(
    allowed_requests_carry_the_injected_credential_never_the_mandate,
    every_denial_has_its_status_code_and_audit_event,
    revocation_takes_effect_at_the_gateway,
    a_stale_revocation_feed_fails_closed,
    egress_bypass_attempts_are_refused,
    paths_are_normalised_and_forwarded_as_authorized,
    real_clients_curl_and_python,
    sidecar_mode,
    large_inspected_bodies_are_forwarded_whole,
    connection_nominated_fields_are_dropped_on_both_forwarding_paths,
    upstream_response_hop_by_hop_fields_do_not_reach_the_client,
    no_client_query_parameter_shadows_an_injected_query_credential,
    mtls_listener_takes_client_certificates,
    deny_rules_on_models_and_tools_hold_for_bodies_decoders_read_differently,
    websocket_upgrades_are_governed_and_cut_with_their_mandate,
    a_python_websocket_client_through_a_sidecar,
    a_101_that_accepts_no_websocket_opens_no_pipe,
    a_live_websocket_is_cut_when_the_revocation_feed_goes_stale,
    an_unasked_101_is_refused_on_the_own_forwarder_path,
);

fn auth(secret: &str) -> String {
    Env::basic(secret)
}

async fn allowed_requests_carry_the_injected_credential_never_the_mandate(b: Backend) {
    let Some(env) = start(b, |_| {}).await else { return };
    let m = env.mandate(&[]).await;
    let url = format!("{}/v1/models?limit=2", env.api_url());
    let r = env
        .via_proxy(
            "GET",
            &url,
            &[
                ("proxy-authorization", &auth(&m)),
                ("x-request-id", "req-abc"),
                ("via", "1.0 fred, 1.1 p.example"),
                ("via", "1.1 squid"),
            ],
            b"",
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    let seen = env.upstream.last();
    assert_eq!(seen.target, "/v1/models?limit=2", "origin-form, query kept");
    assert_eq!(seen.headers["authorization"], "Bearer sk-upstream-secret-42");
    assert!(!seen.headers.contains_key("proxy-authorization"));
    assert!(
        seen.headers.values().all(|v| !v.contains(&m[4..40])),
        "the mandate never reaches the upstream"
    );
    assert_eq!(seen.headers["host"], format!("api.test:{}", env.upstream.addr.port()));
    // Every `Via` entry the client sent, in order, then this gateway's.
    assert_eq!(
        seen.headers["via"],
        format!("1.0 fred, 1.1 p.example, 1.1 squid, 1.1 {}", env.rt.config.gateway.id)
    );
    assert_eq!(seen.headers["x-request-id"], "req-abc");
    // The whole decision record (serialised by the audit publisher, off the request's thread).
    let gw_id = env.rt.config.gateway.id.clone();
    assert!(
        env.audited(|e| e["decision"] == "allow"
            && e["request_id"] == "req-abc"
            && e["reason"] == "ok"
            && e["kind"] == "http"
            && e["mode"] == "forward"
            && e["method"] == "GET"
            && e["host"] == "api.test"
            && e["path"] == "/v1/models"
            && e["rule"].as_str().is_some_and(|r| !r.is_empty())
            && e["agent"] == env.agent.as_str()
            && e["resource"] == env.resource.as_str()
            && e["mandate_id"].as_str().is_some_and(|m| m.starts_with("mdt_"))
            && e["source"] == "127.0.0.1"
            && e["gateway"] == gw_id.as_str()
            && e.get("reserved").is_none())
            .await
    );
    // Bearer form, and an API key as the proxy password (exchanged once, then cached).
    let r = env
        .via_proxy("GET", &url, &[("proxy-authorization", &format!("Bearer {m}"))], b"")
        .await;
    assert_eq!(r.status, 200);
    for _ in 0..3 {
        let r = env
            .via_proxy("GET", &url, &[("proxy-authorization", &auth(&env.key))], b"")
            .await;
        assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    }
    // Mint events come from the STS's own audit publisher: wait for them to land.
    let mints = || async { env.audit().await.iter().filter(|e| e.body["type"] == "mint").count() };
    eventually(Duration::from_secs(10), || async { mints().await >= 2 }).await;
    let mints = mints().await;
    assert_eq!(
        mints, 2,
        "one mint for the test's mandate, one for the API key (not one per request)"
    );
    // HEAD and a POST the policy allows.
    assert_eq!(
        env.via_proxy(
            "HEAD",
            &format!("{}/v1/x", env.api_url()),
            &[("proxy-authorization", &auth(&m))],
            b""
        )
        .await
        .status,
        200
    );
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let r = env
        .via_proxy(
            "POST",
            &format!("{}/v1/chat/completions", env.api_url()),
            &[("proxy-authorization", &auth(&m)), ("content-type", "application/json")],
            body.as_bytes(),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        env.upstream.last().body,
        body.as_bytes(),
        "an inspected body is forwarded intact"
    );
    // Metrics.
    let metrics = env
        .client
        .get(&format!("http://{}/metrics", env.admin_addr))
        .await
        .unwrap()
        .text();
    assert!(metrics.contains("caracal_gateway_requests_total{decision=\"allow\",reason=\"ok\"}"));
    assert!(metrics.contains("caracal_gateway_added_duration_seconds_bucket"));
    assert_eq!(
        env.client
            .get(&format!("http://{}/readyz", env.admin_addr))
            .await
            .unwrap()
            .status,
        200
    );
    env.stop().await;
}

async fn every_denial_has_its_status_code_and_audit_event(b: Backend) {
    let Some(env) = start(b, |c| {
        c.gateway.agent_rate_per_sec = 1;
        c.gateway.agent_rate_burst = 40;
        c.gateway.max_inspect_body = 1024;
    })
    .await
    else {
        return;
    };
    let m = env.mandate(&[]).await;
    let a = auth(&m);
    let u = env.api_url();
    let before = env.upstream.count();
    // (method, url, headers, body, expected status, expected code)
    type Case<'a> = (&'a str, String, Vec<(&'a str, String)>, Vec<u8>, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("GET", format!("{u}/v1/models"), vec![], vec![], 407, "mandate_missing"),
        (
            "GET",
            format!("{u}/v1/models"),
            vec![("proxy-authorization", auth("cm1_forged"))],
            vec![],
            407,
            "mandate_invalid",
        ),
        (
            "GET",
            format!("{u}/v1/models"),
            vec![("proxy-authorization", "Digest nonsense".into())],
            vec![],
            407,
            "mandate_missing",
        ),
        (
            "GET",
            format!("{u}/v1/models"),
            vec![("proxy-authorization", auth("cak_notarealkeynotarealkeynotarealkey123"))],
            vec![],
            407,
            "proxy_auth_required",
        ),
        (
            "DELETE",
            format!("{u}/v1/models/x"),
            vec![("proxy-authorization", a.clone())],
            vec![],
            403,
            "policy_denied",
        ),
        (
            "GET",
            format!("{u}/v1/admin/keys"),
            vec![("proxy-authorization", a.clone())],
            vec![],
            403,
            "policy_denied",
        ),
        (
            "POST",
            format!("{u}/v1/chat/completions"),
            vec![
                ("proxy-authorization", a.clone()),
                ("content-type", "application/json".into()),
            ],
            br#"{"model":"gpt-3.5"}"#.to_vec(),
            403,
            "policy_denied",
        ),
        (
            "POST",
            format!("{u}/v1/chat/completions"),
            vec![("proxy-authorization", a.clone())],
            vec![b'x'; 2000],
            413,
            "payload_too_large",
        ),
        (
            "GET",
            "http://other.test/v1/models".into(),
            vec![("proxy-authorization", a.clone())],
            vec![],
            403,
            "policy_denied",
        ),
        (
            "GET",
            format!("https://api.test:{}/v1/models", env.upstream.addr.port()),
            vec![("proxy-authorization", a.clone())],
            vec![],
            403,
            "policy_denied",
        ),
        (
            "GET",
            format!("{u}/v1/models"),
            vec![
                ("proxy-authorization", a.clone()),
                ("via", format!("1.1 {}", env.rt.config.gateway.id)),
            ],
            vec![],
            508,
            "loop_detected",
        ),
    ];
    for (i, (method, url, headers, body, status, code)) in cases.iter().enumerate() {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = env.via_proxy(method, url, &h, body).await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (*status, *code),
            "case {i}: {}",
            String::from_utf8_lossy(&r.body)
        );
        if *status == 407 {
            assert!(r.headers.contains_key("proxy-authenticate"), "case {i}");
        }
        assert!(
            env.audited(|e| e["decision"] == "deny" && e["reason"] == *code).await,
            "case {i} audited"
        );
    }
    assert_eq!(env.upstream.count(), before, "no denied request reached the upstream");
    // A CONNECT whose head cannot be read is refused and recorded too, under the request id
    // the client is given.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(env.proxy).await.unwrap();
        s.write_all(b"CONNECT \x01bad\r\n\r\n").await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 400"), "{text}");
        let body: serde_json::Value = serde_json::from_str(&text[text.find("\r\n\r\n").unwrap() + 4..]).unwrap();
        let rid = body["error"]["request_id"].as_str().unwrap().to_string();
        assert_ne!(rid, "-");
        assert!(
            env.audited(|e| e["kind"] == "connect"
                && e["decision"] == "deny"
                && e["reason"] == "bad_request"
                && e["request_id"] == rid.as_str())
                .await,
            "the refused CONNECT is audited under {rid}"
        );
    }
    // An expired mandate.
    let short = env.mandate(&[("lifetime", "1")]).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = env
        .via_proxy(
            "GET",
            &format!("{u}/v1/models"),
            &[("proxy-authorization", &auth(&short))],
            b"",
        )
        .await;
    assert_eq!((r.status, r.code().as_str()), (407, "mandate_expired"));
    // Rate limits answer 429 with Retry-After.
    let mut limited = None;
    for _ in 0..60 {
        let r = env.with_credential("GET", &format!("{u}/v1/models"), &a).await;
        if r.status == 429 {
            limited = Some(r);
            break;
        }
    }
    let r = limited.expect("the agent hit its rate limit");
    assert_eq!(r.code(), "rate_limited");
    assert!(r.headers.contains_key("retry-after"));
    env.stop().await;
}

async fn revocation_takes_effect_at_the_gateway(b: Backend) {
    let Some(env) = start(b, |_| {}).await else { return };
    let m = env.mandate(&[]).await;
    let u = format!("{}/v1/models", env.api_url());
    assert_eq!(
        env.via_proxy("GET", &u, &[("proxy-authorization", &auth(&m))], b"")
            .await
            .status,
        200
    );
    // A request already forwarded when the revocation lands: its response is refused with the
    // reason (nothing had been sent to the client yet).
    let before = env.upstream.count();
    let slow = {
        let (proxy, m, url) = (env.proxy, m.clone(), format!("{}/v1/slow", env.api_url()));
        tokio::spawn(async move {
            common::proxy_request(proxy, "GET", &url, &[("proxy-authorization", &auth(&m))], b"").await
        })
    };
    assert!(
        eventually(Duration::from_secs(10), || async { env.upstream.count() > before }).await,
        "the slow request reached the upstream"
    );
    // Revoking the API key the mandate was minted with revokes the mandate.
    let keys = env
        .api(Method::GET, &format!("/v1/agents/{}/api-keys", env.agent), None)
        .await
        .json_value();
    let kid = keys["items"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(
        env.api(
            Method::DELETE,
            &format!("/v1/agents/{}/api-keys/{kid}", env.agent),
            None
        )
        .await
        .status,
        200
    );
    assert!(
        eventually(Duration::from_secs(15), || async {
            env.via_proxy("GET", &u, &[("proxy-authorization", &auth(&m))], b"")
                .await
                .code()
                == "mandate_revoked"
        })
        .await,
        "the revocation reached the gateway"
    );
    let r = slow.await.unwrap();
    assert_eq!(
        (r.status, r.code().as_str()),
        (403, "mandate_revoked"),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let r = env
        .via_proxy("GET", &u, &[("proxy-authorization", &auth(&m))], b"")
        .await;
    assert_eq!(r.status, 403);
    assert!(env.audited(|e| e["reason"] == "mandate_revoked").await);
    // The request cut in flight is on record too, with why.
    assert!(
        env.recorded("exchange_end", |e| e["kind"] == "http" && e["outcome"] == "revoked")
            .await,
        "the cut is recorded"
    );
    env.stop().await;
}

/// [`start`] on a bus that can be made to fail, with a revocation feed that goes stale 800 ms
/// after its last read (only the feed keeps it fresh: no reconciliation); the bus.
async fn start_with_faulty_feed(b: Backend) -> Option<(Env, Arc<FaultyBus>)> {
    let faulty: Arc<std::sync::Mutex<Option<Arc<FaultyBus>>>> = Arc::default();
    let f2 = faulty.clone();
    let env = start_with_bus(
        b,
        |c| {
            c.gateway.revocation_staleness = Duration::from_millis(800);
            c.gateway.revocation_reconcile_interval = Duration::from_secs(3600);
        },
        move |bus| {
            let f = Arc::new(FaultyBus::new(bus));
            *f2.lock().unwrap() = Some(f.clone());
            f
        },
    )
    .await?;
    let f = faulty.lock().unwrap().clone().expect("the bus was wrapped");
    Some((env, f))
}

async fn a_stale_revocation_feed_fails_closed(b: Backend) {
    let Some((env, f)) = start_with_faulty_feed(b).await else {
        return;
    };
    let m = env.mandate(&[]).await;
    let u = format!("{}/v1/models", env.api_url());
    assert_eq!(
        env.via_proxy("GET", &u, &[("proxy-authorization", &auth(&m))], b"")
            .await
            .status,
        200
    );
    f.fail_reads(true);
    assert!(
        eventually(Duration::from_secs(10), || async {
            env.via_proxy("GET", &u, &[("proxy-authorization", &auth(&m))], b"")
                .await
                .code()
                == "revocation_feed_stale"
        })
        .await
    );
    let r = env
        .via_proxy("GET", &u, &[("proxy-authorization", &auth(&m))], b"")
        .await;
    assert_eq!(r.status, 503);
    assert!(r.headers.contains_key("retry-after"));
    let readyz = format!("http://{}/readyz", env.admin_addr);
    assert!(
        eventually(Duration::from_secs(15), || async {
            env.client.get(&readyz).await.unwrap().status == 503
        })
        .await,
        "not ready while stale"
    );
    f.fail_reads(false);
    assert!(
        eventually(Duration::from_secs(10), || async {
            env.via_proxy("GET", &u, &[("proxy-authorization", &auth(&m))], b"")
                .await
                .status
                == 200
        })
        .await,
        "recovers with the feed"
    );
    env.stop().await;
}

async fn egress_bypass_attempts_are_refused(b: Backend) {
    let Some(env) = start(b, |_| {}).await else { return };
    let port = env.upstream.addr.port();
    let names = [
        ("priv.test", vec!["10.0.0.5"]),
        ("cgnat.test", vec!["100.64.1.1"]),
        ("meta.test", vec!["169.254.169.254"]),
        ("ali.test", vec!["100.100.100.200"]),
        ("meta6.test", vec!["fd00:ec2::254"]),
        ("ula.test", vec!["fd12:3456::1"]),
        ("mapped.test", vec!["::ffff:10.0.0.1"]),
        ("nat64.test", vec!["64:ff9b::a9fe:a9fe"]),
        ("sixtofour.test", vec!["2002:a9fe:a9fe::1"]),
        ("teredo.test", vec!["2001:0:4136:e378:8000:63bf:80ff:fffe"]),
        ("linklocal6.test", vec!["fe80::1"]),
        ("loop.test", vec!["127.0.0.1"]),
        ("mixed.test", vec!["192.0.2.10", "10.0.0.1"]),
    ];
    for (n, ips) in &names {
        env.resolver.set(n, &ips.iter().map(|s| &**s).collect::<Vec<_>>());
    }
    let mut hosts: Vec<String> = names.iter().map(|(n, _)| n.to_string()).collect();
    hosts.extend(["2130706433", "0x7f000001", "0177.0.0.1", "127.1", "0x7f.1"].map(String::from));
    let res = env
        .api(
            Method::POST,
            "/v1/resources",
            Some(json!({"name": "risky", "base_url": format!("http://priv.test:{port}"), "hosts": hosts})),
        )
        .await
        .json_value();
    env.grant(res["id"].as_str().unwrap(), &env.policy).await;
    let before = env.upstream.count();
    // Wait until the STS mints mandates covering the new grant (its grant cache is invalidated
    // by a bus event) and the gateway's snapshot has the resource: a fresh mandate each try.
    assert!(
        eventually(Duration::from_secs(15), || async {
            let m = env.mandate(&[]).await;
            env.via_proxy(
                "GET",
                &format!("http://priv.test:{port}/v1/x"),
                &[("proxy-authorization", &auth(&m))],
                b"",
            )
            .await
            .code()
                == "egress_denied"
        })
        .await
    );
    let m = env.mandate(&[]).await;
    for h in &hosts {
        let r = env
            .via_proxy(
                "GET",
                &format!("http://{h}:{port}/v1/x"),
                &[("proxy-authorization", &auth(&m))],
                b"",
            )
            .await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (403, "egress_denied"),
            "{h}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    assert_eq!(
        env.upstream.count(),
        before,
        "the loopback canary was never reached through a refused name"
    );

    // DNS rebinding: the address checked is the address connected to; a later change is
    // checked again before use.
    env.resolver.set("rebind.test", &["127.0.0.1"]);
    let api = env
        .api(Method::GET, &format!("/v1/resources/{}", env.resource), None)
        .await
        .json_value();
    let mut hosts: Vec<String> = vec![format!("api.test"), "rebind.test".into()];
    hosts.extend(
        api["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h.as_str().unwrap().to_string()),
    );
    hosts.dedup();
    env.api(
        Method::PATCH,
        &format!("/v1/resources/{}", env.resource),
        Some(json!({"hosts": hosts})),
    )
    .await;
    let rebind = format!("http://rebind.test:{port}/v1/x");
    assert!(
        eventually(Duration::from_secs(15), || async {
            env.via_proxy("GET", &rebind, &[("proxy-authorization", &auth(&m))], b"")
                .await
                .status
                == 200
        })
        .await
    );
    env.resolver.set("rebind.test", &["169.254.169.254"]);
    let r = env
        .via_proxy("GET", &rebind, &[("proxy-authorization", &auth(&m))], b"")
        .await;
    assert!(
        r.status == 200 || r.code() == "egress_denied",
        "within the TTL the checked address is reused"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = env
        .via_proxy("GET", &rebind, &[("proxy-authorization", &auth(&m))], b"")
        .await;
    assert_eq!(
        r.code(),
        "egress_denied",
        "after the TTL the new answer is checked and refused"
    );

    // The gateway never follows redirects (here: to the metadata address): the client gets
    // the 302 as the upstream sent it, and the upstream saw exactly one request.
    let hits = env.upstream.count();
    let r = env
        .via_proxy(
            "GET",
            &format!("{}/v1/redirect", env.api_url()),
            &[("proxy-authorization", &auth(&m))],
            b"",
        )
        .await;
    assert_eq!(r.status, 302);
    assert_eq!(r.headers["location"], "http://169.254.169.254/latest/meta-data/");
    assert_eq!(env.upstream.count(), hits + 1);
    let r = env
        .via_proxy(
            "GET",
            "http://169.254.169.254/latest/meta-data/",
            &[("proxy-authorization", &auth(&m))],
            b"",
        )
        .await;
    assert_eq!(r.status, 403, "following the redirect by hand is refused too");

    // The safety net under all of this: upstream connections leave from loopback, so even an
    // address the guard was told to allow cannot be reached off the machine (the kernel refuses
    // the route; nothing is sent).
    env.resolver.set("wide.test", &["10.0.0.5"]);
    let wide = env
        .api(Method::POST, "/v1/resources", Some(json!({"name": "wide", "base_url": format!("http://wide.test:{port}"), "settings": {"egress_allow": ["10.0.0.0/8"]}})))
        .await
        .json_value();
    env.grant(wide["id"].as_str().unwrap(), &env.policy).await;
    assert!(
        eventually(Duration::from_secs(15), || async {
            let m3 = env.mandate(&[]).await;
            let r = env
                .via_proxy(
                    "GET",
                    &format!("http://wide.test:{port}/v1/x"),
                    &[("proxy-authorization", &auth(&m3))],
                    b"",
                )
                .await;
            r.status == 502 && r.code() == "upstream_unreachable"
        })
        .await,
        "an allowed private address is still unreachable from a loopback-bound gateway"
    );

    // The gateway's own listener is refused even when loopback is allowed.
    let gw_port = env.proxy.port();
    let own = env
        .api(Method::POST, "/v1/resources", Some(json!({"name": "self", "base_url": format!("http://127.0.0.1:{gw_port}"), "settings": {"egress_allow": ["127.0.0.0/8"]}})))
        .await
        .json_value();
    env.grant(own["id"].as_str().unwrap(), &env.policy).await;
    let last = std::sync::Mutex::new(String::new());
    assert!(
        eventually(Duration::from_secs(15), || async {
            let m2 = env.mandate(&[]).await;
            let r = env
                .via_proxy(
                    "GET",
                    &format!("http://127.0.0.1:{gw_port}/v1/x"),
                    &[("proxy-authorization", &auth(&m2))],
                    b"",
                )
                .await;
            *last.lock().unwrap() = format!("{} {}", r.status, String::from_utf8_lossy(&r.body));
            r.code() == "egress_denied"
        })
        .await,
        "the gateway's own listener is refused; last answer: {}",
        last.lock().unwrap()
    );
    env.stop().await;
}

async fn paths_are_normalised_and_forwarded_as_authorized(b: Backend) {
    let Some(env) = start(b, |_| {}).await else { return };
    let m = env.mandate(&[]).await;
    let a = auth(&m);
    let u = env.api_url();
    let get = |p: &'static str| {
        let a = a.clone();
        let u = u.clone();
        let env = &env;
        async move { env.with_credential("GET", &format!("{u}{p}"), &a).await }
    };
    // Refused outright.
    for p in [
        "/v1/a%2Fb",
        "/v1/a%2fb",
        "/v1/a%5Cb",
        "/v1/x;jsessionid=1",
        "/v1/%3B",
        "/v1/%00",
        "/..",
        "/v1/%zz",
    ] {
        let r = get(p).await;
        assert_eq!((r.status, r.code().as_str()), (400, "bad_request"), "{p}");
    }
    // Normalised, then authorized on the normalised form. Runs of '/' are merged: upstreams
    // that merge slashes (nginx's default `merge_slashes on`, Werkzeug/Flask, Go's ServeMux
    // redirect, …) serve `/v1//admin/keys` as `/v1/admin/keys`, which the deny rule covers.
    for p in [
        "/v1/%2e%2e/admin/x",
        "/v1/chat/../admin/keys",
        "/v1/models/%2E%2E/%2e%2e/admin/keys",
        "/v1//admin/keys",
        "/v1///admin/keys",
        "/v1/.//admin/keys",
        "//v1/admin/keys",
        "/v1//admin//keys",
    ] {
        let before = env.upstream.count();
        assert_eq!(get(p).await.status, 403, "{p}");
        assert_eq!(env.upstream.count(), before, "{p} never reaches the upstream");
    }
    // Forwarded exactly as authorized (re-encoded once; merged; a trailing '/' stays).
    for (p, forwarded) in [
        ("/v1/./models", "/v1/models"),
        ("/v1/x/../models", "/v1/models"),
        ("/v1/a%20b", "/v1/a%20b"),
        ("/v1/%252e%252e/models", "/v1/%252e%252e/models"),
        ("/v1/caf%C3%A9", "/v1/caf%C3%A9"),
        ("/v1//models", "/v1/models"),
        ("//v1///models//x", "/v1/models/x"),
        ("/v1/models/", "/v1/models/"),
        ("/v1/models//?limit=2", "/v1/models/?limit=2"),
    ] {
        let r = get(p).await;
        assert_eq!(r.status, 200, "{p}: {}", String::from_utf8_lossy(&r.body));
        assert_eq!(env.upstream.last().target, forwarded, "{p}");
    }
    env.stop().await;
}

async fn real_clients_curl_and_python(b: Backend) {
    let Some(env) = start(b, |_| {}).await else { return };
    let m = env.mandate(&[]).await;
    let proxy_url = format!("http://agent:{m}@{}", env.proxy);
    let url = format!("{}/v1/models", env.api_url());
    // curl -x (absolute-form).
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "-x", &proxy_url, &url])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"ok\":true"));
    assert_eq!(
        env.upstream.last().headers["authorization"],
        "Bearer sk-upstream-secret-42"
    );
    // curl with an API key as the proxy password.
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "-x", &format!("http://agent:{}@{}", env.key, env.proxy), &url])
        .output()
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("\"ok\":true"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // curl without credentials: 407.
    let out = tokio::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-x",
            &format!("http://{}", env.proxy),
            &url,
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "407");
    // curl -p: CONNECT tunnel (the policy grants CONNECT on this resource), then plain HTTP inside.
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "-p", "-x", &proxy_url, &url])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"ok\":true"));
    assert!(
        env.audited(|e| e["kind"] == "connect" && e["decision"] == "allow")
            .await
    );
    let out = tokio::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_connect}",
            "-p",
            "-x",
            &format!("http://{}", env.proxy),
            &url,
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "407",
        "an unauthenticated CONNECT is refused"
    );
    let out = tokio::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_connect}",
            "-p",
            "-x",
            &proxy_url,
            &format!("http://meta.test:{}/", env.upstream.addr.port()),
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "403",
        "CONNECT to a host outside the mandate is refused"
    );
    // Python requests through HTTP_PROXY (environment only).
    let script = r#"
import os, requests, sys
r = requests.get(sys.argv[1], timeout=10)
print(r.status_code, r.json().get("ok"))
r = requests.delete(sys.argv[1], timeout=10)
print(r.status_code, r.json()["error"]["code"])
"#;
    let out = tokio::process::Command::new("python3")
        .args(["-c", script, &url])
        .env("HTTP_PROXY", &proxy_url)
        .env("http_proxy", &proxy_url)
        .env("NO_PROXY", "")
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(text.lines().collect::<Vec<_>>(), vec!["200 True", "403 policy_denied"]);
    env.stop().await;
}

async fn sidecar_mode(b: Backend) {
    let Some((env, port)) = start_with_sidecar(b, "api").await else {
        return;
    };
    let m = env.mandate(&[]).await;
    let base = format!("http://127.0.0.1:{port}");
    let r = env
        .client
        .get_with(
            &format!("{base}/v1/models"),
            &[("authorization", &format!("Bearer {m}"))],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = env.upstream.last();
    assert_eq!(
        seen.headers["authorization"], "Bearer sk-upstream-secret-42",
        "the caller's bearer is replaced"
    );
    assert_eq!(seen.target, "/v1/models");
    let r = env
        .client
        .get_with(&format!("{base}/v1/models"), &[("x-caracal-mandate", &m)])
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let seen = env.upstream.last();
    assert!(!seen.headers.contains_key("x-caracal-mandate"));
    assert!(
        seen.headers.values().all(|v| !v.contains(&m[4..40])),
        "the mandate never reaches the upstream"
    );
    let r = env.client.get(&format!("{base}/v1/models")).await.unwrap();
    assert_eq!(r.status, 401);
    assert!(r.headers.contains_key("www-authenticate"));
    let r = env
        .client
        .get_with(
            &format!("{base}/v1/admin/x"),
            &[("authorization", &format!("Bearer {m}"))],
        )
        .await
        .unwrap();
    assert_eq!(r.status, 403);
    env.stop().await;
}

async fn large_inspected_bodies_are_forwarded_whole(b: Backend) {
    let Some(env) = start(b, |_| {}).await else { return };
    let m = env.mandate(&[]).await;
    // Model after a large message list (as SDKs serialise it): past Pingora's 64 KiB replay buffer.
    let big = "x".repeat(200 * 1024);
    let body = json!({"messages": [{"role": "user", "content": big}], "model": "gpt-4o"}).to_string();
    let url = format!("{}/v1/chat/completions", env.api_url());
    let r = env
        .via_proxy(
            "POST",
            &url,
            &[("proxy-authorization", &auth(&m)), ("content-type", "application/json")],
            body.as_bytes(),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    let seen = env.upstream.last();
    assert_eq!(seen.body.len(), body.len());
    assert_eq!(seen.body, body.as_bytes());
    assert_eq!(seen.headers["authorization"], "Bearer sk-upstream-secret-42");
    let bad = json!({"messages": [{"role": "user", "content": big}], "model": "gpt-3.5"}).to_string();
    let r = env
        .via_proxy(
            "POST",
            &url,
            &[("proxy-authorization", &auth(&m)), ("content-type", "application/json")],
            bad.as_bytes(),
        )
        .await;
    assert_eq!(r.status, 403);
    // Twice in a row on the pooled connection.
    let r = env
        .via_proxy(
            "POST",
            &url,
            &[("proxy-authorization", &auth(&m)), ("content-type", "application/json")],
            body.as_bytes(),
        )
        .await;
    assert_eq!(r.status, 200);
    env.stop().await;
}

/// Hop-by-hop fields a request names in `Connection` (RFC 9110 §7.6.1) never reach the
/// upstream, whichever forwarder sends the request (Pingora's, or the gateway's own for an
/// inspected body larger than the replay buffer).
async fn connection_nominated_fields_are_dropped_on_both_forwarding_paths(b: Backend) {
    let Some(env) = start(b, |_| {}).await else { return };
    let m = env.mandate(&[]).await;
    let url = format!("{}/v1/chat/completions", env.api_url());
    let small = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let big = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x".repeat(100 * 1024)}]}).to_string();
    let mut leaked = Vec::new();
    for (what, body) in [("small (Pingora)", &small), ("large (own forwarder)", &big)] {
        let r = env
            .via_proxy(
                "POST",
                &url,
                &[
                    ("proxy-authorization", &auth(&m)),
                    ("content-type", "application/json"),
                    ("connection", "keep-alive, X-Hop-Secret"),
                    ("x-hop-secret", "for-the-proxy-only"),
                    ("x-end-to-end", "kept"),
                ],
                body.as_bytes(),
            )
            .await;
        assert_eq!(r.status, 200, "{what}: {}", String::from_utf8_lossy(&r.body));
        let seen = env.upstream.last();
        assert_eq!(seen.body.len(), body.len(), "{what}");
        assert_eq!(
            seen.headers.get("x-end-to-end").map(String::as_str),
            Some("kept"),
            "{what}"
        );
        assert_eq!(seen.headers["authorization"], "Bearer sk-upstream-secret-42", "{what}");
        if seen.headers.contains_key("x-hop-secret") || seen.headers.contains_key("connection") {
            leaked.push(format!(
                "{what}: x-hop-secret={:?} connection={:?}",
                seen.headers.get("x-hop-secret"),
                seen.headers.get("connection")
            ));
        }
    }
    assert!(leaked.is_empty(), "hop-by-hop fields reached the upstream: {leaked:?}");
    env.stop().await;
}

/// Wait until a fresh mandate gets a 200 at `url` (once a new grant has reached the gateway);
/// the mandate.
async fn mandate_reaching(env: &Env, method: &str, url: &str, body: &[u8]) -> String {
    let found = std::sync::Mutex::new(String::new());
    assert!(
        eventually(Duration::from_secs(20), || async {
            let m = env.mandate(&[]).await;
            let r = env
                .via_proxy(
                    method,
                    url,
                    &[("proxy-authorization", &auth(&m)), ("content-type", "application/json")],
                    body,
                )
                .await;
            let ok = r.status == 200;
            if ok {
                *found.lock().unwrap() = m;
            }
            ok
        })
        .await,
        "the new grant never reached the gateway"
    );
    found.into_inner().unwrap()
}

/// A raw HTTP/1.1 upstream (keep-alive, `Content-Length` request bodies) whose answers the
/// test writes byte for byte: a request with the query `hop` gets a response carrying
/// hop-by-hop fields; any other, a plain 200 `ok`.
async fn raw_upstream() -> std::net::SocketAddr {
    use tokio::io::AsyncWriteExt;
    loopback(|mut s| async move {
        let mut buf = Vec::new();
        while let Some((head, _)) = read_message(&mut s, &mut buf).await {
            let target = head.lines().next().unwrap_or("").split(' ').nth(1).unwrap_or("");
            let resp: &[u8] = if target.ends_with("?hop") {
                b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Up-Hop\r\nX-Up-Hop: secret\r\nKeep-Alive: timeout=5\r\nProxy-Authenticate: Basic realm=\"up\"\r\nProxy-Authentication-Info: nextnonce=\"x\"\r\nX-Up-End: kept\r\nContent-Length: 2\r\n\r\nok"
            } else {
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            };
            if s.write_all(resp).await.is_err() {
                return;
            }
        }
    })
    .await
}

/// Wait (up to 10 s) until an upstream's `log` shows a connection `closed` — everything the
/// gateway forwarded on it arrived before — or an entry `bad` matches (the caller's assertion
/// then says what went through).
async fn closed_or(log: &Log, bad: impl Fn(&str) -> bool) {
    eventually(Duration::from_secs(10), || async {
        log.lock().unwrap().iter().any(|l| l == "closed" || bad(l))
    })
    .await;
}

/// A loopback server: each connection goes to `serve`, on a task of its own. Its address.
async fn loopback<F, Fut>(serve: F) -> std::net::SocketAddr
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { continue };
            tokio::spawn(serve(s));
        }
    });
    addr
}

/// The next HTTP/1.1 message on `s`: its head (lower-cased) and its `Content-Length` body;
/// bytes read past it stay in `buf` for the next call. `None` at the end of the stream, on an
/// error, or after 10 s without a byte.
async fn read_message(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<(String, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut b = [0u8; 16 * 1024];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i + 4]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if buf.len() >= i + 4 + len {
                let body = buf[i + 4..i + 4 + len].to_vec();
                buf.drain(..i + 4 + len);
                return Some((head, body));
            }
        }
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&b[..n]),
            _ => return None,
        }
    }
}

/// RFC 9110 §7.6.1: a proxy removes the fields an upstream response names in `Connection`
/// (and `Keep-Alive`) before forwarding the response, on Pingora's path and on the gateway's
/// own forwarder's (inspected bodies over the replay buffer); an upstream's proxy
/// authentication fields (RFC 9110 §11.7) concern only the gateway and go too.
async fn upstream_response_hop_by_hop_fields_do_not_reach_the_client(b: Backend) {
    let Some(env) = start(b, |_| {}).await else { return };
    let raddr = raw_upstream().await;
    add_resource_at(
        &env,
        "raw",
        "raw.test",
        raddr.port(),
        json!({"kind": "bearer"}),
        &env.policy,
    )
    .await;
    let base = format!("http://raw.test:{}", raddr.port());
    let m = mandate_reaching(&env, "GET", &format!("{base}/v1/plain"), b"").await;
    let big = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x".repeat(100 * 1024)}]}).to_string();
    let mut leaked = Vec::new();
    // The upstream answers `Connection: keep-alive, X-Up-Hop` / `X-Up-Hop` / `Keep-Alive`, and
    // a proxy authentication challenge and result of its own.
    for (what, method, path, body) in [
        ("Pingora", "GET", "/v1/models?hop", ""),
        ("own forwarder", "POST", "/v1/chat/completions?hop", big.as_str()),
    ] {
        let r = env
            .via_proxy(
                method,
                &format!("{base}{path}"),
                &[("proxy-authorization", &auth(&m)), ("content-type", "application/json")],
                body.as_bytes(),
            )
            .await;
        assert_eq!(r.status, 200, "{what}: {}", String::from_utf8_lossy(&r.body));
        assert_eq!(&r.body[..], b"ok", "{what}");
        assert_eq!(
            r.headers.get("x-up-end").map(|v| v.as_bytes()),
            Some(&b"kept"[..]),
            "{what}"
        );
        leaked.extend(
            [
                "x-up-hop",
                "keep-alive",
                "proxy-authenticate",
                "proxy-authentication-info",
            ]
            .iter()
            .filter_map(|h| r.headers.get(*h).map(|v| format!("{what}: {h}: {v:?}"))),
        );
    }
    assert!(
        leaked.is_empty(),
        "hop-by-hop response fields reached the client: {leaked:?}"
    );
    env.stop().await;
}

/// A second resource (`name` at `host`, on the loopback echo upstream) granted to the test
/// agent under `policy`; its id.
async fn add_resource(env: &Env, name: &str, host: &str, inject: serde_json::Value, policy: &str) -> String {
    add_resource_at(env, name, host, env.upstream.addr.port(), inject, policy).await
}

/// [`add_resource`] for an upstream on another loopback `port`.
async fn add_resource_at(
    env: &Env,
    name: &str,
    host: &str,
    port: u16,
    inject: serde_json::Value,
    policy: &str,
) -> String {
    env.resolver.set(host, &["127.0.0.1"]);
    let r = env
        .api(
            Method::POST,
            "/v1/resources",
            Some(json!({
                "name": name, "base_url": format!("http://{host}:{port}"), "inject": inject,
                "credential": {"value": "sk-second-secret"}, "settings": {"egress_allow": ["127.0.0.1/32"]}
            })),
        )
        .await;
    assert!(r.status.is_success(), "{}", r.text());
    let id = r.json_value()["id"].as_str().unwrap().to_string();
    env.grant(&id, policy).await;
    id
}

/// The query pairs of a request target, decoded as an upstream decodes them.
fn query_pairs(target: &str) -> Vec<(String, String)> {
    caracal_shared::http::parse_form(target.split_once('?').map(|(_, q)| q).unwrap_or(""))
}

/// With a query-parameter credential, no parameter the client sends may be read by the upstream
/// as that parameter: the upstream decodes names, so `k%65y` is `key`.
async fn no_client_query_parameter_shadows_an_injected_query_credential(b: Backend) {
    let Some(env) = start(b, |_| {}).await else { return };
    add_resource(
        &env,
        "qapi",
        "q.test",
        json!({"kind": "query", "name": "key"}),
        &env.policy,
    )
    .await;
    let port = env.upstream.addr.port();
    let m = mandate_reaching(&env, "GET", &format!("http://q.test:{port}/v1/models"), b"").await;
    let a = auth(&m);
    let mut bad = Vec::new();
    for (q, others) in [
        ("key=mine", vec![]),
        ("k%65y=mine", vec![]),
        ("%6Bey=mine", vec![]),
        ("%6b%65%79=mine&x=1", vec![("x", "1")]),
        ("KEY=mine&x=1", vec![("KEY", "mine"), ("x", "1")]),
        ("keys=2&ke%79s=3", vec![("keys", "2"), ("keys", "3")]),
    ] {
        let r = env
            .with_credential("GET", &format!("http://q.test:{port}/v1/models?{q}"), &a)
            .await;
        assert_eq!(r.status, 200, "{q}: {}", String::from_utf8_lossy(&r.body));
        let target = env.upstream.last().target;
        let pairs = query_pairs(&target);
        let keys: Vec<&str> = pairs
            .iter()
            .filter(|(n, _)| n == "key")
            .map(|(_, v)| v.as_str())
            .collect();
        if keys != ["sk-second-secret"] {
            bad.push(format!(
                "{q} -> upstream target {target} (decoded `key` values {keys:?})"
            ));
        }
        let rest: Vec<(&str, &str)> = pairs
            .iter()
            .filter(|(n, _)| n != "key")
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        assert_eq!(rest, others, "{q}: the client's other parameters are kept, in order");
    }
    assert!(
        bad.is_empty(),
        "client parameters shadow the injected credential:\n{}",
        bad.join("\n")
    );
    env.stop().await;
}

async fn mtls_listener_takes_client_certificates(b: Backend) {
    use caracal_shared::testing::pki::Ca;
    let server_ca = Ca::new("gateway server ca");
    let server = server_ca.server(&["127.0.0.1", "localhost"]);
    let dir = std::env::temp_dir().join(format!("caracal-gw-tls-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let (cert, key, server_ca_file) = (
        write("cert.pem", &server.cert_pem),
        write("key.pem", &server.key_pem),
        write("server-ca.pem", &server_ca.pem()),
    );
    let port = caracal_shared::testing::free_port();
    let (c2, k2) = (cert.clone(), key.clone());
    let Some(env) = start(b, move |c| {
        c.gateway.tls_listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
        c.gateway.tls_cert = Some(c2.into());
        c.gateway.tls_key = Some(k2.into());
    })
    .await
    else {
        return;
    };
    // The agent's workload identity: a certificate under the tenant's CA.
    let client_ca = Ca::new("acme workloads");
    let ca = env
        .api(
            Method::POST,
            "/v1/mtls-cas",
            Some(json!({"name": "acme", "ca_pem": client_ca.pem()})),
        )
        .await
        .json_value();
    let r = env
        .api(
            Method::POST,
            &format!("/v1/agents/{}/identities", env.agent),
            Some(json!({"kind": "mtls", "ca_id": ca["id"], "match": "san_uri", "subject": "spiffe://acme/bot"})),
        )
        .await;
    assert!(r.status.is_success(), "{}", r.text());
    let good = client_ca.client("spiffe://acme/bot", "bot");
    let (good_cert, good_key) = (write("bot.pem", &good.cert_pem), write("bot.key", &good.key_pem));
    let stranger_ca = Ca::new("someone else");
    let stranger = stranger_ca.client("spiffe://acme/bot", "bot");
    let (bad_cert, bad_key) = (write("x.pem", &stranger.cert_pem), write("x.key", &stranger.key_pem));
    let proxy = format!("https://127.0.0.1:{port}");
    let url = format!("{}/v1/models", env.api_url());
    let curl = |extra: Vec<String>| {
        let mut args: Vec<String> = vec![
            "-sS".into(),
            "--max-time".into(),
            "10".into(),
            "--proxy".into(),
            proxy.clone(),
            "--proxy-cacert".into(),
            server_ca_file.clone(),
        ];
        args.extend(extra);
        async move { tokio::process::Command::new("curl").args(&args).output().await.unwrap() }
    };
    let with_cert = |c: &str, k: &str| {
        vec![
            "--proxy-cert".to_string(),
            c.to_string(),
            "--proxy-key".to_string(),
            k.to_string(),
        ]
    };

    // The gateway picks up the new CA with its next snapshot reload.
    let mut out = None;
    for _ in 0..200 {
        let o = curl([with_cert(&good_cert, &good_key), vec![url.clone()]].concat()).await;
        if String::from_utf8_lossy(&o.stdout).contains("\"ok\":true") {
            out = Some(o);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        out.is_some(),
        "a request with the agent's client certificate is allowed"
    );
    assert_eq!(
        env.upstream.last().headers["authorization"],
        "Bearer sk-upstream-secret-42"
    );
    // CONNECT over the TLS listener, with the certificate as the only credential.
    let o = curl([with_cert(&good_cert, &good_key), vec!["-p".into(), url.clone()]].concat()).await;
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("\"ok\":true"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        env.audited(|e| e["kind"] == "connect" && e["decision"] == "allow")
            .await
    );
    // Several requests, one exchange with the STS.
    for _ in 0..3 {
        let o = curl([with_cert(&good_cert, &good_key), vec![url.clone()]].concat()).await;
        assert!(String::from_utf8_lossy(&o.stdout).contains("\"ok\":true"));
    }
    let mints: Vec<_> = env
        .audit()
        .await
        .into_iter()
        .filter(|e| e.body["type"] == "mint" && e.body["via"] == "mtls")
        .collect();
    assert_eq!(mints.len(), 1, "one exchange per mandate lifetime: {mints:?}");
    // No certificate and no other credential: 407.
    let o = curl(vec![
        "-o".into(),
        "/dev/null".into(),
        "-w".into(),
        "%{http_code}".into(),
        url.clone(),
    ])
    .await;
    assert_eq!(String::from_utf8_lossy(&o.stdout), "407");
    // A certificate from an untrusted CA fails the handshake.
    let o = curl([with_cert(&bad_cert, &bad_key), vec![url.clone()]].concat()).await;
    assert!(
        !o.status.success(),
        "an untrusted client certificate is refused at the TLS layer"
    );
    // A trusted CA but no identity mapped: refused by the STS, 407 at the gateway.
    let unmapped = client_ca.client("spiffe://acme/nobody", "nobody");
    let (u_cert, u_key) = (write("u.pem", &unmapped.cert_pem), write("u.key", &unmapped.key_pem));
    let o = curl(
        [
            with_cert(&u_cert, &u_key),
            vec![
                "-o".into(),
                "/dev/null".into(),
                "-w".into(),
                "%{http_code}".into(),
                url.clone(),
            ],
        ]
        .concat(),
    )
    .await;
    assert_eq!(String::from_utf8_lossy(&o.stdout), "407");
    env.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// Deny rules on `models:` and `tools:` hold whatever the body looks like: a body the upstream
/// could read differently from the gateway (a field given twice, a JSON-RPC batch, a number
/// written as a float) is either read as the upstream reads it or refused — it never passes
/// as "no model, no tool".
async fn deny_rules_on_models_and_tools_hold_for_bodies_decoders_read_differently(b: Backend) {
    const DENY_POLICY: &str = r#"
rules:
  - id: chat
    methods: [POST]
    paths: ["/v1/chat/completions", "/mcp"]
  - id: no-expensive
    effect: deny
    models: ["gpt-4-expensive"]
  - id: no-delete
    effect: deny
    tools: ["delete_repo"]
"#;
    let Some(env) = start(b, |_| {}).await else { return };
    let p = env
        .api(
            Method::POST,
            "/v1/policies",
            Some(json!({"name": "p2", "document": DENY_POLICY, "activate": true})),
        )
        .await;
    assert!(p.status.is_success(), "{}", p.text());
    let policy = p.json_value()["policy"]["id"].as_str().unwrap().to_string();
    add_resource(&env, "llm", "llm.test", json!({"kind": "bearer"}), &policy).await;
    let port = env.upstream.addr.port();
    let chat = format!("http://llm.test:{port}/v1/chat/completions");
    let mcp = format!("http://llm.test:{port}/mcp");
    let m = mandate_reaching(&env, "POST", &chat, br#"{"model":"gpt-4o"}"#).await;
    let a = Env::basic(&m);
    let send = |url: &str, body: &str| {
        let (a, url, body) = (a.clone(), url.to_string(), body.to_string());
        let env = &env;
        async move {
            env.via_proxy(
                "POST",
                &url,
                &[("proxy-authorization", &a), ("content-type", "application/json")],
                body.as_bytes(),
            )
            .await
        }
    };
    assert_eq!(send(&chat, r#"{"model":"gpt-4-expensive"}"#).await.status, 403);
    let call = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_repo"}}"#;
    assert_eq!(send(&mcp, call).await.status, 403);
    let ambiguous = [
        (
            &chat,
            r#"{"model":"gpt-4o","messages":[],"model":"gpt-4-expensive"}"#,
            400,
        ),
        (&chat, r#"{"model":"gpt-4o","MODEL":"gpt-4-expensive"}"#, 400),
        (&chat, r#"{"model":"gpt-4-expensive","max_tokens":256.0}"#, 403),
        (&chat, r#"{"model":"gpt-4-expensive",}"#, 400),
        (
            &mcp,
            r#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_repo"}}]"#,
            400,
        ),
    ];
    for (url, body, status) in ambiguous {
        let before = env.upstream.count();
        let r = send(url, body).await;
        assert_eq!(r.status, status, "{body}: {}", String::from_utf8_lossy(&r.body));
        if status == 400 {
            let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
            assert_eq!(v["error"]["code"], "invalid_json", "{body}: {v}");
        }
        assert_eq!(env.upstream.count(), before, "{body} never reaches the upstream");
    }
    // What reads one way everywhere still goes through.
    let before = env.upstream.count();
    assert_eq!(
        send(&chat, r#"{"model":"gpt-4o","max_tokens":256.0}"#).await.status,
        200
    );
    assert_eq!(env.upstream.count(), before + 1);
    env.stop().await;
}

/// A policy that allows `GET /v1/**` and reads no body (a WebSocket upgrade may pass), active;
/// its id.
async fn read_only_policy(env: &Env) -> String {
    let doc = "rules:\n  - id: read\n    methods: [GET]\n    paths: [\"/v1/**\"]\n";
    let p = env
        .api(
            Method::POST,
            "/v1/policies",
            Some(json!({"name": "ws", "document": doc, "activate": true})),
        )
        .await;
    assert!(p.status.is_success(), "{}", p.text());
    p.json_value()["policy"]["id"].as_str().unwrap().to_string()
}

/// A loopback upstream that accepts WebSocket upgrades (answers 101, then echoes what it reads
/// as `echo:<bytes>`), answers a 101 to `/v1/rogue101` whatever was asked (an upstream that
/// switches protocols unasked), and `ok` to anything else. Records each request's head, and
/// on upgraded connections each read (`data:<bytes>`) and the end (`closed`).
type Log = Arc<std::sync::Mutex<Vec<String>>>;
async fn ws_upstream() -> (std::net::SocketAddr, Log, Log) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let heads: Log = Default::default();
    let frames: Log = Default::default();
    let (seen, piped) = (heads.clone(), frames.clone());
    let addr = loopback(move |mut s| {
        let (seen, piped) = (seen.clone(), piped.clone());
        async move {
            let mut buf = Vec::new();
            while let Some((head, _)) = read_message(&mut s, &mut buf).await {
                seen.lock().unwrap().push(head.clone());
                let switch = head.contains("\r\nupgrade: websocket\r\n") || head.contains(" /v1/rogue101 ");
                if !switch {
                    if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                        .await
                        .is_err()
                    {
                        return;
                    }
                    continue;
                }
                let resp = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
                if s.write_all(resp).await.is_err() {
                    return;
                }
                // From here on, a pipe: echo whatever arrives.
                let mut pending = std::mem::take(&mut buf);
                let mut b = [0u8; 4096];
                loop {
                    if !pending.is_empty() {
                        piped
                            .lock()
                            .unwrap()
                            .push(format!("data:{}", String::from_utf8_lossy(&pending)));
                        let mut out = b"echo:".to_vec();
                        out.append(&mut pending);
                        if s.write_all(&out).await.is_err() {
                            return;
                        }
                    }
                    match s.read(&mut b).await {
                        Ok(n) if n > 0 => pending.extend_from_slice(&b[..n]),
                        _ => {
                            piped.lock().unwrap().push("closed".into());
                            return;
                        }
                    }
                }
            }
        }
    })
    .await;
    (addr, heads, frames)
}

/// A raw client connection to `proxy`: sends `GET url` with `headers` (absolute-form, or
/// origin-form to a sidecar when `url` is a path) and reads the response head (status line and
/// fields, lower-cased) — and for a refusal, the body.
async fn raw_get(proxy: std::net::SocketAddr, url: &str, headers: &[(&str, &str)]) -> (tokio::net::TcpStream, String) {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let proxy_host = proxy.to_string();
    let host = if url.starts_with('/') {
        proxy_host.as_str()
    } else {
        url.split('/').nth(2).unwrap()
    };
    let mut req = format!("GET {url} HTTP/1.1\r\nHost: {host}\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let (head, body) = read_message(&mut s, &mut buf).await.expect("a response");
    (
        s,
        format!("{head}{}", String::from_utf8_lossy(&body).to_ascii_lowercase()),
    )
}

/// Send `frame` on an upgraded connection and read what comes back: `None` once the
/// connection is closed (or nothing comes within 5 s).
async fn exchange(s: &mut tokio::net::TcpStream, frame: &[u8]) -> Option<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(frame).await.ok()?;
    let mut b = [0u8; 4096];
    match tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await {
        Ok(Ok(n)) if n > 0 => Some(b[..n].to_vec()),
        _ => None,
    }
}

/// WebSockets (RFC 6455) through the gateway: the upgrade is a `GET` decided like any other
/// (mandate, policy, egress, audit — recorded as kind `websocket`), forwarded with the
/// injected credential and without the mandate; frames then flow both ways unread, so an
/// upgrade is refused where a rule, allowlist or budget would read bodies. Other upgrades
/// (`h2c`) are stripped, an upstream's unasked 101 is refused, and a session is cut once its
/// mandate is revoked or expires.
async fn websocket_upgrades_are_governed_and_cut_with_their_mandate(b: Backend) {
    let Some((env, sidecar)) = start_with_sidecar(b, "rt").await else {
        return;
    };
    let (up, heads, frames) = ws_upstream().await;
    let policy = read_only_policy(&env).await;
    add_resource_at(&env, "rt", "ws.test", up.port(), json!({"kind": "bearer"}), &policy).await;
    let base = format!("http://ws.test:{}", up.port());
    let m = mandate_reaching(&env, "GET", &format!("{base}/v1/plain"), b"").await;
    let a = auth(&m);
    let ws = |a: &str| {
        [
            ("proxy-authorization", a.to_string()),
            ("upgrade", "websocket".to_string()),
            ("connection", "Upgrade".to_string()),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==".to_string()),
            ("sec-websocket-version", "13".to_string()),
            ("x-request-id", "ws-1".to_string()),
        ]
    };
    let hs = ws(&a);
    let h: Vec<(&str, &str)> = hs.iter().map(|(k, v)| (*k, v.as_str())).collect();

    // Allowed: switched, frames both ways, the upstream saw the credential, not the mandate.
    let (mut s, head) = raw_get(env.proxy, &format!("{base}/v1/realtime"), &h).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains("\r\nupgrade: websocket\r\n"),
        "the client is told what it switched to: {head}"
    );
    assert_eq!(exchange(&mut s, b"hello").await.as_deref(), Some(&b"echo:hello"[..]));
    assert_eq!(exchange(&mut s, b"again").await.as_deref(), Some(&b"echo:again"[..]));
    let seen = heads.lock().unwrap().last().cloned().unwrap();
    assert!(seen.starts_with("get /v1/realtime http/1.1"), "{seen}");
    for want in [
        "\r\nupgrade: websocket\r\n",
        "\r\nconnection: upgrade\r\n",
        "\r\nauthorization: bearer sk-second-secret\r\n",
        "\r\nsec-websocket-key: ",
    ] {
        assert!(seen.contains(want), "{want:?} in {seen}");
    }
    assert!(
        !seen.contains("proxy-authorization") && !seen.contains(&m.to_ascii_lowercase()),
        "{seen}"
    );
    assert!(
        env.audited(|e| e["kind"] == "websocket" && e["decision"] == "allow" && e["request_id"] == "ws-1")
            .await,
        "the upgrade is audited as a WebSocket"
    );
    // The same through a sidecar bound to the resource (the mandate as a bearer).
    let bearer = format!("Bearer {m}");
    let mut hsc = h.clone();
    hsc.retain(|(k, _)| *k != "proxy-authorization");
    hsc.push(("authorization", &bearer));
    let sidecar_addr: std::net::SocketAddr = format!("127.0.0.1:{sidecar}").parse().unwrap();
    let (mut sc, head) = raw_get(sidecar_addr, "/v1/realtime", &hsc).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert_eq!(exchange(&mut sc, b"side").await.as_deref(), Some(&b"echo:side"[..]));
    let seen = heads.lock().unwrap().last().cloned().unwrap();
    assert!(
        seen.contains("\r\nauthorization: bearer sk-second-secret\r\n") && seen.contains("\r\nupgrade: websocket\r\n"),
        "{seen}"
    );
    assert!(!seen.contains(&m.to_ascii_lowercase()), "{seen}");

    // Any other upgrade goes as a plain request, without its Upgrade.
    let (_s2, head) = raw_get(
        env.proxy,
        &format!("{base}/v1/plain"),
        &[
            ("proxy-authorization", &a),
            ("upgrade", "h2c"),
            ("connection", "Upgrade, HTTP2-Settings"),
            ("http2-settings", "AAMAAABkAAQAoAAAAAIAAAAA"),
        ],
    )
    .await;
    assert!(head.starts_with("http/1.1 200") && head.ends_with("ok"), "{head}");
    let seen = heads.lock().unwrap().last().cloned().unwrap();
    assert!(
        !seen.contains("\r\nupgrade:") && !seen.contains("http2-settings"),
        "{seen}"
    );

    // An upstream that switches protocols unasked is refused (no pipe past the checks).
    let (mut s3, head) = raw_get(
        env.proxy,
        &format!("{base}/v1/rogue101"),
        &[
            ("proxy-authorization", &a),
            ("upgrade", "h2c"),
            ("connection", "Upgrade"),
        ],
    )
    .await;
    assert!(head.starts_with("http/1.1 502"), "{head}");
    assert!(head.contains("upstream_unreachable"), "{head}");
    assert_eq!(
        exchange(&mut s3, b"sneak").await,
        None,
        "no pipe after a refused switch"
    );

    // Where policy reads bodies (the default resource's policy has a model rule), the
    // upgrade is refused and recorded.
    let hs_default = ws(&a);
    let mut hd: Vec<(&str, &str)> = hs_default.iter().map(|(k, v)| (*k, v.as_str())).collect();
    hd.retain(|(k, _)| *k != "x-request-id");
    hd.push(("x-request-id", "ws-refused"));
    let (_s4, head) = raw_get(env.proxy, &format!("{}/v1/realtime", env.api_url()), &hd).await;
    assert!(head.starts_with("http/1.1 403"), "{head}");
    assert!(head.contains("upgrade_uninspectable"), "{head}");
    assert!(
        env.audited(|e| e["kind"] == "websocket" && e["decision"] == "deny" && e["request_id"] == "ws-refused")
            .await,
        "the refused upgrade is audited"
    );

    // A session is cut when its mandate expires: frames pass until then, none after.
    let short = env.mandate(&[("lifetime", "2")]).await;
    let hs_short = ws(&auth(&short));
    let h_short: Vec<(&str, &str)> = hs_short.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (mut s5, head) = raw_get(env.proxy, &format!("{base}/v1/realtime"), &h_short).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    let mut echoed = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut cut = false;
    while !cut && std::time::Instant::now() < deadline {
        match exchange(&mut s5, b"tick").await {
            Some(_) => {
                echoed += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            None => cut = true,
        }
    }
    assert!(
        cut && echoed > 0,
        "the session ran ({echoed} frames) and was cut at expiry"
    );
    assert!(
        env.recorded("exchange_end", |e| e["kind"] == "websocket"
            && e["outcome"] == "expired"
            && e["status"] == 101
            && e["duration_ms"].as_i64().is_some_and(|d| d >= 1000))
            .await,
        "the session's end is recorded with its reason"
    );

    // (The gateway closed the upstream side of the rogue switch and of the expired session;
    // the first session is still open.)
    let closed = || frames.lock().unwrap().iter().filter(|f| *f == "closed").count();
    assert!(
        eventually(Duration::from_secs(10), || async { closed() == 2 }).await,
        "{:?}",
        frames.lock().unwrap()
    );

    // Revocation cuts a live session: the next frame does not reach the upstream.
    let before = heads.lock().unwrap().len();
    let (mut s6, head) = raw_get(env.proxy, &format!("{base}/v1/realtime"), &h).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert_eq!(exchange(&mut s6, b"live").await.as_deref(), Some(&b"echo:live"[..]));
    assert_eq!(heads.lock().unwrap().len(), before + 1);
    let keys = env
        .api(Method::GET, &format!("/v1/agents/{}/api-keys", env.agent), None)
        .await
        .json_value();
    let kid = keys["items"][0]["id"].as_str().unwrap().to_string();
    let r = env
        .api(
            Method::DELETE,
            &format!("/v1/agents/{}/api-keys/{kid}", env.agent),
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(
        eventually(Duration::from_secs(15), || async {
            env.with_credential("GET", &format!("{base}/v1/plain"), &a).await.code() == "mandate_revoked"
        })
        .await,
        "the revocation reached the gateway"
    );
    assert_eq!(exchange(&mut s6, b"after").await, None, "the session is cut");
    assert!(
        env.recorded("exchange_end", |e| e["kind"] == "websocket"
            && e["outcome"] == "revoked")
            .await,
        "the cut is recorded"
    );
    // The gateway closed the upstream side too, and the frame sent after the revocation
    // never went up (it would have arrived before the close).
    assert!(
        eventually(Duration::from_secs(10), || async { closed() == 3 }).await,
        "the upstream connections were closed: {:?}",
        frames.lock().unwrap()
    );
    let log = frames.lock().unwrap().clone();
    assert!(log.contains(&"data:live".to_string()), "{log:?}");
    assert!(
        !log.iter().any(|f| f.contains("after")),
        "a frame went up after the revocation: {log:?}"
    );
    drop(s);
    env.stop().await;
}

/// A real WebSocket client and server (Python's `websockets`) through a sidecar: the handshake
/// (key and accept) and the frames pass unchanged, the server sees the resource's credential,
/// never the mandate.
async fn a_python_websocket_client_through_a_sidecar(b: Backend) {
    const SERVER: &str = r#"
import asyncio, sys, websockets
async def echo(ws):
    auth = ws.request.headers.get("Authorization", "-")
    async for msg in ws:
        await ws.send(auth + "|" + msg)
async def main():
    async with websockets.serve(echo, "127.0.0.1", int(sys.argv[1])):
        await asyncio.Future()
asyncio.run(main())
"#;
    const CLIENT: &str = r#"
import asyncio, sys, websockets
async def main():
    async with websockets.connect(sys.argv[1], additional_headers={"Authorization": "Bearer " + sys.argv[2]},
                                  proxy=None, open_timeout=10) as ws:
        await ws.send("hello")
        print(await asyncio.wait_for(ws.recv(), 10))
asyncio.run(main())
"#;
    let Some((env, sidecar)) = start_with_sidecar(b, "rt").await else {
        return;
    };
    let (_server, port) = python_server(SERVER, &[]).await;
    let policy = read_only_policy(&env).await;
    let rt = add_resource_at(&env, "rt", "ws.test", port, json!({"kind": "bearer"}), &policy).await;
    let url = format!("ws://127.0.0.1:{sidecar}/v1/realtime");
    // (Mandates minted before the grant reached the STS do not cover the resource: retry.)
    let last = std::sync::Mutex::new(String::new());
    let ok = eventually(Duration::from_secs(20), || async {
        let m = env.mandate(&[]).await;
        let (ran, text) = python_run(CLIENT, &[&url, &m]).await;
        let good = ran && text.trim() == "Bearer sk-second-secret|hello" && !text.contains(&m);
        *last.lock().unwrap() = text;
        good
    })
    .await;
    assert!(ok, "{}", last.lock().unwrap());
    assert!(
        env.audited(|e| e["kind"] == "websocket" && e["decision"] == "allow" && e["resource"] == rt.as_str())
            .await,
        "the upgrade is audited"
    );
    assert!(
        env.recorded("exchange_end", |e| e["kind"] == "websocket"
            && e["outcome"] == "closed"
            && e["status"] == 101
            && e["resource"] == rt.as_str())
            .await,
        "a session the client closed is recorded as closed"
    );
    env.stop().await;
}

/// A loopback upstream that answers `101 Switching Protocols` to any `/v1/switch…` request
/// without switching — it keeps parsing HTTP on the connection (an endpoint whose status a
/// client can steer, the WebSocket-smuggling setup) — and a 200 `ok` to anything else.
/// Records each request line (lower-cased), and `closed` when a connection ends.
async fn fake_switch_upstream() -> (std::net::SocketAddr, Log) {
    use tokio::io::AsyncWriteExt;
    let lines: Log = Default::default();
    let seen = lines.clone();
    let addr = loopback(move |mut s| {
        let seen = seen.clone();
        async move {
            let mut buf = Vec::new();
            loop {
                let Some((head, _)) = read_message(&mut s, &mut buf).await else {
                    seen.lock().unwrap().push("closed".into());
                    return;
                };
                let line = head.lines().next().unwrap_or("").to_string();
                seen.lock().unwrap().push(line.clone());
                let resp: &[u8] = if line.contains(" /v1/switch") {
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
                } else {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                };
                if s.write_all(resp).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    (addr, lines)
}

/// An upstream's 101 opens a pipe only when it accepts the WebSocket the gateway forwarded
/// (RFC 6455 §4.2.2: `Upgrade: websocket` and the `Sec-WebSocket-Accept` of the request's key).
/// A 101 from an endpoint that did not switch would leave the agent a raw HTTP connection to
/// the upstream: requests on it (any method, any path) would skip every decision.
async fn a_101_that_accepts_no_websocket_opens_no_pipe(b: Backend) {
    let Some(env) = start(b, |_| {}).await else { return };
    let (up, lines) = fake_switch_upstream().await;
    let policy = read_only_policy(&env).await;
    add_resource_at(&env, "rt", "ws.test", up.port(), json!({"kind": "bearer"}), &policy).await;
    let base = format!("http://ws.test:{}", up.port());
    let m = mandate_reaching(&env, "GET", &format!("{base}/v1/plain"), b"").await;
    let a = auth(&m);
    // The policy refuses a DELETE.
    let r = env.with_credential("DELETE", &format!("{base}/v1/items/1"), &a).await;
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    let (mut s, head) = raw_get(
        env.proxy,
        &format!("{base}/v1/switch"),
        &[
            ("proxy-authorization", &a),
            ("upgrade", "websocket"),
            ("connection", "Upgrade"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-version", "13"),
        ],
    )
    .await;
    let smuggled = exchange(
        &mut s,
        b"DELETE /v1/items/1 HTTP/1.1\r\nHost: ws.test\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    closed_or(&lines, |l| l.starts_with("delete")).await;
    let seen = lines.lock().unwrap().clone();
    assert!(
        !seen.iter().any(|l| l.starts_with("delete")),
        "a request reached the upstream undecided: {seen:?} (head {head:?}, answer {:?})",
        smuggled.map(|b| String::from_utf8_lossy(&b).into_owned())
    );
    assert!(head.starts_with("http/1.1 502"), "{head}");
    env.stop().await;
}

/// A stale revocation feed refuses everything (a revocation may be missing); a live WebSocket
/// is no exception: its next frame cuts it, as a revocation would.
async fn a_live_websocket_is_cut_when_the_revocation_feed_goes_stale(b: Backend) {
    let Some((env, faulty)) = start_with_faulty_feed(b).await else {
        return;
    };
    let (up, _heads, frames) = ws_upstream().await;
    let policy = read_only_policy(&env).await;
    add_resource_at(&env, "rt", "ws.test", up.port(), json!({"kind": "bearer"}), &policy).await;
    let base = format!("http://ws.test:{}", up.port());
    let m = mandate_reaching(&env, "GET", &format!("{base}/v1/plain"), b"").await;
    let a = auth(&m);
    let (mut s, head) = raw_get(
        env.proxy,
        &format!("{base}/v1/realtime"),
        &[
            ("proxy-authorization", &a),
            ("upgrade", "websocket"),
            ("connection", "Upgrade"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-version", "13"),
        ],
    )
    .await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert_eq!(exchange(&mut s, b"fresh").await.as_deref(), Some(&b"echo:fresh"[..]));
    faulty.fail_reads(true);
    assert!(
        eventually(Duration::from_secs(10), || async {
            env.with_credential("GET", &format!("{base}/v1/plain"), &a).await.code() == "revocation_feed_stale"
        })
        .await,
        "the feed went stale"
    );
    let after = exchange(&mut s, b"stale").await;
    closed_or(&frames, |f| f.contains("stale")).await;
    let log = frames.lock().unwrap().clone();
    assert!(
        after.is_none() && !log.iter().any(|f| f.contains("stale")),
        "a frame went up while the feed was stale: {after:?} {log:?}"
    );
    env.stop().await;
}

/// The gateway's own forwarder (an inspected body past the replay buffer) refuses an upstream's
/// unasked 101 as Pingora's path does: the agent never sees a switch it was not granted.
async fn an_unasked_101_is_refused_on_the_own_forwarder_path(b: Backend) {
    use tokio::io::AsyncWriteExt;
    const POST_POLICY: &str =
        "rules:\n  - id: chat\n    methods: [POST]\n    paths: [\"/v1/**\"]\n    models: [\"gpt-4o\"]\n";
    let Some(env) = start(b, |_| {}).await else { return };
    let (up, lines) = fake_switch_upstream().await;
    let p = env
        .api(
            Method::POST,
            "/v1/policies",
            Some(json!({"name": "post", "document": POST_POLICY, "activate": true})),
        )
        .await;
    assert!(p.status.is_success(), "{}", p.text());
    let policy = p.json_value()["policy"]["id"].as_str().unwrap().to_string();
    add_resource_at(&env, "rt", "ws.test", up.port(), json!({"kind": "bearer"}), &policy).await;
    let base = format!("http://ws.test:{}", up.port());
    let small = json!({"model": "gpt-4o"}).to_string();
    let m = mandate_reaching(&env, "POST", &format!("{base}/v1/plain"), small.as_bytes()).await;
    let big = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x".repeat(100 * 1024)}]}).to_string();
    for (what, extra) in [
        ("small body, Pingora's path", small.as_str()),
        ("large body, own forwarder", big.as_str()),
    ] {
        let mut s = tokio::net::TcpStream::connect(env.proxy).await.unwrap();
        let req = format!(
            "POST {base}/v1/switch HTTP/1.1\r\nHost: ws.test:{}\r\nProxy-Authorization: {}\r\nContent-Type: application/json\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nContent-Length: {}\r\n\r\n",
            up.port(),
            auth(&m),
            extra.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        s.write_all(extra.as_bytes()).await.unwrap();
        let head = read_message(&mut s, &mut Vec::new())
            .await
            .map(|(head, _)| head)
            .unwrap_or_default();
        assert!(
            head.starts_with("http/1.1 502"),
            "{what}: {head:?} (upstream saw {:?})",
            lines.lock().unwrap()
        );
    }
    env.stop().await;
}
