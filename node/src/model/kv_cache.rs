//! Per-sequence KV caches, sized once at admission, in blocks the prefix
//! cache can share.

use std::sync::Arc;

use super::config::LlamaConfig;

/// Positions per chunk of the cache. One KV head's keys of a chunk are
/// `head_dim × KV_CHUNK` floats in one piece (8 KiB at head_dim 64), so
/// attention streams a chunk front to back and keeps its 32 scores in
/// registers. Keys transposed over the whole capacity instead put each head
/// dimension on its own page: 64 streams per head, each a few cache lines
/// long, at strides that alias in L1 (attention then spent its time
/// waiting for key loads).
pub const KV_CHUNK: usize = 32;

/// Every layer's keys and values of `KV_CHUNK` positions of one sequence:
/// keys `[layer][kv_head][head_dim][KV_CHUNK]` (transposed, so the scores of
/// a chunk's positions are computed as vector operations), values
/// `[layer][kv_head][KV_CHUNK][head_dim]`. A full block is shared, through
/// its `Arc`, by the prefix cache and every sequence that starts with it;
/// nothing writes to a full block again.
#[derive(Clone)]
pub struct KvBlock {
    k: Box<[f32]>,
    v: Box<[f32]>,
}

impl KvBlock {
    fn new(floats: usize) -> Self {
        Self { k: vec![0.0; floats].into(), v: vec![0.0; floats].into() }
    }
}

/// All layers' keys and values of one sequence, block by block.
pub struct KvCache {
    blocks: Vec<Arc<KvBlock>>,
    /// Positions stored per layer (layer 0 is written first in every step).
    lens: Vec<usize>,
    capacity: usize,
    n_kv_head: usize,
    head_dim: usize,
}

impl KvCache {
    /// Allocates room for `capacity` tokens up front, so a running sequence
    /// never reallocates (its tokens were committed at admission).
    pub fn new(cfg: &LlamaConfig, capacity: usize) -> Self {
        Self::starting_with(cfg, capacity, Vec::new())
    }

    /// A cache whose first positions are the full blocks `shared` (from the
    /// prefix cache), with room for `capacity` positions in all.
    pub fn starting_with(cfg: &LlamaConfig, capacity: usize, shared: Vec<Arc<KvBlock>>) -> Self {
        let floats = cfg.n_layer * cfg.kv_dim() * KV_CHUNK;
        let stored = shared.len() * KV_CHUNK;
        let capacity = capacity.max(stored);
        let mut blocks = shared;
        blocks.resize_with(capacity.div_ceil(KV_CHUNK), || Arc::new(KvBlock::new(floats)));
        Self { blocks, lens: vec![stored; cfg.n_layer], capacity, n_kv_head: cfg.n_kv_head, head_dim: cfg.head_dim }
    }

    /// Tokens stored (layer 0 is written first in every step).
    pub fn len(&self) -> usize {
        self.lens.first().copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tokens that still fit.
    pub fn room(&self) -> usize {
        self.capacity - self.len()
    }

    /// Forgets every position from `len` on (those of a failed step; layers
    /// a step did not reach keep fewer).
    pub fn truncate(&mut self, len: usize) {
        for l in &mut self.lens {
            *l = (*l).min(len);
        }
    }

    /// Block `i`, if every layer has stored all its positions.
    pub fn full_block(&self, i: usize) -> Option<Arc<KvBlock>> {
        let stored = self.lens.iter().min().copied().unwrap_or(0);
        ((i + 1) * KV_CHUNK <= stored).then(|| self.blocks[i].clone())
    }

    pub fn layer(&self, layer: usize) -> LayerCache<'_> {
        let n = self.head_dim * KV_CHUNK;
        LayerCache { blocks: &self.blocks, offset: layer * self.n_kv_head * n, n }
    }

    /// Appends one position's keys and values (`[kv_head][head_dim]` each)
    /// to layer `layer`. The caller checks capacity (`room`).
    pub fn push(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        let (hd, len) = (self.head_dim, self.lens[layer]);
        let slot = len % KV_CHUNK;
        let base = layer * self.n_kv_head * hd * KV_CHUNK;
        // Only ever the sequence's own, unshared block (one being filled).
        let block = Arc::make_mut(&mut self.blocks[len / KV_CHUNK]);
        for (i, &x) in k.iter().enumerate() {
            block.k[base + i * KV_CHUNK + slot] = x;
        }
        for (g, v) in v.chunks_exact(hd).enumerate() {
            block.v[base + (g * KV_CHUNK + slot) * hd..][..hd].copy_from_slice(v);
        }
        self.lens[layer] += 1;
    }
}

/// One layer's view of a sequence's cache.
#[derive(Clone, Copy)]
pub struct LayerCache<'a> {
    blocks: &'a [Arc<KvBlock>],
    /// Where the layer starts in each block.
    offset: usize,
    /// Floats of one KV head in one chunk.
    n: usize,
}

impl<'a> LayerCache<'a> {
    /// KV head `g`'s keys in chunk `c`: `[head_dim][KV_CHUNK]`, positions
    /// past the stored ones zero.
    pub fn keys(&self, g: usize, c: usize) -> &'a [f32] {
        &self.blocks[c].k[self.offset + g * self.n..][..self.n]
    }

    /// KV head `g`'s values in chunk `c`: `[KV_CHUNK][head_dim]`.
    pub fn values(&self, g: usize, c: usize) -> &'a [f32] {
        &self.blocks[c].v[self.offset + g * self.n..][..self.n]
    }
}
