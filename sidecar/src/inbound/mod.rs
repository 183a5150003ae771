//! The inbound side: the gate in front of this sidecar's own node. Tenant
//! limits, then the service's bulkhead (admit, queue or shed), then the
//! node, streamed straight back. Every refusal is fast and says when to
//! come back.

pub mod bulkhead;
pub mod tenants;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mesh_proto::metadata as md;
use mesh_proto::v1::generation_client::GenerationClient;
use mesh_proto::v1::generation_server::Generation;
use mesh_proto::v1::{GenerateRequest, GenerateResponse, ListModelsRequest, ListModelsResponse, Priority};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

use crate::deadline;
use crate::metrics::{LimitLabels, SidecarMetrics};
use bulkhead::{Bulkhead, Refusal};
use tenants::Tenants;

/// max_tokens charged to a tenant when the request leaves it to the node.
const DEFAULT_CHARGE: u32 = 256;

pub struct Inbound {
    pub service: String,
    node: GenerationClient<Channel>,
    bulkhead: Arc<Bulkhead>,
    tenants: Tenants,
    draining: AtomicBool,
    metrics: SidecarMetrics,
}

impl Inbound {
    pub fn new(
        service: String,
        node: Channel,
        bulkhead: Arc<Bulkhead>,
        tenants: Tenants,
        metrics: SidecarMetrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            service,
            node: GenerationClient::new(node),
            bulkhead,
            tenants,
            draining: AtomicBool::new(false),
            metrics,
        })
    }

    fn export_queue(&self) {
        let depth = self.bulkhead.queued() as i64;
        self.metrics.queue_depth.get_or_create(&self.metrics.service(&self.service)).set(depth);
    }

    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }
}

fn retry_status(code: Code, message: String, after: Duration) -> Status {
    let mut meta = MetadataMap::new();
    meta.insert(md::RETRY_AFTER_MS, MetadataValue::from(after.as_millis().max(1) as u64));
    Status::with_metadata(code, message, meta)
}

fn refusal_status(service: &str, r: Refusal) -> Status {
    match r {
        Refusal::QueueFull { queued, retry_after } => retry_status(
            Code::ResourceExhausted,
            format!("service {service:?} is at capacity ({queued} requests queued); retry after {retry_after:?}"),
            retry_after,
        ),
        Refusal::Waited { waited, retry_after } => retry_status(
            Code::ResourceExhausted,
            format!("service {service:?} had no free slot within {waited:?}; retry after {retry_after:?}"),
            retry_after,
        ),
        Refusal::Shed { retry_after } => retry_status(
            Code::ResourceExhausted,
            format!("service {service:?} shed this request for higher-priority work; retry after {retry_after:?}"),
            retry_after,
        ),
        Refusal::Deadline { expected_wait } => Status::deadline_exceeded(format!(
            "service {service:?} cannot start this request before its deadline (about {expected_wait:?} of queue ahead)"
        )),
    }
}

fn priority(p: i32) -> usize {
    match Priority::try_from(p).unwrap_or(Priority::Unspecified) {
        Priority::Low => 0,
        Priority::Unspecified | Priority::Normal => 1,
        Priority::High => 2,
    }
}

#[derive(Clone)]
pub struct InboundService(pub Arc<Inbound>);

#[tonic::async_trait]
impl Generation for InboundService {
    type GenerateStream = ReceiverStream<Result<GenerateResponse, Status>>;

    async fn generate(&self, request: Request<GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        let span = tracing::info_span!(
            "sidecar.inbound",
            otel.kind = "server",
            service = %self.0.service,
            tenant = %request.get_ref().tenant,
            priority = request.get_ref().priority,
            trace_id = tracing::field::Empty,
        );
        telemetry::propagation::continue_trace(&span, request.metadata());
        span.record("trace_id", telemetry::propagation::trace_id(&span));
        let result = self.admit(request, span.clone()).await;
        if let Err(status) = &result {
            telemetry::propagation::record_status(&span, status);
            self.0.metrics.count("inbound", &self.0.service, status.code());
        }
        result
    }

    async fn list_models(&self, request: Request<ListModelsRequest>) -> Result<Response<ListModelsResponse>, Status> {
        self.0.node.clone().list_models(request.into_inner()).await
    }
}

impl InboundService {
    /// Admits a call (tenant limits, then the bulkhead) and streams it from
    /// the node; `span` covers the whole stream.
    async fn admit(
        &self,
        request: Request<GenerateRequest>,
        span: tracing::Span,
    ) -> Result<Response<ReceiverStream<Result<GenerateResponse, Status>>>, Status> {
        let this = &self.0;
        let now = Instant::now();
        if this.draining.load(Ordering::SeqCst) {
            return Err(Status::unavailable("sidecar is draining; send new requests elsewhere"));
        }
        let deadline = deadline::from_metadata(request.metadata(), now);
        let req = request.into_inner();
        if !req.model.is_empty() && req.model != this.service {
            return Err(Status::not_found(format!(
                "service {:?} is not served here ({:?} is)",
                req.model, this.service
            )));
        }
        let charge = match req.sampling.as_ref().map_or(0, |s| s.max_tokens) {
            0 => DEFAULT_CHARGE,
            n => n,
        };
        if let Err(over) = this.tenants.charge(&req.tenant, charge, now) {
            this.metrics.rate_limited.get_or_create(&LimitLabels { limit: over.what.to_string() }).inc();
            return Err(retry_status(
                Code::ResourceExhausted,
                format!(
                    "tenant {:?} is over its {} limit of {}; retry after {:?}",
                    req.tenant, over.what, over.limit, over.retry_after
                ),
                over.retry_after,
            ));
        }
        let refund = |used: u32| this.tenants.refund(&req.tenant, charge.saturating_sub(used));
        let admit = tracing::info_span!(parent: &span, "sidecar.admit", queue_wait_ms = tracing::field::Empty, outcome = tracing::field::Empty);
        this.export_queue();
        let acquired = this.bulkhead.acquire(priority(req.priority), deadline).await;
        this.export_queue();
        admit.record("queue_wait_ms", now.elapsed().as_secs_f64() * 1e3);
        let permit = match acquired {
            Ok(p) => {
                admit.record("outcome", "admitted");
                p
            }
            Err(r) => {
                admit.record("outcome", format!("{r:?}"));
                refund(0);
                return Err(refusal_status(&this.service, r));
            }
        };
        drop(admit);
        let mut upstream = Request::new(req.clone());
        telemetry::propagation::inject(&span, upstream.metadata_mut());
        if let Some(d) = deadline {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                refund(0);
                return Err(Status::deadline_exceeded("the deadline passed while queued"));
            }
            upstream.set_timeout(left);
        }
        let response = match this.node.clone().generate(upstream).await {
            Ok(r) => r,
            Err(status) => {
                refund(0);
                return Err(status);
            }
        };
        let mut meta = response.metadata().clone();
        meta.insert(md::SIDECAR_QUEUED, MetadataValue::from(this.bulkhead.queued() as u64));
        let mut stream = response.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let inbound = this.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _span = span;
            let mut used = 0;
            let mut code = tonic::Code::Ok;
            let mut last = None::<Instant>;
            loop {
                let next = tokio::select! {
                    _ = tx.closed() => {
                        code = tonic::Code::Cancelled;
                        break; // the caller left; dropping the stream cancels at the node
                    }
                    m = stream.message() => m,
                };
                match next {
                    Ok(Some(msg)) => {
                        let at = Instant::now();
                        match last.replace(at) {
                            None => inbound.metrics.ttft("inbound", at.duration_since(now).as_secs_f64()),
                            Some(prev) => inbound.metrics.gap("inbound", at.duration_since(prev).as_secs_f64()),
                        }
                        used += msg.token_ids.len() as u32;
                        let done = msg.finish_reason != 0;
                        if tx.send(Ok(msg)).await.is_err() {
                            code = tonic::Code::Cancelled;
                            break;
                        }
                        if done {
                            break; // the last message is out: the call succeeded
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        code = status.code();
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                }
            }
            inbound.tenants.refund(&req.tenant, charge.saturating_sub(used));
            inbound.metrics.count("inbound", &inbound.service, code);
        });
        let mut response = Response::new(ReceiverStream::new(rx));
        *response.metadata_mut() = meta;
        Ok(response)
    }
}
