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
    /// Decode speed and batching gain of the node's engine, against candle's
    /// upstream quantized_llama on the same file.
    Node(node_bench::Args),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Node(args) => node_bench::run(args).await,
    }
}
