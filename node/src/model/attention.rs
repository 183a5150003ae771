//! Rotary embeddings and causal attention over per-sequence KV caches.
//!
//! Each sequence owns its cache, so sequences of any length share one step:
//! the linear layers see all new tokens of all sequences as one matrix, and
//! only attention is done per token, against that token's own sequence.
//! Attention is plain Rust over f32 slices: at this model size a few candle
//! ops per sequence and layer would cost more in dispatch than the arithmetic.

use candle_core::Tensor;
use rayon::prelude::*;

use super::config::LlamaConfig;
use super::kv_cache::{KV_CHUNK, KvCache, LayerCache};
use super::step::{StepKv, StepPlan};
use super::{ModelError, vexp};

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

    /// The cos and sin tables as `[positions, pairs]` tensors on `device`
    /// (for `candle_nn::rotary_emb::rope_i`).
    pub fn tables(&self, device: &candle_core::Device) -> candle_core::Result<(Tensor, Tensor)> {
        let positions = self.cos.len() / self.pairs.max(1);
        let table = |t: &[f32]| Tensor::from_slice(t, (positions, self.pairs), device);
        Ok((table(&self.cos)?, table(&self.sin)?))
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

/// A step's attention against per-sequence host caches (`caches[i]` holds
/// chunk `i`'s sequence).
pub struct HostAttention<'a, 'c> {
    pub cfg: &'a LlamaConfig,
    pub rope: &'a Rope,
    pub caches: &'a mut [&'c mut KvCache],
    pub plan: &'a StepPlan,
}

impl StepKv for HostAttention<'_, '_> {
    fn attend(&mut self, layer: usize, qkv: Tensor) -> Result<Tensor, ModelError> {
        let device = qkv.device().clone();
        let mut qkv = qkv.flatten_all()?.to_vec1::<f32>()?;
        let (positions, owners) = (&self.plan.positions, &self.plan.owners);
        let attn =
            StepAttention { cfg: self.cfg, rope: self.rope, qkv: &mut qkv, positions, owners }.run(layer, self.caches);
        Ok(Tensor::from_vec(attn, (positions.len(), self.cfg.n_embd), &device)?)
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
            caches[self.owners[t]].push(layer, k, v);
        }
        let caches: Vec<&KvCache> = caches.iter().map(|c| &**c).collect();
        let qkv: &[f32] = self.qkv;
        let blocks = query_blocks(self.owners);
        let (groups, per_group) = (cfg.n_kv_head, cfg.n_head / cfg.n_kv_head);
        // One task per (query block, KV head): the query heads sharing a KV
        // head read each of its chunks once; a single decoding stream still
        // has a task per KV head.
        let parts: Vec<Vec<f32>> = (0..blocks.len() * groups)
            .into_par_iter()
            .map(|i| {
                let ((start, len), g) = (blocks[i / groups], i % groups);
                let cache = caches[self.owners[start]].layer(layer);
                let q = |t: usize, k: usize| &qkv[(start + t) * row + (g * per_group + k) * hd..][..hd];
                let block = QueryBlock { len, first_pos: self.positions[start], g };
                attend(cfg, &block, q, cache)
            })
            .collect();
        let mut out = vec![0f32; self.positions.len() * q_dim];
        for (i, part) in parts.iter().enumerate() {
            let ((start, _), g) = (blocks[i / groups], i % groups);
            for (r, head_out) in part.chunks_exact(hd).enumerate() {
                let (t, k) = (r / per_group, r % per_group);
                out[(start + t) * q_dim + (g * per_group + k) * hd..][..hd].copy_from_slice(head_out);
            }
        }
        out
    }
}

/// Query tokens attended together: consecutive tokens of one sequence
/// share every key they see, so a block reads each key and value once.
const QUERY_BLOCK: usize = 16;

/// `(first token, count)` of each run of at most `QUERY_BLOCK` consecutive
/// tokens with the same owner (a prompt chunk, or one decoding token).
fn query_blocks(owners: &[usize]) -> Vec<(usize, usize)> {
    let mut blocks: Vec<(usize, usize)> = Vec::new();
    for (t, owner) in owners.iter().enumerate() {
        match blocks.last_mut() {
            Some((start, len)) if owners[*start] == *owner && *len < QUERY_BLOCK => *len += 1,
            _ => blocks.push((t, 1)),
        }
    }
    blocks
}

/// Consecutive query tokens of one sequence at one head.
struct QueryBlock {
    len: usize,
    /// Position of the block's first token; token `t` sees `first_pos + t + 1` positions.
    first_pos: usize,
    /// The KV head whose query heads the block is attended at.
    g: usize,
}

/// Causal attention of a query block at the query heads of one KV head
/// (see `attend_block`).
///
/// Built for x86-64-v2, these loops would run 4 lanes wide; on a CPU with
/// AVX2 the same code runs compiled for it. The two compile to the same
/// operations in the same order per element (Rust neither contracts to FMA
/// nor reassociates), so the results are identical on either.
fn attend<'a>(
    cfg: &LlamaConfig,
    block: &QueryBlock,
    q: impl Fn(usize, usize) -> &'a [f32],
    cache: LayerCache<'_>,
) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { attend_avx2(cfg, block, q, cache) };
    }
    attend_block(cfg, block, q, cache)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn attend_avx2<'a>(
    cfg: &LlamaConfig,
    block: &QueryBlock,
    q: impl Fn(usize, usize) -> &'a [f32],
    cache: LayerCache<'_>,
) -> Vec<f32> {
    attend_block(cfg, block, q, cache)
}

/// Causal attention of a query block at every query head of KV head
/// `block.g`; returns `[len][heads per KV head][head_dim]`. Row `r` is
/// token `r / heads` at head `r % heads`.
///
/// Keys come in chunks of `KV_CHUNK` positions, transposed, so a row's
/// scores over a chunk accumulate in registers, one head dimension at a
/// time, and each chunk is read once for all rows. Every (row, position)
/// score and every output element is computed by the same operations in
/// the same order as for a block of one, so a token's output does not
/// depend on its block.
#[inline(always)]
fn attend_block<'a>(
    cfg: &LlamaConfig,
    block: &QueryBlock,
    q: impl Fn(usize, usize) -> &'a [f32],
    cache: LayerCache<'_>,
) -> Vec<f32> {
    let (hd, heads) = (cfg.head_dim, cfg.n_head / cfg.n_kv_head);
    let rows = block.len * heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let visible = |r: usize| block.first_pos + r / heads + 1;
    let mut scores: Vec<Vec<f32>> = (0..rows).map(|r| vec![0f32; visible(r)]).collect();
    let chunks = visible(rows - 1).div_ceil(KV_CHUNK);
    for c in 0..chunks {
        let (keys, p0) = (cache.keys(block.g, c), c * KV_CHUNK);
        for (r, scores) in scores.iter_mut().enumerate() {
            let n = scores.len().saturating_sub(p0).min(KV_CHUNK);
            if n > 0 {
                scores[p0..p0 + n].copy_from_slice(&chunk_scores(q(r / heads, r % heads), keys)[..n]);
            }
        }
    }
    for scores in scores.iter_mut() {
        let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s * scale));
        let mut sum = 0.0;
        for s in scores.iter_mut() {
            *s = vexp::exp(*s * scale - max);
            sum += *s;
        }
        scores.iter_mut().for_each(|s| *s /= sum);
    }
    let mut out = vec![0f32; rows * hd];
    for c in 0..chunks {
        let (values, p0) = (cache.values(block.g, c), c * KV_CHUNK);
        for (r, out) in out.chunks_exact_mut(hd).enumerate() {
            let weights = &scores[r][p0.min(scores[r].len())..];
            let weights = &weights[..weights.len().min(KV_CHUNK)];
            match hd {
                64 => weigh_values::<64>(out, weights, values),
                _ => weigh_values_any(out, weights, values),
            }
        }
    }
    out
}

/// `out += sum_p weights[p] * values[p]`, position by position, for a
/// head size known when compiling: the output row stays in registers
/// across positions (with a run-time size it went through memory at every
/// position). The same operations in the same order as `weigh_values_any`.
#[inline(always)]
fn weigh_values<const HD: usize>(out: &mut [f32], weights: &[f32], values: &[f32]) {
    let mut acc = [0f32; HD];
    acc.copy_from_slice(out);
    for (w, v) in weights.iter().zip(values.chunks_exact(HD)) {
        for (a, v) in acc.iter_mut().zip(v) {
            *a += w * v;
        }
    }
    out.copy_from_slice(&acc);
}

#[inline(always)]
fn weigh_values_any(out: &mut [f32], weights: &[f32], values: &[f32]) {
    for (w, v) in weights.iter().zip(values.chunks_exact(out.len())) {
        for (o, v) in out.iter_mut().zip(v) {
            *o += w * v;
        }
    }
}

/// One query row's scores at a chunk's positions: `sum_d q[d] * k[d][p]`,
/// in order of `d`, from zero.
#[inline(always)]
fn chunk_scores(q: &[f32], keys: &[f32]) -> [f32; KV_CHUNK] {
    let mut acc = [0f32; KV_CHUNK];
    for (qd, row) in q.iter().zip(keys.chunks_exact(KV_CHUNK)) {
        for (a, k) in acc.iter_mut().zip(row) {
            *a += qd * k;
        }
    }
    acc
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

    #[test]
    fn attention_weights_positions_by_softmax_of_scores() {
        let cfg = LlamaConfig { context_length: 8, ..tiny() };
        let rope = Rope::new(&LlamaConfig { rope_dim: 0, ..cfg.clone() }); // no rotation: plain dot products
        let mut cache = KvCache::new(&cfg, 4);
        let keys = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]];
        let values = [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]];
        let q = [2.0, 1.0];
        let mut qkv: Vec<f32> = Vec::new();
        for (k, v) in keys.iter().zip(&values) {
            qkv.extend(q.iter().chain(&q).chain(k).chain(v));
        }
        let out = StepAttention { cfg: &cfg, rope: &rope, qkv: &mut qkv, positions: &[0, 1, 2], owners: &[0, 0, 0] }
            .run(0, &mut [&mut cache]);
        // The last token sees all three positions.
        let scores: Vec<f32> = keys.iter().map(|k| (q[0] * k[0] + q[1] * k[1]) / 2f32.sqrt()).collect();
        let exp: Vec<f32> = scores.iter().map(|s| s.exp()).collect();
        let total: f32 = exp.iter().sum();
        for d in 0..2 {
            let want: f32 = exp.iter().zip(&values).map(|(e, v)| e / total * v[d]).sum();
            assert!((out[2 * 4 + d] - want).abs() < 1e-5, "dim {d}: {} vs {want}", out[2 * 4 + d]);
        }
        // The first token sees only itself.
        assert_eq!(&out[0..2], &values[0]);
    }
}
