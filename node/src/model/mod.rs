//! A llama-architecture GGUF model with a batched forward pass over
//! per-sequence KV caches.

mod attention;
mod config;
#[cfg(feature = "cuda")]
mod cuda;
mod fused;
mod kv_cache;
pub(crate) mod linear;
pub mod paged;
pub mod qgemm;
mod step;
mod vexp;

use std::{fs::File, path::Path};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};

use attention::{HostAttention, Rope};
pub use config::LlamaConfig;
pub(crate) use config::string as metadata_string;
pub use kv_cache::{KV_CHUNK, KvBlock, KvCache};
use linear::Linear;
use qgemm::Kernel;
pub use step::{StepChunk, StepKv, StepPlan, check_fits as step_fits};

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

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// RoPE's `(cos, sin)` tables `[positions, pairs]` on the model's device;
    /// the device attention rotates whole heads.
    pub fn rope_tables(&self) -> Result<(Tensor, Tensor), ModelError> {
        if self.cfg.rope_dim != self.cfg.head_dim {
            return Err(ModelError::Unsupported(format!(
                "RoPE over {} of {} head dimensions on a device",
                self.cfg.rope_dim, self.cfg.head_dim
            )));
        }
        Ok(self.rope.tables(&self.device)?)
    }

    /// On a device, each weight format of the linear layers and how many
    /// layers use it, and the f16 copies larger steps use ("q4_1 x120,
    /// q8_0 x1; f16 over 8 rows"); `None` on the CPU.
    pub fn device_formats(&self) -> Option<String> {
        let mut counts = std::collections::BTreeMap::new();
        let linears = self.layers.iter().flat_map(|l| [&l.qkv, &l.wo, &l.gate_up, &l.down]);
        for linear in linears.chain([&self.lm_head]) {
            *counts.entry(linear.device_format()?).or_insert(0) += 1;
        }
        let formats: Vec<String> = counts.iter().map(|(f, n)| format!("{f} x{n}")).collect();
        Some(format!("{}; f16 over {} rows", formats.join(", "), linear::VECTOR_ROWS))
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

    /// Runs one step against per-sequence host caches: every chunk's tokens
    /// go through the network together, each appended to its own cache
    /// (`caches[i]` belongs to `chunks[i]`). Returns `[m, vocab]` logits for
    /// the chunks that want them, in order.
    pub fn forward(&self, chunks: &[StepChunk<'_>], caches: &mut [&mut KvCache]) -> Result<Option<Tensor>, ModelError> {
        for (chunk, cache) in chunks.iter().zip(caches.iter()) {
            step_fits(chunk, cache.len(), cache.room())?;
        }
        let plan = StepPlan::new(chunks);
        let mut kv = HostAttention { cfg: &self.cfg, rope: &self.rope, caches, plan: &plan };
        self.run(&plan, &mut kv)
    }

    /// Runs one planned step through every layer; `kv` stores the new keys
    /// and values and attends (on the host or on the model's device).
    pub fn run(&self, plan: &StepPlan, kv: &mut dyn StepKv) -> Result<Option<Tensor>, ModelError> {
        if plan.ids.is_empty() {
            return Ok(None);
        }
        let x = self.hidden(&Tensor::new(plan.ids.as_slice(), &self.device)?, kv)?;
        if plan.logit_rows.is_empty() {
            return Ok(None);
        }
        let rows = Tensor::new(plan.logit_rows.as_slice(), &self.device)?;
        Ok(Some(self.logits(&x.index_select(&rows, 0)?)?))
    }

    /// Logits `[tokens, vocab]` of every token of `ids`, a tensor on the
    /// model's device: a step with no host data in it (`paged::graph`).
    pub fn run_all(&self, ids: &Tensor, kv: &mut dyn StepKv) -> Result<Tensor, ModelError> {
        self.logits(&self.hidden(ids, kv)?)
    }

    /// The last layer's output for tokens `ids`.
    pub(crate) fn hidden(&self, ids: &Tensor, kv: &mut dyn StepKv) -> Result<Tensor, ModelError> {
        let mut x = self.embed.index_select(ids, 0)?;
        let k = self.kernel;
        let mut h = match self.layers.first() {
            Some(first) => candle_nn::ops::rms_norm(&x, &first.attn_norm, self.cfg.rms_eps)?,
            None => x.clone(),
        };
        for (l, layer) in self.layers.iter().enumerate() {
            let attn = kv.attend(l, layer.qkv.forward(&h, k)?)?;
            (x, h) = self.add_norm(&x, &layer.wo.forward(&attn, k)?, &layer.ffn_norm)?;
            let act = layer.gate_up.forward(&h, k)?.apply_op1_no_bwd(&fused::SiluMul)?;
            let down = layer.down.forward(&act, k)?;
            match self.layers.get(l + 1) {
                Some(next) => (x, h) = self.add_norm(&x, &down, &next.attn_norm)?,
                None => x = (x + down)?,
            }
        }
        Ok(x)
    }

    /// Next-token logits of hidden rows `x`, as f32.
    fn logits(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        let x = candle_nn::ops::rms_norm(x, &self.norm, self.cfg.rms_eps)?;
        Ok(self.lm_head.forward(&x, self.kernel)?.to_dtype(DType::F32)?)
    }

    /// The residual `x + y` and its RMS norm scaled by `w`, in one op.
    fn add_norm(&self, x: &Tensor, y: &Tensor, w: &Tensor) -> Result<(Tensor, Tensor), ModelError> {
        let both = x.apply_op3_no_bwd(y, w, &fused::AddRmsNorm { eps: self.cfg.rms_eps })?;
        Ok((both.get(0)?, both.get(1)?))
    }
}
