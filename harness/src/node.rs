//! A `mesh-node` on a free loopback port.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::process::Command;

use crate::{Result, Spawned};

/// How long a node may take to serve: a real model loads its weights first.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// A running node; dropping it kills the process.
pub struct Node {
    pub process: Spawned,
    /// Its gRPC address.
    pub addr: SocketAddr,
    /// Its metrics address, when started with `--metrics-listen`.
    pub metrics: Option<SocketAddr>,
}

impl Node {
    /// Runs `bin --listen 127.0.0.1:0 ARGS` (with `RUST_LOG=info`) and
    /// waits for its ready line.
    pub async fn start<I, S>(name: impl Into<String>, bin: &Path, args: I) -> Result<Node>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(bin);
        cmd.args(["--listen", "127.0.0.1:0"]).args(args).env("RUST_LOG", "info");
        let mut process = Spawned::spawn(name, cmd)?;
        let addresses = process.announced("node", START_TIMEOUT).await?;
        let addr = addresses.require(process.name(), "grpc")?;
        Ok(Node { metrics: addresses.get("metrics"), process, addr })
    }
}
