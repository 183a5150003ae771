//! Counts of the etcd loops' repeated events, for a process to export as
//! metrics: the logs say once when etcd goes and once when it is back, and
//! these say how often it broke in between.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Stats {
    watch_breaks: AtomicU64,
    reconnects: AtomicU64,
    registration_failures: AtomicU64,
}

impl Stats {
    /// Watch attempts that failed or broke: one per retry while etcd is down.
    pub fn watch_breaks(&self) -> u64 {
        self.watch_breaks.load(Ordering::Relaxed)
    }

    /// Watches set up again after a break.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// Registration attempts that failed and sessions whose lease was lost:
    /// one per retry while etcd is down.
    pub fn registration_failures(&self) -> u64 {
        self.registration_failures.load(Ordering::Relaxed)
    }

    pub(super) fn watch_broke(&self) {
        self.watch_breaks.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn reconnected(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn registration_failed(&self) {
        self.registration_failures.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::{EtcdConfig, EtcdRegistry, Registry};

    /// etcd that is not there: every attempt fails at once, and each one is
    /// counted (while the log says it once).
    #[tokio::test]
    async fn failed_attempts_are_counted() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut config = EtcdConfig::new(vec![format!("http://127.0.0.1:{port}")]);
        config.request_timeout = Duration::from_millis(500);
        config.backoff = (Duration::from_millis(1), Duration::from_millis(5));
        let registry = EtcdRegistry::start(config).unwrap();
        let view = registry.watch();
        let stats = registry.stats();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while stats.watch_breaks() < 5 || stats.registration_failures() < 5 {
            assert!(tokio::time::Instant::now() < deadline, "{stats:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(stats.reconnects(), 0);
        assert!(!view.borrow().etcd_reachable);
    }
}
