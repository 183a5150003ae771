//! The processes a scenario brings up: `mesh-node` instances on free
//! loopback ports, killed when the scenario ends (or fails, or is
//! interrupted), and the signals a fault sends them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::Command;

use super::process::{Memory, Spawned, workspace_bin};
use crate::load::Target;

#[derive(clap::Args, Debug, Clone)]
pub struct NodeArgs {
    /// Nodes to start (each scenario has its own default).
    #[arg(long)]
    pub nodes: Option<usize>,
    /// Serve this GGUF model instead of the synthetic backend (slow on a CPU).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Synthetic backend: tokens per second per stream.
    #[arg(long, default_value_t = 50.0)]
    pub tokens_per_sec: f64,
    /// Each node's --max-running.
    #[arg(long, default_value_t = 32)]
    pub max_running: u32,
    /// Each node's --max-queued.
    #[arg(long, default_value_t = 128)]
    pub max_queued: u32,
    /// More flags for every node, e.g. --node-arg=--max-kv-tokens=4096.
    #[arg(long, allow_hyphen_values = true)]
    pub node_arg: Vec<String>,
    /// The mesh-node binary; defaults to the one beside mesh-bench.
    #[arg(long)]
    pub node_bin: Option<PathBuf>,
}

impl NodeArgs {
    /// Synthetic nodes with the given limits; the binary is found beside the running executable.
    pub fn synthetic(count: usize, tokens_per_sec: f64, max_running: u32, max_queued: u32) -> NodeArgs {
        NodeArgs {
            nodes: Some(count),
            model: None,
            tokens_per_sec,
            max_running,
            max_queued,
            node_arg: Vec::new(),
            node_bin: None,
        }
    }

    /// What the report says the nodes were.
    pub fn describe(&self, count: usize) -> String {
        let backend = match &self.model {
            Some(m) => format!("model {}", m.display()),
            None => format!("synthetic {} tokens/s per stream", self.tokens_per_sec),
        };
        format!("{count} node(s), {backend}, max-running {}, max-queued {}", self.max_running, self.max_queued)
    }

    fn bin(&self) -> anyhow::Result<PathBuf> {
        workspace_bin("mesh-node", self.node_bin.as_deref(), "cargo build --release -p node, or --node-bin")
    }

    fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = vec!["--listen".into(), "127.0.0.1:0".into()];
        match &self.model {
            Some(model) => args.extend(["--model".into(), model.display().to_string()]),
            None => args.extend([
                "--backend".into(),
                "synthetic".into(),
                "--synthetic-tokens-per-sec".into(),
                self.tokens_per_sec.to_string(),
            ]),
        }
        args.extend(["--max-running".into(), self.max_running.to_string()]);
        args.extend(["--max-queued".into(), self.max_queued.to_string()]);
        args.extend(self.node_arg.iter().cloned());
        args
    }
}

/// The nodes of a scenario. Dropping the set kills them.
pub struct NodeSet {
    nodes: Vec<RunningNode>,
}

struct RunningNode {
    process: Spawned,
    addr: SocketAddr,
}

/// How long a node may take to listen (a real model loads its weights first).
const START_TIMEOUT: Duration = Duration::from_secs(120);

impl NodeSet {
    pub async fn start(args: &NodeArgs, count: usize) -> anyhow::Result<NodeSet> {
        let bin = args.bin()?;
        let mut nodes = Vec::with_capacity(count);
        for i in 0..count {
            let mut cmd = Command::new(&bin);
            cmd.args(args.args()).env("RUST_LOG", "info");
            let (process, addr) = Spawned::start(format!("node {i}"), cmd, START_TIMEOUT, |line| {
                match line.split("listening on ").nth(1) {
                    Some(addr) => Ok(Some(addr.trim().parse::<SocketAddr>()?)),
                    None => Ok(None),
                }
            })
            .await?;
            nodes.push(RunningNode { process, addr });
        }
        Ok(NodeSet { nodes })
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn targets(&self) -> anyhow::Result<Vec<Target>> {
        Ok(self.nodes.iter().map(|n| Target::loopback(n.addr)).collect::<Result<_, _>>()?)
    }

    pub fn addr(&self, i: usize) -> anyhow::Result<SocketAddr> {
        Ok(self.node(i)?.addr)
    }

    /// SIGKILL: the process dies without draining, as in a crash or OOM kill.
    pub fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        let node = self.nodes.get_mut(i).with_context(|| format!("no node {i}"))?;
        node.process.kill()
    }

    /// SIGSTOP: the process freezes with its sockets open, as in a long GC
    /// pause or a hung host; callers see silence, not errors.
    pub async fn stop(&self, i: usize) -> anyhow::Result<()> {
        self.signal(i, "STOP").await
    }

    /// SIGCONT after a stop.
    pub async fn resume(&self, i: usize) -> anyhow::Result<()> {
        self.signal(i, "CONT").await
    }

    /// The log tail of node `i`, for reports on failures.
    pub fn log_tail(&self, i: usize) -> Vec<String> {
        self.nodes.get(i).map(|n| n.process.log_tail()).unwrap_or_default()
    }

    /// Each node's memory now (peak and current resident set).
    pub fn memory(&self) -> Vec<Memory> {
        self.nodes.iter().filter_map(|n| n.process.memory()).collect()
    }

    fn node(&self, i: usize) -> anyhow::Result<&RunningNode> {
        self.nodes.get(i).with_context(|| format!("no node {i} (there are {})", self.nodes.len()))
    }

    /// Sends a signal with `kill(1)`: std has no portable way to send
    /// STOP/CONT, and one process spawn per fault costs nothing here.
    async fn signal(&self, i: usize, signal: &str) -> anyhow::Result<()> {
        let pid = self.node(i)?.process.pid;
        let status = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().await?;
        if !status.success() {
            bail!("kill -{signal} {pid} (node {i}) failed: {status}");
        }
        Ok(())
    }
}
