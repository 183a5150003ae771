//! The real model with its KV cache in a block pool on the model's device
//! (a GPU; on the CPU the same code runs for tests and comparison).

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::Tensor;

use super::{Backend, BlockId, SeqStep};
use crate::model::KV_CHUNK;
use crate::model::paged::graph::{self, Graphs};
use crate::model::paged::{KvPool, PagedAttention};
use crate::model::{LlamaModel, ModelError, StepChunk, StepPlan, step_fits};

pub struct PagedBackend {
    model: Arc<LlamaModel>,
    pool: KvPool,
    /// RoPE `(cos, sin)` tables on the device.
    rope: (Tensor, Tensor),
    /// The pool blocks of each block the prefix cache keeps.
    prefixes: HashMap<BlockId, Vec<u32>>,
    /// Decode steps replayed from recordings (`with_graphs`).
    graphs: Option<Graphs>,
    /// The most sequences a step holds (`--max-running`).
    sequences: usize,
}

impl PagedBackend {
    /// A pool for `kv_tokens` committed tokens over at most `sequences`
    /// running sequences (the node's `--max-kv-tokens` and `--max-running`).
    pub fn new(model: Arc<LlamaModel>, kv_tokens: usize, sequences: usize) -> Result<Self, ModelError> {
        let pool = KvPool::new(model.config(), kv_tokens, sequences, model.device())?;
        let rope = model.rope_tables()?;
        Ok(Self { model, pool, rope, prefixes: HashMap::new(), graphs: None, sequences })
    }

    /// Replays decode steps from CUDA graphs, one recording per batch size,
    /// all made here (`model::paged::graph`; on the CPU the same device
    /// inputs run op by op, for tests). `max_step_rows` is the most tokens a
    /// step may have (the node's `--max-step-tokens`): a step that size runs
    /// first, so that no later step moves what a recording holds. A
    /// recording that fails leaves every step op by op (logged).
    pub fn with_graphs(mut self, max_step_rows: usize) -> Result<Self, ModelError> {
        graph::warm_up(&self.model, &mut self.pool, &self.rope, max_step_rows.max(graph::MAX_BATCH))?;
        let mut graphs = Graphs::new(self.model.config().context_length);
        match graphs.record_up_to(&self.model, &mut self.pool, &self.rope, self.sequences) {
            Ok(()) => self.graphs = Some(graphs),
            Err(error) => tracing::warn!(%error, "decode steps run op by op: recording one failed"),
        }
        Ok(self)
    }

    /// Batch sizes with a recorded decode step so far.
    pub fn recorded_batches(&self) -> Vec<usize> {
        self.graphs.as_ref().map(Graphs::recorded).unwrap_or_default()
    }

    /// Decode steps served by `with_graphs` so far (0 once replays are off).
    pub fn replayed_steps(&self) -> usize {
        self.graphs.as_ref().map_or(0, Graphs::steps)
    }

    /// The step's logits from a replay, when it has one: every sequence
    /// decodes one token and wants its logits. A recording or replay that
    /// fails turns replays off (logged): every later step runs op by op.
    fn replay(&mut self, seqs: &[SeqStep<'_>]) -> Option<Tensor> {
        let graphs = self.graphs.as_mut()?;
        let decoding = seqs.iter().all(|s| s.tokens.len() == 1 && s.want_logits);
        if !decoding || seqs.is_empty() || seqs.len() > graph::MAX_BATCH {
            return None;
        }
        let rows: Vec<(u64, u32, usize)> = seqs.iter().map(|s| (s.id, s.tokens[0], s.start_pos)).collect();
        match graphs.step(&self.model, &mut self.pool, &self.rope, &rows) {
            Ok(logits) => Some(logits),
            Err(error) => {
                tracing::warn!(%error, batch = rows.len(), "decode steps run op by op from now on: a recorded step failed");
                self.graphs = None;
                None
            }
        }
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
        // Logits stay on the device: greedy rows are picked there.
        let logits = match self.replay(seqs) {
            Some(logits) => Some(logits),
            None => {
                let plan = StepPlan::new(&chunks);
                let ids: Vec<u64> = seqs.iter().map(|s| s.id).collect();
                let mut kv = PagedAttention::new(self.model.config(), &mut self.pool, &ids, &plan, &self.rope)?;
                self.model.run(&plan, &mut kv)?
            }
        };
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
