//! Per-service stream slots: this sidecar opens at most
//! `routing.max_streams_per_service` streams to any one service, so one
//! service's flood cannot take every stream (and socket) the others need.
//! Only services the registry has named get slots, so a caller cannot grow
//! the table with made-up names; a name it never had is NOT_FOUND (the
//! caller's mistake), while one whose instances all left goes on to the
//! route, which answers UNAVAILABLE (an outage).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Code, Status};

use crate::metrics::SidecarMetrics;
use crate::stack::{Call, Next, Reply, Step, Watch, pass, retry_later};

/// How long a caller refused for want of a slot is told to wait.
const RETRY_AFTER: Duration = Duration::from_millis(200);

/// Whether the registry has named a service since the sidecar started
/// (`Balancer::knows`), whether or not it has instances now.
pub type Known = Arc<dyn Fn(&str) -> bool + Send + Sync>;

pub struct ServiceSlot {
    limit: usize,
    known: Known,
    slots: Mutex<HashMap<String, Arc<Semaphore>>>,
    metrics: SidecarMetrics,
}

impl ServiceSlot {
    pub fn new(limit: usize, known: Known, metrics: SidecarMetrics) -> Self {
        Self { limit, known, slots: Mutex::default(), metrics }
    }

    fn take(&self, service: &str) -> Result<OwnedSemaphorePermit, Status> {
        let sem = {
            let mut all = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            all.entry(service.to_string()).or_insert_with(|| Arc::new(Semaphore::new(self.limit))).clone()
        };
        sem.try_acquire_owned().map_err(|_| {
            let limit = self.limit;
            let message = format!(
                "this sidecar already has {limit} streams open to service {service:?}; retry after {RETRY_AFTER:?}"
            );
            retry_later(Code::ResourceExhausted, message, RETRY_AFTER)
        })
    }
}

impl Step for ServiceSlot {
    async fn call(&self, call: Call, next: Next) -> Result<Reply, Status> {
        let service = call.req.model.clone();
        if service.is_empty() {
            return Err(Status::invalid_argument("model is required: it names the service to route to"));
        }
        if !(self.known)(&service) {
            return Err(Status::not_found(format!("service {service:?} is not registered in the mesh")));
        }
        let permit = self.take(&service)?;
        let reply = pass(next, call).await?;
        let in_flight = self.metrics.in_flight.get_or_create(&self.metrics.service(&service)).clone();
        in_flight.inc();
        Ok(reply.watched(Slot { _permit: permit, in_flight }))
    }
}

/// A stream's slot, given back (and the in-flight gauge lowered) at its end.
struct Slot {
    _permit: OwnedSemaphorePermit,
    in_flight: Gauge,
}

impl Watch for Slot {
    fn end(self, _: crate::stack::End<'_>) {
        self.in_flight.dec();
    }
}

#[cfg(test)]
mod tests {
    use mesh_proto::metadata as md;
    use tokio_stream::StreamExt;

    use super::*;
    use crate::stack::testing::{call, ok_inner, read_to_end};

    fn slots(limit: usize, metrics: &SidecarMetrics) -> ServiceSlot {
        ServiceSlot::new(limit, Arc::new(|s| s == "chat"), metrics.clone())
    }

    fn in_flight(metrics: &SidecarMetrics) -> i64 {
        metrics.in_flight.get_or_create(&metrics.service("chat")).get()
    }

    #[tokio::test]
    async fn only_named_known_services_get_slots() {
        let slots = slots(2, &SidecarMetrics::new());
        let (next, calls) = ok_inner(1);
        let unnamed = slots.call(call(""), next.clone()).await.err().unwrap();
        assert_eq!(unnamed.code(), Code::InvalidArgument);
        let unknown = slots.call(call("made-up"), next.clone()).await.err().unwrap();
        assert_eq!(unknown.code(), Code::NotFound);
        assert!(slots.slots.lock().unwrap().is_empty(), "no slot table entry for an unknown service");
        assert_eq!(calls.get(), 0);
    }

    #[tokio::test]
    async fn a_stream_over_the_limit_is_refused_until_one_ends_or_is_dropped() {
        let metrics = SidecarMetrics::new();
        let slots = slots(2, &metrics);
        let (next, calls) = ok_inner(2);
        let mut first = slots.call(call("chat"), next.clone()).await.unwrap();
        let mut second = slots.call(call("chat"), next.clone()).await.unwrap();
        assert_eq!(in_flight(&metrics), 2);

        let refused = slots.call(call("chat"), next.clone()).await.err().unwrap();
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert!(refused.metadata().get(md::RETRY_AFTER_MS).is_some());
        assert!(refused.message().contains("2 streams") && refused.message().contains("\"chat\""), "{refused:?}");
        assert_eq!(calls.get(), 2, "a refused call does not reach the route");

        // The first stream ends (its reply still held): its slot comes back.
        assert_eq!(read_to_end(&mut first.stream).await.unwrap(), 2);
        assert_eq!(in_flight(&metrics), 1);
        let third = slots.call(call("chat"), next.clone()).await.unwrap();

        // The second is dropped mid-way: its slot comes back too.
        assert!(second.stream.next().await.unwrap().is_ok());
        drop(second);
        assert_eq!(in_flight(&metrics), 1);
        let fourth = slots.call(call("chat"), next.clone()).await.unwrap();
        assert_eq!(in_flight(&metrics), 2);

        drop((first, third, fourth));
        assert_eq!(in_flight(&metrics), 0);
    }
}
