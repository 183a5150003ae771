//! `[response_cache]`: the client sidecar's cache of complete responses to
//! deterministic requests (`outbound::cache`).

use std::ops::RangeInclusive;
use std::time::Duration;

use serde::Deserialize;

use super::ranges::MAX_DURATION;
use super::{ConfigError, invalid};

/// From a few responses' worth up to 2 GiB: the cache lives in the
/// sidecar's own memory, next to tens of thousands of streams.
const MAX_BYTES: RangeInclusive<usize> = (64 << 10)..=(2 << 30);

/// Off by default: with it on, an answer can outlive a model update by up
/// to `ttl`, and equal requests are no longer independent samples of the
/// node's behaviour (a load test of identical greedy requests would
/// measure the cache). An operator turns it on knowing both.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ResponseCache {
    pub enabled: bool,
    /// Bytes of responses, keys and bookkeeping held at most; the least
    /// recently used entries go first.
    pub max_bytes: usize,
    /// How long an entry may be served after it was stored.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Services whose responses are never cached (their output changes
    /// between equal requests, or must always come from the model).
    pub services_off: Vec<String>,
    /// Tenants whose requests are neither served from nor stored in the cache.
    pub tenants_off: Vec<String>,
}

impl Default for ResponseCache {
    fn default() -> Self {
        Self {
            enabled: false,
            max_bytes: 64 << 20,
            ttl: Duration::from_secs(600),
            services_off: Vec::new(),
            tenants_off: Vec::new(),
        }
    }
}

impl ResponseCache {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if !MAX_BYTES.contains(&self.max_bytes) {
            let (lo, hi) = (MAX_BYTES.start(), MAX_BYTES.end());
            return Err(invalid("response_cache.max_bytes", format!("must be in [{lo}, {hi}] bytes")));
        }
        if self.ttl.is_zero() || self.ttl > MAX_DURATION {
            let most = MAX_DURATION.as_secs();
            return Err(invalid("response_cache.ttl", format!("must be above zero and at most {most}s (7 days)")));
        }
        Ok(())
    }
}
