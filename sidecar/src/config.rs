//! The sidecar's configuration: one TOML file, with a few flags and
//! environment overrides, validated at start with errors naming the key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SidecarConfig {
    pub listen: Listen,
    /// The local node this sidecar fronts; absent for a client-only sidecar.
    pub node: Option<NodeSection>,
    pub etcd: EtcdSection,
    #[serde(default)]
    pub routing: Routing,
    #[serde(default)]
    pub outlier: Outlier,
    /// Inbound bulkheads, one per service served here.
    #[serde(default)]
    pub services: Vec<ServiceLimits>,
    /// Tenant limits; `default` applies to tenants not listed.
    #[serde(default)]
    pub tenants: BTreeMap<String, TenantLimits>,
    #[serde(default = "default_grace", with = "humantime_serde")]
    pub drain_grace: Duration,
    /// Serve Prometheus metrics here (`/metrics`); port 0 picks one (logged).
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Mutual TLS between hosts. Required unless `plaintext = true`.
    pub tls: Option<TlsSection>,
    /// Run without TLS; must be said explicitly.
    #[serde(default)]
    pub plaintext: bool,
    /// API keys of the tenants allowed to call in through this sidecar; when
    /// empty, calls are not authenticated.
    #[serde(default)]
    pub api_keys: Vec<ApiKey>,
    /// HTTP/2 settings of this sidecar's servers and of the connections it
    /// dials (windows, stream limits, keep-alive); see `daemon::grpc::Http2`.
    #[serde(default)]
    pub http2: daemon::grpc::Http2,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// The mesh CA (PEM): peers' certificates must chain to it.
    pub ca: PathBuf,
    /// This host's certificate and key (PEM), for serving and for dialing.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Serve the client-facing (outbound) listener over TLS too.
    #[serde(default)]
    pub outbound: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    pub tenant: String,
    /// SHA-256 of the key, hex (`meshctl hash-key KEY`); keys are never stored.
    pub sha256: String,
    /// Services this tenant may call; empty means all.
    #[serde(default)]
    pub services: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// Where local clients call (the outbound side).
    pub outbound: SocketAddr,
    /// Where other sidecars call this node (the inbound side).
    pub inbound: SocketAddr,
    /// Address other hosts use to reach `inbound` (default: `inbound`).
    pub advertise: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// The node's gRPC address, e.g. `127.0.0.1:50051`.
    pub address: String,
    /// Service name to register; default: the node's model name.
    pub service: Option<String>,
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub zone: String,
    #[serde(default = "one")]
    pub weight: u32,
    #[serde(default)]
    pub version: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdSection {
    pub endpoints: Vec<String>,
    #[serde(default = "default_prefix")]
    pub prefix: String,
    #[serde(default = "default_ttl", with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// HTTP/2 keep-alive pings to etcd; keep it above etcd's
    /// `--grpc-keepalive-min-time` or etcd closes the connection.
    #[serde(default = "default_keep_alive", with = "humantime_serde")]
    pub keep_alive_interval: Duration,
}

fn default_keep_alive() -> Duration {
    registry::etcd::KEEP_ALIVE_INTERVAL
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    LeastLoaded,
    RoundRobin,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Routing {
    pub policy: Policy,
    /// Longest wait for the first token of one attempt.
    #[serde(with = "humantime_serde")]
    pub attempt_timeout: Duration,
    /// Longest gap between two tokens before a stream counts as hung.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Times one request may move to another instance mid-stream.
    pub max_migrations: u32,
    /// Retries allowed as a share of recent requests...
    pub retry_ratio: f64,
    /// ...plus this many per second, so low traffic can still retry.
    pub retry_floor_per_sec: f64,
    /// Outbound streams this sidecar keeps open per service at most, so a
    /// flood on one service cannot take the memory and connections the
    /// others need.
    pub max_streams_per_service: usize,
}

impl Default for Routing {
    fn default() -> Self {
        Self {
            policy: Policy::LeastLoaded,
            attempt_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(5),
            max_migrations: 2,
            retry_ratio: 0.2,
            retry_floor_per_sec: 5.0,
            max_streams_per_service: 1024,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Outlier {
    /// Server-side failures in a row that eject an instance.
    pub consecutive_failures: u32,
    /// First ejection; each repeat doubles it, up to `max_ejection`.
    #[serde(with = "humantime_serde")]
    pub base_ejection: Duration,
    #[serde(with = "humantime_serde")]
    pub max_ejection: Duration,
    /// At most this share of a service's instances is ejected at once.
    pub max_ejected_percent: u32,
    /// Success-rate check: an instance whose success rate over the window is
    /// this far below the mean of its peers is ejected...
    pub success_rate_margin: f64,
    /// ...once it has at least this many requests in the window.
    pub success_rate_min_requests: u32,
    #[serde(with = "humantime_serde")]
    pub success_rate_window: Duration,
    /// Active health checks (grpc.health.v1).
    #[serde(with = "humantime_serde")]
    pub health_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub health_timeout: Duration,
}

impl Default for Outlier {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(5),
            max_ejection: Duration::from_secs(60),
            max_ejected_percent: 50,
            success_rate_margin: 0.3,
            success_rate_min_requests: 20,
            success_rate_window: Duration::from_secs(10),
            health_interval: Duration::from_secs(1),
            health_timeout: Duration::from_millis(500),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceLimits {
    pub name: String,
    /// Streams forwarded to the node at once.
    pub max_concurrency: usize,
    /// Requests waiting for a slot.
    pub max_queue: usize,
    /// Longest a request waits in the queue before it is refused.
    #[serde(with = "humantime_serde")]
    pub max_queue_wait: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantLimits {
    pub requests_per_sec: f64,
    /// Completion tokens per minute (max_tokens is charged up front, the
    /// unused part refunded).
    pub tokens_per_min: f64,
}

fn one() -> u32 {
    1
}
fn default_prefix() -> String {
    "/mesh/v1/".into()
}
fn default_ttl() -> Duration {
    Duration::from_secs(5)
}
fn default_grace() -> Duration {
    Duration::from_secs(30)
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("{path}: {error}")]
    Parse { path: String, error: toml::de::Error },
    #[error("{key}: {problem}")]
    Invalid { key: String, problem: String },
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), problem: problem.into() }
}

impl SidecarConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| ConfigError::Read { path: path.display().to_string(), error })?;
        let cfg: Self =
            toml::from_str(&text).map_err(|error| ConfigError::Parse { path: path.display().to_string(), error })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.etcd.endpoints.is_empty() {
            return Err(invalid("etcd.endpoints", "needs at least one endpoint"));
        }
        if self.etcd.lease_ttl < Duration::from_secs(1) {
            return Err(invalid("etcd.lease_ttl", "must be at least 1s"));
        }
        if let Some((key, problem)) = self.http2.invalid() {
            return Err(invalid(format!("http2.{key}"), problem));
        }
        let r = &self.routing;
        if r.attempt_timeout.is_zero() || r.idle_timeout.is_zero() {
            return Err(invalid("routing.attempt_timeout / routing.idle_timeout", "must be above zero"));
        }
        if r.max_streams_per_service == 0 {
            return Err(invalid("routing.max_streams_per_service", "must be at least 1"));
        }
        if !(0.0..=1.0).contains(&r.retry_ratio) || r.retry_floor_per_sec < 0.0 {
            return Err(invalid("routing.retry_ratio", "must be in [0, 1] (and retry_floor_per_sec >= 0)"));
        }
        let o = &self.outlier;
        if o.consecutive_failures == 0 {
            return Err(invalid("outlier.consecutive_failures", "must be at least 1"));
        }
        if o.max_ejected_percent > 100 {
            return Err(invalid("outlier.max_ejected_percent", "must be at most 100"));
        }
        if o.base_ejection > o.max_ejection {
            return Err(invalid("outlier.base_ejection", "must not exceed outlier.max_ejection"));
        }
        for (i, s) in self.services.iter().enumerate() {
            if s.max_concurrency == 0 {
                return Err(invalid(format!("services[{i}].max_concurrency"), "must be at least 1"));
            }
        }
        for (name, t) in &self.tenants {
            if !(t.requests_per_sec > 0.0 && t.tokens_per_min > 0.0) {
                return Err(invalid(format!("tenants.{name}"), "requests_per_sec and tokens_per_min must be > 0"));
            }
        }
        if let Some(n) = &self.node
            && n.weight == 0
        {
            return Err(invalid("node.weight", "must be at least 1"));
        }
        match (&self.tls, self.plaintext) {
            (None, false) => {
                return Err(invalid("tls", "missing: configure [tls] (ca, cert, key), or set plaintext = true"));
            }
            (Some(_), true) => return Err(invalid("plaintext", "cannot be true while [tls] is configured")),
            _ => {}
        }
        for (i, k) in self.api_keys.iter().enumerate() {
            if k.sha256.len() != 64 || !k.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid(format!("api_keys[{i}].sha256"), "must be 64 hex digits (meshctl hash-key KEY)"));
            }
        }
        Ok(())
    }

    pub fn etcd(&self) -> registry::EtcdConfig {
        let mut c = registry::EtcdConfig::new(self.etcd.endpoints.clone());
        c.prefix = self.etcd.prefix.clone();
        c.lease_ttl = self.etcd.lease_ttl;
        c.keep_alive_interval = self.etcd.keep_alive_interval;
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        plaintext = true
        [listen]
        outbound = "127.0.0.1:7100"
        inbound = "127.0.0.1:7101"
        [etcd]
        endpoints = ["http://127.0.0.1:2379"]
    "#;

    #[test]
    fn minimal_config_gets_defaults() {
        let cfg: SidecarConfig = toml::from_str(MINIMAL).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.routing.policy, Policy::LeastLoaded);
        assert_eq!(cfg.outlier.consecutive_failures, 5);
        assert_eq!(cfg.etcd.lease_ttl, Duration::from_secs(5));
        assert_eq!(cfg.http2, daemon::grpc::Http2::default());
        assert_eq!(cfg.http2.stream_window, 16 << 10);
    }

    #[test]
    fn http2_settings_are_read_and_checked() {
        let text = format!("{MINIMAL}\n[http2]\nstream_window = 65536\nkeep_alive_interval = \"30s\"\n");
        let cfg: SidecarConfig = toml::from_str(&text).unwrap();
        cfg.validate().unwrap();
        assert_eq!((cfg.http2.stream_window, cfg.http2.keep_alive_interval), (65536, Duration::from_secs(30)));
        assert_eq!(cfg.http2.connection_window, daemon::grpc::Http2::default().connection_window);
        let tiny = format!("{MINIMAL}\n[http2]\nstream_window = 100\n");
        let err = toml::from_str::<SidecarConfig>(&tiny).unwrap().validate().unwrap_err().to_string();
        assert!(err.starts_with("http2.stream_window: must be in [1024,"), "{err}");
        let typo = format!("{MINIMAL}\n[http2]\nstream_windw = 65536\n");
        let err = toml::from_str::<SidecarConfig>(&typo).unwrap_err().to_string();
        assert!(err.contains("stream_windw"), "{err}");
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let typo = format!("{MINIMAL}\n[routing]\nattempt_timeot = \"1s\"\n");
        let err = toml::from_str::<SidecarConfig>(&typo).unwrap_err().to_string();
        assert!(err.contains("attempt_timeot"), "{err}");
        let bad = format!("{MINIMAL}\n[routing]\nattempt_timeout = \"soon\"\n");
        let err = toml::from_str::<SidecarConfig>(&bad).unwrap_err().to_string();
        assert!(err.contains("attempt_timeout") && err.contains("soon"), "{err}");
        let zero = format!("{MINIMAL}\n[outlier]\nconsecutive_failures = 0\n");
        let err = toml::from_str::<SidecarConfig>(&zero).unwrap().validate().unwrap_err().to_string();
        assert!(err.starts_with("outlier.consecutive_failures"), "{err}");
    }

    #[test]
    fn tls_or_explicit_plaintext_is_required() {
        let no_tls = MINIMAL.replace("plaintext = true", "");
        let err = toml::from_str::<SidecarConfig>(&no_tls).unwrap().validate().unwrap_err().to_string();
        assert!(err.starts_with("tls: missing"), "{err}");
        let bad_key = format!("{MINIMAL}\n[[api_keys]]\ntenant = \"a\"\nsha256 = \"abc\"\n");
        let err = toml::from_str::<SidecarConfig>(&bad_key).unwrap().validate().unwrap_err().to_string();
        assert!(err.starts_with("api_keys[0].sha256"), "{err}");
    }

    #[test]
    fn durations_are_written_as_humantime() {
        let parse = |v: &str| {
            let text = format!("{MINIMAL}\n[routing]\nattempt_timeout = \"{v}\"\n");
            toml::from_str::<SidecarConfig>(&text).map(|c| c.routing.attempt_timeout).ok()
        };
        assert_eq!(parse("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse("1m 30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse("2"), None);
    }
}
