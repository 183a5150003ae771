//! This node's part in the autoscale policy: its load, reported to etcd for
//! the controller (`meshctl autoscale`), and whether it is routed to, which
//! follows the standby decision in etcd (`registry::signals`), written by
//! the controller for a spare or by an operator (`meshctl standby`) for any
//! instance; without a decision, `[node] standby` holds.

use std::sync::Arc;
use std::time::Duration;

use registry::etcd::{Keys, follow};
use registry::signals::mode_key;
use registry::{EtcdConfig, EtcdRegistry, InstanceRecord, LoadReport, Mode, Registry};

use super::bulkhead::Bulkhead;

/// Starts both tasks for the registered `record`; they end with the
/// registry (on shutdown).
pub fn spawn(
    config: EtcdConfig,
    registry: &EtcdRegistry,
    record: &InstanceRecord,
    bulkhead: Arc<Bulkhead>,
    every: Duration,
) {
    if !every.is_zero() {
        tokio::spawn(report_load(registry.clone(), record.clone(), bulkhead, every));
    }
    tokio::spawn(follow_decision(config, registry.clone(), record.clone()));
}

/// Hands the registrar the node's load every `every`; it writes only what
/// changed.
async fn report_load(registry: EtcdRegistry, record: InstanceRecord, bulkhead: Arc<Bulkhead>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let load = LoadReport {
            running: count(bulkhead.in_use()),
            queued: count(bulkhead.queued()),
            max_running: record.max_running,
        };
        if registry.report_load(&record.service, &record.instance_id, load).is_err() {
            return; // the registry shut down
        }
    }
}

/// Registers the record again whenever the decision changes whether it is
/// routed to.
async fn follow_decision(config: EtcdConfig, registry: EtcdRegistry, mut record: InstanceRecord) {
    let key = mode_key(&config.prefix, &record.service, &record.instance_id);
    let configured = if record.spare { Mode::Standby } else { Mode::Active };
    let mut decisions = follow(Arc::new(config), Keys::Exact(key.clone()));
    loop {
        let value = decisions.borrow_and_update().values.get(&key).cloned();
        let mode = value.as_deref().map_or(Some(configured), Mode::decode).unwrap_or_else(|| {
            tracing::warn!(%key, value = %String::from_utf8_lossy(value.as_deref().unwrap_or_default()), "standby decision is neither \"active\" nor \"standby\"; keeping the configured mode");
            configured
        });
        let standby = mode == Mode::Standby;
        if standby != record.standby {
            record.standby = standby;
            let why = if value.is_some() { "decided in etcd" } else { "as configured" };
            tracing::info!(service = %record.service, instance = %record.instance_id, "{} ({why})", match standby {
                true => "standby: not routed to",
                false => "active: routed to",
            });
            if registry.register(record.clone()).await.is_err() {
                return;
            }
        }
        if decisions.changed().await.is_err() {
            return;
        }
    }
}
