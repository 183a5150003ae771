//! A service's bulkhead: at most `max_concurrency` streams at the node, at
//! most `max_queue` waiting (highest priority first, the lowest shed first
//! when the queue is full), none waiting longer than `max_queue_wait` or
//! past a deadline it cannot meet.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::config::ServiceLimits;

#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// The queue is full of requests at least as important.
    QueueFull { queued: usize, retry_after: Duration },
    /// Waited `max_queue_wait` without a slot.
    Waited { waited: Duration, retry_after: Duration },
    /// The queue ahead would outlast the caller's deadline.
    Deadline { expected_wait: Duration },
    /// Pushed out of the queue by a higher-priority request.
    Shed { retry_after: Duration },
    /// The queue ahead would hold the call longer than the caller's own
    /// bound on waiting (a call that may go to an overflow service instead).
    OverBound { expected_wait: Duration, bound: Duration, retry_after: Duration },
}

struct Waiter {
    priority: usize,
    seq: u64,
    grant: oneshot::Sender<()>,
}

struct State {
    running: usize,
    /// Sorted: highest priority first, then arrival order.
    queue: Vec<Waiter>,
    next_seq: u64,
    /// Decaying average of how long a stream holds its slot.
    ewma_hold: Duration,
}

pub struct Bulkhead {
    limits: ServiceLimits,
    state: Mutex<State>,
}

/// A slot at the node; freed (and handed to the next waiter) on drop.
pub struct Permit {
    bulkhead: Arc<Bulkhead>,
    since: Instant,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.bulkhead.release(self.since.elapsed());
    }
}

impl Bulkhead {
    pub fn new(limits: ServiceLimits) -> Arc<Self> {
        let state = State { running: 0, queue: Vec::new(), next_seq: 0, ewma_hold: Duration::from_secs(1) };
        Arc::new(Self { limits, state: Mutex::new(state) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn queued(&self) -> usize {
        self.lock().queue.len()
    }

    /// The most requests that may wait (`max_queue`).
    pub fn max_queue(&self) -> usize {
        self.limits.max_queue
    }

    /// Slots held now (streams at the node).
    pub fn in_use(&self) -> usize {
        self.lock().running
    }

    /// When a slot is likely free for someone behind `ahead` waiters.
    fn expected_wait(&self, s: &State, ahead: usize) -> Duration {
        s.ewma_hold.mul_f64((ahead + 1) as f64 / self.limits.max_concurrency as f64)
    }

    fn retry_after(&self, s: &State) -> Duration {
        self.expected_wait(s, s.queue.len()).clamp(Duration::from_millis(50), Duration::from_secs(30))
    }

    /// A slot, at once or after waiting in the queue: no longer than
    /// `max_queue_wait`, the `deadline`, or the caller's own `bound`.
    pub async fn acquire(
        self: &Arc<Self>,
        priority: usize,
        deadline: Option<Instant>,
        bound: Option<Duration>,
    ) -> Result<Permit, Refusal> {
        let now = Instant::now();
        let (seq, granted) = {
            let mut s = self.lock();
            if s.running < self.limits.max_concurrency && s.queue.is_empty() {
                s.running += 1;
                return Ok(Permit { bulkhead: self.clone(), since: now });
            }
            let ahead = s.queue.iter().filter(|w| w.priority >= priority).count();
            let expected_wait = self.expected_wait(&s, ahead);
            if deadline.is_some_and(|d| now + expected_wait > d) {
                return Err(Refusal::Deadline { expected_wait });
            }
            if let Some(bound) = bound.filter(|b| expected_wait > *b) {
                return Err(Refusal::OverBound { expected_wait, bound, retry_after: self.retry_after(&s) });
            }
            if s.queue.len() >= self.limits.max_queue {
                // Shed the newest of the lowest priority, if it is below ours.
                match s.queue.last() {
                    Some(w) if w.priority < priority => drop(s.queue.pop()),
                    _ => {
                        let retry_after = self.retry_after(&s);
                        return Err(Refusal::QueueFull { queued: s.queue.len(), retry_after });
                    }
                }
            }
            let (grant, granted) = oneshot::channel();
            let seq = s.next_seq;
            s.next_seq += 1;
            let at = s.queue.iter().position(|w| w.priority < priority).unwrap_or(s.queue.len());
            s.queue.insert(at, Waiter { priority, seq, grant });
            (seq, granted)
        };
        let mut wait = self.limits.max_queue_wait.min(bound.unwrap_or(Duration::MAX));
        if let Some(d) = deadline {
            wait = wait.min(d.saturating_duration_since(now));
        }
        let mut granted = granted;
        let outcome = tokio::time::timeout(wait, &mut granted).await;
        let permit = || Permit { bulkhead: self.clone(), since: Instant::now() };
        match outcome {
            Ok(Ok(())) => Ok(permit()),
            Ok(Err(_)) => Err(Refusal::Shed { retry_after: self.retry_after(&self.lock()) }),
            Err(_) => {
                let mut s = self.lock();
                match s.queue.iter().position(|w| w.seq == seq) {
                    Some(i) => {
                        s.queue.remove(i);
                        Err(Refusal::Waited { waited: now.elapsed(), retry_after: self.retry_after(&s) })
                    }
                    // Granted just as the wait ran out: take it.
                    None if granted.try_recv().is_ok() => Ok(permit()),
                    None => Err(Refusal::Shed { retry_after: self.retry_after(&s) }),
                }
            }
        }
    }

    fn release(&self, held: Duration) {
        let mut s = self.lock();
        s.ewma_hold = s.ewma_hold.mul_f64(0.9) + held.mul_f64(0.1);
        s.running -= 1;
        // Hand the slot to the first waiter still waiting.
        while !s.queue.is_empty() {
            let w = s.queue.remove(0);
            s.running += 1;
            if w.grant.send(()).is_ok() {
                return;
            }
            s.running -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulkhead(max_concurrency: usize, max_queue: usize) -> Arc<Bulkhead> {
        Bulkhead::new(ServiceLimits {
            name: "chat".into(),
            max_concurrency,
            max_queue,
            max_queue_wait: Duration::from_secs(5),
        })
    }

    #[tokio::test]
    async fn full_queue_refuses_at_once_and_a_released_slot_goes_to_the_highest_priority() {
        let b = bulkhead(1, 2);
        let first = b.acquire(1, None, None).await.unwrap();
        let low = tokio::spawn({
            let b = b.clone();
            async move { b.acquire(0, None, None).await.map(drop) }
        });
        let high = tokio::spawn({
            let b = b.clone();
            async move { b.acquire(2, None, None).await.map(|p| (Instant::now(), p)) }
        });
        while b.queued() < 2 {
            tokio::task::yield_now().await;
        }
        assert!(matches!(b.acquire(0, None, None).await, Err(Refusal::QueueFull { queued: 2, .. })));
        drop(first);
        let (_, high_permit) = high.await.unwrap().unwrap();
        assert!(!low.is_finished(), "low waits while high holds the slot");
        drop(high_permit);
        low.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn higher_priority_sheds_the_lowest_waiter_when_full() {
        let b = bulkhead(1, 1);
        let _running = b.acquire(1, None, None).await.unwrap();
        let low = tokio::spawn({
            let b = b.clone();
            async move { b.acquire(0, None, None).await.map(drop) }
        });
        while b.queued() < 1 {
            tokio::task::yield_now().await;
        }
        let high = tokio::spawn({
            let b = b.clone();
            async move { b.acquire(2, None, None).await.map(drop) }
        });
        assert!(matches!(low.await.unwrap(), Err(Refusal::Shed { .. })));
        assert!(!high.is_finished());
    }

    #[tokio::test(start_paused = true)]
    async fn waits_end_at_the_deadline_or_are_refused_when_it_cannot_be_met() {
        let b = bulkhead(1, 4);
        let _running = b.acquire(1, None, None).await.unwrap();
        // The average hold is 1 s: a 100 ms deadline cannot be met.
        let soon = Instant::now() + Duration::from_millis(100);
        assert!(matches!(b.acquire(1, Some(soon), None).await, Err(Refusal::Deadline { .. })));
        // Without a deadline the wait ends at max_queue_wait.
        assert!(matches!(b.acquire(1, None, None).await, Err(Refusal::Waited { .. })));
        assert_eq!(b.queued(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_callers_bound_refuses_at_once_what_would_queue_longer_and_caps_the_wait() {
        let b = bulkhead(1, 4);
        let _running = b.acquire(1, None, None).await.unwrap();
        // The average hold is 1 s: a 50 ms bound cannot be met.
        let refused = b.acquire(1, None, Some(Duration::from_millis(50))).await;
        assert!(matches!(refused, Err(Refusal::OverBound { .. })), "{:?}", refused.err());
        assert_eq!(b.queued(), 0);
        // A bound the expected wait fits ends the wait there, not at max_queue_wait.
        let started = tokio::time::Instant::now();
        let waited = b.acquire(1, None, Some(Duration::from_secs(2))).await;
        assert!(matches!(waited, Err(Refusal::Waited { .. })), "{:?}", waited.err());
        assert_eq!(started.elapsed().as_secs(), 2);
    }
}
