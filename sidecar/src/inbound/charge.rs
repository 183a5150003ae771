//! Tenant limits as a layer: a call is charged one request and its
//! `max_tokens` against its tenant's buckets before it may queue; what the
//! stream did not use is refunded when it ends, however it ends.

use std::sync::Arc;
use std::time::Instant;

use mesh_proto::metadata as md;
use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

use super::tenants::Tenants;
use crate::metrics::{LimitLabels, SidecarMetrics};
use crate::stack::{Call, End, Next, Reply, Step, Watch, pass_watched, retry_later};
use crate::wire::Relayed;

/// max_tokens charged to a tenant when the request leaves it to the node.
const DEFAULT_CHARGE: u32 = 256;

pub struct ChargeTenant {
    pub tenants: Arc<Tenants>,
    pub metrics: SidecarMetrics,
}

impl Step for ChargeTenant {
    async fn call(&self, call: Call, next: Next) -> Result<Reply, Status> {
        let tenant = call.req.tenant.clone();
        let charge = match call.req.sampling.as_ref().map_or(0, |s| s.max_tokens) {
            0 => DEFAULT_CHARGE,
            n => n,
        };
        if let Err(over) = self.tenants.charge(&tenant, charge, Instant::now()) {
            self.metrics.rate_limited.get_or_create(&LimitLabels { limit: over.what.to_string() }).inc();
            let message = format!(
                "tenant {tenant:?} is over its {} limit of {}; retry after {:?}",
                over.what, over.limit, over.retry_after
            );
            let mut refused = retry_later(Code::ResourceExhausted, message, over.retry_after);
            refused.metadata_mut().insert(md::TENANT_LIMITED, MetadataValue::from_static("1"));
            return Err(refused);
        }
        let refund = Refund { tenants: self.tenants.clone(), tenant, charge, used: 0 };
        pass_watched(next, call, refund).await
    }
}

/// Counts the tokens a stream used and refunds the rest at its end.
struct Refund {
    tenants: Arc<Tenants>,
    tenant: String,
    charge: u32,
    used: u32,
}

impl Watch for Refund {
    fn message(&mut self, msg: &Relayed) {
        self.used = self.used.saturating_add(msg.token_ids().len() as u32);
    }

    fn end(self, _: End<'_>) {
        self.tenants.refund(&self.tenant, self.charge.saturating_sub(self.used));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use mesh_proto::metadata as md;
    use mesh_proto::v1::SamplingParams;

    use super::*;
    use crate::config::TenantLimits;
    use crate::stack::testing::{call, ok_inner, read_to_end, refusing};

    /// Tenant `acme` may have 10 tokens outstanding (they refill at 1/6 per second).
    fn charge(metrics: &SidecarMetrics) -> ChargeTenant {
        let limits = TenantLimits { requests_per_sec: 100.0, tokens_per_min: 10.0 };
        let tenants = Tenants::new(BTreeMap::from([("acme".to_string(), limits)]));
        ChargeTenant { tenants: Arc::new(tenants), metrics: metrics.clone() }
    }

    fn asking(max_tokens: u32) -> Call {
        let mut call = call("chat");
        call.req.tenant = "acme".into();
        call.req.sampling = Some(SamplingParams { max_tokens, ..Default::default() });
        call
    }

    #[tokio::test]
    async fn over_the_limit_is_refused_with_a_retry_after_and_counted() {
        let metrics = SidecarMetrics::new();
        let charge = charge(&metrics);
        let (next, calls) = ok_inner(2);
        let _running = charge.call(asking(10), next.clone()).await.unwrap();
        let refused = charge.call(asking(10), next.clone()).await.err().unwrap();
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert!(refused.metadata().get(md::RETRY_AFTER_MS).is_some());
        assert!(refused.metadata().get(md::TENANT_LIMITED).is_some(), "not to be degraded to an overflow service");
        let limit = LimitLabels { limit: "tokens_per_min".into() };
        assert_eq!(metrics.rate_limited.get_or_create(&limit).get(), 1);
        assert_eq!(calls.get(), 1);
    }

    #[tokio::test]
    async fn the_unused_tokens_are_refunded_when_the_stream_ends() {
        let charge = charge(&SidecarMetrics::new());
        let (next, _) = ok_inner(2);
        let mut reply = charge.call(asking(10), next.clone()).await.unwrap();
        assert!(charge.call(asking(8), next.clone()).await.is_err(), "all 10 are charged while it runs");
        assert_eq!(read_to_end(&mut reply.stream).await.unwrap(), 2);
        assert!(charge.call(asking(9), next.clone()).await.is_err(), "the 2 it used stay charged");
        assert!(charge.call(asking(8), next.clone()).await.is_ok(), "the 8 it did not use came back");
    }

    #[tokio::test]
    async fn the_whole_charge_is_refunded_when_the_inner_service_refuses() {
        let charge = charge(&SidecarMetrics::new());
        let (refuse, _) = refusing(Code::Unavailable);
        assert_eq!(charge.call(asking(10), refuse).await.err().unwrap().code(), Code::Unavailable);
        let (next, _) = ok_inner(2);
        assert!(charge.call(asking(10), next).await.is_ok());
    }
}
