//! The model node: a GGUF llama model on candle (or a synthetic stand-in)
//! behind a continuous-batching scheduler, served over gRPC.

pub mod backend;
pub mod config;
pub mod device;
pub mod generation_api;
pub mod loaded_model;
pub mod metrics;
pub mod model;
pub mod scheduler;
pub mod server;
pub mod text;
mod validate;
