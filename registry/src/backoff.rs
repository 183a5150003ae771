//! Capped exponential backoff with full jitter, so a fleet that lost etcd
//! (or a node, or a peer) together does not come back in lockstep. The
//! mesh's one backoff: the registry's etcd loops and the sidecar's retries
//! share it.

use std::time::Duration;

/// Delays for retry after retry: each drawn uniformly below a ceiling that
/// doubles from `base` up to `cap`; [`Backoff::reset`] after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self { base, cap, attempt: 0 }
    }

    /// The next delay: uniform in [0, min(cap, base * 2^attempt)].
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.base.saturating_mul(1 << self.attempt.min(16)).min(self.cap);
        self.attempt += 1;
        ceiling.mul_f64(rand::random::<f64>())
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_then_stay_under_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        for attempt in 0..20 {
            let ceiling = Duration::from_millis(100 * (1u64 << attempt.min(5))).min(Duration::from_secs(2));
            assert!(b.next_delay() <= ceiling, "attempt {attempt}");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
