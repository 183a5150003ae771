//! The AVX-512 VNNI kernel: tiles of 4 weight rows by up to 3 activation
//! rows, 64 multiply-adds per `vpdpbusd`.

use std::arch::x86_64::*;

use super::kernel::{for_each_tile, store};
use super::{Q4Step, Q8Step, WeightStep, XStep};

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
/// The CPU must support AVX-512F/BW/VNNI and F16C (`Kernel::Avx512.supported()`).
pub unsafe fn block<W: WeightStep>(w: &[W], rows: usize, steps: usize, x: &[XStep], n: usize, out: &mut [f32]) {
    for_each_tile(rows, n, 4, 3, |r, i, mw, mx| {
        let (wr, xr) = (&w[r * steps..(r + mw) * steps], &x[i * steps..(i + mx) * steps]);
        // SAFETY: the caller guarantees the CPU features.
        unsafe {
            match (mw, mx) {
                (4, 3) => store(tile::<W, 4, 3>(wr, xr, steps), out, rows, r, i),
                (4, 2) => store(tile::<W, 4, 2>(wr, xr, steps), out, rows, r, i),
                (4, _) => store(tile::<W, 4, 1>(wr, xr, steps), out, rows, r, i),
                (_, 3) => store(tile::<W, 1, 3>(wr, xr, steps), out, rows, r, i),
                (_, 2) => store(tile::<W, 1, 2>(wr, xr, steps), out, rows, r, i),
                _ => store(tile::<W, 1, 1>(wr, xr, steps), out, rows, r, i),
            }
        }
    });
}

/// Dot products of MW weight rows with MX activation rows:
/// `result[r][i] = w_row(r) · x_row(i)`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
unsafe fn tile<W: WeightStep, const MW: usize, const MX: usize>(w: &[W], x: &[XStep], steps: usize) -> [[f32; MX]; MW] {
    // Lanes 0-3 and 8-11 hold block a, 4-7 and 12-15 block b.
    let d_idx = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1);
    let m_idx = _mm512_add_epi32(d_idx, _mm512_set1_epi32(2));
    let zero = _mm512_setzero_si512();
    // Fetch the next tile's weights while this one runs (see the AVX2 kernel).
    let next = w.as_ptr().wrapping_add(MW * steps);
    let mut acc = [[_mm512_setzero_ps(); MX]; MW];
    for s in 0..steps {
        for r in 0..MW {
            _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(r * steps + s).cast());
        }
        let mut wq = [zero; MW];
        let mut wd = [_mm512_setzero_ps(); MW];
        let mut wm = [_mm512_setzero_ps(); MW];
        for r in 0..MW {
            let (q, dm) = unsafe { Load::load(&w[r * steps + s]) };
            let dm = _mm512_castps128_ps512(dm);
            wq[r] = q;
            wd[r] = _mm512_permutexvar_ps(d_idx, dm);
            wm[r] = _mm512_permutexvar_ps(m_idx, dm);
        }
        for i in 0..MX {
            let xs = &x[i * steps + s];
            let (xq, xd, xs8) = unsafe {
                (
                    _mm512_load_si512(xs.qs.as_ptr().cast()),
                    _mm512_load_ps(xs.d.as_ptr()),
                    _mm512_load_ps(xs.s8.as_ptr()),
                )
            };
            for r in 0..MW {
                let dot = _mm512_dpbusd_epi32(zero, wq[r], xq);
                let a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(wd[r], xd), acc[r][i]);
                acc[r][i] = _mm512_fmadd_ps(wm[r], xs8, a);
            }
        }
    }
    acc.map(|row| row.map(|a| _mm512_reduce_add_ps(a)))
}
