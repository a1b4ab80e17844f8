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
