//! A real etcd on free loopback ports with its own data directory, removed
//! when dropped.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::Command;

use crate::{Result, Spawned, free_port, http_get};

/// How long etcd may take to serve.
const START_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Etcd {
    bin: PathBuf,
    process: Option<Spawned>,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
}

impl Etcd {
    /// Starts `bin` (etcd 3.4 or later) and waits until it is healthy.
    pub async fn start(bin: &Path) -> Result<Etcd> {
        let (client_port, peer_port) = (free_port()?, free_port()?);
        let data_dir = std::env::temp_dir().join(format!("mesh-etcd-{}-{client_port}", std::process::id()));
        let mut etcd = Etcd { bin: bin.to_path_buf(), process: None, client_port, peer_port, data_dir };
        etcd.launch().await?;
        Ok(etcd)
    }

    /// `http://127.0.0.1:PORT`, for clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.client_addr())
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
        let mut cmd = Command::new(&self.bin);
        cmd.args(["--name", "mesh", "--data-dir"])
            .arg(&self.data_dir)
            .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("mesh={peer}")]);
        let mut process = Spawned::spawn("etcd", cmd)?;
        // Ready when `/health` says so (a served read through raft), not
        // when a log line does: etcd's log wording is not an interface.
        let addr = self.client_addr();
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
