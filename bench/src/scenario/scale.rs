//! `scale`: how the data path holds up as concurrency grows. Closed-loop
//! streams through one client sidecar to one synthetic node (behind its
//! own sidecar), in steps (default 1k, 5k, 10k, 20k, 50k streams); per step:
//! errors by status, TTFT p50/p99, inter-token p99, and each process's peak
//! RSS (and KiB per stream above idle) and CPU seconds per 1,000 streams.
//! Then, at saturation (many streams against a fast node), tokens/s
//! straight to the node against through the mesh, alternating in one run
//! (the `direct-vs-mesh` scenario, run inside this one).
//!
//! The node, its sidecar and the client sidecar are sized to take the
//! largest step, so a step's errors are the data path's, not a limit's:
//! `--max-running` and the bulkhead's `max_concurrency` are the largest
//! step plus 10%, prefill is never the bottleneck (`--max-step-tokens`
//! 1,000,000), and the client sidecar's `max_streams_per_service` is twice
//! the largest step.

use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use super::direct_vs_mesh::{self, DirectVsMeshReport};
use super::measures::run_load;
use super::mesh::{Bulkhead, Mesh, MeshArgs};
use super::nodes::{NodeArgs, NodeSet};
use super::usage::{Usage, Watched, during, rss_now};
use super::{OutArgs, Workload};
use crate::load::cli::parse_duration;
use crate::load::{Arrival, Choices, LoadSpec, MAX_REQUESTS, Mix, Summary};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Concurrent streams of each step, in order.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000,20000,50000")]
    pub steps: Vec<usize>,
    /// Each step's length (a stream sends its next request when one ends).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub step_duration: Duration,
    /// Synthetic tokens/s per stream in the ramp: slow, so many streams are
    /// open at once for a modest token rate (a stream of 16 tokens lasts 16 s).
    #[arg(long, default_value_t = 1.0)]
    pub tokens_per_sec: f64,
    /// Prompt length in words.
    #[arg(long, default_value_t = 4)]
    pub prompt_words: u32,
    /// max_tokens per request.
    #[arg(long, default_value_t = 16)]
    pub max_tokens: u32,
    /// HTTP/2 connections from the load generator to the client sidecar.
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub deadline: Duration,
    /// Saturation part: closed-loop streams against a fast node.
    #[arg(long, default_value_t = 256)]
    pub saturation_streams: usize,
    /// Saturation part: the node's synthetic tokens/s per stream.
    #[arg(long, default_value_t = 1000.0)]
    pub saturation_tokens_per_sec: f64,
    /// Saturation part: max_tokens per request; long streams, so the figure
    /// is relaying tokens more than opening streams.
    #[arg(long, default_value_t = 256)]
    pub saturation_max_tokens: u32,
    /// Saturation part: each run's length (direct, then mesh, per round).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub saturation_duration: Duration,
    /// Saturation part: direct then mesh this many times; 0 skips it.
    #[arg(long, default_value_t = 2)]
    pub saturation_rounds: usize,
    /// More flags for the ramp's node, e.g. --node-arg=--max-queue-wait=10s.
    #[arg(long, allow_hyphen_values = true)]
    pub node_arg: Vec<String>,
    #[command(flatten)]
    pub mesh: MeshArgs,
    #[command(flatten)]
    pub out: OutArgs,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

/// One process during one step.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessCost {
    pub process: String,
    pub peak_rss_kib: u64,
    /// Peak RSS above the process's RSS before the first step, per stream.
    pub kib_per_stream: f64,
    pub cpu_s: f64,
    pub cpu_s_per_1k_streams: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub streams: usize,
    pub summary: Summary,
    pub processes: Vec<ProcessCost>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Saturation {
    pub direct_tokens_per_s: f64,
    pub mesh_tokens_per_s: f64,
    /// Mesh over direct.
    pub ratio: f64,
    pub detail: DirectVsMeshReport,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScaleReport {
    pub nodes: String,
    pub load: String,
    pub steps: Vec<Step>,
    pub saturation: Option<Saturation>,
    pub json_path: String,
}

pub async fn run(args: Args) -> anyhow::Result<ScaleReport> {
    let largest = *args.steps.iter().max().context("--steps needs at least one step")?;
    anyhow::ensure!(args.steps.iter().all(|&s| s > 0), "--steps must all be above 0 streams");
    let (nodes, bulkhead) = sized_for(&args, largest);
    let routing = format!("max_streams_per_service = {}\n", 2 * largest);
    let mesh = Mesh::start_with(&args.mesh, NodeSet::start(&nodes, 1).await?, Some(&bulkhead), &routing).await?;
    let mut watched: Vec<Watched> =
        mesh.processes().iter().map(|p| Watched { name: p.name().into(), pid: p.pid() }).collect();
    watched.push(Watched { name: "load generator".into(), pid: std::process::id() });
    let idle = rss_now(&watched);
    let mut steps = Vec::new();
    for &streams in &args.steps {
        let step = run_step(&args, &mesh, &watched, &idle, streams).await?;
        print!("{}", step_lines(&step));
        steps.push(step);
    }
    drop(mesh);
    let saturation = saturation(&args).await?;
    let (json_path, _) = args.out.paths("scale")?;
    let report = ScaleReport {
        nodes: nodes.describe(1),
        load: format!(
            "closed loop, {} words in, {} tokens out, {:?} per step, {} connections",
            args.prompt_words, args.max_tokens, args.step_duration, args.connections
        ),
        steps,
        saturation,
        json_path: json_path.display().to_string(),
    };
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)?;
    print!("{}", report.table());
    Ok(report)
}

/// The node and its bulkhead, sized to take `largest` streams.
fn sized_for(args: &Args, largest: usize) -> (NodeArgs, Bulkhead) {
    let room = u32::try_from(largest + largest / 10).unwrap_or(u32::MAX);
    let mut nodes = NodeArgs::synthetic(1, args.tokens_per_sec, room, 1024);
    nodes.node_arg = vec!["--max-step-tokens=1000000".into(), "--max-kv-tokens=1000000000".into()];
    nodes.node_arg.extend(args.node_arg.iter().cloned());
    let bulkhead = Bulkhead { max_concurrency: room, max_queue: 1024, max_queue_wait: Duration::from_secs(5) };
    (nodes, bulkhead)
}

async fn run_step(args: &Args, mesh: &Mesh, watched: &[Watched], idle: &[u64], streams: usize) -> anyhow::Result<Step> {
    let spec = LoadSpec {
        targets: vec![mesh.target()?],
        arrival: Arrival::Closed { concurrency: streams },
        duration: args.step_duration,
        max_requests: MAX_REQUESTS,
        deadline: args.deadline,
        mix: Mix::new(Choices::one(args.prompt_words), Choices::one(args.max_tokens))?,
        model: mesh.service.clone(),
        tenant: "mesh-bench-scale".into(),
        connections: args.connections,
        seed: streams as u64,
    };
    let (run, usage) = during(watched, run_load(spec, &format!("{streams} streams"), args.quiet)).await;
    let processes = usage.into_iter().zip(idle).map(|(u, &idle)| cost(u, idle, streams)).collect();
    Ok(Step { streams, summary: run?.report.summary, processes })
}

fn cost(u: Usage, idle_kib: u64, streams: usize) -> ProcessCost {
    let thousands = streams as f64 / 1000.0;
    ProcessCost {
        kib_per_stream: u.peak_rss_kib.saturating_sub(idle_kib) as f64 / streams as f64,
        cpu_s_per_1k_streams: u.cpu_s / thousands,
        process: u.process,
        peak_rss_kib: u.peak_rss_kib,
        cpu_s: u.cpu_s,
    }
}

/// Tokens/s straight to a fast node and through the mesh, alternating.
async fn saturation(args: &Args) -> anyhow::Result<Option<Saturation>> {
    if args.saturation_rounds == 0 {
        return Ok(None);
    }
    let streams = u32::try_from(args.saturation_streams).context("--saturation-streams")?;
    let mut nodes = NodeArgs::synthetic(1, args.saturation_tokens_per_sec, streams, 128);
    // Every stream's prompt + max_tokens fits in the KV budget: no refusals.
    nodes.node_arg = vec!["--max-kv-tokens=1000000000".into()];
    let detail = direct_vs_mesh::run(direct_vs_mesh::Args {
        nodes,
        mesh: args.mesh.clone(),
        out: OutArgs { out: args.out.out.join("scale-saturation") },
        rate: 1.0,
        concurrency: Some(args.saturation_streams),
        duration: args.saturation_duration,
        rounds: args.saturation_rounds,
        deadline: args.deadline,
        workload: Workload {
            prompt_words: Choices::one(args.prompt_words),
            max_tokens: Choices::one(args.saturation_max_tokens),
            seed: 1,
            quiet: args.quiet,
        },
    })
    .await?;
    let (direct, mesh) = (detail.direct.tokens_per_s, detail.mesh.tokens_per_s);
    let ratio = if direct > 0.0 { mesh / direct } else { 0.0 };
    Ok(Some(Saturation { direct_tokens_per_s: direct, mesh_tokens_per_s: mesh, ratio, detail }))
}

fn step_lines(s: &Step) -> String {
    let m = &s.summary;
    let mut t = format!(
        "{:>6} streams: {} requests ({}); TTFT p50 {:.1} ms, p99 {:.1} ms; inter-token p99 {:.1} ms; {:.0} tokens/s\n",
        s.streams,
        m.sent,
        crate::load::report::counts(&m.status_counts),
        m.ttft.p50_ms,
        m.ttft.p99_ms,
        m.inter_token.p99_ms,
        m.tokens_per_s
    );
    for p in &s.processes {
        t += &format!(
            "        {:<16} RSS {:>7.1} MiB ({:>5.1} KiB/stream)  CPU {:>6.2} s ({:.2} s per 1k streams)\n",
            p.process,
            p.peak_rss_kib as f64 / 1024.0,
            p.kib_per_stream,
            p.cpu_s,
            p.cpu_s_per_1k_streams
        );
    }
    t
}

impl ScaleReport {
    pub fn table(&self) -> String {
        let mut t = format!("scale: {}; {}\n", self.nodes, self.load);
        let first = self.steps.first().map_or(0.0, |s| s.summary.ttft.p99_ms);
        for s in &self.steps {
            let m = &s.summary;
            let ratio = if first > 0.0 { m.ttft.p99_ms / first } else { 0.0 };
            t += &format!(
                "  {:>6} streams: errors {:>6}  TTFT p99 {:>8.1} ms ({ratio:.2}x the first step)  sidecars {}\n",
                s.streams,
                m.errors(),
                m.ttft.p99_ms,
                sidecar_kib(s)
            );
        }
        if let Some(sat) = &self.saturation {
            t += &format!(
                "  saturation: direct {:.0} tokens/s, mesh {:.0} tokens/s: {:.2}x\n",
                sat.direct_tokens_per_s, sat.mesh_tokens_per_s, sat.ratio
            );
        }
        t + &format!("  report {}\n", self.json_path)
    }
}

/// KiB per stream of each sidecar in a step, for the summary table.
fn sidecar_kib(s: &Step) -> String {
    let parts: Vec<String> = s
        .processes
        .iter()
        .filter(|p| p.process.contains("sidecar"))
        .map(|p| format!("{} {:.1} KiB/stream", p.process, p.kib_per_stream))
        .collect();
    parts.join(", ")
}
