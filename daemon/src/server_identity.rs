//! The dialing side of workload identity: a client that checks not only
//! that a server's certificate chains to the mesh CA and names the address
//! dialed (what rustls does), but that the identity in it has a role this
//! connection expects. A sidecar dialing an instance wants a sidecar: a
//! client's or an operator's certificate from the same CA, behind an
//! address someone registered, must not receive the mesh's traffic.

use std::fmt;
use std::sync::Arc;

use tokio_rustls::rustls::client::WebPkiServerVerifier;
use tokio_rustls::rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::{DigitallySignedStruct, Error, RootCertStore, SignatureScheme};

use crate::tls::{Role, leaf_identity};

/// rustls' WebPKI verification of the chain and name, then the role.
pub struct ServerRoles {
    chain: Arc<WebPkiServerVerifier>,
    roles: &'static [Role],
}

impl ServerRoles {
    /// Servers with a certificate of `ca_pem` (one or more PEM CAs)
    /// carrying an identity of one of `roles`.
    pub fn new(ca_pem: &[u8], roles: &'static [Role]) -> Result<Arc<Self>, String> {
        let mut store = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem) {
            let cert = cert.map_err(|e| format!("unreadable CA certificate: {e}"))?;
            store.add(cert).map_err(|e| format!("unusable CA certificate: {e}"))?;
        }
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let chain = WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider)
            .build()
            .map_err(|e| format!("CA: {e}"))?;
        Ok(Arc::new(Self { chain, roles }))
    }
}

impl fmt::Debug for ServerRoles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerRoles").field("roles", &self.roles).finish()
    }
}

impl ServerCertVerifier for ServerRoles {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let verified = self.chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        let id = leaf_identity(end_entity).map_err(|e| Error::General(format!("server: {e}")))?;
        if !self.roles.contains(&id.role) {
            let wanted: Vec<&str> = self.roles.iter().map(|r| r.as_str()).collect();
            return Err(Error::General(format!(
                "server {id} is not a {}, as this connection requires",
                wanted.join(" or ")
            )));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}
