//! The node's `mesh.v1.Generation` gRPC handler: validate, admit, stream.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use mesh_proto::v1::generation_server::Generation;
use mesh_proto::v1::{GenerateRequest, ListModelsRequest, ListModelsResponse, ModelInfo};
use tokio_stream::Stream;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status};

use crate::scheduler::{Reply, Scheduler};
use crate::text::TextCodec;
use crate::validate::{self, Rules};

/// Serves the loaded model through the scheduler.
pub struct GenerationApi {
    pub model_name: String,
    /// "gguf" or "synthetic".
    pub kind: &'static str,
    pub vocab_size: usize,
    /// max_tokens for requests that leave it 0.
    pub default_max_tokens: usize,
    pub codec: Arc<dyn TextCodec>,
    pub scheduler: Scheduler,
}

impl GenerationApi {
    /// Validates and admits a call, inside the request's span (which
    /// continues the caller's trace).
    fn admit(&self, request: Request<GenerateRequest>) -> Result<Response<ReplyStream>, Status> {
        let limits = self.scheduler.limits();
        let span = tracing::info_span!(
            "node.generate",
            otel.kind = "server",
            model = %self.model_name,
            tenant = %request.get_ref().tenant,
            priority = request.get_ref().priority,
            request_id = %request.get_ref().request_id,
            trace_id = tracing::field::Empty,
        );
        telemetry::propagation::continue_trace(&span, request.metadata());
        span.record("trace_id", telemetry::propagation::trace_id(&span));
        let _entered = span.enter();
        let rules = Rules {
            model_name: &self.model_name,
            context_length: limits.context_length,
            default_max_tokens: self.default_max_tokens,
            vocab_size: self.vocab_size,
        };
        let deadline = mesh_proto::deadline::from_metadata(request.metadata(), std::time::Instant::now());
        let request = request.into_inner();
        let request_id = request.request_id.clone();
        let mut req = validate::check(request, &rules, self.codec.as_ref()).inspect_err(|s| {
            telemetry::propagation::record_status(&span, s);
        })?;
        tracing::debug!(request_id, prompt_tokens = req.prompt.len(), max_tokens = req.max_tokens, "generate");
        req.span = span.clone();
        req.deadline = deadline;
        let (rx, load) = self.scheduler.submit(req).map_err(|e| {
            let status = e.status(self.scheduler.load());
            telemetry::propagation::record_status(&span, &status);
            status
        })?;
        let replies = UnboundedReceiverStream::new(rx);
        let model = self.model_name.clone();
        let mut response = Response::new(ReplyStream { replies, span: span.clone(), model });
        load.put(response.metadata_mut());
        Ok(response)
    }
}

#[tonic::async_trait]
impl Generation for GenerationApi {
    type GenerateStream = ReplyStream;

    async fn generate(&self, request: Request<GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        let result = self.admit(request);
        if let Err(status) = &result {
            self.scheduler.metrics().count(status.code());
        }
        result
    }

    async fn list_models(&self, _: Request<ListModelsRequest>) -> Result<Response<ListModelsResponse>, Status> {
        let limits = self.scheduler.limits();
        let info = ModelInfo {
            name: self.model_name.clone(),
            backend: self.kind.into(),
            context_length: limits.context_length as u32,
            default_max_tokens: self.default_max_tokens as u32,
            max_running: limits.max_running as u32,
            max_queued: limits.max_queued as u32,
            max_kv_tokens: limits.max_kv_tokens as u64,
            vocab_size: self.vocab_size as u32,
        };
        let mut response = Response::new(ListModelsResponse { models: vec![info] });
        self.scheduler.load().put(response.metadata_mut());
        Ok(response)
    }
}

/// One call's replies. It holds the call's `node.generate` span, so the
/// span ends when the response stream does (its last message taken, or the
/// caller gone), not when the handler returns: its queue, prefill and
/// decode children end inside it.
pub struct ReplyStream {
    replies: UnboundedReceiverStream<Reply>,
    span: tracing::Span,
    /// Named on the last message, so a caller whose call a sidecar degraded
    /// to an overflow service can tell which model answered.
    model: String,
}

impl Drop for ReplyStream {
    fn drop(&mut self) {
        telemetry::propagation::mark_end(&self.span);
    }
}

impl Stream for ReplyStream {
    type Item = Reply;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Reply>> {
        let mut reply = std::task::ready!(Pin::new(&mut self.replies).poll_next(cx));
        if let Some(Ok(msg)) = &mut reply
            && msg.finish_reason != 0
        {
            msg.model = std::mem::take(&mut self.model);
        }
        Poll::Ready(reply)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.replies.size_hint()
    }
}
