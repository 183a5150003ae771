//! A `mesh-sidecar` on free loopback ports, with its config file written
//! for it.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh_proto::api_key::digest;
use mesh_proto::v1::sidecar_admin_client::SidecarAdminClient;
use mesh_proto::v1::{InstanceState, InstancesRequest};
use tokio::process::Command;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

use crate::{Error, Result, Spawned, free_port};

/// The admin key of every sidecar the harness starts with `[[api_keys]]`
/// (tenant `harness`), so it can read their admin service.
pub const ADMIN_KEY: &str = "harness-admin-key";

/// How long a sidecar may take to serve (and register its node).
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A sidecar's config: the parts every local mesh shares, and `extra` TOML.
#[derive(Debug, Clone)]
pub struct SidecarConfig {
    /// etcd's client URL.
    pub etcd: String,
    /// More keys of `[etcd]` (TLS files, user), one per line.
    pub etcd_keys: String,
    /// The node it fronts (its inbound side), if any.
    pub node: Option<SocketAddr>,
    /// More TOML, appended: `[routing]`, `[[services]]`, `[outlier]`, `[tls]`...
    pub extra: String,
    /// Serve the HTTP edge (`listen.http`) on a free port.
    pub http: bool,
    /// Serve `/metrics` (`metrics_listen`) on a free port.
    pub metrics: bool,
}

impl SidecarConfig {
    /// A client-side sidecar of the mesh at `etcd`.
    pub fn new(etcd: impl Into<String>) -> SidecarConfig {
        SidecarConfig {
            etcd: etcd.into(),
            etcd_keys: String::new(),
            node: None,
            extra: String::new(),
            http: false,
            metrics: false,
        }
    }

    /// The same, fronting the node at `node`.
    pub fn fronting(self, node: SocketAddr) -> SidecarConfig {
        SidecarConfig { node: Some(node), ..self }
    }

    /// The same, serving the HTTP edge too.
    pub fn with_http(self) -> SidecarConfig {
        SidecarConfig { http: true, ..self }
    }

    /// The same, serving `/metrics` too ([`Sidecar::metrics`]).
    pub fn with_metrics(self) -> SidecarConfig {
        SidecarConfig { metrics: true, ..self }
    }

    /// The same, with `keys` (TOML lines) added to `[etcd]`.
    pub fn with_etcd(mut self, keys: &str) -> SidecarConfig {
        self.etcd_keys.push_str(keys);
        self
    }

    /// The same, with `toml` appended.
    pub fn with(mut self, toml: &str) -> SidecarConfig {
        self.extra.push_str(toml);
        self
    }

    /// The file's text. Listeners on port 0 (the ready line says which
    /// ports they got); plaintext, which the sidecar requires be said, as
    /// every hop is loopback, unless `extra` brings a `[tls]` section; a
    /// short lease so a dead sidecar leaves the mesh quickly.
    pub fn to_toml(&self) -> String {
        let plaintext = if self.extra.contains("[tls]") { "" } else { "plaintext = true\n" };
        // With keys, the admin service takes an admin key: the harness's own.
        let operator = match self.extra.contains("[[api_keys]]") {
            true => format!("[[api_keys]]\ntenant = \"harness\"\nsha256 = \"{}\"\nadmin = true\n", digest(ADMIN_KEY)),
            false => String::new(),
        };
        let node = match self.node {
            Some(addr) => format!("[node]\naddress = \"{addr}\"\n"),
            None => String::new(),
        };
        let http = if self.http { "http = \"127.0.0.1:0\"\n" } else { "" };
        let metrics = if self.metrics { "metrics_listen = \"127.0.0.1:0\"\n" } else { "" };
        format!(
            "drain_grace = \"5s\"\n{plaintext}{metrics}[listen]\noutbound = \"127.0.0.1:0\"\ninbound = \"127.0.0.1:0\"\n{http}\
             [etcd]\nendpoints = [\"{}\"]\nlease_ttl = \"2s\"\n{}{node}{}{operator}",
            self.etcd, self.etcd_keys, self.extra
        )
    }
}

/// A file removed when dropped.
pub struct ConfigFile(PathBuf);

impl ConfigFile {
    fn write(name: &str, text: &str) -> Result<ConfigFile> {
        let port = free_port()?; // a unique name among this process's files
        let path = std::env::temp_dir().join(format!("mesh-sidecar-{}-{port}.toml", std::process::id()));
        std::fs::write(&path, text).map_err(|e| Error::io(name, format!("writing {}", path.display()), e))?;
        Ok(ConfigFile(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A running sidecar; dropping it kills the process and removes its config.
pub struct Sidecar {
    pub process: Spawned,
    pub outbound: SocketAddr,
    /// Set when it fronts a node.
    pub inbound: Option<SocketAddr>,
    /// Set when it serves metrics.
    pub metrics: Option<SocketAddr>,
    /// Set when it serves the HTTP edge.
    pub http: Option<SocketAddr>,
    pub config: ConfigFile,
}

impl Sidecar {
    /// Writes `config` and runs `bin --config FILE ARGS` (with
    /// `RUST_LOG=info`); returns once it announces itself, which a sidecar
    /// fronting a node does only after registering the node in etcd.
    pub async fn start<I, S>(name: impl Into<String>, bin: &Path, config: &SidecarConfig, args: I) -> Result<Sidecar>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let (mut process, file) = Self::launch(name, bin, config, args)?;
        let addresses = process.announced("sidecar", START_TIMEOUT).await?;
        let outbound = addresses.require(process.name(), "outbound")?;
        let inbound = match config.node {
            Some(_) => Some(addresses.require(process.name(), "inbound")?),
            None => None,
        };
        let (metrics, http) = (addresses.get("metrics"), addresses.get("http"));
        Ok(Sidecar { outbound, inbound, metrics, http, process, config: file })
    }

    /// Writes `config` and runs `bin --config FILE ARGS` without waiting
    /// for it to be ready (a sidecar etcd refuses never is); the config
    /// file lives as long as the returned handle.
    pub fn launch<I, S>(
        name: impl Into<String>,
        bin: &Path,
        config: &SidecarConfig,
        args: I,
    ) -> Result<(Spawned, ConfigFile)>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let name = name.into();
        let file = ConfigFile::write(&name, &config.to_toml())?;
        let mut cmd = Command::new(bin);
        cmd.arg("--config").arg(file.path()).args(args).env("RUST_LOG", "info");
        Ok((Spawned::spawn(name, cmd)?, file))
    }

    /// A channel to its outbound side (generation and admin).
    pub async fn channel(&self) -> Result<Channel> {
        let connect = |source| Error::Connect { name: self.process.name().to_string(), source };
        let endpoint = Endpoint::try_from(format!("http://{}", self.outbound)).map_err(connect)?;
        endpoint.connect().await.map_err(connect)
    }

    /// Its view of every instance.
    pub async fn instances(&self) -> Result<Vec<InstanceState>> {
        let mut admin = SidecarAdminClient::new(self.channel().await?);
        let mut request = tonic::Request::new(InstancesRequest {});
        let bearer = MetadataValue::try_from(format!("Bearer {ADMIN_KEY}")).expect("an ASCII key");
        request.metadata_mut().insert("authorization", bearer);
        let reply = admin.instances(request).await;
        let reply = reply.map_err(|s| Error::Rpc { name: self.process.name().to_string(), source: Box::new(s) })?;
        Ok(reply.into_inner().instances)
    }

    /// Waits (up to `timeout`) until its view of the instances satisfies
    /// `wanted` (e.g. "three instances of `chat`, none ejected").
    pub async fn wait_for_instances(
        &self,
        timeout: Duration,
        mut wanted: impl FnMut(&[InstanceState]) -> bool,
    ) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = Vec::new();
        loop {
            // Not answering yet reads as knowing nothing yet.
            if let Ok(now) = self.instances().await {
                last = now;
            }
            if wanted(&last) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                let seen = last
                    .iter()
                    .map(|i| format!("{} {}{}", i.service, i.address, if i.ejected { " (ejected)" } else { "" }));
                let seen = seen.collect::<Vec<_>>().join(", ");
                return Err(Error::Instances { name: self.process.name().to_string(), timeout, seen });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_names_etcd_the_node_and_the_extra() {
        let c = SidecarConfig::new("http://127.0.0.1:2379").fronting("127.0.0.1:9".parse().unwrap());
        let text = c.clone().with("[routing]\npolicy = \"round-robin\"\n").to_toml();
        assert!(
            text.contains("endpoints = [\"http://127.0.0.1:2379\"]") && text.contains("plaintext = true"),
            "{text}"
        );
        assert!(text.contains("[node]\naddress = \"127.0.0.1:9\"\n[routing]\npolicy = \"round-robin\""), "{text}");
        assert!(!c.with("[tls]\nca = \"x\"\n").to_toml().contains("plaintext"));
        assert!(!SidecarConfig::new("http://e").to_toml().contains("[node]"));
    }
}
