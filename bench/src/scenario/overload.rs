//! `overload`: twice the mesh's capacity, open loop, through the mesh and
//! straight to the nodes, to show what the sidecars' bulkheads buy.
//!
//! Phases: bring up the mesh (etcd, each node behind a sidecar, a client
//! sidecar); probe it at a low rate for the unloaded p99 TTFT; measure its
//! capacity (or take `--capacity`); offer `--load-factor` (2) times that as
//! Poisson arrivals through the client sidecar. Then stop the mesh, start
//! fresh nodes (so their peak memory is their own) and repeat probe and
//! overload straight to them, round robin, without sidecars.
//!
//! Capacity is a closed loop of one stream per slot (nodes x the bulkhead's
//! `max_concurrency`) through the mesh: every slot busy, none queued, which
//! is what the nodes can serve, measured as good tokens per second over the
//! steady window and turned into requests/s by the tokens per request.
//!
//! The bulkhead defaults, and why. `max_concurrency` = the node's
//! `--max-running`, so the node never queues behind the sidecar's back and
//! the sidecar's gate is the only queue. `max_queue` = 0: at 2x the queue is
//! always full, so every admitted request would wait in it, and a place in
//! the queue costs one slot release: hold time / slots (~20 ms at defaults)
//! on average, but exponentially distributed, so ~4.6x that at p99. Measured
//! on 2 synthetic nodes at 2x (README): queue 0, 1, 2 gave admitted p99 TTFT
//! 1.15x, 2.3x, 5.3x the unloaded p99 for goodput 99.3%, 100.4%, 101.7% of
//! capacity. The queue buys about a percent of goodput and costs the TTFT
//! target; with none, a freed slot idles only until the next arrival (every
//! ~5 ms at 2x), and the client sidecar retries a refused request on the
//! other node within its retry budget, which fills most such slots. A
//! refusal from an empty queue is immediate, which the 10 ms refusal target
//! needs: a waiter refused at `max_queue_wait` would be a slow refusal.
//! `max_queue_wait` therefore only matters with `--max-queue` above 0. Below
//! capacity, bursts are what a queue of 1-2 absorbs; this scenario is about
//! overload, and `--max-queue` is there to try either.

use std::time::Duration;

use anyhow::bail;
use serde::Serialize;

use super::measures::{Check, Percentiles, Refusals, Run, WindowGoodput, admitted_ttft, refusals, run_load};
use super::mesh::{Bulkhead, Mesh, MeshArgs};
use super::nodes::{NodeArgs, NodeSet};
use super::{OutArgs, Workload, append_timeline};
use crate::load::cli::parse_duration;
use crate::load::report::counts;
use crate::load::{Arrival, Choices, LoadSpec, MAX_REQUESTS, Mark, Report, RequestRecord, Target, plot};
use harness::Memory;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub nodes: NodeArgs,
    #[command(flatten)]
    pub mesh: MeshArgs,
    #[command(flatten)]
    pub out: OutArgs,
    /// The mesh's capacity in requests/s; measured when absent.
    #[arg(long)]
    pub capacity: Option<f64>,
    /// How long the capacity measurement runs.
    #[arg(long, default_value = "8s", value_parser = parse_duration)]
    pub capacity_duration: Duration,
    /// Offered load as a multiple of capacity.
    #[arg(long, default_value_t = 2.0)]
    pub load_factor: f64,
    /// How long the overload is offered (each of mesh and direct).
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Goodput is measured from this long after the start of a run to its
    /// last send (see `measures::window_goodput`).
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Open-loop rate of the unloaded probes (requests/s, all nodes).
    #[arg(long, default_value_t = 10.0)]
    pub probe_rate: f64,
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub probe_duration: Duration,
    /// Per-request deadline; goodput counts only requests finished within it.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub deadline: Duration,
    /// Node sidecars' bulkhead: streams at the node (default: --max-running).
    #[arg(long)]
    pub max_concurrency: Option<u32>,
    /// Node sidecars' bulkhead: requests waiting for a slot (see the module
    /// docs for why none).
    #[arg(long, default_value_t = 0)]
    pub max_queue: u32,
    /// Node sidecars' bulkhead: longest wait for a slot before a refusal.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub max_queue_wait: Duration,
    #[command(flatten)]
    pub workload: Workload,
}

/// Targets, as the issue states them.
pub const GOODPUT_SHARE_TARGET: f64 = 0.90;
pub const TTFT_MULTIPLE_TARGET: f64 = 3.0;
pub const REFUSAL_P99_TARGET_MS: f64 = 10.0;

/// How the mesh's capacity was found.
#[derive(Debug, Clone, Serialize)]
pub struct Capacity {
    pub requests_per_s: f64,
    pub tokens_per_s: f64,
    /// "measured: ..." or "given with --capacity".
    pub how: String,
    /// The closed-loop run, when measured.
    pub run: Option<Report>,
    pub window: Option<WindowGoodput>,
}

/// One overload run (mesh or direct) and what it shows.
#[derive(Debug, Clone, Serialize)]
pub struct PathReport {
    pub path: String,
    pub unloaded_ttft_p99_ms: f64,
    pub probe: Report,
    pub load: Report,
    /// Arrivals the schedule held; equal to `load.summary.sent` when every
    /// arrival was sent and recorded.
    pub scheduled: u64,
    pub goodput: WindowGoodput,
    /// Good tokens/s over the window as a share of capacity tokens/s.
    pub goodput_share: f64,
    pub admitted_ttft: Percentiles,
    /// Admitted p99 TTFT over the unloaded p99.
    pub ttft_multiple: f64,
    pub refusals: Refusals,
    /// Every node and sidecar of this path: after the probe, and after the overload.
    pub memory_after_probe: Vec<Memory>,
    pub memory_after_load: Vec<Memory>,
    pub checks: Vec<Check>,
}

#[derive(Debug, Clone, Serialize)]
pub struct OverloadReport {
    pub nodes: String,
    pub bulkhead: Bulkhead,
    pub capacity: Capacity,
    pub offered_per_s: f64,
    pub mesh: PathReport,
    pub direct: PathReport,
    pub json_path: String,
    pub svg_path: String,
}

/// The report and the raw records of both overload runs (for tests).
pub struct Overload {
    pub report: OverloadReport,
    pub mesh_records: Vec<RequestRecord>,
    pub direct_records: Vec<RequestRecord>,
}

pub async fn run(args: Args) -> anyhow::Result<Overload> {
    let count = args.nodes.nodes.unwrap_or(2);
    if args.warmup >= args.duration || args.warmup >= args.capacity_duration {
        bail!("--warmup {:?} must be shorter than --duration and --capacity-duration", args.warmup);
    }
    if !(args.load_factor > 0.0 && args.load_factor.is_finite()) {
        bail!("--load-factor must be above 0");
    }
    let bulkhead = Bulkhead {
        max_concurrency: args.max_concurrency.unwrap_or(args.nodes.max_running),
        max_queue: args.max_queue,
        max_queue_wait: args.max_queue_wait,
    };
    let mix = args.workload.mix()?;
    let spec = |targets: Vec<Target>, model: &str, arrival: Arrival, duration: Duration| LoadSpec {
        targets,
        arrival,
        duration,
        max_requests: MAX_REQUESTS,
        deadline: args.deadline,
        mix: mix.clone(),
        model: model.to_string(),
        tenant: "mesh-bench-overload".into(),
        connections: 4,
        seed: args.workload.seed,
    };
    let probe = Arrival::Open { rate: args.probe_rate };
    let mut timeline = Vec::new();
    let mut marks = Vec::new();
    let mut phase = |run: &Run, label: &str| {
        let at = append_timeline(&mut timeline, &run.report.summary.timeline);
        marks.push(Mark { at_s: at, label: label.to_string() });
    };

    // The mesh: probe, capacity, overload.
    let mesh = Mesh::start(&args.mesh, NodeSet::start(&args.nodes, count).await?, Some(&bulkhead)).await?;
    let (target, service) = (vec![mesh.target()?], mesh.service.clone());
    let mesh_probe =
        run_load(spec(target.clone(), &service, probe, args.probe_duration), "mesh probe", args.workload.quiet).await?;
    phase(&mesh_probe, "mesh probe");
    let mesh_probe_memory = mesh.memory();
    let capacity = match args.capacity {
        Some(c) => Capacity {
            requests_per_s: c,
            tokens_per_s: c * mean_max_tokens(&args.workload.max_tokens),
            how: "given with --capacity".into(),
            run: None,
            window: None,
        },
        None => {
            let streams = count * bulkhead.max_concurrency as usize;
            let closed = Arrival::Closed { concurrency: streams };
            let run = run_load(
                spec(target.clone(), &service, closed, args.capacity_duration),
                "capacity",
                args.workload.quiet,
            )
            .await?;
            phase(&run, "capacity");
            let w = super::measures::window_goodput(
                &run.result.records,
                args.deadline,
                args.warmup,
                args.capacity_duration,
            );
            if w.tokens_per_s <= 0.0 {
                bail!("the capacity run had no good requests: {}", counts(&run.report.summary.status_counts));
            }
            Capacity {
                requests_per_s: w.tokens_per_s / w.tokens_per_good_request,
                tokens_per_s: w.tokens_per_s,
                how: format!(
                    "measured: closed loop of {streams} streams through the mesh for {:?}, good tokens/s over {:.0}-{:.0} s",
                    args.capacity_duration, w.from_s, w.to_s
                ),
                run: Some(run.report),
                window: Some(w),
            }
        }
    };
    let offered = capacity.requests_per_s * args.load_factor;
    let overload = Arrival::Open { rate: offered };
    let mesh_load =
        run_load(spec(target, &service, overload, args.duration), "mesh overload", args.workload.quiet).await?;
    phase(&mesh_load, &format!("mesh {:.1}/s", offered));
    let mesh_load_memory = mesh.memory();
    drop(mesh);

    // Straight to fresh nodes: probe, overload.
    let nodes = NodeSet::start(&args.nodes, count).await?;
    let targets = nodes.targets()?;
    let direct_probe =
        run_load(spec(targets.clone(), "", probe, args.probe_duration), "direct probe", args.workload.quiet).await?;
    phase(&direct_probe, "direct probe");
    let direct_probe_memory = nodes.memory();
    let direct_load =
        run_load(spec(targets, "", overload, args.duration), "direct overload", args.workload.quiet).await?;
    phase(&direct_load, &format!("direct {:.1}/s", offered));
    let direct_load_memory = nodes.memory();
    drop(nodes);

    let judge = |path: &str, probe: Run, load: Run, memory: (Vec<Memory>, Vec<Memory>)| {
        path_report(path, &args, &capacity, probe, load, memory)
    };
    let mesh_records = mesh_load.result.records.clone();
    let direct_records = direct_load.result.records.clone();
    let mesh = judge("mesh", mesh_probe, mesh_load, (mesh_probe_memory, mesh_load_memory));
    let direct = judge("direct", direct_probe, direct_load, (direct_probe_memory, direct_load_memory));

    let (json_path, svg_path) = args.out.paths("overload")?;
    let report = OverloadReport {
        nodes: args.nodes.describe(count),
        bulkhead,
        capacity,
        offered_per_s: offered,
        mesh,
        direct,
        json_path: json_path.display().to_string(),
        svg_path: svg_path.display().to_string(),
    };
    let title = format!("overload {:.1}x: mesh, then direct; {}", args.load_factor, report.nodes);
    plot::write_svg(&svg_path, &title, &timeline, &marks)?;
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)?;
    print!("{}", report.table());
    Ok(Overload { report, mesh_records, direct_records })
}

/// The expected max_tokens of the mix: tokens per request for a capacity
/// given in requests/s (synthetic nodes always generate max_tokens).
fn mean_max_tokens(c: &Choices) -> f64 {
    let total: f64 = c.pairs().iter().map(|&(_, w)| f64::from(w)).sum();
    c.pairs().iter().map(|&(v, w)| f64::from(v) * f64::from(w)).sum::<f64>() / total.max(1.0)
}

fn path_report(
    path: &str,
    args: &Args,
    capacity: &Capacity,
    probe: Run,
    load: Run,
    (memory_after_probe, memory_after_load): (Vec<Memory>, Vec<Memory>),
) -> PathReport {
    let records = &load.result.records;
    let unloaded = probe.report.summary.ttft.p99_ms;
    let goodput = super::measures::window_goodput(records, args.deadline, args.warmup, args.duration);
    let goodput_share = goodput.tokens_per_s / capacity.tokens_per_s;
    let admitted = admitted_ttft(records);
    let ttft_multiple = if unloaded > 0.0 { admitted.p99_ms / unloaded } else { f64::INFINITY };
    let refused = refusals(records, Duration::from_secs_f64(REFUSAL_P99_TARGET_MS / 1000.0));
    let scheduled = crate::load::arrival_offsets(
        args.workload.seed,
        capacity.requests_per_s * args.load_factor,
        args.duration,
        MAX_REQUESTS,
    )
    .len() as u64;
    let checks = checks(goodput_share, ttft_multiple, admitted.p99_ms, unloaded, &refused);
    PathReport {
        path: path.to_string(),
        unloaded_ttft_p99_ms: unloaded,
        probe: probe.report,
        load: load.report,
        scheduled,
        goodput,
        goodput_share,
        admitted_ttft: admitted,
        ttft_multiple,
        refusals: refused,
        memory_after_probe,
        memory_after_load,
        checks,
    }
}

/// The three targets of the issue, judged for one run.
pub fn checks(share: f64, multiple: f64, admitted_p99: f64, unloaded_p99: f64, r: &Refusals) -> Vec<Check> {
    let exhausted = r.by_status.get("RESOURCE_EXHAUSTED").copied().unwrap_or(0);
    let hinted = exhausted - r.without_retry_after.get("RESOURCE_EXHAUSTED").copied().unwrap_or(0);
    let fast = r.latency.p99_ms <= REFUSAL_P99_TARGET_MS;
    vec![
        Check {
            target: format!("goodput >= {:.0}% of capacity", GOODPUT_SHARE_TARGET * 100.0),
            observed: format!("{:.1}%", share * 100.0),
            pass: share >= GOODPUT_SHARE_TARGET,
        },
        Check {
            target: format!("admitted p99 TTFT <= {TTFT_MULTIPLE_TARGET}x unloaded p99"),
            observed: format!("{multiple:.2}x ({admitted_p99:.1} ms vs {unloaded_p99:.1} ms)"),
            pass: multiple <= TTFT_MULTIPLE_TARGET,
        },
        Check {
            target: format!(
                "refusals answered within {REFUSAL_P99_TARGET_MS} ms p99 with RESOURCE_EXHAUSTED (and retry-after)"
            ),
            observed: match r.count {
                0 => "no refusals".into(),
                n => format!(
                    "p99 {:.1} ms ({} of {n} over {} ms); {exhausted} of {n} RESOURCE_EXHAUSTED, {hinted} with retry-after",
                    r.latency.p99_ms, r.slow, r.slow_after_ms
                ),
            },
            pass: fast && exhausted == r.count && hinted == exhausted,
        },
    ]
}

impl OverloadReport {
    pub fn table(&self) -> String {
        let b = &self.bulkhead;
        let c = &self.capacity;
        let (m, d) = (&self.mesh, &self.direct);
        let mut t = format!(
            "overload: {}\n  node sidecars' bulkhead: max_concurrency {}, max_queue {}, max_queue_wait {:?}\n  \
             capacity {:.1} requests/s, {:.0} tokens/s ({})\n  offered {:.1} requests/s open loop for {:.1} s, \
             deadline {:.1} s\n",
            self.nodes,
            b.max_concurrency,
            b.max_queue,
            b.max_queue_wait,
            c.requests_per_s,
            c.tokens_per_s,
            c.how,
            self.offered_per_s,
            m.load.spec.duration_s,
            m.load.spec.deadline_s
        );
        let row = |name: &str, f: &dyn Fn(&PathReport) -> String| format!("  {name:<24} {:<44} {}\n", f(m), f(d));
        t += &row("", &|p| p.path.clone());
        t += &row("sent (scheduled)", &|p| format!("{} ({})", p.load.summary.sent, p.scheduled));
        t += &row("statuses", &|p| counts(&p.load.summary.status_counts));
        t += &row("goodput tokens/s", &|p| {
            format!("{:.0} = {:.1}% of capacity", p.goodput.tokens_per_s, p.goodput_share * 100.0)
        });
        t += &row("good requests/s", &|p| {
            format!("{:.1} ended in {:.0}-{:.0} s", p.goodput.requests_per_s, p.goodput.from_s, p.goodput.to_s)
        });
        t += &row("unloaded p99 TTFT", &|p| format!("{:.1} ms", p.unloaded_ttft_p99_ms));
        t += &row("admitted TTFT p50/p99", &|p| {
            format!("{:.1} / {:.1} ms", p.admitted_ttft.p50_ms, p.admitted_ttft.p99_ms)
        });
        t += &row("admitted p99 / unloaded", &|p| format!("{:.2}x", p.ttft_multiple));
        t += &row("not OK: latency p50/p99", &|p| match p.refusals.count {
            0 => "none".into(),
            _ => format!(
                "{:.2} / {:.2} ms, {} over {} ms",
                p.refusals.latency.p50_ms, p.refusals.latency.p99_ms, p.refusals.slow, p.refusals.slow_after_ms
            ),
        });
        t += &row("not OK without retry-after", &|p| counts(&p.refusals.without_retry_after));
        for (i, mem) in m.memory_after_load.iter().enumerate() {
            let before = m.memory_after_probe.get(i).map_or(0, |x| x.peak_rss_kib);
            let direct =
                d.memory_after_load.get(i).map(|x| (x, d.memory_after_probe.get(i).map_or(0, |y| y.peak_rss_kib)));
            let show =
                |before: u64, after: &Memory| format!("{:.1} -> {:.1} MiB", mib(before), mib(after.peak_rss_kib));
            t += &format!(
                "  {:<24} {:<44} {}\n",
                format!("peak RSS {}", mem.process),
                show(before, mem),
                direct.map_or(String::new(), |(x, b)| show(b, x))
            );
        }
        t += "  (peak RSS: after the unloaded probe -> after the overload)\n";
        for p in [m, d] {
            t += &format!("  targets, {}:\n", p.path);
            for c in &p.checks {
                t += &format!("    {}\n", c.line());
            }
        }
        t + &format!("  report {}\n  plot   {}\n", self.json_path, self.svg_path)
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
