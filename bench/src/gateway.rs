//! The gateway benchmark: in one run on this machine, the same small request
//!
//! 1. straight to the upstream,
//! 2. through a plain Pingora passthrough built from the same crate versions (absolute-form in,
//!    origin-form out, upstream keep-alive, the gateway's upstream timeouts — what a forward proxy
//!    does with no governance),
//!    sent exactly the same client request (with its `Proxy-Authorization`, which it ignores),
//! 3. through the governed gateway (cached mandate, policy, revocation check, egress guard,
//!    credential injection, audit event per request),
//!
//! first at full speed (closed loop, `wrk` when installed, else the in-process generator), then
//! at a fixed rate (open loop, latency from the scheduled send time) to get the latency the
//! gateway adds. Pingora and the upstream each run on their own threads, one worker each.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use caracal_bench::{MakeRequest, Stats, closed_loop, fmt, machine, open_loop, threads_cpu};
use caracal_shared::egress::Resolver;
use http::Method;
use http_body_util::Full;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;
use serde_json::json;

use crate::{Store, System};

/// Resolves the benchmark's upstream name to loopback.
pub(crate) struct BenchResolver;

#[async_trait]
impl Resolver for BenchResolver {
    async fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
        if host == "api.bench" || host == "api2.bench" {
            Ok(vec![SocketAddr::from(([127, 0, 0, 1], port))])
        } else {
            Err(std::io::Error::other("unknown benchmark host"))
        }
    }
}

/// The upstream: a hyper HTTP/1.1 server answering a small JSON body, on its own thread.
pub(crate) fn upstream() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    l.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            let body = Bytes::from_static(br#"{"object":"list","data":[{"id":"gpt-4o-mini"}]}"#);
            loop {
                let Ok((s, _)) = l.accept().await else { continue };
                let _ = s.set_nodelay(true);
                let body = body.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        let body = body.clone();
                        async move {
                            let mut r = http::Response::new(Full::new(body));
                            r.headers_mut()
                                .insert("content-type", http::HeaderValue::from_static("application/json"));
                            Ok::<_, std::convert::Infallible>(r)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
                });
            }
        });
    });
    addr
}

/// A plain forward proxy with no governance: absolute-form in, origin-form to one upstream,
/// with the gateway's upstream timeouts (connect and read: configuration, not governance; a
/// read timeout makes Pingora arm a timer for every upstream read).
struct Plain {
    upstream: SocketAddr,
    connect_timeout: Duration,
    read_timeout: Duration,
}

#[async_trait]
impl ProxyHttp for Plain {
    type CTX = ();
    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _s: &mut Session, _c: &mut ()) -> pingora::Result<Box<HttpPeer>> {
        let mut peer = HttpPeer::new(self.upstream, false, String::new());
        peer.options.connection_timeout = Some(self.connect_timeout);
        peer.options.read_timeout = Some(self.read_timeout);
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        _s: &mut Session,
        up: &mut RequestHeader,
        _c: &mut (),
    ) -> pingora::Result<()> {
        if let pingora_http::authority::RawTargetAuthority::Absolute { path_and_query, .. } =
            pingora_http::authority::raw_target_authority(up.raw_path())
        {
            let pq = path_and_query.to_vec();
            up.set_raw_path(&pq)?;
        }
        Ok(())
    }
}

fn plain_proxy(upstream: SocketAddr, threads: usize, cfg: &caracal_shared::config::GatewayConfig) -> SocketAddr {
    let plain = Plain {
        upstream,
        connect_timeout: cfg.upstream_connect_timeout,
        read_timeout: cfg.upstream_read_timeout,
    };
    let port = caracal_shared::testing::free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let dir = std::env::temp_dir().join(format!("caracal-bench-plain-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = ServerConf {
        threads,
        pid_file: dir.join("p.pid").display().to_string(),
        upgrade_sock: dir.join("p.sock").display().to_string(),
        upstream_keepalive_pool_size: 256,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    std::thread::spawn(move || {
        let mut server = Server::new_with_opt_and_conf(None, conf);
        server.bootstrap();
        let mut svc = pingora::proxy::http_proxy_service(&server.configuration, plain);
        svc.add_tcp(&addr.to_string());
        server.add_service(svc);
        server.run_forever();
    });
    for _ in 0..500 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return addr;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("the plain proxy did not start");
}

/// User plus system CPU time this process has used so far.
fn process_cpu() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64);
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// One target of the comparison.
struct Target {
    name: &'static str,
    connect: SocketAddr,
    /// Request target as sent (origin-form for the upstream, absolute-form for proxies).
    path: String,
    host: String,
    auth: Option<String>,
    /// Name prefix of the proxy threads serving this target (none for the upstream).
    threads: Option<&'static str>,
}

impl Target {
    fn make(&self) -> MakeRequest {
        let (path, host, auth) = (self.path.clone(), self.host.clone(), self.auth.clone());
        Arc::new(move || {
            let mut b = http::Request::get(path.as_str()).header("host", host.as_str());
            if let Some(a) = &auth {
                b = b.header("proxy-authorization", a.as_str());
            }
            b.body(Full::new(Bytes::new())).unwrap()
        })
    }
}

/// Pingora names its worker threads after the service (truncated to 15 bytes by Linux).
const PLAIN_THREADS: &str = "Pingora HTTP Pr";
const GATEWAY_THREADS: &str = "caracal-gateway";

/// Full speed with wrk (one thread, `connections` connections), if installed.
async fn wrk(t: &Target, connections: usize, seconds: u64) -> Option<Stats> {
    let dir = std::env::temp_dir().join(format!("caracal-bench-wrk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    let script = dir.join(format!("{}.lua", t.name.replace(' ', "_")));
    let mut lua = format!(
        "wrk.method = \"GET\"\nwrk.path = \"{}\"\nwrk.headers[\"Host\"] = \"{}\"\n",
        t.path, t.host
    );
    if let Some(a) = &t.auth {
        lua.push_str(&format!("wrk.headers[\"Proxy-Authorization\"] = \"{a}\"\n"));
    }
    lua.push_str(
        "done = function(s, l, r)\n  io.write(string.format(\"CARACAL %d %d %d %d %d %d %d\\n\", s.requests, s.duration, \
         s.errors.connect + s.errors.read + s.errors.write + s.errors.timeout, s.errors.status, \
         l:percentile(50), l:percentile(99), l:percentile(99.9)))\nend\n",
    );
    std::fs::write(&script, lua).ok()?;
    let out = tokio::process::Command::new("wrk")
        .args(["-t1", &format!("-c{connections}"), &format!("-d{seconds}s"), "-s"])
        .arg(&script)
        .arg(format!("http://{}/", t.connect))
        .output()
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with("CARACAL "))?;
    let n: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let [requests, micros, errors, status, p50, p99, p999] = n[..] else {
        return None;
    };
    // wrk reports percentiles only: keep them as a three-point latency sample.
    Some(Stats {
        requests,
        errors,
        non_2xx: status,
        elapsed: Duration::from_micros(micros),
        latencies: vec![p50 as u32; 98]
            .into_iter()
            .chain([p99 as u32])
            .chain([p999 as u32])
            .collect(),
    })
}

/// A table row; `vs`: throughput relative to the plain passthrough.
fn row(name: &str, s: &Stats, vs: Option<f64>) -> String {
    let ratio = vs.map(|r| format!("{r:.2}×")).unwrap_or_else(|| "—".into());
    format!(
        "| {name} | {:.0} | {ratio} | {} | {} | {} | {} |",
        s.rps(),
        fmt(s.pct(50.0)),
        fmt(s.pct(99.0)),
        fmt(s.pct(99.9)),
        s.errors + s.non_2xx
    )
}

/// Every target once per round for `rounds` rounds, the order rotating by one each round (so
/// no target always runs first or after the same one): `one(i)` measures target `i` and gives
/// its stats and a CPU figure; `done(round, stats, cpu)` sees each round as it ends. Returns
/// both per round, per target.
async fn rotating(
    rounds: usize,
    n: usize,
    one: impl AsyncFn(usize) -> (Stats, f64),
    done: impl Fn(usize, &[Stats], &[f64]),
) -> (Vec<Vec<Stats>>, Vec<Vec<f64>>) {
    let (mut stats, mut cpu) = (Vec::with_capacity(rounds), Vec::with_capacity(rounds));
    for r in 0..rounds {
        let mut this: Vec<Option<(Stats, f64)>> = (0..n).map(|_| None).collect();
        for k in 0..n {
            let i = (k + r) % n;
            this[i] = Some(one(i).await);
        }
        let (s, c): (Vec<Stats>, Vec<f64>) = this.into_iter().map(|x| x.expect("every target ran")).unzip();
        done(r, &s, &c);
        stats.push(s);
        cpu.push(c);
    }
    (stats, cpu)
}

/// The median over rounds of `f(round)`.
fn median_over<T>(rounds: &[T], f: impl Fn(&T) -> f64) -> f64 {
    let mut v: Vec<f64> = rounds.iter().map(f).collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Profiling aid: one kind of loop on some targets only.
pub struct Only {
    /// Targets whose name is this, or else starts with it.
    pub prefix: String,
    /// The fixed-rate (open) loop instead of the closed loop.
    pub fixed_rate: bool,
}

pub async fn run(
    store: Store,
    seconds: u64,
    connections: usize,
    rate: u64,
    only: Option<Only>,
    threads: usize,
    rounds: usize,
) {
    let rounds = rounds.max(1);
    let up = upstream();
    let sys = System::start_with(store, |c| c.gateway.threads = threads).await;
    let plain = plain_proxy(up, threads, &sys.rt.config.gateway);
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
            json!({"name": "read", "activate": true, "document": "rules:\n  - id: read\n    methods: [GET]\n    paths: [\"/v1/**\"]\n  - id: no-admin\n    effect: deny\n    paths: [\"/v1/admin/**\"]\n"}),
        )
        .await;
    let (agent, key) = sys.agent_with_grant("bench", &res, &pol).await;
    // The same upstream as a second resource with a budget (requests, a limit never reached):
    // the cost of reserving and settling on every request.
    let res2 = sys
        .api(
            Method::POST,
            "/v1/resources",
            json!({"name": "api-budgeted", "base_url": format!("http://api2.bench:{port}"), "inject": {"kind": "bearer"},
                   "credential": {"value": "sk-bench-upstream"}, "settings": {"egress_allow": ["127.0.0.1/32"]}}),
        )
        .await;
    sys.api(
        Method::POST,
        "/v1/grants",
        json!({"agent_id": agent, "resource_id": res2["id"], "policy_id": pol["policy"]["id"], "scopes": ["*"]}),
    )
    .await;
    sys.api(
        Method::POST,
        "/v1/budgets",
        json!({"name": "bench-requests", "scope": {"kind": "resource", "id": res2["id"]}, "unit": "requests",
               "limit": 1_000_000_000_000i64, "window": {"kind": "daily", "tz": "UTC"}, "hard": true}),
    )
    .await;
    let mandate = sys.mandate(&key).await;

    let proxy_port = caracal_shared::testing::free_port();
    let proxy: SocketAddr = format!("127.0.0.1:{proxy_port}").parse().unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let gw = caracal_gateway::start_with(sys.rt.clone(), proxy, admin, Arc::new(BenchResolver))
        .await
        .expect("gateway");

    let absolute = format!("http://api.bench:{port}/v1/models");
    let host = format!("api.bench:{port}");
    let targets = [
        Target {
            name: "upstream directly",
            connect: up,
            path: "/v1/models".into(),
            host: host.clone(),
            auth: None,
            threads: None,
        },
        Target {
            name: "plain Pingora passthrough",
            connect: plain,
            path: absolute.clone(),
            host: host.clone(),
            // The same bytes from the client (the mandate rides along, unread).
            auth: Some(format!("Bearer {mandate}")),
            threads: Some(PLAIN_THREADS),
        },
        Target {
            name: "governed gateway",
            connect: proxy,
            path: absolute.clone(),
            host: host.clone(),
            auth: Some(format!("Bearer {mandate}")),
            threads: Some(GATEWAY_THREADS),
        },
        Target {
            name: "governed gateway + budget",
            connect: proxy,
            path: format!("http://api2.bench:{port}/v1/models"),
            host: format!("api2.bench:{port}"),
            auth: Some(format!("Bearer {mandate}")),
            threads: Some(GATEWAY_THREADS),
        },
    ];
    // Warm every path (connections, caches) and check it answers 200.
    for t in &targets {
        let w = closed_loop(t.connect, 4, Duration::from_secs(1), t.make()).await;
        assert!(
            w.requests > 0 && w.non_2xx == 0 && w.errors == 0,
            "{}: warm-up failed: {}",
            t.name,
            w.summary()
        );
    }

    let use_wrk = tokio::process::Command::new("wrk")
        .arg("--version")
        .output()
        .await
        .is_ok();
    // Profiling aid: only the closed loop (or, with `fixed_rate`, the open loop) on the
    // targets named `prefix`, or else whose name starts with it.
    if let Some(Only { prefix, fixed_rate }) = only {
        let exact = targets.iter().any(|t| t.name == prefix);
        for t in targets.iter().filter(|t| {
            if exact {
                t.name == prefix
            } else {
                t.name.starts_with(prefix.as_str())
            }
        }) {
            let s = if fixed_rate {
                open_loop(t.connect, 16, rate, Duration::from_secs(seconds), t.make()).await
            } else if use_wrk {
                wrk(t, connections, seconds).await.expect("wrk output")
            } else {
                closed_loop(t.connect, connections, Duration::from_secs(seconds), t.make()).await
            };
            println!("{}", row(t.name, &s, None));
        }
        gw.shutdown(caracal_gateway::Stop::Fast).await;
        sys.stop().await;
        return;
    }
    println!("machine: {}", machine());
    println!(
        "store: {}, proxy threads: {threads} (plain and governed)",
        store.label()
    );
    println!(
        "\nThroughput, closed loop, {connections} keep-alive connections, {seconds}s per target per round, {rounds} rounds in rotating order ({}):\n",
        if use_wrk { "wrk -t1" } else { "in-process generator" }
    );
    // by_round[r][i]: target i in round r; cpu_round[r][i]: its proxy threads' CPU per request (µs).
    let (by_round, cpu_round) = rotating(
        rounds,
        targets.len(),
        async |i| {
            let t = &targets[i];
            let before = t.threads.map(threads_cpu);
            let s = if use_wrk {
                wrk(t, connections, seconds).await.expect("wrk output")
            } else {
                closed_loop(t.connect, connections, Duration::from_secs(seconds), t.make()).await
            };
            let per_req = match (t.threads, before) {
                (Some(p), Some(b)) => (threads_cpu(p) - b).as_secs_f64() * 1e6 / s.requests.max(1) as f64,
                _ => f64::NAN,
            };
            (s, per_req)
        },
        |r, this, cpu| {
            println!(
                "round {}: {}",
                r + 1,
                targets
                    .iter()
                    .zip(this.iter().zip(cpu))
                    .map(|(t, (s, c))| {
                        if c.is_nan() {
                            format!("{} {:.0}", t.name, s.rps())
                        } else {
                            format!("{} {:.0} ({c:.1} µs)", t.name, s.rps())
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        },
    )
    .await;
    // Each target's median round (for its latency figures), and median per-round ratios.
    let full: Vec<Stats> = (0..targets.len())
        .map(|i| {
            let mut rs: Vec<(f64, usize)> = by_round.iter().enumerate().map(|(r, v)| (v[i].rps(), r)).collect();
            rs.sort_by(|a, b| a.0.total_cmp(&b.0));
            let r = rs[rs.len() / 2].1;
            by_round[r][i].clone()
        })
        .collect();
    let ratio = |i: usize, base: usize| median_over(&by_round, |x| x[i].rps() / x[base].rps().max(1e-9));
    println!();
    println!("| path | req/s (median round) | vs plain (median of per-round ratios) | p50 | p99 | p99.9 | errors |");
    println!("|---|---|---|---|---|---|---|");
    for (i, t) in targets.iter().enumerate() {
        println!("{}", row(t.name, &full[i], (i > 0).then(|| ratio(i, 1))));
    }
    // The proxy's own cost per request: its threads' CPU time over the requests they served
    // (median round). At saturation this is what sets throughput, without the noise of how the
    // scheduler shared the two cores with wrk and the upstream in that round.
    let cpu_med = |i: usize| median_over(&cpu_round, |x| x[i]);
    let cpu_ratio = |i: usize, base: usize| median_over(&cpu_round, |x| x[base] / x[i].max(1e-9));
    println!(
        "\nProxy threads' CPU per request, closed loop (median round; inverse ratio = throughput the proxy's own cost allows): plain {:.1} µs, governed {:.1} µs ({:.2}× plain), governed + budget {:.1} µs ({:.2}× governed)",
        cpu_med(1),
        cpu_med(2),
        cpu_ratio(2, 1),
        cpu_med(3),
        cpu_ratio(3, 2),
    );

    println!(
        "\nLatency at a fixed {rate} req/s, open loop, 16 connections, {seconds}s per target per round, {rounds} rounds in rotating order (each figure the median over the rounds):\n"
    );
    // fixed[r][i]: target i in round r; cpu[r][i]: this whole process's CPU per request.
    let (fixed, cpu) = rotating(
        rounds,
        targets.len(),
        async |i| {
            let t = &targets[i];
            // CPU time of this whole process per request at the same offered rate: the load
            // generator, the upstream, the proxies and the in-process Caracal system (the
            // gateway's audit publisher; on SQLite, the embedded bus storing every event
            // durably). The differences between targets are what each path costs end to end,
            // free of the closed loop's scheduling effects (Postgres and Redis, when used, run
            // outside and are not counted).
            let before = process_cpu();
            let s = open_loop(t.connect, 16, rate, Duration::from_secs(seconds), t.make()).await;
            let c = (process_cpu() - before).as_secs_f64() * 1e6 / (s.requests.max(1) as f64);
            (s, c)
        },
        |_, _, _| {},
    )
    .await;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let pct = |x: &[Stats], i: usize, p: f64| ms(x[i].pct(p));
    let added = |p: f64, i: usize, base: usize| median_over(&fixed, |x| pct(x, i, p) - pct(x, base, p));
    println!("| path | req/s | p50 | p99 | p99.9 | errors (all rounds) |");
    println!("|---|---|---|---|---|---|");
    for (i, t) in targets.iter().enumerate() {
        println!(
            "| {} | {:.0} | {:.2}ms | {:.2}ms | {:.2}ms | {} |",
            t.name,
            median_over(&fixed, |x| x[i].rps()),
            median_over(&fixed, |x| pct(x, i, 50.0)),
            median_over(&fixed, |x| pct(x, i, 99.0)),
            median_over(&fixed, |x| pct(x, i, 99.9)),
            fixed.iter().map(|x| x[i].errors + x[i].non_2xx).sum::<u64>()
        );
    }
    let cpu_at = |i: usize| median_over(&cpu, |x| x[i]);
    println!(
        "\nCPU per request at {rate} req/s (this process: generator, upstream, proxies, in-process Caracal; on SQLite incl. the embedded bus; median round): {}",
        targets
            .iter()
            .enumerate()
            .map(|(i, t)| format!("{} {:.1} µs", t.name, cpu_at(i)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "Cost per request over the upstream-directly figure: plain {:.1} µs, governed {:.1} µs, governed + budget {:.1} µs",
        cpu_at(1) - cpu_at(0),
        cpu_at(2) - cpu_at(0),
        cpu_at(3) - cpu_at(0)
    );
    println!(
        "\nAdded by the governed gateway at {rate} req/s (median of per-round differences): vs upstream directly p50 {:+.3} ms, p99 {:+.3} ms; vs plain passthrough p50 {:+.3} ms, p99 {:+.3} ms",
        added(50.0, 2, 0),
        added(99.0, 2, 0),
        added(50.0, 2, 1),
        added(99.0, 2, 1),
    );
    println!(
        "Budgets (reserve + settle per request, {} store): throughput {:.2}× the governed path without budgets (median of per-round ratios), proxy CPU per request {:.2}× (governed / budget, median of per-round ratios); added at {rate} req/s (median of per-round differences) p50 {:+.3} ms, p99 {:+.3} ms",
        store.label(),
        ratio(3, 2),
        cpu_ratio(3, 2),
        added(50.0, 3, 2),
        added(99.0, 3, 2),
    );
    let m = sys
        .client
        .get(&format!("http://{admin_addr}/metrics"))
        .await
        .unwrap()
        .text();
    let audited = m
        .lines()
        .find(|l| l.starts_with("caracal_audit_events_total{outcome=\"queued\"}"))
        .unwrap_or("(audit counter not found)")
        .to_string();
    println!("gateway audit counter after the run: {audited}");
    gw.shutdown(caracal_gateway::Stop::Fast).await;
    sys.stop().await;
}
