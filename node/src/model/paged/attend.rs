//! Attention of one step over the block pool, in candle ops.
//!
//! The step's chunks form groups: every decoding sequence (one new token)
//! in one group, each prefill chunk a group of its own. A group gathers its
//! sequences' keys and values from the pool into `[n_kv_head, b, len, hd]`
//! (shorter sequences padded and masked out) and attends with two batched
//! matmuls, so a layer costs one attention call per group, not per
//! sequence. On a GPU the cost of a step is the number of kernels the host
//! issues (about 6 µs each with candle), so the layout is chosen to need
//! few: RoPE needs no transposes, the attention scale rides in the queries'
//! RoPE tables, and the head-major pool gathers straight into batch order. Everything a layer needs besides the weights (rows to write,
//! rows to gather, masks, RoPE tables at each token's position) is built
//! once per step and shared by all layers.

use candle_core::{Device, Tensor};
use candle_nn::ops::softmax_last_dim;
use candle_nn::rotary_emb::rope_i;

use super::write::WriteRows;
use super::{KvPool, SeqBlocks};
use crate::model::step::{StepKv, StepPlan};
use crate::model::{LlamaConfig, ModelError};

/// Sequences attended together.
struct Group {
    /// Step rows of the group's query tokens, member by member; `None`
    /// when they are all the step's rows in order (a step of decoding only).
    rows: Option<Tensor>,
    members: usize,
    /// New tokens per member (1 for decoding, the chunk for prefill).
    qlen: usize,
    /// Longest member after this step: the padded key length.
    keys: usize,
    /// Pool rows of each member's positions `[members * keys]` (padding: row 0).
    gather: Tensor,
    /// `[1, members, qlen, 1, keys]`: 0 where a query may look, -inf elsewhere.
    mask: Tensor,
}

pub struct PagedAttention<'a> {
    cfg: &'a LlamaConfig,
    pool: &'a mut KvPool,
    /// `[tokens]`: each new token's pool row.
    slots: Tensor,
    /// RoPE at each token's position, `[tokens, 1, pairs]`; the queries'
    /// tables carry attention's `1 / sqrt(head_dim)` as well.
    cos: Tensor,
    sin: Tensor,
    q_cos: Tensor,
    q_sin: Tensor,
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
        let at = |table: &Tensor| table.index_select(&positions, 0)?.unsqueeze(1);
        let (cos, sin) = (at(&rope.0)?, at(&rope.1)?);
        let scale = 1.0 / (cfg.head_dim as f64).sqrt();
        let (q_cos, q_sin) = ((&cos * scale)?, (&sin * scale)?);
        let (groups, order) = plan_groups(plan, &seqs, &device)?;
        Ok(Self { cfg, pool, slots, cos, sin, q_cos, q_sin, groups, order })
    }

    /// RoPE on `[tokens, heads * head_dim]`, each token at its own position:
    /// as `[tokens, heads, 1, head_dim]`, one batch entry per token, so
    /// nothing is transposed.
    fn rotate(x: Tensor, heads: usize, hd: usize, cos: &Tensor, sin: &Tensor) -> Result<Tensor, ModelError> {
        let n = x.dim(0)?;
        Ok(rope_i(&x.reshape((n, heads, 1, hd))?, cos, sin)?.reshape((n, heads * hd))?)
    }

    /// One group's attention output `[members * qlen, n_embd]`.
    fn attend_group(&self, layer: usize, q: &Tensor, g: &Group) -> Result<Tensor, ModelError> {
        let cfg = self.cfg;
        let (b, hd, kvh) = (g.members, cfg.head_dim, cfg.n_kv_head);
        let per = cfg.n_head / kvh;
        let q = match &g.rows {
            Some(rows) => q.index_select(rows, 0)?,
            None => q.clone(),
        };
        // Batched over (KV head, member): the pool is head-major, so a
        // gather is already `[kv_head, member, key, head_dim]`.
        let q = q.reshape((b, g.qlen, kvh, per, hd))?.permute((2, 0, 1, 3, 4))?;
        let q = q.contiguous()?.reshape((kvh, b, g.qlen * per, hd))?;
        let gather = |pool: &Tensor| pool.index_select(&g.gather, 1)?.reshape((kvh, b, g.keys, hd));
        let (k, v) = (gather(&self.pool.k[layer])?, gather(&self.pool.v[layer])?);
        let scores = q.matmul(&k.t()?)?.reshape((kvh, b, g.qlen, per, g.keys))?.broadcast_add(&g.mask)?;
        let weights = softmax_last_dim(&scores.reshape((kvh, b, g.qlen * per, g.keys))?)?;
        let out = weights.matmul(&v)?.reshape((kvh, b, g.qlen, per, hd))?.permute((1, 2, 0, 3, 4))?;
        Ok(out.contiguous()?.reshape((b * g.qlen, cfg.n_embd))?)
    }
}

impl StepKv for PagedAttention<'_> {
    fn attend(&mut self, layer: usize, qkv: Tensor) -> Result<Tensor, ModelError> {
        let cfg = self.cfg;
        let (qd, kvd) = (cfg.n_embd, cfg.kv_dim());
        let hd = cfg.head_dim;
        let q = Self::rotate(qkv.narrow(1, 0, qd)?, cfg.n_head, hd, &self.q_cos, &self.q_sin)?;
        let k = Self::rotate(qkv.narrow(1, qd, kvd)?, cfg.n_kv_head, hd, &self.cos, &self.sin)?;
        let v = qkv.narrow(1, qd + kvd, kvd)?.contiguous()?;
        self.pool.k[layer].inplace_op3(&k, &self.slots, &WriteRows)?;
        self.pool.v[layer].inplace_op3(&v, &self.slots, &WriteRows)?;
        let outs: Vec<Tensor> =
            self.groups.iter().map(|g| self.attend_group(layer, &q, g)).collect::<Result<_, _>>()?;
        let out = Tensor::cat(&outs, 0)?;
        Ok(match &self.order {
            Some(order) => out.index_select(order, 0)?,
            None => out,
        })
    }
}

/// Groups the step's chunks (decoding ones together, each prefill chunk
/// alone) and the permutation from group order back to step order.
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
    let decoding: Vec<_> = chunks.iter().copied().filter(|c| c.2 == 1).collect();
    let mut sets: Vec<Vec<(usize, usize, usize)>> = Vec::new();
    if !decoding.is_empty() {
        sets.push(decoding);
    }
    sets.extend(chunks.iter().filter(|c| c.2 > 1).map(|c| vec![*c]));
    let mut groups = Vec::with_capacity(sets.len());
    let mut rows: Vec<u32> = Vec::with_capacity(plan.owners.len());
    for set in &sets {
        let first = rows.len();
        rows.extend(set.iter().flat_map(|&(_, r, n)| (r..r + n).map(|r| r as u32)));
        groups.push(group(plan, seqs, set, &rows[first..], device)?);
    }
    let order = match in_order(&rows) {
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

/// Whether `rows` are `0, 1, 2, ...`: the step's own order.
fn in_order(rows: &[u32]) -> bool {
    rows.iter().enumerate().all(|(i, &r)| i == r as usize)
}

/// The gather rows and mask of one group; `set` holds `(chunk, first row,
/// tokens)` of its members, all with the same number of tokens.
fn group(
    plan: &StepPlan,
    seqs: &[&SeqBlocks],
    set: &[(usize, usize, usize)],
    rows: &[u32],
    device: &Device,
) -> Result<Group, ModelError> {
    let qlen = set[0].2;
    // A member sees its cached positions and its new ones.
    let seen = |&(_, r, n): &(usize, usize, usize)| plan.positions[r] + n;
    let keys = set.iter().map(seen).max().unwrap_or(0);
    let mut gather = Vec::with_capacity(set.len() * keys);
    let mut mask = Vec::with_capacity(set.len() * qlen * keys);
    for m in set {
        let (seq, first) = (seqs[m.0], plan.positions[m.1]);
        gather.extend((0..keys).map(|j| if j < seen(m) { seq.slot(j) } else { 0 }));
        for t in 0..qlen {
            mask.extend((0..keys).map(|j| if j <= first + t { 0f32 } else { f32::NEG_INFINITY }));
        }
    }
    let all_in_order = rows.len() == plan.owners.len() && in_order(rows);
    Ok(Group {
        rows: (!all_in_order).then(|| Tensor::new(rows, device)).transpose()?,
        members: set.len(),
        qlen,
        keys,
        gather: Tensor::new(gather.as_slice(), device)?,
        mask: Tensor::from_vec(mask, (1, set.len(), qlen, 1, keys), device)?,
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

    /// Two sequences: one decoding a token after 5 cached, one reading a
    /// 3-token chunk after 2 cached; host and pool outputs agree.
    #[test]
    fn pool_attention_equals_host_attention() {
        let cfg = cfg();
        let rope = Rope::new(&cfg);
        let tables = rope.tables(&Device::Cpu).unwrap();
        let mut pool = KvPool::new(&cfg, 96, 2, &Device::Cpu).unwrap();
        let mut host = [KvCache::new(&cfg, 48), KvCache::new(&cfg, 48)];
        let row = cfg.n_embd + 2 * cfg.kv_dim();
        let steps: [&[(usize, usize)]; 2] = [&[(40, 0), (2, 0)], &[(1, 40), (3, 2)]];
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
            for id in 0..2 {
                pool.reserve(id, 48, &[]).unwrap();
            }
            let mut kv = PagedAttention::new(&cfg, &mut pool, &[0, 1], &plan, &tables).unwrap();
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
