//! `mesh-bench load`: the flags, and the command that runs one load and
//! prints its summary table (or JSON) and draws its plot.

use std::path::PathBuf;
use std::time::Duration;

use super::conversation::Conversations;
use super::engine::{Arrival, Load, LoadSpec};
use super::mix::{Choices, Mix};
use super::prefix::SharedPrefixes;
use super::progress::run_with_progress;
use super::report::{Report, SpecEcho};
use super::stats::summarize;
use super::target::{AllowedNet, Target};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Where to send: HOST:PORT of a node or sidecar. Repeat for several;
    /// requests go round-robin. Only loopback or --allow-net addresses.
    #[arg(long = "target", required = true)]
    pub targets: Vec<String>,
    /// A test network (CIDR, at least /16, inside a private range) that
    /// targets may be in besides loopback, e.g. a test namespace's 10.200.0.0/24.
    #[arg(long)]
    pub allow_net: Vec<AllowedNet>,
    /// Open loop: Poisson arrivals at this many requests per second.
    #[arg(long, conflicts_with = "concurrency", required_unless_present = "concurrency")]
    pub rate: Option<f64>,
    /// Closed loop: this many streams, each sending again when its request ends.
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Stop sending after this long (e.g. 30s, 500ms, 2m).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Stop sending after this many requests.
    #[arg(long, default_value_t = 100_000)]
    pub requests: u64,
    /// Per-request deadline, sent as grpc-timeout and enforced here; goodput
    /// counts only requests finished OK within it.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub deadline: Duration,
    /// Prompt lengths in words, weighted: `16:3,128:1`.
    #[arg(long, default_value = "16")]
    pub prompt_words: Choices,
    /// max_tokens values, weighted: `32:1,128:1`.
    #[arg(long, default_value = "32")]
    pub max_tokens: Choices,
    /// A JSON mix file instead of --prompt-words/--max-tokens:
    /// {"prompt_words": [[16, 3], [128, 1]], "max_tokens": [[32, 1]]}.
    #[arg(long, conflicts_with_all = ["prompt_words", "max_tokens"])]
    pub mix: Option<PathBuf>,
    /// Shared-prefix chats instead of plain prompts: this many system prompts
    /// (distinct from their first block), one per request picked with Zipf
    /// popularity, then a new question.
    #[arg(long, conflicts_with_all = ["prompt_words", "mix", "turns"])]
    pub shared_prefixes: Option<u32>,
    /// Length of each shared system prompt, in words of about one token each.
    #[arg(long, default_value_t = 512)]
    pub prefix_tokens: u32,
    /// Zipf exponent of system-prompt popularity (0 is uniform).
    #[arg(long, default_value_t = 1.0)]
    pub zipf_exponent: f64,
    /// Length of the question after a system prompt, or of a conversation
    /// turn's new message, in words of about one token each.
    #[arg(long, default_value_t = 32)]
    pub question_tokens: u32,
    /// Multi-turn conversations instead of plain prompts (closed loop only):
    /// each stream is a user whose conversations have this many turns, every
    /// turn resending the history with the replies. Reports TTFT per turn.
    #[arg(long, conflicts_with_all = ["prompt_words", "mix", "rate"])]
    pub turns: Option<u32>,
    /// The request's model (service); empty means the server's only model.
    #[arg(long, default_value = "")]
    pub model: String,
    #[arg(long, default_value = "mesh-bench")]
    pub tenant: String,
    /// HTTP/2 connections per target.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Seed of the arrival times and the mix.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print the report as JSON on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also draw throughput, p99 TTFT and errors over time into this SVG.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl Args {
    pub fn spec(&self) -> anyhow::Result<LoadSpec> {
        let targets = self.targets.iter().map(|t| Target::parse(t, &self.allow_net)).collect::<Result<Vec<_>, _>>()?;
        let arrival = match (self.rate, self.concurrency) {
            (Some(rate), _) => Arrival::Open { rate },
            (None, Some(concurrency)) => Arrival::Closed { concurrency },
            (None, None) => anyhow::bail!("give --rate (open loop) or --concurrency (closed loop)"),
        };
        let spec = LoadSpec {
            targets,
            arrival,
            duration: self.duration,
            max_requests: self.requests,
            deadline: self.deadline,
            mix: self.mix()?,
            model: self.model.clone(),
            tenant: self.tenant.clone(),
            connections: self.connections,
            seed: self.seed,
        };
        spec.validate()?;
        Ok(spec)
    }

    fn mix(&self) -> anyhow::Result<Mix> {
        let max_tokens = self.max_tokens.clone();
        let mix = match (self.shared_prefixes, self.turns, &self.mix) {
            (Some(n), _, _) => {
                let p =
                    SharedPrefixes::new(n, self.prefix_tokens, self.zipf_exponent, self.question_tokens, self.seed)?;
                Mix::shared_prefixes(p, max_tokens)?
            }
            (None, Some(turns), _) => Mix::conversations(Conversations::new(turns, self.question_tokens)?, max_tokens)?,
            (None, None, Some(path)) => Mix::from_file(path)?,
            (None, None, None) => Mix::new(self.prompt_words.clone(), max_tokens)?,
        };
        Ok(mix)
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let spec = args.spec()?;
    let load = Load::connect(spec).await?;
    let result = run_with_progress(&load, !args.quiet, "load").await?;
    let summary = summarize(&result.records, result.elapsed, load.spec().deadline);
    let report =
        Report { title: "mesh-bench load".into(), spec: SpecEcho::of(load.spec()), summary, marks: Vec::new() };
    if let Some(path) = &args.plot {
        super::plot::write_svg(path, "mesh-bench load", &report.summary.timeline, &report.marks)?;
    }
    match args.json {
        true => println!("{}", report.to_json()),
        false => print!("{}", report.table()),
    }
    if let Some(path) = &args.plot {
        eprintln!("plot: {}", path.display());
    }
    Ok(())
}

/// A duration as humantime writes it (`250ms`, `10s`, `1m 30s`): the one
/// way durations are written across the mesh's flags and configs.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (a duration like 250ms, 10s or 1m 30s)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("10").unwrap_err().contains("a duration like"));
        assert!(parse_duration("s").is_err());
    }
}
