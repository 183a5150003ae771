//! Learning what the local node serves and announcing it in the registry.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use mesh_proto::v1::generation_client::GenerationClient;
use mesh_proto::v1::{ListModelsRequest, ModelInfo};
use registry::InstanceRecord;
use registry::backoff::Backoff;
use tonic::transport::Channel;

use crate::config::NodeSection;

/// Asks the node what it serves, waiting (with a capped, jittered backoff)
/// until it answers: a sidecar may start before its node has loaded its weights.
pub async fn node_model(node: Channel) -> ModelInfo {
    let mut client = GenerationClient::new(node);
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        match client.list_models(ListModelsRequest {}).await {
            Ok(r) => {
                if let Some(m) = r.into_inner().models.into_iter().next() {
                    return m;
                }
                tracing::warn!("node serves no model yet");
            }
            Err(e) => tracing::info!(error = %e.message(), "waiting for the node"),
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

pub fn record(node: &NodeSection, model: &ModelInfo, service: &str, advertise: &str) -> InstanceRecord {
    let mut rec = InstanceRecord::new(service, advertise, advertise);
    rec.host = if node.host.is_empty() { telemetry::hostname() } else { node.host.clone() };
    rec.zone = node.zone.clone();
    rec.weight = node.weight;
    rec.version = node.version.clone();
    rec.max_running = model.max_running;
    rec.context_length = model.context_length;
    rec.kv_tokens = model.max_kv_tokens;
    (rec.spare, rec.standby) = (node.standby, node.standby);
    rec
}

/// The address other hosts dial for this inbound side: `listen.advertise`
/// when set; else the bound address when it names one interface; else
/// (bound to every interface) this host's address on its route to etcd,
/// the network every mesh host shares, with the bound port. So hosts that
/// share one config file still advertise each their own address.
pub async fn advertise(configured: Option<&str>, bound: SocketAddr, etcd: &[String]) -> anyhow::Result<String> {
    if let Some(addr) = configured {
        return Ok(addr.to_string());
    }
    if !bound.ip().is_unspecified() {
        return Ok(bound.to_string());
    }
    for endpoint in etcd {
        if let Some(ip) = route_to(endpoint).await {
            return Ok(SocketAddr::new(ip, bound.port()).to_string());
        }
    }
    anyhow::bail!("listen.advertise: not set, and no route to any etcd endpoint shows this host's address ({etcd:?})")
}

/// The local address the kernel would send from to reach `endpoint` (a
/// URL such as `https://10.77.0.1:2379`); connecting a UDP socket sends
/// nothing.
async fn route_to(endpoint: &str) -> Option<IpAddr> {
    let authority = endpoint.split("://").last()?.split('/').next()?;
    let target = tokio::net::lookup_host(authority).await.ok()?.next()?;
    let local: SocketAddr = if target.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (Ipv6Addr::UNSPECIFIED, 0).into() };
    let socket = std::net::UdpSocket::bind(local).ok()?;
    socket.connect(target).ok()?;
    Some(socket.local_addr().ok()?.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn advertises_the_configured_then_the_bound_then_the_route_to_etcd() {
        let any: SocketAddr = "0.0.0.0:7101".parse().unwrap();
        let etcd = ["https://127.0.0.1:2379".to_string()];
        assert_eq!(advertise(Some("10.0.0.5:9"), any, &etcd).await.unwrap(), "10.0.0.5:9");
        assert_eq!(advertise(None, "127.0.0.2:7101".parse().unwrap(), &etcd).await.unwrap(), "127.0.0.2:7101");
        assert_eq!(advertise(None, any, &etcd).await.unwrap(), "127.0.0.1:7101");
        let none = advertise(None, any, &["https://no-such-host.invalid:2379".to_string()]).await;
        assert!(none.unwrap_err().to_string().contains("listen.advertise"));
    }
}
