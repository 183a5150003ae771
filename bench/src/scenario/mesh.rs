//! A local mesh for a scenario: one etcd, each node behind its own sidecar
//! (which gates it with a bulkhead and registers it), and one client-side
//! sidecar that load is sent to. Every process listens on a free loopback
//! port, is ready when its log says so, and is killed when the mesh drops.
//!
//! A request to the client sidecar crosses two sidecars: client sidecar
//! (picks an instance, retries refusals elsewhere) -> the node's sidecar
//! (bulkhead) -> the node. That is the path `direct-vs-mesh` prices and
//! `overload` protects.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use mesh_proto::v1::ListModelsRequest;
use mesh_proto::v1::generation_client::GenerationClient;
use mesh_proto::v1::sidecar_admin_client::SidecarAdminClient;
use tokio::process::Command;

use super::nodes::NodeSet;
use super::process::{Memory, Spawned, free_port, workspace_bin};
use crate::load::Target;

/// How long etcd and a sidecar may take to become ready.
const START_TIMEOUT: Duration = Duration::from_secs(30);

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
}

impl Policy {
    fn as_toml(self) -> &'static str {
        match self {
            Policy::LeastLoaded => "least-loaded",
            Policy::RoundRobin => "round-robin",
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

/// A running etcd on free ports, with its own data directory.
pub struct Etcd {
    process: Spawned,
    url: String,
    data_dir: PathBuf,
}

impl Etcd {
    pub async fn start(bin: &Path) -> anyhow::Result<Etcd> {
        let (client, peer) = (free_port()?, free_port()?);
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let data_dir = std::env::temp_dir().join(format!("mesh-bench-etcd-{}-{client}", std::process::id()));
        let mut cmd = Command::new(bin);
        cmd.args(["--name", "bench", "--data-dir"])
            .arg(&data_dir)
            .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("bench={peer_url}")]);
        let started = Spawned::start("etcd", cmd, START_TIMEOUT, |line| {
            Ok(line.contains("ready to serve client requests").then_some(()))
        })
        .await
        .with_context(|| format!("starting etcd ({}; on Debian: apt-get install etcd-server)", bin.display()));
        let (process, ()) = match started {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&data_dir);
                return Err(e);
            }
        };
        Ok(Etcd { process, url, data_dir })
    }

    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

/// A running `mesh-sidecar` and its config file (removed on drop).
pub struct Sidecar {
    process: Spawned,
    pub outbound: SocketAddr,
    /// Set when it fronts a node.
    pub inbound: Option<SocketAddr>,
    config: PathBuf,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = std::fs::remove_file(&self.config);
    }
}

impl Sidecar {
    /// Writes `config` to a temp file and starts the sidecar on it. Ready
    /// when it logs its outbound address and, when `fronts_node`, that the
    /// node is registered in the mesh.
    async fn start(name: String, bin: &Path, config: String, fronts_node: bool) -> anyhow::Result<Sidecar> {
        let path =
            std::env::temp_dir().join(format!("mesh-bench-sidecar-{}-{}.toml", std::process::id(), free_port()?));
        std::fs::write(&path, &config).with_context(|| format!("writing {}", path.display()))?;
        let mut cmd = Command::new(bin);
        cmd.arg("--config").arg(&path).env("RUST_LOG", "info");
        let (mut outbound, mut inbound) = (None, None);
        let started = Spawned::start(name.clone(), cmd, START_TIMEOUT, |line| {
            if let Some(a) = line.split("outbound listening on ").nth(1) {
                outbound = Some(a.trim().parse::<SocketAddr>()?);
            }
            if let Some(a) = line.split("inbound listening on ").nth(1) {
                inbound = Some(a.trim().parse::<SocketAddr>()?);
            }
            let ready = if fronts_node { line.contains("node registered in the mesh") } else { outbound.is_some() };
            Ok(ready.then_some(()))
        })
        .await;
        let process = match started {
            Ok((process, ())) => process,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(anyhow::anyhow!("starting {name}: {e:#}\nits config:\n{config}"));
            }
        };
        let outbound = outbound.context("the sidecar never logged its outbound address")?;
        Ok(Sidecar { process, outbound, inbound, config: path })
    }

    pub fn memory(&self) -> Option<Memory> {
        self.process.memory()
    }

    /// Instances of `service` this sidecar routes to now.
    async fn instances_of(&self, service: &str) -> anyhow::Result<usize> {
        let mut admin = SidecarAdminClient::connect(format!("http://{}", self.outbound)).await?;
        let all = admin.instances(mesh_proto::v1::InstancesRequest {}).await?.into_inner().instances;
        Ok(all.iter().filter(|i| i.service == service && !i.ejected).count())
    }
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
        let bin = workspace_bin("mesh-sidecar", args.sidecar_bin.as_deref(), "cargo build --release -p sidecar")?;
        let service = service_name(&nodes).await?;
        let etcd = Etcd::start(&args.etcd_bin).await?;
        let mut node_sidecars = Vec::with_capacity(nodes.len());
        for i in 0..nodes.len() {
            let config = node_sidecar_config(etcd.url(), nodes.addr(i)?, &service, bulkhead);
            node_sidecars.push(Sidecar::start(format!("sidecar of node {i}"), &bin, config, true).await?);
        }
        let config = client_sidecar_config(etcd.url(), args.policy);
        let client = Sidecar::start("client sidecar".into(), &bin, config, false).await?;
        let mesh = Mesh { client, node_sidecars, nodes, etcd, service };
        mesh.wait_until_routable().await?;
        Ok(mesh)
    }

    /// Where clients send: the client sidecar's outbound address.
    pub fn target(&self) -> anyhow::Result<Target> {
        Ok(Target::loopback(self.client.outbound)?)
    }

    /// Memory of every node and sidecar (etcd is not on the request path).
    pub fn memory(&self) -> Vec<Memory> {
        let mut all = self.nodes.memory();
        all.extend(self.node_sidecars.iter().chain([&self.client]).filter_map(Sidecar::memory));
        all
    }

    async fn wait_until_routable(&self) -> anyhow::Result<()> {
        let want = self.nodes.len();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let seen = self.client.instances_of(&self.service).await.unwrap_or(0);
            if seen == want {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("the client sidecar routes to {seen} of {want} instances of {:?} after 10 s", self.service);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The nodes' model name, which the sidecars register as the service.
async fn service_name(nodes: &NodeSet) -> anyhow::Result<String> {
    let addr = nodes.addr(0)?;
    let mut client = GenerationClient::connect(format!("http://{addr}")).await?;
    let models = client.list_models(ListModelsRequest {}).await?.into_inner().models;
    Ok(models.first().context("node 0 lists no model")?.name.clone())
}

/// Shared head of every sidecar config. Plaintext, which the sidecar
/// requires be said explicitly: every hop is loopback. A short lease so a
/// dead sidecar leaves the mesh quickly; drain grace is moot (processes are
/// killed).
fn head(etcd: &str) -> String {
    format!(
        "drain_grace = \"1s\"\nplaintext = true\n[listen]\noutbound = \"127.0.0.1:0\"\ninbound = \"127.0.0.1:0\"\n\
         [etcd]\nendpoints = [\"{etcd}\"]\nlease_ttl = \"2s\"\n"
    )
}

fn node_sidecar_config(etcd: &str, node: SocketAddr, service: &str, bulkhead: Option<&Bulkhead>) -> String {
    let mut config = head(etcd) + &format!("[node]\naddress = \"{node}\"\n");
    if let Some(b) = bulkhead {
        config += &format!(
            "[[services]]\nname = \"{service}\"\nmax_concurrency = {}\nmax_queue = {}\nmax_queue_wait = \"{}ms\"\n",
            b.max_concurrency,
            b.max_queue,
            b.max_queue_wait.as_millis()
        );
    }
    config
}

fn client_sidecar_config(etcd: &str, policy: Policy) -> String {
    head(etcd) + &format!("[routing]\npolicy = \"{}\"\n", policy.as_toml())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_sidecar_config_names_the_bulkhead() {
        let b = Bulkhead { max_concurrency: 32, max_queue: 1, max_queue_wait: Duration::from_millis(250) };
        let c = node_sidecar_config("http://127.0.0.1:2379", "127.0.0.1:9".parse().unwrap(), "synthetic", Some(&b));
        assert!(c.contains("endpoints = [\"http://127.0.0.1:2379\"]") && c.contains("plaintext = true"), "{c}");
        assert!(c.contains("[node]\naddress = \"127.0.0.1:9\""), "{c}");
        assert!(c.contains("name = \"synthetic\"\nmax_concurrency = 32\nmax_queue = 1\nmax_queue_wait = \"250ms\""));
        let plain = node_sidecar_config("http://e", "127.0.0.1:9".parse().unwrap(), "s", None);
        assert!(!plain.contains("[[services]]"));
        assert!(client_sidecar_config("http://e", Policy::RoundRobin).contains("policy = \"round-robin\""));
    }
}
