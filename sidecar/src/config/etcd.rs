//! `[etcd]`: the registry this sidecar registers in and watches, and how it
//! proves who it is to etcd (a client certificate, a user).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, invalid};

#[derive(Debug, Clone, Deserialize)]
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
    /// The CA of etcd's server certificate: TLS to etcd (`https://`
    /// endpoints) exactly when set.
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for etcd's `--client-cert-auth`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// etcd user (RBAC); without one, etcd takes the user from the client
    /// certificate's common name.
    pub user: Option<String>,
    /// File holding the user's password (first line). Never the password
    /// itself: configs get copied, diffed and pasted into tickets, and a
    /// file of its own can be mode 0640 and rotated without touching the
    /// config (it is read again at each reconnection).
    pub password_file: Option<PathBuf>,
}

fn default_keep_alive() -> Duration {
    registry::etcd::KEEP_ALIVE_INTERVAL
}

fn default_prefix() -> String {
    "/mesh/v1/".into()
}

fn default_ttl() -> Duration {
    Duration::from_secs(5)
}

/// Longest lease TTL and keep-alive interval: a dead sidecar stays routed
/// to for up to a TTL, and an hour is already far past any sane choice.
const MAX_INTERVAL: Duration = Duration::from_secs(3600);

impl EtcdSection {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.endpoints.is_empty() {
            return Err(invalid("etcd.endpoints", "needs at least one endpoint"));
        }
        if self.lease_ttl < Duration::from_secs(1) || self.lease_ttl > MAX_INTERVAL {
            return Err(invalid("etcd.lease_ttl", "must be in [1s, 1h]"));
        }
        if self.keep_alive_interval < Duration::from_secs(1) || self.keep_alive_interval > MAX_INTERVAL {
            return Err(invalid("etcd.keep_alive_interval", "must be in [1s, 1h]"));
        }
        self.validate_scheme()?;
        self.validate_identity()
    }

    /// TLS exactly when `ca` is set, and then on every endpoint.
    fn validate_scheme(&self) -> Result<(), ConfigError> {
        for e in &self.endpoints {
            match (e.starts_with("https://"), &self.ca) {
                (true, None) => {
                    return Err(invalid("etcd.endpoints", format!("{e} is https:// but etcd.ca is not set")));
                }
                (false, Some(_)) if e.starts_with("http://") => {
                    return Err(invalid("etcd.endpoints", format!("{e} must be https:// when etcd.ca is set")));
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn validate_identity(&self) -> Result<(), ConfigError> {
        match (&self.cert, &self.key) {
            (Some(_), None) => return Err(invalid("etcd.cert", "requires etcd.key")),
            (None, Some(_)) => return Err(invalid("etcd.key", "requires etcd.cert")),
            (Some(_), Some(_)) if self.ca.is_none() => return Err(invalid("etcd.cert", "requires etcd.ca")),
            _ => {}
        }
        match (&self.user, &self.password_file) {
            (Some(u), _) if u.is_empty() => return Err(invalid("etcd.user", "must not be empty")),
            (Some(_), None) => return Err(invalid("etcd.user", "requires etcd.password_file")),
            (None, Some(_)) => return Err(invalid("etcd.password_file", "requires etcd.user")),
            _ => {}
        }
        let files = [("etcd.ca", &self.ca), ("etcd.cert", &self.cert), ("etcd.key", &self.key)];
        for (key, path) in files.into_iter().chain([("etcd.password_file", &self.password_file)]) {
            if let Some(p) = path {
                readable(key, p)?;
            }
        }
        if let Some(c) = self.credentials() {
            c.password().map_err(|e| invalid("etcd.password_file", e.to_string()))?;
        }
        Ok(())
    }

    fn credentials(&self) -> Option<registry::Credentials> {
        let (user, file) = (self.user.clone()?, self.password_file.clone()?);
        Some(registry::Credentials { user, password_file: file })
    }

    /// The registry's connection settings.
    pub fn registry(&self) -> registry::EtcdConfig {
        let mut c = registry::EtcdConfig::new(self.endpoints.clone());
        c.prefix = self.prefix.clone();
        c.lease_ttl = self.lease_ttl;
        c.keep_alive_interval = self.keep_alive_interval;
        c.tls = self.ca.clone().map(|ca| registry::TlsFiles { ca, identity: self.cert.clone().zip(self.key.clone()) });
        c.credentials = self.credentials();
        c
    }
}

fn readable(key: &str, path: &Path) -> Result<(), ConfigError> {
    match std::fs::File::open(path) {
        Ok(_) => Ok(()),
        Err(e) => Err(invalid(key, format!("cannot read {}: {e}", path.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `[etcd]` section of a whole config, so unknown keys are judged
    /// as the sidecar judges them (`SidecarConfig::parse`).
    fn section(extra: &str) -> Result<(), String> {
        let text = format!(
            "plaintext = true\n[listen]\noutbound = \"127.0.0.1:7100\"\ninbound = \"127.0.0.1:7101\"\n\
             [etcd]\nendpoints = [\"https://127.0.0.1:2379\"]\n{extra}"
        );
        let s = crate::config::SidecarConfig::parse(&text).map_err(|e| e.to_string())?.etcd;
        s.validate().map_err(|e| e.to_string())
    }

    fn file(name: &str, text: &str) -> String {
        let p = std::env::temp_dir().join(format!("sidecar-etcd-{}-{name}", std::process::id()));
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }

    #[test]
    fn tls_and_credentials_are_read_into_the_registry_config() {
        let (ca, cert, key, pw) = (file("ca", "x"), file("cert", "x"), file("key", "x"), file("pw", "s3cret\n"));
        let text = format!(
            "endpoints = [\"https://127.0.0.1:2379\"]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\
             user = \"mesh\"\npassword_file = \"{pw}\"\n"
        );
        let s: EtcdSection = toml::from_str(&text).unwrap();
        s.validate().unwrap();
        let c = s.registry();
        let tls = c.tls.unwrap();
        assert_eq!((tls.ca.display().to_string(), tls.identity.unwrap().1.display().to_string()), (ca, key));
        let creds = c.credentials.unwrap();
        assert_eq!((creds.user.as_str(), creds.password().unwrap().as_str()), ("mesh", "s3cret"));
    }

    #[test]
    fn bad_tls_and_credentials_name_the_key() {
        let (ca, cert) = (file("ca2", "x"), file("cert2", "x"));
        let cases = [
            (String::new(), "etcd.endpoints: https://127.0.0.1:2379 is https:// but etcd.ca is not set"),
            (format!("ca = \"{ca}\"\ncert = \"{cert}\"\n"), "etcd.cert: requires etcd.key"),
            (format!("ca = \"{ca}\"\nkey = \"{cert}\"\n"), "etcd.key: requires etcd.cert"),
            ("ca = \"/nonexistent/ca.pem\"\n".into(), "etcd.ca: cannot read /nonexistent/ca.pem"),
            (format!("ca = \"{ca}\"\nuser = \"mesh\"\n"), "etcd.user: requires etcd.password_file"),
            (format!("ca = \"{ca}\"\npassword_file = \"{ca}\"\n"), "etcd.password_file: requires etcd.user"),
            (
                format!("ca = \"{ca}\"\nuser = \"mesh\"\npassword_file = \"{}\"\n", file("empty", "")),
                "etcd.password_file: ",
            ),
            (format!("ca = \"{ca}\"\npassword = \"inline\"\n"), "etcd.password: unknown key"),
            (format!("ca = \"{ca}\"\nlease_ttl = \"2h\"\n"), "etcd.lease_ttl: must be in [1s, 1h]"),
        ];
        for (extra, wanted) in cases {
            let err = section(&extra).unwrap_err();
            assert!(err.contains(wanted), "{extra}: {err}");
        }
        let plain: EtcdSection = toml::from_str(&format!("endpoints = [\"http://e:2379\"]\nca = \"{ca}\"")).unwrap();
        let err = plain.validate().unwrap_err().to_string();
        assert_eq!(err, "etcd.endpoints: http://e:2379 must be https:// when etcd.ca is set");
    }
}
