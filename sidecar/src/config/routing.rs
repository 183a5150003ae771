//! `[routing]` and `[outlier]`: how calls are spread over instances and
//! when an instance is ejected.

use std::time::Duration;

use serde::Deserialize;

use super::OverflowRule;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    LeastLoaded,
    /// Least-loaded, weighed against the prefill a cached prompt prefix
    /// saves (`outbound::prefix`).
    CacheAware,
    RoundRobin,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Routing {
    pub policy: Policy,
    /// Longest wait for the first token of one attempt.
    #[serde(with = "humantime_serde")]
    pub attempt_timeout: Duration,
    /// Longest gap between two tokens before a stream counts as hung.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Times one request may move to another instance mid-stream.
    pub max_migrations: u32,
    /// Retries allowed as a share of recent requests...
    pub retry_ratio: f64,
    /// ...plus this many per second, so low traffic can still retry.
    pub retry_floor_per_sec: f64,
    /// Outbound streams this sidecar keeps open per service at most, so a
    /// flood on one service cannot take the memory and connections the
    /// others need.
    pub max_streams_per_service: usize,
    /// Cache-aware routing: prefix blocks (128 bytes of prompt each) the
    /// index remembers, for all services together; 44 bytes each.
    pub prefix_index_blocks: usize,
    /// Services that take a primary's calls when it cannot.
    pub overflow: Vec<OverflowRule>,
}

impl Default for Routing {
    fn default() -> Self {
        Self {
            policy: Policy::LeastLoaded,
            attempt_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(5),
            max_migrations: 2,
            retry_ratio: 0.2,
            retry_floor_per_sec: 5.0,
            max_streams_per_service: 1024,
            prefix_index_blocks: 1_000_000,
            overflow: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Outlier {
    /// Server-side failures in a row that eject an instance.
    pub consecutive_failures: u32,
    /// First ejection; each repeat doubles it, up to `max_ejection`.
    #[serde(with = "humantime_serde")]
    pub base_ejection: Duration,
    #[serde(with = "humantime_serde")]
    pub max_ejection: Duration,
    /// At most this share of a service's instances is ejected at once.
    pub max_ejected_percent: u32,
    /// Success-rate check: an instance whose success rate over the window is
    /// this far below the mean of its peers is ejected...
    pub success_rate_margin: f64,
    /// ...once it has at least this many requests in the window.
    pub success_rate_min_requests: u32,
    #[serde(with = "humantime_serde")]
    pub success_rate_window: Duration,
    /// Active health checks (grpc.health.v1).
    #[serde(with = "humantime_serde")]
    pub health_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub health_timeout: Duration,
}

impl Default for Outlier {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(5),
            max_ejection: Duration::from_secs(60),
            max_ejected_percent: 50,
            success_rate_margin: 0.3,
            success_rate_min_requests: 20,
            success_rate_window: Duration::from_secs(10),
            health_interval: Duration::from_secs(1),
            health_timeout: Duration::from_millis(500),
        }
    }
}
