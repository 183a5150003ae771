//! The HTTP edge (OpenAI's API on the client sidecar) against a real mesh:
//! etcd, a node, its sidecar (with tenant limits) and a client sidecar with
//! API keys serving `listen.http`. The official `openai` Python package
//! talks to it (openai.rs); bad HTTP never reaches the node (inputs.rs);
//! streams survive disconnects and a thousand clients at once (streams.rs);
//! a `traceparent` header continues the caller's trace (trace.rs).

mod client;
mod inputs;
mod openai;
mod streams;
mod trace;

use std::net::SocketAddr;

use mesh_tests::NodeProcess;
use mesh_tests::etcd::Etcd;
use mesh_tests::mesh::SidecarProcess;

/// Tenant `acme`'s key: no limit to speak of.
const KEY: &str = "edge-acme-key";
/// Tenant `limited`'s key: one request every two seconds.
const LIMITED_KEY: &str = "edge-limited-key";

const TENANT_LIMITS: &str = "[tenants.default]\nrequests_per_sec = 10000.0\ntokens_per_min = 100000000.0\n\
                             [tenants.limited]\nrequests_per_sec = 0.5\ntokens_per_min = 100000000.0\n";

pub struct Mesh {
    _etcd: Etcd,
    pub node: NodeProcess,
    _inbound: SidecarProcess,
    pub edge: SidecarProcess,
}

impl Mesh {
    /// The mesh around the default model, served as `chat`.
    async fn real_model() -> Mesh {
        Self::start(NodeProcess::start_model(&["--model-name", "chat", "--metrics-listen", "127.0.0.1:0"]).await, "")
            .await
    }

    /// The mesh around `node`; `inbound` adds to its sidecar's config.
    async fn start(node: NodeProcess, inbound: &str) -> Mesh {
        let etcd = Etcd::start().await;
        let inbound = SidecarProcess::start(&etcd, Some(&node), &format!("{TENANT_LIMITS}{inbound}")).await;
        let edge = SidecarProcess::start_edge(&etcd, &edge_config(), &["--metrics-listen", "127.0.0.1:0"]).await;
        edge.wait_for_instances("chat", 1).await;
        Mesh { _etcd: etcd, node, _inbound: inbound, edge }
    }

    fn http(&self) -> SocketAddr {
        self.edge.http.expect("the edge sidecar serves listen.http")
    }

    /// Generate calls the node has answered, whatever their status.
    async fn node_requests(&self) -> f64 {
        let metrics = self.node.metrics.expect("the node serves metrics").to_string();
        let scraped = mesh_tests::scrape(&metrics).await;
        scraped.iter().filter(|(k, _)| k.starts_with("mesh_node_requests_total")).map(|(_, v)| v).sum()
    }
}

fn edge_config() -> String {
    let digest = mesh_proto::api_key::digest;
    let key = |tenant: &str, key: &str| format!("[[api_keys]]\ntenant = \"{tenant}\"\nsha256 = \"{}\"\n", digest(key));
    format!("[routing]\nmax_streams_per_service = 5000\n{}{}", key("acme", KEY), key("limited", LIMITED_KEY))
}
