//! What node sidecars and the autoscale controller tell each other through
//! etcd beside the instance records, each under its own key so that no
//! sidecar's routing watch wakes for them:
//!
//! ```text
//! {prefix}load/{service}/{instance}     ->  LoadReport as JSON, under the node sidecar's lease
//! {prefix}standby/{service}/{instance}  ->  "active" | "standby", no lease
//! ```
//!
//! A load report is written when the load changes (at most once per
//! `node.load_report_interval_ms`), never while it holds still, and leaves
//! with its sidecar's lease. A standby decision has no lease: it outlives
//! the controller (or operator) that made it, so a controller restarting in
//! a peak does not hand its capacity back; the controller deletes the
//! decisions of instances that left the registry.

use serde::{Deserialize, Serialize};

/// One instance's load as its sidecar sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadReport {
    /// Streams at the node now.
    pub running: u32,
    /// Calls waiting in the sidecar's bulkhead for a stream slot.
    pub queued: u32,
    /// Sequences the node decodes at once.
    pub max_running: u32,
}

impl LoadReport {
    /// Demand over capacity: (running + queued) / max_running; over 1 when
    /// calls queue.
    pub fn utilisation(&self) -> f64 {
        f64::from(self.running + self.queued) / f64::from(self.max_running.max(1))
    }

    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("load reports serialize")
    }

    pub fn decode(value: &[u8]) -> Option<Self> {
        serde_json::from_slice(value).ok()
    }
}

/// Whether a spare instance serves or waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Active,
    Standby,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Standby => "standby",
        }
    }

    pub fn decode(value: &[u8]) -> Option<Self> {
        match value {
            b"active" => Some(Self::Active),
            b"standby" => Some(Self::Standby),
            _ => None,
        }
    }
}

pub fn load_prefix(prefix: &str) -> String {
    format!("{prefix}load/")
}

pub fn load_key(prefix: &str, service: &str, instance_id: &str) -> String {
    format!("{prefix}load/{service}/{instance_id}")
}

pub fn mode_prefix(prefix: &str) -> String {
    format!("{prefix}standby/")
}

pub fn mode_key(prefix: &str, service: &str, instance_id: &str) -> String {
    format!("{prefix}standby/{service}/{instance_id}")
}

/// `{prefix}{kind}/{service}/{instance}` -> (service, instance).
pub fn parse_key<'a>(kind_prefix: &str, key: &'a str) -> Option<(&'a str, &'a str)> {
    key.strip_prefix(kind_prefix)?.split_once('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_and_modes_round_trip_and_keys_parse() {
        let r = LoadReport { running: 6, queued: 3, max_running: 8 };
        assert_eq!(LoadReport::decode(r.encode().as_bytes()), Some(r));
        assert!((r.utilisation() - 9.0 / 8.0).abs() < 1e-9);
        assert_eq!(Mode::decode(Mode::Standby.as_str().as_bytes()), Some(Mode::Standby));
        assert_eq!(Mode::decode(b"asleep"), None);
        let key = load_key("/mesh/v1/", "chat", "10.0.0.1:7101");
        assert_eq!(parse_key(&load_prefix("/mesh/v1/"), &key), Some(("chat", "10.0.0.1:7101")));
        assert_eq!(mode_key("/m/", "chat", "a"), "/m/standby/chat/a");
    }
}
