//! Certificates for the TLS tests, made by `meshctl` as operators make
//! them: a CA, and certificates that carry a workload identity
//! (`spiffe://mesh/host/<name>/role/<role>`), all valid for 127.0.0.1.

use std::path::PathBuf;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::{bin_dir, free_port};

/// Runs `meshctl` and insists it succeeds.
pub async fn meshctl(args: &[&str]) -> String {
    let out = tokio::process::Command::new(bin_dir().join("meshctl")).args(args).output().await.unwrap();
    assert!(out.status.success(), "meshctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A development CA in its own directory, removed when dropped.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub async fn new() -> Pki {
        let dir = std::env::temp_dir().join(format!("mesh-pki-{}-{}", std::process::id(), free_port()));
        meshctl(&["certs-ca", "--out", dir.to_str().unwrap()]).await;
        Pki { dir }
    }

    /// Issues `name.pem`/`name.key` for host `name` in `role`.
    pub async fn issue(&self, name: &str, role: &str) -> &Pki {
        self.issue_for_days(name, role, 365).await
    }

    /// The same, valid for `days` (0: already expired).
    pub async fn issue_for_days(&self, name: &str, role: &str, days: u32) -> &Pki {
        let (d, days) = (self.dir.to_str().unwrap(), days.to_string());
        let args = ["certs-issue", "--ca-dir", d, "--name", name, "--role", role, "--san", "127.0.0.1,localhost"];
        meshctl(&[&args[..], &["--out", d, "--days", &days]].concat()).await;
        self
    }

    /// A file of this PKI, as a string.
    pub fn path(&self, file: &str) -> String {
        self.dir.join(file).display().to_string()
    }

    /// A sidecar's `[tls]` section presenting `name`'s certificate.
    pub fn tls_section(&self, name: &str) -> String {
        let (ca, cert, key) =
            (self.path("ca.pem"), self.path(&format!("{name}.pem")), self.path(&format!("{name}.key")));
        format!("[tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n")
    }

    /// Client TLS trusting this CA and presenting `name`'s certificate.
    pub fn client(&self, name: &str) -> ClientTlsConfig {
        let read = |f: String| std::fs::read(f).unwrap();
        let id = Identity::from_pem(read(self.path(&format!("{name}.pem"))), read(self.path(&format!("{name}.key"))));
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(self.path("ca.pem")))).identity(id)
    }

    /// A channel to `addr` as `name` (connected at the first call, so a
    /// refused handshake shows as that call's error).
    pub fn channel(&self, addr: impl std::fmt::Display, name: &str) -> Channel {
        let endpoint = Channel::from_shared(format!("https://{addr}")).unwrap();
        endpoint.tls_config(self.client(name)).unwrap().connect_lazy()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
