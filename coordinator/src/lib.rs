//! caracal-coordinator: agent sessions, service leases with fencing, invocations between
//! agents, and one-call cascading revocation. State lives in the store (`shared::store::
//! coordination`); every transition is validated by a conditional update and written to the
//! outbox with its events (COORDINATION stream, and its twin on the AUDIT stream) in the same
//! transaction.

pub mod api;
pub mod auth;
pub mod cascade;
pub mod events;
pub mod invocations;
pub mod leases;
pub mod openapi;
pub mod sessions;
pub mod sweep;

use std::sync::Arc;

use caracal_shared::crypto::KeyRing;
use caracal_shared::error::{Error, ErrorCode, Result};
use caracal_shared::runtime::Runtime;
use tokio::net::TcpListener;

pub use api::router;

/// Service state shared by every request handler.
pub struct State {
    pub rt: Runtime,
    /// Keyed hash of admin tokens.
    pub pepper: KeyRing,
    pub keys: auth::Keys,
    pub metrics: sweep::Metrics,
}

impl State {
    pub fn new(rt: Runtime, registry: &prometheus::Registry) -> Result<State> {
        let pepper = rt
            .config
            .keys
            .pepper
            .clone()
            .ok_or_else(|| Error::new(ErrorCode::ValidationFailed, "the coordinator needs keys.pepper"))?;
        Ok(State {
            keys: auth::Keys::new(rt.store.clone()),
            metrics: sweep::Metrics::new(registry),
            pepper,
            rt,
        })
    }
}

/// Start the sweeper and serve until the runtime's shutdown is triggered, then drain.
pub async fn serve(rt: Runtime, listener: TcpListener) -> std::io::Result<()> {
    let registry = rt.service_registry();
    let state = Arc::new(State::new(rt.clone(), &registry).map_err(|e| std::io::Error::other(e.to_string()))?);
    sweep::spawn(state.clone());
    let server = caracal_shared::http::HttpServer::new(
        "coordinator",
        router(),
        state,
        rt.health(),
        registry,
        caracal_shared::http::ServerOptions::from_config(&rt.config.http),
    );
    Arc::new(server).serve(listener, rt.shutdown.clone()).await
}
