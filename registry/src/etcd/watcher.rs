//! The watcher: a full read of the prefix, then a watch from the next
//! revision. A broken watch resumes from the last revision seen (cheap for
//! etcd when a whole fleet reconnects), unless etcd's revision went
//! backwards (a wiped or restored store) or the revision was compacted
//! away: then it reads everything again and publishes the difference.
//! While etcd is unreachable the last view stays, marked
//! `etcd_reachable: false`; that is logged once when it starts, summarised
//! every [`SUMMARY_INTERVAL`], and logged once when etcd is back. Each
//! failed attempt is counted in [`super::Stats`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use etcd_client::{Client, Event, EventType, GetOptions, WatchOptions};
use tokio::sync::watch;

use super::{EtcdConfig, with_timeout};
use crate::backoff::Backoff;
use crate::episode::{Episode, SUMMARY_INTERVAL};
use crate::record::services_prefix;
use crate::{InstanceRecord, RegistryError, View};

pub fn spawn(config: Arc<EtcdConfig>) -> watch::Receiver<Arc<View>> {
    let (tx, rx) = watch::channel(Arc::new(View::default()));
    tokio::spawn(Watcher { config, view: tx, revision: None, outage: Episode::default() }.run());
    rx
}

struct Watcher {
    config: Arc<EtcdConfig>,
    view: watch::Sender<Arc<View>>,
    /// Last revision the view reflects; `None` means a full read is due.
    revision: Option<i64>,
    /// Failed attempts since etcd was last reachable.
    outage: Episode,
}

impl Watcher {
    async fn run(mut self) {
        let (base, cap) = self.config.backoff;
        let mut backoff = Backoff::new(base, cap);
        loop {
            if self.view.is_closed() {
                return; // nobody is watching any more
            }
            let result = match self.config.connect().await {
                Ok(client) => self.follow(client, &mut backoff).await,
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                self.broke(&e);
            }
            self.view.send_if_modified(|v| {
                let was = v.etcd_reachable;
                Arc::make_mut(v).etcd_reachable = false;
                was
            });
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    /// Reads (if due) and watches until the stream breaks.
    async fn follow(&mut self, mut client: Client, backoff: &mut Backoff) -> Result<(), RegistryError> {
        let prefix = services_prefix(&self.config.prefix);
        let limit = self.config.request_timeout;
        if let Some(seen) = self.revision {
            let probe = GetOptions::new().with_prefix().with_count_only();
            let now = with_timeout(limit, client.get(prefix.as_str(), Some(probe))).await?;
            if now.header().is_some_and(|h| h.revision() < seen) {
                tracing::info!(seen, "registry: etcd's revision went backwards; reading everything again");
                self.revision = None;
            }
        }
        if self.revision.is_none() {
            let resp = with_timeout(limit, client.get(prefix.as_str(), Some(GetOptions::new().with_prefix()))).await?;
            let instances = resp
                .kvs()
                .iter()
                .filter_map(|kv| InstanceRecord::decode(kv.value()))
                .map(|r| ((r.service.clone(), r.instance_id.clone()), r))
                .collect();
            self.revision = resp.header().map(|h| h.revision());
            self.publish(instances);
        }
        let from = self.revision.unwrap_or(0) + 1;
        let opts = WatchOptions::new().with_prefix().with_start_revision(from).with_progress_notify();
        let mut stream = with_timeout(limit, client.watch(prefix.as_str(), Some(opts))).await?;
        self.mark_reachable();
        self.back();
        backoff.reset();
        while let Some(resp) = stream.message().await? {
            if resp.compact_revision() > 0 || resp.canceled() {
                tracing::info!(
                    compacted = resp.compact_revision(),
                    "registry: watch revision gone; reading everything again"
                );
                self.revision = None;
                return Ok(());
            }
            self.apply(&prefix, resp.events());
            if let Some(h) = resp.header() {
                self.revision = Some(h.revision());
            }
        }
        Err(RegistryError::Closed)
    }

    /// Counts a failed or broken attempt; logs only the first of an outage
    /// and a summary per interval.
    fn broke(&mut self, e: &RegistryError) {
        self.config.stats.watch_broke();
        let now = tokio::time::Instant::now().into_std();
        if self.outage.occur(now) {
            let what = match e.is_refusal() {
                true => "etcd refused this client (its certificate, user or role)",
                false => "etcd unreachable",
            };
            tracing::warn!(error = %e, "registry: {what}; keeping the last view");
        } else if let Some(n) = self.outage.summary_due(now, SUMMARY_INTERVAL) {
            let all = self.outage.count();
            tracing::warn!(error = %e, "registry: etcd still unreachable ({n} failed attempts in the last {SUMMARY_INTERVAL:?}, {all} in all)");
        } else {
            tracing::debug!(error = %e, "registry: etcd attempt failed");
        }
    }

    /// Ends an outage, if one was on, with one line.
    fn back(&mut self) {
        let now = tokio::time::Instant::now().into_std();
        if let Some(ended) = self.outage.end(now) {
            self.config.stats.reconnected();
            let after = format!("{:.1}s", ended.lasted.as_secs_f64());
            tracing::info!(
                attempts = ended.count,
                "registry: etcd reachable again after {after} ({} failed attempts)",
                ended.count
            );
        }
    }

    /// Applies one watch response's events to the view in place: the cost
    /// is the events', not the fleet's (a copy of the whole view per update
    /// made 1,000 watchers of 1,000 members quadratic). In place means no
    /// copy only while no receiver holds on to the previous `Arc<View>`;
    /// one that does gets a copy made once per response, not per event.
    fn apply(&self, prefix: &str, events: &[Event]) {
        let changes: Vec<((String, String), Option<InstanceRecord>)> = events
            .iter()
            .filter_map(|event| {
                let kv = event.kv()?;
                let key = parse_key(prefix, kv.key())?;
                let rec = match event.event_type() {
                    EventType::Put => InstanceRecord::decode(kv.value()),
                    EventType::Delete => None,
                };
                Some((key, rec))
            })
            .collect();
        if changes.is_empty() {
            return;
        }
        self.view.send_if_modified(|v| {
            let view = Arc::make_mut(v);
            view.synced_at = Some(SystemTime::now());
            let mut changed = false;
            for (key, rec) in changes {
                changed |= match rec {
                    Some(rec) if view.instances.get(&key) == Some(&rec) => false,
                    Some(rec) => {
                        view.instances.insert(key, rec);
                        true
                    }
                    None => view.instances.remove(&key).is_some(),
                };
            }
            changed
        });
    }

    fn publish(&self, instances: BTreeMap<(String, String), InstanceRecord>) {
        self.view.send_if_modified(|v| {
            let next = View { instances, etcd_reachable: true, synced_at: Some(SystemTime::now()) };
            let changed = next.instances != v.instances || !v.etcd_reachable;
            *v = Arc::new(next);
            changed
        });
    }

    fn mark_reachable(&self) {
        self.view.send_if_modified(|v| {
            let was = v.etcd_reachable;
            let v = Arc::make_mut(v);
            v.etcd_reachable = true;
            v.synced_at = Some(SystemTime::now());
            !was
        });
    }
}

/// `{prefix}{service}/{instance}` -> (service, instance).
fn parse_key(prefix: &str, key: &[u8]) -> Option<(String, String)> {
    let rest = std::str::from_utf8(key).ok()?.strip_prefix(prefix)?;
    let (service, id) = rest.split_once('/')?;
    Some((service.to_string(), id.to_string()))
}
