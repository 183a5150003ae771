//! The processes a scenario brings up: `mesh-node` instances on free
//! loopback ports, killed when the scenario ends (or fails, or is
//! interrupted), and the signals a fault sends them. Starting and
//! signalling is `harness`'s; this is what a scenario asks of it.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use harness::{Memory, Node};

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
        Ok(harness::workspace_bin(
            "mesh-node",
            self.node_bin.as_deref(),
            "cargo build --release -p node, or --node-bin",
        )?)
    }

    /// Each node's flags (the harness adds `--listen 127.0.0.1:0`).
    fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = Vec::new();
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
    nodes: Vec<Node>,
}

/// Log lines a failure report shows.
const TAIL_LINES: usize = 20;

impl NodeSet {
    pub async fn start(args: &NodeArgs, count: usize) -> anyhow::Result<NodeSet> {
        let bin = args.bin()?;
        let mut nodes = Vec::with_capacity(count);
        for i in 0..count {
            nodes.push(Node::start(format!("node {i}"), &bin, args.args()).await?);
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

    /// Each node's metrics address; an error names a node started without
    /// `--metrics-listen`.
    pub fn metrics(&self) -> anyhow::Result<Vec<SocketAddr>> {
        let addr = |(i, n): (usize, &Node)| n.metrics.with_context(|| format!("node {i} serves no metrics"));
        self.nodes.iter().enumerate().map(addr).collect()
    }

    /// SIGKILL: the process dies without draining, as in a crash or OOM kill.
    pub fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        let node = self.nodes.get_mut(i).with_context(|| format!("no node {i}"))?;
        Ok(node.process.kill()?)
    }

    /// SIGSTOP: the process freezes with its sockets open, as in a long GC
    /// pause or a hung host; callers see silence, not errors.
    pub async fn stop(&self, i: usize) -> anyhow::Result<()> {
        Ok(self.node(i)?.process.signal("STOP")?)
    }

    /// SIGCONT after a stop.
    pub async fn resume(&self, i: usize) -> anyhow::Result<()> {
        Ok(self.node(i)?.process.signal("CONT")?)
    }

    /// The log tail of node `i`, for reports on failures.
    pub fn log_tail(&self, i: usize) -> Vec<String> {
        self.nodes.get(i).map(|n| n.process.log_tail(TAIL_LINES)).unwrap_or_default()
    }

    /// Each node's process.
    pub fn processes(&self) -> Vec<&harness::Spawned> {
        self.nodes.iter().map(|n| &n.process).collect()
    }

    /// Each node's memory now (peak and current resident set).
    pub fn memory(&self) -> Vec<Memory> {
        self.nodes.iter().filter_map(|n| n.process.memory()).collect()
    }

    fn node(&self, i: usize) -> anyhow::Result<&Node> {
        self.nodes.get(i).with_context(|| format!("no node {i} (there are {})", self.nodes.len()))
    }
}
