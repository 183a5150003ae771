//! The request path as a stack of tower layers. A [`Call`] goes down the
//! stack, each [`Step`] may refuse it or pass it on, and a [`Reply`] (the
//! response metadata and the token stream) comes back up, where a step may
//! [watch](Reply::watched) the stream to the end.
//!
//! Every service here is always ready: a gate that is full refuses at once
//! with a status and a retry-after instead of applying back-pressure in
//! `poll_ready`, because a caller waiting in a gRPC handler holds its
//! stream anyway and deserves a fast, clear answer.

mod front;
#[cfg(test)]
pub mod testing;
mod watch;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use mesh_proto::metadata as md;
use mesh_proto::v1::GenerateRequest;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceExt};

use crate::wire::Relayed;

pub use front::{Front, ListModels};
pub use watch::{End, Watch};

/// One generation call on its way through the stack. Boxed: each layer's
/// future holds the call until the layer passes it on, and while thousands
/// of calls wait for their first token at once, a pointer per layer instead
/// of the request and metadata (hundreds of bytes, held several times over)
/// is kilobytes less per stream.
pub struct Call(Box<CallParts>);

/// What a [`Call`] carries; its fields read through the call itself.
pub struct CallParts {
    pub req: GenerateRequest,
    /// The caller's metadata (API key, trace context, deadline).
    pub metadata: MetadataMap,
    pub received: Instant,
    /// When the caller stops waiting, if it said (`grpc-timeout`).
    pub deadline: Option<Instant>,
    /// The call's span, once the trace layer has opened it.
    pub span: tracing::Span,
}

/// The token messages of a call, as they arrive, relayed as received.
pub type TokenStream = Pin<Box<dyn futures_core::Stream<Item = Result<Relayed, Status>> + Send>>;

/// What comes back up the stack: response metadata and the token stream.
pub struct Reply {
    pub metadata: MetadataMap,
    pub stream: TokenStream,
}

/// The stack below a step, boxed so the steps do not name each other.
pub type Next = BoxCloneSyncService<Call, Reply, Status>;

type BoxFuture = Pin<Box<dyn Future<Output = Result<Reply, Status>> + Send>>;

/// One policy on the request path: sees the call, refuses it or passes it
/// to `next`, and may watch the reply.
pub trait Step: Send + Sync + 'static {
    fn call(&self, call: Call, next: Next) -> impl Future<Output = Result<Reply, Status>> + Send;
}

/// The tower layer of a [`Step`].
pub struct StepLayer<P>(Arc<P>);

/// Makes `step` a layer for `tower::ServiceBuilder`.
pub fn step<P: Step>(step: P) -> StepLayer<P> {
    StepLayer(Arc::new(step))
}

impl<P: Step, S> Layer<S> for StepLayer<P>
where
    S: Service<Call, Response = Reply, Error = Status> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
{
    type Service = StepService<P>;

    fn layer(&self, inner: S) -> StepService<P> {
        StepService { step: self.0.clone(), next: Next::new(inner) }
    }
}

/// A [`Step`] in front of the rest of the stack.
pub struct StepService<P> {
    step: Arc<P>,
    next: Next,
}

impl<P> Clone for StepService<P> {
    fn clone(&self) -> Self {
        Self { step: self.step.clone(), next: self.next.clone() }
    }
}

impl<P: Step> Service<Call> for StepService<P> {
    type Response = Reply;
    type Error = Status;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call) -> BoxFuture {
        let (step, next) = (self.step.clone(), self.next.clone());
        Box::pin(async move { step.call(call, next).await })
    }
}

/// The bottom of a stack: a function from a call to its reply.
pub fn last<F, Fut>(f: F) -> Next
where
    F: Fn(Call) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Reply, Status>> + Send + 'static,
{
    Next::new(tower::service_fn(f))
}

/// Passes `call` to the rest of the stack.
pub async fn pass(next: Next, call: Call) -> Result<Reply, Status> {
    next.oneshot(call).await
}

/// Passes `call` on and has `watch` see how it ends: with the reply's
/// stream, or at once when the rest of the stack refuses the call.
pub async fn pass_watched(next: Next, call: Call, watch: impl Watch) -> Result<Reply, Status> {
    match pass(next, call).await {
        Ok(reply) => Ok(reply.watched(watch)),
        Err(status) => {
            watch.end(End::Failed(&status));
            Err(status)
        }
    }
}

impl Call {
    /// A call as received from a client.
    pub fn new(request: tonic::Request<GenerateRequest>) -> Self {
        let received = Instant::now();
        let (metadata, _, req) = request.into_parts();
        let deadline = mesh_proto::deadline::from_metadata(&metadata, received);
        Self(Box::new(CallParts { req, metadata, received, deadline, span: tracing::Span::none() }))
    }

    /// The longest the caller lets this call wait in an instance's queue
    /// ([`md::MAX_QUEUE_WAIT_MS`]), if it said.
    pub fn queue_wait(&self) -> Option<Duration> {
        let ms = self.metadata.get(mesh_proto::metadata::MAX_QUEUE_WAIT_MS)?.to_str().ok()?.parse().ok()?;
        Some(Duration::from_millis(ms))
    }

    /// A copy of the call for `service` instead: the same request,
    /// metadata, deadline and span (an overflow keeps the caller's deadline).
    pub fn redirected(&self, service: &str) -> Self {
        let req = GenerateRequest { model: service.to_string(), ..self.req.clone() };
        Self(Box::new(CallParts {
            req,
            metadata: self.metadata.clone(),
            received: self.received,
            deadline: self.deadline,
            span: self.span.clone(),
        }))
    }

    /// The call's parts, to keep (the bottom of a stack).
    pub fn into_parts(self) -> CallParts {
        *self.0
    }
}

impl std::ops::Deref for Call {
    type Target = CallParts;

    fn deref(&self) -> &CallParts {
        &self.0
    }
}

impl std::ops::DerefMut for Call {
    fn deref_mut(&mut self) -> &mut CallParts {
        &mut self.0
    }
}

impl Reply {
    /// The same reply, its stream watched by `watch` until it ends.
    pub fn watched(self, watch: impl Watch) -> Self {
        Self { metadata: self.metadata, stream: watch::watched(self.stream, watch) }
    }
}

/// A refusal that tells the caller when to come back.
pub fn retry_later(code: Code, message: String, after: Duration) -> Status {
    let mut meta = MetadataMap::new();
    meta.insert(md::RETRY_AFTER_MS, MetadataValue::from(after.as_millis().max(1) as u64));
    Status::with_metadata(code, message, meta)
}
