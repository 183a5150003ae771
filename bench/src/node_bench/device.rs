//! The node's engine on a GPU (scripts/gpu-check.sh runs it): decode alone
//! and batched, TTFT of a long prompt alone and under load, the memory
//! bandwidth that implies, the same binary's CPU aggregate on that host, and
//! where greedy output on the device first differs from the CPU. Prints
//! lines and writes every figure as JSON.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use node::backend::{Backend, GgufBackend, PagedBackend};
use node::model::LlamaModel;
use node::model::qgemm::Kernel;
use node::scheduler::{Limits, Scheduler};
use node::text::{GgufText, SpecialTokens, TextCodec};
use serde_json::{Value, json};

use super::measure::{self, UnderLoad};
use super::{PROMPT, anatomy, device_compare};

#[derive(clap::Args)]
pub struct Args {
    /// GGUF model file.
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    /// CUDA device; without it the device code path runs on the CPU (a dry
    /// run of this benchmark, not a measure of anything).
    #[arg(long)]
    cuda_device: Option<usize>,
    /// Tokens each stream decodes.
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// Batched runs besides the single stream; the largest also sets the
    /// streams decoding while TTFT is timed (that many minus one).
    #[arg(long, value_delimiter = ',', default_value = "8,64,256")]
    batches: Vec<usize>,
    /// Prompt length of the TTFT runs.
    #[arg(long, default_value_t = 512)]
    ttft_prompt: usize,
    #[arg(long, default_value_t = 20)]
    ttft_samples: usize,
    /// Tokens each background stream may decode while TTFT is timed (they
    /// must outlast the samples; the KV pool is sized for them).
    #[arg(long, default_value_t = 1024)]
    background_tokens: usize,
    /// Streams of the CPU aggregate run on the same host (0 skips it).
    #[arg(long, default_value_t = 64)]
    cpu_streams: usize,
    /// Greedy tokens compared between CPU and device per prompt (0 skips).
    #[arg(long, default_value_t = 32)]
    compare_tokens: usize,
    /// The device's peak memory bandwidth in GB/s, printed beside the achieved.
    #[arg(long)]
    peak_gbs: Option<f64>,
    /// Run every engine step op by op (the node's `--eager`), not decode
    /// steps replayed from CUDA graphs. The step anatomy times both anyway.
    #[arg(long)]
    eager: bool,
    /// Runs the step anatomy's last step of this many streams (op by op,
    /// then replayed) between a CUDA profiler start and stop, for a
    /// profiler attached with `--profile-from-start off`.
    #[arg(long)]
    profile_streams: Option<usize>,
    /// Write every figure here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// A device backend as the node runs it: decode steps replayed unless
/// `--eager`; steps of at most `max_step_rows` tokens.
fn device_backend(
    args: &Args,
    model: &Arc<LlamaModel>,
    kv: (usize, usize),
    max_step_rows: usize,
) -> anyhow::Result<PagedBackend> {
    let backend = PagedBackend::new(model.clone(), kv.0, kv.1)?;
    Ok(if args.eager { backend } else { backend.with_graphs(max_step_rows)? })
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    // The node's warnings (a recording that failed) on stderr; RUST_LOG overrides.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let device = node::server::open_device(args.cuda_device)?;
    let mut report = json!({ "device": format!("{device:?}"), "model": args.model.display().to_string() });
    report["device_run"] = device_run(&args, &device).await?;
    if args.cpu_streams > 0 {
        report["cpu_run"] = cpu_run(&args).await?;
        let (gpu, cpu) = (&report["device_run"]["decode"], &report["cpu_run"]["tokens_per_s"]);
        if let (Some(gpu), Some(cpu)) = (gpu.as_array().and_then(|a| a.last()), cpu.as_f64()) {
            let ratio = gpu["tokens_per_s"].as_f64().unwrap_or(0.0) / cpu;
            println!("device at {} streams / CPU at {}: {ratio:.1}x", gpu["streams"], args.cpu_streams);
            report["device_over_cpu"] = json!(ratio);
        }
    }
    if args.compare_tokens > 0 {
        report["greedy_vs_cpu"] = device_compare::run(&args.model, &device, args.compare_tokens)?;
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}

async fn device_run(args: &Args, device: &Device) -> anyhow::Result<Value> {
    let streams = args.batches.iter().copied().max().unwrap_or(1).max(1);
    let (model, content) = LlamaModel::load(&args.model, device, Kernel::choose(None).map_err(anyhow::Error::msg)?)?;
    let formats = model.device_formats().unwrap_or_else(|| "cpu kernels".into());
    println!("device {device:?}; linear layers: {formats}");
    let cfg = model.config().clone();
    let codec: Arc<dyn TextCodec> = Arc::new(GgufText::from_metadata(&content.metadata)?);
    let prompt = codec.encode(PROMPT, SpecialTokens::AsText)?;
    let kv_tokens = streams * (prompt.len() + args.background_tokens.max(args.tokens)) + 2 * args.ttft_prompt;
    let model = Arc::new(model);
    let backend = device_backend(args, &model, (kv_tokens, streams + 1), args.ttft_prompt)?;
    let (pool_bytes, pool_positions) = backend.pool_size();
    println!("KV pool: {pool_positions} positions, {} MiB", pool_bytes >> 20);
    let limits = Limits {
        max_running: streams + 1,
        max_queued: 2 * streams,
        max_kv_tokens: kv_tokens,
        max_step_tokens: args.ttft_prompt,
        context_length: cfg.context_length,
        max_queue_wait: Duration::from_secs(3600),
        prefix_cache: false,
    };
    let metrics = node::metrics::NodeMetrics::new("bench", "device");
    let scheduler = Scheduler::start(limits.clone(), Box::new(backend), codec.clone(), metrics.clone());
    let weight_bytes = std::fs::metadata(&args.model)?.len() as f64;
    // Keys and values of one position in every layer, f32.
    let kv_bytes = (cfg.n_layer * cfg.kv_dim() * 2 * 4) as f64;
    let (mut decode, mut rates) = (Vec::new(), Vec::new());
    for &n in std::iter::once(&1).chain(&args.batches) {
        let rate = measure::decode_rate(&scheduler, &prompt, n, args.tokens).await?;
        // Per step: every weight once, and each stream's keys and values
        // at its average length over the run.
        let context = prompt.len() as f64 + args.tokens as f64 / 2.0;
        let gbs = rate / n as f64 * (weight_bytes + n as f64 * context * kv_bytes) / 1e9;
        let peak = args.peak_gbs.map(|p| format!(" of {p:.0} GB/s peak ({:.1}%)", 100.0 * gbs / p)).unwrap_or_default();
        println!("device, {n} streams: {rate:.1} tokens/s aggregate; weights + KV read at {gbs:.1} GB/s{peak}");
        decode.push(json!({ "streams": n, "tokens_per_s": rate, "bandwidth_gbs": gbs }));
        rates.push((n, rate));
    }
    let long = measure::long_prompt(&codec, args.ttft_prompt)?;
    let alone = measure::ttfts(&scheduler, &long, args.ttft_samples.clamp(1, 5)).await?;
    let alone = measure::percentile(&alone, 0.5);
    println!("TTFT of a {}-token prompt alone: p50 {alone:.1} ms", args.ttft_prompt);
    let load = UnderLoad { prompt: args.ttft_prompt, streams: streams - 1, tokens: args.background_tokens };
    let (p50, p99) = measure::ttft_under_load(&scheduler, &codec, args.ttft_samples.max(1), &load).await?;
    println!(
        "TTFT of a {}-token prompt while {} streams decode: p50 {p50:.1} ms, p99 {p99:.1} ms",
        load.prompt, load.streams
    );
    drop(scheduler);
    let cached = Limits { max_kv_tokens: 64 * 1024, prefix_cache: true, ..limits };
    let backend = device_backend(args, &model, (cached.max_kv_tokens, cached.max_running), cached.max_step_tokens)?;
    let scheduler = Scheduler::start(cached, Box::new(backend), codec.clone(), metrics);
    let (cold, warm) = measure::prefix_ttft(&scheduler, &codec, 5).await?;
    println!("TTFT of 512 cached + 32 new prompt tokens: p50 {warm:.1} ms; all 544 cold: p50 {cold:.1} ms");
    drop(scheduler);
    let context = prompt.len() + args.tokens / 2;
    let anatomy = anatomy::report(model, context, &rates, args.profile_streams)?;
    Ok(json!({
        "linear_formats": formats,
        "step_anatomy": anatomy,
        "kv_pool": { "positions": pool_positions, "bytes": pool_bytes },
        "decode": decode,
        "peak_gbs": args.peak_gbs,
        "ttft_alone_p50_ms": alone,
        "ttft_under_load": { "prompt": load.prompt, "streams": load.streams, "p50_ms": p50, "p99_ms": p99 },
        "prefix_ttft_p50_ms": { "cold_544": cold, "warm_512_of_544": warm },
    }))
}

/// The same binary's CPU aggregate on this host (fastest kernel).
async fn cpu_run(args: &Args) -> anyhow::Result<Value> {
    let kernel = Kernel::choose(None).map_err(anyhow::Error::msg)?;
    let (model, content) = LlamaModel::load(&args.model, &Device::Cpu, kernel)?;
    let codec: Arc<dyn TextCodec> = Arc::new(GgufText::from_metadata(&content.metadata)?);
    let prompt = codec.encode(PROMPT, SpecialTokens::AsText)?;
    let limits = Limits {
        max_running: args.cpu_streams,
        max_queued: args.cpu_streams,
        max_kv_tokens: args.cpu_streams * (prompt.len() + args.tokens),
        max_step_tokens: 256,
        context_length: model.config().context_length,
        max_queue_wait: Duration::from_secs(3600),
        prefix_cache: false,
    };
    let backend: Box<dyn Backend> = Box::new(GgufBackend::new(Arc::new(model)));
    let scheduler = Scheduler::start(limits, backend, codec, node::metrics::NodeMetrics::new("bench", kernel.name()));
    let rate = measure::decode_rate(&scheduler, &prompt, args.cpu_streams, args.tokens).await?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("CPU ({kernel}, {threads} threads), {} streams: {rate:.1} tokens/s aggregate", args.cpu_streams);
    Ok(json!({ "kernel": kernel.name(), "threads": threads, "streams": args.cpu_streams, "tokens_per_s": rate }))
}
