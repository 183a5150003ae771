//! `mesh-bench qgemm`: the matmul kernels alone on a model-sized Q4_1
//! matrix, best of several repetitions (robust to a noisy machine).

use std::time::Instant;

use half::f16;
use node::model::qgemm::{Kernel, QMatrix};

#[derive(clap::Args)]
pub struct Args {
    /// Weight rows and columns (default: SmolLM2-135M's fused gate/up).
    #[arg(long, default_value_t = 3072)]
    rows: usize,
    #[arg(long, default_value_t = 576)]
    cols: usize,
    /// Activation rows to time (decode batches and prefill chunks).
    #[arg(long, value_delimiter = ',', default_value = "1,32,160")]
    batches: Vec<usize>,
    /// Repetitions per figure; the fastest counts.
    #[arg(long, default_value_t = 30)]
    reps: usize,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.cols.is_multiple_of(32), "--cols must be a multiple of 32");
    let m = QMatrix::from_q4_1(&q4_1_blocks(args.rows * args.cols / 32), args.rows, args.cols);
    for kernel in Kernel::available() {
        for &n in &args.batches {
            let x: Vec<f32> = (0..n * args.cols).map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0).collect();
            let best = (0..args.reps.max(1))
                .map(|_| {
                    let start = Instant::now();
                    std::hint::black_box(m.matmul(kernel, &x, n));
                    start.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min);
            let macs = (args.rows * args.cols * n) as f64;
            println!("{kernel:>6}, {n:>4} rows: {:8.3} ms, {:6.1} GMAC/s", best * 1e3, macs / best / 1e9);
        }
    }
    Ok(())
}

/// `count` GGUF Q4_1 blocks of pseudo-random nibbles and scales.
fn q4_1_blocks(count: usize) -> Vec<u8> {
    let mut raw = Vec::with_capacity(count * 20);
    for b in 0..count {
        raw.extend(f16::from_f32(0.01 + (b % 7) as f32 * 1e-3).to_le_bytes());
        raw.extend(f16::from_f32(-0.08).to_le_bytes());
        raw.extend((0..16).map(|j| ((b * 31 + j * 17) % 256) as u8));
    }
    raw
}
