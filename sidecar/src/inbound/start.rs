//! Starting the inbound side: reach the node, learn what it serves, serve
//! the inbound stack in front of it (behind the listener's identity rule),
//! mirror its health, and register it in the mesh.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use daemon::gate::GateLayer;
use daemon::grpc::{Listening, Services};
use daemon::health::{GENERATION, Health};
use mesh_proto::v1::ModelInfo;
use prometheus_client::metrics::counter::Counter;
use registry::{EtcdRegistry, InstanceRecord, Registry};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response};

use super::bulkhead::Bulkhead;
use super::identity::Authorized;
use crate::config::{NodeSection, ServiceLimits, SidecarConfig};
use crate::registration;
use crate::stack::Front;
use crate::tls::TlsMaterial;
use crate::upstream::{Dialer, Peer};
use crate::wire::generation_server::GenerationServer;

/// The node, as the inbound side reaches it.
pub struct Node {
    pub channel: Channel,
    pub model: ModelInfo,
    /// The service it is registered under.
    pub service: String,
    pub bulkhead: Arc<Bulkhead>,
}

/// Connects to the node and waits until it says what it serves; its
/// bulkhead is its `[[services]]` entry or sized from the node.
pub async fn connect(node: &NodeSection, dial: &Dialer, services: &[ServiceLimits]) -> anyhow::Result<Node> {
    // Every stream this node serves shares this one connection (the node is
    // local, so a lost connection means the node itself is gone); the
    // settings that let it carry them are in `upstream::Dialer`.
    let channel = dial.endpoint(&node.address, Peer::Node)?.connect_lazy();
    let model = registration::node_model(channel.clone()).await;
    let service = node.service.clone().unwrap_or_else(|| model.name.clone());
    let limits = services.iter().find(|s| s.name == service).cloned().unwrap_or_else(|| ServiceLimits {
        name: service.clone(),
        max_concurrency: model.max_running.max(1) as usize,
        max_queue: 2 * model.max_running.max(1) as usize,
        max_queue_wait: Duration::from_secs(5),
    });
    Ok(Node { channel, model, service, bulkhead: Bulkhead::new(limits) })
}

/// The inbound side once it serves.
pub struct Serving {
    pub health: Health,
    pub addr: SocketAddr,
    /// The node's record, as registered.
    pub record: InstanceRecord,
}

/// Serves `front` on `listen.inbound` until `stop`, then registers the node.
pub async fn serve(
    cfg: &SidecarConfig,
    (section, node): (&NodeSection, &Node),
    front: Front,
    (tls, refused): (Option<&TlsMaterial>, Counter),
    registry: &EtcdRegistry,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<Serving> {
    let listener = TcpListener::bind(cfg.listen.inbound).await?;
    let bound = listener.local_addr()?;
    tracing::info!("inbound listening on {bound}");
    let (health, health_service) = Health::new();
    health.set(true).await;
    tokio::spawn(mirror_node_health(node.channel.clone(), health.clone(), stop.clone()));
    // Plaintext has no identities to check (and is on loopback unless the
    // config says otherwise); with TLS, only `tls.inbound_peers` are served,
    // on every service (health from loopback stays open).
    let allow = tls.map(|t| t.inbound_peers.clone()).unwrap_or_default();
    let server = GenerationServer::new(Authorized(front));
    let services = Services::new(server.max_decoding_message_size(cfg.max_request_bytes));
    let shutdown = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let gate = GateLayer::new("inbound", allow, refused);
    let how = Listening { http2: cfg.http2, tls: tls.map(TlsMaterial::mutual_server), gate };
    tokio::spawn(daemon::grpc::serve(how, listener, health_service, services, shutdown));
    let advertise = registration::advertise(cfg.listen.advertise.as_deref(), bound, &cfg.etcd.endpoints).await?;
    let record = registration::record(section, &node.model, &node.service, &advertise);
    registry.register(record.clone()).await?;
    tracing::info!(service = %node.service, %advertise, "node registered in the mesh");
    Ok(Serving { health, addr: bound, record })
}

/// The inbound side is healthy exactly when its node is. The record stays
/// registered: a crashed or hung node is ejected by every caller (outlier
/// detection, in about a second), and systemd restarts the sidecar with its
/// node (`PartOf=` in mesh-sidecar-node.conf), which deregisters it for the
/// restart. (Leaving etcd on failed health checks instead removed an
/// instance from callers' views while their streams on it were being moved
/// elsewhere, and some of those moves failed.)
async fn mirror_node_health(node: Channel, health: Health, stop: watch::Receiver<bool>) {
    let mut client = HealthClient::new(node);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    while !*stop.borrow() {
        tick.tick().await;
        let req = HealthCheckRequest { service: GENERATION.into() };
        let serving = matches!(
            tokio::time::timeout(Duration::from_millis(400), client.check(req)).await,
            Ok(Ok(r)) if r.get_ref().status() == health_check_response::ServingStatus::Serving
        );
        health.set(serving).await;
    }
}
