//! `[[routing.overflow]]`: which service takes a call its primary cannot
//! take in time, and whose calls may be degraded to it (`outbound::overflow`).
//!
//! A rule belongs to the routing of the sidecar the call enters by, not to
//! `[[services]]` (the bulkheads of the node this sidecar fronts): a client
//! sidecar fronts no node but is where the refusal is seen.

use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, invalid};

/// A priority a rule may degrade. HIGH is accepted by the parser only to be
/// refused with a clear error: high-priority calls are never degraded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Degradable {
    Low,
    Normal,
    High,
}

#[derive(Debug, Clone, Deserialize)]
pub struct OverflowRule {
    /// The primary service, as callers name it.
    pub service: String,
    /// The service that takes the primary's refused calls.
    pub to: String,
    /// Priorities whose calls may be degraded (an unset priority counts as
    /// normal); by default low and normal.
    #[serde(default = "default_priorities")]
    pub priorities: Vec<Degradable>,
    /// Tenants whose calls are refused rather than degraded.
    #[serde(default)]
    pub tenants_never: Vec<String>,
    /// The longest a call that may be degraded waits in a primary
    /// instance's queue before it goes to `to` instead (told to the
    /// primary's sidecars as `x-mesh-max-queue-wait-ms`); calls that may
    /// not be degraded wait as long as the primary's bulkhead allows.
    #[serde(default = "default_queue_wait", with = "humantime_serde")]
    pub queue_wait: Duration,
}

fn default_priorities() -> Vec<Degradable> {
    vec![Degradable::Low, Degradable::Normal]
}

/// 50 ms: a degraded answer that starts now beats a primary's that starts
/// after a queue; about the unloaded TTFT of a small model, so an
/// overflowed call's first token comes within ~2x of an unloaded one's.
fn default_queue_wait() -> Duration {
    Duration::from_millis(50)
}

/// Checks every rule, naming the key at fault.
pub(super) fn validate(rules: &[OverflowRule]) -> Result<(), ConfigError> {
    for (i, rule) in rules.iter().enumerate() {
        let key = |k: &str| format!("routing.overflow[{i}].{k}");
        if rule.service.is_empty() || rule.to.is_empty() {
            return Err(invalid(key("service"), "service and to must both name a service"));
        }
        if rule.to == rule.service {
            return Err(invalid(key("to"), "must name a service other than the primary"));
        }
        if rules[..i].iter().any(|r| r.service == rule.service) {
            return Err(invalid(key("service"), format!("{:?} already has an overflow rule", rule.service)));
        }
        if rule.priorities.contains(&Degradable::High) {
            return Err(invalid(key("priorities"), "high-priority calls are never degraded (use low, normal)"));
        }
    }
    Ok(())
}
