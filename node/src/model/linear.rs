//! A linear layer kept in two forms, because neither is fastest at every batch.
//!
//! On this kind of CPU, candle's Q8_0 kernel costs the same per row whatever
//! the batch (it is a vector-dot per row), while the f32 GEMM path is slower
//! for one row but amortises weight loads across rows and wins from a few
//! rows up. A decode step of one stream takes the Q8_0 path; a batched step
//! or a prefill chunk takes the GEMM path.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Result, Tensor};

/// Rows below which the Q8_0 kernel is used; measured by `mesh-bench node`.
pub const DEFAULT_Q8_MAX_ROWS: usize = 4;

pub struct DualLinear {
    /// The weight transposed to `[in, out]`, contiguous, for `x @ w_t`.
    w_t: Tensor,
    q8: QMatMul,
    q8_max_rows: usize,
}

impl DualLinear {
    /// `weight` is `[out, in]` in f32, as dequantized from the file.
    pub fn new(weight: &Tensor, device: &Device, q8_max_rows: usize) -> Result<Self> {
        let q8 = QMatMul::from_qtensor(QTensor::quantize_onto(weight, GgmlDType::Q8_0, device)?)?;
        let w_t = weight.t()?.contiguous()?.to_device(device)?;
        Ok(Self { w_t, q8, q8_max_rows })
    }

    /// `x` is `[rows, in]`; returns `[rows, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.dim(0)? < self.q8_max_rows { self.q8.forward(x) } else { x.matmul(&self.w_t) }
    }

    /// Multiply-accumulates per input row.
    pub fn macs_per_row(&self) -> usize {
        self.w_t.elem_count()
    }
}
