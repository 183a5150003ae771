//! A llama-architecture GGUF model with a batched forward pass over
//! per-sequence KV caches.

mod attention;
mod config;
mod linear;

use std::{fs::File, path::Path};

use candle_core::quantized::gguf_file;
use candle_core::{D, DType, Device, Tensor};

pub use attention::KvCache;
use attention::{Rope, StepAttention};
pub use config::LlamaConfig;
pub(crate) use config::string as metadata_string;
pub use linear::DEFAULT_Q8_MAX_ROWS;
use linear::DualLinear;

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
    qkv: DualLinear,
    wo: DualLinear,
    ffn_norm: Tensor,
    gate_up: DualLinear,
    down: DualLinear,
}

pub struct LlamaModel {
    cfg: LlamaConfig,
    rope: Rope,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: DualLinear,
    device: Device,
}

impl LlamaModel {
    /// Reads the GGUF at `path`; returns the model and the file's metadata
    /// (the tokenizer and chat template live there too).
    pub fn load(path: &Path, device: &Device, q8_max_rows: usize) -> Result<(Self, gguf_file::Content), ModelError> {
        let mut file = File::open(path)?;
        let content = gguf_file::Content::read(&mut file)?;
        let cfg = LlamaConfig::from_metadata(&content.metadata)?;
        let cpu = Device::Cpu;
        let mut f32_weight =
            |name: &str| -> Result<Tensor, ModelError> { Ok(content.tensor(&mut file, name, &cpu)?.dequantize(&cpu)?) };
        let embed_cpu = f32_weight("token_embd.weight")?;
        let lm_head = match content.tensor_infos.contains_key("output.weight") {
            true => f32_weight("output.weight")?,
            false => embed_cpu.clone(),
        };
        let lm_head = DualLinear::new(&lm_head, device, q8_max_rows)?;
        let norm = f32_weight("output_norm.weight")?.to_device(device)?;
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let mut w = |n: &str| f32_weight(&format!("blk.{i}.{n}.weight"));
            let qkv = Tensor::cat(&[w("attn_q")?, w("attn_k")?, w("attn_v")?], 0)?;
            let gate_up = Tensor::cat(&[w("ffn_gate")?, w("ffn_up")?], 0)?;
            layers.push(Layer {
                attn_norm: w("attn_norm")?.to_device(device)?,
                qkv: DualLinear::new(&qkv, device, q8_max_rows)?,
                wo: DualLinear::new(&w("attn_output")?, device, q8_max_rows)?,
                ffn_norm: w("ffn_norm")?.to_device(device)?,
                gate_up: DualLinear::new(&gate_up, device, q8_max_rows)?,
                down: DualLinear::new(&w("ffn_down")?, device, q8_max_rows)?,
            });
        }
        let model = Self {
            rope: Rope::new(&cfg),
            embed: embed_cpu.to_device(device)?,
            layers,
            norm,
            lm_head,
            device: device.clone(),
            cfg,
        };
        Ok((model, content))
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Multiply-accumulates of the linear layers per token (lm_head included).
    pub fn macs_per_token(&self) -> usize {
        let per_layer: usize = self.layers.first().map_or(0, |l| {
            l.qkv.macs_per_row() + l.wo.macs_per_row() + l.gate_up.macs_per_row() + l.down.macs_per_row()
        });
        per_layer * self.layers.len() + self.lm_head.macs_per_row()
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
            if caches[i].len() != chunk.start_pos {
                return Err(ModelError::Unsupported(format!(
                    "chunk starts at {} but its cache holds {} tokens",
                    chunk.start_pos,
                    caches[i].len()
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
            let mut qkv = layer.qkv.forward(&h)?.flatten_all()?.to_vec1::<f32>()?;
            let attn = StepAttention { cfg, rope: &self.rope, qkv: &mut qkv, positions: &positions, owners: &owners }
                .run(l, caches);
            let attn = Tensor::from_vec(attn, (n, cfg.n_embd), &self.device)?;
            x = (x + layer.wo.forward(&attn)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, eps)?;
            let gate_up = layer.gate_up.forward(&h)?;
            let ffn = gate_up.dim(D::Minus1)? / 2;
            let act = (gate_up.narrow(1, 0, ffn)?.silu()? * gate_up.narrow(1, ffn, ffn)?)?;
            x = (x + layer.down.forward(&act)?)?;
        }
        if logit_rows.is_empty() {
            return Ok(None);
        }
        let rows = Tensor::from_vec(logit_rows.clone(), logit_rows.len(), &self.device)?;
        let x = x.index_select(&rows, 0)?;
        let x = candle_nn::ops::rms_norm(&x, &self.norm, eps)?;
        Ok(Some(self.lm_head.forward(&x)?.to_dtype(DType::F32)?))
    }
}
