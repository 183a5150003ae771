//! Recording a decode step as a CUDA graph, and replaying it.

use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{CudaGraph, sys};
use candle_core::{Device, Tensor};

use super::{DecodeInputs, run};
use crate::model::paged::KvPool;
use crate::model::{LlamaModel, ModelError};

pub struct Recorded {
    graph: CudaGraph,
    /// Written by the graph's last kernel.
    logits: Tensor,
}

// SAFETY: a CUDA graph is not tied to a thread; its uses must not overlap,
// and the backend that owns it uses it only through `&mut self`.
unsafe impl Send for Recorded {}

impl Recorded {
    pub fn replay(&self) -> Result<Tensor, ModelError> {
        self.graph.launch().w()?;
        Ok(self.logits.clone())
    }
}

/// Records the decode step of `inputs` (on a CUDA device; `None`
/// elsewhere). It runs op by op first, so that kernels are loaded and
/// workspaces sized before the recording, and the recorded step copies its
/// logits into a buffer allocated outside it: every allocation inside the
/// graph is freed inside it.
pub fn record(
    model: &LlamaModel,
    pool: &mut KvPool,
    rope: &(Tensor, Tensor),
    inputs: &DecodeInputs,
) -> Result<Option<Recorded>, ModelError> {
    let Device::Cuda(cuda) = model.device() else { return Ok(None) };
    // Candle uploads the dims and strides of some ops' operands (index_select
    // always) with each call: a host copy, which a graph would replay from a
    // host buffer long gone. With this cache on, the first run keeps each
    // upload in a device buffer (for the process' life) and the recording
    // points at those.
    let _params = cuda.enable_cuda_graph_htod_cache();
    let logits = run(model, pool, rope, inputs)?.zeros_like()?;
    let stream = cuda.cuda_stream();
    stream.synchronize().w()?;
    // Thread-local capture: a call that cannot be recorded fails the
    // recording (and the node runs op by op) instead of running untracked.
    stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).w()?;
    let stepped = run(model, pool, rope, inputs).and_then(|out| Ok(logits.slice_set(&out, 0, 0)?));
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags_enum(0));
    stepped?;
    let graph = graph.w()?.ok_or_else(|| ModelError::Unsupported("the recorded decode step is empty".into()))?;
    graph.upload().w()?;
    Ok(Some(Recorded { graph, logits }))
}
