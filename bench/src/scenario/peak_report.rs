//! `peak`'s figures, from one arm's requests and watcher samples: per
//! phase the goodput, who answered (primary, overflow, cache, refused), TTFT
//! p99 of each class and what became of HIGH-priority requests; per second
//! the same shares for the plot; for the standby arm when the standby took
//! traffic after each step up and when the controller acted.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use super::measures::Percentiles;
use super::peak_load::{Class, Sent, Step};
use super::peak_watch::Sample;

/// One phase of one arm.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseFigures {
    /// "2x": offered load as a multiple of the primary's capacity.
    pub phase: String,
    pub offered_per_s: f64,
    pub from_s: f64,
    pub to_s: f64,
    pub sent: u64,
    /// Requests repeating one of the pool's greedy prompts (the cache's chance).
    pub repeats: u64,
    /// Tokens/s of good requests (OK within the deadline) arriving in the phase.
    pub goodput_tokens_per_s: f64,
    /// Share of the phase's requests each class answered (by send time).
    pub shares: BTreeMap<&'static str, f64>,
    /// TTFT of the requests each class served.
    pub ttft: BTreeMap<&'static str, Percentiles>,
    /// Not OK, by status.
    pub refused_by_status: BTreeMap<String, u64>,
    /// HIGH-priority requests by class.
    pub high: BTreeMap<&'static str, u64>,
    /// Controller log lines in the phase.
    pub activations: usize,
    pub returns: usize,
}

/// One second of one arm, for the plot: sends by who answered them (in
/// the second they were sent) and good tokens (in the second they arrived).
#[derive(Debug, Clone, Default, Serialize)]
pub struct SecondShares {
    pub t: u64,
    pub good_tokens: u64,
    pub sent: u64,
    pub by_class: [u64; 4],
}

/// A step up in offered load, seen from the standby arm.
#[derive(Debug, Clone, Serialize)]
pub struct StepUp {
    pub phase: String,
    pub at_s: f64,
    /// The standby was active (activated, not returned) when the step came.
    pub already_active: bool,
    /// First sample after the step with the primary's utilisation (client
    /// sidecar's open streams over active slots) at or above the threshold.
    pub crossed_s: Option<f64>,
    /// First sample after the step with a stream open to the standby.
    pub traffic_s: Option<f64>,
}

/// The controller's actions, as the watcher saw them.
#[derive(Debug, Clone, Serialize)]
pub struct StandbyFigures {
    pub steps: Vec<StepUp>,
    /// When each activation and return was first seen (s from load start).
    pub activated_at_s: Vec<f64>,
    pub returned_at_s: Vec<f64>,
    /// Activations and returns logged after the last phase ended.
    pub after_load: (usize, usize),
    pub log: Vec<String>,
}

pub fn label(factor: f64) -> String {
    format!("{factor}x")
}

/// Start and end (s from load start) of each phase.
pub fn bounds(steps: &[Step]) -> Vec<(f64, f64)> {
    let mut at = 0.0;
    steps
        .iter()
        .map(|s| {
            let from = at;
            at += s.duration.as_secs_f64();
            (from, at)
        })
        .collect()
}

pub fn phases(sent: &[Sent], steps: &[Step], factors: &[f64], samples: &[Sample]) -> Vec<PhaseFigures> {
    let spans = bounds(steps);
    let (activated, returned) = (increments(samples, |s| s.activated), increments(samples, |s| s.returned));
    let within = |times: &[f64], (from, to): (f64, f64)| times.iter().filter(|&&t| t >= from && t < to).count();
    spans
        .iter()
        .enumerate()
        .map(|(i, &(from, to))| {
            let mine: Vec<&Sent> = sent.iter().filter(|r| r.step == i).collect();
            let mut f = one_phase(&mine, sent, (from, to));
            f.phase = label(factors[i]);
            f.offered_per_s = steps[i].rate;
            f.activations = within(&activated, (from, to));
            f.returns = within(&returned, (from, to));
            f
        })
        .collect()
}

/// The figures of the requests `mine` sent in `[from, to)`; goodput counts
/// the tokens of any good request (`all`) that arrived in it.
fn one_phase(mine: &[&Sent], all: &[Sent], (from, to): (f64, f64)) -> PhaseFigures {
    let inside = |at: Duration| (from..to).contains(&at.as_secs_f64());
    let good_tokens: u64 = all
        .iter()
        .filter(|r| r.good)
        .flat_map(|r| r.chunks.iter().filter(|c| inside(r.sent_at + c.at)).map(|c| u64::from(c.tokens)))
        .sum();
    let n = mine.len() as u64;
    let count = |c: Class, high_only: bool| mine.iter().filter(|r| r.class == c && (r.high || !high_only)).count();
    let mut f = PhaseFigures {
        phase: String::new(),
        offered_per_s: 0.0,
        from_s: from,
        to_s: to,
        sent: n,
        repeats: mine.iter().filter(|r| r.repeat).count() as u64,
        goodput_tokens_per_s: good_tokens as f64 / (to - from).max(1e-9),
        shares: BTreeMap::new(),
        ttft: BTreeMap::new(),
        refused_by_status: BTreeMap::new(),
        high: BTreeMap::from([("sent", mine.iter().filter(|r| r.high).count() as u64)]),
        activations: 0,
        returns: 0,
    };
    for c in Class::ALL {
        f.shares.insert(c.name(), if n == 0 { 0.0 } else { count(c, false) as f64 / n as f64 });
        f.high.insert(c.name(), count(c, true) as u64);
        if c != Class::Refused {
            let ttfts = mine.iter().filter(|r| r.class == c).filter_map(|r| r.ttft()).collect();
            f.ttft.insert(c.name(), Percentiles::of(ttfts));
        }
    }
    for r in mine.iter().filter(|r| r.class == Class::Refused) {
        *f.refused_by_status.entry(r.status.label().to_string()).or_default() += 1;
    }
    f
}

pub fn per_second(sent: &[Sent]) -> Vec<SecondShares> {
    let last = sent.iter().map(|r| (r.sent_at + r.total).as_secs()).max().unwrap_or(0);
    let mut out: Vec<SecondShares> = (0..=last).map(|t| SecondShares { t, ..SecondShares::default() }).collect();
    for r in sent {
        let s = &mut out[r.sent_at.as_secs() as usize];
        s.sent += 1;
        s.by_class[Class::ALL.iter().position(|&c| c == r.class).unwrap_or(0)] += 1;
        if r.good {
            for c in &r.chunks {
                if let Some(s) = out.get_mut((r.sent_at + c.at).as_secs() as usize) {
                    s.good_tokens += u64::from(c.tokens);
                }
            }
        }
    }
    out
}

/// Times (s) at which a counter first showed each new count.
fn increments(samples: &[Sample], counter: impl Fn(&Sample) -> usize) -> Vec<f64> {
    let mut seen = 0;
    let mut out = Vec::new();
    for s in samples {
        while counter(s) > seen {
            seen += 1;
            out.push(s.t_s);
        }
    }
    out
}

/// What the standby arm's watcher shows: for each step up, the primary's
/// utilisation crossing `threshold` (streams over `slots` per active node)
/// and the standby taking traffic; and the controller's actions.
pub fn standby(
    samples: &[Sample],
    steps: &[Step],
    factors: &[f64],
    slots: (u32, usize),
    threshold: f64,
) -> StandbyFigures {
    let spans = bounds(steps);
    let (per_node, primaries) = slots;
    let active = |s: &Sample| s.activated > s.returned;
    let utilisation = |s: &Sample| {
        let nodes = primaries + usize::from(active(s));
        f64::from(s.primary_in_flight + s.standby_in_flight) / (f64::from(per_node) * nodes as f64)
    };
    let first_after = |at: f64, end: f64, p: &dyn Fn(&Sample) -> bool| {
        samples.iter().find(|s| s.t_s >= at && s.t_s < end && p(s)).map(|s| s.t_s - at)
    };
    let steps_up = (1..spans.len()).filter(|&i| factors[i] > factors[i - 1]).map(|i| {
        let (at, end) = spans[i];
        StepUp {
            phase: label(factors[i]),
            at_s: at,
            already_active: samples.iter().find(|s| s.t_s >= at).is_some_and(active),
            crossed_s: first_after(at, end, &|s| utilisation(s) >= threshold),
            traffic_s: first_after(at, end, &|s| s.standby_in_flight > 0),
        }
    });
    let end = spans.last().map_or(0.0, |s| s.1);
    let (activated_at_s, returned_at_s) = (increments(samples, |s| s.activated), increments(samples, |s| s.returned));
    let after = |v: &[f64]| v.iter().filter(|&&t| t >= end).count();
    StandbyFigures {
        steps: steps_up.collect(),
        after_load: (after(&activated_at_s), after(&returned_at_s)),
        activated_at_s,
        returned_at_s,
        log: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;
    use crate::load::{Chunk, Status};

    fn sent(at_ms: u64, step: usize, class: Class, high: bool) -> Sent {
        let ok = class != Class::Refused;
        Sent {
            sent_at: Duration::from_millis(at_ms),
            step,
            high,
            repeat: false,
            status: if ok { Status::Grpc(Code::Ok) } else { Status::Grpc(Code::ResourceExhausted) },
            class,
            chunks: if ok { vec![Chunk { at: Duration::from_millis(100), tokens: 10 }] } else { Vec::new() },
            total: Duration::from_millis(100),
            good: ok,
        }
    }

    #[test]
    fn phases_split_shares_goodput_and_high_requests() {
        let steps = [
            Step { rate: 1.0, duration: Duration::from_secs(1) },
            Step { rate: 4.0, duration: Duration::from_secs(1) },
        ];
        let all = vec![
            sent(100, 0, Class::Primary, false),
            sent(950, 0, Class::Primary, true), // its tokens arrive in phase 1
            sent(1100, 1, Class::Overflow, false),
            sent(1200, 1, Class::Cache, false),
            sent(1300, 1, Class::Refused, true),
            sent(1400, 1, Class::Primary, true),
        ];
        let samples = [Sample { t_s: 1.5, activated: 1, ..Sample::default() }];
        let f = phases(&all, &steps, &[0.5, 2.0], &samples);
        assert_eq!((f[0].sent, f[0].goodput_tokens_per_s, f[1].goodput_tokens_per_s), (2, 10.0, 40.0));
        assert_eq!((f[1].shares["overflow"], f[1].shares["refused"], f[1].shares["primary"]), (0.25, 0.25, 0.25));
        assert_eq!((f[1].high["sent"], f[1].high["refused"], f[1].high["overflow"]), (2, 1, 0));
        assert_eq!((f[0].activations, f[1].activations, f[1].phase.as_str()), (0, 1, "2x"));
        assert_eq!(f[1].refused_by_status["RESOURCE_EXHAUSTED"], 1);
        let secs = per_second(&all);
        assert_eq!((secs[0].sent, secs[1].sent, secs[1].by_class), (2, 4, [1, 1, 1, 1]));
        assert_eq!((secs[0].good_tokens, secs[1].good_tokens), (10, 40));
    }

    #[test]
    fn a_step_up_reads_the_crossing_and_the_standby_s_first_stream() {
        let steps = [
            Step { rate: 1.0, duration: Duration::from_secs(10) },
            Step { rate: 4.0, duration: Duration::from_secs(10) },
        ];
        let at = |t_s: f64, primary: u32, standby: u32, activated: usize| Sample {
            t_s,
            primary_in_flight: primary,
            standby_listed: standby > 0,
            standby_in_flight: standby,
            activated,
            returned: 0,
        };
        // 2 nodes of 10 slots: 16 streams is 0.8.
        let samples =
            [at(9.0, 18, 0, 0), at(10.5, 12, 0, 0), at(11.0, 16, 0, 0), at(13.0, 20, 0, 1), at(13.5, 20, 3, 1)];
        let s = standby(&samples, &steps, &[0.5, 2.0], (10, 2), 0.8);
        assert_eq!(s.steps.len(), 1);
        let step = &s.steps[0];
        assert_eq!((step.already_active, step.crossed_s, step.traffic_s), (false, Some(1.0), Some(3.5)));
        assert_eq!((s.activated_at_s.clone(), s.after_load), (vec![13.0], (0, 0)));
    }
}
