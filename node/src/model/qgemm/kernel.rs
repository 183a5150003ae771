//! Which kernel multiplies: the best one the running CPU supports, chosen
//! once when a model loads, or one forced for testing and benchmarking.
//!
//! Binaries are built for a portable baseline (x86-64-v2), so the SIMD
//! kernels are compiled with `#[target_feature]` and only called after
//! `is_x86_feature_detected!` said the CPU has them.

use super::out::Window;
use super::{WeightStep, XRows};

/// A matmul kernel path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Kernel {
    /// AVX-512 F/BW with VNNI (`vpdpbusd`) and F16C: Intel Ice Lake and later servers, AMD Zen 4 and later.
    Avx512,
    /// AVX2 with FMA and F16C: every x86-64-v3 CPU (AMD Zen 1-3, Intel Haswell and later).
    Avx2,
    /// Portable Rust, any CPU.
    Scalar,
}

impl Kernel {
    /// Every path, fastest first.
    pub const ALL: [Kernel; 3] = [Kernel::Avx512, Kernel::Avx2, Kernel::Scalar];

    /// The name used in flags, logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Avx512 => "avx512",
            Kernel::Avx2 => "avx2",
            Kernel::Scalar => "scalar",
        }
    }

    /// Whether the running CPU can execute this path.
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let f16c = is_x86_feature_detected!("f16c");
            match self {
                Kernel::Avx512 => {
                    f16c && is_x86_feature_detected!("fma")
                        && is_x86_feature_detected!("avx512f")
                        && is_x86_feature_detected!("avx512bw")
                        && is_x86_feature_detected!("avx512vnni")
                }
                Kernel::Avx2 => f16c && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
                Kernel::Scalar => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Kernel::Scalar
        }
    }

    /// The paths this CPU supports, fastest first.
    pub fn available() -> Vec<Kernel> {
        Self::ALL.into_iter().filter(|k| k.supported()).collect()
    }

    /// `kernels` by name, comma-separated (for logs and messages).
    pub fn names(kernels: &[Kernel]) -> String {
        kernels.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
    }

    /// `forced` if this CPU supports it, else the fastest supported path.
    pub fn choose(forced: Option<Kernel>) -> Result<Kernel, String> {
        match forced {
            Some(k) if k.supported() => Ok(k),
            Some(k) => Err(format!(
                "--kernel {} is not supported by this CPU (supported: {})",
                k.name(),
                Self::names(&Self::available())
            )),
            None => Ok(Self::available()[0]),
        }
    }

    /// `out(i, r) = w_row(r) · x_row(i)` for a block of weight rows.
    pub(super) fn block<W: WeightStep>(
        self,
        w: &[W],
        rows: usize,
        steps: usize,
        x: XRows<'_>,
        n: usize,
        out: &mut Window<'_>,
    ) {
        // A kernel the CPU lacks would execute illegal instructions.
        assert!(self.supported(), "kernel {self} is not supported by this CPU");
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: checked above.
            Kernel::Avx512 => unsafe { super::avx512::block(w, rows, steps, x, n, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: checked above.
            Kernel::Avx2 => unsafe { super::avx2::block(w, rows, steps, x, n, out) },
            _ => super::scalar::block(w, rows, steps, x, n, out),
        }
    }
}

impl std::fmt::Display for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Walks a block of `rows` weight rows by `n` activation rows in tiles of
/// at most `max_w × max_x`, calling `tile(r, i, mw, mx)` for each. A tile
/// shape only groups pairs: every kernel computes each (weight row,
/// activation row) pair by the same operations in any tile, which keeps
/// results bit-identical whatever the batch.
pub(super) fn for_each_tile(
    rows: usize,
    n: usize,
    max_w: usize,
    max_x: usize,
    mut tile: impl FnMut(usize, usize, usize, usize),
) {
    let mut r = 0;
    while r < rows {
        let mw = if rows - r >= max_w { max_w } else { 1 };
        let mut i = 0;
        while i < n {
            let mx = (n - i).min(max_x);
            tile(r, i, mw, mx);
            i += mx;
        }
        r += mw;
    }
}

/// Writes a tile's sums: `sums[dr][dx]` is weight row `r + dr` times
/// activation row `i + dx`.
pub(super) fn store<const MW: usize, const MX: usize>(sums: [[f32; MX]; MW], out: &mut Window<'_>, r: usize, i: usize) {
    for (dr, per_x) in sums.iter().enumerate() {
        for (dx, v) in per_x.iter().enumerate() {
            out.set(i + dx, r + dr, *v);
        }
    }
}
