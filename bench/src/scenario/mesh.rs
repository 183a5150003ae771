//! A local mesh for a scenario: one etcd, each node behind its own sidecar
//! (which gates it with a bulkhead and registers it), and one client-side
//! sidecar that load is sent to. Every process (started by `harness`)
//! listens on a free loopback port, is ready when it announces itself, and
//! is killed when the mesh drops.
//!
//! A request to the client sidecar crosses two sidecars: client sidecar
//! (picks an instance, retries refusals elsewhere) -> the node's sidecar
//! (bulkhead) -> the node. That is the path `direct-vs-mesh` prices and
//! `overload` protects.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use harness::{Etcd, Memory, Sidecar, SidecarConfig};
use mesh_proto::v1::generation_client::GenerationClient;
use mesh_proto::v1::{InstanceState, ListModelsRequest};

use super::nodes::NodeSet;
use crate::load::Target;

/// How long the client sidecar may take to see every node's registration.
const ROUTABLE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(clap::Args, Debug, Clone)]
pub struct MeshArgs {
    /// The mesh-sidecar binary; defaults to the one beside mesh-bench.
    #[arg(long)]
    pub sidecar_bin: Option<PathBuf>,
    /// The etcd binary (etcd 3.4 or later).
    #[arg(long, default_value = "etcd")]
    pub etcd_bin: PathBuf,
    /// The client sidecar's routing policy.
    #[arg(long, value_enum, default_value = "least-loaded")]
    pub policy: Policy,
}

/// The sidecar's `routing.policy`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    LeastLoaded,
    RoundRobin,
    /// Prefers the node whose prefix cache holds the prompt's first blocks.
    CacheAware,
}

impl Policy {
    fn as_toml(self) -> &'static str {
        match self {
            Policy::LeastLoaded => "least-loaded",
            Policy::RoundRobin => "round-robin",
            Policy::CacheAware => "cache-aware",
        }
    }
}

impl MeshArgs {
    pub fn new() -> MeshArgs {
        MeshArgs { sidecar_bin: None, etcd_bin: PathBuf::from("etcd"), policy: Policy::LeastLoaded }
    }
}

impl Default for MeshArgs {
    fn default() -> Self {
        Self::new()
    }
}

/// A node sidecar's inbound bulkhead for the service (`[[services]]`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Bulkhead {
    pub max_concurrency: u32,
    pub max_queue: u32,
    pub max_queue_wait: Duration,
}

/// The whole mesh. Dropping it kills every process (sidecars first, as
/// fields drop in order, then the nodes, then etcd).
pub struct Mesh {
    pub client: Sidecar,
    pub node_sidecars: Vec<Sidecar>,
    pub nodes: NodeSet,
    pub etcd: Etcd,
    /// The service name the nodes serve (what `GenerateRequest.model` names).
    pub service: String,
}

impl Mesh {
    /// Starts etcd, a sidecar in front of each of `nodes` with `bulkhead`
    /// (None: the sidecar's default, sized from the node), and a client
    /// sidecar; returns once the client sidecar routes to every node.
    pub async fn start(args: &MeshArgs, nodes: NodeSet, bulkhead: Option<&Bulkhead>) -> anyhow::Result<Mesh> {
        Self::start_with(args, nodes, bulkhead, "").await
    }

    /// Like `start`, with more `[routing]` keys for the client sidecar
    /// (e.g. `max_streams_per_service = 100000`).
    pub async fn start_with(
        args: &MeshArgs,
        nodes: NodeSet,
        bulkhead: Option<&Bulkhead>,
        client_routing: &str,
    ) -> anyhow::Result<Mesh> {
        Self::launch(args, nodes, bulkhead, |etcd| client_sidecar_config(etcd, args.policy, client_routing)).await
    }

    /// Like `start`, with the client sidecar serving the HTTP edge too
    /// ([`Mesh::edge`]).
    pub async fn start_with_edge(args: &MeshArgs, nodes: NodeSet) -> anyhow::Result<Mesh> {
        Self::launch(args, nodes, None, |etcd| client_sidecar_config(etcd, args.policy, "").with_http()).await
    }

    /// Starts the mesh; `client` is the client sidecar's config for etcd's URL.
    async fn launch(
        args: &MeshArgs,
        nodes: NodeSet,
        bulkhead: Option<&Bulkhead>,
        client: impl FnOnce(&str) -> SidecarConfig,
    ) -> anyhow::Result<Mesh> {
        let bin =
            harness::workspace_bin("mesh-sidecar", args.sidecar_bin.as_deref(), "cargo build --release -p sidecar")?;
        let service = service_name(&nodes).await?;
        let etcd = Etcd::start(&args.etcd_bin).await.with_context(|| {
            format!("starting etcd ({}; on Debian: apt-get install etcd-server)", args.etcd_bin.display())
        })?;
        let mut node_sidecars = Vec::with_capacity(nodes.len());
        for i in 0..nodes.len() {
            let config = node_sidecar_config(&etcd.url(), nodes.addr(i)?, &service, bulkhead);
            node_sidecars.push(start_sidecar(format!("sidecar of node {i}"), &bin, &config).await?);
        }
        let client = start_sidecar("client sidecar".into(), &bin, &client(&etcd.url())).await?;
        let routable = |all: &[InstanceState]| all.iter().filter(|i| i.service == service && !i.ejected).count();
        client.wait_for_instances(ROUTABLE_TIMEOUT, |all| routable(all) == nodes.len()).await?;
        Ok(Mesh { client, node_sidecars, nodes, etcd, service })
    }

    /// Where clients send: the client sidecar's outbound address.
    pub fn target(&self) -> anyhow::Result<Target> {
        Ok(Target::loopback(self.client.outbound)?)
    }

    /// The client sidecar's HTTP edge (OpenAI's API), when it serves one.
    pub fn edge(&self) -> anyhow::Result<Target> {
        let addr = self.client.http.context("the client sidecar serves no HTTP edge (start_with_edge)")?;
        Ok(Target::loopback(addr)?)
    }

    /// Every node and sidecar process, named (etcd is not on the request path).
    pub fn processes(&self) -> Vec<&harness::Spawned> {
        let mut all = self.nodes.processes();
        all.extend(self.node_sidecars.iter().chain([&self.client]).map(|s| &s.process));
        all
    }

    /// Memory of every node and sidecar (etcd is not on the request path).
    pub fn memory(&self) -> Vec<Memory> {
        let mut all = self.nodes.memory();
        all.extend(self.node_sidecars.iter().chain([&self.client]).filter_map(|s| s.process.memory()));
        all
    }
}

/// The nodes' model name, which the sidecars register as the service.
async fn service_name(nodes: &NodeSet) -> anyhow::Result<String> {
    let addr = nodes.addr(0)?;
    let mut client = GenerationClient::connect(format!("http://{addr}")).await?;
    let models = client.list_models(ListModelsRequest {}).await?.into_inner().models;
    Ok(models.first().context("node 0 lists no model")?.name.clone())
}

/// Starts a sidecar on `config`; a failure shows the config with the log.
async fn start_sidecar(name: String, bin: &Path, config: &SidecarConfig) -> anyhow::Result<Sidecar> {
    let started = Sidecar::start(name.clone(), bin, config, std::iter::empty::<&str>()).await;
    started.with_context(|| format!("starting {name}; its config:\n{}", config.to_toml()))
}

fn node_sidecar_config(etcd: &str, node: SocketAddr, service: &str, bulkhead: Option<&Bulkhead>) -> SidecarConfig {
    let config = SidecarConfig::new(etcd).fronting(node);
    match bulkhead {
        Some(b) => config.with(&format!(
            "[[services]]\nname = \"{service}\"\nmax_concurrency = {}\nmax_queue = {}\nmax_queue_wait = \"{}ms\"\n",
            b.max_concurrency,
            b.max_queue,
            b.max_queue_wait.as_millis()
        )),
        None => config,
    }
}

fn client_sidecar_config(etcd: &str, policy: Policy, routing: &str) -> SidecarConfig {
    SidecarConfig::new(etcd).with_metrics().with(&format!("[routing]\npolicy = \"{}\"\n{routing}", policy.as_toml()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_sidecar_config_names_the_bulkhead() {
        let b = Bulkhead { max_concurrency: 32, max_queue: 1, max_queue_wait: Duration::from_millis(250) };
        let c = node_sidecar_config("http://127.0.0.1:2379", "127.0.0.1:9".parse().unwrap(), "synthetic", Some(&b))
            .to_toml();
        assert!(c.contains("[node]\naddress = \"127.0.0.1:9\""), "{c}");
        assert!(c.contains("name = \"synthetic\"\nmax_concurrency = 32\nmax_queue = 1\nmax_queue_wait = \"250ms\""));
        let plain = node_sidecar_config("http://e", "127.0.0.1:9".parse().unwrap(), "s", None).to_toml();
        assert!(!plain.contains("[[services]]"));
        let client = client_sidecar_config("http://e", Policy::RoundRobin, "max_streams_per_service = 9\n").to_toml();
        assert!(client.contains("[routing]\npolicy = \"round-robin\"\nmax_streams_per_service = 9\n"), "{client}");
    }
}
