//! Logs that stay readable under load: a condition that repeats (a failed
//! etcd attempt, an ejection refused by the budget) is logged when it
//! starts and when it ends, with how often it happened in between, and at
//! most one summary per interval while it lasts. The repeats themselves go
//! to counters. One WARN per failed request read 35,872 lines in a minute.

use std::time::{Duration, Instant};

/// How often a condition that lasts is summarised in the log.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);

/// One stretch of a repeating condition. Pure state: callers pass `now`
/// and log what it returns, so tests need no log capture and no clock.
#[derive(Debug, Default, Clone)]
pub struct Episode {
    /// When the current stretch began; `None` while the condition is off.
    since: Option<Instant>,
    /// Occurrences since it began.
    count: u64,
    /// When the last summary (or the start) was logged.
    summarised_at: Option<Instant>,
    /// Occurrences since then.
    unsummarised: u64,
}

/// What an ended episode amounted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    pub lasted: Duration,
    pub count: u64,
}

impl Episode {
    /// Records one occurrence. True when it starts the episode: the one
    /// time to log it.
    pub fn occur(&mut self, now: Instant) -> bool {
        self.count += 1;
        if self.since.is_some() {
            self.unsummarised += 1;
            return false;
        }
        self.since = Some(now);
        self.summarised_at = Some(now);
        true
    }

    pub fn is_on(&self) -> bool {
        self.since.is_some()
    }

    /// Occurrences since the episode began (0 when off).
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The occurrences not yet logged, once `every` has passed since the
    /// start or the last summary; `None` when no summary is due.
    pub fn summary_due(&mut self, now: Instant, every: Duration) -> Option<u64> {
        let last = self.summarised_at?;
        if self.unsummarised == 0 || now.saturating_duration_since(last) < every {
            return None;
        }
        self.summarised_at = Some(now);
        Some(std::mem::take(&mut self.unsummarised))
    }

    /// Ends the episode. `Some` when one was on: the one time to log that
    /// the condition is over.
    pub fn end(&mut self, now: Instant) -> Option<Ended> {
        let since = self.since.take()?;
        let ended = Ended { lasted: now.saturating_duration_since(since), count: self.count };
        *self = Self::default();
        Some(ended)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thousand_repeats_make_one_start_and_one_end() {
        let t0 = Instant::now();
        let mut e = Episode::default();
        let starts = (0..1000).filter(|i| e.occur(t0 + Duration::from_millis(*i))).count();
        assert_eq!(starts, 1);
        assert_eq!(e.count(), 1000);
        let ended = e.end(t0 + Duration::from_secs(3)).unwrap();
        assert_eq!(ended, Ended { lasted: Duration::from_secs(3), count: 1000 });
        assert!(e.end(t0 + Duration::from_secs(4)).is_none(), "an episode ends once");
        assert!(!e.is_on());
        assert!(e.occur(t0 + Duration::from_secs(5)), "the next occurrence starts a new one");
    }

    #[test]
    fn summaries_come_at_most_once_per_interval() {
        let t0 = Instant::now();
        let every = Duration::from_secs(10);
        let mut e = Episode::default();
        let mut summaries = Vec::new();
        // One occurrence every 100 ms for 35 s.
        for ms in (0..35_000).step_by(100) {
            let now = t0 + Duration::from_millis(ms);
            e.occur(now);
            summaries.extend(e.summary_due(now, every));
        }
        // At 10 s, 20 s and 30 s, each counting what came after the last log.
        assert_eq!(summaries, vec![100, 100, 100]);
        assert_eq!(e.count(), 350);
    }

    #[test]
    fn no_summary_without_new_occurrences() {
        let t0 = Instant::now();
        let mut e = Episode::default();
        assert_eq!(e.summary_due(t0, Duration::ZERO), None, "off: nothing to summarise");
        e.occur(t0);
        assert_eq!(e.summary_due(t0 + Duration::from_secs(60), Duration::from_secs(10)), None);
    }
}
