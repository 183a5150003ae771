//! What the scheduler drives: one forward step over many sequences.

mod gguf;
mod paged;
mod synthetic;

pub use gguf::GgufBackend;
pub use paged::PagedBackend;
pub use synthetic::SyntheticBackend;

use candle_core::Tensor;

use crate::model::StepChunk;

/// New tokens of one sequence in a step.
pub struct SeqStep<'a> {
    pub id: u64,
    pub tokens: &'a [u32],
    /// Position of `tokens[0]` in the sequence.
    pub start_pos: usize,
    /// Whether next-token logits are needed after these tokens.
    pub want_logits: bool,
    /// Most tokens this sequence will ever hold (to size its cache once).
    pub capacity: usize,
    /// Length of the caller's prompt; tokens after it were generated.
    pub prompt_len: usize,
    /// The sequence samples greedily: with logits on a device, its token is
    /// picked there and only the id comes back (see `scheduler::isolate`).
    pub greedy: bool,
    /// Cached blocks the sequence starts with (see `Backend::publish`): its
    /// first `reuse.len() * BLOCK_TOKENS` positions, never computed for it.
    pub reuse: &'a [BlockId],
}

/// Names a block of keys and values the backend keeps for the prefix cache
/// (`scheduler::prefix`).
pub type BlockId = u64;

impl<'a> SeqStep<'a> {
    /// What the model reads of this step.
    pub fn chunk(&self) -> StepChunk<'a> {
        StepChunk { tokens: self.tokens, start_pos: self.start_pos, want_logits: self.want_logits }
    }
}

/// A model (or a stand-in for one) that advances many sequences per step.
pub trait Backend: Send {
    /// Feeds every sequence's new tokens; returns `[m, vocab]` logits for
    /// the sequences with `want_logits`, in the order given (on the host, or
    /// on the model's device). A step that
    /// fails (error or panic) must leave every sequence as it was before
    /// it, so the engine can run the same sequences again, one at a time, to
    /// find the one at fault.
    fn step(&mut self, seqs: &[SeqStep<'_>]) -> Result<Option<Tensor>, String>;

    /// Frees everything held for a sequence that has left the batch (blocks
    /// it published stay, under their ids).
    fn release(&mut self, id: u64);

    /// Whether the backend can keep and reuse blocks (`publish`); without
    /// it the node's prefix cache is off.
    fn caches_prefixes(&self) -> bool {
        false
    }

    /// Keeps block `block` (positions `block * BLOCK_TOKENS..`, all stored)
    /// of sequence `id` as `slot`, for later sequences to start from
    /// (`SeqStep::reuse`). Returns false if it cannot.
    fn publish(&mut self, _id: u64, _block: usize, _slot: BlockId) -> bool {
        false
    }

    /// Drops blocks the prefix cache evicted.
    fn forget(&mut self, _slots: &[BlockId]) {}
}
