//! The library side of `mesh-bench`: the load generator (`load`) and the
//! scenario runner (`scenario`). The binary is a thin CLI over it, and the
//! end-to-end tests call it directly against real node processes.

pub mod load;
pub mod scenario;
