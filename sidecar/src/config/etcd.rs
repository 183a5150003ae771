//! `[etcd]`: the registry this sidecar registers in and watches.

use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, invalid};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdSection {
    pub endpoints: Vec<String>,
    #[serde(default = "default_prefix")]
    pub prefix: String,
    #[serde(default = "default_ttl", with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// HTTP/2 keep-alive pings to etcd; keep it above etcd's
    /// `--grpc-keepalive-min-time` or etcd closes the connection.
    #[serde(default = "default_keep_alive", with = "humantime_serde")]
    pub keep_alive_interval: Duration,
}

fn default_keep_alive() -> Duration {
    registry::etcd::KEEP_ALIVE_INTERVAL
}

fn default_prefix() -> String {
    "/mesh/v1/".into()
}

fn default_ttl() -> Duration {
    Duration::from_secs(5)
}

impl EtcdSection {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.endpoints.is_empty() {
            return Err(invalid("etcd.endpoints", "needs at least one endpoint"));
        }
        if self.lease_ttl < Duration::from_secs(1) {
            return Err(invalid("etcd.lease_ttl", "must be at least 1s"));
        }
        Ok(())
    }

    /// The registry's connection settings.
    pub fn registry(&self) -> registry::EtcdConfig {
        let mut c = registry::EtcdConfig::new(self.endpoints.clone());
        c.prefix = self.prefix.clone();
        c.lease_ttl = self.lease_ttl;
        c.keep_alive_interval = self.keep_alive_interval;
        c
    }
}
