//! The engine: connects to the targets, sends requests on the arrival
//! schedule, and collects one record per sent request.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mesh_proto::v1::generation_client::GenerationClient;
use mesh_proto::v1::{GenerateRequest, SamplingParams};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Exp};
use tokio::task::JoinSet;
use tonic::transport::{Channel, Endpoint};

use super::client;
use super::mix::{Mix, Prompts};
use super::record::RequestRecord;
use super::session::{Planned, Session};
use super::target::Target;

/// Longest run or deadline accepted: a typo must not start a day-long run.
pub const MAX_DURATION: Duration = Duration::from_secs(3600);
/// Most requests one run may send, whatever the flags say.
pub const MAX_REQUESTS: u64 = 10_000_000;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("invalid load spec: {0}")]
    InvalidSpec(String),
    #[error("connecting to {addr}: {source}")]
    Connect { addr: String, source: tonic::transport::Error },
    #[error("a request task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// When requests are sent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arrival {
    /// `concurrency` streams, each sending its next request when the last ends.
    Closed { concurrency: usize },
    /// Poisson arrivals at `rate` requests per second, whatever the server does.
    Open { rate: f64 },
}

/// A complete description of one run.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Requests go round-robin over these.
    pub targets: Vec<Target>,
    pub arrival: Arrival,
    /// No request is sent after this much time from the start.
    pub duration: Duration,
    /// No more than this many requests are sent.
    pub max_requests: u64,
    /// Per request: sent as `grpc-timeout` and enforced by the client.
    pub deadline: Duration,
    pub mix: Mix,
    /// The `model` field; empty means the server's only model.
    pub model: String,
    pub tenant: String,
    /// HTTP/2 connections per target. One connection caps concurrent streams
    /// at the server's `max_concurrent_streams`; more spread the load.
    pub connections: usize,
    /// Seeds the arrival times and the mix: same seed, same schedule.
    pub seed: u64,
}

impl LoadSpec {
    pub fn validate(&self) -> Result<(), LoadError> {
        let bad = |m: &str| Err(LoadError::InvalidSpec(m.to_string()));
        if self.targets.is_empty() {
            return bad("at least one target is required");
        }
        match self.arrival {
            Arrival::Closed { concurrency } if concurrency == 0 || concurrency > 100_000 => {
                return bad("concurrency must be in 1..=100000");
            }
            Arrival::Open { rate } if !(rate.is_finite() && rate > 0.0 && rate <= 100_000.0) => {
                return bad("rate must be in (0, 100000] requests/s");
            }
            _ => {}
        }
        if self.duration.is_zero() || self.duration > MAX_DURATION {
            return bad("duration must be in (0, 1h]");
        }
        if self.deadline.is_zero() || self.deadline > MAX_DURATION {
            return bad("deadline must be in (0, 1h]");
        }
        if self.max_requests == 0 || self.max_requests > MAX_REQUESTS {
            return bad("requests must be in 1..=10000000");
        }
        if self.connections == 0 || self.connections > 64 {
            return bad("connections must be in 1..=64");
        }
        let conversations = matches!(self.mix.prompts(), Prompts::Conversations(_));
        if conversations && matches!(self.arrival, Arrival::Open { .. }) {
            return bad("conversations need a closed loop (--concurrency): each turn waits for the last one's reply");
        }
        Ok(())
    }
}

/// Counters the engine updates as it goes, for a live progress display.
#[derive(Debug, Default)]
pub struct LiveCounters {
    pub sent: AtomicU64,
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    pub tokens: AtomicU64,
}

/// The records of one run.
#[derive(Debug)]
pub struct RunResult {
    /// The instant every `sent_at` is measured from.
    pub started: Instant,
    /// From the start until the last request ended.
    pub elapsed: Duration,
    /// One per sent request, in send order.
    pub records: Vec<RequestRecord>,
}

/// A connected load generator.
pub struct Load {
    spec: LoadSpec,
    /// `clients[target][connection]`.
    clients: Vec<Vec<GenerationClient<Channel>>>,
}

impl Load {
    /// Validates `spec` and opens its connections, so a wrong address fails
    /// here, before the clock starts. Channels reconnect by themselves later:
    /// a target that dies mid-run shows up as failed requests, not as an error.
    pub async fn connect(spec: LoadSpec) -> Result<Load, LoadError> {
        spec.validate()?;
        let mut clients = Vec::with_capacity(spec.targets.len());
        for target in &spec.targets {
            let addr = target.addr().to_string();
            let endpoint = Endpoint::from_shared(format!("http://{addr}"))
                .map_err(|source| LoadError::Connect { addr: addr.clone(), source })?
                .connect_timeout(Duration::from_secs(3))
                .tcp_nodelay(true);
            let mut per_target = Vec::with_capacity(spec.connections);
            for _ in 0..spec.connections {
                let channel =
                    endpoint.connect().await.map_err(|source| LoadError::Connect { addr: addr.clone(), source })?;
                per_target.push(GenerationClient::new(channel));
            }
            clients.push(per_target);
        }
        Ok(Load { spec, clients })
    }

    pub fn spec(&self) -> &LoadSpec {
        &self.spec
    }

    /// Runs the load to its end and returns one record per sent request.
    pub async fn run(&self, live: &Arc<LiveCounters>) -> Result<RunResult, LoadError> {
        let started = Instant::now();
        let mut records = match self.spec.arrival {
            Arrival::Open { rate } => self.open_loop(rate, started, live).await?,
            Arrival::Closed { concurrency } => self.closed_loop(concurrency, started, live).await?,
        };
        let elapsed = started.elapsed();
        records.sort_by_key(|r| r.id);
        Ok(RunResult { started, elapsed, records })
    }

    async fn open_loop(
        &self,
        rate: f64,
        started: Instant,
        live: &Arc<LiveCounters>,
    ) -> Result<Vec<RequestRecord>, LoadError> {
        let schedule = arrival_offsets(self.spec.seed, rate, self.spec.duration, self.spec.max_requests);
        let mut session = Session::new(&self.spec.mix, self.spec.seed ^ MIX_SEED);
        let mut tasks = JoinSet::new();
        for (id, offset) in schedule.into_iter().enumerate() {
            // Sleeping until an instant that has passed returns at once, so a
            // sender that fell behind catches up instead of thinning arrivals.
            tokio::time::sleep_until((started + offset).into()).await;
            let job = self.job_factory(started, live).make(id as u64, session.plan());
            tasks.spawn(async move { job.await.0 });
        }
        let mut records = Vec::new();
        while let Some(record) = tasks.join_next().await {
            records.push(record?);
        }
        Ok(records)
    }

    async fn closed_loop(
        &self,
        concurrency: usize,
        started: Instant,
        live: &Arc<LiveCounters>,
    ) -> Result<Vec<RequestRecord>, LoadError> {
        let tickets = Arc::new(AtomicU64::new(0));
        let mut workers = JoinSet::new();
        for worker in 0..concurrency {
            let mut session = Session::new(&self.spec.mix, self.spec.seed ^ MIX_SEED ^ worker as u64);
            let jobs = self.job_factory(started, live);
            let tickets = tickets.clone();
            let (duration, max) = (self.spec.duration, self.spec.max_requests);
            workers.spawn(async move {
                let mut mine = Vec::new();
                while started.elapsed() < duration {
                    let id = tickets.fetch_add(1, Ordering::Relaxed);
                    if id >= max {
                        break;
                    }
                    let (record, reply) = jobs.make(id, session.plan()).await;
                    session.answered(reply);
                    mine.push(record);
                }
                mine
            });
        }
        let mut records = Vec::new();
        while let Some(mine) = workers.join_next().await {
            records.extend(mine?);
        }
        Ok(records)
    }

    fn job_factory(&self, started: Instant, live: &Arc<LiveCounters>) -> JobFactory {
        JobFactory {
            clients: self.clients.clone(),
            model: self.spec.model.clone(),
            tenant: self.spec.tenant.clone(),
            deadline: self.spec.deadline,
            started,
            live: live.clone(),
        }
    }
}

/// Separates the mix's random stream from the arrivals' so changing the mix
/// does not move the arrival times.
const MIX_SEED: u64 = 0x6d69_7800_5eed_0001;

/// What a request task needs, owned, so tasks can be spawned.
struct JobFactory {
    clients: Vec<Vec<GenerationClient<Channel>>>,
    model: String,
    tenant: String,
    deadline: Duration,
    started: Instant,
    live: Arc<LiveCounters>,
}

impl JobFactory {
    /// Request `id` goes to target `id % targets`, spreading over that
    /// target's connections in turn. The future's output is the record and,
    /// for a request that ended OK, the text it streamed.
    fn make(&self, id: u64, planned: Planned) -> impl Future<Output = (RequestRecord, Option<String>)> + Send + use<> {
        let targets = self.clients.len() as u64;
        let target = (id % targets) as usize;
        let conns = &self.clients[target];
        let client = conns[((id / targets) % conns.len() as u64) as usize].clone();
        let req = GenerateRequest {
            model: self.model.clone(),
            input: Some(planned.input),
            sampling: Some(SamplingParams { max_tokens: planned.max_tokens, ..Default::default() }),
            tenant: self.tenant.clone(),
            request_id: format!("mesh-bench-{id}"),
            ..Default::default()
        };
        let (deadline, started, live, turn) = (self.deadline, self.started, self.live.clone(), planned.turn);
        async move {
            let sent_at = started.elapsed();
            live.sent.fetch_add(1, Ordering::Relaxed);
            let seen = client::send(client, req, deadline, &live).await;
            let counter = if seen.status.is_ok() { &live.ok } else { &live.failed };
            counter.fetch_add(1, Ordering::Relaxed);
            let record = RequestRecord {
                id,
                target,
                sent_at,
                status: seen.status,
                chunks: seen.chunks,
                total: seen.total,
                finish_reason: seen.finish_reason,
                retry_after_ms: seen.retry_after_ms,
                usage: seen.usage,
                turn,
            };
            let reply = seen.status.is_ok().then_some(seen.text);
            (record, reply)
        }
    }
}

/// The open-loop schedule: Poisson arrivals (exponential gaps with mean
/// 1/`rate`) from time zero, stopping before `duration` or at `max` requests.
/// A pure function of its inputs, so tests can predict how many requests a
/// run sends.
pub fn arrival_offsets(seed: u64, rate: f64, duration: Duration, max: u64) -> Vec<Duration> {
    let Ok(gaps) = Exp::new(rate) else { return Vec::new() };
    let mut rng = StdRng::seed_from_u64(seed);
    let mut at = 0.0f64;
    let limit = duration.as_secs_f64();
    let mut out = Vec::new();
    while (out.len() as u64) < max {
        at += gaps.sample(&mut rng);
        if at >= limit {
            break;
        }
        out.push(Duration::from_secs_f64(at));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrivals_are_bounded_and_near_the_rate() {
        let a = arrival_offsets(7, 200.0, Duration::from_secs(10), u64::MAX);
        assert!(a.windows(2).all(|w| w[0] <= w[1]));
        assert!(a.last().is_some_and(|t| *t < Duration::from_secs(10)));
        // 2000 expected; a Poisson count's sd is ~45, so 5 sd either side.
        assert!((1775..=2225).contains(&a.len()), "{} arrivals", a.len());
        assert_eq!(arrival_offsets(7, 200.0, Duration::from_secs(10), 50).len(), 50);
        assert_eq!(a, arrival_offsets(7, 200.0, Duration::from_secs(10), u64::MAX));
    }
}
