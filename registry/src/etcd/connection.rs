//! How the etcd client connects: TLS files, user and password, and errors
//! that say why a connection was refused.

use std::path::{Path, PathBuf};

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};

use super::EtcdConfig;
use crate::RegistryError;

/// Client certificate files for etcd over TLS.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA that signed etcd's server certificate.
    pub ca: PathBuf,
    /// Client certificate and key, for etcd's `--client-cert-auth`.
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// An etcd user whose password is kept in a file.
///
/// The password is read from the file at every (re)connection, never held
/// in a config or on a command line: a file can be mode 0640 and rotated in
/// place, while a config is copied and logged, and argv is visible to every
/// local user in `ps`. Without credentials, etcd (with `--client-cert-auth`
/// and auth enabled) takes the user from the client certificate's common
/// name.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub user: String,
    pub password_file: PathBuf,
}

fn read(path: &Path) -> Result<Vec<u8>, RegistryError> {
    std::fs::read(path).map_err(|error| RegistryError::Unreadable { path: path.display().to_string(), error })
}

impl Credentials {
    /// The password: the file's first line, so an editor's trailing
    /// newline is not part of it.
    pub fn password(&self) -> Result<String, RegistryError> {
        let bytes = read(&self.password_file)?;
        let text = String::from_utf8(bytes).map_err(|_| {
            RegistryError::Config(format!("{}: the etcd password is not UTF-8", self.password_file.display()))
        })?;
        let password = text.lines().next().unwrap_or_default();
        if password.is_empty() {
            return Err(RegistryError::Config(format!("{}: the etcd password is empty", self.password_file.display())));
        }
        Ok(password.to_string())
    }
}

impl EtcdConfig {
    /// Connection options, with every file read now.
    pub(super) fn options(&self) -> Result<ConnectOptions, RegistryError> {
        self.check_scheme()?;
        // HTTP/2 keep-alives notice a dead etcd while the watch waits. Only
        // while streams are open: etcd's default enforcement counts pings on
        // an idle connection as abuse.
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(self.request_timeout)
            .with_keep_alive(self.keep_alive_interval, self.request_timeout)
            .with_keep_alive_while_idle(false);
        if let Some(c) = &self.credentials {
            // etcd's auth tokens expire (`--auth-token-ttl`, 300 s for simple
            // tokens) on a connection that stays open for days.
            opts = opts.with_user(&c.user, c.password()?).with_auto_token_refresh(true);
        }
        if let Some(tls) = &self.tls {
            let mut t = TlsOptions::new().ca_certificate(Certificate::from_pem(read(&tls.ca)?));
            if let Some((cert, key)) = &tls.identity {
                t = t.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            opts = opts.with_tls(t);
        }
        Ok(opts)
    }

    /// TLS exactly when every endpoint is `https://`: a plain endpoint with
    /// a CA set, or an `https://` one without, would fail at the handshake
    /// with a far vaguer message.
    fn check_scheme(&self) -> Result<(), RegistryError> {
        for e in &self.endpoints {
            match (e.starts_with("https://"), self.tls.is_some()) {
                (false, true) if e.starts_with("http://") => {
                    return Err(RegistryError::Config(format!("etcd endpoint {e}: TLS is configured, use https://")));
                }
                (true, false) => {
                    return Err(RegistryError::Config(format!("etcd endpoint {e}: https:// needs the etcd CA")));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

impl RegistryError {
    /// etcd answered and refused this client (its certificate at the TLS
    /// handshake, a wrong password, no permission, its key held by another
    /// process): not an outage to wait out, a configuration to fix.
    pub fn is_refusal(&self) -> bool {
        if let RegistryError::Claimed { .. } = self {
            return true;
        }
        let RegistryError::Etcd(e) = self else { return false };
        if let etcd_client::Error::GRpcStatus(s) = e
            && (matches!(s.code(), tonic::Code::PermissionDenied | tonic::Code::Unauthenticated)
                || s.message().starts_with("etcdserver: authentication failed"))
        {
            return true;
        }
        explain(e).contains("received fatal alert")
    }
}

/// An etcd client error with its causes: a refused TLS handshake reads
/// `transport error` alone otherwise (the reason, e.g. `received fatal
/// alert: BadCertificate`, is in the error's sources).
pub fn explain(e: &etcd_client::Error) -> String {
    let (mut text, mut source) = match e {
        etcd_client::Error::GRpcStatus(s) if !s.message().is_empty() => {
            (s.message().to_string(), std::error::Error::source(s))
        }
        etcd_client::Error::TransportError(t) => (e.to_string(), std::error::Error::source(t)),
        _ => return e.to_string(),
    };
    while let Some(s) = source {
        let cause = s.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str, text: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("registry-{}-{name}", std::process::id()));
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn the_password_is_the_first_line_of_its_file() {
        let c = Credentials { user: "mesh".into(), password_file: temp("pw", "s3cret\n") };
        assert_eq!(c.password().unwrap(), "s3cret");
        let empty = Credentials { user: "mesh".into(), password_file: temp("empty", "\n") };
        assert!(empty.password().unwrap_err().to_string().contains("password is empty"));
        let missing = Credentials { user: "mesh".into(), password_file: "/nonexistent/pw".into() };
        assert!(missing.password().unwrap_err().to_string().starts_with("cannot read /nonexistent/pw"));
    }

    #[test]
    fn tls_goes_with_https_endpoints_only() {
        let mut c = EtcdConfig::new(vec!["https://127.0.0.1:2379".into()]);
        let e = c.options().err().unwrap().to_string();
        assert!(e.contains("https:// needs the etcd CA"), "{e}");
        c.endpoints = vec!["http://127.0.0.1:2379".into()];
        c.tls = Some(TlsFiles { ca: temp("ca", "x"), identity: None });
        let e = c.options().err().unwrap().to_string();
        assert!(e.contains("TLS is configured, use https://"), "{e}");
        c.endpoints = vec!["https://127.0.0.1:2379".into()];
        c.tls = Some(TlsFiles { ca: "/nonexistent/ca.pem".into(), identity: None });
        assert!(c.options().err().unwrap().to_string().starts_with("cannot read /nonexistent/ca.pem"));
    }
}
