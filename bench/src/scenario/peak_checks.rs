//! `peak`'s targets, judged per arm, and the table printed beside the
//! figures.

use super::measures::{Check, Percentiles};
use super::peak::{ArmReport, PeakReport};
use super::peak_args::{Args, Arm};
use super::peak_report::{PhaseFigures, StandbyFigures};

/// Refused share at 2x with overflow, at most.
pub const REFUSED_AT_2X: f64 = 0.01;
/// Overflowed TTFT p99 at 2x, as a multiple of the unloaded p99, at most.
pub const OVERFLOW_TTFT_MULTIPLE: f64 = 3.0;
/// From utilisation crossing the threshold to the standby taking traffic.
pub const STANDBY_TRAFFIC_S: f64 = 5.0;

fn is_2x(p: &PhaseFigures) -> bool {
    p.phase == "2x"
}

pub fn checks(
    arm: Arm,
    phases: &[PhaseFigures],
    standby: Option<&StandbyFigures>,
    unloaded: &Percentiles,
    args: &Args,
) -> Vec<Check> {
    let mut out = Vec::new();
    if arm != Arm::Shed {
        for p in phases.iter().filter(|p| is_2x(p)) {
            out.extend(at_2x(p, unloaded));
        }
    }
    let high_overflowed: u64 = phases.iter().map(|p| p.high.get("overflow").copied().unwrap_or(0)).sum();
    let high_sent: u64 = phases.iter().map(|p| p.high.get("sent").copied().unwrap_or(0)).sum();
    out.push(Check {
        target: "HIGH-priority requests never served by the overflow service".into(),
        observed: format!("{high_overflowed} of {high_sent} HIGH requests overflowed"),
        pass: high_overflowed == 0,
    });
    if let Some(s) = standby {
        out.extend(standby_checks(s, phases, args));
    }
    out
}

fn at_2x(p: &PhaseFigures, unloaded: &Percentiles) -> Vec<Check> {
    let refused = p.shares.get("refused").copied().unwrap_or(0.0);
    let overflow = p.ttft.get("overflow").cloned().unwrap_or_default();
    let multiple = if unloaded.p99_ms > 0.0 { overflow.p99_ms / unloaded.p99_ms } else { f64::INFINITY };
    vec![
        Check {
            target: format!("{} ({:.0}-{:.0} s): refused <= {:.0}%", p.phase, p.from_s, p.to_s, REFUSED_AT_2X * 100.0),
            observed: format!(
                "{:.2}% of {} ({:?}; {} of them HIGH, never degraded)",
                refused * 100.0,
                p.sent,
                p.refused_by_status,
                p.high.get("refused").copied().unwrap_or(0)
            ),
            pass: refused <= REFUSED_AT_2X,
        },
        Check {
            target: format!(
                "{} ({:.0}-{:.0} s): overflowed TTFT p99 <= {OVERFLOW_TTFT_MULTIPLE}x unloaded p99",
                p.phase, p.from_s, p.to_s
            ),
            observed: match overflow.count {
                0 => "nothing overflowed".into(),
                n => format!("{multiple:.2}x ({:.1} ms vs {:.1} ms, n={n})", overflow.p99_ms, unloaded.p99_ms),
            },
            pass: overflow.count == 0 || multiple <= OVERFLOW_TTFT_MULTIPLE,
        },
    ]
}

fn standby_checks(s: &StandbyFigures, phases: &[PhaseFigures], args: &Args) -> Vec<Check> {
    let mut out = Vec::new();
    for step in s.steps.iter().filter(|st| !st.already_active) {
        let gap = step.crossed_s.zip(step.traffic_s).map(|(c, t)| t - c);
        out.push(Check {
            target: format!(
                "step to {} at {:.0} s: standby takes traffic <= {STANDBY_TRAFFIC_S} s after utilisation crosses {}",
                step.phase, step.at_s, args.scale_out_above
            ),
            observed: match (step.crossed_s, step.traffic_s) {
                (Some(c), Some(t)) => format!("crossed +{c:.1} s, traffic +{t:.1} s: {:.1} s", t - c),
                (None, t) => format!("utilisation never crossed (traffic {t:?})"),
                (Some(c), None) => format!("crossed +{c:.1} s, no traffic to the standby in the phase"),
            },
            pass: gap.is_some_and(|g| g <= STANDBY_TRAFFIC_S) || step.crossed_s.is_none(),
        });
    }
    let most = phases.iter().map(|p| p.activations).max().unwrap_or(0);
    let per_phase: Vec<String> =
        phases.iter().map(|p| format!("{} {}/{}", p.phase, p.activations, p.returns)).collect();
    out.push(Check {
        target: "no flapping: <= 1 activation per phase".into(),
        observed: format!("activations/returns per phase: {}; after the load {:?}", per_phase.join(", "), s.after_load),
        pass: most <= 1,
    });
    // Returned while the last (low) phase still ran: a return only once the
    // load stopped altogether shows the cooldown never saw the low phase as low.
    let last = phases.last().map_or(0, |p| p.returns);
    out.push(Check {
        target: "the standby returns to standby while the load is low (the last phase)".into(),
        observed: format!(
            "activated at {:?} s, returned at {:?} s ({last} in the last phase, {} after the load ended)",
            rounded(&s.activated_at_s),
            rounded(&s.returned_at_s),
            s.after_load.1
        ),
        pass: last >= 1,
    });
    out
}

fn rounded(v: &[f64]) -> Vec<f64> {
    v.iter().map(|t| (t * 10.0).round() / 10.0).collect()
}

fn pct(p: &PhaseFigures, class: &str) -> String {
    format!("{:.1}%", p.shares.get(class).copied().unwrap_or(0.0) * 100.0)
}

fn p99(p: &PhaseFigures, class: &str) -> String {
    match p.ttft.get(class) {
        Some(t) if t.count > 0 => format!("{:.0}", t.p99_ms),
        _ => "-".into(),
    }
}

fn arm_table(a: &ArmReport) -> String {
    let mut t = format!("\n  arm {}: {}\n  unloaded TTFT {}\n", a.arm, a.layout, a.unloaded_ttft.show());
    t += &format!(
        "  {:<6} {:>8} {:>6} {:>9} {:>8} {:>8} {:>7} {:>8}  {:<22} {:<16} {:>7}\n",
        "phase",
        "offer/s",
        "sent",
        "goodput",
        "primary",
        "overflow",
        "cache",
        "refused",
        "TTFT p99 ms p/o/c",
        "HIGH sent/o/r",
        "act/ret"
    );
    for p in &a.phases {
        let ttft = format!("{} / {} / {}", p99(p, "primary"), p99(p, "overflow"), p99(p, "cache"));
        let h = |k: &str| p.high.get(k).copied().unwrap_or(0);
        let high = format!("{}/{}/{}", h("sent"), h("overflow"), h("refused"));
        t += &format!(
            "  {:<6} {:>8.1} {:>6} {:>9.0} {:>8} {:>8} {:>7} {:>8}  {:<22} {:<16} {:>7}\n",
            p.phase,
            p.offered_per_s,
            p.sent,
            p.goodput_tokens_per_s,
            pct(p, "primary"),
            pct(p, "overflow"),
            pct(p, "cache"),
            pct(p, "refused"),
            ttft,
            high,
            format!("{}/{}", p.activations, p.returns)
        );
    }
    if let Some(s) = &a.standby {
        for step in &s.steps {
            t += &format!(
                "  step to {} at {:.0} s: standby already active {}, utilisation crossed {:?} s, standby traffic {:?} s after the step\n",
                step.phase,
                step.at_s,
                step.already_active,
                step.crossed_s.map(|v| (v * 10.0).round() / 10.0),
                step.traffic_s.map(|v| (v * 10.0).round() / 10.0)
            );
        }
        for line in &s.log {
            t += &format!("  | {line}\n");
        }
    }
    for c in &a.checks {
        t += &format!("    {}\n", c.line());
    }
    t
}

pub fn table(r: &PeakReport) -> String {
    let c = &r.capacity;
    let mut t = format!(
        "peak: primary {}; overflow {}\n  capacity {:.1} requests/s, {:.0} tokens/s ({})\n  workload: {}\n  \
         bulkhead per node: max_concurrency {} (overflow: its max-running), max_queue {}, max_queue_wait {:?}\n  \
         (goodput: good tokens/s arriving in the phase; shares of the phase's sends; TTFT p99 of primary / overflow / cache)\n",
        r.primary,
        r.overflow,
        c.requests_per_s,
        c.tokens_per_s,
        c.how,
        r.workload,
        r.bulkhead.max_concurrency,
        r.bulkhead.max_queue,
        r.bulkhead.max_queue_wait
    );
    for a in &r.arms {
        t += &arm_table(a);
    }
    t + &format!("  report {}\n  plot   {}\n", r.json_path, r.svg_path)
}
