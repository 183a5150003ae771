//! The node benchmark: single-stream and batched decode through the real
//! engine (scheduler + batched forward), TTFT under load, and the upstream
//! single-stream figure, all in one run so the ratios compare like with like.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};
use candle_transformers::models::quantized_llama::ModelWeights;
use node::backend::GgufBackend;
use node::model::LlamaModel;
use node::scheduler::{Limits, Request, Scheduler};
use node::text::{GgufText, TextCodec};

#[derive(clap::Args)]
pub struct Args {
    /// GGUF model file.
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    /// Tokens each stream decodes.
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// 128-token prompts timed while 31 streams decode (0 skips the TTFT run).
    #[arg(long, default_value_t = 20)]
    ttft_samples: usize,
    /// Skip the upstream run (for profiling the node alone; no ratios then).
    #[arg(long)]
    skip_upstream: bool,
    /// Batched runs to measure besides the single stream.
    #[arg(long, value_delimiter = ',', default_value = "8,32")]
    batches: Vec<usize>,
}

const PROMPT: &str = "The history of the printing press begins in the fifteenth century, when";

pub async fn run(args: Args) -> anyhow::Result<()> {
    let device = Device::Cpu;
    let upstream = match args.skip_upstream {
        true => f64::NAN,
        false => upstream_tokens_per_sec(&args.model, args.tokens)?,
    };
    println!("upstream quantized_llama, 1 stream: {upstream:.1} tokens/s");

    let (model, content) = LlamaModel::load(&args.model, &device)?;
    let codec: Arc<dyn TextCodec> = Arc::new(GgufText::from_metadata(&content.metadata)?);
    let macs_per_token = model.macs_per_token() as f64;
    let limits = Limits {
        max_running: 32,
        max_queued: 64,
        max_kv_tokens: 1 << 20,
        max_step_tokens: 256,
        context_length: model.config().context_length,
    };
    let metrics = node::metrics::NodeMetrics::new("bench");
    let scheduler = Scheduler::start(limits, Box::new(GgufBackend::new(Arc::new(model))), codec.clone(), metrics);
    let prompt = codec.encode(PROMPT)?;

    let single = decode_rate(&scheduler, &prompt, 1, args.tokens).await?;
    println!("node, 1 stream: {single:.1} tokens/s  ({:.2}x upstream, target >= 3x)", single / upstream);
    for &streams in &args.batches {
        let rate = decode_rate(&scheduler, &prompt, streams, args.tokens).await?;
        println!(
            "node, {streams} streams: {rate:.1} tokens/s aggregate  ({:.2}x upstream{})",
            rate / upstream,
            if streams == 32 { ", target >= 16x" } else { "" }
        );
        if streams == 32 {
            let peak = peak_gemm_macs(&device)?;
            println!(
                "matmul rate at 32 streams: {:.1} GMAC/s; machine f32 GEMM peak (1024^3): {:.1} GMAC/s ({:.0}%)",
                rate * macs_per_token / 1e9,
                peak / 1e9,
                100.0 * rate * macs_per_token / peak
            );
        }
    }
    if args.ttft_samples > 0 {
        let (p50, p99) = ttft_under_load(&scheduler, &codec, args.ttft_samples).await?;
        println!("TTFT of a 128-token prompt while 31 streams decode: p50 {p50:.1} ms, p99 {p99:.1} ms");
    }
    Ok(())
}

fn greedy(prompt: &[u32], max_tokens: usize) -> Request {
    Request {
        prompt: prompt.to_vec(),
        continued: 0,
        max_tokens,
        sampling: Sampling::ArgMax,
        seed: 0,
        stop: vec![],
        priority: 1,
        span: tracing::Span::none(),
    }
}

/// Aggregate decode tokens/s of `streams` concurrent greedy streams, counted
/// from the moment every stream has its first token.
async fn decode_rate(scheduler: &Scheduler, prompt: &[u32], streams: usize, tokens: usize) -> anyhow::Result<f64> {
    let mut rxs = Vec::new();
    for _ in 0..streams {
        rxs.push(scheduler.submit(greedy(prompt, tokens)).map_err(|e| anyhow::anyhow!("{e}"))?.0);
    }
    let mut stamps: Vec<Vec<Instant>> = vec![Vec::new(); streams];
    let tasks: Vec<_> = rxs
        .into_iter()
        .map(|mut rx| {
            tokio::spawn(async move {
                let mut times = Vec::new();
                while let Some(msg) = rx.recv().await {
                    if !msg?.token_ids.is_empty() {
                        times.push(Instant::now());
                    }
                }
                Ok::<_, tonic::Status>(times)
            })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        stamps[i] = t.await??;
    }
    let start = stamps.iter().filter_map(|s| s.first()).max().copied().unwrap_or_else(Instant::now);
    let end = stamps.iter().filter_map(|s| s.last()).max().copied().unwrap_or(start);
    let counted: usize = stamps.iter().map(|s| s.iter().filter(|t| **t > start).count()).sum();
    Ok(counted as f64 / end.duration_since(start).as_secs_f64().max(1e-9))
}

/// Time to first token of 128-token prompts, one at a time, while 31
/// streams keep decoding. Returns (p50, p99) in milliseconds.
async fn ttft_under_load(
    scheduler: &Scheduler,
    codec: &Arc<dyn TextCodec>,
    samples: usize,
) -> anyhow::Result<(f64, f64)> {
    let background = codec.encode(PROMPT)?;
    let long: Vec<u32> = (0..128).map(|i| background[i % background.len()]).collect();
    let mut keep = Vec::new();
    for _ in 0..31 {
        let (mut rx, _) = scheduler.submit(greedy(&background, 4000)).map_err(|e| anyhow::anyhow!("{e}"))?;
        rx.recv().await; // decoding has started
        keep.push(rx);
    }
    let mut ttft = Vec::new();
    for _ in 0..samples {
        let start = Instant::now();
        let (mut rx, _) = scheduler.submit(greedy(&long, 1)).map_err(|e| anyhow::anyhow!("{e}"))?;
        rx.recv().await;
        ttft.push(start.elapsed().as_secs_f64() * 1e3);
        while rx.recv().await.is_some() {}
    }
    drop(keep);
    ttft.sort_by(f64::total_cmp);
    let pct = |p: f64| ttft[((ttft.len() as f64 * p).ceil() as usize).clamp(1, ttft.len()) - 1];
    Ok((pct(0.5), pct(0.99)))
}

/// Single-stream greedy decode of candle's own `quantized_llama` on the file.
fn upstream_tokens_per_sec(path: &PathBuf, tokens: usize) -> anyhow::Result<f64> {
    let device = Device::Cpu;
    let mut file = std::fs::File::open(path)?;
    let content = gguf_file::Content::read(&mut file)?;
    let codec = GgufText::from_metadata(&content.metadata)?;
    let mut model = ModelWeights::from_gguf(content, &mut file, &device)?;
    let prompt = codec.encode(PROMPT)?;
    let mut sampler = LogitsProcessor::from_sampling(0, Sampling::ArgMax);
    let logits = model.forward(&Tensor::new(prompt.as_slice(), &device)?.unsqueeze(0)?, 0)?;
    let mut next = sampler.sample(&logits.squeeze(0)?)?;
    let start = Instant::now();
    for i in 0..tokens {
        let input = Tensor::new(&[next], &device)?.unsqueeze(0)?;
        let logits = model.forward(&input, prompt.len() + i)?;
        next = sampler.sample(&logits.squeeze(0)?)?;
    }
    Ok(tokens as f64 / start.elapsed().as_secs_f64())
}

/// Multiply-accumulates per second of a large square f32 GEMM: what this
/// machine's cores reach when the matmul is not memory-bound.
fn peak_gemm_macs(device: &Device) -> anyhow::Result<f64> {
    let n = 1024;
    let a = Tensor::randn(0f32, 1.0, (n, n), device)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), device)?;
    a.matmul(&b)?; // warm-up
    let reps = 5;
    let start = Instant::now();
    for _ in 0..reps {
        a.matmul(&b)?;
    }
    let secs = start.elapsed().max(Duration::from_nanos(1)).as_secs_f64();
    Ok((reps * n * n * n) as f64 / secs)
}
