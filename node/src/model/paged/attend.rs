//! Attention of one step over the block pool.
//!
//! Every decoding sequence of a step (one new token) is attended in one op
//! per layer that reads its keys and values where they lie in the pool
//! (`decode::DecodeAttention`); each prefill chunk gathers its sequence's
//! keys and values into `[n_kv_head, 1, len, hd]` and attends with two
//! batched matmuls in candle ops. On a GPU the cost of a step is mostly the
//! number of kernels the host issues (about 6 µs each with candle), so a
//! decode-only layer needs three of our own: RoPE of queries and keys in
//! place, the pool store of keys and values, the attention. Everything a
//! layer needs besides the weights (slots to write, decode tables, prefill
//! gathers and masks, RoPE tables at each token's position) is built once
//! per step and shared by all layers.

use candle_core::{Device, Tensor};
use candle_nn::ops::softmax_last_dim;

use super::decode::{self, DecodeAttention};
use super::graph::DecodeInputs;
use super::rope::RopeRows;
use super::write::StoreKv;
use super::{BLOCK_TOKENS, KvPool, SeqBlocks};
use crate::model::step::{StepKv, StepPlan};
use crate::model::{LlamaConfig, ModelError};

/// Rows attended together.
enum Group {
    /// Every decoding row: their table for `DecodeAttention`.
    Decode {
        table: Tensor,
        rows: usize,
    },
    Prefill(Chunk),
}

/// One prefill chunk: consecutive step rows of one sequence.
struct Chunk {
    first: usize,
    qlen: usize,
    /// The sequence's positions after this step.
    keys: usize,
    /// Pool rows of the sequence's positions `[keys]`.
    gather: Tensor,
    /// `[1, 1, qlen, 1, keys]`: 0 where a query may look, -inf elsewhere.
    mask: Tensor,
}

pub struct PagedAttention<'a> {
    cfg: &'a LlamaConfig,
    pool: &'a mut KvPool,
    /// `[tokens]`: each new token's pool row.
    slots: Tensor,
    /// RoPE at each token's position, `[tokens, pairs]`.
    cos: Tensor,
    sin: Tensor,
    groups: Vec<Group>,
    /// Back from group order to step order; `None` when they agree.
    order: Option<Tensor>,
}

impl<'a> PagedAttention<'a> {
    /// `ids[i]` is chunk `i`'s sequence, already reserved in `pool`; `rope`
    /// the model's `(cos, sin)` tables on the pool's device.
    pub fn new(
        cfg: &'a LlamaConfig,
        pool: &'a mut KvPool,
        ids: &[u64],
        plan: &StepPlan,
        rope: &(Tensor, Tensor),
    ) -> Result<Self, ModelError> {
        let device = pool.device().clone();
        let seqs: Vec<&SeqBlocks> = ids
            .iter()
            .map(|id| pool.seq(*id).ok_or_else(|| ModelError::Unsupported(format!("sequence {id} has no KV blocks"))))
            .collect::<Result<_, _>>()?;
        let slots: Vec<u32> =
            plan.positions.iter().zip(&plan.owners).map(|(&pos, &owner)| seqs[owner].slot(pos)).collect();
        let slots = Tensor::new(slots.as_slice(), &device)?;
        let positions: Vec<u32> = plan.positions.iter().map(|&p| p as u32).collect();
        let positions = Tensor::new(positions.as_slice(), &device)?;
        let (cos, sin) = (rope.0.index_select(&positions, 0)?, rope.1.index_select(&positions, 0)?);
        let (groups, order) = plan_groups(plan, &seqs, &device)?;
        Ok(Self { cfg, pool, slots, cos, sin, groups, order })
    }

    /// A step of decoding rows only, every input already on the device
    /// (`graph::DecodeInputs`): nothing is copied from the host, so the
    /// step can be recorded as a CUDA graph.
    pub fn decoding(
        cfg: &'a LlamaConfig,
        pool: &'a mut KvPool,
        inputs: &DecodeInputs,
        rope: &(Tensor, Tensor),
    ) -> Result<Self, ModelError> {
        let positions = inputs.positions()?;
        let (cos, sin) = (rope.0.index_select(&positions, 0)?, rope.1.index_select(&positions, 0)?);
        let groups = vec![Group::Decode { table: inputs.table()?, rows: inputs.batch() }];
        Ok(Self { cfg, pool, slots: inputs.slots()?, cos, sin, groups, order: None })
    }

    /// One prefill chunk's attention output `[qlen, n_embd]`; `qkv` holds
    /// rotated queries and the pool the chunk's keys and values.
    fn attend_chunk(&self, layer: usize, qkv: &Tensor, c: &Chunk) -> Result<Tensor, ModelError> {
        let cfg = self.cfg;
        let (hd, kvh) = (cfg.head_dim, cfg.n_kv_head);
        let per = cfg.n_head / kvh;
        let q = qkv.narrow(0, c.first, c.qlen)?.narrow(1, 0, cfg.n_embd)?;
        // Batched over KV heads: the pool is head-major, so a gather is
        // already `[kv_head, key, head_dim]`.
        let q = q.reshape((c.qlen, kvh, per, hd))?.permute((1, 0, 2, 3))?;
        let q = q.contiguous()?.reshape((kvh, 1, c.qlen * per, hd))?;
        let pool = &self.pool.kv[layer];
        let gather = |part: usize| pool.get(part)?.index_select(&c.gather, 1)?.reshape((kvh, 1, c.keys, hd));
        let (k, v) = (gather(0)?, gather(1)?);
        let scores = q.matmul(&k.t()?)?.reshape((kvh, 1, c.qlen, per, c.keys))?.broadcast_add(&c.mask)?;
        let weights = softmax_last_dim(&scores.reshape((kvh, 1, c.qlen * per, c.keys))?)?;
        let out = weights.matmul(&v)?.reshape((kvh, c.qlen, per, hd))?.permute((1, 0, 2, 3))?;
        Ok(out.contiguous()?.reshape((c.qlen, cfg.n_embd))?)
    }
}

impl StepKv for PagedAttention<'_> {
    fn attend(&mut self, layer: usize, qkv: Tensor) -> Result<Tensor, ModelError> {
        let cfg = self.cfg;
        let (hd, kvh) = (cfg.head_dim, cfg.n_kv_head);
        let scale = 1.0 / (hd as f32).sqrt();
        let rope = RopeRows { q_heads: cfg.n_head, k_heads: kvh, head_dim: hd, q_scale: scale };
        let qkv = qkv.contiguous()?;
        qkv.inplace_op3(&self.cos, &self.sin, &rope)?;
        self.pool.kv[layer].inplace_op3(&qkv, &self.slots, &StoreKv { q_width: cfg.n_embd })?;
        let mut outs = Vec::with_capacity(self.groups.len());
        for group in &self.groups {
            outs.push(match group {
                &Group::Decode { ref table, rows } => {
                    let op = DecodeAttention {
                        rows,
                        n_head: cfg.n_head,
                        kv_heads: kvh,
                        head_dim: hd,
                        block_tokens: BLOCK_TOKENS,
                    };
                    qkv.apply_op3_no_bwd(&self.pool.kv[layer], table, &op)?
                }
                Group::Prefill(chunk) => self.attend_chunk(layer, &qkv, chunk)?,
            });
        }
        let out = match outs.len() {
            1 => outs.remove(0),
            _ => Tensor::cat(&outs, 0)?,
        };
        Ok(match &self.order {
            Some(order) => out.index_select(order, 0)?,
            None => out,
        })
    }
}

/// The step's groups (decoding rows together, each prefill chunk alone)
/// and the permutation from group order back to step order.
fn plan_groups(
    plan: &StepPlan,
    seqs: &[&SeqBlocks],
    device: &Device,
) -> Result<(Vec<Group>, Option<Tensor>), ModelError> {
    // (chunk, first step row, tokens) of every non-empty chunk.
    let mut chunks: Vec<(usize, usize, usize)> = Vec::new();
    for (row, &owner) in plan.owners.iter().enumerate() {
        match chunks.last_mut() {
            Some((c, _, n)) if *c == owner => *n += 1,
            _ => chunks.push((owner, row, 1)),
        }
    }
    let (decoding, prefill): (Vec<(usize, usize, usize)>, Vec<_>) = chunks.iter().partition(|c| c.2 == 1);
    let mut groups = Vec::with_capacity(prefill.len() + 1);
    let mut rows: Vec<u32> = decoding.iter().map(|c| c.1 as u32).collect();
    if !decoding.is_empty() {
        let keys = |row: usize| plan.positions[row] + 1;
        let rows: Vec<_> =
            decoding.iter().map(|&(owner, row, _)| (row, keys(row), seqs[owner].held(keys(row)))).collect();
        let table = decode::table(&rows);
        let len = table.len();
        groups.push(Group::Decode { table: Tensor::from_vec(table, len, device)?, rows: decoding.len() });
    }
    for &(owner, first, qlen) in &prefill {
        rows.extend((first..first + qlen).map(|r| r as u32));
        groups.push(Group::Prefill(chunk(plan, seqs[owner], first, qlen, device)?));
    }
    let order = match rows.iter().enumerate().all(|(i, &r)| i == r as usize) {
        true => None,
        false => {
            let mut inverse = vec![0u32; rows.len()];
            for (i, &r) in rows.iter().enumerate() {
                inverse[r as usize] = i as u32;
            }
            Some(Tensor::new(inverse.as_slice(), device)?)
        }
    };
    Ok((groups, order))
}

/// The gather rows and causal mask of a prefill chunk of `qlen` tokens
/// from step row `first`.
fn chunk(plan: &StepPlan, seq: &SeqBlocks, first: usize, qlen: usize, device: &Device) -> Result<Chunk, ModelError> {
    let start = plan.positions[first];
    let keys = start + qlen;
    let gather: Vec<u32> = (0..keys).map(|j| seq.slot(j)).collect();
    let mut mask = Vec::with_capacity(qlen * keys);
    for t in 0..qlen {
        mask.extend((0..keys).map(|j| if j <= start + t { 0f32 } else { f32::NEG_INFINITY }));
    }
    Ok(Chunk {
        first,
        qlen,
        keys,
        gather: Tensor::new(gather.as_slice(), device)?,
        mask: Tensor::from_vec(mask, (1, 1, qlen, 1, keys), device)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::attention::{Rope, StepAttention};
    use crate::model::kv_cache::KvCache;
    use crate::model::step::StepChunk;

    fn cfg() -> LlamaConfig {
        LlamaConfig {
            n_layer: 1,
            n_embd: 576,
            n_head: 9,
            n_kv_head: 3,
            head_dim: 64,
            ffn_dim: 8,
            rope_dim: 64,
            rope_base: 100_000.0,
            rms_eps: 1e-5,
            context_length: 8192,
            vocab_size: 4,
        }
    }

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32).map(|i| ((i.wrapping_mul(2654435761) ^ seed) % 2000) as f32 / 1000.0 - 1.0).collect()
    }

    /// Three sequences read their prompts in one step; in the next, two
    /// decode a token each (after 40 and 17 cached: three blocks and two)
    /// around one reading a 3-token chunk after 2 cached. Host and pool
    /// outputs agree.
    #[test]
    fn pool_attention_equals_host_attention() {
        let cfg = cfg();
        let rope = Rope::new(&cfg);
        let tables = rope.tables(&Device::Cpu).unwrap();
        let mut pool = KvPool::new(&cfg, 144, 3, &Device::Cpu).unwrap();
        let mut host = [KvCache::new(&cfg, 48), KvCache::new(&cfg, 48), KvCache::new(&cfg, 48)];
        let row = cfg.n_embd + 2 * cfg.kv_dim();
        let steps: [&[(usize, usize)]; 2] = [&[(40, 0), (2, 0), (17, 0)], &[(1, 40), (3, 2), (1, 17)]];
        for (round, step) in steps.iter().enumerate() {
            let tokens: Vec<Vec<u32>> = step.iter().map(|&(n, _)| vec![0; n]).collect();
            let chunks: Vec<StepChunk<'_>> = step
                .iter()
                .zip(&tokens)
                .map(|(&(_, start), t)| StepChunk { tokens: t, start_pos: start, want_logits: true })
                .collect();
            let plan = StepPlan::new(&chunks);
            let qkv = values(plan.ids.len() * row, round as u32);
            let mut host_qkv = qkv.clone();
            let mut refs: Vec<&mut KvCache> = host.iter_mut().collect();
            let want = StepAttention {
                cfg: &cfg,
                rope: &rope,
                qkv: &mut host_qkv,
                positions: &plan.positions,
                owners: &plan.owners,
            }
            .run(0, &mut refs);
            for id in 0..3 {
                pool.reserve(id, 48, &[]).unwrap();
            }
            let mut kv = PagedAttention::new(&cfg, &mut pool, &[0, 1, 2], &plan, &tables).unwrap();
            let qkv = Tensor::from_vec(qkv, (plan.ids.len(), row), &Device::Cpu).unwrap();
            let got = kv.attend(0, qkv).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (i, (w, g)) in want.iter().zip(&got).enumerate() {
                assert!((w - g).abs() < 1e-5, "round {round}, element {i}: host {w}, pool {g}");
            }
            for (id, &(n, _)) in step.iter().enumerate() {
                pool.advance(id as u64, n);
            }
        }
    }
}
