//! `[tls]`, `[[api_keys]]` and the plaintext switches: who may talk to
//! this sidecar, and on which addresses it may listen without TLS.

use std::net::SocketAddr;
use std::path::PathBuf;

use daemon::tls::PeerPattern;

use serde::Deserialize;

use super::{ConfigError, invalid};

#[derive(Debug, Clone, Deserialize)]
pub struct TlsSection {
    /// The mesh CA (PEM): peers' certificates must chain to it.
    pub ca: PathBuf,
    /// This host's certificate and key (PEM), for serving and for dialing.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Serve the client-facing (outbound) listener over TLS too.
    #[serde(default)]
    pub outbound: bool,
    /// The identities the inbound side serves (`spiffe://mesh/host/<host or
    /// *>/role/<role>`); anyone else, even with a certificate from the mesh
    /// CA, is refused with PERMISSION_DENIED. Default: any sidecar, because
    /// only a sidecar checks API keys before it calls in.
    #[serde(default = "any_sidecar")]
    pub inbound_peers: Vec<String>,
}

fn any_sidecar() -> Vec<String> {
    vec!["spiffe://mesh/host/*/role/sidecar".into()]
}

impl TlsSection {
    /// `inbound_peers`, parsed (they were checked at load).
    pub fn inbound_peers(&self) -> Vec<PeerPattern> {
        self.inbound_peers.iter().filter_map(|p| p.parse().ok()).collect()
    }
}

/// What may listen without TLS: only loopback, unless the operator says
/// the network is trusted (`insecure_plaintext_anywhere`).
pub(super) struct Plaintext<'a> {
    pub tls: Option<&'a TlsSection>,
    pub plaintext: bool,
    pub anywhere: bool,
    pub outbound: SocketAddr,
    /// `None` for a client-only sidecar (no inbound side).
    pub inbound: Option<SocketAddr>,
    /// The HTTP edge, which has no TLS.
    pub http: Option<SocketAddr>,
}

impl Plaintext<'_> {
    /// The listeners served without TLS, with their key and why.
    fn listeners(&self) -> Vec<(&'static str, SocketAddr, &'static str)> {
        let mut plain = Vec::new();
        match self.tls {
            None => {
                plain.push(("listen.outbound", self.outbound, "plaintext = true"));
                plain.extend(self.inbound.map(|a| ("listen.inbound", a, "plaintext = true")));
            }
            Some(t) if !t.outbound => plain.push(("listen.outbound", self.outbound, "tls.outbound = false")),
            Some(_) => {}
        }
        plain.extend(self.http.map(|a| ("listen.http", a, "the HTTP edge has no TLS")));
        plain
    }

    fn check(&self) -> Result<(), ConfigError> {
        for (key, addr, why) in self.listeners() {
            if !addr.ip().is_loopback() && !self.anywhere {
                return Err(invalid(
                    key,
                    format!(
                        "{addr} is not a loopback address and this listener has no TLS ({why}); \
                         configure [tls], bind it to loopback, or set insecure_plaintext_anywhere = true"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// At start: say loudly that a listener anyone can reach is plaintext.
    pub fn warn(&self) {
        for (key, addr, why) in self.listeners() {
            if !addr.ip().is_loopback() {
                tracing::warn!(
                    "{key} {addr} serves plaintext ({why}) off loopback because insecure_plaintext_anywhere = true: \
                     anyone who reaches it is trusted as a sidecar and can name any tenant"
                );
            }
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct ApiKey {
    pub tenant: String,
    /// SHA-256 of the key, hex (`printf %s KEY | meshctl hash-key`); keys are never stored.
    pub sha256: String,
    /// Services this tenant may call; empty means all.
    #[serde(default)]
    pub services: Vec<String>,
    /// May also call the sidecar's admin service (`meshctl status --sidecar`).
    #[serde(default)]
    pub admin: bool,
    /// May send `allow_special_tokens` (text read as control tokens).
    #[serde(default)]
    pub allow_special_tokens: bool,
}

/// TLS, or plaintext said explicitly (and on loopback, unless said
/// anywhere); identities that parse; well-formed keys and tenants.
pub(super) fn validate(plain: &Plaintext<'_>, api_keys: &[ApiKey]) -> Result<(), ConfigError> {
    let (tls, plaintext) = (plain.tls, plain.plaintext);
    match (tls, plaintext) {
        (None, false) => {
            return Err(invalid("tls", "missing: configure [tls] (ca, cert, key), or set plaintext = true"));
        }
        (Some(_), true) => return Err(invalid("plaintext", "cannot be true while [tls] is configured")),
        _ => {}
    }
    plain.check()?;
    if let Some(t) = tls {
        if t.inbound_peers.is_empty() {
            return Err(invalid("tls.inbound_peers", "must name at least one identity (default: any sidecar)"));
        }
        for (i, p) in t.inbound_peers.iter().enumerate() {
            p.parse::<PeerPattern>().map_err(|e| invalid(format!("tls.inbound_peers[{i}]"), e))?;
        }
    }
    for (i, k) in api_keys.iter().enumerate() {
        if k.sha256.len() != 64 || !k.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid(
                format!("api_keys[{i}].sha256"),
                "must be 64 hex digits (printf %s KEY | meshctl hash-key)",
            ));
        }
        if let Err(e) = crate::outbound::authenticate::check_tenant(&k.tenant) {
            return Err(invalid(format!("api_keys[{i}].tenant"), e));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(outbound: bool, inbound_peers: &[&str]) -> TlsSection {
        let inbound_peers = inbound_peers.iter().map(|p| p.to_string()).collect();
        TlsSection { ca: "ca".into(), cert: "c".into(), key: "k".into(), outbound, inbound_peers }
    }

    fn plain<'a>(tls: Option<&'a TlsSection>, anywhere: bool, outbound: &str) -> Plaintext<'a> {
        let inbound = Some("0.0.0.0:7101".parse().unwrap());
        Plaintext { tls, plaintext: tls.is_none(), anywhere, outbound: outbound.parse().unwrap(), inbound, http: None }
    }

    #[test]
    fn plaintext_listeners_must_be_loopback_unless_said_anywhere() {
        let err = validate(&plain(None, false, "127.0.0.1:7100"), &[]).unwrap_err().to_string();
        assert!(err.starts_with("listen.inbound: 0.0.0.0:7101 is not a loopback address"), "{err}");
        assert!(err.contains("insecure_plaintext_anywhere = true"), "{err}");
        assert!(validate(&plain(None, true, "127.0.0.1:7100"), &[]).is_ok());
        // With TLS the inbound side is fine anywhere; a plaintext outbound side is not.
        let t = tls(false, &["spiffe://mesh/host/*/role/sidecar"]);
        let err = validate(&plain(Some(&t), false, "10.0.0.1:7100"), &[]).unwrap_err().to_string();
        assert!(err.starts_with("listen.outbound: 10.0.0.1:7100") && err.contains("tls.outbound = false"), "{err}");
        assert!(validate(&plain(Some(&t), false, "127.0.0.1:7100"), &[]).is_ok());
        let t = tls(true, &["spiffe://mesh/host/*/role/sidecar"]);
        assert!(validate(&plain(Some(&t), false, "10.0.0.1:7100"), &[]).is_ok());
    }

    #[test]
    fn inbound_peers_must_be_mesh_identities() {
        let t = tls(false, &["spiffe://mesh/host/*/role/sidecar", "spiffe://mesh/host/a/role/admin"]);
        let err = validate(&plain(Some(&t), false, "127.0.0.1:7100"), &[]).unwrap_err().to_string();
        assert!(err.starts_with("tls.inbound_peers[1]: unknown role \"admin\""), "{err}");
        let none = tls(false, &[]);
        let err = validate(&plain(Some(&none), false, "127.0.0.1:7100"), &[]).unwrap_err().to_string();
        assert!(err.starts_with("tls.inbound_peers: must name at least one"), "{err}");
    }
}
