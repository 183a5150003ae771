//! Prompts that share a prefix, for measuring a node's prefix cache: system
//! prompts that many requests start with, and the seeded text they and the
//! questions after them are made of.
//!
//! Lengths are in words of [`WORDS`], common English words that BPE
//! tokenizers of English models hold as one token each (with their leading
//! space), so L words is about L tokens; the synthetic backend reads exactly
//! one token per word. Reports show the real count from `Usage.prompt_tokens`.

use std::sync::Arc;

use mesh_proto::v1::ChatMessage;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};

use super::mix::MixError;

/// The vocabulary of generated text: 64 words, so an index's base-64 digits
/// spell it in words.
const WORDS: [&str; 64] = [
    "the", "of", "and", "to", "in", "is", "for", "on", "that", "with", "as", "it", "be", "are", "this", "by", "from",
    "at", "or", "an", "not", "can", "will", "all", "one", "has", "more", "new", "time", "data", "system", "user",
    "each", "when", "which", "what", "how", "your", "about", "any", "only", "other", "then", "them", "some", "these",
    "may", "use", "first", "work", "make", "like", "just", "over", "also", "after", "back", "good", "most", "well",
    "way", "even", "want", "because",
];

/// Most system prompts: two leading words tell 64 x 64 of them apart.
pub const MAX_PREFIXES: u32 = 4096;

/// `words` words drawn from `rng`, space-separated.
pub fn seeded_text(rng: &mut impl Rng, words: u32) -> String {
    let picked: Vec<&str> = (0..words).map(|_| WORDS[rng.random_range(0..WORDS.len())]).collect();
    picked.join(" ")
}

/// The system prompt `index` of a set: its first two words are the index's
/// base-64 digits, so no two prompts of a set share even their first block;
/// the rest is seeded text.
fn system_prompt(seed: u64, index: u32, words: u32) -> String {
    let mut rng = StdRng::seed_from_u64(seed ^ (u64::from(index) << 32) ^ PREFIX_SEED);
    let lead = [WORDS[index as usize % 64], WORDS[(index as usize / 64) % 64]];
    let rest = seeded_text(&mut rng, words.saturating_sub(2));
    let lead = lead[..words.min(2) as usize].join(" ");
    if rest.is_empty() { lead } else { format!("{lead} {rest}") }
}

/// Keeps the system prompts' text apart from any other seeded stream.
const PREFIX_SEED: u64 = 0x7072_6566_0000_5eed;

/// `count` system prompts of `words` words, picked per request with Zipf
/// popularity (prompt 0 the most popular), each followed by a fresh question.
#[derive(Debug, Clone)]
pub struct SharedPrefixes {
    system: Vec<Arc<str>>,
    popularity: Zipf<f64>,
    exponent: f64,
    question_words: u32,
}

impl SharedPrefixes {
    /// The prompts' text is a function of `seed` alone, so runs with the same
    /// seed share their prefixes (and a warm-up run warms the measured one).
    pub fn new(count: u32, words: u32, exponent: f64, question_words: u32, seed: u64) -> Result<Self, MixError> {
        let range = |what, value, max| MixError::OutOfRange { what, value, max };
        if count == 0 || count > MAX_PREFIXES {
            return Err(range("shared prefixes", count, MAX_PREFIXES));
        }
        if words == 0 || words > super::mix::MAX_PROMPT_WORDS {
            return Err(range("prefix tokens", words, super::mix::MAX_PROMPT_WORDS));
        }
        if question_words == 0 || question_words > super::mix::MAX_PROMPT_WORDS {
            return Err(range("question tokens", question_words, super::mix::MAX_PROMPT_WORDS));
        }
        let popularity = Zipf::new(f64::from(count), exponent).map_err(|_| MixError::Exponent(exponent))?;
        let system = (0..count).map(|i| Arc::from(system_prompt(seed, i, words))).collect();
        Ok(SharedPrefixes { system, popularity, exponent, question_words })
    }

    /// The index of a system prompt drawn by popularity.
    pub fn pick(&self, rng: &mut impl Rng) -> usize {
        (self.popularity.sample(rng) as usize).clamp(1, self.system.len()) - 1
    }

    /// A request's messages: a popular system prompt and a new question.
    pub fn messages(&self, rng: &mut impl Rng) -> Vec<ChatMessage> {
        let system = self.system[self.pick(rng)].to_string();
        let question = seeded_text(rng, self.question_words);
        vec![message("system", system), message("user", question)]
    }

    /// What the report says the prompts were.
    pub fn describe(&self) -> String {
        let words = self.system.first().map_or(0, |s| s.split(' ').count());
        format!(
            "{} system prompts of {words} words (Zipf {}) + {}-word question",
            self.system.len(),
            self.exponent,
            self.question_words
        )
    }

    #[cfg(test)]
    pub fn system(&self, i: usize) -> &str {
        &self.system[i]
    }
}

pub fn message(role: &str, content: String) -> ChatMessage {
    ChatMessage { role: role.to_string(), content }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first_words(text: &str, n: usize) -> Vec<&str> {
        text.split(' ').take(n).collect()
    }

    #[test]
    fn system_prompts_differ_from_the_first_block_and_repeat_by_seed() {
        let set = SharedPrefixes::new(300, 512, 1.0, 32, 9).unwrap();
        for i in 0..300 {
            assert_eq!(set.system(i).split(' ').count(), 512);
            // The first two words (well inside the first 32-token block) differ.
            for j in 0..i {
                assert_ne!(first_words(set.system(i), 2), first_words(set.system(j), 2), "{i} and {j}");
            }
        }
        let again = SharedPrefixes::new(300, 512, 1.0, 32, 9).unwrap();
        assert_eq!(set.system(7), again.system(7));
        assert_ne!(set.system(7), SharedPrefixes::new(300, 512, 1.0, 32, 10).unwrap().system(7));
    }

    #[test]
    fn picks_follow_zipf_popularity() {
        let set = SharedPrefixes::new(8, 16, 1.0, 4, 1).unwrap();
        let mut rng = StdRng::seed_from_u64(3);
        let mut counts = [0u32; 8];
        for _ in 0..20_000 {
            counts[set.pick(&mut rng)] += 1;
        }
        // Zipf(8, 1): P(k) = (1/k) / H(8), H(8) = 2.718; expected 7357 for
        // prompt 0, 3679 for 1, 920 for 7 (sd under 65 for each).
        assert!((7050..=7650).contains(&counts[0]), "{counts:?}");
        assert!((3400..=3950).contains(&counts[1]), "{counts:?}");
        assert!((700..=1150).contains(&counts[7]), "{counts:?}");
        assert!(counts.windows(2).all(|w| w[0] > w[1]), "{counts:?}");
    }

    #[test]
    fn a_request_is_a_system_prompt_and_a_fresh_question() {
        let set = SharedPrefixes::new(2, 64, 1.0, 32, 1).unwrap();
        let mut rng = StdRng::seed_from_u64(5);
        let (a, b) = (set.messages(&mut rng), set.messages(&mut rng));
        assert_eq!((a[0].role.as_str(), a[1].role.as_str()), ("system", "user"));
        assert!(a[0].content == set.system(0) || a[0].content == set.system(1));
        assert_eq!(a[1].content.split(' ').count(), 32);
        assert_ne!(a[1].content, b[1].content);
        assert!(matches!(SharedPrefixes::new(2, 8, -1.0, 4, 1), Err(MixError::Exponent(_))));
        assert!(matches!(SharedPrefixes::new(0, 8, 1.0, 4, 1), Err(MixError::OutOfRange { .. })));
    }
}
