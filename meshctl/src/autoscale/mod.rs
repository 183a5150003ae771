//! `meshctl autoscale`: the controller that wakes standby capacity when a
//! service stays busy and hands it back when it stays idle (policy in
//! `policy`), one per cluster (election in `leader`). It reads the mesh from
//! etcd (records and the node sidecars' load reports, followed by one
//! watch), decides every `--tick`, and writes each decision as the spare's
//! standby key (which its sidecar follows) together with the service's
//! autoscale status (`{prefix}autoscale/services/{service}`, shown by
//! `meshctl status`), then runs the hook, if any.

mod args;
mod hook;
mod leader;
mod metrics;
mod policy;
mod status;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::TxnOp;
use registry::etcd::{Followed, Keys, follow};
use registry::signals::{self, load_prefix, mode_key};
use registry::{InstanceRecord, LoadReport, Mode};
use tokio::sync::watch;

pub use args::AutoscaleArgs;
pub use leader::leader_key;
use leader::{Lead, Session};
use metrics::Metrics;
use policy::{Action, Policy, Sample, Tracker};
pub use status::{ServiceStatus, status_prefix};

/// Standby decisions of instances absent this long from the registry are deleted.
const FORGET_AFTER: Duration = Duration::from_secs(300);

/// Campaigns, leads until the lease is lost, campaigns again; until
/// SIGTERM, which revokes the lease so that the next controller leads at
/// once. Ready (systemd, the ready line) once etcd has granted it a lease.
pub async fn run(args: AutoscaleArgs) -> anyhow::Result<()> {
    let policy = args::policy(&args)?;
    let config = args.etcd.config();
    let id = args.id.clone().unwrap_or_else(telemetry::instance_id);
    let metrics = Metrics::default();
    let mut addresses = Vec::new();
    if let Some(addr) = args.metrics_listen {
        let token = args.metrics_token_file.as_deref();
        addresses.push(("metrics", daemon::metrics::serve(addr, token, |r| metrics.register(r)).await?));
    }
    let mesh = follow(Arc::new(config.clone()), Keys::Prefix(config.prefix.clone()));
    let stop = daemon::signal::shutdown();
    tokio::pin!(stop);
    let mut announced = false;
    loop {
        let (mut session, mut keeper) = match Session::open(&config).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "autoscale: cannot reach etcd; retrying");
                tokio::select! { () = tokio::time::sleep(config.backoff.1) => continue, _ = &mut stop => return Ok(()) }
            }
        };
        if !std::mem::replace(&mut announced, true) {
            daemon::ready::announce("autoscale", &addresses);
        }
        let mut leading = Leading::new(policy.clone(), &args, &config.prefix, metrics.clone());
        let ended = tokio::select! {
            e = leading.campaign_and_lead(&mut session, &id, mesh.clone()) => Some(e),
            e = keeper.lost() => Some(e),
            _ = &mut stop => None,
        };
        metrics.leading.set(0);
        // Revoked, the leader key goes at once and the next controller leads.
        let _ = session.client.lease_revoke(session.lease).await;
        let Some(ended) = ended else {
            daemon::ready::stopping();
            tracing::info!("autoscale: stopped");
            return Ok(());
        };
        tracing::warn!(error = %ended, "autoscale: not leading any more; campaigning again");
    }
}

/// The controller while it campaigns and leads.
struct Leading<'a> {
    policy: Policy,
    args: &'a AutoscaleArgs,
    prefix: String,
    trackers: HashMap<String, Tracker>,
    /// Standby keys whose instance left the registry, and since when.
    absent: HashMap<String, Instant>,
    status: BTreeMap<String, ServiceStatus>,
    metrics: Metrics,
}

impl<'a> Leading<'a> {
    fn new(policy: Policy, args: &'a AutoscaleArgs, prefix: &str, metrics: Metrics) -> Self {
        let (trackers, absent, status) = (HashMap::new(), HashMap::new(), BTreeMap::new());
        Leading { policy, args, prefix: prefix.to_string(), trackers, absent, status, metrics }
    }

    async fn campaign_and_lead(
        &mut self,
        session: &mut Session,
        id: &str,
        mut mesh: watch::Receiver<Arc<Followed>>,
    ) -> anyhow::Error {
        let lead = match session.campaign(&self.prefix, id).await {
            Ok(lead) => lead,
            Err(e) => return e,
        };
        tracing::info!(%id, "autoscale: leading");
        self.metrics.leading.set(1);
        let mut tick = tokio::time::interval(self.args.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let view = mesh.borrow_and_update().clone();
            if !view.reachable {
                continue; // decide on what etcd says now, not on a stale view
            }
            if let Err(e) = self.step(session, &lead, &view, id).await {
                return e;
            }
        }
    }

    /// One look at the mesh: a decision per service, and old decisions forgotten.
    async fn step(&mut self, session: &mut Session, lead: &Lead, view: &Followed, id: &str) -> anyhow::Result<()> {
        let (records, loads) = read(&self.prefix, view);
        let now = Instant::now();
        for service in &self.args.service {
            // A new leader carries on the counts of the last.
            let written = view.values.get(&status::key(&self.prefix, service)).and_then(|v| ServiceStatus::decode(v));
            self.status.entry(service.clone()).or_insert_with(|| written.unwrap_or_default());
            let sample = Sample::of(
                records
                    .iter()
                    .filter(|r| &r.service == service)
                    .map(|r| (r, loads.get(&(r.service.clone(), r.instance_id.clone())).copied())),
            );
            self.metrics.saw(service, sample.utilisation);
            let decided = self.trackers.entry(service.clone()).or_default().decide(&self.policy, &sample, now);
            if let Some((action, why)) = decided {
                self.act(session, lead, service, (action, why), (&sample, id)).await?;
            }
        }
        self.forget(session, lead, &records, view, now).await
    }

    async fn act(
        &mut self,
        session: &mut Session,
        lead: &Lead,
        service: &str,
        (action, why): (Action, String),
        (sample, id): (&Sample, &str),
    ) -> anyhow::Result<()> {
        let status = self.status.entry(service.to_string()).or_default();
        status.record(&action, &why, sample.utilisation, id);
        let mut ops = vec![TxnOp::put(status::key(&self.prefix, service), status.encode(), None)];
        let (instance, mode, hook) = match &action {
            Action::Activate(i) => (i.as_str(), Some(Mode::Active), &self.args.on_scale_out),
            Action::Return(i) => (i.as_str(), Some(Mode::Standby), &self.args.on_scale_in),
            Action::HookOnly => ("", None, &self.args.on_scale_out),
        };
        if let Some(mode) = mode {
            ops.push(TxnOp::put(mode_key(&self.prefix, service, instance), mode.as_str(), None));
        }
        lead.write(&mut session.client, ops).await?;
        self.metrics.decided(service, &status.last_action);
        match &action {
            Action::Activate(_) => tracing::info!(%why, "autoscale: activated {instance} of {service}"),
            Action::Return(_) => tracing::info!(%why, "autoscale: returned {instance} of {service} to standby"),
            Action::HookOnly => tracing::info!(%why, "autoscale: {service} needs capacity and has no spare on standby"),
        }
        if let Some(command) = hook {
            hook::run(command, service, instance, status.last_action.as_str(), sample.utilisation);
        }
        Ok(())
    }

    /// Deletes the standby decisions of instances gone from the registry
    /// for [`FORGET_AFTER`] (a spare that restarts keeps its decision).
    async fn forget(
        &mut self,
        session: &mut Session,
        lead: &Lead,
        records: &[InstanceRecord],
        view: &Followed,
        now: Instant,
    ) -> anyhow::Result<()> {
        let modes = signals::mode_prefix(&self.prefix);
        let decided = view.values.keys().filter_map(|k| signals::parse_key(&modes, k).map(|(s, i)| (k, s, i)));
        let mut stale = Vec::new();
        let mut still = HashMap::new();
        for (key, service, instance) in decided {
            if records.iter().any(|r| r.service == service && r.instance_id == instance) {
                continue;
            }
            let since = *self.absent.get(key).unwrap_or(&now);
            match now - since >= FORGET_AFTER {
                true => stale.push(TxnOp::delete(key.as_str(), None)),
                false => _ = still.insert(key.clone(), since),
            }
        }
        self.absent = still;
        if stale.is_empty() {
            return Ok(());
        }
        tracing::info!(
            count = stale.len(),
            "autoscale: forgetting standby decisions of instances gone for {FORGET_AFTER:?}"
        );
        lead.write(&mut session.client, stale).await
    }
}

type Loads = HashMap<(String, String), LoadReport>;

/// The records and load reports in the followed keys.
fn read(prefix: &str, view: &Followed) -> (Vec<InstanceRecord>, Loads) {
    let services = registry::services_prefix(prefix);
    let loads = load_prefix(prefix);
    let mut records = Vec::new();
    let mut reports = HashMap::new();
    for (key, value) in &view.values {
        if key.starts_with(&services) {
            records.extend(InstanceRecord::decode(value));
        } else if let Some((s, i)) = signals::parse_key(&loads, key) {
            reports.extend(LoadReport::decode(value).map(|l| ((s.to_string(), i.to_string()), l)));
        }
    }
    (records, reports)
}
