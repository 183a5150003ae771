//! The synthetic backend's codec: one token per word of a fixed word list.

use super::{ChatTurn, SpecialTokens, TextCodec, TextError};

/// Size of the synthetic vocabulary.
pub const VOCAB: usize = WORDS.len();

/// The words the synthetic backend speaks; id 0 is its end-of-sequence.
pub const WORDS: [&str; 32] = [
    "<eos>",
    "the",
    "mesh",
    "serves",
    "tokens",
    "to",
    "many",
    "callers",
    "while",
    "each",
    "node",
    "batches",
    "requests",
    "and",
    "every",
    "sidecar",
    "routes",
    "calls",
    "around",
    "failures",
    "under",
    "load",
    "with",
    "bounded",
    "queues",
    "so",
    "nothing",
    "collapses",
    "when",
    "demand",
    "doubles",
    "overnight",
];

pub struct WordCodec;

impl TextCodec for WordCodec {
    /// Any word counts as one token; unknown words map onto the list by hash,
    /// so prompt lengths in tokens equal their word counts.
    /// (The word list has no special tokens: `special` changes nothing.)
    fn encode(&self, text: &str, _: SpecialTokens) -> Result<Vec<u32>, TextError> {
        Ok(text
            .split_whitespace()
            .map(|w| match WORDS.iter().position(|k| *k == w) {
                Some(i) if i > 0 => i as u32,
                _ => {
                    1 + (w.bytes().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b.into()))
                        % (WORDS.len() as u32 - 1))
                }
            })
            .collect())
    }

    fn decode(&self, ids: &[u32]) -> Result<String, TextError> {
        Ok(ids
            .iter()
            .filter(|&&i| i != 0)
            .map(|&i| WORDS.get(i as usize).copied().unwrap_or("?"))
            .map(|w| format!(" {w}"))
            .collect())
    }

    fn eos_ids(&self) -> &[u32] {
        &[0]
    }

    fn encode_chat(&self, turns: &[ChatTurn], special: SpecialTokens) -> Result<Vec<u32>, TextError> {
        let text: String = turns.iter().map(|t| format!("{} {} ", t.role, t.content)).collect();
        self.encode(&text, special)
    }
}
