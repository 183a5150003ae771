//! The processes a scenario brings up: `mesh-node` instances on free
//! loopback ports, killed when the scenario ends (or fails, or is
//! interrupted), and the signals a fault sends them.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

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
        if let Some(bin) = &self.node_bin {
            return Ok(bin.clone());
        }
        let exe = std::env::current_exe().context("locating mesh-bench")?;
        let dir = exe.parent().context("mesh-bench has no directory")?;
        // Beside mesh-bench, or one up when running from target/<profile>/deps (tests).
        let candidates = [dir.join("mesh-node"), dir.join("../mesh-node")];
        match candidates.iter().find(|p| p.exists()) {
            Some(p) => Ok(p.clone()),
            None => bail!(
                "mesh-node not found beside {}: build it (cargo build --release -p node) or give --node-bin",
                dir.display()
            ),
        }
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

/// A started node. Dropping it kills the process.
pub struct RunningNode {
    child: Child,
    pid: u32,
    pub addr: SocketAddr,
    /// The last lines of its log, for error messages.
    log_tail: Arc<Mutex<VecDeque<String>>>,
}

/// The nodes of a scenario.
pub struct NodeSet {
    nodes: Vec<RunningNode>,
}

/// How long a node may take to listen (a real model loads its weights first).
const START_TIMEOUT: Duration = Duration::from_secs(120);

impl NodeSet {
    pub async fn start(args: &NodeArgs, count: usize) -> anyhow::Result<NodeSet> {
        let bin = args.bin()?;
        let mut nodes = Vec::with_capacity(count);
        for i in 0..count {
            nodes.push(start_one(&bin, &args.args()).await.with_context(|| format!("starting node {i}"))?);
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
        node.child.start_kill().with_context(|| format!("killing node {i}"))
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
        self.nodes
            .get(i)
            .map(|n| n.log_tail.lock().map(|t| t.iter().cloned().collect()).unwrap_or_default())
            .unwrap_or_default()
    }

    fn node(&self, i: usize) -> anyhow::Result<&RunningNode> {
        self.nodes.get(i).with_context(|| format!("no node {i} (there are {})", self.nodes.len()))
    }

    /// Sends a signal with `kill(1)`: std has no portable way to send
    /// STOP/CONT, and one process spawn per fault costs nothing here.
    async fn signal(&self, i: usize, signal: &str) -> anyhow::Result<()> {
        let pid = self.node(i)?.pid;
        let status = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().await?;
        if !status.success() {
            bail!("kill -{signal} {pid} (node {i}) failed: {status}");
        }
        Ok(())
    }
}

async fn start_one(bin: &std::path::Path, args: &[String]) -> anyhow::Result<RunningNode> {
    let mut child = Command::new(bin)
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawning {}", bin.display()))?;
    let pid = child.id().context("node exited at once")?;
    let stderr = child.stderr.take().context("node stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    let remember = |tail: &Arc<Mutex<VecDeque<String>>>, line: &str| {
        if let Ok(mut t) = tail.lock() {
            if t.len() == 20 {
                t.pop_front();
            }
            t.push_back(line.to_string());
        }
    };
    let listening = tokio::time::timeout(START_TIMEOUT, async {
        while let Some(line) = lines.next_line().await? {
            remember(&tail, &line);
            if let Some(addr) = line.split("listening on ").nth(1) {
                return Ok::<_, anyhow::Error>(Some(addr.trim().parse::<SocketAddr>()?));
            }
        }
        Ok(None)
    })
    .await;
    let shown_tail = || tail.lock().map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n")).unwrap_or_default();
    let addr = match listening {
        Ok(Ok(Some(addr))) => addr,
        Ok(Ok(None)) => bail!("node exited before listening; its log:\n{}", shown_tail()),
        Ok(Err(e)) => bail!("reading the node's log: {e}; its log:\n{}", shown_tail()),
        Err(_) => bail!("node did not listen within {START_TIMEOUT:?}; its log:\n{}", shown_tail()),
    };
    // Keep draining the log so the node never blocks on a full pipe.
    let keep = tail.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            remember(&keep, &line);
        }
    });
    Ok(RunningNode { child, pid, addr, log_tail: tail })
}
