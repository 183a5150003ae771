//! The sidecar's configuration: one TOML file, with a few flags and
//! environment overrides, validated at start with errors naming the key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod etcd;
mod limits;
mod listen;
mod overflow;
mod ranges;
mod response_cache;
mod routing;
mod security;
mod version;

pub use etcd::EtcdSection;
pub use limits::{ServiceLimits, TenantLimits};
pub use listen::{Listen, NodeSection};
pub use overflow::{Degradable, OverflowRule};
pub use response_cache::ResponseCache;
pub use routing::{Outlier, Policy, Routing};
pub use security::{ApiKey, TlsSection};
pub use version::{CONFIG_VERSION, ConfigVersion};

/// Unknown keys are not refused by serde (no `deny_unknown_fields`) but
/// collected by [`SidecarConfig::parse`], which refuses or ignores them
/// according to `version`.
#[derive(Debug, Clone, Deserialize)]
pub struct SidecarConfig {
    /// The config schema the file is written for, "MAJOR.MINOR"; absent
    /// means "1.0". See [`CONFIG_VERSION`] for what this binary reads.
    #[serde(default)]
    pub version: ConfigVersion,
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
    /// Keep it on loopback unless scrapes present `metrics_token_file`'s token.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// A file holding the bearer token scrapes of `/metrics` must send.
    #[serde(default)]
    pub metrics_token_file: Option<PathBuf>,
    /// Mutual TLS between hosts. Required unless `plaintext = true`.
    pub tls: Option<TlsSection>,
    /// Run without TLS; must be said explicitly, and then every listener
    /// must be on loopback (there are no identities, so whoever reaches a
    /// plaintext listener is trusted as a sidecar).
    #[serde(default)]
    pub plaintext: bool,
    /// Allow plaintext listeners off loopback (a network the operator
    /// trusts end to end); the sidecar logs a warning at start.
    #[serde(default)]
    pub insecure_plaintext_anywhere: bool,
    /// API keys of the tenants allowed to call in through this sidecar; when
    /// empty, calls are not authenticated.
    #[serde(default)]
    pub api_keys: Vec<ApiKey>,
    /// HTTP/2 settings of this sidecar's servers and of the connections it
    /// dials (windows, stream limits, keep-alive); see `daemon::grpc::Http2`.
    #[serde(default)]
    pub http2: daemon::grpc::Http2,
    /// The largest request message either listener decodes; a larger one is
    /// refused with OUT_OF_RANGE as soon as its length prefix arrives,
    /// before its bytes are buffered (see [`DEFAULT_MAX_REQUEST_BYTES`]).
    #[serde(default = "default_max_request")]
    pub max_request_bytes: usize,
    /// Complete responses of deterministic requests, kept for repeats.
    #[serde(default)]
    pub response_cache: ResponseCache,
}

/// 2 MiB: a node takes at most 32 bytes per context token + 64 KiB (its
/// own limit, `validate::max_request_bytes`), so this passes any request a
/// node with a context of up to ~63k tokens could accept (raise it for
/// longer contexts), and holds a sidecar's buffering per request well
/// under tonic's default of 4 MiB.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 2 << 20;

fn default_max_request() -> usize {
    DEFAULT_MAX_REQUEST_BYTES
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
    /// A syntax or type error in text not read from a file.
    #[error("{0}")]
    Syntax(toml::de::Error),
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
        let cfg = Self::parse(&text).map_err(|e| match e {
            ConfigError::Syntax(error) => ConfigError::Parse { path: path.display().to_string(), error },
            e => e,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a config (not yet validated). Keys this binary does not know
    /// are an error naming them, except in a file of a newer minor version,
    /// where they are logged in one warning and ignored (`version.rs`).
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let (cfg, warning) = Self::parse_quietly(text)?;
        if let Some(warning) = warning {
            tracing::warn!("{warning}");
        }
        Ok(cfg)
    }

    /// [`Self::parse`], returning the warning instead of logging it.
    fn parse_quietly(text: &str) -> Result<(Self, Option<String>), ConfigError> {
        let version = toml::from_str::<version::VersionOnly>(text).map_err(ConfigError::Syntax)?.version;
        version::check_major(version)?;
        let mut ignored = Vec::new();
        let de = toml::Deserializer::parse(text).map_err(ConfigError::Syntax)?;
        let cfg: Self = serde_ignored::deserialize(de, |path| ignored.push(version::key_path(&path)))
            .map_err(ConfigError::Syntax)?;
        let warning = version::unknown_keys(version, &ignored)?;
        Ok((cfg, warning))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.etcd.validate()?;
        ranges::check(self)?;
        self.response_cache.validate()?;
        overflow::validate(&self.routing.overflow)?;
        if let Some((key, problem)) = self.http2.invalid() {
            return Err(invalid(format!("http2.{key}"), problem));
        }
        let r = &self.routing;
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
        security::validate(&self.plaintext_listeners(), &self.api_keys)
    }

    fn plaintext_listeners(&self) -> security::Plaintext<'_> {
        security::Plaintext {
            tls: self.tls.as_ref(),
            plaintext: self.plaintext,
            anywhere: self.insecure_plaintext_anywhere,
            outbound: self.listen.outbound,
            inbound: self.node.as_ref().map(|_| self.listen.inbound),
            http: self.listen.http,
        }
    }

    /// Validates again after flags changed it, and warns about every
    /// plaintext listener off loopback (`insecure_plaintext_anywhere`).
    pub fn checked(self) -> Result<Self, ConfigError> {
        self.validate()?;
        self.plaintext_listeners().warn();
        Ok(self)
    }

    pub fn etcd(&self) -> registry::EtcdConfig {
        self.etcd.registry()
    }
}

#[cfg(test)]
mod sweep;
#[cfg(test)]
mod tests;
