//! caracal-gateway: the Pingora L7 proxy every agent request passes.
//!
//! - [`server`]: runs Pingora on its own thread and runtimes; feeds (control, keys,
//!   revocations) and the admin listener run on the caller's runtime.
//! - [`state`]: the in-memory snapshot (resources with unsealed credentials, active policies),
//!   keys, caches and the revocation set ([`revocation`]).
//! - [`decide`]: the decision for one request, shared by every way in.
//! - [`proxy`]: the `ProxyHttp` request path (forward proxy and sidecars).
//! - [`connect`]: CONNECT tunnels (`HTTPS_PROXY`).
//! - [`forward`]: the gateway's own forwarder for large inspected bodies.
//! - [`mtls`]: the mTLS listener (client certificates as a way in).

pub mod budget;
pub mod connect;
pub mod decide;
pub mod forward;
pub mod intercept;
pub mod metrics;
pub mod mtls;
pub mod proxy;
pub mod request_id;
pub mod revocation;
pub mod server;
pub mod state;

pub use server::{GatewayHandle, Stop, start, start_with};
