//! The real model: a GGUF llama with one KV cache per sequence, and the
//! blocks the prefix cache keeps.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::Arc;

use candle_core::Tensor;

use super::{Backend, BlockId, SeqStep};
use crate::model::{KvBlock, KvCache, LlamaModel, StepChunk};

pub struct GgufBackend {
    model: Arc<LlamaModel>,
    caches: HashMap<u64, KvCache>,
    /// Blocks the prefix cache keeps, shared with the caches reading them.
    prefixes: HashMap<BlockId, Arc<KvBlock>>,
}

impl GgufBackend {
    pub fn new(model: Arc<LlamaModel>) -> Self {
        Self { model, caches: HashMap::new(), prefixes: HashMap::new() }
    }
}

impl GgufBackend {
    /// A sequence's cache at its first step, starting with the cached
    /// blocks it reuses (a block missing here leaves the cache short, and
    /// the step fails on that sequence alone).
    fn new_cache(&self, s: &SeqStep<'_>) -> KvCache {
        let shared = s.reuse.iter().map_while(|slot| self.prefixes.get(slot).cloned()).collect();
        KvCache::starting_with(self.model.config(), s.capacity, shared)
    }
}

impl Backend for GgufBackend {
    fn step(&mut self, seqs: &[SeqStep<'_>]) -> Result<Option<Tensor>, String> {
        let mut taken: Vec<KvCache> =
            seqs.iter().map(|s| self.caches.remove(&s.id).unwrap_or_else(|| self.new_cache(s))).collect();
        let chunks: Vec<StepChunk<'_>> = seqs.iter().map(SeqStep::chunk).collect();
        let mut refs: Vec<&mut KvCache> = taken.iter_mut().collect();
        // Caught here only to put the caches back, without the positions
        // the failed step wrote (see `Backend::step`); then raised again.
        let out = catch_unwind(AssertUnwindSafe(|| self.model.forward(&chunks, &mut refs)));
        drop(refs);
        let failed = !matches!(out, Ok(Ok(_)));
        for (s, mut cache) in seqs.iter().zip(taken) {
            if failed {
                cache.truncate(s.start_pos);
            }
            self.caches.insert(s.id, cache);
        }
        match out {
            Ok(out) => out.map_err(|e| e.to_string()),
            Err(panic) => resume_unwind(panic),
        }
    }

    fn release(&mut self, id: u64) {
        self.caches.remove(&id);
    }

    fn caches_prefixes(&self) -> bool {
        true
    }

    fn publish(&mut self, id: u64, block: usize, slot: BlockId) -> bool {
        let Some(block) = self.caches.get(&id).and_then(|c| c.full_block(block)) else { return false };
        self.prefixes.insert(slot, block);
        true
    }

    fn forget(&mut self, slots: &[BlockId]) {
        for slot in slots {
            self.prefixes.remove(slot);
        }
    }
}
