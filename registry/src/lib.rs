//! The service registry: which instances of which service exist, where
//! they are and what they can take.
//!
//! etcd is the source of truth for membership, but it is never in the data
//! path: registrants keep serving and retry when etcd is away, and watchers
//! keep their last view (marked stale) instead of emptying it.
//!
//! # Key layout
//!
//! Under a configurable prefix (default `/mesh/v1/`), one key per instance:
//!
//! ```text
//! {prefix}services/{service}/{instance_id}  ->  InstanceRecord as JSON, "schema": 1
//! ```
//!
//! Every key of a process is attached to that process's one lease (default
//! TTL 5 s, kept alive every TTL/3), so a killed process's instances vanish
//! when its lease expires, and a graceful stop revokes the lease so they
//! vanish at once.

pub mod backoff;
pub mod episode;
pub mod etcd;
mod memory;
mod record;
pub mod signals;
mod view;

use std::future::Future;
use std::sync::Arc;

pub use etcd::{Credentials, EtcdConfig, EtcdRegistry, Stats, TlsFiles};
pub use memory::MemoryRegistry;
pub use record::{InstanceRecord, SCHEMA_VERSION, services_prefix};
pub use signals::{LoadReport, Mode};
pub use view::{Change, View};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("etcd: {}", etcd::explain(.0))]
    Etcd(#[from] etcd_client::Error),
    #[error("invalid record: {0}")]
    InvalidRecord(String),
    /// A TLS or password file of the etcd connection.
    #[error("cannot read {path}: {error}")]
    Unreadable { path: String, error: std::io::Error },
    #[error("{0}")]
    Config(String),
    #[error("etcd did not answer within {0:?}")]
    Timeout(std::time::Duration),
    #[error("the registry has shut down")]
    Closed,
    /// The key is held by another process's lease: two hosts claim one
    /// instance id (their advertise address).
    #[error("{key} is held by another process (lease {lease:x}): does another host advertise this address?")]
    Claimed { key: String, lease: i64 },
}

/// Registration and discovery, implemented over etcd and in memory.
pub trait Registry: Send + Sync {
    /// Announces an instance under this process's lease. Returns once the
    /// record is queued: when etcd is away it is written when etcd returns.
    fn register(&self, record: InstanceRecord) -> impl Future<Output = Result<(), RegistryError>> + Send;

    /// Withdraws one instance of this process.
    fn deregister(&self, service: &str, instance_id: &str) -> impl Future<Output = Result<(), RegistryError>> + Send;

    /// The current view of all services; changes whenever it does.
    fn watch(&self) -> tokio::sync::watch::Receiver<Arc<View>>;

    /// Withdraws every instance of this process at once (revokes the lease).
    fn shutdown(&self) -> impl Future<Output = Result<(), RegistryError>> + Send;
}
