//! What the nodes themselves counted during a run, from their `/metrics`:
//! requests and prompt tokens served from the prefix cache or computed,
//! per node, so a report can show how a mesh spread the work (which the
//! load generator, talking to one client sidecar, cannot see) and check the
//! hit rate the callers saw against the nodes' own.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use anyhow::Context;
use serde::Serialize;

const REQUESTS: &str = "mesh_node_requests_total";
const HIT_TOKENS: &str = "mesh_node_prefix_cache_hit_tokens_total";
const MISS_TOKENS: &str = "mesh_node_prefix_cache_miss_tokens_total";
const EVICTED: &str = "mesh_node_prefix_cache_evicted_blocks_total";
const ROUTED: &str = "mesh_sidecar_prefix_routed_total";

/// One node's counters (or their growth over a run).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct NodeCounts {
    /// Generate calls, every status.
    pub requests: f64,
    /// Prompt tokens served from the prefix cache.
    pub hit_tokens: f64,
    /// Prompt tokens computed.
    pub miss_tokens: f64,
    /// Idle cached blocks evicted to make room.
    pub evicted_blocks: f64,
}

impl NodeCounts {
    fn parse(text: &str) -> NodeCounts {
        NodeCounts {
            requests: sum(text, REQUESTS),
            hit_tokens: sum(text, HIT_TOKENS),
            miss_tokens: sum(text, MISS_TOKENS),
            evicted_blocks: sum(text, EVICTED),
        }
    }

    fn since(self, before: NodeCounts) -> NodeCounts {
        NodeCounts {
            requests: self.requests - before.requests,
            hit_tokens: self.hit_tokens - before.hit_tokens,
            miss_tokens: self.miss_tokens - before.miss_tokens,
            evicted_blocks: self.evicted_blocks - before.evicted_blocks,
        }
    }
}

/// Every sample of `name` (all its label sets) in a Prometheus text page, summed.
fn sum(text: &str, name: &str) -> f64 {
    samples(text, name).map(|(_, v)| v).sum()
}

/// The samples of `name` in a Prometheus text page: labels and value.
fn samples<'a>(text: &'a str, name: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
    let sample = move |line: &'a str| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, labels) = series.split_once('{').unwrap_or((series, ""));
        if metric == name { Some((labels, value.parse::<f64>().ok()?)) } else { None }
    };
    text.lines().filter(|l| !l.starts_with('#')).filter_map(sample)
}

/// A client sidecar's cache-aware picks so far, by outcome (hit, spread,
/// miss), all services together.
pub async fn routed(addr: SocketAddr) -> anyhow::Result<BTreeMap<String, f64>> {
    Ok(outcomes(&page(addr).await?))
}

fn outcomes(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (labels, value) in samples(text, ROUTED) {
        let outcome = labels.split(',').find_map(|l| l.strip_prefix("outcome=\""));
        if let Some(outcome) = outcome.map(|o| o.trim_end_matches(['"', '}'])) {
            *out.entry(outcome.to_string()).or_default() += value;
        }
    }
    out
}

/// Reads every node's counters.
pub async fn scrape(addrs: &[SocketAddr]) -> anyhow::Result<Vec<NodeCounts>> {
    let mut out = Vec::with_capacity(addrs.len());
    for &addr in addrs {
        out.push(NodeCounts::parse(&page(addr).await?));
    }
    Ok(out)
}

/// The Prometheus page a process serves at `addr`.
async fn page(addr: SocketAddr) -> anyhow::Result<String> {
    let (status, body) = harness::http_get(addr, "/metrics").await.with_context(|| format!("scraping {addr}"))?;
    anyhow::ensure!(status == 200, "GET /metrics from {addr}: HTTP {status}");
    Ok(body)
}

/// How a run's work fell on the nodes.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Spread {
    pub per_node: Vec<NodeCounts>,
    /// The busiest node's requests over the mean (1 is perfectly even).
    pub requests_max_over_mean: f64,
    /// The same for prompt tokens computed.
    pub prefill_max_over_mean: f64,
    /// Hit tokens over hit plus miss tokens, all nodes: the nodes' own view
    /// of the hit rate the callers saw in their usage.
    pub hit_rate: f64,
}

/// The growth of every node's counters from `before` to `after`.
pub fn spread(before: &[NodeCounts], after: &[NodeCounts]) -> Spread {
    let per_node: Vec<NodeCounts> = after.iter().zip(before).map(|(a, b)| a.since(*b)).collect();
    let (hits, misses): (f64, f64) =
        per_node.iter().fold((0.0, 0.0), |(h, m), n| (h + n.hit_tokens, m + n.miss_tokens));
    Spread {
        requests_max_over_mean: max_over_mean(per_node.iter().map(|n| n.requests)),
        prefill_max_over_mean: max_over_mean(per_node.iter().map(|n| n.miss_tokens)),
        hit_rate: if hits + misses > 0.0 { hits / (hits + misses) } else { 0.0 },
        per_node,
    }
}

/// 0 when there is nothing to spread.
fn max_over_mean(values: impl Iterator<Item = f64>) -> f64 {
    let values: Vec<f64> = values.collect();
    let mean = values.iter().sum::<f64>() / values.len().max(1) as f64;
    let max = values.iter().copied().fold(0.0, f64::max);
    if mean > 0.0 { max / mean } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "# HELP mesh_node_requests Generate calls\n# TYPE mesh_node_requests counter\n\
        mesh_node_requests_total{model=\"m\",code=\"OK\"} 7\n\
        mesh_node_requests_total{model=\"m\",code=\"CANCELLED\"} 1\n\
        mesh_node_prefix_cache_hit_tokens_total 1536\nmesh_node_prefix_cache_miss_tokens_total 512\n\
        mesh_node_prefix_cache_blocks 48\nmesh_node_prefix_cache_evicted_blocks_total 5\n# EOF\n";

    #[test]
    fn counters_sum_over_labels() {
        let c = NodeCounts::parse(PAGE);
        assert_eq!(c, NodeCounts { requests: 8.0, hit_tokens: 1536.0, miss_tokens: 512.0, evicted_blocks: 5.0 });
        assert_eq!(NodeCounts::parse("# EOF\n"), NodeCounts::default());
    }

    #[test]
    fn spread_is_max_over_mean_of_the_growth() {
        let n =
            |requests, hit_tokens, miss_tokens| NodeCounts { requests, hit_tokens, miss_tokens, evicted_blocks: 0.0 };
        let before = [n(1.0, 0.0, 100.0), n(0.0, 0.0, 0.0), n(0.0, 0.0, 0.0)];
        let after = [n(7.0, 600.0, 400.0), n(3.0, 300.0, 100.0), n(3.0, 300.0, 100.0)];
        let s = spread(&before, &after);
        // Requests 6, 3, 3 (mean 4); computed 300, 100, 100 (mean 166.7).
        assert_eq!(s.requests_max_over_mean, 1.5);
        assert!((s.prefill_max_over_mean - 1.8).abs() < 1e-9, "{s:?}");
        assert_eq!(s.hit_rate, 1200.0 / 1700.0);
        assert_eq!(spread(&[], &[]).requests_max_over_mean, 0.0);
    }

    #[test]
    fn routed_outcomes_sum_over_services() {
        let page = "mesh_sidecar_prefix_routed_total{service=\"a\",outcome=\"hit\"} 3\n\
            mesh_sidecar_prefix_routed_total{service=\"b\",outcome=\"hit\"} 2\n\
            mesh_sidecar_prefix_routed_total{service=\"a\",outcome=\"miss\"} 1\n# EOF\n";
        let o = outcomes(page);
        assert_eq!(o.get("hit"), Some(&5.0));
        assert_eq!(o.get("miss"), Some(&1.0));
        assert_eq!(o.len(), 2);
    }
}
