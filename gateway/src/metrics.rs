//! Gateway metrics. Labels are bounded (decision, reason code, error kind); the counters of
//! the hot path are resolved once so a request does no label lookup.

use prometheus::{Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};

const NS: &str = "caracal";

#[derive(Clone)]
pub struct Metrics {
    pub decisions: IntCounterVec,
    pub allowed: IntCounter,
    pub total: Histogram,
    pub added: Histogram,
    pub cache_hit: IntCounter,
    pub cache_miss: IntCounter,
    pub feed_age: Gauge,
    pub revocations: Gauge,
    pub upstream_errors: IntCounterVec,
    pub tunnels: IntCounterVec,
    pub tunnel_bytes: IntCounterVec,
    /// Responses cut mid-stream because their mandate was revoked.
    pub responses_cut: IntCounter,
    /// Revocation event timestamp → applied here.
    pub revocation_propagation: Histogram,
}

fn buckets() -> Vec<f64> {
    vec![
        0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ]
}

impl Metrics {
    pub fn new(r: &Registry) -> Metrics {
        let decisions = IntCounterVec::new(
            Opts::new("gateway_requests_total", "Requests by decision and reason").namespace(NS),
            &["decision", "reason"],
        )
        .expect("metric");
        let total = Histogram::with_opts(
            HistogramOpts::new("gateway_request_duration_seconds", "Time from request to response end")
                .namespace(NS)
                .buckets(buckets()),
        )
        .expect("metric");
        let added = Histogram::with_opts(
            HistogramOpts::new(
                "gateway_added_duration_seconds",
                "Time the gateway spends before a request leaves for the upstream",
            )
            .namespace(NS)
            .buckets(buckets()),
        )
        .expect("metric");
        let cache = IntCounterVec::new(
            Opts::new("gateway_mandate_cache_total", "Mandate cache lookups").namespace(NS),
            &["result"],
        )
        .expect("metric");
        let feed_age = Gauge::with_opts(
            Opts::new("gateway_revocation_feed_age_seconds", "Age of the revocation feed").namespace(NS),
        )
        .expect("metric");
        let revocations =
            Gauge::with_opts(Opts::new("gateway_revocations", "Live revocations known to this gateway").namespace(NS))
                .expect("metric");
        let upstream_errors = IntCounterVec::new(
            Opts::new("gateway_upstream_errors_total", "Upstream failures").namespace(NS),
            &["kind"],
        )
        .expect("metric");
        let tunnels = IntCounterVec::new(
            Opts::new("gateway_tunnels_total", "CONNECT tunnels by decision").namespace(NS),
            &["decision"],
        )
        .expect("metric");
        let tunnel_bytes = IntCounterVec::new(
            Opts::new("gateway_tunnel_bytes_total", "Bytes relayed by tunnels").namespace(NS),
            &["direction"],
        )
        .expect("metric");
        let responses_cut = IntCounter::with_opts(
            Opts::new(
                "gateway_responses_cut_total",
                "Responses cut mid-stream because their mandate was revoked",
            )
            .namespace(NS),
        )
        .expect("metric");
        let revocation_propagation = Histogram::with_opts(
            HistogramOpts::new(
                "gateway_revocation_propagation_seconds",
                "Time from a revocation's event (written with its commit) to its application at this gateway",
            )
            .namespace(NS)
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
        )
        .expect("metric");
        for c in [
            Box::new(revocation_propagation.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(responses_cut.clone()),
            Box::new(decisions.clone()),
            Box::new(total.clone()),
            Box::new(added.clone()),
            Box::new(cache.clone()),
            Box::new(feed_age.clone()),
            Box::new(revocations.clone()),
            Box::new(upstream_errors.clone()),
            Box::new(tunnels.clone()),
            Box::new(tunnel_bytes.clone()),
        ] {
            let _ = r.register(c);
        }
        // Refusal reasons and tunnel decisions start at 0, so rates and ratios read 0 (not "no
        // data") until the first one.
        for code in caracal_shared::error::ErrorCode::ALL {
            decisions.with_label_values(&["deny", code.as_str()]);
        }
        for d in ["allow", "deny", "intercept", "intercept_failed"] {
            tunnels.with_label_values(&[d]);
        }
        Metrics {
            revocation_propagation,
            responses_cut,
            allowed: decisions.with_label_values(&["allow", "ok"]),
            cache_hit: cache.with_label_values(&["hit"]),
            cache_miss: cache.with_label_values(&["miss"]),
            decisions,
            total,
            added,
            feed_age,
            revocations,
            upstream_errors,
            tunnels,
            tunnel_bytes,
        }
    }
}
