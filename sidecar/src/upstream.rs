//! How the sidecar dials another gRPC server (an instance's sidecar, or its
//! own node): one place for the HTTP/2 settings, so both clients carry
//! thousands of long-lived token streams the same way.

use std::sync::Arc;
use std::time::Duration;

use daemon::grpc::{Http2, TCP_KEEPALIVE};
use daemon::server_identity::ServerRoles;
use tonic::transport::{ClientTlsConfig, Endpoint};

/// A peer that does not accept a connection within this is down (or not
/// there); the attempt fails fast and goes elsewhere.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// What every connection this sidecar dials is made with.
#[derive(Clone, Default)]
pub struct Dialer {
    /// This host's certificate and what servers must prove; `None` in plaintext.
    pub tls: Option<TlsDial>,
    /// The config's `[http2]` (windows, keep-alive).
    pub http2: Http2,
}

/// Mutual TLS as a client: this host's certificate, presented to every
/// server, and the roles a server's certificate must carry.
#[derive(Clone)]
pub struct TlsDial {
    /// The identity only: the CA is in the verifiers.
    pub config: ClientTlsConfig,
    /// Instances are other sidecars' inbound sides.
    pub instances: Arc<ServerRoles>,
    /// The node presents a node's certificate, or (as deployed) its host's,
    /// a sidecar's; the role is checked, not the host.
    pub node: Arc<ServerRoles>,
}

/// Who is dialed.
#[derive(Clone, Copy)]
pub enum Peer {
    Instance,
    Node,
}

impl Dialer {
    /// An endpoint for `address` with the mesh's client HTTP/2 settings:
    ///
    /// - Stream window `http2.stream_window` (16 KiB): a token message is
    ///   tens of bytes, and it bounds what a slow caller can make the
    ///   sidecar buffer per stream.
    /// - Connection window `http2.connection_window` (16 MiB, the servers'
    ///   own): shared by every stream on it; h2's 64 KiB would throttle
    ///   thousands of streams together. No adaptive window: BDP probing adds
    ///   pings and matters for bulk transfers, not for token frames.
    /// - Keep-alive PINGs every `http2.keep_alive_interval` (20 s), answered
    ///   within `http2.keep_alive_timeout` (10 s), only while streams are
    ///   open: a peer that vanished without a FIN is noticed in ~30 s rather
    ///   than holding streams and bulkhead slots until the OS gives up. Not
    ///   more often: gRPC servers commonly allow one ping per 5 min when
    ///   idle and close the connection with ENHANCE_YOUR_CALM past that,
    ///   which would kill every stream on it; idle pooled connections are
    ///   kept through NAT by TCP keep-alive instead.
    /// - No concurrency limit and no request buffer: the outbound bulkhead
    ///   (`max_streams_per_service`) and the instance's admission refuse
    ///   with a status and a retry hint, whereas a transport cap would queue
    ///   streams silently, and a local wait would read as the instance being
    ///   slow.
    pub fn endpoint(&self, address: &str, peer: Peer) -> Result<Endpoint, tonic::transport::Error> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let http2 = &self.http2;
        let endpoint = Endpoint::from_shared(format!("{scheme}://{address}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true) // a token must not wait for a delayed ACK
            .tcp_keepalive(Some(TCP_KEEPALIVE))
            .initial_stream_window_size(http2.stream_window)
            .initial_connection_window_size(http2.connection_window)
            .http2_adaptive_window(false)
            .http2_keep_alive_interval(http2.keep_alive_interval)
            .keep_alive_timeout(http2.keep_alive_timeout)
            .keep_alive_while_idle(false);
        let Some(tls) = &self.tls else { return Ok(endpoint) };
        let verifier = match peer {
            Peer::Instance => tls.instances.clone(),
            Peer::Node => tls.node.clone(),
        };
        endpoint.tls_config_with_verifier(tls.config.clone(), verifier)
    }
}
