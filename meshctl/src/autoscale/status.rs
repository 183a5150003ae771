//! What the controller says about each service it scales, kept in etcd at
//! `{prefix}autoscale/services/{service}` (written with each decision) for
//! `meshctl status`, and carried over by the next leader.

use serde::{Deserialize, Serialize};

use super::policy::Action;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// The controller that made the last decision.
    pub leader: String,
    pub activations: u64,
    pub returns: u64,
    /// Scale-outs with no spare left (only the hook ran).
    pub hook_only: u64,
    /// `activate`, `return` or `hook`.
    pub last_action: String,
    pub last_instance: String,
    pub last_reason: String,
    pub last_at_ms: u64,
    pub utilisation: f64,
}

pub fn status_prefix(prefix: &str) -> String {
    format!("{prefix}autoscale/services/")
}

pub fn key(prefix: &str, service: &str) -> String {
    format!("{}{service}", status_prefix(prefix))
}

impl ServiceStatus {
    /// Counts `action` and makes it the last one.
    pub fn record(&mut self, action: &Action, why: &str, utilisation: f64, leader: &str) {
        let (name, instance, count) = match action {
            Action::Activate(i) => ("activate", i.as_str(), &mut self.activations),
            Action::Return(i) => ("return", i.as_str(), &mut self.returns),
            Action::HookOnly => ("hook", "", &mut self.hook_only),
        };
        *count += 1;
        self.last_action = name.into();
        self.last_instance = instance.into();
        self.last_reason = why.into();
        self.last_at_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        self.utilisation = utilisation;
        self.leader = leader.into();
    }

    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("statuses serialize")
    }

    pub fn decode(value: &[u8]) -> Option<Self> {
        serde_json::from_slice(value).ok()
    }
}
