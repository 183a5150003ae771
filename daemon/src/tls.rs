//! Server TLS from PEM files, with errors that name the file and what it
//! was for.

use std::path::Path;

use anyhow::Context as _;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// Reads a PEM file; `what` says what it is for ("TLS certificate").
pub fn read_pem(what: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read the {what} {}", path.display()))
}

/// Serves as `cert`/`key`; with `client_ca`, also requires each client to
/// present a certificate that chains to it (mutual TLS).
pub fn server_config(cert: &Path, key: &Path, client_ca: Option<&Path>) -> anyhow::Result<ServerTlsConfig> {
    let identity = Identity::from_pem(read_pem("TLS certificate", cert)?, read_pem("TLS private key", key)?);
    let mut tls = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read_pem("TLS client CA", ca)?));
    }
    Ok(tls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_file_is_named_with_its_purpose() {
        let dir = std::env::temp_dir().join(format!("daemon-tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cert = dir.join("cert.pem");
        std::fs::write(&cert, b"not checked until the handshake").unwrap();
        let key = dir.join("missing-key.pem");

        let err = format!("{:#}", server_config(&cert, &key, None).unwrap_err());
        assert!(err.contains("TLS private key"), "{err}");
        assert!(err.contains("missing-key.pem"), "{err}");

        let key = cert.clone();
        let ca = dir.join("missing-ca.pem");
        let err = format!("{:#}", server_config(&cert, &key, Some(&ca)).unwrap_err());
        assert!(err.contains("TLS client CA") && err.contains("missing-ca.pem"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
