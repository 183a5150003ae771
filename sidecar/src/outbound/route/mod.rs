//! The bottom of the outbound stack: picks an instance of the service
//! anywhere in the mesh, retries a call that fails before its first token
//! on another instance (within the service's retry budget), and moves a
//! stream whose instance fails mid-way to another one, continuing from the
//! tokens already sent.

mod attempt;
mod relay;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::metadata::MetadataMap;
use tonic::{Code, Status};
use tower::retry::budget::{Budget, TpsBudget};

use super::balancer::Balancer;
use crate::config::Routing;
use crate::metrics::SidecarMetrics;
use crate::stack::{Call, Next, Reply, last, retry_later};
use attempt::Bounds;

/// How long a deposit counts toward a service's retry budget.
const BUDGET_WINDOW: Duration = Duration::from_secs(10);

pub struct Route {
    balancer: Arc<Balancer>,
    routing: Routing,
    budgets: Budgets,
    metrics: SidecarMetrics,
}

impl Route {
    pub fn new(balancer: Arc<Balancer>, routing: Routing, metrics: SidecarMetrics) -> Self {
        let budgets = Budgets::new(&routing);
        Self { balancer, routing, budgets, metrics }
    }

    /// The route as the last service of a stack.
    pub fn service(self) -> Next {
        let this = Arc::new(self);
        last(move |call| this.clone().serve(call))
    }

    async fn serve(self: Arc<Self>, call: Call) -> Result<Reply, Status> {
        self.budgets.get(&call.req.model).deposit();
        let bounds = Bounds { deadline: call.deadline, queue_wait: call.queue_wait() };
        let opened = self.open(&call.req, &[], bounds, &mut HashSet::new(), &call.span).await?;
        Ok(Reply { metadata: MetadataMap::new(), stream: relay::stream(self, call, opened) })
    }

    /// Takes one retry (or migration) from the service's budget, if it allows.
    fn withdraw(&self, service: &str) -> bool {
        self.budgets.get(service).withdraw()
    }
}

/// One retry budget per service, so one failing service cannot spend the
/// retries another needs. tower's `TpsBudget` does the accounting: retries
/// may add `routing.retry_ratio` of the window's requests plus
/// `routing.retry_floor_per_sec` (rounded to whole retries), so failures
/// never turn into a retry storm.
struct Budgets {
    ratio: f32,
    floor_per_sec: u32,
    by_service: Mutex<HashMap<String, Arc<TpsBudget>>>,
}

impl Budgets {
    fn new(routing: &Routing) -> Self {
        let floor_per_sec = routing.retry_floor_per_sec.round() as u32;
        Self { ratio: routing.retry_ratio as f32, floor_per_sec, by_service: Mutex::default() }
    }

    /// The service's budget (services are only those in the registry).
    fn get(&self, service: &str) -> Arc<TpsBudget> {
        let mut all = self.by_service.lock().unwrap_or_else(|p| p.into_inner());
        let new = || Arc::new(TpsBudget::new(BUDGET_WINDOW, self.floor_per_sec, self.ratio));
        all.entry(service.to_string()).or_insert_with(new).clone()
    }
}

/// No instance could take the call: UNAVAILABLE, a server-side failure
/// the error-ratio alert counts, also when the service has none left at all
/// (a service never registered is NOT_FOUND earlier, in `service_slot`).
fn no_instance(service: &str, registered: usize) -> Status {
    let message = match registered {
        0 => format!("no instances of service {service:?} are available now; retry later"),
        _ => format!("no healthy instance of service {service:?}; retry later"),
    };
    retry_later(Code::Unavailable, message, Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_are_capped_by_ratio_plus_floor_and_recover_with_time() {
        let routing = Routing { retry_ratio: 0.2, retry_floor_per_sec: 1.0, ..Routing::default() };
        let budgets = Budgets::new(&routing);
        let chat = budgets.get("chat");
        for _ in 0..100 {
            chat.deposit();
        }
        // 100 requests * 0.2 + 1/s * 10 s = 30 retries.
        assert_eq!((0..100).filter(|_| chat.withdraw()).count(), 30);
        // Another service's budget is its own.
        assert_eq!((0..100).filter(|_| budgets.get("code").withdraw()).count(), 10);
        // Once the window has passed, the budget is back to the floor.
        tokio::time::advance(BUDGET_WINDOW + Duration::from_secs(1)).await;
        assert_eq!((0..100).filter(|_| chat.withdraw()).count(), 10);
    }
}
