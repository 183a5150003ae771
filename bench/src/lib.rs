//! The library side of `mesh-bench`: the load generator (`load`), the
//! scenario runner (`scenario`) and the local mesh of `mesh-bench up`
//! (`up`). The binary is a thin CLI over it, and the end-to-end tests call
//! it directly against real node processes.

pub mod load;
pub mod scenario;
pub mod up;
