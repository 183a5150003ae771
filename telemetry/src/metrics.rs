//! Prometheus metrics: a registry each process fills, served as text on
//! `GET /metrics`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
pub use prometheus_client::registry::Registry;

/// Buckets for latencies from 1 ms to about 65 s.
pub fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// Buckets for counts from 1 to 1024 (batch sizes, tokens).
pub fn count_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 11))
}

/// A status code as gRPC clients print it: `RESOURCE_EXHAUSTED`.
pub fn code_name(code: tonic::Code) -> String {
    let debug = format!("{code:?}");
    let mut out = String::new();
    for (i, c) in debug.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// Serves `registry` on `addr` (`/metrics`); returns the bound address.
pub async fn serve(addr: SocketAddr, registry: Registry) -> std::io::Result<SocketAddr> {
    let registry = Arc::new(Mutex::new(registry));
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move {
                let mut body = String::new();
                let reg = registry.lock().unwrap_or_else(|p| p.into_inner());
                match prometheus_client::encoding::text::encode(&mut body, &reg) {
                    Ok(()) => ([(CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body)
                        .into_response(),
                    Err(_) => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "encoding failed").into_response(),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    #[test]
    fn code_names_match_grpc() {
        assert_eq!(super::code_name(tonic::Code::ResourceExhausted), "RESOURCE_EXHAUSTED");
        assert_eq!(super::code_name(tonic::Code::Ok), "OK");
    }
}
