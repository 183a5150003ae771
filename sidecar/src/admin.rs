//! `mesh.v1.SidecarAdmin`: the sidecar's own view, for `meshctl status --sidecar`.

use std::sync::Arc;
use std::time::Instant;

use mesh_proto::v1::sidecar_admin_server::SidecarAdmin;
use mesh_proto::v1::{InstanceState, InstancesRequest, InstancesResponse};
use registry::View;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::outbound::balancer::Balancer;
use crate::outbound::instance::Health;

pub struct Admin {
    pub balancer: Arc<Balancer>,
    pub view: watch::Receiver<Arc<View>>,
}

#[tonic::async_trait]
impl SidecarAdmin for Admin {
    async fn instances(&self, _: Request<InstancesRequest>) -> Result<Response<InstancesResponse>, Status> {
        let now = Instant::now();
        let instances = self
            .balancer
            .all()
            .iter()
            .map(|ep| {
                let (ejected, reason, left) = match ep.health() {
                    Health::Ejected { until, reason } => (true, reason, until.saturating_duration_since(now)),
                    Health::Probation { .. } => (false, "on probation after ejection".into(), Default::default()),
                    Health::Healthy => (false, String::new(), Default::default()),
                };
                InstanceState {
                    service: ep.record.service.clone(),
                    instance_id: ep.record.instance_id.clone(),
                    address: ep.record.address.clone(),
                    weight: ep.record.weight,
                    in_flight: ep.in_flight(),
                    ewma_ttft_ms: ep.ewma_ttft().as_secs_f64() * 1e3,
                    reported_queued: ep.reported_queued(),
                    ejected,
                    ejected_reason: reason,
                    ejected_for_ms: left.as_millis() as u64,
                }
            })
            .collect();
        let etcd_reachable = self.view.borrow().etcd_reachable;
        Ok(Response::new(InstancesResponse { instances, etcd_reachable }))
    }
}
