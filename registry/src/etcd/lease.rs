//! The registrar: one lease per process, kept alive at TTL/3, with every
//! record of the process attached. When the lease is lost (etcd down,
//! restarted, wiped) it grants a new one and writes the records again.
//! A loss is logged once, and the return once; the failed retries in
//! between are counted in [`super::Stats`] and summarised per interval.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, LeaseKeepAliveStream, LeaseKeeper, PutOptions};
use tokio::sync::{mpsc, oneshot, watch};

use super::{EtcdConfig, with_timeout};
use crate::backoff::Backoff;
use crate::episode::{Episode, SUMMARY_INTERVAL};
use crate::{InstanceRecord, RegistryError};

pub enum Command {
    Put(InstanceRecord),
    Delete(String, String),
    Shutdown(oneshot::Sender<()>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum RegistrarState {
    /// Not (or no longer) in etcd; the string says why.
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
    tokio::spawn(
        Registrar { config, desired: BTreeMap::new(), commands: rx, state: state_tx, outage: Episode::default() }.run(),
    );
    (tx, state_rx)
}

struct Registrar {
    config: Arc<EtcdConfig>,
    /// Records this process wants in etcd, by key.
    desired: BTreeMap<String, InstanceRecord>,
    commands: mpsc::UnboundedReceiver<Command>,
    state: watch::Sender<RegistrarState>,
    /// Failed attempts since the records were last in etcd.
    outage: Episode,
}

/// Why a session under one lease ended.
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
            let ended = match self.config.connect().await {
                Ok(client) => self.session(client, &mut backoff).await,
                Err(e) => Ended::Lost(e),
            };
            match ended {
                Ended::Shutdown(done) => return self.stopped(done),
                Ended::Lost(e) => self.lost(e),
            }
            // Wait out the backoff, still taking commands (they change what
            // is written once etcd is back).
            let sleep = tokio::time::sleep(backoff.next_delay());
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    cmd = self.commands.recv() => match cmd {
                        None => return self.stopped(None),
                        Some(Command::Shutdown(done)) => return self.stopped(Some(done)),
                        Some(cmd) => self.apply_offline(cmd),
                    }
                }
            }
        }
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
        let records = self.desired.len();
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
    }

    fn stopped(&self, done: Option<oneshot::Sender<()>>) {
        self.state.send_replace(RegistrarState::Stopped);
        if let Some(done) = done {
            let _ = done.send(());
        }
    }

    fn apply_offline(&mut self, cmd: Command) {
        match cmd {
            Command::Put(rec) => {
                self.desired.insert(rec.key(&self.config.prefix), rec);
            }
            Command::Delete(s, i) => {
                self.desired.remove(&crate::record::key(&self.config.prefix, &s, &i));
            }
            Command::Shutdown(_) => {}
        }
    }

    /// Grants a lease, writes every record under it and keeps it alive until
    /// it is lost or the process shuts down.
    async fn session(&mut self, mut client: Client, backoff: &mut Backoff) -> Ended {
        let limit = self.config.request_timeout;
        let ttl = self.config.lease_ttl.as_secs().max(1) as i64;
        let (lease, mut keeper, mut replies) = match self.grant(&mut client, ttl).await {
            Ok(granted) => granted,
            Err(e) => return Ended::Lost(e),
        };
        self.registered(lease);
        self.state.send_replace(RegistrarState::Registered { lease_id: lease });
        backoff.reset();
        let mut tick = tokio::time::interval(Duration::from_secs(ttl as u64).div_f64(3.0));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let alive = async {
                        keeper.keep_alive().await?;
                        match replies.message().await? {
                            Some(r) if r.ttl() > 0 => Ok(()),
                            _ => Err(etcd_client::Error::LeaseKeepAliveError("lease expired or revoked".into())),
                        }
                    };
                    if let Err(e) = with_timeout(limit, alive).await {
                        return Ended::Lost(e);
                    }
                }
                cmd = self.commands.recv() => {
                    let result = match cmd {
                        None | Some(Command::Shutdown(_)) => {
                            // Revoking removes every record of this process at once.
                            if let Err(e) = with_timeout(limit, client.lease_revoke(lease)).await {
                                tracing::warn!(error = %e, "registry: lease revoke failed; records expire with the TTL");
                            }
                            return Ended::Shutdown(match cmd {
                                Some(Command::Shutdown(done)) => Some(done),
                                _ => None,
                            });
                        }
                        Some(Command::Put(rec)) => {
                            let key = rec.key(&self.config.prefix);
                            let r = put(&mut client, limit, lease, &key, &rec).await;
                            self.desired.insert(key, rec);
                            r
                        }
                        Some(Command::Delete(s, i)) => {
                            let key = crate::record::key(&self.config.prefix, &s, &i);
                            self.desired.remove(&key);
                            with_timeout(limit, client.delete(key, None)).await.map(drop)
                        }
                    };
                    if let Err(e) = result {
                        return Ended::Lost(e);
                    }
                }
            }
        }
    }
}

impl Registrar {
    /// Grants a lease of `ttl` seconds, writes every record under it and
    /// opens its keep-alive stream.
    async fn grant(
        &self,
        client: &mut Client,
        ttl: i64,
    ) -> Result<(i64, LeaseKeeper, LeaseKeepAliveStream), RegistryError> {
        let limit = self.config.request_timeout;
        let lease = with_timeout(limit, client.lease_grant(ttl, None)).await?.id();
        for (key, rec) in &self.desired {
            put(client, limit, lease, key, rec).await?;
        }
        let (keeper, replies) = with_timeout(limit, client.lease_keep_alive(lease)).await?;
        Ok((lease, keeper, replies))
    }
}

async fn put(
    client: &mut Client,
    limit: Duration,
    lease: i64,
    key: &str,
    rec: &InstanceRecord,
) -> Result<(), RegistryError> {
    let opts = PutOptions::new().with_lease(lease);
    with_timeout(limit, client.put(key, rec.encode(), Some(opts))).await.map(drop)
}
