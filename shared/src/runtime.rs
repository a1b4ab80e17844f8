//! What a service process needs at start, wired once: configuration, the store (migrated),
//! the bus and its message authentication, the outbox relay and retention. `caracal dev` builds
//! one runtime and runs every service on it; `caracal serve <service>` builds one per process.

use std::sync::Arc;
use std::time::Duration;

use prometheus::Registry;

use crate::bus::{self, Bus, BusAuth, relay::Relay};
use crate::config::Config;
use crate::crypto::KeyRing;
use crate::error::{Error, ErrorCode, Result};
use crate::health::Health;
use crate::metrics::BusMetrics;
use crate::shutdown::Shutdown;
use crate::store::Store;
use crate::time::{micros, now_micros};

#[derive(Clone)]
pub struct Runtime {
    pub config: Arc<Config>,
    pub store: Store,
    pub bus: Arc<dyn Bus>,
    pub bus_auth: BusAuth,
    pub bus_metrics: BusMetrics,
    pub shutdown: Shutdown,
    /// Registry for process-wide metrics (bus counters); services add their own registries.
    pub registry: Registry,
}

impl Runtime {
    /// Connect, migrate (retrying while the database is unreachable, until shutdown), and
    /// connect the bus. Requires the bus key ring.
    pub async fn start(config: Config, shutdown: Shutdown) -> Result<Runtime> {
        let ring = config.keys.bus.clone().ok_or_else(|| {
            Error::new(
                ErrorCode::ValidationFailed,
                "keys.bus is required (the bus HMAC key ring)",
            )
        })?;
        let store = Store::connect(&config.database).await?;
        let mut backoff = Duration::from_millis(200);
        loop {
            match store.migrate().await {
                Ok(_) => break,
                Err(e) if e.code == ErrorCode::StoreUnavailable && !shutdown.is_triggered() => {
                    tracing::warn!(error = %e, "database unreachable at start; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.wait() => return Err(e),
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        }
        let bus = bus::connect(&config.bus, &store).await?;
        Ok(Runtime::from_parts(config, store, bus, ring, shutdown))
    }

    pub fn from_parts(config: Config, store: Store, bus: Arc<dyn Bus>, ring: KeyRing, shutdown: Shutdown) -> Runtime {
        let registry = Registry::new();
        let bus_metrics = BusMetrics::new(&registry);
        let bus_auth = BusAuth::new(ring, config.bus.max_message_age, bus_metrics.clone());
        Runtime {
            config: Arc::new(config),
            store,
            bus,
            bus_auth,
            bus_metrics,
            shutdown,
            registry,
        }
    }

    /// Health with the database and bus probes, probed every second.
    pub fn health(&self) -> Health {
        let h = Health::new();
        let store = self.store.clone();
        h.add_probe("database", move || {
            let store = store.clone();
            async move { store.ping().await.map_err(|e| e.to_string()) }
        });
        let bus = self.bus.clone();
        h.add_probe("bus", move || {
            let bus = bus.clone();
            async move { bus.ping().await.map_err(|e| e.to_string()) }
        });
        h.spawn_prober(Duration::from_secs(1), self.shutdown.clone());
        h
    }

    /// A service registry that also exposes the process-wide bus metrics.
    pub fn service_registry(&self) -> Registry {
        let r = Registry::new();
        for c in [
            &self.bus_metrics.rejected,
            &self.bus_metrics.consumed,
            &self.bus_metrics.published,
            &self.bus_metrics.gaps,
        ] {
            let _ = r.register(Box::new(c.clone()));
        }
        r
    }

    /// Publish the outbox in the background until shutdown.
    pub fn spawn_relay(&self) -> tokio::task::JoinHandle<()> {
        let relay = Relay::new(self.store.clone(), self.bus.clone(), self.bus_auth.clone());
        tokio::spawn(relay.run(self.shutdown.clone()))
    }

    /// Retention: published outbox rows after a day; idempotency marks after the bus's maximum
    /// message age plus a day (older messages are refused as stale anyway); stream entries once
    /// every group acknowledged them.
    pub fn spawn_retention(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = me.shutdown.wait() => break,
                }
                let now = now_micros();
                let day = micros(Duration::from_secs(86_400));
                let consumed_before = now - micros(me.config.bus.max_message_age) - day;
                if let Err(e) = me.store.prune_outbox(now - day, consumed_before).await {
                    tracing::warn!(error = %e, "outbox retention failed");
                }
                for s in bus::streams::ALL {
                    if let Err(e) = me.bus.trim_acknowledged(s).await {
                        tracing::debug!(stream = s, error = %e, "stream trim failed");
                    }
                }
            }
        })
    }
}

impl Runtime {
    /// Serve `router` over `listener` with health, metrics, limits and graceful shutdown.
    pub async fn serve<S: Send + Sync + 'static>(
        &self,
        name: &'static str,
        router: crate::http::Router<S>,
        state: Arc<S>,
        listener: tokio::net::TcpListener,
    ) -> std::io::Result<()> {
        let server = crate::http::HttpServer::new(
            name,
            router,
            state,
            self.health(),
            self.service_registry(),
            crate::http::ServerOptions::from_config(&self.config.http),
        );
        Arc::new(server).serve(listener, self.shutdown.clone()).await
    }
}
