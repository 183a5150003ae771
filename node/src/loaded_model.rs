//! The model this node loaded at start: its backend, its codec and what
//! callers may ask of it (name, context length, vocabulary).

use std::path::Path;
use std::sync::Arc;

use candle_core::Device;

use crate::backend::{Backend, GgufBackend, PagedBackend, SyntheticBackend};
use crate::model::qgemm::Kernel;
use crate::model::{LlamaModel, metadata_string};
use crate::text::{GgufText, SpecialTokens, TextCodec, WordCodec, synthetic_words};

pub struct LoadedModel {
    pub name: String,
    /// "gguf" or "synthetic".
    pub kind: &'static str,
    pub codec: Arc<dyn TextCodec>,
    pub backend: Box<dyn Backend>,
    pub context_length: usize,
    pub vocab_size: usize,
    /// What computes the linear layers: a CPU kernel's name, "device" on an
    /// accelerator, "none" for the synthetic backend.
    pub compute: &'static str,
}

impl LoadedModel {
    /// Loads a llama GGUF; `name` defaults to the file's stem. On a device
    /// `plan` sizes and runs its backend.
    pub fn gguf(
        path: &Path,
        name: Option<String>,
        device: &Device,
        kernel: Kernel,
        plan: &DevicePlan,
    ) -> anyhow::Result<Self> {
        let (model, content) = LlamaModel::load(path, device, kernel)?;
        let compute = if device.is_cpu() { kernel.name() } else { "device" };
        let codec = GgufText::from_metadata(&content.metadata)?;
        let name =
            name.unwrap_or_else(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default());
        let cfg = model.config().clone();
        tracing::info!(
            model = %name,
            title = metadata_string(&content.metadata, "general.name").unwrap_or("?"),
            layers = cfg.n_layer,
            context = cfg.context_length,
            compute,
            "model loaded"
        );
        let backend = backend(model, plan)?;
        Ok(Self {
            name,
            kind: "gguf",
            codec: Arc::new(codec),
            backend,
            context_length: cfg.context_length,
            vocab_size: cfg.vocab_size,
            compute,
        })
    }

    /// Deterministic words at `tokens_per_sec` per stream, no weights; a
    /// step reading a prompt with `panic_marker`'s words panics (for tests).
    pub fn synthetic(name: String, tokens_per_sec: f64, context_length: usize, panic_marker: Option<&str>) -> Self {
        let marker = panic_marker.map(|m| WordCodec.encode(m, SpecialTokens::AsText).unwrap_or_default());
        Self {
            name,
            kind: "synthetic",
            codec: Arc::new(WordCodec),
            backend: Box::new(SyntheticBackend::new(tokens_per_sec, marker.unwrap_or_default())),
            context_length,
            vocab_size: synthetic_words::VOCAB,
            compute: "none",
        }
    }
}

/// How the backend on a device is sized and run.
pub struct DevicePlan {
    /// The KV pool: committed tokens of at most `sequences` sequences.
    pub kv_tokens: usize,
    pub sequences: usize,
    /// The most tokens one step reads (`--max-step-tokens`).
    pub max_step_tokens: usize,
    /// Decode steps replayed from CUDA graphs (not `--eager`).
    pub graphs: bool,
}

/// Host caches on the CPU; the block pool on a device, allocated here, so a
/// budget the device cannot hold fails at start.
fn backend(model: LlamaModel, plan: &DevicePlan) -> anyhow::Result<Box<dyn Backend>> {
    if model.device().is_cpu() {
        return Ok(Box::new(GgufBackend::new(Arc::new(model))));
    }
    let formats = model.device_formats().unwrap_or_default();
    let mut backend = PagedBackend::new(Arc::new(model), plan.kv_tokens, plan.sequences)
        .map_err(|e| anyhow::anyhow!("cannot allocate the KV pool for --max-kv-tokens {}: {e}", plan.kv_tokens))?;
    if plan.graphs {
        backend = backend.with_graphs(plan.max_step_tokens).map_err(|e| {
            anyhow::anyhow!("a step of --max-step-tokens {} does not run on the device: {e}", plan.max_step_tokens)
        })?;
    }
    let (bytes, positions) = backend.pool_size();
    let recorded = backend.recorded_batches();
    let steps = match (plan.graphs, recorded.is_empty()) {
        (false, _) => "every step op by op (--eager)",
        (true, true) => "every step op by op (no decode step could be recorded: see the warning above)",
        (true, false) => "decode steps replayed from CUDA graphs",
    };
    tracing::info!(%formats, kv_pool_mib = bytes >> 20, kv_pool_positions = positions, steps, ?recorded, "model on the device");
    Ok(Box::new(backend))
}
