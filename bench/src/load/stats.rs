//! Aggregation: HDR histograms for latencies, goodput against the deadline,
//! counts per status, and a per-second time series.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::cache::{PromptCache, prompt_cache};
use super::record::RequestRecord;

/// Latency percentiles of one quantity, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

/// Work that was useful: requests that finished OK within their deadline.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Goodput {
    pub requests: u64,
    pub tokens: u64,
    pub requests_per_s: f64,
    pub tokens_per_s: f64,
}

/// One second of the run. Sends count in the second they were sent,
/// completions (ok, errors, good) in the second they ended, tokens in the
/// second they arrived, and TTFT in the second the first token arrived.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Second {
    pub t: u64,
    pub sent: u64,
    pub ok: u64,
    pub errors: u64,
    pub good: u64,
    pub tokens: u64,
    /// Nearest-rank p99 of the TTFTs in this second; None when there were none.
    pub ttft_p99_ms: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Summary {
    pub sent: u64,
    /// From the start of the run until the last request ended.
    pub elapsed_s: f64,
    pub deadline_s: f64,
    /// Every sent request under exactly one status (`OK`, `RESOURCE_EXHAUSTED`, ...).
    pub status_counts: BTreeMap<String, u64>,
    /// Finish reasons of the OK streams (`STOP`, `LENGTH`, `CANCELLED`).
    pub finish_reasons: BTreeMap<String, u64>,
    /// Over every request that received a token, whatever its final status.
    pub ttft: Latency,
    pub inter_token: Latency,
    /// Send to end of stream, OK requests only.
    pub ok_total_time: Latency,
    /// Every token received, by every request.
    pub tokens: u64,
    pub tokens_per_s: f64,
    pub goodput: Goodput,
    /// Prompt tokens and the nodes' prefix-cache hits, from usage.
    pub prompt_cache: PromptCache,
    pub timeline: Vec<Second>,
}

impl Summary {
    pub fn count(&self, status: &str) -> u64 {
        self.status_counts.get(status).copied().unwrap_or(0)
    }

    /// Requests that did not end OK.
    pub fn errors(&self) -> u64 {
        self.sent - self.count("OK")
    }
}

/// Microsecond histogram from 1 µs to an hour at 3 significant digits:
/// every percentile is within 0.1% of the recorded value.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static bounds are valid")
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

impl Latency {
    pub fn from_histogram(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1000.0,
        }
    }
}

/// Nearest-rank percentile (the smallest value with at least q of the
/// samples at or below it) of an unsorted sample.
pub fn nearest_rank(values: &mut [Duration], q: f64) -> Option<Duration> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable();
    let rank = (q * values.len() as f64).ceil() as usize;
    Some(values[rank.clamp(1, values.len()) - 1])
}

/// Nearest-rank percentiles of a small sample, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    pub fn of(mut values: Vec<Duration>) -> Percentiles {
        let ms = |d: Option<Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1000.0);
        Percentiles {
            count: values.len() as u64,
            p50_ms: ms(nearest_rank(&mut values, 0.50)),
            p99_ms: ms(nearest_rank(&mut values, 0.99)),
            max_ms: ms(nearest_rank(&mut values, 1.0)),
        }
    }

    pub fn show(&self) -> String {
        match self.count {
            0 => "none".into(),
            n => format!("p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (n={n})", self.p50_ms, self.p99_ms, self.max_ms),
        }
    }
}

/// Summarises the records of a run that took `elapsed`, judging goodput
/// against `deadline`.
pub fn summarize(records: &[RequestRecord], elapsed: Duration, deadline: Duration) -> Summary {
    let (mut ttft, mut itl, mut ok_total) = (histogram(), histogram(), histogram());
    let mut s = Summary {
        sent: records.len() as u64,
        elapsed_s: elapsed.as_secs_f64(),
        deadline_s: deadline.as_secs_f64(),
        ..Summary::default()
    };
    for r in records {
        *s.status_counts.entry(r.status.label().to_string()).or_default() += 1;
        if r.status.is_ok() {
            *s.finish_reasons
                .entry(r.finish_reason.as_str_name().trim_start_matches("FINISH_REASON_").to_string())
                .or_default() += 1;
            ok_total.saturating_record(micros(r.total));
        }
        if let Some(t) = r.ttft() {
            ttft.saturating_record(micros(t));
        }
        for gap in r.inter_token() {
            itl.saturating_record(micros(gap));
        }
        let tokens = r.tokens();
        s.tokens += tokens;
        if r.is_good(deadline) {
            s.goodput.requests += 1;
            s.goodput.tokens += tokens;
        }
    }
    s.ttft = Latency::from_histogram(&ttft);
    s.inter_token = Latency::from_histogram(&itl);
    s.ok_total_time = Latency::from_histogram(&ok_total);
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        s.tokens_per_s = s.tokens as f64 / secs;
        s.goodput.requests_per_s = s.goodput.requests as f64 / secs;
        s.goodput.tokens_per_s = s.goodput.tokens as f64 / secs;
    }
    s.prompt_cache = prompt_cache(records);
    s.timeline = timeline(records, elapsed, deadline);
    s
}

/// The per-second series; long enough to hold every event.
fn timeline(records: &[RequestRecord], elapsed: Duration, deadline: Duration) -> Vec<Second> {
    let last_event = records.iter().map(RequestRecord::ended_at).max().unwrap_or_default();
    let len = elapsed.max(last_event).as_secs_f64().ceil().max(1.0) as usize;
    let len = len.max(last_event.as_secs() as usize + 1);
    let mut out: Vec<Second> = (0..len as u64).map(|t| Second { t, ..Second::default() }).collect();
    let mut ttfts: Vec<Vec<Duration>> = vec![Vec::new(); len];
    let sec = |d: Duration| (d.as_secs() as usize).min(len - 1);
    for r in records {
        out[sec(r.sent_at)].sent += 1;
        let end = &mut out[sec(r.ended_at())];
        if r.status.is_ok() {
            end.ok += 1
        } else {
            end.errors += 1
        }
        if r.is_good(deadline) {
            end.good += 1;
        }
        for c in &r.chunks {
            out[sec(r.sent_at + c.at)].tokens += u64::from(c.tokens);
        }
        if let Some(t) = r.ttft() {
            ttfts[sec(r.sent_at + t)].push(t);
        }
    }
    for (second, mut samples) in out.iter_mut().zip(ttfts) {
        second.ttft_p99_ms = nearest_rank(&mut samples, 0.99).map(|d| d.as_secs_f64() * 1000.0);
    }
    out
}

#[cfg(test)]
mod tests {
    use mesh_proto::v1::FinishReason;
    use tonic::Code;

    use super::*;
    use crate::load::record::{Chunk, Status};

    fn ms_d(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn rec(
        id: u64,
        sent_ms: u64,
        status: Status,
        finish: FinishReason,
        total_ms: u64,
        chunks: &[(u64, u32)],
    ) -> RequestRecord {
        RequestRecord {
            id,
            target: 0,
            sent_at: ms_d(sent_ms),
            status,
            chunks: chunks.iter().map(|&(at, tokens)| Chunk { at: ms_d(at), tokens }).collect(),
            total: ms_d(total_ms),
            finish_reason: finish,
            retry_after_ms: None,
            usage: None,
            turn: None,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= b.abs() * 0.001 + 1e-9
    }

    #[test]
    fn histogram_percentiles_match_hand_computed_values() {
        // 1..=1000 µs: under 2048 the histogram is exact, so these are the
        // textbook nearest-rank values.
        let mut h = histogram();
        for v in 1..=1000u64 {
            h.record(v).unwrap();
        }
        let l = Latency::from_histogram(&h);
        assert_eq!((l.count, l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms), (1000, 0.5, 0.9, 0.99, 1.0));
        assert!(close(l.mean_ms, 0.5005));

        // 99 fast requests at 20 ms and one slow one at 2 s: p50..p99 are
        // 20 ms, the max is 2 s (each within the 0.1% resolution).
        let mut h = histogram();
        for _ in 0..99 {
            h.record(20_000).unwrap();
        }
        h.record(2_000_000).unwrap();
        let l = Latency::from_histogram(&h);
        assert!(close(l.p50_ms, 20.0) && close(l.p99_ms, 20.0), "{l:?}");
        assert!(close(l.max_ms, 2000.0), "{l:?}");
        assert_eq!(Latency::from_histogram(&histogram()), Latency::default());
    }

    #[test]
    fn nearest_rank_matches_definition() {
        let mut v: Vec<Duration> = (1..=10).rev().map(ms_d).collect();
        assert_eq!(nearest_rank(&mut v, 0.5), Some(ms_d(5)));
        assert_eq!(nearest_rank(&mut v, 0.99), Some(ms_d(10)));
        assert_eq!(nearest_rank(&mut v, 0.0), Some(ms_d(1)));
        assert_eq!(nearest_rank(&mut [], 0.5), None);
    }

    #[test]
    fn inter_token_spreads_a_gap_over_its_tokens() {
        let r = rec(0, 0, Status::Grpc(Code::Ok), FinishReason::Length, 500, &[(100, 2), (200, 1), (400, 2)]);
        assert_eq!(r.ttft(), Some(ms_d(100)));
        assert_eq!(r.tokens(), 5);
        assert_eq!(r.inter_token().collect::<Vec<_>>(), vec![ms_d(100), ms_d(100), ms_d(100)]);
    }

    /// Five requests with a 1 s deadline over a 2 s run, computed by hand:
    /// only r0 is goodput (r1 is late, r3 was cancelled, r2 and r4 failed).
    #[test]
    fn goodput_counts_only_ok_streams_finished_within_the_deadline() {
        let ok = Status::Grpc(Code::Ok);
        let records = vec![
            rec(0, 100, ok, FinishReason::Length, 500, &[(100, 1), (200, 1), (400, 2)]),
            rec(1, 200, ok, FinishReason::Stop, 1200, &[(300, 1)]),
            rec(2, 1500, Status::Grpc(Code::ResourceExhausted), FinishReason::Unspecified, 1, &[]),
            rec(3, 900, ok, FinishReason::Cancelled, 800, &[(50, 1)]),
            rec(4, 950, Status::Grpc(Code::DeadlineExceeded), FinishReason::Unspecified, 1000, &[(900, 1)]),
        ];
        let s = summarize(&records, ms_d(2000), ms_d(1000));
        assert_eq!(s.sent, 5);
        let counts: Vec<(&str, u64)> = s.status_counts.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert_eq!(counts, vec![("DEADLINE_EXCEEDED", 1), ("OK", 3), ("RESOURCE_EXHAUSTED", 1)]);
        assert_eq!(s.errors(), 2);
        assert_eq!(s.finish_reasons.get("CANCELLED"), Some(&1));
        assert_eq!(s.goodput, Goodput { requests: 1, tokens: 4, requests_per_s: 0.5, tokens_per_s: 2.0 });
        assert_eq!(s.tokens, 7);
        assert_eq!(s.tokens_per_s, 3.5);
        // TTFTs 100, 300, 50, 900 ms: nearest rank p50 is the 2nd (100 ms).
        assert_eq!(s.ttft.count, 4);
        assert!(close(s.ttft.p50_ms, 100.0) && close(s.ttft.max_ms, 900.0), "{:?}", s.ttft);
        // OK totals 500, 1200, 800 ms.
        assert!(close(s.ok_total_time.p50_ms, 800.0), "{:?}", s.ok_total_time);

        // Sent: r0, r1, r3, r4 in second 0, r2 in second 1. Ended: r0 in 0
        // (0.6 s); r1 (1.4), r2 (1.501), r3 (1.7), r4 (1.95) in second 1.
        let t = &s.timeline;
        assert_eq!(t.len(), 2);
        assert_eq!((t[0].sent, t[0].ok, t[0].errors, t[0].good), (4, 1, 0, 1));
        assert_eq!((t[1].sent, t[1].ok, t[1].errors, t[1].good), (1, 2, 2, 0));
        // Tokens by arrival: r0 at 0.2/0.3/0.5 (4), r1 at 0.5, r3 at 0.95; r4 at 1.85.
        assert_eq!((t[0].tokens, t[1].tokens), (6, 1));
        assert_eq!(t[0].ttft_p99_ms, Some(300.0));
        assert_eq!(t[1].ttft_p99_ms, Some(900.0));
        assert_eq!(t.iter().map(|x| x.sent).sum::<u64>(), s.sent);
    }
}
