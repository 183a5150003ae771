//! The outbound side: a client's entry point. It picks an instance of the
//! named service anywhere in the mesh, retries a call that fails before its
//! first token on another instance (within the retry budget), and moves a
//! stream whose instance fails mid-way to another one, continuing from the
//! tokens already sent. Tokens are relayed as they arrive.

pub mod balancer;
mod budget;
pub mod endpoint;
pub mod health;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use mesh_proto::metadata as md;
use mesh_proto::v1::generation_server::Generation;
use mesh_proto::v1::{GenerateRequest, GenerateResponse, ListModelsRequest, ListModelsResponse, ModelInfo};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::auth::ApiKeys;
use crate::config::Routing;
use crate::deadline;
use crate::metrics::SidecarMetrics;
use balancer::Balancer;
use budget::RetryBudget;
use endpoint::{Endpoint, InFlight, Outcome};

pub struct Outbound {
    balancer: Arc<Balancer>,
    /// One retry budget per service, so one failing service cannot spend
    /// the retries another needs.
    budgets: std::sync::Mutex<std::collections::HashMap<String, Arc<RetryBudget>>>,
    /// Per service, the outbound streams it may still open.
    streams: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Semaphore>>>,
    routing: Routing,
    metrics: SidecarMetrics,
    keys: ApiKeys,
}

/// One open stream to one instance.
struct Attempt {
    ep: Arc<Endpoint>,
    stream: Streaming<GenerateResponse>,
    _in_flight: InFlight,
    /// The attempt's client span (the instance's spans hang under it).
    span: tracing::Span,
}

/// What a status says about the instance that returned it.
fn classify(status: &Status) -> Outcome {
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

impl Outbound {
    pub fn new(balancer: Arc<Balancer>, routing: Routing, metrics: SidecarMetrics, keys: ApiKeys) -> Arc<Self> {
        Arc::new(Self { balancer, budgets: Default::default(), streams: Default::default(), routing, metrics, keys })
    }

    /// A stream slot of the service's outbound bulkhead, or a refusal.
    fn stream_slot(&self, service: &str) -> Result<tokio::sync::OwnedSemaphorePermit, Status> {
        let limit = self.routing.max_streams_per_service;
        let sem = {
            let mut all = self.streams.lock().unwrap_or_else(|p| p.into_inner());
            all.entry(service.to_string()).or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(limit))).clone()
        };
        sem.try_acquire_owned().map_err(|_| {
            let mut meta = tonic::metadata::MetadataMap::new();
            meta.insert(md::RETRY_AFTER_MS, 200u64.into());
            Status::with_metadata(
                Code::ResourceExhausted,
                format!("this sidecar already has {limit} streams open to service {service:?}; retry after 200 ms"),
                meta,
            )
        })
    }

    /// The service's retry budget (services are only those in the registry).
    fn budget(&self, service: &str) -> Arc<RetryBudget> {
        let mut all = self.budgets.lock().unwrap_or_else(|p| p.into_inner());
        let (ratio, floor) = (self.routing.retry_ratio, self.routing.retry_floor_per_sec);
        all.entry(service.to_string()).or_insert_with(|| Arc::new(RetryBudget::new(ratio, floor))).clone()
    }

    /// Opens a stream on some instance and waits for its first message,
    /// moving on to other instances while the failures are retryable and
    /// the budget lasts. `continuation` resumes a stream moved off a failed
    /// instance.
    async fn open(
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
            let in_flight = ep.start();
            let started = Instant::now();
            let mut limit = self.routing.attempt_timeout;
            let mut request =
                Request::new(GenerateRequest { continuation_token_ids: continuation.to_vec(), ..req.clone() });
            telemetry::propagation::inject(&span, request.metadata_mut());
            if let Some(d) = deadline {
                let left = d.saturating_duration_since(started);
                if left.is_zero() {
                    return Err(Status::deadline_exceeded("the deadline passed before an instance answered"));
                }
                request.set_timeout(left);
                limit = limit.min(left);
            }
            let mut client = ep.client.clone();
            let attempt = async {
                let response = client.generate(request).await?;
                if let Some(q) = queued(response.metadata()) {
                    ep.observe_queue(q);
                }
                let mut stream = response.into_inner();
                match stream.message().await? {
                    Some(first) => Ok((stream, first)),
                    None => Err(Status::internal("stream ended before its first message")),
                }
            };
            let status = match tokio::time::timeout(limit, attempt).await {
                Ok(Ok((stream, first))) => {
                    ep.observe_ttft(started.elapsed());
                    return Ok((Attempt { ep, stream, _in_flight: in_flight, span }, first));
                }
                Ok(Err(status)) => {
                    self.balancer.record(&ep, classify(&status), status.message());
                    if !retryable(&status) {
                        return Err(status);
                    }
                    status
                }
                Err(_) if deadline.is_some_and(|d| Instant::now() >= d) => {
                    return Err(Status::deadline_exceeded("no first token before the deadline"));
                }
                Err(_) => {
                    let why = format!("no first token within {:?}", self.routing.attempt_timeout);
                    self.balancer.record(&ep, Outcome::Failure, &why);
                    Status::unavailable(format!("instance {} gave {why}", ep.record.instance_id))
                }
            };
            tracing::debug!(instance = %ep.record.instance_id, code = ?status.code(), "attempt failed");
            telemetry::propagation::record_status(&span, &status);
            if !self.budget(service).try_withdraw(Instant::now()) {
                return Err(Status::with_metadata(
                    status.code(),
                    format!("{} (retry budget spent, not retrying)", status.message()),
                    status.metadata().clone(),
                ));
            }
            self.metrics.retries.inc();
            last = Some(status);
        }
    }

    /// Relays a stream to the caller until it finishes; on a server-side
    /// failure mid-way, continues it on another instance.
    async fn relay(
        self: Arc<Self>,
        req: GenerateRequest,
        deadline: Option<Instant>,
        (mut attempt, first): (Attempt, GenerateResponse),
        tx: mpsc::Sender<Result<GenerateResponse, Status>>,
        route: tracing::Span,
    ) {
        let gauge = self.metrics.in_flight.get_or_create(&self.metrics.service(&req.model)).clone();
        gauge.inc();
        let code = self.relay_until_done(&req, deadline, &mut attempt, first, &tx, &route).await;
        gauge.dec();
        self.metrics.count("outbound", &req.model, code);
    }

    /// Relays until the stream ends; returns the final status code.
    async fn relay_until_done(
        &self,
        req: &GenerateRequest,
        deadline: Option<Instant>,
        attempt: &mut Attempt,
        first: GenerateResponse,
        tx: &mpsc::Sender<Result<GenerateResponse, Status>>,
        route: &tracing::Span,
    ) -> Code {
        let mut sent: Vec<u32> = Vec::new();
        let mut migrations = 0;
        let mut pending = Some(first);
        let mut last_token = Instant::now();
        loop {
            let next = match pending.take() {
                Some(m) => Ok(Some(m)),
                None => tokio::select! {
                    // The caller left: dropping the upstream stream cancels it there too.
                    _ = tx.closed() => return Code::Cancelled,
                    r = tokio::time::timeout(self.routing.idle_timeout, attempt.stream.message()) => r.unwrap_or_else(|_| {
                        Err(Status::unavailable(format!("no token for {:?}", self.routing.idle_timeout)))
                    }),
                },
            };
            let status = match next {
                Ok(Some(msg)) => {
                    if !sent.is_empty() && !msg.token_ids.is_empty() {
                        self.metrics.gap("outbound", last_token.elapsed().as_secs_f64());
                    }
                    last_token = Instant::now();
                    sent.extend_from_slice(&msg.token_ids);
                    let done = msg.finish_reason != 0;
                    if tx.send(Ok(msg)).await.is_err() {
                        return Code::Cancelled;
                    }
                    if done {
                        self.balancer.record(&attempt.ep, Outcome::Success, "");
                        route.record("migrations", migrations);
                        return Code::Ok;
                    }
                    continue;
                }
                Ok(None) => Status::unavailable("stream ended without a finish reason"),
                Err(status) => status,
            };
            let outcome = classify(&status);
            self.balancer.record(&attempt.ep, outcome, status.message());
            telemetry::propagation::record_status(&attempt.span, &status);
            let can_move = outcome == Outcome::Failure
                && migrations < self.routing.max_migrations
                && self.budget(&req.model).try_withdraw(Instant::now());
            if !can_move {
                telemetry::propagation::record_status(route, &status);
                let code = status.code();
                let _ = tx.send(Err(status)).await;
                return code;
            }
            migrations += 1;
            self.metrics.migrations.inc();
            let mut exclude = HashSet::from([attempt.ep.record.instance_id.clone()]);
            match self.open(req, &sent, deadline, &mut exclude, route).await {
                Ok((next, first)) => {
                    tracing::info!(
                        from = %attempt.ep.record.instance_id,
                        to = %next.ep.record.instance_id,
                        tokens = sent.len(),
                        "stream moved to another instance"
                    );
                    *attempt = next;
                    pending = Some(first);
                }
                Err(e) => {
                    let msg = format!(
                        "stream interrupted after {} tokens ({}) and could not continue elsewhere: {}",
                        sent.len(),
                        status.message(),
                        e.message()
                    );
                    let status = Status::unavailable(msg);
                    telemetry::propagation::record_status(route, &status);
                    let _ = tx.send(Err(status)).await;
                    return Code::Unavailable;
                }
            }
        }
    }
}

fn queued(meta: &tonic::metadata::MetadataMap) -> Option<u32> {
    let get = |k: &str| meta.get(k).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u32>().ok());
    match (get(md::LOAD_QUEUED), get(md::SIDECAR_QUEUED)) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
    }
}

fn no_instance(service: &str) -> Status {
    let mut meta = tonic::metadata::MetadataMap::new();
    meta.insert(md::RETRY_AFTER_MS, 1000u64.into());
    Status::with_metadata(Code::Unavailable, format!("no healthy instance of service {service:?}; retry later"), meta)
}

/// The outbound `Generation` service.
#[derive(Clone)]
pub struct OutboundService(pub Arc<Outbound>);

#[tonic::async_trait]
impl Generation for OutboundService {
    type GenerateStream = ReceiverStream<Result<GenerateResponse, Status>>;

    async fn generate(&self, request: Request<GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        let this = &self.0;
        let now = Instant::now();
        let deadline = deadline::from_metadata(request.metadata(), now);
        let route = tracing::info_span!(
            "sidecar.route",
            otel.kind = "server",
            service = %request.get_ref().model,
            tenant = %request.get_ref().tenant,
            priority = request.get_ref().priority,
            migrations = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        telemetry::propagation::continue_trace(&route, request.metadata());
        route.record("trace_id", telemetry::propagation::trace_id(&route));
        let tenant = this.keys.check(request.metadata(), &request.get_ref().model);
        let mut req = request.into_inner();
        let opened = async {
            // A key's tenant replaces whatever tenant the caller claims.
            if let Some(tenant) = tenant? {
                req.tenant = tenant;
            }
            if req.model.is_empty() {
                return Err(Status::invalid_argument("model is required: it names the service to route to"));
            }
            if !this.balancer.knows(&req.model) {
                return Err(Status::not_found(format!("no instances of service {:?} are registered", req.model)));
            }
            let slot = this.stream_slot(&req.model)?;
            this.budget(&req.model).deposit(now);
            this.open(&req, &[], deadline, &mut HashSet::new(), &route).await.map(|opened| (opened, slot))
        }
        .await;
        let (opened, slot) = match opened {
            Ok(o) => o,
            Err(status) => {
                telemetry::propagation::record_status(&route, &status);
                this.metrics.count("outbound", &req.model, status.code());
                return Err(status);
            }
        };
        this.metrics.ttft("outbound", now.elapsed().as_secs_f64());
        let (tx, rx) = mpsc::channel(16);
        let relay = this.clone().relay(req, deadline, opened, tx, route);
        tokio::spawn(async move {
            relay.await;
            drop(slot);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn list_models(&self, _: Request<ListModelsRequest>) -> Result<Response<ListModelsResponse>, Status> {
        let mut models: Vec<ModelInfo> = Vec::new();
        for ep in self.0.balancer.all() {
            if models.last().is_some_and(|m| m.name == ep.record.service) {
                continue;
            }
            models.push(ModelInfo {
                name: ep.record.service.clone(),
                context_length: ep.record.context_length,
                max_running: ep.record.max_running,
                ..Default::default()
            });
        }
        Ok(Response::new(ListModelsResponse { models }))
    }
}
