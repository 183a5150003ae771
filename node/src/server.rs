//! Process wiring: load the model, start the engine, serve gRPC (with
//! health and reflection), and drain on SIGTERM.

use std::time::Duration;

use candle_core::Device;
use mesh_proto::v1::generation_server::GenerationServer;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::config::{BackendKind, NodeConfig};
use crate::metrics::NodeMetrics;
use crate::model::qgemm::Kernel;
use crate::scheduler::Scheduler;
use crate::served::ServedModel;
use crate::service::GenerationService;

/// How long cancelled streams get to deliver their last message after the grace period.
const CANCEL_FLUSH: Duration = Duration::from_secs(5);

pub fn device(cfg: &NodeConfig) -> anyhow::Result<Device> {
    Ok(match cfg.cuda_device {
        None => Device::Cpu,
        Some(n) => Device::new_cuda(n)?,
    })
}

pub fn load_model(cfg: &NodeConfig) -> anyhow::Result<ServedModel> {
    Ok(match cfg.backend {
        BackendKind::Gguf => {
            let path =
                cfg.model.as_deref().ok_or_else(|| anyhow::anyhow!("--model is required for the gguf backend"))?;
            let kernel = Kernel::choose(cfg.kernel).map_err(anyhow::Error::msg)?;
            let available = Kernel::names(&Kernel::available());
            tracing::info!(kernel = kernel.name(), %available, "matmul kernel chosen");
            ServedModel::gguf(path, cfg.model_name.clone(), &device(cfg)?, kernel)?
        }
        BackendKind::Synthetic => ServedModel::synthetic(
            cfg.model_name.clone().unwrap_or_else(|| "synthetic".into()),
            cfg.synthetic_tokens_per_sec,
            cfg.context_length.unwrap_or(4096) as usize,
        ),
    })
}

/// Runs the node until SIGTERM/SIGINT and the drain that follows.
pub async fn run(cfg: NodeConfig) -> anyhow::Result<()> {
    let model = load_model(&cfg)?;
    let limits = cfg.limits(model.context_length);
    tracing::info!(?limits, backend = model.kind, "starting engine");
    let metrics = NodeMetrics::new(&model.name, model.compute);
    let mut metrics_addr = None;
    if let Some(addr) = cfg.metrics_listen {
        let mut registry = telemetry::metrics::Registry::default();
        metrics.register(&mut registry);
        let bound = telemetry::metrics::serve(addr, registry).await?;
        tracing::info!("metrics on http://{bound}/metrics");
        metrics_addr = Some(bound);
    }
    let scheduler = Scheduler::start(limits, model.backend, model.codec.clone(), metrics);
    let service = GenerationService {
        model_name: model.name,
        kind: model.kind,
        vocab_size: model.vocab_size,
        default_max_tokens: cfg.default_max_tokens as usize,
        codec: model.codec,
        scheduler: scheduler.clone(),
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::Serving).await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(mesh_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    let listener = TcpListener::bind(cfg.listen).await?;
    let addr = listener.local_addr()?;
    tracing::info!("listening on {addr}");

    let (stop_tx, stop_rx) = oneshot::channel();
    tokio::spawn(drain_on_signal(scheduler, health, cfg.drain_grace, stop_tx));
    let mut builder = Server::builder();
    if let Some(tls) = tls_config(&cfg)? {
        builder = builder.tls_config(tls)?;
    }
    let mut addresses = vec![("grpc", addr)];
    addresses.extend(metrics_addr.map(|m| ("metrics", m)));
    daemon::ready::announce("node", &addresses);
    builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(GenerationServer::new(service))
        .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)) /* small frames (a token, a refusal) must not wait for a delayed ACK */, async {
            let _ = stop_rx.await;
        })
        .await?;
    tracing::info!("stopped");
    Ok(())
}

/// TLS for the node's listener, from --tls-cert/--tls-key (and mutual with --tls-client-ca).
fn tls_config(cfg: &NodeConfig) -> anyhow::Result<Option<ServerTlsConfig>> {
    let (Some(cert), Some(key)) = (&cfg.tls_cert, &cfg.tls_key) else { return Ok(None) };
    let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()));
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
    if let Some(ca) = &cfg.tls_client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    Ok(Some(tls))
}

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health.set_service_status("mesh.v1.Generation", status).await;
}

/// On SIGTERM or SIGINT: report NOT_SERVING, refuse new work, let in-flight
/// streams finish within `grace` (then cancel them), then stop the server.
async fn drain_on_signal(scheduler: Scheduler, health: HealthReporter, grace: Duration, stop: oneshot::Sender<()>) {
    if let Err(e) = shutdown_signal().await {
        tracing::error!(error = %e, "cannot listen for signals; draining now");
    }
    let load = scheduler.load();
    daemon::ready::stopping();
    tracing::info!(running = load.running, queued = load.queued, ?grace, "draining");
    set_health(&health, ServingStatus::NotServing).await;
    scheduler.drain();
    if tokio::time::timeout(grace, scheduler.idle()).await.is_err() {
        tracing::warn!("drain grace expired; cancelling the remaining streams");
        scheduler.cancel_all();
        let _ = tokio::time::timeout(CANCEL_FLUSH, scheduler.idle()).await;
    }
    let _ = stop.send(());
}

async fn shutdown_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
