//! A `tokenizers` tokenizer built from the GGUF's own metadata
//! (`tokenizer.ggml.*`), so a model file is all a node needs.
//!
//! Supported: `tokenizer.ggml.model = "gpt2"` (byte-level BPE, the family of
//! SmolLM, Llama 3, Qwen, ...) with the pre-tokenizers `smollm`, `llama-bpe`
//! and the GPT-2 default. SentencePiece (`"llama"`) vocabularies are refused
//! with a clear error rather than tokenized almost right.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use super::special::{Piece, SpecialStrings, unescape};
use super::{ChatTemplate, ChatTurn, SpecialTokens, TextCodec, TextError};

/// GGUF `tokenizer.ggml.token_type` values that mark special tokens.
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Llama 3's split pattern (llama.cpp `LLAMA_VOCAB_PRE_TYPE_LLAMA3`).
const LLAMA3_SPLIT: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub struct GgufText {
    /// Reads special-token text as the special tokens.
    tokenizer: Tokenizer,
    /// The same vocabulary reading special-token text as text.
    as_text: Tokenizer,
    specials: SpecialStrings,
    bos: Option<u32>,
    eos: Vec<u32>,
    chat: Option<ChatTemplate>,
}

impl GgufText {
    pub fn from_metadata(md: &HashMap<String, Value>) -> Result<Self, TextError> {
        let get = |k: &str| md.get(k).ok_or_else(|| TextError::Unsupported(format!("metadata lacks {k}")));
        let model = get("tokenizer.ggml.model")?.to_string().map_err(err)?;
        if model != "gpt2" {
            return Err(TextError::Unsupported(format!(
                "tokenizer.ggml.model {model:?}; supported: \"gpt2\" (byte-level BPE)"
            )));
        }
        let tokens: Vec<String> = get("tokenizer.ggml.tokens")?
            .to_vec()
            .map_err(err)?
            .iter()
            .map(|v| v.to_string().cloned().map_err(err))
            .collect::<Result<_, _>>()?;
        let merges = get("tokenizer.ggml.merges")?
            .to_vec()
            .map_err(err)?
            .iter()
            .map(|v| {
                let m = v.to_string().map_err(err)?;
                let (a, b) = m.split_once(' ').ok_or_else(|| TextError::Unsupported(format!("merge {m:?}")))?;
                Ok((a.to_string(), b.to_string()))
            })
            .collect::<Result<Vec<_>, TextError>>()?;
        let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let bpe =
            BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| TextError::Tokenizer(e.to_string()))?;
        let mut tokenizer = Tokenizer::new(bpe);
        let pre = md.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).map(String::as_str);
        tokenizer.with_pre_tokenizer(Some(pre_tokenizer(pre)?));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));

        let types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
            Some(v) => v.to_vec().map_err(err)?.iter().map(|t| t.to_i32().map_err(err)).collect::<Result<_, _>>()?,
            None => Vec::new(),
        };
        let special: Vec<AddedToken> = types
            .iter()
            .zip(&tokens)
            .filter(|(t, _)| matches!(**t, TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED))
            .map(|(t, tok)| AddedToken::from(tok.clone(), *t == TOKEN_TYPE_CONTROL))
            .collect();
        tokenizer.add_special_tokens(&special);
        let mut as_text = tokenizer.clone();
        as_text.set_encode_special_tokens(true);
        let specials = SpecialStrings::new(
            special
                .iter()
                .filter(|t| t.special)
                .filter_map(|t| Some((t.content.clone(), tokenizer.token_to_id(&t.content)?)))
                .collect(),
        )
        .map_err(TextError::Tokenizer)?;

        let id = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
        let bos = id("tokenizer.ggml.bos_token_id");
        let add_bos = md.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(false);
        let eos: Vec<u32> =
            [id("tokenizer.ggml.eos_token_id"), id("tokenizer.ggml.eot_token_id")].into_iter().flatten().collect();
        let token_text = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize)).cloned().unwrap_or_default();
        let chat = match md.get("tokenizer.chat_template") {
            Some(t) => Some(ChatTemplate::new(
                t.to_string().map_err(err)?.clone(),
                token_text(bos),
                token_text(eos.first().copied()),
            )?),
            None => None,
        };
        Ok(Self { tokenizer, as_text, specials, bos: bos.filter(|_| add_bos), eos, chat })
    }
}

fn pre_tokenizer(pre: Option<&str>) -> Result<PreTokenizerWrapper, TextError> {
    let byte_level = |regex| ByteLevel::new(false, true, regex).into();
    Ok(match pre {
        Some("smollm") => Sequence::new(vec![Digits::new(true).into(), byte_level(true)]).into(),
        Some("llama-bpe" | "llama3") => {
            let split = Split::new(SplitPattern::Regex(LLAMA3_SPLIT.into()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| TextError::Tokenizer(e.to_string()))?;
            Sequence::new(vec![split.into(), byte_level(false)]).into()
        }
        Some("gpt2" | "default") | None => byte_level(true),
        Some(other) => {
            tracing::warn!(pre = other, "unknown tokenizer.ggml.pre; using the GPT-2 split");
            byte_level(true)
        }
    })
}

fn err(e: candle_core::Error) -> TextError {
    TextError::Unsupported(e.to_string())
}

impl GgufText {
    fn template(&self) -> Result<&ChatTemplate, TextError> {
        self.chat.as_ref().ok_or_else(|| TextError::Template("the model file has no tokenizer.chat_template".into()))
    }

    /// Appends the tokens of `text` to `ids`.
    fn tokenize(&self, text: &str, special: SpecialTokens, ids: &mut Vec<u32>) -> Result<(), TextError> {
        let tokenizer = match special {
            SpecialTokens::AsText => &self.as_text,
            SpecialTokens::Parsed => &self.tokenizer,
        };
        let enc = tokenizer.encode(text, false).map_err(|e| TextError::Tokenizer(e.to_string()))?;
        ids.extend_from_slice(enc.get_ids());
        Ok(())
    }

    /// The chat with the callers' special-token text kept as text and the
    /// template's markers special (see `special`).
    fn encode_chat_as_text(&self, turns: &[ChatTurn]) -> Result<Vec<u32>, TextError> {
        let mut originals = Vec::new();
        let escaped: Vec<ChatTurn> = turns
            .iter()
            .map(|t| ChatTurn {
                role: t.role.clone(),
                content: self.specials.escape(&t.content, &mut originals).into_owned(),
            })
            .collect();
        let rendered = self.template()?.render(&escaped)?;
        let mut ids: Vec<u32> = self.bos.into_iter().collect();
        for piece in self.specials.pieces(&rendered) {
            match piece {
                Piece::Special(id) => ids.push(id),
                Piece::Text(t) => self.tokenize(&unescape(t, &originals), SpecialTokens::AsText, &mut ids)?,
            }
        }
        Ok(ids)
    }
}

impl TextCodec for GgufText {
    fn encode(&self, text: &str, special: SpecialTokens) -> Result<Vec<u32>, TextError> {
        let mut ids: Vec<u32> = self.bos.into_iter().collect();
        self.tokenize(text, special, &mut ids)?;
        Ok(ids)
    }

    fn encode_chat(&self, turns: &[ChatTurn], special: SpecialTokens) -> Result<Vec<u32>, TextError> {
        match special {
            SpecialTokens::AsText => self.encode_chat_as_text(turns),
            SpecialTokens::Parsed => self.encode(&self.template()?.render(turns)?, special),
        }
    }

    fn decode(&self, ids: &[u32]) -> Result<String, TextError> {
        self.tokenizer.decode(ids, true).map_err(|e| TextError::Tokenizer(e.to_string()))
    }

    fn eos_ids(&self) -> &[u32] {
        &self.eos
    }
}
