//! The inbound side's first gate after tracing: whether this sidecar takes
//! the call at all. It refuses while draining (so callers go elsewhere at
//! once) and refuses a service its node does not serve.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tonic::Status;

use crate::stack::{Call, Next, Reply, Step, pass};

/// Switched on once, when the sidecar starts draining.
#[derive(Clone, Default)]
pub struct Draining(Arc<AtomicBool>);

impl Draining {
    pub fn start(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    fn is_on(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

pub struct Accept {
    pub service: String,
    pub draining: Draining,
}

impl Step for Accept {
    async fn call(&self, call: Call, next: Next) -> Result<Reply, Status> {
        if self.draining.is_on() {
            return Err(Status::unavailable("sidecar is draining; send new requests elsewhere"));
        }
        let model = &call.req.model;
        if !model.is_empty() && *model != self.service {
            return Err(Status::not_found(format!("service {model:?} is not served here ({:?} is)", self.service)));
        }
        pass(next, call).await
    }
}
