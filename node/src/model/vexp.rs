//! `exp` in plain arithmetic, so that loops over many values vectorize.
//!
//! The std `f32::exp` is a libm call per element: a decode step of 32
//! streams takes about two million of them (SwiGLU's sigmoid, attention's
//! softmax), a few milliseconds of a 70 ms step (Zen 4). This is Cephes'
//! `expf` (range reduction by ln 2 in two parts, a degree-6 polynomial,
//! the power of two from the exponent bits): within 2 ulp of libm over
//! the range the model uses, and the same for a value wherever it sits in
//! a batch.

/// `e^x`; inputs are clamped to where the result is a normal f32 (below
/// -87.3 it is 1.2e-38 rather than 0 or a subnormal).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 88.3);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_2e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // n is in -126..=127 after the clamp: a normal power of two.
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    #[test]
    fn agrees_with_libm_within_two_ulp() {
        let mut worst = 0f32;
        for i in -870_000..=880_000 {
            let x = i as f32 / 10_000.0;
            let (got, want) = (super::exp(x), x.exp());
            worst = worst.max((got - want).abs() / (want * f32::EPSILON));
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert!(super::exp(f32::NEG_INFINITY) < 1.3e-38 && super::exp(0.0) == 1.0);
        assert!(super::exp(f32::NAN).is_nan());
    }
}
