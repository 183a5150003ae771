//! The outbound listener's gate. With API keys configured, every method on
//! it takes a key, not only Generate: listing models and reflection take
//! any key, the admin service an admin key ([`ApiKeys::check_surface`]),
//! and health any key unless asked from loopback (local probes, systemd).
//! Generate itself passes here: [`super::authenticate::Authenticate`]
//! checks its key against the service the body names.

use daemon::gate::{Gate, local_health};
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::http::Request;

use super::authenticate::ApiKeys;

const GENERATE_PATH: &str = "/mesh.v1.Generation/Generate";
const ADMIN_PREFIX: &str = "/mesh.v1.SidecarAdmin/";

pub struct OperatorSurfaces(pub ApiKeys);

impl Gate for OperatorSurfaces {
    fn admit(&self, req: &mut Request<Body>) -> Result<(), Status> {
        let path = req.uri().path();
        if path == GENERATE_PATH || local_health(req) {
            return Ok(());
        }
        let header = req.headers().get("authorization").and_then(|v| v.to_str().ok());
        self.0.check_surface(header, path, path.starts_with(ADMIN_PREFIX))
    }
}

#[cfg(test)]
mod tests {
    use mesh_proto::api_key::digest;

    use super::*;
    use crate::config::ApiKey;

    fn gate() -> OperatorSurfaces {
        let key = ApiKey {
            tenant: "acme".into(),
            sha256: digest("k"),
            services: vec!["chat".into()],
            admin: false,
            allow_special_tokens: false,
        };
        OperatorSurfaces(ApiKeys::new(&[key]))
    }

    fn call(path: &str, key: Option<&str>) -> Result<(), tonic::Code> {
        let mut req = Request::builder().uri(path);
        if let Some(k) = key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        gate().admit(&mut req.body(Body::empty()).unwrap()).map_err(|s| s.code())
    }

    #[test]
    fn only_generate_passes_without_a_key() {
        use tonic::Code::{PermissionDenied, Unauthenticated};
        assert_eq!(call(GENERATE_PATH, None), Ok(()), "Authenticate's to check");
        assert_eq!(call("/mesh.v1.Generation/ListModels", None), Err(Unauthenticated));
        assert_eq!(call("/mesh.v1.Generation/ListModels", Some("k")), Ok(()));
        // Both reflection versions under one rule: any key, and only a key.
        for version in ["v1", "v1alpha"] {
            let reflection = format!("/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo");
            assert_eq!(call(&reflection, None), Err(Unauthenticated), "{version}");
            assert_eq!(call(&reflection, Some("wrong")), Err(Unauthenticated), "{version}");
            assert_eq!(call(&reflection, Some("k")), Ok(()), "{version}");
        }
        assert_eq!(call("/grpc.health.v1.Health/Check", None), Err(Unauthenticated), "no address: not loopback");
        assert_eq!(call("/mesh.v1.SidecarAdmin/Instances", Some("k")), Err(PermissionDenied));
    }
}
