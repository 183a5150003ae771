//! The mesh's v1 contract. Every client, in any language, is generated from
//! `proto/mesh/v1/mesh.proto`; this crate is the Rust side of it.

/// Generated messages, client and server for `mesh.v1`.
pub mod v1 {
    tonic::include_proto!("mesh.v1");

    /// Encoded `FileDescriptorSet` of the contract, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("mesh_v1_descriptor");
}

/// Metadata keys the mesh puts on responses and errors.
pub mod metadata {
    /// On a refusal: how long the caller should wait before retrying, in milliseconds.
    pub const RETRY_AFTER_MS: &str = "retry-after-ms";
    /// On an INTERNAL end: the request itself broke the engine (its step
    /// failed even when run alone), not the instance. A sidecar neither
    /// charges the instance nor moves or retries the request elsewhere,
    /// where it would fail again and get healthy instances ejected.
    pub const REQUEST_FAULT: &str = "x-mesh-request-fault";
    /// On every `Generate` response: sequences the node is running now.
    pub const LOAD_RUNNING: &str = "x-mesh-load-running";
    /// On every `Generate` response: requests waiting in the node's queue.
    pub const LOAD_QUEUED: &str = "x-mesh-load-queued";
    /// On every `Generate` response: KV-cache tokens not yet committed to a request.
    pub const LOAD_KV_FREE: &str = "x-mesh-load-kv-free";
    /// Requests wait in an inbound sidecar's queue (added to the node's own).
    pub const SIDECAR_QUEUED: &str = "x-mesh-sidecar-queued";
    /// On a `Generate` response a client sidecar's response cache took part
    /// in: `hit` (replayed from the cache, no node work), `coalesced`
    /// (joined an identical request's stream) or `miss` (went upstream).
    pub const RESPONSE_CACHE: &str = "x-mesh-cache";
    /// Sent by a caller (`no-cache` or `no-store`): neither serve this
    /// request from the client sidecar's response cache nor store its answer.
    pub const CACHE_CONTROL: &str = "cache-control";
    /// On every `Generate` response from a client sidecar: the service that
    /// served it, the one asked for or, when the call overflowed, the
    /// smaller service that took it instead (`[[routing.overflow]]`).
    pub const SERVED_BY: &str = "x-mesh-served-by";
    /// On a refusal for a tenant's rate limit: the tenant is over its share,
    /// so the call is not degraded to an overflow service either.
    pub const TENANT_LIMITED: &str = "x-mesh-tenant-limited";
    /// On a request, in milliseconds: the longest this call may wait in an
    /// instance's queue. A client sidecar sets it on a call it could send
    /// to an overflow service instead (`[[routing.overflow]] queue_wait`);
    /// the instance's sidecar refuses the call (RESOURCE_EXHAUSTED) when
    /// its queue would hold it longer.
    pub const MAX_QUEUE_WAIT_MS: &str = "x-mesh-max-queue-wait-ms";
}

/// API keys: clients send `authorization: Bearer <key>`; sidecar configs
/// store only the key's digest.
pub mod api_key {
    /// Hex SHA-256 of `key`, the form sidecar configs store API keys in.
    pub fn digest(key: &str) -> String {
        ring::digest::digest(&ring::digest::SHA256, key.as_bytes())
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Whether `key` is the one `digest_hex` was made from, in time that
    /// does not depend on where the digests differ.
    pub fn matches(key: &str, digest_hex: &str) -> bool {
        same_digest(&digest(key), &digest_hex.to_ascii_lowercase())
    }

    /// Whether two lowercase hex digests are equal, in time that does not
    /// depend on where they differ (for checking one presented key's digest
    /// against many configured ones without hashing it again each time).
    pub fn same_digest(a: &str, b: &str) -> bool {
        use subtle::ConstantTimeEq;
        a.as_bytes().ct_eq(b.as_bytes()).into()
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn a_key_matches_only_its_digest() {
            let d = super::digest("good-key");
            assert!(super::matches("good-key", &d));
            assert!(super::matches("good-key", &d.to_ascii_uppercase()));
            assert!(!super::matches("good-kez", &d));
            assert!(!super::matches("good-key", &d[..63]));
        }
    }
}

/// The caller's deadline, from the `grpc-timeout` header: the node never
/// queues a request longer than its caller will wait, and a sidecar never
/// admits one it could not finish in time.
pub mod deadline {
    use std::time::{Duration, Instant};

    use tonic::metadata::MetadataMap;

    /// When the caller stops waiting, if it said.
    pub fn from_metadata(meta: &MetadataMap, now: Instant) -> Option<Instant> {
        let v = meta.get("grpc-timeout")?.to_str().ok()?;
        let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
        let n: u64 = digits.parse().ok()?;
        let d = match unit {
            "H" => Duration::from_secs(n.saturating_mul(3600)),
            "M" => Duration::from_secs(n.saturating_mul(60)),
            "S" => Duration::from_secs(n),
            "m" => Duration::from_millis(n),
            "u" => Duration::from_micros(n),
            "n" => Duration::from_nanos(n),
            _ => return None,
        };
        now.checked_add(d)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn grpc_timeout_units_parse() {
            let now = Instant::now();
            let mut m = MetadataMap::new();
            assert_eq!(from_metadata(&m, now), None);
            m.insert("grpc-timeout", "250m".parse().unwrap());
            assert_eq!(from_metadata(&m, now), Some(now + Duration::from_millis(250)));
            m.insert("grpc-timeout", "3S".parse().unwrap());
            assert_eq!(from_metadata(&m, now), Some(now + Duration::from_secs(3)));
            m.insert("grpc-timeout", "x".parse().unwrap());
            assert_eq!(from_metadata(&m, now), None);
        }
    }
}
