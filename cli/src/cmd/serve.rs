//! `caracal serve`, `caracal migrate`, `caracal check-config`, and the service composition
//! that `caracal dev` shares.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use caracal_shared::config::Config;
use caracal_shared::runtime::Runtime;
use caracal_shared::shutdown::Shutdown;
use caracal_shared::store::Store;
use caracal_shared::telemetry;
use tokio::net::TcpListener;

use super::Service;

/// Load and validate the configuration, printing every problem.
pub fn load_config(path: Option<&std::path::Path>) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|errs| {
        eprintln!("{errs}");
        ExitCode::from(2)
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

pub fn run_check(config: Option<PathBuf>) -> ExitCode {
    match load_config(config.as_deref()) {
        Ok(_) => {
            println!("configuration is valid");
            ExitCode::SUCCESS
        }
        Err(c) => c,
    }
}

pub fn run_migrate(config: Option<PathBuf>) -> ExitCode {
    let cfg = match load_config(config.as_deref()) {
        Ok(c) => c,
        Err(c) => return c,
    };
    telemetry::init(&cfg.telemetry);
    runtime().block_on(async move {
        match Store::connect(&cfg.database).await {
            Ok(store) => match store.migrate().await {
                Ok(applied) => {
                    println!(
                        "migrations applied: {applied:?} (now at {:?})",
                        store.applied_migrations().await.unwrap_or_default().last()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("migration failed: {e}");
                    ExitCode::FAILURE
                }
            },
            Err(e) => {
                eprintln!("cannot open the database: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// `caracal admin bootstrap-token`: the first platform admin token of a production database,
/// printed once (nothing is printed, exit 3, when an active platform token already exists).
pub fn run_bootstrap_token(config: Option<PathBuf>) -> ExitCode {
    let cfg = match load_config(config.as_deref()) {
        Ok(c) => c,
        Err(c) => return c,
    };
    let Some(pepper) = cfg.keys.pepper.clone() else {
        eprintln!("keys.pepper is required (admin tokens are stored as a keyed hash)");
        return ExitCode::from(2);
    };
    runtime().block_on(async move {
        let store = match Store::open(&cfg.database).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("cannot open the database: {e}");
                return ExitCode::FAILURE;
            }
        };
        let r = caracal_control::bootstrap_token(&store, &pepper).await;
        store.close().await;
        match r {
            Ok(Some(secret)) => {
                println!("{secret}");
                eprintln!("a platform admin token (all scopes) was created; it is shown only this once");
                ExitCode::SUCCESS
            }
            Ok(None) => {
                eprintln!("an active platform admin token already exists; issue more with POST /v1/admin-tokens");
                ExitCode::from(3)
            }
            Err(e) => {
                eprintln!("cannot create the token: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

pub fn run_serve(service: Service, config: Option<PathBuf>) -> ExitCode {
    let cfg = match load_config(config.as_deref()) {
        Ok(c) => c,
        Err(c) => return c,
    };
    telemetry::init(&cfg.telemetry);
    runtime().block_on(async move {
        let shutdown = Shutdown::new();
        shutdown.trigger_on_signals();
        let rt = match Runtime::start(cfg, shutdown.clone()).await {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("cannot start: {e}");
                return ExitCode::FAILURE;
            }
        };
        let which: Vec<Service> = match service {
            Service::All => vec![
                Service::Control,
                Service::Sts,
                Service::Coordinator,
                Service::Audit,
                Service::Gateway,
            ],
            s => vec![s],
        };
        match Running::start(&rt, &which).await {
            Ok(running) => {
                for (name, addr) in &running.addrs {
                    tracing::info!(service = name, %addr, "serving");
                }
                shutdown.wait().await;
                let failed = running.failed();
                running.stop(caracal_gateway::Stop::Graceful).await;
                rt.store.close().await;
                if failed {
                    // A service could not start or stopped with an error: exit non-zero so
                    // the supervisor restarts it (and says why in the logs above).
                    ExitCode::FAILURE
                } else {
                    ExitCode::SUCCESS
                }
            }
            Err(e) => {
                eprintln!("{e}");
                shutdown.trigger();
                ExitCode::FAILURE
            }
        }
    })
}

/// A set of running services on one runtime.
pub struct Running {
    pub addrs: Vec<(&'static str, SocketAddr)>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    gateway: Option<caracal_gateway::GatewayHandle>,
    shutdown: Shutdown,
    grace: Duration,
    failed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

async fn bind(name: &str, addr: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(addr).await.map_err(|e| {
        format!("cannot listen on {addr} for {name}: {e} (is another caracal running? change {name}.listen)")
    })
}

impl Running {
    pub async fn start(rt: &Runtime, which: &[Service]) -> Result<Running, String> {
        Running::start_with(rt, which, Arc::new(caracal_shared::egress::SystemResolver)).await
    }

    /// Like [`Running::start`], with the gateway resolving names through `resolver`.
    pub async fn start_with(
        rt: &Runtime,
        which: &[Service],
        resolver: Arc<dyn caracal_shared::egress::Resolver>,
    ) -> Result<Running, String> {
        let cfg = rt.config.clone();
        let mut addrs = Vec::new();
        let mut tasks = Vec::new();
        let failed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        tasks.push(tokio::spawn({
            let h = rt.spawn_relay();
            async move {
                let _ = h.await;
            }
        }));
        tasks.push(tokio::spawn({
            let h = rt.spawn_retention(Duration::from_secs(600));
            async move {
                let _ = h.await;
            }
        }));
        macro_rules! hyper_service {
            ($svc:expr, $name:literal, $addr:expr, $serve:path) => {
                if which.contains(&$svc) {
                    let l = bind($name, $addr).await?;
                    addrs.push(($name, l.local_addr().map_err(|e| e.to_string())?));
                    let rt = rt.clone();
                    let failed = failed.clone();
                    tasks.push(tokio::spawn(async move {
                        let sd = rt.shutdown.clone();
                        if let Err(e) = $serve(rt, l).await {
                            // Fail fast: a service that cannot run takes the process down
                            // rather than leaving the others up without it.
                            tracing::error!(service = $name, error = %e, "service stopped with an error");
                            failed.store(true, std::sync::atomic::Ordering::SeqCst);
                            sd.trigger();
                        }
                    }));
                }
            };
        }
        hyper_service!(Service::Control, "control", cfg.control.listen, caracal_control::serve);
        hyper_service!(Service::Sts, "sts", cfg.sts.listen, caracal_sts::serve);
        hyper_service!(
            Service::Coordinator,
            "coordinator",
            cfg.coordinator.listen,
            caracal_coordinator::serve
        );
        hyper_service!(Service::Audit, "audit", cfg.audit.listen, caracal_audit::serve);
        let mut gateway = None;
        if which.contains(&Service::Gateway) {
            let admin = bind("gateway.admin", cfg.gateway.admin_listen).await?;
            addrs.push(("gateway-admin", admin.local_addr().map_err(|e| e.to_string())?));
            // Check the proxy port is free before handing it to Pingora (which panics otherwise);
            // port 0 picks a free one (Pingora cannot report what it bound).
            let probe = bind("gateway", cfg.gateway.listen).await?;
            let proxy_addr = probe.local_addr().map_err(|e| e.to_string())?;
            drop(probe);
            // When this process also runs the STS, the gateway talks to it where it really
            // listens (its configured port may be 0).
            let mut grt = rt.clone();
            if let Some((_, sts)) = addrs.iter().find(|(n, _)| *n == "sts") {
                let mut c = (*rt.config).clone();
                c.gateway.sts_url = format!("http://{sts}");
                grt.config = Arc::new(c);
            }
            let g = caracal_gateway::start_with(grt, proxy_addr, admin, resolver)
                .await
                .map_err(|e| e.to_string())?;
            addrs.push(("gateway", g.proxy_addr));
            gateway = Some(g);
        }
        Ok(Running {
            addrs,
            tasks,
            gateway,
            shutdown: rt.shutdown.clone(),
            grace: cfg.http.grace_period,
            failed,
        })
    }

    /// Whether a service stopped with an error.
    pub fn failed(&self) -> bool {
        self.failed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Trigger shutdown (if not already) and wait for every service to drain.
    pub async fn stop(self, how: caracal_gateway::Stop) {
        self.shutdown.trigger();
        if let Some(g) = self.gateway {
            g.shutdown(how).await;
        }
        let all = futures::future::join_all(self.tasks);
        if tokio::time::timeout(self.grace + Duration::from_secs(2), all)
            .await
            .is_err()
        {
            tracing::warn!("some tasks did not stop within the grace period");
        }
    }
}
