//! The registrar: one lease per process, with every record of the process
//! attached. The lease is kept ([`keep`]) until etcd says it is gone
//! (expired, revoked, or the store wiped); only then is a new one granted
//! and every record written again. A slow or broken keep-alive is retried
//! while the lease lasts, never answered with a rewrite: every write fans
//! out to every watcher, and a fleet of 1,000 that re-registered on each
//! slow keep-alive never converged on 2 cores.
//!
//! A lost registration is logged once, and its return once; the failed
//! retries in between are counted in [`super::Stats`] and summarised per
//! interval.

mod keep;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, LeaseGrantOptions, PutOptions};
use tokio::sync::{mpsc, oneshot, watch};

use super::{EtcdConfig, claim, with_timeout};
use crate::backoff::Backoff;
use crate::episode::{Episode, SUMMARY_INTERVAL};
use crate::{InstanceRecord, RegistryError};
use keep::Held;

pub enum Command {
    Put(InstanceRecord),
    /// A plain value under the lease (a load report), by full key.
    Report(String, String),
    Delete(String, String),
    Shutdown(oneshot::Sender<()>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum RegistrarState {
    /// Not (or no longer surely) in etcd; the string says why.
    Disconnected(String),
    /// Records written under this lease.
    Registered {
        lease_id: i64,
    },
    Stopped,
}

pub fn spawn(config: Arc<EtcdConfig>) -> (mpsc::UnboundedSender<Command>, watch::Receiver<RegistrarState>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (state_tx, state_rx) = watch::channel(RegistrarState::Disconnected("starting".into()));
    let registrar = Registrar {
        config,
        desired: BTreeMap::new(),
        unwritten: BTreeSet::new(),
        deleted: BTreeSet::new(),
        next_lease: None,
        commands: rx,
        state: state_tx,
        outage: Episode::default(),
        link_trouble: Episode::default(),
    };
    tokio::spawn(registrar.run());
    (tx, state_rx)
}

struct Registrar {
    config: Arc<EtcdConfig>,
    /// What this process wants in etcd, by key.
    desired: BTreeMap<String, Entry>,
    /// Keys of `desired` not yet written under the current lease.
    unwritten: BTreeSet<String>,
    /// Keys withdrawn but not yet deleted from etcd.
    deleted: BTreeSet<String>,
    /// The id of a lease asked for but not yet known to be granted.
    next_lease: Option<i64>,
    commands: mpsc::UnboundedReceiver<Command>,
    state: watch::Sender<RegistrarState>,
    /// Failed attempts since the records were last surely in etcd.
    outage: Episode,
    /// Broken or slow keep-alives while the lease still holds.
    link_trouble: Episode,
}

/// One key this process keeps under its lease.
enum Entry {
    /// An instance record, claimed (never taken from another lease).
    Record(InstanceRecord),
    /// A value only this process writes (its load report), put as is.
    Plain(String),
}

/// Why the keeping of one lease ended.
enum Ended {
    Lost(RegistryError),
    /// Asked to stop (or every handle is gone): whom to tell when done.
    Shutdown(Option<oneshot::Sender<()>>),
}

impl Registrar {
    async fn run(mut self) {
        let (base, cap) = self.config.backoff;
        let mut backoff = Backoff::new(base, cap);
        loop {
            let ended = match self.grant().await {
                Ok(held) => {
                    backoff.reset();
                    self.keep(held, &mut backoff).await
                }
                Err(e) => Ended::Lost(e),
            };
            match ended {
                Ended::Shutdown(done) => return self.stopped(done),
                Ended::Lost(e) => self.lost(e),
            }
            if let Err(done) = self.pause(backoff.next_delay()).await {
                return self.stopped(done);
            }
        }
    }

    /// Waits out a backoff delay, still taking commands (they change what
    /// is written once etcd is back). `Err` when asked to stop.
    async fn pause(&mut self, delay: Duration) -> Result<(), Option<oneshot::Sender<()>>> {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => return Ok(()),
                cmd = self.commands.recv() => match cmd {
                    None => return Err(None),
                    Some(Command::Shutdown(done)) => return Err(Some(done)),
                    Some(cmd) => self.apply(cmd),
                }
            }
        }
    }

    /// Grants a lease, writes every record under it and opens its
    /// keep-alive stream.
    async fn grant(&mut self) -> Result<Held, RegistryError> {
        let limit = self.config.request_timeout;
        let ttl = Duration::from_secs(self.config.lease_ttl.as_secs().max(1));
        let mut client = self.config.connect().await?;
        let asked = tokio::time::Instant::now();
        // The id is chosen here and kept until the grant is answered, so a
        // grant retried after a timeout that etcd did carry out finds its
        // lease instead of leaving it behind and writing every record again.
        let id = *self.next_lease.get_or_insert_with(|| rand::random_range(1..i64::MAX));
        let opts = LeaseGrantOptions::new().with_id(id);
        match with_timeout(limit, client.lease_grant(ttl.as_secs() as i64, Some(opts))).await {
            Err(e) if !e.to_string().contains("lease already exists") => return Err(e),
            _ => self.next_lease = None,
        }
        // The new lease starts empty: every record goes under it, and what
        // was withdrawn went with the old one.
        self.unwritten = self.desired.keys().cloned().collect();
        self.deleted.clear();
        let flushed = self.flush(&mut client, id).await;
        // Kept whatever happens next: what failed is retried under it.
        let held = Held::open(client, id, ttl, asked, limit).await;
        match flushed {
            Ok(()) if held.linked() => self.registered(id),
            Ok(()) => self.lost(RegistryError::Timeout(limit)),
            Err(e) => self.lost(e),
        }
        Ok(held)
    }

    /// Records a command's effect on what should be in etcd.
    fn apply(&mut self, cmd: Command) {
        match cmd {
            Command::Put(rec) => {
                let key = rec.key(&self.config.prefix);
                self.deleted.remove(&key);
                self.unwritten.insert(key.clone());
                self.desired.insert(key, Entry::Record(rec));
            }
            Command::Report(key, value) => {
                if !matches!(self.desired.get(&key), Some(Entry::Plain(v)) if *v == value) {
                    self.unwritten.insert(key.clone());
                    self.desired.insert(key, Entry::Plain(value));
                }
            }
            Command::Delete(s, i) => {
                let key = crate::record::key(&self.config.prefix, &s, &i);
                self.desired.remove(&key);
                self.unwritten.remove(&key);
                self.deleted.insert(key);
            }
            Command::Shutdown(_) => {}
        }
    }

    /// Writes what changed since the last write under `lease`.
    async fn flush(&mut self, client: &mut Client, lease: i64) -> Result<(), RegistryError> {
        let limit = self.config.request_timeout;
        while let Some(key) = self.deleted.first().cloned() {
            with_timeout(limit, client.delete(key.as_str(), None)).await?;
            self.deleted.remove(&key);
        }
        while let Some(key) = self.unwritten.first().cloned() {
            match self.desired.get(&key) {
                Some(Entry::Record(rec)) => claim::claim(client, &key, rec, lease, limit).await?,
                Some(Entry::Plain(value)) => {
                    let opts = PutOptions::new().with_lease(lease);
                    with_timeout(limit, client.put(key.as_str(), value.as_str(), Some(opts))).await?;
                }
                None => {}
            }
            self.unwritten.remove(&key);
        }
        Ok(())
    }

    fn dirty(&self) -> bool {
        !self.unwritten.is_empty() || !self.deleted.is_empty()
    }

    fn is_registered(&self) -> bool {
        matches!(*self.state.borrow(), RegistrarState::Registered { .. })
    }

    /// Counts a failed attempt or a lost lease; logs the first of an
    /// outage and a summary per interval.
    fn lost(&mut self, e: RegistryError) {
        self.config.stats.registration_failed();
        let now = tokio::time::Instant::now().into_std();
        if self.outage.occur(now) {
            tracing::warn!(error = %e, "registry: not registered in etcd; retrying");
        } else if let Some(n) = self.outage.summary_due(now, SUMMARY_INTERVAL) {
            let all = self.outage.count();
            tracing::warn!(error = %e, "registry: still not registered in etcd ({n} failed attempts in the last {SUMMARY_INTERVAL:?}, {all} in all)");
        } else {
            tracing::debug!(error = %e, "registry: registration attempt failed");
        }
        self.state.send_replace(RegistrarState::Disconnected(e.to_string()));
    }

    fn registered(&mut self, lease: i64) {
        let records = self.desired.values().filter(|e| matches!(e, Entry::Record(_))).count();
        match self.outage.end(tokio::time::Instant::now().into_std()) {
            Some(ended) => {
                let after = format!("{:.1}s", ended.lasted.as_secs_f64());
                tracing::info!(
                    lease,
                    records,
                    "registry: registered in etcd again after {after} ({} failed attempts)",
                    ended.count
                );
            }
            None => tracing::info!(lease, records, "registry: registered in etcd"),
        }
        self.state.send_replace(RegistrarState::Registered { lease_id: lease });
    }

    fn stopped(&self, done: Option<oneshot::Sender<()>>) {
        self.state.send_replace(RegistrarState::Stopped);
        if let Some(done) = done {
            let _ = done.send(());
        }
    }
}
