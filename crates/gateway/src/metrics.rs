//! The gateway's Prometheus metrics, served at `GET /metrics` in the OpenMetrics text format
//! (which Prometheus scrapes natively), followed by whatever the backend appends.
//!
//! - `plexus_gateway_requests_total{route,status}`: every HTTP response (route = the matched
//!   path, `unmatched` otherwise, so labels stay bounded);
//! - `plexus_gateway_prompt_tokens_total`, `plexus_gateway_completion_tokens_total`;
//! - `plexus_gateway_queue_depth`, `plexus_gateway_in_flight`: waiting and running generations;
//! - `plexus_gateway_time_to_first_token_seconds`: arrival to the first text;
//! - `plexus_gateway_request_duration_seconds{route}`: arrival to the end of a generation.

use crate::backend::Backend;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of `requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    pub status: u16,
}

/// Labels of per-route histograms.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
}

type HistogramFamily = Family<RouteLabels, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    // 10 ms .. ~160 s.
    Histogram::new(exponential_buckets(0.01, 2.0, 15))
}

/// Every metric of one gateway.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub prompt_tokens: Counter,
    pub completion_tokens: Counter,
    pub queue_depth: Gauge,
    pub in_flight: Gauge,
    pub time_to_first_token: Histogram,
    pub request_duration: HistogramFamily,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("plexus_gateway");
        let requests = Family::<RequestLabels, Counter>::default();
        let prompt_tokens = Counter::default();
        let completion_tokens = Counter::default();
        let queue_depth = Gauge::default();
        let in_flight = Gauge::default();
        // 5 ms .. ~80 s.
        let time_to_first_token = Histogram::new(exponential_buckets(0.005, 2.0, 15));
        let request_duration = HistogramFamily::new_with_constructor(duration_histogram);
        registry.register(
            "requests",
            "HTTP responses by route and status",
            requests.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt tokens of admitted generations",
            prompt_tokens.clone(),
        );
        registry.register(
            "completion_tokens",
            "Tokens generated",
            completion_tokens.clone(),
        );
        registry.register(
            "queue_depth",
            "Requests waiting for a generation slot",
            queue_depth.clone(),
        );
        registry.register("in_flight", "Generations running", in_flight.clone());
        registry.register(
            "time_to_first_token_seconds",
            "From a request's arrival to its first generated text",
            time_to_first_token.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "From a generation request's arrival to its last token",
            request_duration.clone(),
        );
        Self {
            registry,
            requests,
            prompt_tokens,
            completion_tokens,
            queue_depth,
            in_flight,
            time_to_first_token,
            request_duration,
        }
    }

    /// The `/metrics` page: the gateway's metrics, the backend's, then `# EOF`.
    pub fn render(&self, backend: &dyn Backend) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; an encoder error would be a bug in a metric.
        if let Err(e) = encode_registry(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        backend.render_metrics(&mut out);
        crate::grammar::render_metrics(&mut out);
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        let _ = encode_eof(&mut out);
        out
    }
}
