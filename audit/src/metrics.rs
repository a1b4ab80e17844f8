//! The audit service's metrics.

use caracal_shared::metrics::NAMESPACE;
use prometheus::{Gauge, IntCounter, IntGauge, Opts, Registry};

#[derive(Clone)]
pub struct Metrics {
    pub appended: IntCounter,
    pub duplicates: IntCounter,
    pub tree_size: IntGauge,
    /// Seconds from the oldest event of the last batch being produced to its append.
    pub lag: Gauge,
    pub head_size: IntGauge,
    pub head_timestamp: Gauge,
    pub head_errors: IntCounter,
}

impl Metrics {
    pub fn new(r: &Registry) -> Metrics {
        let m = Metrics {
            appended: IntCounter::with_opts(
                Opts::new("audit_ledger_appended_total", "Events appended to the ledger").namespace(NAMESPACE),
            )
            .expect("metric"),
            duplicates: IntCounter::with_opts(
                Opts::new("audit_ledger_duplicates_total", "Redelivered events dropped by id").namespace(NAMESPACE),
            )
            .expect("metric"),
            tree_size: IntGauge::with_opts(Opts::new("audit_tree_size", "Entries in the ledger").namespace(NAMESPACE))
                .expect("metric"),
            lag: Gauge::with_opts(
                Opts::new(
                    "audit_ingest_lag_seconds",
                    "Age of the oldest event of the last appended batch",
                )
                .namespace(NAMESPACE),
            )
            .expect("metric"),
            head_size: IntGauge::with_opts(
                Opts::new("audit_tree_head_size", "Tree size of the latest signed head").namespace(NAMESPACE),
            )
            .expect("metric"),
            head_timestamp: Gauge::with_opts(
                Opts::new(
                    "audit_tree_head_timestamp_seconds",
                    "When the latest tree head was signed",
                )
                .namespace(NAMESPACE),
            )
            .expect("metric"),
            head_errors: IntCounter::with_opts(
                Opts::new("audit_tree_head_errors_total", "Failed attempts to sign a tree head").namespace(NAMESPACE),
            )
            .expect("metric"),
        };
        for c in [
            Box::new(m.appended.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.duplicates.clone()),
            Box::new(m.tree_size.clone()),
            Box::new(m.lag.clone()),
            Box::new(m.head_size.clone()),
            Box::new(m.head_timestamp.clone()),
            Box::new(m.head_errors.clone()),
        ] {
            let _ = r.register(c);
        }
        m
    }
}
