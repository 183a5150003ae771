//! The `prefix` scenario's report: per run, TTFT, prompt tokens computed,
//! hit rates (callers' usage and nodes' counters) and the spread over
//! nodes; then the targets as ratios, PASS or FAIL.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

use serde::Serialize;

use super::measures::{Check, Run, admitted_ttft};
use super::node_metrics::{NodeCounts, Spread};
use super::prefix::Args;
use crate::load::PromptCache;
use crate::load::report::{counts, prompt_cache_lines};
use crate::load::stats::Percentiles;

/// One load run.
#[derive(Debug, Clone, Serialize)]
pub struct Measured {
    pub status_counts: BTreeMap<String, u64>,
    /// Of the requests that ended OK.
    pub ttft: Percentiles,
    pub prompt_cache: PromptCache,
    pub nodes: Spread,
    /// The client sidecar's cache-aware picks by outcome (hit, spread,
    /// miss); empty where it made none.
    pub routed: BTreeMap<String, f64>,
}

impl Measured {
    pub fn of(run: &Run, nodes: Spread) -> Measured {
        let summary = &run.report.summary;
        Measured {
            status_counts: summary.status_counts.clone(),
            ttft: admitted_ttft(&run.result.records),
            prompt_cache: summary.prompt_cache.clone(),
            nodes,
            routed: BTreeMap::new(),
        }
    }
}

/// One node's runs, with the cache on or off.
#[derive(Debug, Clone, Serialize)]
pub struct SingleNode {
    /// One shared system prompt and a question, one request at a time, warm.
    pub one_prompt: Measured,
    pub conversations: Measured,
    /// The mesh's shared-prefix workload on this node alone (cache on only).
    pub alone: Option<Measured>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MeshRun {
    pub name: String,
    pub measured: Option<Measured>,
    /// Why it did not run.
    pub error: Option<String>,
}

impl MeshRun {
    pub fn new(name: &str, outcome: Result<Measured, String>) -> MeshRun {
        let (measured, error) = match outcome {
            Ok(m) => (Some(m), None),
            Err(e) => (None, Some(e)),
        };
        MeshRun { name: name.to_string(), measured, error }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PrefixReport {
    pub model: String,
    pub workload: String,
    pub cache_off: SingleNode,
    pub cache_on: SingleNode,
    pub mesh: Vec<MeshRun>,
    pub checks: Vec<Check>,
    pub json_path: String,
}

impl PrefixReport {
    pub fn new(args: &Args, cache_off: SingleNode, cache_on: SingleNode, mesh: Vec<MeshRun>, json: &Path) -> Self {
        let workload = format!(
            "{} system prompts of {} words (Zipf {}) + {}-word question, max_tokens {}; {} streams, {} requests a run; \
             mesh nodes --max-kv-tokens {}; conversations: {} users x {} turns",
            args.shared_prefixes,
            args.prefix_tokens,
            args.zipf_exponent,
            args.question_tokens,
            args.max_tokens,
            args.concurrency,
            args.requests,
            args.mesh_kv_tokens,
            args.users,
            args.turns
        );
        let mut report = PrefixReport {
            model: args.model.display().to_string(),
            workload,
            cache_off,
            cache_on,
            mesh,
            checks: Vec::new(),
            json_path: json.display().to_string(),
        };
        report.checks = report.judge();
        report
    }

    /// Mesh run `i`, when it ran and some request ended OK.
    fn mesh_run(&self, i: usize) -> Option<&Measured> {
        self.mesh.get(i).and_then(|m| m.measured.as_ref()).filter(|m| m.ttft.count > 0)
    }

    /// The targets. A run that did not happen, or had no request
    /// end OK, fails its checks.
    fn judge(&self) -> Vec<Check> {
        let (off, on) = (&self.cache_off, &self.cache_on);
        let aware = self.mesh_run(2);
        let p50 = |m: Option<&Measured>| m.filter(|m| m.ttft.count > 0).map(|m| m.ttft.p50_ms);
        let hit = |m: Option<&Measured>| m.filter(|m| m.prompt_cache.requests > 0).map(|m| m.prompt_cache.hit_rate);
        vec![
            ratio_check(
                "single node TTFT p50, cache on / off",
                p50(Some(&on.one_prompt)),
                p50(Some(&off.one_prompt)),
                Goal::AtMost(0.20),
            ),
            ratio_check(
                "conversation TTFT p50, last turn / first (cache on)",
                last_turn(on),
                first_turn(on),
                Goal::AtMost(2.0),
            ),
            ratio_check(
                "hit rate, cache-aware mesh / single node",
                hit(aware),
                hit(on.alone.as_ref()),
                Goal::AtLeast(0.85),
            ),
            ratio_check(
                "TTFT p50, cache-aware / least-loaded (cache on)",
                p50(aware),
                p50(self.mesh_run(1)),
                Goal::AtMost(0.5),
            ),
            ratio_check(
                "TTFT p50, cache-aware / least-loaded (cache off)",
                p50(aware),
                p50(self.mesh_run(0)),
                Goal::AtMost(0.5),
            ),
            ratio_check(
                "requests per node, max / mean (cache-aware)",
                aware.map(|m| m.nodes.requests_max_over_mean),
                Some(1.0),
                Goal::AtMost(1.5),
            ),
        ]
    }

    pub fn table(&self) -> String {
        let mut t = format!("prefix: {}\n  {}\n", self.model, self.workload);
        let _ = writeln!(
            t,
            "  {:<44} {:>9} {:>9} {:>9} {:>13} {:>13}",
            "run", "TTFT p50", "TTFT p99", "computed", "hit usage/node", "spread req/pf"
        );
        for (name, m) in self.rows() {
            t += &row(&name, m);
        }
        for (side, single) in [("off", &self.cache_off), ("on", &self.cache_on)] {
            let _ = writeln!(t, "  conversations, cache {side}:");
            t += &prompt_cache_lines(&single.conversations.prompt_cache);
            if let (Some(last), Some(first)) = (last_turn(single), first_turn(single)) {
                let _ = writeln!(t, "  last turn / first turn TTFT p50: {:.2}", last / first.max(f64::MIN_POSITIVE));
            }
        }
        for (name, m) in self.mesh.iter().filter_map(|m| Some((&m.name, m.measured.as_ref()?))) {
            t += &placement(name, m);
        }
        for m in self.mesh.iter().filter(|m| m.error.is_some()) {
            let _ = writeln!(t, "  {} did not run: {}", m.name, m.error.as_deref().unwrap_or(""));
        }
        for c in &self.checks {
            let _ = writeln!(t, "  {}", c.line());
        }
        t + &format!("  report {}\n", self.json_path)
    }

    fn rows(&self) -> Vec<(String, Option<&Measured>)> {
        let (off, on) = (&self.cache_off, &self.cache_on);
        let mut rows = vec![
            ("single node, cache off, 1 prompt".to_string(), Some(&off.one_prompt)),
            ("single node, cache on, 1 prompt (warm)".to_string(), Some(&on.one_prompt)),
            ("single node, cache on, all prompts".to_string(), on.alone.as_ref()),
            ("conversations, cache off".to_string(), Some(&off.conversations)),
            ("conversations, cache on".to_string(), Some(&on.conversations)),
        ];
        rows.extend(self.mesh.iter().map(|m| (m.name.clone(), m.measured.as_ref())));
        rows
    }
}

/// Where a mesh run's requests and evictions fell, and how the client
/// sidecar picked (with cache-aware routing).
fn placement(name: &str, m: &Measured) -> String {
    let per_node =
        |f: fn(&NodeCounts) -> f64| m.nodes.per_node.iter().map(|n| format!("{}", f(n))).collect::<Vec<_>>().join("/");
    let mut line = format!(
        "  {name}: requests {} per node, evicted blocks {}",
        per_node(|n| n.requests),
        per_node(|n| n.evicted_blocks)
    );
    for (outcome, count) in &m.routed {
        let _ = write!(line, ", {outcome} {count}");
    }
    line + "\n"
}

fn row(name: &str, m: Option<&Measured>) -> String {
    let Some(m) = m else { return format!("  {name:<44} did not run\n") };
    let (c, n) = (&m.prompt_cache, &m.nodes);
    format!(
        "  {name:<44} {:>6.0} ms {:>6.0} ms {:>9} {:>5.1}%/{:>5.1}% {:>6.2}/{:<6.2} {}\n",
        m.ttft.p50_ms,
        m.ttft.p99_ms,
        c.prefill_tokens,
        100.0 * c.hit_rate,
        100.0 * n.hit_rate,
        n.requests_max_over_mean,
        n.prefill_max_over_mean,
        counts(&m.status_counts)
    )
}

/// Turn 1's TTFT p50, when some turn-1 request received a token.
fn first_turn(single: &SingleNode) -> Option<f64> {
    single.conversations.prompt_cache.turns.first().filter(|t| t.ttft.count > 0).map(|t| t.ttft.p50_ms)
}

/// The last turn reached's TTFT p50 (fewer than `--turns` when the run's
/// time ran out first).
fn last_turn(single: &SingleNode) -> Option<f64> {
    single.conversations.prompt_cache.turns.last().filter(|t| t.ttft.count > 0).map(|t| t.ttft.p50_ms)
}

#[derive(Debug, Clone, Copy)]
enum Goal {
    AtMost(f64),
    AtLeast(f64),
}

/// `num / den` against `goal`; a missing or zero side fails.
fn ratio_check(target: &str, num: Option<f64>, den: Option<f64>, goal: Goal) -> Check {
    let (bound, wanted) = match goal {
        Goal::AtMost(b) => (b, format!("<= {b}")),
        Goal::AtLeast(b) => (b, format!(">= {b}")),
    };
    let target = format!("{target} {wanted}");
    match (num, den) {
        (Some(n), Some(d)) if d > 0.0 => {
            let r = n / d;
            let pass = match goal {
                Goal::AtMost(_) => r <= bound,
                Goal::AtLeast(_) => r >= bound,
            };
            Check { target, observed: format!("{r:.3} ({n:.3} / {d:.3})"), pass }
        }
        _ => Check { target, observed: "not measured".into(), pass: false },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_pass_within_their_bound_and_fail_unmeasured() {
        assert!(ratio_check("x", Some(10.0), Some(100.0), Goal::AtMost(0.2)).pass);
        assert!(!ratio_check("x", Some(30.0), Some(100.0), Goal::AtMost(0.2)).pass);
        assert!(ratio_check("x", Some(0.9), Some(1.0), Goal::AtLeast(0.85)).pass);
        assert!(!ratio_check("x", Some(0.8), Some(1.0), Goal::AtLeast(0.85)).pass);
        let missing = ratio_check("hit rate", None, Some(1.0), Goal::AtLeast(0.85));
        assert_eq!((missing.pass, missing.observed.as_str()), (false, "not measured"));
        assert!(!ratio_check("x", Some(1.0), Some(0.0), Goal::AtMost(2.0)).pass);
        assert_eq!(ratio_check("x", Some(1.0), Some(4.0), Goal::AtMost(0.5)).target, "x <= 0.5");
    }
}
