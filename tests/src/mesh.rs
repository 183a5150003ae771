//! A local mesh for end-to-end tests: etcd, synthetic nodes each behind an
//! inbound sidecar, and client sidecars, all real processes on free ports.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use mesh_proto::v1::generation_client::GenerationClient;
use mesh_proto::v1::sidecar_admin_client::SidecarAdminClient;
use mesh_proto::v1::{InstanceState, InstancesRequest};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::Channel;

use crate::etcd::Etcd;
use crate::{NodeProcess, bin_dir, free_port};

/// A sidecar process, killed when dropped.
pub struct SidecarProcess {
    pub child: Child,
    /// Every log line so far.
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    pub outbound: SocketAddr,
    /// Set when it fronts a node.
    pub inbound: Option<SocketAddr>,
    _config: TempFile,
}

struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl SidecarProcess {
    /// Starts `mesh-sidecar` with `config` (TOML, without `[listen]` and
    /// `[etcd]`, which are filled in) and waits until it is listening (and
    /// registered, when it fronts a node).
    pub async fn start(etcd: &Etcd, node: Option<&NodeProcess>, config: &str) -> SidecarProcess {
        Self::start_with_args(etcd, node, config, &[]).await
    }

    /// Like `start`, with extra command-line flags (e.g. `--otlp-endpoint`).
    pub async fn start_with_args(
        etcd: &Etcd,
        node: Option<&NodeProcess>,
        config: &str,
        args: &[&str],
    ) -> SidecarProcess {
        let path = std::env::temp_dir().join(format!("mesh-sidecar-{}-{}.toml", std::process::id(), free_port()));
        let node_section = match node {
            Some(n) => format!("[node]\naddress = \"{}\"\n", n.addr),
            None => String::new(),
        };
        let full = format!(
            "drain_grace = \"5s\"\n{tls}[listen]\noutbound = \"127.0.0.1:0\"\ninbound = \"127.0.0.1:0\"\n[etcd]\nendpoints = [\"{}\"]\nlease_ttl = \"2s\"\n{node_section}{config}",
            etcd.url(),
            tls = if config.contains("[tls]") { "" } else { "plaintext = true\n" },
        );
        std::fs::write(&path, full).expect("writing sidecar config");
        let mut child = Command::new(bin_dir().join("mesh-sidecar"))
            .arg("--config")
            .arg(&path)
            .args(args)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawning mesh-sidecar (build it first: cargo build --release)");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let (mut outbound, mut inbound) = (None, None);
        let ready = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.expect("sidecar log") {
                if let Some(a) = line.split("outbound listening on ").nth(1) {
                    outbound = a.trim().parse().ok();
                }
                if let Some(a) = line.split("inbound listening on ").nth(1) {
                    inbound = a.trim().parse().ok();
                }
                let done = match node {
                    Some(_) => line.contains("node registered in the mesh"),
                    None => outbound.is_some(),
                };
                if done {
                    return;
                }
            }
            panic!("sidecar exited before it was ready");
        })
        .await;
        ready.expect("sidecar did not become ready");
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                sink.lock().unwrap().push(line);
            }
        });
        SidecarProcess { child, log, outbound: outbound.expect("outbound address"), inbound, _config: TempFile(path) }
    }

    /// Log lines (since it became ready) containing `text`.
    pub fn logged(&self, text: &str) -> usize {
        self.log.lock().unwrap().iter().filter(|l| l.contains(text)).count()
    }

    async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.outbound)).unwrap().connect().await.expect("connecting")
    }

    pub async fn client(&self) -> GenerationClient<Channel> {
        GenerationClient::new(self.channel().await)
    }

    /// The sidecar's view of every instance.
    pub async fn instances(&self) -> Vec<InstanceState> {
        let mut admin = SidecarAdminClient::new(self.channel().await);
        admin.instances(InstancesRequest {}).await.expect("admin").into_inner().instances
    }

    /// Waits until the sidecar knows `n` instances of `service`.
    pub async fn wait_for_instances(&self, service: &str, n: usize) {
        let known = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if self.instances().await.iter().filter(|i| i.service == service).count() == n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        known.unwrap_or_else(|_| panic!("sidecar never saw {n} instances of {service}"));
    }
}

/// Sends a signal to a child process.
pub fn signal(child: &Child, sig: &str) {
    let pid = child.id().expect("running").to_string();
    let ok = std::process::Command::new("kill").args([&format!("-{sig}"), &pid]).status().expect("kill");
    assert!(ok.success(), "kill -{sig} {pid}");
}
