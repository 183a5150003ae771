//! A listener-wide check on every request, by path and headers, before any
//! gRPC service sees it: what a listener's own services cannot do for the
//! services `daemon::grpc` adds to every server (health, reflection).
//! Built on tower's `Layer`, as tonic's `Server::layer` expects.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::future::{Either, Ready, ready};
use prometheus_client::metrics::counter::Counter;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower::{Layer, Service};

/// Decides whether one request may reach the listener's services. A refusal
/// is answered as a gRPC status; nothing behind the gate runs. A gate may
/// leave what it learned (the caller's identity) in the request's
/// extensions for the services.
pub trait Gate: Send + Sync + 'static {
    fn admit(&self, req: &mut Request<Body>) -> Result<(), Status>;
}

/// A health check from this host (systemd, a local probe), which every
/// gate lets through.
pub fn local_health<B>(req: &Request<B>) -> bool {
    let local = remote_addr(req).is_some_and(|a| a.ip().to_canonical().is_loopback());
    local && req.uri().path().starts_with(HEALTH_PATH)
}

/// Where `grpc.health.v1` methods live.
const HEALTH_PATH: &str = "/grpc.health.v1.Health/";

/// The TCP address the request came from, over plaintext or TLS.
pub fn remote_addr<B>(req: &Request<B>) -> Option<SocketAddr> {
    let ext = req.extensions();
    ext.get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| ext.get::<TlsConnectInfo<TcpConnectInfo>>().and_then(|t| t.get_ref().remote_addr()))
}

/// How often a listener logs that it refused requests: a flood of
/// refusals (a scanner, a misconfigured client) is one line per interval
/// and a counter, not one line each.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// A listener's gate and its count of refusals. The default passes
/// everything (no gate).
#[derive(Clone, Default)]
pub struct GateLayer(Option<Arc<Guard>>);

struct Guard {
    gate: Box<dyn Gate>,
    listener: &'static str,
    refused: Counter,
    last_warned: Mutex<Option<Instant>>,
}

impl GateLayer {
    /// `gate` in front of the listener named `listener` (for the log), with
    /// each refusal counted in `refused`.
    pub fn new(listener: &'static str, gate: impl Gate, refused: Counter) -> Self {
        Self(Some(Arc::new(Guard { gate: Box::new(gate), listener, refused, last_warned: Mutex::new(None) })))
    }
}

impl Guard {
    fn admit(&self, req: &mut Request<Body>) -> Result<(), Status> {
        let Err(refusal) = self.gate.admit(req) else { return Ok(()) };
        let total = self.refused.inc() + 1;
        let mut last = self.last_warned.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= WARN_INTERVAL) {
            *last = Some(Instant::now());
            let (path, peer) = (req.uri().path(), remote_addr(req));
            tracing::warn!(listener = self.listener, path, ?peer, code = ?refusal.code(), reason = refusal.message(),
                refused_so_far = total, "refused a request (logged at most every 10 s; all are counted)");
        }
        Err(refusal)
    }
}

impl<S> Layer<S> for GateLayer {
    type Service = Gated<S>;

    fn layer(&self, inner: S) -> Gated<S> {
        Gated { inner, guard: self.0.clone() }
    }
}

#[derive(Clone)]
pub struct Gated<S> {
    inner: S,
    guard: Option<Arc<Guard>>,
}

impl<S> Service<Request<Body>> for Gated<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Response<Body>, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        match self.guard.as_ref().map(|g| g.admit(&mut req)) {
            Some(Err(status)) => Either::Left(ready(Ok(status.into_http()))),
            _ => Either::Right(self.inner.call(req)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use tower::ServiceExt;

    use super::*;

    struct OnlyHealth;

    impl Gate for OnlyHealth {
        fn admit(&self, req: &mut Request<Body>) -> Result<(), Status> {
            match req.uri().path().starts_with(HEALTH_PATH) {
                true => Ok(()),
                false => Err(Status::permission_denied(format!("{} is closed", req.uri().path()))),
            }
        }
    }

    fn request(path: &str) -> Request<Body> {
        Request::builder().uri(path).body(Body::empty()).unwrap()
    }

    #[tokio::test]
    async fn a_refused_request_is_a_status_and_never_reaches_the_service() {
        let reached =
            tower::service_fn(|_req: Request<Body>| async { Ok::<_, Infallible>(Response::new(Body::empty())) });
        let count = Counter::default();
        let gated = GateLayer::new("test", OnlyHealth, count.clone()).layer(reached);
        let refused = gated.clone().oneshot(request("/mesh.v1.SidecarAdmin/Instances")).await.unwrap();
        let status = Status::from_header_map(refused.headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert_eq!(status.message(), "/mesh.v1.SidecarAdmin/Instances is closed");
        let passed = gated.oneshot(request("/grpc.health.v1.Health/Check")).await.unwrap();
        assert!(Status::from_header_map(passed.headers()).is_none(), "reached the service");
        assert_eq!(count.get(), 1);
    }
}
