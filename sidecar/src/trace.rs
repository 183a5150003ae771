//! The first layer of both sides: opens the call's span (continuing the
//! caller's trace), and counts every call by its final code, its time to
//! first token and the gaps between tokens.

use std::sync::Arc;
use std::time::Instant;

use telemetry::propagation;
use tonic::Status;

use crate::metrics::{Latency, SidecarMetrics};
use crate::stack::{Call, End, Next, Reply, Step, Watch, pass_watched};
use crate::wire::Relayed;

/// Which side of the sidecar a call goes through.
#[derive(Clone)]
pub enum Hop {
    /// From a client into the mesh (`sidecar.route` spans).
    Outbound,
    /// From the mesh into this sidecar's node (`sidecar.inbound` spans).
    Inbound { service: String },
}

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
            Hop::Outbound => "outbound",
            Hop::Inbound { .. } => "inbound",
        };
        let latency = metrics.latency(direction);
        Self { hop, counts: Arc::new(Counts { metrics, latency, direction }) }
    }

    fn span(&self, call: &Call) -> tracing::Span {
        let (tenant, priority) = (&call.req.tenant, call.req.priority);
        let span = match &self.hop {
            Hop::Outbound => tracing::info_span!(
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
            Hop::Outbound => call.req.model.clone(),
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
        let labels = RequestLabels {
            direction: "outbound".into(),
            service: "chat".into(),
            code: telemetry::metrics::code_name(code),
        };
        metrics.requests.get_or_create(&labels).get()
    }

    #[tokio::test]
    async fn counts_each_call_once_by_its_final_code() {
        let metrics = SidecarMetrics::new();
        let trace = Trace::new(Hop::Outbound, metrics.clone());
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
}
