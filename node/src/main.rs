use std::process::ExitCode;

use node::config::NodeConfig;

#[tokio::main]
async fn main() -> ExitCode {
    let cfg = NodeConfig::from_process();
    let warning = match cfg.exposure() {
        Ok(warning) => warning,
        Err(e) => {
            eprintln!("mesh-node: {e}");
            return ExitCode::from(2);
        }
    };
    let (device, deprecated) = match cfg.device_setting() {
        Ok(setting) => setting,
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
    for w in [warning, deprecated].into_iter().flatten() {
        tracing::warn!("{w}");
    }
    match node::server::run(cfg, device).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("node failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
