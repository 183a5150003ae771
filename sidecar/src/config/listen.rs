//! `[listen]` and `[node]`: where this sidecar serves and what it fronts.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct Listen {
    /// Where local clients call (the outbound side).
    pub outbound: SocketAddr,
    /// Where other sidecars call this node (the inbound side).
    pub inbound: SocketAddr,
    /// Address other hosts use to reach `inbound` (default: `inbound`).
    pub advertise: Option<String>,
    /// Where OpenAI-API clients call (the HTTP edge, `/v1/...`); off
    /// when absent. Plaintext HTTP/1.1: loopback only unless
    /// `insecure_plaintext_anywhere`.
    #[serde(default)]
    pub http: Option<SocketAddr>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct NodeSection {
    /// The node's gRPC address, e.g. `127.0.0.1:50051`.
    pub address: String,
    /// Service name to register; default: the node's model name.
    pub service: Option<String>,
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub zone: String,
    #[serde(default = "one")]
    pub weight: u32,
    #[serde(default)]
    pub version: String,
    /// Register as standby capacity: warm and visible in `meshctl status`,
    /// not routed to until the autoscale controller (or `meshctl standby`)
    /// activates it; the controller may return it to standby later.
    #[serde(default)]
    pub standby: bool,
    /// How often, at most, the node's load goes to etcd for the autoscale
    /// controller, and only when it changed (a steady node writes nothing);
    /// `0s` turns the reports off.
    #[serde(default = "load_report_interval", with = "humantime_serde")]
    pub load_report_interval: Duration,
}

fn one() -> u32 {
    1
}

/// One write a second at most per busy node: the controller's window is
/// seconds long, and a fleet of 1,000 busy nodes writes ≤ 1,000 small
/// values a second, to keys only the controller watches.
fn load_report_interval() -> Duration {
    Duration::from_secs(1)
}
