//! The load generator: drives the generated `mesh.v1.Generation` client
//! against a node or a sidecar (anything serving the contract), records every
//! request, and summarises them with HDR histograms.
//!
//! Two arrival models, because they answer different questions:
//! - closed loop (`Arrival::Closed`): N streams, each sends its next request
//!   when the previous one ends. Load adapts to the server, so it measures
//!   throughput but hides queueing: a slow server simply gets fewer requests.
//! - open loop (`Arrival::Open`): Poisson arrivals at R requests/s whatever
//!   the server does, as real users behave. Past capacity, queues grow and
//!   TTFT explodes or refusals appear: this is what exposes collapse.
//!
//! Every run is bounded by a duration *and* a request count, and every request
//! by a deadline, so a run always stops by itself. Targets are a [`Target`],
//! which can only be built for loopback or an explicitly allowed test network.

pub mod cache;
pub mod cli;
pub(crate) mod client;
pub mod conversation;
mod engine;
pub mod mix;
pub mod plot;
pub mod prefix;
pub mod progress;
mod record;
pub mod report;
pub mod session;
pub mod stats;
pub mod target;

pub use cache::PromptCache;
pub use conversation::Conversations;
pub use engine::{
    Arrival, LiveCounters, Load, LoadError, LoadSpec, MAX_DURATION, MAX_REQUESTS, RunResult, arrival_offsets,
};
pub use mix::{Choices, Mix};
pub use prefix::SharedPrefixes;
pub use record::{Chunk, PromptUsage, RequestRecord, Status};
pub use report::{Mark, Report};
pub use stats::{Summary, summarize};
pub use target::{AllowedNet, Target, TargetError};
