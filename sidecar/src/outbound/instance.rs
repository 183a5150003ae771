//! One instance as the outbound side sees it: its load and its health.
//!
//! Outlier ejection is a small state machine per instance (after
//! linkerd's failure accrual): healthy, then ejected for a time that doubles
//! with each repeat, then on probation (one request) once a health probe
//! passes; the probe request's outcome decides between healthy and a longer
//! ejection.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use registry::InstanceRecord;
use tonic::transport::Channel;

use super::prefix::new_holder_id;
use crate::config::Outlier;
use crate::upstream::{Dialer, Peer};
use crate::wire::generation_client::GenerationClient;

/// Time to first token assumed for an instance nobody has measured yet, when
/// its peers give no better guess. A zero would read as "no load", so the
/// balancer would flood a brand-new instance.
const UNMEASURED_TTFT: Duration = Duration::from_millis(100);

/// How fast an idle instance's TTFT estimate fades: after this long
/// without a stream or a new measurement, halved for every this long more.
/// Without it an instance whose last first tokens were slow (a cold
/// prefill, a hiccup) scores as loaded forever, so it is never picked, so
/// never measured again: starved while idle (4 of 48 requests against 25
/// in `scenario prefix`). tower's `PeakEwma` decays its estimate the same
/// way.
const TTFT_HALF_LIFE: Duration = Duration::from_secs(5);

/// Connections to one instance its streams are spread over. With one, a
/// connection the peer closes (a GOAWAY, a reset, a lost keep-alive) ends
/// every stream to that instance at once; with four, a quarter, which
/// migration absorbs within the retry budget. Each connection's frames are
/// handled by one task, so four also let four cores share the framing of
/// thousands of streams. More would add sockets, not resilience.
const CONNECTIONS_PER_INSTANCE: usize = 4;

#[derive(Debug, Clone, PartialEq)]
pub enum Health {
    Healthy,
    Ejected {
        until: Instant,
        reason: String,
    },
    /// Back from ejection for one trial request; `trial_out` while it runs.
    Probation {
        trial_out: bool,
    },
}

#[derive(Debug)]
struct State {
    health: Health,
    consecutive_failures: u32,
    /// Ejections so far (the next lasts `base * 2^ejections`).
    ejections: u32,
    last_ejected: Option<Instant>,
    ewma_ttft: Duration,
    /// When the last stream here ended or the last TTFT was measured.
    last_active: Instant,
    reported_queued: u32,
    window_start: Instant,
    window_ok: u32,
    window_failed: u32,
}

pub struct Instance {
    pub record: InstanceRecord,
    /// For health probes (the pool's first connection).
    pub channel: Channel,
    /// Connections that carry its streams, taken in turn.
    pool: Vec<Channel>,
    next: AtomicUsize,
    in_flight: AtomicU32,
    /// Its id in the prefix index; a new one at each ejection, since its
    /// node may have lost its cache (see `prefix::new_holder_id`).
    prefix_holder: AtomicU32,
    state: Mutex<State>,
}

/// What a finished attempt tells about the instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// A server-side failure: counts toward ejection.
    Failure,
    /// Neither (the caller's own error, a refusal for load, a cancellation).
    Neutral,
}

impl Instance {
    /// A lazily connected instance for `record`, seeded with `ttft_guess`.
    pub fn new(
        record: InstanceRecord,
        ttft_guess: Option<Duration>,
        dial: &Dialer,
    ) -> Result<Self, tonic::transport::Error> {
        let endpoint = dial.endpoint(&record.address, Peer::Instance)?;
        // Each `connect_lazy` is its own connection (dialled on first use).
        let pool: Vec<Channel> = (0..CONNECTIONS_PER_INSTANCE).map(|_| endpoint.connect_lazy()).collect();
        let now = Instant::now();
        Ok(Self {
            channel: pool[0].clone(),
            pool,
            next: AtomicUsize::new(0),
            record,
            in_flight: AtomicU32::new(0),
            prefix_holder: AtomicU32::new(new_holder_id()),
            state: Mutex::new(State {
                health: Health::Healthy,
                consecutive_failures: 0,
                ejections: 0,
                last_ejected: None,
                ewma_ttft: ttft_guess.unwrap_or(UNMEASURED_TTFT),
                last_active: now,
                reported_queued: 0,
                window_start: now,
                window_ok: 0,
                window_failed: 0,
            }),
        })
    }

    /// A client on the next connection of the pool: streams to one instance
    /// spread evenly over `CONNECTIONS_PER_INSTANCE` connections.
    pub fn client(&self) -> GenerationClient<Channel> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.pool.len();
        GenerationClient::new(self.pool[i].clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a stream as open until the guard drops.
    pub fn start(self: &std::sync::Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Lower is better: expected wait for a first token here, from streams
    /// in flight, the queue the instance reported and its recent TTFT.
    pub fn load(&self) -> f64 {
        let s = self.lock();
        let pending = f64::from(self.in_flight() + s.reported_queued + 1);
        pending * self.faded(&s).as_secs_f64() / f64::from(self.record.weight.max(1))
    }

    /// The TTFT to expect here: the moving average, which stands while
    /// streams are open here and for one [`TTFT_HALF_LIFE`] after, then
    /// fades by half per half-life of idleness (no stream, no measurement).
    pub fn ttft_estimate(&self) -> Duration {
        self.faded(&self.lock())
    }

    /// [`Instance::ttft_estimate`] from state already locked.
    fn faded(&self, s: &State) -> Duration {
        let idle = s.last_active.elapsed().saturating_sub(TTFT_HALF_LIFE);
        if self.in_flight() > 0 || idle.is_zero() {
            return s.ewma_ttft;
        }
        s.ewma_ttft.mul_f64(0.5f64.powf(idle.as_secs_f64() / TTFT_HALF_LIFE.as_secs_f64()))
    }

    /// Streams in flight here and the queue the instance reported.
    pub fn pending(&self) -> u32 {
        self.in_flight() + self.lock().reported_queued
    }

    /// Who it is in the prefix index.
    pub fn prefix_holder(&self) -> u32 {
        self.prefix_holder.load(Ordering::Relaxed)
    }

    pub fn ewma_ttft(&self) -> Duration {
        self.lock().ewma_ttft
    }

    pub fn reported_queued(&self) -> u32 {
        self.lock().reported_queued
    }

    pub fn health(&self) -> Health {
        self.lock().health.clone()
    }

    /// Whether a new request may go here now; a probation trial is taken.
    pub fn try_admit(&self, now: Instant) -> bool {
        let mut s = self.lock();
        match s.health {
            Health::Healthy => true,
            Health::Ejected { until, .. } if now >= until => {
                s.health = Health::Probation { trial_out: true };
                true
            }
            Health::Ejected { .. } | Health::Probation { trial_out: true } => false,
            Health::Probation { trial_out: false } => {
                s.health = Health::Probation { trial_out: true };
                true
            }
        }
    }

    /// Whether it could take a request, without taking a probation trial.
    pub fn is_available(&self, now: Instant) -> bool {
        match self.lock().health {
            Health::Healthy | Health::Probation { trial_out: false } => true,
            Health::Ejected { until, .. } => now >= until,
            Health::Probation { trial_out: true } => false,
        }
    }

    pub fn is_ejected(&self) -> bool {
        matches!(self.lock().health, Health::Ejected { .. })
    }

    /// Whether it is in service and not failing: neither ejected nor on
    /// probation, and fewer than `consecutive_failures` failed attempts or
    /// probes in a row. The last part matters because the ejection budget
    /// never ejects every instance: the only instance of a service that
    /// stopped answering stays `Healthy` in name, failing every probe.
    pub fn is_healthy(&self, cfg: &Outlier) -> bool {
        let s = self.lock();
        s.health == Health::Healthy && s.consecutive_failures < cfg.consecutive_failures
    }

    pub fn observe_ttft(&self, ttft: Duration) {
        let mut s = self.lock();
        s.ewma_ttft = s.ewma_ttft.mul_f64(0.7) + ttft.mul_f64(0.3);
        s.last_active = Instant::now();
    }

    pub fn observe_queue(&self, queued: u32) {
        self.lock().reported_queued = queued;
    }

    /// Records an attempt's outcome. Returns true when a failure asks for an
    /// ejection (the caller checks the service's ejection budget first and
    /// then calls `eject`).
    pub fn record(&self, outcome: Outcome, cfg: &Outlier, now: Instant) -> bool {
        let mut s = self.lock();
        roll_window(&mut s, cfg, now);
        match outcome {
            Outcome::Neutral => {
                if let Health::Probation { .. } = s.health {
                    s.health = Health::Probation { trial_out: false };
                }
                false
            }
            Outcome::Success => {
                s.window_ok += 1;
                s.consecutive_failures = 0;
                if let Health::Probation { .. } = s.health {
                    s.health = Health::Healthy;
                }
                // A long healthy spell forgives earlier ejections.
                if s.last_ejected.is_some_and(|t| now.duration_since(t) > cfg.max_ejection * 2) {
                    s.ejections = 0;
                }
                false
            }
            Outcome::Failure => {
                s.window_failed += 1;
                s.consecutive_failures += 1;
                match s.health {
                    Health::Probation { .. } => true,
                    Health::Healthy => s.consecutive_failures >= cfg.consecutive_failures,
                    Health::Ejected { .. } => false,
                }
            }
        }
    }

    /// Ejects for `base * 2^repeats` (capped).
    pub fn eject(&self, reason: String, cfg: &Outlier, now: Instant) {
        let mut s = self.lock();
        let time = cfg.base_ejection.saturating_mul(1 << s.ejections.min(16)).min(cfg.max_ejection);
        s.ejections += 1;
        s.last_ejected = Some(now);
        s.consecutive_failures = 0;
        self.prefix_holder.store(new_holder_id(), Ordering::Relaxed);
        tracing::warn!(instance = %self.record.instance_id, service = %self.record.service, ?time, %reason, "ejected");
        s.health = Health::Ejected { until: now + time, reason };
    }

    /// A health probe's answer: a pass puts an ejected instance on
    /// probation; a failure extends its ejection.
    pub fn probe_result(&self, serving: bool, cfg: &Outlier, now: Instant) {
        let mut s = self.lock();
        if let Health::Ejected { until, reason } = &s.health {
            let (until, reason) = (*until, reason.clone());
            s.health = match serving {
                true => Health::Probation { trial_out: false },
                false => {
                    let time = cfg.base_ejection.saturating_mul(1 << s.ejections.min(16)).min(cfg.max_ejection);
                    Health::Ejected { until: until.max(now + time), reason }
                }
            };
        }
    }

    /// Success rate over the current window, if it saw enough requests.
    pub fn success_rate(&self, cfg: &Outlier, now: Instant) -> Option<f64> {
        let mut s = self.lock();
        roll_window(&mut s, cfg, now);
        let total = s.window_ok + s.window_failed;
        (total >= cfg.success_rate_min_requests).then(|| f64::from(s.window_ok) / f64::from(total))
    }
}

fn roll_window(s: &mut State, cfg: &Outlier, now: Instant) {
    if now.duration_since(s.window_start) >= cfg.success_rate_window {
        s.window_start = now;
        s.window_ok = 0;
        s.window_failed = 0;
    }
}

/// An open stream to an instance; counted in its load until dropped.
pub struct InFlight(std::sync::Arc<Instance>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.0.lock().last_active = Instant::now(); // idle from now
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance() -> Instance {
        Instance::new(InstanceRecord::new("chat", "a", "127.0.0.1:1"), None, &Dialer::default()).unwrap()
    }

    #[tokio::test]
    async fn failures_in_a_row_ask_for_ejection_and_ejections_grow() {
        let cfg = Outlier { consecutive_failures: 3, ..Default::default() };
        let ep = instance();
        let now = Instant::now();
        assert!(!ep.record(Outcome::Failure, &cfg, now));
        assert!(!ep.record(Outcome::Failure, &cfg, now));
        assert!(!ep.record(Outcome::Neutral, &cfg, now), "neutral outcomes do not reset or count");
        assert!(ep.record(Outcome::Failure, &cfg, now));
        ep.eject("3 failures".into(), &cfg, now);
        assert!(!ep.try_admit(now));
        let Health::Ejected { until, .. } = ep.health() else { panic!() };
        assert_eq!(until - now, cfg.base_ejection);

        // A passing probe allows exactly one trial; its failure ejects for twice as long.
        ep.probe_result(true, &cfg, now);
        assert!(ep.try_admit(now));
        assert!(!ep.try_admit(now), "one trial at a time");
        assert!(ep.record(Outcome::Failure, &cfg, now));
        ep.eject("trial failed".into(), &cfg, now);
        let Health::Ejected { until, .. } = ep.health() else { panic!() };
        assert_eq!(until - now, cfg.base_ejection * 2);

        // A successful trial makes it healthy again.
        ep.probe_result(true, &cfg, now);
        assert!(ep.try_admit(now));
        ep.record(Outcome::Success, &cfg, now);
        assert_eq!(ep.health(), Health::Healthy);
    }

    #[tokio::test]
    async fn failing_probe_extends_the_ejection() {
        let cfg = Outlier::default();
        let ep = instance();
        let now = Instant::now();
        ep.eject("x".into(), &cfg, now);
        let later = now + cfg.base_ejection - Duration::from_millis(1);
        ep.probe_result(false, &cfg, later);
        let Health::Ejected { until, .. } = ep.health() else { panic!() };
        assert!(until > now + cfg.base_ejection);
    }

    #[tokio::test]
    async fn load_counts_in_flight_streams_and_reported_queue() {
        let ep = std::sync::Arc::new(instance());
        let idle = ep.load();
        assert!(idle > 0.0, "an unmeasured instance is not free");
        let _a = ep.start();
        ep.observe_queue(2);
        assert!((ep.load() - 4.0 * idle).abs() < 1e-9);
    }

    #[tokio::test]
    async fn an_idle_instances_ttft_estimate_fades_after_a_half_life_and_a_busy_ones_does_not() {
        let ep = std::sync::Arc::new(instance());
        ep.observe_ttft(Duration::from_secs(10)); // 0.7 x 100 ms + 0.3 x 10 s
        let ewma = ep.ewma_ttft();
        assert_eq!(ep.ttft_estimate(), ewma, "just measured: it stands");
        ep.lock().last_active = Instant::now() - 3 * TTFT_HALF_LIFE;
        let faded = ep.ttft_estimate().as_secs_f64() / ewma.as_secs_f64();
        assert!((faded - 0.25).abs() < 1e-3, "idle three half-lives: faded for two: {faded}");
        let busy = ep.start();
        assert_eq!(ep.ttft_estimate(), ewma, "a stream open here: the estimate stands");
        drop(busy);
        assert_eq!(ep.ttft_estimate(), ewma, "idle from the stream's end");
    }
}
