//! Overflow: a call its primary service cannot take in time goes to a
//! smaller service (`[[routing.overflow]]`) instead of being refused, if
//! its priority and tenant may be degraded, its key may use that service
//! and that service takes it before the caller's deadline.
//!
//! The primary always gets the call first, through the rest of the stack
//! (cache, slot, route with its retries), so a call the primary can serve
//! in time is never degraded. Only a refusal that says "the primary cannot
//! take this now" overflows: RESOURCE_EXHAUSTED (bulkheads, queues or this
//! sidecar's stream slots full), UNAVAILABLE (no healthy instance) and
//! DEADLINE_EXCEEDED while the deadline is still ahead (the queue would
//! outlast it). A refusal comes back before any token was sent (a failure
//! mid-stream ends the stream instead), so the caller never sees two
//! models in one answer. Never on a client's error, an unknown service, a
//! request that broke the engine or a tenant over its rate limit.
//!
//! Every reply says which service served it ([`md::SERVED_BY`]), and the
//! node names its model on the last message.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use mesh_proto::metadata as md;
use mesh_proto::v1::Priority;
use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

use super::authenticate::ApiKeys;
use crate::config::{Degradable, OverflowRule};
use crate::metrics::{OverflowLabels, SidecarMetrics};
use crate::stack::{Call, Next, Reply, Step, pass};

pub struct Overflow {
    rules: HashMap<String, Rule>,
    /// The overflow service must be one the caller's key may use.
    keys: ApiKeys,
    metrics: SidecarMetrics,
}

struct Rule {
    to: String,
    queue_wait: Duration,
    priorities: Vec<Degradable>,
    tenants_never: HashSet<String>,
}

impl Overflow {
    pub fn new(rules: &[OverflowRule], keys: ApiKeys, metrics: SidecarMetrics) -> Self {
        let rule = |r: &OverflowRule| Rule {
            to: r.to.clone(),
            queue_wait: r.queue_wait,
            priorities: r.priorities.clone(),
            tenants_never: r.tenants_never.iter().cloned().collect(),
        };
        Self { rules: rules.iter().map(|r| (r.service.clone(), rule(r))).collect(), keys, metrics }
    }

    /// The copy of `call` for its overflow service, if it may be degraded,
    /// and how long the call may queue at the primary. Made before the
    /// primary sees the call, which takes it: a clone of the request, paid
    /// only by calls that could overflow.
    fn spare(&self, call: &Call) -> Option<(Call, Duration)> {
        let rule = self.rules.get(&call.req.model)?;
        let priority = match Priority::try_from(call.req.priority).unwrap_or(Priority::Unspecified) {
            Priority::Low => Degradable::Low,
            Priority::Unspecified | Priority::Normal => Degradable::Normal,
            Priority::High => return None,
        };
        if !rule.priorities.contains(&priority) || rule.tenants_never.contains(&call.req.tenant) {
            return None;
        }
        let spare = call.redirected(&rule.to);
        self.keys.check(&spare.metadata, &spare.req).is_ok().then_some((spare, rule.queue_wait))
    }
}

impl Step for Overflow {
    async fn call(&self, mut call: Call, next: Next) -> Result<Reply, Status> {
        let spare = self.spare(&call).map(|(spare, wait)| {
            // Rather than queue long at the primary, go where it starts now.
            let wait = call.queue_wait().map_or(wait, |asked| asked.min(wait));
            call.metadata.insert(md::MAX_QUEUE_WAIT_MS, MetadataValue::from(wait.as_millis() as u64));
            spare
        });
        let primary = call.req.model.clone();
        let refused = match pass(next.clone(), call).await {
            Ok(reply) => return Ok(served_by(reply, &primary)),
            Err(status) => status,
        };
        let Some((spare, reason)) = spare.and_then(|s| reason(&refused, s.deadline).map(|r| (s, r))) else {
            return Err(refused);
        };
        let to = spare.req.model.clone();
        match pass(next, spare).await {
            Ok(reply) => {
                tracing::debug!(service = %primary, %to, reason, "call overflowed");
                let labels = OverflowLabels { service: primary, reason };
                self.metrics.overflowed.get_or_create(&labels).inc();
                Ok(served_by(reply, &to))
            }
            Err(also) => {
                let message = format!("{}; overflow to {to:?} refused too: {}", refused.message(), also.message());
                Err(Status::with_metadata(refused.code(), message, refused.metadata().clone()))
            }
        }
    }
}

/// Why the primary's refusal lets the call overflow, as a metric label;
/// `None` when it does not, or when the deadline has passed already.
fn reason(refused: &Status, deadline: Option<Instant>) -> Option<&'static str> {
    let meta = refused.metadata();
    let late = deadline.is_some_and(|d| d <= Instant::now());
    if late || meta.contains_key(md::REQUEST_FAULT) || meta.contains_key(md::TENANT_LIMITED) {
        return None;
    }
    match refused.code() {
        Code::ResourceExhausted => Some("full"),
        Code::Unavailable => Some("unavailable"),
        Code::DeadlineExceeded if deadline.is_some() => Some("deadline"),
        _ => None,
    }
}

fn served_by(mut reply: Reply, service: &str) -> Reply {
    if let Ok(v) = MetadataValue::try_from(service) {
        reply.metadata.insert(md::SERVED_BY, v);
    }
    reply
}

#[cfg(test)]
mod tests;
