//! Per-sequence KV caches, sized once at admission.

use super::config::LlamaConfig;

/// One layer's keys and values for one sequence. Keys are transposed,
/// `[kv_head][head_dim][capacity]`, so attention scores of all positions
/// are computed as vector operations; values are `[pos][kv_head][head_dim]`.
pub struct LayerCache {
    k: Vec<f32>,
    v: Vec<f32>,
    len: usize,
    capacity: usize,
    n_kv_head: usize,
    head_dim: usize,
}

impl LayerCache {
    fn new(cfg: &LlamaConfig, capacity: usize) -> Self {
        Self {
            k: vec![0.0; cfg.kv_dim() * capacity],
            v: Vec::with_capacity(cfg.kv_dim() * capacity),
            len: 0,
            capacity,
            n_kv_head: cfg.n_kv_head,
            head_dim: cfg.head_dim,
        }
    }

    /// Appends one position's keys and values (`[kv_head][head_dim]` each).
    /// The caller checks capacity (`KvCache::room`).
    pub fn push(&mut self, k: &[f32], v: &[f32]) {
        for (i, &x) in k.iter().enumerate() {
            self.k[i * self.capacity + self.len] = x;
        }
        self.v.extend_from_slice(v);
        self.len += 1;
    }

    /// Dimension `d` of KV head `g`'s keys at every stored position.
    pub fn key_dim(&self, g: usize, d: usize) -> &[f32] {
        let start = (g * self.head_dim + d) * self.capacity;
        &self.k[start..start + self.len]
    }

    /// KV head `g`'s value at position `pos`.
    pub fn value(&self, pos: usize, g: usize) -> &[f32] {
        let kv_dim = self.n_kv_head * self.head_dim;
        &self.v[pos * kv_dim + g * self.head_dim..][..self.head_dim]
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

    pub fn layer(&self, i: usize) -> &LayerCache {
        &self.layers[i]
    }

    pub fn layer_mut(&mut self, i: usize) -> &mut LayerCache {
        &mut self.layers[i]
    }
}
