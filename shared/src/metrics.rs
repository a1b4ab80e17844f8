//! Prometheus metrics. Each service owns a [`prometheus::Registry`] (so `caracal dev`, which
//! runs every service in one process, still exposes separate `/metrics` per service). Labels
//! are bounded: route patterns, codes and decisions — never ids, paths or secrets.

use prometheus::{Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

pub const NAMESPACE: &str = "caracal";

/// Build info shared by every service (`caracal_build_info{service,version} 1`).
pub fn register_build_info(registry: &Registry, service: &str) {
    let g = IntGaugeVec::new(
        Opts::new("build_info", "Build information of this service").namespace(NAMESPACE),
        &["service", "version", "rustc"],
    )
    .expect("valid metric");
    g.with_label_values(&[service, env!("CARGO_PKG_VERSION"), "1.95"])
        .set(1);
    let _ = registry.register(Box::new(g));
}

/// HTTP server metrics for the hyper services.
#[derive(Clone)]
pub struct HttpMetrics {
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
}

impl HttpMetrics {
    pub fn new(registry: &Registry) -> Self {
        let requests = IntCounterVec::new(
            Opts::new("http_requests_total", "HTTP requests by route, method and status").namespace(NAMESPACE),
            &["route", "method", "status"],
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new("http_request_duration_seconds", "HTTP request latency by route")
                .namespace(NAMESPACE)
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ]),
            &["route"],
        )
        .expect("valid metric");
        let _ = registry.register(Box::new(requests.clone()));
        let _ = registry.register(Box::new(duration.clone()));
        HttpMetrics { requests, duration }
    }
}

/// Bus security and delivery counters shared by every consumer in a process registry.
#[derive(Clone)]
pub struct BusMetrics {
    /// Messages refused, by reason (unsigned, forged, unknown_key, replayed, stale, malformed).
    pub rejected: IntCounterVec,
    pub consumed: IntCounterVec,
    pub published: IntCounterVec,
    /// Sequence gaps noticed on sequenced streams.
    pub gaps: IntCounterVec,
}

impl BusMetrics {
    pub fn new(registry: &Registry) -> Self {
        let mk = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help).namespace(NAMESPACE), labels).expect("valid metric");
            let _ = registry.register(Box::new(c.clone()));
            c
        };
        let m = BusMetrics {
            rejected: mk(
                "bus_messages_rejected_total",
                "Bus messages refused by verification",
                &["stream", "reason"],
            ),
            consumed: mk("bus_messages_consumed_total", "Bus messages applied", &["stream"]),
            published: mk("bus_messages_published_total", "Bus messages published", &["stream"]),
            gaps: mk(
                "bus_sequence_gaps_total",
                "Sequence gaps noticed on sequenced streams",
                &["stream"],
            ),
        };
        // Anomaly counters start at 0 for every stream (and reason), so dashboards and alerts
        // see a series before the first anomaly rather than "no data".
        for s in crate::bus::streams::ALL {
            m.gaps.with_label_values(&[s]);
            for r in crate::bus::envelope::Rejection::ALL {
                m.rejected.with_label_values(&[s, r.as_str()]);
            }
        }
        m
    }

    /// Metrics not attached to any registry (tests).
    pub fn detached() -> Self {
        BusMetrics::new(&Registry::new())
    }
}

pub fn render(registry: &Registry) -> String {
    let mut buf = Vec::new();
    let _ = TextEncoder::new().encode(&registry.gather(), &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}
