//! The retry budget: retries may add at most `ratio` of recent requests
//! plus a small floor per second, so failures never turn into a retry storm.

use std::sync::Mutex;
use std::time::Instant;

/// Seconds of history the budget looks at.
const WINDOW_SECS: usize = 10;

pub struct RetryBudget {
    ratio: f64,
    floor_per_sec: f64,
    state: Mutex<Window>,
}

struct Window {
    start: Instant,
    /// Per second of the window: (requests, retries).
    buckets: [(u32, u32); WINDOW_SECS],
    current: usize,
}

impl RetryBudget {
    pub fn new(ratio: f64, floor_per_sec: f64) -> Self {
        let w = Window { start: Instant::now(), buckets: [(0, 0); WINDOW_SECS], current: 0 };
        Self { ratio, floor_per_sec, state: Mutex::new(w) }
    }

    fn with<R>(&self, now: Instant, f: impl FnOnce(&mut Window) -> R) -> R {
        let mut w = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = now.saturating_duration_since(w.start).as_secs() as usize;
        let advance = elapsed.saturating_sub(w.current).min(WINDOW_SECS);
        for i in 1..=advance {
            let idx = (w.current + i) % WINDOW_SECS;
            w.buckets[idx] = (0, 0);
        }
        w.current = elapsed.max(w.current);
        f(&mut w)
    }

    /// Counts an original request.
    pub fn deposit(&self, now: Instant) {
        self.with(now, |w| w.buckets[w.current % WINDOW_SECS].0 += 1);
    }

    /// Takes one retry if the budget allows.
    pub fn try_withdraw(&self, now: Instant) -> bool {
        let (ratio, floor) = (self.ratio, self.floor_per_sec);
        self.with(now, |w| {
            let (requests, retries) = w.buckets.iter().fold((0u32, 0u32), |(a, b), (r, t)| (a + r, b + t));
            let allowed = f64::from(requests) * ratio + floor * WINDOW_SECS as f64;
            if f64::from(retries) + 1.0 <= allowed {
                w.buckets[w.current % WINDOW_SECS].1 += 1;
                true
            } else {
                false
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn retries_are_capped_by_ratio_plus_floor_and_recover_with_time() {
        let b = RetryBudget::new(0.2, 1.0);
        let t0 = Instant::now();
        for _ in 0..100 {
            b.deposit(t0);
        }
        // 100 requests * 0.2 + 1/s * 10 s = 30 retries.
        let granted = (0..100).filter(|_| b.try_withdraw(t0)).count();
        assert_eq!(granted, 30);
        // Once the window has passed, the budget is back to the floor.
        let later = t0 + Duration::from_secs(WINDOW_SECS as u64 + 1);
        let granted = (0..100).filter(|_| b.try_withdraw(later)).count();
        assert_eq!(granted, 10);
    }
}
