//! `[listen]` and `[node]`: where this sidecar serves and what it fronts.

use std::net::SocketAddr;

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
}

fn one() -> u32 {
    1
}
