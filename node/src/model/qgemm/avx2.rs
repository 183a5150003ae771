//! The AVX2 + FMA kernel, for x86-64 CPUs without AVX-512 VNNI (AMD Zen
//! 1-3, Intel Haswell to Comet Lake): tiles of 4 weight rows by up to 3
//! activation rows. The twelve accumulators stay in registers; activation
//! bytes are read from L1 as instruction operands rather than held in
//! registers (holding them spilled the accumulators: 4 × 2 tiles with
//! activations in registers ran at 31 GMAC/s where these run at 48, Zen 3,
//! `mesh-bench qgemm`, 32 rows).
//!
//! A step's 64 bytes are multiplied as two 32-byte halves: `vpmaddubsw`
//! (unsigned weight byte × signed activation byte, adjacent pairs summed to
//! i16), then `vpmaddwd` by ones (pairs summed to i32). Both halves hold
//! block a in i32 lanes 0-3 and block b in lanes 4-7, so they add up before
//! the block scales apply.
//!
//! `vpmaddubsw` saturates at ±32767, which shapes both encodings:
//! - Q4 nibbles (0..=15) times activations (-127..=127) stay far below it,
//!   even with both halves summed as i16 (4 × 15 × 127 = 7620).
//! - Q8 weights are stored `+128` (0..=255), where one pair could reach
//!   2 × 255 × 127 and saturate. They are multiplied signed instead, as
//!   |w| × (x with w's sign): at most 2 × 128 × 127 = 32512 per pair, and
//!   each half is widened to i32 before the two are added. The `-128`
//!   offset term then drops out.

use std::arch::x86_64::*;

use super::acts::sum_stride;
use super::kernel::{for_each_tile, store};
use super::{Q4Step, Q8Step, WeightStep, XRows};

/// How a weight step is loaded and multiplied.
pub trait Load {
    /// The step's bytes as the kernel multiplies them.
    type Bytes: Copy;
    /// Whether values carry a per-block minimum (`d * q + m`).
    const HAS_MIN: bool;

    /// # Safety
    /// Requires AVX2, FMA and F16C (only called from `tile`).
    unsafe fn load(&self) -> (Self::Bytes, __m128);

    /// Integer dot products per i32 lane of the step with activation halves.
    ///
    /// # Safety
    /// As `load`.
    unsafe fn dot(w: Self::Bytes, x_lo: __m256i, x_hi: __m256i) -> __m256i;
}

impl Load for Q4Step {
    type Bytes = [__m256i; 2];
    const HAS_MIN: bool = true;

    #[inline(always)]
    unsafe fn load(&self) -> ([__m256i; 2], __m128) {
        unsafe {
            let v = _mm256_loadu_si256(self.qs.as_ptr().cast());
            let mask = _mm256_set1_epi8(0x0f);
            let lo = _mm256_and_si256(v, mask);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask);
            ([lo, hi], scales(&self.dm))
        }
    }

    #[inline(always)]
    unsafe fn dot([lo, hi]: [__m256i; 2], x_lo: __m256i, x_hi: __m256i) -> __m256i {
        unsafe {
            let pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, x_lo), _mm256_maddubs_epi16(hi, x_hi));
            _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
        }
    }
}

impl Load for Q8Step {
    /// `[|w| lo, |w| hi, w lo, w hi]` with `w` the signed weight.
    type Bytes = [__m256i; 4];
    const HAS_MIN: bool = false;

    #[inline(always)]
    unsafe fn load(&self) -> ([__m256i; 4], __m128) {
        unsafe {
            let flip = _mm256_set1_epi8(i8::MIN);
            let lo = _mm256_xor_si256(_mm256_loadu_si256(self.qs.as_ptr().cast()), flip);
            let hi = _mm256_xor_si256(_mm256_loadu_si256(self.qs[32..].as_ptr().cast()), flip);
            ([_mm256_abs_epi8(lo), _mm256_abs_epi8(hi), lo, hi], scales(&self.dm))
        }
    }

    #[inline(always)]
    unsafe fn dot([abs_lo, abs_hi, lo, hi]: [__m256i; 4], x_lo: __m256i, x_hi: __m256i) -> __m256i {
        unsafe {
            let ones = _mm256_set1_epi16(1);
            let lo = _mm256_madd_epi16(_mm256_maddubs_epi16(abs_lo, _mm256_sign_epi8(x_lo, lo)), ones);
            let hi = _mm256_madd_epi16(_mm256_maddubs_epi16(abs_hi, _mm256_sign_epi8(x_hi, hi)), ones);
            _mm256_add_epi32(lo, hi)
        }
    }
}

/// Four f16 scales `[d_a, d_b, m_a, m_b]` widened to f32.
#[inline(always)]
unsafe fn scales(dm: &[half::f16; 4]) -> __m128 {
    unsafe { _mm_cvtph_ps(_mm_loadl_epi64(dm.as_ptr().cast())) }
}

/// `out[i * rows + r] = w_row(r) · x_row(i)` for a block of weight rows.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (`Kernel::Avx2.supported()`).
pub unsafe fn block<W: WeightStep>(w: &[W], rows: usize, steps: usize, x: XRows<'_>, n: usize, out: &mut [f32]) {
    let stride = sum_stride(steps);
    // The current tile's Q4_1 minimums, gathered while its steps stream by.
    let mut mins = vec![0f32; 4 * stride];
    for_each_tile(rows, n, 4, 3, |r, i, mw, mx| {
        let wr = &w[r * steps..(r + mw) * steps];
        let xr = XRows { steps: &x.steps[i * steps..(i + mx) * steps], sums: &x.sums[i * stride..(i + mx) * stride] };
        // SAFETY: the caller guarantees the CPU features.
        unsafe {
            match (mw, mx) {
                (4, 3) => store(tile::<W, 4, 3>(wr, xr, steps, &mut mins), out, rows, r, i),
                (4, 2) => store(tile::<W, 4, 2>(wr, xr, steps, &mut mins), out, rows, r, i),
                (4, _) => store(tile::<W, 4, 1>(wr, xr, steps, &mut mins), out, rows, r, i),
                (_, 3) => store(tile::<W, 1, 3>(wr, xr, steps, &mut mins), out, rows, r, i),
                (_, 2) => store(tile::<W, 1, 2>(wr, xr, steps, &mut mins), out, rows, r, i),
                _ => store(tile::<W, 1, 1>(wr, xr, steps, &mut mins), out, rows, r, i),
            }
        }
    });
}

/// Dot products of MW weight rows with MX activation rows:
/// `result[r][i] = w_row(r) · x_row(i)`.
///
/// Per step and row pair: the integer dot product, scaled by both blocks'
/// scales into the accumulator. A Q4_1 minimum `m` adds `m * d_x * sum(q_x)`
/// per block; those terms are summed once at the end, eight blocks per
/// instruction, from the minimums gathered into `mins` on the way.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile<W: WeightStep, const MW: usize, const MX: usize>(
    w: &[W],
    x: XRows<'_>,
    steps: usize,
    mins: &mut [f32],
) -> [[f32; MX]; MW] {
    let stride = sum_stride(steps);
    // An XStep's lanes 0-3 hold block a's scale, 4-7 block b's: the layout
    // of the summed halves.
    let d_idx = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    // The next tile's weights follow this one's in memory. A tile's rows are
    // short (a few hundred bytes), too short for the hardware prefetcher to
    // lock on before they end, so fetch the next tile while this one runs.
    let next = w.as_ptr().wrapping_add(MW * steps);
    // The hot loop indexes through pointers: slice bounds checks there cost
    // more than the arithmetic. These asserts make every index below valid.
    assert!(w.len() >= MW * steps && x.steps.len() >= MX * steps && x.sums.len() >= MX * stride);
    assert!(mins.len() >= MW * stride && stride >= 2 * steps);
    let (wp, xp, mp) = (w.as_ptr(), x.steps.as_ptr(), mins.as_mut_ptr());
    let mut acc = [[_mm256_setzero_ps(); MX]; MW];
    for s in 0..steps {
        for r in 0..MW {
            _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(r * steps + s).cast());
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: r < MW, s < steps, 2 * s + 1 < stride (asserted above).
            let (wq, dm) = unsafe { Load::load(&*wp.add(r * steps + s)) };
            if W::HAS_MIN {
                unsafe { _mm_storeh_pd(mp.add(r * stride + 2 * s).cast(), _mm_castps_pd(dm)) };
            }
            let wd = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(dm), d_idx);
            for (i, acc) in acc.iter_mut().enumerate() {
                let xd = unsafe { _mm256_load_ps((*xp.add(i * steps + s)).d.as_ptr()) };
                // SAFETY: i < MX, s < steps (asserted above); XStep is 64-byte aligned.
                let dot = unsafe {
                    let qs = (*xp.add(i * steps + s)).qs.as_ptr();
                    W::dot(wq, _mm256_load_si256(qs.cast()), _mm256_load_si256(qs.add(32).cast()))
                };
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(wd, xd), *acc);
            }
        }
    }
    let mut sums = [[0f32; MX]; MW];
    for (r, (sums, acc)) in sums.iter_mut().zip(&acc).enumerate() {
        for (i, (sum, &a)) in sums.iter_mut().zip(acc).enumerate() {
            let mut total = a;
            if W::HAS_MIN {
                for c in (0..stride).step_by(8) {
                    // SAFETY: both rows hold `stride` (a multiple of 8) entries.
                    let (m, xs) = unsafe {
                        (
                            _mm256_loadu_ps(mins[r * stride + c..].as_ptr()),
                            _mm256_loadu_ps(x.sums[i * stride + c..].as_ptr()),
                        )
                    };
                    total = _mm256_fmadd_ps(m, xs, total);
                }
            }
            *sum = hsum(total);
        }
    }
    sums
}

/// The sum of eight lanes, always in the same order.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}
