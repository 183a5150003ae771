//! Writing a step's keys (or values) into the head-major pool
//! `[heads, positions, head_dim]`: source row `i` (`[heads * head_dim]`)
//! goes to position `slots[i]` of every head.
//!
//! Written here because candle's `scatter_set` is the wrong shape for it on
//! a GPU: its CUDA kernel runs one thread per column (192 here), each
//! walking every source row in turn. On an H100 that made the pool writes
//! most of a 256-stream decode step (12 of 21 ms) and most of a 512-token
//! prefill (30 ms). This op runs one thread per element.

use candle_core::{CpuStorage, InplaceOp3, Layout, Result, bail};

pub struct WriteRows;

/// The pool's `(heads, positions, head_dim)` and the source rows, after
/// checking the three layouts.
fn check(pool: &Layout, src: &Layout, slots: &Layout) -> Result<((usize, usize, usize), usize)> {
    let (heads, positions, hd) = pool.shape().dims3()?;
    let (rows, width) = src.shape().dims2()?;
    if width != heads * hd || slots.shape().dims1()? != rows {
        bail!("pool write: pool {:?}, rows {:?}, slots {:?}", pool.shape(), src.shape(), slots.shape());
    }
    if !pool.is_contiguous() || !src.is_contiguous() || !slots.is_contiguous() {
        bail!("pool write needs contiguous tensors");
    }
    Ok(((heads, positions, hd), rows))
}

impl InplaceOp3 for WriteRows {
    fn name(&self) -> &'static str {
        "kv-pool-write"
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
        let ((heads, positions, hd), rows) = check(pool_l, src_l, slots_l)?;
        let CpuStorage::F32(pool) = pool else { bail!("pool write: the pool must be f32") };
        let pool = &mut pool[pool_l.start_offset()..][..heads * positions * hd];
        let src = &src.as_slice::<f32>()?[src_l.start_offset()..][..rows * heads * hd];
        let slots = &slots.as_slice::<u32>()?[slots_l.start_offset()..][..rows];
        for (row, &slot) in src.chunks_exact(heads * hd).zip(slots) {
            if slot as usize >= positions {
                bail!("pool write: slot {slot} is past the pool's {positions} positions");
            }
            for (h, head) in row.chunks_exact(hd).enumerate() {
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
        use candle_core::cuda_backend::WrapErr;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        let ((heads, positions, hd), rows) = check(pool_l, src_l, slots_l)?;
        let width = heads * hd;
        let dev = pool.device.clone();
        let func = dev.get_or_load_custom_func("kv_write_rows", "mesh_kv_write", cuda::ptx()?)?;
        let pool_len = pool_l.shape().elem_count();
        let dst = pool.as_cuda_slice_mut::<f32>()?;
        let dst = dst.slice(pool_l.start_offset()..pool_l.start_offset() + pool_len);
        let src = src.as_cuda_slice::<f32>()?.slice(src_l.start_offset()..src_l.start_offset() + rows * width);
        let slots = slots.as_cuda_slice::<u32>()?.slice(slots_l.start_offset()..slots_l.start_offset() + rows);
        let n = (rows * width) as u32;
        let mut builder = func.builder();
        builder.arg(&dst);
        builder.arg(&src);
        builder.arg(&slots);
        candle_core::builder_arg!(builder, width as u32, hd as u32, positions as u32, n);
        // SAFETY: the kernel reads `n` source floats and `rows` slots and
        // writes rows of the pool; the CPU path checks the same slots.
        unsafe { builder.launch(LaunchConfig::for_num_elems(n)) }.w()?;
        Ok(())
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::OnceLock;

    const SOURCE: &str = r#"
extern "C" __global__ void kv_write_rows(float *pool, const float *src, const unsigned int *slots,
                                         unsigned int width, unsigned int hd, unsigned int positions,
                                         unsigned int n) {
    unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        unsigned int head = (i % width) / hd;
        pool[((size_t)head * positions + slots[i / width]) * hd + i % hd] = src[i];
    }
}
"#;

    /// The kernel's PTX, compiled by NVRTC once per process.
    pub fn ptx() -> candle_core::Result<&'static str> {
        static PTX: OnceLock<Result<String, String>> = OnceLock::new();
        let ptx = PTX.get_or_init(|| {
            candle_core::cuda_backend::cudarc::nvrtc::compile_ptx(SOURCE).map(|p| p.to_src()).map_err(|e| e.to_string())
        });
        ptx.as_deref().map_err(|e| candle_core::Error::Msg(format!("compiling the KV pool write kernel: {e}")))
    }
}
