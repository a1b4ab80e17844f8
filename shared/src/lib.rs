//! `caracal-shared`: what every Caracal service shares — domain ids, the error vocabulary,
//! typed configuration, storage (Postgres / SQLite) and the event bus (Redis Streams /
//! embedded) with their contract, the transactional outbox, signed bus messages and signed
//! service-to-service requests, the egress guard, HTTP plumbing, health, metrics, telemetry and
//! graceful shutdown. No service logic lives here.

// Database rows are decoded as tuples, which clippy counts as complex types.
#![allow(clippy::type_complexity)]

pub mod audit;
pub mod budget;
pub mod budget_ledger;
pub mod bus;
pub mod config;
pub mod crypto;
pub mod egress;
pub mod error;
pub mod health;
pub mod http;
pub mod ids;
pub mod keys;
pub mod ledger;
pub mod mandate;
pub mod metering;
pub mod metrics;
pub mod policy;
pub mod ratelimit;
pub mod reqpath;
pub mod runtime;
pub mod seal;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod testing;
pub mod time;
pub mod tls;

pub use error::{Error, ErrorCode, Result};

/// A hash map for the gateway's per-request lookups by id (resources, policies, tenants,
/// budget windows, rate-limit buckets): foldhash instead of SipHash, which cost several
/// hundred instructions per lookup on the request path. Its seeds come from address-space
/// layout, not a secret, so it is no defence against chosen colliding keys: use it only for
/// keys the control plane or a verified mandate put there, never for names a request chooses.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
