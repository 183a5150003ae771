//! How the sidecar dials another gRPC server (an instance's sidecar, or its
//! own node): one place for the HTTP/2 settings, so both clients carry
//! thousands of long-lived token streams the same way.

use std::time::Duration;

use daemon::grpc::{CONNECTION_WINDOW, HTTP2_KEEPALIVE_INTERVAL, HTTP2_KEEPALIVE_TIMEOUT, TCP_KEEPALIVE};
use tonic::transport::{ClientTlsConfig, Endpoint};

/// A peer that does not accept a connection within this is down (or not
/// there); the attempt fails fast and goes elsewhere.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The per-stream receive window: what one stream may have in flight
/// unread. A token message is tens of bytes, so h2's 64 KiB never throttles
/// a stream; it is set explicitly because it is also what a slow caller can
/// make the sidecar buffer per stream (10,000 streams: at most 640 MiB),
/// and a larger window would multiply that.
const STREAM_WINDOW: u32 = 64 << 10;

/// An endpoint for `address` with the mesh's client HTTP/2 settings:
///
/// - Connection window 16 MiB (the servers' own): the connection window is
///   shared by every stream on it, and h2's 64 KiB would throttle thousands
///   of streams together. No adaptive window: BDP probing adds pings and
///   matters for bulk transfers, not for token frames.
/// - Keep-alive PINGs every 20 s, answered within 10 s, only while streams
///   are open (the daemon kit's server values): a peer that vanished without
///   a FIN is noticed in ~30 s rather than holding streams and bulkhead
///   slots until the OS gives up. Not more often: the mesh servers (hyper)
///   do not police pings, but gRPC servers commonly allow one per 5 min by
///   default when idle and close the connection with ENHANCE_YOUR_CALM past
///   that, which would kill every stream on it; idle pooled connections are
///   kept through NAT by TCP keep-alive instead.
/// - No concurrency limit and no request buffer: the outbound bulkhead
///   (`max_streams_per_service`) and the instance's admission refuse with a
///   status and a retry hint, whereas a transport cap would queue streams
///   silently, and a local wait would read as the instance being slow.
pub fn endpoint(address: &str, tls: Option<ClientTlsConfig>) -> Result<Endpoint, tonic::transport::Error> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let endpoint = Endpoint::from_shared(format!("{scheme}://{address}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true) // a token must not wait for a delayed ACK
        .tcp_keepalive(Some(TCP_KEEPALIVE))
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .http2_adaptive_window(false)
        .http2_keep_alive_interval(HTTP2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(HTTP2_KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(false);
    match tls {
        Some(tls) => endpoint.tls_config(tls),
        None => Ok(endpoint),
    }
}
