//! The model node: a GGUF llama model on candle (or a synthetic stand-in)
//! behind a continuous-batching scheduler, served over gRPC.

pub mod backend;
pub mod config;
pub mod metrics;
pub mod model;
pub mod scheduler;
pub mod served;
pub mod server;
pub mod service;
pub mod text;
mod validate;
