//! Following a few keys that are not instance records (a spare's standby
//! decision, the controller's view of loads): a read, then a watch from the
//! next revision; after any break, after a backoff, a fresh read. Unlike
//! the registry's watcher it does not resume from the last revision: its
//! users are one controller (the mesh's prefix) and each node's sidecar
//! (its one standby key), so a re-read after a break costs etcd one small
//! read per follower. While etcd is away the last values stay,
//! marked unreachable.

use std::collections::BTreeMap;
use std::sync::Arc;

use etcd_client::{EventType, GetOptions, WatchOptions};
use tokio::sync::watch;

use super::{EtcdConfig, with_timeout};
use crate::RegistryError;
use crate::backoff::Backoff;

/// The followed keys' values, as last seen.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Followed {
    pub values: BTreeMap<String, Vec<u8>>,
    /// Whether the watch is up (when false, `values` is the last view).
    pub reachable: bool,
}

/// What to follow: every key under a prefix, or exactly one key.
#[derive(Debug, Clone)]
pub enum Keys {
    Prefix(String),
    Exact(String),
}

impl Keys {
    fn key(&self) -> &str {
        match self {
            Self::Prefix(k) | Self::Exact(k) => k,
        }
    }

    fn get_options(&self) -> GetOptions {
        match self {
            Self::Prefix(_) => GetOptions::new().with_prefix(),
            Self::Exact(_) => GetOptions::new(),
        }
    }

    fn watch_options(&self, from: i64) -> WatchOptions {
        let opts = WatchOptions::new().with_start_revision(from).with_progress_notify();
        match self {
            Self::Prefix(_) => opts.with_prefix(),
            Self::Exact(_) => opts,
        }
    }
}

/// Follows `keys` in the background until every receiver is gone.
pub fn follow(config: Arc<EtcdConfig>, keys: Keys) -> watch::Receiver<Arc<Followed>> {
    let (tx, rx) = watch::channel(Arc::new(Followed::default()));
    tokio::spawn(async move {
        let (base, cap) = config.backoff;
        let mut backoff = Backoff::new(base, cap);
        while !tx.is_closed() {
            if let Err(e) = read_and_watch(&config, &keys, &tx, &mut backoff).await {
                tracing::debug!(key = keys.key(), error = %e, "following etcd keys: broken; retrying");
            }
            tx.send_if_modified(|f| std::mem::replace(&mut Arc::make_mut(f).reachable, false));
            tokio::time::sleep(backoff.next_delay()).await;
        }
    });
    rx
}

async fn read_and_watch(
    config: &EtcdConfig,
    keys: &Keys,
    tx: &watch::Sender<Arc<Followed>>,
    backoff: &mut Backoff,
) -> Result<(), RegistryError> {
    let mut client = config.connect().await?;
    let limit = config.request_timeout;
    let read = with_timeout(limit, client.get(keys.key(), Some(keys.get_options()))).await?;
    let values = read.kvs().iter().map(|kv| (String::from_utf8_lossy(kv.key()).into_owned(), kv.value().to_vec()));
    let next = Followed { values: values.collect(), reachable: true };
    tx.send_if_modified(|f| std::mem::replace(f, Arc::new(next.clone())).as_ref() != &next);
    let from = read.header().map_or(0, |h| h.revision()) + 1;
    let mut stream = with_timeout(limit, client.watch(keys.key(), Some(keys.watch_options(from)))).await?;
    backoff.reset();
    while let Some(resp) = stream.message().await? {
        if resp.compact_revision() > 0 || resp.canceled() {
            return Ok(()); // read again
        }
        let events: Vec<_> = resp.events().iter().filter_map(|e| Some((e.event_type(), e.kv()?))).collect();
        if events.is_empty() {
            continue;
        }
        tx.send_modify(|f| {
            let f = Arc::make_mut(f);
            for (kind, kv) in events {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                match kind {
                    EventType::Put => f.values.insert(key, kv.value().to_vec()),
                    EventType::Delete => f.values.remove(&key),
                };
            }
        });
    }
    Err(RegistryError::Closed)
}
