//! One forward step over many sequences: its tokens laid out as one matrix,
//! and the attention that runs against wherever the KV cache lives.

use candle_core::Tensor;

use super::ModelError;

/// New tokens of one sequence in a step.
pub struct StepChunk<'a> {
    pub tokens: &'a [u32],
    /// Position of `tokens[0]`; equals the tokens already in the cache.
    pub start_pos: usize,
    /// Whether the caller needs next-token logits after this chunk.
    pub want_logits: bool,
}

/// The step's tokens in chunk order, as the layers see them.
pub struct StepPlan {
    pub ids: Vec<u32>,
    /// Position of each token in its sequence.
    pub positions: Vec<usize>,
    /// Index of each token's chunk.
    pub owners: Vec<usize>,
    /// Rows whose next-token logits are wanted: each wanting chunk's last token.
    pub logit_rows: Vec<u32>,
}

impl StepPlan {
    pub fn new(chunks: &[StepChunk<'_>]) -> Self {
        let mut plan = Self { ids: Vec::new(), positions: Vec::new(), owners: Vec::new(), logit_rows: Vec::new() };
        for (i, chunk) in chunks.iter().enumerate() {
            plan.ids.extend_from_slice(chunk.tokens);
            plan.positions.extend(chunk.start_pos..chunk.start_pos + chunk.tokens.len());
            plan.owners.extend(std::iter::repeat_n(i, chunk.tokens.len()));
            if chunk.want_logits && !chunk.tokens.is_empty() {
                plan.logit_rows.push((plan.ids.len() - 1) as u32);
            }
        }
        plan
    }
}

/// Attention of one step, layer by layer: stores the new keys and values
/// where the cache lives and attends every new token to its own sequence.
pub trait StepKv {
    /// `qkv` is `[tokens, n_embd + 2 * kv_dim]` (q, then k, then v of each
    /// token, before RoPE); returns the attention output `[tokens, n_embd]`.
    fn attend(&mut self, layer: usize, qkv: Tensor) -> Result<Tensor, ModelError>;
}

/// A chunk must continue its cache exactly and fit in the room left.
pub fn check_fits(chunk: &StepChunk<'_>, cached: usize, room: usize) -> Result<(), ModelError> {
    if cached != chunk.start_pos || room < chunk.tokens.len() {
        return Err(ModelError::Unsupported(format!(
            "chunk of {} tokens at {} does not fit a cache holding {cached} with room for {room}",
            chunk.tokens.len(),
            chunk.start_pos,
        )));
    }
    Ok(())
}
