//! `mesh-bench`: benchmarks that print numbers.

mod node_bench;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "mesh-bench", about = "Benchmarks of the mesh; each prints its numbers.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Decode speed, batching gain, prefill and TTFT of the node's engine on
    /// every matmul kernel this CPU supports, against candle's upstream
    /// quantized_llama on the same file.
    Node(node_bench::Args),
    /// Single-stream decode rate of candle's quantized_llama as this binary
    /// was built (one JSON line; the yardstick of `node --upstream-bin`).
    Upstream(node_bench::ModelArgs),
    /// The node's engine on a GPU: decode alone and batched, TTFT under
    /// load, memory bandwidth, the CPU aggregate beside it, greedy output
    /// against the CPU (scripts/gpu-check.sh).
    Device(node_bench::device::Args),
    /// The node's matmul kernels alone: GMAC/s per kernel and batch size.
    Qgemm(node_bench::qgemm::Args),
    /// Drive Generate load (closed or open loop) against a node or sidecar
    /// on loopback or an allowed test network; print a summary, JSON or a plot.
    Load(bench::load::cli::Args),
    /// Bring up nodes, run load, inject the scenario's fault, write the report.
    #[command(subcommand)]
    Scenario(bench::scenario::Scenario),
    /// Start a local mesh (etcd, nodes each behind a sidecar, a client
    /// sidecar) on free ports, print its addresses as one JSON line, and run
    /// until SIGINT or SIGTERM.
    Up(bench::up::Args),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Node(args) => node_bench::run(args).await,
        Command::Upstream(args) => node_bench::upstream::run(args),
        Command::Device(args) => node_bench::device::run(args).await,
        Command::Qgemm(args) => node_bench::qgemm::run(args),
        Command::Load(args) => bench::load::cli::run(args).await,
        Command::Scenario(scenario) => bench::scenario::run(scenario).await,
        Command::Up(args) => bench::up::run(args).await,
    }
}
