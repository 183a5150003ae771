//! Decode steps replayed from CUDA graphs.
//!
//! With candle every op of a step is a kernel launch the host pays for
//! (about 6 µs each on an H100 host): a decode step of SmolLM2-135M is ~400
//! of them, which holds a single stream near 400 tokens/s however fast the
//! GPU. A step that only decodes runs the same kernels every time for a
//! given number of rows, so the node records it once per batch size (powers
//! of two, at start; padding rows fill the rest) as a CUDA graph and
//! replays it: one
//! launch per step. The step's inputs live in one device buffer that each
//! step's data is copied into before the replay (token ids, positions, pool
//! slots, the attention table); the logits land in a buffer the graph
//! writes last.
//!
//! A recording bakes in every address it touches, so none may move after
//! it: the weights, the KV pool and the RoPE tables are allocated once, and
//! candle's quantized matmuls keep scratch workspaces that only grow, so
//! the backend first runs the most rows a step can have (`warm_up`) and
//! no later step grows them; candle's uploads of operand dims and strides
//! come from a device-side cache while recording (`record`). On the CPU the same inputs run op by op (what
//! tests check); only the recording is CUDA's.

use std::collections::HashMap;

use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Tensor, bail};

use super::attend::PagedAttention;
use super::{BLOCK_TOKENS, KvPool, decode};
use crate::model::linear::VECTOR_ROWS;
use crate::model::{LlamaModel, ModelError};

/// Most rows a recorded step has; a step decoding more runs op by op.
pub const MAX_BATCH: usize = 512;

/// A decode step's inputs on the device, in one buffer for one copy:
/// `[ids | positions | slots | attention table]` for `batch` rows.
pub struct DecodeInputs {
    batch: usize,
    buf: Tensor,
}

impl DecodeInputs {
    /// Room for `batch` rows of at most `max_blocks` blocks each.
    fn new(batch: usize, max_blocks: usize, device: &Device) -> Result<Self, ModelError> {
        let len = 3 * batch + 3 * batch + batch * max_blocks;
        Ok(Self { batch, buf: Tensor::zeros(len, DType::U32, device)? })
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    pub fn ids(&self) -> candle_core::Result<Tensor> {
        self.buf.narrow(0, 0, self.batch)
    }

    pub fn positions(&self) -> candle_core::Result<Tensor> {
        self.buf.narrow(0, self.batch, self.batch)
    }

    pub fn slots(&self) -> candle_core::Result<Tensor> {
        self.buf.narrow(0, 2 * self.batch, self.batch)
    }

    pub fn table(&self) -> candle_core::Result<Tensor> {
        self.buf.narrow(0, 3 * self.batch, self.buf.dim(0)? - 3 * self.batch)
    }

    /// Copies rows `(sequence, token, position)` in, padded to the batch
    /// with rows that read token 0 at position 0, write the pool's scratch
    /// slot and attend to nothing.
    fn load(&self, pool: &KvPool, rows: &[(u64, u32, usize)]) -> Result<(), ModelError> {
        let pad = self.batch - rows.len();
        let seqs = rows
            .iter()
            .map(|r| pool.seq(r.0).ok_or_else(|| ModelError::Unsupported(format!("sequence {} has no KV blocks", r.0))))
            .collect::<Result<Vec<_>, _>>()?;
        let mut image = Vec::with_capacity(self.buf.dim(0)?);
        image.extend(rows.iter().map(|r| r.1).chain(std::iter::repeat_n(0, pad)));
        image.extend(rows.iter().map(|r| r.2 as u32).chain(std::iter::repeat_n(0, pad)));
        let slots = rows.iter().zip(&seqs).map(|(r, s)| s.slot(r.2));
        image.extend(slots.chain(std::iter::repeat_n(pool.scratch_slot(), pad)));
        let mut table: Vec<(usize, usize, &[u32])> =
            rows.iter().zip(&seqs).enumerate().map(|(i, (r, s))| (i, r.2 + 1, s.held(r.2 + 1))).collect();
        table.extend((rows.len()..self.batch).map(|i| (i, 0, &[][..])));
        image.extend(decode::table(&table));
        Ok(self.buf.inplace_op1(&Upload(&image))?)
    }
}

/// Host values copied into the start of a u32 tensor.
struct Upload<'a>(&'a [u32]);

impl Upload<'_> {
    fn check(&self, l: &Layout) -> candle_core::Result<usize> {
        if !l.is_contiguous() || self.0.len() > l.shape().elem_count() {
            bail!("upload of {} values into {:?}", self.0.len(), l.shape());
        }
        Ok(l.start_offset())
    }
}

impl InplaceOp1 for Upload<'_> {
    fn name(&self) -> &'static str {
        "upload"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let start = self.check(l)?;
        let CpuStorage::U32(dst) = s else { bail!("upload: the tensor must be u32") };
        dst[start..][..self.0.len()].copy_from_slice(self.0);
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &mut candle_core::CudaStorage, l: &Layout) -> candle_core::Result<()> {
        let start = self.check(l)?;
        let dev = s.device.clone();
        let mut dst = s.as_cuda_slice_mut::<u32>()?.slice_mut(start..start + self.0.len());
        dev.memcpy_htod(self.0, &mut dst)
    }
}

/// Logits of every row of `inputs`, op by op.
fn run(
    model: &LlamaModel,
    pool: &mut KvPool,
    rope: &(Tensor, Tensor),
    inputs: &DecodeInputs,
) -> Result<Tensor, ModelError> {
    let mut kv = PagedAttention::decoding(model.config(), pool, inputs, rope)?;
    model.run_all(&inputs.ids()?, &mut kv)
}

/// One batch size's inputs and, on a GPU, its recording.
struct Replay {
    inputs: DecodeInputs,
    recorded: Option<record::Recorded>,
}

/// The recorded decode steps of a backend, by batch size.
pub struct Graphs {
    replays: HashMap<usize, Replay>,
    max_blocks: usize,
    /// Steps served from device inputs so far.
    steps: usize,
}

impl Graphs {
    /// For sequences of at most `context` positions.
    pub fn new(context: usize) -> Self {
        Self { replays: HashMap::new(), max_blocks: context.div_ceil(BLOCK_TOKENS), steps: 0 }
    }

    /// Logits `[rows, vocab]` of a step where every row `(sequence, token,
    /// position)` decodes one token, its sequence's blocks reserved in
    /// `pool`; a batch size not recorded yet (`record_up_to`) is recorded
    /// first. The logits are the replay's buffer: read them before the next
    /// step.
    pub fn step(
        &mut self,
        model: &LlamaModel,
        pool: &mut KvPool,
        rope: &(Tensor, Tensor),
        rows: &[(u64, u32, usize)],
    ) -> Result<Tensor, ModelError> {
        if rows.is_empty() || rows.len() > MAX_BATCH {
            return Err(ModelError::Unsupported(format!(
                "a recorded step has 1 to {MAX_BATCH} rows, not {}",
                rows.len()
            )));
        }
        let batch = rows.len().next_power_of_two();
        self.prepare(model, pool, rope, batch)?;
        let replay = &self.replays[&batch];
        replay.inputs.load(pool, rows)?;
        let logits = match &replay.recorded {
            Some(recorded) => recorded.replay()?,
            None => run(model, pool, rope, &replay.inputs)?,
        };
        self.steps += 1;
        Ok(logits.narrow(0, 0, rows.len())?)
    }

    /// Records every batch size a step of up to `sequences` rows uses
    /// (powers of two, at most `MAX_BATCH`), so that no step waits for a
    /// recording and one that fails does so at start.
    pub fn record_up_to(
        &mut self,
        model: &LlamaModel,
        pool: &mut KvPool,
        rope: &(Tensor, Tensor),
        sequences: usize,
    ) -> Result<(), ModelError> {
        let top = sequences.clamp(1, MAX_BATCH).next_power_of_two();
        for batch in std::iter::successors(Some(1), |b| Some(b * 2)).take_while(|&b| b <= top) {
            self.prepare(model, pool, rope, batch)?;
        }
        Ok(())
    }

    /// The inputs and recording of `batch` rows, made once.
    fn prepare(
        &mut self,
        model: &LlamaModel,
        pool: &mut KvPool,
        rope: &(Tensor, Tensor),
        batch: usize,
    ) -> Result<(), ModelError> {
        if !self.replays.contains_key(&batch) {
            let inputs = DecodeInputs::new(batch, self.max_blocks, model.device())?;
            inputs.load(pool, &[])?;
            let recorded = record::record(model, pool, rope, &inputs)?;
            self.replays.insert(batch, Replay { inputs, recorded });
        }
        Ok(())
    }

    /// Steps served so far (replayed, or run from device inputs on the CPU).
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// Batch sizes recorded so far.
    pub fn recorded(&self) -> Vec<usize> {
        let mut sizes: Vec<usize> =
            self.replays.iter().filter(|(_, r)| r.recorded.is_some()).map(|(&b, _)| b).collect();
        sizes.sort_unstable();
        sizes
    }
}

/// Runs `rows` padding rows through the layers (not the logits) op by op,
/// then `VECTOR_ROWS` (the quantized weights' largest), so that candle's
/// scratch workspaces and cuBLAS's reach the size of the largest step they
/// will see.
pub fn warm_up(model: &LlamaModel, pool: &mut KvPool, rope: &(Tensor, Tensor), rows: usize) -> Result<(), ModelError> {
    for rows in [rows, VECTOR_ROWS] {
        let inputs = DecodeInputs::new(rows, 0, model.device())?;
        inputs.load(pool, &[])?;
        let mut kv = PagedAttention::decoding(model.config(), pool, &inputs, rope)?;
        model.hidden(&inputs.ids()?, &mut kv)?;
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
mod record {
    use super::*;

    /// Nothing is recorded without CUDA.
    pub enum Recorded {}

    impl Recorded {
        pub fn replay(&self) -> Result<Tensor, ModelError> {
            match *self {}
        }
    }

    pub fn record(
        _: &LlamaModel,
        _: &mut KvPool,
        _: &(Tensor, Tensor),
        _: &DecodeInputs,
    ) -> Result<Option<Recorded>, ModelError> {
        Ok(None)
    }
}

#[cfg(feature = "cuda")]
mod record;
