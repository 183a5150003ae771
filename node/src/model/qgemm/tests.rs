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
    let got = QMatrix::from_q4_1(&raw, rows, cols).matmul(&x, n);
    assert_close(&got, &reference(&decoded, rows, cols, &x, n), 0.02);
}

#[test]
fn q8_weights_from_f32_match_reference_with_ragged_width() {
    let (rows, cols, n) = (9, 70, 4);
    let w = pseudo_random(rows * cols, 3);
    let x = pseudo_random(n * cols, 4);
    let got = QMatrix::from_f32(&w, rows, cols).matmul(&x, n);
    assert_close(&got, &reference(&w, rows, cols, &x, n), 0.02);
}

#[test]
fn q8_0_raw_blocks_are_used_exactly() {
    let (rows, cols) = (3, 64);
    let mut raw = Vec::new();
    let mut decoded = Vec::new();
    for r in 0..rows * cols / BLOCK {
        let d = f16::from_f32(0.01 * (r + 1) as f32);
        raw.extend(d.to_le_bytes());
        for j in 0..BLOCK {
            let q = (j as i32 * 7 - 100 + r as i32) as i8;
            raw.push(q as u8);
            decoded.push(d.to_f32() * f32::from(q));
        }
    }
    let x = pseudo_random(2 * cols, 5);
    let got = QMatrix::from_q8_0(&raw, rows, cols).matmul(&x, 2);
    assert_close(&got, &reference(&decoded, rows, cols, &x, 2), 0.02);
}

#[test]
fn rows_are_bit_identical_alone_and_in_any_batch() {
    let (rows, cols) = (70, 128);
    let (raw, _) = to_q4_1(&pseudo_random(rows * cols, 6));
    let m = QMatrix::from_q4_1(&raw, rows, cols);
    let x = pseudo_random(7 * cols, 7);
    let batch = m.matmul(&x, 7);
    for i in 0..7 {
        let alone = m.matmul(&x[i * cols..(i + 1) * cols], 1);
        assert_eq!(alone, batch[i * rows..(i + 1) * rows], "row {i}");
    }
}

#[test]
fn simd_and_scalar_kernels_agree() {
    if !avx512::available() {
        return; // nothing to compare on this CPU: the scalar path is the only one
    }
    let (rows, cols, n) = (8, 128, 5);
    let (raw, _) = to_q4_1(&pseudo_random(rows * cols, 8));
    let QMatrix::Q4 { steps, data, .. } = QMatrix::from_q4_1(&raw, rows, cols) else { unreachable!() };
    let x = QActs::quantize(&pseudo_random(n * cols, 9), n, steps * STEP);
    let (mut simd, mut plain) = (vec![0f32; n * rows], vec![0f32; n * rows]);
    avx512::block(&data, rows, steps, &x.data, n, &mut simd);
    scalar::block(&data, rows, steps, &x.data, n, &mut plain);
    assert_close(&simd, &plain, 1e-5);
}
