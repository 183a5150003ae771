//! Every number in a sidecar config at 0, negative, huge and not a number:
//! each value either loads or is refused with an error naming its key;
//! nothing panics (the key-by-key rules are in `tests.rs` and `ranges.rs`).

use super::*;

const BASE: &str = r#"
plaintext = true
[listen]
outbound = "127.0.0.1:7100"
inbound = "127.0.0.1:7101"
"#;

#[derive(Clone, Copy)]
enum Kind {
    Count,
    Share,
    Time,
}

/// Every numeric key: its section's header (with the section's other
/// required keys), the key, and what it holds.
const KEYS: &[(&str, &str, Kind)] = &[
    ("", "drain_grace", Kind::Time),
    ("", "max_request_bytes", Kind::Count),
    ("[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]", "lease_ttl", Kind::Time),
    ("[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]", "keep_alive_interval", Kind::Time),
    ("[node]\naddress = \"127.0.0.1:1\"", "weight", Kind::Count),
    ("[[services]]\nname = \"a\"\nmax_queue = 1\nmax_queue_wait = \"1s\"", "max_concurrency", Kind::Count),
    ("[[services]]\nname = \"a\"\nmax_concurrency = 1\nmax_queue_wait = \"1s\"", "max_queue", Kind::Count),
    ("[[services]]\nname = \"a\"\nmax_concurrency = 1\nmax_queue = 1", "max_queue_wait", Kind::Time),
    ("[tenants.a]\ntokens_per_min = 1.0", "requests_per_sec", Kind::Share),
    ("[tenants.a]\nrequests_per_sec = 1.0", "tokens_per_min", Kind::Share),
    ("[routing]", "attempt_timeout", Kind::Time),
    ("[routing]", "idle_timeout", Kind::Time),
    ("[routing]", "max_migrations", Kind::Count),
    ("[routing]", "retry_ratio", Kind::Share),
    ("[routing]", "retry_floor_per_sec", Kind::Share),
    ("[routing]", "max_streams_per_service", Kind::Count),
    ("[routing]", "prefix_index_blocks", Kind::Count),
    ("[outlier]", "consecutive_failures", Kind::Count),
    ("[outlier]", "base_ejection", Kind::Time),
    ("[outlier]", "max_ejection", Kind::Time),
    ("[outlier]", "max_ejected_percent", Kind::Count),
    ("[outlier]", "success_rate_margin", Kind::Share),
    ("[outlier]", "success_rate_min_requests", Kind::Count),
    ("[outlier]", "success_rate_window", Kind::Time),
    ("[outlier]", "health_interval", Kind::Time),
    ("[outlier]", "health_timeout", Kind::Time),
    ("[http2]", "max_concurrent_streams", Kind::Count),
    ("[http2]", "max_pending_accept_resets", Kind::Count),
    ("[http2]", "connection_window", Kind::Count),
    ("[http2]", "stream_window", Kind::Count),
    ("[http2]", "keep_alive_interval", Kind::Time),
    ("[http2]", "keep_alive_timeout", Kind::Time),
    ("[http2]", "preface_timeout", Kind::Time),
    ("[response_cache]", "max_bytes", Kind::Count),
    ("[response_cache]", "ttl", Kind::Time),
];

fn values(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::Count => &["0", "-1", "18446744073709551616", "4294967296", "\"ten\"", "1.5"],
        Kind::Share => &["0.0", "-1.0", "1e308", "nan", "inf", "-inf", "\"half\""],
        Kind::Time => &["\"0s\"", "\"-1s\"", "\"100000000000000000000s\"", "\"1000000000h\"", "5", "\"soon\""],
    }
}

/// The config with `key = value` in its section; the `[etcd]` section is
/// added when the key is elsewhere (it is required).
fn config(section: &str, key: &str, value: &str) -> String {
    let etcd = if section.starts_with("[etcd]") { "" } else { "[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n" };
    match section {
        "" => format!("{key} = {value}\n{BASE}{etcd}"),
        _ => format!("{BASE}{etcd}{section}\n{key} = {value}\n"),
    }
}

#[test]
fn every_number_out_of_range_is_refused_naming_its_key_and_nothing_panics() {
    for &(section, key, kind) in KEYS {
        for value in values(kind) {
            let text = config(section, key, value);
            let outcome = std::panic::catch_unwind(|| {
                SidecarConfig::parse(&text)
                    .map_err(|e| e.to_string())
                    .and_then(|c| c.validate().map_err(|e| e.to_string()))
            });
            let outcome = outcome.unwrap_or_else(|_| panic!("{key} = {value} panicked"));
            if let Err(e) = outcome {
                assert!(e.contains(key), "{key} = {value}: the error does not name the key: {e}");
            } else {
                assert!(accepted(key, value), "{key} = {value} was accepted");
            }
        }
    }
}

/// The only out-of-the-way values a key may hold: zero where it means
/// "none" (no grace, no queue, no migrations, no retries, no ejections).
fn accepted(key: &str, value: &str) -> bool {
    const ZERO_MEANS_NONE: [&str; 9] = [
        "drain_grace",
        "max_queue",
        "max_queue_wait",
        "max_migrations",
        "retry_ratio",
        "retry_floor_per_sec",
        "max_ejected_percent",
        "success_rate_margin",
        "max_pending_accept_resets",
    ];
    ["0", "0.0", "\"0s\""].contains(&value) && ZERO_MEANS_NONE.contains(&key)
}
