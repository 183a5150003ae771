//! Per-sequence KV caches, sized once at admission.

use super::config::LlamaConfig;

/// Positions per chunk of the cache. One KV head's keys of a chunk are
/// `head_dim × KV_CHUNK` floats in one piece (8 KiB at head_dim 64), so
/// attention streams a chunk front to back and keeps its 32 scores in
/// registers. Keys transposed over the whole capacity instead put each head
/// dimension on its own page: 64 streams per head, each a few cache lines
/// long, at strides that alias in L1 (attention then spent its time
/// waiting for key loads).
pub const KV_CHUNK: usize = 32;

/// One layer's keys and values for one sequence, in chunks of `KV_CHUNK`
/// positions: keys `[chunk][kv_head][head_dim][KV_CHUNK]` (transposed, so
/// the scores of a chunk's positions are computed as vector operations),
/// values `[chunk][kv_head][KV_CHUNK][head_dim]`.
pub struct LayerCache {
    k: Vec<f32>,
    v: Vec<f32>,
    len: usize,
    n_kv_head: usize,
    head_dim: usize,
}

impl LayerCache {
    fn new(cfg: &LlamaConfig, capacity: usize) -> Self {
        let floats = cfg.kv_dim() * capacity.next_multiple_of(KV_CHUNK);
        Self { k: vec![0.0; floats], v: vec![0.0; floats], len: 0, n_kv_head: cfg.n_kv_head, head_dim: cfg.head_dim }
    }

    /// Appends one position's keys and values (`[kv_head][head_dim]` each).
    /// The caller checks capacity (`KvCache::room`).
    pub fn push(&mut self, k: &[f32], v: &[f32]) {
        let (hd, slot) = (self.head_dim, self.len % KV_CHUNK);
        let base = (self.len / KV_CHUNK) * self.n_kv_head * hd * KV_CHUNK;
        for (i, &x) in k.iter().enumerate() {
            self.k[base + i * KV_CHUNK + slot] = x;
        }
        for (g, v) in v.chunks_exact(hd).enumerate() {
            self.v[base + (g * KV_CHUNK + slot) * hd..][..hd].copy_from_slice(v);
        }
        self.len += 1;
    }

    /// KV head `g`'s keys in chunk `c`: `[head_dim][KV_CHUNK]`, positions
    /// past the stored ones zero.
    pub fn keys(&self, g: usize, c: usize) -> &[f32] {
        let n = self.head_dim * KV_CHUNK;
        &self.k[(c * self.n_kv_head + g) * n..][..n]
    }

    /// KV head `g`'s values in chunk `c`: `[KV_CHUNK][head_dim]`.
    pub fn values(&self, g: usize, c: usize) -> &[f32] {
        let n = self.head_dim * KV_CHUNK;
        &self.v[(c * self.n_kv_head + g) * n..][..n]
    }
}

/// All layers' keys and values of one sequence.
pub struct KvCache {
    layers: Vec<LayerCache>,
    capacity: usize,
}

impl KvCache {
    /// Allocates room for `capacity` tokens up front, so a running sequence
    /// never reallocates (its tokens were committed at admission).
    pub fn new(cfg: &LlamaConfig, capacity: usize) -> Self {
        Self { layers: (0..cfg.n_layer).map(|_| LayerCache::new(cfg, capacity)).collect(), capacity }
    }

    /// Tokens stored (layer 0 is written first in every step).
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.len)
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
        for l in &mut self.layers {
            l.len = l.len.min(len);
        }
    }

    pub fn layer(&self, i: usize) -> &LayerCache {
        &self.layers[i]
    }

    pub fn layer_mut(&mut self, i: usize) -> &mut LayerCache {
        &mut self.layers[i]
    }
}
