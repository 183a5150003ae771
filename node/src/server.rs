//! The node's wiring: load the model, start the engine, serve gRPC (with
//! health and reflection, from the daemon kit), and drain on SIGTERM.

use std::time::Duration;

use candle_core::Device;
use daemon::grpc::Services;
use daemon::health::Health;
use mesh_proto::v1::generation_server::GenerationServer;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::config::{BackendKind, NodeConfig};
use crate::device::DeviceSetting;
use crate::generation_api::GenerationApi;
use crate::loaded_model::{DevicePlan, LoadedModel};
use crate::metrics::NodeMetrics;
use crate::model::qgemm::Kernel;
use crate::scheduler::Scheduler;

/// How long cancelled streams get to deliver their last message after the grace period.
const CANCEL_FLUSH: Duration = Duration::from_secs(5);

/// The CPU, or CUDA device `n` (for mesh-bench, which names the device by
/// its own flag).
pub fn open_device(cuda_device: Option<usize>) -> anyhow::Result<Device> {
    Ok(match cuda_device {
        None => Device::Cpu,
        Some(n) => crate::device::open_cuda(n)?,
    })
}

/// Loads the model on `device` (opened first, by `run`: a device that
/// cannot be had stops the node before the model file is read).
pub fn load_model(cfg: &NodeConfig, device: &Device) -> anyhow::Result<LoadedModel> {
    Ok(match cfg.backend {
        BackendKind::Gguf => {
            let path =
                cfg.model.as_deref().ok_or_else(|| anyhow::anyhow!("--model is required for the gguf backend"))?;
            let kernel = Kernel::choose(cfg.kernel).map_err(anyhow::Error::msg)?;
            let available = Kernel::names(&Kernel::available());
            tracing::info!(kernel = kernel.name(), %available, "matmul kernel chosen");
            let plan = DevicePlan {
                kv_tokens: cfg.max_kv_tokens as usize,
                sequences: cfg.max_running as usize,
                max_step_tokens: cfg.max_step_tokens as usize,
                graphs: !cfg.eager,
            };
            LoadedModel::gguf(path, cfg.model_name.clone(), device, kernel, &plan)?
        }
        BackendKind::Synthetic => LoadedModel::synthetic(
            cfg.model_name.clone().unwrap_or_else(|| "synthetic".into()),
            cfg.synthetic_tokens_per_sec,
            cfg.context_length.unwrap_or(4096) as usize,
            cfg.synthetic_panic_marker.as_deref(),
        ),
    })
}

/// Runs the node until SIGTERM/SIGINT and the drain that follows.
/// `device` is the setting `NodeConfig::device_setting` resolved.
pub async fn run(cfg: NodeConfig, device: DeviceSetting) -> anyhow::Result<()> {
    let opened = crate::device::open(&device)?;
    tracing::info!(device = %device.choice, set_by = %device.said_by, "model device");
    let model = load_model(&cfg, &opened)?;
    let limits = cfg.limits(model.context_length);
    tracing::info!(?limits, backend = model.kind, device = %device.choice, "starting engine");
    let metrics = NodeMetrics::new(&model.name, model.compute);
    metrics.set_device(&device.choice.to_string());
    let mut addresses = Vec::new();
    if let Some(addr) = cfg.metrics_listen {
        addresses.push((
            "metrics",
            daemon::metrics::serve(addr, cfg.metrics_token_file.as_deref(), |r| metrics.register(r)).await?,
        ));
    }
    let max_request = crate::validate::max_request_bytes(limits.context_length);
    let refused = metrics.refused_requests.clone();
    let scheduler = Scheduler::start(limits, model.backend, model.codec.clone(), metrics);
    let api = GenerationApi {
        model_name: model.name,
        kind: model.kind,
        vocab_size: model.vocab_size,
        default_max_tokens: cfg.default_max_tokens as usize,
        codec: model.codec,
        scheduler: scheduler.clone(),
    };
    let tls = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(cert), Some(key)) => Some(daemon::tls::server_config(cert, key, cfg.tls_client_ca.as_deref())?),
        _ => None,
    };

    let (health, health_server) = Health::new();
    health.set(true).await;
    let listener = TcpListener::bind(cfg.listen).await?;
    let addr = listener.local_addr()?;
    tracing::info!("listening on {addr}");
    addresses.insert(0, ("grpc", addr));

    // Listen for signals before saying we are ready: a SIGTERM right after
    // the ready line must drain, not kill.
    let signal = daemon::signal::shutdown();
    let (stopped, stop) = oneshot::channel();
    tokio::spawn(drain_on_signal(signal, scheduler, health, cfg.drain_grace, stopped));
    daemon::ready::announce("node", &addresses);
    // Only the `--tls-allow-peer` identities, when given (the node's own
    // sidecar), on every service: health from loopback stays open.
    let allow = daemon::tls::Allow::only(cfg.tls_allow_peer.clone());
    let gate = daemon::gate::GateLayer::new("grpc", allow, refused);
    let how = daemon::grpc::Listening { tls, gate, ..Default::default() };
    // Sized to the largest request that could be valid here (see
    // `validate::max_request_bytes`), not tonic's 4 MiB default.
    let services = Services::new(GenerationServer::new(api).max_decoding_message_size(max_request));
    daemon::grpc::serve(how, listener, health_server, services, async {
        let _ = stop.await;
    })
    .await?;
    tracing::info!("stopped");
    Ok(())
}

/// On SIGTERM or SIGINT: report NOT_SERVING, refuse new work, let in-flight
/// streams finish within `grace` (then cancel them), then stop the server.
async fn drain_on_signal(
    signal: impl Future<Output = ()>,
    scheduler: Scheduler,
    health: Health,
    grace: Duration,
    stopped: oneshot::Sender<()>,
) {
    signal.await;
    let load = scheduler.load();
    daemon::ready::stopping();
    tracing::info!(running = load.running, queued = load.queued, ?grace, "draining");
    health.set(false).await;
    scheduler.drain();
    if tokio::time::timeout(grace, scheduler.idle()).await.is_err() {
        tracing::warn!("drain grace expired; cancelling the remaining streams");
        scheduler.cancel_all();
        let _ = tokio::time::timeout(CANCEL_FLUSH, scheduler.idle()).await;
    }
    let _ = stopped.send(());
}
