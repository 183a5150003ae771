//! The etcd registry: one lease-keeping registrar and one watcher per
//! process, both background tasks that outlive any etcd outage.

pub mod auth;
mod claim;
mod connection;
mod follow;
mod lease;
mod stats;
mod watcher;

use std::sync::Arc;
use std::time::Duration;

pub use etcd_client::{Client, GetOptions};
use tokio::sync::{mpsc, oneshot, watch};

use crate::{InstanceRecord, Registry, RegistryError, View};
pub(crate) use connection::explain;
pub use connection::{Credentials, TlsFiles};
pub use follow::{Followed, Keys, follow};
use lease::Command;
pub use lease::RegistrarState;
pub use stats::Stats;

#[derive(Debug, Clone)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    /// Key prefix of the whole mesh (default `/mesh/v1/`).
    pub prefix: String,
    pub lease_ttl: Duration,
    pub tls: Option<TlsFiles>,
    pub credentials: Option<Credentials>,
    /// Longest wait for one etcd call before it counts as a failure.
    pub request_timeout: Duration,
    /// Backoff between reconnection attempts: base and cap.
    pub backoff: (Duration, Duration),
    /// HTTP/2 keep-alive ping interval on the etcd connection. etcd closes
    /// (GOAWAY `too_many_pings`) a connection that pings more often than
    /// its `--grpc-keepalive-min-time` (5 s by default), which breaks every
    /// watch on it; so this stays above that.
    pub keep_alive_interval: Duration,
    /// Where the registrar and the watcher count breaks and reconnects;
    /// pass one in to export it (see [`EtcdConfig::with_stats`]).
    pub stats: Arc<Stats>,
}

/// Default [`EtcdConfig::keep_alive_interval`]: twice etcd's default
/// `--grpc-keepalive-min-time`. A dead etcd is still noticed within this
/// plus `request_timeout`, and the watch's progress notifications.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);

impl EtcdConfig {
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            prefix: "/mesh/v1/".into(),
            lease_ttl: Duration::from_secs(5),
            tls: None,
            credentials: None,
            request_timeout: Duration::from_secs(3),
            backoff: (Duration::from_millis(100), Duration::from_secs(3)),
            keep_alive_interval: KEEP_ALIVE_INTERVAL,
            stats: Arc::default(),
        }
    }

    /// Counts into `stats`, which a metrics exporter may already hold.
    pub fn with_stats(mut self, stats: Arc<Stats>) -> Self {
        self.stats = stats;
        self
    }

    /// A fresh client on one member that answers (a read of the prefix
    /// within `request_timeout`), or the last member's error. Members are
    /// tried in turn from a random one, so a fleet spreads over the
    /// cluster; a client fails over by reconnecting, which the registrar
    /// and the watcher do after any error. (etcd-client's own balancing
    /// over all endpoints keeps sending calls to a dead member: with one
    /// member of three down, a third of the calls failed.)
    pub async fn connect(&self) -> Result<Client, RegistryError> {
        let opts = self.options()?;
        let n = self.endpoints.len().max(1);
        let first = rand::random_range(0..n);
        let mut last = RegistryError::Config("etcd.endpoints: none".into());
        for endpoint in self.endpoints.iter().cycle().skip(first).take(self.endpoints.len()) {
            let answered = with_timeout(self.request_timeout, async {
                let mut client = Client::connect([endpoint], Some(opts.clone())).await?;
                let probe = etcd_client::GetOptions::new().with_keys_only().with_limit(1);
                client.get(self.prefix.as_str(), Some(probe)).await?;
                Ok(client)
            });
            match answered.await {
                Ok(client) => return Ok(client),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

async fn with_timeout<T>(
    limit: Duration,
    call: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, RegistryError> {
    match tokio::time::timeout(limit, call).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(RegistryError::Timeout(limit)),
    }
}

/// Registers this process's instances in etcd and watches everyone's.
#[derive(Clone)]
pub struct EtcdRegistry {
    commands: mpsc::UnboundedSender<Command>,
    view: watch::Receiver<Arc<View>>,
    state: watch::Receiver<RegistrarState>,
    stats: Arc<Stats>,
    prefix: String,
}

impl EtcdRegistry {
    /// Starts the registrar and the watcher. Never fails because etcd is
    /// away: both keep retrying in the background.
    pub fn start(config: EtcdConfig) -> Result<Self, RegistryError> {
        config.options()?; // unreadable TLS or password files are configuration errors, found now
        let config = Arc::new(config);
        let (stats, prefix) = (config.stats.clone(), config.prefix.clone());
        let (commands, state) = lease::spawn(config.clone());
        let view = watcher::spawn(config);
        Ok(Self { commands, view, state, stats, prefix })
    }

    /// How often the watch broke and came back, and registration was lost.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Whether this process's records are in etcd now.
    pub fn registrar_state(&self) -> watch::Receiver<RegistrarState> {
        self.state.clone()
    }

    /// Keeps this instance's load report under the lease (written when it
    /// changes; rewritten under a new lease, gone with the lease).
    pub fn report_load(&self, service: &str, instance_id: &str, load: crate::LoadReport) -> Result<(), RegistryError> {
        let key = crate::signals::load_key(&self.prefix, service, instance_id);
        self.send(Command::Report(key, load.encode()))
    }

    fn send(&self, cmd: Command) -> Result<(), RegistryError> {
        self.commands.send(cmd).map_err(|_| RegistryError::Closed)
    }
}

impl Registry for EtcdRegistry {
    async fn register(&self, record: InstanceRecord) -> Result<(), RegistryError> {
        record.validate()?;
        self.send(Command::Put(record))
    }

    async fn deregister(&self, service: &str, instance_id: &str) -> Result<(), RegistryError> {
        self.send(Command::Delete(service.into(), instance_id.into()))
    }

    fn watch(&self) -> watch::Receiver<Arc<View>> {
        self.view.clone()
    }

    async fn shutdown(&self) -> Result<(), RegistryError> {
        let (done, wait) = oneshot::channel();
        self.send(Command::Shutdown(done))?;
        wait.await.map_err(|_| RegistryError::Closed)
    }
}

/// Every record under the prefix, read once (for `meshctl status`).
pub async fn fetch_all(config: &EtcdConfig) -> Result<Vec<InstanceRecord>, RegistryError> {
    let mut client = config.connect().await?;
    let prefix = crate::record::services_prefix(&config.prefix);
    let opts = etcd_client::GetOptions::new().with_prefix();
    let resp = with_timeout(config.request_timeout, client.get(prefix, Some(opts))).await?;
    Ok(resp.kvs().iter().filter_map(|kv| InstanceRecord::decode(kv.value())).collect())
}
