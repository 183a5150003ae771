//! Text in and out of token ids: the GGUF's own tokenizer and chat template,
//! or the synthetic backend's word codec.

mod chat;
mod gguf;
mod special;
pub mod synthetic_words;

pub use chat::ChatTemplate;
pub use gguf::GgufText;
pub use synthetic_words::WordCodec;

/// One chat turn, independent of the wire format.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChatTurn {
    pub role: String,
    pub content: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("unsupported tokenizer: {0}")]
    Unsupported(String),
}

/// What special-token text (`<|im_start|>`, `<|endoftext|>`) in a caller's
/// prompt or chat contents becomes. The chat template's own markers are
/// special tokens either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecialTokens {
    /// The tokens of the text, as any other text: the default, so a caller
    /// cannot forge a turn or end a sequence early.
    AsText,
    /// The special tokens it names (`allow_special_tokens` in the request).
    Parsed,
}

/// Turns text into token ids and back, and chat turns into a prompt.
pub trait TextCodec: Send + Sync {
    fn encode(&self, text: &str, special: SpecialTokens) -> Result<Vec<u32>, TextError>;
    /// The turns rendered with the model's chat template and tokenized,
    /// followed by the assistant's generation prompt.
    fn encode_chat(&self, turns: &[ChatTurn], special: SpecialTokens) -> Result<Vec<u32>, TextError>;
    fn decode(&self, ids: &[u32]) -> Result<String, TextError>;
    /// Tokens that end a generation.
    fn eos_ids(&self) -> &[u32];
}

/// Turns a growing list of token ids into text deltas that never split a
/// UTF-8 character, decoding only a short window of recent tokens each time
/// (byte-level tokens can carry part of a character; a token's text can also
/// depend on its left neighbour).
#[derive(Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    /// Start of the window that is re-decoded for context.
    prefix: usize,
    /// End of the part of the window already turned into text.
    read: usize,
}

impl IncrementalDecoder {
    /// A decoder continuing after `ids`, whose text was already delivered up
    /// to the last whole character (bytes of a character cut at the end are
    /// delivered once the next tokens complete it).
    pub fn resume(codec: &dyn TextCodec, ids: &[u32]) -> Self {
        let clean = (ids.len().saturating_sub(4)..=ids.len())
            .rev()
            .find(|&k| codec.decode(&ids[..k]).is_ok_and(|t| !t.ends_with('\u{FFFD}')))
            .unwrap_or(0);
        Self { ids: ids.to_vec(), prefix: clean, read: clean }
    }

    /// Adds a token; returns the text it completes (possibly empty).
    pub fn push(&mut self, codec: &dyn TextCodec, id: u32) -> Result<String, TextError> {
        self.ids.push(id);
        let before = codec.decode(&self.ids[self.prefix..self.read])?;
        let after = codec.decode(&self.ids[self.prefix..])?;
        if after.len() <= before.len() || after.ends_with('\u{FFFD}') || !after.starts_with(&before) {
            return Ok(String::new());
        }
        let delta = after[before.len()..].to_string();
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(delta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A codec whose tokens are single bytes, to split characters on purpose.
    struct Bytes;
    impl TextCodec for Bytes {
        fn encode(&self, text: &str, _: SpecialTokens) -> Result<Vec<u32>, TextError> {
            Ok(text.bytes().map(u32::from).collect())
        }
        fn encode_chat(&self, _: &[ChatTurn], _: SpecialTokens) -> Result<Vec<u32>, TextError> {
            unreachable!()
        }
        fn decode(&self, ids: &[u32]) -> Result<String, TextError> {
            let bytes: Vec<u8> = ids.iter().map(|&i| i as u8).collect();
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        }
        fn eos_ids(&self) -> &[u32] {
            &[]
        }
    }

    #[test]
    fn multibyte_characters_are_emitted_whole() {
        let mut dec = IncrementalDecoder::default();
        let text = "a€b😀";
        let deltas: Vec<String> = Bytes
            .encode(text, SpecialTokens::AsText)
            .unwrap()
            .into_iter()
            .map(|id| dec.push(&Bytes, id).unwrap())
            .collect();
        assert_eq!(deltas.concat(), text);
        assert_eq!(deltas.iter().filter(|d| !d.is_empty()).count(), 4, "{deltas:?}");
    }
}
