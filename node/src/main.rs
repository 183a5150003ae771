use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use node::config::NodeConfig;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cfg = NodeConfig::parse();
    match node::server::run(cfg).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("node failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
