//! `edge`: what OpenAI's API on the client sidecar costs against its gRPC
//! port. One synthetic node behind its sidecar, one client sidecar serving
//! the HTTP edge; the same open-loop schedule (`--rate`, Poisson) goes as
//! gRPC Generate streams to the outbound port, then as streaming chat
//! completions to the edge ([`http`]), alternating for `--rounds` so drift
//! lands on both. Both ask the same chat (one user message) for the same
//! `max_tokens` with temperature 0 and the same deadline.
//!
//! TTFT runs from sending to the first token: the first gRPC message with
//! token ids, or the first event whose delta has content. The figure is
//! the difference of the p50s, edge minus gRPC, pooled over the rounds;
//! the node settings are the baseline's, and 50 requests/s of 16 tokens is
//! about half the node's ceiling, so the difference is the edge's work and
//! not queueing.

mod http;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::ensure;
use bytes::Bytes;
use mesh_proto::v1::generate_request::Input;
use mesh_proto::v1::generation_client::GenerationClient;
use mesh_proto::v1::{ChatMessage, ChatMessages, GenerateRequest, SamplingParams};
use serde::Serialize;
use tokio::task::JoinSet;
use tonic::transport::{Channel, Endpoint};

use super::OutArgs;
use super::measures::{Check, Percentiles};
use super::mesh::{Mesh, MeshArgs};
use super::nodes::{NodeArgs, NodeSet};
use crate::load::cli::parse_duration;
use crate::load::mix::{MAX_MAX_TOKENS, MAX_PROMPT_WORDS, prompt_text};
use crate::load::{LiveCounters, MAX_DURATION, MAX_REQUESTS, arrival_offsets, client};
use http::EdgeClient;

/// HTTP/2 connections of the gRPC side, as the other scenarios' load opens.
const GRPC_CONNECTIONS: usize = 4;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub nodes: NodeArgs,
    #[command(flatten)]
    pub mesh: MeshArgs,
    #[command(flatten)]
    pub out: OutArgs,
    /// Open loop at this many requests/s.
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    /// Each run's length; there are 2 x --rounds runs.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub duration: Duration,
    /// gRPC then edge, this many times.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// The user message's length in words.
    #[arg(long, default_value_t = 16)]
    pub prompt_words: u32,
    #[arg(long, default_value_t = 16)]
    pub max_tokens: u32,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub deadline: Duration,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// How one request ended, as its caller saw it.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// `OK`, a gRPC status (`UNAVAILABLE`), or what broke over HTTP (`HTTP_503`).
    pub status: String,
    pub ttft: Option<Duration>,
}

impl Outcome {
    fn failed(status: impl Into<String>) -> Outcome {
        Outcome { status: status.into(), ttft: None }
    }
}

/// One path's requests over every round.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PathSummary {
    pub sent: u64,
    pub ok: u64,
    /// Requests not OK, by status.
    pub errors: BTreeMap<String, u64>,
    /// Of the OK requests.
    pub ttft: Percentiles,
}

impl PathSummary {
    fn of(outcomes: &[Outcome]) -> PathSummary {
        let ok: Vec<&Outcome> = outcomes.iter().filter(|o| o.status == "OK").collect();
        let mut errors = BTreeMap::new();
        for o in outcomes.iter().filter(|o| o.status != "OK") {
            *errors.entry(o.status.clone()).or_default() += 1;
        }
        PathSummary {
            sent: outcomes.len() as u64,
            ok: ok.len() as u64,
            errors,
            ttft: Percentiles::of(ok.iter().filter_map(|o| o.ttft).collect()),
        }
    }

    fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct EdgeReport {
    pub nodes: String,
    pub load: String,
    pub rounds: usize,
    pub grpc: PathSummary,
    pub edge: PathSummary,
    /// Edge minus gRPC, in milliseconds.
    pub added_ttft_p50_ms: f64,
    pub added_ttft_p99_ms: f64,
    /// Connections the edge's keep-alive pool opened over every round.
    pub http_connections_opened: u64,
    pub check: Check,
    pub json_path: String,
}

pub async fn run(args: Args) -> anyhow::Result<EdgeReport> {
    validate(&args)?;
    let mesh = Mesh::start_with_edge(&args.mesh, NodeSet::start(&args.nodes, 1).await?).await?;
    let grpc = connect(&mesh).await?;
    let edge = Arc::new(EdgeClient::new(mesh.edge()?.addr()));
    let prompt = prompt_text(args.prompt_words);
    let body = Bytes::from(chat_body(&mesh.service, &prompt, args.max_tokens).to_string());
    let (mut grpc_outcomes, mut edge_outcomes) = (Vec::new(), Vec::new());
    for round in 0..args.rounds.max(1) {
        // The same schedule on both sides of a round, a new one per round.
        let schedule = arrival_offsets(args.seed.wrapping_add(round as u64), args.rate, args.duration, MAX_REQUESTS);
        let outcomes = drive(&schedule, |id| {
            let client = grpc[id as usize % grpc.len()].clone();
            let req = grpc_request(&mesh.service, &prompt, args.max_tokens, id);
            via_grpc(client, req, args.deadline)
        });
        grpc_outcomes.extend(show(&format!("gRPC {}", round + 1), outcomes.await?));
        let outcomes = drive(&schedule, |id| {
            let (edge, body) = (edge.clone(), body.clone());
            async move { edge.chat(body, id, args.deadline).await }
        });
        edge_outcomes.extend(show(&format!("edge {}", round + 1), outcomes.await?));
    }
    drop(mesh);
    let report = report(&args, &grpc_outcomes, &edge_outcomes, edge.opened())?;
    std::fs::write(&report.json_path, serde_json::to_string_pretty(&report)?)?;
    print!("{}", report.table());
    let failed = report.grpc.error_count() + report.edge.error_count();
    ensure!(failed == 0, "{failed} request(s) failed: gRPC {:?}, edge {:?}", report.grpc.errors, report.edge.errors);
    Ok(report)
}

/// The flags a load generator must not take unchecked.
fn validate(args: &Args) -> anyhow::Result<()> {
    ensure!(args.rate.is_finite() && args.rate > 0.0 && args.rate <= 10_000.0, "--rate must be in (0, 10000]");
    ensure!(!args.duration.is_zero() && args.duration <= MAX_DURATION, "--duration must be in (0, 1h]");
    ensure!(!args.deadline.is_zero() && args.deadline <= MAX_DURATION, "--deadline must be in (0, 1h]");
    ensure!((1..=MAX_PROMPT_WORDS).contains(&args.prompt_words), "--prompt-words must be in 1..={MAX_PROMPT_WORDS}");
    ensure!((1..=MAX_MAX_TOKENS).contains(&args.max_tokens), "--max-tokens must be in 1..={MAX_MAX_TOKENS}");
    Ok(())
}

/// The gRPC side's connections to the client sidecar's outbound port.
async fn connect(mesh: &Mesh) -> anyhow::Result<Vec<GenerationClient<Channel>>> {
    let endpoint = Endpoint::from_shared(format!("http://{}", mesh.target()?.addr()))?.tcp_nodelay(true);
    let mut clients = Vec::with_capacity(GRPC_CONNECTIONS);
    for _ in 0..GRPC_CONNECTIONS {
        clients.push(GenerationClient::new(endpoint.connect().await?));
    }
    Ok(clients)
}

/// Sends one request per offset of `schedule`, each in its own task from
/// that instant on, and returns every outcome once all have ended.
async fn drive<F, Fut>(schedule: &[Duration], send: F) -> anyhow::Result<Vec<Outcome>>
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for (id, offset) in schedule.iter().enumerate() {
        tokio::time::sleep_until((started + *offset).into()).await;
        tasks.spawn(send(id as u64));
    }
    let mut outcomes = Vec::with_capacity(schedule.len());
    while let Some(outcome) = tasks.join_next().await {
        outcomes.push(outcome?);
    }
    Ok(outcomes)
}

/// One gRPC stream through the load generator's client, to the end.
async fn via_grpc(client: GenerationClient<Channel>, req: GenerateRequest, deadline: Duration) -> Outcome {
    // Nothing watches the live counters in this scenario.
    let seen = client::send(client, req, deadline, &LiveCounters::default()).await;
    Outcome { status: seen.status.label().into(), ttft: seen.chunks.first().map(|c| c.at) }
}

fn grpc_request(model: &str, prompt: &str, max_tokens: u32, id: u64) -> GenerateRequest {
    let message = ChatMessage { role: "user".into(), content: prompt.into() };
    GenerateRequest {
        model: model.into(),
        input: Some(Input::Chat(ChatMessages { messages: vec![message] })),
        sampling: Some(SamplingParams { max_tokens, temperature: 0.0, ..Default::default() }),
        request_id: format!("mesh-bench-grpc-{id}"),
        ..Default::default()
    }
}

/// The edge's body: the same chat as [`grpc_request`]'s (OpenAI's default
/// temperature is 1, gRPC's 0, so it is said).
fn chat_body(model: &str, prompt: &str, max_tokens: u32) -> serde_json::Value {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": true,
    })
}

/// Prints one run's line as it ends (a round takes `--duration`).
fn show(label: &str, outcomes: Vec<Outcome>) -> Vec<Outcome> {
    let s = PathSummary::of(&outcomes);
    println!("  {label:<7} {} sent, {} OK, {} errors; TTFT {}", s.sent, s.ok, s.error_count(), s.ttft.show());
    outcomes
}

fn report(args: &Args, grpc: &[Outcome], edge: &[Outcome], opened: u64) -> anyhow::Result<EdgeReport> {
    let (grpc, edge) = (PathSummary::of(grpc), PathSummary::of(edge));
    let added = edge.ttft.p50_ms - grpc.ttft.p50_ms;
    let check = Check {
        target: "edge p50 TTFT - gRPC p50 <= 1 ms".into(),
        observed: format!("{added:+.2} ms ({:.2} against {:.2} ms)", edge.ttft.p50_ms, grpc.ttft.p50_ms),
        pass: added <= 1.0 && edge.ttft.count > 0 && grpc.ttft.count > 0,
    };
    let (json_path, _) = args.out.paths("edge")?;
    Ok(EdgeReport {
        nodes: args.nodes.describe(1),
        load: format!(
            "open loop {} req/s for {:?} per run; one user message of {} words, max_tokens {}",
            args.rate, args.duration, args.prompt_words, args.max_tokens
        ),
        rounds: args.rounds.max(1),
        added_ttft_p50_ms: added,
        added_ttft_p99_ms: edge.ttft.p99_ms - grpc.ttft.p99_ms,
        grpc,
        edge,
        http_connections_opened: opened,
        check,
        json_path: json_path.display().to_string(),
    })
}

impl EdgeReport {
    pub fn table(&self) -> String {
        let (g, e) = (&self.grpc, &self.edge);
        let mut t = format!(
            "edge: {}; {}, {} round(s) each way\n  {:<18} {:>12} {:>12} {:>12}\n",
            self.nodes, self.load, self.rounds, "", "gRPC", "edge", "edge - gRPC"
        );
        t += &format!("  {:<18} {:>12} {:>12}\n", "requests OK", g.ok, e.ok);
        t += &format!("  {:<18} {:>12} {:>12}\n", "errors", g.error_count(), e.error_count());
        let row = |name: &str, g: f64, e: f64| format!("  {name:<18} {g:>9.2} ms {e:>9.2} ms {:>+9.2} ms\n", e - g);
        t += &row("TTFT p50", g.ttft.p50_ms, e.ttft.p50_ms);
        t += &row("TTFT p99", g.ttft.p99_ms, e.ttft.p99_ms);
        t += &format!("  HTTP/1.1 keep-alive connections opened: {}\n", self.http_connections_opened);
        t + &format!("{}\n  report {}\n", self.check.line(), self.json_path)
    }
}
