//! Rotary embeddings, per-sequence KV caches and causal attention over them.
//!
//! Each sequence owns its cache, so sequences of any length share one step:
//! the linear layers see all new tokens of all sequences as one matrix, and
//! only attention is done per token, against that token's own sequence.
//! Attention is plain Rust over f32 slices: at this model size a few candle
//! ops per sequence and layer would cost more in dispatch than the arithmetic.

use rayon::prelude::*;

use super::config::LlamaConfig;

/// Precomputed cos/sin for every position and rotated pair (interleaved
/// pairs `(2i, 2i+1)`, llama's convention in GGUF files).
pub struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    pairs: usize,
}

impl Rope {
    pub fn new(cfg: &LlamaConfig) -> Self {
        let pairs = cfg.rope_dim / 2;
        let mut cos = Vec::with_capacity(cfg.context_length * pairs);
        let mut sin = Vec::with_capacity(cfg.context_length * pairs);
        for pos in 0..cfg.context_length {
            for i in 0..pairs {
                let theta = 1.0 / cfg.rope_base.powf((2 * i) as f32 / cfg.rope_dim as f32);
                let angle = pos as f32 * theta;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Self { cos, sin, pairs }
    }

    /// Rotates every `head_dim`-wide head of `x` in place for position `pos`.
    pub fn apply(&self, x: &mut [f32], head_dim: usize, pos: usize) {
        let cos = &self.cos[pos * self.pairs..(pos + 1) * self.pairs];
        let sin = &self.sin[pos * self.pairs..(pos + 1) * self.pairs];
        for head in x.chunks_exact_mut(head_dim) {
            for (i, pair) in head[..2 * self.pairs].chunks_exact_mut(2).enumerate() {
                let (x0, x1) = (pair[0], pair[1]);
                pair[0] = x0 * cos[i] - x1 * sin[i];
                pair[1] = x0 * sin[i] + x1 * cos[i];
            }
        }
    }
}

/// One layer's keys and values for one sequence, laid out `[pos][kv_head][head_dim]`.
#[derive(Default)]
struct LayerCache {
    k: Vec<f32>,
    v: Vec<f32>,
}

/// All layers' keys and values of one sequence.
pub struct KvCache {
    layers: Vec<LayerCache>,
    kv_dim: usize,
}

impl KvCache {
    /// Reserves room for `capacity` tokens up front, so a running sequence
    /// never reallocates (its tokens were committed at admission).
    pub fn new(cfg: &LlamaConfig, capacity: usize) -> Self {
        let kv_dim = cfg.kv_dim();
        let layers = (0..cfg.n_layer)
            .map(|_| LayerCache { k: Vec::with_capacity(capacity * kv_dim), v: Vec::with_capacity(capacity * kv_dim) })
            .collect();
        Self { layers, kv_dim }
    }

    /// Tokens stored (layer 0 is written first in every step).
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.k.len() / self.kv_dim)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        let l = &mut self.layers[layer];
        l.k.extend_from_slice(k);
        l.v.extend_from_slice(v);
    }
}

/// One layer's attention inputs for a step: the fused QKV rows of all new tokens.
pub struct StepAttention<'a> {
    pub cfg: &'a LlamaConfig,
    pub rope: &'a Rope,
    /// `[tokens, n_embd + 2 * kv_dim]`: q, then k, then v of each token.
    pub qkv: &'a mut [f32],
    /// Position of each new token in its sequence.
    pub positions: &'a [usize],
    /// Index into the step's caches of each new token's sequence.
    pub owners: &'a [usize],
}

impl StepAttention<'_> {
    /// Applies RoPE, appends the new keys and values to their sequences'
    /// caches, then returns the attention output `[tokens, n_embd]`.
    pub fn run(self, layer: usize, caches: &mut [&mut KvCache]) -> Vec<f32> {
        let cfg = self.cfg;
        let (q_dim, kv_dim, hd) = (cfg.n_embd, cfg.kv_dim(), cfg.head_dim);
        let row = q_dim + 2 * kv_dim;
        for (t, qkv) in self.qkv.chunks_exact_mut(row).enumerate() {
            let pos = self.positions[t];
            let (q, kv) = qkv.split_at_mut(q_dim);
            self.rope.apply(q, hd, pos);
            let (k, v) = kv.split_at_mut(kv_dim);
            self.rope.apply(k, hd, pos);
            caches[self.owners[t]].append(layer, k, v);
        }
        let caches: Vec<&KvCache> = caches.iter().map(|c| &**c).collect();
        let qkv: &[f32] = self.qkv;
        let mut out = vec![0f32; self.positions.len() * q_dim];
        let one = |(t, out): (usize, &mut [f32])| {
            let cache = &caches[self.owners[t]].layers[layer];
            let q = &qkv[t * row..t * row + q_dim];
            attend(cfg, q, cache, self.positions[t] + 1, out);
        };
        // One token (a decode step of one stream) is not worth waking threads.
        match self.positions.len() {
            1 => out.chunks_mut(q_dim).enumerate().for_each(one),
            _ => out.par_chunks_mut(q_dim).enumerate().for_each(one),
        }
        out
    }
}

/// Causal attention of one token's query heads over the first `visible`
/// cached positions of its sequence.
fn attend(cfg: &LlamaConfig, q: &[f32], cache: &LayerCache, visible: usize, out: &mut [f32]) {
    let hd = cfg.head_dim;
    let kv_dim = cfg.kv_dim();
    let group = cfg.n_head / cfg.n_kv_head;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut scores = vec![0f32; visible];
    for h in 0..cfg.n_head {
        let g = h / group;
        let qh = &q[h * hd..(h + 1) * hd];
        let mut max = f32::NEG_INFINITY;
        for (j, s) in scores.iter_mut().enumerate() {
            let k = &cache.k[j * kv_dim + g * hd..][..hd];
            *s = dot(qh, k) * scale;
            max = max.max(*s);
        }
        let mut sum = 0.0;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let oh = &mut out[h * hd..(h + 1) * hd];
        for (j, s) in scores.iter().enumerate() {
            let w = s / sum;
            let v = &cache.v[j * kv_dim + g * hd..][..hd];
            for (o, v) in oh.iter_mut().zip(v) {
                *o += w * v;
            }
        }
    }
}

/// Dot product with sixteen independent accumulators, so the compiler can
/// keep them in one SIMD register instead of a serial chain.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut acc = [0f32; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> LlamaConfig {
        LlamaConfig {
            n_layer: 1,
            n_embd: 4,
            n_head: 2,
            n_kv_head: 1,
            head_dim: 2,
            ffn_dim: 8,
            rope_dim: 2,
            rope_base: 10_000.0,
            rms_eps: 1e-5,
            context_length: 8,
            vocab_size: 4,
        }
    }

    #[test]
    fn dot_matches_naive_sum_with_tail() {
        let a: Vec<f32> = (0..11).map(|i| i as f32).collect();
        let b: Vec<f32> = (0..11).map(|i| (i * 2) as f32).collect();
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert_eq!(dot(&a, &b), naive);
    }

    #[test]
    fn rope_at_position_zero_is_identity_and_rotates_later() {
        let rope = Rope::new(&tiny());
        let mut x = [1.0, 0.0, 0.5, 0.5];
        rope.apply(&mut x, 2, 0);
        assert_eq!(x, [1.0, 0.0, 0.5, 0.5]);
        rope.apply(&mut x, 2, 1);
        // theta_0 = 1: one radian of rotation on each head's only pair.
        assert!((x[0] - 1f32.cos()).abs() < 1e-6 && (x[1] - 1f32.sin()).abs() < 1e-6);
    }

    #[test]
    fn attention_over_one_position_returns_its_value() {
        let cfg = tiny();
        let rope = Rope::new(&cfg);
        let mut cache = KvCache::new(&cfg, 4);
        // q (2 heads x 2) | k (1 x 2) | v (1 x 2)
        let mut qkv = vec![1.0, 0.0, 0.0, 1.0, 0.3, 0.4, 5.0, 7.0];
        let out = StepAttention { cfg: &cfg, rope: &rope, qkv: &mut qkv, positions: &[0], owners: &[0] }
            .run(0, &mut [&mut cache]);
        assert_eq!(out, vec![5.0, 7.0, 5.0, 7.0]);
        assert_eq!(cache.len(), 1);
    }
}
