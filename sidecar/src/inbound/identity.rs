//! Which tenant an inbound call is charged to, before any layer sees it.
//!
//! The caller is the identity in its client certificate, and the
//! listener's gate (`daemon::tls::Allow`, in `start.rs`) has already
//! served only `tls.inbound_peers` (any sidecar by default): a client
//! host's certificate from the same CA is refused, because only a sidecar
//! checks API keys before calling in. The tenant is a sidecar's claim
//! ([`TENANT_CLAIM`]); any other caller is charged as itself, so neither a
//! body `tenant` nor a claim from it selects someone else's limits.

use daemon::tls::{Role, WorkloadId, caller};
use mesh_proto::v1::{GenerateRequest, ListModelsRequest, ListModelsResponse};
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use crate::outbound::authenticate::TENANT_CLAIM;
use crate::stack::{Front, TokenStream};
use crate::wire::generation_server::Generation;

/// The inbound stack behind the listener's gate, which admitted the
/// caller and left its identity in the request.
pub struct Authorized(pub Front);

/// The tenant the call is charged to. A sidecar's claim is believed (it
/// checked the caller's key); without a claim, or from anyone else, the
/// tenant is the caller's own identity. `None` is a plaintext caller:
/// there are no identities, so the operator, who kept it on loopback or
/// said `insecure_plaintext_anywhere`, trusts it as a sidecar.
pub fn tenant(peer: Option<&WorkloadId>, meta: &MetadataMap) -> String {
    let claim = || meta.get(TENANT_CLAIM).and_then(|v| v.to_str().ok()).map(str::to_string);
    match peer {
        Some(id) if id.role == Role::Sidecar => claim().unwrap_or_else(|| id.to_string()),
        Some(id) => id.to_string(),
        None => claim().unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl Generation for Authorized {
    type GenerateStream = TokenStream;

    async fn generate(&self, mut request: Request<GenerateRequest>) -> Result<Response<TokenStream>, Status> {
        let charged = tenant(caller(&request), request.metadata());
        request.get_mut().tenant = charged;
        self.0.generate(request).await
    }

    async fn list_models(&self, request: Request<ListModelsRequest>) -> Result<Response<ListModelsResponse>, Status> {
        self.0.list_models(request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claiming(tenant: &str) -> MetadataMap {
        let mut meta = MetadataMap::new();
        meta.insert(TENANT_CLAIM, tenant.parse().unwrap());
        meta
    }

    #[test]
    fn only_a_sidecars_claim_names_the_tenant() {
        let sidecar: WorkloadId = "spiffe://mesh/host/a/role/sidecar".parse().unwrap();
        let operator: WorkloadId = "spiffe://mesh/host/ops/role/operator".parse().unwrap();
        assert_eq!(tenant(Some(&sidecar), &claiming("acme")), "acme");
        assert_eq!(tenant(Some(&sidecar), &MetadataMap::new()), "spiffe://mesh/host/a/role/sidecar");
        assert_eq!(tenant(Some(&operator), &claiming("acme")), "spiffe://mesh/host/ops/role/operator");
        assert_eq!(tenant(None, &claiming("acme")), "acme", "plaintext: trusted by configuration");
        assert_eq!(tenant(None, &MetadataMap::new()), "");
    }
}
