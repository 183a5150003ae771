//! A llama-architecture GGUF model with a batched forward pass over
//! per-sequence KV caches.

mod attention;
mod config;
mod kv_cache;
mod linear;
pub mod qgemm;

use std::{fs::File, path::Path};

use candle_core::quantized::gguf_file;
use candle_core::{D, DType, Device, Tensor};

use attention::{Rope, StepAttention};
pub use config::LlamaConfig;
pub(crate) use config::string as metadata_string;
pub use kv_cache::KvCache;
use linear::Linear;
use qgemm::Kernel;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read model file: {0}")]
    Io(#[from] std::io::Error),
    #[error("model metadata lacks {0}")]
    MissingKey(String),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// New tokens of one sequence in a step.
pub struct StepChunk<'a> {
    pub tokens: &'a [u32],
    /// Position of `tokens[0]`; equals the tokens already in the cache.
    pub start_pos: usize,
    /// Whether the caller needs next-token logits after this chunk.
    pub want_logits: bool,
}

struct Layer {
    attn_norm: Tensor,
    qkv: Linear,
    wo: Linear,
    ffn_norm: Tensor,
    gate_up: Linear,
    down: Linear,
}

pub struct LlamaModel {
    cfg: LlamaConfig,
    rope: Rope,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    device: Device,
    kernel: Kernel,
}

impl LlamaModel {
    /// Reads the GGUF at `path`; returns the model and the file's metadata
    /// (the tokenizer and chat template live there too). On the CPU,
    /// `kernel` does the linear layers (see `Kernel::choose`).
    pub fn load(path: &Path, device: &Device, kernel: Kernel) -> Result<(Self, gguf_file::Content), ModelError> {
        let mut file = File::open(path)?;
        let content = gguf_file::Content::read(&mut file)?;
        let cfg = LlamaConfig::from_metadata(&content.metadata)?;
        let cpu = Device::Cpu;
        let mut tensor = |name: &str| content.tensor(&mut file, name, &cpu);
        let embed_q = tensor("token_embd.weight")?;
        let embed = embed_q.dequantize(&cpu)?;
        let lm_head = match content.tensor_infos.contains_key("output.weight") {
            true => tensor("output.weight")?,
            false => embed_q,
        };
        let lm_head = Linear::load(vec![lm_head], device)?;
        let norm = tensor("output_norm.weight")?.dequantize(device)?;
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let mut w = |n: &str| tensor(&format!("blk.{i}.{n}.weight"));
            layers.push(Layer {
                attn_norm: w("attn_norm")?.dequantize(device)?,
                qkv: Linear::load(vec![w("attn_q")?, w("attn_k")?, w("attn_v")?], device)?,
                wo: Linear::load(vec![w("attn_output")?], device)?,
                ffn_norm: w("ffn_norm")?.dequantize(device)?,
                gate_up: Linear::load(vec![w("ffn_gate")?, w("ffn_up")?], device)?,
                down: Linear::load(vec![w("ffn_down")?], device)?,
            });
        }
        let model = Self {
            rope: Rope::new(&cfg),
            embed: embed.to_device(device)?,
            layers,
            norm,
            lm_head,
            device: device.clone(),
            kernel,
            cfg,
        };
        Ok((model, content))
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// The kernel of the linear layers on the CPU.
    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// Multiply-accumulates of the linear layers per token (lm_head included).
    pub fn macs_per_token(&self) -> usize {
        let c = &self.cfg;
        let attn = c.n_embd * (c.n_embd + 2 * c.kv_dim()) + c.n_embd * c.n_embd;
        let ffn = 3 * c.n_embd * c.ffn_dim;
        c.n_layer * (attn + ffn) + c.n_embd * c.vocab_size
    }

    /// Runs one step: every chunk's tokens go through the network together,
    /// each appended to its own cache (`caches[i]` belongs to `chunks[i]`).
    /// Returns `[m, vocab]` logits for the chunks that want them, in order.
    pub fn forward(&self, chunks: &[StepChunk<'_>], caches: &mut [&mut KvCache]) -> Result<Option<Tensor>, ModelError> {
        let cfg = &self.cfg;
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        let mut owners = Vec::new();
        let mut logit_rows = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            if caches[i].len() != chunk.start_pos || caches[i].room() < chunk.tokens.len() {
                return Err(ModelError::Unsupported(format!(
                    "chunk of {} tokens at {} does not fit a cache holding {} with room for {}",
                    chunk.tokens.len(),
                    chunk.start_pos,
                    caches[i].len(),
                    caches[i].room()
                )));
            }
            ids.extend_from_slice(chunk.tokens);
            positions.extend(chunk.start_pos..chunk.start_pos + chunk.tokens.len());
            owners.extend(std::iter::repeat_n(i, chunk.tokens.len()));
            if chunk.want_logits && !chunk.tokens.is_empty() {
                logit_rows.push((ids.len() - 1) as u32);
            }
        }
        if ids.is_empty() {
            return Ok(None);
        }
        let n = ids.len();
        let ids = Tensor::from_vec(ids, n, &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        let eps = cfg.rms_eps;
        for (l, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            let mut qkv = layer.qkv.forward(&h, self.kernel)?.flatten_all()?.to_vec1::<f32>()?;
            let attn = StepAttention { cfg, rope: &self.rope, qkv: &mut qkv, positions: &positions, owners: &owners }
                .run(l, caches);
            let attn = Tensor::from_vec(attn, (n, cfg.n_embd), &self.device)?;
            x = (x + layer.wo.forward(&attn, self.kernel)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, eps)?;
            let gate_up = layer.gate_up.forward(&h, self.kernel)?;
            let ffn = gate_up.dim(D::Minus1)? / 2;
            let act = (gate_up.narrow(1, 0, ffn)?.silu()? * gate_up.narrow(1, ffn, ffn)?)?;
            x = (x + layer.down.forward(&act, self.kernel)?)?;
        }
        if logit_rows.is_empty() {
            return Ok(None);
        }
        let rows = Tensor::from_vec(logit_rows.clone(), logit_rows.len(), &self.device)?;
        let x = x.index_select(&rows, 0)?;
        let x = candle_nn::ops::rms_norm(&x, &self.norm, eps)?;
        Ok(Some(self.lm_head.forward(&x, self.kernel)?.to_dtype(DType::F32)?))
    }
}
