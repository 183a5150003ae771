//! A real etcd on free loopback ports with its own data directory, removed
//! when dropped; plain, or serving TLS to clients that present a
//! certificate of its CA (`--client-cert-auth`), with auth enabled on
//! request.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::Command;

pub use registry::etcd::auth::MeshGrant;

use crate::{Error, Result, Spawned, free_port, http_get};

/// How long etcd may take to serve.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Starts tried when etcd finds a picked port taken.
const PORT_TRIES: usize = 3;

/// etcd's server TLS: its certificate and key, and the CA whose client
/// certificates it requires (`--trusted-ca-file`, `--client-cert-auth`).
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub struct Etcd {
    bin: PathBuf,
    process: Option<Spawned>,
    client_port: u16,
    peer_port: u16,
    /// Plain HTTP `/health` (and `/metrics`), probed whatever the client port speaks.
    metrics_port: u16,
    data_dir: PathBuf,
    tls: Option<EtcdTls>,
}

impl Etcd {
    /// Starts `bin` (etcd 3.4 or later) and waits until it is healthy.
    pub async fn start(bin: &Path) -> Result<Etcd> {
        Self::start_with(bin, None).await
    }

    /// Starts `bin` serving clients over TLS only, to those presenting a
    /// certificate signed by `tls.ca`.
    pub async fn start_tls(bin: &Path, tls: EtcdTls) -> Result<Etcd> {
        Self::start_with(bin, Some(tls)).await
    }

    async fn start_with(bin: &Path, tls: Option<EtcdTls>) -> Result<Etcd> {
        let mut tries = 0;
        loop {
            tries += 1;
            let (client_port, peer_port, metrics_port) = (free_port()?, free_port()?, free_port()?);
            let data_dir = std::env::temp_dir().join(format!("mesh-etcd-{}-{client_port}", std::process::id()));
            let bin = bin.to_path_buf();
            let tls = tls.clone();
            let mut etcd = Etcd { bin, process: None, client_port, peer_port, metrics_port, data_dir, tls };
            match etcd.launch().await {
                Ok(()) => return Ok(etcd),
                // Another process took a port between its pick and etcd's
                // bind (a CI run lost one so): new ports, another try.
                Err(Error::Exited { log, .. }) if tries < PORT_TRIES && log.contains("address already in use") => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// `http://127.0.0.1:PORT` (`https://` with TLS), for clients.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.client_addr())
    }

    /// Turns on etcd's auth: a `root` user with `root_password`, and a
    /// user and role `grant.user` that may read and write only under
    /// `grant.prefix`. `admin` connects (its TLS files, with
    /// `--client-cert-auth`).
    pub async fn enable_auth(
        &self,
        admin: registry::TlsFiles,
        root_password: &str,
        grant: &MeshGrant<'_>,
    ) -> Result<()> {
        let mut config = registry::EtcdConfig::new(vec![self.url()]);
        config.tls = Some(admin);
        let enabled = registry::etcd::auth::enable(&config, root_password, grant).await;
        enabled.map_err(|e| Error::io("etcd", "enabling auth", std::io::Error::other(e)))
    }

    /// Kills etcd (SIGKILL) and waits until it is gone.
    pub async fn stop(&mut self) {
        if let Some(mut process) = self.process.take()
            && process.kill().is_ok()
        {
            let _ = process.wait().await;
        }
    }

    /// Starts etcd again on the same ports, with its data or (`wipe`) none.
    pub async fn restart(&mut self, wipe: bool) -> Result<()> {
        self.stop().await;
        if wipe {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
        self.launch().await
    }

    /// The etcd process, while it runs.
    pub fn process(&self) -> Option<&Spawned> {
        self.process.as_ref()
    }

    fn client_addr(&self) -> SocketAddr {
        (Ipv4Addr::LOCALHOST, self.client_port).into()
    }

    async fn launch(&mut self) -> Result<()> {
        let (url, peer) = (self.url(), format!("http://127.0.0.1:{}", self.peer_port));
        let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, self.metrics_port));
        let mut cmd = Command::new(&self.bin);
        cmd.args(["--name", "mesh", "--data-dir"])
            .arg(&self.data_dir)
            .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("mesh={peer}")])
            .args(["--listen-metrics-urls", &format!("http://{metrics}")]);
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file").arg(&tls.cert).arg("--key-file").arg(&tls.key);
            cmd.arg("--trusted-ca-file").arg(&tls.ca).arg("--client-cert-auth");
        }
        let mut process = Spawned::spawn("etcd", cmd)?;
        // Ready when `/health` says so (a served read through raft), not
        // when a log line does: etcd's log wording is not an interface.
        let addr = metrics;
        process.probed(START_TIMEOUT, || healthy(addr)).await?;
        self.process = Some(process);
        Ok(())
    }
}

async fn healthy(addr: SocketAddr) -> bool {
    matches!(http_get(addr, "/health").await, Ok((200, body)) if body.contains(r#""health":"true""#))
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(process) = self.process.as_mut() {
            let _ = process.kill();
        }
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}
