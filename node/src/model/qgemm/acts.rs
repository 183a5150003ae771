//! Activations quantized to 8 bits per 32-element block, in the layouts the
//! kernels read.

use rayon::prelude::*;

use super::{BLOCK, STEP, lane_pos, quantize_block};

/// Two blocks of a quantized activation row. The 64 bytes are in the order
/// Q4 nibbles unpack to: a[0..16], b[0..16], a[16..32], b[16..32]; so lanes
/// (groups of 4 bytes) 0-3 and 8-11 belong to block a, 4-7 and 12-15 to b.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub struct XStep {
    pub(super) qs: [i8; 64],
    /// Each lane's block scale.
    pub(super) d: [f32; 16],
    /// Each lane's block `scale * sum(q) / 8` (a block spans eight lanes).
    pub(super) s8: [f32; 16],
}

impl Default for XStep {
    fn default() -> Self {
        Self { qs: [0; 64], d: [0.0; 16], s8: [0.0; 16] }
    }
}

/// Block sums per row are padded to a multiple of this (one AVX2 register).
const SUM_ALIGN: usize = 8;

/// Entries per row of `QActs::sums` for `steps` steps (zero-padded).
pub fn sum_stride(steps: usize) -> usize {
    (2 * steps).next_multiple_of(SUM_ALIGN)
}

/// Quantized activation rows.
pub struct QActs {
    pub(super) rows: usize,
    pub(super) steps: usize,
    data: Vec<XStep>,
    /// Each block's `scale * sum(q)`, `[rows][sum_stride(steps)]`: the
    /// AVX2 kernel applies Q4_1 minimums once per row pair from these.
    sums: Vec<f32>,
}

/// Some rows of `QActs`, as a kernel reads them.
#[derive(Clone, Copy)]
pub struct XRows<'a> {
    /// `[n][steps]`
    pub steps: &'a [XStep],
    /// `[n][sum_stride(steps)]`
    pub sums: &'a [f32],
}

impl QActs {
    /// `x` is `[rows, cols]` with `cols <= padded`; missing columns are zero.
    pub fn quantize(x: &[f32], rows: usize, padded: usize) -> Self {
        let cols = x.len() / rows.max(1);
        let steps = padded / STEP;
        let stride = sum_stride(steps);
        let mut data = vec![XStep::default(); rows * steps];
        let mut sums = vec![0f32; rows * stride];
        let each_row = |(r, (row, sums)): (usize, (&mut [XStep], &mut [f32]))| {
            quantize_row(&x[r * cols..(r + 1) * cols], row, sums);
        };
        let (step_chunk, sum_chunk) = (steps.max(1), stride.max(1));
        // One row (a decode step of one stream) is not worth waking threads.
        if rows > 1 {
            let rows = data.par_chunks_mut(step_chunk).zip(sums.par_chunks_mut(sum_chunk));
            rows.enumerate().for_each(each_row);
        } else {
            data.chunks_mut(step_chunk).zip(sums.chunks_mut(sum_chunk)).enumerate().for_each(each_row);
        }
        Self { rows, steps, data, sums }
    }

    /// Rows `i0..i1`.
    pub fn rows(&self, i0: usize, i1: usize) -> XRows<'_> {
        let stride = sum_stride(self.steps);
        XRows { steps: &self.data[i0 * self.steps..i1 * self.steps], sums: &self.sums[i0 * stride..i1 * stride] }
    }
}

/// Quantizes one activation row into its steps and block sums.
///
/// Built for x86-64-v2 the loops run 4 lanes wide; on a CPU with AVX2 the
/// same code runs compiled for it. Both perform the same operations per
/// element (max is exact, no FMA contraction), so the bytes are identical.
fn quantize_row(src: &[f32], row: &mut [XStep], sums: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { quantize_row_avx2(src, row, sums) };
    }
    quantize_row_portable(src, row, sums)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_row_avx2(src: &[f32], row: &mut [XStep], sums: &mut [f32]) {
    quantize_row_portable(src, row, sums)
}

#[inline(always)]
fn quantize_row_portable(src: &[f32], row: &mut [XStep], sums: &mut [f32]) {
    let cols = src.len();
    for (s, step) in row.iter_mut().enumerate() {
        for half in 0..2 {
            let start = s * STEP + half * BLOCK;
            let mut block = [0f32; BLOCK];
            if start < cols {
                let end = (start + BLOCK).min(cols);
                block[..end - start].copy_from_slice(&src[start..end]);
            }
            let (d, q) = quantize_block(&block);
            let sum: i32 = q.iter().map(|&v| i32::from(v)).sum();
            for (j, &v) in q.iter().enumerate() {
                step.qs[lane_pos(half * BLOCK + j)] = v;
            }
            for lane in 0..16 {
                if (lane / 4) % 2 == half {
                    step.d[lane] = d;
                    step.s8[lane] = d * sum as f32 / 8.0;
                }
            }
            sums[2 * s + half] = d * sum as f32;
        }
    }
}
