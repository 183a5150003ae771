//! Active health checks (grpc.health.v1) of every known instance, and the
//! periodic success-rate check. A hung instance (SIGSTOP) answers no probe:
//! its failures count like failed requests; an ejected instance that
//! passes a probe goes on probation.

use std::sync::Arc;
use std::time::Instant;

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use super::balancer::Balancer;
use super::instance::{Instance, Outcome};

pub fn spawn(balancer: Arc<Balancer>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(balancer.outlier().health_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            balancer.check_success_rates();
            balancer.export_gauges();
            let probes = balancer.all().into_iter().map(|ep| {
                let balancer = balancer.clone();
                async move {
                    let serving = probe(&ep, &balancer).await;
                    if ep.is_ejected() {
                        ep.probe_result(serving, balancer.outlier(), Instant::now());
                    } else if !serving {
                        balancer.record(&ep, Outcome::Failure, "health probe failed");
                    }
                }
            });
            futures_join_all(probes).await;
        }
    })
}

async fn probe(ep: &Instance, balancer: &Balancer) -> bool {
    let mut client = HealthClient::new(ep.channel.clone());
    let req = HealthCheckRequest { service: "mesh.v1.Generation".into() };
    matches!(
        tokio::time::timeout(balancer.outlier().health_timeout, client.check(req)).await,
        Ok(Ok(r)) if r.get_ref().status() == ServingStatus::Serving
    )
}

/// Runs the probes concurrently (each has its own timeout).
async fn futures_join_all(probes: impl Iterator<Item = impl std::future::Future<Output = ()> + Send + 'static>) {
    let tasks: Vec<_> = probes.map(tokio::spawn).collect();
    for t in tasks {
        let _ = t.await;
    }
}
