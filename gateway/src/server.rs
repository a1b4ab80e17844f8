//! Starting and stopping the gateway inside a process that also runs tokio.
//!
//! Pingora builds its own runtimes and must not be started from inside one, so it runs on a
//! dedicated thread; shutdown is a channel-backed `ShutdownSignalWatch`. The gateway state is
//! shared with the caller's runtime, where the background tasks run: the control-plane feed
//! (snapshot reloads), the key feed, the revocation feed (with gap detection and periodic
//! reconciliation against the database) and the admin listener (health, readiness, metrics).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use caracal_shared::audit::AuditEmitter;
use caracal_shared::bus::consumer::{TailSpec, run_tail};
use caracal_shared::bus::streams;
use caracal_shared::egress::{Resolver, SystemResolver};
use caracal_shared::error::{Error, ErrorCode, Result};
use caracal_shared::http::Router;
use caracal_shared::runtime::Runtime;
use caracal_shared::store::authority::Revocation;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::connect::Front;
use crate::forward::Forwarder;
use crate::metrics::Metrics;
use crate::proxy::{Mode, Proxy};
use crate::state::Gateway;

/// How to stop: drain for the configured grace period (Pingora sleeps it in full), or at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Graceful,
    Fast,
}

struct ChannelSignal(Mutex<Option<oneshot::Receiver<Stop>>>);

#[async_trait]
impl ShutdownSignalWatch for ChannelSignal {
    async fn recv(&self) -> ShutdownSignal {
        let rx = self.0.lock().unwrap().take();
        let stop = match rx {
            Some(rx) => rx.await.unwrap_or(Stop::Fast),
            None => std::future::pending::<Stop>().await,
        };
        match stop {
            Stop::Graceful => ShutdownSignal::GracefulTerminate,
            Stop::Fast => ShutdownSignal::FastShutdown,
        }
    }
}

pub struct GatewayHandle {
    pub proxy_addr: SocketAddr,
    pub sidecars: Vec<SocketAddr>,
    pub gateway: Arc<Gateway>,
    stop: Option<oneshot::Sender<Stop>>,
    thread: Option<std::thread::JoinHandle<()>>,
    admin: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    /// Stops the admin listener (a child of the runtime's shutdown).
    admin_stop: caracal_shared::shutdown::Shutdown,
}

impl GatewayHandle {
    /// Stop the proxy and wait for its thread.
    pub async fn shutdown(mut self, how: Stop) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(how);
        }
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        self.admin_stop.trigger();
        if let Some(a) = self.admin.take() {
            let _ = a.await;
        }
    }
}

/// The admin listener's state: the interception CA bundle it publishes.
struct AdminState {
    ca_bundle: String,
}

/// `GET /ca.pem`: the certificates agents trust for intercepted hosts (public; what
/// `caracal ca export` prints).
async fn ca_pem(
    s: Arc<AdminState>,
    _r: caracal_shared::http::ApiRequest,
) -> caracal_shared::error::Result<caracal_shared::http::Response> {
    Ok(caracal_shared::http::text_response(
        http::StatusCode::OK,
        "application/x-pem-file",
        s.ca_bundle.clone(),
    ))
}

/// Start the gateway with the system resolver.
pub async fn start(rt: Runtime, proxy_addr: SocketAddr, admin: TcpListener) -> Result<GatewayHandle> {
    start_with(rt, proxy_addr, admin, Arc::new(SystemResolver)).await
}

/// Start the gateway with `resolver` (tests map names to loopback canaries).
pub async fn start_with(
    rt: Runtime,
    proxy_addr: SocketAddr,
    admin: TcpListener,
    resolver: Arc<dyn Resolver>,
) -> Result<GatewayHandle> {
    let cfg = rt.config.clone();
    let registry = rt.service_registry();
    let metrics = Metrics::new(&registry);
    let (audit, _audit_task) = AuditEmitter::start(
        rt.bus.clone(),
        rt.bus_auth.clone(),
        cfg.gateway.audit_buffer,
        &registry,
        rt.shutdown.clone(),
    );
    let admin_addr = admin.local_addr().map_err(|e| Error::internal(e.to_string()))?;
    let mut sidecar_addrs = Vec::new();
    for sc in &cfg.gateway.sidecars {
        sidecar_addrs.push(
            sc.listen
                .parse::<SocketAddr>()
                .map_err(|_| Error::validation("invalid sidecar listen address"))?,
        );
    }
    let mut own = vec![proxy_addr, admin_addr];
    own.extend(sidecar_addrs.iter().copied());
    own.extend(cfg.gateway.tls_listen);
    let ledger = caracal_shared::budget_ledger::connect(&cfg.bus).await?;
    let budgets = crate::budget::Budgets::new(ledger, cfg.gateway.budget_lease_ttl, &registry);
    let gw = Arc::new(Gateway::new(rt.clone(), audit, metrics, resolver, own, budgets)?);
    {
        // Renew active budget leases, release idle ones; give everything back at shutdown.
        let g = gw.clone();
        let sd = rt.shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = sd.wait() => break,
                }
                g.budgets.maintain(Duration::from_secs(2)).await;
            }
            g.budgets.release_all().await;
        });
    }

    // Initial state, then the feeds. The revocation position is taken before reconciling so
    // nothing published in between is missed.
    let rev_start = rt
        .bus
        .last_id(streams::REVOCATIONS)
        .await
        .unwrap_or_else(|_| "0".into());
    gw.reload_snapshot().await?;
    gw.reload_keys().await?;
    gw.reconcile_revocations().await?;
    spawn_feeds(&gw, rev_start).await;

    // Pingora.
    let run_dir = cfg.data_dir.join("run");
    std::fs::create_dir_all(&run_dir)
        .map_err(|e| Error::new(ErrorCode::Internal, format!("cannot create {}: {e}", run_dir.display())))?;
    let conf = ServerConf {
        threads: cfg.gateway.threads,
        grace_period_seconds: Some(cfg.http.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(cfg.http.grace_period.as_secs().max(1)),
        pid_file: run_dir
            .join(format!("gateway-{}.pid", proxy_addr.port()))
            .display()
            .to_string(),
        upgrade_sock: run_dir
            .join(format!("gateway-{}.sock", proxy_addr.port()))
            .display()
            .to_string(),
        upstream_keepalive_pool_size: 256,
        client_bind_to_ipv4: cfg
            .gateway
            .upstream_bind
            .iter()
            .filter(|a| a.is_ipv4())
            .map(|a| a.to_string())
            .collect(),
        client_bind_to_ipv6: cfg
            .gateway
            .upstream_bind
            .iter()
            .filter(|a| a.is_ipv6())
            .map(|a| a.to_string())
            .collect(),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let fwd = Forwarder::new(cfg.gateway.upstream_connect_timeout, cfg.gateway.upstream_bind.clone())?;
    let forward = Proxy {
        gw: gw.clone(),
        mode: Mode::Forward,
        fwd: fwd.clone(),
    };
    let inner = Arc::new(pingora::proxy::http_proxy(&server.configuration, forward));
    let front = Front {
        proxy: inner,
        gw: gw.clone(),
    };
    let mut svc = pingora::services::listening::Service::new("caracal-gateway".to_string(), front);
    svc.add_tcp(&proxy_addr.to_string());
    if let Some(addr) = cfg.gateway.tls_listen {
        svc.add_tls_with_settings(&addr.to_string(), None, mtls_settings(&cfg.gateway, &gw)?);
    }
    server.add_service(svc);
    for (sc, addr) in cfg.gateway.sidecars.iter().zip(&sidecar_addrs) {
        let p = Proxy {
            gw: gw.clone(),
            mode: Mode::Sidecar {
                tenant: sc.tenant.clone(),
                resource: sc.resource.clone(),
            },
            fwd: fwd.clone(),
        };
        let mut s = pingora::proxy::http_proxy_service_with_name(
            &server.configuration,
            p,
            &format!("caracal-sidecar-{}", sc.resource),
        );
        s.add_tcp(&addr.to_string());
        server.add_service(s);
    }

    let (tx, rx) = oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("caracal-gateway".into())
        .spawn(move || {
            server.run(RunArgs {
                shutdown_signal: Box::new(ChannelSignal(Mutex::new(Some(rx)))),
            })
        })
        .map_err(|e| Error::new(ErrorCode::Internal, format!("cannot start the gateway thread: {e}")))?;

    // Readiness: poll until every listener accepts connections.
    for addr in std::iter::once(proxy_addr)
        .chain(sidecar_addrs.iter().copied())
        .chain(cfg.gateway.tls_listen)
    {
        let mut up = false;
        for _ in 0..500 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if !up {
            let _ = tx.send(Stop::Fast);
            return Err(Error::new(
                ErrorCode::Internal,
                format!("the gateway did not start listening on {addr}"),
            ));
        }
    }

    let health = rt.health();
    let g2 = gw.clone();
    health.add_probe("revocation_feed", move || {
        let fresh = !g2.revocations.is_stale();
        async move {
            if fresh {
                Ok(())
            } else {
                Err("the revocation feed is stale".into())
            }
        }
    });
    let g3 = gw.clone();
    health.add_probe("audit_pipeline", move || {
        let room = g3.audit.has_room();
        async move {
            if room {
                Ok(())
            } else {
                Err("the audit buffer is full".into())
            }
        }
    });
    // The new probes start "not checked": check once now so readiness is true from the start.
    health.probe_now().await;
    let server = caracal_shared::http::HttpServer::new(
        "gateway",
        Router::<AdminState>::new().get("/ca.pem", ca_pem),
        Arc::new(AdminState {
            ca_bundle: crate::intercept::CaFile::load(&crate::intercept::ca_path(&rt.config))
                .map(|c| c.bundle())
                .unwrap_or_default(),
        }),
        health,
        registry,
        caracal_shared::http::ServerOptions::from_config(&cfg.http),
    );
    let admin_stop = rt.shutdown.child();
    let sd = admin_stop.clone();
    let admin_task = tokio::spawn(async move { Arc::new(server).serve(admin, sd).await });
    Ok(GatewayHandle {
        proxy_addr,
        sidecars: sidecar_addrs,
        gateway: gw,
        stop: Some(tx),
        thread: Some(thread),
        admin: Some(admin_task),
        admin_stop,
    })
}

/// TLS for the mTLS listener: the configured server certificate, client certificates verified
/// against every tenant's trusted CAs (optional at the TLS layer), the leaf kept per connection.
fn mtls_settings(
    cfg: &caracal_shared::config::GatewayConfig,
    gw: &Gateway,
) -> Result<pingora::listeners::tls::TlsSettings> {
    let (Some(cert), Some(key)) = (&cfg.tls_cert, &cfg.tls_key) else {
        return Err(Error::validation(
            "gateway.tls_listen needs gateway.tls_cert and gateway.tls_key",
        ));
    };
    let bad = |what: &str, e: pingora::BError| Error::validation(format!("{what}: {e}"));
    let mut tls = pingora::listeners::tls::TlsSettings::with_callbacks(Box::new(crate::mtls::CertCapture))
        .map_err(|e| bad("gateway TLS", e))?;
    tls.set_certificate_chain_file(&cert.display().to_string())
        .map_err(|e| bad("gateway.tls_cert", e))?;
    tls.set_private_key_file(&key.display().to_string())
        .map_err(|e| bad("gateway.tls_key", e))?;
    tls.set_client_cert_verifier(gw.client_verifier.clone());
    Ok(tls)
}

async fn spawn_feeds(gw: &Arc<Gateway>, rev_start: String) {
    let rt = gw.rt.clone();
    let sd = rt.shutdown.clone();

    // Control-plane changes: reload the snapshot (coalescing bursts).
    let (kick, mut kicked) = tokio::sync::mpsc::channel::<()>(1);
    let g = gw.clone();
    let sd2 = sd.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                r = kicked.recv() => if r.is_none() { break },
                _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                _ = sd2.wait() => break,
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            while kicked.try_recv().is_ok() {}
            if let Err(e) = g.reload_snapshot().await {
                tracing::warn!(error = %e, "cannot reload the gateway snapshot");
            }
        }
    });
    for (stream, keys) in [(streams::CONTROL, false), (streams::KEYS, true)] {
        let start = rt.bus.last_id(stream).await.unwrap_or_else(|_| "0".into());
        let g = gw.clone();
        let kick = kick.clone();
        tokio::spawn(run_tail(
            rt.bus.clone(),
            rt.bus_auth.clone(),
            TailSpec {
                stream: stream.into(),
                start,
                block: Duration::from_millis(500),
            },
            move |_| {
                if keys {
                    let g = g.clone();
                    tokio::spawn(async move {
                        let _ = g.reload_keys().await;
                    });
                } else {
                    let _ = kick.try_send(());
                }
            },
            |_| {},
            sd.clone(),
        ));
    }

    // Revocations: apply each; a sequence gap triggers reconciliation with the database.
    let (gap_tx, mut gap_rx) = tokio::sync::mpsc::channel::<()>(1);
    let g = gw.clone();
    let g_read = gw.clone();
    tokio::spawn(run_tail(
        rt.bus.clone(),
        rt.bus_auth.clone(),
        TailSpec {
            stream: streams::REVOCATIONS.into(),
            start: rev_start,
            block: Duration::from_millis(250),
        },
        move |ev| match serde_json::from_value::<Revocation>(ev.body.clone()) {
            Ok(r) => {
                let applied = g.revocations.apply(&r, ev.seq);
                let age = (caracal_shared::time::now_micros() - ev.ts).max(0) as f64 / 1e6;
                g.metrics.revocation_propagation.observe(age);
                if !applied {
                    g.metrics.upstream_errors.with_label_values(&["revocation_gap"]).inc();
                    let _ = gap_tx.try_send(());
                }
            }
            Err(_) => tracing::warn!(entry = %ev.entry_id, "malformed revocation event"),
        },
        move |r| {
            if r.is_ok() {
                g_read.revocations.mark_fresh();
            }
        },
        sd.clone(),
    ));
    let g = gw.clone();
    let sd3 = sd.clone();
    tokio::spawn(async move {
        let every = g.rt.config.gateway.revocation_reconcile_interval;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                r = gap_rx.recv() => if r.is_none() { break } else { tracing::warn!("revocation sequence gap; reconciling") },
                _ = sd3.wait() => break,
            }
            if let Err(e) = g.reconcile_revocations().await {
                tracing::warn!(error = %e, "cannot reconcile revocations");
            }
        }
    });
    let g = gw.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = sd.wait() => break,
            }
            g.metrics.feed_age.set(g.revocations.age().as_secs_f64());
            g.metrics.revocations.set(g.revocations.len() as f64);
        }
    });
}
