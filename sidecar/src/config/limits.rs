//! `[[services]]` and `[tenants]`: the bulkheads and tenant limits.

use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct ServiceLimits {
    pub name: String,
    /// Streams forwarded to the node at once.
    pub max_concurrency: usize,
    /// Requests waiting for a slot.
    pub max_queue: usize,
    /// Longest a request waits in the queue before it is refused.
    #[serde(with = "humantime_serde")]
    pub max_queue_wait: Duration,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TenantLimits {
    pub requests_per_sec: f64,
    /// Completion tokens per minute (max_tokens is charged up front, the
    /// unused part refunded).
    pub tokens_per_min: f64,
}
