//! When to wake standby capacity and when to hand it back: the decision
//! alone, from one sample of a service's instances at a time, so that it
//! is tested without etcd or a clock.
//!
//! Utilisation is demand over the capacity that serves: the sum over the
//! active instances of (streams at the node + calls queued at its sidecar)
//! over the sum of their `max_running`, sampled every tick. Its mean over a
//! whole `window` must be above `above` before a spare is activated, and
//! its mean over a whole `cooldown` below `below` before an activated spare
//! goes back to standby: means, because one sample is the moment's streams
//! and bursts (at half load a third of the samples may cross `below`, and a
//! rule that every sample stay under it never returned a spare). After any
//! action the samples start again, so the new capacity is measured before
//! the next step. Choose `below` under `above * n / (n + 1)` for `n` active
//! instances, or handing one back would push the rest over `above` (a flap).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use registry::{InstanceRecord, LoadReport};

#[derive(Debug, Clone)]
pub struct Policy {
    pub above: f64,
    pub below: f64,
    pub window: Duration,
    pub cooldown: Duration,
    /// Active instances never fewer than this: spares are activated to
    /// reach it, and never returned below it.
    pub min_active: usize,
    /// Whether a scale-out with no spare left still runs the hook (which
    /// may add capacity beyond the standbys).
    pub hook_without_spare: bool,
}

/// One service's instances at one moment.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    pub utilisation: f64,
    pub active: usize,
    /// Spares on standby, by id: the first is activated next.
    pub waiting: Vec<String>,
    /// Spares serving, least loaded first: the first goes back next.
    pub serving: Vec<String>,
}

impl Sample {
    /// The sample of `records` (one service's), with their load reports
    /// (an instance without one counts as idle).
    pub fn of<'a>(records: impl Iterator<Item = (&'a InstanceRecord, Option<LoadReport>)>) -> Sample {
        let (mut demand, mut capacity) = (0u64, 0u64);
        let mut sample = Sample::default();
        let mut serving = Vec::new();
        for (rec, load) in records {
            let load = load.unwrap_or(LoadReport { running: 0, queued: 0, max_running: rec.max_running });
            match (rec.standby, rec.spare) {
                (true, true) => sample.waiting.push(rec.instance_id.clone()),
                (true, false) => {} // put on standby by an operator: not the controller's
                (false, spare) => {
                    sample.active += 1;
                    demand += u64::from(load.running + load.queued);
                    capacity += u64::from(rec.max_running.max(1));
                    if spare {
                        serving.push((load.running + load.queued, rec.instance_id.clone()));
                    }
                }
            }
        }
        sample.waiting.sort();
        serving.sort();
        sample.serving = serving.into_iter().map(|(_, id)| id).collect();
        sample.utilisation = if capacity == 0 { 0.0 } else { demand as f64 / capacity as f64 };
        sample
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Activate this spare.
    Activate(String),
    /// Return this spare to standby.
    Return(String),
    /// Scale out with no spare left: only the hook runs.
    HookOnly,
}

/// What the controller remembers of one service between samples.
#[derive(Debug, Default)]
pub struct Tracker {
    /// Utilisation samples since the last action, oldest first, kept for
    /// the longer of the window and the cooldown.
    samples: VecDeque<(Instant, f64)>,
    /// The first of them: a mean over a span counts once the span was seen.
    since: Option<Instant>,
}

impl Tracker {
    /// The action this sample calls for, with the reason, if any.
    pub fn decide(&mut self, policy: &Policy, s: &Sample, now: Instant) -> Option<(Action, String)> {
        if s.active < policy.min_active
            && let Some(id) = s.waiting.first()
        {
            self.restart();
            let why = format!("{} active, under the minimum of {}", s.active, policy.min_active);
            return Some((Action::Activate(id.clone()), why));
        }
        let seen = now - *self.since.get_or_insert(now);
        self.samples.push_back((now, s.utilisation));
        let keep = policy.window.max(policy.cooldown);
        while self.samples.front().is_some_and(|(t, _)| now - *t > keep) {
            self.samples.pop_front();
        }
        let hot = self.mean(now, policy.window);
        if seen >= policy.window && hot > policy.above {
            self.restart();
            let why = format!("utilisation {hot:.2} over {:.2} on average for {:?}", policy.above, policy.window);
            return match s.waiting.first() {
                Some(id) => Some((Action::Activate(id.clone()), why)),
                None => policy.hook_without_spare.then_some((Action::HookOnly, why + ", no spare on standby")),
            };
        }
        let cool = self.mean(now, policy.cooldown);
        if seen < policy.cooldown || cool >= policy.below || s.active <= policy.min_active || s.serving.is_empty() {
            return None;
        }
        self.restart();
        let why = format!("utilisation {cool:.2} under {:.2} on average for {:?}", policy.below, policy.cooldown);
        Some((Action::Return(s.serving[0].clone()), why))
    }

    /// Mean utilisation of the samples of the last `span`.
    fn mean(&self, now: Instant, span: Duration) -> f64 {
        let recent: Vec<f64> = self.samples.iter().filter(|(t, _)| now - *t <= span).map(|(_, u)| *u).collect();
        recent.iter().sum::<f64>() / recent.len().max(1) as f64
    }

    fn restart(&mut self) {
        self.samples.clear();
        self.since = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            above: 0.8,
            below: 0.4,
            window: Duration::from_secs(2),
            cooldown: Duration::from_secs(10),
            min_active: 1,
            hook_without_spare: false,
        }
    }

    fn rec(id: &str, standby: bool, spare: bool) -> InstanceRecord {
        let mut r = InstanceRecord::new("chat", id, id);
        (r.max_running, r.standby, r.spare) = (10, standby, spare);
        r
    }

    fn load(running: u32, queued: u32) -> Option<LoadReport> {
        Some(LoadReport { running, queued, max_running: 10 })
    }

    #[test]
    fn utilisation_counts_active_instances_only_and_sorts_the_spares() {
        let (a, b, c, d) = (rec("a", false, false), rec("b", false, true), rec("c", true, true), rec("d", true, false));
        let s = Sample::of([(&a, load(10, 5)), (&b, load(3, 0)), (&c, load(0, 0)), (&d, None)].into_iter());
        assert!((s.utilisation - 18.0 / 20.0).abs() < 1e-9, "{}", s.utilisation);
        assert_eq!((s.active, s.waiting.clone(), s.serving.clone()), (2, vec!["c".to_string()], vec!["b".to_string()]));
    }

    fn sample(u: f64, waiting: &[&str], serving: &[&str]) -> Sample {
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
        Sample { utilisation: u, active: 1 + serving.len(), waiting: ids(waiting), serving: ids(serving) }
    }

    /// Feeds `utilisations`, one every `every`, from `t0`; the decisions.
    fn feed(
        t: &mut Tracker,
        p: &Policy,
        s: &Sample,
        (t0, every): (Instant, Duration),
        us: &[f64],
    ) -> Vec<Option<Action>> {
        let at = |i: usize| t0 + every * i as u32;
        us.iter()
            .enumerate()
            .map(|(i, u)| t.decide(p, &Sample { utilisation: *u, ..s.clone() }, at(i)).map(|a| a.0))
            .collect()
    }

    #[test]
    fn activates_when_the_mean_over_a_whole_window_is_above_and_measures_again_before_the_next() {
        let (p, mut t, t0) = (policy(), Tracker::default(), Instant::now());
        let half = Duration::from_millis(500);
        let hot = sample(0.0, &["s1", "s2"], &[]);
        // Bursts over 0.8 whose mean is under it: nothing (window 2 s).
        let decided = feed(&mut t, &p, &hot, (t0, half), &[0.95, 0.5, 0.95, 0.5, 0.95, 0.5, 0.9]);
        assert!(decided.iter().all(Option::is_none), "{decided:?}");
        // Over it on average: the first spare, once the window is full again.
        let mut t = Tracker::default();
        let decided = feed(&mut t, &p, &hot, (t0, half), &[0.95, 0.7, 0.95, 0.9, 0.9, 0.9]);
        assert_eq!(decided[..4], [None, None, None, None], "not before a whole window was seen");
        assert_eq!(decided[4], Some(Action::Activate("s1".into())));
        assert_eq!(decided[5], None, "the window starts again after an action");
        let (_, why) = t.decide(&p, &Sample { utilisation: 0.95, ..hot }, t0 + Duration::from_secs(5)).unwrap();
        assert!(why.contains("over 0.80 on average"), "{why}");
    }

    #[test]
    fn returns_a_spare_when_the_mean_over_the_cooldown_is_below_despite_bursts_never_below_the_minimum() {
        let (p, mut t, t0) = (policy(), Tracker::default(), Instant::now());
        let one_s = Duration::from_secs(1);
        let cool = sample(0.0, &[], &["s1"]);
        // Half load with bursts over 0.4 (the samples of a third of the
        // ticks): the mean over the 10 s cooldown is 0.3.
        let us: Vec<f64> = (0..=11).map(|i| if i % 3 == 0 { 0.5 } else { 0.25 }).collect();
        let decided = feed(&mut t, &p, &cool, (t0, one_s), &us);
        assert!(decided[..10].iter().all(Option::is_none), "not before a whole cooldown: {decided:?}");
        assert_eq!(decided[10], Some(Action::Return("s1".into())));
        let mut t = Tracker::default();
        let held = feed(&mut t, &p, &cool, (t0, one_s), &[0.5; 12]);
        assert!(held.iter().all(Option::is_none), "between the thresholds: hold");
        let alone = Sample { utilisation: 0.0, active: 1, waiting: vec![], serving: vec!["s1".into()] };
        let mut t = Tracker::default();
        assert!(feed(&mut t, &p, &alone, (t0, one_s), &[0.0; 20]).iter().all(Option::is_none), "the last stays");
    }

    #[test]
    fn the_minimum_is_restored_at_once_and_the_hook_runs_without_spares_only_when_asked() {
        let (mut p, mut t, now) = (policy(), Tracker::default(), Instant::now());
        let none_active = Sample { utilisation: 0.0, active: 0, waiting: vec!["s1".into()], serving: vec![] };
        assert_eq!(t.decide(&p, &none_active, now).map(|a| a.0), Some(Action::Activate("s1".into())));
        let hot = sample(2.0, &[], &[]);
        let later = now + Duration::from_secs(3);
        assert_eq!((t.decide(&p, &hot, now), t.decide(&p, &hot, later)), (None, None));
        p.hook_without_spare = true;
        let mut t = Tracker::default();
        assert_eq!(t.decide(&p, &hot, now), None);
        assert_eq!(t.decide(&p, &hot, later).map(|a| a.0), Some(Action::HookOnly));
    }
}
