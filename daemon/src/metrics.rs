//! The Prometheus endpoint (`GET /metrics`).

use std::net::SocketAddr;

use telemetry::metrics::Registry;

/// Serves the metrics `register` adds on `addr` (port 0 picks one) and
/// returns the bound address, which it also logs.
pub async fn serve(addr: SocketAddr, register: impl FnOnce(&mut Registry)) -> anyhow::Result<SocketAddr> {
    let mut registry = Registry::default();
    register(&mut registry);
    let bound = telemetry::metrics::serve(addr, registry)
        .await
        .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))?;
    tracing::info!("metrics on http://{bound}/metrics");
    Ok(bound)
}
