use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use sidecar::config::SidecarConfig;

/// jemalloc, not glibc's malloc: a sidecar allocates and frees small
/// buffers for every message it relays, from whichever worker thread polls
/// the stream. Under 20,000 streams (`scenario scale`, Zen 4, 2 cores)
/// glibc's malloc and free took 14% of a sidecar's CPU, much of it
/// consolidating and unlinking free chunks. With jemalloc the two
/// sidecars used 20-45% less CPU over the step at the same RSS per stream
/// (11-12 and 16 KiB); mimalloc saved as much CPU but held 15-20 KiB.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The mesh's sidecar: routes outbound calls, gates inbound ones.
#[derive(Parser)]
#[command(name = "mesh-sidecar", version)]
struct Cli {
    /// The TOML configuration file.
    #[arg(long, env = "MESH_SIDECAR_CONFIG")]
    config: PathBuf,
    /// Overrides `listen.outbound`.
    #[arg(long, env = "MESH_SIDECAR_OUTBOUND")]
    outbound: Option<std::net::SocketAddr>,
    /// Overrides `listen.inbound`.
    #[arg(long, env = "MESH_SIDECAR_INBOUND")]
    inbound: Option<std::net::SocketAddr>,
    /// Overrides `etcd.endpoints` (comma-separated).
    #[arg(long, env = "MESH_SIDECAR_ETCD", value_delimiter = ',')]
    etcd: Vec<String>,
    /// Overrides `node.address`.
    #[arg(long, env = "MESH_SIDECAR_NODE")]
    node: Option<String>,
    /// Overrides `listen.advertise`: the address other hosts dial for inbound.
    #[arg(long, env = "MESH_SIDECAR_ADVERTISE")]
    advertise: Option<String>,
    /// Overrides `metrics_listen` (Prometheus `/metrics`).
    #[arg(long, env = "MESH_SIDECAR_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    #[command(flatten)]
    trace: telemetry::TraceArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let _telemetry = match telemetry::init("mesh-sidecar", &cli.trace) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("mesh-sidecar: {e:#}");
            return ExitCode::from(2);
        }
    };
    let cfg = match SidecarConfig::load(&cli.config).map(|c| apply(c, &cli)).and_then(SidecarConfig::checked) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("bad configuration: {e}");
            return ExitCode::from(2);
        }
    };
    match sidecar::server::run(cfg).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("sidecar failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn apply(mut cfg: SidecarConfig, cli: &Cli) -> SidecarConfig {
    if let Some(a) = cli.outbound {
        cfg.listen.outbound = a;
    }
    if let Some(a) = cli.inbound {
        cfg.listen.inbound = a;
    }
    if !cli.etcd.is_empty() {
        cfg.etcd.endpoints = cli.etcd.clone();
    }
    if cli.advertise.is_some() {
        cfg.listen.advertise = cli.advertise.clone();
    }
    if cli.metrics_listen.is_some() {
        cfg.metrics_listen = cli.metrics_listen;
    }
    if let (Some(addr), Some(node)) = (&cli.node, cfg.node.as_mut()) {
        node.address = addr.clone();
    }
    cfg
}
