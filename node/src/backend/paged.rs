//! The real model with its KV cache in a block pool on the model's device
//! (a GPU; on the CPU the same code runs for tests and comparison).

use std::sync::Arc;

use candle_core::Tensor;

use super::{Backend, SeqStep};
use crate::model::paged::{KvPool, PagedAttention};
use crate::model::{LlamaModel, ModelError, StepChunk, StepPlan, step_fits};

pub struct PagedBackend {
    model: Arc<LlamaModel>,
    pool: KvPool,
    /// RoPE `(cos, sin)` tables on the device.
    rope: (Tensor, Tensor),
}

impl PagedBackend {
    /// A pool for `kv_tokens` committed tokens over at most `sequences`
    /// running sequences (the node's `--max-kv-tokens` and `--max-running`).
    pub fn new(model: Arc<LlamaModel>, kv_tokens: usize, sequences: usize) -> Result<Self, ModelError> {
        let pool = KvPool::new(model.config(), kv_tokens, sequences, model.device())?;
        let rope = model.rope_tables()?;
        Ok(Self { model, pool, rope })
    }

    /// The pool's device memory in bytes and its size in positions.
    pub fn pool_size(&self) -> (usize, usize) {
        (self.pool.bytes(), self.pool.capacity_tokens())
    }

    fn forward(&mut self, seqs: &[SeqStep<'_>]) -> Result<Option<Tensor>, ModelError> {
        let chunks: Vec<StepChunk<'_>> = seqs.iter().map(SeqStep::chunk).collect();
        for (s, chunk) in seqs.iter().zip(&chunks) {
            let blocks = self.pool.reserve(s.id, s.capacity)?;
            step_fits(chunk, blocks.len(), blocks.room())?;
        }
        let plan = StepPlan::new(&chunks);
        let ids: Vec<u64> = seqs.iter().map(|s| s.id).collect();
        let cfg = self.model.config();
        let mut kv = PagedAttention::new(cfg, &mut self.pool, &ids, &plan, &self.rope)?;
        // Logits stay on the device: greedy rows are picked there.
        let logits = self.model.run(&plan, &mut kv)?;
        // Only a step that succeeded counts its positions as stored; a failed
        // one leaves every sequence as it was (its writes lie past `len`).
        for s in seqs {
            self.pool.advance(s.id, s.tokens.len());
        }
        Ok(logits)
    }
}

impl Backend for PagedBackend {
    fn step(&mut self, seqs: &[SeqStep<'_>]) -> Result<Option<Tensor>, String> {
        self.forward(seqs).map_err(|e| e.to_string())
    }

    fn release(&mut self, id: u64) {
        self.pool.release(id);
    }
}
