//! How long a request admitted now would wait before its prompt starts
//! being read. The node knows its queue (requests waiting for a running
//! slot, prompt tokens waiting for prefill) and its pace (how long a step
//! takes, how long a sequence holds its slot), so it refuses at once a
//! request that would wait past its bound, with a retry-after, instead of
//! holding it until a caller upstream gives up: a caller that times out
//! waiting for the first token reads the wait as the instance's failure.

use std::time::Duration;

use super::Limits;

/// Shortest and longest retry-after hint: below 50 ms a retry lands in the
/// same queue; above 30 s the hint is a guess, not an estimate.
pub const RETRY_AFTER_RANGE: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(30));

/// The engine's pace, as decaying averages.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// One forward step; `None` until the first step is measured, and then
    /// the prefill backlog is not counted (a guess would refuse or admit at
    /// random; the queue-wait bound still ends what waits too long).
    pub step: Option<Duration>,
    /// A sequence's time in the running batch: slots free at
    /// `max_running / service` per second.
    pub service: Duration,
}

impl Pace {
    /// Folds one measured step into the average (weight 1/10, so a single
    /// slow step moves it little and a new pace shows within ~10 steps).
    pub fn observe_step(&mut self, took: Duration) {
        self.step = Some(self.step.map_or(took, |s| s.mul_f64(0.9) + took.mul_f64(0.1)));
    }
}

/// What is ahead of a new request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlog {
    /// Admitted requests waiting for a running slot.
    pub queued: usize,
    /// Running slots free now.
    pub free_slots: usize,
    /// Prompt tokens admitted and not yet prefilled, running or queued.
    pub prefill_tokens: usize,
}

/// The expected wait of a request admitted behind `backlog`: the later of
/// getting a slot (the queue beyond the free slots leaves `max_running` at
/// a time, each wave after `service`) and its turn at prefill (whole steps
/// of `max_step_tokens` for the prompt tokens ahead, as if prompts were
/// read in arrival order). Priority is not counted: a high-priority request
/// may start sooner than this says, a low one later; nor is a running
/// batch's shortest-first reading (`allot`), which starts a short prompt
/// sooner and a long one later.
pub fn expected(backlog: Backlog, pace: Pace, limits: &Limits) -> Duration {
    let slot = if backlog.queued < backlog.free_slots {
        Duration::ZERO
    } else {
        let waves = (backlog.queued + 1 - backlog.free_slots) as f64 / limits.max_running as f64;
        pace.service.mul_f64(waves)
    };
    let prefill =
        pace.step.map_or(Duration::ZERO, |step| step.mul_f64((backlog.prefill_tokens / limits.max_step_tokens) as f64));
    slot.max(prefill)
}

/// When to come back to a queue that would hold a request for `wait`
/// against a bound of `bound`: once the excess has drained, if nothing new
/// arrives.
pub fn retry_after(wait: Duration, bound: Duration) -> Duration {
    wait.saturating_sub(bound).clamp(RETRY_AFTER_RANGE.0, RETRY_AFTER_RANGE.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_running: usize, max_step_tokens: usize) -> Limits {
        Limits {
            max_running,
            max_queued: 1000,
            max_kv_tokens: 1 << 20,
            max_step_tokens,
            context_length: 4096,
            max_queue_wait: Duration::from_secs(3),
            prefix_cache: false,
        }
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn an_idle_node_has_no_wait() {
        let backlog = Backlog { queued: 0, free_slots: 4, prefill_tokens: 0 };
        let pace = Pace { step: Some(SECOND), service: SECOND };
        assert_eq!(expected(backlog, pace, &limits(4, 256)), Duration::ZERO);
    }

    #[test]
    fn prefill_backlog_counts_whole_steps_ahead() {
        // The node: 1 step/s, 256 prompt tokens a step; 10,000
        // five-token prompts are 195 steps: 195 s, not the 10 s a caller waits.
        let l = limits(12_000, 256);
        let pace = Pace { step: Some(SECOND), service: SECOND };
        let wait = |tokens| expected(Backlog { queued: 0, free_slots: 100, prefill_tokens: tokens }, pace, &l);
        assert_eq!(wait(50_000), 195 * SECOND);
        // Less than a step ahead: read in the next step.
        assert_eq!(wait(255), Duration::ZERO);
        assert_eq!(wait(768), 3 * SECOND);
        // Before the first step is measured, prefill is not guessed.
        let cold = Pace { step: None, service: SECOND };
        assert_eq!(expected(Backlog { queued: 0, free_slots: 1, prefill_tokens: 50_000 }, cold, &l), Duration::ZERO);
    }

    #[test]
    fn a_full_batch_frees_max_running_slots_per_service_time() {
        let l = limits(4, 256);
        let pace = Pace { step: Some(Duration::from_millis(20)), service: 2 * SECOND };
        let wait = |queued, free_slots| expected(Backlog { queued, free_slots, prefill_tokens: 0 }, pace, &l);
        // Next in line behind a full batch: a quarter of a hold time.
        assert_eq!(wait(0, 0), Duration::from_millis(500));
        // Seven ahead: two full waves.
        assert_eq!(wait(7, 0), 4 * SECOND);
        // Free slots take the queue first.
        assert_eq!(wait(1, 2), Duration::ZERO);
        assert_eq!(wait(2, 2), Duration::from_millis(500));
    }

    #[test]
    fn the_later_of_slot_and_prefill_wins() {
        let l = limits(4, 100);
        let pace = Pace { step: Some(SECOND), service: 2 * SECOND };
        assert_eq!(expected(Backlog { queued: 3, free_slots: 0, prefill_tokens: 500 }, pace, &l), 5 * SECOND);
        assert_eq!(expected(Backlog { queued: 7, free_slots: 0, prefill_tokens: 100 }, pace, &l), 4 * SECOND);
    }

    #[test]
    fn step_pace_is_a_decaying_average() {
        let mut pace = Pace { step: None, service: SECOND };
        pace.observe_step(SECOND);
        assert_eq!(pace.step, Some(SECOND));
        pace.observe_step(Duration::ZERO);
        assert_eq!(pace.step, Some(Duration::from_millis(900)));
    }

    #[test]
    fn retry_after_is_the_excess_within_range() {
        assert_eq!(retry_after(5 * SECOND, 3 * SECOND), 2 * SECOND);
        assert_eq!(retry_after(3 * SECOND, 3 * SECOND), Duration::from_millis(50));
        assert_eq!(retry_after(600 * SECOND, 3 * SECOND), 30 * SECOND);
    }
}
