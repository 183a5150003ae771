//! The real model: a GGUF llama with one KV cache per sequence.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::Arc;

use candle_core::Tensor;

use super::{Backend, SeqStep};
use crate::model::{KvCache, LlamaModel, StepChunk};

pub struct GgufBackend {
    model: Arc<LlamaModel>,
    caches: HashMap<u64, KvCache>,
}

impl GgufBackend {
    pub fn new(model: Arc<LlamaModel>) -> Self {
        Self { model, caches: HashMap::new() }
    }
}

impl Backend for GgufBackend {
    fn step(&mut self, seqs: &[SeqStep<'_>]) -> Result<Option<Tensor>, String> {
        let cfg = self.model.config();
        let mut taken: Vec<KvCache> =
            seqs.iter().map(|s| self.caches.remove(&s.id).unwrap_or_else(|| KvCache::new(cfg, s.capacity))).collect();
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
}
