//! An OTLP trace collector inside the test: a tonic server for the
//! OpenTelemetry `TraceService` that keeps every span it is sent.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

/// One received span, flattened.
#[derive(Debug, Clone)]
pub struct CollectedSpan {
    /// The exporting process's `service.name`.
    pub service: String,
    /// The exporting process's `service.instance.id`.
    pub instance: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub attributes: HashMap<String, String>,
    /// OTLP status code: 0 unset, 1 ok, 2 error.
    pub status_code: i32,
    /// When the span ended (Unix nanoseconds).
    pub end_ns: u64,
}

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<CollectedSpan>>>);

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut all = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let attrs = rs.resource.map(|r| flatten(&r.attributes)).unwrap_or_default();
            let service = attrs.get("service.name").cloned().unwrap_or_default();
            let instance = attrs.get("service.instance.id").cloned().unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    all.push(CollectedSpan {
                        service: service.clone(),
                        instance: instance.clone(),
                        name: s.name,
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent_span_id: hex(&s.parent_span_id),
                        attributes: flatten(&s.attributes),
                        status_code: s.status.map_or(0, |st| st.code),
                        end_ns: s.end_time_unix_nano,
                    });
                }
            }
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

fn flatten(kvs: &[opentelemetry_proto::tonic::common::v1::KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::StringValue(s)) => s.clone(),
                Some(Value::IntValue(i)) => i.to_string(),
                Some(Value::DoubleValue(d)) => d.to_string(),
                Some(Value::BoolValue(b)) => b.to_string(),
                _ => String::new(),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub struct Collector {
    pub addr: SocketAddr,
    sink: Sink,
}

impl Collector {
    pub async fn start() -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding collector");
        let addr = listener.local_addr().expect("collector address");
        let sink = Sink::default();
        let service = TraceServiceServer::new(sink.clone());
        tokio::spawn(Server::builder().add_service(service).serve_with_incoming(TcpIncoming::from(listener)));
        Collector { addr, sink }
    }

    /// `http://ADDR`, for `--otlp-endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn spans(&self) -> Vec<CollectedSpan> {
        self.sink.0.lock().unwrap().clone()
    }

    /// The spans collected once one of each `names` is among them (spans
    /// are exported in batches); panics naming what came after 20 s.
    pub async fn wait_for(&self, names: &[&str]) -> Vec<CollectedSpan> {
        let all_there = async {
            loop {
                let spans = self.spans();
                if names.iter().all(|w| spans.iter().any(|s| s.name == *w)) {
                    return spans;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        };
        let waited = tokio::time::timeout(std::time::Duration::from_secs(20), all_there).await;
        waited
            .unwrap_or_else(|_| panic!("spans missing: {:?}", self.spans().iter().map(|s| &s.name).collect::<Vec<_>>()))
    }
}
