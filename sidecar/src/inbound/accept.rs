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

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;
    use crate::stack::testing::{call, ok_inner};

    #[tokio::test]
    async fn passes_its_own_service_refuses_others_and_everything_once_draining() {
        let accept = Accept { service: "chat".into(), draining: Draining::default() };
        let (next, calls) = ok_inner(1);
        assert!(accept.call(call("chat"), next.clone()).await.is_ok());
        assert_eq!(calls.get(), 1);

        let other = accept.call(call("code"), next.clone()).await.err().unwrap();
        assert_eq!(other.code(), Code::NotFound);
        assert!(other.message().contains("\"code\"") && other.message().contains("\"chat\""), "{other:?}");

        accept.draining.start();
        let drained = accept.call(call("chat"), next.clone()).await.err().unwrap();
        assert_eq!(drained.code(), Code::Unavailable);
        assert_eq!(calls.get(), 1, "refused calls never reach the node");
    }
}
