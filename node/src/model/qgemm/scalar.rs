//! Portable fallback with the same arithmetic as the AVX-512 kernel, lane
//! by lane (results agree to rounding, not bit for bit). A weight step is
//! unpacked once and multiplied with every activation row.

use super::{WeightStep, XStep};

/// `out[i * rows + r] = w_row(r) · x_row(i)` for a block of weight rows.
pub fn block<W: WeightStep>(w: &[W], rows: usize, steps: usize, x: &[XStep], n: usize, out: &mut [f32]) {
    let mut acc = vec![[0f32; 16]; n];
    for r in 0..rows {
        acc.fill([0.0; 16]);
        for s in 0..steps {
            let ws = &w[r * steps + s];
            let (bytes, dm) = (ws.bytes(), ws.dm());
            for (i, acc) in acc.iter_mut().enumerate() {
                let xs = &x[i * steps + s];
                for (lane, a) in acc.iter_mut().enumerate() {
                    let dot: i32 =
                        (0..4).map(|k| i32::from(bytes[4 * lane + k]) * i32::from(xs.qs[4 * lane + k])).sum();
                    let block = (lane / 4) % 2;
                    *a += dot as f32 * (dm[block] * xs.d[lane]);
                    *a += dm[2 + block] * xs.s8[lane];
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            out[i * rows + r] = acc.iter().sum();
        }
    }
}
