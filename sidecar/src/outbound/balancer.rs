//! The instances of every service, kept in step with the registry, and the
//! choice of one for each request: power of two choices over the load
//! score, weighed against cached prefixes under cache-aware routing
//! ([`super::prefix`]), or round robin, for comparison; skipping ejected
//! instances.
//! An ejection the budget refuses is counted every time but logged once
//! when the budget becomes spent, summarised every [`SUMMARY_INTERVAL`],
//! and logged once when it is available again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use prometheus_client::metrics::gauge::Gauge;
use rand::seq::IndexedRandom;
use registry::View;
use registry::episode::{Episode, SUMMARY_INTERVAL};
use tokio::sync::watch;

use mesh_proto::v1::GenerateRequest;

use super::instance::{Instance, Outcome};
use super::prefix::PrefixRouting;
use crate::config::{Outlier, Policy, Routing};
use crate::metrics::SidecarMetrics;
use crate::upstream::Dialer;

type Instances = BTreeMap<String, Vec<Arc<Instance>>>;

pub struct Balancer {
    policy: Policy,
    outlier: Outlier,
    metrics: SidecarMetrics,
    /// How to dial instances (mutual TLS unless in plaintext, HTTP/2 settings).
    dial: Dialer,
    services: RwLock<Arc<Instances>>,
    rr: AtomicUsize,
    /// Under cache-aware routing: the prefix index and its scoring.
    prefix: Option<PrefixRouting>,
    /// Per service: the stretch during which its ejection budget is spent.
    budget_spent: Mutex<HashMap<String, Episode>>,
}

impl Balancer {
    pub fn new(routing: &Routing, outlier: Outlier, metrics: SidecarMetrics, dial: Dialer) -> Self {
        let prefix = (routing.policy == Policy::CacheAware)
            .then(|| PrefixRouting::new(routing.prefix_index_blocks, metrics.clone()));
        Self {
            policy: routing.policy,
            outlier,
            metrics,
            dial,
            services: RwLock::new(Arc::default()),
            rr: AtomicUsize::new(0),
            prefix,
            budget_spent: Mutex::default(),
        }
    }

    /// Publishes instances known, ejected and healthy, per service; ends
    /// or summarises a spent ejection budget (run periodically, so the
    /// summary comes even when no request fails meanwhile). A service
    /// whose last instance left is still in the table, empty, so its
    /// gauges read 0 rather than their last value (see [`Self::update`]).
    pub fn export_gauges(&self) {
        let now = Instant::now();
        for (service, peers) in self.snapshot().iter() {
            let labels = self.metrics.service(service);
            self.metrics.instances.get_or_create(&labels).set(peers.len() as i64);
            let ejected = peers.iter().filter(|e| e.is_ejected()).count();
            self.metrics.ejected_instances.get_or_create(&labels).set(ejected as i64);
            let healthy = peers.iter().filter(|e| e.is_healthy(&self.outlier)).count();
            self.metrics.healthy_instances.get_or_create(&labels).set(healthy as i64);
            if peers.is_empty() || ejected < self.ejection_budget(peers.len()) {
                self.budget_available(service, now);
            } else {
                self.summarise_skipped(service, now);
            }
        }
    }

    /// How many of `peers` instances may be ejected at once: never all.
    fn ejection_budget(&self, peers: usize) -> usize {
        (peers * self.outlier.max_ejected_percent as usize / 100).min(peers.saturating_sub(1))
    }

    fn budget_episodes(&self) -> std::sync::MutexGuard<'_, HashMap<String, Episode>> {
        self.budget_spent.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a refused ejection; logs only the first of a stretch.
    fn budget_refused(&self, ep: &Instance, ejected: usize, allowed: usize, now: Instant) {
        let service = &ep.record.service;
        self.metrics.ejections_skipped.get_or_create(&self.metrics.service(service)).inc();
        if self.budget_episodes().entry(service.clone()).or_default().occur(now) {
            let instance = &ep.record.instance_id;
            tracing::warn!(%service, %instance, ejected, allowed, "ejection budget spent: not ejecting more instances");
        } else {
            self.summarise_skipped(service, now);
        }
    }

    /// At most once per interval: how many ejections were refused.
    fn summarise_skipped(&self, service: &str, now: Instant) {
        let due = self.budget_episodes().get_mut(service).and_then(|e| e.summary_due(now, SUMMARY_INTERVAL));
        if let Some(n) = due {
            tracing::warn!(%service, "{n} ejections skipped in the last {SUMMARY_INTERVAL:?} (ejection budget spent)");
        }
    }

    /// Ends a spent-budget stretch, if one was on, with one line.
    fn budget_available(&self, service: &str, now: Instant) {
        let ended = self.budget_episodes().get_mut(service).and_then(|e| e.end(now));
        if let Some(ended) = ended {
            let after = format!("{:.1}s", ended.lasted.as_secs_f64());
            tracing::info!(%service, skipped = ended.count, "ejection budget available again after {after}; {} ejections skipped meanwhile", ended.count);
        }
    }

    pub fn outlier(&self) -> &Outlier {
        &self.outlier
    }

    fn snapshot(&self) -> Arc<Instances> {
        self.services.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Rebuilds the table from a registry view, keeping the state of
    /// instances that did not change.
    ///
    /// A service the registry named once stays in the table, empty, after
    /// its last instance leaves (the view then has no record of it at
    /// all). Forgetting it would leave its per-service gauges at their
    /// last value, so "no instance" never shows, and would tell its callers
    /// NOT_FOUND, a caller's mistake that no alert pages for, when it is an
    /// outage: kept, its gauges read 0 and its callers get UNAVAILABLE.
    /// Only registry records add names, so callers cannot grow the table.
    pub fn update(&self, view: &View) {
        let old = self.snapshot();
        let mut next: Instances = BTreeMap::new();
        for rec in view.instances.values() {
            if rec.standby {
                // Known (its callers get UNAVAILABLE, not NOT_FOUND, while
                // only standbys are left), never routed to.
                next.entry(rec.service.clone()).or_default();
                continue;
            }
            let peers = old.get(&rec.service);
            let same = peers.and_then(|p| p.iter().find(|e| e.record == *rec));
            let ep = match same {
                Some(e) => e.clone(),
                None => {
                    // Seed a newcomer with its peers' median TTFT.
                    let mut ttfts: Vec<Duration> = peers.into_iter().flatten().map(|e| e.ewma_ttft()).collect();
                    ttfts.sort();
                    match Instance::new(rec.clone(), ttfts.get(ttfts.len() / 2).copied(), &self.dial) {
                        Ok(e) => Arc::new(e),
                        Err(e) => {
                            tracing::warn!(address = %rec.address, error = %e, "skipping instance with a bad address");
                            continue;
                        }
                    }
                }
            };
            next.entry(rec.service.clone()).or_default().push(ep);
        }
        for gone in old.keys() {
            next.entry(gone.clone()).or_default();
        }
        *self.services.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
        self.export_gauges();
    }

    /// Keeps the table in step with the registry's view, for as long as
    /// the registry runs.
    pub fn follow(this: Arc<Self>, mut view: watch::Receiver<Arc<View>>, etcd_reachable: Gauge) {
        tokio::spawn(async move {
            loop {
                // Not held across the wait: the registry updates the view in
                // place while nobody holds it, and copies it otherwise.
                let v = view.borrow_and_update().clone();
                etcd_reachable.set(i64::from(v.etcd_reachable));
                this.update(&v);
                drop(v);
                if view.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    /// Whether the registry has named the service since this sidecar
    /// started, even if none of its instances is left now: a call to it is
    /// then an outage (UNAVAILABLE from the route), not a wrong name
    /// (NOT_FOUND), and is counted under its own name.
    pub fn knows(&self, service: &str) -> bool {
        self.snapshot().contains_key(service)
    }

    /// How many instances of the service the registry lists now.
    pub fn instance_count(&self, service: &str) -> usize {
        self.snapshot().get(service).map_or(0, Vec::len)
    }

    pub fn all(&self) -> Vec<Arc<Instance>> {
        self.snapshot().values().flatten().cloned().collect()
    }

    /// The request's prefix blocks, for [`Self::pick`]; none unless routing
    /// is cache-aware.
    pub fn prefix_blocks(&self, req: &GenerateRequest) -> Vec<u64> {
        self.prefix.as_ref().map(|p| p.blocks(req)).unwrap_or_default()
    }

    /// Picks an instance of `service` not in `exclude` for a request with
    /// these prefix blocks, taking it (a probation trial counts). `None`
    /// when none is available.
    pub fn pick(&self, service: &str, exclude: &HashSet<String>, blocks: &[u64]) -> Option<Pick> {
        let services = self.snapshot();
        let now = Instant::now();
        let candidates: Vec<&Arc<Instance>> = services
            .get(service)?
            .iter()
            .filter(|e| !exclude.contains(&e.record.instance_id) && e.is_available(now))
            .collect();
        let mut order: Vec<&Arc<Instance>> = match self.policy {
            Policy::RoundRobin => {
                let start = self.rr.fetch_add(1, Ordering::Relaxed);
                (0..candidates.len()).map(|i| candidates[(start + i) % candidates.len()]).collect()
            }
            Policy::LeastLoaded | Policy::CacheAware => power_of_two(candidates),
        };
        let matches = self.prefix.as_ref().map(|p| p.rank(service, &mut order, blocks));
        let chosen = order.into_iter().find(|e| e.try_admit(now))?;
        let mut cold = false;
        if let (Some(prefix), Some(matches)) = (&self.prefix, matches) {
            cold = prefix.routed(service, blocks, &matches, chosen);
        }
        tracing::debug!(instance = %chosen.record.instance_id, load = chosen.load(), "picked");
        Some(Pick { instance: chosen.clone(), cold })
    }

    /// A first token's time, for cache-aware routing's price of a prefill.
    pub fn observe_ttft(&self, service: &str, pick: &Pick, ttft: Duration) {
        pick.instance.observe_ttft(ttft);
        if let (Some(prefix), true) = (&self.prefix, pick.cold) {
            prefix.observe_cold(service, ttft);
        }
    }

    /// Records an attempt's outcome and ejects the instance if it asks for
    /// it and the service's ejection budget allows.
    pub fn record(&self, ep: &Instance, outcome: Outcome, why: &str) {
        let now = Instant::now();
        if ep.record(outcome, &self.outlier, now) {
            self.eject_if_allowed(
                ep,
                format!("{} consecutive failures; last: {why}", self.outlier.consecutive_failures),
                now,
            );
        }
    }

    fn eject_if_allowed(&self, ep: &Instance, reason: String, now: Instant) {
        let services = self.snapshot();
        let Some(peers) = services.get(&ep.record.service) else { return };
        let ejected = peers.iter().filter(|e| e.is_ejected()).count();
        let allowed = self.ejection_budget(peers.len());
        if ejected < allowed {
            self.budget_available(&ep.record.service, now);
            ep.eject(reason, &self.outlier, now);
            self.metrics.ejections.get_or_create(&self.metrics.service(&ep.record.service)).inc();
        } else {
            self.budget_refused(ep, ejected, allowed, now);
        }
    }

    /// The success-rate check: an instance far below its peers' mean is
    /// ejected. Run periodically.
    pub fn check_success_rates(&self) {
        let now = Instant::now();
        for peers in self.snapshot().values() {
            let rates: Vec<(&Arc<Instance>, f64)> =
                peers.iter().filter_map(|e| e.success_rate(&self.outlier, now).map(|r| (e, r))).collect();
            if rates.len() < 2 {
                continue;
            }
            let mean = rates.iter().map(|(_, r)| r).sum::<f64>() / rates.len() as f64;
            for (ep, rate) in rates {
                if rate < mean - self.outlier.success_rate_margin && !ep.is_ejected() {
                    let reason = format!("success rate {:.0}% against a mean of {:.0}%", rate * 100.0, mean * 100.0);
                    self.eject_if_allowed(ep, reason, now);
                }
            }
        }
    }
}

/// The instance a call goes to, and whether it holds none of the call's
/// prefix blocks (as far as the index knows): its first token then
/// measures a whole prefill.
pub struct Pick {
    pub instance: Arc<Instance>,
    pub cold: bool,
}

/// Two candidates drawn at random, the less loaded first, then the rest,
/// in case both lose a race for a probation trial.
fn power_of_two(candidates: Vec<&Arc<Instance>>) -> Vec<&Arc<Instance>> {
    let mut two: Vec<&Arc<Instance>> = candidates.choose_multiple(&mut rand::rng(), 2).copied().collect();
    two.sort_by(|a, b| a.load().total_cmp(&b.load()));
    let rest: Vec<&Arc<Instance>> =
        candidates.iter().filter(|c| !two.iter().any(|t| Arc::ptr_eq(t, c))).copied().collect();
    two.extend(rest);
    two
}

#[cfg(test)]
pub(crate) mod tests {
    use registry::InstanceRecord;

    use super::*;
    use crate::outbound::instance::Health;

    fn balancer(policy: Policy, outlier: Outlier) -> Balancer {
        let routing = Routing { policy, ..Routing::default() };
        Balancer::new(&routing, outlier, SidecarMetrics::new(), Dialer::default())
    }

    pub(crate) fn view(n: usize) -> View {
        let instances = (0..n)
            .map(|i| {
                let r = InstanceRecord::new("chat", format!("i{i}"), format!("127.0.0.1:{}", 9000 + i));
                (("chat".to_string(), r.instance_id.clone()), r)
            })
            .collect();
        View { instances, etcd_reachable: true, synced_at: None }
    }

    #[tokio::test]
    async fn least_loaded_avoids_the_busy_instance() {
        let b = balancer(Policy::LeastLoaded, Outlier::default());
        b.update(&view(2));
        let busy = b.pick("chat", &HashSet::new(), &[]).unwrap().instance;
        let _streams: Vec<_> = (0..10).map(|_| busy.start()).collect();
        for _ in 0..20 {
            let e = b.pick("chat", &HashSet::new(), &[]).unwrap().instance;
            assert_ne!(e.record.instance_id, busy.record.instance_id);
        }
    }

    #[tokio::test]
    async fn never_ejects_every_instance() {
        let cfg = Outlier { consecutive_failures: 1, max_ejected_percent: 100, ..Default::default() };
        let b = balancer(Policy::RoundRobin, cfg);
        b.update(&view(2));
        for e in b.all() {
            b.record(&e, Outcome::Failure, "boom");
        }
        assert_eq!(b.all().iter().filter(|e| e.is_ejected()).count(), 1);
        assert!(b.pick("chat", &HashSet::new(), &[]).is_some());
    }

    /// Under overload every failure past the threshold asks for an
    /// ejection the budget refuses: counted each time, one log stretch.
    #[tokio::test]
    async fn a_spent_budget_counts_every_refusal_in_one_episode() {
        let cfg = Outlier { consecutive_failures: 1, max_ejected_percent: 50, ..Default::default() };
        let b = balancer(Policy::RoundRobin, cfg);
        b.update(&view(2));
        let (first, second) = (b.all()[0].clone(), b.all()[1].clone());
        b.record(&first, Outcome::Failure, "boom");
        assert!(first.is_ejected());
        for _ in 0..1000 {
            b.record(&second, Outcome::Failure, "overloaded");
        }
        assert!(!second.is_ejected());
        let skipped = b.metrics.ejections_skipped.get_or_create(&b.metrics.service("chat")).get();
        assert_eq!(skipped, 1000);
        let episode = b.budget_episodes().get("chat").cloned().unwrap();
        assert!(episode.is_on());
        assert_eq!(episode.count(), 1000, "one stretch, started once, holds every refusal");
        // Two more instances: the budget allows a second ejection again.
        b.update(&view(4));
        assert!(!b.budget_episodes()["chat"].is_on(), "the stretch ended when the budget returned");
        b.record(&second, Outcome::Failure, "overloaded");
        assert!(second.is_ejected());
    }

    #[tokio::test]
    async fn success_rate_far_below_the_peers_ejects() {
        let cfg = Outlier { consecutive_failures: 1000, success_rate_min_requests: 10, ..Default::default() };
        let b = balancer(Policy::RoundRobin, cfg);
        b.update(&view(3));
        let all = b.all();
        for (i, e) in all.iter().enumerate() {
            for n in 0..20 {
                // i0 and i1 always succeed; i2 fails half the time.
                let outcome = if i == 2 && n % 2 == 0 { Outcome::Failure } else { Outcome::Success };
                b.record(e, outcome, "");
            }
        }
        b.check_success_rates();
        let ejected: Vec<&str> = all.iter().filter(|e| e.is_ejected()).map(|e| e.record.instance_id.as_str()).collect();
        assert_eq!(ejected, vec!["i2"]);
        let Health::Ejected { reason, .. } = all[2].health() else { unreachable!() };
        assert!(reason.contains("success rate 50%"), "{reason}");
    }

    fn gauges(b: &Balancer) -> [i64; 3] {
        let labels = b.metrics.service("chat");
        let m = &b.metrics;
        [&m.instances, &m.ejected_instances, &m.healthy_instances].map(|f| f.get_or_create(&labels).get())
    }

    /// A service whose last instance left stays known, empty: its gauges
    /// read 0 (not their last value) and a pick finds nothing (UNAVAILABLE
    /// from the route), while a name never registered stays unknown.
    #[tokio::test]
    async fn a_service_whose_instances_all_left_stays_known_with_zero_gauges() {
        let cfg = Outlier { consecutive_failures: 1, max_ejected_percent: 100, ..Default::default() };
        let b = balancer(Policy::RoundRobin, cfg);
        b.update(&view(2));
        b.record(&b.all()[0], Outcome::Failure, "boom");
        b.export_gauges();
        assert_eq!(gauges(&b), [2, 1, 1]);

        b.update(&view(0));
        assert_eq!(gauges(&b), [0, 0, 0]);
        b.export_gauges();
        assert_eq!(gauges(&b), [0, 0, 0], "still 0 at the next export, not forgotten");
        assert!(b.knows("chat") && !b.knows("made-up"));
        assert_eq!(b.instance_count("chat"), 0);
        assert!(b.pick("chat", &HashSet::new(), &[]).is_none());
        assert!(b.all().is_empty());

        b.update(&view(1));
        assert_eq!(gauges(&b), [1, 0, 1]);
    }

    /// The only instance of a service never gets ejected (the budget keeps
    /// one), but once it fails `consecutive_failures` in a row it no longer
    /// counts as healthy, so "no healthy instance" can show.
    #[tokio::test]
    async fn a_failing_instance_the_budget_keeps_is_not_healthy() {
        let cfg = Outlier { consecutive_failures: 2, ..Default::default() };
        let b = balancer(Policy::RoundRobin, cfg);
        b.update(&view(1));
        let only = b.all()[0].clone();
        b.record(&only, Outcome::Failure, "probe failed");
        b.export_gauges();
        assert_eq!(gauges(&b), [1, 0, 1], "one failure is not yet failing");
        b.record(&only, Outcome::Failure, "probe failed");
        b.export_gauges();
        assert!(!only.is_ejected());
        assert_eq!(gauges(&b), [1, 0, 0]);
        b.record(&only, Outcome::Success, "");
        b.export_gauges();
        assert_eq!(gauges(&b), [1, 0, 1]);
    }

    #[tokio::test]
    async fn updates_keep_state_of_unchanged_instances() {
        let b = balancer(Policy::RoundRobin, Outlier::default());
        b.update(&view(2));
        let e = b.pick("chat", &HashSet::new(), &[]).unwrap().instance;
        e.observe_ttft(Duration::from_secs(3));
        b.update(&view(3));
        let same = b.all().into_iter().find(|x| x.record == e.record).unwrap();
        assert!(Arc::ptr_eq(&same, &e));
        assert_eq!(b.all().len(), 3);
    }
}
