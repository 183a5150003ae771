//! Authentication, where calls enter the mesh (the outbound side): an API
//! key names the caller's tenant and the services it may use. Config holds
//! only SHA-256 digests; keys are never stored or logged. The tenant then
//! travels to the instance as a claim ([`TENANT_CLAIM`]) that its inbound
//! side believes only because this sidecar's certificate says `role/sidecar`.

use tonic::Status;
use tonic::metadata::{MetadataMap, MetadataValue};

use mesh_proto::api_key::{digest, same_digest};
use mesh_proto::v1::GenerateRequest;

use crate::config::ApiKey;
use crate::stack::{Call, Next, Reply, Step, pass};

/// The metadata an edge sidecar states the call's tenant in.
pub const TENANT_CLAIM: &str = "x-mesh-tenant";

/// Longest tenant name: it is a metadata value and a map key.
const MAX_TENANT: usize = 128;

/// A tenant must fit in a metadata value: printable ASCII, bounded.
pub fn check_tenant(tenant: &str) -> Result<(), String> {
    if tenant.len() > MAX_TENANT || !tenant.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("must be at most {MAX_TENANT} printable ASCII characters, no spaces"));
    }
    Ok(())
}

/// States `tenant` on a call to an instance (checked by [`Authenticate`]).
pub fn attach_claim(tenant: &str, meta: &mut MetadataMap) {
    if let Ok(v) = MetadataValue::try_from(tenant) {
        meta.insert(TENANT_CLAIM, v);
    }
}

/// The layer: a key's tenant replaces whatever tenant the caller claims.
pub struct Authenticate(pub ApiKeys);

impl Step for Authenticate {
    async fn call(&self, mut call: Call, next: Next) -> Result<Reply, Status> {
        if let Some(tenant) = self.0.check(&call.metadata, &call.req)? {
            call.req.tenant = tenant;
        }
        check_tenant(&call.req.tenant).map_err(|e| Status::invalid_argument(format!("tenant: {e}")))?;
        pass(next, call).await
    }
}

pub struct ApiKeys {
    keys: Vec<ApiKey>,
}

impl ApiKeys {
    pub fn new(keys: &[ApiKey]) -> Self {
        let lowercase = |k: &ApiKey| ApiKey { sha256: k.sha256.to_ascii_lowercase(), ..k.clone() };
        Self { keys: keys.iter().map(lowercase).collect() }
    }

    /// The entry `key` belongs to. Every digest is compared, each in
    /// constant time, so the answer's timing says nothing about how close a
    /// guess came to any configured key.
    fn find(&self, key: &str) -> Option<&ApiKey> {
        let presented = digest(key);
        self.keys.iter().fold(None, |found, k| if same_digest(&presented, &k.sha256) { Some(k) } else { found })
    }

    /// The entry of the key in an `authorization` header value; `None`
    /// when no keys are configured (every call passes).
    fn entry(&self, header: Option<&str>) -> Result<Option<&ApiKey>, Status> {
        if self.keys.is_empty() {
            return Ok(None);
        }
        let Some(key) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
            return Err(Status::unauthenticated("missing API key: send the metadata `authorization: Bearer <key>`"));
        };
        self.find(key.trim()).map(Some).ok_or_else(|| Status::unauthenticated("unknown API key"))
    }

    /// Returns the caller's tenant, if its key may make `req`: call its
    /// service and, with `allow_special_tokens`, have its text read as
    /// control tokens (a forged system turn, say), which takes a key with
    /// `allow_special_tokens = true`. Every call passes when no keys are
    /// configured.
    pub fn check(&self, meta: &MetadataMap, req: &GenerateRequest) -> Result<Option<String>, Status> {
        let Some(entry) = self.entry(meta.get("authorization").and_then(|v| v.to_str().ok()))? else {
            return Ok(None);
        };
        let (tenant, service) = (&entry.tenant, &req.model);
        if !entry.services.is_empty() && !entry.services.iter().any(|s| s == service) {
            return Err(Status::permission_denied(format!(
                "tenant {tenant:?} may not use service {service:?} (allowed: {:?})",
                entry.services
            )));
        }
        if req.allow_special_tokens && !entry.allow_special_tokens {
            return Err(Status::permission_denied(format!(
                "allow_special_tokens: tenant {tenant:?} may not send special tokens \
                 (its key needs `allow_special_tokens = true`)"
            )));
        }
        Ok(Some(tenant.clone()))
    }

    /// Whether the key in `header` may call `path`, a method other than
    /// Generate: any key may list models and use reflection and health; the
    /// sidecar's admin service (the fleet's addresses and state) takes a key
    /// with `admin = true`.
    pub fn check_surface(&self, header: Option<&str>, path: &str, admin: bool) -> Result<(), Status> {
        match self.entry(header)? {
            Some(entry) if admin && !entry.admin => Err(Status::permission_denied(format!(
                "tenant {:?} may not call {path}: that takes an admin key (`admin = true` in its [[api_keys]] entry)",
                entry.tenant
            ))),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> ApiKeys {
        ApiKeys::new(&[
            ApiKey { sha256: digest("s3cret"), services: vec!["chat".into()], ..key("acme") },
            ApiKey { sha256: digest("0ps"), admin: true, allow_special_tokens: true, ..key("ops") },
        ])
    }

    fn key(tenant: &str) -> ApiKey {
        ApiKey {
            tenant: tenant.into(),
            sha256: String::new(),
            services: vec![],
            admin: false,
            allow_special_tokens: false,
        }
    }

    fn to(service: &str) -> GenerateRequest {
        GenerateRequest { model: service.into(), ..Default::default() }
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
        assert_eq!(k.check(&bearer("s3cret"), &to("chat")).unwrap(), Some("acme".into()));
        assert_eq!(k.check(&bearer("s3cret"), &to("code")).unwrap_err().code(), tonic::Code::PermissionDenied);
        assert_eq!(k.check(&bearer("guess"), &to("chat")).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert_eq!(k.check(&MetadataMap::new(), &to("chat")).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert_eq!(ApiKeys::new(&[]).check(&MetadataMap::new(), &to("chat")).unwrap(), None);
    }

    #[test]
    fn special_tokens_take_a_key_that_allows_them() {
        let special = GenerateRequest { allow_special_tokens: true, ..to("chat") };
        let refused = keys().check(&bearer("s3cret"), &special).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        assert!(refused.message().starts_with("allow_special_tokens: tenant \"acme\""), "{}", refused.message());
        assert_eq!(keys().check(&bearer("0ps"), &special).unwrap(), Some("ops".into()));
    }

    #[test]
    fn other_surfaces_take_a_key_and_admin_an_admin_key() {
        let k = keys();
        let admin = "/mesh.v1.SidecarAdmin/Instances";
        assert!(k.check_surface(Some("Bearer s3cret"), "/mesh.v1.Generation/ListModels", false).is_ok());
        assert_eq!(k.check_surface(None, "/x", false).unwrap_err().code(), tonic::Code::Unauthenticated);
        let tenant = k.check_surface(Some("Bearer s3cret"), admin, true).unwrap_err();
        assert_eq!(tenant.code(), tonic::Code::PermissionDenied);
        assert!(tenant.message().contains("takes an admin key"), "{}", tenant.message());
        assert!(k.check_surface(Some("Bearer 0ps"), admin, true).is_ok());
        assert!(ApiKeys::new(&[]).check_surface(None, admin, true).is_ok());
    }

    #[test]
    fn a_tenant_is_a_claim_that_fits_in_metadata() {
        assert!(check_tenant("acme-1").is_ok() && check_tenant("").is_ok());
        assert!(check_tenant("a b").unwrap_err().contains("printable ASCII"));
        assert!(check_tenant(&"x".repeat(129)).is_err());
        let mut meta = MetadataMap::new();
        attach_claim("acme", &mut meta);
        assert_eq!(meta.get(TENANT_CLAIM).unwrap(), "acme");
    }
}
