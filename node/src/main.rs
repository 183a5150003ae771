use std::process::ExitCode;

use clap::Parser;
use node::config::NodeConfig;

#[tokio::main]
async fn main() -> ExitCode {
    let cfg = NodeConfig::parse();
    let warning = match cfg.exposure() {
        Ok(warning) => warning,
        Err(e) => {
            eprintln!("mesh-node: {e}");
            return ExitCode::from(2);
        }
    };
    let _telemetry = match telemetry::init("mesh-node", &cfg.trace) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("mesh-node: {e:#}");
            return ExitCode::from(2);
        }
    };
    if let Some(w) = warning {
        tracing::warn!("{w}");
    }
    match node::server::run(cfg).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("node failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
