//! Telemetry shared by every mesh process: structured logs whose lines
//! carry the trace id, spans exported with OTLP/gRPC (to Jaeger or any
//! collector) when an endpoint is configured, W3C trace context carried in
//! gRPC metadata, and Prometheus metrics over HTTP.
//!
//! With no OTLP endpoint there is no exporter and no OpenTelemetry layer:
//! spans are plain `tracing` spans and cost what they cost without it.

pub mod metrics;
pub mod propagation;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Where and how much to trace.
#[derive(Debug, Clone, clap::Args)]
pub struct TraceArgs {
    /// OTLP/gRPC collector (Jaeger's intake is port 4317), e.g.
    /// http://127.0.0.1:4317. Unset: no export.
    #[arg(long, env = "MESH_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Share of new traces sampled (a caller's sampling decision is kept).
    #[arg(long, env = "MESH_TRACE_SAMPLE_RATIO", default_value_t = 1.0, value_parser = sample_ratio)]
    pub trace_sample_ratio: f64,
}

/// A share in [0, 1], checked when the flag is read, exporter or not (clap
/// then exits 2 naming it): `nan` and `inf` parse as f64 but are no share.
fn sample_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("must be a number in [0, 1] (got {s:?})")),
    }
}

/// Flushes and stops the exporter when dropped (at process exit).
pub struct TelemetryGuard(Option<SdkTracerProvider>);

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("trace export shutdown: {e}");
        }
    }
}

/// This machine's name (empty when the kernel does not say).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

/// This process among others of the same service (two sidecars of one
/// trace, say): `host:pid`.
pub fn instance_id() -> String {
    format!("{}:{}", hostname(), std::process::id())
}

/// Installs logging (stderr, `RUST_LOG`, default `info`) and, with an OTLP
/// endpoint, span export for `service_name`. Must run inside a Tokio runtime.
pub fn init(service_name: &str, args: &TraceArgs) -> anyhow::Result<TelemetryGuard> {
    use std::io::IsTerminal;
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_filter(filter());
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let Some(endpoint) = &args.otlp_endpoint else {
        tracing_subscriber::registry().with(fmt).init();
        return Ok(TelemetryGuard(None));
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().with_endpoint(endpoint).build()?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(args.trace_sample_ratio))))
        .with_resource(
            Resource::builder()
                .with_service_name(service_name.to_string())
                .with_attribute(opentelemetry::KeyValue::new("service.instance.id", instance_id()))
                .build(),
        )
        .build();
    let tracer = provider.tracer(service_name.to_string());
    let otel = tracing_opentelemetry::layer().with_tracer(tracer).with_filter(filter());
    tracing_subscriber::registry().with(fmt).with(otel).init();
    Ok(TelemetryGuard(Some(provider)))
}

#[cfg(test)]
mod tests {
    use super::sample_ratio;

    #[test]
    fn a_sample_ratio_is_a_finite_share() {
        assert_eq!(sample_ratio("0.25"), Ok(0.25));
        for bad in ["nan", "inf", "-0.1", "1.5", "half"] {
            assert!(sample_ratio(bad).unwrap_err().contains("[0, 1]"), "{bad}");
        }
    }
}
