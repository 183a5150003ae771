//! The gRPC face of a stack: tonic's `Generation` service, turning each
//! request into a [`Call`] for the stack and its [`Reply`] into a response.

use mesh_proto::v1::{GenerateRequest, ListModelsRequest, ListModelsResponse};
use tonic::{Request, Response, Status};
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;

use super::{Call, Next, TokenStream};
use crate::wire::generation_server::Generation;

/// How a side answers `ListModels`.
pub type ListModels = BoxCloneSyncService<ListModelsRequest, ListModelsResponse, Status>;

#[derive(Clone)]
pub struct Front {
    generate: Next,
    list_models: ListModels,
}

impl Front {
    pub fn new(generate: Next, list_models: ListModels) -> Self {
        Self { generate, list_models }
    }
}

#[tonic::async_trait]
impl Generation for Front {
    type GenerateStream = TokenStream;

    async fn generate(&self, request: Request<GenerateRequest>) -> Result<Response<TokenStream>, Status> {
        let reply = self.generate.clone().oneshot(Call::new(request)).await?;
        let mut response = Response::new(reply.stream);
        *response.metadata_mut() = reply.metadata;
        Ok(response)
    }

    async fn list_models(&self, request: Request<ListModelsRequest>) -> Result<Response<ListModelsResponse>, Status> {
        self.list_models.clone().oneshot(request.into_inner()).await.map(Response::new)
    }
}
