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
        let acquired = self.bulkhead.acquire(priority(call.req.priority), call.deadline, call.queue_wait()).await;
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
        Refusal::OverBound { expected_wait, bound, retry_after } => exhausted(
            format!(
                "service {service:?} would queue this request about {expected_wait:?}, over its bound of {bound:?} ({}); retry after {retry_after:?}",
                md::MAX_QUEUE_WAIT_MS
            ),
            retry_after,
        ),
        Refusal::Deadline { expected_wait } => Status::deadline_exceeded(format!(
            "service {service:?} cannot start this request before its deadline (about {expected_wait:?} of queue ahead)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use futures_util::FutureExt;

    use super::*;
    use crate::config::ServiceLimits;
    use crate::stack::testing::{call, ok_inner, read_to_end};

    /// One slot at the node and room for one waiter; a new bulkhead
    /// expects a stream to hold its slot for about a second.
    fn admission(max_queue: usize) -> Arc<Admission> {
        let limits = ServiceLimits {
            name: "chat".into(),
            max_concurrency: 1,
            max_queue,
            max_queue_wait: Duration::from_secs(5),
        };
        let bulkhead = Bulkhead::new(limits);
        Arc::new(Admission { service: "chat".into(), bulkhead, metrics: SidecarMetrics::new() })
    }

    #[tokio::test]
    async fn the_slot_is_held_until_the_stream_ends_and_the_reply_says_what_is_queued() {
        let admission = admission(1);
        let (next, _) = ok_inner(2);
        let mut reply = admission.call(call("chat"), next).await.unwrap();
        assert_eq!(reply.metadata.get(md::SIDECAR_QUEUED).unwrap(), "0");
        assert_eq!(admission.bulkhead.in_use(), 1);
        assert_eq!(read_to_end(&mut reply.stream).await.unwrap(), 2);
        assert_eq!(admission.bulkhead.in_use(), 0, "freed at the stream's end, before the reply is dropped");
    }

    #[tokio::test]
    async fn a_deadline_shorter_than_the_expected_wait_is_refused_at_once() {
        let admission = admission(1);
        let (next, calls) = ok_inner(2);
        let _running = admission.call(call("chat"), next.clone()).await.unwrap();
        let mut hurried = call("chat");
        hurried.deadline = Some(Instant::now() + Duration::from_millis(100));
        let refused = admission.call(hurried, next).now_or_never().expect("refused on the first poll");
        assert_eq!(refused.err().unwrap().code(), Code::DeadlineExceeded);
        assert_eq!(calls.get(), 1, "the refused call never reached the node");
        assert_eq!(admission.bulkhead.queued(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_is_refused_at_once_and_the_waiter_gets_the_slot_when_the_stream_ends() {
        let admission = admission(1);
        let (next, calls) = ok_inner(2);
        let mut running = admission.call(call("chat"), next.clone()).await.unwrap();
        let waiter = tokio::spawn({
            let (admission, next) = (admission.clone(), next.clone());
            async move { admission.call(call("chat"), next).await.map(drop) }
        });
        while admission.bulkhead.queued() < 1 {
            tokio::task::yield_now().await;
        }
        let refused = admission.call(call("chat"), next).now_or_never().expect("refused on the first poll");
        let refused = refused.err().unwrap();
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert!(refused.metadata().get(md::RETRY_AFTER_MS).is_some());
        assert_eq!(calls.get(), 1);

        assert_eq!(read_to_end(&mut running.stream).await.unwrap(), 2);
        waiter.await.unwrap().unwrap();
        assert_eq!(calls.get(), 2);
    }
}
