//! `baseline`: capacity of the nodes, found by stepping the open-loop rate up
//! until callers notice.
//!
//! First a probe at a low rate measures the unloaded p99 TTFT. Then the
//! offered rate climbs geometrically; a step passes when every request
//! finished OK within its deadline and the p99 TTFT stayed within
//! `--ttft-factor` (2x) of the unloaded value. After the first failing step,
//! a few bisection steps between the last pass and the first failure narrow
//! the answer. Capacity is the highest passing rate. Each step runs to its
//! end (every request finished) before the next, so steps do not overlap.
//!
//! The probe is a low open-loop rate rather than a single stream: with one
//! stream a request never waits for a batch step already in progress, so
//! its TTFT would be a best case no loaded server reaches, and 2x of it
//! would fail at any concurrency.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::bail;
use serde::Serialize;

use super::nodes::{NodeArgs, NodeSet};
use super::{OutArgs, Workload, append_timeline};
use crate::load::cli::parse_duration;
use crate::load::progress::run_with_progress;
use crate::load::report::SpecEcho;
use crate::load::{Arrival, Load, LoadSpec, MAX_REQUESTS, Mark, Report, Summary, plot, summarize};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub nodes: NodeArgs,
    #[command(flatten)]
    pub out: OutArgs,
    /// Open-loop rate (requests/s, all nodes together) of the unloaded probe.
    #[arg(long, default_value_t = 4.0)]
    pub probe_rate: f64,
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub probe_duration: Duration,
    /// First offered rate of the climb, per node.
    #[arg(long, default_value_t = 10.0)]
    pub start_rate: f64,
    /// Each climbing step offers this many times the previous rate.
    #[arg(long, default_value_t = 1.5)]
    pub step_factor: f64,
    /// Most climbing steps.
    #[arg(long, default_value_t = 7)]
    pub max_steps: usize,
    /// Bisection steps after the first failure.
    #[arg(long, default_value_t = 2)]
    pub refine_steps: usize,
    #[arg(long, default_value = "4s", value_parser = parse_duration)]
    pub step_duration: Duration,
    /// A step fails when its p99 TTFT exceeds this times the unloaded p99.
    #[arg(long, default_value_t = 2.0)]
    pub ttft_factor: f64,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub deadline: Duration,
    #[command(flatten)]
    pub workload: Workload,
}

/// One load step and its verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub rate_per_s: f64,
    pub pass: bool,
    pub verdict: String,
    pub ttft_p99_ms: f64,
    pub sent: u64,
    pub good: u64,
    pub goodput_tokens_per_s: f64,
    pub status_counts: BTreeMap<String, u64>,
    pub report: Report,
}

#[derive(Debug, Clone, Serialize)]
pub struct BaselineReport {
    pub nodes: String,
    pub unloaded_ttft_p99_ms: f64,
    pub ttft_threshold_ms: f64,
    pub probe: Report,
    pub steps: Vec<Step>,
    /// Highest passing rate (requests/s, all nodes); None if the first step failed.
    pub capacity_per_s: Option<f64>,
    /// False when no step failed: capacity is at least the figure, not exactly it.
    pub saturated: bool,
    pub json_path: String,
    pub svg_path: String,
}

impl BaselineReport {
    pub fn table(&self) -> String {
        let mut t = format!(
            "baseline: {}\n  unloaded p99 TTFT {:.1} ms (probe at {:.1} req/s); threshold {:.1} ms\n",
            self.nodes,
            self.unloaded_ttft_p99_ms,
            self.probe.spec.rate_per_s.unwrap_or_default(),
            self.ttft_threshold_ms
        );
        for s in &self.steps {
            t += &format!(
                "  {:>8.1} req/s  {}  p99 TTFT {:>8.1} ms  good {:>5}/{:<5}  {:>8.1} good tokens/s  {}\n",
                s.rate_per_s,
                if s.pass { "pass" } else { "FAIL" },
                s.ttft_p99_ms,
                s.good,
                s.sent,
                s.goodput_tokens_per_s,
                s.verdict
            );
        }
        t += &match (self.capacity_per_s, self.saturated) {
            (Some(c), true) => format!("  capacity: {c:.1} requests/s\n"),
            (Some(c), false) => format!("  capacity: at least {c:.1} requests/s (no step failed; raise --max-steps)\n"),
            (None, _) => "  capacity: below the first step; lower --start-rate\n".to_string(),
        };
        t + &format!("  report {}\n  plot   {}\n", self.json_path, self.svg_path)
    }
}

pub async fn run(args: Args) -> anyhow::Result<BaselineReport> {
    let count = args.nodes.nodes.unwrap_or(1);
    let nodes = NodeSet::start(&args.nodes, count).await?;
    let targets = nodes.targets()?;
    let mix = args.workload.mix()?;
    let spec = |rate: f64, duration: Duration| LoadSpec {
        targets: targets.clone(),
        arrival: Arrival::Open { rate },
        duration,
        max_requests: MAX_REQUESTS,
        deadline: args.deadline,
        mix: mix.clone(),
        model: String::new(),
        tenant: "mesh-bench-baseline".into(),
        connections: 4,
        seed: args.workload.seed,
    };

    let probe = measure(spec(args.probe_rate, args.probe_duration), "probe", args.workload.quiet).await?;
    if probe.summary.errors() > 0 || probe.summary.ttft.count == 0 {
        bail!(
            "the unloaded probe at {} req/s already failed ({:?}): the nodes cannot serve even low load",
            args.probe_rate,
            probe.summary.status_counts
        );
    }
    let unloaded = probe.summary.ttft.p99_ms;
    let threshold = unloaded * args.ttft_factor;
    let mut timeline = probe.summary.timeline.clone();
    let mut marks = vec![Mark { at_s: 0.0, label: format!("probe {:.1}/s", args.probe_rate) }];

    let mut search =
        RateSearch::new(args.start_rate * count as f64, args.step_factor, args.max_steps, args.refine_steps);
    let mut steps = Vec::new();
    while let Some(rate) = search.next_rate() {
        let report = measure(spec(rate, args.step_duration), &format!("{rate:.1}/s"), args.workload.quiet).await?;
        let (pass, verdict) = judge(&report.summary, threshold, args.ttft_factor);
        search.record(rate, pass);
        let at = append_timeline(&mut timeline, &report.summary.timeline);
        marks.push(Mark { at_s: at, label: format!("{rate:.1}/s") });
        let s = &report.summary;
        steps.push(Step {
            rate_per_s: rate,
            pass,
            verdict,
            ttft_p99_ms: s.ttft.p99_ms,
            sent: s.sent,
            good: s.goodput.requests,
            goodput_tokens_per_s: s.goodput.tokens_per_s,
            status_counts: s.status_counts.clone(),
            report: report.clone(),
        });
    }
    drop(nodes);

    let (json_path, svg_path) = args.out.paths("baseline")?;
    let report = BaselineReport {
        nodes: args.nodes.describe(count),
        unloaded_ttft_p99_ms: unloaded,
        ttft_threshold_ms: threshold,
        probe,
        steps,
        capacity_per_s: search.capacity(),
        saturated: search.saturated(),
        json_path: json_path.display().to_string(),
        svg_path: svg_path.display().to_string(),
    };
    plot::write_svg(&svg_path, &format!("baseline: {}", report.nodes), &timeline, &marks)?;
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)?;
    print!("{}", report.table());
    Ok(report)
}

/// Connects, runs with a progress bar, summarises.
pub(crate) async fn measure(spec: LoadSpec, label: &str, quiet: bool) -> anyhow::Result<Report> {
    let load = Load::connect(spec).await?;
    let result = run_with_progress(&load, !quiet, label).await?;
    let summary = summarize(&result.records, result.elapsed, load.spec().deadline);
    Ok(Report { title: label.to_string(), spec: SpecEcho::of(load.spec()), summary, marks: Vec::new() })
}

/// A step passes when every request was good (OK within the deadline) and
/// the p99 TTFT stayed within the threshold.
pub fn judge(s: &Summary, threshold_ms: f64, factor: f64) -> (bool, String) {
    if s.goodput.requests < s.sent {
        let not_good: Vec<String> =
            s.status_counts.iter().filter(|(k, _)| k.as_str() != "OK").map(|(k, v)| format!("{k} {v}")).collect();
        let late = s.count("OK") - s.goodput.requests.min(s.count("OK"));
        let mut why = not_good.join(", ");
        if late > 0 {
            why += &format!("{}{late} OK but late or cancelled", if why.is_empty() { "" } else { ", " });
        }
        return (false, format!("{} of {} not good: {why}", s.sent - s.goodput.requests, s.sent));
    }
    if s.ttft.p99_ms > threshold_ms {
        return (false, format!("p99 TTFT {:.1} ms > {factor}x unloaded ({threshold_ms:.1} ms)", s.ttft.p99_ms));
    }
    (true, "all good, p99 TTFT within threshold".into())
}

/// The rate schedule: climb geometrically until a step fails, then bisect
/// (geometric mean) between the highest pass and the lowest failure.
#[derive(Debug, Clone)]
pub struct RateSearch {
    next: Option<f64>,
    factor: f64,
    climbs_left: usize,
    refines_left: usize,
    best_pass: Option<f64>,
    first_fail: Option<f64>,
}

impl RateSearch {
    pub fn new(start: f64, factor: f64, max_steps: usize, refine_steps: usize) -> RateSearch {
        let usable = start.is_finite() && start > 0.0 && factor > 1.0 && max_steps > 0;
        RateSearch {
            next: usable.then_some(start),
            factor,
            climbs_left: max_steps.saturating_sub(1),
            refines_left: refine_steps,
            best_pass: None,
            first_fail: None,
        }
    }

    pub fn next_rate(&self) -> Option<f64> {
        self.next
    }

    pub fn record(&mut self, rate: f64, pass: bool) {
        if pass {
            self.best_pass = Some(self.best_pass.map_or(rate, |b| b.max(rate)));
        } else {
            self.first_fail = Some(self.first_fail.map_or(rate, |f| f.min(rate)));
        }
        self.next = match (self.best_pass, self.first_fail) {
            (_, None) if self.climbs_left > 0 => {
                self.climbs_left -= 1;
                Some(rate * self.factor)
            }
            (Some(lo), Some(hi)) if self.refines_left > 0 => {
                self.refines_left -= 1;
                Some((lo * hi).sqrt())
            }
            _ => None,
        };
    }

    pub fn capacity(&self) -> Option<f64> {
        self.best_pass
    }

    /// Whether some step failed, so capacity is bounded from above.
    pub fn saturated(&self) -> bool {
        self.first_fail.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_search(mut s: RateSearch, capacity: f64) -> (Vec<f64>, RateSearch) {
        let mut rates = Vec::new();
        while let Some(r) = s.next_rate() {
            rates.push(r);
            s.record(r, r <= capacity);
        }
        (rates, s)
    }

    #[test]
    fn search_climbs_then_bisects() {
        let (rates, s) = run_search(RateSearch::new(10.0, 1.5, 7, 2), 40.0);
        let want = [10.0, 15.0, 22.5, 33.75, 50.625, (33.75f64 * 50.625).sqrt()];
        assert_eq!(&rates[..6], &want);
        // 41.33 fails, so the last step bisects 33.75..41.33.
        assert_eq!(rates.len(), 7);
        assert!((rates[6] - (33.75f64 * want[5]).sqrt()).abs() < 1e-9);
        assert_eq!(s.capacity(), Some(rates[6]));
        assert!(s.saturated());
    }

    #[test]
    fn search_reports_unsaturated_and_below_start() {
        let (rates, s) = run_search(RateSearch::new(10.0, 2.0, 3, 2), 1000.0);
        assert_eq!(rates, vec![10.0, 20.0, 40.0]);
        assert_eq!((s.capacity(), s.saturated()), (Some(40.0), false));
        let (rates, s) = run_search(RateSearch::new(10.0, 2.0, 3, 2), 5.0);
        assert_eq!(rates, vec![10.0]);
        assert_eq!((s.capacity(), s.saturated()), (None, true));
    }

    #[test]
    fn judge_fails_on_errors_and_on_slow_first_tokens() {
        let mut s = Summary { sent: 10, ..Summary::default() };
        s.status_counts.insert("OK".into(), 10);
        s.goodput.requests = 10;
        s.ttft.p99_ms = 39.0;
        assert!(judge(&s, 40.0, 2.0).0);
        s.ttft.p99_ms = 41.0;
        let (pass, why) = judge(&s, 40.0, 2.0);
        assert!(!pass && why.contains("p99 TTFT 41.0 ms > 2x"), "{why}");
        s.ttft.p99_ms = 1.0;
        s.status_counts.insert("OK".into(), 8);
        s.status_counts.insert("RESOURCE_EXHAUSTED".into(), 2);
        s.goodput.requests = 7;
        let (pass, why) = judge(&s, 40.0, 2.0);
        assert!(!pass, "{why}");
        assert_eq!(why, "3 of 10 not good: RESOURCE_EXHAUSTED 2, 1 OK but late or cancelled");
    }
}
