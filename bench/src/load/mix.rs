//! The request mix: `max_tokens` drawn from weighted choices, and prompts
//! of weighted lengths (from flags, `16:3,128:1`, or a small JSON file), or
//! shared-prefix chats, or multi-turn conversations.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use rand::Rng;
use serde::{Deserialize, Serialize};

use super::conversation::Conversations;
use super::prefix::SharedPrefixes;

/// Weighted values: `(value, weight)` pairs, drawn with probability
/// weight / total weight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Choices(Vec<(u32, u32)>);

#[derive(Debug, thiserror::Error)]
pub enum MixError {
    #[error("bad choice {0:?}: expected VALUE or VALUE:WEIGHT (e.g. 16:3,128:1)")]
    Syntax(String),
    #[error("{0} needs at least one choice with a weight above 0")]
    Empty(&'static str),
    #[error("{what} value {value} is outside 1..={max}")]
    OutOfRange { what: &'static str, value: u32, max: u32 },
    #[error("reading mix file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("parsing mix file {path}: {source}")]
    Parse { path: String, source: serde_json::Error },
    #[error("Zipf exponent {0} must be a number at or above 0")]
    Exponent(f64),
}

impl Choices {
    pub fn one(value: u32) -> Choices {
        Choices(vec![(value, 1)])
    }

    pub fn pairs(&self) -> &[(u32, u32)] {
        &self.0
    }

    fn total_weight(&self) -> u64 {
        self.0.iter().map(|&(_, w)| u64::from(w)).sum()
    }

    /// The index of a choice drawn by weight.
    pub fn sample_index(&self, rng: &mut impl Rng) -> usize {
        let mut pick = rng.random_range(0..self.total_weight().max(1));
        for (i, &(_, w)) in self.0.iter().enumerate() {
            if pick < u64::from(w) {
                return i;
            }
            pick -= u64::from(w);
        }
        0
    }

    fn check(&self, what: &'static str, max: u32) -> Result<(), MixError> {
        if self.total_weight() == 0 {
            return Err(MixError::Empty(what));
        }
        match self.0.iter().find(|&&(v, _)| v == 0 || v > max) {
            Some(&(value, _)) => Err(MixError::OutOfRange { what, value, max }),
            None => Ok(()),
        }
    }
}

impl FromStr for Choices {
    type Err = MixError;

    fn from_str(s: &str) -> Result<Choices, MixError> {
        let parse = |part: &str| -> Option<(u32, u32)> {
            match part.split_once(':') {
                Some((v, w)) => Some((v.trim().parse().ok()?, w.trim().parse().ok()?)),
                None => Some((part.trim().parse().ok()?, 1)),
            }
        };
        s.split(',')
            .map(|p| parse(p).ok_or_else(|| MixError::Syntax(p.to_string())))
            .collect::<Result<_, _>>()
            .map(Choices)
    }
}

impl fmt::Display for Choices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(v, w)| format!("{v}:{w}")).collect();
        f.write_str(&parts.join(","))
    }
}

/// Longest prompt, in words, the mix will build.
pub const MAX_PROMPT_WORDS: u32 = 32_768;
/// Largest `max_tokens` the mix will ask for (the server enforces its own).
pub const MAX_MAX_TOKENS: u32 = 32_768;

/// What requests look like. Plain prompts are built once per length, so
/// sampling one costs a weighted draw and a reference count.
#[derive(Debug, Clone)]
pub struct Mix {
    max_tokens: Choices,
    prompts: Prompts,
}

/// Where a mix's prompts come from.
#[derive(Debug, Clone)]
pub enum Prompts {
    /// Prompt text of weighted lengths; `texts[i]` has `words.pairs()[i].0` words.
    Lengths { words: Choices, texts: Vec<Arc<str>> },
    /// A popular system prompt and a new question, as chat.
    SharedPrefixes(Arc<SharedPrefixes>),
    /// Each closed-loop stream is a user in a multi-turn chat.
    Conversations(Conversations),
}

/// The mix file: `{"prompt_words": [[16, 3], [128, 1]], "max_tokens": [[32, 1]]}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MixFile {
    prompt_words: Choices,
    max_tokens: Choices,
}

impl Mix {
    pub fn new(prompt_words: Choices, max_tokens: Choices) -> Result<Mix, MixError> {
        prompt_words.check("prompt words", MAX_PROMPT_WORDS)?;
        let texts = prompt_words.0.iter().map(|&(words, _)| Arc::from(prompt_text(words))).collect();
        Mix::with_prompts(Prompts::Lengths { words: prompt_words, texts }, max_tokens)
    }

    pub fn shared_prefixes(prefixes: SharedPrefixes, max_tokens: Choices) -> Result<Mix, MixError> {
        Mix::with_prompts(Prompts::SharedPrefixes(Arc::new(prefixes)), max_tokens)
    }

    pub fn conversations(conversations: Conversations, max_tokens: Choices) -> Result<Mix, MixError> {
        Mix::with_prompts(Prompts::Conversations(conversations), max_tokens)
    }

    fn with_prompts(prompts: Prompts, max_tokens: Choices) -> Result<Mix, MixError> {
        max_tokens.check("max_tokens", MAX_MAX_TOKENS)?;
        Ok(Mix { max_tokens, prompts })
    }

    pub fn from_file(path: &Path) -> Result<Mix, MixError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| MixError::Read { path: shown.clone(), source })?;
        let file: MixFile = serde_json::from_str(&text).map_err(|source| MixError::Parse { path: shown, source })?;
        Mix::new(file.prompt_words, file.max_tokens)
    }

    pub fn prompts(&self) -> &Prompts {
        &self.prompts
    }

    /// The prompts as a report shows them: `16:3,128:1` for plain lengths.
    pub fn describe_prompts(&self) -> String {
        match &self.prompts {
            Prompts::Lengths { words, .. } => words.to_string(),
            Prompts::SharedPrefixes(p) => p.describe(),
            Prompts::Conversations(c) => c.describe(),
        }
    }

    pub fn max_tokens(&self) -> &Choices {
        &self.max_tokens
    }

    pub fn sample_max_tokens(&self, rng: &mut impl Rng) -> u32 {
        self.max_tokens.0[self.max_tokens.sample_index(rng)].0
    }
}

/// A prompt of exactly `words` words. The synthetic backend reads one token
/// per word, so there the length in words is the length in tokens; a real
/// tokenizer gives roughly 1-1.5 tokens per word of this text.
pub fn prompt_text(words: u32) -> String {
    const WORDS: [&str; 12] =
        ["the", "mesh", "serves", "tokens", "to", "many", "callers", "while", "each", "node", "batches", "requests"];
    let mut out = String::with_capacity(words as usize * 7);
    for i in 0..words as usize {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(WORDS[i % WORDS.len()]);
    }
    out
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    #[test]
    fn choices_parse_and_draw_by_weight() {
        let c: Choices = "16:3, 128:1".parse().unwrap();
        assert_eq!(c.pairs(), &[(16, 3), (128, 1)]);
        assert_eq!("32".parse::<Choices>().unwrap(), Choices::one(32));
        assert!("16:x".parse::<Choices>().is_err());
        assert!("".parse::<Choices>().is_err());

        let mut rng = StdRng::seed_from_u64(1);
        let long = (0..4000).filter(|_| c.sample_index(&mut rng) == 1).count();
        // Expect 1000 (weight 1 of 4); sd ~27.
        assert!((880..=1120).contains(&long), "{long} long prompts of 4000");
    }

    #[test]
    fn mix_refuses_zero_weights_and_values() {
        assert!(matches!(Mix::new("16:0".parse().unwrap(), Choices::one(8)), Err(MixError::Empty(_))));
        assert!(matches!(Mix::new(Choices::one(0), Choices::one(8)), Err(MixError::OutOfRange { .. })));
        assert!(matches!(Mix::new(Choices::one(4), Choices::one(40_000)), Err(MixError::OutOfRange { .. })));
    }

    #[test]
    fn prompts_have_the_asked_word_count() {
        assert_eq!(prompt_text(1), "the");
        assert_eq!(prompt_text(14).split(' ').count(), 14);
    }

    #[test]
    fn mix_file_parses() {
        let file: MixFile =
            serde_json::from_str(r#"{"prompt_words": [[16, 3], [128, 1]], "max_tokens": [[32, 1]]}"#).unwrap();
        assert_eq!(file.prompt_words.pairs(), &[(16, 3), (128, 1)]);
        assert!(serde_json::from_str::<MixFile>(r#"{"prompt_words": [[16, 3]], "max_tokns": [[32, 1]]}"#).is_err());
    }
}
