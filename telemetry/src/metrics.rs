//! Prometheus metrics: a registry each process fills, served as text on
//! `GET /metrics`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::{HeaderMap, StatusCode};
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

/// Who may read `/metrics`: anyone who reaches the port, or callers
/// presenting `authorization: Bearer <token>` that `accepts` approves
/// (the caller compares in constant time).
pub type Access = Option<Arc<dyn Fn(&str) -> bool + Send + Sync>>;

/// Serves `registry` on `addr` (`/metrics`); returns the bound address.
pub async fn serve(addr: SocketAddr, registry: Registry, access: Access) -> std::io::Result<SocketAddr> {
    let registry = Arc::new(Mutex::new(registry));
    let app = Router::new().route(
        "/metrics",
        get(move |headers: HeaderMap| {
            let (registry, access) = (registry.clone(), access.clone());
            async move {
                if let Some(accepts) = access {
                    let bearer = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok());
                    if !bearer.and_then(|h| h.strip_prefix("Bearer ")).is_some_and(|t| accepts(t.trim())) {
                        let message = "metrics need `authorization: Bearer <token>` (the metrics token)";
                        return (StatusCode::UNAUTHORIZED, message).into_response();
                    }
                }
                encoded(&registry)
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

fn encoded(registry: &Mutex<Registry>) -> axum::response::Response {
    let mut body = String::new();
    let reg = registry.lock().unwrap_or_else(|p| p.into_inner());
    match prometheus_client::encoding::text::encode(&mut body, &reg) {
        Ok(()) => {
            ([(CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body).into_response()
        }
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "encoding failed").into_response(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn code_names_match_grpc() {
        assert_eq!(super::code_name(tonic::Code::ResourceExhausted), "RESOURCE_EXHAUSTED");
        assert_eq!(super::code_name(tonic::Code::Ok), "OK");
    }
}
