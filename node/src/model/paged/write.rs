//! Storing a step's keys and values in the pool `[2, kv_heads, positions,
//! head_dim]` (keys, then values; head-major): the k and v parts of source
//! row `i` (`[q | k | v]`, already rotated) go to position `slots[i]` of
//! every head.
//!
//! Written here because candle's `scatter_set` is the wrong shape for it on
//! a GPU: its CUDA kernel runs one thread per column, each walking every
//! source row in turn (on an H100 most of a 256-stream decode step, 12 of
//! 21 ms). This op runs one thread per element, keys and values in one
//! kernel.

use candle_core::{CpuStorage, InplaceOp3, Layout, Result, bail};

/// `q_width`: the query part of a source row, which is not stored.
pub struct StoreKv {
    pub q_width: usize,
}

/// The pool's `(kv_heads, positions, head_dim)`, the source rows and their
/// width, after checking the three layouts.
fn check(q_width: usize, pool: &Layout, src: &Layout, slots: &Layout) -> Result<((usize, usize, usize), usize, usize)> {
    let (two, heads, positions, hd) = pool.shape().dims4()?;
    let (rows, width) = src.shape().dims2()?;
    if two != 2 || width < q_width + 2 * heads * hd || slots.shape().dims1()? != rows {
        bail!("pool store: pool {:?}, rows {:?}, slots {:?}", pool.shape(), src.shape(), slots.shape());
    }
    if !pool.is_contiguous() || !src.is_contiguous() || !slots.is_contiguous() {
        bail!("pool store needs contiguous tensors");
    }
    Ok(((heads, positions, hd), rows, width))
}

impl InplaceOp3 for StoreKv {
    fn name(&self) -> &'static str {
        "kv-pool-store"
    }

    fn cpu_fwd(
        &self,
        pool: &mut CpuStorage,
        pool_l: &Layout,
        src: &CpuStorage,
        src_l: &Layout,
        slots: &CpuStorage,
        slots_l: &Layout,
    ) -> Result<()> {
        let ((heads, positions, hd), rows, width) = check(self.q_width, pool_l, src_l, slots_l)?;
        let CpuStorage::F32(pool) = pool else { bail!("pool store: the pool must be f32") };
        let pool = &mut pool[pool_l.start_offset()..][..2 * heads * positions * hd];
        let src = &src.as_slice::<f32>()?[src_l.start_offset()..][..rows * width];
        let slots = &slots.as_slice::<u32>()?[slots_l.start_offset()..][..rows];
        for (row, &slot) in src.chunks_exact(width).zip(slots) {
            if slot as usize >= positions {
                bail!("pool store: slot {slot} is past the pool's {positions} positions");
            }
            let kv = &row[self.q_width..][..2 * heads * hd];
            for (h, head) in kv.chunks_exact(hd).enumerate() {
                pool[(h * positions + slot as usize) * hd..][..hd].copy_from_slice(head);
            }
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        pool: &mut candle_core::CudaStorage,
        pool_l: &Layout,
        src: &candle_core::CudaStorage,
        src_l: &Layout,
        slots: &candle_core::CudaStorage,
        slots_l: &Layout,
    ) -> Result<()> {
        use crate::model::cuda;
        use candle_core::cuda_backend::WrapErr;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        let ((heads, positions, hd), rows, width) = check(self.q_width, pool_l, src_l, slots_l)?;
        let func = cuda::func(&pool.device.clone(), "kv_store")?;
        let src = cuda::view::<f32>(src, src_l, "kv-pool-store")?;
        let slots = cuda::view::<u32>(slots, slots_l, "kv-pool-store")?;
        let (start, len) = (pool_l.start_offset(), pool_l.shape().elem_count());
        let dst = pool.as_cuda_slice_mut::<f32>()?.slice(start..start + len);
        let kvd = heads * hd;
        let n = rows * 2 * kvd;
        let mut builder = func.builder();
        builder.arg(&dst);
        builder.arg(&src);
        builder.arg(&slots);
        candle_core::builder_arg!(builder, self.q_width as u32, kvd as u32, width as u32, hd as u32, positions as u32);
        candle_core::builder_arg!(builder, n as u32);
        // SAFETY: the kernel reads `n` elements of the source rows and `rows`
        // slots, and writes rows of the pool; slots are checked on the host
        // when the step is planned (`SeqBlocks::slot` of reserved blocks).
        unsafe { builder.launch(cuda::per_element(n)) }.w()?;
        Ok(())
    }
}
