//! Mutual TLS between hosts (rustls, through tonic): the inbound side
//! requires a client certificate signed by the mesh CA, and then serves
//! only the identities in `tls.inbound_peers`; outbound connections to
//! other sidecars and to the node present this host's, and require the
//! server's certificate to say `role/sidecar` (the node: `role/node` or
//! `role/sidecar`, as the deploy gives it the host's pair).

use daemon::server_identity::ServerRoles;
use daemon::tls::{Allow, Role};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::config::{ConfigError, TlsSection};
use crate::upstream::TlsDial;

#[derive(Clone)]
pub struct TlsMaterial {
    ca: Certificate,
    identity: Identity,
    /// Serve the outbound (client-facing) listener over TLS too.
    pub outbound: bool,
    /// Who the inbound side serves, once the handshake has passed.
    pub inbound_peers: Allow,
    dial: TlsDial,
}

impl TlsMaterial {
    pub fn load(section: &TlsSection) -> Result<Self, ConfigError> {
        let read = |key: &str, path: &std::path::Path| {
            daemon::tls::read_pem(key, path)
                .map_err(|e| ConfigError::Invalid { key: format!("tls.{key}"), problem: format!("{e:#}") })
        };
        let ca_pem = read("ca", &section.ca)?;
        let identity = Identity::from_pem(read("cert", &section.cert)?, read("key", &section.key)?);
        let inbound_peers = Allow::only(section.inbound_peers());
        let roles = |roles| {
            ServerRoles::new(&ca_pem, roles).map_err(|problem| ConfigError::Invalid { key: "tls.ca".into(), problem })
        };
        let dial = TlsDial {
            config: ClientTlsConfig::new().identity(identity.clone()),
            instances: roles(&[Role::Sidecar])?,
            node: roles(&[Role::Node, Role::Sidecar])?,
        };
        Ok(Self { ca: Certificate::from_pem(&ca_pem), identity, outbound: section.outbound, inbound_peers, dial })
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

    /// As a client: this host's certificate, and the role each server
    /// must prove (instances: a sidecar; the node: a node or a sidecar).
    pub fn client(&self) -> TlsDial {
        self.dial.clone()
    }
}
