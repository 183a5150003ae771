//! The first layer of both sides: opens the call's span (continuing the
//! caller's trace), and counts every call by its final code, its time to
//! first token and the gaps between tokens.

use std::sync::Arc;
use std::time::Instant;

use telemetry::propagation;
use tonic::Status;

use crate::metrics::{Latency, SidecarMetrics};
use crate::outbound::service_slot::Known;
use crate::stack::{Call, End, Next, Reply, Step, Watch, pass_watched};
use crate::wire::Relayed;

/// Which side of the sidecar a call goes through.
#[derive(Clone)]
pub enum Hop {
    /// From a client into the mesh (`sidecar.route` spans); calls are
    /// counted under their service only when `known` says it is registered,
    /// else under `unknown`, so callers naming random models cannot grow the
    /// metric series without bound.
    Outbound { known: Known },
    /// From the mesh into this sidecar's node (`sidecar.inbound` spans).
    Inbound { service: String },
}

/// The service label of calls to services no registry record names.
pub const UNKNOWN_SERVICE: &str = "unknown";

pub struct Trace {
    hop: Hop,
    counts: Arc<Counts>,
}

/// Where a hop's streams are counted, shared by all of them.
struct Counts {
    metrics: SidecarMetrics,
    latency: Latency,
    direction: &'static str,
}

impl Trace {
    pub fn new(hop: Hop, metrics: SidecarMetrics) -> Self {
        let direction = match hop {
            Hop::Outbound { .. } => "outbound",
            Hop::Inbound { .. } => "inbound",
        };
        let latency = metrics.latency(direction);
        Self { hop, counts: Arc::new(Counts { metrics, latency, direction }) }
    }

    fn span(&self, call: &Call) -> tracing::Span {
        let (tenant, priority) = (&call.req.tenant, call.req.priority);
        let span = match &self.hop {
            Hop::Outbound { .. } => tracing::info_span!(
                "sidecar.route",
                otel.kind = "server",
                mesh.role = "client-side",
                service = %call.req.model,
                %tenant,
                priority,
                migrations = tracing::field::Empty,
                trace_id = tracing::field::Empty,
            ),
            Hop::Inbound { service } => tracing::info_span!(
                "sidecar.inbound",
                otel.kind = "server",
                mesh.role = "node-side",
                %service,
                %tenant,
                priority,
                trace_id = tracing::field::Empty,
            ),
        };
        propagation::continue_trace(&span, &call.metadata);
        span.record("trace_id", propagation::trace_id(&span));
        span
    }
}

impl Step for Trace {
    async fn call(&self, mut call: Call, next: Next) -> Result<Reply, Status> {
        call.span = self.span(&call);
        let service = match &self.hop {
            Hop::Outbound { known } if known(&call.req.model) => call.req.model.clone(),
            Hop::Outbound { .. } => UNKNOWN_SERVICE.to_string(),
            Hop::Inbound { service } => service.clone(),
        };
        let observed = Observed {
            span: call.span.clone(),
            counts: self.counts.clone(),
            service,
            received: call.received,
            last: None,
        };
        pass_watched(next, call, observed).await
    }
}

/// Holds the span open for the stream's life and counts it.
struct Observed {
    span: tracing::Span,
    counts: Arc<Counts>,
    service: String,
    received: Instant,
    last: Option<Instant>,
}

impl Watch for Observed {
    fn message(&mut self, msg: &Relayed) {
        let at = Instant::now();
        match self.last {
            None => self.counts.latency.ttft.observe(at.duration_since(self.received).as_secs_f64()),
            Some(prev) if !msg.token_ids().is_empty() => {
                self.counts.latency.gap.observe(at.duration_since(prev).as_secs_f64())
            }
            Some(_) => return,
        }
        self.last = Some(at);
    }

    fn end(self, end: End<'_>) {
        if let End::Failed(status) = &end {
            propagation::record_status(&self.span, status);
        }
        self.counts.metrics.count(self.counts.direction, &self.service, end.code());
    }
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt;
    use tonic::Code;

    use super::*;
    use crate::metrics::RequestLabels;
    use crate::stack::testing::{call, ok_inner, read_to_end, refusing};

    fn requests(metrics: &SidecarMetrics, code: Code) -> u64 {
        requests_of(metrics, "chat", code)
    }

    fn requests_of(metrics: &SidecarMetrics, service: &str, code: Code) -> u64 {
        let labels = RequestLabels {
            direction: "outbound".into(),
            service: service.into(),
            code: telemetry::metrics::code_name(code),
        };
        metrics.requests.get_or_create(&labels).get()
    }

    fn outbound(registered: &'static str) -> Hop {
        Hop::Outbound { known: Arc::new(move |s| s == registered) }
    }

    #[tokio::test]
    async fn counts_each_call_once_by_its_final_code() {
        let metrics = SidecarMetrics::new();
        let trace = Trace::new(outbound("chat"), metrics.clone());
        let (ok, _) = ok_inner(2);

        let mut finished = trace.call(call("chat"), ok.clone()).await.unwrap();
        assert_eq!(requests(&metrics, Code::Ok), 0, "counted at the stream's end, not at the reply");
        assert_eq!(read_to_end(&mut finished.stream).await.unwrap(), 2);
        drop(finished);

        let (refuse, _) = refusing(Code::ResourceExhausted);
        assert_eq!(trace.call(call("chat"), refuse).await.err().unwrap().code(), Code::ResourceExhausted);

        let mut left = trace.call(call("chat"), ok).await.unwrap();
        assert!(left.stream.next().await.unwrap().is_ok());
        drop(left);

        assert_eq!(requests(&metrics, Code::Ok), 1);
        assert_eq!(requests(&metrics, Code::ResourceExhausted), 1);
        assert_eq!(requests(&metrics, Code::Cancelled), 1);
    }

    #[tokio::test]
    async fn unregistered_services_share_one_label() {
        let metrics = SidecarMetrics::new();
        let trace = Trace::new(outbound("chat"), metrics.clone());
        for i in 0..100 {
            let (refuse, _) = refusing(Code::NotFound);
            let _ = trace.call(call(&format!("random-{i}")), refuse).await;
        }
        assert_eq!(requests_of(&metrics, UNKNOWN_SERVICE, Code::NotFound), 100);
        assert_eq!(
            metrics
                .requests
                .get_or_create(&RequestLabels {
                    direction: "outbound".into(),
                    service: "random-7".into(),
                    code: telemetry::metrics::code_name(Code::NotFound),
                })
                .get(),
            0
        );
    }
}
