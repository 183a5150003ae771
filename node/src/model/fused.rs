//! Two of a layer's elementwise steps fused into one op each: the residual
//! add with the RMS norm after it, and SwiGLU's `silu(gate) * up`. On a
//! device every op is a kernel launch the host pays for (about 6 µs each
//! with candle on an H100, for a few µs of GPU work at this model's size).
//! On the CPU the fused loops read each row once and write each output
//! once, split over threads by rows for a batch, where candle's ops (add,
//! norm, silu, two narrow copies, multiply) took 9% of a 32-stream decode
//! step (Zen 4). Either way a row's result depends only on that row.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, bail};
use rayon::prelude::*;

use super::vexp;

/// Elements below which a CPU op runs on the calling thread: waking the
/// pool costs more than a few rows of arithmetic.
const PARALLEL_ELEMENTS: usize = 1 << 14;

/// `f(input row, output row)` over matching rows, on the pool when large.
fn per_row(input: &[f32], in_cols: usize, out: &mut [f32], out_cols: usize, f: impl Fn(&[f32], &mut [f32]) + Sync) {
    if out.len() >= PARALLEL_ELEMENTS {
        input.par_chunks_exact(in_cols).zip(out.par_chunks_exact_mut(out_cols)).for_each(|(i, o)| f(i, o));
    } else {
        input.chunks_exact(in_cols).zip(out.chunks_exact_mut(out_cols)).for_each(|(i, o)| f(i, o));
    }
}

/// `(x, y, w)` to `[2, rows, cols]`: `x + y`, then `rms_norm(x + y) * w`.
pub struct AddRmsNorm {
    pub eps: f32,
}

fn rows_cols(x: &Layout, y: &Layout, w: &Layout) -> Result<(usize, usize)> {
    let (rows, cols) = x.shape().dims2()?;
    if y.shape().dims2()? != (rows, cols) || w.shape().dims1()? != cols {
        bail!("add-rms-norm: x {:?}, y {:?}, weight {:?}", x.shape(), y.shape(), w.shape());
    }
    if !x.is_contiguous() || !y.is_contiguous() || !w.is_contiguous() {
        bail!("add-rms-norm needs contiguous tensors");
    }
    Ok((rows, cols))
}

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "add-rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        y: &CpuStorage,
        y_l: &Layout,
        w: &CpuStorage,
        w_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, cols) = rows_cols(x_l, y_l, w_l)?;
        let x = &x.as_slice::<f32>()?[x_l.start_offset()..][..rows * cols];
        let y = &y.as_slice::<f32>()?[y_l.start_offset()..][..rows * cols];
        let w = &w.as_slice::<f32>()?[w_l.start_offset()..][..cols];
        let mut out = vec![0f32; 2 * rows * cols];
        let (sum, norm) = out.split_at_mut(rows * cols);
        sum.iter_mut().zip(x.iter().zip(y)).for_each(|(s, (a, b))| *s = a + b);
        per_row(sum, cols, norm, cols, |row, norm| {
            let mean = row.iter().map(|z| z * z).sum::<f32>() / cols as f32;
            let scale = 1.0 / (mean + self.eps).sqrt();
            norm.iter_mut().zip(row.iter().zip(w)).for_each(|(n, (z, w))| *n = z * scale * w);
        });
        Ok((CpuStorage::F32(out), Shape::from((2, rows, cols))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_l: &Layout,
        y: &candle_core::CudaStorage,
        y_l: &Layout,
        w: &candle_core::CudaStorage,
        w_l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda;
        use candle_core::cuda_backend::WrapErr;
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        let (rows, cols) = rows_cols(x_l, y_l, w_l)?;
        let dev = x.device.clone();
        let func = cuda::func(&dev, "add_rms_norm")?;
        let (xs, ys, ws) = (
            cuda::view::<f32>(x, x_l, self.name())?,
            cuda::view::<f32>(y, y_l, self.name())?,
            cuda::view::<f32>(w, w_l, self.name())?,
        );
        // SAFETY: the kernel writes both halves of every row.
        let out = unsafe { dev.alloc::<f32>(2 * rows * cols) }?;
        let mut builder = func.builder();
        builder.arg(&out);
        builder.arg(&xs);
        builder.arg(&ys);
        builder.arg(&ws);
        candle_core::builder_arg!(builder, cols as u32, self.eps, rows as u32);
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: one block per row of `cols` elements of x, y and out.
        unsafe { builder.launch(cfg) }.w()?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(out, dev), Shape::from((2, rows, cols))))
    }
}

/// `[rows, 2 * f]` (gate, then up) to `[rows, f]`: `silu(gate) * up`.
pub struct SiluMul;

fn halves(l: &Layout) -> Result<(usize, usize)> {
    let (rows, cols) = l.shape().dims2()?;
    if !cols.is_multiple_of(2) || !l.is_contiguous() {
        bail!("silu-mul needs contiguous [rows, 2 * f], got {:?}", l.shape());
    }
    Ok((rows, cols / 2))
}

impl CustomOp1 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(&self, gu: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, f) = halves(l)?;
        let gu = &gu.as_slice::<f32>()?[l.start_offset()..][..rows * 2 * f];
        let mut out = vec![0f32; rows * f];
        per_row(gu, 2 * f, &mut out, f, |row, out| {
            let (gate, up) = row.split_at(f);
            silu_mul_row(gate, up, out)
        });
        Ok((CpuStorage::F32(out), Shape::from((rows, f))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, gu: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        use super::cuda;
        use candle_core::cuda_backend::WrapErr;
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
        let (rows, f) = halves(l)?;
        let dev = gu.device.clone();
        let func = cuda::func(&dev, "silu_mul")?;
        let src = cuda::view::<f32>(gu, l, self.name())?;
        let n = rows * f;
        // SAFETY: the kernel writes all `n` elements.
        let out = unsafe { dev.alloc::<f32>(n) }?;
        let mut builder = func.builder();
        builder.arg(&out);
        builder.arg(&src);
        candle_core::builder_arg!(builder, f as u32, n as u32);
        // SAFETY: `n` elements out, `rows` rows of `2 * f` in.
        unsafe { builder.launch(cuda::per_element(n)) }.w()?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(out, dev), Shape::from((rows, f))))
    }
}

/// `silu(gate) * up` of one row; on a CPU with AVX2, eight lanes at a time
/// (`vexp::exp` is plain arithmetic, so the same loop vectorizes).
fn silu_mul_row(gate: &[f32], up: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { silu_mul_avx2(gate, up, out) };
    }
    silu_mul_portable(gate, up, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn silu_mul_avx2(gate: &[f32], up: &[f32], out: &mut [f32]) {
    silu_mul_portable(gate, up, out)
}

#[inline(always)]
fn silu_mul_portable(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for (o, (g, u)) in out.iter_mut().zip(gate.iter().zip(up)) {
        *o = g / (1.0 + vexp::exp(-g)) * u;
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32).map(|i| ((i.wrapping_mul(2654435761) ^ seed) % 2000) as f32 / 500.0 - 2.0).collect()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn add_rms_norm_equals_add_then_candle_rms_norm() {
        let t = |n, seed, shape: &[usize]| Tensor::from_vec(values(n, seed), shape, &Device::Cpu).unwrap();
        let (x, y, w) = (t(3 * 576, 1, &[3, 576]), t(3 * 576, 2, &[3, 576]), t(576, 3, &[576]));
        let out = x.apply_op3_no_bwd(&y, &w, &AddRmsNorm { eps: 1e-5 }).unwrap();
        let sum = (&x + &y).unwrap();
        assert!(max_diff(&out.get(0).unwrap(), &sum) == 0.0);
        let norm = candle_nn::ops::rms_norm(&sum, &w, 1e-5).unwrap();
        assert!(max_diff(&out.get(1).unwrap(), &norm) < 1e-5);
    }

    #[test]
    fn silu_mul_equals_candle_silu_times_up() {
        let gu = Tensor::from_vec(values(4 * 2 * 96, 7), (4, 192), &Device::Cpu).unwrap();
        let want = (gu.narrow(1, 0, 96).unwrap().silu().unwrap() * gu.narrow(1, 96, 96).unwrap()).unwrap();
        assert!(max_diff(&gu.apply_op1_no_bwd(&SiluMul).unwrap(), &want) < 1e-5);
    }
}
