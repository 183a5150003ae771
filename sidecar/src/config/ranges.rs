//! Bounds on every number in the config, so no value that parses can
//! overflow later (an `Instant` plus a century, a semaphore of 2^60
//! permits, a retry-after computed from a rate of 1e-300) or poison a
//! comparison (TOML allows `nan` and `inf`).

use std::time::Duration;

use super::{ConfigError, SidecarConfig, invalid};

/// The longest duration any key may hold: far above any sensible setting
/// (a drain grace, an ejection), far below what overflows clock arithmetic.
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// The most streams, permits or queue places one key may ask for.
pub const MAX_COUNT: usize = 1_000_000;

/// A request message: from a short prompt's worth up to 64 MiB.
const REQUEST_BYTES: std::ops::RangeInclusive<usize> = (64 << 10)..=(64 << 20);

/// Prefix index entries (44 bytes each): from a few thousand prompts' worth
/// up to 4 GB.
const PREFIX_INDEX_BLOCKS: std::ops::RangeInclusive<usize> = 1_000..=100_000_000;

/// Tenant rates, per second or per minute: from one per ~17 minutes up.
const RATE: (f64, f64) = (1e-3, 1e12);

pub(super) fn check(cfg: &SidecarConfig) -> Result<(), ConfigError> {
    for (key, d) in durations(cfg) {
        if d > MAX_DURATION {
            return Err(invalid(key, format!("must be at most {}s (7 days)", MAX_DURATION.as_secs())));
        }
    }
    let (r, o) = (&cfg.routing, &cfg.outlier);
    // Periods and timeouts where zero would mean "always" (a timer that
    // panics, every call or probe timed out, an ejection that ends at once).
    let nonzero = [
        ("routing.attempt_timeout", r.attempt_timeout),
        ("routing.idle_timeout", r.idle_timeout),
        ("outlier.base_ejection", o.base_ejection),
        ("outlier.success_rate_window", o.success_rate_window),
        ("outlier.health_interval", o.health_interval),
        ("outlier.health_timeout", o.health_timeout),
    ];
    if let Some((key, _)) = nonzero.iter().find(|(_, d)| d.is_zero()) {
        return Err(invalid(*key, "must be above zero"));
    }
    if o.success_rate_min_requests == 0 {
        return Err(invalid("outlier.success_rate_min_requests", "must be at least 1"));
    }
    let counts = [
        ("routing.max_streams_per_service".to_string(), cfg.routing.max_streams_per_service),
        ("http2.max_pending_accept_resets".to_string(), cfg.http2.max_pending_accept_resets),
    ];
    let services = cfg.services.iter().enumerate().flat_map(|(i, s)| {
        [
            (format!("services[{i}].max_concurrency"), s.max_concurrency),
            (format!("services[{i}].max_queue"), s.max_queue),
        ]
    });
    for (key, n) in counts.into_iter().chain(services) {
        if n > MAX_COUNT {
            return Err(invalid(key, format!("must be at most {MAX_COUNT}")));
        }
    }
    let request = cfg.max_request_bytes;
    if !REQUEST_BYTES.contains(&request) {
        return Err(invalid(
            "max_request_bytes",
            format!("must be in [{}, {}] bytes", REQUEST_BYTES.start(), REQUEST_BYTES.end()),
        ));
    }
    if !PREFIX_INDEX_BLOCKS.contains(&r.prefix_index_blocks) {
        let (lo, hi) = (PREFIX_INDEX_BLOCKS.start(), PREFIX_INDEX_BLOCKS.end());
        return Err(invalid("routing.prefix_index_blocks", format!("must be in [{lo}, {hi}]")));
    }
    within("routing.retry_floor_per_sec", r.retry_floor_per_sec, (0.0, 1e6))?;
    within("outlier.success_rate_margin", cfg.outlier.success_rate_margin, (0.0, 1.0))?;
    for (name, t) in &cfg.tenants {
        within(&format!("tenants.{name}.requests_per_sec"), t.requests_per_sec, RATE)?;
        within(&format!("tenants.{name}.tokens_per_min"), t.tokens_per_min, RATE)?;
    }
    Ok(())
}

/// A finite `value` in `[lo, hi]`.
fn within(key: &str, value: f64, (lo, hi): (f64, f64)) -> Result<(), ConfigError> {
    if value.is_finite() && (lo..=hi).contains(&value) {
        return Ok(());
    }
    Err(invalid(key, format!("must be a number in [{lo}, {hi}] (got {value})")))
}

fn durations(cfg: &SidecarConfig) -> Vec<(String, Duration)> {
    let (r, o, e, h) = (&cfg.routing, &cfg.outlier, &cfg.etcd, &cfg.http2);
    let mut all: Vec<(String, Duration)> = [
        ("drain_grace", cfg.drain_grace),
        ("etcd.lease_ttl", e.lease_ttl),
        ("etcd.keep_alive_interval", e.keep_alive_interval),
        ("routing.attempt_timeout", r.attempt_timeout),
        ("routing.idle_timeout", r.idle_timeout),
        ("outlier.base_ejection", o.base_ejection),
        ("outlier.max_ejection", o.max_ejection),
        ("outlier.success_rate_window", o.success_rate_window),
        ("outlier.health_interval", o.health_interval),
        ("outlier.health_timeout", o.health_timeout),
        ("http2.keep_alive_interval", h.keep_alive_interval),
        ("http2.keep_alive_timeout", h.keep_alive_timeout),
        ("http2.preface_timeout", h.preface_timeout),
    ]
    .into_iter()
    .map(|(k, d)| (k.to_string(), d))
    .collect();
    let waits =
        cfg.services.iter().enumerate().map(|(i, s)| (format!("services[{i}].max_queue_wait"), s.max_queue_wait));
    all.extend(waits);
    let overflow = cfg.routing.overflow.iter().enumerate();
    all.extend(overflow.map(|(i, o)| (format!("routing.overflow[{i}].queue_wait"), o.queue_wait)));
    all.extend(cfg.node.as_ref().map(|n| ("node.load_report_interval".to_string(), n.load_report_interval)));
    all
}
