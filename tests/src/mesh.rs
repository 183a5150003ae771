//! A local mesh for end-to-end tests: etcd, synthetic nodes each behind an
//! inbound sidecar, and client sidecars, all real processes on free ports.

use std::net::SocketAddr;
use std::time::Duration;

use harness::{Sidecar, SidecarConfig, Spawned};
use mesh_proto::v1::InstanceState;
use mesh_proto::v1::generation_client::GenerationClient;
use tonic::transport::Channel;

use crate::NodeProcess;
use crate::etcd::Etcd;

/// A sidecar process (started by `harness`), killed when dropped.
pub struct SidecarProcess {
    pub outbound: SocketAddr,
    /// Set when it fronts a node.
    pub inbound: Option<SocketAddr>,
    /// Set when it serves the HTTP edge ([`SidecarProcess::start_edge`]).
    pub http: Option<SocketAddr>,
    sidecar: Sidecar,
}

impl SidecarProcess {
    /// Starts `mesh-sidecar` with `config` (TOML, without `[listen]` and
    /// `[etcd]`, which are filled in) and waits until it is ready (and
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
        let mut full = SidecarConfig::new(etcd.url()).with(config);
        if let Some(n) = node {
            full = full.fronting(n.addr);
        }
        Self::launch(full, args).await
    }

    /// A client sidecar (no node) serving the HTTP edge too.
    pub async fn start_edge(etcd: &Etcd, config: &str, args: &[&str]) -> SidecarProcess {
        Self::launch(SidecarConfig::new(etcd.url()).with(config).with_http(), args).await
    }

    async fn launch(full: SidecarConfig, args: &[&str]) -> SidecarProcess {
        let bin = harness::workspace_bin("mesh-sidecar", None, "cargo build --release").expect("mesh-sidecar");
        let sidecar = Sidecar::start("mesh-sidecar", &bin, &full, args).await.expect("starting mesh-sidecar");
        SidecarProcess { outbound: sidecar.outbound, inbound: sidecar.inbound, http: sidecar.http, sidecar }
    }

    /// The process, to signal or wait for.
    pub fn process(&mut self) -> &mut Spawned {
        &mut self.sidecar.process
    }

    /// The process, to read its pid or log.
    pub fn spawned(&self) -> &Spawned {
        &self.sidecar.process
    }

    /// Its metrics address, when its config has `metrics_listen`.
    pub fn metrics(&self) -> Option<SocketAddr> {
        self.sidecar.metrics
    }

    /// Log lines containing `text`.
    pub fn logged(&self, text: &str) -> usize {
        self.sidecar.process.logged(text)
    }

    pub async fn client(&self) -> GenerationClient<Channel> {
        GenerationClient::new(self.sidecar.channel().await.expect("connecting"))
    }

    /// The sidecar's view of every instance.
    pub async fn instances(&self) -> Vec<InstanceState> {
        self.sidecar.instances().await.expect("admin")
    }

    /// Waits until the sidecar knows `n` instances of `service`.
    pub async fn wait_for_instances(&self, service: &str, n: usize) {
        let count = |all: &[InstanceState]| all.iter().filter(|i| i.service == service).count();
        self.wait_for(&format!("{n} instances of {service}"), |all| count(all) == n).await;
    }

    /// Waits (up to 10 s) until the sidecar's view of the instances passes `test`.
    pub async fn wait_for(&self, what: &str, test: impl FnMut(&[InstanceState]) -> bool) {
        let seen = self.sidecar.wait_for_instances(Duration::from_secs(10), test).await;
        seen.unwrap_or_else(|_| panic!("sidecar never saw {what}"));
    }
}

/// Sends a signal (`TERM`, `KILL`, `STOP`, `CONT`) to a process.
pub fn signal(process: &Spawned, sig: &str) {
    process.signal(sig).unwrap_or_else(|e| panic!("{e}"));
}
