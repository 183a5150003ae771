//! The real model with its KV cache in a block pool on the model's device
//! (a GPU; on the CPU the same code runs for tests and comparison).

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::Tensor;

use super::{Backend, BlockId, SeqStep};
use crate::model::KV_CHUNK;
use crate::model::paged::{KvPool, PagedAttention};
use crate::model::{LlamaModel, ModelError, StepChunk, StepPlan, step_fits};

pub struct PagedBackend {
    model: Arc<LlamaModel>,
    pool: KvPool,
    /// RoPE `(cos, sin)` tables on the device.
    rope: (Tensor, Tensor),
    /// The pool blocks of each block the prefix cache keeps.
    prefixes: HashMap<BlockId, Vec<u32>>,
}

impl PagedBackend {
    /// A pool for `kv_tokens` committed tokens over at most `sequences`
    /// running sequences (the node's `--max-kv-tokens` and `--max-running`).
    pub fn new(model: Arc<LlamaModel>, kv_tokens: usize, sequences: usize) -> Result<Self, ModelError> {
        let pool = KvPool::new(model.config(), kv_tokens, sequences, model.device())?;
        let rope = model.rope_tables()?;
        Ok(Self { model, pool, rope, prefixes: HashMap::new() })
    }

    /// The pool's device memory in bytes and its size in positions.
    pub fn pool_size(&self) -> (usize, usize) {
        (self.pool.bytes(), self.pool.capacity_tokens())
    }

    fn forward(&mut self, seqs: &[SeqStep<'_>]) -> Result<Option<Tensor>, ModelError> {
        let chunks: Vec<StepChunk<'_>> = seqs.iter().map(SeqStep::chunk).collect();
        for (s, chunk) in seqs.iter().zip(&chunks) {
            // Read only at a sequence's first step: its blocks are fixed then.
            let shared: Vec<u32> = match self.pool.seq(s.id) {
                Some(_) => Vec::new(),
                None => s.reuse.iter().map_while(|id| self.prefixes.get(id)).flatten().copied().collect(),
            };
            let blocks = self.pool.reserve(s.id, s.capacity, &shared)?;
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

    fn caches_prefixes(&self) -> bool {
        true
    }

    fn publish(&mut self, id: u64, block: usize, slot: BlockId) -> bool {
        let Some(blocks) = self.pool.share(id, block * KV_CHUNK..(block + 1) * KV_CHUNK) else { return false };
        self.prefixes.insert(slot, blocks);
        true
    }

    fn forget(&mut self, slots: &[BlockId]) {
        for slot in slots {
            if let Some(blocks) = self.prefixes.remove(slot) {
                self.pool.unhold(&blocks);
            }
        }
    }
}
