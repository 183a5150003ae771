//! Why the node turns a request away, and the status each reason becomes:
//! RESOURCE_EXHAUSTED with a `retry-after-ms` hint when it is busy (a
//! neutral refusal: the caller may go elsewhere or come back), UNAVAILABLE
//! when it is draining.

use std::time::Duration;

use mesh_proto::metadata as md;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};

use super::Load;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AdmitError {
    #[error("node is draining; send new requests elsewhere")]
    Draining,
    #[error("node queue is full ({queued} requests waiting, limit {limit}); retry after {retry_after:?}")]
    QueueFull { queued: usize, limit: usize, retry_after: Duration },
    #[error(
        "node KV cache is full: request needs {need} tokens (prompt + max_tokens), {free} of {limit} free; retry after {retry_after:?}"
    )]
    KvFull { need: usize, free: usize, limit: usize, retry_after: Duration },
    #[error(
        "node is saturated: the queue ahead would hold this request about {wait:?} before its prompt is read, over its bound of {bound:?} (--max-queue-wait or the deadline); retry after {retry_after:?}"
    )]
    WouldWait { wait: Duration, bound: Duration, retry_after: Duration },
    #[error(
        "node is saturated: this request waited {waited:?} without starting, its bound is {bound:?} (--max-queue-wait or the deadline); retry after {retry_after:?}"
    )]
    Waited { waited: Duration, bound: Duration, retry_after: Duration },
}

impl AdmitError {
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Draining => None,
            Self::QueueFull { retry_after, .. }
            | Self::KvFull { retry_after, .. }
            | Self::WouldWait { retry_after, .. }
            | Self::Waited { retry_after, .. } => Some(*retry_after),
        }
    }

    /// The status the caller sees, with the node's load and the retry-after
    /// hint in its metadata (trailers, when the stream had begun).
    pub fn status(&self, load: Load) -> Status {
        let mut meta = MetadataMap::new();
        load.put(&mut meta);
        let code = match self {
            Self::Draining => Code::Unavailable,
            _ => Code::ResourceExhausted,
        };
        if let Some(after) = self.retry_after() {
            meta.insert(md::RETRY_AFTER_MS, MetadataValue::from(after.as_millis() as u64));
        }
        Status::with_metadata(code, self.to_string(), meta)
    }
}

impl Load {
    /// Writes the load report every response carries.
    pub fn put(&self, meta: &mut MetadataMap) {
        meta.insert(md::LOAD_RUNNING, MetadataValue::from(self.running as u64));
        meta.insert(md::LOAD_QUEUED, MetadataValue::from(self.queued as u64));
        meta.insert(md::LOAD_KV_FREE, MetadataValue::from(self.kv_free as u64));
    }
}
