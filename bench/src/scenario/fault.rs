//! `fault`: open-loop load over every node (round-robin, straight to the
//! nodes), and at `--at` one fault on one node:
//! - `kill`: SIGKILL, as a crash or an OOM kill; its requests fail at once;
//! - `stop`: SIGSTOP, as a hung host or a long pause; its requests hang until
//!   their deadline (then, with `--resume-after`, SIGCONT);
//! - `flood`: an extra open-loop load at `--flood-rate` on that node only,
//!   as one hot tenant or service; the victim's other callers see its effect.
//!
//! The runner does not start sidecars yet, so nothing routes around the
//! fault: the report shows what callers of unprotected nodes see. The same
//! scenario through sidecars will be the measure of what the mesh buys.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde::Serialize;

use super::baseline::measure;
use super::nodes::{NodeArgs, NodeSet};
use super::{OutArgs, Workload};
use crate::load::cli::parse_duration;
use crate::load::progress::run_with_progress;
use crate::load::report::{SpecEcho, counts};
use crate::load::{Arrival, Load, LoadSpec, MAX_REQUESTS, Mark, Report, RequestRecord, plot, summarize};

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    Kill,
    Stop,
    Flood,
}

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub nodes: NodeArgs,
    #[command(flatten)]
    pub out: OutArgs,
    #[arg(long, value_enum, default_value = "kill")]
    pub fault: FaultKind,
    /// Index of the node the fault hits; the last node by default.
    #[arg(long)]
    pub victim: Option<usize>,
    /// When the fault happens, from the start of the load.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub at: Duration,
    /// stop: send SIGCONT this long after SIGSTOP (default: stays stopped).
    #[arg(long, value_parser = parse_duration)]
    pub resume_after: Option<Duration>,
    /// flood: requests/s sent to the victim only, on top of the main load.
    #[arg(long, default_value_t = 400.0)]
    pub flood_rate: f64,
    /// flood: how long the flood lasts.
    #[arg(long, default_value = "4s", value_parser = parse_duration)]
    pub flood_for: Duration,
    /// Open-loop rate of the main load, all nodes together.
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub duration: Duration,
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub deadline: Duration,
    #[command(flatten)]
    pub workload: Workload,
}

/// Status counts of one target's main-load requests, split at the fault.
#[derive(Debug, Clone, Serialize)]
pub struct TargetCounts {
    pub target: String,
    pub victim: bool,
    pub sent_before_fault: BTreeMap<String, u64>,
    pub sent_after_fault: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FaultReport {
    pub nodes: String,
    pub fault: String,
    pub victim: usize,
    /// When the fault hit, from the start of the load.
    pub fault_at_s: f64,
    pub load: Report,
    pub per_target: Vec<TargetCounts>,
    /// The flood's own results (`flood` only).
    pub flood: Option<Report>,
    pub json_path: String,
    pub svg_path: String,
}

impl FaultReport {
    pub fn table(&self) -> String {
        let mut t = self.load.table();
        for c in &self.per_target {
            t += &format!(
                "  {}{}: sent before the fault: {}; after: {}\n",
                c.target,
                if c.victim { " (victim)" } else { "" },
                counts(&c.sent_before_fault),
                counts(&c.sent_after_fault)
            );
        }
        if let Some(f) = &self.flood {
            t += &format!(
                "  flood        {} sent: {}; p99 TTFT {:.1} ms\n",
                f.summary.sent,
                counts(&f.summary.status_counts),
                f.summary.ttft.p99_ms
            );
        }
        t + &format!("  report {}\n  plot   {}\n", self.json_path, self.svg_path)
    }
}

pub async fn run(args: Args) -> anyhow::Result<FaultReport> {
    let count = args.nodes.nodes.unwrap_or(2);
    let victim = args.victim.unwrap_or(count.saturating_sub(1));
    if victim >= count {
        bail!("--victim {victim} but only {count} node(s)");
    }
    if args.at >= args.duration {
        bail!("--at {:?} is not within --duration {:?}", args.at, args.duration);
    }
    let mut nodes = NodeSet::start(&args.nodes, count).await?;
    let mix = args.workload.mix()?;
    let spec = LoadSpec {
        targets: nodes.targets()?,
        arrival: Arrival::Open { rate: args.rate },
        duration: args.duration,
        max_requests: MAX_REQUESTS,
        deadline: args.deadline,
        mix,
        model: String::new(),
        tenant: "mesh-bench-fault".into(),
        connections: 4,
        seed: args.workload.seed,
    };
    let load = Load::connect(spec).await?;
    let t0 = Instant::now();
    let (result, injected) =
        tokio::join!(run_with_progress(&load, !args.workload.quiet, "fault"), inject(&mut nodes, &args, victim, t0));
    let (result, injected) = (result?, injected?);
    drop(nodes);

    let since_start = |at: Instant| at.saturating_duration_since(result.started).as_secs_f64();
    let marks: Vec<Mark> =
        injected.events.iter().map(|(at, label)| Mark { at_s: since_start(*at), label: label.clone() }).collect();
    let fault_at = injected.events.first().map_or(args.at, |(at, _)| at.saturating_duration_since(result.started));
    let summary = summarize(&result.records, result.elapsed, args.deadline);
    let fault = marks.first().map_or_else(String::new, |m| m.label.clone());
    let title = format!("fault: {fault}; {}", args.nodes.describe(count));
    let report = Report { title: title.clone(), spec: SpecEcho::of(load.spec()), summary, marks };
    let per_target = split_at_fault(&result.records, load.spec(), victim, fault_at);

    let (json_path, svg_path) = args.out.paths(&format!("fault-{}", fault_name(args.fault)))?;
    plot::write_svg(&svg_path, &title, &report.summary.timeline, &report.marks)?;
    let out = FaultReport {
        nodes: args.nodes.describe(count),
        fault,
        victim,
        fault_at_s: fault_at.as_secs_f64(),
        load: report,
        per_target,
        flood: injected.flood,
        json_path: json_path.display().to_string(),
        svg_path: svg_path.display().to_string(),
    };
    std::fs::write(&json_path, serde_json::to_string_pretty(&out)?)?;
    print!("{}", out.table());
    Ok(out)
}

fn fault_name(kind: FaultKind) -> &'static str {
    match kind {
        FaultKind::Kill => "kill",
        FaultKind::Stop => "stop",
        FaultKind::Flood => "flood",
    }
}

/// What the injector did, and when.
struct Injected {
    events: Vec<(Instant, String)>,
    flood: Option<Report>,
}

async fn inject(nodes: &mut NodeSet, args: &Args, victim: usize, t0: Instant) -> anyhow::Result<Injected> {
    tokio::time::sleep_until((t0 + args.at).into()).await;
    let mut events = Vec::new();
    let mut flood = None;
    match args.fault {
        FaultKind::Kill => {
            nodes.kill(victim)?;
            events.push((Instant::now(), format!("SIGKILL node {victim}")));
        }
        FaultKind::Stop => {
            nodes.stop(victim).await?;
            events.push((Instant::now(), format!("SIGSTOP node {victim}")));
            if let Some(after) = args.resume_after {
                tokio::time::sleep(after).await;
                nodes.resume(victim).await?;
                events.push((Instant::now(), format!("SIGCONT node {victim}")));
            }
        }
        FaultKind::Flood => {
            let began = Instant::now();
            events.push((began, format!("flood node {victim} at {}/s", args.flood_rate)));
            let spec = LoadSpec {
                targets: vec![nodes.targets()?[victim]],
                arrival: Arrival::Open { rate: args.flood_rate },
                duration: args.flood_for,
                max_requests: MAX_REQUESTS,
                deadline: args.deadline,
                mix: args.workload.mix()?,
                model: String::new(),
                tenant: "mesh-bench-flood".into(),
                connections: 4,
                seed: args.workload.seed.wrapping_add(1),
            };
            flood = Some(measure(spec, "flood", true).await?);
            events.push((began + args.flood_for, "flood ends".into()));
        }
    }
    Ok(Injected { events, flood })
}

/// Per target, the main load's statuses for requests sent before and after
/// the fault: the victim's split shows the fault, the others' show spill-over.
fn split_at_fault(records: &[RequestRecord], spec: &LoadSpec, victim: usize, at: Duration) -> Vec<TargetCounts> {
    let mut out: Vec<TargetCounts> = spec
        .targets
        .iter()
        .enumerate()
        .map(|(i, t)| TargetCounts {
            target: t.addr().to_string(),
            victim: i == victim,
            sent_before_fault: BTreeMap::new(),
            sent_after_fault: BTreeMap::new(),
        })
        .collect();
    for r in records {
        if let Some(c) = out.get_mut(r.target) {
            let side = if r.sent_at < at { &mut c.sent_before_fault } else { &mut c.sent_after_fault };
            *side.entry(r.status.label().to_string()).or_default() += 1;
        }
    }
    out
}
