//! Hyper-parameters of a llama-architecture GGUF, read from its metadata.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;

use super::ModelError;

/// What the forward pass needs to know about the network's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    /// Width of the feed-forward hidden layer.
    pub ffn_dim: usize,
    /// Leading dimensions of each head that RoPE rotates (usually all of them).
    pub rope_dim: usize,
    pub rope_base: f32,
    pub rms_eps: f32,
    pub context_length: usize,
    pub vocab_size: usize,
}

impl LlamaConfig {
    pub fn from_metadata(md: &HashMap<String, Value>) -> Result<Self, ModelError> {
        let arch = string(md, "general.architecture")?;
        if arch != "llama" {
            return Err(ModelError::Unsupported(format!(
                "general.architecture is {arch:?}; only \"llama\" is supported"
            )));
        }
        let n_embd = u32_key(md, "llama.embedding_length")?;
        let n_head = u32_key(md, "llama.attention.head_count")?;
        let n_kv_head = md
            .get("llama.attention.head_count_kv")
            .map(|v| v.to_u32().map(|v| v as usize))
            .transpose()?
            .unwrap_or(n_head);
        if n_head == 0 || n_embd % n_head != 0 || n_kv_head == 0 || n_head % n_kv_head != 0 {
            return Err(ModelError::Unsupported(format!(
                "head counts {n_head}/{n_kv_head} do not divide embedding length {n_embd}"
            )));
        }
        let head_dim = n_embd / n_head;
        let rope_dim = match md.get("llama.rope.dimension_count") {
            Some(v) => v.to_u32()? as usize,
            None => head_dim,
        };
        let rope_base = match md.get("llama.rope.freq_base") {
            Some(v) => v.to_f32()?,
            None => 10_000.0,
        };
        let rms_eps = match md.get("llama.attention.layer_norm_rms_epsilon") {
            Some(v) => v.to_f32()?,
            None => 1e-5,
        };
        let vocab_size = match md.get("llama.vocab_size") {
            Some(v) => v.to_u32()? as usize,
            None => md
                .get("tokenizer.ggml.tokens")
                .map(|t| t.to_vec().map(Vec::len))
                .transpose()?
                .ok_or_else(|| ModelError::MissingKey("llama.vocab_size".into()))?,
        };
        Ok(Self {
            n_layer: u32_key(md, "llama.block_count")?,
            n_embd,
            ffn_dim: u32_key(md, "llama.feed_forward_length")?,
            n_head,
            n_kv_head,
            head_dim,
            rope_dim: rope_dim.min(head_dim),
            rope_base,
            rms_eps,
            context_length: u32_key(md, "llama.context_length")?,
            vocab_size,
        })
    }

    /// Width of the key (and value) projection: all KV heads together.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_head * self.head_dim
    }

    /// Bytes of KV cache one token occupies across all layers (f32 keys and values).
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.n_layer * self.kv_dim() * std::mem::size_of::<f32>()
    }
}

fn u32_key(md: &HashMap<String, Value>, key: &str) -> Result<usize, ModelError> {
    let v = md.get(key).ok_or_else(|| ModelError::MissingKey(key.into()))?;
    Ok(v.to_u32()? as usize)
}

pub(crate) fn string<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<&'a str, ModelError> {
    let v = md.get(key).ok_or_else(|| ModelError::MissingKey(key.into()))?;
    Ok(v.to_string()?.as_str())
}
