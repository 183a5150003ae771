//! Linear layers: the quantized CPU kernel of `qgemm`, or candle's
//! `QMatMul` on an accelerator.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Result, Tensor};

use super::qgemm::{Kernel, QMatrix};

pub enum Linear {
    Cpu(QMatrix),
    Device(QMatMul),
}

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
            let f32s: Vec<Tensor> = parts.iter().map(|p| p.dequantize(&Device::Cpu)).collect::<Result<_>>()?;
            let w = Tensor::cat(&f32s, 0)?;
            return Ok(Self::Device(QMatMul::from_qtensor(QTensor::quantize_onto(&w, GgmlDType::Q8_0, device)?)?));
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

    /// `x` is `[n, in]`; returns `[n, out]`. `kernel` multiplies on the CPU.
    pub fn forward(&self, x: &Tensor, kernel: Kernel) -> Result<Tensor> {
        match self {
            Self::Device(m) => m.forward(x),
            Self::Cpu(m) => {
                let n = x.dim(0)?;
                let out = m.matmul(kernel, &x.flatten_all()?.to_vec1::<f32>()?, n);
                Tensor::from_vec(out, (n, m.rows()), x.device())
            }
        }
    }
}
