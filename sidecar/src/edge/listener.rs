//! The edge's HTTP/1.1 listener. Written on hyper's connection builder
//! rather than `axum::serve`, which sets no timer, so a client could hold
//! a connection open by sending its headers a byte at a time; here the
//! headers must arrive within [`HEADER_READ_TIMEOUT`].
//!
//! HTTP/1.1 only: OpenAI's SDKs and curl speak it, and each stream is its
//! own connection, so no connection-level flow control sits between
//! streams. HTTP/1.0 (no chunked responses, so no event streams) is
//! refused with 426 in OpenAI's error shape.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::http::{Request, StatusCode, Version};
use axum::response::IntoResponse;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tower::ServiceExt;

use super::ApiError;

/// How long a client may take to send a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The most a request's headers may take (hyper's read buffer).
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Serves `router` on `addr` until `stop` turns true, then lets open
/// responses finish. Returns the bound address (port 0 picks one).
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("listen.http {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    tracing::info!("HTTP edge listening on http://{bound}/v1");
    Ok((bound, tokio::spawn(accept(listener, router, stop))))
}

/// Serves connections until `stop`; then ends once every open connection
/// has finished its response (each shuts down gracefully), so the drain
/// can wait for the edge's streams too.
async fn accept(listener: TcpListener, router: Router, mut stop: watch::Receiver<bool>) {
    let mut open = tokio::task::JoinSet::new();
    loop {
        while open.try_join_next().is_some() {} // reap finished connections
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|s| *s) => break,
        };
        match accepted {
            Ok((tcp, _)) => {
                open.spawn(connection(tcp, router.clone(), stop.clone()));
            }
            // Out of file descriptors, say: back off instead of spinning.
            Err(e) => {
                tracing::warn!("HTTP edge cannot accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop(listener);
    while open.join_next().await.is_some() {}
}

async fn connection(tcp: TcpStream, router: Router, mut stop: watch::Receiver<bool>) {
    let _ = tcp.set_nodelay(true); // an event of one token must not wait for a delayed ACK
    let service = tower::service_fn(move |req: Request<Incoming>| {
        let router = router.clone();
        async move {
            if req.version() < Version::HTTP_11 {
                let refused = ApiError::new(StatusCode::UPGRADE_REQUIRED, "HTTP/1.0 is not served: use HTTP/1.1");
                return Ok(refused.into_response());
            }
            router.oneshot(req.map(axum::body::Body::new)).await
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .serve_connection(TokioIo::new(tcp), TowerToHyperService::new(service));
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = stop.wait_for(|s| *s) => conn.as_mut().graceful_shutdown(),
    }
    let _ = conn.await;
}
