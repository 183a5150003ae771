//! The report of a run: what was asked, what happened, and the marks (faults,
//! load steps) to draw on the plot. Rendered as a table or JSON.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use super::cache::PromptCache;
use super::engine::{Arrival, LoadSpec, MAX_REQUESTS};
use super::stats::{Latency, Summary};

/// The run's parameters, as the report shows them.
#[derive(Debug, Clone, Serialize)]
pub struct SpecEcho {
    /// "open" or "closed".
    pub mode: &'static str,
    pub rate_per_s: Option<f64>,
    pub concurrency: Option<usize>,
    pub duration_s: f64,
    pub max_requests: u64,
    pub deadline_s: f64,
    /// The prompts: weighted lengths in words (`16:3,128:1`), or what the
    /// shared-prefix or conversation mix was.
    pub prompt_words: String,
    pub max_tokens: String,
    pub targets: Vec<String>,
    pub connections: usize,
    pub seed: u64,
}

impl SpecEcho {
    pub fn of(spec: &LoadSpec) -> SpecEcho {
        let (mode, rate_per_s, concurrency) = match spec.arrival {
            Arrival::Open { rate } => ("open", Some(rate), None),
            Arrival::Closed { concurrency } => ("closed", None, Some(concurrency)),
        };
        SpecEcho {
            mode,
            rate_per_s,
            concurrency,
            duration_s: spec.duration.as_secs_f64(),
            max_requests: spec.max_requests,
            deadline_s: spec.deadline.as_secs_f64(),
            prompt_words: spec.mix.describe_prompts(),
            max_tokens: spec.mix.max_tokens().to_string(),
            targets: spec.targets.iter().map(|t| t.addr().to_string()).collect(),
            connections: spec.connections,
            seed: spec.seed,
        }
    }
}

/// Something that happened at a point of the run (a fault, a new load step).
#[derive(Debug, Clone, Serialize)]
pub struct Mark {
    pub at_s: f64,
    pub label: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub title: String,
    pub spec: SpecEcho,
    pub summary: Summary,
    pub marks: Vec<Mark>,
}

impl Report {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    /// The human summary: a few aligned lines.
    pub fn table(&self) -> String {
        let (sp, s) = (&self.spec, &self.summary);
        let load = match (sp.rate_per_s, sp.concurrency) {
            (Some(r), _) => format!("open loop, {r} req/s"),
            (_, Some(c)) => format!("closed loop, {c} streams"),
            _ => String::new(),
        };
        let mut t = String::new();
        let _ = writeln!(t, "{}", self.title);
        let cap = match sp.max_requests < MAX_REQUESTS {
            true => format!(" (at most {} requests)", sp.max_requests),
            false => String::new(),
        };
        let _ = writeln!(
            t,
            "  load         {load} for {:.1} s{cap}, deadline {:.1} s, prompts {}, max_tokens {}",
            sp.duration_s, sp.deadline_s, sp.prompt_words, sp.max_tokens
        );
        let _ = writeln!(t, "  targets      {}", sp.targets.join(", "));
        let _ = writeln!(t, "  requests     {} sent in {:.2} s: {}", s.sent, s.elapsed_s, counts(&s.status_counts));
        let _ = writeln!(t, "  {:<12} {}", "TTFT", latency(&s.ttft));
        let _ = writeln!(t, "  {:<12} {}", "inter-token", latency(&s.inter_token));
        let _ = writeln!(t, "  {:<12} {}", "OK duration", latency(&s.ok_total_time));
        let _ = writeln!(t, "  throughput   {} tokens, {:.1} tokens/s", s.tokens, s.tokens_per_s);
        let _ = writeln!(
            t,
            "  goodput      {} requests ({:.2}/s), {} tokens ({:.1}/s) finished OK within the deadline",
            s.goodput.requests, s.goodput.requests_per_s, s.goodput.tokens, s.goodput.tokens_per_s
        );
        t += &prompt_cache_lines(&s.prompt_cache);
        for m in &self.marks {
            let _ = writeln!(t, "  at {:>6.2} s  {}", m.at_s, m.label);
        }
        t
    }
}

/// Prompt tokens and cache hits, and TTFT per turn; nothing when the
/// server reported no usage.
pub fn prompt_cache_lines(c: &PromptCache) -> String {
    if c.requests == 0 {
        return String::new();
    }
    let mut t = format!(
        "  prompts      {} tokens in {} requests, {} from the prefix cache (hit rate {:.1}%), {} computed\n",
        c.prompt_tokens,
        c.requests,
        c.cached_tokens,
        100.0 * c.hit_rate,
        c.prefill_tokens
    );
    for turn in &c.turns {
        let _ = writeln!(
            t,
            "  turn {:<7} TTFT {}; prompt {:.0} tokens, hit rate {:.1}%",
            turn.turn,
            turn.ttft.show(),
            turn.prompt_tokens_mean,
            100.0 * turn.hit_rate
        );
    }
    t
}

/// `OK 12, RESOURCE_EXHAUSTED 3`.
pub fn counts(c: &BTreeMap<String, u64>) -> String {
    let parts: Vec<String> = c.iter().map(|(k, v)| format!("{k} {v}")).collect();
    if parts.is_empty() { "none".into() } else { parts.join(", ") }
}

fn latency(l: &Latency) -> String {
    if l.count == 0 {
        return "no samples".into();
    }
    format!(
        "p50 {:.1} ms  p90 {:.1} ms  p99 {:.1} ms  max {:.1} ms  (n={})",
        l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms, l.count
    )
}
