//! Linear layers: the quantized CPU kernel of `qgemm`, or candle's
//! `QMatMul` on an accelerator.
//!
//! On a GPU a step of up to 8 rows multiplies the file's quantized weights
//! (candle's matrix-vector kernels: decode is memory-bound, and 4-bit
//! weights are a quarter of the bytes). Larger steps multiply an f16 copy
//! of the weights with cuBLAS: candle's quantized matrix-matrix kernels
//! (stream-k MMQ) are slow at this model's shapes. Profiled on an H200 at
//! 256 rows, one layer's four multiplications took 75 µs each, most of it
//! in the stream-k fix-up, three quarters of the whole step.

use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Module, Result, Tensor};

use super::qgemm::{Kernel, QMatrix};

pub enum Linear {
    Cpu(QMatrix),
    Device {
        /// The file's quantization, for steps of up to `VECTOR_ROWS` rows.
        quantized: QMatMul,
        /// An f16 copy, for larger steps.
        half: QMatMul,
    },
}

/// Rows up to which the quantized weights are multiplied on a device
/// (candle's matrix-vector kernels take up to 8, with a workspace of their
/// own).
pub const VECTOR_ROWS: usize = 8;

impl Linear {
    /// One layer from weights `[out_i, in]` stacked along the output
    /// dimension (q, k and v become one matmul; so do gate and up).
    pub fn load(parts: Vec<QTensor>, device: &Device) -> Result<Self> {
        let dims: Vec<(usize, usize)> = parts.iter().map(|p| p.shape().dims2()).collect::<Result<_>>()?;
        let cols = dims[0].1;
        if dims.iter().any(|d| d.1 != cols) {
            candle_core::bail!("stacked weights differ in input width: {dims:?}");
        }
        if !device.is_cpu() {
            let weights = on_device(&parts, device)?;
            let half = QMatMul::TensorF16(weights.dequantize_f16(device)?);
            return Ok(Self::Device { quantized: QMatMul::from_qtensor(weights)?, half });
        }
        let rows: usize = dims.iter().map(|d| d.0).sum();
        let same = |t: GgmlDType| parts.iter().all(|p| p.dtype() == t);
        let raw = || -> Result<Vec<u8>> {
            let mut all = Vec::new();
            for p in &parts {
                all.extend_from_slice(&p.data()?);
            }
            Ok(all)
        };
        Ok(Self::Cpu(if same(GgmlDType::Q4_1) && cols.is_multiple_of(32) {
            QMatrix::from_q4_1(&raw()?, rows, cols)
        } else if same(GgmlDType::Q8_0) && cols.is_multiple_of(32) {
            QMatrix::from_q8_0(&raw()?, rows, cols)
        } else {
            let mut w = Vec::with_capacity(rows * cols);
            for p in &parts {
                w.extend(p.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?);
            }
            QMatrix::from_f32(&w, rows, cols)
        }))
    }

    /// The weights' format on the device ("q4_1", "f32"); `None` on the CPU.
    pub fn device_format(&self) -> Option<String> {
        let name = match self {
            Self::Device { quantized: QMatMul::QTensor(t), .. } => format!("{:?}", t.dtype()),
            Self::Device { quantized: QMatMul::Tensor(t) | QMatMul::TensorF16(t), .. } => format!("{:?}", t.dtype()),
            Self::Cpu(_) => return None,
        };
        Some(name.to_lowercase())
    }

    /// `x` is `[n, in]`; returns `[n, out]`. `kernel` multiplies on the CPU.
    pub fn forward(&self, x: &Tensor, kernel: Kernel) -> Result<Tensor> {
        match self {
            Self::Device { quantized, .. } if x.dim(0)? <= VECTOR_ROWS => quantized.forward(x),
            Self::Device { half, .. } => half.forward(x),
            Self::Cpu(m) => {
                let n = x.dim(0)?;
                let out = m.matmul(kernel, &x.flatten_all()?.to_vec1::<f32>()?, n);
                Tensor::from_vec(out, (n, m.rows()), x.device())
            }
        }
    }
}

/// Stacked weights on an accelerator in the file's own quantization, which
/// candle's CUDA kernels multiply directly (every GGML block format); parts
/// of mixed formats are re-quantized to Q8_0 together.
fn on_device(parts: &[QTensor], device: &Device) -> Result<QTensor> {
    let dtype = parts[0].dtype();
    let rows: usize = parts.iter().map(|p| p.shape().dims2().map(|d| d.0)).sum::<Result<usize>>()?;
    let cols = parts[0].shape().dims2()?.1;
    if parts.iter().all(|p| p.dtype() == dtype) {
        let mut raw = Vec::new();
        for p in parts {
            raw.extend_from_slice(&p.data()?);
        }
        return QTensor::new(QStorage::from_data(Cow::Owned(raw), device, dtype)?, (rows, cols));
    }
    let f32s: Vec<Tensor> = parts.iter().map(|p| p.dequantize(&Device::Cpu)).collect::<Result<_>>()?;
    tracing::info!(?dtype, "weights of mixed formats re-quantized to q8_0 for the device");
    QTensor::quantize_onto(&Tensor::cat(&f32s, 0)?, GgmlDType::Q8_0, device)
}
