//! The AVX2 + FMA kernel, for x86-64 CPUs without AVX-512 VNNI (AMD Zen
//! 1-3, Intel Haswell to Comet Lake): tiles of 2 pairs of weight rows by up
//! to 3 activation rows (Q4_1; one pair for Q8, whose weights take twice
//! the registers). A pair's two dot products share one accumulator (see
//! `tile`): six accumulators instead of twelve, which halves the register
//! spills to the stack per step among AVX2's sixteen registers; activation
//! bytes are read from L1 as instruction operands. With one accumulator per
//! row (4 × 3 tiles) the median of 4 alternating runs was 44 GMAC/s at 32
//! rows and 43 at 160; with pairs 48 and 48 (Zen 3, 2 cores, `mesh-bench
//! qgemm`).
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
use super::out::Window;
use super::{Q4Step, Q8Step, WeightStep, XRows};

/// How a weight step is loaded and multiplied.
pub trait Load {
    /// The step's bytes as the kernel multiplies them.
    type Bytes: Copy;
    /// Row pairs per tile: as many as leave the accumulators in registers
    /// next to the pairs' weights (`Bytes`) among AVX2's sixteen.
    const PAIRS: usize;

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
    const PAIRS: usize = 2;

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
    const PAIRS: usize = 1;

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

/// `out(i, r) = w_row(r) · x_row(i)` for a block of weight rows.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C (`Kernel::Avx2.supported()`).
pub unsafe fn block<W: WeightStep>(w: &[W], rows: usize, steps: usize, x: XRows<'_>, n: usize, out: &mut Window<'_>) {
    let stride = sum_stride(steps);
    // The current tile's Q4_1 minimums, gathered while its steps stream by.
    let mut mins = vec![0f32; 4 * stride];
    for_each_tile(rows, n, 2 * W::PAIRS, 3, |r, i, mw, mx| {
        let wr = &w[r * steps..(r + mw) * steps];
        let xr = XRows { steps: &x.steps[i * steps..(i + mx) * steps], sums: &x.sums[i * stride..(i + mx) * stride] };
        // SAFETY: the caller guarantees the CPU features.
        unsafe {
            match (mw, mx) {
                (4, 3) => pairs(tile::<W, 2, 3>(wr, xr, steps, &mut mins), out, r, i),
                (4, 2) => pairs(tile::<W, 2, 2>(wr, xr, steps, &mut mins), out, r, i),
                (4, _) => pairs(tile::<W, 2, 1>(wr, xr, steps, &mut mins), out, r, i),
                (2, 3) => pairs(tile::<W, 1, 3>(wr, xr, steps, &mut mins), out, r, i),
                (2, 2) => pairs(tile::<W, 1, 2>(wr, xr, steps, &mut mins), out, r, i),
                (2, _) => pairs(tile::<W, 1, 1>(wr, xr, steps, &mut mins), out, r, i),
                // A last odd row runs as a pair with itself; the copy is dropped.
                (_, 3) => store([tile::<W, 1, 3>(wr, xr, steps, &mut mins)[0][0]], out, r, i),
                (_, 2) => store([tile::<W, 1, 2>(wr, xr, steps, &mut mins)[0][0]], out, r, i),
                _ => store([tile::<W, 1, 1>(wr, xr, steps, &mut mins)[0][0]], out, r, i),
            }
        }
    });
}

/// Writes a tile's row pairs, the first at weight row `r`.
fn pairs<const P: usize, const MX: usize>(sums: [[[f32; MX]; 2]; P], out: &mut Window<'_>, r: usize, i: usize) {
    for (p, pair) in sums.into_iter().enumerate() {
        store(pair, out, r + 2 * p, i);
    }
}

/// Dot products of `P` pairs of weight rows with `MX` activation rows:
/// `result[r][i] = w_row(r) · x_row(i)`. Given one row (an odd last row),
/// it pairs that row with itself.
///
/// Per step, a row pair's two integer dot products are folded into one
/// register (`vphaddd`: lanes 0-1 hold the first row's block a, 2-3 the
/// second row's, 4-7 the same for block b), so one convert, one scale
/// product and one FMA serve two rows, and a tile of 2 × 2 rows by 3 keeps
/// its six accumulators in registers (twelve, one per row, spilled to the
/// stack on every step). A Q4_1 minimum `m` adds `m * d_x * sum(q_x)` per
/// block; those terms are summed once at the end, eight blocks per
/// instruction, from the minimums gathered into `mins` on the way.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile<W: WeightStep, const P: usize, const MX: usize>(
    w: &[W],
    x: XRows<'_>,
    steps: usize,
    mins: &mut [f32],
) -> [[[f32; MX]; 2]; P] {
    let stride = sum_stride(steps);
    // `[d_a(r0), d_a(r0), d_a(r1), d_a(r1), d_b(r0), ...]` from the two rows'
    // `[d_a, d_b, m_a, m_b]` interleaved: the layout of the folded products.
    let pair_idx = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
    let given = w.len() / steps.max(1);
    // The next tile's weights follow this one's in memory. A tile's rows are
    // short (a few hundred bytes), too short for the hardware prefetcher to
    // lock on before they end, so fetch the next tile while this one runs.
    let next = w.as_ptr().wrapping_add(given * steps);
    // The hot loop indexes through pointers: slice bounds checks there cost
    // more than the arithmetic. These asserts make every index below valid.
    assert!((given == 2 * P || (P == 1 && given == 1)) && x.steps.len() >= MX * steps);
    assert!(x.sums.len() >= MX * stride && mins.len() >= 2 * P * stride && stride >= 2 * steps);
    let (wp, xp, mp) = (w.as_ptr(), x.steps.as_ptr(), mins.as_mut_ptr());
    let mut acc = [[_mm256_setzero_ps(); MX]; P];
    for s in 0..steps {
        for r in 0..given {
            _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(r * steps + s).cast());
        }
        for (p, acc) in acc.iter_mut().enumerate() {
            let rows = [2 * p, (2 * p + 1).min(given - 1)];
            // Two calls, not `rows.map(..)`, which LLVM may keep out of
            // line (as it did the AVX-512 kernel's).
            // SAFETY: rows < given, s < steps, 2 * s + 1 < stride (asserted above).
            let (w0, dm0) = unsafe { Load::load(&*wp.add(rows[0] * steps + s)) };
            let (w1, dm1) = unsafe { Load::load(&*wp.add(rows[1] * steps + s)) };
            if W::HAS_MIN {
                for (r, dm) in [(2 * p, dm0), (2 * p + 1, dm1)] {
                    unsafe { _mm_storeh_pd(mp.add(r * stride + 2 * s).cast(), _mm_castps_pd(dm)) };
                }
            }
            let wd = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_unpacklo_ps(dm0, dm1)), pair_idx);
            for (i, acc) in acc.iter_mut().enumerate() {
                // SAFETY: i < MX, s < steps (asserted above); XStep is 64-byte aligned.
                let (xd, dot) = unsafe {
                    let step = &*xp.add(i * steps + s);
                    let (lo, hi) =
                        (_mm256_load_si256(step.qs.as_ptr().cast()), _mm256_load_si256(step.qs[32..].as_ptr().cast()));
                    (_mm256_load_ps(step.d.as_ptr()), _mm256_hadd_epi32(W::dot(w0, lo, hi), W::dot(w1, lo, hi)))
                };
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(wd, xd), *acc);
            }
        }
    }
    reduce::<W, P, MX>(&acc, mins, x.sums, stride)
}

/// Each row's total from its pair's accumulator (lanes 0-1 and 4-5 the
/// first row's, 2-3 and 6-7 the second's, summed in the same order for
/// either), plus its Q4_1 minimum terms.
#[target_feature(enable = "avx2,fma,f16c")]
fn reduce<W: WeightStep, const P: usize, const MX: usize>(
    acc: &[[__m256; MX]; P],
    mins: &[f32],
    sums: &[f32],
    stride: usize,
) -> [[[f32; MX]; 2]; P] {
    let mut out = [[[0f32; MX]; 2]; P];
    for (p, (out, acc)) in out.iter_mut().zip(acc).enumerate() {
        for (i, &acc) in acc.iter().enumerate() {
            let mut lanes = [0f32; 8];
            // SAFETY: `lanes` holds eight f32.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
            for (half, out) in out.iter_mut().enumerate() {
                let l = &lanes[2 * half..];
                let mut total = (l[0] + l[1]) + (l[4] + l[5]);
                if W::HAS_MIN {
                    total += min_terms(&mins[(2 * p + half) * stride..][..stride], &sums[i * stride..][..stride]);
                }
                out[i] = total;
            }
        }
    }
    out
}

/// `sum(m * s)` over one weight row's minimums and one activation row's
/// block sums, eight blocks per instruction (the AVX-512 kernel's too).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn min_terms(mins: &[f32], sums: &[f32]) -> f32 {
    let mut total = _mm256_setzero_ps();
    for (m, s) in mins.chunks_exact(8).zip(sums.chunks_exact(8)) {
        // SAFETY: both chunks hold eight f32.
        total = unsafe { _mm256_fmadd_ps(_mm256_loadu_ps(m.as_ptr()), _mm256_loadu_ps(s.as_ptr()), total) };
    }
    hsum(total)
}
/// The sum of eight lanes, always in the same order.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}
