//! The outbound side: a client's entry point into the mesh. Its layers, in
//! order, are assembled in `server.rs`: trace, authenticate, overflow,
//! response cache, service slot, route. A gate in front of the listener
//! ([`surfaces`]) holds the other methods on it (models, admin,
//! reflection, health) to the same keys.

pub mod authenticate;
pub mod balancer;
pub mod cache;
pub mod health;
pub mod instance;
pub mod overflow;
pub mod prefix;
pub mod route;
pub mod service_slot;
pub mod surfaces;

use std::sync::Arc;

use mesh_proto::v1::{ListModelsRequest, ListModelsResponse, ModelInfo};
use tonic::Status;

use crate::stack::ListModels;
use balancer::Balancer;

/// `ListModels` on the outbound side: every service the registry knows.
pub fn list_models(balancer: Arc<Balancer>) -> ListModels {
    ListModels::new(tower::service_fn(move |_: ListModelsRequest| {
        let response = ListModelsResponse { models: models(&balancer) };
        async move { Ok::<_, Status>(response) }
    }))
}

fn models(balancer: &Balancer) -> Vec<ModelInfo> {
    let mut models: Vec<ModelInfo> = Vec::new();
    for ep in balancer.all() {
        if models.last().is_some_and(|m| m.name == ep.record.service) {
            continue;
        }
        models.push(ModelInfo {
            name: ep.record.service.clone(),
            context_length: ep.record.context_length,
            max_running: ep.record.max_running,
            ..Default::default()
        });
    }
    models
}
