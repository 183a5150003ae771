//! The mesh's launcher: starts etcd, `mesh-node` and `mesh-sidecar` as child
//! processes on free loopback ports, waits until each is ready, and kills
//! them when dropped. The bench scenarios, the end-to-end tests and
//! `mesh-bench up` (which `scripts/demo.sh` runs) all start processes here,
//! so there is one place that knows how.
//!
//! Readiness is machine-readable: `mesh-node` and `mesh-sidecar` print one
//! JSON line on stdout when they serve (see `daemon::ready`), naming the
//! addresses they bound; etcd is ready when its `/health` endpoint says so.
//! Log wording is never parsed to decide readiness; the log (stderr) is
//! kept for error messages and for tests that count log lines.

mod error;
mod etcd;
mod http;
mod locate;
mod node;
mod process;
mod ready;
mod sidecar;

pub use error::Error;
pub use etcd::{Etcd, EtcdTls, MeshGrant};
pub use http::http_get;
pub use locate::{bin_dir, default_model, free_port, workspace_bin};
pub use node::Node;
pub use process::{Memory, Spawned, cpu_seconds};
pub use ready::Addresses;
pub use sidecar::{ConfigFile, Sidecar, SidecarConfig};

pub type Result<T, E = Error> = std::result::Result<T, E>;
