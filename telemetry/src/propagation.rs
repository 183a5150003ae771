//! W3C `traceparent` / `tracestate` in gRPC metadata: continue a caller's
//! trace on the way in, hand ours on on the way out.

use opentelemetry::propagation::{Extractor, Injector};
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct Read<'a>(&'a MetadataMap);

impl Extractor for Read<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

struct Write<'a>(&'a mut MetadataMap);

impl Injector for Write<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (MetadataKey::from_bytes(key.as_bytes()), MetadataValue::try_from(value)) {
            self.0.insert(k, v);
        }
    }
}

/// Makes `span` a child of the trace the caller sent, if it sent one.
pub fn continue_trace(span: &tracing::Span, meta: &MetadataMap) {
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&Read(meta)));
    let _ = span.set_parent(parent);
}

/// Writes `span`'s trace context into outgoing metadata.
pub fn inject(span: &tracing::Span, meta: &mut MetadataMap) {
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut Write(meta)));
}

/// The span's trace id (32 hex digits), for log lines; empty when not traced.
pub fn trace_id(span: &tracing::Span) -> String {
    use opentelemetry::trace::TraceContextExt;
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() { sc.trace_id().to_string() } else { String::new() }
}

/// Marks `span` failed with a gRPC status code.
pub fn record_status(span: &tracing::Span, status: &tonic::Status) {
    span.set_status(opentelemetry::trace::Status::error(status.message().to_string()));
    span.set_attribute("rpc.grpc.status_code", status.code() as i64);
}

/// Marks now as `span`'s end. The OpenTelemetry layer takes a span's end
/// time from its last exit, so a span entered by a handler and then held by
/// the stream it returned would otherwise end when the handler returned.
pub fn mark_end(span: &tracing::Span) {
    drop(span.enter());
}
