//! Admission as a layer: the service's bulkhead admits the call, queues it
//! (highest priority first) or refuses it fast — with a retry-after, or
//! with DEADLINE_EXCEEDED at once when the queue ahead would outlast the
//! caller's deadline. The slot is held until the stream ends.

use std::sync::Arc;

use mesh_proto::metadata as md;
use mesh_proto::v1::Priority;
use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

use super::bulkhead::{Bulkhead, Permit, Refusal};
use crate::metrics::SidecarMetrics;
use crate::stack::{Call, Next, Reply, Step, Watch, pass, retry_later};

pub struct Admission {
    pub service: String,
    pub bulkhead: Arc<Bulkhead>,
    pub metrics: SidecarMetrics,
}

impl Admission {
    fn export_queue(&self) {
        let depth = self.bulkhead.queued() as i64;
        self.metrics.queue_depth.get_or_create(&self.metrics.service(&self.service)).set(depth);
    }

    async fn admit(&self, call: &Call) -> Result<Permit, Status> {
        let span = tracing::info_span!(
            parent: &call.span,
            "sidecar.admit",
            queue_wait_ms = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        self.export_queue();
        let acquired = self.bulkhead.acquire(priority(call.req.priority), call.deadline).await;
        self.export_queue();
        span.record("queue_wait_ms", call.received.elapsed().as_secs_f64() * 1e3);
        match acquired {
            Ok(permit) => {
                span.record("outcome", "admitted");
                Ok(permit)
            }
            Err(refusal) => {
                span.record("outcome", format!("{refusal:?}"));
                Err(refusal_status(&self.service, refusal))
            }
        }
    }
}

impl Step for Admission {
    async fn call(&self, call: Call, next: Next) -> Result<Reply, Status> {
        let permit = self.admit(&call).await?;
        let mut reply = pass(next, call).await?;
        let queued = MetadataValue::from(self.bulkhead.queued() as u64);
        reply.metadata.insert(md::SIDECAR_QUEUED, queued);
        Ok(reply.watched(Slot { _permit: permit }))
    }
}

/// The stream's slot at the node, freed when the stream ends.
struct Slot {
    _permit: Permit,
}

impl Watch for Slot {}

/// Queue order: higher first.
fn priority(p: i32) -> usize {
    match Priority::try_from(p).unwrap_or(Priority::Unspecified) {
        Priority::Low => 0,
        Priority::Unspecified | Priority::Normal => 1,
        Priority::High => 2,
    }
}

fn refusal_status(service: &str, r: Refusal) -> Status {
    let exhausted = |message: String, after| retry_later(Code::ResourceExhausted, message, after);
    match r {
        Refusal::QueueFull { queued, retry_after } => exhausted(
            format!("service {service:?} is at capacity ({queued} requests queued); retry after {retry_after:?}"),
            retry_after,
        ),
        Refusal::Waited { waited, retry_after } => exhausted(
            format!("service {service:?} had no free slot within {waited:?}; retry after {retry_after:?}"),
            retry_after,
        ),
        Refusal::Shed { retry_after } => exhausted(
            format!("service {service:?} shed this request for higher-priority work; retry after {retry_after:?}"),
            retry_after,
        ),
        Refusal::Deadline { expected_wait } => Status::deadline_exceeded(format!(
            "service {service:?} cannot start this request before its deadline (about {expected_wait:?} of queue ahead)"
        )),
    }
}
