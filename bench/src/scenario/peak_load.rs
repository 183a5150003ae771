//! `peak`'s load: one open loop whose Poisson rate steps from phase to
//! phase, with a share of HIGH-priority requests and a share of repeated
//! greedy prompts, recording for each request who answered it: the primary
//! service, its overflow service (`x-mesh-served-by`), the client sidecar's
//! response cache (`x-mesh-cache: hit|coalesced`), or nobody (refused).
//!
//! Its own sender rather than `load::Load`: the engine's records keep no
//! response metadata, it sends no priorities, and its prompts repeat by
//! length, so with the response cache on every request after the first of
//! a length would be a hit and the cache would take the whole load.

use std::time::{Duration, Instant};

use mesh_proto::metadata as md;
use mesh_proto::v1::generate_request::Input;
use mesh_proto::v1::generation_client::GenerationClient;
use mesh_proto::v1::{FinishReason, GenerateRequest, Priority, SamplingParams};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::task::JoinSet;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use crate::load::mix::Prompts;
use crate::load::{Chunk, MAX_REQUESTS, Mix, Status, Target, arrival_offsets};

/// Who answered a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    Primary,
    Overflow,
    Cache,
    Refused,
}

impl Class {
    pub const ALL: [Class; 4] = [Class::Primary, Class::Overflow, Class::Cache, Class::Refused];

    pub fn name(self) -> &'static str {
        match self {
            Class::Primary => "primary",
            Class::Overflow => "overflow",
            Class::Cache => "cache",
            Class::Refused => "refused",
        }
    }
}

/// One stretch of constant offered rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Step {
    pub rate: f64,
    pub duration: Duration,
}

/// What the sender asks for besides the rate.
#[derive(Debug, Clone)]
pub struct Shape {
    pub service: String,
    /// The service overflowed requests are served by (to classify them).
    pub overflow: String,
    pub mix: Mix,
    /// Share of requests sent with `PRIORITY_HIGH`.
    pub high_share: f64,
    /// Share of requests that repeat one of `repeat_pool` greedy prompts.
    pub repeat_share: f64,
    pub repeat_pool: u32,
    pub deadline: Duration,
    pub seed: u64,
}

/// One request, as the caller saw it.
#[derive(Debug, Clone)]
pub struct Sent {
    /// From the start of the run.
    pub sent_at: Duration,
    /// Index of the step it was sent in.
    pub step: usize,
    pub high: bool,
    pub repeat: bool,
    pub status: Status,
    pub class: Class,
    /// Token-carrying messages, times from the send.
    pub chunks: Vec<Chunk>,
    pub total: Duration,
    /// OK with a finish reason, within the deadline.
    pub good: bool,
}

impl Sent {
    pub fn ttft(&self) -> Option<Duration> {
        self.chunks.first().map(|c| c.at)
    }
}

/// HTTP/2 connections to the client sidecar, so no single one caps streams.
const CONNECTIONS: usize = 4;

/// The arrival times of `steps`, each with its step: one Poisson schedule
/// per step (seeded by the step), placed end to end.
pub fn schedule(steps: &[Step], seed: u64) -> Vec<(Duration, usize)> {
    let mut out = Vec::new();
    let mut start = Duration::ZERO;
    for (i, s) in steps.iter().enumerate() {
        let offsets = arrival_offsets(seed.wrapping_add(i as u64), s.rate, s.duration, MAX_REQUESTS);
        out.extend(offsets.into_iter().map(|at| (start + at, i)));
        start += s.duration;
    }
    out
}

/// Connections to `target` (the client sidecar), opened before the clock
/// starts so a wrong address fails here.
pub async fn connect(target: &Target) -> anyhow::Result<Vec<GenerationClient<Channel>>> {
    let endpoint = Endpoint::from_shared(format!("http://{}", target.addr()))?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true);
    let mut clients = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        clients.push(GenerationClient::new(endpoint.connect().await?));
    }
    Ok(clients)
}

/// Sends `steps` from `started` on; returns every request in send order.
pub async fn run(
    clients: &[GenerationClient<Channel>],
    steps: &[Step],
    shape: &Shape,
    started: Instant,
) -> anyhow::Result<Vec<Sent>> {
    let mut rng = StdRng::seed_from_u64(shape.seed ^ 0x7065_616b);
    let mut tasks = JoinSet::new();
    for (id, (offset, step)) in schedule(steps, shape.seed).into_iter().enumerate() {
        // An instant already past returns at once: a late sender catches up.
        tokio::time::sleep_until((started + offset).into()).await;
        let (req, high, repeat) = request(shape, id as u64, &mut rng);
        let client = clients[id % clients.len()].clone();
        let (deadline, overflow) = (shape.deadline, shape.overflow.clone());
        tasks.spawn(async move {
            let sent_at = started.elapsed();
            let seen = send(client, req, deadline).await;
            (id, seen.into_sent(sent_at, step, high, repeat, &overflow, deadline))
        });
    }
    let mut all = Vec::new();
    while let Some(done) = tasks.join_next().await {
        all.push(done?);
    }
    all.sort_by_key(|(id, _)| *id);
    Ok(all.into_iter().map(|(_, s)| s).collect())
}

/// Request `id`: a unique prompt (its id first, so no two share a cache
/// key) or, for `repeat_share` of them, one of `repeat_pool` fixed ones.
fn request(shape: &Shape, id: u64, rng: &mut StdRng) -> (GenerateRequest, bool, bool) {
    let high = rng.random_bool(shape.high_share.clamp(0.0, 1.0));
    let repeat = rng.random_bool(shape.repeat_share.clamp(0.0, 1.0));
    let text = match shape.mix.prompts() {
        Prompts::Lengths { words, texts } => texts[words.sample_index(rng)].to_string(),
        _ => String::from("the mesh serves"),
    };
    let prompt = match repeat {
        true => format!("repeated {} {text}", rng.random_range(0..shape.repeat_pool.max(1))),
        false => format!("request {id} {text}"),
    };
    let priority = if high { Priority::High } else { Priority::Normal };
    let req = GenerateRequest {
        model: shape.service.clone(),
        input: Some(Input::Prompt(prompt)),
        sampling: Some(SamplingParams { max_tokens: shape.mix.sample_max_tokens(rng), ..Default::default() }),
        priority: priority as i32,
        tenant: "mesh-bench-peak".into(),
        request_id: format!("mesh-bench-peak-{id}"),
        ..Default::default()
    };
    (req, high, repeat)
}

/// What one stream showed.
struct Seen {
    status: Status,
    chunks: Vec<Chunk>,
    total: Duration,
    finish: FinishReason,
    /// `x-mesh-served-by`, else the last message's model.
    served_by: Option<String>,
    /// `x-mesh-cache`.
    cache: Option<String>,
}

impl Seen {
    fn into_sent(
        self,
        sent_at: Duration,
        step: usize,
        high: bool,
        repeat: bool,
        overflow: &str,
        deadline: Duration,
    ) -> Sent {
        let ok = self.status.is_ok();
        let class = match (ok, self.cache.as_deref(), self.served_by.as_deref()) {
            (false, _, _) => Class::Refused,
            (true, Some("hit" | "coalesced"), _) => Class::Cache,
            (true, _, Some(s)) if s == overflow => Class::Overflow,
            _ => Class::Primary,
        };
        let finished = matches!(self.finish, FinishReason::Stop | FinishReason::Length);
        let good = ok && finished && self.total <= deadline;
        Sent { sent_at, step, high, repeat, status: self.status, class, chunks: self.chunks, total: self.total, good }
    }
}

/// Sends `req` and reads its stream until it ends or `deadline` passes
/// (enforced here too: a server that stops answering never says so).
async fn send(mut client: GenerationClient<Channel>, req: GenerateRequest, deadline: Duration) -> Seen {
    let sent = Instant::now();
    let (mut chunks, mut finish) = (Vec::new(), FinishReason::Unspecified);
    let (mut served_by, mut cache, mut model) = (None, None, None);
    let mut request = tonic::Request::new(req);
    request.set_timeout(deadline);
    let streamed = tokio::time::timeout(deadline, async {
        let response = client.generate(request).await?;
        let header = |k: &str| response.metadata().get(k).and_then(|v| v.to_str().ok()).map(str::to_string);
        (served_by, cache) = (header(md::SERVED_BY), header(md::RESPONSE_CACHE));
        let mut stream = response.into_inner();
        while let Some(msg) = stream.message().await? {
            let tokens = u32::try_from(msg.token_ids.len()).unwrap_or(u32::MAX);
            if tokens > 0 {
                chunks.push(Chunk { at: sent.elapsed(), tokens });
            }
            if msg.finish_reason != 0 {
                finish = FinishReason::try_from(msg.finish_reason).unwrap_or(FinishReason::Stop);
                model = Some(msg.model);
            }
        }
        Ok::<(), tonic::Status>(())
    })
    .await;
    let total = sent.elapsed();
    let status = match streamed {
        Err(_) => Status::Grpc(Code::DeadlineExceeded),
        Ok(Err(e)) if e.code() == Code::Cancelled && total >= deadline => Status::Grpc(Code::DeadlineExceeded),
        Ok(Err(e)) => Status::Grpc(e.code()),
        Ok(Ok(())) if finish == FinishReason::Unspecified => Status::Incomplete,
        Ok(Ok(())) => Status::Grpc(Code::Ok),
    };
    Seen { status, chunks, total, finish, served_by: served_by.or(model.filter(|m| !m.is_empty())), cache }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_steps_its_rate_and_names_each_arrival_s_step() {
        let steps = [
            Step { rate: 10.0, duration: Duration::from_secs(10) },
            Step { rate: 100.0, duration: Duration::from_secs(10) },
        ];
        let s = schedule(&steps, 3);
        let first = s.iter().filter(|(_, i)| *i == 0).count();
        let second = s.iter().filter(|(_, i)| *i == 1).count();
        // 100 and 1000 expected; a Poisson count's sd is 10 and ~32.
        assert!((60..=140).contains(&first) && (850..=1150).contains(&second), "{first} {second}");
        assert!(s.windows(2).all(|w| w[0].0 <= w[1].0));
        assert!(s.iter().all(|(at, i)| (*at >= Duration::from_secs(10)) == (*i == 1)));
    }

    #[test]
    fn requests_are_unique_unless_repeated_and_high_as_often_as_asked() {
        let mix = Mix::new(crate::load::Choices::one(4), crate::load::Choices::one(8)).unwrap();
        let shape = Shape {
            service: "chat".into(),
            overflow: "chat-small".into(),
            mix,
            high_share: 0.25,
            repeat_share: 0.5,
            repeat_pool: 2,
            deadline: Duration::from_secs(1),
            seed: 1,
        };
        let mut rng = StdRng::seed_from_u64(1);
        let made: Vec<_> = (0..400).map(|id| request(&shape, id, &mut rng)).collect();
        let prompts: std::collections::HashSet<_> = made.iter().map(|(r, _, _)| format!("{:?}", r.input)).collect();
        let repeats = made.iter().filter(|m| m.2).count();
        assert_eq!(prompts.len(), 400 - repeats + 2, "unique prompts plus the pool of 2");
        let high = made.iter().filter(|m| m.1).count();
        assert!((60..=140).contains(&high), "{high} of 400 HIGH");
        assert!(made.iter().all(|(r, h, _)| (r.priority == Priority::High as i32) == *h));
    }
}
