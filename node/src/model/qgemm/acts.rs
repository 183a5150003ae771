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
}

impl Default for XStep {
    fn default() -> Self {
        Self { qs: [0; 64], d: [0.0; 16] }
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
    /// Each block's `scale * sum(q)`, `[rows][sum_stride(steps)]`: every
    /// kernel applies the weights' minimums once per row from these.
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
/// On a CPU with AVX2 each block is quantized eight lanes at a time with
/// the same operations per element as the portable loop (max is exact;
/// `vcvtps2dq` rounds half to even like `round_ties_even`; clamping before
/// or after the conversion is the same on values this small), so the bytes
/// are identical either way. The portable loop took 13% of a 32-stream
/// decode step's matmul time (Zen 4), mostly in the scatter to lane order.
fn quantize_row(src: &[f32], row: &mut [XStep], sums: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { avx2::quantize_row(src, row, sums) };
    }
    quantize_row_portable(src, row, sums)
}

/// One block of `src` starting at `start`, zero past its end.
#[inline(always)]
fn block_at(src: &[f32], start: usize) -> [f32; BLOCK] {
    let mut block = [0f32; BLOCK];
    if start < src.len() {
        let end = (start + BLOCK).min(src.len());
        block[..end - start].copy_from_slice(&src[start..end]);
    }
    block
}

/// Writes a block's scale into its lanes and `scale * sum(q)` into `sums`.
#[inline(always)]
fn block_scales(step: &mut XStep, sums: &mut [f32], s: usize, half: usize, d: f32, sum: i32) {
    for lane in 0..16 {
        if (lane / 4) % 2 == half {
            step.d[lane] = d;
        }
    }
    sums[2 * s + half] = d * sum as f32;
}

fn quantize_row_portable(src: &[f32], row: &mut [XStep], sums: &mut [f32]) {
    for (s, step) in row.iter_mut().enumerate() {
        for half in 0..2 {
            let (d, q) = quantize_block(&block_at(src, s * STEP + half * BLOCK));
            let sum: i32 = q.iter().map(|&v| i32::from(v)).sum();
            for (j, &v) in q.iter().enumerate() {
                step.qs[lane_pos(half * BLOCK + j)] = v;
            }
            block_scales(step, sums, s, half, d, sum);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{BLOCK, STEP, XStep, block_at, block_scales};

    /// As `quantize_row_portable`.
    #[target_feature(enable = "avx2")]
    pub(super) fn quantize_row(src: &[f32], row: &mut [XStep], sums: &mut [f32]) {
        for (s, step) in row.iter_mut().enumerate() {
            for half in 0..2 {
                let block = block_at(src, s * STEP + half * BLOCK);
                let (d, q, sum) = quantize_block(&block);
                // Lane order (see `XStep`): the block's first 16 bytes at
                // 16 * half, its last 16 at 32 + 16 * half.
                let out = step.qs.as_mut_ptr();
                // SAFETY: both 16-byte stores lie within the 64 bytes of `qs`.
                unsafe {
                    _mm_storeu_si128(out.add(16 * half).cast(), _mm256_castsi256_si128(q));
                    _mm_storeu_si128(out.add(32 + 16 * half).cast(), _mm256_extracti128_si256::<1>(q));
                }
                block_scales(step, sums, s, half, d, sum);
            }
        }
    }

    /// A block's scale, its 32 bytes in order and their sum.
    #[target_feature(enable = "avx2")]
    fn quantize_block(x: &[f32; BLOCK]) -> (f32, __m256i, i32) {
        // SAFETY: four loads of eight within the block's 32 floats.
        let v = [0, 8, 16, 24].map(|i| unsafe { _mm256_loadu_ps(x.as_ptr().add(i)) });
        let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MAX));
        let abs = v.map(|v| _mm256_and_ps(v, abs_mask));
        let m = _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]));
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let d = amax / 127.0;
        let inv = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
        let (lo, hi) = (_mm256_set1_epi32(-127), _mm256_set1_epi32(127));
        let q = v.map(|v| _mm256_max_epi32(lo, _mm256_min_epi32(hi, _mm256_cvtps_epi32(_mm256_mul_ps(v, inv)))));
        let total = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let total = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256::<1>(total));
        let total = _mm_add_epi32(total, _mm_shuffle_epi32::<0b01_00_11_10>(total));
        let sum = _mm_cvtsi128_si32(_mm_add_epi32(total, _mm_shuffle_epi32::<0b10_11_00_01>(total)));
        // The packs interleave 128-bit lanes; the permute puts them back in order.
        let bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        (d, bytes, sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX2 quantizer writes the same bytes, scales and sums as the
    /// portable loop, on a ragged row with ties, zeros and a zero block.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_quantizes_like_the_portable_loop() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        let cols = 3 * STEP + 40;
        let mut x: Vec<f32> = (0..cols).map(|i| ((i * 7919) % 255) as f32 / 2.0 - 63.5).collect();
        x[STEP..STEP + BLOCK].fill(0.0);
        let steps = cols.div_ceil(STEP);
        let run = |f: fn(&[f32], &mut [XStep], &mut [f32])| {
            let (mut row, mut sums) = (vec![XStep::default(); steps], vec![0f32; sum_stride(steps)]);
            f(&x, &mut row, &mut sums);
            let bytes: Vec<(i8, u32)> =
                row.iter().flat_map(|s| (0..64).map(|i| (s.qs[i], s.d[i / 4].to_bits()))).collect();
            (bytes, sums.iter().map(|v| v.to_bits()).collect::<Vec<_>>())
        };
        // SAFETY (inside the closure's callee): the CPU has AVX2, checked above.
        let simd = run(|x, row, sums| unsafe { avx2::quantize_row(x, row, sums) });
        assert_eq!(simd, run(quantize_row_portable));
    }
}
