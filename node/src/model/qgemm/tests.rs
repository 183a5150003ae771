use super::*;

/// Plain f32 reference: `[n, rows]` of x · wᵀ.
fn reference(w: &[f32], rows: usize, cols: usize, x: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n * rows];
    for i in 0..n {
        for r in 0..rows {
            out[i * rows + r] = (0..cols).map(|k| w[r * cols + k] * x[i * cols + k]).sum();
        }
    }
    out
}

fn pseudo_random(len: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

/// Raw Q4_1 blocks of `w` (the GGUF layout), and the values they decode to.
fn to_q4_1(w: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let mut raw = Vec::new();
    let mut decoded = Vec::new();
    for blk in w.chunks(BLOCK) {
        let (min, max) = blk.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        let d = f16::from_f32((max - min) / 15.0);
        let m = f16::from_f32(min);
        let q: Vec<u8> = blk.iter().map(|v| (((v - m.to_f32()) / d.to_f32()).round().clamp(0.0, 15.0)) as u8).collect();
        raw.extend(d.to_le_bytes());
        raw.extend(m.to_le_bytes());
        raw.extend((0..16).map(|j| q[j] | (q[j + 16] << 4)));
        decoded.extend(q.iter().map(|&q| d.to_f32() * f32::from(q) + m.to_f32()));
    }
    (raw, decoded)
}

fn assert_close(got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "element {i}: got {g}, want {w}");
    }
}

#[test]
fn q4_1_weights_match_f32_reference() {
    let (rows, cols, n) = (13, 96, 5);
    let (raw, decoded) = to_q4_1(&pseudo_random(rows * cols, 1));
    let x = pseudo_random(n * cols, 2);
    let m = QMatrix::from_q4_1(&raw, rows, cols);
    for kernel in Kernel::available() {
        assert_close(&m.matmul(kernel, &x, n), &reference(&decoded, rows, cols, &x, n), 0.02);
    }
}

#[test]
fn q8_weights_from_f32_match_reference_with_ragged_width() {
    let (rows, cols, n) = (9, 70, 4);
    let w = pseudo_random(rows * cols, 3);
    let x = pseudo_random(n * cols, 4);
    let m = QMatrix::from_f32(&w, rows, cols);
    for kernel in Kernel::available() {
        assert_close(&m.matmul(kernel, &x, n), &reference(&w, rows, cols, &x, n), 0.02);
    }
}

/// Raw Q8_0 blocks whose values come from `q(row, block, j)`, and what they decode to.
fn q8_0_blocks(rows: usize, cols: usize, q: impl Fn(usize, usize, usize) -> i8) -> (Vec<u8>, Vec<f32>) {
    let mut raw = Vec::new();
    let mut decoded = Vec::new();
    for r in 0..rows {
        for b in 0..cols / BLOCK {
            let d = f16::from_f32(0.01 * (r + b + 1) as f32);
            raw.extend(d.to_le_bytes());
            for j in 0..BLOCK {
                let q = q(r, b, j);
                raw.push(q as u8);
                decoded.push(d.to_f32() * f32::from(q));
            }
        }
    }
    (raw, decoded)
}

#[test]
fn q8_0_raw_blocks_are_used_exactly() {
    let (rows, cols) = (3, 64);
    let (raw, decoded) = q8_0_blocks(rows, cols, |r, b, j| (j as i32 * 7 - 100 + (r * 2 + b) as i32) as i8);
    let x = pseudo_random(2 * cols, 5);
    let m = QMatrix::from_q8_0(&raw, rows, cols);
    for kernel in Kernel::available() {
        assert_close(&m.matmul(kernel, &x, 2), &reference(&decoded, rows, cols, &x, 2), 0.02);
    }
}

/// Extreme weights (-128, 127) against full-scale activations of either
/// sign: the products a 16-bit pair sum could saturate on.
#[test]
fn q8_extremes_do_not_saturate() {
    let (rows, cols) = (4, 128);
    let (raw, decoded) = q8_0_blocks(rows, cols, |r, _, j| if (r + j / 2) % 2 == 0 { i8::MIN } else { i8::MAX });
    let x: Vec<f32> = (0..2 * cols).map(|k| if (k / 2) % 3 == 0 { 1.0 } else { -1.0 }).collect();
    let m = QMatrix::from_q8_0(&raw, rows, cols);
    for kernel in Kernel::available() {
        assert_close(&m.matmul(kernel, &x, 2), &reference(&decoded, rows, cols, &x, 2), 1e-3);
    }
}

#[test]
fn rows_are_bit_identical_alone_and_in_any_batch() {
    // More rows than one pass over the activations, and ragged tiles.
    let (rows, cols, n) = (70, 128, X_ROWS_PER_PASS + 7);
    let (raw, _) = to_q4_1(&pseudo_random(rows * cols, 6));
    let q8 = QMatrix::from_f32(&pseudo_random(rows * cols, 10), rows, cols);
    let x = pseudo_random(n * cols, 7);
    for m in [QMatrix::from_q4_1(&raw, rows, cols), q8] {
        for kernel in Kernel::available() {
            let batch = m.matmul(kernel, &x, n);
            for i in 0..n {
                let alone = m.matmul(kernel, &x[i * cols..(i + 1) * cols], 1);
                assert_eq!(alone, batch[i * rows..(i + 1) * rows], "{kernel}: row {i}");
            }
        }
    }
}

#[test]
fn every_kernel_agrees_with_scalar() {
    let (rows, cols, n) = (8, 128, 5);
    let (raw, _) = to_q4_1(&pseudo_random(rows * cols, 8));
    let x = pseudo_random(n * cols, 9);
    for m in [QMatrix::from_q4_1(&raw, rows, cols), QMatrix::from_f32(&pseudo_random(rows * cols, 11), rows, cols)] {
        let plain = m.matmul(Kernel::Scalar, &x, n);
        for kernel in Kernel::available() {
            assert_close(&m.matmul(kernel, &x, n), &plain, 1e-5);
        }
    }
}

#[test]
fn a_forced_kernel_the_cpu_lacks_is_refused_by_name() {
    assert_eq!(Kernel::choose(None), Ok(Kernel::available()[0]));
    assert_eq!(Kernel::choose(Some(Kernel::Scalar)), Ok(Kernel::Scalar));
    for k in Kernel::ALL.into_iter().filter(|k| !k.supported()) {
        let err = Kernel::choose(Some(k)).unwrap_err();
        assert!(err.contains(k.name()) && err.contains("not supported"), "{err}");
    }
}
