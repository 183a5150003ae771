//! Mutual TLS between hosts (rustls, through tonic): the inbound side
//! requires a client certificate signed by the mesh CA, and then serves
//! only the identities in `tls.inbound_peers`; outbound connections to
//! other sidecars and to the node present this host's.

use daemon::tls::Allow;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::config::{ConfigError, TlsSection};

#[derive(Clone)]
pub struct TlsMaterial {
    ca: Certificate,
    identity: Identity,
    /// Serve the outbound (client-facing) listener over TLS too.
    pub outbound: bool,
    /// Who the inbound side serves, once the handshake has passed.
    pub inbound_peers: Allow,
}

impl TlsMaterial {
    pub fn load(section: &TlsSection) -> Result<Self, ConfigError> {
        let read = |key: &str, path: &std::path::Path| {
            daemon::tls::read_pem(key, path)
                .map_err(|e| ConfigError::Invalid { key: format!("tls.{key}"), problem: format!("{e:#}") })
        };
        let ca = Certificate::from_pem(read("ca", &section.ca)?);
        let identity = Identity::from_pem(read("cert", &section.cert)?, read("key", &section.key)?);
        let inbound_peers = Allow::only(section.inbound_peers());
        Ok(Self { ca, identity, outbound: section.outbound, inbound_peers })
    }

    /// For a listener other sidecars (or this sidecar) call: their
    /// certificate must chain to the mesh CA.
    pub fn mutual_server(&self) -> ServerTlsConfig {
        daemon::tls::server_tls(self.identity.clone()).client_ca_root(self.ca.clone())
    }

    /// For the client-facing listener: server authentication only (callers
    /// prove who they are with API keys).
    pub fn server(&self) -> ServerTlsConfig {
        daemon::tls::server_tls(self.identity.clone())
    }

    pub fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new().ca_certificate(self.ca.clone()).identity(self.identity.clone())
    }
}
