//! The sidecar's wiring: both request paths as stacks of layers, the
//! registry and balancer behind them, and the drain on SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use daemon::gate::GateLayer;
use daemon::grpc::{Listening, Services};
use daemon::health::Health;
use mesh_proto::v1::sidecar_admin_server::SidecarAdminServer;
use registry::{EtcdRegistry, Registry};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceBuilder;

use crate::admin::Admin;
use crate::config::SidecarConfig;
use crate::edge::Edge;
use crate::inbound::accept::{Accept, Draining};
use crate::inbound::admission::Admission;
use crate::inbound::charge::ChargeTenant;
use crate::inbound::standby;
use crate::inbound::start::{self, Node};
use crate::inbound::tenants::Tenants;
use crate::metrics::SidecarMetrics;
use crate::outbound::authenticate::{ApiKeys, Authenticate};
use crate::outbound::balancer::Balancer;
use crate::outbound::cache::ResponseCache;
use crate::outbound::overflow::Overflow;
use crate::outbound::route::Route;
use crate::outbound::service_slot::{Known, ServiceSlot};
use crate::outbound::surfaces::OperatorSurfaces;
use crate::stack::{Front, ListModels, Next, step};
use crate::tls::TlsMaterial;
use crate::trace::{Hop, Trace};
use crate::upstream::Dialer;
use crate::wire::generation_client::GenerationClient;
use crate::wire::generation_server::GenerationServer;

/// The outbound request path, first layer first, shared by the gRPC
/// listener and the HTTP edge. Overflow sits above the cache, so a cache
/// hit of the primary comes first and an overflowed answer is cached under
/// the service that gave it, never the primary's.
fn outbound_stack(cfg: &SidecarConfig, balancer: &Arc<Balancer>, metrics: &SidecarMetrics) -> (Next, ListModels) {
    let registered = balancer.clone();
    let known: Known = Arc::new(move |s| registered.knows(s));
    let cache = cfg.response_cache.enabled;
    let generate = ServiceBuilder::new()
        .layer(step(Trace::new(Hop::Outbound { known: known.clone() }, metrics.clone())))
        .layer(step(Authenticate(ApiKeys::new(&cfg.api_keys))))
        .layer(step(Overflow::new(&cfg.routing.overflow, ApiKeys::new(&cfg.api_keys), metrics.clone())))
        .option_layer(cache.then(|| step(ResponseCache::new(&cfg.response_cache, metrics.response_cache.clone()))))
        .layer(step(ServiceSlot::new(cfg.routing.max_streams_per_service, known, metrics.clone())))
        .service(Route::new(balancer.clone(), cfg.routing.clone(), metrics.clone()).service());
    (Next::new(generate), crate::outbound::list_models(balancer.clone()))
}

/// The inbound request path, first layer first.
fn inbound_stack(cfg: &SidecarConfig, node: &Node, draining: Draining, metrics: &SidecarMetrics) -> Front {
    let (service, client) = (node.service.clone(), GenerationClient::new(node.channel.clone()));
    // The queue's limit beside its depth, for NodeQueueNearlyFull.
    metrics.queue_limit.get_or_create(&metrics.service(&service)).set(node.bulkhead.max_queue() as i64);
    let generate = ServiceBuilder::new()
        .layer(step(Trace::new(Hop::Inbound { service: service.clone() }, metrics.clone())))
        .layer(step(Accept { service: service.clone(), draining }))
        .layer(step(ChargeTenant { tenants: Arc::new(Tenants::new(cfg.tenants.clone())), metrics: metrics.clone() }))
        .layer(step(Admission { service, bulkhead: node.bulkhead.clone(), metrics: metrics.clone() }))
        .service(crate::inbound::node::service(client.clone()));
    Front::new(Next::new(generate), crate::inbound::list_models(client))
}

pub async fn run(cfg: SidecarConfig) -> anyhow::Result<()> {
    let metrics = SidecarMetrics::new();
    let mut addresses = Vec::new();
    if let Some(addr) = cfg.metrics_listen {
        addresses.push((
            "metrics",
            daemon::metrics::serve(addr, cfg.metrics_token_file.as_deref(), |r| metrics.register(r)).await?,
        ));
    }
    let tls = cfg.tls.as_ref().map(TlsMaterial::load).transpose()?;
    let dial = Dialer { tls: tls.as_ref().map(TlsMaterial::client), http2: cfg.http2 };
    let registry = EtcdRegistry::start(cfg.etcd().with_stats(metrics.registry_stats.clone()))?;
    let balancer = Arc::new(Balancer::new(&cfg.routing, cfg.outlier.clone(), metrics.clone(), dial.clone()));
    Balancer::follow(balancer.clone(), registry.watch(), metrics.etcd_reachable.clone());
    crate::outbound::health::spawn(balancer.clone());

    let (stop_tx, stop_rx) = watch::channel(false);
    let admin = Admin { balancer: balancer.clone(), view: registry.watch() };
    let (generate, list_models) = outbound_stack(&cfg, &balancer, &metrics);
    let edge = serve_edge(&cfg, (&generate, &list_models), &metrics, stop_rx.clone()).await?;
    if let Some((bound, _)) = &edge {
        addresses.push(("http", *bound));
    }
    let generation = GenerationServer::new(Front::new(generate, list_models));
    let services = Services::new(generation.max_decoding_message_size(cfg.max_request_bytes))
        .add_service(SidecarAdminServer::new(admin));
    let gate = GateLayer::new("outbound", OperatorSurfaces(ApiKeys::new(&cfg.api_keys)), metrics.refused("outbound"));
    let (out_addr, out_server) = serve_outbound(&cfg, (tls.as_ref(), gate), services, stop_rx.clone()).await?;
    addresses.push(("outbound", out_addr));

    let shutdown = daemon::signal::shutdown();
    tokio::pin!(shutdown);
    let draining = Draining::default();
    let inbound = match &cfg.node {
        // A node that never comes up must not make the sidecar deaf to SIGTERM.
        Some(section) => tokio::select! {
            started = start_inbound(&cfg, section, (tls.as_ref(), &dial), &registry, (&metrics, &draining), stop_rx.clone()) => Some(started?),
            _ = &mut shutdown => None,
        },
        None => None,
    };
    let registered = match &inbound {
        Some((_, serving)) => tokio::select! {
            () = in_etcd(&registry, &serving.record) => true,
            _ = &mut shutdown => false,
        },
        None => false,
    };
    if let (true, Some(section), Some((node, serving))) = (registered, &cfg.node, &inbound) {
        let every = section.load_report_interval;
        standby::spawn(cfg.etcd(), &registry, &serving.record, node.bulkhead.clone(), every);
    }
    if registered || cfg.node.is_none() {
        addresses.extend(inbound.as_ref().map(|(_, serving)| ("inbound", serving.addr)));
        daemon::ready::announce("sidecar", &addresses);
        shutdown.await;
    }
    let edge = edge.map(|(_, connections)| connections);
    stop(&cfg, stop_tx, &registry, (inbound.as_ref(), &draining), (out_server, edge)).await;
    Ok(())
}

type Server = tokio::task::JoinHandle<Result<(), tonic::transport::Error>>;

/// The drain on SIGTERM: every listener stops taking calls, this sidecar's
/// records leave etcd, and the streams in flight (at the node, outbound
/// gRPC, through the HTTP edge: a client sidecar's whole traffic) finish
/// within one `drain_grace`.
async fn stop(
    cfg: &SidecarConfig,
    stop: watch::Sender<bool>,
    registry: &EtcdRegistry,
    (inbound, draining): (Option<&(Node, start::Serving)>, &Draining),
    (outbound, edge): (Server, Option<tokio::task::JoinHandle<()>>),
) {
    daemon::ready::stopping();
    tracing::info!("draining");
    let deadline = tokio::time::Instant::now() + cfg.drain_grace;
    let _ = stop.send(true);
    registry.shutdown().await.ok(); // our records vanish from every watcher at once
    if let Some((node, serving)) = inbound {
        draining.start();
        serving.health.set(false).await;
        drain(node, deadline).await;
    }
    let edge = async move {
        if let Some(connections) = edge {
            let _ = connections.await;
        }
    };
    if tokio::time::timeout_at(deadline, async { tokio::join!(outbound, edge) }).await.is_err() {
        tracing::warn!("drain grace expired with outbound streams still open");
    }
    tracing::info!("stopped");
}

/// Resolves once this sidecar's record is in etcd, as its own watch sees
/// it: readiness (systemd's READY=1, the ready line) means "routable", not
/// "asked to register" (nor "another host's record holds this address").
async fn in_etcd(registry: &EtcdRegistry, record: &registry::InstanceRecord) {
    let key = (record.service.clone(), record.instance_id.clone());
    let mut view = registry.watch();
    let mut waiting = tokio::time::interval(Duration::from_secs(10));
    waiting.tick().await;
    loop {
        if view.borrow_and_update().instances.get(&key) == Some(record) {
            return;
        }
        tokio::select! {
            changed = view.changed() => if changed.is_err() { return std::future::pending().await },
            _ = waiting.tick() => tracing::info!("not ready: the record of {key:?} is not in etcd yet: {:?}", registry.registrar_state().borrow().clone()),
        }
    }
}

async fn serve_outbound(
    cfg: &SidecarConfig,
    (tls, gate): (Option<&TlsMaterial>, GateLayer),
    services: Services,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<(SocketAddr, Server)> {
    let listener = TcpListener::bind(cfg.listen.outbound).await?;
    let bound = listener.local_addr()?;
    tracing::info!("outbound listening on {bound}");
    let (health, health_service) = Health::new();
    health.set(true).await;
    let tls = tls.filter(|t| t.outbound).map(TlsMaterial::server);
    let shutdown = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let how = Listening { http2: cfg.http2, tls, gate };
    let server = daemon::grpc::serve(how, listener, health_service, services, shutdown);
    Ok((bound, tokio::spawn(server)))
}

/// Serves the HTTP edge on `listen.http`, if set, down the outbound stack.
async fn serve_edge(
    cfg: &SidecarConfig,
    (generate, list_models): (&Next, &ListModels),
    metrics: &SidecarMetrics,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Option<(SocketAddr, tokio::task::JoinHandle<()>)>> {
    let Some(addr) = cfg.listen.http else { return Ok(None) };
    let edge = Edge {
        generate: generate.clone(),
        list_models: list_models.clone(),
        keys: ApiKeys::new(&cfg.api_keys),
        max_body: cfg.max_request_bytes,
        requests: metrics.http_requests.clone(),
    };
    Ok(Some(crate::edge::serve(addr, crate::edge::router(Arc::new(edge)), stop).await?))
}

/// Starts the inbound side in front of the node and registers it.
async fn start_inbound(
    cfg: &SidecarConfig,
    section: &crate::config::NodeSection,
    (tls, dial): (Option<&TlsMaterial>, &Dialer),
    registry: &EtcdRegistry,
    (metrics, draining): (&SidecarMetrics, &Draining),
    stop: watch::Receiver<bool>,
) -> anyhow::Result<(Node, start::Serving)> {
    let node = start::connect(section, dial, &cfg.services).await?;
    let front = inbound_stack(cfg, &node, draining.clone(), metrics);
    let serving = start::serve(cfg, (section, &node), front, (tls, metrics.refused("inbound")), registry, stop).await?;
    Ok((node, serving))
}

/// Waits (until `deadline`) for the streams at the node to finish.
async fn drain(node: &Node, deadline: tokio::time::Instant) {
    let drained = tokio::time::timeout_at(deadline, async {
        while node.bulkhead.in_use() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    if drained.await.is_err() {
        tracing::warn!("drain grace expired with streams still open");
    }
}
