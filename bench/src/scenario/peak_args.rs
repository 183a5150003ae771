//! `peak`'s flags, and what each arm runs and sends, derived from them.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;

use super::mesh::Bulkhead;
use super::nodes::NodeArgs;
use super::peak::parse_phase;
use super::peak_load::Shape;
use super::peak_mesh::Layout;
use super::{OutArgs, Workload};
use crate::load::cli::parse_duration;

/// One phase: offered load as a multiple of the primary's capacity, for a time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Phase {
    pub factor: f64,
    pub duration: Duration,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arm {
    /// The primary alone: refusals shed what does not fit.
    Shed,
    /// Refused LOW/NORMAL calls overflow to the smaller service; response cache on.
    Overflow,
    /// Overflow, plus a standby primary node and `meshctl autoscale`.
    Standby,
}

impl Arm {
    pub fn name(self) -> &'static str {
        match self {
            Arm::Shed => "shed",
            Arm::Overflow => "overflow",
            Arm::Standby => "standby",
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub out: OutArgs,
    /// Phases as FACTOR:DURATION, the factor a multiple of the primary's capacity.
    #[arg(long, value_delimiter = ',', value_parser = parse_phase, default_value = "0.5:20s,2:20s,3:20s,2:20s,0.5:30s")]
    pub phases: Vec<Phase>,
    #[arg(long, value_enum, value_delimiter = ',', default_value = "shed,overflow,standby")]
    pub arms: Vec<Arm>,
    /// The primary's capacity in requests/s; measured when absent.
    #[arg(long)]
    pub capacity: Option<f64>,
    #[arg(long, default_value = "8s", value_parser = parse_duration)]
    pub capacity_duration: Duration,
    #[arg(long, default_value_t = 2)]
    pub primary_nodes: usize,
    /// Synthetic tokens/s per stream of the primary's nodes.
    #[arg(long, default_value_t = 40.0)]
    pub primary_tokens_per_sec: f64,
    #[arg(long, default_value_t = 10)]
    pub primary_max_running: u32,
    #[arg(long, default_value_t = 1)]
    pub overflow_nodes: usize,
    #[arg(long, default_value_t = 200.0)]
    pub overflow_tokens_per_sec: f64,
    #[arg(long, default_value_t = 16)]
    pub overflow_max_running: u32,
    /// Node sidecars' bulkhead queue: room for HIGH calls to wait for the
    /// primary (a call that may be degraded queues at most the overflow
    /// rule's `queue_wait`, 50 ms, then overflows).
    #[arg(long, default_value_t = 8)]
    pub max_queue: u32,
    /// How long a queued call that may not be degraded (HIGH) waits for a
    /// slot before it is refused.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    pub max_queue_wait: Duration,
    /// Share of requests sent with PRIORITY_HIGH.
    #[arg(long, default_value_t = 0.1)]
    pub high_share: f64,
    /// Share of requests repeating one of --repeat-pool greedy prompts.
    #[arg(long, default_value_t = 0.1)]
    pub repeat_share: f64,
    #[arg(long, default_value_t = 16)]
    pub repeat_pool: u32,
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub deadline: Duration,
    /// The unloaded probe of each arm: requests/s, and for how long.
    #[arg(long, default_value_t = 4.0)]
    pub probe_rate: f64,
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub probe_duration: Duration,
    #[arg(long, default_value_t = 0.8)]
    pub scale_out_above: f64,
    #[arg(long, default_value_t = 0.4)]
    pub scale_in_below: f64,
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub window: Duration,
    /// Shorter than a production cooldown so the return fits in the last phase.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub cooldown: Duration,
    /// The standby arm keeps watching this long after the load (default:
    /// the cooldown + 5 s, as a return comes a cooldown after load falls).
    #[arg(long, value_parser = parse_duration)]
    pub tail: Option<Duration>,
    /// More flags for `meshctl autoscale`, e.g. --autoscale-arg=--lease-ttl=5.
    #[arg(long, allow_hyphen_values = true)]
    pub autoscale_arg: Vec<String>,
    #[arg(long)]
    pub sidecar_bin: Option<PathBuf>,
    #[arg(long)]
    pub meshctl_bin: Option<PathBuf>,
    #[arg(long)]
    pub node_bin: Option<PathBuf>,
    #[arg(long, default_value = "etcd")]
    pub etcd_bin: PathBuf,
    #[command(flatten)]
    pub workload: Workload,
}

impl Args {
    pub fn validate(&self) -> anyhow::Result<()> {
        let share = |v: f64| (0.0..=1.0).contains(&v);
        if self.phases.is_empty() || self.arms.is_empty() {
            bail!("--phases and --arms need at least one entry each");
        }
        if !share(self.high_share) || !share(self.repeat_share) {
            bail!("--high-share and --repeat-share must be in [0, 1]");
        }
        if self.primary_nodes == 0 || self.overflow_nodes == 0 || self.capacity.is_some_and(|c| c <= 0.0) {
            bail!("--primary-nodes, --overflow-nodes and --capacity must be above 0");
        }
        self.workload.mix()?;
        Ok(())
    }

    /// How long the standby arm watches after its load.
    pub fn tail(&self) -> Duration {
        self.tail.unwrap_or(self.cooldown + Duration::from_secs(5))
    }

    /// The mix's expected max_tokens (synthetic nodes always reach it).
    pub fn mean_max_tokens(&self) -> f64 {
        let pairs = self.workload.max_tokens.pairs();
        let total: f64 = pairs.iter().map(|&(_, w)| f64::from(w)).sum();
        pairs.iter().map(|&(v, w)| f64::from(v) * f64::from(w)).sum::<f64>() / total.max(1.0)
    }

    fn nodes(&self, name: &str, tokens_per_sec: f64, max_running: u32) -> NodeArgs {
        let mut n = NodeArgs::synthetic(1, tokens_per_sec, max_running, 128);
        n.node_arg = vec!["--model-name".into(), name.into()];
        n.node_bin = self.node_bin.clone();
        n
    }

    pub fn primary_args(&self) -> NodeArgs {
        self.nodes(super::peak::PRIMARY, self.primary_tokens_per_sec, self.primary_max_running)
    }

    pub fn overflow_args(&self) -> NodeArgs {
        self.nodes(super::peak::OVERFLOW, self.overflow_tokens_per_sec, self.overflow_max_running)
    }

    /// The primary's bulkhead admits what its node runs (the node never
    /// queues behind it, as in `overload`); the overflow service's too.
    pub fn bulkhead(&self) -> Bulkhead {
        Bulkhead {
            max_concurrency: self.primary_max_running,
            max_queue: self.max_queue,
            max_queue_wait: self.max_queue_wait,
        }
    }

    pub fn autoscale_flags(&self) -> Vec<String> {
        let mut f: Vec<String> = vec![
            "--scale-out-above".into(),
            self.scale_out_above.to_string(),
            "--scale-in-below".into(),
            self.scale_in_below.to_string(),
            "--window".into(),
            format!("{}ms", self.window.as_millis()),
            "--cooldown".into(),
            format!("{}ms", self.cooldown.as_millis()),
            "--min-active".into(),
            "1".into(),
        ];
        f.extend(self.autoscale_arg.iter().cloned());
        f
    }

    pub fn layout(&self, arm: Arm) -> Layout {
        let overflow =
            (arm != Arm::Shed).then(|| (self.overflow_args(), self.overflow_nodes, super::peak::OVERFLOW.into()));
        let mut small_bulkhead = self.bulkhead();
        small_bulkhead.max_concurrency = self.overflow_max_running;
        Layout {
            primary: self.primary_args(),
            primary_nodes: self.primary_nodes,
            primary_name: super::peak::PRIMARY.into(),
            overflow,
            autoscale: (arm == Arm::Standby).then(|| self.autoscale_flags()),
            cache: arm != Arm::Shed,
            bulkhead: self.bulkhead(),
            overflow_bulkhead: small_bulkhead,
        }
    }

    pub fn layout_text(&self, arm: Arm) -> String {
        let p = format!("{} x {}", self.primary_nodes, super::peak::PRIMARY);
        match arm {
            Arm::Shed => format!("{p}, no overflow, no cache"),
            Arm::Overflow => {
                format!("{p}, overflow to {} x {}, response cache", self.overflow_nodes, super::peak::OVERFLOW)
            }
            Arm::Standby => format!(
                "{p} + 1 standby, meshctl autoscale {}, overflow to {} x {}, response cache",
                self.autoscale_flags().join(" "),
                self.overflow_nodes,
                super::peak::OVERFLOW
            ),
        }
    }

    /// What every arm sends (the same schedule and requests in each).
    pub fn shape(&self) -> anyhow::Result<Shape> {
        Ok(Shape {
            service: super::peak::PRIMARY.into(),
            overflow: super::peak::OVERFLOW.into(),
            mix: self.workload.mix()?,
            high_share: self.high_share,
            repeat_share: self.repeat_share,
            repeat_pool: self.repeat_pool,
            deadline: self.deadline,
            seed: self.workload.seed,
        })
    }

    pub fn workload_text(&self) -> String {
        format!(
            "prompt words {:?}, max_tokens {:?}, {:.0}% HIGH, {:.0}% repeats of {} greedy prompts, deadline {:?}",
            self.workload.prompt_words.pairs(),
            self.workload.max_tokens.pairs(),
            self.high_share * 100.0,
            self.repeat_share * 100.0,
            self.repeat_pool,
            self.deadline
        )
    }

    pub fn phases_text(&self) -> String {
        let each: Vec<String> = self.phases.iter().map(|p| format!("{}x {:?}", p.factor, p.duration)).collect();
        each.join(", ")
    }
}
