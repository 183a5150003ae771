//! The inbound side: the gate in front of this sidecar's own node. Before
//! the stack, `identity` checks who calls and fixes the tenant; the
//! stack's layers, in order, are assembled in `server.rs`: trace, accept
//! (drain), charge the tenant, admission (the bulkhead), the node. Every
//! refusal is fast and says when to come back.

pub mod accept;
pub mod admission;
pub mod bulkhead;
pub mod charge;
pub mod identity;
pub mod node;
pub mod standby;
pub mod start;
pub mod tenants;

use mesh_proto::v1::ListModelsRequest;
use tonic::transport::Channel;

use crate::stack::ListModels;
use crate::wire::generation_client::GenerationClient;

/// `ListModels` on the inbound side: the node's own answer.
pub fn list_models(node: GenerationClient<Channel>) -> ListModels {
    ListModels::new(tower::service_fn(move |req: ListModelsRequest| {
        let mut node = node.clone();
        async move { node.list_models(req).await.map(tonic::Response::into_inner) }
    }))
}
