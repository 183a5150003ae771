//! One arm of `peak`, as processes: etcd; the primary service's nodes, each
//! behind a sidecar with a bulkhead; for the overflow arms the overflow
//! service's node(s) and sidecar(s); for the standby arm one more primary
//! node whose sidecar registers it as a spare (`[node] standby = true`)
//! and `meshctl autoscale` on the same etcd; and the client sidecar the
//! load goes to. Every arm starts from fresh processes, so no arm inherits
//! another's cache, ejections or activations. Dropping it kills them all.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use harness::{Etcd, Sidecar, SidecarConfig, Spawned};
use mesh_proto::v1::InstanceState;

use super::mesh::Bulkhead;
use super::nodes::{NodeArgs, NodeSet};

/// How long the client sidecar may take to see every routable node, and
/// the controller to win its election.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// What one arm runs.
#[derive(Debug, Clone)]
pub struct Layout {
    pub primary: NodeArgs,
    pub primary_nodes: usize,
    pub primary_name: String,
    /// The overflow service's nodes, name and count; None: no overflow rule.
    pub overflow: Option<(NodeArgs, usize, String)>,
    /// `meshctl autoscale` flags (after `--service`); None: no standby node.
    pub autoscale: Option<Vec<String>>,
    /// The client sidecar's `[response_cache]` on.
    pub cache: bool,
    pub bulkhead: Bulkhead,
    pub overflow_bulkhead: Bulkhead,
}

/// Where the binaries are.
#[derive(Debug, Clone)]
pub struct Bins {
    pub sidecar: PathBuf,
    pub etcd: PathBuf,
    pub meshctl: Option<PathBuf>,
}

/// The running arm. Fields drop in order: the client, the controller, the
/// node sidecars, the nodes, etcd.
pub struct ArmMesh {
    pub client: Sidecar,
    pub autoscale: Option<Spawned>,
    _sidecars: Vec<Sidecar>,
    /// The registered (inbound) addresses of the always-active primary nodes.
    pub primary_addrs: Vec<String>,
    /// The standby node's registered address.
    pub standby_addr: Option<String>,
    _nodes: Vec<NodeSet>,
    _etcd: Etcd,
}

impl ArmMesh {
    pub async fn start(layout: &Layout, bins: &Bins) -> anyhow::Result<ArmMesh> {
        let etcd = Etcd::start(&bins.etcd).await.with_context(|| {
            format!("starting etcd ({}; on Debian: apt-get install etcd-server)", bins.etcd.display())
        })?;
        let url = etcd.url();
        let (mut nodes, mut sidecars) = (Vec::new(), Vec::new());
        let primary = NodeSet::start(&layout.primary, layout.primary_nodes).await?;
        let primary_addrs =
            front(&primary, &url, &layout.primary_name, "", &layout.bulkhead, &bins.sidecar, &mut sidecars).await?;
        nodes.push(primary);
        let mut client_toml = "[routing]\npolicy = \"least-loaded\"\n".to_string();
        if let Some((args, count, name)) = &layout.overflow {
            let small = NodeSet::start(args, *count).await?;
            front(&small, &url, name, "", &layout.overflow_bulkhead, &bins.sidecar, &mut sidecars).await?;
            nodes.push(small);
            client_toml += &format!("[[routing.overflow]]\nservice = \"{}\"\nto = \"{name}\"\n", layout.primary_name);
        }
        if layout.cache {
            client_toml += "[response_cache]\nenabled = true\n";
        }
        let mut standby_addr = None;
        if layout.autoscale.is_some() {
            let spare = NodeSet::start(&layout.primary, 1).await?;
            let name = &layout.primary_name;
            standby_addr =
                front(&spare, &url, name, "standby = true\n", &layout.bulkhead, &bins.sidecar, &mut sidecars)
                    .await?
                    .pop();
            nodes.push(spare);
        }
        let client =
            start_sidecar("client sidecar".into(), &bins.sidecar, &SidecarConfig::new(&url).with(&client_toml)).await?;
        let overflow = layout.overflow.as_ref().map(|(_, n, s)| (s.as_str(), *n));
        let wanted = [(layout.primary_name.as_str(), layout.primary_nodes)].into_iter().chain(overflow);
        let wanted: Vec<(&str, usize)> = wanted.collect();
        client.wait_for_instances(READY_TIMEOUT, |all| wanted.iter().all(|&(s, n)| routable(all, s) >= n)).await?;
        let autoscale = match &layout.autoscale {
            Some(flags) => Some(start_autoscale(bins, &url, &layout.primary_name, flags).await?),
            None => None,
        };
        Ok(ArmMesh { client, autoscale, _sidecars: sidecars, primary_addrs, standby_addr, _nodes: nodes, _etcd: etcd })
    }
}

fn routable(all: &[InstanceState], service: &str) -> usize {
    all.iter().filter(|i| i.service == service && !i.ejected).count()
}

/// Starts a sidecar in front of each of `nodes` (`node_keys` go into its
/// `[node]` section) and returns their registered addresses.
async fn front(
    nodes: &NodeSet,
    etcd: &str,
    service: &str,
    node_keys: &str,
    b: &Bulkhead,
    bin: &Path,
    sidecars: &mut Vec<Sidecar>,
) -> anyhow::Result<Vec<String>> {
    let mut addrs = Vec::with_capacity(nodes.len());
    for i in 0..nodes.len() {
        // Keys without a header land in `[node]`, the section before them.
        let config = SidecarConfig::new(etcd).fronting(nodes.addr(i)?).with(&format!(
            "{node_keys}[[services]]\nname = \"{service}\"\nmax_concurrency = {}\nmax_queue = {}\nmax_queue_wait = \"{}ms\"\n",
            b.max_concurrency,
            b.max_queue,
            b.max_queue_wait.as_millis()
        ));
        let what = if node_keys.is_empty() { "sidecar" } else { "standby sidecar" };
        let sidecar = start_sidecar(format!("{what} of {service} node {i}"), bin, &config).await?;
        addrs.push(sidecar.inbound.map(|a| a.to_string()).unwrap_or_default());
        sidecars.push(sidecar);
    }
    Ok(addrs)
}

async fn start_sidecar(name: String, bin: &Path, config: &SidecarConfig) -> anyhow::Result<Sidecar> {
    let started = Sidecar::start(name.clone(), bin, config, std::iter::empty::<&str>()).await;
    started.with_context(|| format!("starting {name}; its config:\n{}", config.to_toml()))
}

/// `meshctl autoscale` on `etcd` for `service`; returns once it logs that
/// it leads (its stdout is drained from the start so it never blocks).
async fn start_autoscale(bins: &Bins, etcd: &str, service: &str, flags: &[String]) -> anyhow::Result<Spawned> {
    let bin = harness::workspace_bin("meshctl", bins.meshctl.as_deref(), "cargo build --release -p meshctl")?;
    let mut cmd = tokio::process::Command::new(&bin);
    cmd.args(["autoscale", "--etcd", etcd, "--service", service]).args(flags).env("RUST_LOG", "info");
    let mut process = Spawned::spawn("meshctl autoscale", cmd)?;
    process.probed(READY_TIMEOUT, || async { true }).await?;
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    while process.logged(LEADING) == 0 {
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "meshctl autoscale did not log {LEADING:?} within {READY_TIMEOUT:?}; its log:\n{}",
                process.log_tail(20).join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(process)
}

/// The controller's log lines the scenario reads.
pub const LEADING: &str = "autoscale: leading";
pub const ACTIVATED: &str = "autoscale: activated";
pub const RETURNED: &str = "autoscale: returned";
