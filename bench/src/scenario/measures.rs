//! What the mesh scenarios report beyond a load's summary: goodput over a
//! steady window, the TTFT of admitted requests only, how refusals were
//! answered, and PASS/FAIL lines against stated targets.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::load::progress::run_with_progress;
use crate::load::report::SpecEcho;
pub use crate::load::stats::Percentiles;
use crate::load::{Load, LoadSpec, Report, RequestRecord, RunResult, summarize};

/// One load run: its records (for measures the summary lacks) and report.
pub struct Run {
    pub result: RunResult,
    pub report: Report,
}

/// Connects, runs with a progress bar, summarises, keeps the records.
pub async fn run_load(spec: LoadSpec, label: &str, quiet: bool) -> anyhow::Result<Run> {
    let load = Load::connect(spec).await?;
    let result = run_with_progress(&load, !quiet, label).await?;
    let summary = summarize(&result.records, result.elapsed, load.spec().deadline);
    let report = Report { title: label.to_string(), spec: SpecEcho::of(load.spec()), summary, marks: Vec::new() };
    Ok(Run { result, report })
}

/// Time to first token of the requests that ended OK: what an admitted
/// caller waited. (The summary's TTFT also counts streams that later failed.)
pub fn admitted_ttft(records: &[RequestRecord]) -> Percentiles {
    Percentiles::of(records.iter().filter(|r| r.status.is_ok()).filter_map(RequestRecord::ttft).collect())
}

/// Goodput while the load was steady: the tokens of good requests (OK
/// within the deadline) that arrived in `[from, to)`, and the good requests
/// that ended in it, per second.
///
/// A window rather than the whole run because the whole run has a ramp (slots
/// filling) and a drain (work admitted before the last send finishing after
/// it), each worth up to one request's duration per slot: in a run of a few
/// seconds that is several percent either way. Tokens, not requests, carry
/// the verdict: 64 streams emit tokens all the time, while completions of a
/// closed loop come in bursts, and counting bursts in a window is lumpy.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct WindowGoodput {
    pub from_s: f64,
    pub to_s: f64,
    pub tokens_per_s: f64,
    pub requests_per_s: f64,
    /// Mean tokens of a good request over the whole run (to turn tokens/s
    /// into requests/s).
    pub tokens_per_good_request: f64,
}

pub fn window_goodput(records: &[RequestRecord], deadline: Duration, from: Duration, to: Duration) -> WindowGoodput {
    let inside = |at: Duration| at >= from && at < to;
    let good: Vec<&RequestRecord> = records.iter().filter(|r| r.is_good(deadline)).collect();
    let tokens: u64 = good
        .iter()
        .flat_map(|r| r.chunks.iter().filter(|c| inside(r.sent_at + c.at)).map(|c| u64::from(c.tokens)))
        .sum();
    let ended = good.iter().filter(|r| inside(r.ended_at())).count();
    let secs = to.saturating_sub(from).as_secs_f64();
    let per_s = |n: f64| if secs > 0.0 { n / secs } else { 0.0 };
    let all_tokens: u64 = good.iter().map(|r| r.tokens()).sum();
    WindowGoodput {
        from_s: from.as_secs_f64(),
        to_s: to.as_secs_f64(),
        tokens_per_s: per_s(tokens as f64),
        requests_per_s: per_s(ended as f64),
        tokens_per_good_request: if good.is_empty() { 0.0 } else { all_tokens as f64 / good.len() as f64 },
    }
}

/// How the requests that did not end OK were answered.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Refusals {
    pub count: u64,
    /// Send to the error, whatever the status.
    pub latency: Percentiles,
    pub by_status: BTreeMap<String, u64>,
    /// Per status, those without a `retry-after-ms` hint.
    pub without_retry_after: BTreeMap<String, u64>,
    /// Those answered later than `slow_after_ms`.
    pub slow: u64,
    pub slow_after_ms: f64,
}

/// How the requests that did not end OK were answered; `slow_after` is the
/// latency past which a refusal counts as slow.
pub fn refusals(records: &[RequestRecord], slow_after: Duration) -> Refusals {
    let failed: Vec<&RequestRecord> = records.iter().filter(|r| !r.status.is_ok()).collect();
    let mut out = Refusals {
        count: failed.len() as u64,
        latency: Percentiles::of(failed.iter().map(|r| r.total).collect()),
        slow: failed.iter().filter(|r| r.total > slow_after).count() as u64,
        slow_after_ms: slow_after.as_secs_f64() * 1000.0,
        ..Refusals::default()
    };
    for r in failed {
        *out.by_status.entry(r.status.label().to_string()).or_default() += 1;
        if r.retry_after_ms.is_none() {
            *out.without_retry_after.entry(r.status.label().to_string()).or_default() += 1;
        }
    }
    out
}

/// A target and whether a run met it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    pub target: String,
    pub observed: String,
    pub pass: bool,
}

impl Check {
    pub fn line(&self) -> String {
        format!("{}  {}: {}", if self.pass { "PASS" } else { "FAIL" }, self.target, self.observed)
    }
}

#[cfg(test)]
mod tests {
    use mesh_proto::v1::FinishReason;
    use tonic::Code;

    use super::*;
    use crate::load::{Chunk, Status};

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn rec(sent: u64, status: Status, total: u64, chunks: &[(u64, u32)], retry: Option<u64>) -> RequestRecord {
        RequestRecord {
            id: 0,
            target: 0,
            sent_at: ms(sent),
            status,
            chunks: chunks.iter().map(|&(at, tokens)| Chunk { at: ms(at), tokens }).collect(),
            total: ms(total),
            finish_reason: if status.is_ok() { FinishReason::Length } else { FinishReason::Unspecified },
            retry_after_ms: retry,
            usage: None,
            turn: None,
        }
    }

    /// Window 1-3 s. r0 (sent 0.5 s) has tokens at 0.9, 1.5, 2.5 s and ends
    /// at 2.5 s; r1 (sent 2.5 s) at 2.9 and 3.1 s, ending at 3.1 s; r2 is late
    /// (5 s deadline); r3 was refused.
    #[test]
    fn window_goodput_counts_good_tokens_inside_the_window() {
        let ok = Status::Grpc(Code::Ok);
        let records = vec![
            rec(500, ok, 2000, &[(400, 1), (1000, 2), (2000, 4)], None),
            rec(2500, ok, 600, &[(400, 8), (600, 16)], None),
            rec(1000, ok, 6000, &[(100, 100)], None),
            rec(1500, Status::Grpc(Code::ResourceExhausted), 2, &[], Some(50)),
        ];
        let g = window_goodput(&records, ms(5000), ms(1000), ms(3000));
        // Tokens inside: r0's 2 + 4, r1's 8 = 14 over 2 s; r0 ended inside.
        assert_eq!((g.tokens_per_s, g.requests_per_s), (7.0, 0.5));
        assert_eq!(g.tokens_per_good_request, (7.0 + 24.0) / 2.0);
    }

    #[test]
    fn refusals_and_admitted_ttft_split_by_status() {
        let ok = Status::Grpc(Code::Ok);
        let records = vec![
            rec(0, ok, 500, &[(40, 1), (60, 1)], None),
            rec(0, ok, 500, &[(90, 1)], None),
            rec(0, Status::Grpc(Code::ResourceExhausted), 3, &[], Some(50)),
            rec(0, Status::Grpc(Code::ResourceExhausted), 1, &[], None),
            rec(0, Status::Grpc(Code::DeadlineExceeded), 2000, &[(1500, 1)], None),
        ];
        let t = admitted_ttft(&records);
        assert_eq!((t.count, t.p50_ms, t.p99_ms), (2, 40.0, 90.0));
        let r = refusals(&records, ms(10));
        assert_eq!((r.count, r.slow), (3, 1));
        assert_eq!((r.latency.p50_ms, r.latency.max_ms), (3.0, 2000.0));
        assert_eq!(r.by_status, BTreeMap::from([("DEADLINE_EXCEEDED".into(), 1), ("RESOURCE_EXHAUSTED".into(), 2)]));
        assert_eq!(
            r.without_retry_after,
            BTreeMap::from([("DEADLINE_EXCEEDED".into(), 1), ("RESOURCE_EXHAUSTED".into(), 1)])
        );
    }
}
