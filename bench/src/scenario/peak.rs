//! `peak`: peak shaving. Offered load steps through phases (by default
//! 0.5x, 2x, 3x, 2x, 0.5x of the primary service's capacity) against three
//! arms, each on fresh processes:
//! - `shed`: the primary (`chat`, 2 synthetic nodes) alone; its node
//!   sidecars' bulkheads refuse what does not fit;
//! - `overflow`: the client sidecar degrades refused LOW/NORMAL calls to
//!   `chat-small` (`[[routing.overflow]]`), a faster synthetic service, and
//!   caches complete greedy answers (`[response_cache]`);
//! - `standby`: as `overflow`, plus one more `chat` node registered as a
//!   spare (`[node] standby = true`) and `meshctl autoscale`, which
//!   activates it when `chat` stays busy and returns it when load falls.
//!
//! The primary's capacity is measured first (a closed loop of one stream
//! per slot straight to its nodes) unless `--capacity` gives it. Every arm
//! is probed unloaded (TTFT p99, what "3x unloaded" refers to), then gets
//! the same schedule: Poisson arrivals at factor x capacity per phase, 10%
//! HIGH priority (never degraded), 10% repeats of 16 greedy prompts (the
//! cache's share); the rest are unique. The report gives per phase and arm
//! goodput, who answered (primary, overflow, cache, refused), TTFT p99 of
//! each class, HIGH requests' fate and, for `standby`, when the standby took
//! traffic after each step up and what the controller did.
//!
//! Sizing for 2 cores: 40 tokens/s per stream, 10 slots per node and 32
//! tokens a request make `chat` ~25 requests/s, so 3x is ~75 requests/s
//! through the mesh; `chat-small` streams 200 tokens/s over 16 slots
//! (~100 requests/s), room for the 2x that 3x overflows.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use super::measures::{Check, Percentiles, run_load, window_goodput};
use super::mesh::Bulkhead;
use super::nodes::NodeSet;
use super::peak_load::{Class, Shape, Step};
use super::peak_mesh::{ArmMesh, Bins};
use super::peak_report::{PhaseFigures, SecondShares, StandbyFigures};
use super::peak_watch::Sample;
use super::{peak_checks, peak_load, peak_plot, peak_report, peak_watch};
use crate::load::cli::parse_duration;
use crate::load::{Arrival, LoadSpec, MAX_REQUESTS, Target};

pub use super::peak_args::{Args, Arm, Phase};

pub(super) const PRIMARY: &str = "chat";
pub(super) const OVERFLOW: &str = "chat-small";

/// The primary's capacity, in requests/s and tokens/s, and how it was found.
#[derive(Debug, Clone, Serialize)]
pub struct Capacity {
    pub requests_per_s: f64,
    pub tokens_per_s: f64,
    pub how: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ArmReport {
    pub arm: String,
    pub layout: String,
    /// TTFT of the unloaded probe's requests (all served by the primary).
    pub unloaded_ttft: Percentiles,
    pub phases: Vec<PhaseFigures>,
    pub standby: Option<StandbyFigures>,
    pub checks: Vec<Check>,
    pub seconds: Vec<SecondShares>,
    pub samples: Vec<Sample>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PeakReport {
    pub capacity: Capacity,
    pub primary: String,
    pub overflow: String,
    pub bulkhead: Bulkhead,
    pub workload: String,
    pub controller: String,
    pub arms: Vec<ArmReport>,
    pub json_path: String,
    pub svg_path: String,
}

pub async fn run(args: Args) -> anyhow::Result<PeakReport> {
    args.validate()?;
    let capacity = match args.capacity {
        Some(c) => Capacity { requests_per_s: c, tokens_per_s: c * args.mean_max_tokens(), how: "given".into() },
        None => measure_capacity(&args).await?,
    };
    let steps: Vec<Step> =
        args.phases.iter().map(|p| Step { rate: p.factor * capacity.requests_per_s, duration: p.duration }).collect();
    let mut arms = Vec::new();
    for &arm in &args.arms {
        eprintln!("peak: arm {} ({})", arm.name(), args.layout_text(arm));
        arms.push(run_arm(arm, &args, &steps).await?);
    }
    let (json_path, svg_path) = args.out.paths("peak")?;
    let report = PeakReport {
        capacity,
        primary: args.primary_args().describe(args.primary_nodes),
        overflow: args.overflow_args().describe(args.overflow_nodes),
        bulkhead: args.bulkhead(),
        workload: args.workload_text(),
        controller: args.autoscale_flags().join(" "),
        arms,
        json_path: json_path.display().to_string(),
        svg_path: svg_path.display().to_string(),
    };
    let rows: Vec<peak_plot::Row> = report.arms.iter().map(|a| plot_row(a, &args)).collect();
    let title = format!("peak: {} of {:.1} requests/s", args.phases_text(), report.capacity.requests_per_s);
    peak_plot::write_svg(&svg_path, &title, &rows)?;
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)?;
    print!("{}", peak_checks::table(&report));
    Ok(report)
}

/// A closed loop of one stream per slot straight to fresh primary nodes:
/// good tokens/s over the steady window, turned into requests/s.
async fn measure_capacity(args: &Args) -> anyhow::Result<Capacity> {
    let nodes = NodeSet::start(&args.primary_args(), args.primary_nodes).await?;
    let streams = args.primary_nodes * args.primary_max_running as usize;
    let spec = LoadSpec {
        targets: nodes.targets()?,
        arrival: Arrival::Closed { concurrency: streams },
        duration: args.capacity_duration,
        max_requests: MAX_REQUESTS,
        deadline: args.deadline,
        mix: args.workload.mix()?,
        model: String::new(),
        tenant: "mesh-bench-peak".into(),
        connections: 4,
        seed: args.workload.seed,
    };
    let run = run_load(spec, "capacity", args.workload.quiet).await?;
    let warmup = args.capacity_duration / 4;
    let w = window_goodput(&run.result.records, args.deadline, warmup, args.capacity_duration);
    if w.tokens_per_s <= 0.0 || w.tokens_per_good_request <= 0.0 {
        bail!("the capacity run had no good requests");
    }
    Ok(Capacity {
        requests_per_s: w.tokens_per_s / w.tokens_per_good_request,
        tokens_per_s: w.tokens_per_s,
        how: format!(
            "measured: closed loop of {streams} streams straight to the {} nodes for {:?}, good tokens/s over {:.1}-{:.1} s",
            args.primary_nodes, args.capacity_duration, w.from_s, w.to_s
        ),
    })
}

async fn run_arm(arm: Arm, args: &Args, steps: &[Step]) -> anyhow::Result<ArmReport> {
    let bins = Bins {
        sidecar: harness::workspace_bin(
            "mesh-sidecar",
            args.sidecar_bin.as_deref(),
            "cargo build --release -p sidecar",
        )?,
        etcd: args.etcd_bin.clone(),
        meshctl: args.meshctl_bin.clone(),
    };
    let mesh =
        ArmMesh::start(&args.layout(arm), &bins).await.with_context(|| format!("starting arm {}", arm.name()))?;
    let clients = peak_load::connect(&Target::loopback(mesh.client.outbound)?).await?;
    let probe = [Step { rate: args.probe_rate, duration: args.probe_duration }];
    let unloaded_shape =
        Shape { high_share: 0.0, repeat_share: 0.0, seed: args.workload.seed ^ 0x9e37, ..args.shape()? };
    let probed = peak_load::run(&clients, &probe, &unloaded_shape, Instant::now()).await?;
    let unloaded =
        Percentiles::of(probed.iter().filter(|r| r.class == Class::Primary).filter_map(|r| r.ttft()).collect());

    let shape = args.shape()?;
    let done = AtomicBool::new(false);
    let started = Instant::now();
    let load = async {
        let sent = peak_load::run(&clients, steps, &shape, started).await;
        done.store(true, Ordering::Relaxed);
        sent
    };
    let tail = if arm == Arm::Standby { args.tail() } else { Duration::ZERO };
    let (sent, samples) = tokio::join!(load, peak_watch::watch(&mesh, PRIMARY, started, &done, tail));
    let sent = sent?;

    let factors: Vec<f64> = args.phases.iter().map(|p| p.factor).collect();
    let phases = peak_report::phases(&sent, steps, &factors, &samples);
    let standby = (arm == Arm::Standby).then(|| {
        let slots = (args.primary_max_running, args.primary_nodes);
        let mut s = peak_report::standby(&samples, steps, &factors, slots, args.scale_out_above);
        s.log = peak_watch::controller_log(&mesh);
        s
    });
    let checks = peak_checks::checks(arm, &phases, standby.as_ref(), &unloaded, args);
    Ok(ArmReport {
        arm: arm.name().into(),
        layout: args.layout_text(arm),
        unloaded_ttft: unloaded,
        phases,
        standby,
        checks,
        seconds: peak_report::per_second(&sent),
        samples,
    })
}

fn plot_row<'a>(a: &'a ArmReport, args: &Args) -> peak_plot::Row<'a> {
    let spans =
        peak_report::bounds(&args.phases.iter().map(|p| Step { rate: 1.0, duration: p.duration }).collect::<Vec<_>>());
    let phases = spans.iter().zip(&a.phases).map(|(s, p)| (s.0, p.phase.clone())).collect();
    let actions = a.standby.as_ref().map_or(Vec::new(), |s| {
        let on = s.activated_at_s.iter().map(|&t| (t, true));
        on.chain(s.returned_at_s.iter().map(|&t| (t, false))).collect()
    });
    peak_plot::Row { arm: &a.arm, seconds: &a.seconds, phases, actions }
}

pub(super) fn parse_phase(s: &str) -> Result<Phase, String> {
    let (factor, duration) = s.split_once(':').ok_or_else(|| format!("{s:?}: expected FACTOR:DURATION, e.g. 2:20s"))?;
    let factor: f64 = factor.trim().trim_end_matches('x').parse().map_err(|e| format!("{s:?}: factor: {e}"))?;
    if !(factor > 0.0 && factor.is_finite()) {
        return Err(format!("{s:?}: the factor must be above 0"));
    }
    Ok(Phase { factor, duration: parse_duration(duration.trim())? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_parse_with_or_without_an_x() {
        assert_eq!(parse_phase("2:20s"), Ok(Phase { factor: 2.0, duration: Duration::from_secs(20) }));
        assert_eq!(parse_phase("0.5x:1m"), Ok(Phase { factor: 0.5, duration: Duration::from_secs(60) }));
        assert!(parse_phase("2").is_err() && parse_phase("0:2s").is_err() && parse_phase("2:soon").is_err());
    }
}
