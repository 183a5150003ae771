//! The bottom of the inbound stack: the call goes to this sidecar's node
//! with the trace context and what is left of the caller's deadline; the
//! node's stream goes back up as it is, each message in the bytes the node
//! encoded (`wire::Relayed`).

use std::time::Instant;

use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::stack::{Call, Next, Reply, last};
use crate::wire::generation_client::GenerationClient;

/// The node client as the last service of a stack.
pub fn service(node: GenerationClient<Channel>) -> Next {
    last(move |call| generate(node.clone(), call))
}

async fn generate(mut node: GenerationClient<Channel>, call: Call) -> Result<Reply, Status> {
    let call = call.into_parts();
    let mut upstream = Request::new(call.req);
    telemetry::propagation::inject(&call.span, upstream.metadata_mut());
    if let Some(d) = call.deadline {
        let left = d.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Status::deadline_exceeded("the deadline passed while queued"));
        }
        upstream.set_timeout(left);
    }
    let response = node.generate(upstream).await?;
    let (metadata, stream, _) = response.into_parts();
    Ok(Reply { metadata, stream: Box::pin(stream) })
}
