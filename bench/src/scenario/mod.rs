//! The scenario runner: `mesh-bench scenario <name>` brings up what the
//! scenario needs (nodes, or a whole mesh: etcd, a sidecar per node and a
//! client sidecar), runs load, injects the scenario's fault at a set time,
//! and writes the report (JSON and an SVG plot) under `--out`.
//!
//! Scenarios orchestrate processes and report to a person, so they use
//! `anyhow`; the load engine underneath has typed errors.
//!
//! Adding a scenario: a module with a `clap::Args` struct and an async `run`,
//! a variant below, and a README line.

pub mod baseline;
pub mod direct_vs_mesh;
pub mod edge;
pub mod fault;
pub mod measures;
pub mod mesh;
pub mod node_metrics;
pub mod nodes;
pub mod overload;
pub mod peak;
mod peak_args;
mod peak_checks;
mod peak_load;
mod peak_mesh;
mod peak_plot;
mod peak_report;
mod peak_watch;
pub mod prefix;
pub mod prefix_report;
pub mod scale;
pub mod usage;

use std::path::PathBuf;

use anyhow::Context;

use crate::load::stats::Second;
use crate::load::{Choices, Mix};

#[derive(clap::Subcommand, Debug)]
pub enum Scenario {
    /// Capacity: the highest offered open-loop rate whose p99 TTFT stays
    /// within 2x the unloaded value with no errors.
    Baseline(baseline::Args),
    /// A fault under load: SIGKILL a node, SIGSTOP one, or flood one, at a set
    /// time, and show what callers saw.
    Fault(fault::Args),
    /// The same load straight to the nodes and through two sidecars (client
    /// sidecar -> node's sidecar -> node): the latency the mesh adds.
    DirectVsMesh(direct_vs_mesh::Args),
    /// Twice the mesh's capacity, open loop, through the mesh and straight to
    /// the nodes: goodput, admitted TTFT, refusals and memory, against targets.
    Overload(overload::Args),
    /// Closed-loop streams through one client sidecar in steps (1k to 50k):
    /// errors, TTFT, inter-token p99, RSS and CPU per process per step; then
    /// tokens/s at saturation straight to the node against through the mesh.
    Scale(scale::Args),
    /// Real-model nodes with the prefix cache off and on: TTFT of a shared
    /// system prompt, multi-turn conversations, and a shared-prefix workload
    /// through the mesh with least-loaded and cache-aware routing.
    Prefix(prefix::Args),
    /// The same open loop as gRPC streams to the client sidecar and as
    /// streaming chat completions to its HTTP edge: the TTFT the edge adds.
    Edge(edge::Args),
    /// Peak shaving: load stepping 0.5x, 2x, 3x, 2x, 0.5x of the primary's
    /// capacity against shedding only, overflow to a smaller service, and
    /// overflow plus a standby node that `meshctl autoscale` activates.
    Peak(peak::Args),
}

pub async fn run(scenario: Scenario) -> anyhow::Result<()> {
    let work = async {
        match scenario {
            Scenario::Baseline(args) => baseline::run(args).await.map(|_| ()),
            Scenario::Fault(args) => fault::run(args).await.map(|_| ()),
            Scenario::DirectVsMesh(args) => direct_vs_mesh::run(args).await.map(|_| ()),
            Scenario::Overload(args) => overload::run(args).await.map(|_| ()),
            Scenario::Scale(args) => scale::run(args).await.map(|_| ()),
            Scenario::Prefix(args) => prefix::run(args).await.map(|_| ()),
            Scenario::Edge(args) => edge::run(args).await.map(|_| ()),
            Scenario::Peak(args) => peak::run(args).await.map(|_| ()),
        }
    };
    // On Ctrl-C the scenario future is dropped, which kills the processes
    // it started (kill_on_drop) instead of leaving them running.
    tokio::select! {
        result = work => result,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted; the scenario's processes were stopped"),
    }
}

/// What every request of a scenario asks for, and whether to show progress.
#[derive(Debug, Clone, clap::Args)]
pub struct Workload {
    /// Prompt lengths in words (weighted choices, e.g. `16:3,128:1`).
    #[arg(long, default_value = "16")]
    pub prompt_words: Choices,
    /// max_tokens per request (weighted choices).
    #[arg(long, default_value = "32")]
    pub max_tokens: Choices,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

impl Workload {
    pub fn mix(&self) -> anyhow::Result<Mix> {
        Ok(Mix::new(self.prompt_words.clone(), self.max_tokens.clone())?)
    }
}

/// Where a scenario writes its files.
#[derive(clap::Args, Debug, Clone)]
pub struct OutArgs {
    /// Directory for the report (`<scenario>.json`) and plot (`<scenario>.svg`).
    #[arg(long, default_value = "target/mesh-bench")]
    pub out: PathBuf,
}

impl OutArgs {
    /// Creates the directory; returns where `<name>.json` and `<name>.svg` go.
    pub fn paths(&self, name: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
        std::fs::create_dir_all(&self.out).with_context(|| format!("creating {}", self.out.display()))?;
        Ok((self.out.join(format!("{name}.json")), self.out.join(format!("{name}.svg"))))
    }
}

/// Appends `next` to `acc`, shifted to start at the end of `acc`, and
/// returns the offset (s) it was placed at: consecutive runs as one picture.
pub fn append_timeline(acc: &mut Vec<Second>, next: &[Second]) -> f64 {
    let offset = acc.len() as u64;
    acc.extend(next.iter().map(|s| Second { t: s.t + offset, ..s.clone() }));
    offset as f64
}
