//! The in-memory registry: the same trait, no etcd, for unit tests of the
//! crates that route on it. Clones share one store.

use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::watch;

use crate::{InstanceRecord, Registry, RegistryError, View};

#[derive(Clone)]
pub struct MemoryRegistry {
    view: Arc<watch::Sender<Arc<View>>>,
    /// Instances this handle registered (removed together by `shutdown`).
    mine: Arc<std::sync::Mutex<Vec<(String, String)>>>,
}

impl Default for MemoryRegistry {
    fn default() -> Self {
        let view = View { etcd_reachable: true, synced_at: Some(SystemTime::now()), ..Default::default() };
        Self { view: Arc::new(watch::channel(Arc::new(view)).0), mine: Default::default() }
    }
}

impl MemoryRegistry {
    /// Another registrant (its own `shutdown`) sharing this one's store.
    pub fn handle(&self) -> Self {
        Self { view: self.view.clone(), mine: Default::default() }
    }

    fn edit(&self, f: impl FnOnce(&mut View)) {
        self.view.send_modify(|v| {
            let mut next = (**v).clone();
            f(&mut next);
            next.synced_at = Some(SystemTime::now());
            *v = Arc::new(next);
        });
    }
}

impl Registry for MemoryRegistry {
    async fn register(&self, record: InstanceRecord) -> Result<(), RegistryError> {
        record.validate()?;
        let key = (record.service.clone(), record.instance_id.clone());
        self.mine.lock().unwrap_or_else(|p| p.into_inner()).push(key.clone());
        self.edit(|v| {
            v.instances.insert(key, record);
        });
        Ok(())
    }

    async fn deregister(&self, service: &str, instance_id: &str) -> Result<(), RegistryError> {
        let key = (service.to_string(), instance_id.to_string());
        self.mine.lock().unwrap_or_else(|p| p.into_inner()).retain(|k| *k != key);
        self.edit(|v| {
            v.instances.remove(&key);
        });
        Ok(())
    }

    fn watch(&self) -> watch::Receiver<Arc<View>> {
        self.view.subscribe()
    }

    async fn shutdown(&self) -> Result<(), RegistryError> {
        let mine = std::mem::take(&mut *self.mine.lock().unwrap_or_else(|p| p.into_inner()));
        self.edit(|v| mine.iter().for_each(|k| drop(v.instances.remove(k))));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn watchers_see_registrations_and_shutdowns_of_other_handles() {
        let reg = MemoryRegistry::default();
        let other = reg.handle();
        let mut rx = reg.watch();
        other.register(InstanceRecord::new("chat", "a", "h:1")).await.unwrap();
        reg.register(InstanceRecord::new("chat", "b", "h:2")).await.unwrap();
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow_and_update().service("chat").count(), 2);
        other.shutdown().await.unwrap();
        let ids: Vec<String> = rx.borrow().service("chat").map(|r| r.instance_id.clone()).collect();
        assert_eq!(ids, vec!["b"]);
        assert!(reg.register(InstanceRecord::new("", "x", "h:3")).await.is_err());
    }
}
