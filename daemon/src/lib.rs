//! The process kit every mesh daemon (`mesh-node`, `mesh-sidecar`) shares:
//! one gRPC server shape (health, reflection, HTTP/2 settings, graceful
//! stop), the signals that start a drain, the ready line, TLS from PEM
//! files and the Prometheus endpoint.

pub mod gate;
pub mod grpc;
pub mod health;
pub mod metrics;
pub mod preface;
pub mod ready;
pub mod reflection;
pub mod server_identity;
pub mod signal;
pub mod tls;
