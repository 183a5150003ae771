//! The AVX-512 VNNI kernel: tiles of 4 weight rows by up to 5 activation
//! rows, 64 multiply-adds per `vpdpbusd`.
//!
//! A step costs each (weight row, activation row) pair one `vpdpbusd`, one
//! convert and two float operations (block scales, accumulate); the weight
//! unpack and scale broadcast are shared by the tile's activation rows, so
//! taller tiles amortise them better. 4 × 5 keeps the twenty accumulators,
//! four weight registers and their scales within the 32 vector registers.
//! A weight minimum (Q4_1's `m`, Q8's `-128 d` offset of the unsigned
//! bytes) adds `m * d_x * sum(q_x)` per block: those terms are summed once
//! per tile from the minimums gathered on the way (as in the AVX2 kernel),
//! not with one more product per step and pair. Zen 4, 2 cores, `mesh-bench
//! qgemm` (3072 × 576 Q4_1): 4 × 3 tiles with the minimum in the step
//! loop 25.6 / 44.9 / 44.7 GMAC/s at 1 / 32 / 160 rows.

use std::arch::x86_64::*;

use super::acts::sum_stride;
use super::avx2::min_terms;
use super::kernel::{for_each_tile, store};
use super::{Q4Step, Q8Step, WeightStep, XRows};

/// Activation rows per tile.
pub const TILE_X: usize = 5;

/// How a weight step is loaded: 64 unsigned bytes in lane order, and
/// `[d_a, d_b, offset_a, offset_b]`.
pub trait Load {
    /// # Safety
    /// Only called from `tile`, which requires AVX-512F/BW/VNNI and F16C.
    unsafe fn load(&self) -> (__m512i, __m128);
}

impl Load for Q4Step {
    #[inline(always)]
    unsafe fn load(&self) -> (__m512i, __m128) {
        unsafe {
            let v = _mm256_loadu_si256(self.qs.as_ptr().cast());
            let mask = _mm256_set1_epi8(0x0f);
            let lo = _mm256_and_si256(v, mask);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask);
            (_mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi), scales(&self.dm))
        }
    }
}

impl Load for Q8Step {
    #[inline(always)]
    unsafe fn load(&self) -> (__m512i, __m128) {
        unsafe { (_mm512_loadu_si512(self.qs.as_ptr().cast()), scales(&self.dm)) }
    }
}

/// Four f16 scales widened to f32.
#[inline(always)]
unsafe fn scales(dm: &[half::f16; 4]) -> __m128 {
    unsafe { _mm_cvtph_ps(_mm_loadl_epi64(dm.as_ptr().cast())) }
}

/// `out[i * rows + r] = w_row(r) · x_row(i)` for a block of weight rows.
///
/// # Safety
/// The CPU must support AVX-512F/BW/VNNI, FMA and F16C (`Kernel::Avx512.supported()`).
pub unsafe fn block<W: WeightStep>(w: &[W], rows: usize, steps: usize, x: XRows<'_>, n: usize, out: &mut [f32]) {
    let stride = sum_stride(steps);
    // The current tile's weight minimums, gathered while its steps stream by.
    let mut mins = vec![0f32; 4 * stride];
    for_each_tile(rows, n, 4, TILE_X, |r, i, mw, mx| {
        let wr = &w[r * steps..(r + mw) * steps];
        let xr = XRows { steps: &x.steps[i * steps..(i + mx) * steps], sums: &x.sums[i * stride..(i + mx) * stride] };
        let m = &mut mins;
        // SAFETY: the caller guarantees the CPU features.
        unsafe {
            match (mw, mx) {
                (4, 5) => store(tile::<W, 4, 5>(wr, xr, steps, m), out, rows, r, i),
                (4, 4) => store(tile::<W, 4, 4>(wr, xr, steps, m), out, rows, r, i),
                (4, 3) => store(tile::<W, 4, 3>(wr, xr, steps, m), out, rows, r, i),
                (4, 2) => store(tile::<W, 4, 2>(wr, xr, steps, m), out, rows, r, i),
                (4, _) => store(tile::<W, 4, 1>(wr, xr, steps, m), out, rows, r, i),
                (_, 5) => store(tile::<W, 1, 5>(wr, xr, steps, m), out, rows, r, i),
                (_, 4) => store(tile::<W, 1, 4>(wr, xr, steps, m), out, rows, r, i),
                (_, 3) => store(tile::<W, 1, 3>(wr, xr, steps, m), out, rows, r, i),
                (_, 2) => store(tile::<W, 1, 2>(wr, xr, steps, m), out, rows, r, i),
                _ => store(tile::<W, 1, 1>(wr, xr, steps, m), out, rows, r, i),
            }
        }
    });
}

/// Dot products of MW weight rows with MX activation rows:
/// `result[r][i] = w_row(r) · x_row(i)`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma,f16c")]
unsafe fn tile<W: WeightStep, const MW: usize, const MX: usize>(
    w: &[W],
    x: XRows<'_>,
    steps: usize,
    mins: &mut [f32],
) -> [[f32; MX]; MW] {
    let stride = sum_stride(steps);
    // Lanes 0-3 and 8-11 hold block a, 4-7 and 12-15 block b.
    let d_idx = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1);
    let zero = _mm512_setzero_si512();
    // Fetch the next tile's weights while this one runs (see the AVX2 kernel).
    let next = w.as_ptr().wrapping_add(MW * steps);
    // The hot loop indexes through pointers (see the AVX2 kernel); these
    // asserts make every index below valid.
    assert!(w.len() >= MW * steps && x.steps.len() >= MX * steps && x.sums.len() >= MX * stride);
    assert!(mins.len() >= MW * stride && stride >= 2 * steps);
    let (wp, xp, mp) = (w.as_ptr(), x.steps.as_ptr(), mins.as_mut_ptr());
    let mut acc = [[_mm512_setzero_ps(); MX]; MW];
    for s in 0..steps {
        for r in 0..MW {
            _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(r * steps + s).cast());
        }
        let mut wq = [zero; MW];
        let mut wd = [_mm512_setzero_ps(); MW];
        for r in 0..MW {
            // SAFETY: r < MW, s < steps, 2 * s + 1 < stride (asserted above).
            let (q, dm) = unsafe { Load::load(&*wp.add(r * steps + s)) };
            unsafe { _mm_storeh_pd(mp.add(r * stride + 2 * s).cast(), _mm_castps_pd(dm)) };
            wq[r] = q;
            wd[r] = _mm512_permutexvar_ps(d_idx, _mm512_castps128_ps512(dm));
        }
        for i in 0..MX {
            // SAFETY: i < MX, s < steps (asserted above); XStep is 64-byte aligned.
            let (xq, xd) = unsafe {
                let xs = &*xp.add(i * steps + s);
                (_mm512_load_si512(xs.qs.as_ptr().cast()), _mm512_load_ps(xs.d.as_ptr()))
            };
            for (acc, (&wq, &wd)) in acc.iter_mut().zip(wq.iter().zip(&wd)) {
                let dot = _mm512_dpbusd_epi32(zero, wq, xq);
                acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(wd, xd), acc[i]);
            }
        }
    }
    let mut out = [[0f32; MX]; MW];
    for (r, out) in out.iter_mut().enumerate() {
        for (i, out) in out.iter_mut().enumerate() {
            let mins = &mins[r * stride..][..stride];
            *out = _mm512_reduce_add_ps(acc[r][i]) + min_terms(mins, &x.sums[i * stride..][..stride]);
        }
    }
    out
}
