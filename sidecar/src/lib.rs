//! The sidecar: runs beside every node. Outbound, it is a client's entry
//! point into the mesh (least-loaded routing, retries, ejection,
//! migration); inbound, it is the gate in front of its own node (tenant
//! limits, bulkheads, deadline-aware admission). It registers its node in
//! etcd under a lease.

pub mod admin;
pub mod config;
pub mod edge;
pub mod inbound;
pub mod metrics;
pub mod outbound;
mod registration;
pub mod server;
mod stack;
pub mod tls;
mod trace;
pub mod upstream;
pub mod wire;
