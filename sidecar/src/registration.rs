//! Learning what the local node serves and announcing it in the registry.

use std::time::Duration;

use mesh_proto::v1::generation_client::GenerationClient;
use mesh_proto::v1::{ListModelsRequest, ModelInfo};
use registry::InstanceRecord;
use registry::backoff::Backoff;
use tonic::transport::Channel;

use crate::config::NodeSection;

/// Asks the node what it serves, waiting (with a capped, jittered backoff)
/// until it answers: a sidecar may start before its node has loaded its weights.
pub async fn node_model(node: Channel) -> ModelInfo {
    let mut client = GenerationClient::new(node);
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        match client.list_models(ListModelsRequest {}).await {
            Ok(r) => {
                if let Some(m) = r.into_inner().models.into_iter().next() {
                    return m;
                }
                tracing::warn!("node serves no model yet");
            }
            Err(e) => tracing::info!(error = %e.message(), "waiting for the node"),
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

pub fn record(node: &NodeSection, model: &ModelInfo, service: &str, advertise: &str) -> InstanceRecord {
    let mut rec = InstanceRecord::new(service, advertise, advertise);
    rec.host = node.host.clone();
    rec.zone = node.zone.clone();
    rec.weight = node.weight;
    rec.version = node.version.clone();
    rec.max_running = model.max_running;
    rec.context_length = model.context_length;
    rec
}
