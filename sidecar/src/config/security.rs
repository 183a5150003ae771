//! `[tls]` and `[[api_keys]]`: who may talk to this sidecar.

use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, invalid};

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

/// TLS, or plaintext said explicitly; well-formed key digests.
pub(super) fn validate(tls: Option<&TlsSection>, plaintext: bool, api_keys: &[ApiKey]) -> Result<(), ConfigError> {
    match (tls, plaintext) {
        (None, false) => {
            return Err(invalid("tls", "missing: configure [tls] (ca, cert, key), or set plaintext = true"));
        }
        (Some(_), true) => return Err(invalid("plaintext", "cannot be true while [tls] is configured")),
        _ => {}
    }
    for (i, k) in api_keys.iter().enumerate() {
        if k.sha256.len() != 64 || !k.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid(format!("api_keys[{i}].sha256"), "must be 64 hex digits (meshctl hash-key KEY)"));
        }
    }
    Ok(())
}
