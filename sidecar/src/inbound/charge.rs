//! Tenant limits as a layer: a call is charged one request and its
//! `max_tokens` against its tenant's buckets before it may queue; what the
//! stream did not use is refunded when it ends, however it ends.

use std::sync::Arc;
use std::time::Instant;

use mesh_proto::v1::GenerateResponse;
use tonic::{Code, Status};

use super::tenants::Tenants;
use crate::metrics::{LimitLabels, SidecarMetrics};
use crate::stack::{Call, End, Next, Reply, Step, Watch, pass, retry_later};

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
            return Err(retry_later(Code::ResourceExhausted, message, over.retry_after));
        }
        let refund = Refund { tenants: self.tenants.clone(), tenant, charge, used: 0 };
        match pass(next, call).await {
            Ok(reply) => Ok(reply.watched(refund)),
            Err(status) => {
                refund.end(End::Failed(&status));
                Err(status)
            }
        }
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
    fn message(&mut self, msg: &GenerateResponse) {
        self.used = self.used.saturating_add(msg.token_ids.len() as u32);
    }

    fn end(self, _: End<'_>) {
        self.tenants.refund(&self.tenant, self.charge.saturating_sub(self.used));
    }
}
