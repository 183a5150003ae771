//! The KV cache on the model's device: per layer, one preallocated pool of
//! fixed-size blocks shared by every sequence, and attention over it
//! written in candle ops, so the same code runs on a GPU and on the CPU
//! (where tests check it against the host attention).
//!
//! The pool is sized once from the node's KV budget, and admission commits
//! a sequence's whole capacity before it runs, so a running sequence always
//! finds its blocks: "full" stays RESOURCE_EXHAUSTED at admission, never an
//! out-of-memory error in the middle of a step.

mod attend;
mod decode;
pub mod graph;
mod rope;
mod write;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

pub use attend::PagedAttention;

use super::{LlamaConfig, ModelError};

/// Positions per block: small enough that a sequence wastes at most 15
/// slots, large enough that block tables stay short.
pub const BLOCK_TOKENS: usize = 16;

// The prefix cache keeps blocks of `KV_CHUNK` positions: whole pool blocks.
const _: () = assert!(super::KV_CHUNK.is_multiple_of(BLOCK_TOKENS));

/// One sequence's blocks, in position order, and the positions stored.
pub struct SeqBlocks {
    blocks: Vec<u32>,
    len: usize,
}

impl SeqBlocks {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn room(&self) -> usize {
        self.blocks.len() * BLOCK_TOKENS - self.len
    }

    /// The blocks holding positions `0..positions`.
    fn held(&self, positions: usize) -> &[u32] {
        &self.blocks[..positions.div_ceil(BLOCK_TOKENS)]
    }

    /// The pool row of position `pos`.
    fn slot(&self, pos: usize) -> u32 {
        self.blocks[pos / BLOCK_TOKENS] * BLOCK_TOKENS as u32 + (pos % BLOCK_TOKENS) as u32
    }
}

/// Every layer's keys and values of every sequence, on one device.
pub struct KvPool {
    /// Per layer `[2, n_kv_head, blocks * BLOCK_TOKENS, head_dim]`: keys,
    /// then values, head-major, so one gather gives a prefill chunk's
    /// attention its `[kv_head, sequence, ...]` batches.
    kv: Vec<Tensor>,
    free: Vec<u32>,
    /// Holders of each block: the sequences reading it and the prefix
    /// cache; it is free again when none is left.
    holders: Vec<u32>,
    seqs: HashMap<u64, SeqBlocks>,
}

impl KvPool {
    /// Room for `tokens` committed tokens held by at most `sequences`
    /// sequences (each may leave one block partly empty), and one block no
    /// sequence gets, where padding rows of a step write (`scratch_slot`).
    pub fn new(cfg: &LlamaConfig, tokens: usize, sequences: usize, device: &Device) -> Result<Self, ModelError> {
        let blocks = tokens.div_ceil(BLOCK_TOKENS) + sequences;
        let rows = (blocks + 1) * BLOCK_TOKENS;
        let layer = || Tensor::zeros((2, cfg.n_kv_head, rows, cfg.head_dim), DType::F32, device);
        let kv = (0..cfg.n_layer).map(|_| layer()).collect::<Result<Vec<_>, _>>()?;
        let free = (0..blocks as u32).rev().collect();
        Ok(Self { kv, free, holders: vec![0; blocks], seqs: HashMap::new() })
    }

    /// A pool row that holds no sequence's position.
    pub fn scratch_slot(&self) -> u32 {
        self.holders.len() as u32 * BLOCK_TOKENS as u32
    }

    /// Device memory the pool holds.
    pub fn bytes(&self) -> usize {
        self.kv.iter().map(|t| t.elem_count() * 4).sum()
    }

    /// Positions the pool holds in all (used or free).
    pub fn capacity_tokens(&self) -> usize {
        self.holders.len() * BLOCK_TOKENS
    }

    pub fn device(&self) -> &Device {
        self.kv.first().map_or(&Device::Cpu, |t| t.device())
    }

    /// Gives sequence `id` blocks for `capacity` positions, once: first the
    /// full blocks `shared` (kept by `share`, already stored), then free ones.
    pub fn reserve(&mut self, id: u64, capacity: usize, shared: &[u32]) -> Result<&SeqBlocks, ModelError> {
        if !self.seqs.contains_key(&id) {
            let need = capacity.div_ceil(BLOCK_TOKENS).saturating_sub(shared.len());
            if need > self.free.len() {
                return Err(ModelError::Unsupported(format!(
                    "KV pool has {} free blocks; a sequence of {capacity} positions needs {need}",
                    self.free.len()
                )));
            }
            let mut blocks = shared.to_vec();
            blocks.extend(self.free.split_off(self.free.len() - need));
            self.hold(&blocks);
            self.seqs.insert(id, SeqBlocks { len: shared.len() * BLOCK_TOKENS, blocks });
        }
        Ok(&self.seqs[&id])
    }

    /// Keeps sequence `id`'s blocks holding positions `positions` (all
    /// stored) past its release; returns them, or `None` if not stored.
    pub fn share(&mut self, id: u64, positions: std::ops::Range<usize>) -> Option<Vec<u32>> {
        let seq = self.seqs.get(&id).filter(|s| positions.end <= s.len)?;
        let blocks = seq.blocks[positions.start / BLOCK_TOKENS..positions.end.div_ceil(BLOCK_TOKENS)].to_vec();
        self.hold(&blocks);
        Some(blocks)
    }

    fn hold(&mut self, blocks: &[u32]) {
        for &b in blocks {
            self.holders[b as usize] += 1;
        }
    }

    /// Lets go of blocks (a sequence's, or ones `share` kept).
    pub fn unhold(&mut self, blocks: &[u32]) {
        for &b in blocks {
            self.holders[b as usize] -= 1;
            if self.holders[b as usize] == 0 {
                self.free.push(b);
            }
        }
    }

    pub fn seq(&self, id: u64) -> Option<&SeqBlocks> {
        self.seqs.get(&id)
    }

    /// Counts `n` more positions of `id` as stored (after a step succeeded).
    pub fn advance(&mut self, id: u64, n: usize) {
        if let Some(s) = self.seqs.get_mut(&id) {
            s.len += n;
        }
    }

    pub fn release(&mut self, id: u64) {
        if let Some(s) = self.seqs.remove(&id) {
            self.unhold(&s.blocks);
        }
    }
}
