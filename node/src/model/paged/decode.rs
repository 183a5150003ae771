//! Attention of every decoding row of a step in one op per layer, reading
//! keys and values where they lie in the pool (no gather, no padding to
//! the longest sequence, no mask). The table holds a header `[step row,
//! keys, first block]` per row, then the rows' blocks: a row's query is its
//! step row's rotated q, and it attends to positions `0..keys` of its
//! blocks, listed from `first block` on.
//!
//! On a GPU one block of 4 warps per (query head, row) reads several keys
//! at a time per warp, each lane group with a running softmax, and merges
//! them (`kernels.cu`); on the CPU the same sum in plain loops, checked
//! against the host attention.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, bail};

pub struct DecodeAttention {
    /// Rows attended (headers in the table).
    pub rows: usize,
    pub n_head: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_tokens: usize,
}

/// The table's length, the pool's positions and qkv's width.
struct Dims {
    table: usize,
    positions: usize,
    width: usize,
}

impl DecodeAttention {
    fn check(&self, qkv: &Layout, pool: &Layout, table: &Layout) -> Result<Dims> {
        let (_, width) = qkv.shape().dims2()?;
        let (two, heads, positions, hd) = pool.shape().dims4()?;
        let entries = table.shape().dims1()?;
        let shapes_agree = two == 2 && heads == self.kv_heads && hd == self.head_dim && entries >= 3 * self.rows;
        if !shapes_agree || self.rows == 0 || width < self.n_head * hd || !self.n_head.is_multiple_of(heads) {
            bail!("decode attention: qkv {:?}, pool {:?}, table {:?}", qkv.shape(), pool.shape(), table.shape());
        }
        // A key is read by head_dim / 8 lanes of a warp.
        if !hd.is_power_of_two() || !(8..=256).contains(&hd) {
            bail!("decode attention needs a head size that is a power of two from 8 to 256, not {hd}");
        }
        if !qkv.is_contiguous() || !pool.is_contiguous() || !table.is_contiguous() {
            bail!("decode attention needs contiguous tensors");
        }
        Ok(Dims { table: entries, positions, width })
    }
}

impl CustomOp3 for DecodeAttention {
    fn name(&self) -> &'static str {
        "paged-decode-attention"
    }

    fn cpu_fwd(
        &self,
        qkv: &CpuStorage,
        qkv_l: &Layout,
        pool: &CpuStorage,
        pool_l: &Layout,
        table: &CpuStorage,
        table_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = self.check(qkv_l, pool_l, table_l)?;
        let hd = self.head_dim;
        let qkv = &qkv.as_slice::<f32>()?[qkv_l.start_offset()..];
        let pool = &pool.as_slice::<f32>()?[pool_l.start_offset()..][..2 * self.kv_heads * d.positions * hd];
        let table = &table.as_slice::<u32>()?[table_l.start_offset()..][..d.table];
        let (headers, blocks) = table.split_at(3 * self.rows);
        let (keys, values) = pool.split_at(self.kv_heads * d.positions * hd);
        let mut out = vec![0f32; self.rows * self.n_head * hd];
        for (header, out) in headers.chunks_exact(3).zip(out.chunks_exact_mut(self.n_head * hd)) {
            let (row, len, first) = (header[0] as usize, header[1] as usize, header[2] as usize);
            let Some(blocks) = blocks.get(first..first + len.div_ceil(self.block_tokens)) else {
                bail!("decode attention: header {header:?} is past the table's {} blocks", blocks.len());
            };
            if (row + 1) * d.width > qkv.len() {
                bail!("decode attention: step row {row} is past qkv");
            }
            let slots: Vec<usize> = (0..len)
                .map(|j| blocks[j / self.block_tokens] as usize * self.block_tokens + j % self.block_tokens)
                .collect();
            if slots.iter().any(|&s| s >= d.positions) {
                bail!("decode attention: a block of row {row} is past the pool's {} positions", d.positions);
            }
            for (head, o) in out.chunks_exact_mut(hd).enumerate() {
                let g = head / (self.n_head / self.kv_heads);
                let q = &qkv[row * d.width + head * hd..][..hd];
                let at = |s: usize| (g * d.positions + s) * hd;
                attend_one(q, slots.iter().map(|&s| (&keys[at(s)..][..hd], &values[at(s)..][..hd])), o);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((self.rows, self.n_head * hd))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qkv: &candle_core::CudaStorage,
        qkv_l: &Layout,
        pool: &candle_core::CudaStorage,
        pool_l: &Layout,
        table: &candle_core::CudaStorage,
        table_l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::model::cuda;
        use candle_core::cuda_backend::WrapErr;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        let d = self.check(qkv_l, pool_l, table_l)?;
        let dev = qkv.device.clone();
        let func = cuda::func(&dev, "decode_attend")?;
        let (q, kv, entries) = (
            cuda::view::<f32>(qkv, qkv_l, "paged-decode-attention")?,
            cuda::view::<f32>(pool, pool_l, "paged-decode-attention")?,
            cuda::view::<u32>(table, table_l, "paged-decode-attention")?,
        );
        let width = self.n_head * self.head_dim;
        // SAFETY: every element is written by the kernel (zeros for a row with no keys).
        let out = unsafe { dev.alloc::<f32>(self.rows * width) }?;
        let mut builder = func.builder();
        builder.arg(&out);
        builder.arg(&q);
        builder.arg(&kv);
        builder.arg(&entries);
        candle_core::builder_arg!(builder, d.width as u32, self.n_head as u32, self.kv_heads as u32);
        candle_core::builder_arg!(builder, self.head_dim as u32, d.positions as u32, self.block_tokens as u32);
        let grid_dim = (self.n_head as u32, self.rows as u32, 1);
        let cfg = LaunchConfig { grid_dim, block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the table is built on the host (`attend::decode_table`)
        // from blocks reserved in the pool, with step rows of qkv; the
        // shapes are checked.
        unsafe { builder.launch(cfg) }.w()?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(out, dev), Shape::from((self.rows, width))))
    }
}

/// The table of rows `(step row, keys, blocks holding the keys)`: their
/// headers, then their blocks.
pub fn table(rows: &[(usize, usize, &[u32])]) -> Vec<u32> {
    let mut headers = Vec::with_capacity(3 * rows.len());
    let mut blocks = Vec::new();
    for &(row, keys, held) in rows {
        headers.extend([row as u32, keys as u32, blocks.len() as u32]);
        blocks.extend_from_slice(held);
    }
    headers.extend(blocks);
    headers
}

/// Softmax attention of one query over `(key, value)` pairs into `out`.
fn attend_one<'a>(q: &[f32], kv: impl Iterator<Item = (&'a [f32], &'a [f32])> + Clone, out: &mut [f32]) {
    let scores: Vec<f32> = kv.clone().map(|(k, _)| q.iter().zip(k).map(|(a, b)| a * b).sum()).collect();
    let top = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f32> = scores.iter().map(|s| (s - top).exp()).collect();
    let sum: f32 = weights.iter().sum();
    out.fill(0.0);
    for (w, (_, v)) in weights.iter().zip(kv) {
        for (o, x) in out.iter_mut().zip(v) {
            *o += w / sum * x;
        }
    }
}
