//! The node benchmark: single-stream and batched decode through the real
//! engine (scheduler + batched forward), prefill alone, TTFT under load, for
//! every matmul kernel this CPU supports, against the upstream single-stream
//! figure, all in one run so the ratios compare like with like.

mod anatomy;
pub mod device;
mod device_compare;
mod measure;
pub mod qgemm;
pub mod upstream;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use node::backend::GgufBackend;
use node::model::LlamaModel;
use node::model::qgemm::Kernel;
use node::scheduler::{Limits, Scheduler};
use node::text::{GgufText, SpecialTokens, TextCodec};

/// The model and decode length: all `mesh-bench upstream` takes.
#[derive(clap::Args)]
pub struct ModelArgs {
    /// GGUF model file.
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    /// Tokens each stream decodes.
    #[arg(long, default_value_t = 64)]
    tokens: usize,
}

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    run: ModelArgs,
    /// 128-token prompts timed while 31 streams decode (0 skips the TTFT run).
    #[arg(long, default_value_t = 20)]
    ttft_samples: usize,
    /// Skip the upstream run (for profiling the node alone; no ratios then).
    #[arg(long)]
    skip_upstream: bool,
    /// A `mesh-bench` built with `-C target-cpu=native` whose `upstream`
    /// figure is the yardstick (scripts/bench-node.sh passes one).
    #[arg(long)]
    upstream_bin: Option<PathBuf>,
    /// Batched runs to measure besides the single stream.
    #[arg(long, value_delimiter = ',', default_value = "8,32")]
    batches: Vec<usize>,
    /// Kernels to measure; defaults to every one this CPU supports.
    #[arg(long, value_enum, value_delimiter = ',')]
    kernels: Vec<Kernel>,
}

/// Single-stream runs, of the node and of upstream alike, whose fastest
/// counts: a run of a few hundred milliseconds on a shared 2-core machine
/// is at times slowed by half by other work.
const SINGLE_RUNS: usize = 3;

const PROMPT: &str = "The history of the printing press begins in the fifteenth century, when";

pub async fn run(args: Args) -> anyhow::Result<()> {
    let upstream = upstream_rate(&args)?;
    let kernels = if args.kernels.is_empty() { Kernel::available() } else { args.kernels.clone() };
    let default = Kernel::choose(None).map_err(anyhow::Error::msg)?;
    println!("kernels: {} (the node picks {default} on this CPU)", Kernel::names(&kernels));
    let peak = upstream::peak_gemm_macs()?;
    for kernel in kernels {
        let forced = Kernel::choose(Some(kernel)).map_err(anyhow::Error::msg)?;
        println!("\n== kernel {forced} ==");
        bench_kernel(&args, forced, upstream, peak).await?;
    }
    Ok(())
}

/// The yardstick: the fastest upstream build at hand (this binary's, and
/// `--upstream-bin`'s when given).
fn upstream_rate(args: &Args) -> anyhow::Result<f64> {
    if args.skip_upstream {
        return Ok(f64::NAN);
    }
    let here = upstream::tokens_per_sec(&args.run.model, args.run.tokens)?;
    println!("upstream quantized_llama, 1 stream, this build ({}): {here:.1} tokens/s", upstream::built_for());
    let Some(bin) = &args.upstream_bin else {
        return Ok(here);
    };
    let (native, built_for) = upstream::from_binary(bin, &args.run.model, args.run.tokens)?;
    println!("upstream quantized_llama, 1 stream, {} ({built_for}): {native:.1} tokens/s", bin.display());
    let best = here.max(native);
    println!("yardstick: {best:.1} tokens/s");
    Ok(best)
}

async fn bench_kernel(args: &Args, kernel: Kernel, upstream: f64, peak: f64) -> anyhow::Result<()> {
    let (model, content) = LlamaModel::load(&args.run.model, &Device::Cpu, kernel)?;
    let codec: Arc<dyn TextCodec> = Arc::new(GgufText::from_metadata(&content.metadata)?);
    let macs_per_token = model.macs_per_token() as f64;
    let limits = Limits {
        max_running: 32,
        max_queued: 64,
        max_kv_tokens: 1 << 20,
        max_step_tokens: 256,
        context_length: model.config().context_length,
        // A throughput measure: every stream waits its turn, none is refused.
        max_queue_wait: Duration::from_secs(3600),
        prefix_cache: false,
    };
    let model = Arc::new(model);
    let metrics = node::metrics::NodeMetrics::new("bench", kernel.name());
    let backend = Box::new(GgufBackend::new(model.clone()));
    let scheduler = Scheduler::start(limits.clone(), backend, codec.clone(), metrics.clone());
    let prompt = codec.encode(PROMPT, SpecialTokens::AsText)?;

    let mut single = 0f64;
    for _ in 0..SINGLE_RUNS {
        single = single.max(measure::decode_rate(&scheduler, &prompt, 1, args.run.tokens).await?);
    }
    println!("node, 1 stream: {single:.1} tokens/s  ({:.2}x upstream)", single / upstream);
    for &streams in &args.batches {
        let rate = measure::decode_rate(&scheduler, &prompt, streams, args.run.tokens).await?;
        println!("node, {streams} streams: {rate:.1} tokens/s aggregate  ({:.2}x upstream)", rate / upstream);
        if streams == 32 {
            println!(
                "matmul rate at 32 streams: {:.1} GMAC/s; machine f32 GEMM peak (1024^3): {:.1} GMAC/s ({:.0}%)",
                rate * macs_per_token / 1e9,
                peak / 1e9,
                100.0 * rate * macs_per_token / peak
            );
        }
    }
    if std::env::var_os("DECODE_ONLY").is_some() {
        return Ok(());
    }
    let prefill = measure::prefill_rate(&scheduler, &codec, 5).await?;
    println!(
        "prefill of a 128-token prompt alone: {prefill:.0} tokens/s  ({:.1}x upstream decode)",
        prefill / upstream
    );
    if args.ttft_samples > 0 {
        let load = measure::UnderLoad { prompt: 128, streams: 31, tokens: 4000 };
        let (p50, p99) = measure::ttft_under_load(&scheduler, &codec, args.ttft_samples, &load).await?;
        println!("TTFT of a 128-token prompt while 31 streams decode: p50 {p50:.1} ms, p99 {p99:.1} ms");
    }
    drop(scheduler);
    let cached = Limits { prefix_cache: true, ..limits };
    let scheduler = Scheduler::start(cached, Box::new(GgufBackend::new(model)), codec.clone(), metrics);
    let (cold, warm) = measure::prefix_ttft(&scheduler, &codec, 5).await?;
    println!(
        "TTFT of 512 cached + 32 new prompt tokens: p50 {warm:.1} ms; all 544 cold: p50 {cold:.1} ms ({:.0}%)",
        100.0 * warm / cold
    );
    Ok(())
}
