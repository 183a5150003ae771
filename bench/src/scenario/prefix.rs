//! `prefix`: what the nodes' prefix cache buys, and whether routing keeps it.
//! Real-model nodes (`--prefix-cache on|off`, metrics on), in steps:
//!
//! 1. One node, cache off, then one node, cache on: a request of one shared
//!    512-token system prompt and a 32-token question, one at a time after a
//!    warm-up request (TTFT p50 on over off); conversations of 8 turns, each
//!    resending the history (last turn's TTFT over the first's). The node
//!    with the cache also runs the mesh's workload alone: the hit rate of a
//!    cache that sees every request, which routing can at best keep.
//! 2. The mesh (etcd, a sidecar per node, a client sidecar) on `--nodes`
//!    nodes, three times with fresh processes: cache off and `least-loaded`,
//!    cache on and `least-loaded`, cache on and `cache-aware`, each with the
//!    same shared-prefix workload (8 system prompts of 512 tokens, Zipf
//!    popular, 4 closed-loop streams). Each node's KV budget
//!    (`--mesh-kv-tokens`, 2560) holds about three of the eight prompts
//!    beside its running requests and the three nodes all eight, so a node
//!    that sees every prompt evicts, and one that sees its share need not:
//!    where routing decides the hit rate. (At 3072 a node holds four or
//!    five, the four that draw 77% of the requests among them, and
//!    scattering them costs least-loaded little.)
//!
//! Hit rates come from the callers' usage and are cross-checked with the
//! nodes' counters, which also show how the requests and the prompt work
//! fell on the nodes. A configuration that cannot start (a sidecar that
//! does not know `cache-aware` refuses its config) is reported as such and
//! fails the scenario after the report is written.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use super::OutArgs;
use super::measures::run_load;
use super::mesh::{Mesh, MeshArgs, Policy};
use super::node_metrics::{routed, scrape, spread};
use super::nodes::{NodeArgs, NodeSet};
use super::prefix_report::{Measured, MeshRun, PrefixReport, SingleNode};
use crate::load::cli::parse_duration;
use crate::load::{Arrival, Choices, Conversations, LoadSpec, Mix, SharedPrefixes, Target};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// The GGUF model every node serves (scripts/fetch-model.sh fetches the default).
    #[arg(long, default_value_os_t = harness::default_model())]
    pub model: PathBuf,
    /// Nodes of the mesh runs.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// System prompts of the shared-prefix workload.
    #[arg(long, default_value_t = 8)]
    pub shared_prefixes: u32,
    /// Length of each system prompt, in words of about one token each.
    #[arg(long, default_value_t = 512)]
    pub prefix_tokens: u32,
    /// Length of a question (and of a conversation turn's message).
    #[arg(long, default_value_t = 32)]
    pub question_tokens: u32,
    /// Zipf exponent of system-prompt popularity.
    #[arg(long, default_value_t = 1.0)]
    pub zipf_exponent: f64,
    /// max_tokens of every request.
    #[arg(long, default_value_t = 16)]
    pub max_tokens: u32,
    /// Closed-loop streams of a shared-prefix run (all nodes together).
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Requests of a shared-prefix run: the same count everywhere, so hit
    /// rates (whose cold misses are per run) compare; 96, so that the
    /// eight prompts' first misses weigh less than the steady state.
    #[arg(long, default_value_t = 96)]
    pub requests: u64,
    /// The longest any run sends for (96 requests with the cache off take
    /// about 200 s on two cores).
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Requests of the single-node TTFT measurement, one at a time, each side.
    #[arg(long, default_value_t = 8)]
    pub single_requests: u64,
    /// Turns of a conversation.
    #[arg(long, default_value_t = 8)]
    pub turns: u32,
    /// Users of a conversation run, one conversation each.
    #[arg(long, default_value_t = 2)]
    pub users: usize,
    /// --max-kv-tokens of the mesh runs' nodes (the single node keeps the
    /// node's default, room for every prompt).
    #[arg(long, default_value_t = 2560)]
    pub mesh_kv_tokens: u64,
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub deadline: Duration,
    /// More flags for every node, e.g. --node-arg=--max-step-tokens=512.
    #[arg(long, allow_hyphen_values = true)]
    pub node_arg: Vec<String>,
    /// The mesh-node binary; defaults to the one beside mesh-bench.
    #[arg(long)]
    pub node_bin: Option<PathBuf>,
    /// The mesh-sidecar binary; defaults to the one beside mesh-bench.
    #[arg(long)]
    pub sidecar_bin: Option<PathBuf>,
    /// The etcd binary (etcd 3.4 or later).
    #[arg(long, default_value = "etcd")]
    pub etcd_bin: PathBuf,
    #[command(flatten)]
    pub out: OutArgs,
    /// Seeds the system prompts' text, the picks and the questions.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

/// The node's `--prefix-cache`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cache {
    On,
    Off,
}

impl Cache {
    fn flag(self) -> &'static str {
        match self {
            Cache::On => "--prefix-cache=on",
            Cache::Off => "--prefix-cache=off",
        }
    }
}

/// The mesh runs: name, cache, routing policy.
const MESH_RUNS: [(&str, Cache, Policy); 3] = [
    ("mesh, cache off, least-loaded", Cache::Off, Policy::LeastLoaded),
    ("mesh, cache on, least-loaded", Cache::On, Policy::LeastLoaded),
    ("mesh, cache on, cache-aware", Cache::On, Policy::CacheAware),
];

pub async fn run(args: Args) -> anyhow::Result<PrefixReport> {
    anyhow::ensure!(
        args.model.exists(),
        "no model at {} (scripts/fetch-model.sh fetches it; or --model)",
        args.model.display()
    );
    let single_off = single_node(&args, Cache::Off).await?;
    let single_on = single_node(&args, Cache::On).await?;
    let mut mesh = Vec::with_capacity(MESH_RUNS.len());
    for (name, cache, policy) in MESH_RUNS {
        let outcome = mesh_run(&args, cache, policy, name).await.map_err(|e| format!("{e:#}"));
        mesh.push(MeshRun::new(name, outcome));
    }
    let (json_path, _) = args.out.paths("prefix")?;
    let report = PrefixReport::new(&args, single_off, single_on, mesh, &json_path);
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)?;
    print!("{}", report.table());
    if let Some(failed) = report.mesh.iter().find(|m| m.error.is_some()) {
        anyhow::bail!("{} did not run (report written): {}", failed.name, failed.error.as_deref().unwrap_or(""));
    }
    Ok(report)
}

/// One node: the single-prompt TTFT, the conversations, and (cache on)
/// the mesh's workload alone.
async fn single_node(args: &Args, cache: Cache) -> anyhow::Result<SingleNode> {
    let nodes = NodeSet::start(&node_args(args, cache, None), 1).await?;
    let (targets, metrics) = (nodes.targets()?, nodes.metrics()?);
    let side = if cache == Cache::On { "cache on" } else { "cache off" };
    let alone = match cache {
        Cache::On => {
            let spec = shared_spec(args, &targets, "", args.shared_prefixes, args.concurrency, args.requests, 0)?;
            let label = format!("single node, {side}, {} prompts", args.shared_prefixes);
            Some(measure(spec, &label, args.quiet, &metrics).await?)
        }
        Cache::Off => None,
    };
    let warm_up = shared_spec(args, &targets, "", 1, 1, 1, 1)?;
    run_load(warm_up, "warm-up", args.quiet).await?;
    let one = shared_spec(args, &targets, "", 1, 1, args.single_requests, 2)?;
    let one_prompt = measure(one, &format!("single node, {side}, 1 prompt"), args.quiet, &metrics).await?;
    let talk = conversation_spec(args, &targets)?;
    let conversations = measure(talk, &format!("conversations, {side}"), args.quiet, &metrics).await?;
    Ok(SingleNode { one_prompt, conversations, alone })
}

async fn mesh_run(args: &Args, cache: Cache, policy: Policy, name: &str) -> anyhow::Result<Measured> {
    let nodes = NodeSet::start(&node_args(args, cache, Some(args.mesh_kv_tokens)), args.nodes).await?;
    let mesh_args = MeshArgs { sidecar_bin: args.sidecar_bin.clone(), etcd_bin: args.etcd_bin.clone(), policy };
    let mesh = Mesh::start(&mesh_args, nodes, None).await?;
    let spec =
        shared_spec(args, &[mesh.target()?], &mesh.service, args.shared_prefixes, args.concurrency, args.requests, 0)?;
    let mut measured = measure(spec, name, args.quiet, &mesh.nodes.metrics()?).await?;
    let client = mesh.client.metrics.context("the client sidecar serves no metrics")?;
    measured.routed = routed(client).await?;
    Ok(measured)
}

/// Runs `spec`, reading the nodes' counters before and after.
async fn measure(spec: LoadSpec, label: &str, quiet: bool, metrics: &[SocketAddr]) -> anyhow::Result<Measured> {
    let before = scrape(metrics).await?;
    let run = run_load(spec, label, quiet).await?;
    let nodes = spread(&before, &scrape(metrics).await?);
    Ok(Measured::of(&run, nodes))
}

/// Each node's flags. Its queue may wait as long as a request's deadline:
/// on two cores a few uncached prompts ahead exceed the node's default 3 s,
/// and a refusal comes back at once, so a closed loop would spend its
/// request budget on refusals in milliseconds instead of measuring TTFT.
fn node_args(args: &Args, cache: Cache, kv_tokens: Option<u64>) -> NodeArgs {
    let mut node_arg = vec![
        cache.flag().to_string(),
        "--metrics-listen=127.0.0.1:0".into(),
        format!("--max-queue-wait={}ms", args.deadline.as_millis()),
    ];
    node_arg.extend(kv_tokens.map(|k| format!("--max-kv-tokens={k}")));
    node_arg.extend(args.node_arg.iter().cloned());
    NodeArgs {
        nodes: None,
        model: Some(args.model.clone()),
        tokens_per_sec: 0.0,
        max_running: 32,
        max_queued: 128,
        node_arg,
        node_bin: args.node_bin.clone(),
    }
}

/// The shared-prefix workload with `prefixes` system prompts. The prompts'
/// text depends on `--seed` alone; `reseed` moves the picks and questions,
/// so a warm-up run shares the measured run's prompts but not its questions.
fn shared_spec(
    args: &Args,
    targets: &[Target],
    model: &str,
    prefixes: u32,
    concurrency: usize,
    requests: u64,
    reseed: u64,
) -> anyhow::Result<LoadSpec> {
    let p = SharedPrefixes::new(prefixes, args.prefix_tokens, args.zipf_exponent, args.question_tokens, args.seed)?;
    let mix = Mix::shared_prefixes(p, Choices::one(args.max_tokens))?;
    Ok(spec(args, targets, model, mix, concurrency, requests, args.seed.wrapping_add(reseed)))
}

/// Every user holds one conversation of `--turns` turns.
fn conversation_spec(args: &Args, targets: &[Target]) -> anyhow::Result<LoadSpec> {
    let mix = Mix::conversations(Conversations::new(args.turns, args.question_tokens)?, Choices::one(args.max_tokens))?;
    let requests = args.users as u64 * u64::from(args.turns);
    Ok(spec(args, targets, "", mix, args.users, requests, args.seed))
}

fn spec(args: &Args, targets: &[Target], model: &str, mix: Mix, streams: usize, requests: u64, seed: u64) -> LoadSpec {
    LoadSpec {
        targets: targets.to_vec(),
        arrival: Arrival::Closed { concurrency: streams },
        duration: args.duration,
        max_requests: requests,
        deadline: args.deadline,
        mix,
        model: model.to_string(),
        tenant: "mesh-bench-prefix".into(),
        connections: 1,
        seed,
    }
}
