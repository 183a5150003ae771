//! Opening a stream: one instance after another until one sends its first
//! message, while the failures are retryable and the budget lasts.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_proto::metadata as md;
use mesh_proto::v1::GenerateRequest;
use tonic::metadata::MetadataValue;
use tonic::{Code, Request, Status, Streaming};

use super::{Route, no_instance};
use crate::outbound::balancer::Pick;
use crate::outbound::instance::{InFlight, Instance, Outcome};
use crate::wire::Relayed;

/// One open stream to one instance.
pub(super) struct Attempt {
    pub ep: Arc<Instance>,
    pub stream: Streaming<Relayed>,
    _in_flight: InFlight,
    /// The attempt's client span (the instance's spans hang under it).
    pub span: tracing::Span,
}

/// An attempt that failed, and whether another instance may do better.
enum Failed {
    Retryable(Status),
    Final(Status),
}

/// What a status says about the instance that returned it. A failure of
/// the sidecar's own making is never the instance's.
pub(super) fn classify(status: &Status) -> Outcome {
    if of_our_making(status) || request_fault(status) {
        return Outcome::Neutral;
    }
    match status.code() {
        Code::Unavailable | Code::Internal | Code::Unknown | Code::DataLoss | Code::Unimplemented => Outcome::Failure,
        _ => Outcome::Neutral,
    }
}

/// Whether the stream ended because of this side, not the instance: a
/// reset this side sent (CANCEL: its caller left, or it gave up), or a
/// connection the peer closed because this side overran its limits
/// (GOAWAY with ENHANCE_YOUR_CALM: too many resets or pings). Charging the
/// instance for these would eject a healthy instance for the sidecar's own
/// load, and with it every other stream there. The stream may still move
/// elsewhere: the instance did nothing wrong, but the stream is gone.
pub(super) fn of_our_making(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            let reason = h2.reason();
            return (!h2.is_remote() && !h2.is_go_away() && reason == Some(h2::Reason::CANCEL))
                || (h2.is_go_away() && reason == Some(h2::Reason::ENHANCE_YOUR_CALM));
        }
        source = e.source();
    }
    false
}

/// Whether the instance says the request itself broke it (`REQUEST_FAULT`):
/// the same request would fail anywhere.
pub(super) fn request_fault(status: &Status) -> bool {
    status.metadata().contains_key(md::REQUEST_FAULT)
}

/// Whether another instance may answer differently (before the first token).
fn retryable(status: &Status) -> bool {
    !request_fault(status)
        && matches!(
            status.code(),
            Code::Unavailable | Code::Internal | Code::Unknown | Code::ResourceExhausted | Code::Aborted
        )
}

/// What bounds a call's attempts: the caller's deadline, and the longest
/// it may wait in an instance's queue (a call that may overflow elsewhere;
/// never a stream continued after its instance failed).
#[derive(Debug, Clone, Copy)]
pub(super) struct Bounds {
    pub deadline: Option<Instant>,
    pub queue_wait: Option<Duration>,
}

impl Route {
    /// Opens a stream on some instance not in `exclude` and waits for its
    /// first message. `continuation` resumes a stream moved off a failed
    /// instance.
    pub(super) async fn open(
        &self,
        req: &GenerateRequest,
        continuation: &[u32],
        bounds: Bounds,
        exclude: &mut HashSet<String>,
        route: &tracing::Span,
    ) -> Result<(Attempt, Relayed), Status> {
        let service = req.model.as_str();
        let mut last: Option<Status> = None;
        let blocks = self.balancer.prefix_blocks(req);
        loop {
            let Some(pick) = self.balancer.pick(service, exclude, &blocks) else {
                return Err(last.unwrap_or_else(|| no_instance(service, self.balancer.instance_count(service))));
            };
            let ep = &pick.instance;
            exclude.insert(ep.record.instance_id.clone());
            let span = tracing::info_span!(
                parent: route,
                "sidecar.attempt",
                otel.kind = "client",
                instance = %ep.record.instance_id,
                address = %ep.record.address,
                attempt = exclude.len(),
                continued_tokens = continuation.len(),
            );
            let status = match self.try_instance(pick, req, continuation, bounds, span).await {
                Ok(opened) => return Ok(opened),
                Err(Failed::Final(status)) => return Err(status),
                Err(Failed::Retryable(status)) => status,
            };
            if !self.withdraw(service) {
                let message = format!("{} (retry budget spent, not retrying)", status.message());
                return Err(Status::with_metadata(status.code(), message, status.metadata().clone()));
            }
            self.metrics.retries.inc();
            last = Some(status);
        }
    }

    /// One attempt on `ep`, bounded by the attempt timeout and the deadline;
    /// the bound on its queueing there travels with it.
    async fn try_instance(
        &self,
        pick: Pick,
        req: &GenerateRequest,
        continuation: &[u32],
        Bounds { deadline, queue_wait }: Bounds,
        span: tracing::Span,
    ) -> Result<(Attempt, Relayed), Failed> {
        let ep = pick.instance.clone();
        let in_flight = ep.start();
        let started = Instant::now();
        let mut request =
            Request::new(GenerateRequest { continuation_token_ids: continuation.to_vec(), ..req.clone() });
        telemetry::propagation::inject(&span, request.metadata_mut());
        crate::outbound::authenticate::attach_claim(&req.tenant, request.metadata_mut());
        if let Some(wait) = queue_wait {
            request.metadata_mut().insert(md::MAX_QUEUE_WAIT_MS, MetadataValue::from(wait.as_millis() as u64));
        }
        let mut limit = self.routing.attempt_timeout;
        if let Some(d) = deadline {
            let left = d.saturating_duration_since(started);
            if left.is_zero() {
                return Err(Failed::Final(Status::deadline_exceeded(
                    "the deadline passed before an instance answered",
                )));
            }
            request.set_timeout(left);
            limit = limit.min(left);
        }
        let status = match tokio::time::timeout(limit, first_message(&ep, request)).await {
            Ok(Ok((stream, first))) => {
                self.balancer.observe_ttft(&req.model, &pick, started.elapsed());
                return Ok((Attempt { ep, stream, _in_flight: in_flight, span }, first));
            }
            Ok(Err(status)) => {
                self.balancer.record(&ep, classify(&status), status.message());
                if !retryable(&status) {
                    return Err(Failed::Final(status));
                }
                status
            }
            Err(_) if deadline.is_some_and(|d| Instant::now() >= d) => {
                return Err(Failed::Final(Status::deadline_exceeded("no first token before the deadline")));
            }
            Err(_) => {
                let why = format!("no first token within {:?}", self.routing.attempt_timeout);
                self.balancer.record(&ep, Outcome::Failure, &why);
                Status::unavailable(format!("instance {} gave {why}", ep.record.instance_id))
            }
        };
        tracing::debug!(instance = %ep.record.instance_id, code = ?status.code(), "attempt failed");
        telemetry::propagation::record_status(&span, &status);
        Err(Failed::Retryable(status))
    }
}

/// Sends the request and waits for the stream's first message.
async fn first_message(
    ep: &Instance,
    request: Request<GenerateRequest>,
) -> Result<(Streaming<Relayed>, Relayed), Status> {
    let response = ep.client().generate(request).await?;
    if let Some(q) = queued(response.metadata()) {
        ep.observe_queue(q);
    }
    let mut stream = response.into_inner();
    match stream.message().await? {
        Some(first) => Ok((stream, first)),
        None => Err(Status::internal("stream ended before its first message")),
    }
}

/// The queue ahead at the instance: its node's and its sidecar's.
fn queued(meta: &tonic::metadata::MetadataMap) -> Option<u32> {
    let get = |k: &str| meta.get(k).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u32>().ok());
    match (get(md::LOAD_QUEUED), get(md::SIDECAR_QUEUED)) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_h2(reason: h2::Reason) -> Status {
        Status::from_error(Box::new(h2::Error::from(reason)))
    }

    #[test]
    fn a_reset_of_our_own_is_not_the_instance_s_failure() {
        assert_eq!(classify(&from_h2(h2::Reason::CANCEL)), Outcome::Neutral);
        assert_eq!(classify(&Status::unavailable("connection refused")), Outcome::Failure);
        assert_eq!(classify(&Status::unknown("no grpc-status")), Outcome::Failure);
        // A protocol error is the peer's doing, whichever side noticed it.
        assert_eq!(classify(&from_h2(h2::Reason::PROTOCOL_ERROR)), Outcome::Failure);
    }

    #[test]
    fn a_full_instance_is_not_failing_and_another_may_take_the_call() {
        let full = Status::resource_exhausted("queue full");
        assert_eq!(classify(&full), Outcome::Neutral);
        assert!(retryable(&full));
        assert_eq!(classify(&Status::cancelled("caller left")), Outcome::Neutral);
    }

    #[test]
    fn a_request_that_breaks_the_engine_is_neither_charged_nor_retried() {
        let mut poisoned = Status::internal("engine step failed: panic");
        poisoned.metadata_mut().insert(md::REQUEST_FAULT, "1".parse().unwrap());
        assert_eq!(classify(&poisoned), Outcome::Neutral);
        assert!(!retryable(&poisoned));
        assert!(retryable(&Status::internal("engine step failed: panic")));
    }
}
