//! `direct-vs-mesh`: what two sidecars on the path cost. The same load goes
//! straight to the nodes and through the mesh (client sidecar -> the node's
//! sidecar -> node), alternating for `--rounds` so drift on a noisy machine
//! (other work, thermal, page cache) lands on both sides; each side's
//! records are pooled across rounds and the difference of the percentiles
//! is the added latency.
//!
//! The default load is a moderate open loop (20 requests/s against one
//! node of ~48/s), well below capacity, so the difference is the sidecars'
//! cost and not queueing. The node sidecars use their default bulkhead
//! (sized from the node), which at this load never queues.

use std::time::Duration;

use serde::Serialize;

use super::measures::{Run, run_load};
use super::mesh::{Mesh, MeshArgs};
use super::nodes::{NodeArgs, NodeSet};
use super::{OutArgs, Workload, append_timeline};
use crate::load::cli::parse_duration;
use crate::load::stats::Latency;
use crate::load::{Arrival, LoadSpec, MAX_REQUESTS, Mark, RequestRecord, Summary, Target, plot, summarize};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub nodes: NodeArgs,
    #[command(flatten)]
    pub mesh: MeshArgs,
    #[command(flatten)]
    pub out: OutArgs,
    /// Open loop at this many requests/s (all nodes together).
    #[arg(long, default_value_t = 20.0, conflicts_with = "concurrency")]
    pub rate: f64,
    /// Closed loop with this many streams instead.
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Each run's length; there are 2 x --rounds runs.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Direct then mesh, this many times.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub deadline: Duration,
    #[command(flatten)]
    pub workload: Workload,
}

/// Mesh minus direct, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Added {
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    pub inter_token_p50_ms: f64,
    pub inter_token_p99_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DirectVsMeshReport {
    pub nodes: String,
    pub load: String,
    pub rounds: usize,
    /// Pooled over the rounds.
    pub direct: Summary,
    pub mesh: Summary,
    pub added: Added,
    pub json_path: String,
    pub svg_path: String,
}

pub async fn run(args: Args) -> anyhow::Result<DirectVsMeshReport> {
    let count = args.nodes.nodes.unwrap_or(1);
    let mesh = Mesh::start(&args.mesh, NodeSet::start(&args.nodes, count).await?, None).await?;
    let mix = args.workload.mix()?;
    let arrival = match args.concurrency {
        Some(c) => Arrival::Closed { concurrency: c },
        None => Arrival::Open { rate: args.rate },
    };
    let spec = |targets: Vec<Target>, model: &str, round: usize| LoadSpec {
        targets,
        arrival,
        duration: args.duration,
        max_requests: MAX_REQUESTS,
        deadline: args.deadline,
        mix: mix.clone(),
        model: model.to_string(),
        tenant: "mesh-bench-direct-vs-mesh".into(),
        connections: 4,
        // The same schedule on both sides of a round, a new one per round.
        seed: args.workload.seed.wrapping_add(round as u64),
    };
    let (direct_targets, mesh_target) = (mesh.nodes.targets()?, vec![mesh.target()?]);
    let mut pooled: [Pool; 2] = Default::default();
    let (mut timeline, mut marks) = (Vec::new(), Vec::new());
    for round in 0..args.rounds.max(1) {
        let sides = [(direct_targets.clone(), "", "direct"), (mesh_target.clone(), mesh.service.as_str(), "mesh")];
        for (side, (targets, model, name)) in sides.into_iter().enumerate() {
            let label = format!("{name} {}", round + 1);
            let run = run_load(spec(targets, model, round), &label, args.workload.quiet).await?;
            let at = append_timeline(&mut timeline, &run.report.summary.timeline);
            marks.push(Mark { at_s: at, label });
            pooled[side].add(run);
        }
    }
    drop(mesh);

    let [direct, mesh] = pooled.map(|p| p.summary(args.deadline));
    let diff = |f: fn(&Summary) -> &Latency, p: fn(&Latency) -> f64| p(f(&mesh)) - p(f(&direct));
    let added = Added {
        ttft_p50_ms: diff(|s| &s.ttft, |l| l.p50_ms),
        ttft_p99_ms: diff(|s| &s.ttft, |l| l.p99_ms),
        inter_token_p50_ms: diff(|s| &s.inter_token, |l| l.p50_ms),
        inter_token_p99_ms: diff(|s| &s.inter_token, |l| l.p99_ms),
    };
    let load = match arrival {
        Arrival::Open { rate } => format!("open loop {rate} req/s"),
        Arrival::Closed { concurrency } => format!("closed loop {concurrency} streams"),
    };
    let (json_path, svg_path) = args.out.paths("direct-vs-mesh")?;
    let report = DirectVsMeshReport {
        nodes: args.nodes.describe(count),
        load: format!("{load} for {:?} per run", args.duration),
        rounds: args.rounds.max(1),
        direct,
        mesh,
        added,
        json_path: json_path.display().to_string(),
        svg_path: svg_path.display().to_string(),
    };
    plot::write_svg(&svg_path, &format!("direct vs mesh: {}", report.nodes), &timeline, &marks)?;
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)?;
    print!("{}", report.table());
    Ok(report)
}

/// One side's records over every round.
#[derive(Default)]
struct Pool {
    records: Vec<RequestRecord>,
    elapsed: Duration,
}

impl Pool {
    fn add(&mut self, run: Run) {
        self.records.extend(run.result.records);
        self.elapsed += run.result.elapsed;
    }

    fn summary(self, deadline: Duration) -> Summary {
        summarize(&self.records, self.elapsed, deadline)
    }
}

impl DirectVsMeshReport {
    pub fn table(&self) -> String {
        let (d, m, a) = (&self.direct, &self.mesh, &self.added);
        let row =
            |name: &str, d: f64, m: f64, added: f64| format!("  {name:<18} {d:>9.2} ms {m:>9.2} ms {added:>+9.2} ms\n");
        let mut t = format!(
            "direct-vs-mesh: {}; {}, {} round(s)\n  {:<18} {:>12} {:>12} {:>12}\n",
            self.nodes, self.load, self.rounds, "", "direct", "mesh", "added"
        );
        t += &row("TTFT p50", d.ttft.p50_ms, m.ttft.p50_ms, a.ttft_p50_ms);
        t += &row("TTFT p99", d.ttft.p99_ms, m.ttft.p99_ms, a.ttft_p99_ms);
        t += &row("inter-token p50", d.inter_token.p50_ms, m.inter_token.p50_ms, a.inter_token_p50_ms);
        t += &row("inter-token p99", d.inter_token.p99_ms, m.inter_token.p99_ms, a.inter_token_p99_ms);
        t += &format!(
            "  requests: direct {}; mesh {}\n",
            crate::load::report::counts(&d.status_counts),
            crate::load::report::counts(&m.status_counts)
        );
        t + &format!("  report {}\n  plot   {}\n", self.json_path, self.svg_path)
    }
}
