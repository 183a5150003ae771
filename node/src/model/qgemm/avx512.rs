//! The AVX-512 VNNI kernel: tiles of 4 weight rows by up to 8 activation
//! rows, 64 multiply-adds per `vpdpbusd`.
//!
//! Per step and activation row, the four rows' integer dot products are
//! folded into one register (see `tile`), so the float work (convert,
//! block scales, accumulate) is done once for four weight rows; the weight
//! unpack and scale layout are shared by the tile's activation rows. A
//! Q4_1 minimum `m` adds `m * d_x * sum(q_x)` per block: those terms are
//! summed once per tile from the minimums gathered on the way (as in the
//! AVX2 kernel), not with one more product per step and pair. Q8's zero
//! point (bytes stored `+128`) is taken off in integers instead: each
//! activation row's `vpdpbusd` start from `-128 * sum(x)` per lane, one
//! more `vpdpbusd` per step shared by the four weight rows. Zen 4, 2 cores, `mesh-bench
//! qgemm` (3072 × 576 Q4_1), alternating runs, best of 40: unfolded 4 × 3
//! and 4 × 5 tiles both 80-82 GMAC/s at 32 rows and 85 at 160; folded
//! 4 × 8 92-95 and 99.

use std::arch::x86_64::*;

use super::acts::sum_stride;
use super::avx2::min_terms;
use super::kernel::{for_each_tile, store};
use super::out::Window;
use super::{Q4Step, Q8Step, WeightStep, XRows};

/// Activation rows per tile.
pub const TILE_X: usize = 8;

/// How a weight step is loaded: 64 unsigned bytes in lane order, and
/// `[d_a, d_b, m_a, m_b]` (Q8: `[d_a, d_b, 0, 0]`).
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

/// `out(i, r) = w_row(r) · x_row(i)` for a block of weight rows.
///
/// # Safety
/// The CPU must support AVX-512F/BW/VNNI, FMA and F16C (`Kernel::Avx512.supported()`).
pub unsafe fn block<W: WeightStep>(w: &[W], rows: usize, steps: usize, x: XRows<'_>, n: usize, out: &mut Window<'_>) {
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
                (4, 8) => store(tile::<W, 8>(wr, xr, steps, m), out, r, i),
                (4, 7) => store(tile::<W, 7>(wr, xr, steps, m), out, r, i),
                (4, 6) => store(tile::<W, 6>(wr, xr, steps, m), out, r, i),
                (4, 5) => store(tile::<W, 5>(wr, xr, steps, m), out, r, i),
                (4, 4) => store(tile::<W, 4>(wr, xr, steps, m), out, r, i),
                (4, 3) => store(tile::<W, 3>(wr, xr, steps, m), out, r, i),
                (4, 2) => store(tile::<W, 2>(wr, xr, steps, m), out, r, i),
                (4, _) => store(tile::<W, 1>(wr, xr, steps, m), out, r, i),
                // A last row short of four runs as four copies of itself.
                (_, _) => {
                    for di in 0..mx {
                        let one =
                            XRows { steps: &xr.steps[di * steps..][..steps], sums: &xr.sums[di * stride..][..stride] };
                        store([[tile::<W, 1>(wr, one, steps, m)[0][0]]], out, r, i + di);
                    }
                }
            }
        }
    });
}

/// Dot products of 4 weight rows (or one, as four copies) with MX
/// activation rows: `result[r][i] = w_row(r) · x_row(i)`.
///
/// The four rows' `vpdpbusd` results are folded into one register before
/// any float work (integer adds, exact): 128-bit lane `k` of the folded
/// vector holds the four rows' partial sums of block a (k = 0, 2) or b
/// (k = 1, 3). One convert, one scale product and one FMA per activation
/// row and step then serve four weight rows, where they took one each.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma,f16c")]
unsafe fn tile<W: WeightStep, const MX: usize>(
    w: &[W],
    x: XRows<'_>,
    steps: usize,
    mins: &mut [f32],
) -> [[f32; MX]; 4] {
    let stride = sum_stride(steps);
    let given = w.len() / steps.max(1);
    let rows: [usize; 4] = std::array::from_fn(|j| j.min(given.max(1) - 1));
    let zero = _mm512_setzero_si512();
    // Fetch the next tile's weights while this one runs (see the AVX2 kernel).
    let next = w.as_ptr().wrapping_add(given * steps);
    // The hot loop indexes through pointers (see the AVX2 kernel); these
    // asserts make every index below valid.
    assert!((given == 4 || given == 1) && x.steps.len() >= MX * steps && x.sums.len() >= MX * stride);
    assert!(mins.len() >= 4 * stride && stride >= 2 * steps);
    let (wp, xp, mp) = (w.as_ptr(), x.steps.as_ptr(), mins.as_mut_ptr());
    let mut acc = [_mm512_setzero_ps(); MX];
    for s in 0..steps {
        for r in 0..given {
            _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(r * steps + s).cast());
        }
        // A loop, not `rows.map(..)`: LLVM kept that closure (called four
        // times, with the Q4 unpack in it) out of line, each row's 64 bytes
        // returned through memory: 13% of a 32-row decode profile.
        let (mut q, mut dm) = ([zero; 4], [_mm_setzero_ps(); 4]);
        for j in 0..4 {
            // SAFETY: rows < given, s < steps, 2 * s + 1 < stride (asserted above).
            unsafe {
                (q[j], dm[j]) = Load::load(&*wp.add(rows[j] * steps + s));
                if W::HAS_MIN {
                    _mm_storeh_pd(mp.add(rows[j] * stride + 2 * s).cast(), _mm_castps_pd(dm[j]));
                }
            }
        }
        let wd = folded_scales(dm);
        for (i, acc) in acc.iter_mut().enumerate() {
            // SAFETY: i < MX, s < steps (asserted above); XStep is 64-byte aligned.
            let (xq, xd) = unsafe {
                let xs = &*xp.add(i * steps + s);
                (_mm512_load_si512(xs.qs.as_ptr().cast()), _mm512_load_ps(xs.d.as_ptr()))
            };
            // `-ZERO_POINT * sum(x)` per lane: the same for every weight row.
            let base = match W::ZERO_POINT {
                0 => zero,
                z => _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, _mm512_set1_epi8(z as i8), xq)),
            };
            let d = [
                _mm512_dpbusd_epi32(base, q[0], xq),
                _mm512_dpbusd_epi32(base, q[1], xq),
                _mm512_dpbusd_epi32(base, q[2], xq),
                _mm512_dpbusd_epi32(base, q[3], xq),
            ];
            let a = _mm512_add_epi32(_mm512_unpacklo_epi32(d[0], d[1]), _mm512_unpackhi_epi32(d[0], d[1]));
            let b = _mm512_add_epi32(_mm512_unpacklo_epi32(d[2], d[3]), _mm512_unpackhi_epi32(d[2], d[3]));
            let folded = _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(folded), _mm512_mul_ps(wd, xd), *acc);
        }
    }
    let mut out = [[0f32; MX]; 4];
    for (i, &acc) in acc.iter().enumerate() {
        let mut lanes = [0f32; 16];
        // SAFETY: `lanes` holds sixteen f32.
        unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), acc) };
        for (j, out) in out.iter_mut().enumerate() {
            let total = (lanes[j] + lanes[4 + j]) + (lanes[8 + j] + lanes[12 + j]);
            out[i] = match W::HAS_MIN {
                true => total + min_terms(&mins[rows[j] * stride..][..stride], &x.sums[i * stride..][..stride]),
                false => total,
            };
        }
    }
    out
}

/// The four rows' block scales in the folded layout: `[d_a(r0..4),
/// d_b(r0..4)]` twice, from each row's `[d_a, d_b, m_a, m_b]`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,fma,f16c")]
fn folded_scales(dm: [__m128; 4]) -> __m512 {
    let (t01, t23) = (_mm_unpacklo_ps(dm[0], dm[1]), _mm_unpacklo_ps(dm[2], dm[3]));
    let (da, db) = (_mm_movelh_ps(t01, t23), _mm_movehl_ps(t23, t01));
    let both = _mm256_insertf128_ps::<1>(_mm256_castps128_ps256(da), db);
    _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(both)))
}
