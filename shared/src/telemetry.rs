//! Logging and tracing setup: structured JSON in production, readable text in development.
//! Secrets never reach a log line: types that hold them print `***` (see `crypto::Secret`).

use std::sync::Once;

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, TelemetryConfig};

static INIT: Once = Once::new();

/// Install the global subscriber once (later calls are no-ops, which keeps tests simple).
/// `RUST_LOG`, when set, overrides the configured level.
pub fn init(cfg: &TelemetryConfig) {
    INIT.call_once(|| {
        let filter = EnvFilter::try_from_default_env()
            .or_else(|_| EnvFilter::try_new(&cfg.log_level))
            .unwrap_or_else(|_| EnvFilter::new("info"));
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr);
        let _ = match cfg.log_format {
            LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
            LogFormat::Pretty => builder.compact().try_init(),
        };
    });
}

/// Test helper: log to the test harness at `warn` unless `RUST_LOG` says otherwise.
pub fn init_for_tests() {
    INIT.call_once(|| {
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}
