//! `grpc.health.v1.Health` for a mesh daemon. Callers probe either the
//! server as a whole (`""`) or the service (`mesh.v1.Generation`); both
//! always say the same thing, so one call sets both.

use tonic_health::ServingStatus;
use tonic_health::server::{HealthReporter, HealthService};

/// The service name health checks use for generation.
pub const GENERATION: &str = "mesh.v1.Generation";

/// The health service to hand to [`crate::grpc::serve`].
pub type HealthServer = tonic_health::pb::health_server::HealthServer<HealthService>;

/// What this daemon's health service reports; clones share one status.
#[derive(Clone, Debug)]
pub struct Health {
    reporter: HealthReporter,
}

impl Health {
    /// A handle and the service it drives. Until the first [`Health::set`],
    /// `""` reads SERVING (tonic-health's default) and `mesh.v1.Generation`
    /// is unknown (NOT_FOUND): set it before serving.
    pub fn new() -> (Self, HealthServer) {
        let reporter = HealthReporter::new();
        let server = HealthServer::new(HealthService::from_health_reporter(reporter.clone()));
        (Self { reporter }, server)
    }

    /// Reports SERVING (or NOT_SERVING) for `""` and `mesh.v1.Generation` together.
    pub async fn set(&self, serving: bool) {
        let status = if serving { ServingStatus::Serving } else { ServingStatus::NotServing };
        self.reporter.set_service_status("", status).await;
        self.reporter.set_service_status(GENERATION, status).await;
    }
}

#[cfg(test)]
mod tests {
    use tonic::Request;
    use tonic_health::pb::health_check_response::ServingStatus as Wire;
    use tonic_health::pb::health_server::Health as _;
    use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

    use super::*;

    async fn check(service: &HealthService, name: &str) -> Result<Wire, tonic::Code> {
        let req = Request::new(HealthCheckRequest { service: name.into() });
        service.check(req).await.map(|r| HealthCheckResponse::status(r.get_ref())).map_err(|s| s.code())
    }

    #[tokio::test]
    async fn set_moves_both_names_together() {
        let (health, _server) = Health::new();
        let service = HealthService::from_health_reporter(health.reporter.clone());
        assert_eq!(check(&service, GENERATION).await, Err(tonic::Code::NotFound), "unknown before the first set");

        health.set(true).await;
        assert_eq!(check(&service, "").await, Ok(Wire::Serving));
        assert_eq!(check(&service, GENERATION).await, Ok(Wire::Serving));

        health.clone().set(false).await;
        assert_eq!(check(&service, "").await, Ok(Wire::NotServing));
        assert_eq!(check(&service, GENERATION).await, Ok(Wire::NotServing));
    }
}
