//! `caracal sessions …` and `caracal revoke …` as an operator runs them, against a real
//! coordinator on both backends.

use std::process::Command;
use std::time::Duration;

use caracal_shared::config::BusBackend;
use caracal_shared::http::client::HttpClient;
use caracal_shared::ids::{AgentId, MandateId, SessionId};
use caracal_shared::store::admin::AdminScope;
use caracal_shared::store::coordination::{Session, SessionStatus};
use caracal_shared::testing::{self, Backend, TestDb, eventually};
use caracal_shared::time::now_micros;
use serde_json::Value;

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite { $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(caracal_shared::testing::Backend::Sqlite).await; })* }
        mod postgres { $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(caracal_shared::testing::Backend::Postgres).await; })* }
    };
}

on_both_backends!(list_show_and_revoke);

fn session(t: caracal_shared::ids::TenantId, agent: AgentId, parent: Option<SessionId>) -> Session {
    let now = now_micros();
    Session {
        id: SessionId::new(),
        tenant_id: t,
        agent_id: agent,
        mandate_id: MandateId::new(),
        credential: None,
        revocation_ids: vec!["ab12".into()],
        parent_session: parent,
        status: SessionStatus::Active,
        labels: Default::default(),
        started_at: now,
        heartbeat_at: now,
        heartbeat_timeout_ms: 3_600_000,
        expires_at: now + 3_600_000_000,
        ended_at: None,
        end_reason: None,
        version: 1,
    }
}

async fn list_show_and_revoke(b: Backend) {
    caracal_shared::telemetry::init_for_tests();
    let Some(db) = TestDb::new(b).await else { return };
    let bus = match b {
        Backend::Sqlite => BusBackend::Embedded,
        Backend::Postgres => BusBackend::Redis,
    };
    if bus == BusBackend::Redis && testing::test_bus(bus, &db.store).await.is_none() {
        return;
    }
    let cfg = testing::test_config(&db.url, bus);
    let sd = caracal_shared::shutdown::Shutdown::new();
    let rt = caracal_shared::runtime::Runtime::start(cfg, sd.clone()).await.unwrap();
    let pepper = rt.config.keys.pepper.clone().unwrap();
    let mut tx = rt.store.begin().await.unwrap();
    let t = tx.insert_tenant("ops", "Ops").await.unwrap().id;
    let (_, token) = tx
        .issue_admin_token(&pepper, Some(t), "oncall", &[AdminScope::Read, AdminScope::Write], None)
        .await
        .unwrap();
    let (a1, a2) = (AgentId::new(), AgentId::new());
    let root = session(t, a1, None);
    let child = session(t, a2, Some(root.id));
    let other = session(t, a2, None);
    for s in [&root, &child, &other] {
        tx.insert_session(s).await.unwrap();
    }
    tx.commit().await.unwrap();

    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let rt2 = rt.clone();
    tokio::spawn(async move { caracal_coordinator::serve(rt2, l).await });
    let c = HttpClient::unrestricted();
    let u = format!("{url}/readyz");
    assert!(
        eventually(Duration::from_secs(15), || {
            let (c, u) = (c.clone(), u.clone());
            async move { c.get(&u).await.map(|r| r.status == 200).unwrap_or(false) }
        })
        .await
    );
    let caracal = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_caracal"))
            .args(args)
            .env("CARACAL_COORDINATOR_URL", &url)
            .env("CARACAL_ADMIN_TOKEN", &token)
            .output()
            .unwrap();
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).to_string(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };

    let (code, out, err) = caracal(&["sessions", "list", "--format", "json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["items"].as_array().unwrap().len(), 3);
    let (code, out, _) = caracal(&["sessions", "list", "--parent-session", &root.id.to_string()]);
    assert_eq!(code, 0);
    assert!(
        out.contains(&child.id.to_string()) && !out.contains(&other.id.to_string()),
        "{out}"
    );
    let (code, out, _) = caracal(&["sessions", "show", &root.id.to_string()]);
    assert_eq!(code, 0);
    assert!(out.contains("\"active\""));

    // Revoking the root revokes its child, not the unrelated session.
    let (code, out, err) = caracal(&["sessions", "revoke", &root.id.to_string(), "--reason", "incident 7"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("revoked: 2 session(s)"), "{out}");
    for (s, want) in [(&root, "revoked"), (&child, "revoked"), (&other, "active")] {
        assert_eq!(rt.store.session(t, s.id).await.unwrap().status.as_str(), want);
    }
    let live = rt.store.live_revocations().await.unwrap();
    assert!(live.iter().any(|r| r.key() == format!("session:{}", child.id)));

    // The bulk form: several agents at once.
    let (code, out, err) = caracal(&[
        "revoke",
        "agent",
        &a1.to_string(),
        &a2.to_string(),
        "--reason",
        "compromised",
        "--format",
        "json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["sessions_revoked"], serde_json::json!([other.id]));
    assert!(live_has(&rt, &format!("agent:{a1}")).await && live_has(&rt, &format!("agent:{a2}")).await);

    // Errors are clear and exit non-zero.
    let (code, _, err) = caracal(&["revoke", "planet", "x", "--reason", "r"]);
    assert_ne!(code, 0);
    assert!(err.contains("planet"), "{err}");
    let (code, _, err) = caracal(&["sessions", "show", &SessionId::new().to_string()]);
    assert_eq!(code, 2);
    assert!(err.contains("404"), "{err}");
    let (code, _, err) = caracal(&["revoke", "session", "ses_bad", "--reason", "r"]);
    assert_eq!(code, 2);
    assert!(err.contains("400"), "{err}");

    sd.trigger();
    rt.store.close().await;
    db.cleanup().await;
}

async fn live_has(rt: &caracal_shared::runtime::Runtime, key: &str) -> bool {
    rt.store
        .live_revocations()
        .await
        .unwrap()
        .iter()
        .any(|r| r.key() == key)
}

macro_rules! on_both_backends_budgets {
    ($($name:ident),* $(,)?) => {
        mod budgets_sqlite { $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(caracal_shared::testing::Backend::Sqlite).await; })* }
        mod budgets_postgres { $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name(caracal_shared::testing::Backend::Postgres).await; })* }
    };
}
on_both_backends_budgets!(budgets_show_reads_the_shared_ledger);

async fn budgets_show_reads_the_shared_ledger(b: Backend) {
    caracal_shared::telemetry::init_for_tests();
    let Some(db) = TestDb::new(b).await else { return };
    let bus = match b {
        Backend::Sqlite => BusBackend::Embedded,
        Backend::Postgres => BusBackend::Redis,
    };
    if bus == BusBackend::Redis && testing::test_bus(bus, &db.store).await.is_none() {
        return;
    }
    let cfg = testing::test_config(&db.url, bus);
    let sd = caracal_shared::shutdown::Shutdown::new();
    let rt = caracal_shared::runtime::Runtime::start(cfg, sd.clone()).await.unwrap();
    let admin = caracal_control::bootstrap_admin_token(&rt).await.unwrap().unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let rt2 = rt.clone();
    tokio::spawn(async move { caracal_control::serve(rt2, l).await });
    let c = HttpClient::unrestricted();
    let u = format!("{url}/readyz");
    assert!(
        eventually(Duration::from_secs(15), || {
            let (c, u) = (c.clone(), u.clone());
            async move { c.get(&u).await.map(|r| r.status == 200).unwrap_or(false) }
        })
        .await
    );
    let auth = format!("Bearer {admin}");
    let t = c
        .send_json(
            http::Method::POST,
            &format!("{url}/v1/tenants"),
            &[("authorization", &auth)],
            &serde_json::json!({"name": "acme"}),
        )
        .await
        .unwrap()
        .json_value()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let h = [("authorization", auth.as_str()), ("x-caracal-tenant", t.as_str())];
    let bud = c
        .send_json(
            http::Method::POST,
            &format!("{url}/v1/budgets"),
            &h,
            &serde_json::json!({"name": "monthly-usd", "unit": "micros", "limit": 5_000_000, "window": {"kind": "monthly", "tz": "UTC"}}),
        )
        .await
        .unwrap()
        .json_value();
    let id = caracal_shared::ids::BudgetId::parse(bud["id"].as_str().unwrap()).unwrap();
    let budget: caracal_shared::store::admin::Budget = rt
        .store
        .get(caracal_shared::ids::TenantId::parse(&t).unwrap(), &id.to_string())
        .await
        .unwrap();
    // A gateway's lease: 2 units reserved, then 1.25 spent.
    let ledger = caracal_shared::budget_ledger::connect(&rt.config.bus).await.unwrap();
    let w = caracal_shared::budget_ledger::window_of(&budget, now_micros());
    let g = ledger
        .grant(id, &w, budget.limit, 2_000_000, 1, 1, Duration::from_secs(60))
        .await
        .unwrap();
    let show = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_caracal"))
            .args(args)
            .env("CARACAL_CONTROL_URL", &url)
            .env("CARACAL_ADMIN_TOKEN", &admin)
            .env("CARACAL_TENANT", &t)
            .output()
            .unwrap();
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr),
        )
    };
    let (code, out) = show(&["budgets", "show", "--json"]);
    assert_eq!(code, 0, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["items"][0]["usage"]["reserved"], 2_000_000);
    assert_eq!(v["items"][0]["usage"]["remaining"], 3_000_000);
    ledger
        .release(id, g.lease.as_deref().unwrap(), 1_250_000)
        .await
        .unwrap();
    let (code, out) = show(&["budgets", "show", &id.to_string()]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("monthly-usd") && out.contains("1250000") && out.contains("3750000"),
        "{out}"
    );
    let (code, out) = show(&["budgets", "show", "bud_nope"]);
    assert_eq!(code, 2, "{out}");
    sd.trigger();
    rt.store.close().await;
    db.cleanup().await;
}
