//! Quantized matrix multiplication for the CPU: 4- and 8-bit weights times
//! 8-bit activations, integer dot products per 32-element block, with a
//! kernel per CPU family chosen at run time (`Kernel`).
//!
//! Why not candle's `QMatMul`: its CPU kernels compute one activation row at
//! a time, so a batch of 32 costs 32 single rows, and its Q4_1 path has no
//! SIMD. Here a tile of weight rows is unpacked once and multiplied with
//! several activation rows (AVX-512 VNNI `vpdpbusd`, or AVX2
//! `vpmaddubsw`), and Q4_1 weights stay packed, so a decode step reads about
//! a quarter of the bytes f32 weights would.
//!
//! Every (activation row, weight row) pair is computed by the same sequence
//! of operations whatever the batch size or tile shape, so a sequence's
//! logits are bit-identical alone and inside any batch.

mod acts;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod kernel;
mod out;
mod scalar;

pub use acts::QActs;
use acts::XRows;
pub use kernel::Kernel;
use out::Product;

use half::f16;
use rayon::prelude::*;

/// Elements per quantization block, and blocks per kernel step.
pub const BLOCK: usize = 32;
const STEP: usize = 2 * BLOCK;

/// Two Q4_1 blocks: 32 bytes of nibbles (block a, then block b), their
/// scales and their minimums. Element `i < 16` of a block is the low nibble
/// of byte `i`, element `i + 16` the high nibble. 40 bytes per 64 weights,
/// as compact as the file's own blocks.
#[derive(Clone, Copy, Default)]
#[repr(C, align(8))]
pub struct Q4Step {
    qs: [u8; 32],
    /// `[d_a, d_b, m_a, m_b]`: value = d * q + m.
    dm: [f16; 4],
}

/// Two 8-bit blocks stored `+128` as unsigned bytes (the zero point,
/// `WeightStep::ZERO_POINT`), in the lane order of the kernel (see
/// `XStep`), with their scales.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
pub struct Q8Step {
    qs: [u8; 64],
    /// `[d_a, d_b, 0, 0]`: value = d * (u - 128), no minimum.
    dm: [f16; 4],
}

impl Default for Q8Step {
    fn default() -> Self {
        Self { qs: [128; 64], dm: [f16::ZERO; 4] }
    }
}

/// Position in the kernel's lane order of element `i` (0..64) of a step,
/// where elements 0..32 are block a and 32..64 block b.
fn lane_pos(i: usize) -> usize {
    let (block, j) = (i / BLOCK, i % BLOCK);
    (j / 16) * 32 + block * 16 + j % 16
}

/// A weight matrix `[rows, cols]` in the kernel's layout.
pub enum QMatrix {
    Q4 { rows: usize, steps: usize, data: Vec<Q4Step> },
    Q8 { rows: usize, steps: usize, data: Vec<Q8Step> },
}

impl QMatrix {
    /// From raw GGUF Q4_1 blocks (20 bytes: f16 d, f16 m, 16 bytes of nibbles).
    pub fn from_q4_1(raw: &[u8], rows: usize, cols: usize) -> Self {
        let blocks = cols / BLOCK;
        let steps = blocks.div_ceil(2);
        let mut data = vec![Q4Step::default(); rows * steps];
        for r in 0..rows {
            for b in 0..blocks {
                let blk = &raw[(r * blocks + b) * 20..][..20];
                let step = &mut data[r * steps + b / 2];
                let half = b % 2;
                step.dm[half] = f16::from_le_bytes([blk[0], blk[1]]);
                step.dm[2 + half] = f16::from_le_bytes([blk[2], blk[3]]);
                step.qs[half * 16..half * 16 + 16].copy_from_slice(&blk[4..20]);
            }
        }
        Self::Q4 { rows, steps, data }
    }

    /// From raw GGUF Q8_0 blocks (34 bytes: f16 d, 32 signed bytes), kept exact.
    pub fn from_q8_0(raw: &[u8], rows: usize, cols: usize) -> Self {
        let blocks = cols / BLOCK;
        Self::from_q8_blocks(rows, blocks, |r, b| {
            let blk = &raw[(r * blocks + b) * 34..][..34];
            let mut q = [0i8; BLOCK];
            q.iter_mut().zip(&blk[2..]).for_each(|(q, &v)| *q = v as i8);
            (f16::from_le_bytes([blk[0], blk[1]]), q)
        })
    }

    /// From f32 weights, quantized to 8 bits per 32-element block.
    pub fn from_f32(w: &[f32], rows: usize, cols: usize) -> Self {
        let blocks = cols.div_ceil(BLOCK);
        Self::from_q8_blocks(rows, blocks, |r, b| {
            let mut x = [0f32; BLOCK];
            let src = &w[r * cols..(r + 1) * cols];
            let end = ((b + 1) * BLOCK).min(cols);
            x[..end - b * BLOCK].copy_from_slice(&src[b * BLOCK..end]);
            let (d, _) = quantize_block(&x);
            // Quantize against the scale as stored, so the two agree.
            let d = f16::from_f32(d);
            (d, quantize_with(&x, d.to_f32()))
        })
    }

    fn from_q8_blocks(rows: usize, blocks: usize, block: impl Fn(usize, usize) -> (f16, [i8; BLOCK])) -> Self {
        let steps = blocks.div_ceil(2);
        let mut data = vec![Q8Step::default(); rows * steps];
        for r in 0..rows {
            for b in 0..blocks {
                let (d, q) = block(r, b);
                let step = &mut data[r * steps + b / 2];
                let half = b % 2;
                step.dm[half] = d;
                for (j, &v) in q.iter().enumerate() {
                    step.qs[lane_pos(half * BLOCK + j)] = (i16::from(v) + 128) as u8;
                }
            }
        }
        Self::Q8 { rows, steps, data }
    }

    pub fn rows(&self) -> usize {
        match self {
            Self::Q4 { rows, .. } | Self::Q8 { rows, .. } => *rows,
        }
    }

    /// Input width rounded up to whole steps.
    pub fn padded_cols(&self) -> usize {
        match self {
            Self::Q4 { steps, .. } | Self::Q8 { steps, .. } => steps * STEP,
        }
    }

    /// `x` is `[n, cols]` row-major; returns `[n, rows]`.
    pub fn matmul(&self, kernel: Kernel, x: &[f32], n: usize) -> Vec<f32> {
        let acts = QActs::quantize(x, n, self.padded_cols());
        match self {
            Self::Q4 { rows, steps, data } => run(kernel, data, *rows, *steps, &acts),
            Self::Q8 { rows, steps, data } => run(kernel, data, *rows, *steps, &acts),
        }
    }
}

/// The loads each SIMD kernel needs of a weight step.
#[cfg(target_arch = "x86_64")]
pub trait SimdLoad: avx512::Load + avx2::Load {}
#[cfg(target_arch = "x86_64")]
impl<T: avx512::Load + avx2::Load> SimdLoad for T {}
#[cfg(not(target_arch = "x86_64"))]
pub trait SimdLoad {}
#[cfg(not(target_arch = "x86_64"))]
impl<T> SimdLoad for T {}

/// One weight step type the kernels understand.
pub trait WeightStep: Sync + Copy + SimdLoad {
    /// What the unsigned bytes store for a zero weight: kernels take
    /// `ZERO_POINT * sum(x)` off the integer dot products (exact).
    const ZERO_POINT: u8;
    /// Whether values carry a per-block minimum (`d * q + m`), added
    /// as `m * scale * sum(q_x)` from the activations' block sums.
    const HAS_MIN: bool;
    /// The 64 unsigned weight bytes in lane order (scalar path).
    fn bytes(&self) -> [u8; 64];
    fn dm(&self) -> [f32; 4];
}

impl WeightStep for Q4Step {
    const ZERO_POINT: u8 = 0;
    const HAS_MIN: bool = true;
    fn bytes(&self) -> [u8; 64] {
        let mut out = [0u8; 64];
        for (i, &b) in self.qs.iter().enumerate() {
            out[i] = b & 0x0f;
            out[32 + i] = b >> 4;
        }
        out
    }
    fn dm(&self) -> [f32; 4] {
        self.dm.map(f16::to_f32)
    }
}

impl WeightStep for Q8Step {
    const ZERO_POINT: u8 = 128;
    const HAS_MIN: bool = false;
    fn bytes(&self) -> [u8; 64] {
        self.qs
    }
    fn dm(&self) -> [f32; 4] {
        self.dm.map(f16::to_f32)
    }
}

/// Symmetric 8-bit quantization of one block: `x ≈ d * q`, `q` in -127..=127.
#[inline(always)]
fn quantize_block(x: &[f32; BLOCK]) -> (f32, [i8; BLOCK]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    (d, quantize_with(x, d))
}

#[inline(always)]
fn quantize_with(x: &[f32; BLOCK], d: f32) -> [i8; BLOCK] {
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut q = [0i8; BLOCK];
    q.iter_mut().zip(x).for_each(|(q, v)| *q = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8);
    q
}

/// Fewest weight rows per parallel task (a multiple of the kernels' 4-row
/// tile), for a matrix with few rows.
const MIN_ROWS_PER_TASK: usize = 64;

/// Row tasks per thread a matrix is split into at most: enough for an
/// even split, few enough that scheduling stays small against the work.
/// With 64-row tasks throughout, a one-row decode step (768 tasks for the
/// output layer) ran no faster on two threads than on one (Zen 4).
const TASKS_PER_THREAD: usize = 8;

/// Weight rows per task for a matrix of `rows` rows.
fn rows_per_task(rows: usize) -> usize {
    let even = rows.div_ceil(TASKS_PER_THREAD * rayon::current_num_threads()).next_multiple_of(4);
    even.max(MIN_ROWS_PER_TASK)
}

/// Activation rows multiplied with a task's weight rows at a time (a
/// multiple of every kernel's tile height): a prefill chunk's rows stay in
/// L2 while each 4-row weight tile passes over them.
const X_ROWS_PER_PASS: usize = 24;

fn run<W: WeightStep>(kernel: Kernel, w: &[W], rows: usize, steps: usize, x: &QActs) -> Vec<f32> {
    assert_eq!(steps, x.steps, "activation width does not match the weights");
    let n = x.rows;
    // One task per (weight rows, activation pass): a prefill chunk splits
    // into many even tasks even where a matrix has few rows.
    let passes = n.div_ceil(X_ROWS_PER_PASS).max(1);
    let per_task = rows_per_task(rows);
    let mut out = vec![0f32; n * rows];
    let product = Product::new(&mut out, rows, n);
    (0..rows.div_ceil(per_task) * passes).into_par_iter().for_each(|t| {
        let (r0, i0) = ((t / passes) * per_task, (t % passes) * X_ROWS_PER_PASS);
        let (r1, i1) = ((r0 + per_task).min(rows), (i0 + X_ROWS_PER_PASS).min(n));
        // SAFETY: each task `t` has its own (weight rows, activation rows)
        // pair of ranges, so no two windows overlap.
        let mut window = unsafe { product.window((i0, i1), (r0, r1)) };
        kernel.block(&w[r0 * steps..r1 * steps], r1 - r0, steps, x.rows(i0, i1), i1 - i0, &mut window);
    });
    out
}

#[cfg(test)]
mod tests;
