//! RoPE of a step's queries and keys in place, in the fused rows
//! `[tokens, q | k | v]`, each token at its own position: one kernel per
//! layer (candle's `rope_i` wants its own layout: a copy out of the fused
//! rows and one call each for queries and keys). Pairs are interleaved,
//! `(2i, 2i + 1)`, as in `attention::Rope::apply`; the queries also take
//! attention's `1 / sqrt(head_dim)`, folded into their cos and sin.

use candle_core::{CpuStorage, InplaceOp3, Layout, Result, bail};

pub struct RopeRows {
    pub q_heads: usize,
    pub k_heads: usize,
    pub head_dim: usize,
    pub q_scale: f32,
}

impl RopeRows {
    /// Rows, row width and pairs per head, after checking the layouts:
    /// `cos` and `sin` are `[tokens, head_dim / 2]`.
    fn check(&self, qkv: &Layout, cos: &Layout, sin: &Layout) -> Result<(usize, usize, usize)> {
        let (rows, width) = qkv.shape().dims2()?;
        let pairs = self.head_dim / 2;
        let fits = width >= (self.q_heads + self.k_heads) * self.head_dim;
        if !fits || cos.shape().dims2()? != (rows, pairs) || sin.shape().dims2()? != (rows, pairs) {
            bail!("rope rows: qkv {:?}, cos {:?}, sin {:?}", qkv.shape(), cos.shape(), sin.shape());
        }
        if !qkv.is_contiguous() || !cos.is_contiguous() || !sin.is_contiguous() {
            bail!("rope rows needs contiguous tensors");
        }
        Ok((rows, width, pairs))
    }
}

impl InplaceOp3 for RopeRows {
    fn name(&self) -> &'static str {
        "rope-rows"
    }

    fn cpu_fwd(
        &self,
        qkv: &mut CpuStorage,
        qkv_l: &Layout,
        cos: &CpuStorage,
        cos_l: &Layout,
        sin: &CpuStorage,
        sin_l: &Layout,
    ) -> Result<()> {
        let (rows, width, pairs) = self.check(qkv_l, cos_l, sin_l)?;
        let CpuStorage::F32(qkv) = qkv else { bail!("rope rows: qkv must be f32") };
        let qkv = &mut qkv[qkv_l.start_offset()..][..rows * width];
        let cos = &cos.as_slice::<f32>()?[cos_l.start_offset()..][..rows * pairs];
        let sin = &sin.as_slice::<f32>()?[sin_l.start_offset()..][..rows * pairs];
        let heads = self.q_heads + self.k_heads;
        for (t, row) in qkv.chunks_exact_mut(width).enumerate() {
            let (cos, sin) = (&cos[t * pairs..][..pairs], &sin[t * pairs..][..pairs]);
            for (h, head) in row[..heads * self.head_dim].chunks_exact_mut(self.head_dim).enumerate() {
                let scale = if h < self.q_heads { self.q_scale } else { 1.0 };
                for (p, pair) in head.chunks_exact_mut(2).enumerate() {
                    let (c, s) = (cos[p] * scale, sin[p] * scale);
                    let (x0, x1) = (pair[0], pair[1]);
                    pair[0] = x0 * c - x1 * s;
                    pair[1] = x0 * s + x1 * c;
                }
            }
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qkv: &mut candle_core::CudaStorage,
        qkv_l: &Layout,
        cos: &candle_core::CudaStorage,
        cos_l: &Layout,
        sin: &candle_core::CudaStorage,
        sin_l: &Layout,
    ) -> Result<()> {
        use crate::model::cuda;
        use candle_core::cuda_backend::WrapErr;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        let (rows, width, pairs) = self.check(qkv_l, cos_l, sin_l)?;
        let func = cuda::func(&qkv.device.clone(), "rope_rows")?;
        let cos = cuda::view::<f32>(cos, cos_l, "rope-rows")?;
        let sin = cuda::view::<f32>(sin, sin_l, "rope-rows")?;
        let start = qkv_l.start_offset();
        let dst = qkv.as_cuda_slice_mut::<f32>()?.slice(start..start + rows * width);
        let heads = self.q_heads + self.k_heads;
        let n = rows * heads * pairs;
        let mut builder = func.builder();
        builder.arg(&dst);
        builder.arg(&cos);
        builder.arg(&sin);
        candle_core::builder_arg!(builder, width as u32, heads as u32, self.q_heads as u32, self.head_dim as u32);
        candle_core::builder_arg!(builder, self.q_scale, n as u32);
        // SAFETY: `check` bounds every index the kernel forms: `n` pairs of
        // `rows` rows of `width`, and `rows` rows of the tables.
        unsafe { builder.launch(cuda::per_element(n)) }.w()?;
        Ok(())
    }
}
