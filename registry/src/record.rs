//! What the registry stores per instance: what routing needs to know.

use serde::{Deserialize, Serialize};

use crate::RegistryError;

/// Version of the record's JSON shape; readers skip records of other versions.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub schema: u32,
    /// Unique within its service (e.g. `host:port`).
    pub instance_id: String,
    /// The service (model) it serves.
    pub service: String,
    /// Where callers send requests (`host:port`).
    pub address: String,
    pub host: String,
    #[serde(default)]
    pub zone: String,
    /// Sequences it decodes at once.
    pub max_running: u32,
    pub context_length: u32,
    /// KV-cache tokens the node holds at most (its `max_kv_tokens`), which
    /// bounds its prefix cache; 0 when not known.
    #[serde(default)]
    pub kv_tokens: u64,
    #[serde(default)]
    pub version: String,
    /// Relative share of traffic (1 is normal).
    pub weight: u32,
    /// Start of the registering process, Unix milliseconds.
    pub started_at_ms: u64,
    /// Registered but not routed to: warm capacity waiting for the
    /// autoscale controller (or an operator) to activate it.
    #[serde(default)]
    pub standby: bool,
    /// Configured as standby capacity (`[node] standby = true`): the
    /// controller may activate it and return it to standby; other
    /// instances it never touches.
    #[serde(default)]
    pub spare: bool,
}

impl InstanceRecord {
    /// A record for `service` at `address`, with defaults for the rest.
    pub fn new(service: impl Into<String>, instance_id: impl Into<String>, address: impl Into<String>) -> Self {
        let started_at_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        Self {
            schema: SCHEMA_VERSION,
            instance_id: instance_id.into(),
            service: service.into(),
            address: address.into(),
            host: String::new(),
            zone: String::new(),
            max_running: 1,
            context_length: 0,
            kv_tokens: 0,
            version: String::new(),
            weight: 1,
            started_at_ms,
            standby: false,
            spare: false,
        }
    }

    /// Names become key segments: no empty names, no `/`.
    pub fn validate(&self) -> Result<(), RegistryError> {
        for (field, value) in [("service", &self.service), ("instance_id", &self.instance_id)] {
            if value.is_empty() || value.contains('/') {
                return Err(RegistryError::InvalidRecord(format!("{field} {value:?} must be non-empty without '/'")));
            }
        }
        if self.address.is_empty() {
            return Err(RegistryError::InvalidRecord("address must not be empty".into()));
        }
        if self.weight == 0 {
            return Err(RegistryError::InvalidRecord("weight must be at least 1".into()));
        }
        Ok(())
    }

    pub fn key(&self, prefix: &str) -> String {
        key(prefix, &self.service, &self.instance_id)
    }

    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("records serialize")
    }

    /// Decodes a stored value; `None` for another schema or garbage (a
    /// newer writer's record is skipped, not misread).
    pub fn decode(value: &[u8]) -> Option<Self> {
        let rec: Self = serde_json::from_slice(value).ok()?;
        (rec.schema == SCHEMA_VERSION).then_some(rec)
    }
}

pub fn key(prefix: &str, service: &str, instance_id: &str) -> String {
    format!("{prefix}services/{service}/{instance_id}")
}

pub fn services_prefix(prefix: &str) -> String {
    format!("{prefix}services/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_other_schemas_are_skipped() {
        let rec = InstanceRecord::new("chat", "h1:7000", "10.0.0.1:7000");
        assert_eq!(InstanceRecord::decode(rec.encode().as_bytes()), Some(rec.clone()));
        let newer = rec.encode().replace("\"schema\":1", "\"schema\":2");
        assert_eq!(InstanceRecord::decode(newer.as_bytes()), None);
        assert_eq!(InstanceRecord::decode(b"not json"), None);
        assert_eq!(rec.key("/mesh/v1/"), "/mesh/v1/services/chat/h1:7000");
    }

    #[test]
    fn names_with_slashes_are_refused() {
        let rec = InstanceRecord::new("a/b", "i", "x:1");
        assert!(rec.validate().unwrap_err().to_string().contains("service \"a/b\""));
    }
}
