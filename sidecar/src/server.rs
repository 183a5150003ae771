//! Wiring: registry, balancer, the outbound and inbound servers, health,
//! registration, and the drain on SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh_proto::v1::generation_server::GenerationServer;
use mesh_proto::v1::sidecar_admin_server::SidecarAdminServer;
use registry::{EtcdRegistry, Registry};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint, Server, ServerTlsConfig};
use tonic_health::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response};
use tonic_health::server::HealthReporter;

use mesh_proto::v1::generation_client::GenerationClient;
use tower::ServiceBuilder;

use crate::admin::Admin;
use crate::config::{ServiceLimits, SidecarConfig};
use crate::inbound::accept::{Accept, Draining};
use crate::inbound::admission::Admission;
use crate::inbound::bulkhead::Bulkhead;
use crate::inbound::charge::ChargeTenant;
use crate::inbound::tenants::Tenants;
use crate::metrics::SidecarMetrics;
use crate::outbound::authenticate::{ApiKeys, Authenticate};
use crate::outbound::balancer::Balancer;
use crate::outbound::health;
use crate::outbound::route::Route;
use crate::outbound::service_slot::ServiceSlot;
use crate::registration;
use crate::stack::{Front, Next, step};
use crate::tls::TlsMaterial;
use crate::trace::{Hop, Trace};

const GENERATION: &str = "mesh.v1.Generation";

/// The outbound request path, first layer first.
fn outbound_stack(cfg: &SidecarConfig, balancer: &Arc<Balancer>, metrics: &SidecarMetrics) -> Front {
    let b = balancer.clone();
    let generate = ServiceBuilder::new()
        .layer(step(Trace::new(Hop::Outbound, metrics.clone())))
        .layer(step(Authenticate(ApiKeys::new(&cfg.api_keys))))
        .layer(step(ServiceSlot::new(
            cfg.routing.max_streams_per_service,
            Arc::new(move |s| b.knows(s)),
            metrics.clone(),
        )))
        .service(Route::new(balancer.clone(), cfg.routing.clone(), metrics.clone()).service());
    Front::new(Next::new(generate), crate::outbound::list_models(balancer.clone()))
}

/// The inbound request path, first layer first.
fn inbound_stack(
    cfg: &SidecarConfig,
    service: &str,
    node: GenerationClient<Channel>,
    (bulkhead, draining): (Arc<Bulkhead>, Draining),
    metrics: &SidecarMetrics,
) -> Front {
    let generate = ServiceBuilder::new()
        .layer(step(Trace::new(Hop::Inbound { service: service.into() }, metrics.clone())))
        .layer(step(Accept { service: service.into(), draining }))
        .layer(step(ChargeTenant { tenants: Arc::new(Tenants::new(cfg.tenants.clone())), metrics: metrics.clone() }))
        .layer(step(Admission { service: service.into(), bulkhead, metrics: metrics.clone() }))
        .service(crate::inbound::node::service(node.clone()));
    Front::new(Next::new(generate), crate::inbound::list_models(node))
}

pub async fn run(cfg: SidecarConfig) -> anyhow::Result<()> {
    let metrics = SidecarMetrics::new();
    let mut addresses = Vec::new();
    if let Some(addr) = cfg.metrics_listen {
        let mut registry = telemetry::metrics::Registry::default();
        metrics.register(&mut registry);
        let bound = telemetry::metrics::serve(addr, registry).await?;
        tracing::info!("metrics on http://{bound}/metrics");
        addresses.push(("metrics", bound));
    }
    let tls = cfg.tls.as_ref().map(TlsMaterial::load).transpose()?;
    let registry = EtcdRegistry::start(cfg.etcd())?;
    let balancer = Arc::new(Balancer::new(
        cfg.routing.policy,
        cfg.outlier.clone(),
        metrics.clone(),
        tls.as_ref().map(|t| t.client()),
    ));
    let mut view = registry.watch();
    let sync = balancer.clone();
    let reachable = metrics.etcd_reachable.clone();
    tokio::spawn(async move {
        loop {
            let v = view.borrow_and_update().clone();
            reachable.set(i64::from(v.etcd_reachable));
            sync.update(&v);
            if view.changed().await.is_err() {
                return;
            }
        }
    });
    health::spawn(balancer.clone());

    let (stop_tx, stop_rx) = watch::channel(false);
    let outbound = outbound_stack(&cfg, &balancer, &metrics);
    let admin = Admin { balancer, view: registry.watch() };
    let out_listener = TcpListener::bind(cfg.listen.outbound).await?;
    tracing::info!("outbound listening on {}", out_listener.local_addr()?);
    addresses.push(("outbound", out_listener.local_addr()?));
    let out_tls = tls.as_ref().filter(|t| t.outbound).map(|t| t.server());
    let out_server = tokio::spawn(serve_outbound(out_listener, out_tls, outbound, admin, stop_rx.clone()));

    let signal = shutdown_signal();
    tokio::pin!(signal);
    let inbound = match &cfg.node {
        // A node that never comes up must not make the sidecar deaf to SIGTERM.
        Some(node) => tokio::select! {
            started = start_inbound(&cfg, node, tls.as_ref(), &registry, metrics, stop_rx.clone()) => Some(started?),
            _ = &mut signal => None,
        },
        None => None,
    };
    if inbound.is_some() || cfg.node.is_none() {
        // Listening (and registered, with a node): say we are up.
        addresses.extend(inbound.as_ref().map(|i| ("inbound", i.3)));
        daemon::ready::announce("sidecar", &addresses);
        signal.await;
    }
    daemon::ready::stopping();
    tracing::info!("draining");
    registry.shutdown().await.ok(); // our records vanish from every watcher at once
    if let Some((draining, reporter, bulkhead, _)) = &inbound {
        draining.start();
        set_health(reporter, ServingStatus::NotServing).await;
        let drained = tokio::time::timeout(cfg.drain_grace, async {
            while bulkhead.in_use() > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        if drained.await.is_err() {
            tracing::warn!("drain grace expired with streams still open");
        }
    }
    let _ = stop_tx.send(true);
    let _ = out_server.await;
    tracing::info!("stopped");
    Ok(())
}

async fn serve_outbound(
    listener: TcpListener,
    tls: Option<ServerTlsConfig>,
    outbound: Front,
    admin: Admin,
    mut stop: watch::Receiver<bool>,
) -> Result<(), tonic::transport::Error> {
    let (reporter, health_service) = tonic_health::server::health_reporter();
    set_health(&reporter, ServingStatus::Serving).await;
    let mut builder = Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    builder
        .add_service(health_service)
        .add_service(reflection())
        .add_service(SidecarAdminServer::new(admin))
        .add_service(GenerationServer::new(outbound))
        .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)) /* small frames (a token, a refusal) must not wait for a delayed ACK */, async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await
}

/// Starts the inbound server in front of the node and registers it.
async fn start_inbound(
    cfg: &SidecarConfig,
    node: &crate::config::NodeSection,
    tls: Option<&TlsMaterial>,
    registry: &EtcdRegistry,
    metrics: SidecarMetrics,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<(Draining, HealthReporter, Arc<Bulkhead>, SocketAddr)> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{}", node.address))?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true);
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls.client())?;
    }
    let channel = endpoint.connect_lazy();
    let model = registration::node_model(channel.clone()).await;
    let service = node.service.clone().unwrap_or_else(|| model.name.clone());
    let limits = cfg.services.iter().find(|s| s.name == service).cloned().unwrap_or_else(|| ServiceLimits {
        name: service.clone(),
        max_concurrency: model.max_running.max(1) as usize,
        max_queue: 2 * model.max_running.max(1) as usize,
        max_queue_wait: Duration::from_secs(5),
    });
    let bulkhead = Bulkhead::new(limits);
    let draining = Draining::default();
    let front = inbound_stack(
        cfg,
        &service,
        GenerationClient::new(channel.clone()),
        (bulkhead.clone(), draining.clone()),
        &metrics,
    );
    let listener = TcpListener::bind(cfg.listen.inbound).await?;
    let bound: SocketAddr = listener.local_addr()?;
    tracing::info!("inbound listening on {bound}");
    let (reporter, health_service) = tonic_health::server::health_reporter();
    set_health(&reporter, ServingStatus::Serving).await;
    tokio::spawn(mirror_node_health(channel, reporter.clone(), stop.clone()));
    let mut builder = Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls.mutual_server())?;
    }
    tokio::spawn(async move {
        builder
            .add_service(health_service)
            .add_service(reflection())
            .add_service(GenerationServer::new(front))
            .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
    });
    let advertise = cfg.listen.advertise.clone().unwrap_or_else(|| bound.to_string());
    registry.register(registration::record(node, &model, &service, &advertise)).await?;
    tracing::info!(%service, %advertise, "node registered in the mesh");
    Ok((draining, reporter, bulkhead, bound))
}

/// The inbound side is healthy exactly when its node is.
async fn mirror_node_health(node: Channel, reporter: HealthReporter, stop: watch::Receiver<bool>) {
    let mut client = HealthClient::new(node);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    while !*stop.borrow() {
        tick.tick().await;
        let req = HealthCheckRequest { service: GENERATION.into() };
        let serving = matches!(
            tokio::time::timeout(Duration::from_millis(400), client.check(req)).await,
            Ok(Ok(r)) if r.get_ref().status() == health_check_response::ServingStatus::Serving
        );
        let status = if serving { ServingStatus::Serving } else { ServingStatus::NotServing };
        set_health(&reporter, status).await;
    }
}

async fn set_health(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    reporter.set_service_status(GENERATION, status).await;
}

fn reflection()
-> tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(mesh_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the embedded descriptor sets are valid")
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => tracing::error!("cannot listen for signals; stopping"),
    }
}
