//! `caracal-bench`: reproducible measurements. Each scenario starts what it measures in this
//! process (real sockets, real backends), seeds it through the public APIs, warms it up, then
//! measures. Run with `--release`.

use std::sync::Arc;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::time::Duration;

use bytes::Bytes;
use caracal_bench::{MakeRequest, closed_loop, machine};
use caracal_shared::config::BusBackend;
use caracal_shared::http::client::HttpClient;
use caracal_shared::runtime::Runtime;
use caracal_shared::shutdown::Shutdown;
use caracal_shared::testing::{self, Backend, TestDb};
use clap::{Parser, Subcommand, ValueEnum};
use http::Method;
use http_body_util::Full;
use serde_json::json;

#[derive(Parser)]
#[command(name = "caracal-bench")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

mod audit;
mod gateway;
mod revocation;

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Store {
    /// SQLite and the embedded bus (caracal dev).
    Sqlite,
    /// Postgres and Redis (production topology).
    Postgres,
}

#[derive(Subcommand)]
enum Cmd {
    /// Token exchanges per second (API key → mandate) with warm caches.
    Sts {
        #[arg(long, value_enum, default_value = "postgres")]
        store: Store,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 32)]
        workers: usize,
    },
    /// Audit ingest: events/s into the ledger with heads signed, and lag to a signed head.
    Audit {
        #[arg(long, value_enum, default_value = "postgres")]
        store: Store,
        /// Events in the backlog drained for the throughput figure.
        #[arg(long, default_value_t = 300_000)]
        events: u64,
        /// Duration of the fixed-rate (lag) part.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Events per second in the lag part.
        #[arg(long, default_value_t = 10_000)]
        rate: u64,
        #[arg(long, default_value_t = 2)]
        producers: usize,
    },
    /// Upstream directly vs a plain Pingora passthrough vs the governed gateway, in one run.
    Gateway {
        #[arg(long, value_enum, default_value = "sqlite")]
        store: Store,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 32)]
        connections: usize,
        /// Request rate of the fixed-rate (latency) part.
        #[arg(long, default_value_t = 3000)]
        rate: u64,
        /// Only the closed loop on targets whose name starts with this (for profiling).
        #[arg(long)]
        only: Option<String>,
        /// With `--only`: the fixed-rate (open) loop at `--rate` instead of the closed loop
        /// (to profile the gateway at the rate its added latency is measured).
        #[arg(long)]
        open_loop: bool,
        /// Proxy threads, for both the plain passthrough and the gateway.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Closed-loop rounds: every target once per round, in a rotating order; the table
        /// shows each target's median round and the ratios are medians of per-round ratios
        /// (a shared VM drifts by tens of percent between minutes).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Revocation propagation: revoke call returning → the last of two gateways refusing.
    Revocation {
        #[arg(long, value_enum, default_value = "postgres")]
        store: Store,
        #[arg(long, default_value_t = 200)]
        iterations: usize,
    },
}

impl Store {
    fn label(self) -> &'static str {
        match self {
            Store::Sqlite => "SQLite + embedded bus",
            Store::Postgres => "Postgres + Redis",
        }
    }
}

fn main() {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Sts {
                store,
                seconds,
                workers,
            } => sts(store, seconds, workers).await,
            Cmd::Audit {
                store,
                events,
                seconds,
                rate,
                producers,
            } => audit::run(store, events, seconds, rate, producers).await,
            Cmd::Gateway {
                store,
                seconds,
                connections,
                rate,
                only,
                open_loop,
                threads,
                rounds,
            } => {
                let only = only.map(|prefix| gateway::Only {
                    prefix,
                    fixed_rate: open_loop,
                });
                gateway::run(store, seconds, connections, rate, only, threads, rounds).await
            }
            Cmd::Revocation { store, iterations } => revocation::run(store, iterations).await,
        }
    });
}

pub(crate) struct System {
    rt: Runtime,
    db: Option<TestDb>,
    sd: Shutdown,
    control: String,
    admin: String,
    tenant: String,
    client: HttpClient,
}

impl System {
    pub(crate) async fn start(store: Store) -> System {
        system(store, |_| {}).await
    }

    pub(crate) async fn start_with(store: Store, tweak: impl FnOnce(&mut caracal_shared::config::Config)) -> System {
        system(store, tweak).await
    }
}

async fn system(store: Store, tweak: impl FnOnce(&mut caracal_shared::config::Config)) -> System {
    let backend = match store {
        Store::Sqlite => Backend::Sqlite,
        Store::Postgres => Backend::Postgres,
    };
    let db = TestDb::new(backend).await.expect("database");
    let bus = if store == Store::Sqlite {
        BusBackend::Embedded
    } else {
        BusBackend::Redis
    };
    let mut cfg = testing::test_config(&db.url, bus);
    // The STS the gateway would call for API keys (the benchmarks start it when they need it).
    let sts_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    cfg.gateway.sts_url = format!("http://{}", sts_l.local_addr().unwrap());
    cfg.data_dir = std::env::temp_dir().join(format!("caracal-bench-{}", std::process::id()));
    // One agent drives all the load: its rate limit must not be what is measured.
    cfg.gateway.agent_rate_per_sec = 10_000_000;
    cfg.gateway.agent_rate_burst = 10_000_000;
    tweak(&mut cfg);
    cfg.telemetry.log_level = "warn".into();
    let sd = Shutdown::new();
    let rt = Runtime::start(cfg, sd.clone()).await.expect("runtime");
    rt.spawn_relay();
    let admin = caracal_control::bootstrap_admin_token(&rt).await.unwrap().unwrap();
    let cl = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let control = format!("http://{}", cl.local_addr().unwrap());
    let rt2 = rt.clone();
    tokio::spawn(async move { caracal_control::serve(rt2, cl).await });
    let rt3 = rt.clone();
    tokio::spawn(async move { caracal_sts::serve(rt3, sts_l).await });
    let client = HttpClient::unrestricted();
    let mut s = System {
        rt,
        db: Some(db),
        sd,
        control,
        admin,
        tenant: String::new(),
        client,
    };
    s.tenant = s.api(Method::POST, "/v1/tenants", json!({"name": "bench"})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    s
}

impl System {
    async fn api(&self, m: Method, path: &str, body: serde_json::Value) -> serde_json::Value {
        let auth = format!("Bearer {}", self.admin);
        let mut h = vec![("authorization", auth.as_str())];
        if !self.tenant.is_empty() {
            h.push(("x-caracal-tenant", self.tenant.as_str()));
        }
        let r = self
            .client
            .send_json(m, &format!("{}{path}", self.control), &h, &body)
            .await
            .unwrap();
        assert!(r.status.is_success(), "{path}: {}", r.text());
        r.json_value()
    }

    /// An agent with an API key and a grant of every scope on `res` under `pol`.
    pub(crate) async fn agent_with_grant(
        &self,
        name: &str,
        res: &serde_json::Value,
        pol: &serde_json::Value,
    ) -> (String, String) {
        let agent = self.api(Method::POST, "/v1/agents", json!({ "name": name })).await;
        let aid = agent["id"].as_str().unwrap().to_string();
        let key = self
            .api(Method::POST, &format!("/v1/agents/{aid}/api-keys"), json!({}))
            .await["secret"]
            .as_str()
            .unwrap()
            .to_string();
        self.api(
            Method::POST,
            "/v1/grants",
            json!({"agent_id": aid, "resource_id": res["id"], "policy_id": pol["policy"]["id"], "scopes": ["*"]}),
        )
        .await;
        (aid, key)
    }

    /// A mandate for an API key, from the STS.
    pub(crate) async fn mandate(&self, key: &str) -> String {
        let sts = self.rt.config.gateway.sts_url.clone();
        let c = self.client.clone();
        assert!(
            testing::eventually(Duration::from_secs(20), || {
                let c = c.clone();
                let u = format!("{sts}/readyz");
                async move { c.get(&u).await.map(|r| r.status == 200).unwrap_or(false) }
            })
            .await
        );
        let r = self
            .client
            .post_form(
                &format!("{sts}/oauth/token"),
                &[],
                &[
                    ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
                    ("subject_token_type", "urn:caracal:params:oauth:token-type:api-key"),
                    ("subject_token", key),
                    ("lifetime", "3600"),
                ],
            )
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        r.json_value()["access_token"].as_str().unwrap().to_string()
    }

    async fn stop(mut self) {
        self.sd.trigger();
        tokio::time::sleep(Duration::from_millis(200)).await;
        // The audit stream of a run holds gigabytes of events nobody consumes: give the
        // shared Redis its memory back.
        let bus = &self.rt.config.bus;
        if bus.backend == BusBackend::Redis
            && let Ok(r) = caracal_shared::bus::redis::RedisBus::connect(&bus.redis_url, &bus.redis_prefix).await
            && let Err(e) = r.drop_prefix().await
        {
            eprintln!("could not drop the run's Redis keys: {e}");
        }
        self.rt.store.close().await;
        if let Some(db) = self.db.take() {
            db.cleanup().await;
        }
    }
}

async fn sts(store: Store, seconds: u64, workers: usize) {
    let sys = system(store, |_| {}).await;
    let res = sys
        .api(
            Method::POST,
            "/v1/resources",
            json!({"name": "openai", "base_url": "https://api.openai.com"}),
        )
        .await;
    let pol = sys
        .api(
            Method::POST,
            "/v1/policies",
            json!({"name": "chat", "activate": true, "document": "rules:\n  - id: chat\n    scopes: [chat]\n    methods: [POST]\n    paths: [\"/v1/chat/completions\"]\n    models: [\"gpt-4o*\"]\n  - id: read\n    scopes: [read]\n    methods: [GET]\n    paths: [\"/v1/**\"]\n  - id: no-admin\n    effect: deny\n    paths: [\"/v1/admin/**\"]\n"}),
        )
        .await;
    let (_, key) = sys.agent_with_grant("bench", &res, &pol).await;
    // Wait for the STS (started with the system) and check the key works.
    let _ = sys.mandate(&key).await;
    let addr: std::net::SocketAddr = sys
        .rt
        .config
        .gateway
        .sts_url
        .trim_start_matches("http://")
        .parse()
        .unwrap();

    let body = Bytes::from(format!(
        "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange&subject_token_type=urn%3Acaracal%3Aparams%3Aoauth%3Atoken-type%3Aapi-key&subject_token={key}"
    ));
    let make: MakeRequest = Arc::new(move || {
        http::Request::post("/oauth/token")
            .header("host", "sts")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(body.clone()))
            .unwrap()
    });
    let warm = closed_loop(addr, workers, Duration::from_secs(2), make.clone()).await;
    assert_eq!(warm.non_2xx, 0, "warm-up failed: {}", warm.summary());
    let s = closed_loop(addr, workers, Duration::from_secs(seconds), make).await;
    let label = store.label();
    println!("machine: {}", machine());
    println!("STS token exchange (API key → mandate), {label}, {workers} keep-alive connections, {seconds}s:");
    println!("  {}", s.summary());
    println!(
        "| STS mints, {label} | {:.0}/s | {} | {} | {} |",
        s.rps(),
        caracal_bench::fmt(s.pct(50.0)),
        caracal_bench::fmt(s.pct(99.0)),
        s.errors + s.non_2xx
    );
    sys.stop().await;
}
