//! The audit service's metrics.

use caracal_shared::metrics::NAMESPACE;
use prometheus::{Gauge, Histogram, HistogramOpts, IntCounter, IntGauge, Opts, Registry};

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
    /// Time to append one batch (one transaction).
    pub append: Histogram,
    pub batch_size: Histogram,
    /// Entries below this sequence number were dropped by retention.
    pub pruned_below: IntGauge,
    pub pruned: IntCounter,
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
            append: Histogram::with_opts(
                HistogramOpts::new(
                    "audit_append_duration_seconds",
                    "Time to append one batch to the ledger",
                )
                .namespace(NAMESPACE)
                .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
            )
            .expect("metric"),
            batch_size: Histogram::with_opts(
                HistogramOpts::new("audit_append_batch_events", "Events per ledger append")
                    .namespace(NAMESPACE)
                    .buckets(vec![
                        1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
                    ]),
            )
            .expect("metric"),
            pruned_below: IntGauge::with_opts(
                Opts::new(
                    "audit_pruned_below",
                    "Entries below this sequence number were dropped by retention (summarized by the signed head of this size)",
                )
                .namespace(NAMESPACE),
            )
            .expect("metric"),
            pruned: IntCounter::with_opts(
                Opts::new("audit_pruned_entries_total", "Entries dropped by retention").namespace(NAMESPACE),
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
            Box::new(m.append.clone()),
            Box::new(m.batch_size.clone()),
            Box::new(m.pruned_below.clone()),
            Box::new(m.pruned.clone()),
        ] {
            let _ = r.register(c);
        }
        m
    }
}
