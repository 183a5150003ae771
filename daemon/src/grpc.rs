//! One gRPC server shape for every mesh daemon: the caller's services plus
//! health and reflection, over TCP (or TLS) with HTTP/2 settings chosen for
//! many long-lived token streams, stopping gracefully.

use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Server, ServerTlsConfig};

use crate::health::HealthServer;

/// Streams one HTTP/2 connection may carry at once. A sidecar pools one
/// connection per peer, so 10,000+ concurrent generations can share a
/// single connection; admission belongs to the bulkhead and the scheduler,
/// which refuse with a status and a retry hint, whereas a transport cap
/// makes the client queue streams silently (no error, no metric). So the
/// cap sits far above any admission limit and only bounds what a broken
/// peer can make us hold. (hyper alone would default to 200.)
pub const MAX_CONCURRENT_STREAMS: u32 = 1 << 16;

/// The shared connection window. h2's 64 KiB default is one window for
/// every stream on the connection; with thousands of streams each sending
/// small token frames it would throttle all of them together. 16 MiB stays
/// a bounded amount of memory per peer. Streams keep the 64 KiB default.
pub const CONNECTION_WINDOW: u32 = 16 << 20;

/// HTTP/2 PING interval. A peer that vanished without a FIN (host down,
/// network cut) holds scheduler slots and bulkhead permits until noticed;
/// queued streams send nothing, so pings are what notices. 20 s is far
/// above gRPC clients' minimum ping interval policy and cheap.
pub const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);

/// How long a PING may go unanswered before the connection (and every
/// stream on it) is closed: a dead peer is found within ~30 s, the node's
/// default drain grace.
pub const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// TCP keepalive idle time: keeps idle pooled connections alive through
/// NAT and conntrack tables (which commonly drop idle flows after minutes)
/// and lets the kernel reap half-open ones.
pub const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// Streams a peer may reset before the server accepts them, before the
/// connection is closed with GOAWAY (the HTTP/2 rapid-reset defence). h2
/// allows 20, which a burst of legitimate cancellations across thousands of
/// streams on one connection can exceed; a GOAWAY would then kill every
/// other stream on it.
pub const MAX_PENDING_ACCEPT_RESETS: usize = 1024;

/// Serves `routes` plus `health` and reflection on `listener` (over TLS
/// when `tls` is set) until `shutdown` resolves; then stops accepting and
/// waits for open streams to end (drain them before resolving `shutdown`).
///
/// Callers build `routes` as
/// `Routes::new(GenerationServer::new(svc)).add_service(AdminServer::new(admin))`.
pub async fn serve(
    listener: TcpListener,
    tls: Option<ServerTlsConfig>,
    health: HealthServer,
    routes: Routes,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let mut builder = Server::builder()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_ACCEPT_RESETS));
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    // The builder's TCP options do not apply to an incoming stream: set them here.
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true)) // small frames (a token, a refusal) must not wait for a delayed ACK
        .with_keepalive(Some(TCP_KEEPALIVE));
    builder
        .add_routes(routes.add_service(health).add_service(reflection()))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// `grpc.reflection.v1` over the mesh contract and health, so `grpcurl`
/// works without .proto files.
fn reflection()
-> tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(mesh_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        // Both sets are compiled in; the test below builds them.
        .expect("the embedded descriptor sets are valid")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    use super::*;
    use crate::health::{GENERATION, Health};

    #[test]
    fn the_embedded_descriptor_sets_build() {
        let _ = reflection();
    }

    #[tokio::test]
    async fn serves_health_and_stops_on_shutdown() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (health, health_server) = Health::new();
        health.set(true).await;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let routes = Routes::default();
        let server = tokio::spawn(serve(listener, None, health_server, routes, async {
            let _ = stopped.await;
        }));

        let channel =
            tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
        let mut client = HealthClient::new(channel);
        let status = client.check(HealthCheckRequest { service: GENERATION.into() }).await.unwrap();
        assert_eq!(status.get_ref().status(), ServingStatus::Serving);

        drop(client);
        stop.send(()).unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(5), server).await;
        assert!(matches!(ended, Ok(Ok(Ok(())))), "the server stops when shutdown resolves");
    }
}
