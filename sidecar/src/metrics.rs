//! The sidecar's Prometheus metrics (prefix `mesh_sidecar_`, and
//! `mesh_registry_` for its view of etcd).

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use telemetry::metrics::{Registry, code_name, latency_histogram};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `outbound` (from local clients) or `inbound` (to the local node).
    pub direction: String,
    pub service: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PrefixLabels {
    pub service: String,
    /// `hit` (to the longest cached prefix), `spread` (elsewhere: that
    /// instance was too loaded) or `miss` (no instance held a prefix).
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OverflowLabels {
    /// The primary service (one with an overflow rule, so the set is the config's).
    pub service: String,
    /// What the primary said: `full` (RESOURCE_EXHAUSTED: bulkheads or
    /// queues full), `unavailable` (no healthy instance) or `deadline` (it
    /// could not start the call before its deadline).
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// `chat`, `completions` or `models`; unknown routes are not counted.
    pub route: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// `requests_per_sec` or `tokens_per_min`.
    pub limit: String,
}

/// The outbound response cache's counts (`outbound::cache`). Unlabelled:
/// the cache sits before the service check, so a service label would let
/// callers add series with made-up names.
#[derive(Clone, Default)]
pub struct ResponseCacheMetrics {
    pub hits: Counter,
    pub misses: Counter,
    /// Calls that followed an identical call's upstream stream.
    pub coalesced: Counter,
    pub evictions: Counter,
    pub bytes: Gauge,
}

/// One direction's token latency histograms (handles to the families' own).
#[derive(Clone)]
pub struct Latency {
    pub ttft: Histogram,
    pub gap: Histogram,
}

#[derive(Clone)]
pub struct SidecarMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub time_to_first_token: Family<DirectionLabels, Histogram, fn() -> Histogram>,
    pub inter_token: Family<DirectionLabels, Histogram, fn() -> Histogram>,
    pub in_flight: Family<ServiceLabels, Gauge>,
    pub queue_depth: Family<ServiceLabels, Gauge>,
    /// The bulkhead's `max_queue`, beside `queue_depth`, so an alert can
    /// say "nearly full" without knowing the config. With the shipped
    /// limits this queue, not the node's, is the one that fills: the
    /// bulkhead lets through only as many calls as the node runs at once.
    pub queue_limit: Family<ServiceLabels, Gauge>,
    pub ejections: Family<ServiceLabels, Counter>,
    pub ejected_instances: Family<ServiceLabels, Gauge>,
    /// Instances this sidecar would route to without doubt, by service
    /// (`Instance::is_healthy`): 0 when every instance is gone, ejected or
    /// failing, which `mesh_registry_instances` and `ejected_instances`
    /// cannot say, as the ejection budget never ejects them all.
    pub healthy_instances: Family<ServiceLabels, Gauge>,
    /// Ejections the budget refused: one per failure past the threshold,
    /// so under overload many a second (the log says it once per episode).
    pub ejections_skipped: Family<ServiceLabels, Counter>,
    pub rate_limited: Family<LimitLabels, Counter>,
    /// Cache-aware routing decisions.
    pub prefix_routed: Family<PrefixLabels, Counter>,
    /// Entries in use in the prefix index.
    pub prefix_index_blocks: Gauge,
    pub retries: Counter,
    pub migrations: Counter,
    /// Calls the overflow service served because their primary could not.
    pub overflowed: Family<OverflowLabels, Counter>,
    /// Calls a listener's gate refused (identity, or a key on an operator surface).
    pub refused_requests: Family<DirectionLabels, Counter>,
    /// Requests to the HTTP edge, by route and HTTP status.
    pub http_requests: Family<HttpLabels, Counter>,
    pub response_cache: ResponseCacheMetrics,
    pub etcd_reachable: Gauge,
    pub instances: Family<ServiceLabels, Gauge>,
    /// The registry's own counts (watch breaks, reconnects, registration
    /// failures), read at each scrape: pass to `EtcdConfig::with_stats`.
    pub registry_stats: Arc<registry::Stats>,
}

impl Default for SidecarMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl SidecarMetrics {
    pub fn new() -> Self {
        Self {
            requests: Family::default(),
            time_to_first_token: Family::new_with_constructor(latency_histogram),
            inter_token: Family::new_with_constructor(latency_histogram),
            in_flight: Family::default(),
            queue_depth: Family::default(),
            queue_limit: Family::default(),
            ejections: Family::default(),
            ejected_instances: Family::default(),
            healthy_instances: Family::default(),
            ejections_skipped: Family::default(),
            rate_limited: Family::default(),
            prefix_routed: Family::default(),
            prefix_index_blocks: Gauge::default(),
            retries: Counter::default(),
            migrations: Counter::default(),
            overflowed: Family::default(),
            refused_requests: Family::default(),
            http_requests: Family::default(),
            response_cache: ResponseCacheMetrics::default(),
            etcd_reachable: Gauge::default(),
            instances: Family::default(),
            registry_stats: Arc::default(),
        }
    }

    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("mesh_sidecar");
        r.register("requests", "Generate calls by direction, service and final status code", self.requests.clone());
        r.register(
            "time_to_first_token_seconds",
            "From the call to its first token, as this sidecar saw it",
            self.time_to_first_token.clone(),
        );
        r.register("inter_token_seconds", "Between two tokens of one stream", self.inter_token.clone());
        r.register("in_flight_streams", "Outbound streams open, by service", self.in_flight.clone());
        r.register("queue_depth", "Inbound requests waiting in the bulkhead, by service", self.queue_depth.clone());
        r.register(
            "queue_limit",
            "Inbound requests the bulkhead may hold waiting, by service",
            self.queue_limit.clone(),
        );
        r.register("ejections", "Instances ejected, by service", self.ejections.clone());
        r.register("ejected_instances", "Instances ejected now, by service", self.ejected_instances.clone());
        r.register(
            "healthy_instances",
            "Instances neither ejected, on probation nor failing their last attempts, by service",
            self.healthy_instances.clone(),
        );
        r.register("ejections_skipped", "Ejections refused by the ejection budget", self.ejections_skipped.clone());
        r.register("http_requests", "Requests to the HTTP edge, by route and status", self.http_requests.clone());
        r.register("rate_limited", "Requests refused by a tenant limit", self.rate_limited.clone());
        r.register(
            "prefix_routed",
            "Cache-aware picks, by service and outcome (hit, spread, miss)",
            self.prefix_routed.clone(),
        );
        r.register(
            "prefix_index_blocks",
            "Prompt prefix blocks the routing index holds",
            self.prefix_index_blocks.clone(),
        );
        r.register("retries", "Attempts after the first, before a first token", self.retries.clone());
        r.register("migrations", "Streams moved to another instance mid-way", self.migrations.clone());
        r.register(
            "overflowed_requests",
            "Calls served by an overflow service because their primary could not take them, by service and reason",
            self.overflowed.clone(),
        );
        r.register(
            "refused_requests",
            "Calls a listener refused before any service, by direction (identity; key on admin, reflection, models)",
            self.refused_requests.clone(),
        );
        let c = &self.response_cache;
        r.register("response_cache_hits", "Calls answered from the response cache", c.hits.clone());
        r.register("response_cache_misses", "Cacheable calls that opened an upstream stream", c.misses.clone());
        r.register("response_cache_coalesced", "Calls that followed an identical call's stream", c.coalesced.clone());
        r.register("response_cache_evictions", "Responses evicted to make room", c.evictions.clone());
        r.register("response_cache_bytes", "Bytes the response cache holds", c.bytes.clone());
        let reg = registry.sub_registry_with_prefix("mesh_registry");
        reg.register("etcd_reachable", "1 when the last contact with etcd succeeded", self.etcd_reachable.clone());
        reg.register("instances", "Instances known, by service", self.instances.clone());
        reg.register_collector(Box::new(RegistryCounters(self.registry_stats.clone())));
    }

    pub fn count(&self, direction: &str, service: &str, code: tonic::Code) {
        let labels =
            RequestLabels { direction: direction.to_string(), service: service.to_string(), code: code_name(code) };
        self.requests.get_or_create(&labels).inc();
    }

    /// The time-to-first-token and inter-token histograms of `direction`,
    /// to keep: observing a token through a handle skips the label lookup
    /// (a string, a hash and a lock per token).
    pub fn latency(&self, direction: &str) -> Latency {
        let labels = DirectionLabels { direction: direction.to_string() };
        Latency {
            ttft: self.time_to_first_token.get_or_create(&labels).clone(),
            gap: self.inter_token.get_or_create(&labels).clone(),
        }
    }

    /// The refusal counter of the `direction` listener's gate.
    pub fn refused(&self, direction: &str) -> Counter {
        self.refused_requests.get_or_create(&DirectionLabels { direction: direction.to_string() }).clone()
    }

    pub fn prefix(&self, service: &str, outcome: &'static str) -> PrefixLabels {
        PrefixLabels { service: service.to_string(), outcome }
    }

    pub fn service(&self, service: &str) -> ServiceLabels {
        ServiceLabels { service: service.to_string() }
    }
}

/// `mesh_registry_watch_breaks_total`, `mesh_registry_reconnects_total` and
/// `mesh_registry_registration_failures_total`, read from the registry's
/// atomics at each scrape (the registry crate knows nothing of Prometheus).
#[derive(Debug)]
struct RegistryCounters(Arc<registry::Stats>);

impl Collector for RegistryCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        for (name, help, value) in [
            ("watch_breaks", "etcd watch attempts that failed or broke", s.watch_breaks()),
            ("reconnects", "etcd watches set up again after a break", s.reconnects()),
            ("registration_failures", "etcd registration attempts failed or leases lost", s.registration_failures()),
        ] {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_counts_are_exported_under_their_names() {
        let metrics = SidecarMetrics::new();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        metrics.ejections_skipped.get_or_create(&metrics.service("chat")).inc_by(3);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            "mesh_registry_watch_breaks_total 0",
            "mesh_registry_reconnects_total 0",
            "mesh_registry_registration_failures_total 0",
            "mesh_sidecar_ejections_skipped_total{service=\"chat\"} 3",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from\n{text}");
        }
    }
}
