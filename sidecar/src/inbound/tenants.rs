//! Per-tenant token buckets: requests per second and completion tokens per
//! minute. A request is charged its `max_tokens` up front; the unused part
//! is refunded when it ends.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::TenantLimits;

/// Tenants tracked at once; past this, unlisted tenants share one bucket
/// (an attacker inventing names cannot grow memory without bound).
const MAX_TRACKED: usize = 10_000;
const SHARED: &str = "\u{0}shared";

struct Bucket {
    capacity: f64,
    tokens: f64,
    per_sec: f64,
    last: Instant,
}

impl Bucket {
    fn new(capacity: f64, per_sec: f64, now: Instant) -> Self {
        Self { capacity, tokens: capacity, per_sec, last: now }
    }

    fn refill(&mut self, now: Instant) {
        let secs = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + secs * self.per_sec).min(self.capacity);
        self.last = now;
    }

    /// Time until `cost` is available (zero if it is now).
    fn shortfall(&self, cost: f64) -> Duration {
        Duration::from_secs_f64(((cost - self.tokens) / self.per_sec).max(0.0))
    }
}

struct Buckets {
    requests: Bucket,
    tokens: Bucket,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OverLimit {
    pub what: &'static str,
    pub limit: f64,
    pub retry_after: Duration,
}

pub struct Tenants {
    limits: BTreeMap<String, TenantLimits>,
    buckets: Mutex<HashMap<String, Buckets>>,
}

impl Tenants {
    pub fn new(limits: BTreeMap<String, TenantLimits>) -> Self {
        Self { limits, buckets: Mutex::new(HashMap::new()) }
    }

    /// Charges one request of up to `max_tokens` completion tokens.
    pub fn charge(&self, tenant: &str, max_tokens: u32, now: Instant) -> Result<(), OverLimit> {
        let Some(limits) = self.limits.get(tenant).or_else(|| self.limits.get("default")) else {
            return Ok(()); // no limits configured for this tenant
        };
        let mut all = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let key = match all.contains_key(tenant) || all.len() < MAX_TRACKED || self.limits.contains_key(tenant) {
            true => tenant,
            false => SHARED,
        };
        let b = all.entry(key.to_string()).or_insert_with(|| Buckets {
            requests: Bucket::new(limits.requests_per_sec.max(1.0), limits.requests_per_sec, now),
            tokens: Bucket::new(limits.tokens_per_min, limits.tokens_per_min / 60.0, now),
        });
        b.requests.refill(now);
        b.tokens.refill(now);
        let cost = f64::from(max_tokens).min(b.tokens.capacity);
        if b.requests.tokens < 1.0 {
            let retry_after = b.requests.shortfall(1.0);
            return Err(OverLimit { what: "requests_per_sec", limit: limits.requests_per_sec, retry_after });
        }
        if b.tokens.tokens < cost {
            let retry_after = b.tokens.shortfall(cost);
            return Err(OverLimit { what: "tokens_per_min", limit: limits.tokens_per_min, retry_after });
        }
        b.requests.tokens -= 1.0;
        b.tokens.tokens -= cost;
        Ok(())
    }

    /// Returns tokens charged but not generated.
    pub fn refund(&self, tenant: &str, unused: u32) {
        let mut all = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = all.get_mut(tenant) {
            b.tokens.tokens = (b.tokens.tokens + f64::from(unused)).min(b.tokens.capacity);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenants() -> Tenants {
        let mut limits = BTreeMap::new();
        limits.insert("default".into(), TenantLimits { requests_per_sec: 2.0, tokens_per_min: 600.0 });
        limits.insert("big".into(), TenantLimits { requests_per_sec: 100.0, tokens_per_min: 60_000.0 });
        Tenants::new(limits)
    }

    #[test]
    fn request_rate_is_limited_per_tenant_and_refills() {
        let t = tenants();
        let now = Instant::now();
        assert!(t.charge("a", 10, now).is_ok());
        assert!(t.charge("a", 10, now).is_ok());
        let err = t.charge("a", 10, now).unwrap_err();
        assert_eq!((err.what, err.retry_after), ("requests_per_sec", Duration::from_millis(500)));
        assert!(t.charge("b", 10, now).is_ok(), "another tenant has its own bucket");
        assert!(t.charge("a", 10, now + Duration::from_millis(500)).is_ok());
    }

    #[test]
    fn tokens_are_charged_up_front_and_refunded() {
        let t = tenants();
        let now = Instant::now();
        assert!(t.charge("a", 500, now).is_ok());
        let err = t.charge("a", 200, now).unwrap_err();
        assert_eq!(err.what, "tokens_per_min");
        // 100 left, 200 needed, 10 tokens/s.
        assert_eq!(err.retry_after, Duration::from_secs(10));
        t.refund("a", 400);
        assert!(t.charge("a", 200, now).is_ok());
        assert!(t.charge("big", 5000, now).is_ok());
    }
}
