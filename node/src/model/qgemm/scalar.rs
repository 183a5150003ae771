//! Portable fallback with the same arithmetic as the AVX-512 kernel, lane
//! by lane (results agree to rounding, not bit for bit). A weight step is
//! unpacked once and multiplied with every activation row.

use super::acts::sum_stride;
use super::out::Window;
use super::{WeightStep, XRows};

/// `out(i, r) = w_row(r) · x_row(i)` for a block of weight rows.
pub fn block<W: WeightStep>(w: &[W], rows: usize, steps: usize, x: XRows<'_>, n: usize, out: &mut Window<'_>) {
    let stride = sum_stride(steps);
    let mut acc = vec![[0f32; 16]; n];
    // Each activation row's weight-minimum terms: `m * scale * sum(q)` per block.
    let mut mins = vec![0f32; n];
    for r in 0..rows {
        acc.fill([0.0; 16]);
        mins.fill(0.0);
        for s in 0..steps {
            let ws = &w[r * steps + s];
            let (bytes, dm) = (ws.bytes(), ws.dm());
            for (i, (acc, min)) in acc.iter_mut().zip(mins.iter_mut()).enumerate() {
                let xs = &x.steps[i * steps + s];
                for (lane, a) in acc.iter_mut().enumerate() {
                    let weight = |k: usize| i32::from(bytes[4 * lane + k]) - i32::from(W::ZERO_POINT);
                    let dot: i32 = (0..4).map(|k| weight(k) * i32::from(xs.qs[4 * lane + k])).sum();
                    *a += dot as f32 * (dm[(lane / 4) % 2] * xs.d[lane]);
                }
                if W::HAS_MIN {
                    let sums = &x.sums[i * stride + 2 * s..][..2];
                    *min += dm[2] * sums[0] + dm[3] * sums[1];
                }
            }
        }
        for (i, (acc, min)) in acc.iter().zip(&mins).enumerate() {
            let dot = acc.iter().sum::<f32>();
            out.set(i, r, if W::HAS_MIN { dot + min } else { dot });
        }
    }
}
