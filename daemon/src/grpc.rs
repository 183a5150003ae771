//! One gRPC server shape for every mesh daemon: the caller's services plus
//! health and reflection (listing what the listener serves), over TCP (or
//! TLS) with HTTP/2 settings chosen for many long-lived token streams,
//! stopping gracefully.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::codegen::http::{Request, Response};
use tonic::server::NamedService;
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Server, ServerTlsConfig};

use crate::gate::GateLayer;
use crate::health::HealthServer;

/// HTTP/2 settings for connections that carry thousands of long-lived
/// token streams, on the server and the client side. `Default` is the
/// mesh's choice (the constants below, each with its reason); a sidecar
/// reads its own from its config (`[http2]`), the node uses the defaults.
/// Unknown keys are judged by the sidecar's config loader, by the file's
/// config version (`sidecar::config::version`), so they are not denied here.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(default)]
pub struct Http2 {
    /// Streams a peer may open on one connection to this server.
    pub max_concurrent_streams: u32,
    /// Streams a peer may reset before this server accepts them.
    pub max_pending_accept_resets: usize,
    /// Bytes in flight on one connection, all its streams together.
    pub connection_window: u32,
    /// Bytes in flight on one stream, in what this side receives.
    pub stream_window: u32,
    #[serde(with = "humantime_serde")]
    pub keep_alive_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub keep_alive_timeout: Duration,
    /// How long a plaintext client may take to send the HTTP/2 preface.
    #[serde(with = "humantime_serde")]
    pub preface_timeout: Duration,
}

impl Default for Http2 {
    fn default() -> Self {
        Self {
            max_concurrent_streams: MAX_CONCURRENT_STREAMS,
            max_pending_accept_resets: MAX_PENDING_ACCEPT_RESETS,
            connection_window: CONNECTION_WINDOW,
            stream_window: STREAM_WINDOW,
            keep_alive_interval: HTTP2_KEEPALIVE_INTERVAL,
            keep_alive_timeout: HTTP2_KEEPALIVE_TIMEOUT,
            preface_timeout: crate::preface::PREFACE_TIMEOUT,
        }
    }
}

/// The largest flow-control window HTTP/2 allows (RFC 9113, 6.9.1).
const MAX_WINDOW: u32 = (1 << 31) - 1;

impl Http2 {
    /// The first setting out of range, as (`key`, problem).
    pub fn invalid(&self) -> Option<(&'static str, String)> {
        let window = |w: u32, min: u32| (min..=MAX_WINDOW).contains(&w);
        if self.max_concurrent_streams == 0 {
            return Some(("max_concurrent_streams", "must be at least 1".into()));
        }
        if !window(self.connection_window, 65_535) {
            return Some(("connection_window", format!("must be in [65535, {MAX_WINDOW}] bytes")));
        }
        if !window(self.stream_window, 1024) {
            return Some(("stream_window", format!("must be in [1024, {MAX_WINDOW}] bytes")));
        }
        if self.keep_alive_interval.is_zero() || self.keep_alive_timeout.is_zero() {
            return Some(("keep_alive_interval / keep_alive_timeout", "must be above zero".into()));
        }
        if self.preface_timeout.is_zero() {
            return Some(("preface_timeout", "must be above zero".into()));
        }
        None
    }
}

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
/// a bounded amount of memory per peer.
pub const CONNECTION_WINDOW: u32 = 16 << 20;

/// The per-stream receive window: what a peer may send on one stream before
/// this side reads it, so also what a stalled reader makes a sidecar buffer
/// per stream (20,000 stalled streams: 320 MiB; at h2's 64 KiB: 1.25 GiB;
/// hyper's server default is 1 MiB). A token message is tens of bytes, so
/// 16 KiB (hundreds of messages) never throttles a token stream; a request
/// larger than this (a prompt of more than ~4,000 words) takes one more
/// round trip per 16 KiB to arrive.
pub const STREAM_WINDOW: u32 = 16 << 10;

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

/// How one listener serves, beyond its services: HTTP/2 settings, TLS
/// (plaintext when `None`) and a gate in front of every service.
#[derive(Clone, Default)]
pub struct Listening {
    pub http2: Http2,
    pub tls: Option<ServerTlsConfig>,
    pub gate: GateLayer,
}

/// A listener's own services and their names, which its reflection lists
/// (beside health and reflection): a client sees what this listener serves,
/// not everything in the mesh contract. Names come from what is added, so
/// the list cannot drift from the routes.
#[derive(Default)]
pub struct Services {
    routes: Routes,
    names: Vec<&'static str>,
}

impl Services {
    /// `svc` alone; add more with [`Services::add_service`].
    pub fn new<S>(svc: S) -> Self
    where
        S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + NamedService,
        S: Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
    {
        Self::default().add_service(svc)
    }

    /// `svc` beside those already added, under its own name.
    pub fn add_service<S>(mut self, svc: S) -> Self
    where
        S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + NamedService,
        S: Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
    {
        self.names.push(S::NAME);
        self.routes = self.routes.add_service(svc);
        self
    }

    /// The names of the services added, in order.
    pub fn names(&self) -> &[&'static str] {
        &self.names
    }
}

/// Serves `services` plus `health` and reflection (v1 and v1alpha, listing
/// exactly those) on `listener` until `shutdown` resolves; then stops
/// accepting and waits for open streams to end (drain them before resolving
/// `shutdown`).
///
/// Callers build `services` as
/// `Services::new(GenerationServer::new(svc)).add_service(AdminServer::new(admin))`.
pub async fn serve(
    how: Listening,
    listener: TcpListener,
    health: HealthServer,
    services: Services,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let http2 = how.http2;
    let mut builder = Server::builder()
        .max_concurrent_streams(http2.max_concurrent_streams)
        .initial_connection_window_size(http2.connection_window)
        .initial_stream_window_size(http2.stream_window)
        .http2_keepalive_interval(Some(http2.keep_alive_interval))
        .http2_keepalive_timeout(Some(http2.keep_alive_timeout))
        .http2_max_pending_accept_reset_streams(Some(http2.max_pending_accept_resets));
    let plaintext = how.tls.is_none();
    if let Some(tls) = how.tls {
        builder = builder.tls_config(tls)?;
    }
    // The builder's TCP options do not apply to an incoming stream: set them here.
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true)) // small frames (a token, a refusal) must not wait for a delayed ACK
        .with_keepalive(Some(TCP_KEEPALIVE));
    // TLS listeners are bounded by the handshake timeout, plaintext ones by screening.
    let incoming: Incoming = match plaintext {
        true => Box::pin(crate::preface::screened(incoming, http2.preface_timeout)),
        false => Box::pin(incoming),
    };
    let Services { routes, names } = services.add_service(health);
    let routes = crate::reflection::add(routes, &names);
    builder.layer(how.gate).add_routes(routes).serve_with_incoming_shutdown(incoming, shutdown).await
}

type Incoming = std::pin::Pin<Box<dyn futures_core::Stream<Item = std::io::Result<TcpStream>> + Send>>;

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    use super::*;
    use crate::health::{GENERATION, Health};

    #[tokio::test]
    async fn serves_health_and_stops_on_shutdown() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (health, health_server) = Health::new();
        health.set(true).await;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let services = Services::default();
        let server = tokio::spawn(serve(Listening::default(), listener, health_server, services, async {
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
