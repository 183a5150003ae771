//! The yardsticks: candle's own `quantized_llama` decoding one stream, and
//! the machine's f32 GEMM rate.
//!
//! candle's quantized CPU kernels pick their SIMD code at compile time, so
//! the upstream figure depends on how this binary was built: the portable
//! build (x86-64-v2) runs candle's scalar code. The fair yardstick is
//! candle at its fastest on this CPU, a `target-cpu=native` build;
//! `scripts/bench-node.sh` builds one and passes it as `--upstream-bin`,
//! whose `upstream` subcommand this module also implements.

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use candle_transformers::models::quantized_llama::ModelWeights;
use node::text::{GgufText, SpecialTokens, TextCodec};

use super::{ModelArgs, PROMPT};

/// `mesh-bench upstream`: prints the single-stream rate and the SIMD level
/// candle was compiled for, as one JSON line.
pub fn run(args: ModelArgs) -> anyhow::Result<()> {
    let rate = tokens_per_sec(&args.model, args.tokens)?;
    println!("{}", serde_json::json!({ "tokens_per_sec": rate, "built_for": built_for() }));
    Ok(())
}

/// The widest SIMD this binary's candle code was compiled for.
pub fn built_for() -> &'static str {
    if cfg!(target_feature = "avx512f") {
        "avx512"
    } else if cfg!(target_feature = "avx2") {
        "avx2"
    } else {
        "baseline"
    }
}

/// The upstream figure of another build: runs `bin upstream` and reads its line.
pub fn from_binary(bin: &Path, model: &Path, tokens: usize) -> anyhow::Result<(f64, String)> {
    let out = std::process::Command::new(bin)
        .args(["upstream", "--tokens", &tokens.to_string(), "--model"])
        .arg(model)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "{} upstream failed: {}",
        bin.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let rate = line["tokens_per_sec"].as_f64().ok_or_else(|| anyhow::anyhow!("no tokens_per_sec in {line}"))?;
    Ok((rate, line["built_for"].as_str().unwrap_or("?").to_string()))
}

/// Single-stream greedy decode of candle's own `quantized_llama` on the
/// file: the fastest of `SINGLE_RUNS`.
pub fn tokens_per_sec(path: &Path, tokens: usize) -> anyhow::Result<f64> {
    let device = Device::Cpu;
    let mut file = std::fs::File::open(path)?;
    let content = gguf_file::Content::read(&mut file)?;
    let codec = GgufText::from_metadata(&content.metadata)?;
    let mut model = ModelWeights::from_gguf(content, &mut file, &device)?;
    let prompt = codec.encode(PROMPT, SpecialTokens::AsText)?;
    let mut best = 0f64;
    for _ in 0..super::SINGLE_RUNS {
        // Position 0 starts the model's caches afresh.
        let mut sampler = LogitsProcessor::from_sampling(0, Sampling::ArgMax);
        let logits = model.forward(&Tensor::new(prompt.as_slice(), &device)?.unsqueeze(0)?, 0)?;
        let mut next = sampler.sample(&logits.squeeze(0)?)?;
        let start = Instant::now();
        for i in 0..tokens {
            let input = Tensor::new(&[next], &device)?.unsqueeze(0)?;
            let logits = model.forward(&input, prompt.len() + i)?;
            next = sampler.sample(&logits.squeeze(0)?)?;
        }
        best = best.max(tokens as f64 / start.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// Multiply-accumulates per second of a large square f32 GEMM: what this
/// machine's cores reach when the matmul is not memory-bound (candle's
/// GEMM dispatches on the running CPU, so the build does not matter).
pub fn peak_gemm_macs() -> anyhow::Result<f64> {
    let device = Device::Cpu;
    let n = 1024;
    let a = Tensor::randn(0f32, 1.0, (n, n), &device)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), &device)?;
    a.matmul(&b)?; // warm-up
    let reps = 5;
    let start = Instant::now();
    for _ in 0..reps {
        a.matmul(&b)?;
    }
    let secs = start.elapsed().max(Duration::from_nanos(1)).as_secs_f64();
    Ok((reps * n * n * n) as f64 / secs)
}
