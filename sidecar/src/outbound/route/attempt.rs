//! Opening a stream: one instance after another until one sends its first
//! message, while the failures are retryable and the budget lasts.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use mesh_proto::metadata as md;
use mesh_proto::v1::{GenerateRequest, GenerateResponse};
use tonic::{Code, Request, Status, Streaming};

use super::{Route, no_instance};
use crate::outbound::instance::{InFlight, Instance, Outcome};

/// One open stream to one instance.
pub(super) struct Attempt {
    pub ep: Arc<Instance>,
    pub stream: Streaming<GenerateResponse>,
    _in_flight: InFlight,
    /// The attempt's client span (the instance's spans hang under it).
    pub span: tracing::Span,
}

/// An attempt that failed, and whether another instance may do better.
enum Failed {
    Retryable(Status),
    Final(Status),
}

/// What a status says about the instance that returned it.
pub(super) fn classify(status: &Status) -> Outcome {
    match status.code() {
        Code::Unavailable | Code::Internal | Code::Unknown | Code::DataLoss | Code::Unimplemented => Outcome::Failure,
        _ => Outcome::Neutral,
    }
}

/// Whether another instance may answer differently (before the first token).
fn retryable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Internal | Code::Unknown | Code::ResourceExhausted | Code::Aborted
    )
}

impl Route {
    /// Opens a stream on some instance not in `exclude` and waits for its
    /// first message. `continuation` resumes a stream moved off a failed
    /// instance.
    pub(super) async fn open(
        &self,
        req: &GenerateRequest,
        continuation: &[u32],
        deadline: Option<Instant>,
        exclude: &mut HashSet<String>,
        route: &tracing::Span,
    ) -> Result<(Attempt, GenerateResponse), Status> {
        let service = req.model.as_str();
        let mut last: Option<Status> = None;
        loop {
            let Some(ep) = self.balancer.pick(service, exclude) else {
                return Err(last.unwrap_or_else(|| no_instance(service)));
            };
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
            let status = match self.try_instance(ep, req, continuation, deadline, span).await {
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

    /// One attempt on `ep`, bounded by the attempt timeout and the deadline.
    async fn try_instance(
        &self,
        ep: Arc<Instance>,
        req: &GenerateRequest,
        continuation: &[u32],
        deadline: Option<Instant>,
        span: tracing::Span,
    ) -> Result<(Attempt, GenerateResponse), Failed> {
        let in_flight = ep.start();
        let started = Instant::now();
        let mut request =
            Request::new(GenerateRequest { continuation_token_ids: continuation.to_vec(), ..req.clone() });
        telemetry::propagation::inject(&span, request.metadata_mut());
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
                ep.observe_ttft(started.elapsed());
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
) -> Result<(Streaming<GenerateResponse>, GenerateResponse), Status> {
    let response = ep.client.clone().generate(request).await?;
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
