//! Authentication, where calls enter the mesh (the outbound side): an API
//! key names the caller's tenant and the services it may use. Config holds
//! only SHA-256 digests; keys are never stored or logged.

use std::collections::HashMap;

use tonic::Status;
use tonic::metadata::MetadataMap;

use mesh_proto::api_key::digest;

use crate::config::ApiKey;
use crate::stack::{Call, Next, Reply, Step, pass};

/// The layer: a key's tenant replaces whatever tenant the caller claims.
pub struct Authenticate(pub ApiKeys);

impl Step for Authenticate {
    async fn call(&self, mut call: Call, next: Next) -> Result<Reply, Status> {
        if let Some(tenant) = self.0.check(&call.metadata, &call.req.model)? {
            call.req.tenant = tenant;
        }
        pass(next, call).await
    }
}

pub struct ApiKeys {
    by_digest: HashMap<String, ApiKey>,
}

impl ApiKeys {
    pub fn new(keys: &[ApiKey]) -> Self {
        Self { by_digest: keys.iter().map(|k| (k.sha256.to_ascii_lowercase(), k.clone())).collect() }
    }

    /// Returns the caller's tenant; every call passes when no keys are configured.
    pub fn check(&self, meta: &MetadataMap, service: &str) -> Result<Option<String>, Status> {
        if self.by_digest.is_empty() {
            return Ok(None);
        }
        let header = meta.get("authorization").and_then(|v| v.to_str().ok());
        let Some(key) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
            return Err(Status::unauthenticated("missing API key: send the metadata `authorization: Bearer <key>`"));
        };
        let Some(entry) = self.by_digest.get(&digest(key.trim())) else {
            return Err(Status::unauthenticated("unknown API key"));
        };
        if !entry.services.is_empty() && !entry.services.iter().any(|s| s == service) {
            return Err(Status::permission_denied(format!(
                "tenant {:?} may not use service {service:?} (allowed: {:?})",
                entry.tenant, entry.services
            )));
        }
        Ok(Some(entry.tenant.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> ApiKeys {
        ApiKeys::new(&[ApiKey { tenant: "acme".into(), sha256: digest("s3cret"), services: vec!["chat".into()] }])
    }

    fn bearer(key: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", format!("Bearer {key}").parse().unwrap());
        m
    }

    #[test]
    fn keys_map_to_tenants_and_services() {
        assert_eq!(digest("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        let k = keys();
        assert_eq!(k.check(&bearer("s3cret"), "chat").unwrap(), Some("acme".into()));
        assert_eq!(k.check(&bearer("s3cret"), "code").unwrap_err().code(), tonic::Code::PermissionDenied);
        assert_eq!(k.check(&bearer("guess"), "chat").unwrap_err().code(), tonic::Code::Unauthenticated);
        assert_eq!(k.check(&MetadataMap::new(), "chat").unwrap_err().code(), tonic::Code::Unauthenticated);
        assert_eq!(ApiKeys::new(&[]).check(&MetadataMap::new(), "chat").unwrap(), None);
    }
}
