//! The caller's deadline, from the `grpc-timeout` header, so the node
//! never queues a request longer than its caller will wait. (The same
//! reading as the sidecar's `deadline.rs`; the node does not depend on the
//! sidecar crate.)

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
