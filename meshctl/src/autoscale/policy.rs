//! When to wake standby capacity and when to hand it back: the decision
//! alone, from one sample of a service's instances at a time, so that it
//! is tested without etcd or a clock.
//!
//! Utilisation is demand over the capacity that serves: the sum over the
//! active instances of (streams at the node + calls queued at its sidecar)
//! over the sum of their `max_running`. It must stay above `above` for a
//! whole `window` before a spare is activated, and below `below` for a whole
//! `cooldown` before an activated spare goes back to standby; after any
//! action both clocks start again, so the new capacity is measured before
//! the next step. Choose `below` under `above * n / (n + 1)` for `n` active
//! instances, or handing one back would push the rest over `above` (a flap).

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
    above_since: Option<Instant>,
    below_since: Option<Instant>,
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
        let u = s.utilisation;
        if u > policy.above {
            self.below_since = None;
            let since = *self.above_since.get_or_insert(now);
            if now - since < policy.window {
                return None;
            }
            self.restart();
            let why = format!("utilisation {u:.2} over {:.2} for {:?}", policy.above, policy.window);
            return match s.waiting.first() {
                Some(id) => Some((Action::Activate(id.clone()), why)),
                None => policy.hook_without_spare.then_some((Action::HookOnly, why + ", no spare on standby")),
            };
        }
        self.above_since = None;
        if u >= policy.below || s.active <= policy.min_active || s.serving.is_empty() {
            self.below_since = None;
            return None;
        }
        let since = *self.below_since.get_or_insert(now);
        if now - since < policy.cooldown {
            return None;
        }
        self.restart();
        let why = format!("utilisation {u:.2} under {:.2} for {:?}", policy.below, policy.cooldown);
        Some((Action::Return(s.serving[0].clone()), why))
    }

    fn restart(&mut self) {
        (self.above_since, self.below_since) = (None, None);
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

    #[test]
    fn activates_only_after_a_whole_window_above_and_measures_again_before_the_next() {
        let (p, mut t, t0) = (policy(), Tracker::default(), Instant::now());
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let hot = sample(0.95, &["s1", "s2"], &[]);
        assert_eq!(t.decide(&p, &hot, at(0)), None);
        assert_eq!(t.decide(&p, &sample(0.7, &["s1"], &[]), at(1000)), None, "a dip restarts the window");
        assert_eq!(t.decide(&p, &hot, at(1500)), None);
        assert_eq!(t.decide(&p, &hot, at(3000)), None);
        let (action, why) = t.decide(&p, &hot, at(3500)).unwrap();
        assert_eq!(action, Action::Activate("s1".into()));
        assert!(why.contains("over 0.80"), "{why}");
        assert_eq!(t.decide(&p, &hot, at(3600)), None, "the window starts again after an action");
    }

    #[test]
    fn returns_a_spare_only_after_the_cooldown_and_never_below_the_minimum() {
        let (p, mut t, t0) = (policy(), Tracker::default(), Instant::now());
        let at = |s: u64| t0 + Duration::from_secs(s);
        let cool = sample(0.2, &[], &["s1"]);
        assert_eq!(t.decide(&p, &cool, at(0)), None);
        assert_eq!(t.decide(&p, &sample(0.5, &[], &["s1"]), at(5)), None, "between the thresholds: hold");
        assert_eq!(t.decide(&p, &cool, at(6)), None);
        assert_eq!(t.decide(&p, &cool, at(15)), None);
        assert_eq!(t.decide(&p, &cool, at(16)).map(|a| a.0), Some(Action::Return("s1".into())));
        let alone = Sample { utilisation: 0.0, active: 1, waiting: vec![], serving: vec!["s1".into()] };
        let mut t = Tracker::default();
        assert_eq!(t.decide(&p, &alone, at(0)), None);
        assert_eq!(t.decide(&p, &alone, at(100)), None, "the last active instance stays");
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
