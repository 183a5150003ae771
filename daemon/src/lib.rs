//! The process kit every mesh daemon (`mesh-node`, `mesh-sidecar`) shares.

pub mod ready;
